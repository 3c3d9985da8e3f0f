//! Followers forward Controller calls to the leader.
//!
//! Every controller serves the CSI Controller service on its own Unix
//! socket, to the CSI sidecars of its pod; the sidecars elect their own
//! leaders, which need not be in the pod whose controller leads Zebu. So a
//! follower does not answer UNAVAILABLE when it knows the leader: it relays
//! the call, unchanged, to the address the leader published on its Lease
//! (`--forward-listen`), presenting the driver's bearer token there.
//!
//! Invariants:
//! - A call is relayed at most once: the leader's forwarding endpoint
//!   serves the plain Controller service, which answers UNAVAILABLE if
//!   leadership moved meanwhile (the sidecar retries), never relays again.
//! - Without a known leader address (none published yet, or a standalone
//!   controller) the call is served locally, as before.
//! - What every controller answers alike is never relayed
//!   ([`LOCAL_CALLS`]): a sidecar starting beside a follower checks the
//!   driver's capabilities within a second, and a leader that just died
//!   (its address still on the Lease) must not make that check fail.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};
use tower::{Service, ServiceExt};
use zebu_common::auth::Token;

use super::Controller;

type Response = http::Response<Body>;

/// Calls served by whichever controller gets them: their answers do not
/// depend on leading.
pub const LOCAL_CALLS: &[&str] = &["/csi.v1.Controller/ControllerGetCapabilities"];

/// The Controller service `inner`, relaying to the leader while `ctl`
/// follows one that published an address.
#[derive(Clone)]
pub struct Forwarding<S> {
    inner: S,
    ctl: Controller,
    token: Option<Token>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl<S> Forwarding<S> {
    /// Wraps `inner` (a `ControllerServer` of `ctl`); relayed calls carry
    /// `token`.
    pub fn new(inner: S, ctl: Controller, token: Option<Token>) -> Self {
        Forwarding {
            inner,
            ctl,
            token,
            channels: Arc::default(),
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let c = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("the leader's address {addr:?} is not usable: {e}"))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect_lazy();
        channels.insert(addr.to_owned(), c.clone());
        Ok(c)
    }
}

impl<S: NamedService> NamedService for Forwarding<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Forwarding<S>
where
    S: Service<http::Request<Body>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let leader = match self.ctl.leader_address() {
            Some(addr) if !LOCAL_CALLS.contains(&req.uri().path()) => Some(addr),
            _ => None,
        };
        let Some(addr) = leader else {
            let fut = self.inner.call(req);
            return Box::pin(fut);
        };
        let channel = match self.channel(&addr) {
            Ok(c) => c,
            Err(e) => {
                return Box::pin(async move { Ok(tonic::Status::unavailable(e).into_http()) });
            }
        };
        if let Some(t) = &self.token
            && let Ok(v) = http::HeaderValue::from_str(&t.header())
        {
            req.headers_mut().insert(http::header::AUTHORIZATION, v);
        }
        let path = req.uri().path().to_owned();
        Box::pin(async move {
            match channel.oneshot(req).await {
                Ok(resp) => Ok(resp),
                Err(e) => Ok(tonic::Status::unavailable(format!(
                    "this controller does not lead and relaying {path} to the leader at {addr} \
                     failed: {e}; retry"
                ))
                .into_http()),
            }
        })
    }
}
