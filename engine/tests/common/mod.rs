//! Harness of the engine's end-to-end tests, on top of `zebu_testkit`:
//! real `zebu-replica` and `zebu-engine` processes on 127.0.0.1 (port 0,
//! parsed from their ready lines), direct gRPC access to replicas to check
//! what they hold, a minimal NBD client, a checker of acknowledged writes,
//! and the fault injectors (a TCP proxy, network namespaces).
//!
//! Cleanup: every process started here is owned by a guard (see
//! `zebu_testkit`); declare mounts, loop devices and FUSE exports after the
//! engine so they drop first (locals drop in reverse order).

#![allow(dead_code, missing_docs, unused_imports)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use zebu_proto::ready::{EngineReady, ReplicaReady};
use zebu_proto::replica as pb;
use zebu_proto::replica::replica_client::ReplicaClient;
pub use zebu_testkit::*;

mod checker;
mod netns;
mod proxy;
pub use checker::Checker;
pub use netns::{Lab, Way, in_netns};
pub use proxy::{FaultProxy, Toward};

/// The engine binary under test.
pub fn engine_bin() -> PathBuf {
    bin("zebu-engine")
}

/// The replica binary under test.
pub fn replica_bin() -> PathBuf {
    bin("zebu-replica")
}

// ---------------------------------------------------------------------------
// Replicas.

/// A running `zebu-replica`.
pub struct Replica {
    server: Server,
    pub addr: String,
    pub id: String,
    pub dir: PathBuf,
}

impl Replica {
    /// Starts a replica on `dir` (created with `size` when given).
    pub fn start(dir: &Path, size: Option<&str>) -> Replica {
        Self::start_in(None, "127.0.0.1", dir, size)
    }

    /// Starts a replica listening on `ip` (port 0), in network namespace
    /// `netns` when given.
    pub fn start_in(netns: Option<&str>, ip: &str, dir: &Path, size: Option<&str>) -> Replica {
        Self::launch(
            in_netns(netns, &replica_bin()),
            &format!("{ip}:0"),
            dir,
            size,
        )
    }

    /// Starts the replica again on its directory and address (after it
    /// was killed).
    pub fn restart(&mut self) {
        let addr = self.addr.clone();
        *self = Self::launch(Command::new(replica_bin()), &addr, &self.dir, None);
    }

    /// [`Replica::start`], the process killing itself at crash point
    /// `point` (`zebu_proto::crash`); see [`Replica::wait_crashed_at`].
    pub fn start_crashing_at(dir: &Path, size: Option<&str>, point: &str) -> Replica {
        let mut c = Command::new(replica_bin());
        c.env(zebu_proto::crash::ENV, point);
        Self::launch(c, "127.0.0.1:0", dir, size)
    }

    fn launch(mut c: Command, listen: &str, dir: &Path, size: Option<&str>) -> Replica {
        c.arg("--dir").arg(dir).args(["--listen", listen]);
        if let Some(s) = size {
            c.args(["--size", s]);
        }
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let log = dir.with_file_name(format!("{name}-{}.log", rand_u64() % 1_000_000));
        let (server, ready) =
            Server::start(c, &format!("replica {name}"), log, ReplicaReady::parse);
        let (addr, id) = (ready.address, ready.id);
        Replica {
            server,
            addr,
            id,
            dir: dir.to_owned(),
        }
    }

    pub fn kill9(&mut self) {
        self.server.kill9();
    }

    /// Waits for it to die at the crash point it was started with.
    pub fn wait_crashed_at(&mut self, point: &str) {
        self.server.wait_crashed_at(point);
    }

    /// Sends a signal (e.g. SIGSTOP to make the replica hang).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.server.pid(), sig).unwrap();
    }

    pub fn terminate(&mut self) -> ExitStatus {
        self.server.terminate(DEADLINE)
    }

    pub fn log_tail(&self) -> String {
        self.server.log_tail()
    }
}

/// Starts `n` fresh replicas of `size` in `tmp/r0..`.
pub fn start_replicas(tmp: &Path, n: usize, size: &str) -> Vec<Replica> {
    (0..n)
        .map(|i| Replica::start(&tmp.join(format!("r{i}")), Some(size)))
        .collect()
}

