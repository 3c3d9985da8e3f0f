//! Helpers of the replica's integration tests that run the real
//! `zebu-replica` binary: start it (its ready line parsed), connect a gRPC
//! client, and send requests on a data stream.

#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use zebu_proto::replica as pb;
use zebu_proto::replica::replica_client::ReplicaClient;
use zebu_testkit::{DEADLINE, Server, bin};

/// Block size of the replicas these tests create.
pub const BS: u64 = 4096;

/// A running replica process; killed when dropped.
pub struct Replica {
    pub server: Server,
    /// gRPC `HOST:PORT`.
    pub addr: String,
    /// Whether its ready line says the previous run stopped cleanly.
    pub clean: bool,
}

impl Replica {
    pub fn start(dir: &Path, size: Option<&str>, engine: &str) -> Replica {
        Self::start_logged(dir, size, engine, &dir.with_extension("log"))
    }

    /// [`Replica::start`] with its log at `log`: outside `dir`'s filesystem
    /// when a test fills that one up.
    pub fn start_logged(dir: &Path, size: Option<&str>, engine: &str, log: &Path) -> Replica {
        let cmd = Command::new(bin("zebu-replica"));
        Self::start_with(cmd, dir, size, engine, log)
    }

    /// Starts the replica through `cmd` (the binary itself, or a launcher
    /// whose last argument is the binary), its stderr in `log`.
    pub fn start_with(
        mut cmd: Command,
        dir: &Path,
        size: Option<&str>,
        engine: &str,
        log: &Path,
    ) -> Replica {
        cmd.arg("--dir")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--io-engine", engine]);
        if let Some(s) = size {
            cmd.args(["--size", s]);
        }
        let (server, ready) = Server::start(
            cmd,
            "zebu-replica",
            log.to_owned(),
            zebu_proto::ready::ReplicaReady::parse,
        );
        assert_eq!(ready.io_engine, engine, "{ready:?}");
        Replica {
            server,
            addr: ready.address,
            clean: ready.clean,
        }
    }

    pub async fn client(&self) -> ReplicaClient<Channel> {
        ReplicaClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
            .max_decoding_message_size(zebu_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(zebu_proto::MAX_MESSAGE_BYTES)
    }

    pub fn kill9(mut self) {
        self.server.kill9();
    }

    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.server.terminate(DEADLINE)
    }
}

/// The replica's current data-stream session (that of its last `Open`).
pub async fn session_of(c: &mut ReplicaClient<Channel>) -> u64 {
    c.info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .session
}

/// One data stream with a request/response helper.
pub struct Io {
    tx: mpsc::Sender<pb::IoBatch>,
    rx: tonic::Streaming<pb::IoReplyBatch>,
    next_id: u64,
    epoch: u64,
}

