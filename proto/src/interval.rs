//! Schedule intervals: `30m`, `12h`, `7d`, `90s`, or `off` (also `0`) for
//! none. Whole numbers only, so a value reads the same to every parser.

use std::time::Duration;

/// Parses an interval; `Ok(None)` for `off` or `0`.
pub fn parse(s: &str) -> Result<Option<Duration>, String> {
    let t = s.trim();
    if t == "off" || t == "0" {
        return Ok(None);
    }
    let bad = || format!("invalid interval {s:?}: use e.g. 7d, 168h, 30m, 90s, or off");
    let digits = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    match n.checked_mul(secs) {
        Some(0) => Err(bad()),
        Some(v) => Ok(Some(Duration::from_secs(v))),
        None => Err(format!("invalid interval {s:?}: too long")),
    }
}

/// A span of seconds for people, rounded to the nearest unit: `45s`,
/// `12m`, `5h`, `7d` (so a week less a second still reads `7d`).
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
    use super::{parse, span};

    #[test]
    fn spans_read_roughly() {
        assert_eq!(span(45), "45s");
        assert_eq!(span(720), "12m");
        assert_eq!(span(5 * 3_600 + 59), "5h");
        assert_eq!(span(5 * 3_600 + 1_800), "6h");
        assert_eq!(span(7 * 86_400), "7d");
        assert_eq!(span(7 * 86_400 - 1), "7d");
    }
    use std::time::Duration;

    #[test]
    fn parses_units_and_off() {
        assert_eq!(parse("7d"), Ok(Some(Duration::from_secs(7 * 86_400))));
        assert_eq!(parse("168h"), Ok(Some(Duration::from_secs(168 * 3_600))));
        assert_eq!(parse("30m"), Ok(Some(Duration::from_secs(1_800))));
        assert_eq!(parse("1s"), Ok(Some(Duration::from_secs(1))));
        assert_eq!(parse("off"), Ok(None));
        assert_eq!(parse("0"), Ok(None));
        for bad in [
            "",
            "7",
            "soon",
            "0h",
            "1.5h",
            "-1d",
            "7w",
            "99999999999999999999d",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("invalid interval"), "{bad}: {e}");
        }
    }
}
