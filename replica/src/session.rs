//! Data-stream sessions: which engine attachment may still change data.
//!
//! Every `Open` starts a new session (a number that only grows, persisted
//! in the replica's metadata) and the engine names that session on each
//! data stream it opens. A stream of an older session is *superseded*: an
//! engine that ejected this replica and later added it back (same epoch)
//! holds a newer session, and a request of the old stream that the network
//! delivers late — from a TCP send queue that drained after a link healed —
//! must never be applied over what the resync wrote since.
//!
//! Invariant: once [`Sessions::supersede`] has returned, no request of an
//! older session is executing and none will start: every request enters
//! ([`Sessions::enter`]) before it touches the store and holds its
//! [`SessionGuard`] until it is done; `supersede` publishes the new number
//! and then waits until the requests that entered before it have left.
//! The two sides use sequentially consistent operations on two atomics
//! (enter: count, then read the session; supersede: write the session,
//! then read the count), so either a request sees the new session and is
//! refused, or `supersede` sees it counted and waits for it.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Notify, watch};

/// The current session and the requests executing under it.
pub struct Sessions {
    /// The newest session; streams watch it to end themselves once
    /// superseded.
    current: watch::Sender<u64>,
    /// Requests between [`Sessions::enter`] and the drop of their guard.
    active: AtomicU64,
    /// Signalled when `active` drops to zero.
    idle: Notify,
}

/// A request of a superseded session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "session {got} was superseded by session {current}: this replica was opened again since \
     that session began, so its requests are refused; use the session the latest Open returned"
)]
pub struct Superseded {
    /// The stream's session.
    pub got: u64,
    /// The replica's current session.
    pub current: u64,
}

/// Counts one executing request; dropped when the request is done.
pub struct SessionGuard<'a>(&'a Sessions);

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Sessions {
    /// Sessions starting at `current` (the persisted number; 0 before the
    /// first `Open`).
    pub fn new(current: u64) -> Sessions {
        Sessions {
            current: watch::Sender::new(current),
            active: AtomicU64::new(0),
            idle: Notify::new(),
        }
    }

    /// The current session.
    pub fn current(&self) -> u64 {
        *self.current.borrow()
    }

    /// A receiver that sees every later session change (for a stream to
    /// end itself once superseded).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.current.subscribe()
    }

    /// Admits one request of `session`, or refuses it when another session
    /// is current. Session 0 (no `Open` yet) admits nothing.
    pub fn enter(&self, session: u64) -> Result<SessionGuard<'_>, Superseded> {
        self.active.fetch_add(1, Ordering::SeqCst);
        let guard = SessionGuard(self);
        let current = self.current();
        if session == 0 || session != current {
            return Err(Superseded {
                got: session,
                current,
            });
        }
        Ok(guard)
    }

    /// Makes `next` the current session (it must be newer) and waits until
    /// no request of an older one is executing. Requests of `next` cannot
    /// exist yet: the caller hands the number out only after this returns.
    pub async fn supersede(&self, next: u64) {
        self.current.send_modify(|c| {
            debug_assert!(next > *c, "sessions only grow");
            *c = next;
        });
        loop {
            let idle = self.idle.notified();
            let mut idle = std::pin::pin!(idle);
            idle.as_mut().enable();
            if self.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn nothing_is_admitted_before_the_first_open() {
        let s = Sessions::new(0);
        assert_eq!(s.enter(0).err(), Some(Superseded { got: 0, current: 0 }));
        assert!(s.enter(1).is_err());
    }

    #[tokio::test]
    async fn an_older_session_is_refused_after_supersede() {
        let s = Sessions::new(3);
        assert!(s.enter(3).is_ok());
        s.supersede(4).await;
        assert_eq!(s.enter(3).err(), Some(Superseded { got: 3, current: 4 }));
        assert!(s.enter(4).is_ok());
        assert_eq!(s.active.load(Ordering::SeqCst), 0, "guards were dropped");
    }

    #[tokio::test]
    async fn supersede_waits_for_requests_already_admitted() {
        let s = Arc::new(Sessions::new(1));
        let guard = s.enter(1).expect("current session");
        let mut watch = s.watch();
        let s2 = s.clone();
        let superseding = tokio::spawn(async move { s2.supersede(2).await });
        // The new number is published at once: streams learn of it...
        watch.changed().await.expect("sender alive");
        assert_eq!(*watch.borrow(), 2);
        // ...but supersede does not return while the old request runs.
        tokio::task::yield_now().await;
        assert!(!superseding.is_finished());
        drop(guard);
        tokio::time::timeout(Duration::from_secs(30), superseding)
            .await
            .expect("supersede returns once the old request left")
            .expect("task");
    }
}
