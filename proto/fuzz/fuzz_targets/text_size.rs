//! `size::parse` and `size::parse_rate` (every binary's `512M`-style sizes
//! and read rates, from command lines and API fields) on any text.
//!
//! Properties: parsing never panics; units are case-insensitive; a parsed
//! size printed in bytes, or in any unit that divides it, parses back to
//! the same size; an error names the input; a rate is a size that is 0 or
//! at least `MIN_RATE`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zebu_proto::size;
use zebu_proto_fuzz::write_seeds;

fn seeds() -> Vec<Vec<u8>> {
    ["4096", "512M", "10G", "1Ti", "64KiB", " 3 pb ", "0"]
        .into_iter()
        .map(|s| s.as_bytes().to_vec())
        .collect()
}

fuzz_target!(init: write_seeds(seeds()), |data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = size::parse(s);
    assert_eq!(size::parse(&s.to_ascii_lowercase()).ok(), parsed.as_ref().ok().copied());
    match parsed {
        Ok(n) => {
            assert_eq!(size::parse(&n.to_string()), Ok(n));
            for (shift, unit) in [(10, "K"), (20, "MiB"), (30, "G"), (40, "Ti"), (50, "PB")] {
                if n.is_multiple_of(1 << shift) {
                    assert_eq!(size::parse(&format!("{}{unit}", n >> shift)), Ok(n));
                }
            }
        }
        Err(ref e) => assert!(e.starts_with(&format!("invalid size {s:?}")), "{e}"),
    }
    match (parsed, size::parse_rate(s)) {
        (Ok(n), rate) if n == 0 || n >= size::MIN_RATE => assert_eq!(rate, Ok(n)),
        (_, rate) => assert!(rate.is_err()),
    }
});
