//! End to end, network faults made by the kernel: the engine and each
//! replica on a host of their own (network namespaces on a bridge), links
//! slowed with `tbf`, cut with `ip link`, made lossy in one direction or
//! both with nftables, then healed. After each scenario the engine stops
//! cleanly and every replica, restarted on loopback and read alone, holds
//! the same image, with every acknowledged and flushed write.

mod common;

use common::*;
use std::thread;
use std::time::Duration;

const ENGINE_HOST: usize = 3;

/// Three replica hosts (0..3) and an engine host (3), the engine started
/// with a 2 s I/O timeout.
struct Net {
    replicas: Vec<Replica>,
    engine: Engine,
    addrs: Vec<String>,
    // Last: fields drop in order, so the processes leave its namespaces first.
    lab: Lab,
}

impl Net {
    fn start(tmp: &std::path::Path, volume: &str) -> Net {
        let lab = Lab::new(4);
        let replicas: Vec<Replica> = (0..3)
            .map(|i| {
                Replica::start_in(
                    Some(lab.netns(i)),
                    &lab.ip(i),
                    &tmp.join(format!("r{i}")),
                    Some("16M"),
                )
            })
            .collect();
        let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let engine = Engine::start_in(
            Some(lab.netns(ENGINE_HOST)),
            &lab.ip(ENGINE_HOST),
            tmp,
            volume,
            "16M",
            &refs,
            &["--io-timeout", "2s"],
        );
        engine.wait_healthy(3);
        Net {
            lab,
            replicas,
            engine,
            addrs,
        }
    }

    fn wait_ejected(&self, i: usize) {
        let addr = &self.addrs[i];
        self.engine
            .wait_status(&format!("replica {i} ejected"), |s| {
                replica_entry(s, addr).is_some_and(|r| r["mode"] == "ERR")
            });
    }

    /// Adds replica `i` back (if it was ejected) and waits until all are RW.
    fn readd_if_ejected(&self, i: usize) {
        let st = self.engine.status();
        if replica_entry(&st, &self.addrs[i]).is_some_and(|r| r["mode"] == "ERR") {
            self.engine
                .ctl_ok(&["replica", "add", &self.addrs[i], "--wait"]);
        }
        self.engine.wait_healthy(3);
    }

    /// Stops the engine cleanly, restarts every replica on loopback and
    /// asserts they hold the same image; returns it.
    fn stop_and_compare(mut self, tmp: &std::path::Path) -> Vec<u8> {
        self.engine.stop();
        let mut local = Vec::new();
        for (i, r) in self.replicas.iter_mut().enumerate() {
            let st = r.terminate();
            assert!(st.success(), "replica {i} exited with {st}");
            local.push(Replica::start(&tmp.join(format!("r{i}")), None));
        }
        let addrs: Vec<&str> = local.iter().map(|r| r.addr.as_str()).collect();
        assert_replicas_identical(&addrs)
    }
}

/// The report that found the late-write data loss, replayed with the
/// kernel's own tools: the link to replica 2 is slowed to 16 kbit/s, a
/// write is sent, the link goes down; the engine ejects replica 2 and
/// acknowledges the write; the client overwrites the block and flushes;
/// the link heals and replica 2 is added back. Then TCP would retransmit
/// what the old connection still held: reads keep returning the overwrite
/// for as long as the old connection could have delivered, and the
/// replicas end identical.
#[test]
fn a_slowed_then_cut_link_loses_no_acknowledged_write() {
    let _serial = serial();
    let tmp = tempdir();
    let net = Net::start(tmp.path(), "slowcut");
    let mut nbd = NbdConn::connect(&net.engine.socket, "slowcut");
    let block = BS as usize;
    let (a, b, c) = (pattern(51, block), pattern(52, block), pattern(53, block));
    nbd.write(0, &a).expect("write A");
    nbd.flush().expect("flush A");

    net.lab.slow(2, 16);
    let writer = thread::spawn(move || {
        let r = nbd.write(0, &b);
        (nbd, r)
    });
    // Let the write reach the slowed link's queue, then cut it.
    thread::sleep(Duration::from_millis(300));
    net.lab.cut(2);
    let (mut nbd, written) = writer.join().expect("writer thread");
    written.expect("write B is acknowledged by the two replicas left");
    net.wait_ejected(2);
    nbd.write(0, &c).expect("write C");
    nbd.flush().expect("flush C");

    net.lab.heal(2);
    net.readd_if_ejected(2);
    // The old connection's retransmissions (the report saw one about 6 s
    // after the cut) would land in this window.
    for round in 0..20 {
        for i in 0..3 {
            let got = nbd.read(0, BS as u32).expect("read block 0");
            assert_same(&format!("round {round}, read {i} of block 0"), &got, &c);
        }
        thread::sleep(Duration::from_millis(500));
    }
    drop(nbd);
    let image = net.stop_and_compare(tmp.path());
    assert_same("block 0 of every replica", &image[..block], &c);
}

