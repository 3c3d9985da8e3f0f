//! End to end: NBD clients (nbdinfo, qemu-img, nbdcopy) against a real
//! engine over 3 real replicas; the replicas' contents are checked directly
//! after the engine stopped.

mod common;

use common::*;
use std::process::Command;

/// Size reporting, a 256 MiB random image copied in and out with nbdcopy,
/// a clean SIGTERM stop, then every replica holds exactly the image.
#[test]
fn nbdcopy_roundtrip_256m_and_replicas_identical() {
    let _serial = serial();
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempdir();
    let size = 256 * MIB;
    let replicas = start_replicas(tmp.path(), 3, "256M");
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let mut engine = Engine::start(tmp.path(), "vol1", "256M", &addrs);
    let uri = engine.uri();

    // Size as seen by NBD clients.
    let info = nbdinfo(&uri);
    assert_eq!(info["export-size"].as_u64(), Some(size), "nbdinfo: {info}");
    assert_eq!(
        info["can_multi_conn"], true,
        "multi-conn not advertised: {info}"
    );
    assert_eq!(info["is_read_only"], false, "{info}");
    assert_eq!(info["can_flush"], true, "{info}");
    let q = run(
        Command::new("qemu-img").args(["info", "--output=json", &uri]),
        SHORT,
    )
    .expect_ok();
    let q: serde_json::Value = serde_json::from_str(&q.stdout).unwrap();
    assert_eq!(q["virtual-size"].as_u64(), Some(size), "qemu-img info: {q}");
    // The default export "" works too.
    let default_uri = format!("nbd+unix:///?socket={}", engine.socket.display());
    assert_eq!(nbdinfo(&default_uri)["export-size"].as_u64(), Some(size));

    let st = engine.status();
    assert_eq!(st["volume"], "vol1");
    assert_eq!(st["size"].as_u64(), Some(size));
    assert_eq!(st["state"], "healthy", "{st}");
    assert_eq!(st["replicas"].as_array().map(|r| r.len()), Some(3), "{st}");

    // Random image in, then out again.
    let image = pattern(rand_u64(), size as usize);
    let src = tmp.path().join("src.img");
    write_file(&src, &image);
    nbd_write_file(&uri, &src);
    let back = nbd_read_all(&uri, tmp.path());
    assert_same("nbdcopy read-back vs source image", &back, &image);
    drop(back);
    let st = engine.status();
    assert!(io_counter(&st, "writes") > 0, "io.writes not counted: {st}");
    assert!(io_counter(&st, "reads") > 0, "io.reads not counted: {st}");
    assert!(
        io_counter(&st, "flushes") > 0,
        "io.flushes not counted: {st}"
    );

    engine.stop();
    let data = assert_replicas_identical(&addrs);
    assert_same("replica content vs source image", &data, &image);
}

/// qemu-img convert into the export (over the TCP listener) and out of it
/// (over the unix socket), qemu-img compare.
#[test]
fn qemu_img_convert_and_compare() {
    let _serial = serial();
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempdir();
    let size = 32 * MIB;
    let replicas = start_replicas(tmp.path(), 3, "32M");
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let mut engine = Engine::start_with(
        tmp.path(),
        "qvol",
        "32M",
        &addrs,
        &["--nbd", "tcp:127.0.0.1:0"],
    );
    let uri = engine.uri();
    // Data goes in over TCP and is checked over the unix socket.
    let tcp_uri = engine.tcp_uri();
    assert!(
        !engine.tcp.as_ref().unwrap().ends_with(":0"),
        "ready line shows no real TCP port: {}",
        engine.ready_line
    );
    assert_eq!(nbdinfo(&tcp_uri)["export-size"].as_u64(), Some(size));

    // Half random data, a zero hole, then more data.
    let mut image = pattern(rand_u64(), size as usize);
    image[(8 * MIB) as usize..(16 * MIB) as usize].fill(0);
    let src = tmp.path().join("src.img");
    write_file(&src, &image);
    run(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&tcp_uri),
        LONG,
    )
    .expect_ok();
    run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
        LONG,
    )
    .expect_ok();
    let out = tmp.path().join("out.img");
    run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&out),
        LONG,
    )
    .expect_ok();
    assert_same(
        "qemu-img convert output",
        &std::fs::read(&out).unwrap(),
        &image,
    );

    // A one-byte difference is noticed by qemu-img compare (exit 1).
    let mut other = image.clone();
    other[(20 * MIB) as usize] ^= 0xff;
    let other_path = tmp.path().join("other.img");
    write_file(&other_path, &other);
    let r = run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&other_path)
            .arg(&uri),
        LONG,
    );
    assert_eq!(
        r.status.code(),
        Some(1),
        "qemu-img compare: {} {}",
        r.stdout,
        r.stderr
    );

    engine.stop();
    let data = assert_replicas_identical(&addrs);
    assert_same("replica content vs source image", &data, &image);
}
