//! Keeping the node's CPUs awake while I/O is active.
//!
//! A write through Zebu passes several threads and processes (the kernel's
//! loop device, the engine, three replicas, the disk's completion), and each
//! hands the write on by waking the next. A CPU that went idle in between
//! must first come back from its idle state: a halted vCPU of a virtual
//! machine costs a round trip through the hypervisor, a deep C-state of a
//! physical CPU tens of microseconds, and a busy host adds its own queueing
//! to both. While this process has I/O, and for `linger` after its last
//! request, it holds a CPU latency request of 0 µs through the kernel's PM
//! QoS interface (`/dev/cpu_dma_latency`, as `tuned`'s latency profiles
//! and DPDK do), so idle CPUs poll for work instead of entering an idle
//! state; at other times it asks for nothing. The polling shows as idle
//! time, not as this process's CPU.
//!
//! Invariants:
//! - The request is 0 from the first [`Awake::touch`] after a release until
//!   `linger` has passed with no touch, and at most [`MAX_NAPS`] lingers
//!   after the last touch (the releaser naps longer while I/O goes on);
//!   the releaser then writes the kernel's "no constraint" value, and the
//!   next touch writes 0 again.
//! - A touch costs an atomic store and load while the request is held;
//!   only a touch that finds it released takes the lock and writes.
//! - Hold and release are decided under one lock, and the releaser clears
//!   the held flag before it reads the last touch, so a touch racing a
//!   release either is seen by the releaser (which keeps holding) or sees
//!   the flag cleared (and writes 0 after the release).
//! - A failed write is logged once and turns the mechanism off for the
//!   process; it never affects I/O.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The kernel's PM QoS device for CPU latency.
pub const DEVICE: &str = "/dev/cpu_dma_latency";
/// The linger where no flag gives one: long enough to hold through the
/// gaps of a queue-depth-one stream or a database's commits, short enough
/// that an idle volume lets the CPUs sleep at once.
pub const DEFAULT_LINGER: &str = "2ms";
/// The environment variable that sets the linger where no flag does, so a
/// driver's environment reaches every engine and replica it starts. Read
/// by [`start`], not by clap: clap would count it as a serving flag given
/// to `zebu-engine ctl`.
pub const ENV: &str = "ZEBU_KEEP_CPUS_AWAKE";

/// How long after its last request a process keeps the CPUs awake; `None`
/// is `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linger(pub Option<Duration>);

/// Parses a `--keep-cpus-awake` value: a duration (`2ms`), or `off` (`0`).
pub fn parse_linger(s: &str) -> Result<Linger, String> {
    crate::duration::parse_interval(s).map(Linger)
}

/// The linger to use: the flag's, else `env` ([`ENV`]'s), else
/// [`DEFAULT_LINGER`].
fn linger_with(flag: Option<Linger>, env: Option<String>) -> Result<Linger, String> {
    match (flag, env) {
        (Some(l), _) => Ok(l),
        (None, Some(v)) => parse_linger(&v).map_err(|e| format!("{ENV}: {e}")),
        (None, None) => parse_linger(DEFAULT_LINGER),
    }
}

/// The longest nap of the releaser while I/O goes on, in lingers. A
/// releaser that checked once per linger woke, and armed a timer, every
/// 2 ms of every process with I/O (4.7% of Zebu's CPU samples at 4 KiB
/// QD32 writes: `benches/README.md`, "The releaser's naps"); with naps that
/// double while I/O goes on, it wakes once per 16 ms, and the request
/// outlives the last I/O by at most this many lingers.
const MAX_NAPS: u32 = 8;

/// The request while I/O is active: no idle state with any exit latency.
const HOLD_US: i32 = 0;
/// The kernel's "no constraint" value (`PM_QOS_CPU_LATENCY_DEFAULT_VALUE`).
const RELEASE_US: i32 = 2_000_000_000;

/// A CPU latency request held while I/O is active.
pub struct Awake {
    linger: Duration,
    base: Instant,
    /// Time of the last touch, in nanoseconds since `base`.
    last: AtomicU64,
    /// The request is 0 (or the mechanism is off: nothing to do).
    held: AtomicBool,
    /// The device; `None` once a write failed.
    dev: Mutex<Option<File>>,
    /// Wakes the releaser when the request is taken.
    taken: Notify,
    /// The releaser's checks so far (its wake-ups while the request is held).
    #[cfg(test)]
    checks: AtomicU64,
}

impl Awake {
    /// Opens the QoS device at `path` (a request of "no constraint" until
    /// the first touch). [`Self::release_when_idle`] must run for the
    /// request ever to be released.
    pub fn open(path: &Path, linger: Duration) -> io::Result<Arc<Self>> {
        let dev = std::fs::OpenOptions::new().write(true).open(path)?;
        Ok(Arc::new(Awake {
            linger,
            base: Instant::now(),
            last: AtomicU64::new(0),
            held: AtomicBool::new(false),
            dev: Mutex::new(Some(dev)),
            taken: Notify::new(),
            #[cfg(test)]
            checks: AtomicU64::new(0),
        }))
    }

