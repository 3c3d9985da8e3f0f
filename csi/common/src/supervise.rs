//! Watching a child that announces readiness with a line in its log: the
//! node agent (async, for the replicas and engines it runs) and the test kit
//! (for every server a test starts) both wait this way.
//!
//! A child's stdout and stderr go to one log file, never to a pipe (a child
//! that must outlive its starter cannot write to a pipe nobody reads). The
//! starter notes the log's length at spawn and reads what was appended since,
//! one complete line at a time, until a line parses as the ready line, the
//! child exits, or a deadline passes; its errors quote the log's tail from
//! that offset.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

/// Lines longer than this without a newline are dropped: not a ready line.
const MAX_LINE: usize = 64 << 10;

/// Finds the first line that parses in a growing log, one complete line at
/// a time (a half-written line waits for its newline).
#[derive(Debug, Default)]
pub struct LineScanner {
    partial: Vec<u8>,
}

impl LineScanner {
    /// Reads what was appended to `file` since the last call (from its
    /// current position) and returns what `parse` made of the first
    /// complete line it accepted.
    pub fn scan<T>(&mut self, file: &mut File, parse: impl Fn(&str) -> Option<T>) -> Option<T> {
        let mut new = Vec::new();
        // A read error is like no output yet: the child's exit or the
        // deadline ends the wait.
        let _ = file.read_to_end(&mut new);
        self.partial.extend_from_slice(&new);
        let mut found = None;
        let mut consumed = 0;
        while let Some(nl) = self.partial[consumed..].iter().position(|&b| b == b'\n') {
            let line = &self.partial[consumed..consumed + nl];
            consumed += nl + 1;
            if found.is_none() {
                found = parse(&String::from_utf8_lossy(line));
            }
        }
        self.partial.drain(..consumed);
        if self.partial.len() > MAX_LINE {
            self.partial.clear();
        }
        found
    }
}

/// Opens `log` for a [`LineScanner`], positioned at `offset` (the log's
/// length when the child was spawned).
pub fn open_log_at(log: &Path, offset: u64) -> std::io::Result<File> {
    let mut f = File::open(log)?;
    f.seek(SeekFrom::Start(offset))?;
    Ok(f)
}

/// `exited with status N` / `killed by signal N`.
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("ended ({status})"),
    }
}

/// The last `max` bytes the child wrote to `log` since `offset`, or a note
/// saying why there are none.
pub fn log_tail(log: &Path, offset: u64, max: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(log)?;
        let len = f.metadata()?.len();
        let from = offset.max(len.saturating_sub(max)).min(len);
        f.seek(SeekFrom::Start(from))?;
        let mut buf = Vec::new();
        f.take(max).read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).trim().to_owned())
    };
    match read() {
        Ok(s) if s.is_empty() => "(no output)".to_owned(),
        Ok(s) => s,
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch_of(line: &str) -> Option<u64> {
        line.strip_prefix("ready epoch ")?.parse().ok()
    }

    #[test]
    fn scanner_waits_for_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "noise\nready epo").unwrap();
        let mut f = open_log_at(&path, 0).unwrap();
        let mut s = LineScanner::default();
        assert_eq!(s.scan(&mut f, epoch_of), None);
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut w, b"ch 3").unwrap();
        assert_eq!(s.scan(&mut f, epoch_of), None);
        std::io::Write::write_all(&mut w, b"\nready epoch 4\n").unwrap();
        assert_eq!(s.scan(&mut f, epoch_of), Some(3));
    }

    #[test]
    fn scanning_starts_at_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "ready epoch 1\nready epoch 2\n").unwrap();
        let mut f = open_log_at(&path, 14).unwrap();
        assert_eq!(LineScanner::default().scan(&mut f, epoch_of), Some(2));
    }

    #[test]
    fn exit_descriptions() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "killed by signal 9");
    }

    #[test]
    fn log_tail_reads_from_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "old run\nnew run: error\n").unwrap();
        assert_eq!(log_tail(&path, 8, 4096), "new run: error");
        assert_eq!(log_tail(&path, 8, 6), "error");
        assert_eq!(log_tail(&path, 100, 4096), "(no output)");
        assert!(log_tail(&dir.path().join("nope"), 0, 4096).starts_with("(cannot read"));
    }
}
