//! `replication-floor`: the least work a synchronously replicated 4 KiB
//! write (and a commit: write, then flush) can cost on this machine when an
//! engine process sends it over loopback TCP to replica processes that store
//! it with `O_DIRECT` on the local filesystem — the hops of Zebu's design
//! with none of Zebu's code on them.
//!
//! Nothing here is Zebu's: no gRPC, no tokio, no CRCs, no index, no FUSE or
//! loop device. Each replica is one blocking thread per connection that
//! reads a request (`read` of its header, and of a write's payload), does
//! it (`pwrite` of 4 KiB with `O_DIRECT`, or `fdatasync`) and answers one
//! byte (`write`); the client sends each request to every replica, then
//! waits for every answer. So a request costs a replica a sleep for the
//! request and one for the disk (woken by the disk's completion directly),
//! one TCP segment each way, and the disk's own work: what the user-path
//! suite reports beside Zebu as the floor of a design with an engine and
//! replica processes on TCP.
//!
//! ```text
//! replication-floor replica --listen 127.0.0.1:7201 --file /var/tmp/f1 --size 256M &
//! ... (one per replica)
//! replication-floor client --replica 127.0.0.1:7201 --replica ... --mode commit --seconds 10
//! ```
//!
//! The client prints one JSON object: operations (writes, or commits of a
//! write and a flush) completed, per second, and their latency p50 / p99 in
//! µs. Any I/O error ends the process with a message and a non-zero status.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

/// Bytes of one write.
const BLOCK: usize = 4096;
/// Request: op (1 byte), 7 bytes of padding, offset (u64 LE).
const HEADER: usize = 16;
const OP_WRITE: u8 = 1;
const OP_FLUSH: u8 = 2;
/// Answers.
const DONE: u8 = 1;
const FAILED: u8 = 2;
const OUTSIDE: u8 = 3;

#[derive(Parser)]
#[command(about = "The floor of synchronous replication over loopback TCP (see the module docs)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve writes and flushes into FILE (created, or reused at SIZE).
    Replica {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        file: PathBuf,
        /// Size of FILE, written in full first so no write allocates
        /// (e.g. 256M).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Drive the replicas at queue depth 1 and print the figures as JSON.
    Client {
        /// A replica's HOST:PORT; repeat for each.
        #[arg(long = "replica", required = true)]
        replicas: Vec<String>,
        #[arg(long, value_enum, default_value_t = Mode::Commit)]
        mode: Mode,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Writes go to random 4 KiB blocks below this offset (the
        /// replicas' size or less).
        #[arg(long, value_parser = parse_size)]
        span: u64,
        /// Write the JSON here instead of to standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// One replicated 4 KiB write per operation.
    Write,
    /// A replicated 4 KiB write, then a replicated flush, per operation.
    Commit,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (a number, optionally with K, M or G)"))?;
    n.checked_mul(mult)
        .filter(|&b| b >= BLOCK as u64 && b % BLOCK as u64 == 0)
        .ok_or_else(|| format!("{s:?}: a size must be a multiple of {BLOCK} bytes, at least one"))
}

/// A 4 KiB buffer at a 4 KiB-aligned address (what `O_DIRECT` needs),
/// carved out of a larger allocation so no `unsafe` is needed.
struct Aligned {
    storage: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new() -> Self {
        let storage = vec![0u8; 2 * BLOCK];
        let start = storage.as_ptr().align_offset(BLOCK);
        Aligned { storage, start }
    }
    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + BLOCK]
    }
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Replica { listen, file, size } => replica(&listen, &file, size),
        Cmd::Client {
            replicas,
            mode,
            seconds,
            span,
            output,
        } => {
            let json = client(&replicas, mode, Duration::from_secs(seconds), span)?;
            match output {
                Some(path) => std::fs::write(&path, json + "\n")
                    .with_context(|| format!("writing {}", path.display())),
                None => {
                    println!("{json}");
                    Ok(())
                }
            }
        }
    }
}

fn replica(listen: &str, path: &PathBuf, size: u64) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // Written in full, so that later writes are overwrites of written
    // blocks (no allocation, no metadata to commit at fdatasync), as on a
    // replica whose volume was filled.
    let chunk = vec![0u8; 1 << 20];
    let plain = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {} to fill it", path.display()))?;
    let mut off = 0;
    while off < size {
        let n = chunk.len().min((size - off) as usize);
        plain
            .write_all_at(&chunk[..n], off)
            .with_context(|| format!("filling {}", path.display()))?;
        off += n as u64;
    }
    plain.sync_all().context("syncing the filled file")?;
    drop(plain);
    let file = std::sync::Arc::new(file);
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    // The address actually bound (port 0 picks a free one), for scripts.
    println!(
        "replication-floor replica: serving {} on {}",
        path.display(),
        listener.local_addr()?
    );
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        let conn = conn.context("accepting a connection")?;
        let file = file.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve(conn, &file, size) {
                eprintln!("replication-floor replica: connection ended: {e:#}");
            }
        });
    }
    Ok(())
}

