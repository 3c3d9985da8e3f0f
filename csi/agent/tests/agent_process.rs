//! The node agent with the real `zebu-replica` and `zebu-engine` binaries
//! (build them first: `cargo build -p zebu-replica -p zebu-engine`), driven
//! over its gRPC API on 127.0.0.1.
//!
//! Cleanup: [`Cleanup`] SIGKILLs every process whose command line mentions
//! the test's temporary directory when dropped (also when an assertion
//! fails), which covers processes the agent restarted after the test last
//! looked at them.

#![allow(missing_docs)]

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::Code;
use tonic::transport::Channel;
use zebu_agent::{Agent, AgentConfig};
use zebu_proto::agent as pb;
use zebu_proto::agent::agent_client::AgentClient;
use zebu_proto::replica::replica_client::ReplicaClient;

const MIB: u64 = 1 << 20;
/// Generous deadline for anything that should happen "soon".
const DEADLINE: Duration = Duration::from_secs(120);

/// The tests start several processes each on a small machine: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

use zebu_testkit::{bin as sibling_bin, tempdir};

/// Pids of live processes whose command line contains `needle`.
fn pids_mentioning(needle: &Path) -> Vec<i32> {
    let needle = needle.as_os_str().as_bytes();
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for ent in rd.flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        if let Ok(cmd) = std::fs::read(ent.path().join("cmdline"))
            && cmd.windows(needle.len()).any(|w| w == needle)
        {
            pids.push(pid);
        }
    }
    pids
}

/// True when `pid` is gone or a zombie.
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_none_or(|s| s == "Z" || s == "X"),
    }
}

struct Cleanup {
    dir: tempfile::TempDir,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in pids_mentioning(self.dir.path()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // Engines killed above leave their FUSE mounts behind, dead.
        zebu_testkit::unmount_all_under(self.dir.path());
    }
}

struct Node {
    agent: Agent,
    client: AgentClient<Channel>,
    server: tokio::task::JoinHandle<()>,
}

fn config(root: &Path) -> AgentConfig {
    AgentConfig {
        node_id: "node-a".into(),
        disks: vec![root.join("disk1"), root.join("disk2")],
        state_dir: root.join("state"),
        replica_bin: sibling_bin("zebu-replica"),
        engine_bin: sibling_bin("zebu-engine"),
        listen_host: "127.0.0.1".into(),
        max_volumes: 8,
        advertise_address: String::new(),
    }
}

/// Starts an agent on `root` and serves it on 127.0.0.1:0.
async fn start_node(root: &Path) -> Node {
    let agent = Agent::start(config(root)).await.expect("agent start");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    agent.set_advertise_address(addr.to_string());
    let svc = agent.service();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("agent gRPC server");
    });
    let channel = zebu_common::grpc::connect(&addr.to_string()).await.unwrap();
    Node {
        agent,
        client: AgentClient::new(channel),
        server,
    }
}

fn disk(root: &Path, n: u32) -> String {
    root.join(format!("disk{n}")).to_str().unwrap().to_owned()
}

fn create_req(root: &Path, vol: &str, id: &str, d: u32) -> pb::CreateReplicaRequest {
    pb::CreateReplicaRequest {
        volume_id: vol.into(),
        replica_id: id.into(),
        disk: disk(root, d),
        size_bytes: 64 * MIB,
    }
}

async fn replicas(c: &mut AgentClient<Channel>) -> Vec<pb::ReplicaProcess> {
    c.list_replicas(pb::ListReplicasRequest {})
        .await
        .unwrap()
        .into_inner()
        .replicas
}

async fn engines(c: &mut AgentClient<Channel>) -> Vec<pb::EngineProcess> {
    c.list_engines(pb::ListEnginesRequest {})
        .await
        .unwrap()
        .into_inner()
        .engines
}