    /// Records I/O now; takes the request if it is not held.
    pub fn touch(&self) {
        self.last.store(self.now(), SeqCst);
        if self.held.load(SeqCst) {
            return;
        }
        let mut dev = self.lock();
        if self.held.load(SeqCst) {
            return;
        }
        write(&mut dev, HOLD_US);
        self.held.store(true, SeqCst);
        drop(dev);
        self.taken.notify_one();
    }

    /// Releases the request once `linger` has passed with no touch (see
    /// [`MAX_NAPS`] for how much later); runs until the process ends.
    pub async fn release_when_idle(self: Arc<Self>) {
        loop {
            while !self.held.load(SeqCst) {
                self.taken.notified().await;
            }
            // The first check comes when the linger after the touch that
            // took the request has passed; each check that finds I/O still
            // going doubles the nap before the next, up to `MAX_NAPS`
            // lingers.
            let mut nap = self.linger;
            loop {
                #[cfg(test)]
                self.checks.fetch_add(1, SeqCst);
                let due = self.last.load(SeqCst).saturating_add(nanos(self.linger));
                let now = self.now();
                if now < due {
                    let wait = Duration::from_nanos(due - now).max(nap);
                    nap = (nap * 2).min(self.linger * MAX_NAPS);
                    tokio::time::sleep(wait).await;
                    continue;
                }
                let mut dev = self.lock();
                if dev.is_none() {
                    // Off after a failed write: `held` stays set for good.
                    return;
                }
                self.held.store(false, SeqCst);
                let idle_since = self.last.load(SeqCst);
                if self.now() >= idle_since.saturating_add(nanos(self.linger)) {
                    write(&mut dev, RELEASE_US);
                    break;
                }
                // Touched meanwhile: the request is still 0.
                self.held.store(true, SeqCst);
            }
        }
    }