/// A lossy link to one replica (5% of its TCP packets dropped both ways,
/// then 30%) while a verifying fio writes: nothing fio wrote is lost, and
/// whether or not the replica was ejected on the way, after the link heals
/// and it is added back the replicas are identical.
#[test]
fn a_lossy_link_loses_nothing() {
    let _serial = serial();
    require_tool("fio", "fio");
    let tmp = tempdir();
    let net = Net::start(tmp.path(), "lossy");
    let uri = net.engine.uri();
    for percent in [5, 30] {
        net.lab.lose(1, Way::Both, percent);
        let job = Fio {
            rw: "randwrite",
            bs: "4k",
            iodepth: 8,
            offset: 0,
            size: 4 * MIB,
            rate_iops: None,
            verify: true,
        };
        job.run_ok(&uri, tmp.path());
        net.lab.heal(1);
        net.readd_if_ejected(1);
    }
    net.stop_and_compare(tmp.path());
}

/// One-way partitions: replica 0 stops receiving (engine → replica), then
/// replica 2 stops sending (replica → engine). Each is ejected after the
/// I/O timeout while writes go on, and resyncs when the link heals.
#[test]
fn one_way_partitions_eject_the_replica_and_it_resyncs() {
    let _serial = serial();
    let tmp = tempdir();
    let net = Net::start(tmp.path(), "oneway");
    let mut nbd = NbdConn::connect(&net.engine.socket, "oneway");
    let mut expected = vec![0u8; 4 * BS as usize];
    for (k, (host, way)) in [(0usize, Way::In), (2, Way::Out)].into_iter().enumerate() {
        net.lab.lose(host, way, 100);
        let data = pattern(60 + k as u64, 2 * BS as usize);
        let at = k as u64 * 2 * BS;
        nbd.write(at, &data).expect("write during the partition");
        nbd.flush().expect("flush during the partition");
        expected[at as usize..at as usize + data.len()].copy_from_slice(&data);
        net.wait_ejected(host);
        net.lab.heal(host);
        net.readd_if_ejected(host);
    }
    for _ in 0..6 {
        let got = nbd.read(0, 4 * BS as u32).expect("read");
        assert_same("what was written during the partitions", &got, &expected);
    }
    drop(nbd);
    let image = net.stop_and_compare(tmp.path());
    assert_same("every replica", &image[..expected.len()], &expected);
}

/// The engine's host loses its link (every replica at once): the write in
/// flight fails instead of being acknowledged. After the link heals, a new
/// engine (the old one is stopped, as after a node loss) serves replicas
/// that are identical and hold everything acknowledged before the cut.
#[test]
fn an_engine_cut_off_by_the_network_acknowledges_nothing() {
    let _serial = serial();
    let tmp = tempdir();
    let mut net = Net::start(tmp.path(), "engcut");
    let mut nbd = NbdConn::connect(&net.engine.socket, "engcut");
    let (a, b) = (pattern(71, BS as usize), pattern(72, BS as usize));
    nbd.write(0, &a).expect("write A");
    nbd.flush().expect("flush A");

    net.lab.cut(ENGINE_HOST);
    assert!(
        nbd.write(0, &b).is_err(),
        "a write no replica received was acknowledged; engine log:\n{}",
        net.engine.log_tail()
    );
    assert!(
        nbd.flush().is_err(),
        "a flush no replica received succeeded"
    );
    drop(nbd);
    net.engine.kill9();
    net.lab.heal(ENGINE_HOST);

    let refs: Vec<&str> = net.addrs.iter().map(String::as_str).collect();
    net.engine = Engine::start_in(
        Some(net.lab.netns(ENGINE_HOST)),
        &net.lab.ip(ENGINE_HOST),
        tmp.path(),
        "engcut",
        "16M",
        &refs,
        &["--io-timeout", "2s"],
    );
    net.engine.wait_healthy(3);
    let mut nbd = NbdConn::connect(&net.engine.socket, "engcut");
    let got = nbd.read(0, BS as u32).expect("read block 0");
    assert!(
        got == a || got == b,
        "block 0 holds neither the acknowledged write nor the unacknowledged one"
    );
    drop(nbd);
    let image = net.stop_and_compare(tmp.path());
    assert_same(
        "block 0 on every replica vs the new engine",
        &image[..BS as usize],
        &got,
    );
}
