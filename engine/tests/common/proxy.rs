//! A TCP fault proxy between the engine and one replica, for partition
//! tests that must not depend on timing.
//!
//! Every connection the engine opens to the proxy is forwarded to the
//! replica. [`FaultProxy::freeze`] stops delivering, in one direction or
//! both, what is sent on the connections open at that moment — the bytes
//! wait in the proxy, as they would in a TCP send queue behind a link that
//! went down — while new connections flow normally (the link healed).
//! [`FaultProxy::release`] then delivers the held bytes, as TCP's next
//! retransmission would, even when the engine has closed its end since. The proxy reports whether the
//! engine closed a frozen connection and when the replica closed the
//! connection the released bytes went to. [`FaultProxy::set_delay`] makes
//! the link slow to answer: every chunk is delivered a fixed time after it
//! was sent, in order (a delay line per direction, as netem would add).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One proxied connection.
struct Conn {
    upstream: TcpStream,
    client: TcpStream,
    state: Mutex<ConnState>,
    /// Delay lines toward the replica and toward the engine.
    to_upstream: DelayLine,
    to_client: DelayLine,
}

/// Delivers each chunk to a socket `delay` after it was handed over, in
/// order, from a thread of its own.
struct DelayLine {
    tx: Mutex<std::sync::mpsc::Sender<(Instant, Vec<u8>)>>,
    /// Chunks handed over and not yet written (or dropped).
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

impl DelayLine {
    fn new(mut to: TcpStream) -> DelayLine {
        let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
        let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let left = pending.clone();
        std::thread::spawn(move || {
            let mut broken = false;
            for (due, bytes) in rx {
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                // A closed socket drops the rest, still counted off.
                broken = broken || to.write_all(&bytes).is_err();
                left.fetch_sub(1, Ordering::AcqRel);
            }
        });
        DelayLine {
            tx: Mutex::new(tx),
            pending,
        }
    }

    /// Sends `bytes` to arrive `delay` from now.
    fn send(&self, delay: Duration, bytes: &[u8]) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let _ = self
            .tx
            .lock()
            .unwrap()
            .send((Instant::now() + delay, bytes.to_vec()));
    }
}

/// Which way a freeze stops the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toward {
    /// What the engine sends (requests) is held.
    Replica,
    /// What the replica sends (replies) is held.
    Engine,
    /// Both.
    Both,
}

#[derive(Default)]
struct ConnState {
    /// Bytes from the engine are held instead of forwarded.
    frozen: bool,
    /// What the engine sent while frozen.
    held: Vec<u8>,
    /// Bytes from the replica are held instead of forwarded.
    replies_frozen: bool,
    /// What the replica sent while its direction was frozen.
    held_replies: Vec<u8>,
    /// The engine closed (or reset) its end.
    client_closed: bool,
    /// The replica closed its end.
    upstream_closed: bool,
    /// The held bytes were delivered.
    released: bool,
}

struct Shared {
    conns: Mutex<Vec<Arc<Conn>>>,
    changed: Condvar,
    stop: AtomicBool,
    /// Added one-way latency, each direction (zero: none).
    delay: Mutex<Duration>,
}

impl Shared {
    fn update(&self, conn: &Conn, f: impl FnOnce(&mut ConnState)) {
        f(&mut conn.state.lock().unwrap());
        // Waiters hold `conns` while they look at the states.
        let _g = self.conns.lock().unwrap();
        self.changed.notify_all();
    }
}

