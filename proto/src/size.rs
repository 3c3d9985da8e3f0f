//! Human-readable sizes: `4096`, `512M`, `10G`, `1Ti`, `64KiB` (binary units).

/// Parses a size in bytes with an optional binary suffix (K, M, G, T, P,
/// optionally followed by `i`, `iB` or `B`).
pub fn parse(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional unit such as 512M or 10G")
    })?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KI" | "KB" | "KIB" => 10,
        "M" | "MI" | "MB" | "MIB" => 20,
        "G" | "GI" | "GB" | "GIB" => 30,
        "T" | "TI" | "TB" | "TIB" => 40,
        "P" | "PI" | "PB" | "PIB" => 50,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use K, M, G, T or P)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Slowest read rate limit accepted (bytes per second); below it a scrub of
/// a large volume would take months.
pub const MIN_RATE: u64 = 1 << 20;

/// Parses a read rate limit in bytes per second: 0 (no limit) or at least
/// [`MIN_RATE`], e.g. `64M`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let r = parse(s)?;
    check_rate(r).map(|()| r)
}

/// Checks a read rate limit: 0 (no limit) or at least [`MIN_RATE`].
pub fn check_rate(r: u64) -> Result<(), String> {
    if r != 0 && r < MIN_RATE {
        return Err(format!(
            "a rate limit of {r} bytes/s is too slow to finish: use at least 1M (per second), \
             or 0 for no limit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse, parse_rate};

    #[test]
    fn rates_are_off_or_at_least_a_mebibyte() {
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(parse_rate("64M"), Ok(64 << 20));
        assert!(parse_rate("100K").unwrap_err().contains("at least 1M"));
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn parses_units() {
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("512M"), Ok(512 << 20));
        assert_eq!(parse("10G"), Ok(10 << 30));
        assert_eq!(parse("1Ti"), Ok(1 << 40));
        assert_eq!(parse("64KiB"), Ok(64 << 10));
        assert!(parse("").is_err());
        assert!(parse("12X").is_err());
        assert!(parse("-1").is_err());
        assert!(parse("99999999999P").is_err());
    }
}
