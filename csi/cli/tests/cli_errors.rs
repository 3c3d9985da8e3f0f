//! The `zebu` binary's failures without a driver: non-zero exit codes and
//! messages that say what failed and what to do.

use std::process::{Command, Output};

fn zebu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zebu"))
        .args(args)
        .env_remove("ZEBU_ENDPOINT")
        .env_remove("ZEBU_CLI_STATE")
        .output()
        .expect("run zebu")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn help_works() {
    let o = zebu(&["--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for word in [
        "volume",
        "snapshot",
        "replica",
        "status",
        "--endpoint",
        "ZEBU_ENDPOINT",
    ] {
        assert!(out.contains(word), "--help lacks {word}:\n{out}");
    }
    let o = zebu(&["volume", "attach", "--help"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("--mount <DIR>"), "{}", stdout(&o));
    let o = zebu(&["--version"]);
    assert!(o.status.success());
}

#[test]
fn missing_socket_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix://{}/csi.sock", dir.path().display());
    let o = zebu(&["--endpoint", &ep, "volume", "list"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "");
    assert_eq!(
        stderr(&o).trim_end(),
        format!(
            "zebu: cannot reach the Zebu driver at {ep}: is `zebu-csi standalone` running? \
             (no such socket)"
        )
    );
}

#[test]
fn dead_socket_is_connection_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("csi.sock");
    // A socket file with nobody listening.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let ep = format!("unix://{}", path.display());
    let o = zebu(&["--endpoint", &ep, "status"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("cannot reach the Zebu driver at {ep}"))
            && e.contains("is `zebu-csi standalone` running?")
            && e.contains("(connection refused)"),
        "{e}"
    );
}

#[test]
fn endpoint_comes_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix://{}/env.sock", dir.path().display());
    let o = Command::new(env!("CARGO_BIN_EXE_zebu"))
        .args(["snapshot", "list"])
        .env("ZEBU_ENDPOINT", &ep)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&ep), "{}", stderr(&o));
}

#[test]
fn tcp_refused() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = l.local_addr().unwrap().to_string();
    drop(l);
    let o = zebu(&["--endpoint", &ep, "volume", "get", "v1"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("cannot reach the Zebu driver at {ep}")),
        "{e}"
    );
    assert!(e.contains("connection refused"), "{e}");
}

#[test]
fn bad_endpoint() {
    let o = zebu(&["--endpoint", "nohost", "status"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("invalid endpoint \"nohost\""),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_size_is_a_usage_error() {
    let o = zebu(&["volume", "create", "data", "--size", "12X"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("invalid size \"12X\"") && e.contains("unknown unit"),
        "{e}"
    );
    let o = zebu(&["volume", "expand", "v1", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("must be greater than zero"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn conflicting_sources_are_rejected() {
    let o = zebu(&[
        "volume",
        "create",
        "d",
        "--size",
        "1G",
        "--from-snapshot",
        "s",
        "--clone-of",
        "v",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
}
