//! The `zebu-nbd-fuse` binary refuses unusable arguments with a message a
//! person can act on and a non-zero exit, before mounting anything. (Its
//! serving is tested end to end through `zebu_csi::attach` in
//! `csi/tests/attach_bridge.rs`.)

use std::process::{Command, Output};

fn bridge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zebu-nbd-fuse"))
        .args(args)
        .output()
        .expect("run zebu-nbd-fuse")
}

fn assert_refused(args: &[&str], needle: &str) {
    let out = bridge(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: stderr does not say {needle:?}: {stderr}"
    );
}

#[test]
fn missing_and_bad_arguments_are_refused_clearly() {
    let dir = zebu_testkit::tempdir();
    let file = dir.path().join("disk");
    let file = file.to_str().expect("UTF-8 temp path");
    assert_refused(&["--file", file], "--uri");
    assert_refused(&["--uri", "nbd+unix:///v?socket=/nope"], "--file");
    assert_refused(
        &["--uri", "http://example/v", "--file", file],
        "invalid NBD URI",
    );
    assert_refused(
        &[
            "--uri",
            "nbd+unix:///v?socket=/s",
            "--file",
            file,
            "--connections",
            "many",
        ],
        "--connections",
    );
    // A well-formed export nobody serves: an error naming it, nothing mounted.
    let socket = dir.path().join("absent.sock");
    let uri = format!("nbd+unix:///v?socket={}", socket.display());
    let out = bridge(&["--uri", &uri, "--file", file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served a missing export: {stderr}");
    assert!(stderr.starts_with("zebu-nbd-fuse: "), "{stderr}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(
        !mounts.contains(dir.path().to_str().unwrap_or_default()),
        "something was mounted under {}",
        dir.path().display()
    );
}

#[test]
fn help_names_every_option() {
    let out = bridge(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in ["--uri", "--file", "--pidfile", "--connections"] {
        assert!(help.contains(opt), "--help lacks {opt}: {help}");
    }
}