// ---------------------------------------------------------------------------
// The engine.

/// A running `zebu-engine`.
pub struct Engine {
    server: Server,
    pub volume: String,
    pub socket: PathBuf,
    pub control: String,
    pub epoch: u64,
    /// `HOST:PORT` of the TCP NBD listener, when one was asked for
    /// (`extra` = `["--nbd", "tcp:127.0.0.1:0"]`).
    pub tcp: Option<String>,
    pub ready_line: String,
    /// The network namespace it runs in (its `ctl` commands run there too).
    pub netns: Option<String>,
}

impl Engine {
    /// Starts an engine serving `volume` of `size` on `replicas`, NBD on a
    /// unix socket in `tmp`.
    pub fn start(tmp: &Path, volume: &str, size: &str, replicas: &[&str]) -> Engine {
        Self::start_with(tmp, volume, size, replicas, &[])
    }

    pub fn start_with(
        tmp: &Path,
        volume: &str,
        size: &str,
        replicas: &[&str],
        extra: &[&str],
    ) -> Engine {
        Self::start_in(None, "127.0.0.1", tmp, volume, size, replicas, extra)
    }

    /// [`Engine::start_with`] in network namespace `netns`, its control API
    /// on `ip`.
    pub fn start_in(
        netns: Option<&str>,
        ip: &str,
        tmp: &Path,
        volume: &str,
        size: &str,
        replicas: &[&str],
        extra: &[&str],
    ) -> Engine {
        let c = in_netns(netns, &engine_bin());
        Self::launch(c, netns, ip, tmp, volume, size, replicas, extra)
    }

