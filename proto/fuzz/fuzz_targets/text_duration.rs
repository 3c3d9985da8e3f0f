//! `duration::parse` and `duration::parse_interval` (every duration on a
//! command line or in an API field, and schedule intervals) on any text,
//! and `duration::span`, the spans printed for people, on the first eight
//! bytes read as a number of seconds.
//!
//! Properties: parsing never panics; a duration is longer than zero and,
//! printed by `humantime` (whose grammar it parses), parses back to itself;
//! an interval is `None` exactly for `off` and `0`, else the duration;
//! errors name the input; every span of a positive number of seconds
//! parses back to within half of the unit it is printed in.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use zebu_proto::duration;
use zebu_proto_fuzz::write_seeds;

fn seeds() -> Vec<Vec<u8>> {
    let spans = [45, 720, 5 * 3_600, 7 * 86_400].map(duration::span);
    let printed = humantime::format_duration(Duration::new(5_400, 1_500)).to_string();
    ["500ms", "1.5s", " 2m ", "1h30m", "7d", "off", "0"]
        .into_iter()
        .map(str::to_owned)
        .chain(spans)
        .chain([printed])
        .map(String::into_bytes)
        .collect()
}

fuzz_target!(init: write_seeds(seeds()), |data: &[u8]| {
    if let Some(secs) = data.first_chunk::<8>() {
        check_span(i64::from_le_bytes(*secs));
    }
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let interval = duration::parse_interval(s);
    match duration::parse(s) {
        Ok(d) => {
            assert!(!d.is_zero());
            let printed = humantime::format_duration(d).to_string();
            assert_eq!(duration::parse(&printed), Ok(d), "{printed}");
            assert_eq!(interval, Ok(Some(d)));
        }
        Err(e) => {
            assert!(e.starts_with(&format!("invalid duration {s:?}")), "{e}");
            assert!(matches!(interval, Ok(None) | Err(_)), "{interval:?}");
        }
    }
    assert_eq!(interval == Ok(None), matches!(s.trim(), "off" | "0"));
    if let Err(e) = interval {
        assert!(e.starts_with(&format!("invalid interval {s:?}")), "{e}");
    }
});

/// A span of a positive number of seconds parses back to within half its
/// unit (a whole unit where rounding up would overflow). Spans of zero or
/// fewer seconds (`0s`, `-5s`) do not parse: they are printed, never read.
fn check_span(secs: i64) {
    if secs < 1 {
        return;
    }
    let printed = duration::span(secs);
    let read = duration::parse(&printed).unwrap_or_else(|e| panic!("span({secs}): {e}"));
    let unit = match printed.as_bytes().last() {
        Some(b's') => 1,
        Some(b'm') => 60,
        Some(b'h') => 3_600,
        _ => 86_400,
    };
    let off = read.as_secs().abs_diff(secs as u64);
    let allowed = if secs > i64::MAX - unit / 2 {
        unit
    } else {
        unit / 2
    };
    assert!(off <= allowed as u64, "span({secs}) = {printed}");
}
