//! Tests of the NBD server: protocol edge cases over in-memory pipes and
//! sockets, and interoperability with real NBD clients (`nbdinfo`, `nbdcopy`,
//! `qemu-img`, `qemu-io`, `fio`) over a unix socket.
//!
//! Nothing here depends on timing: concurrency is made observable with gated
//! test devices, and timeouts only exist as a safety net so a bug cannot hang
//! CI.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::BufMut;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;
use zebu_nbd::*;

/// Export name used by every test server.
const EXPORT: &str = "vol";
/// Safety net for in-process tests.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Safety net for external tools.
const TOOL_TIMEOUT: Duration = Duration::from_secs(180);

/// Awaits `fut`, failing the test if it takes absurdly long (never hit unless
/// something is broken).
async fn within<F: Future>(fut: F) -> F::Output {
    match tokio::time::timeout(TEST_TIMEOUT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("test step did not finish within {TEST_TIMEOUT:?}"),
    }
}

// ---------------------------------------------------------------------------
// Test devices (test-only; never compiled into the engine).

/// An in-memory device that records what it was asked to do.
struct MemDevice {
    data: Mutex<Vec<u8>>,
    multi_conn: bool,
    block_size: u32,
    flushes: AtomicU64,
    fua_writes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
}

impl MemDevice {
    fn new(size: usize) -> Self {
        MemDevice {
            data: Mutex::new(vec![0; size]),
            multi_conn: true,
            block_size: 4096,
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, DeviceError> {
        let size = self.data.lock().unwrap().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(DeviceError::OutOfRange { offset, len }),
        }
    }

    fn read_now(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        let range = self.range(offset, len.into())?;
        Ok(Bytes::copy_from_slice(&self.data.lock().unwrap()[range]))
    }

    fn fill(&self, offset: u64, len: u64, byte: u8) -> Result<(), DeviceError> {
        let range = self.range(offset, len)?;
        self.data.lock().unwrap()[range].fill(byte);
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        self.read_now(offset, len)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        let range = self.range(offset, data.len() as u64)?;
        self.data.lock().unwrap()[range].copy_from_slice(&data);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.trims.fetch_add(1, Ordering::SeqCst);
        self.fill(offset, len.into(), 0)
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError> {
        self.zeroes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.fill(offset, len.into(), 0)
    }

    fn multi_conn_safe(&self) -> bool {
        self.multi_conn
    }
}

/// A memory device whose reads below `gate_below` block until the test adds
/// permits to `gate`; every read announces its offset on `started`.
struct GatedDevice {
    inner: MemDevice,
    gate: Semaphore,
    gate_below: u64,
    started: mpsc::UnboundedSender<u64>,
    current: AtomicUsize,
    max_seen: AtomicUsize,
}

impl GatedDevice {
    fn new(size: usize, gate_below: u64) -> (Self, mpsc::UnboundedReceiver<u64>) {
        let (started, started_rx) = mpsc::unbounded_channel();
        let device = GatedDevice {
            inner: MemDevice::new(size),
            gate: Semaphore::new(0),
            gate_below,
            started,
            current: AtomicUsize::new(0),
            max_seen: AtomicUsize::new(0),
        };
        (device, started_rx)
    }
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_seen.fetch_max(now, Ordering::SeqCst);
        let _ = self.started.send(offset);
        if offset < self.gate_below {
            self.gate.acquire().await.expect("gate closed").forget();
        }
        let result = self.inner.read_now(offset, len);
        self.current.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send {
        self.inner.write(offset, data, fua)
    }

    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), DeviceError>> + Send {
        self.inner.trim(offset, len)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send {
        self.inner.write_zeroes(offset, len, fua)
    }

    fn multi_conn_safe(&self) -> bool {
        true
    }
}

/// A device whose every operation fails (reads at offset 4096 instead return
/// a short buffer), to check the error mapping.
struct FailingDevice;

impl BlockDevice for FailingDevice {
    fn size(&self) -> u64 {
        1 << 20
    }

    fn block_size(&self) -> u32 {
        // Not a power of two: the server must advertise a sane value instead.
        3000
    }

    async fn read(&self, offset: u64, _len: u32) -> Result<Bytes, DeviceError> {
        if offset == 4096 {
            Ok(Bytes::from_static(b"short"))
        } else {
            Err(DeviceError::Io("disk on fire".into()))
        }
    }

    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> Result<(), DeviceError> {
        Err(DeviceError::NoSpace)
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        Err(DeviceError::ShuttingDown)
    }

    async fn trim(&self, _offset: u64, _len: u32) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported("no discard".into()))
    }

    async fn write_zeroes(&self, _offset: u64, _len: u32, _fua: bool) -> Result<(), DeviceError> {
        Err(DeviceError::ReadOnly)
    }

    fn multi_conn_safe(&self) -> bool {
        false
    }
}

// ---------------------------------------------------------------------------
// A minimal NBD client for driving the server byte by byte.

/// Client side of one connection, plus the server task serving it.
struct Harness {
    client: DuplexStream,
    _stop: watch::Sender<bool>,
    server: JoinHandle<Result<Summary, NbdError>>,
}

impl Harness {
    /// Serves `device` on one end of an in-memory pipe.
    fn start<D: BlockDevice>(device: Arc<D>, limits: Limits) -> Harness {
        let (client, server_side) = tokio::io::duplex(1 << 20);
        let (stop, stop_rx) = watch::channel(false);
        let server = tokio::spawn(async move {
            let (reader, writer) = tokio::io::split(server_side);
            serve_connection(&*device, EXPORT, reader, writer, stop_rx, limits).await
        });
        Harness {
            client,
            _stop: stop,
            server,
        }
    }

    /// Waits for the server side to finish and returns its outcome.
    async fn outcome(self) -> Result<Summary, NbdError> {
        drop(self.client);
        within(self.server).await.expect("server task panicked")
    }
}

/// Reads the greeting, checks it, and answers with `client_flags`.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, client_flags: u32) {
    let mut greeting = [0u8; 18];
    within(s.read_exact(&mut greeting)).await.unwrap();
    let mut g = &greeting[..];
    assert_eq!(g.get_u64(), NBD_MAGIC);
    assert_eq!(g.get_u64(), IHAVEOPT);
    assert_eq!(g.get_u16(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&client_flags.to_be_bytes()).await.unwrap();
}

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) {
    let mut msg = Vec::new();
    msg.put_u64(IHAVEOPT);
    msg.put_u32(option);
    msg.put_u32(data.len() as u32);
    msg.put_slice(data);
    s.write_all(&msg).await.unwrap();
}

/// Reads one option reply: (option, reply type, data).
async fn read_option_reply<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u32, Vec<u8>) {
    let mut header = [0u8; 20];
    within(s.read_exact(&mut header)).await.unwrap();
    let mut h = &header[..];
    assert_eq!(h.get_u64(), OPTION_REPLY_MAGIC);
    let option = h.get_u32();
    let reply = h.get_u32();
    let mut data = vec![0u8; h.get_u32() as usize];
    within(s.read_exact(&mut data)).await.unwrap();
    (option, reply, data)
}