    /// [`Engine::start`], the process killing itself at crash point
    /// `point` (`zebu_proto::crash`); see [`Engine::wait_crashed_at`].
    pub fn start_crashing_at(
        tmp: &Path,
        volume: &str,
        size: &str,
        replicas: &[&str],
        point: &str,
    ) -> Engine {
        let mut c = Command::new(engine_bin());
        c.env(zebu_proto::crash::ENV, point);
        Self::launch(c, None, "127.0.0.1", tmp, volume, size, replicas, &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        mut c: Command,
        netns: Option<&str>,
        ip: &str,
        tmp: &Path,
        volume: &str,
        size: &str,
        replicas: &[&str],
        extra: &[&str],
    ) -> Engine {
        let n = rand_u64() % 1_000_000;
        let socket = tmp.join(format!("nbd-{n}.sock"));
        c.args(["--volume", volume, "--size", size]);
        for r in replicas {
            c.args(["--replica", r]);
        }
        c.arg("--nbd")
            .arg(format!("unix:{}", socket.display()))
            .args(["--listen", &format!("{ip}:0")])
            .args(extra);
        let log = tmp.join(format!("engine-{n}.log"));
        let (server, (ready, line)) = Server::start(c, "zebu-engine", log, |line| {
            EngineReady::parse(line).map(|r| (r, line.to_owned()))
        });
        let expected = format!("{}", socket.display());
        assert!(
            ready.volume == volume && ready.unix_socket() == Some(expected.as_str()),
            "unexpected engine ready line: {line:?}"
        );
        let (control, epoch) = (ready.control.clone(), ready.epoch);
        let tcp = ready.tcp().map(str::to_owned);
        Engine {
            server,
            volume: volume.to_owned(),
            socket,
            control,
            epoch,
            tcp,
            ready_line: line,
            netns: netns.map(str::to_owned),
        }
    }

    /// `nbd+unix:///VOLUME?socket=PATH`
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.volume,
            self.socket.display()
        )
    }

    /// `nbd://HOST:PORT/VOLUME` of the TCP listener.
    pub fn tcp_uri(&self) -> String {
        let tcp = self.tcp.as_ref().expect("engine has no TCP NBD listener");
        format!("nbd://{tcp}/{}", self.volume)
    }

    pub fn log_tail(&self) -> String {
        self.server.log_tail()
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        self.server.pid()
    }

    pub fn kill9(&mut self) {
        self.server.kill9();
    }

    /// Waits for it to die at the crash point it was started with.
    pub fn wait_crashed_at(&mut self, point: &str) {
        self.server.wait_crashed_at(point);
    }

    /// SIGTERM and wait; asserts a clean exit (status 0).
    pub fn stop(&mut self) {
        let st = self.server.terminate(DEADLINE);
        assert!(
            st.success(),
            "engine exited with {st} after SIGTERM; stderr:\n{}",
            self.log_tail()
        );
    }

    /// Runs `zebu-engine ctl --engine CONTROL ARGS...`.
    pub fn ctl(&self, args: &[&str]) -> Run {
        self.ctl_timeout(args, SHORT)
    }

    pub fn ctl_timeout(&self, args: &[&str], timeout: Duration) -> Run {
        let mut c = in_netns(self.netns.as_deref(), &engine_bin());
        c.args(["ctl", "--engine", &self.control]).args(args);
        run(&mut c, timeout)
    }

    /// Runs a ctl command that must succeed (engine stderr in the panic).
    pub fn ctl_ok(&self, args: &[&str]) -> Run {
        let r = self.ctl(args);
        assert!(
            r.ok(),
            "{} failed ({}):\nstdout: {}\nstderr: {}\nengine stderr:\n{}",
            r.what,
            r.status,
            r.stdout,
            r.stderr,
            self.log_tail()
        );
        r
    }

    /// `status -o json`, parsed.
    pub fn status(&self) -> Value {
        let r = self.ctl_ok(&["status", "-o", "json"]);
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("status is not JSON ({e}): {}", r.stdout))
    }

    /// Polls `status` until `pred` holds; panics with the last status after
    /// `DEADLINE`.
    pub fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            if start.elapsed() > DEADLINE {
                panic!(
                    "engine status never became {what} within {DEADLINE:?}; last status:\n{}\nengine stderr:\n{}",
                    serde_json::to_string_pretty(&s).unwrap(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for state healthy with `n` replicas, all RW.
    pub fn wait_healthy(&self, n: usize) -> Value {
        self.wait_status(&format!("healthy with {n} RW replicas"), |s| {
            s["state"] == "healthy"
                && s["replicas"]
                    .as_array()
                    .is_some_and(|r| r.len() == n && r.iter().all(|x| x["mode"] == "RW"))
        })
    }
}

/// Runs `zebu-engine ctl --engine ADDR ARGS...` with a timeout.
pub fn ctl(addr: &str, args: &[&str], timeout: Duration) -> Run {
    let mut c = Command::new(engine_bin());
    c.args(["ctl", "--engine", addr]).args(args);
    run(&mut c, timeout)
}

/// The status entry of the replica at `addr`.
pub fn replica_entry<'a>(status: &'a Value, addr: &str) -> Option<&'a Value> {
    status["replicas"]
        .as_array()?
        .iter()
        .find(|r| r["address"] == addr)
}

pub fn io_counter(status: &Value, name: &str) -> u64 {
    status["io"][name].as_u64().unwrap_or(0)
}

