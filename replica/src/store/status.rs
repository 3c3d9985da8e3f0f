//! The replica's status (what `Info` and every control call report), its
//! plain accessors, and the recorded set of ejected peers.

use super::*;

/// Summary of a layer for [`ReplicaStatus`].
#[derive(Clone, Debug)]
pub struct LayerStatus {
    /// Snapshot name, "" for the head.
    pub name: String,
    /// The writable head.
    pub head: bool,
    /// Bytes allocated on disk.
    pub allocated_bytes: u64,
    /// Blocks held.
    pub present_blocks: u64,
    /// Created by a user.
    pub user_created: bool,
    /// Creation time (Unix seconds).
    pub created_unix: i64,
}

/// A snapshot of the replica's state.
#[derive(Clone, Debug)]
pub struct ReplicaStatus {
    /// Replica id.
    pub id: String,
    /// Volume size.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
    /// Oldest first; the last is the head.
    pub chain: Vec<LayerStatus>,
    /// Current epoch.
    pub epoch: u64,
    /// Highest revision of a completed write.
    pub revision: u64,
    /// The previous run stopped cleanly.
    pub clean: bool,
    /// Ejected peer ids.
    pub ejected: Vec<String>,
    /// I/O backend.
    pub io_engine: EngineKind,
    /// A sync into this replica is in progress.
    pub syncing: bool,
    /// Heap bytes of all extent indexes.
    pub extent_index_bytes: u64,
    /// An engine opened the replica and has not closed it cleanly.
    pub attached: bool,
    /// When the last complete scrub that found nothing corrupt finished
    /// (Unix seconds), 0 if none has.
    pub last_clean_scrub_unix: i64,
    /// The data-stream session the last `Open` started.
    pub session: u64,
}

impl Store {
    /// The block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The I/O backend in use.
    pub fn io_engine(&self) -> EngineKind {
        self.io.kind()
    }

    /// The replica directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Replaces the recorded set of ejected peers.
    pub async fn set_ejected(
        &self,
        ejected: Vec<String>,
        epoch: u64,
        session: u64,
    ) -> Result<ReplicaStatus> {
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        self.check_session(session)?;
        self.update_meta(|m| m.ejected = ejected).await?;
        drop(_c);
        Ok(self.status().await)
    }

    /// The replica's state.
    pub async fn status(&self) -> ReplicaStatus {
        let chain = self.chain.read().await;
        let meta = self.meta().clone();
        let entries = &chain.entries;
        ReplicaStatus {
            id: meta.id,
            size: chain.size,
            block_size: self.block_size,
            chain: entries
                .iter()
                .enumerate()
                .map(|(i, e)| LayerStatus {
                    head: i == entries.len() - 1,
                    ..layer_status(e)
                })
                .collect(),
            epoch: self.epoch.load(Ordering::Acquire),
            revision: self.revision.load(Ordering::Acquire),
            clean: self.was_clean,
            ejected: meta.ejected,
            io_engine: self.io.kind(),
            syncing: chain.syncing,
            extent_index_bytes: entries
                .iter()
                .map(|e| e.layer.index().memory_bytes() as u64)
                .sum(),
            attached: meta.attached,
            last_clean_scrub_unix: meta.last_clean_scrub_unix,
            session: meta.session,
        }
    }
}