/// Body of an `NBD_OPT_INFO` / `NBD_OPT_GO` request.
fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    data.put_u32(name.len() as u32);
    data.put_slice(name.as_bytes());
    data.put_u16(infos.len() as u16);
    for info in infos {
        data.put_u16(*info);
    }
    data
}

/// Sends `NBD_OPT_INFO`/`NBD_OPT_GO` and collects replies up to the final
/// one (ACK or error): (reply type, data) pairs.
async fn info_or_go<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    name: &str,
    infos: &[u16],
) -> Vec<(u32, Vec<u8>)> {
    send_option(s, option, &info_request(name, infos)).await;
    let mut replies = Vec::new();
    loop {
        let (opt, reply, data) = read_option_reply(s).await;
        assert_eq!(opt, option);
        replies.push((reply, data));
        if reply != REP_INFO {
            return replies;
        }
    }
}

/// Decodes an `NBD_INFO_EXPORT` payload: (size, transmission flags).
fn export_info(replies: &[(u32, Vec<u8>)]) -> (u64, u16) {
    let (_, data) = replies
        .iter()
        .find(|(reply, data)| *reply == REP_INFO && data[..2] == INFO_EXPORT.to_be_bytes())
        .expect("no NBD_INFO_EXPORT reply");
    assert_eq!(data.len(), 12);
    let mut d = &data[2..];
    (d.get_u64(), d.get_u16())
}

/// Full handshake through `NBD_OPT_GO` on the default export.
async fn connect<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> (u64, u16) {
    greet(s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let replies = info_or_go(s, OPT_GO, "", &[]).await;
    assert_eq!(replies.last().unwrap().0, REP_ACK, "{replies:?}");
    export_info(&replies)
}

fn request(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(REQUEST_HEADER_LEN);
    msg.put_u32(REQUEST_MAGIC);
    msg.put_u16(flags);
    msg.put_u16(kind);
    msg.put_u64(cookie);
    msg.put_u64(offset);
    msg.put_u32(len);
    msg
}

async fn send_request<S: AsyncWrite + Unpin>(
    s: &mut S,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) {
    s.write_all(&request(flags, kind, cookie, offset, len))
        .await
        .unwrap();
}

/// Reads a simple reply header: (error, cookie).
async fn read_reply<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u64) {
    let mut header = [0u8; SIMPLE_REPLY_LEN];
    within(s.read_exact(&mut header)).await.unwrap();
    let mut h = &header[..];
    assert_eq!(h.get_u32(), SIMPLE_REPLY_MAGIC);
    (h.get_u32(), h.get_u64())
}

async fn read_bytes<S: AsyncRead + Unpin>(s: &mut S, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    within(s.read_exact(&mut data)).await.unwrap();
    data
}

/// Reads `len` bytes at `offset` and returns them, asserting success.
async fn read_ok<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cookie: u64,
    offset: u64,
    len: u32,
) -> Vec<u8> {
    send_request(s, 0, CMD_READ, cookie, offset, len).await;
    assert_eq!(read_reply(s).await, (0, cookie));
    read_bytes(s, len as usize).await
}

/// Writes `data` at `offset` and asserts success.
async fn write_ok<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    flags: u16,
    cookie: u64,
    offset: u64,
    data: &[u8],
) {
    send_request(s, flags, CMD_WRITE, cookie, offset, data.len() as u32).await;
    s.write_all(data).await.unwrap();
    assert_eq!(read_reply(s).await, (0, cookie));
}

