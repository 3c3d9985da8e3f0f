//! Chaos: a seeded random schedule of the fault matrix's faults, one after
//! another on one volume, for a fixed time, while a checker writes, flushes
//! and reads back. Three replicas, each behind a fault proxy; replica 1's
//! directory is on a disk that fails or fills on demand (`EioDisk`).
//!
//! Every event is one fault on one victim, then its repair: the victim is
//! ejected (or, for a slow link, not), the fault heals, the victim comes
//! back (`replica add --wait`) and the volume is healthy with three
//! replicas again. After every event the whole checked range reads back
//! through the engine as the checker's acknowledged writes left it; at the
//! end every replica read alone holds that same image.
//!
//! The schedule is a function of the seed: a failure prints the seed and
//! the event it failed in; `ZEBU_CHAOS_SEED=S ZEBU_CHAOS_EVENTS=N` replays
//! the first N events of seed S. `ZEBU_CHAOS_SECONDS` (default 300) bounds
//! a run by time instead.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rand::{RngExt, SeedableRng};
use rand_xorshift::XorShiftRng;

const VOLUME: &str = "chaos";
const SIZE: &str = "32M";
/// The checker's blocks: the first 2 MiB.
const CHECKED_BLOCKS: u64 = 512;
/// Where writes to blocks no layer ever held go (for a full disk): the
/// second half of the volume, one block per write, onwards.
const FRESH_FROM: u64 = 16 * MIB;

/// One fault of the schedule.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGKILL a replica, then start it again on its directory.
    KillReplica(usize),
    /// SIGSTOP a replica past the I/O timeout, then SIGCONT.
    PauseReplica(usize),
    /// The link stops delivering both ways (the bytes wait in the proxy),
    /// then the held bytes arrive after the replica was added back.
    CutLink(usize),
    /// The replica's replies stop coming back, then arrive late.
    LoseReplies(usize),
    /// The engine's requests stop reaching the replica, then arrive late.
    LoseRequests(usize),
    /// Every byte on the link delayed 20–60 ms for a while.
    SlowLink(usize, u64),
    /// Replica 1's disk fails every read.
    DiskFailsReads,
    /// Replica 1's disk fails every write and cache flush.
    DiskFailsWrites,
    /// Replica 1's filesystem fills up.
    DiskFull,
    /// SIGKILL the engine (between two writes); a new one takes over.
    KillEngine,
}

