//! NBD wire constants and pure (I/O-free) parsing and validation helpers.
//!
//! Values follow the NBD protocol specification (`doc/proto.md` of the
//! reference implementation). All integers on the wire are big-endian.
//! Nothing in here panics on any input.

use bytes::Buf;

use crate::frontend::DeviceError;

// ---------------------------------------------------------------------------
// Magic numbers.

/// `"NBDMAGIC"`, first thing the server sends.
pub(super) const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`, sent by the server after [`NBD_MAGIC`] (newstyle) and by the
/// client before every option.
pub(super) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub(super) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission-phase request.
pub(super) const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub(super) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// ---------------------------------------------------------------------------
// Handshake flags (server → client, 16 bits) and client flags (32 bits).

/// Server supports fixed newstyle negotiation.
pub(super) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub(super) const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client speaks fixed newstyle.
pub(super) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client does not want the 124 zero bytes.
pub(super) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------
// Transmission flags (16 bits).

/// Always set.
pub(super) const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
#[cfg(test)]
pub(super) const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub(super) const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub(super) const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_CMD_TRIM` is supported.
pub(super) const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` is supported.
pub(super) const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Flush/FUA effects are visible across all connections.
pub(super) const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// ---------------------------------------------------------------------------
// Options.

/// Select an export and enter transmission (no error reply possible).
pub(super) const OPT_EXPORT_NAME: u32 = 1;
/// Client aborts negotiation.
pub(super) const OPT_ABORT: u32 = 2;
/// List exports.
pub(super) const OPT_LIST: u32 = 3;
/// Upgrade to TLS (unsupported).
pub(super) const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub(super) const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub(super) const OPT_GO: u32 = 7;
/// Negotiate structured replies (unsupported).
pub(super) const OPT_STRUCTURED_REPLY: u32 = 8;

// ---------------------------------------------------------------------------
// Option reply types.

/// Option accepted / list finished.
pub(super) const REP_ACK: u32 = 1;
/// One export in an `NBD_OPT_LIST` answer.
pub(super) const REP_SERVER: u32 = 2;
/// One piece of export information.
pub(super) const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option not supported by this server.
pub(super) const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option syntactically invalid.
pub(super) const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Unknown export.
pub(super) const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option data too large.
pub(super) const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// ---------------------------------------------------------------------------
// Information types (NBD_OPT_INFO / NBD_OPT_GO).

/// Size and transmission flags.
pub(super) const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub(super) const INFO_NAME: u16 = 1;
/// Human-readable description.
pub(super) const INFO_DESCRIPTION: u16 = 2;
/// Minimum / preferred / maximum block sizes.
pub(super) const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Commands and command flags.

/// Read.
pub(super) const CMD_READ: u16 = 0;
/// Write (followed by `length` bytes of payload).
pub(super) const CMD_WRITE: u16 = 1;
/// Disconnect (no reply).
pub(super) const CMD_DISC: u16 = 2;
/// Flush.
pub(super) const CMD_FLUSH: u16 = 3;
/// Trim / discard.
pub(super) const CMD_TRIM: u16 = 4;
/// Cache (not advertised).
#[cfg(test)]
pub(super) const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub(super) const CMD_WRITE_ZEROES: u16 = 6;

/// Force unit access.
pub(super) const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes must not punch a hole.
pub(super) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Don't fragment (structured replies only; not advertised).
#[cfg(test)]
pub(super) const CMD_FLAG_DF: u16 = 1 << 2;

// ---------------------------------------------------------------------------
// Error values of the transmission phase.

/// Operation not permitted.
pub(super) const EPERM: u32 = 1;
/// Input/output error.
pub(super) const EIO: u32 = 5;
/// Invalid argument.
pub(super) const EINVAL: u32 = 22;
/// No space left on device.
pub(super) const ENOSPC: u32 = 28;
/// Value too large.
pub(super) const EOVERFLOW: u32 = 75;
/// Operation not supported.
pub(super) const ENOTSUP: u32 = 95;
/// Server is shutting down.
pub(super) const ESHUTDOWN: u32 = 108;

/// Size of a request header on the wire.
pub(super) const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header on the wire.
pub(super) const SIMPLE_REPLY_LEN: usize = 16;

/// A decoded transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque client cookie ("handle"), echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (also the payload length of a write).
    pub len: u32,
}

impl RequestHeader {
    /// Decodes a header; `Err` carries the bad magic number.
    pub(super) fn parse(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, u32> {
        // `Buf` reads on a fixed 28-byte array cannot run short.
        let mut b = &buf[..];
        let magic = b.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(RequestHeader {
            flags: b.get_u16(),
            kind: b.get_u16(),
            cookie: b.get_u64(),
            offset: b.get_u64(),
            len: b.get_u32(),
        })
    }

    /// Number of payload bytes that follow this header on the wire, whether or
    /// not the request is valid.
    pub(super) fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE { self.len } else { 0 }
    }
}

/// What to do with a request, decided from its header alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    /// Read `len` bytes at `offset`.
    Read { offset: u64, len: u32 },
    /// Read the payload and write it at `offset`.
    Write { offset: u64, len: u32, fua: bool },
    /// Flush.
    Flush,
    /// Trim, then flush if `fua`.
    Trim { offset: u64, len: u32, fua: bool },
    /// Write zeroes.
    WriteZeroes { offset: u64, len: u32, fua: bool },
    /// Client disconnect.
    Disconnect,
    /// Reply with `errno` without touching the device (the payload of a
    /// rejected write must still be consumed).
    Reject { errno: u32, reason: &'static str },
}

/// Validates a request against the advertised export size and the maximum
/// payload, and decides what to do with it.
pub(super) fn plan_request(h: &RequestHeader, export_size: u64, max_payload: u32) -> Plan {
    let allowed_flags = match h.kind {
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_DISC => return Plan::Disconnect,
        _ => {
            return Plan::Reject {
                errno: EINVAL,
                reason: "unknown command",
            };
        }
    };
    if h.flags & !allowed_flags != 0 {
        return Plan::Reject {
            errno: EINVAL,
            reason: "unsupported command flags",
        };
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let in_range = h
        .offset
        .checked_add(u64::from(h.len))
        .is_some_and(|end| end <= export_size);
    let (offset, len) = (h.offset, h.len);
    match h.kind {
        CMD_READ | CMD_WRITE if len > max_payload => Plan::Reject {
            errno: EOVERFLOW,
            reason: "request larger than the maximum payload",
        },
        // The spec asks for ENOSPC on writes beyond the end, EINVAL otherwise.
        CMD_WRITE | CMD_WRITE_ZEROES if !in_range => Plan::Reject {
            errno: ENOSPC,
            reason: "write beyond the end of the export",
        },
        CMD_READ | CMD_TRIM if !in_range => Plan::Reject {
            errno: EINVAL,
            reason: "request beyond the end of the export",
        },
        CMD_READ => Plan::Read { offset, len },
        CMD_WRITE => Plan::Write { offset, len, fua },
        CMD_TRIM => Plan::Trim { offset, len, fua },
        CMD_WRITE_ZEROES => Plan::WriteZeroes { offset, len, fua },
        // CMD_FLUSH: offset and length are reserved; tolerate non-zero values.
        _ => Plan::Flush,
    }
}

/// The body of an `NBD_OPT_INFO` / `NBD_OPT_GO` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct InfoRequest<'a> {
    /// Requested export name (raw bytes).
    pub name: &'a [u8],
    /// Requested information types, in client order.
    pub infos: Vec<u16>,
}

/// Parses the body of `NBD_OPT_INFO` / `NBD_OPT_GO`: a 32-bit name length,
/// the name, a 16-bit count and that many 16-bit information types. Returns
/// `None` if the lengths are inconsistent.
pub(super) fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let (name_len, rest) = data.split_first_chunk::<4>()?;
    let name_len = usize::try_from(u32::from_be_bytes(*name_len)).ok()?;
    let (name, rest) = rest.split_at_checked(name_len)?;
    let (count, rest) = rest.split_first_chunk::<2>()?;
    let count = usize::from(u16::from_be_bytes(*count));
    if rest.len() != count * 2 {
        return None;
    }
    let infos = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some(InfoRequest { name, infos })
}

/// Encodes a simple reply header.
pub(super) fn simple_reply_header(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Maps a device error to an NBD error value. `writing` selects `ENOSPC`
/// rather than `EINVAL` for out-of-range errors, as the spec recommends.
pub(super) fn device_errno(err: &DeviceError, writing: bool) -> u32 {
    match err {
        DeviceError::Io(_) => EIO,
        DeviceError::NoSpace => ENOSPC,
        DeviceError::Invalid(_) => EINVAL,
        DeviceError::OutOfRange { .. } if writing => ENOSPC,
        DeviceError::OutOfRange { .. } => EINVAL,
        DeviceError::ReadOnly => EPERM,
        DeviceError::Unsupported(_) => ENOTSUP,
        DeviceError::ShuttingDown => ESHUTDOWN,
    }
}