/// Asserts that the server closed the connection with nothing left to read.
async fn assert_eof<S: AsyncRead + Unpin>(s: &mut S) {
    let mut rest = Vec::new();
    within(s.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty(), "unexpected trailing bytes: {rest:?}");
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------
// Handshake.

#[tokio::test]
async fn non_fixed_newstyle_client_is_disconnected() {
    let mut h = Harness::start(Arc::new(MemDevice::new(4096)), Limits::DEFAULT);
    greet(&mut h.client, 0).await;
    assert_eof(&mut h.client).await;
    assert!(matches!(h.outcome().await, Err(NbdError::Protocol(_))));
}

#[tokio::test]
async fn unknown_client_flags_are_disconnected() {
    let mut h = Harness::start(Arc::new(MemDevice::new(4096)), Limits::DEFAULT);
    greet(&mut h.client, FLAG_C_FIXED_NEWSTYLE | 0x80).await;
    assert_eof(&mut h.client).await;
    assert!(matches!(h.outcome().await, Err(NbdError::Protocol(_))));
}

#[tokio::test]
async fn bad_option_magic_closes_cleanly() {
    let mut h = Harness::start(Arc::new(MemDevice::new(4096)), Limits::DEFAULT);
    greet(&mut h.client, FLAG_C_FIXED_NEWSTYLE).await;
    h.client
        .write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0")
        .await
        .unwrap();
    assert_eof(&mut h.client).await;
    assert!(matches!(h.outcome().await, Err(NbdError::Protocol(_))));
}

#[tokio::test]
async fn client_leaving_during_handshake_is_a_disconnect() {
    let mut h = Harness::start(Arc::new(MemDevice::new(4096)), Limits::DEFAULT);
    greet(&mut h.client, FLAG_C_FIXED_NEWSTYLE).await;
    h.client.write_all(&IHAVEOPT.to_be_bytes()).await.unwrap();
    let err = h.outcome().await.unwrap_err();
    assert!(err.is_disconnect(), "{err}");
}

#[tokio::test]
async fn unsupported_options_get_err_unsup_and_negotiation_continues() {
    let mut h = Harness::start(Arc::new(MemDevice::new(8192)), Limits::DEFAULT);
    let c = &mut h.client;
    greet(c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    for (option, data) in [
        (1234u32, &b"whatever"[..]),
        (OPT_STRUCTURED_REPLY, &[][..]),
        (OPT_STARTTLS, &[][..]),
        (9, &b"\0\0\0\0"[..]), // NBD_OPT_LIST_META_CONTEXT
    ] {
        send_option(c, option, data).await;
        let (opt, reply, _) = read_option_reply(c).await;
        assert_eq!((opt, reply), (option, REP_ERR_UNSUP));
    }
    let replies = info_or_go(c, OPT_GO, EXPORT, &[]).await;
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    assert_eq!(read_ok(c, 1, 0, 512).await, vec![0; 512]);
}

#[tokio::test]
async fn oversized_option_is_skipped_with_err_too_big() {
    let mut h = Harness::start(Arc::new(MemDevice::new(8192)), Limits::DEFAULT);
    let c = &mut h.client;
    greet(c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    send_option(c, 4321, &vec![7u8; MAX_OPTION_LEN as usize + 1]).await;
    let (opt, reply, _) = read_option_reply(c).await;
    assert_eq!((opt, reply), (4321, REP_ERR_TOO_BIG));
    let replies = info_or_go(c, OPT_GO, "", &[]).await;
    assert_eq!(replies.last().unwrap().0, REP_ACK);
}

#[tokio::test]
async fn list_reports_the_export() {
    let mut h = Harness::start(Arc::new(MemDevice::new(8192)), Limits::DEFAULT);
    let c = &mut h.client;
    greet(c, FLAG_C_FIXED_NEWSTYLE).await;
    send_option(c, OPT_LIST, &[]).await;
    let (opt, reply, data) = read_option_reply(c).await;
    assert_eq!((opt, reply), (OPT_LIST, REP_SERVER));
    let mut expected = (EXPORT.len() as u32).to_be_bytes().to_vec();
    expected.extend_from_slice(EXPORT.as_bytes());
    assert_eq!(data, expected);
    assert_eq!(read_option_reply(c).await, (OPT_LIST, REP_ACK, vec![]));

    // NBD_OPT_LIST with data is invalid; negotiation goes on.
    send_option(c, OPT_LIST, b"x").await;
    assert_eq!(read_option_reply(c).await.1, REP_ERR_INVALID);
    send_option(c, OPT_ABORT, &[]).await;
    assert_eq!(read_option_reply(c).await, (OPT_ABORT, REP_ACK, vec![]));
    assert_eof(c).await;
    assert_eq!(h.outcome().await.unwrap().end, End::Aborted);
}

#[tokio::test]
async fn info_reports_export_block_size_name_and_description() {
    let mut h = Harness::start(Arc::new(MemDevice::new(1 << 20)), Limits::DEFAULT);
    let c = &mut h.client;
    greet(c, FLAG_C_FIXED_NEWSTYLE).await;
    let replies = info_or_go(
        c,
        OPT_INFO,
        EXPORT,
        &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 0x7777],
    )
    .await;
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    let (size, flags) = export_info(&replies);
    assert_eq!(size, 1 << 20);
    assert_eq!(
        flags,
        TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN
    );
    let info = |kind: u16| {
        replies
            .iter()
            .filter(|(reply, data)| *reply == REP_INFO && data[..2] == kind.to_be_bytes())
            .map(|(_, data)| data[2..].to_vec())
            .collect::<Vec<_>>()
    };
    assert_eq!(info(INFO_NAME), vec![EXPORT.as_bytes().to_vec()]);
    assert_eq!(
        info(INFO_DESCRIPTION),
        vec![DESCRIPTION.as_bytes().to_vec()]
    );
    let mut block = Vec::new();
    block.put_u32(1);
    block.put_u32(4096);
    block.put_u32(MAX_PAYLOAD);
    assert_eq!(info(INFO_BLOCK_SIZE), vec![block]);

    // INFO does not end negotiation: GO still works afterwards.
    let replies = info_or_go(c, OPT_GO, EXPORT, &[]).await;
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    assert_eq!(read_ok(c, 9, 4096, 4096).await, vec![0; 4096]);
}

#[tokio::test]
async fn go_with_unknown_name_fails_then_default_name_works() {
    let mut h = Harness::start(Arc::new(MemDevice::new(8192)), Limits::DEFAULT);
    let c = &mut h.client;
    greet(c, FLAG_C_FIXED_NEWSTYLE).await;
    let replies = info_or_go(c, OPT_GO, "nope", &[]).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&replies[0].1).contains("nope"));

    // Malformed GO (name length beyond the data) is invalid, not fatal.
    send_option(c, OPT_GO, &[0, 0, 0, 10, 0, 0]).await;
    assert_eq!(read_option_reply(c).await.1, REP_ERR_INVALID);

    let replies = info_or_go(c, OPT_GO, "", &[]).await;
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    assert_eq!(export_info(&replies).0, 8192);
}

#[tokio::test]
async fn export_name_sends_zero_padding_unless_no_zeroes() {
    for no_zeroes in [false, true] {
        let device = Arc::new(MemDevice::new(8192));
        device.fill(0, 8, 0x5a).unwrap();
        let mut h = Harness::start(device, Limits::DEFAULT);
        let c = &mut h.client;
        let flags = if no_zeroes {
            FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
        } else {
            FLAG_C_FIXED_NEWSTYLE
        };
        greet(c, flags).await;
        send_option(c, OPT_EXPORT_NAME, EXPORT.as_bytes()).await;
        let reply = read_bytes(c, if no_zeroes { 10 } else { 134 }).await;
        let mut r = &reply[..];
        assert_eq!(r.get_u64(), 8192);
        assert_ne!(r.get_u16() & TFLAG_HAS_FLAGS, 0);
        assert!(r.iter().all(|b| *b == 0));
        // The next bytes on the wire are the reply to our first request.
        assert_eq!(read_ok(c, 1, 0, 8).await, vec![0x5a; 8]);
        send_request(c, 0, CMD_DISC, 2, 0, 0).await;
        assert_eof(c).await;
        assert_eq!(h.outcome().await.unwrap().end, End::Disconnect);
    }
}

#[tokio::test]
async fn export_name_with_unknown_name_disconnects() {
    let mut h = Harness::start(Arc::new(MemDevice::new(8192)), Limits::DEFAULT);
    greet(&mut h.client, FLAG_C_FIXED_NEWSTYLE).await;
    send_option(&mut h.client, OPT_EXPORT_NAME, b"other").await;
    assert_eof(&mut h.client).await;
    assert!(matches!(h.outcome().await, Err(NbdError::UnknownExport(name)) if name == "other"));
}

#[tokio::test]
async fn flags_follow_the_device() {
    let mut h = Harness::start(Arc::new(FailingDevice), Limits::DEFAULT);
    greet(&mut h.client, FLAG_C_FIXED_NEWSTYLE).await;
    let replies = info_or_go(&mut h.client, OPT_INFO, "", &[INFO_BLOCK_SIZE]).await;
    let (size, flags) = export_info(&replies);
    assert_eq!(size, 1 << 20);
    assert_eq!(flags & TFLAG_CAN_MULTI_CONN, 0);
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    // 3000 is not a power of two: the fallback is advertised.
    let block = replies
        .iter()
        .find(|(reply, data)| *reply == REP_INFO && data[..2] == INFO_BLOCK_SIZE.to_be_bytes())
        .unwrap();
    assert_eq!(block.1[6..10], FALLBACK_BLOCK_SIZE.to_be_bytes());
}

// ---------------------------------------------------------------------------
// Transmission.

