//! The transmission phase: requests read and validated, run on the device
//! concurrently within the in-flight limits, replies written in completion
//! order.

use super::*;

// ---------------------------------------------------------------------------
// Transmission.

/// A validated request, ready for the device.
pub(super) enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// Answer with this error without touching the device.
    Fail(u32),
}

/// A request travelling from the reader to the executor.
pub(super) struct Job {
    cookie: u64,
    op: Op,
    /// Flow-control budget, released once the reply has been written.
    permit: OwnedSemaphorePermit,
}

/// A reply travelling from the executor to the writer.
pub(super) struct Reply {
    cookie: u64,
    /// NBD error value (0 = success).
    error: u32,
    /// Read data (successful reads only).
    data: Option<Bytes>,
    /// Released when the reply has been written (or dropped).
    _permit: OwnedSemaphorePermit,
}

/// What the reader got from the stream.
pub(super) enum Next {
    Job(Job),
    Disconnect,
    Eof,
}

/// Runs the transmission phase: reader, executor and writer side by side in
/// the current task.
pub(super) async fn transmission<D, R, W>(
    device: &D,
    export: &Export,
    mut reader: BufReader<R>,
    writer: BufWriter<W>,
    shutdown: watch::Receiver<bool>,
    limits: Limits,
) -> Result<Summary, NbdError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let budget = Arc::new(Semaphore::new(limits.budget_bytes.max(1) as usize));
    let (job_tx, job_rx) = mpsc::channel(limits.max_in_flight.max(1) as usize);
    let (reply_tx, reply_rx) = mpsc::unbounded_channel();
    let writer_failed = Notify::new();
    let (read_result, (), write_result) = tokio::join!(
        read_requests(
            &mut reader,
            export,
            job_tx,
            &budget,
            limits,
            shutdown,
            &writer_failed
        ),
        execute_requests(device, job_rx, reply_tx),
        write_replies(writer, reply_rx, &writer_failed),
    );
    let summary = read_result?;
    write_result?;
    Ok(summary)
}

/// Reads requests and hands them to the executor until the client leaves,
/// the stream breaks, the writer fails or the server shuts down.
pub(super) async fn read_requests<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    export: &Export,
    jobs: mpsc::Sender<Job>,
    budget: &Arc<Semaphore>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    writer_failed: &Notify,
) -> Result<Summary, NbdError> {
    let mut requests = 0;
    let end = loop {
        // A request abandoned half-read here is never answered, which is
        // fine: the connection is going away.
        let next = tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => break End::Shutdown,
            () = writer_failed.notified() => break End::WriterFailed,
            next = read_request(reader, export, budget, limits) => next?,
        };
        match next {
            Next::Job(job) => {
                requests += 1;
                // The channel has room for every budgeted request, and the
                // executor only stops once this sender is gone.
                if jobs.send(job).await.is_err() {
                    return Err(NbdError::Internal("request executor stopped early"));
                }
            }
            Next::Disconnect => break End::Disconnect,
            Next::Eof => break End::Eof,
        }
    };
    Ok(Summary { requests, end })
}

/// Reads one request (header and payload) and validates it.
pub(super) async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    export: &Export,
    budget: &Arc<Semaphore>,
    limits: Limits,
) -> Result<Next, NbdError> {
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    if !read_header(reader, &mut raw).await? {
        return Ok(Next::Eof);
    }
    let header = RequestHeader::parse(&raw)
        .map_err(|magic| NbdError::Protocol(format!("bad request magic {magic:#010x}")))?;
    let plan = zebu_nbd::plan_request(&header, export.size, MAX_PAYLOAD);
    let payload = match plan {
        Plan::Disconnect => return Ok(Next::Disconnect),
        Plan::Read { len, .. } | Plan::Write { len, .. } => len,
        _ => 0,
    };
    let permit = Arc::clone(budget)
        .acquire_many_owned(limits.cost(payload))
        .await
        .map_err(|_| NbdError::Internal("request budget semaphore closed"))?;
    let op = match plan {
        Plan::Read { offset, len } => Op::Read { offset, len },
        Plan::Write { offset, len, fua } => Op::Write {
            offset,
            data: read_payload(reader, len).await?,
            fua,
        },
        Plan::Flush => Op::Flush,
        Plan::Trim { offset, len, fua } => Op::Trim { offset, len, fua },
        Plan::WriteZeroes { offset, len, fua } => Op::WriteZeroes { offset, len, fua },
        Plan::Reject { errno, reason } => {
            debug!(
                cookie = header.cookie,
                command = header.kind,
                flags = header.flags,
                offset = header.offset,
                len = header.len,
                errno,
                reason,
                "rejecting NBD request"
            );
            discard(
                reader,
                header.payload_len(),
                "skipping the payload of a rejected write",
            )
            .await?;
            Op::Fail(errno)
        }
        Plan::Disconnect => return Ok(Next::Disconnect),
    };
    Ok(Next::Job(Job {
        cookie: header.cookie,
        op,
        permit,
    }))
}