impl Io {
    /// Opens a data stream of the replica's current session (that of its
    /// last `Open`).
    pub async fn open(client: &mut ReplicaClient<Channel>, epoch: u64) -> Io {
        let session = client
            .info(pb::InfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .session;
        Io::open_session(client, epoch, session).await
    }

    /// Opens a data stream naming `session`.
    pub async fn open_session(client: &mut ReplicaClient<Channel>, epoch: u64, session: u64) -> Io {
        let (tx, rx) = mpsc::channel(16);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert(
            zebu_proto::wire::SESSION_HEADER,
            session.to_string().parse().unwrap(),
        );
        let resp = client.io(request).await.unwrap();
        Io {
            tx,
            rx: resp.into_inner(),
            next_id: 1,
            epoch,
        }
    }

    /// Sends the requests in one batch and returns the responses by id order.
    pub async fn batch(&mut self, mut reqs: Vec<pb::IoRequest>) -> Vec<pb::IoResponse> {
        let mut ids = Vec::new();
        for r in &mut reqs {
            r.id = self.next_id;
            self.next_id += 1;
            if r.epoch == 0 {
                r.epoch = self.epoch;
            }
            ids.push(r.id);
        }
        self.tx.send(pb::IoBatch { requests: reqs }).await.unwrap();
        let mut got: HashMap<u64, pb::IoResponse> = HashMap::new();
        while got.len() < ids.len() {
            let b = self
                .rx
                .next()
                .await
                .expect("stream ended")
                .expect("stream error");
            for r in b.responses {
                got.insert(r.id, r);
            }
        }
        ids.iter().map(|id| got.remove(id).unwrap()).collect()
    }

    pub async fn one(&mut self, r: pb::IoRequest) -> pb::IoResponse {
        self.batch(vec![r]).await.remove(0)
    }

    /// Sends a FLUSH and asserts that it succeeded.
    pub async fn flush(&mut self) {
        let resp = self.one(flush_req()).await;
        assert_eq!(status(&resp), pb::IoStatus::IoOk, "FLUSH: {}", resp.message);
    }

    /// Sends `r` on a stream a later `Open` superseded and asserts that it
    /// was refused: answered as stale, or the stream ended with a status
    /// that says it was superseded.
    pub async fn expect_refused(&mut self, mut r: pb::IoRequest) {
        r.id = self.next_id;
        self.next_id += 1;
        if r.epoch == 0 {
            r.epoch = self.epoch;
        }
        // The replica may already have ended the stream: then the send fails.
        let _ = self.tx.send(pb::IoBatch { requests: vec![r] }).await;
        match self.rx.next().await {
            Some(Ok(b)) => {
                let resp = &b.responses[0];
                assert!(
                    matches!(
                        status(resp),
                        pb::IoStatus::IoStaleSession | pb::IoStatus::IoStaleEpoch
                    ),
                    "a superseded stream's request was answered {:?}: {}",
                    status(resp),
                    resp.message
                );
            }
            Some(Err(st)) => {
                assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st:?}");
                assert!(st.message().contains("superseded"), "{st:?}");
            }
            None => panic!("the superseded stream ended without a status"),
        }
    }
}

pub fn write_req(offset: u64, data: Vec<u8>) -> pb::IoRequest {
    pb::IoRequest {
        op: pb::Op::Write as i32,
        offset,
        length: data.len() as u32,
        crc32: crc32fast::hash(&data),
        payload: Bytes::from(data),
        revision: 1,
        ..Default::default()
    }
}

pub fn read_req(offset: u64, length: u64) -> pb::IoRequest {
    pb::IoRequest {
        op: pb::Op::Read as i32,
        offset,
        length: length as u32,
        ..Default::default()
    }
}

pub fn flush_req() -> pb::IoRequest {
    pb::IoRequest {
        op: pb::Op::Flush as i32,
        ..Default::default()
    }
}

pub fn status(r: &pb::IoResponse) -> pb::IoStatus {
    pb::IoStatus::try_from(r.status).unwrap()
}

/// Writes each of `blocks` (`content(block)`) as a request of its own,
/// asserts that all succeeded, and records them in `image`.
pub async fn write_blocks(
    io: &mut Io,
    image: &mut std::collections::BTreeMap<u64, Vec<u8>>,
    blocks: &[u64],
    content: impl Fn(u64) -> Vec<u8>,
) {
    // A lone write is marked as the engine marks its only outstanding I/O,
    // so commit-like ones take the replica's at-rest path
    // (`store::Placement::HereIfIdle`).
    let alone = blocks.len() == 1;
    let reqs = blocks
        .iter()
        .map(|&b| pb::IoRequest {
            alone,
            ..write_req(b * BS, content(b))
        })
        .collect();
    for (resp, &b) in io.batch(reqs).await.iter().zip(blocks) {
        assert_eq!(
            status(resp),
            zebu_proto::replica::IoStatus::IoOk,
            "write of block {b}: {}",
            resp.message
        );
        image.insert(b, content(b));
    }
}