#[tokio::test]
async fn write_read_flush_trim_and_zeroes() {
    let device = Arc::new(MemDevice::new(1 << 20));
    let mut h = Harness::start(Arc::clone(&device), Limits::DEFAULT);
    let c = &mut h.client;
    connect(c).await;

    let data = pseudo_random(10_000, 1);
    write_ok(c, CMD_FLAG_FUA, 1, 1234, &data).await;
    assert_eq!(read_ok(c, 2, 1234, 10_000).await, data);
    assert_eq!(device.fua_writes.load(Ordering::SeqCst), 1);

    send_request(c, 0, CMD_FLUSH, 3, 0, 0).await;
    assert_eq!(read_reply(c).await, (0, 3));
    assert_eq!(device.flushes.load(Ordering::SeqCst), 1);

    // Trim with FUA also flushes.
    send_request(c, CMD_FLAG_FUA, CMD_TRIM, 4, 1234, 100).await;
    assert_eq!(read_reply(c).await, (0, 4));
    assert_eq!(device.trims.load(Ordering::SeqCst), 1);
    assert_eq!(device.flushes.load(Ordering::SeqCst), 2);

    send_request(
        c,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
        CMD_WRITE_ZEROES,
        5,
        2000,
        3000,
    )
    .await;
    assert_eq!(read_reply(c).await, (0, 5));
    assert_eq!(device.zeroes.load(Ordering::SeqCst), 1);
    assert_eq!(device.fua_writes.load(Ordering::SeqCst), 2);

    let mut expected = data.clone();
    expected[..100].fill(0);
    expected[2000 - 1234..5000 - 1234].fill(0);
    assert_eq!(read_ok(c, 6, 1234, 10_000).await, expected);
    assert_eq!(device.snapshot()[1234..11_234], expected[..]);

    send_request(c, 0, CMD_DISC, 7, 0, 0).await;
    assert_eof(c).await;
    assert_eq!(
        h.outcome().await.unwrap(),
        Summary {
            requests: 6,
            end: End::Disconnect
        }
    );
}

#[tokio::test]
async fn zero_length_requests_succeed() {
    let device = Arc::new(MemDevice::new(4096));
    let mut h = Harness::start(Arc::clone(&device), Limits::DEFAULT);
    let c = &mut h.client;
    connect(c).await;
    for (kind, cookie) in [
        (CMD_READ, 1),
        (CMD_WRITE, 2),
        (CMD_TRIM, 3),
        (CMD_WRITE_ZEROES, 4),
    ] {
        send_request(c, 0, kind, cookie, 4096, 0).await;
        assert_eq!(read_reply(c).await, (0, cookie));
    }
    assert_eq!(read_ok(c, 5, 0, 16).await, vec![0; 16]);
}

#[tokio::test]
async fn out_of_range_requests_fail_and_the_connection_keeps_working() {
    let device = Arc::new(MemDevice::new(64 * 1024));
    let mut h = Harness::start(Arc::clone(&device), Limits::DEFAULT);
    let c = &mut h.client;
    let (size, _) = connect(c).await;

    send_request(c, 0, CMD_READ, 1, size - 10, 11).await;
    assert_eq!(read_reply(c).await, (EINVAL, 1));
    // offset + len overflows u64.
    send_request(c, 0, CMD_READ, 2, u64::MAX - 1, 4).await;
    assert_eq!(read_reply(c).await, (EINVAL, 2));
    send_request(c, 0, CMD_TRIM, 3, size, 1).await;
    assert_eq!(read_reply(c).await, (EINVAL, 3));
    send_request(c, 0, CMD_WRITE_ZEROES, 4, size + 1, 0).await;
    assert_eq!(read_reply(c).await, (ENOSPC, 4));

    // A rejected write still has its payload consumed.
    send_request(c, 0, CMD_WRITE, 5, size - 100, 200).await;
    c.write_all(&[0xee; 200]).await.unwrap();
    assert_eq!(read_reply(c).await, (ENOSPC, 5));

    assert_eq!(read_ok(c, 6, size - 100, 100).await, vec![0; 100]);
    assert!(device.snapshot().iter().all(|b| *b == 0));
}

#[tokio::test]
async fn unknown_commands_and_flags_get_einval() {
    let device = Arc::new(MemDevice::new(8192));
    let mut h = Harness::start(Arc::clone(&device), Limits::DEFAULT);
    let c = &mut h.client;
    connect(c).await;
    for (cookie, (flags, kind)) in [
        (0, CMD_CACHE),
        (0, 7),  // NBD_CMD_BLOCK_STATUS without negotiated contexts
        (0, 42), // unknown
        (CMD_FLAG_DF, CMD_READ),
        (CMD_FLAG_NO_HOLE, CMD_TRIM),
        (1 << 15, CMD_FLUSH),
    ]
    .into_iter()
    .enumerate()
    {
        send_request(c, flags, kind, cookie as u64, 0, 512).await;
        assert_eq!(
            read_reply(c).await,
            (EINVAL, cookie as u64),
            "{flags:#x} {kind}"
        );
    }
    // A write with a bad flag is rejected but its payload is consumed.
    send_request(c, CMD_FLAG_NO_HOLE, CMD_WRITE, 10, 0, 3).await;
    c.write_all(b"abc").await.unwrap();
    assert_eq!(read_reply(c).await, (EINVAL, 10));
    assert_eq!(read_ok(c, 11, 0, 3).await, vec![0; 3]);
}

#[tokio::test]
async fn oversized_requests_get_eoverflow_without_desync() {
    let device = Arc::new(MemDevice::new(64 << 20));
    let h = Harness::start(Arc::clone(&device), Limits::DEFAULT);
    let (mut rd, mut wr) = tokio::io::split(h.client);
    greet_split(&mut rd, &mut wr).await;

    let too_big = MAX_PAYLOAD + 1;
    let writer = async {
        wr.write_all(&request(0, CMD_READ, 1, 0, too_big))
            .await
            .unwrap();
        wr.write_all(&request(0, CMD_WRITE, 2, 0, too_big))
            .await
            .unwrap();
        wr.write_all(&vec![0xcc; too_big as usize]).await.unwrap();
        wr.write_all(&request(0, CMD_WRITE, 3, 0, 4)).await.unwrap();
        wr.write_all(b"zebu").await.unwrap();
        wr.write_all(&request(0, CMD_READ, 4, 0, 4)).await.unwrap();
        wr
    };
    let reader = async {
        assert_eq!(read_reply(&mut rd).await, (EOVERFLOW, 1));
        assert_eq!(read_reply(&mut rd).await, (EOVERFLOW, 2));
        // Cookies 3 and 4 may complete in either order.
        let mut seen = BTreeMap::new();
        for _ in 0..2 {
            let (error, cookie) = read_reply(&mut rd).await;
            assert_eq!(error, 0);
            if cookie == 4 {
                seen.insert(cookie, read_bytes(&mut rd, 4).await);
            } else {
                seen.insert(cookie, Vec::new());
            }
        }
        seen
    };
    let (_wr, seen) = within(async { tokio::join!(writer, reader) }).await;
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
    assert!(seen[&4] == b"zebu" || seen[&4] == [0; 4]);
    assert_eq!(&device.snapshot()[..5], b"zebu\0");
}

/// Handshake over split halves of the client stream.
async fn greet_split<R, W>(rd: &mut R, wr: &mut W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    within(rd.read_exact(&mut greeting)).await.unwrap();
    wr.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    send_option(wr, OPT_GO, &info_request("", &[])).await;
    loop {
        let (_, reply, _) = read_option_reply(rd).await;
        if reply != REP_INFO {
            assert_eq!(reply, REP_ACK);
            return;
        }
    }
}

