//! Connecting to an export: opening its socket and the fixed newstyle
//! handshake ending with `NBD_OPT_GO`, which tells the export's size and
//! flags ([`ExportInfo`]); [`probe`] does only that.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;
use zebu_nbd::{
    CMD_DISC, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES,
    IHAVEOPT, INFO_EXPORT, NBD_MAGIC, OPT_ABORT, OPT_GO, OPTION_REPLY_MAGIC, REP_ACK,
    REP_FLAG_ERROR, REP_INFO,
};

use super::uri::{NbdAddress, NbdUri};
use super::{
    NbdError, Result, TFLAG_CAN_MULTI_CONN, TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH,
    TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES, io_err, put_header,
};

/// Longest option reply payload accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// What the handshake told about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
}

impl ExportInfo {
    fn has(&self, flag: u16) -> bool {
        self.flags & TFLAG_HAS_FLAGS != 0 && self.flags & flag != 0
    }

    /// Whether the export is read-only.
    pub fn read_only(&self) -> bool {
        self.has(TFLAG_READ_ONLY)
    }

    /// Whether FLUSH may be sent.
    pub fn can_flush(&self) -> bool {
        self.has(TFLAG_SEND_FLUSH)
    }

    /// Whether TRIM may be sent.
    pub fn can_trim(&self) -> bool {
        self.has(TFLAG_SEND_TRIM)
    }

    /// Whether WRITE_ZEROES may be sent.
    pub fn can_write_zeroes(&self) -> bool {
        self.has(TFLAG_SEND_WRITE_ZEROES)
    }

    /// Whether several connections may be used.
    pub fn can_multi_conn(&self) -> bool {
        self.has(TFLAG_CAN_MULTI_CONN)
    }
}

pub(super) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(super) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

pub(super) async fn open_socket(address: &NbdAddress) -> Result<(BoxRead, BoxWrite)> {
    let connect_err = |source| NbdError::Connect {
        address: address.to_string(),
        source,
    };
    match address {
        NbdAddress::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(connect_err)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        NbdAddress::Tcp { host, port } => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(connect_err)?;
            // Small requests must not wait for Nagle.
            s.set_nodelay(true).map_err(connect_err)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

fn rep_name(rep: u32) -> String {
    match rep {
        0x8000_0001 => "NBD_REP_ERR_UNSUP".into(),
        0x8000_0002 => "NBD_REP_ERR_POLICY".into(),
        0x8000_0003 => "NBD_REP_ERR_INVALID".into(),
        0x8000_0004 => "NBD_REP_ERR_PLATFORM".into(),
        0x8000_0005 => "NBD_REP_ERR_TLS_REQD".into(),
        0x8000_0006 => "NBD_REP_ERR_UNKNOWN".into(),
        0x8000_0007 => "NBD_REP_ERR_SHUTDOWN".into(),
        0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
        0x8000_0009 => "NBD_REP_ERR_TOO_BIG".into(),
        other => format!("reply {other:#x}"),
    }
}

/// Fixed newstyle handshake ending with `NBD_OPT_GO`.
pub(super) async fn handshake(
    r: &mut BoxRead,
    w: &mut BoxWrite,
    export: &str,
) -> Result<ExportInfo> {
    let magic = r
        .read_u64()
        .await
        .map_err(io_err("reading the NBD greeting"))?;
    let opt_magic = r
        .read_u64()
        .await
        .map_err(io_err("reading the NBD greeting"))?;
    if magic != NBD_MAGIC {
        return Err(NbdError::Protocol(format!(
            "bad greeting magic {magic:#x} (not an NBD server?)"
        )));
    }
    if opt_magic != IHAVEOPT {
        return Err(NbdError::Protocol(
            "the server does not speak the newstyle protocol".into(),
        ));
    }
    let hflags = r
        .read_u16()
        .await
        .map_err(io_err("reading the NBD greeting"))?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol(
            "the server does not support fixed newstyle negotiation".into(),
        ));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    let name = export.as_bytes();
    let name_len = u32::try_from(name.len())
        .ok()
        .filter(|&l| l <= 4096)
        .ok_or_else(|| NbdError::Protocol("export name longer than 4096 bytes".into()))?;
    let mut msg = BytesMut::with_capacity(32 + name.len());
    msg.put_u32(cflags);
    msg.put_u64(IHAVEOPT);
    msg.put_u32(OPT_GO);
    msg.put_u32(4 + name_len + 2);
    msg.put_u32(name_len);
    msg.put_slice(name);
    msg.put_u16(0); // no information requests
    w.write_all(&msg)
        .await
        .map_err(io_err("sending NBD_OPT_GO"))?;
    w.flush().await.map_err(io_err("sending NBD_OPT_GO"))?;

    let mut info = None;
    loop {
        let ctx = "reading the reply to NBD_OPT_GO";
        let magic = r.read_u64().await.map_err(io_err(ctx))?;
        let opt = r.read_u32().await.map_err(io_err(ctx))?;
        let rep = r.read_u32().await.map_err(io_err(ctx))?;
        let len = r.read_u32().await.map_err(io_err(ctx))?;
        if magic != OPTION_REPLY_MAGIC || opt != OPT_GO {
            return Err(NbdError::Protocol(format!(
                "bad option reply (magic {magic:#x}, option {opt})"
            )));
        }
        if len > MAX_OPTION_REPLY {
            return Err(NbdError::Protocol(format!(
                "option reply of {len} bytes is too long"
            )));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await.map_err(io_err(ctx))?;
        match rep {
            REP_ACK => break,
            REP_INFO => {
                if data.len() >= 2 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                    if data.len() != 12 {
                        return Err(NbdError::Protocol(format!(
                            "NBD_INFO_EXPORT of {} bytes",
                            data.len()
                        )));
                    }
                    let mut size = [0u8; 8];
                    size.copy_from_slice(&data[2..10]);
                    info = Some(ExportInfo {
                        size: u64::from_be_bytes(size),
                        flags: u16::from_be_bytes([data[10], data[11]]),
                    });
                }
                // Other information (block size, name, description) is not needed.
            }
            rep if rep & REP_FLAG_ERROR != 0 => {
                // Tell the server we give up; best effort.
                let mut abort = BytesMut::with_capacity(16);
                abort.put_u64(IHAVEOPT);
                abort.put_u32(OPT_ABORT);
                abort.put_u32(0);
                let _ = w.write_all(&abort).await;
                return Err(NbdError::Refused {
                    export: export.to_owned(),
                    reply: rep_name(rep),
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            other => debug!("ignoring option reply {other:#x} to NBD_OPT_GO"),
        }
    }
    info.ok_or_else(|| {
        NbdError::Protocol("the server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT".into())
    })
}

/// Connects to `uri`, runs the handshake, disconnects, and returns what the
/// server said about the export (its current size).
pub async fn probe(uri: &NbdUri) -> Result<ExportInfo> {
    let (mut r, mut w) = open_socket(&uri.address).await?;
    let info = handshake(&mut r, &mut w, &uri.export).await?;
    let mut disc = BytesMut::with_capacity(28);
    put_header(&mut disc, 0, CMD_DISC, 0, 0, 0);
    // Best effort: the server closes its side either way.
    let _ = w.write_all(&disc).await;
    let _ = w.shutdown().await;
    Ok(info)
}
