//! The NBD wire protocol, as Zebu speaks it on both ends: the engine's
//! server and the node's bridge client (and the tests and benchmarks that
//! talk to either). Constants, request and reply headers, the option
//! bodies, and the server's validation of a request — pure code, no I/O.
//!
//! Values follow the NBD protocol specification (`doc/proto.md` of the
//! reference implementation). All integers on the wire are big-endian.
//! Nothing in here panics on any input.

use bytes::Buf;

// ---------------------------------------------------------------------------
// Magic numbers.

/// `"NBDMAGIC"`, first thing the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`, sent by the server after [`NBD_MAGIC`] (newstyle) and by the
/// client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission-phase request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// ---------------------------------------------------------------------------
// Handshake flags (server → client, 16 bits) and client flags (32 bits).

/// Server supports fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------
// Transmission flags (16 bits).

/// Always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Flush/FUA effects are visible across all connections.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// ---------------------------------------------------------------------------
// Options.

/// Select an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Client aborts negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS (unsupported).
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Negotiate structured replies (unsupported).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// ---------------------------------------------------------------------------
// Option reply types.

/// Option accepted / list finished.
pub const REP_ACK: u32 = 1;
/// One export in an `NBD_OPT_LIST` answer.
pub const REP_SERVER: u32 = 2;
/// One piece of export information.
pub const REP_INFO: u32 = 3;
/// Set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option not supported by this server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option syntactically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option data too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// ---------------------------------------------------------------------------
// Information types (NBD_OPT_INFO / NBD_OPT_GO).

/// Size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum / preferred / maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Commands and command flags.

/// Read.
pub const CMD_READ: u16 = 0;
/// Write (followed by `length` bytes of payload).
pub const CMD_WRITE: u16 = 1;
/// Disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim / discard.
pub const CMD_TRIM: u16 = 4;
/// Cache (not advertised).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Don't fragment (structured replies only; not advertised).
pub const CMD_FLAG_DF: u16 = 1 << 2;

// ---------------------------------------------------------------------------
// Error values of the transmission phase.

/// Operation not permitted.
pub const EPERM: u32 = 1;
/// Input/output error.
pub const EIO: u32 = 5;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space left on device.
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header on the wire.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// A decoded transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
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
    pub fn parse(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, u32> {
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

    /// Encodes the header as a client sends it.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Number of payload bytes that follow this header on the wire, whether or
    /// not the request is valid.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE { self.len } else { 0 }
    }
}

/// What to do with a request, decided from its header alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes to read.
        len: u32,
    },
    /// Read the payload and write it at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Payload bytes.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Flush.
    Flush,
    /// Trim, then flush if `fua`.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Bytes to deallocate.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes to zero.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Client disconnect.
    Disconnect,
    /// Reply with `errno` without touching the device (the payload of a
    /// rejected write must still be consumed).
    Reject {
        /// The error value to answer.
        errno: u32,
        /// Why, for the log.
        reason: &'static str,
    },
}

/// Validates a request against the advertised export size and the maximum
/// payload, and decides what to do with it.
pub fn plan_request(h: &RequestHeader, export_size: u64, max_payload: u32) -> Plan {
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
pub struct InfoRequest<'a> {
    /// Requested export name (raw bytes).
    pub name: &'a [u8],
    /// Requested information types, in client order.
    pub infos: Vec<u16>,
}

/// Parses the body of `NBD_OPT_INFO` / `NBD_OPT_GO`: a 32-bit name length,
/// the name, a 16-bit count and that many 16-bit information types. Returns
/// `None` if the lengths are inconsistent.
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
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

/// A decoded simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0, or the error value (an errno) of the request.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Decodes a simple reply header; `Err` carries the bad magic number.
    pub fn parse(buf: &[u8; SIMPLE_REPLY_LEN]) -> Result<Self, u32> {
        let mut b = &buf[..];
        let magic = b.get_u32();
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(magic);
        }
        Ok(SimpleReply {
            error: b.get_u32(),
            cookie: b.get_u64(),
        })
    }
}

/// Encodes a simple reply header.
pub fn simple_reply_header(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_header_round_trips() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(RequestHeader::parse(&h.encode()), Ok(h));
        assert_eq!(h.payload_len(), 4096);
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(RequestHeader::parse(&bad).is_err());
    }

    #[test]
    fn a_simple_reply_round_trips() {
        let r = SimpleReply::parse(&simple_reply_header(EIO, 42));
        assert_eq!(
            r,
            Ok(SimpleReply {
                error: EIO,
                cookie: 42
            })
        );
        assert_eq!(SimpleReply::parse(&[0; SIMPLE_REPLY_LEN]), Err(0));
    }
}
