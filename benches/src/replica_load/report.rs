//! The figures of a run (rate, throughput, latency quantiles), their
//! medians over runs, and printing them as text or JSON.

use std::fmt::Write as _;

use crate::drive::Drive;

/// Figures of one run.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Figures {
    ops: u64,
    seconds: f64,
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    flush_ms: f64,
}

/// The `q`-quantile (0..=1) of sorted values, nearest-rank.
fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn figures(mut d: Drive, seconds: f64, bs: u64) -> Figures {
    d.latencies_ns.sort_unstable();
    let us = |q| quantile(&d.latencies_ns, q) as f64 / 1000.0;
    let iops = d.counted as f64 / seconds;
    Figures {
        ops: d.counted,
        seconds,
        iops,
        mib_s: iops * bs as f64 / f64::from(1u32 << 20),
        p50_us: us(0.50),
        p99_us: us(0.99),
        p999_us: us(0.999),
        flush_ms: d.flush.map_or(0.0, |f| f.as_secs_f64() * 1000.0),
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(crate) fn medians(runs: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f));
    Figures {
        ops: m(|r| r.ops as f64).round() as u64,
        seconds: m(|r| r.seconds),
        iops: m(|r| r.iops),
        mib_s: m(|r| r.mib_s),
        p50_us: m(|r| r.p50_us),
        p99_us: m(|r| r.p99_us),
        p999_us: m(|r| r.p999_us),
        flush_ms: m(|r| r.flush_ms),
    }
}

pub(crate) fn text_line(label: &str, f: &Figures) -> String {
    format!(
        "{label:>7}: {:>9.0} IOPS {:>9.1} MiB/s   p50 {:>8.1} µs   p99 {:>8.1} µs   p99.9 {:>8.1} µs   ({} ops in {:.1} s, flush {:.1} ms)",
        f.iops, f.mib_s, f.p50_us, f.p99_us, f.p999_us, f.ops, f.seconds, f.flush_ms
    )
}

pub(crate) fn json_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

pub(crate) fn json_figures(f: &Figures) -> String {
    format!(
        "{{\"ops\":{},\"seconds\":{:.3},\"iops\":{:.1},\"mib_s\":{:.2},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"flush_ms\":{:.2}}}",
        f.ops, f.seconds, f.iops, f.mib_s, f.p50_us, f.p99_us, f.p999_us, f.flush_ms
    )
}

pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}