/// Polls `f` until it returns `Some`, failing after [`DEADLINE`] with `what`.
async fn eventually<T, F: AsyncFnMut() -> Option<T>>(what: &str, mut f: F) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks the replica at `address` for its info over gRPC.
async fn replica_size(address: &str) -> u64 {
    let ch = zebu_common::grpc::connect(address).await.unwrap();
    ReplicaClient::new(ch)
        .info(zebu_proto::replica::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .size
}

/// `nbdinfo --size` on the engine's socket.
async fn nbd_size(socket: &str) -> u64 {
    let uri = format!("nbd+unix:///?socket={socket}");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("nbdinfo")
            .args(["--size", &uri])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("nbdinfo timed out")
    .expect("nbdinfo is missing: apt-get install libnbd-bin");
    assert!(
        out.status.success(),
        "nbdinfo {uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Creates a replica directory of `size` by running `zebu-replica` directly.
async fn make_replica_dir(dir: &Path, size: u64) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(sibling_bin("zebu-replica"))
        .arg("--dir")
        .arg(dir)
        .args(["--listen", "127.0.0.1:0", "--size", &size.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("zebu-replica ready line")
        .unwrap()
        .unwrap_or_default();
    assert!(line.starts_with("zebu-replica serving"), "{line}");
    let pid = child.id().unwrap();
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let st = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "{st}");
}

fn sigkill(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_created_supervised_and_deleted() {
    let _serial = SERIAL.lock().await;
    let guard = Cleanup { dir: tempdir() };
    let root = guard.dir.path().to_owned();
    let mut node = start_node(&root).await;
    let c = &mut node.client;

    // Create, and again: the same process.
    let r1 = c
        .create_replica(create_req(&root, "vol-a", "r1", 1))
        .await
        .unwrap()
        .into_inner();
    let dir = root.join("disk1/replicas/vol-a/r1");
    assert_eq!(r1.dir, dir.to_str().unwrap());
    assert!(
        r1.running && r1.pid != 0 && !r1.address.is_empty(),
        "{r1:?}"
    );
    assert_eq!((r1.restarts, r1.size_bytes), (0, 64 * MIB));
    assert!(dir.join("layers").is_dir() || dir.read_dir().unwrap().next().is_some());
    let again = c
        .create_replica(create_req(&root, "vol-a", "r1", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, r1);
    assert_eq!(replica_size(&r1.address).await, 64 * MIB);

    // Concurrent creates of one new id start one process.
    let (mut c2, mut c3) = (c.clone(), c.clone());
    let (a, b) = tokio::join!(
        c2.create_replica(create_req(&root, "vol-a", "r2", 2)),
        c3.create_replica(create_req(&root, "vol-a", "r2", 2)),
    );
    let (a, b) = (a.unwrap().into_inner(), b.unwrap().into_inner());
    assert_eq!(a.pid, b.pid);
    assert_eq!(
        pids_mentioning(&root.join("disk2/replicas/vol-a/r2")).len(),
        1
    );

    // Refusals.
    let e = c
        .create_replica(create_req(&root, "vol-b", "r1", 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = c
        .create_replica(create_req(&root, "vol-a", "r1", 2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let mut bad_disk = create_req(&root, "vol-a", "r3", 1);
    bad_disk.disk = root.join("nodisk").to_str().unwrap().into();
    let e = c.create_replica(bad_disk).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains(&disk(&root, 1)),
        "names valid disks: {e:?}"
    );
    let e = c
        .create_replica(create_req(&root, "vol-a", "../r3", 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut zero = create_req(&root, "vol-a", "r3", 1);
    zero.size_bytes = 0;
    assert_eq!(
        c.create_replica(zero).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A replica that cannot start (an existing dir of another size): the
    // error carries its log, the dir is kept, nothing is recorded.
    let r9_dir = root.join("disk1/replicas/vol-a/r9");
    make_replica_dir(&r9_dir, 32 * MIB).await;
    let e = c
        .create_replica(create_req(&root, "vol-a", "r9", 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("exited with status") && e.message().contains("last lines of"),
        "{e:?}"
    );
    assert!(
        r9_dir.is_dir(),
        "a directory the agent did not create is kept"
    );
    assert!(!root.join("state/processes/replica-r9.json").exists());
    assert!(replicas(c).await.iter().all(|r| r.replica_id != "r9"));

    // Node info: both disks, allocation by disk.
    let info = c
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-a");
    assert_eq!(info.max_volumes, 8);
    assert!(!info.agent_address.is_empty());
    assert_eq!(info.disks.len(), 2);
    for d in &info.disks {
        assert!(
            d.capacity_bytes > 0 && d.available_bytes <= d.capacity_bytes,
            "{d:?}"
        );
        assert_eq!(d.allocated_bytes, 64 * MIB, "{d:?}");
    }

    // SIGKILL: restarted on the same dir, on a new address, counted.
    sigkill(r1.pid);
    let restarted = eventually("r1 to be restarted", async || {
        replicas(c)
            .await
            .into_iter()
            .find(|r| r.replica_id == "r1" && r.running && r.pid != r1.pid)
    })
    .await;
    assert_eq!(restarted.restarts, 1, "{restarted:?}");
    assert_eq!(restarted.last_exit, "killed by signal 9");
    assert_eq!(restarted.dir, r1.dir);
    assert!(is_dead(r1.pid));
    assert_eq!(replica_size(&restarted.address).await, 64 * MIB);

    // Delete: process gone, dir gone, unknown id fine.
    c.delete_replica(pb::DeleteReplicaRequest {
        replica_id: "r1".into(),
    })
    .await
    .unwrap();
    assert!(!dir.exists());
    assert!(is_dead(restarted.pid));
    let left = replicas(c).await;
    assert_eq!(
        left.iter()
            .map(|r| r.replica_id.as_str())
            .collect::<Vec<_>>(),
        ["r2"]
    );
    c.delete_replica(pb::DeleteReplicaRequest {
        replica_id: "r1".into(),
    })
    .await
    .unwrap();

    node.agent.stop_all().await;
    assert!(is_dead(a.pid));
    assert!(pids_mentioning(&root).is_empty());
    let e = c
        .list_replicas(pb::ListReplicasRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    node.server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_serve_and_processes_survive_an_agent_restart() {
    let _serial = SERIAL.lock().await;
    let guard = Cleanup { dir: tempdir() };
    let root = guard.dir.path().to_owned();
    let mut node = start_node(&root).await;
    let c = &mut node.client;

    let mut addrs = Vec::new();
    for (i, d) in [(1, 1), (2, 2), (3, 1)] {
        let r = c
            .create_replica(create_req(&root, "vol-e", &format!("e{i}"), d))
            .await
            .unwrap()
            .into_inner();
        addrs.push(r.address);
    }
    let req = pb::StartEngineRequest {
        volume_id: "vol-e".into(),
        size_bytes: 64 * MIB,
        replica_addresses: addrs.clone(),
        io_timeout: "8s".into(),
        scrub_interval: "7d".into(),
        scrub_rate: "32M".into(),
    };
    let eng = c.start_engine(req.clone()).await.unwrap().into_inner();
    assert!(eng.running && eng.pid != 0 && eng.epoch > 0, "{eng:?}");
    assert_eq!(
        eng.nbd_socket,
        root.join("state/engines/vol-e.sock").to_str().unwrap()
    );
    assert_eq!(nbd_size(&eng.nbd_socket).await, 64 * MIB);
    // Idempotent.
    assert_eq!(c.start_engine(req.clone()).await.unwrap().into_inner(), eng);
    // Refusals.
    let mut bad = req.clone();
    bad.replica_addresses = vec!["nohost".into()];
    bad.volume_id = "vol-x".into();
    assert_eq!(
        c.start_engine(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut long = req.clone();
    long.volume_id = "v".repeat(120);
    let e = c.start_engine(long).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("Unix socket"), "{e:?}");
    for (interval, rate, says) in [("soon", "", "scrub_interval"), ("7d", "1K", "scrub_rate")] {
        let mut bad = req.clone();
        bad.volume_id = "vol-x".into();
        bad.scrub_interval = interval.into();
        bad.scrub_rate = rate.into();
        let e = c.start_engine(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(says), "{e:?}");
    }

    // SIGKILL the engine: restarted with the same arguments, a new epoch.
    sigkill(eng.pid);
    let eng2 = eventually("the engine to be restarted", async || {
        engines(c)
            .await
            .into_iter()
            .find(|e| e.running && e.pid != eng.pid)
    })
    .await;
    assert_eq!(eng2.restarts, 1, "{eng2:?}");
    assert!(eng2.epoch > eng.epoch, "{eng2:?}");
    assert_eq!(eng2.replica_addresses, addrs);
    assert_eq!(nbd_size(&eng2.nbd_socket).await, 64 * MIB);

    // Agent restart: the processes are adopted, the engine keeps serving.
    let before_r = replicas(c).await;
    node.agent.shutdown().await;
    node.server.abort();
    drop(node);
    for r in &before_r {
        assert!(!is_dead(r.pid), "{} died with the agent", r.replica_id);
    }
    assert!(!is_dead(eng2.pid));
    assert_eq!(nbd_size(&eng2.nbd_socket).await, 64 * MIB);

    let mut node = start_node(&root).await;
    let c = &mut node.client;
    let after_r = replicas(c).await;
    assert_eq!(after_r, before_r, "replicas adopted as they were");
    let after_e = engines(c).await;
    assert_eq!(after_e, vec![eng2.clone()], "engine adopted as it was");
    assert_eq!(nbd_size(&eng2.nbd_socket).await, 64 * MIB);

    // An adopted process that dies is noticed (by polling) and restarted.
    let victim = after_r[0].clone();
    sigkill(victim.pid);
    let back = eventually("the adopted replica to be restarted", async || {
        replicas(c)
            .await
            .into_iter()
            .find(|r| r.replica_id == victim.replica_id && r.running && r.pid != victim.pid)
    })
    .await;
    assert_eq!(back.restarts, victim.restarts + 1);
    assert_eq!(replica_size(&back.address).await, 64 * MIB);

    // Stop the engine: its process and socket are gone, stopping again is fine.
    c.stop_engine(pb::StopEngineRequest {
        volume_id: "vol-e".into(),
    })
    .await
    .unwrap();
    assert!(engines(c).await.is_empty());
    eventually("the stopped engine to be gone", async || {
        is_dead(eng2.pid).then_some(())
    })
    .await;
    assert!(!Path::new(&eng2.nbd_socket).exists());
    c.stop_engine(pb::StopEngineRequest {
        volume_id: "vol-e".into(),
    })
    .await
    .unwrap();

    let pids: Vec<u32> = replicas(c).await.iter().map(|r| r.pid).collect();
    assert_eq!(pids.len(), 3);
    node.agent.stop_all().await;
    for pid in pids {
        assert!(is_dead(pid), "pid {pid} survived stop_all");
    }
    assert!(pids_mentioning(&root).is_empty());
    node.server.abort();

    // The records survive stop_all: a new agent restarts the replicas.
    let node = start_node(&root).await;
    let mut c = node.client.clone();
    let all = eventually("the replicas to be restarted", async || {
        let rs = replicas(&mut c).await;
        (rs.len() == 3 && rs.iter().all(|r| r.running)).then_some(rs)
    })
    .await;
    for r in &all {
        assert_eq!(replica_size(&r.address).await, 64 * MIB);
    }
    node.agent.stop_all().await;
    assert!(pids_mentioning(&root).is_empty());
    node.server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_interrupted_by_an_agent_crash_is_finished_at_start() {
    let _serial = SERIAL.lock().await;
    let guard = Cleanup { dir: tempdir() };
    let root = guard.dir.path().to_owned();
    let mut node = start_node(&root).await;
    let keep = node
        .client
        .create_replica(create_req(&root, "vol-r", "keep", 1))
        .await
        .unwrap()
        .into_inner();
    let gone = node
        .client
        .create_replica(create_req(&root, "vol-r", "gone", 2))
        .await
        .unwrap()
        .into_inner();
    node.agent.shutdown().await;
    node.server.abort();
    drop(node);

    // As if the agent died during DeleteReplica, after recording the intent.
    let path = root.join("state/processes/replica-gone.json");
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(rec["removing"], serde_json::Value::Bool(false), "{rec}");
    rec["removing"] = serde_json::Value::Bool(true);
    std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();

    let mut node = start_node(&root).await;
    assert!(is_dead(gone.pid), "the replica being removed is stopped");
    assert!(!Path::new(&gone.dir).exists());
    assert!(!path.exists());
    let rs = replicas(&mut node.client).await;
    assert_eq!(rs, vec![keep.clone()], "the other replica is adopted");
    node.agent.stop_all().await;
    assert!(is_dead(keep.pid));
    node.server.abort();
}
