//! Test data: deterministic incompressible patterns, and comparisons that
//! report the first differing block instead of dumping megabytes.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::BS;

static SEED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A seed that differs between calls, processes and runs.
pub fn rand_u64() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let n = SEED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    splitmix(t ^ (std::process::id() as u64) << 32 ^ n.wrapping_mul(0x9E37_79B9))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Deterministic pseudo-random bytes (incompressible, no zero blocks).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    let mut x = splitmix(seed) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes `data` to a new file.
pub fn write_file(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Asserts `a == b` without dumping megabytes: reports the first differing
/// 4 KiB block and how many differ.
pub fn assert_same(what: &str, a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if a == b {
        return;
    }
    let diff: Vec<usize> = a
        .chunks(BS as usize)
        .zip(b.chunks(BS as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect();
    panic!(
        "{what}: {} of {} blocks differ, first at block {} (offset {})",
        diff.len(),
        a.len().div_ceil(BS as usize),
        diff[0],
        diff[0] as u64 * BS
    );
}

/// Every byte zero?
pub fn all_zero(d: &[u8]) -> bool {
    d.iter().all(|&b| b == 0)
}