pub async fn replica_client(addr: &str) -> ReplicaClient<Channel> {
    let ch = tokio::time::timeout(
        Duration::from_secs(30),
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap_or_else(|_| panic!("connecting to replica {addr} timed out"))
    .unwrap_or_else(|e| panic!("connecting to replica {addr}: {e}"));
    ReplicaClient::new(ch)
        .max_decoding_message_size(zebu_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(zebu_proto::MAX_MESSAGE_BYTES)
}

/// One raw data stream to a replica.
pub struct RawIo {
    tx: mpsc::Sender<pb::IoBatch>,
    rx: tonic::Streaming<pb::IoReplyBatch>,
    next_id: u64,
    pub epoch: u64,
}

impl RawIo {
    /// Opens a data stream of the replica's current session (that of its
    /// last `Open`).
    pub async fn open(client: &mut ReplicaClient<Channel>, epoch: u64) -> RawIo {
        let session = client
            .info(pb::InfoRequest {})
            .await
            .expect("Info")
            .into_inner()
            .session;
        let (tx, rx) = mpsc::channel(16);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert(
            zebu_proto::wire::SESSION_HEADER,
            session
                .to_string()
                .parse()
                .expect("a number is a header value"),
        );
        let resp = client.io(request).await.expect("open Io stream");
        RawIo {
            tx,
            rx: resp.into_inner(),
            next_id: 1,
            epoch,
        }
    }

    /// Sends the requests as one batch; responses in request order.
    pub async fn batch(&mut self, mut reqs: Vec<pb::IoRequest>) -> Vec<pb::IoResponse> {
        let mut ids = Vec::new();
        for r in &mut reqs {
            r.id = self.next_id;
            self.next_id += 1;
            r.epoch = self.epoch;
            ids.push(r.id);
        }
        self.tx
            .send(pb::IoBatch { requests: reqs })
            .await
            .expect("Io stream closed");
        let mut got: HashMap<u64, pb::IoResponse> = HashMap::new();
        while got.len() < ids.len() {
            let b = tokio::time::timeout(Duration::from_secs(60), self.rx.next())
                .await
                .expect("replica did not answer within 60 s")
                .expect("Io stream ended")
                .expect("Io stream error");
            for r in b.responses {
                got.insert(r.id, r);
            }
        }
        ids.iter().map(|id| got.remove(id).unwrap()).collect()
    }

    pub async fn one(&mut self, r: pb::IoRequest) -> pb::IoResponse {
        self.batch(vec![r]).await.remove(0)
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

pub fn write_req(offset: u64, data: Vec<u8>) -> pb::IoRequest {
    pb::IoRequest {
        op: pb::Op::Write as i32,
        offset,
        length: data.len() as u32,
        crc32: crc32fast::hash(&data),
        payload: Bytes::from(data),
        revision: u64::MAX / 2,
        ..Default::default()
    }
}

pub fn io_status(r: &pb::IoResponse) -> pb::IoStatus {
    pb::IoStatus::try_from(r.status).unwrap_or(pb::IoStatus::IoError)
}

/// Takes over a replica (Open with its epoch + 1, so only after the engine
/// stopped) and reads its whole volume.
pub async fn read_replica_volume(addr: &str) -> Vec<u8> {
    let mut c = replica_client(addr).await;
    let info = c.info(pb::InfoRequest {}).await.expect("Info").into_inner();
    let epoch = info.epoch + 1;
    c.open(pb::OpenRequest { epoch })
        .await
        .unwrap_or_else(|e| panic!("Open({epoch}) on {addr}: {e}"));
    let mut io = RawIo::open(&mut c, epoch).await;
    let size = info.size;
    let mut data = Vec::with_capacity(size as usize);
    let mut off = 0;
    while off < size {
        let reqs: Vec<_> = (0..8)
            .map(|i| off + i * MIB)
            .filter(|&o| o < size)
            .map(|o| read_req(o, MIB.min(size - o)))
            .collect();
        let n = reqs.len() as u64;
        for (i, r) in io.batch(reqs).await.into_iter().enumerate() {
            assert_eq!(
                io_status(&r),
                pb::IoStatus::IoOk,
                "reading replica {addr} at {}: {}",
                off + i as u64 * MIB,
                r.message
            );
            assert_eq!(r.crc32, crc32fast::hash(&r.payload), "read CRC from {addr}");
            data.extend_from_slice(&r.payload);
        }
        off += n * MIB;
    }
    data
}

/// Reads every replica's volume (engine stopped) and asserts they are all
/// equal; returns the common content.
pub fn assert_replicas_identical(addrs: &[&str]) -> Vec<u8> {
    let mut first: Option<Vec<u8>> = None;
    for a in addrs {
        let d = block_on(read_replica_volume(a));
        match &first {
            None => first = Some(d),
            Some(f) => assert_same(&format!("replica {a} vs replica {}", addrs[0]), &d, f),
        }
    }
    first.expect("no replicas")
}

// ---------------------------------------------------------------------------
// A minimal NBD client that just holds a connection open.

/// Connects to a unix NBD socket and completes the fixed-newstyle handshake
/// (NBD_OPT_GO on `export`); the connection stays open until dropped.
pub struct NbdConn {
    sock: std::os::unix::net::UnixStream,
    pub size: u64,
}

impl NbdConn {
    pub fn connect(socket: &Path, export: &str) -> NbdConn {
        let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect NBD socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut hdr = [0u8; 18];
        s.read_exact(&mut hdr).expect("NBD greeting");
        assert_eq!(&hdr[..8], &zebu_nbd::NBD_MAGIC.to_be_bytes());
        assert_eq!(
            &hdr[8..16],
            zebu_nbd::IHAVEOPT.to_be_bytes(),
            "server is not newstyle"
        );
        s.write_all(&(zebu_nbd::FLAG_C_FIXED_NEWSTYLE | zebu_nbd::FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        let mut opt = Vec::new();
        opt.extend_from_slice(&zebu_nbd::IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&zebu_nbd::OPT_GO.to_be_bytes());
        let data_len = 4 + export.len() + 2;
        opt.extend_from_slice(&(data_len as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).unwrap();
        let mut size = 0;
        loop {
            let mut rep = [0u8; 20];
            s.read_exact(&mut rep).expect("NBD option reply");
            let typ = u32::from_be_bytes(rep[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(rep[16..20].try_into().unwrap()) as usize;
            let mut body = vec![0; len];
            s.read_exact(&mut body).unwrap();
            match typ {
                zebu_nbd::REP_ACK => break,
                // NBD_REP_INFO carrying NBD_INFO_EXPORT (0)
                zebu_nbd::REP_INFO
                    if len >= 10 && body[0..2] == zebu_nbd::INFO_EXPORT.to_be_bytes() =>
                {
                    size = u64::from_be_bytes(body[2..10].try_into().unwrap());
                }
                t if t & zebu_nbd::REP_FLAG_ERROR != 0 => panic!(
                    "NBD_OPT_GO refused (reply {t:#x}): {}",
                    String::from_utf8_lossy(&body)
                ),
                _ => {}
            }
        }
        NbdConn { sock: s, size }
    }

    /// NBD_CMD_READ of `len` bytes at `offset` (simple reply): the data, or
    /// the error the server answered with (an errno value).
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.command(zebu_nbd::CMD_READ, offset, len, &[])?;
        let mut data = vec![0u8; len as usize];
        self.sock.read_exact(&mut data).expect("NBD read payload");
        Ok(data)
    }
}

impl NbdConn {
    /// Sends one request (`typ` = NBD_CMD_*) and waits for its simple
    /// reply: Ok, or the error the server answered with (an errno value).
    fn command(&mut self, typ: u16, offset: u64, len: u32, payload: &[u8]) -> Result<(), u32> {
        let cookie = rand_u64();
        let header = zebu_nbd::RequestHeader {
            flags: 0,
            kind: typ,
            cookie,
            offset,
            len,
        };
        let mut req = header.encode().to_vec();
        req.extend_from_slice(payload);
        self.sock.write_all(&req).expect("send NBD request");
        let mut rep = [0u8; zebu_nbd::SIMPLE_REPLY_LEN];
        self.sock.read_exact(&mut rep).expect("NBD reply");
        let reply = zebu_nbd::SimpleReply::parse(&rep).expect("simple reply magic");
        assert_eq!(reply.cookie, cookie, "reply cookie");
        match reply.error {
            0 => Ok(()),
            error => Err(error),
        }
    }

    /// NBD_CMD_WRITE of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        self.command(zebu_nbd::CMD_WRITE, offset, data.len() as u32, data)
    }

    /// NBD_CMD_FLUSH.
    pub fn flush(&mut self) -> Result<(), u32> {
        self.command(zebu_nbd::CMD_FLUSH, 0, 0, &[])
    }
}

impl Drop for NbdConn {
    fn drop(&mut self) {
        let disc = zebu_nbd::RequestHeader {
            flags: 0,
            kind: zebu_nbd::CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        let req = disc.encode();
        let _ = self.sock.write_all(&req);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}