/// Reads a request header; `Ok(false)` on a clean end of stream before it.
pub(super) async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8; REQUEST_HEADER_LEN],
) -> Result<bool, NbdError> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader
            .read(&mut buf[filled..])
            .await
            .map_err(io_error("reading a request header"))?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(NbdError::Io {
                context: "reading a request header",
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
        filled += n;
    }
    Ok(true)
}

/// Reads exactly `len` payload bytes into one buffer, without zero-filling
/// or copying it.
pub(super) async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    len: u32,
) -> Result<Bytes, NbdError> {
    let len = len as usize;
    let mut buf = BytesMut::with_capacity(len);
    let mut limited = reader.take(len as u64);
    while buf.len() < len {
        let n = limited
            .read_buf(&mut buf)
            .await
            .map_err(io_error("reading a write payload"))?;
        if n == 0 {
            return Err(NbdError::Io {
                context: "reading a write payload",
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
    }
    Ok(buf.freeze())
}

/// Drives all in-flight requests concurrently and forwards their replies to
/// the writer as they complete. Ends when the reader has stopped and every
/// request it handed over has completed.
pub(super) async fn execute_requests<D: BlockDevice>(
    device: &D,
    mut jobs: mpsc::Receiver<Job>,
    replies: mpsc::UnboundedSender<Reply>,
) {
    let mut in_flight = FuturesUnordered::new();
    let mut reader_open = true;
    loop {
        tokio::select! {
            job = jobs.recv(), if reader_open => match job {
                Some(job) => in_flight.push(execute(device, job)),
                None => reader_open = false,
            },
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                // The writer keeps receiving until this sender is dropped.
                let _ = replies.send(reply);
            }
            else => break,
        }
    }
}

/// Logs a failed device operation and maps it to an NBD error value.
pub(super) fn device_failed(
    err: &DeviceError,
    operation: &'static str,
    offset: u64,
    len: u64,
    writing: bool,
) -> u32 {
    let errno = device_errno(err, writing);
    warn!(operation, offset, len, errno, error = %err, "NBD request failed");
    errno
}

/// Runs one request against the device.
pub(super) async fn execute<D: BlockDevice>(device: &D, job: Job) -> Reply {
    let Job { cookie, op, permit } = job;
    let outcome: Result<Option<Bytes>, u32> = match op {
        Op::Fail(errno) => Err(errno),
        Op::Read { len: 0, .. } => Ok(None),
        Op::Read { offset, len } => match device.read(offset, len).await {
            Ok(data) if data.len() == len as usize => Ok(Some(data)),
            Ok(data) => {
                warn!(
                    offset,
                    len,
                    returned = data.len(),
                    "device returned a read of the wrong length"
                );
                Err(zebu_nbd::EIO)
            }
            Err(err) => Err(device_failed(&err, "read", offset, len.into(), false)),
        },
        Op::Write { data, .. } if data.is_empty() => Ok(None),
        Op::Write { offset, data, fua } => {
            let len = data.len() as u64;
            match device.write(offset, data, fua).await {
                Ok(()) => Ok(None),
                Err(err) => Err(device_failed(&err, "write", offset, len, true)),
            }
        }
        Op::Flush => match device.flush().await {
            Ok(()) => Ok(None),
            Err(err) => Err(device_failed(&err, "flush", 0, 0, true)),
        },
        Op::Trim { len: 0, .. } => Ok(None),
        Op::Trim { offset, len, fua } => match device.trim(offset, len).await {
            Ok(()) if fua => match device.flush().await {
                Ok(()) => Ok(None),
                Err(err) => Err(device_failed(
                    &err,
                    "flush after trim",
                    offset,
                    len.into(),
                    true,
                )),
            },
            Ok(()) => Ok(None),
            // Trim is advisory: a device that cannot discard simply keeps the data.
            Err(DeviceError::Unsupported(_)) => Ok(None),
            Err(err) => Err(device_failed(&err, "trim", offset, len.into(), false)),
        },
        Op::WriteZeroes { len: 0, .. } => Ok(None),
        Op::WriteZeroes { offset, len, fua } => match device.write_zeroes(offset, len, fua).await {
            Ok(()) => Ok(None),
            Err(err) => Err(device_failed(
                &err,
                "write zeroes",
                offset,
                len.into(),
                true,
            )),
        },
    };
    let (error, data) = match outcome {
        Ok(data) => (0, data),
        Err(errno) => (errno, None),
    };
    Reply {
        cookie,
        error,
        data,
        _permit: permit,
    }
}

/// Writes replies in the order they complete, flushing once per batch of
/// ready replies. After a write error, keeps draining (and dropping) replies
/// so in-flight requests can finish, then reports the error.
pub(super) async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: BufWriter<W>,
    mut replies: mpsc::UnboundedReceiver<Reply>,
    writer_failed: &Notify,
) -> Result<(), NbdError> {
    let mut failure = None;
    while let Some(reply) = replies.recv().await {
        if failure.is_some() {
            continue;
        }
        let mut result = write_reply(&mut writer, reply).await;
        while result.is_ok() {
            match replies.try_recv() {
                Ok(reply) => result = write_reply(&mut writer, reply).await,
                Err(_) => break,
            }
        }
        if result.is_ok() {
            result = writer.flush().await;
        }
        if let Err(source) = result {
            writer_failed.notify_one();
            failure = Some(NbdError::Io {
                context: "writing replies",
                source,
            });
        }
    }
    if let Some(err) = failure {
        return Err(err);
    }
    // Every reply is out; close our side. The client may already be gone.
    if let Err(err) = writer.shutdown().await {
        debug!(error = %err, "closing the NBD connection");
    }
    Ok(())
}

/// Buffers one simple reply; read data goes out in the same vectored write as
/// its header.
pub(super) async fn write_reply<W: AsyncWrite + Unpin>(
    writer: &mut BufWriter<W>,
    reply: Reply,
) -> io::Result<()> {
    let header = zebu_nbd::simple_reply_header(reply.error, reply.cookie);
    match reply.data {
        Some(data) if !data.is_empty() => {
            let mut buf = Buf::chain(&header[..], data);
            writer.write_all_buf(&mut buf).await
        }
        _ => writer.write_all(&header).await,
    }
}

/// Maps a device error to an NBD error value. `writing` selects `zebu_nbd::ENOSPC`
/// rather than `zebu_nbd::EINVAL` for out-of-range errors, as the spec recommends.
pub(super) fn device_errno(err: &DeviceError, writing: bool) -> u32 {
    match err {
        DeviceError::Io(_) => zebu_nbd::EIO,
        DeviceError::NoSpace => zebu_nbd::ENOSPC,
        DeviceError::Invalid(_) => zebu_nbd::EINVAL,
        DeviceError::OutOfRange { .. } if writing => zebu_nbd::ENOSPC,
        DeviceError::OutOfRange { .. } => zebu_nbd::EINVAL,
        DeviceError::ReadOnly => zebu_nbd::EPERM,
        DeviceError::Unsupported(_) => zebu_nbd::ENOTSUP,
        DeviceError::ShuttingDown => zebu_nbd::ESHUTDOWN,
    }
}