/// Answers one connection's requests until it closes.
fn serve(mut conn: TcpStream, file: &std::fs::File, size: u64) -> Result<()> {
    conn.set_nodelay(true)?;
    let mut header = [0u8; HEADER];
    let mut buf = Aligned::new();
    loop {
        match conn.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("reading a request"),
        }
        let offset = u64::from_le_bytes(header[8..16].try_into()?);
        let status = match header[0] {
            OP_WRITE => {
                conn.read_exact(buf.get_mut())
                    .context("reading a payload")?;
                if offset % BLOCK as u64 != 0
                    || offset
                        .checked_add(BLOCK as u64)
                        .is_none_or(|end| end > size)
                {
                    OUTSIDE
                } else if file.write_all_at(buf.get_mut(), offset).is_ok() {
                    DONE
                } else {
                    FAILED
                }
            }
            OP_FLUSH if file.sync_data().is_ok() => DONE,
            OP_FLUSH => FAILED,
            op => bail!("unknown operation {op}"),
        };
        conn.write_all(&[status]).context("answering a request")?;
    }
}

/// Runs the load; returns the figures as one JSON object.
fn client(replicas: &[String], mode: Mode, duration: Duration, span: u64) -> Result<String> {
    let mut conns = replicas
        .iter()
        .map(|a| {
            let c = TcpStream::connect(a).with_context(|| format!("connecting to {a}"))?;
            c.set_nodelay(true)?;
            Ok(c)
        })
        .collect::<Result<Vec<_>>>()?;
    let blocks = span / BLOCK as u64;
    let cpu_before = own_cpu_ns()?;
    let mut payload = vec![0u8; HEADER + BLOCK];
    payload[0] = OP_WRITE;
    for (i, b) in payload[HEADER..].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let mut flush = [0u8; HEADER];
    flush[0] = OP_FLUSH;
    // A small xorshift: offsets need only be spread, not unpredictable.
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut lat = Vec::new();
    let start = Instant::now();
    // At least one operation, however short the duration.
    while lat.is_empty() || start.elapsed() < duration {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let offset = (rng % blocks) * BLOCK as u64;
        payload[8..16].copy_from_slice(&offset.to_le_bytes());
        let t = Instant::now();
        round(&mut conns, &payload)?;
        if let Mode::Commit = mode {
            round(&mut conns, &flush)?;
        }
        lat.push(t.elapsed().as_micros() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let cpu_ns = own_cpu_ns()? - cpu_before;
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    Ok(format!(
        "{{\"ops\": {}, \"per_second\": {:.1}, \"p50_us\": {}, \"p99_us\": {}, \"client_cpu_us\": {:.0}}}",
        lat.len(),
        lat.len() as f64 / secs,
        pct(0.5),
        pct(0.99),
        cpu_ns as f64 / 1000.0
    ))
}

/// Nanoseconds this process has run on a CPU (`/proc/self/schedstat`).
fn own_cpu_ns() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/self/schedstat")
        .context("reading /proc/self/schedstat (this process's CPU time)")?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("/proc/self/schedstat does not start with a number")
}

/// Sends `request` to every replica, then waits for every answer.
fn round(conns: &mut [TcpStream], request: &[u8]) -> Result<()> {
    for c in conns.iter_mut() {
        c.write_all(request).context("sending a request")?;
    }
    for c in conns.iter_mut() {
        let mut status = [0u8; 1];
        c.read_exact(&mut status).context("reading an answer")?;
        match status[0] {
            DONE => {}
            OUTSIDE => bail!(
                "a replica refused a write outside its file: --span is larger than its --size"
            ),
            _ => bail!("a replica failed a request: its disk returned an error"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes_and_must_be_whole_blocks() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("8k"), Ok(8 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("4095").unwrap_err().contains("multiple of 4096"));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
    }

    #[test]
    fn the_buffer_is_aligned_for_direct_io() {
        let mut b = Aligned::new();
        let s = b.get_mut();
        assert_eq!(s.len(), BLOCK);
        assert_eq!(s.as_ptr() as usize % BLOCK, 0);
    }

    /// One replica on a real file over loopback TCP: a write and a flush
    /// are answered, a write past the file's end is refused with a message.
    #[test]
    fn a_replica_serves_writes_and_flushes_and_refuses_outside_writes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let (f, a) = (file.clone(), addr.clone());
        std::thread::spawn(move || replica(&a, &f, 64 << 10));
        // Until the replica has filled its file and listens.
        while TcpStream::connect(&addr).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let json = client(
            std::slice::from_ref(&addr),
            Mode::Commit,
            Duration::ZERO,
            64 << 10,
        )
        .unwrap();
        assert!(json.starts_with("{\"ops\": 1,"), "{json}");
        // Random offsets in 32 blocks, 16 of them outside the file: the run
        // ends at the first of those, refused.
        let err = client(&[addr], Mode::Write, Duration::from_secs(3600), 128 << 10);
        let msg = format!("{:#}", err.unwrap_err());
        assert!(msg.contains("--span is larger than its --size"), "{msg}");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 64 << 10);
    }
}
