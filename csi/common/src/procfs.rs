//! What `/proc` says of a process: whether it is alive (not a zombie), its
//! name and its command line. Callers use it to tell whether a recorded pid
//! still is the process they started, never a recycled one.

/// A live process as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveProcess {
    /// Its name (`comm`: the executable's first 15 bytes).
    pub comm: String,
    /// Its arguments, the program first; empty while the process exits (its
    /// memory, and so its command line, is gone before it is a zombie).
    pub args: Vec<Vec<u8>>,
}

/// `pid` if it runs and is not a zombie, with its name and arguments; None
/// when it is gone, a zombie, or cannot be read.
pub fn live(pid: u32) -> Option<LiveProcess> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (comm, state) = parse_stat(&stat)?;
    if matches!(state, "Z" | "X") {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = cmdline.strip_suffix(b"\0").unwrap_or(&cmdline);
    let args = if cmdline.is_empty() {
        Vec::new()
    } else {
        cmdline.split(|&b| b == 0).map(<[u8]>::to_vec).collect()
    };
    Some(LiveProcess {
        comm: comm.to_owned(),
        args,
    })
}

/// The name and state of a `/proc/PID/stat` line: `pid (comm) S ...`,
/// where `comm` may itself contain spaces and parentheses.
fn parse_stat(stat: &str) -> Option<(&str, &str)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let comm = stat.get(open + 1..close)?;
    let state = stat.get(close + 1..)?.split_whitespace().next()?;
    Some((comm, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_name_and_state_even_with_parentheses_in_the_name() {
        assert_eq!(parse_stat("42 (zebu) S 1 42"), Some(("zebu", "S")));
        assert_eq!(parse_stat("42 (a (b) c) Z 1"), Some(("a (b) c", "Z")));
        assert_eq!(parse_stat("42 zebu S"), None);
        assert_eq!(parse_stat("42 (zebu)"), None);
    }

    #[test]
    fn this_process_is_alive_with_its_command_line() {
        use std::os::unix::ffi::OsStrExt;
        let me = live(std::process::id()).expect("this process is alive");
        let exe = std::env::current_exe().unwrap();
        let program = std::path::Path::new(std::ffi::OsStr::from_bytes(&me.args[0]));
        assert_eq!(program.file_name(), exe.file_name());
        assert_eq!(live(0), None);
    }
}
