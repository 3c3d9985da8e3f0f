//! The `zebu` command line against a real standalone driver: every command
//! a user runs, with its exit status, output and JSON checked.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

struct Zebu<'a> {
    endpoint: String,
    state: &'a Path,
}

impl Zebu<'_> {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(zebu_bin())
            .args(args)
            .env("ZEBU_ENDPOINT", &self.endpoint)
            .env("ZEBU_CLI_STATE", self.state)
            .output()
            .expect("run zebu")
    }

    /// Runs and requires success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "zebu {args:?} failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    /// Runs and requires failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "zebu {args:?} should have failed");
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).expect("valid JSON")
    }
}

#[test]
fn the_cli_drives_the_whole_volume_life() {
    let _serial = serial();
    require_node_tools();
    require_data_path_bins();
    let tmp = tempdir();
    let root = tmp.path().to_owned();
    let _scrub = Scrub(root.clone());
    let driver = Driver::standalone(&root, "cli-node", 3, &[]);
    let cli_state = root.join("cli");
    let z = Zebu {
        endpoint: driver.endpoint.clone(),
        state: &cli_state,
    };

    assert!(z.ok(&["status"]).contains("zebu.csi.dev"));
    let v = z.ok(&[
        "volume",
        "create",
        "app-data",
        "--size",
        "128M",
        "--replicas",
        "3",
    ]);
    assert!(v.starts_with("zv-"), "{v}");
    // Same name, same size: the same volume.
    assert_eq!(
        z.ok(&[
            "volume",
            "create",
            "app-data",
            "--size",
            "128M",
            "--replicas",
            "3"
        ]),
        v
    );
    let err = z.fails(&["volume", "create", "app-data", "--size", "256M"]);
    assert!(err.contains("already exists"), "{err}");
    let err = z.fails(&["volume", "create", "x", "--size", "12Q"]);
    assert!(!err.is_empty());

    let list = z.json(&["volume", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["id"], v.as_str());
    assert_eq!(list[0]["size_bytes"], 128u64 << 20);

    let mnt = root.join("mnt");
    let mnt_s = mnt.display().to_string();
    z.ok(&["volume", "attach", &v, "--mount", &mnt_s]);
    assert_served_by_the_engine(&root);
    std::fs::write(mnt.join("hello"), b"from the cli").expect("write");
    nix::unistd::sync();
    let replicas = z.json(&["replica", "list", &v]);
    let modes: Vec<&str> = replicas["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .filter_map(|r| r["mode"].as_str())
        .collect();
    assert_eq!(modes, ["RW", "RW", "RW"], "{replicas}");
    // The driver starts engines with its scrub schedule (weekly, 64 MiB/s).
    assert_eq!(
        replicas["scrub"]["interval_seconds"],
        7 * 86_400,
        "{replicas}"
    );
    assert_eq!(
        replicas["scrub"]["max_bytes_per_sec"],
        64 << 20,
        "{replicas}"
    );
    let table = z.ok(&["replica", "list", &v]);
    assert!(table.contains("RW") && table.contains("healthy"), "{table}");
    assert!(
        table.contains("scrub: every 7d at 64.0 MiB/s per replica"),
        "{table}"
    );
    // Every block of every replica checks out against its stored CRC.
    let scrub = z.json(&["replica", "scrub", &v]);
    let lines = scrub.as_array().expect("one line per replica");
    assert_eq!(lines.len(), 3, "{scrub}");
    for l in lines {
        assert!(l["blocks_checked"].as_u64() > Some(0), "{scrub}");
        assert_eq!(l["corrupt_blocks"], 0, "{scrub}");
        assert_eq!(l["error"], "", "{scrub}");
    }
    let table = z.ok(&["replica", "scrub", &v]);
    assert!(table.contains("CORRUPT"), "{table}");
    // A block rots on one replica's disk: the scrub finds it and fails;
    // --repair resyncs that replica from a clean one. The filesystem is
    // frozen meanwhile, so it cannot rewrite the block first.
    let frozen = Frozen::new(&mnt_s);
    let file = corrupt_first_data_block(&root);
    let o = z.run(&["replica", "scrub", &v, "-o", "json"]);
    assert!(!o.status.success(), "corruption left must fail the scrub");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("--repair"), "{stderr}");
    let found: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let corrupt: Vec<u64> = found
        .as_array()
        .expect("lines")
        .iter()
        .filter_map(|l| l["corrupt_blocks"].as_u64())
        .collect();
    assert_eq!(
        corrupt.iter().sum::<u64>(),
        1,
        "{found} ({})",
        file.display()
    );
    let fixed = z.json(&["replica", "scrub", &v, "--repair"]);
    let repaired = fixed.as_array().expect("lines");
    assert_eq!(
        repaired.iter().filter(|l| l["repaired"] == true).count(),
        1,
        "{fixed}"
    );
    let again = z.json(&["replica", "scrub", &v]);
    assert!(
        again
            .as_array()
            .expect("lines")
            .iter()
            .all(|l| l["corrupt_blocks"] == 0),
        "{again}"
    );
    drop(frozen);
    let err = z.fails(&["volume", "delete", &v]);
    assert!(err.contains("attach"), "{err}");

    let s = z.ok(&["snapshot", "create", "before-change", "--volume", &v]);
    assert!(s.starts_with("zs-"), "{s}");
    let snaps = z.json(&["snapshot", "list", "--volume", &v]);
    assert_eq!(snaps[0]["id"], s.as_str());
    std::fs::write(mnt.join("hello"), b"changed").expect("write");
    nix::unistd::sync();

    // Restore and clone, read through a read-only attach and a block attach.
    let r = z.ok(&[
        "volume",
        "create",
        "restored",
        "--size",
        "128M",
        "--from-snapshot",
        &s,
    ]);
    let rmnt = root.join("restored");
    z.ok(&[
        "volume",
        "attach",
        &r,
        "--mount",
        &rmnt.display().to_string(),
        "--read-only",
    ]);
    assert_eq!(
        std::fs::read(rmnt.join("hello")).expect("read"),
        b"from the cli"
    );
    assert!(
        std::fs::write(rmnt.join("nope"), b"x").is_err(),
        "read-only attach accepted a write"
    );
    z.ok(&["volume", "detach", &r]);
    let c = z.ok(&[
        "volume",
        "create",
        "cloned",
        "--size",
        "128M",
        "--clone-of",
        &v,
    ]);
    let dev = root.join("cloned-dev");
    z.ok(&[
        "volume",
        "attach",
        &c,
        "--block",
        &dev.display().to_string(),
    ]);
    let meta = std::fs::metadata(&dev).expect("block target");
    use std::os::unix::fs::FileTypeExt;
    assert!(meta.file_type().is_block_device());
    z.ok(&["volume", "detach", &c]);

    // Expand while detached; the next attach grows ext4.
    z.ok(&["volume", "detach", &v]);
    let err = z.fails(&["replica", "scrub", &v]);
    assert!(
        err.contains("detached") && err.contains("attach it"),
        "{err}"
    );
    z.ok(&["volume", "expand", &v, "256M"]);
    z.ok(&["volume", "attach", &v, "--mount", &mnt_s]);
    let st = nix::sys::statvfs::statvfs(&mnt).expect("statvfs");
    assert!(
        st.blocks() * st.fragment_size() > 200 << 20,
        "ext4 did not grow"
    );
    assert_eq!(std::fs::read(mnt.join("hello")).expect("read"), b"changed");
    let got = z.json(&["volume", "get", &v]);
    assert_eq!(got["size_bytes"], 256u64 << 20, "{got}");
    z.ok(&["volume", "detach", &v]);
    // Detaching again is harmless.
    z.ok(&["volume", "detach", &v]);

    // Online expansion: xfs grows while mounted and in use (the device
    // grows in place through the engine's file, then xfs_growfs).
    let x = z.ok(&[
        "volume", "create", "xfs-data", "--size", "320M", "--fstype", "xfs",
    ]);
    let xmnt = root.join("xfs");
    z.ok(&[
        "volume",
        "attach",
        &x,
        "--mount",
        &xmnt.display().to_string(),
    ]);
    std::fs::write(xmnt.join("kept"), b"through the expansion").expect("write");
    nix::unistd::sync();
    let size = |p: &Path| {
        let st = nix::sys::statvfs::statvfs(p).expect("statvfs");
        st.blocks() * st.fragment_size()
    };
    let before = size(&xmnt);
    let out = z.ok(&["volume", "expand", &x, "640M"]);
    let after = size(&xmnt);
    assert!(
        after > before + (250 << 20),
        "xfs did not grow online: {before} -> {after} ({out})"
    );
    assert_eq!(
        std::fs::read(xmnt.join("kept")).expect("read"),
        b"through the expansion"
    );
    z.ok(&["volume", "detach", &x]);

    z.ok(&["snapshot", "delete", &s]);
    for id in [&v, &r, &c, &x] {
        z.ok(&["volume", "delete", id]);
    }
    let err = z.fails(&["volume", "get", &v]);
    assert!(err.contains("does not exist"), "{err}");
    assert_eq!(
        z.json(&["volume", "list"]).as_array().map(Vec::len),
        Some(0)
    );
    let left: Vec<i32> = pids_mentioning(&root)
        .into_iter()
        .filter(|p| *p != driver.child.id() as i32)
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(
        mounts_under(&root).is_empty(),
        "mounts left: {:?}",
        mounts_under(&root)
    );
}

/// Runs `cmd` and requires success.
/// The attached device reads the file the engine serves itself: the
/// attachment record under `root` says so, the engine's FUSE mount is
/// there, and no bridge runs for it.
fn assert_served_by_the_engine(root: &Path) {
    let out = Command::new("find")
        .arg(root)
        .args(["-name", "attach.json"])
        .output()
        .expect("find");
    let records: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|p| std::fs::read_to_string(p).expect("read attach.json"))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let rec: serde_json::Value = serde_json::from_str(&records[0]).expect("attach.json");
    assert_eq!(rec["backend"], "engine", "{rec}");
    assert!(rec["nbdfuse_pid"].is_null(), "{rec}");
    let root = root.display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let engine_mounts = mounts
        .lines()
        .filter(|l| l.contains(" - fuse zebu-engine ") && l.contains(&root))
        .count();
    // The engine's own mount and its bind at the attachment's state dir.
    assert_eq!(engine_mounts, 2, "{mounts}");
    let bridges = Command::new("pgrep")
        .args(["-f", &format!("zebu-nbd-fuse .*{root}")])
        .output()
        .expect("pgrep");
    assert!(
        bridges.stdout.is_empty(),
        "a bridge runs: {}",
        String::from_utf8_lossy(&bridges.stdout)
    );
}