#[tokio::test]
async fn device_errors_become_nbd_errors() {
    let mut h = Harness::start(Arc::new(FailingDevice), Limits::DEFAULT);
    let c = &mut h.client;
    connect(c).await;
    send_request(c, 0, CMD_READ, 1, 0, 512).await;
    assert_eq!(read_reply(c).await, (EIO, 1));
    // A short buffer from the device is an I/O error, and no data is sent.
    send_request(c, 0, CMD_READ, 2, 4096, 512).await;
    assert_eq!(read_reply(c).await, (EIO, 2));
    send_request(c, 0, CMD_WRITE, 3, 0, 4).await;
    c.write_all(b"data").await.unwrap();
    assert_eq!(read_reply(c).await, (ENOSPC, 3));
    send_request(c, 0, CMD_FLUSH, 4, 0, 0).await;
    assert_eq!(read_reply(c).await, (ESHUTDOWN, 4));
    // Trim is advisory: "unsupported" is reported as success.
    send_request(c, 0, CMD_TRIM, 5, 0, 512).await;
    assert_eq!(read_reply(c).await, (0, 5));
    send_request(c, 0, CMD_WRITE_ZEROES, 6, 0, 512).await;
    assert_eq!(read_reply(c).await, (EPERM, 6));
}

#[test]
fn device_error_mapping() {
    let out_of_range = DeviceError::OutOfRange { offset: 1, len: 2 };
    assert_eq!(device_errno(&out_of_range, false), EINVAL);
    assert_eq!(device_errno(&out_of_range, true), ENOSPC);
    assert_eq!(
        device_errno(&DeviceError::Invalid("x".into()), true),
        EINVAL
    );
    assert_eq!(
        device_errno(&DeviceError::Unsupported("x".into()), true),
        ENOTSUP
    );
    assert_eq!(
        DeviceError::from(io::Error::from_raw_os_error(libc::EDQUOT)),
        DeviceError::NoSpace
    );
    assert_eq!(
        DeviceError::from(io::Error::from_raw_os_error(libc::EROFS)),
        DeviceError::ReadOnly
    );
    assert!(matches!(
        DeviceError::from(io::Error::from_raw_os_error(libc::EIO)),
        DeviceError::Io(_)
    ));
}

#[tokio::test]
async fn bad_request_magic_closes_after_answering_earlier_requests() {
    let device = Arc::new(MemDevice::new(8192));
    device.fill(0, 4, 0x11).unwrap();
    let mut h = Harness::start(device, Limits::DEFAULT);
    let c = &mut h.client;
    connect(c).await;
    let mut burst = request(0, CMD_READ, 1, 0, 4);
    burst.extend_from_slice(&[0xde; REQUEST_HEADER_LEN]);
    c.write_all(&burst).await.unwrap();
    assert_eq!(read_reply(c).await, (0, 1));
    assert_eq!(read_bytes(c, 4).await, vec![0x11; 4]);
    assert_eof(c).await;
    assert!(matches!(h.outcome().await, Err(NbdError::Protocol(_))));
}

#[tokio::test]
async fn truncated_write_payload_is_a_disconnect() {
    let mut h = Harness::start(Arc::new(MemDevice::new(8192)), Limits::DEFAULT);
    connect(&mut h.client).await;
    send_request(&mut h.client, 0, CMD_WRITE, 1, 0, 1000).await;
    h.client.write_all(&[1; 10]).await.unwrap();
    h.client.shutdown().await.unwrap();
    let err = h.outcome().await.unwrap_err();
    assert!(err.is_disconnect(), "{err}");
}

