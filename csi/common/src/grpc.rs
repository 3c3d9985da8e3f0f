//! gRPC plumbing shared by the driver, the agent and the CLI: endpoints
//! given as `unix://PATH` or `HOST:PORT`, served and dialled the same way.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// Errors of endpoint parsing and dialling.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// The endpoint string is unusable.
    #[error("invalid endpoint {0:?}: use unix:///path/to/socket or HOST:PORT")]
    BadEndpoint(String),
    /// Connecting failed.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint as given.
        endpoint: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// A parsed endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// A Unix domain socket path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl Addr {
    /// Parses `unix://PATH`, `unix:PATH`, `http://HOST:PORT` or `HOST:PORT`.
    pub fn parse(s: &str) -> Result<Addr, GrpcError> {
        let bad = || GrpcError::BadEndpoint(s.to_owned());
        if let Some(rest) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if rest.is_empty() {
                return Err(bad());
            }
            return Ok(Addr::Unix(PathBuf::from(rest)));
        }
        let hp = s.strip_prefix("http://").unwrap_or(s);
        match hp.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                Ok(Addr::Tcp(hp.to_owned()))
            }
            _ => Err(bad()),
        }
    }
}

/// Longest any call on a dialled channel may take.
pub const CALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Dials `endpoint` (see [`Addr::parse`]) and returns a channel. Connecting
/// is eager, so an absent server is reported here.
pub async fn connect(endpoint: &str) -> Result<Channel, GrpcError> {
    let addr = Addr::parse(endpoint)?;
    let err = |source| GrpcError::Connect {
        endpoint: endpoint.to_owned(),
        source,
    };
    match addr {
        Addr::Tcp(hp) => Endpoint::from_shared(format!("http://{hp}"))
            .map_err(err)?
            .tcp_nodelay(true)
            // Every call is bounded, also when the peer is frozen (SIGSTOP,
            // hung host) and the connection stays up; callers that need less
            // set their own deadline.
            .timeout(CALL_LIMIT)
            .connect()
            .await
            .map_err(err),
        Addr::Unix(path) => connect_unix(&path).await.map_err(err),
    }
}

async fn connect_unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://localhost")
        .timeout(CALL_LIMIT)
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
}

/// Binds a Unix socket at `path` for a gRPC server, replacing a stale socket
/// file left by a previous run and creating the parent directory.
pub fn bind_unix(path: &Path) -> std::io::Result<tokio_stream::wrappers::UnixListenerStream> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = tokio::net::UnixListener::bind(path)?;
    Ok(tokio_stream::wrappers::UnixListenerStream::new(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            Addr::parse("unix:///run/zebu/csi.sock").unwrap(),
            Addr::Unix("/run/zebu/csi.sock".into())
        );
        assert_eq!(
            Addr::parse("unix:rel.sock").unwrap(),
            Addr::Unix("rel.sock".into())
        );
        assert_eq!(
            Addr::parse("127.0.0.1:9000").unwrap(),
            Addr::Tcp("127.0.0.1:9000".into())
        );
        assert_eq!(
            Addr::parse("http://127.0.0.1:9000").unwrap(),
            Addr::Tcp("127.0.0.1:9000".into())
        );
        for bad in ["", "unix://", "nohost", "h:notaport", ":80"] {
            assert!(Addr::parse(bad).is_err(), "{bad}");
        }
    }
}
