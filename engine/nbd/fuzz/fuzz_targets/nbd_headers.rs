//! The transmission phase's fixed headers from any bytes: the first 28 as a
//! request header (`RequestHeader::parse`), the first 16 as a simple reply
//! (`SimpleReply::parse`), and the request judged by `plan_request` against
//! an export size and payload limit taken from bytes 28..40.
//!
//! Properties: parsing never panics; a bad magic number is reported as the
//! bytes hold it; what parses encodes back to the same bytes; the plan is
//! the one the NBD specification asks for, and a request it lets through
//! lies within the export and the payload limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zebu_nbd::*;

const SIZE: u64 = 1 << 30;
const MAX_PAYLOAD: u32 = 32 << 20;

fn seeds() -> Vec<Vec<u8>> {
    let header = |flags, kind, offset, len| {
        let h = RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        };
        let mut seed = h.encode().to_vec();
        seed.extend(SIZE.to_be_bytes());
        seed.extend(MAX_PAYLOAD.to_be_bytes());
        seed
    };
    vec![
        header(0, CMD_READ, 4096, 4096),
        header(CMD_FLAG_FUA, CMD_WRITE, SIZE - 512, 512),
        header(0, CMD_FLUSH, 0, 0),
        header(0, CMD_TRIM, 0, 1 << 20),
        header(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 1 << 20, 65536),
        header(0, CMD_DISC, 0, 0),
        simple_reply_header(EIO, 7).to_vec(),
    ]
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fuzz_target!(init: zebu_nbd_fuzz::write_seeds(seeds()), |data: &[u8]| {
    if let Some(raw) = data.first_chunk::<SIMPLE_REPLY_LEN>() {
        simple_reply(raw);
    }
    let Some(raw) = data.first_chunk::<REQUEST_HEADER_LEN>() else {
        return;
    };
    match RequestHeader::parse(raw) {
        Ok(h) => assert_eq!(&h.encode(), raw, "a request header re-encodes as it came"),
        Err(magic) => assert_eq!((magic, be_u32(raw) != REQUEST_MAGIC), (be_u32(raw), true)),
    }
    // The same header with a good magic number, so every input reaches the plan.
    let mut fixed = *raw;
    fixed[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    let h = RequestHeader::parse(&fixed).expect("a good magic number parses");
    assert_eq!(h.encode(), fixed);
    assert_eq!(h.payload_len(), if h.kind == CMD_WRITE { h.len } else { 0 });
    let rest = &data[REQUEST_HEADER_LEN..];
    let size = rest.first_chunk::<8>().map_or(SIZE, |b| u64::from_be_bytes(*b));
    let max = rest.get(8..12).map_or(MAX_PAYLOAD, be_u32);
    check_plan(&h, size, max, plan_request(&h, size, max));
});

fn simple_reply(raw: &[u8; SIMPLE_REPLY_LEN]) {
    match SimpleReply::parse(raw) {
        Ok(r) => assert_eq!(&simple_reply_header(r.error, r.cookie), raw),
        Err(magic) => assert_eq!(
            (magic, be_u32(raw) != SIMPLE_REPLY_MAGIC),
            (be_u32(raw), true)
        ),
    }
    let mut fixed = *raw;
    fixed[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    let r = SimpleReply::parse(&fixed).expect("a good magic number parses");
    assert_eq!(simple_reply_header(r.error, r.cookie), fixed);
}

/// Checks `plan` against the request: what it lets through lies within the
/// export (no overflow) and the payload limit, with the header's own offset,
/// length and flags; what it rejects breaks a rule, with the error value the
/// specification asks for (ENOSPC for writes beyond the end, EOVERFLOW for a
/// payload over the limit, else EINVAL).
fn check_plan(h: &RequestHeader, size: u64, max: u32, plan: Plan) {
    let allowed = match h.kind {
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => Some(CMD_FLAG_FUA),
        CMD_WRITE_ZEROES => Some(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE),
        _ => None,
    };
    let flags_ok = allowed.is_some_and(|a| h.flags & !a == 0);
    let in_range = h
        .offset
        .checked_add(u64::from(h.len))
        .is_some_and(|end| end <= size);
    let too_large = matches!(h.kind, CMD_READ | CMD_WRITE) && h.len > max;
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (h.offset, h.len);
    assert_eq!(h.kind == CMD_DISC, plan == Plan::Disconnect, "{plan:?}");
    match plan {
        Plan::Disconnect => {}
        Plan::Flush => assert!(h.kind == CMD_FLUSH && flags_ok),
        Plan::Reject { errno, .. } => {
            let want = if !flags_ok {
                EINVAL
            } else if too_large {
                EOVERFLOW
            } else if !in_range && h.kind != CMD_FLUSH {
                if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                    ENOSPC
                } else {
                    EINVAL
                }
            } else {
                panic!("{h:?} rejected with {errno}, breaking no rule");
            };
            assert_eq!(errno, want, "{h:?}");
        }
        Plan::Read { .. } | Plan::Write { .. } | Plan::Trim { .. } | Plan::WriteZeroes { .. } => {
            assert!(
                flags_ok && in_range && !too_large,
                "{h:?} let through: {plan:?}"
            );
            let want = match h.kind {
                CMD_READ => Plan::Read { offset, len },
                CMD_WRITE => Plan::Write { offset, len, fua },
                CMD_TRIM => Plan::Trim { offset, len, fua },
                _ => Plan::WriteZeroes { offset, len, fua },
            };
            assert_eq!(plan, want);
        }
    }
}
