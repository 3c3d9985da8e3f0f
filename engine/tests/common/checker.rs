//! A checker of acknowledged writes: a thread that writes blocks round and
//! round on an NBD connection of its own, FLUSHes after every eighth write,
//! reads back an earlier block after each write, and records what every
//! block must hold (its last acknowledged write). The test decides how far
//! it goes (`run_to`), so a fault can arrive between two of its writes and
//! the test knows which writes came after it.
//!
//! It ends, with the reason, at the first write, flush or read that fails
//! or returns anything but the last acknowledged write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{BS, DEADLINE, Engine, NbdConn, pattern, poll};

/// Writes between two FLUSHes.
const FLUSH_EVERY: u64 = 8;

/// A running checker; see the module docs.
pub struct Checker {
    limit: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<u8>, String>>>,
}

impl Checker {
    /// Connects to `engine`'s volume; writes blocks `0..blocks` (write `n`
    /// goes to block `n % blocks`, data `pattern(seed + n)`) once told to.
    pub fn start(engine: &Engine, blocks: u64, seed: u64) -> Checker {
        Self::start_from(engine, vec![0u8; (blocks * BS) as usize], seed)
    }

    /// [`Checker::start`] on blocks that must hold `expect` now (what an
    /// earlier checker's [`Checker::finish`] returned).
    pub fn start_from(engine: &Engine, expect: Vec<u8>, seed: u64) -> Checker {
        let blocks = expect.len() as u64 / BS;
        let limit = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut nbd = NbdConn::connect(&engine.socket, &engine.volume);
        let (l, a, s) = (limit.clone(), acked.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let bs = BS as usize;
            let mut expect = expect;
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                if n >= l.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                let block = (n % blocks) as usize;
                let data = pattern(seed.wrapping_add(n), bs);
                nbd.write(block as u64 * BS, &data)
                    .map_err(|e| format!("write {n} (block {block}) failed: errno {e}"))?;
                expect[block * bs..(block + 1) * bs].copy_from_slice(&data);
                n += 1;
                if n.is_multiple_of(FLUSH_EVERY) {
                    nbd.flush()
                        .map_err(|e| format!("the flush after write {n} failed: errno {e}"))?;
                }
                let back = (block + blocks as usize / 2) % blocks as usize;
                let got = nbd
                    .read(back as u64 * BS, BS as u32)
                    .map_err(|e| format!("reading block {back} failed: errno {e}"))?;
                if got[..] != expect[back * bs..(back + 1) * bs] {
                    return Err(format!(
                        "block {back} read after write {n} is not its last acknowledged write"
                    ));
                }
                a.store(n, Ordering::SeqCst);
            }
            nbd.flush()
                .map_err(|e| format!("the last flush failed: errno {e}"))?;
            Ok(expect)
        });
        Checker {
            limit,
            acked,
            stop,
            thread: Some(thread),
        }
    }

    /// Lets it write until `n` writes were acknowledged in all; returns at
    /// once.
    pub fn run_to(&self, n: u64) {
        self.limit.store(n, Ordering::SeqCst);
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Waits until `n` writes were acknowledged (and, since the checker
    /// stops at its limit, until it stopped there when `n` is the limit).
    /// Panics as soon as the checker ended.
    pub fn wait_acked(&self, n: u64) {
        poll(&format!("{n} acknowledged writes"), DEADLINE, || {
            assert!(
                !self.thread.as_ref().is_some_and(JoinHandle::is_finished),
                "the checker ended after {} acknowledged writes",
                self.acked()
            );
            self.acked() >= n
        });
    }

    /// Stops after the write under way, flushes, and returns what blocks
    /// `0..blocks` must hold: each one's last acknowledged write, zeros for
    /// a block never written. Panics with the reason if the checker failed.
    pub fn finish(mut self) -> Vec<u8> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Ok(expect))) => expect,
            Some(Ok(Err(e))) => panic!("the checker failed: {e}"),
            Some(Err(_)) => panic!("the checker panicked"),
            None => unreachable!("finish consumes the checker"),
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        // A test that fails midway: stop the thread, never wait for it.
        self.stop.store(true, Ordering::SeqCst);
    }
}
