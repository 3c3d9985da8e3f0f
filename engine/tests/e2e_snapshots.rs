//! End to end: snapshot, overwrite, revert, delete through `zebu-engine ctl`.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// `revert` right after an NBD client disconnected: the engine may not have
/// processed the disconnect yet, so a "client connected" refusal is retried
/// until `DEADLINE`; any other failure is final.
fn revert_when_disconnected(engine: &Engine, name: &str) {
    // The status reports the connected NBD clients (when it has the field).
    engine.wait_status("without NBD clients", |s| {
        s.get("nbd_clients").is_none_or(|n| n.as_u64() == Some(0))
    });
    let start = Instant::now();
    loop {
        let r = engine.ctl_timeout(&["revert", name], common::LONG);
        if r.ok() {
            return;
        }
        let msg = r.stderr.to_lowercase();
        let busy = msg.contains("connect") || msg.contains("client");
        assert!(
            busy && start.elapsed() < DEADLINE,
            "revert {name} failed ({}): {}\nengine stderr:\n{}",
            r.status,
            r.stderr,
            engine.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn snapshot_names(engine: &Engine) -> Vec<String> {
    let r = engine.ctl_ok(&["snapshot", "list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("snapshot list is not JSON ({e}): {}", r.stdout));
    v.as_array()
        .unwrap_or_else(|| panic!("snapshot list is not an array: {v}"))
        .iter()
        .map(|s| {
            assert!(
                s["created_unix"]
                    .as_i64()
                    .is_some_and(|t| t > 1_600_000_000),
                "{s}"
            );
            s["name"].as_str().expect("snapshot name").to_owned()
        })
        .collect()
}

#[test]
fn snapshot_overwrite_revert_delete() {
    let _serial = serial();
    require_tool("nbdcopy", "libnbd-bin");
    let tmp = tempdir();
    let size = 64 * MIB;
    let replicas = start_replicas(tmp.path(), 3, "64M");
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let mut engine = Engine::start(tmp.path(), "snapvol", "64M", &addrs);
    let uri = engine.uri();

    let mut a = pattern(rand_u64(), size as usize);
    a[(40 * MIB) as usize..(48 * MIB) as usize].fill(0);
    let a_path = tmp.path().join("a.img");
    write_file(&a_path, &a);
    nbd_write_file(&uri, &a_path);

    engine.ctl_ok(&["snapshot", "create", "s1"]);
    assert_eq!(snapshot_names(&engine), vec!["s1".to_owned()]);
    // A second snapshot of the same name is refused.
    engine.ctl(&["snapshot", "create", "s1"]).expect_fail();

    let b = pattern(rand_u64(), size as usize);
    let b_path = tmp.path().join("b.img");
    write_file(&b_path, &b);
    nbd_write_file(&uri, &b_path);
    assert_same(
        "pattern B before revert",
        &nbd_read_all(&uri, tmp.path()),
        &b,
    );

    // Revert while an NBD client is connected: refused, clearly, and B
    // stays.
    {
        let conn = NbdConn::connect(&engine.socket, "snapvol");
        assert_eq!(conn.size, size, "NBD_INFO_EXPORT size");
        let r = engine.ctl(&["revert", "s1"]).expect_fail();
        eprintln!("revert with a client connected: {}", r.stderr.trim());
    }
    revert_when_disconnected(&engine, "s1");
    assert_same(
        "pattern A after revert",
        &nbd_read_all(&uri, tmp.path()),
        &a,
    );
    assert!(
        snapshot_names(&engine).contains(&"s1".to_owned()),
        "s1 gone after revert"
    );

    engine.ctl_ok(&["snapshot", "delete", "s1"]);
    assert!(
        !snapshot_names(&engine).contains(&"s1".to_owned()),
        "s1 still listed after delete"
    );
    engine.ctl(&["snapshot", "delete", "s1"]).expect_fail();
    assert_same(
        "pattern A after snapshot delete",
        &nbd_read_all(&uri, tmp.path()),
        &a,
    );
    let st = engine.status();
    assert_eq!(st["state"], "healthy", "{st}");

    engine.stop();
    let data = assert_replicas_identical(&addrs);
    assert_same("replicas vs pattern A", &data, &a);
}