    fn now(&self) -> u64 {
        nanos(self.base.elapsed())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<File>> {
        // The guarded file has no invariant a panic could break.
        self.dev.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Writes a request value; on failure, warns and closes the device.
fn write(dev: &mut Option<File>, us: i32) {
    let Some(f) = dev.as_mut() else { return };
    if let Err(e) = f.write_all(&us.to_ne_bytes()) {
        tracing::warn!(error = %e, device = DEVICE, "cannot change the CPU latency request; \
                       CPUs may sleep deeply between the steps of an I/O from now on");
        *dev = None;
    }
}

/// This process's request, once [`start`] ran.
static AWAKE: OnceLock<Arc<Awake>> = OnceLock::new();

/// Holds the CPUs awake while this process's I/O is active and for its
/// linger after: `flag`'s (`--keep-cpus-awake`), else [`ENV`]'s, else
/// [`DEFAULT_LINGER`]; `off` does nothing. Starts the releaser on a thread
/// of its own ([`spawn_releaser`]). A bad value of [`ENV`] is an error naming it;
/// without access to [`DEVICE`] (not root, no such device) it logs why and
/// carries on.
pub fn start(flag: Option<Linger>) -> Result<(), String> {
    let Linger(Some(linger)) = linger_with(flag, std::env::var(ENV).ok())? else {
        return Ok(());
    };
    match Awake::open(Path::new(DEVICE), linger) {
        Ok(a) => {
            if AWAKE.set(a.clone()).is_ok() {
                spawn_releaser(a).map_err(|e| format!("starting the CPU latency releaser: {e}"))?;
            }
        }
        Err(e) => tracing::info!(error = %e, device = DEVICE,
            "cannot ask the kernel to keep CPUs awake during I/O; \
             I/O works, with more latency where CPUs sleep deeply"),
    }
    Ok(())
}

/// Runs [`Awake::release_when_idle`] on a thread of its own, with a runtime
/// of its own. Not on the process's runtime: while the request is held its
/// timer is always under `linger` away, so every time that runtime's
/// thread went to sleep (several times per request) it would arm a timer
/// that short, which the kernel must program into the CPU's timer device
/// and take back out when the thread wakes early: on a virtual machine two
/// exits to the hypervisor per sleep (measured here: a ping-pong between
/// two processes cost 24-29 µs of CPU per round trip with a 2 ms
/// `epoll_wait` timeout, 13-17 µs without one). This thread's timer is
/// armed once per `linger` while I/O lasts.
fn spawn_releaser(a: Arc<Awake>) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("zebu-awake".into())
        .spawn(move || rt.block_on(a.release_when_idle()))?;
    Ok(())
}

/// Records I/O for this process's request ([`start`]); nothing without one.
pub fn touch() {
    if let Some(a) = AWAKE.get() {
        a.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The values written so far to a file standing in for the device.
    fn written(path: &Path) -> Vec<i32> {
        std::fs::read(path)
            .unwrap()
            .chunks_exact(4)
            .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// An `Awake` of `linger` on a file in `dir`, its releaser running on
    /// the test's runtime; and the file's path.
    fn with_releaser(dir: &tempfile::TempDir, linger: Duration) -> (Arc<Awake>, PathBuf) {
        let path = dir.path().join("qos");
        std::fs::write(&path, b"").unwrap();
        let a = Awake::open(&path, linger).unwrap();
        tokio::spawn(a.clone().release_when_idle());
        (a, path)
    }

    #[tokio::test(start_paused = true)]
    async fn held_while_touched_and_released_after_the_linger() {
        let (dir, linger) = (tempfile::tempdir().unwrap(), Duration::from_millis(2));
        let (a, path) = with_releaser(&dir, linger);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(written(&path).is_empty(), "nothing asked before any I/O");

        a.touch();
        assert_eq!(written(&path), [HOLD_US]);
        // Touched every millisecond for 20 ms: held throughout, one write.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            a.touch();
        }
        assert_eq!(written(&path), [HOLD_US]);
        // Not before the linger has passed since the last touch; after 20 ms
        // of I/O the releaser naps up to `MAX_NAPS` lingers (16 ms), so the
        // release comes within that of the last touch (and the timer's
        // millisecond tick).
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(written(&path), [HOLD_US], "not before the linger");
        tokio::time::sleep(linger * MAX_NAPS).await;
        assert_eq!(written(&path), [HOLD_US, RELEASE_US]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(written(&path), [HOLD_US, RELEASE_US], "idle: no writes");

        a.touch();
        a.touch();
        tokio::time::sleep(Duration::from_millis(4)).await;
        assert_eq!(
            written(&path),
            [HOLD_US, RELEASE_US, HOLD_US, RELEASE_US],
            "held again by the next I/O, released again"
        );
    }

    /// While I/O goes on, the releaser checks less and less often (each
    /// check is a wake-up and a timer of the process), and after it stops
    /// it still releases within `MAX_NAPS` lingers.
    #[tokio::test(start_paused = true)]
    async fn the_releaser_naps_longer_while_io_goes_on() {
        let (dir, linger) = (tempfile::tempdir().unwrap(), Duration::from_millis(2));
        let (a, path) = with_releaser(&dir, linger);
        // A second of I/O, a touch every millisecond (the timer's tick).
        for _ in 0..1_000 {
            a.touch();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let checks = a.checks.load(SeqCst);
        // Naps of 2, 4, 8, then 16 ms: about 64 checks in a second, where
        // one per linger would be 500.
        assert!((40..=80).contains(&checks), "{checks} checks in a second");
        assert_eq!(written(&path), [HOLD_US], "held throughout");
        tokio::time::sleep(linger * MAX_NAPS + Duration::from_millis(1)).await;
        assert_eq!(written(&path), [HOLD_US, RELEASE_US]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_turns_it_off_without_failing_anything() {
        // /dev/full takes no bytes: every write fails with ENOSPC.
        let a = Awake::open(Path::new("/dev/full"), Duration::from_millis(1)).unwrap();
        let releaser = tokio::spawn(a.clone().release_when_idle());
        a.touch();
        a.touch();
        assert!(a.lock().is_none(), "closed after the failure");
        assert!(a.held.load(SeqCst), "no touch takes the lock again");
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(releaser.is_finished(), "the releaser has nothing to do");
    }

    /// What [`start`] runs: the releaser on its own thread and runtime, so
    /// it needs none from the caller (this test has none) and puts no
    /// timer on the caller's. Real time: released within a minute of a
    /// 1 ms linger, however slow the machine.
    #[test]
    fn the_releaser_thread_releases_without_the_callers_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qos");
        std::fs::write(&path, b"").unwrap();
        let a = Awake::open(&path, Duration::from_millis(1)).unwrap();
        spawn_releaser(a.clone()).unwrap();
        a.touch();
        assert_eq!(written(&path)[0], HOLD_US);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while written(&path) != [HOLD_US, RELEASE_US] {
            assert!(
                std::time::Instant::now() < deadline,
                "not released: {:?}",
                written(&path)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        a.touch();
        assert_eq!(written(&path), [HOLD_US, RELEASE_US, HOLD_US]);
    }

    #[test]
    fn the_flag_wins_then_the_environment_then_the_default() {
        let ms = |n| Linger(Some(Duration::from_millis(n)));
        let flag = Some(ms(5));
        assert_eq!(linger_with(flag, Some("off".into())), Ok(ms(5)));
        assert_eq!(linger_with(None, Some("off".into())), Ok(Linger(None)));
        assert_eq!(linger_with(None, Some("10ms".into())), Ok(ms(10)));
        assert_eq!(linger_with(None, None), Ok(ms(2)));
        let e = linger_with(None, Some("soon".into())).unwrap_err();
        assert!(
            e.starts_with("ZEBU_KEEP_CPUS_AWAKE: invalid interval"),
            "{e}"
        );
        assert_eq!(parse_linger("0"), Ok(Linger(None)));
    }

    #[test]
    fn a_missing_device_is_an_error_to_report() {
        let e = Awake::open(Path::new("/nonexistent/qos"), Duration::from_millis(1))
            .err()
            .expect("no such device");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
