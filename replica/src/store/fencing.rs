//! Fencing and sessions: taking an epoch (`Open`), the clean `Close`, the
//! epoch check every request passes, data-stream sessions and the count of
//! open streams.

use super::*;

impl Store {
    pub(super) fn check_epoch(&self, epoch: u64) -> Result<()> {
        self.check_sync()?;
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::FailedPrecondition(
                "the replica is shutting down; reconnect when it is back".into(),
            ));
        }
        let current = self.epoch.load(Ordering::Acquire);
        if epoch < current {
            Err(StoreError::StaleEpoch {
                got: epoch,
                current,
            })
        } else if epoch > current || current == 0 {
            Err(StoreError::NotOpen {
                got: epoch,
                current,
            })
        } else {
            Ok(())
        }
    }

    /// Takes `epoch` (persisted before returning) and starts a new
    /// data-stream session: once this returns, no request of an older
    /// session's stream is executing or will be applied. Lower epochs are
    /// refused.
    pub async fn open_epoch(&self, epoch: u64) -> Result<ReplicaStatus> {
        let _c = self.control.lock().await;
        self.check_sync()?;
        let current = self.epoch.load(Ordering::Acquire);
        if epoch == 0 {
            return Err(StoreError::InvalidArgument(
                "epoch must be at least 1".into(),
            ));
        }
        if epoch < current {
            return Err(StoreError::StaleEpoch {
                got: epoch,
                current,
            });
        }
        let session = self.meta().session.max(self.sessions.current()) + 1;
        self.sessions.supersede(session).await;
        self.update_meta(|m| {
            m.epoch = epoch;
            m.attached = true;
            m.session = session;
        })
        .await?;
        self.epoch.store(epoch, Ordering::Release);
        drop(_c);
        Ok(self.status().await)
    }

    /// Clean detach of the engine holding `epoch`: flushes every layer and
    /// records that no write of that engine is outstanding.
    pub async fn close(&self, epoch: u64, session: u64) -> Result<ReplicaStatus> {
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        self.check_session(session)?;
        self.flush_all(true).await?;
        self.update_meta(|m| m.attached = false).await?;
        drop(_c);
        Ok(self.status().await)
    }

    /// The current data-stream session (that of the last `Open`; 0 before
    /// the first).
    pub fn session(&self) -> u64 {
        self.sessions.current()
    }

    /// Refuses a control call of `session` unless it is the current one
    /// (call it holding the control lock, which `Open` takes too).
    pub(super) fn check_session(&self, session: u64) -> Result<()> {
        let current = self.sessions.current();
        if session == 0 || session != current {
            return Err(Superseded {
                got: session,
                current,
            }
            .into());
        }
        Ok(())
    }

    /// Admits one data-stream request of `session` and `epoch` (see
    /// [`crate::session`]): hold the guard until the request is done. A
    /// stale or unopened epoch is refused as such first.
    pub fn enter_session(&self, session: u64, epoch: u64) -> Result<SessionGuard<'_>> {
        self.check_epoch(epoch)?;
        Ok(self.sessions.enter(session)?)
    }

    /// Sees every change of the current session (a stream ends itself once
    /// a later `Open` superseded it).
    pub fn watch_session(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sessions.watch()
    }

    /// Registers an open data stream; revert is refused while any is open.
    pub fn stream_guard(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }
}

/// Counts an open data stream while alive.
pub struct StreamGuard(Arc<Store>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}
