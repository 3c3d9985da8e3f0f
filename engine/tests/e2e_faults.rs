//! End to end, faults between the engine and its replicas: a link that
//! stops delivering (a fault proxy holds the bytes, as a TCP send queue
//! behind a dead link would, and delivers them late). After each: every
//! acknowledged and flushed write reads back, and every replica read alone
//! holds the same image.

mod common;

use common::*;
use std::time::Duration;

const VOLUME: &str = "latevol";

/// The late write of a partition: replica 1's link goes down while a write
/// to it sits in the connection's send queue. The engine ejects replica 1
/// after its I/O timeout and acknowledges the write from the two others;
/// the client overwrites the block and flushes; replica 1 comes back
/// (`replica add --wait`: a delta resync, then RW). Then the old request
/// arrives on the old connection. Afterwards every read through the engine
/// and every replica read alone return the overwrite.
#[test]
fn a_late_write_on_an_ejected_replicas_old_connection_is_never_applied() {
    let _serial = serial();
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, "8M");
    let proxy = FaultProxy::start(&replicas[1].addr);
    let addrs = [
        replicas[0].addr.as_str(),
        proxy.addr.as_str(),
        replicas[2].addr.as_str(),
    ];
    let mut engine = Engine::start_with(tmp.path(), VOLUME, "8M", &addrs, &["--io-timeout", "1s"]);
    engine.wait_healthy(3);
    let mut nbd = NbdConn::connect(&engine.socket, VOLUME);
    let block = BS as usize;
    let (a, b, c) = (pattern(1, block), pattern(2, block), pattern(3, block));

    nbd.write(0, &a).expect("write A");
    nbd.flush().expect("flush A");

    // The link to replica 1 stops delivering: what the engine sends waits.
    assert!(
        proxy.freeze() > 0,
        "the engine has connections to replica 1"
    );
    nbd.write(0, &b)
        .expect("write B is acknowledged by the two replicas left");
    engine.wait_status("degraded with replica 1 ejected", |s| {
        s["state"] == "degraded"
            && replica_entry(s, &proxy.addr).is_some_and(|r| r["mode"] == "ERR")
    });
    nbd.write(0, &c).expect("write C");
    nbd.flush().expect("flush C");
    // The engine cut the connection it gave up on (recorded now, asserted
    // after the data checks so that an engine that does not shows the data
    // loss first).
    let cut = proxy.wait_frozen_closed_by_engine(Duration::from_secs(10));

    // The link heals; replica 1 is added back and resynced.
    engine.ctl_ok(&["replica", "add", &proxy.addr, "--wait"]);
    engine.wait_healthy(3);

    // TCP's next retransmission: the stuck request (write B) arrives.
    let delivered = proxy.release();
    assert!(delivered > 0, "write B was held on the old connection");
    assert!(
        proxy.wait_released_closed_by_replica(DEADLINE),
        "replica 1 never closed the old connection after its last bytes"
    );

    // Reads rotate over the replicas: every one must return C.
    for i in 0..12 {
        let got = nbd.read(0, BS as u32).expect("read block 0");
        assert_same(&format!("read {i} of block 0 through the engine"), &got, &c);
    }
    drop(nbd);
    engine.stop();
    let image =
        assert_replicas_identical(&[&replicas[0].addr, &replicas[1].addr, &replicas[2].addr]);
    assert_same("block 0 of every replica", &image[..block], &c);
    assert!(
        cut,
        "the engine did not close its connection to the ejected replica"
    );
}
