//! Durations on every command line and in every API field, in one grammar:
//! `humantime`'s (a number and a unit, several may be joined, decimals
//! allowed: `500ms`, `1.5s`, `2m`, `1h30m`, `7d`, `2w`). Schedule intervals
//! add `off` (also `0`) for none.

use std::time::Duration;

/// What every duration error suggests.
pub const EXAMPLES: &str = "use a number and a unit, e.g. 500ms, 8s, 2m, 1h30m, 7d";

/// Parses a positive duration (`8s`, `500ms`, `1h30m`).
pub fn parse(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    match humantime::parse_duration(t) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("invalid duration {s:?}: must be longer than zero")),
        Err(e) => Err(format!("invalid duration {s:?}: {e}; {EXAMPLES}")),
    }
}

/// Parses a schedule interval; `Ok(None)` for `off` or `0`.
pub fn parse_interval(s: &str) -> Result<Option<Duration>, String> {
    let t = s.trim();
    if t == "off" || t == "0" {
        return Ok(None);
    }
    match humantime::parse_duration(t) {
        Ok(d) if !d.is_zero() => Ok(Some(d)),
        Ok(_) => Err(format!(
            "invalid interval {s:?}: a zero interval is written off"
        )),
        Err(e) => Err(format!(
            "invalid interval {s:?}: {e}; use e.g. 7d, 168h, 30m, 90s, or off"
        )),
    }
}

/// A span of seconds for people, rounded to the nearest unit: `45s`,
/// `12m`, `5h`, `7d` (so a week less a second still reads `7d`). Every
/// span it writes parses back with [`parse`].
pub fn span(secs: i64) -> String {
    let round = |unit: i64| secs.saturating_add(unit / 2) / unit;
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3_600 => format!("{}m", round(60)),
        s if s < 2 * 86_400 => format!("{}h", round(3_600)),
        _ => format!("{}d", round(86_400)),
    }
}

#[cfg(test)]
mod tests {
    use super::{parse, parse_interval, span};
    use std::time::Duration;

    #[test]
    fn spans_read_roughly_and_parse_back() {
        assert_eq!(span(45), "45s");
        assert_eq!(span(720), "12m");
        assert_eq!(span(5 * 3_600 + 59), "5h");
        assert_eq!(span(5 * 3_600 + 1_800), "6h");
        assert_eq!(span(7 * 86_400), "7d");
        assert_eq!(span(7 * 86_400 - 1), "7d");
        for s in [45, 720, 5 * 3_600, 7 * 86_400] {
            assert_eq!(parse(&span(s)), Ok(Duration::from_secs(s as u64)));
        }
    }

    #[test]
    fn durations_take_units_and_combinations() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("8s"), Ok(Duration::from_secs(8)));
        assert_eq!(parse(" 2m "), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1_500)));
        for bad in ["", "8", "soon", "0s", "-1s", "8 parsecs"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("invalid duration"), "{bad}: {e}");
        }
        assert!(parse("8").unwrap_err().contains("e.g. 500ms"));
    }

    #[test]
    fn intervals_take_units_and_off() {
        assert_eq!(
            parse_interval("7d"),
            Ok(Some(Duration::from_secs(7 * 86_400)))
        );
        assert_eq!(
            parse_interval("168h"),
            Ok(Some(Duration::from_secs(168 * 3_600)))
        );
        assert_eq!(parse_interval("30m"), Ok(Some(Duration::from_secs(1_800))));
        assert_eq!(parse_interval("1s"), Ok(Some(Duration::from_secs(1))));
        assert_eq!(parse_interval("off"), Ok(None));
        assert_eq!(parse_interval("0"), Ok(None));
        assert_eq!(parse_interval("1.5h"), Ok(Some(Duration::from_secs(5_400))));
        for bad in ["", "7", "soon", "0h", "-1d", "99999999999999999999d"] {
            let e = parse_interval(bad).unwrap_err();
            assert!(e.contains("invalid interval"), "{bad}: {e}");
        }
    }
}
