//! The body of `NBD_OPT_INFO` / `NBD_OPT_GO` from any bytes
//! (`parse_info_request`).
//!
//! Properties: parsing never panics; it accepts exactly the bodies whose
//! lengths agree (a name length within the body, then a count of exactly
//! the information types that follow); what it accepts is a view of the
//! body (the name is its bytes 4..) and encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zebu_nbd::{INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_NAME, InfoRequest, parse_info_request};

/// The body as a client sends it.
fn encode(r: &InfoRequest<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + r.name.len() + 2 * r.infos.len());
    out.extend(
        u32::try_from(r.name.len())
            .expect("a name under 4 GiB")
            .to_be_bytes(),
    );
    out.extend(r.name);
    out.extend(
        u16::try_from(r.infos.len())
            .expect("under 65536 types")
            .to_be_bytes(),
    );
    for info in &r.infos {
        out.extend(info.to_be_bytes());
    }
    out
}

fn seeds() -> Vec<Vec<u8>> {
    [
        (&b""[..], vec![]),
        (&b"vol"[..], vec![INFO_NAME, INFO_BLOCK_SIZE]),
        (&b"pvc-0123"[..], vec![INFO_DESCRIPTION, 0xffff]),
    ]
    .into_iter()
    .map(|(name, infos)| encode(&InfoRequest { name, infos }))
    .collect()
}

/// Whether the lengths in `data` agree, read without the parser.
fn consistent(data: &[u8]) -> bool {
    let Some(name_len) = data.first_chunk::<4>() else {
        return false;
    };
    let name_len = u64::from(u32::from_be_bytes(*name_len));
    let after_name = data.len() as u64 - 4;
    if after_name < name_len + 2 {
        return false;
    }
    let at = 4 + name_len as usize;
    let count = u64::from(u16::from_be_bytes([data[at], data[at + 1]]));
    after_name - name_len - 2 == 2 * count
}

fuzz_target!(init: zebu_nbd_fuzz::write_seeds(seeds()), |data: &[u8]| {
    let parsed = parse_info_request(data);
    assert_eq!(parsed.is_some(), consistent(data), "{parsed:?}");
    if let Some(r) = parsed {
        assert_eq!(r.name.as_ptr(), data[4..].as_ptr(), "the name is a view of the body");
        assert_eq!(encode(&r), data, "re-encodes as it came");
    }
});
