//! The fixed-newstyle handshake: options (`GO`, `INFO`, `LIST`,
//! `EXPORT_NAME`, `ABORT`), the export's information, option replies.

use super::*;

// ---------------------------------------------------------------------------
// Handshake.

/// What the client is given access to, fixed at handshake time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Export {
    /// Size advertised to the client; requests are validated against it.
    pub(super) size: u64,
    /// Transmission flags.
    pub(super) flags: u16,
    /// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
    pub(super) preferred_block: u32,
}

impl Export {
    /// Reads the device's current size and capabilities.
    pub(super) fn describe<D: BlockDevice>(device: &D) -> Export {
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES;
        if device.multi_conn_safe() {
            flags |= TFLAG_CAN_MULTI_CONN;
        }
        // NBD wants a power of two; clients expect at least 512.
        let block = device.block_size();
        let preferred_block = if block.is_power_of_two() && block <= MAX_PAYLOAD {
            block.max(512)
        } else {
            warn!(
                block_size = block,
                "device block size is not a usable power of two; advertising 4096"
            );
            FALLBACK_BLOCK_SIZE
        };
        Export {
            size: device.size(),
            flags,
            preferred_block,
        }
    }
}

/// Result of option haggling.
pub(super) enum Handshake {
    /// Enter the transmission phase with this export.
    Transmission(Export),
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
}

/// True if `requested` names our export (the empty name is the default).
pub(super) fn export_matches(requested: &[u8], export_name: &str) -> bool {
    requested.is_empty() || requested == export_name.as_bytes()
}

/// Buffers one fixed-newstyle option reply.
pub(super) async fn option_reply<W: AsyncWrite + Unpin>(
    writer: &mut W,
    option: u32,
    reply: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let len = u32::try_from(data.len())
        .map_err(|_| NbdError::Internal("option reply longer than 4 GiB"))?;
    let mut header = [0u8; 20];
    let mut out = &mut header[..];
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(len);
    writer
        .write_all(&header)
        .await
        .map_err(io_error("sending an option reply"))?;
    writer
        .write_all(data)
        .await
        .map_err(io_error("sending an option reply"))
}

/// Sends the `NBD_REP_INFO` replies for `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub(super) async fn send_export_info<W: AsyncWrite + Unpin>(
    writer: &mut W,
    option: u32,
    export_name: &str,
    export: &Export,
    requested: &[u16],
) -> Result<(), NbdError> {
    let mut info = Vec::with_capacity(12);
    info.put_u16(INFO_EXPORT);
    info.put_u64(export.size);
    info.put_u16(export.flags);
    option_reply(writer, option, REP_INFO, &info).await?;

    if requested.contains(&INFO_NAME) {
        let mut info = Vec::with_capacity(2 + export_name.len());
        info.put_u16(INFO_NAME);
        info.put_slice(export_name.as_bytes());
        option_reply(writer, option, REP_INFO, &info).await?;
    }
    if requested.contains(&INFO_DESCRIPTION) {
        let mut info = Vec::with_capacity(2 + DESCRIPTION.len());
        info.put_u16(INFO_DESCRIPTION);
        info.put_slice(DESCRIPTION.as_bytes());
        option_reply(writer, option, REP_INFO, &info).await?;
    }
    // Always sent: any byte alignment works, so it only carries hints and the
    // payload cap.
    let mut info = Vec::with_capacity(14);
    info.put_u16(INFO_BLOCK_SIZE);
    info.put_u32(1);
    info.put_u32(export.preferred_block);
    info.put_u32(MAX_PAYLOAD);
    option_reply(writer, option, REP_INFO, &info).await
}

