//! Engines on this node: start one for a volume on its replicas
//! (idempotent by volume), stop it, list them.

use super::*;

impl Agent {
    /// `StartEngine`: starts a supervised `zebu-engine` for the volume.
    /// Idempotent by volume id: a running engine is returned as is.
    pub async fn start_engine(
        &self,
        req: pb::StartEngineRequest,
    ) -> Result<pb::EngineProcess, AgentError> {
        self.check_open()?;
        validate_id("volume_id", &req.volume_id)?;
        if req.size_bytes == 0 {
            return Err(AgentError::InvalidArgument(
                "size_bytes is 0: give the volume's size".into(),
            ));
        }
        if req.replica_addresses.is_empty() {
            return Err(AgentError::InvalidArgument(
                "replica_addresses is empty: give the host:port of every replica".into(),
            ));
        }
        for a in &req.replica_addresses {
            if !matches!(zebu_common::grpc::Addr::parse(a), Ok(zebu_common::grpc::Addr::Tcp(ref hp)) if hp == a)
            {
                return Err(AgentError::InvalidArgument(format!(
                    "replica address {a:?} is not HOST:PORT"
                )));
            }
        }
        if !req.io_timeout.is_empty() {
            zebu_proto::duration::parse(&req.io_timeout)
                .map_err(|e| AgentError::InvalidArgument(format!("io_timeout: {e}")))?;
        }
        if !req.scrub_interval.is_empty() {
            zebu_proto::duration::parse_interval(&req.scrub_interval)
                .map_err(|e| AgentError::InvalidArgument(format!("scrub_interval: {e}")))?;
        }
        if !req.scrub_rate.is_empty() {
            zebu_proto::size::parse_rate(&req.scrub_rate)
                .map_err(|e| AgentError::InvalidArgument(format!("scrub_rate: {e}")))?;
        }
        let socket = engine_socket(&self.inner.ctx.engines_dir, &req.volume_id);
        let socket = socket
            .to_str()
            .ok_or_else(|| AgentError::Config(format!("{socket:?} is not UTF-8")))?
            .to_owned();
        if socket.len() > MAX_SOCKET_PATH {
            return Err(AgentError::SocketPathTooLong {
                len: socket.len(),
                path: socket,
            });
        }
        if let Some(parent) = Path::new(&socket).parent() {
            create_dir(parent)?;
        }
        let file = engine_file(Path::new(&socket));
        if let Some(dir) = file.parent() {
            create_dir(dir)?;
        }
        let file = file
            .to_str()
            .ok_or_else(|| AgentError::Config(format!("{file:?} is not UTF-8")))?
            .to_owned();
        let key = Key {
            kind: Kind::Engine,
            id: req.volume_id.clone(),
        };
        let _op = self.lock_key(&key).await;
        self.check_open()?;
        let spec = Spec::Engine {
            volume_id: req.volume_id.clone(),
            size_bytes: req.size_bytes,
            replica_addresses: req.replica_addresses.clone(),
            io_timeout: req.io_timeout.clone(),
            nbd_socket: socket,
            scrub_interval: req.scrub_interval.clone(),
            scrub_rate: req.scrub_rate.clone(),
            file,
        };
        if let Some(proc) = self.proc(&key) {
            let snap = proc.snapshot();
            refuse_removing(&snap.rec)?;
            if !snap.running {
                info!(what = %spec.what(), "not running: starting it now with the request's arguments");
                proc.update(|s| s.rec.spec = spec);
                proc.persist().await?;
                self.start_known(&key, &proc).await?;
            }
            return info_of(proc.engine_info());
        }
        let proc = self.start_new(Record::new(spec)).await?;
        let info = info_of(proc.engine_info())?;
        info!(
            volume = %info.volume_id,
            nbd = %info.nbd_socket,
            control = %info.control_address,
            epoch = info.epoch,
            pid = info.pid,
            "engine started"
        );
        Ok(info)
    }

    /// `StopEngine`: stops the volume's engine cleanly (SIGTERM: it flushes
    /// and closes its replicas). An engine that does not run is fine.
    pub async fn stop_engine(&self, req: pb::StopEngineRequest) -> Result<(), AgentError> {
        self.check_open()?;
        validate_id("volume_id", &req.volume_id)?;
        let key = Key {
            kind: Kind::Engine,
            id: req.volume_id.clone(),
        };
        let _op = self.lock_key(&key).await;
        self.check_open()?;
        self.remove(&key).await
    }

    /// `ListEngines`: every engine, ordered by volume id.
    pub async fn list_engines(&self) -> Result<pb::ListEnginesResponse, AgentError> {
        self.check_open()?;
        Ok(pb::ListEnginesResponse {
            engines: self
                .procs(Kind::Engine)
                .iter()
                .filter_map(|p| p.engine_info())
                .collect(),
        })
    }
}