impl Fault {
    fn pick(rng: &mut XorShiftRng) -> Fault {
        let victim = rng.random_range(0..3usize);
        match rng.random_range(0..10u32) {
            0 => Fault::KillReplica(victim),
            1 => Fault::PauseReplica(victim),
            2 => Fault::CutLink(victim),
            3 => Fault::LoseReplies(victim),
            4 => Fault::LoseRequests(victim),
            5 => Fault::SlowLink(victim, rng.random_range(20..=60u64)),
            6 => Fault::DiskFailsReads,
            7 => Fault::DiskFailsWrites,
            8 => Fault::DiskFull,
            _ => Fault::KillEngine,
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// The volume under chaos.
struct Rig {
    tmp: tempfile::TempDir,
    disk: EioDisk,
    replicas: Vec<Replica>,
    proxies: Vec<FaultProxy>,
    engine: Engine,
    checker: Option<Checker>,
    /// Writes the current checker was told to make.
    writes: u64,
    /// The fresh blocks written so far (offset, data).
    fresh: Vec<(u64, Vec<u8>)>,
}

impl Rig {
    fn start() -> Rig {
        let tmp = tempdir();
        let disk = EioDisk::create(&tmp.path().join("eio"), 96 * MIB);
        let replicas = vec![
            Replica::start(&tmp.path().join("r0"), Some(SIZE)),
            Replica::start(&disk.dir.join("r1"), Some(SIZE)),
            Replica::start(&tmp.path().join("r2"), Some(SIZE)),
        ];
        let proxies: Vec<FaultProxy> = replicas
            .iter()
            .map(|r| FaultProxy::start(&r.addr))
            .collect();
        let engine = Self::engine(tmp.path(), &proxies);
        let checker = Checker::start(&engine, CHECKED_BLOCKS, rand_u64());
        Rig {
            tmp,
            disk,
            replicas,
            proxies,
            engine,
            checker: Some(checker),
            writes: 0,
            fresh: Vec::new(),
        }
    }

    fn engine(tmp: &std::path::Path, proxies: &[FaultProxy]) -> Engine {
        let addrs: Vec<&str> = proxies.iter().map(|p| p.addr.as_str()).collect();
        let engine = Engine::start_with(tmp, VOLUME, SIZE, &addrs, &["--io-timeout", "1s"]);
        engine.wait_healthy(3);
        engine
    }

    fn checker(&self) -> &Checker {
        self.checker.as_ref().expect("a checker runs")
    }

    /// Lets the checker make `n` more writes and waits for them.
    fn write(&mut self, n: u64) {
        self.writes += n;
        self.checker().run_to(self.writes);
        self.checker().wait_acked(self.writes);
    }

    /// Keeps the checker writing until `victim` is ejected, then lets it
    /// stop a little later.
    fn write_until_ejected(&mut self, victim: usize) {
        self.checker().run_to(u64::MAX);
        let addr = self.proxies[victim].addr.clone();
        self.engine
            .wait_status(&format!("replica {victim} ejected"), |s| {
                replica_entry(s, &addr).is_some_and(|r| r["mode"] == "ERR")
            });
        self.writes = self.checker().acked() + 8;
        self.checker().run_to(self.writes);
        self.checker().wait_acked(self.writes);
    }

    /// Writes one block no layer of replica 1 ever held (it needs a new
    /// block on its disk), flushed; remembers it.
    fn write_fresh(&mut self) -> Result<(), u32> {
        let at = FRESH_FROM + self.fresh.len() as u64 * BS;
        let data = pattern(rand_u64(), BS as usize);
        let mut nbd = NbdConn::connect(&self.engine.socket, VOLUME);
        nbd.write(at, &data)?;
        nbd.flush()?;
        self.fresh.push((at, data));
        Ok(())
    }

    /// Adds `victim` back and waits until all three serve.
    fn add_back(&self, victim: usize) {
        self.engine
            .ctl_timeout(
                &["replica", "add", &self.proxies[victim].addr, "--wait"],
                LONG,
            )
            .expect_ok();
        self.engine.wait_healthy(3);
    }

    fn run(&mut self, fault: Fault) {
        match fault {
            Fault::KillReplica(v) => {
                self.replicas[v].kill9();
                self.write_until_ejected(v);
                self.replicas[v].restart();
                self.add_back(v);
            }
            Fault::PauseReplica(v) => {
                self.replicas[v].signal(nix::sys::signal::Signal::SIGSTOP);
                self.write_until_ejected(v);
                self.replicas[v].signal(nix::sys::signal::Signal::SIGCONT);
                self.add_back(v);
            }
            Fault::CutLink(v) | Fault::LoseReplies(v) | Fault::LoseRequests(v) => {
                let toward = match fault {
                    Fault::CutLink(_) => Toward::Both,
                    Fault::LoseReplies(_) => Toward::Engine,
                    _ => Toward::Replica,
                };
                self.proxies[v].freeze_toward(toward);
                self.write_until_ejected(v);
                self.add_back(v);
                // The old connection's bytes arrive now: too late to matter.
                self.proxies[v].release();
                self.write(16);
            }
            Fault::SlowLink(v, ms) => {
                self.proxies[v].set_delay(Duration::from_millis(ms));
                self.write(24);
                self.proxies[v].set_delay(Duration::ZERO);
                self.write(8);
                // Slow is not failed: still one of three (else added back).
                let addr = self.proxies[v].addr.clone();
                let st = self.engine.status();
                if replica_entry(&st, &addr).is_some_and(|r| r["mode"] == "ERR") {
                    self.add_back(v);
                }
            }
            Fault::DiskFailsReads | Fault::DiskFailsWrites => {
                if matches!(fault, Fault::DiskFailsReads) {
                    self.disk.faults().fail_reads(true);
                } else {
                    self.disk.faults().fail_writes(true);
                }
                self.write_until_ejected(1);
                // A failed cache flush leaves the replica refusing I/O until
                // it restarts, and ext4 may have aborted its journal: stop
                // the replica, repair the filesystem, start it again.
                self.replicas[1].kill9();
                self.disk.remount();
                self.replicas[1].restart();
                self.add_back(1);
            }
            Fault::DiskFull => {
                self.disk.fill();
                // Until a write needs a new block on replica 1's disk.
                let addr = self.proxies[1].addr.clone();
                let deadline = Instant::now() + DEADLINE;
                loop {
                    self.write_fresh()
                        .expect("a write on a full disk of one replica of three");
                    let st = self.engine.status();
                    if replica_entry(&st, &addr).is_some_and(|r| r["mode"] == "ERR") {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "replica 1 never ran out of space: {st}"
                    );
                }
                self.write(8);
                self.disk.unfill();
                self.add_back(1);
            }
            Fault::KillEngine => {
                let expect = self.checker.take().expect("a checker runs").finish();
                self.engine.kill9();
                self.engine = Self::engine(self.tmp.path(), &self.proxies);
                self.verify(&expect);
                self.checker = Some(Checker::start_from(&self.engine, expect, rand_u64()));
                self.writes = 0;
            }
        }
    }

    /// The checked blocks hold `checked` and every fresh block its data,
    /// read through the engine.
    fn verify(&self, checked: &[u8]) {
        let mut nbd = NbdConn::connect(&self.engine.socket, VOLUME);
        let chunk = 64 * BS;
        for at in (0..checked.len() as u64).step_by(chunk as usize) {
            let got = nbd.read(at, chunk as u32).expect("read through the engine");
            assert_same(
                &format!("checked blocks at {at}"),
                &got,
                &checked[at as usize..(at + chunk) as usize],
            );
        }
        for (at, data) in &self.fresh {
            let got = nbd.read(*at, BS as u32).expect("read through the engine");
            assert_same(&format!("fresh block at {at}"), &got, data);
        }
    }

    /// Stops the checker, verifies through the engine, stops the engine and
    /// compares every replica read alone.
    fn finish(mut self) {
        let expect = self.checker.take().expect("a checker runs").finish();
        self.verify(&expect);
        self.engine.stop();
        let addrs: Vec<&str> = self.replicas.iter().map(|r| r.addr.as_str()).collect();
        let image = assert_replicas_identical(&addrs);
        assert_same("every replica", &image[..expect.len()], &expect);
        for (at, data) in &self.fresh {
            assert_same(
                &format!("fresh block at {at} of every replica"),
                &image[*at as usize..(*at + BS) as usize],
                data,
            );
        }
        drop(self.replicas);
        drop(self.disk);
    }
}

/// The seeded schedule, for `ZEBU_CHAOS_SECONDS` (300) or
/// `ZEBU_CHAOS_EVENTS` events.
#[test]
fn chaos_loses_no_acknowledged_write() {
    let _serial = serial();
    let seed = env_u64("ZEBU_CHAOS_SEED").unwrap_or_else(rand_u64);
    let events = env_u64("ZEBU_CHAOS_EVENTS");
    let seconds = env_u64("ZEBU_CHAOS_SECONDS").unwrap_or(300);
    eprintln!(
        "chaos seed {seed}; replay: ZEBU_CHAOS_SEED={seed} ZEBU_CHAOS_EVENTS=<n> cargo test -p zebu-engine --test e2e_chaos"
    );
    let mut rng = XorShiftRng::seed_from_u64(seed);
    let mut rig = Rig::start();
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        let done = match events {
            Some(e) => n >= e,
            None => start.elapsed() >= Duration::from_secs(seconds),
        };
        if done {
            break;
        }
        let fault = Fault::pick(&mut rng);
        let before = rng.random_range(8..64u64);
        n += 1;
        eprintln!("chaos event {n} ({:.0?}): {fault:?}", start.elapsed());
        rig.write(before);
        rig.run(fault);
        rig.write(8);
        let expect = {
            // Pause the checker to read everything back.
            let c = rig.checker.take().expect("a checker runs");
            let expect = c.finish();
            rig.verify(&expect);
            expect
        };
        rig.checker = Some(Checker::start_from(&rig.engine, expect, rand_u64()));
        rig.writes = 0;
    }
    eprintln!(
        "chaos: {n} events in {:.0?} (seed {seed}), nothing acknowledged lost",
        start.elapsed()
    );
    rig.finish();
}