#[tokio::test]
async fn requests_run_concurrently_and_reply_out_of_order() {
    let (device, mut started) = GatedDevice::new(1 << 20, 4096);
    let device = Arc::new(device);
    device.inner.fill(8192, 512, 0x22).unwrap();
    let mut h = Harness::start(Arc::clone(&device), Limits::DEFAULT);
    let c = &mut h.client;
    connect(c).await;

    // Two gated reads run at the same time...
    send_request(c, 0, CMD_READ, 1, 0, 512).await;
    send_request(c, 0, CMD_READ, 2, 1024, 512).await;
    assert_eq!(within(started.recv()).await, Some(0));
    assert_eq!(within(started.recv()).await, Some(1024));
    // ...and a later, ungated one overtakes them.
    send_request(c, 0, CMD_READ, 3, 8192, 512).await;
    assert_eq!(read_reply(c).await, (0, 3));
    assert_eq!(read_bytes(c, 512).await, vec![0x22; 512]);

    device.gate.add_permits(2);
    let mut cookies = Vec::new();
    for _ in 0..2 {
        let (error, cookie) = read_reply(c).await;
        assert_eq!(error, 0);
        assert_eq!(read_bytes(c, 512).await, vec![0; 512]);
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, [1, 2]);
    // All three were in the device at once.
    assert_eq!(device.max_seen.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn requests_in_flight_are_bounded() {
    let (device, mut started) = GatedDevice::new(1 << 20, u64::MAX);
    let device = Arc::new(device);
    let limits = Limits {
        max_in_flight: 4,
        budget_bytes: 4 * 1024,
    };
    let mut h = Harness::start(Arc::clone(&device), limits);
    let c = &mut h.client;
    connect(c).await;
    for cookie in 0..10u64 {
        send_request(c, 0, CMD_READ, cookie, cookie * 512, 512).await;
    }
    for _ in 0..4 {
        within(started.recv()).await.unwrap();
    }
    assert_eq!(device.current.load(Ordering::SeqCst), 4);
    device.gate.add_permits(10);
    let mut cookies = Vec::new();
    for _ in 0..10 {
        let (error, cookie) = read_reply(c).await;
        assert_eq!(error, 0);
        read_bytes(c, 512).await;
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (0..10).collect::<Vec<_>>());
    assert_eq!(device.max_seen.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn disconnect_waits_for_in_flight_requests() {
    let (device, mut started) = GatedDevice::new(8192, u64::MAX);
    let device = Arc::new(device);
    let mut h = Harness::start(Arc::clone(&device), Limits::DEFAULT);
    let c = &mut h.client;
    connect(c).await;
    send_request(c, 0, CMD_READ, 1, 0, 8).await;
    send_request(c, 0, CMD_DISC, 2, 0, 0).await;
    within(started.recv()).await.unwrap();
    device.gate.add_permits(1);
    assert_eq!(read_reply(c).await, (0, 1));
    assert_eq!(read_bytes(c, 8).await, vec![0; 8]);
    assert_eof(c).await;
    assert_eq!(
        h.outcome().await.unwrap(),
        Summary {
            requests: 1,
            end: End::Disconnect
        }
    );
}

#[test]
fn budget_cost_bounds_requests_and_bytes() {
    let limits = Limits::DEFAULT;
    let share = MAX_IN_FLIGHT_BYTES / MAX_IN_FLIGHT;
    assert_eq!(limits.cost(0), share);
    assert_eq!(limits.cost(1), share);
    assert_eq!(limits.cost(MAX_PAYLOAD), MAX_PAYLOAD);
    assert_eq!(limits.cost(u32::MAX), MAX_IN_FLIGHT_BYTES);
}

// ---------------------------------------------------------------------------
// Sockets, listeners and shutdown.

#[test]
fn listen_addresses_parse_and_display() {
    let parse = |s: &str| s.parse::<ListenAddr>();
    assert_eq!(
        parse("unix:/run/zebu/vol.sock").unwrap(),
        ListenAddr::Unix(PathBuf::from("/run/zebu/vol.sock"))
    );
    assert_eq!(
        parse("tcp:0.0.0.0:10809").unwrap(),
        ListenAddr::Tcp {
            host: "0.0.0.0".into(),
            port: 10809
        }
    );
    assert_eq!(
        parse("tcp:[::1]:10809").unwrap(),
        ListenAddr::Tcp {
            host: "::1".into(),
            port: 10809
        }
    );
    assert_eq!(
        parse("tcp:localhost:0").unwrap(),
        ListenAddr::Tcp {
            host: "localhost".into(),
            port: 0
        }
    );
    for s in [
        "unix:/a/b",
        "tcp:0.0.0.0:10809",
        "tcp:[::1]:10809",
        "tcp:example.com:1",
    ] {
        assert_eq!(parse(s).unwrap().to_string(), s);
    }
    for bad in [
        "",
        "/tmp/sock",
        "unix:",
        "tcp:",
        "tcp:host",
        "tcp::10809",
        "tcp:host:",
        "tcp:host:65536",
        "tcp:host:-1",
        "tcp:[::1:10809",
        "udp:host:1",
        "nbd://host",
    ] {
        let err = parse(bad).unwrap_err();
        assert!(
            matches!(&err, NbdError::InvalidAddress { addr, .. } if addr == bad),
            "{bad}: {err}"
        );
    }
}

/// A server on a unix socket in a fresh temp dir, serving `device`.
struct SocketServer<D: BlockDevice> {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    device: Arc<D>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), NbdError>>,
}

impl<D: BlockDevice> SocketServer<D> {
    async fn start(device: D) -> Self {
        let dir = tempfile::tempdir().expect("creating a temp dir");
        let socket = dir.path().join("nbd.sock");
        let listener = bind(&format!("unix:{}", socket.display()))
            .await
            .expect("binding the test socket");
        let device = Arc::new(device);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            EXPORT.to_owned(),
            Arc::clone(&device),
            stopped,
        ));
        SocketServer {
            _dir: dir,
            socket,
            device,
            stop: Some(stop),
            task,
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///{EXPORT}?socket={}", self.socket.display())
    }

    /// Shuts the server down and checks it stopped cleanly.
    async fn stop(mut self) -> Arc<D> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within(&mut self.task)
            .await
            .expect("server task panicked")
            .expect("server failed");
        self.device
    }
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_then_closes() {
    // It checks at the end that the closed listener refuses connections.
    let _no_forks = FORKS.write().await;
    let (device, mut started) = GatedDevice::new(8192, u64::MAX);
    device.inner.fill(0, 16, 0x33).unwrap();
    let server = SocketServer::start(device).await;
    let mut c = UnixStream::connect(&server.socket).await.unwrap();
    connect(&mut c).await;
    send_request(&mut c, 0, CMD_READ, 77, 0, 16).await;
    within(started.recv()).await.unwrap();

    let SocketServer {
        _dir,
        socket,
        device,
        mut stop,
        task,
    } = server;
    stop.take().unwrap().send(()).unwrap();
    device.gate.add_permits(1);
    assert_eq!(read_reply(&mut c).await, (0, 77));
    assert_eq!(read_bytes(&mut c, 16).await, vec![0x33; 16]);
    assert_eof(&mut c).await;
    within(task).await.unwrap().unwrap();
    // No longer accepting.
    assert!(UnixStream::connect(&socket).await.is_err());
}

#[tokio::test]
async fn shutdown_closes_idle_and_handshaking_connections() {
    let server = SocketServer::start(MemDevice::new(8192)).await;
    let mut idle = UnixStream::connect(&server.socket).await.unwrap();
    connect(&mut idle).await;
    let mut handshaking = UnixStream::connect(&server.socket).await.unwrap();
    greet(&mut handshaking, FLAG_C_FIXED_NEWSTYLE).await;
    // Make sure the server has processed both connections' traffic so far.
    send_option(&mut handshaking, OPT_LIST, &[]).await;
    read_option_reply(&mut handshaking).await;
    read_option_reply(&mut handshaking).await;
    assert_eq!(read_ok(&mut idle, 1, 0, 4).await, vec![0; 4]);

    server.stop().await;
    assert_eof(&mut idle).await;
    assert_eof(&mut handshaking).await;
}

/// Held (shared) by tests while they start a process, and exclusively by the
/// tests that need every socket they close to be closed at once: a process
/// forked by another test holds copies of this process's descriptors until
/// it executes its program, which would keep a dropped listener accepting.
static FORKS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[tokio::test]
async fn stale_unix_socket_is_replaced_but_live_one_is_not() {
    let _no_forks = FORKS.write().await;
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix:{}", dir.path().join("s.sock").display());
    let first = bind(&addr).await.unwrap();
    assert!(matches!(
        bind(&addr).await,
        Err(NbdError::Bind { source, .. }) if source.kind() == io::ErrorKind::AddrInUse
    ));
    drop(first); // leaves the socket file behind
    let second = bind(&addr).await.unwrap();
    assert_eq!(second.local_addr().unwrap().to_string(), addr);
}

#[tokio::test]
async fn serves_over_tcp() {
    let listener = bind("tcp:127.0.0.1:0").await.unwrap();
    let ListenAddr::Tcp { host, port } = listener.local_addr().unwrap() else {
        panic!("not a TCP listener");
    };
    assert_eq!(host, "127.0.0.1");
    let device = Arc::new(MemDevice::new(1 << 20));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, EXPORT.into(), Arc::clone(&device), stopped));

    let mut c = TcpStream::connect((host.as_str(), port)).await.unwrap();
    let (size, _) = connect(&mut c).await;
    assert_eq!(size, 1 << 20);
    let data = pseudo_random(70_000, 7);
    write_ok(&mut c, 0, 1, 5, &data).await;
    assert_eq!(read_ok(&mut c, 2, 5, 70_000).await, data);
    send_request(&mut c, 0, CMD_DISC, 3, 0, 0).await;
    assert_eof(&mut c).await;

    stop.send(()).unwrap();
    within(task).await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------
// Pure parsing.

#[test]
fn plan_request_validates_everything() {
    let h = |flags, kind, offset, len| RequestHeader {
        flags,
        kind,
        cookie: 9,
        offset,
        len,
    };
    let size = 1 << 20;
    let max = MAX_PAYLOAD;
    let plan = |header| plan_request(&header, size, max);
    assert_eq!(
        plan(h(0, CMD_READ, 0, 512)),
        Plan::Read {
            offset: 0,
            len: 512
        }
    );
    assert_eq!(
        plan(h(CMD_FLAG_FUA, CMD_WRITE, 10, 20)),
        Plan::Write {
            offset: 10,
            len: 20,
            fua: true
        }
    );
    assert_eq!(plan(h(0, CMD_FLUSH, 7, 7)), Plan::Flush);
    assert_eq!(plan(h(0xffff, CMD_DISC, 7, 7)), Plan::Disconnect);
    assert_eq!(
        plan(h(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, size - 1, 1)),
        Plan::WriteZeroes {
            offset: size - 1,
            len: 1,
            fua: false
        }
    );
    let errno = |header| match plan(header) {
        Plan::Reject { errno, .. } => errno,
        other => panic!("not rejected: {other:?}"),
    };
    assert_eq!(errno(h(0, CMD_READ, size, 1)), EINVAL);
    assert_eq!(errno(h(0, CMD_READ, 0, max + 1)), EOVERFLOW);
    assert_eq!(errno(h(0, CMD_WRITE, 0, u32::MAX)), EOVERFLOW);
    assert_eq!(errno(h(0, CMD_WRITE, size, 1)), ENOSPC);
    assert_eq!(errno(h(0, CMD_TRIM, u64::MAX, 2)), EINVAL);
    assert_eq!(errno(h(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 1)), EINVAL);
    assert_eq!(errno(h(1 << 4, CMD_WRITE_ZEROES, 0, 1)), EINVAL);
    assert_eq!(errno(h(0, 99, 0, 0)), EINVAL);
    // Trim and write-zeroes are not limited by the maximum payload.
    assert!(matches!(
        plan_request(&h(0, CMD_TRIM, 0, max + 1), u64::MAX, max),
        Plan::Trim { .. }
    ));
}

#[test]
fn request_header_parsing() {
    let raw: [u8; REQUEST_HEADER_LEN] = request(1, CMD_WRITE, 0x0102, 0x0304, 0x0506)
        .try_into()
        .unwrap();
    let header = RequestHeader::parse(&raw).unwrap();
    assert_eq!(
        header,
        RequestHeader {
            flags: 1,
            kind: CMD_WRITE,
            cookie: 0x0102,
            offset: 0x0304,
            len: 0x0506
        }
    );
    assert_eq!(header.payload_len(), 0x0506);
    let mut bad = raw;
    bad[0] ^= 0xff;
    assert!(RequestHeader::parse(&bad).is_err());
}

#[test]
fn info_request_parsing() {
    let data = info_request("vol", &[1, 3]);
    let parsed = parse_info_request(&data).unwrap();
    assert_eq!(parsed.name, b"vol");
    assert_eq!(parsed.infos, vec![1, 3]);
    assert_eq!(
        parse_info_request(&info_request("", &[])).unwrap().name,
        b""
    );
    let mut extra = info_request("vol", &[1]);
    extra.push(0);
    assert!(parse_info_request(&extra).is_none());
    let mut short = info_request("vol", &[1]);
    short.pop();
    assert!(parse_info_request(&short).is_none());
    assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_none());
    assert!(parse_info_request(&[0, 0, 0]).is_none());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn info_request_parsing_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Some(parsed) = parse_info_request(&data) {
            prop_assert_eq!(data.len(), 4 + parsed.name.len() + 2 + 2 * parsed.infos.len());
        }
    }
}

