//! A parser for `/proc/self/mountinfo` (see `proc(5)`).
//!
//! Paths in mountinfo escape space, tab, newline and backslash as octal
//! (`\040`, `\011`, `\012`, `\134`); [`unescape`] undoes that byte-wise so
//! non-UTF-8 paths round-trip.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Unique id of the mount.
    pub mount_id: u64,
    /// Id of the parent mount.
    pub parent_id: u64,
    /// `st_dev` major of files on this mount.
    pub major: u32,
    /// `st_dev` minor of files on this mount.
    pub minor: u32,
    /// Path inside the mounted filesystem that forms the root of this mount
    /// (`/` for a normal mount, `/loop3` for a bind mount of `/dev/loop3`).
    pub root: PathBuf,
    /// Where it is mounted, unescaped.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, `nosuid`, ...).
    pub mount_options: Vec<String>,
    /// Filesystem type (`ext4`, `fuse`, `devtmpfs`, ...).
    pub fstype: String,
    /// Mount source (`/dev/loop3`, ...), unescaped.
    pub source: PathBuf,
    /// Per-superblock options.
    pub super_options: Vec<String>,
}

impl MountEntry {
    /// True when the per-mount options contain `ro`.
    pub fn is_read_only(&self) -> bool {
        self.mount_options.iter().any(|o| o == "ro")
    }
}

/// Undoes the octal escapes (`\NNN`) the kernel uses in mountinfo fields.
/// Malformed escapes are kept literally.
pub fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Parses one mountinfo line; `None` when it is malformed.
pub fn parse_line(line: &str) -> Option<MountEntry> {
    let mut it = line.split(' ');
    let mount_id = it.next()?.parse().ok()?;
    let parent_id = it.next()?.parse().ok()?;
    let (major, minor) = it.next()?.split_once(':')?;
    let (major, minor) = (major.parse().ok()?, minor.parse().ok()?);
    let root = unescape(it.next()?);
    let mount_point = unescape(it.next()?);
    let mount_options = it.next()?.split(',').map(str::to_owned).collect();
    // Zero or more optional fields ("shared:1", ...), ended by "-".
    loop {
        if it.next()? == "-" {
            break;
        }
    }
    let fstype = it.next()?.to_owned();
    let source = unescape(it.next()?);
    let super_options = it
        .next()
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    Some(MountEntry {
        mount_id,
        parent_id,
        major,
        minor,
        root,
        mount_point,
        mount_options,
        fstype,
        source,
        super_options,
    })
}

/// Parses a whole mountinfo text, skipping malformed lines.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_optional_fields() {
        let text = "27 1 254:0 / / rw,relatime shared:1 master:2 - ext4 /dev/vda rw,discard\n\
                    43 27 0:6 /loop0 /var/tmp/exp/blk ro,relatime - devtmpfs devtmpfs rw,mode=755\n\
                    garbage line\n";
        let v = parse(text);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].mount_point, PathBuf::from("/"));
        assert_eq!(v[0].fstype, "ext4");
        assert_eq!(v[0].source, PathBuf::from("/dev/vda"));
        assert_eq!((v[0].major, v[0].minor), (254, 0));
        assert!(!v[0].is_read_only());
        assert_eq!(v[1].root, PathBuf::from("/loop0"));
        assert!(v[1].is_read_only());
        assert_eq!(v[1].super_options, vec!["rw", "mode=755"]);
    }

    #[test]
    fn unescapes_octal() {
        let e = parse_line("50 27 7:0 / /mnt/a\\040b\\011c\\134d rw - ext4 /dev/loop0 rw").unwrap();
        assert_eq!(e.mount_point, PathBuf::from("/mnt/a b\tc\\d"));
        // Malformed or out-of-range escapes stay literal.
        assert_eq!(unescape("a\\09"), PathBuf::from("a\\09"));
        assert_eq!(unescape("a\\777"), PathBuf::from("a\\777"));
        assert_eq!(unescape("end\\04"), PathBuf::from("end\\04"));
        // Non-UTF-8 bytes survive.
        assert_eq!(
            unescape("x\\377").into_os_string().into_vec(),
            b"x\xff".to_vec()
        );
    }
}
