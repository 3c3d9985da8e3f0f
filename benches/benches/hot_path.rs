//! Microbenchmarks of the data path's hot pieces (divan).
//!
//! ```sh
//! cargo bench -p zebu-benches                 # all of them
//! cargo bench -p zebu-benches -- crc          # a filter (substring of the path)
//! cargo test -p zebu-benches --bench hot_path # each benchmark once (test mode)
//! ```
//!
//! - `nbd`: the NBD server's request path through its public API
//!   (`zebu_engine::frontend::nbd::serve` on a Unix socket, a device that does
//!   nothing): a client writes a burst of pipelined requests and reads the
//!   replies. Per request: header parsing and validation, payload read, device
//!   call, reply encoding, plus the socket round trip shared by the burst. The
//!   header parser itself (`RequestHeader::parse`, `plan_request`) is public
//!   in `zebu_nbd` now and could be measured alone; it is not yet.
//! - `proto`: prost encoding (and decoding) of one replica `IoBatch` of 4 KiB
//!   writes, as the engine's link sends it.
//! - `replication`: the sans-IO `Replicator`'s write fan-out: `submit` of a
//!   write, one OK `reply` per replica, the completion.
//! - `crc`: crc32fast over 4 KiB (every write payload and read reply).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use bytes::Bytes;
use divan::counter::{BytesCount, ItemsCount};
use divan::{Bencher, black_box};
use prost::Message;
use zebu_engine::frontend::nbd;
use zebu_engine::frontend::{BlockDevice, DeviceError};
use zebu_engine::replication::{Action, IoId, IoKind, ReplicaId, Replicator};
use zebu_proto::replica as pb;

fn main() {
    // At least 0.1 s and 200 samples per benchmark (about 15 s in all);
    // `--min-time`, `--sample-count` and the like on the command line win.
    divan::Divan::default()
        .min_time(std::time::Duration::from_millis(100))
        .sample_count(200)
        .config_with_args()
        .main();
}

const BLOCK: usize = 4096;