// ---------------------------------------------------------------------------
// Random request streams.

/// Sends `stream` after a handshake, closes the write side, and collects
/// (error, cookie, data) for every reply until the server closes.
///
/// With `parse == false` the replies are drained without being decoded.
async fn replay(
    device: Arc<MemDevice>,
    stream: Vec<u8>,
    expected: &BTreeMap<u64, RequestHeader>,
    parse: bool,
) -> (Vec<(u32, u64, Vec<u8>)>, Result<Summary, NbdError>) {
    let h = Harness::start(device, Limits::DEFAULT);
    let (mut rd, mut wr) = tokio::io::split(h.client);
    greet_split(&mut rd, &mut wr).await;
    let writer = async move {
        // The server may hang up early (e.g. after a bad magic).
        let _ = wr.write_all(&stream).await;
        let _ = wr.shutdown().await;
    };
    let reader = async {
        let mut replies = Vec::new();
        if !parse {
            let mut sink = Vec::new();
            rd.read_to_end(&mut sink).await.unwrap();
            return replies;
        }
        loop {
            let mut header = [0u8; SIMPLE_REPLY_LEN];
            match rd.read_exact(&mut header).await {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(err) => panic!("reading replies: {err}"),
            }
            let mut hd = &header[..];
            assert_eq!(hd.get_u32(), SIMPLE_REPLY_MAGIC);
            let (error, cookie) = (hd.get_u32(), hd.get_u64());
            let mut data = Vec::new();
            if let Some(req) = expected.get(&cookie)
                && req.kind == CMD_READ
                && error == 0
            {
                data = vec![0u8; req.len as usize];
                rd.read_exact(&mut data).await.unwrap();
            }
            replies.push((error, cookie, data));
        }
        replies
    };
    let ((), replies) = within(async { tokio::join!(writer, reader) }).await;
    let outcome = within(h.server).await.expect("server task panicked");
    (replies, outcome)
}

