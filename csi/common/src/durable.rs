//! Small files that must survive a crash whole: the node's and the agent's
//! records, the attachment state a detach reads after a restart, the CLI's
//! attachment records, the bridge's pid file.
//!
//! Invariant: after [`write`] returns, the file holds exactly the new bytes
//! and will after a power loss too; before it returns, a crash leaves the
//! old file or the new one, never a mix or nothing. The order is what makes
//! that true: write a temporary file beside the target, fsync it, rename it
//! over the target, fsync the directory (the rename is an entry of the
//! directory; without the last fsync it may be lost while the old name
//! stays gone). [`remove`] fsyncs the directory after the unlink likewise.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The temporary file [`write`] fills before renaming it over `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Replaces `path` with `bytes` atomically and durably (see the module
/// docs); a new file gets permissions `mode`.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Removes `path` durably; an absent file is fine (false), a removed one
/// returns true.
pub fn remove(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_parent(path).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes the entries of `path`'s directory (a rename, a removal) durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    #[test]
    fn replaces_the_file_whole_with_its_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.json");
        write(&path, b"old", 0o600).unwrap();
        write(&path, b"new contents", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!temp_path(&path).exists());
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap(), "an absent file is fine");
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let err = write(&dir.path().join("no/such/dir/f"), b"x", 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// Run by [`syncs_the_file_then_renames_then_syncs_the_directory`]
    /// under strace: one write of a record into `ZEBU_DURABLE_TARGET`.
    #[test]
    #[ignore = "run under strace by the fsync-order test"]
    fn traced_write() {
        if let Some(target) = std::env::var_os("ZEBU_DURABLE_TARGET") {
            write(Path::new(&target), b"{\"traced\":true}", 0o600).unwrap();
        }
    }

    /// The order of the system calls, seen by strace on a real run: the
    /// temporary file is fsynced before the rename, the directory after it.
    #[test]
    fn syncs_the_file_then_renames_then_syncs_the_directory() {
        let Ok(strace) = which("strace") else {
            panic!("strace is not installed; this test needs it: apt-get install strace");
        };
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("traced.json");
        let log = dir.path().join("strace.log");
        let exe = std::env::current_exe().unwrap();
        let status = Command::new(strace)
            .args([
                "-f",
                "-qq",
                "-e",
                "trace=fsync,fdatasync,rename,renameat,renameat2",
                "-o",
            ])
            .arg(&log)
            .arg(&exe)
            .args([
                "--exact",
                "durable::tests::traced_write",
                "--ignored",
                "--test-threads=1",
            ])
            .env("ZEBU_DURABLE_TARGET", &target)
            .output()
            .unwrap();
        assert!(status.status.success(), "{status:?}");
        assert!(target.is_file(), "the traced run wrote the record");
        let trace = std::fs::read_to_string(&log).unwrap();
        let calls: Vec<&str> = trace
            .lines()
            .filter_map(|l| {
                let call = l.split_once(' ').map_or(l, |(_, rest)| rest).trim_start();
                ["fsync(", "fdatasync(", "rename(", "renameat(", "renameat2("]
                    .iter()
                    .find(|c| call.starts_with(**c))
                    .map(|c| c.trim_end_matches('('))
            })
            .collect();
        let rename = calls
            .iter()
            .position(|c| c.starts_with("rename"))
            .unwrap_or_else(|| panic!("no rename in the trace:\n{trace}"));
        assert!(
            rename >= 1 && rename + 1 < calls.len(),
            "the rename is not between two fsyncs:\n{trace}"
        );
        assert_eq!(
            calls[rename - 1..=rename + 1]
                .iter()
                .map(|c| c.starts_with("rename"))
                .collect::<Vec<_>>(),
            [false, true, false],
            "expected fsync, rename, fsync around the rename; trace:\n{trace}"
        );
    }

    fn which(tool: &str) -> Result<PathBuf, ()> {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
            .ok_or(())
    }
}