fn must_run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Cache flushes the block device mounted at `mnt` has completed (the 16th
/// field of its `stat`).
fn disk_flushes(mnt: &Path) -> u64 {
    let out = Command::new("findmnt")
        .args(["-n", "-o", "SOURCE"])
        .arg(mnt)
        .output()
        .expect("run findmnt");
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let name = Path::new(&dev).file_name().expect("a device path");
    let stat = std::fs::read_to_string(Path::new("/sys/block").join(name).join("stat"))
        .unwrap_or_else(|e| panic!("reading the stat of {dev}: {e}"));
    let field = stat.split_whitespace().nth(15).expect("a flush count");
    field.parse().unwrap()
}

/// A node serving an attached volume that nobody uses asks the disk holding
/// its replicas for no cache flush. A flush makes the disk write back its
/// whole cache and holds up every other request meanwhile, so a node with
/// idle volumes would slow down the busy ones: sled's background flusher
/// used to do that twice a second in every replica. Here the replicas'
/// disks are a filesystem of their own (on a loop device, whose flushes are
/// counted) and the volume is attached as a block device (no filesystem of
/// its own that would write in the background).
#[test]
fn an_idle_attached_volume_sends_its_disk_no_cache_flushes() {
    let _serial = serial();
    require_node_tools();
    require_data_path_bins();
    let tmp = tempdir();
    let root = tmp.path().to_owned();
    let _scrub = Scrub(root.clone());
    let disk = root.join("disk");
    std::fs::create_dir(&disk).expect("mkdir");
    let img = root.join("disk.img");
    must_run(Command::new("truncate").args(["-s", "256M"]).arg(&img));
    must_run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&img),
    );
    must_run(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&disk),
    );
    let disks: Vec<String> = (0..3)
        .map(|i| disk.join(format!("d{i}")).display().to_string())
        .flat_map(|d| ["--disk".to_owned(), d])
        .collect();
    let disks: Vec<&str> = disks.iter().map(String::as_str).collect();
    let driver = Driver::standalone(&root, "idle-node", 0, &disks);
    let cli_state = root.join("cli");
    let z = Zebu {
        endpoint: driver.endpoint.clone(),
        state: &cli_state,
    };
    let v = z.ok(&[
        "volume",
        "create",
        "idle",
        "--size",
        "64M",
        "--replicas",
        "3",
    ]);
    let dev = root.join("dev");
    z.ok(&[
        "volume",
        "attach",
        &v,
        "--block",
        &dev.display().to_string(),
    ]);

    // The count sees the volume's flushes: a synced write through the block
    // device reaches every replica's disk as a flush.
    let before = disk_flushes(&disk);
    must_run(
        Command::new("dd")
            .args([
                "if=/dev/urandom",
                "bs=1M",
                "count=4",
                "oflag=direct",
                "conv=fsync",
            ])
            .arg(format!("of={}", dev.display())),
    );
    assert!(
        disk_flushes(&disk) > before,
        "a synced write flushed the disk"
    );
    // Commit whatever the filesystem still holds, so that only Zebu's
    // processes could flush from here on.
    must_run(Command::new("sync").arg("-f").arg(&disk));
    let idle_from = disk_flushes(&disk);
    // Engine, bridge, agent and 3 replicas idle for 11 s: sled's old
    // flusher alone would have flushed 66 times.
    std::thread::sleep(std::time::Duration::from_secs(11));
    let flushed = disk_flushes(&disk) - idle_from;
    assert_eq!(
        flushed, 0,
        "an idle node sent its disk {flushed} cache flushes in 11 s"
    );

    z.ok(&["volume", "detach", &v]);
    z.ok(&["volume", "delete", &v]);
}