fn arb_request() -> impl Strategy<Value = (u16, u16, u64, u32)> {
    (
        prop_oneof![
            Just(0u16),
            Just(CMD_FLAG_FUA),
            Just(CMD_FLAG_NO_HOLE),
            any::<u16>()
        ],
        0u16..10,
        prop_oneof![0u64..70_000, any::<u64>()],
        prop_oneof![0u32..20_000, 60_000u32..200_000],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every fully-sent request before a DISC gets exactly one reply with the
    /// error the validation rules predict, and the connection then closes.
    #[test]
    fn random_request_streams_are_answered(requests in proptest::collection::vec(arb_request(), 0..12)) {
        let size = 64 * 1024u64;
        let mut stream = Vec::new();
        let mut expected = BTreeMap::new();
        for (cookie, (flags, kind, offset, len)) in requests.into_iter().enumerate() {
            let header = RequestHeader { flags, kind, cookie: cookie as u64, offset, len };
            stream.extend_from_slice(&request(flags, kind, cookie as u64, offset, len));
            if kind == CMD_DISC {
                break;
            }
            if kind == CMD_WRITE {
                stream.resize(stream.len() + len as usize, 0xab);
            }
            expected.insert(cookie as u64, header);
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let device = Arc::new(MemDevice::new(size as usize));
        let (replies, outcome) = rt.block_on(replay(device, stream, &expected, true));
        prop_assert!(outcome.is_ok(), "{:?}", outcome);
        let mut seen = BTreeMap::new();
        for (error, cookie, data) in replies {
            let header = expected.get(&cookie).copied();
            prop_assert!(header.is_some(), "reply for unknown cookie {}", cookie);
            let header = header.unwrap();
            let want = match plan_request(&header, size, MAX_PAYLOAD) {
                Plan::Reject { errno, .. } => errno,
                _ => 0,
            };
            prop_assert_eq!(error, want, "{:?}", header);
            if header.kind == CMD_READ && error == 0 {
                prop_assert_eq!(data.len(), header.len as usize);
            }
            prop_assert!(seen.insert(cookie, ()).is_none(), "duplicate reply {}", cookie);
        }
        prop_assert_eq!(seen.len(), expected.len());
    }

    /// Arbitrary bytes after the handshake never panic the server or hang it.
    #[test]
    fn garbage_streams_never_panic(prefix_magic in any::<bool>(), garbage in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut stream = Vec::new();
        if prefix_magic {
            stream.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        stream.extend_from_slice(&garbage);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let device = Arc::new(MemDevice::new(64 * 1024));
        // Replies to garbage are not checked, only that the server ends.
        let _ = rt.block_on(replay(device, stream, &BTreeMap::new(), false));
    }
}

// ---------------------------------------------------------------------------
// Real clients. These FAIL (not skip) when a tool is missing.

/// Runs an external tool to completion and returns its stdout, failing the
/// test if it is missing, fails, or hangs.
async fn run_tool(program: &str, apt_package: &str, args: &[&str]) -> String {
    let mut command = tokio::process::Command::new(program);
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let _forking = FORKS.read().await;
    let output = match tokio::time::timeout(TOOL_TIMEOUT, command.output()).await {
        Err(_) => panic!("`{program} {args:?}` did not finish within {TOOL_TIMEOUT:?}"),
        Ok(Err(err)) if err.kind() == io::ErrorKind::NotFound => panic!(
            "`{program}` is not installed; these tests need it: apt-get install {apt_package}"
        ),
        Ok(Err(err)) => panic!("running `{program}`: {err}"),
        Ok(Ok(output)) => output,
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "`{program} {args:?}` failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_flags_and_block_size() {
    let server = SocketServer::start(MemDevice::new(24 << 20)).await;
    let stdout = run_tool("nbdinfo", "libnbd-bin", &["--json", &server.uri()]).await;
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("nbdinfo JSON");
    assert_eq!(json["protocol"], "newstyle-fixed", "{json}");
    let export = &json["exports"][0];
    assert_eq!(export["export-name"], EXPORT, "{json}");
    assert_eq!(export["export-size"], 24 << 20, "{json}");
    for (key, value) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_multi_conn", true),
        ("can_cache", false),
    ] {
        assert_eq!(export[key], value, "{key} in {json}");
    }
    assert_eq!(export["block_size_minimum"], 1, "{json}");
    assert_eq!(export["block_size_preferred"], 4096, "{json}");
    assert_eq!(export["block_size_maximum"], MAX_PAYLOAD, "{json}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_shows_the_export() {
    let server = SocketServer::start(MemDevice::new(1 << 20)).await;
    let uri = format!("nbd+unix:///?socket={}", server.socket.display());
    let stdout = run_tool("nbdinfo", "libnbd-bin", &["--list", "--json", &uri]).await;
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("nbdinfo JSON");
    let exports = json["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{json}");
    assert_eq!(exports[0]["export-name"], EXPORT, "{json}");
    assert_eq!(exports[0]["export-size"], 1 << 20, "{json}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdcopy_round_trips_random_data() {
    const SIZE: usize = 16 << 20;
    let server = SocketServer::start(MemDevice::new(SIZE)).await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.img");
    let output = dir.path().join("out.img");
    let data = pseudo_random(SIZE, 0x5eed);
    std::fs::write(&input, &data).unwrap();

    let uri = server.uri();
    // nbdcopy uses several connections when CAN_MULTI_CONN is advertised.
    run_tool("nbdcopy", "libnbd-bin", &[input.to_str().unwrap(), &uri]).await;
    run_tool(
        "nbdcopy",
        "libnbd-bin",
        &["--flush", &uri, output.to_str().unwrap()],
    )
    .await;

    let device = server.stop().await;
    assert!(
        device.snapshot() == data,
        "device contents differ from the input"
    );
    assert!(
        std::fs::read(&output).unwrap() == data,
        "copied-out file differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_img_convert_and_compare() {
    const SIZE: usize = 8 << 20;
    let server = SocketServer::start(MemDevice::new(SIZE)).await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.img");
    let output = dir.path().join("out.img");
    let mut data = pseudo_random(SIZE, 0xface);
    // Some zero runs, so qemu-img exercises write-zeroes/trim paths too.
    data[1 << 20..2 << 20].fill(0);
    data[5 << 20..(5 << 20) + 12345].fill(0);
    std::fs::write(&input, &data).unwrap();
    // Pre-fill the device so zero ranges must really be written.
    server.device.fill(0, SIZE as u64, 0x77).unwrap();

    let uri = server.uri();
    let input = input.to_str().unwrap();
    let output = output.to_str().unwrap();
    run_tool(
        "qemu-img",
        "qemu-utils",
        &["convert", "-n", "-f", "raw", "-O", "raw", input, &uri],
    )
    .await;
    run_tool(
        "qemu-img",
        "qemu-utils",
        &["compare", "-f", "raw", "-F", "raw", input, &uri],
    )
    .await;
    run_tool(
        "qemu-img",
        "qemu-utils",
        &["convert", "-f", "raw", "-O", "raw", &uri, output],
    )
    .await;

    let device = server.stop().await;
    assert!(
        device.snapshot() == data,
        "device contents differ from the input"
    );
    assert!(
        std::fs::read(output).unwrap() == data,
        "converted-out file differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_verifies_a_pattern() {
    let server = SocketServer::start(MemDevice::new(1 << 20)).await;
    let uri = server.uri();
    let stdout = run_tool(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -z 4k 4k",
            "-c",
            "read -P 0 4k 4k",
            "-c",
            "flush",
            &uri,
        ],
    )
    .await;
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
    assert!(stdout.contains("wrote 65536/65536 bytes"), "{stdout}");
    assert!(stdout.contains("read 65536/65536 bytes"), "{stdout}");
    let device = server.stop().await;
    let contents = device.snapshot();
    assert!(contents[..4096].iter().all(|b| *b == 0xab));
    assert!(contents[4096..8192].iter().all(|b| *b == 0));
    assert!(contents[8192..65536].iter().all(|b| *b == 0xab));
    assert!(contents[65536..].iter().all(|b| *b == 0));
    assert!(device.flushes.load(Ordering::SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fio_random_writes_verify() {
    let server = SocketServer::start(MemDevice::new(8 << 20)).await;
    let uri = format!("--uri={}", server.uri());
    let stdout = run_tool(
        "fio",
        "fio",
        &[
            "--name=zebu-nbd",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=4m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randseed=42",
        ],
    )
    .await;
    assert!(stdout.contains("err= 0"), "{stdout}");
    let device = server.stop().await;
    let written = device.snapshot()[..4 << 20]
        .chunks(4096)
        .filter(|block| block.iter().any(|b| *b != 0))
        .count();
    // Every 4 KiB block of the 4 MiB region was written (random data + header).
    assert_eq!(written, 1024);
}
