//! Opening a replica directory (creating a new replica, or loading and
//! recovering an existing one: orphaned layer files, CRCs after an unclean
//! stop) and shutting it down cleanly.

use super::*;

/// Parameters to open or create a store.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Replica directory.
    pub dir: PathBuf,
    /// Size; required to create, must match when given for an existing replica.
    pub size: Option<u64>,
    /// Block size for a new replica.
    pub block_size: u32,
    /// I/O backend.
    pub io_engine: EngineKind,
}

impl Store {
    /// Opens the replica in `opts.dir`, creating it when the directory is
    /// missing or empty.
    pub fn open(opts: OpenOptions) -> Result<Store> {
        let dir = opts.dir.clone();
        let bs = opts.block_size;
        if !(512..=65536).contains(&bs) || !bs.is_power_of_two() {
            return Err(StoreError::InvalidArgument(format!(
                "block size {bs} is invalid: use a power of two from 512 to 65536"
            )));
        }
        let meta_path = dir.join("meta");
        let exists = meta_path.exists();
        if !exists {
            if let Ok(mut rd) = std::fs::read_dir(&dir)
                && rd.next().is_some()
            {
                return Err(StoreError::FailedPrecondition(format!(
                    "{} is not empty and holds no replica (no meta/ directory); \
                     refusing to use it. Point --dir at an empty or new directory",
                    dir.display()
                )));
            }
            if opts.size.is_none() {
                return Err(StoreError::InvalidArgument(format!(
                    "{} holds no replica yet: --size is required to create one",
                    dir.display()
                )));
            }
        }
        std::fs::create_dir_all(dir.join("layers"))
            .map_err(io_err(format!("creating {}", dir.join("layers").display())))?;
        let meta_store: Arc<dyn MetaStore> = Arc::new(SledMeta::open(&meta_path)?);
        let io = IoEngine::start(opts.io_engine).map_err(io_err("starting the I/O backend"))?;

        let (mut meta, entries) = match meta_store.load()? {
            None => {
                let size = opts.size.unwrap_or(0);
                if size == 0 || !size.is_multiple_of(bs as u64) {
                    return Err(StoreError::InvalidArgument(format!(
                        "size {size} is invalid: it must be a non-zero multiple of the block size {bs}"
                    )));
                }
                let head =
                    Layer::create(&dir, 0, size, bs).map_err(io_err("creating the head layer"))?;
                let lm = LayerMeta {
                    id: 0,
                    name: String::new(),
                    user_created: false,
                    created_unix: now_unix(),
                };
                let meta = Meta {
                    format: FORMAT,
                    id: uuid::Uuid::new_v4().to_string(),
                    size,
                    block_size: bs,
                    chain: vec![lm.clone()],
                    epoch: 0,
                    revision: 0,
                    clean: true,
                    ejected: vec![],
                    next_layer_id: 1,
                    syncing: false,
                    merging: None,
                    attached: false,
                    last_clean_scrub_unix: 0,
                    session: 0,
                    crc_files_written: true,
                };
                meta_store.save(&meta)?;
                (
                    meta,
                    vec![Entry {
                        meta: lm,
                        layer: Arc::new(head),
                    }],
                )
            }
            Some(meta) => {
                if let Some(size) = opts.size
                    && size != meta.size
                {
                    return Err(StoreError::InvalidArgument(format!(
                        "{} holds a replica of {} bytes; --size {size} does not match (omit --size or pass {})",
                        dir.display(),
                        meta.size,
                        meta.size
                    )));
                }
                let mut entries = Vec::with_capacity(meta.chain.len());
                for lm in &meta.chain {
                    let layer = Layer::open(
                        &dir,
                        lm.id,
                        meta.size,
                        meta.block_size,
                        meta.crc_files_written,
                    )
                    .map_err(|e| {
                        StoreError::FailedPrecondition(format!(
                            "replica in {} is damaged: {e}",
                            dir.display()
                        ))
                    })?;
                    entries.push(Entry {
                        meta: lm.clone(),
                        layer: Arc::new(layer),
                    });
                }
                (meta, entries)
            }
        };
        remove_orphans(&dir, &meta);

        let was_clean = meta.clean;
        if !was_clean {
            // Writes that were not flushed may have reached the data file and
            // not the CRC file (or the reverse): recompute what may be stale.
            let mut suspects = vec![entries[entries.len() - 1].layer.clone()];
            if let Some(m) = &meta.merging
                && let Some(e) = entries.iter().find(|e| e.meta.id == m.into)
            {
                suspects.push(e.layer.clone());
            }
            for layer in suspects {
                let n = layer
                    .recompute_crcs(meta.block_size)
                    .map_err(io_err("recomputing CRCs after an unclean stop"))?;
                tracing::info!(
                    layer = layer.id,
                    blocks = n,
                    "recomputed CRCs after an unclean stop"
                );
            }
        }
        meta.clean = false;
        // Recomputed at every start: a layer opened on a full disk may not
        // be written in full (its CRC file is then synced at every flush,
        // and rewritten at the next start).
        meta.crc_files_written = entries.iter().all(|e| e.layer.crc_written());
        meta_store.save(&meta)?;

        let chain = Chain {
            entries,
            size: meta.size,
            syncing: meta.syncing,
            sync_head: false,
        };
        Ok(Store {
            dir,
            block_size: meta.block_size,
            io,
            meta_store,
            epoch: AtomicU64::new(meta.epoch),
            revision: AtomicU64::new(meta.revision),
            sessions: Sessions::new(meta.session),
            meta: Mutex::new(meta),
            chain: RwLock::new(chain),
            control: tokio::sync::Mutex::new(()),
            flush_lock: tokio::sync::Mutex::new(()),
            dirty: Mutex::new(HashMap::new()),
            was_clean,
            streams: AtomicUsize::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
            sync_failed: std::sync::atomic::AtomicBool::new(false),
            write_order: Arc::default(),
            ahead: WriteBackAhead::default(),
        })
    }

    /// Stops accepting I/O, waits for the I/O in flight, flushes every
    /// layer and marks the replica cleanly stopped. Clients need not have
    /// disconnected: whatever they send afterwards is refused.
    pub async fn shutdown(&self) -> Result<()> {
        let _c = self.control.lock().await;
        self.closed.store(true, Ordering::Release);
        // Not clean after a failed cache flush: the next start must
        // recompute the CRCs from what the disk really holds.
        self.check_sync()?;
        // The exclusive lock waits for every I/O that passed the check.
        let chain = self.chain.write().await;
        let layers: Vec<Arc<Layer>> = chain.entries.iter().map(|e| e.layer.clone()).collect();
        self.sync_layers(&layers).await?;
        let rev = self.revision.load(Ordering::Acquire);
        self.update_meta(|m| {
            m.clean = true;
            m.revision = m.revision.max(rev);
        })
        .await?;
        drop(chain);
        Ok(())
    }
}

fn remove_orphans(dir: &Path, meta: &Meta) {
    let Ok(rd) = std::fs::read_dir(dir.join("layers")) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let id = name.split('.').next().and_then(|s| s.parse::<u64>().ok());
        if let Some(id) = id
            && !meta.chain.iter().any(|l| l.id == id)
        {
            tracing::info!(file = %name, "removing a layer file no chain refers to (left by an interrupted operation)");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