/// Runs the fixed-newstyle handshake up to the transmission phase.
pub(super) async fn handshake<D, R, W>(
    device: &D,
    export_name: &str,
    reader: &mut BufReader<R>,
    writer: &mut BufWriter<W>,
) -> Result<Handshake, NbdError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    let mut out = &mut greeting[..];
    out.put_u64(NBD_MAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    writer
        .write_all(&greeting)
        .await
        .map_err(io_error("sending the NBD greeting"))?;
    writer
        .flush()
        .await
        .map_err(io_error("sending the NBD greeting"))?;

    let client_flags = reader
        .read_u32()
        .await
        .map_err(io_error("reading client flags"))?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol(
            "client does not support fixed newstyle negotiation".to_owned(),
        ));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    loop {
        let mut header = [0u8; 16];
        reader
            .read_exact(&mut header)
            .await
            .map_err(io_error("reading an option header"))?;
        let mut fields = &header[..];
        let magic = fields.get_u64();
        let option = fields.get_u32();
        let len = fields.get_u32();
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!(
                "bad option magic {magic:#018x}"
            )));
        }
        debug!(option, len, "NBD option");
        if len > MAX_OPTION_LEN {
            if option == OPT_EXPORT_NAME {
                // This option cannot be answered with an error.
                return Err(NbdError::Protocol(format!(
                    "NBD_OPT_EXPORT_NAME with a {len}-byte name"
                )));
            }
            discard(reader, len, "skipping oversized option data").await?;
            option_reply(writer, option, REP_ERR_TOO_BIG, b"option data too long").await?;
            writer
                .flush()
                .await
                .map_err(io_error("sending an option reply"))?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        reader
            .read_exact(&mut data)
            .await
            .map_err(io_error("reading option data"))?;

        let done = match option {
            OPT_EXPORT_NAME => {
                if !export_matches(&data, export_name) {
                    return Err(NbdError::UnknownExport(
                        String::from_utf8_lossy(&data).into_owned(),
                    ));
                }
                let export = Export::describe(device);
                let mut reply = Vec::with_capacity(10 + 124);
                reply.put_u64(export.size);
                reply.put_u16(export.flags);
                if !no_zeroes {
                    reply.put_bytes(0, 124);
                }
                writer
                    .write_all(&reply)
                    .await
                    .map_err(io_error("sending the export description"))?;
                Some(Handshake::Transmission(export))
            }
            OPT_ABORT => {
                // The client may close without waiting for the ACK.
                if option_reply(writer, option, REP_ACK, &[]).await.is_ok() {
                    let _ = writer.flush().await;
                }
                return Ok(Handshake::Aborted);
            }
            OPT_LIST => {
                if data.is_empty() {
                    let mut server = Vec::with_capacity(4 + export_name.len());
                    server.put_u32(u32::try_from(export_name.len()).unwrap_or(u32::MAX));
                    server.put_slice(export_name.as_bytes());
                    option_reply(writer, option, REP_SERVER, &server).await?;
                    option_reply(writer, option, REP_ACK, &[]).await?;
                } else {
                    option_reply(
                        writer,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    )
                    .await?;
                }
                None
            }
            OPT_INFO | OPT_GO => match zebu_nbd::parse_info_request(&data) {
                None => {
                    option_reply(
                        writer,
                        option,
                        REP_ERR_INVALID,
                        b"malformed NBD_OPT_INFO/NBD_OPT_GO request",
                    )
                    .await?;
                    None
                }
                Some(request) if !export_matches(request.name, export_name) => {
                    let message = format!(
                        "unknown export {:?}; this server exports {export_name:?}",
                        String::from_utf8_lossy(request.name)
                    );
                    option_reply(writer, option, REP_ERR_UNKNOWN, message.as_bytes()).await?;
                    None
                }
                Some(request) => {
                    let export = Export::describe(device);
                    send_export_info(writer, option, export_name, &export, &request.infos).await?;
                    option_reply(writer, option, REP_ACK, &[]).await?;
                    (option == OPT_GO).then_some(Handshake::Transmission(export))
                }
            },
            OPT_STRUCTURED_REPLY => {
                let message = b"structured replies are not supported";
                option_reply(writer, option, REP_ERR_UNSUP, message).await?;
                None
            }
            OPT_STARTTLS => {
                option_reply(writer, option, REP_ERR_UNSUP, b"TLS is not supported").await?;
                None
            }
            _ => {
                option_reply(writer, option, REP_ERR_UNSUP, b"option not supported").await?;
                None
            }
        };
        writer
            .flush()
            .await
            .map_err(io_error("sending an option reply"))?;
        if let Some(done) = done {
            return Ok(done);
        }
    }
}

/// Consumes and drops exactly `len` bytes.
pub(super) async fn discard<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    len: u32,
    context: &'static str,
) -> Result<(), NbdError> {
    if len == 0 {
        return Ok(());
    }
    let mut limited = reader.take(u64::from(len));
    let skipped = tokio::io::copy_buf(&mut limited, &mut tokio::io::sink())
        .await
        .map_err(io_error(context))?;
    if skipped < u64::from(len) {
        return Err(NbdError::Io {
            context,
            source: io::ErrorKind::UnexpectedEof.into(),
        });
    }
    Ok(())
}