fn block() -> Bytes {
    Bytes::from(
        (0..BLOCK)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

// ------------------------------------------------------------------- crc --

mod crc {
    use super::*;

    /// crc32fast (IEEE) of one 4 KiB block.
    #[divan::bench]
    fn crc32_4k(bencher: Bencher) {
        let data = block();
        bencher
            .counter(BytesCount::new(BLOCK))
            .bench_local(|| crc32fast::hash(black_box(&data)));
    }
}

// ----------------------------------------------------------------- proto --

mod proto {
    use super::*;

    fn batch(n: usize) -> pb::IoBatch {
        let payload = block();
        let crc = crc32fast::hash(&payload);
        pb::IoBatch {
            requests: (0..n as u64)
                .map(|i| pb::IoRequest {
                    id: (7 << 32) | i,
                    op: pb::Op::Write as i32,
                    offset: i * 1_048_573 * 4096 % (1 << 40),
                    length: BLOCK as u32,
                    payload: payload.clone(),
                    crc32: crc,
                    revision: 1_000_000 + i,
                    epoch: 3,
                    alone: false,
                })
                .collect(),
        }
    }

    /// The engine's encoding of an `IoBatch` of `n` 4 KiB writes into one
    /// gRPC message (`zebu_engine::batch`; 4 KiB payloads are copied into
    /// the message buffer, as on the wire).
    #[divan::bench(args = [1, 32, 256])]
    fn encode_io_batch(bencher: Bencher, n: usize) {
        let b = batch(n);
        let mut out = std::collections::VecDeque::new();
        bencher.counter(ItemsCount::new(n)).bench_local(|| {
            out.clear();
            zebu_engine::batch::encode(black_box(&b).requests.clone(), &mut out);
            black_box(out.len())
        });
    }

    /// prost decoding of the same batch from `Bytes` (payloads are slices of
    /// the input, not copies), as the replica receives it.
    #[divan::bench(args = [1, 32, 256])]
    fn decode_io_batch(bencher: Bencher, n: usize) {
        let wire = batch(n).encode_to_vec();
        let wire = Bytes::from(wire);
        bencher.counter(ItemsCount::new(n)).bench_local(|| {
            let b = pb::IoBatch::decode(black_box(wire.clone())).expect("valid batch");
            black_box(b.requests.len())
        });
    }
}

// ----------------------------------------------------------- replication --

mod replication {
    use super::*;

    fn replicator(replicas: usize) -> Replicator {
        let mut r = Replicator::new(1, 0);
        let mut out = Vec::new();
        for _ in 0..replicas {
            let id = r.add_replica(&mut out).expect("add_replica");
            r.set_rw(id, &mut out).expect("set_rw");
        }
        r
    }

    /// One write's life in the state machine: `submit` (fan-out to every
    /// replica), an OK `reply` from each, the completion.
    /// Answers every `Send` in `out` with a success, as the replicas would;
    /// `out` then holds what those replies caused.
    fn reply_to_sends(
        r: &mut Replicator,
        out: &mut Vec<Action>,
        sends: &mut Vec<(IoId, ReplicaId)>,
    ) {
        sends.clear();
        sends.extend(out.iter().filter_map(|a| match a {
            Action::Send { io, replica } => Some((*io, *replica)),
            _ => None,
        }));
        out.clear();
        for &(io, replica) in sends.iter() {
            r.reply(io, replica, true, out);
        }
    }

    #[divan::bench(args = [1, 2, 3])]
    fn write_fanout(bencher: Bencher, replicas: usize) {
        let mut r = replicator(replicas);
        let mut out: Vec<Action> = Vec::with_capacity(16);
        let mut sends = Vec::with_capacity(replicas);
        bencher.counter(ItemsCount::new(1usize)).bench_local(|| {
            out.clear();
            let s = r.submit(IoKind::Write, &mut out);
            reply_to_sends(&mut r, &mut out, &mut sends);
            debug_assert!(
                matches!(out.last(), Some(Action::Complete { io, result: Ok(()) }) if *io == s.io)
            );
            black_box(s.revision)
        });
    }

    /// 32 writes submitted before any reply (QD32), then every reply.
    #[divan::bench(args = [1, 3])]
    fn write_fanout_qd32(bencher: Bencher, replicas: usize) {
        let mut r = replicator(replicas);
        let mut out: Vec<Action> = Vec::with_capacity(32 * (replicas + 1));
        let mut sends = Vec::with_capacity(32 * replicas);
        bencher.counter(ItemsCount::new(32usize)).bench_local(|| {
            out.clear();
            for _ in 0..32 {
                r.submit(IoKind::Write, &mut out);
            }
            reply_to_sends(&mut r, &mut out, &mut sends);
            black_box(out.len())
        });
        assert_eq!(r.in_flight(), 0);
    }
}

// ------------------------------------------------------------------- nbd --

mod nbd_server {
    use super::*;

    use zebu_nbd::{
        CMD_READ, CMD_WRITE, IHAVEOPT, OPT_EXPORT_NAME, REQUEST_MAGIC,
        SIMPLE_REPLY_MAGIC as REPLY_MAGIC,
    };
    const SIZE: u64 = 1 << 30;

    /// A device that stores nothing: writes succeed, reads return zeroes.
    struct NullDevice {
        zeroes: Bytes,
    }

    impl BlockDevice for NullDevice {
        fn size(&self) -> u64 {
            SIZE
        }
        fn block_size(&self) -> u32 {
            BLOCK as u32
        }
        async fn read(&self, _offset: u64, len: u32) -> Result<Bytes, DeviceError> {
            Ok(self.zeroes.slice(..len as usize))
        }
        async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn flush(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn trim(&self, _offset: u64, _len: u32) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn write_zeroes(
            &self,
            _offset: u64,
            _len: u32,
            _fua: bool,
        ) -> Result<(), DeviceError> {
            Ok(())
        }
        fn multi_conn_safe(&self) -> bool {
            true
        }
    }

    /// The server (its own runtime thread) and one connected client.
    struct Server {
        client: UnixStream,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
        _dir: tempfile::TempDir,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.client.shutdown(std::net::Shutdown::Both);
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let addr = format!("unix:{}", sock.display());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = nbd::bind(&addr).await.expect("bind");
                ready_tx.send(()).expect("ready");
                let device = Arc::new(NullDevice {
                    zeroes: Bytes::from(vec![0u8; 1 << 20]),
                });
                nbd::serve(listener, "bench".into(), device, stop_rx)
                    .await
                    .expect("serve");
            });
        });
        ready_rx.recv().expect("server thread started");
        let mut client = UnixStream::connect(&sock).expect("connect");
        // Fixed newstyle handshake: NBDMAGIC, IHAVEOPT, handshake flags.
        let mut hello = [0u8; 18];
        client.read_exact(&mut hello).expect("server hello");
        assert_eq!(&hello[..8], b"NBDMAGIC");
        // Client flags: FIXED_NEWSTYLE | NO_ZEROES, then NBD_OPT_EXPORT_NAME.
        let name = b"bench";
        let mut opt = Vec::new();
        opt.extend_from_slice(&3u32.to_be_bytes());
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name);
        client.write_all(&opt).expect("send option");
        // Export size (u64) and transmission flags (u16); no zero padding.
        let mut export = [0u8; 10];
        client.read_exact(&mut export).expect("export reply");
        assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), SIZE);
        Server {
            client,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn header(out: &mut Vec<u8>, kind: u16, cookie: u64, offset: u64, len: u32) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }

    /// Sends `burst` pipelined requests, reads every reply (16-byte header,
    /// plus `reply_data` bytes for reads) and checks them.
    fn round(s: &mut Server, wire: &[u8], burst: usize, reply_data: usize, buf: &mut [u8]) {
        s.client.write_all(wire).expect("send requests");
        let per = 16 + reply_data;
        let mut got = 0;
        while got < burst * per {
            let n = s
                .client
                .read(&mut buf[got..burst * per])
                .expect("read replies");
            assert!(n > 0, "server closed the connection");
            got += n;
        }
        for r in buf[..burst * per].chunks_exact(per) {
            assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), REPLY_MAGIC);
            assert_eq!(
                u32::from_be_bytes(r[4..8].try_into().unwrap()),
                0,
                "NBD error reply"
            );
        }
    }

    fn bench_kind(bencher: Bencher, kind: u16, burst: usize) {
        let mut s = start();
        let payload = block();
        let mut wire = Vec::new();
        for i in 0..burst as u64 {
            header(
                &mut wire,
                kind,
                i,
                (i * 7919 % (SIZE / 4096)) * 4096,
                BLOCK as u32,
            );
            if kind == CMD_WRITE {
                wire.extend_from_slice(&payload);
            }
        }
        let reply_data = if kind == CMD_READ { BLOCK } else { 0 };
        let mut buf = vec![0u8; burst * (16 + reply_data)];
        bencher
            .counter(ItemsCount::new(burst))
            .bench_local(|| round(&mut s, &wire, burst, reply_data, &mut buf));
    }

    /// `burst` pipelined 4 KiB NBD writes (header + payload) and their replies.
    #[divan::bench(args = [1, 32])]
    fn write_4k(bencher: Bencher, burst: usize) {
        bench_kind(bencher, CMD_WRITE, burst);
    }

    /// `burst` pipelined 4 KiB NBD reads and their replies (header + data).
    #[divan::bench(args = [1, 32])]
    fn read_4k(bencher: Bencher, burst: usize) {
        bench_kind(bencher, CMD_READ, burst);
    }
}