/// The proxy; stops and closes every connection when dropped.
pub struct FaultProxy {
    /// `127.0.0.1:PORT` to give the engine instead of the replica's address.
    pub addr: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy to the replica at `upstream` (`HOST:PORT`).
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared {
            conns: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
        });
        let (sh, up) = (shared.clone(), upstream.to_owned());
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if sh.stop.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(upstream) = TcpStream::connect(&up) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let (Ok(up2), Ok(cl2)) = (upstream.try_clone(), client.try_clone()) else {
                    continue;
                };
                let conn = Arc::new(Conn {
                    upstream,
                    client,
                    state: Mutex::default(),
                    to_upstream: DelayLine::new(up2),
                    to_client: DelayLine::new(cl2),
                });
                sh.conns.lock().unwrap().push(conn.clone());
                let (s1, c1) = (sh.clone(), conn.clone());
                std::thread::spawn(move || pump_from_client(&s1, &c1));
                let (s2, c2) = (sh.clone(), conn);
                std::thread::spawn(move || pump_from_upstream(&s2, &c2));
            }
        });
        FaultProxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Delays from now on every chunk, both ways, by `delay` (zero: none).
    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock().unwrap() = delay;
    }

    /// Waits up to `limit` until every delayed chunk was delivered (or
    /// dropped with its connection); whether they were.
    pub fn wait_delivered(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let pending: usize = self
                .shared
                .conns
                .lock()
                .unwrap()
                .iter()
                .map(|c| {
                    c.to_upstream.pending.load(Ordering::Acquire)
                        + c.to_client.pending.load(Ordering::Acquire)
                })
                .sum();
            if pending == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Holds from now on what the engine sends on every connection open
    /// now; returns how many there are.
    pub fn freeze(&self) -> usize {
        self.freeze_toward(Toward::Replica)
    }

    /// Holds from now on what is sent `toward` one end on every connection
    /// open now; returns how many there are.
    pub fn freeze_toward(&self, toward: Toward) -> usize {
        let conns = self.shared.conns.lock().unwrap();
        for c in conns.iter() {
            let mut st = c.state.lock().unwrap();
            st.frozen |= toward != Toward::Engine;
            st.replies_frozen |= toward != Toward::Replica;
        }
        conns.len()
    }

    /// Delivers the bytes held on every frozen connection and lets it flow
    /// again; where the engine has closed its end meanwhile, the replica
    /// then sees the connection end after the held bytes. Returns how many
    /// bytes were delivered.
    pub fn release(&self) -> usize {
        let conns: Vec<Arc<Conn>> = self.shared.conns.lock().unwrap().clone();
        let mut delivered = 0;
        for c in conns {
            let mut st = c.state.lock().unwrap();
            if st.replies_frozen {
                let held = std::mem::take(&mut st.held_replies);
                delivered += held.len();
                // The engine may have closed its end: then this goes nowhere.
                let _ = (&c.client).write_all(&held);
                st.replies_frozen = false;
            }
            if !st.frozen {
                continue;
            }
            let held = std::mem::take(&mut st.held);
            delivered += held.len();
            let _ = (&c.upstream).write_all(&held);
            st.frozen = false;
            st.released = true;
            if st.client_closed {
                let _ = c.upstream.shutdown(Shutdown::Write);
            }
        }
        delivered
    }

    /// Waits up to `limit` until the engine closed at least one frozen
    /// connection; whether it did.
    pub fn wait_frozen_closed_by_engine(&self, limit: Duration) -> bool {
        self.wait(limit, |st| st.frozen && st.client_closed)
    }

    /// Waits up to `limit` until the replica closed every connection whose
    /// held bytes were delivered after the engine had closed it; whether
    /// it did.
    pub fn wait_released_closed_by_replica(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut conns = self.shared.conns.lock().unwrap();
        loop {
            let open = conns.iter().any(|c| {
                let st = c.state.lock().unwrap();
                st.released && st.client_closed && !st.upstream_closed
            });
            if !open {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            conns = self.shared.changed.wait_timeout(conns, left).unwrap().0;
        }
    }

    fn wait(&self, limit: Duration, pred: impl Fn(&ConnState) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut conns = self.shared.conns.lock().unwrap();
        loop {
            if conns.iter().any(|c| pred(&c.state.lock().unwrap())) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            conns = self.shared.changed.wait_timeout(conns, left).unwrap().0;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Wake the accept loop.
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for c in self.shared.conns.lock().unwrap().iter() {
            let _ = c.client.shutdown(Shutdown::Both);
            let _ = c.upstream.shutdown(Shutdown::Both);
        }
    }
}

/// Engine → replica: forwarded, or held while the connection is frozen.
fn pump_from_client(shared: &Shared, conn: &Conn) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match (&conn.client).read(&mut buf) {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        if n == 0 || shared.stop.load(Ordering::Acquire) {
            let mut frozen = false;
            shared.update(conn, |st| {
                st.client_closed = true;
                frozen = st.frozen;
            });
            if !frozen {
                let _ = conn.upstream.shutdown(Shutdown::Write);
            }
            return;
        }
        let delay = *shared.delay.lock().unwrap();
        let mut st = conn.state.lock().unwrap();
        if st.frozen {
            st.held.extend_from_slice(&buf[..n]);
        } else if !delay.is_zero() {
            conn.to_upstream.send(delay, &buf[..n]);
        } else if (&conn.upstream).write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Replica → engine: always forwarded while the engine listens; the
/// replica's end of the connection is recorded.
fn pump_from_upstream(shared: &Shared, conn: &Conn) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match (&conn.upstream).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let delay = *shared.delay.lock().unwrap();
                let mut st = conn.state.lock().unwrap();
                if st.replies_frozen {
                    st.held_replies.extend_from_slice(&buf[..n]);
                } else if !delay.is_zero() {
                    conn.to_client.send(delay, &buf[..n]);
                } else {
                    // The engine may be gone; keep reading so the
                    // replica's end is seen.
                    let _ = (&conn.client).write_all(&buf[..n]);
                }
            }
        }
    }
    shared.update(conn, |st| st.upstream_closed = true);
    let _ = conn.client.shutdown(Shutdown::Write);
}
