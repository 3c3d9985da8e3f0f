//! The FUSE file passes a loop device's queue on: with fio writing at QD32
//! through a loop device with direct I/O over the file (as a node attaches a
//! volume), the backend holds 32 writes at once. With fuser's default of 16
//! background requests, the kernel lets no more than 16 reach the backend,
//! and the loop device's worker sleeps until one is answered.
//!
//! The backend answers no write until it holds [`DEPTH`] of them; then it
//! answers them all and every later one at once. The test fails if the
//! kernel never lets that many through (after [`zebu_testkit::DEADLINE`],
//! when the held writes are answered so fio can finish).

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use zebu_fuse_file::{Backend, ReplyData, ReplyEmpty, ReplyWrite};
use zebu_testkit::{Bg, DEADLINE, LONG, LoopDev, MIB, require_tool};

/// The writes fio keeps in flight, and the backend waits to hold at once.
const DEPTH: usize = 32;
/// The file's size.
const SIZE: u64 = 64 * MIB;

/// Holds writes until it has [`DEPTH`] of them (see the module docs).
#[derive(Default)]
struct Gate {
    state: Mutex<Held>,
    changed: Condvar,
}

#[derive(Default)]
struct Held {
    /// Writes not answered yet, with their lengths.
    writes: Vec<(ReplyWrite, u32)>,
    /// The most writes held at once.
    most: usize,
    /// Every write is answered at once from now on.
    open: bool,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers every held write and every later one at once.
    fn open(&self) {
        let held = {
            let mut s = self.lock();
            s.open = true;
            std::mem::take(&mut s.writes)
        };
        for (reply, len) in held {
            reply.written(len);
        }
        self.changed.notify_all();
    }

    /// Waits until the gate opened or `deadline` passed; the most writes held.
    fn wait_open(&self, deadline: Instant) -> usize {
        let mut s = self.lock();
        while !s.open {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        s.most
    }
}

impl Backend for Gate {
    fn size(&self) -> u64 {
        SIZE
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, _offset: u64, len: u64, reply: ReplyData) {
        reply.data(&vec![0; len as usize]);
    }

    fn write(&self, _offset: u64, data: &[u8], reply: ReplyWrite) {
        let len = data.len() as u32;
        let full = {
            let mut s = self.lock();
            if s.open {
                drop(s);
                reply.written(len);
                return;
            }
            s.writes.push((reply, len));
            s.most = s.most.max(s.writes.len());
            s.writes.len() >= DEPTH
        };
        if full {
            self.open();
        }
    }

    fn flush(&self, reply: ReplyEmpty) {
        reply.ok();
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, reply: ReplyEmpty) {
        reply.ok();
    }
}

/// Unmounts the file when dropped (declared before the loop device, so it
/// drops after it, on success and on panic alike).
struct Unmount(zebu_fuse_file::Unmounter);

impl Drop for Unmount {
    fn drop(&mut self) {
        self.0.unmount();
    }
}

#[test]
fn a_loop_devices_queue_reaches_the_backend_in_parallel() {
    require_tool("fio", "fio");
    require_tool("losetup", "util-linux");
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("fm").join("disk");
    std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");

    let gate = Arc::new(Gate::default());
    let mut mounted =
        zebu_fuse_file::mount(gate.clone(), &file, "zebu-test").expect("mounting the file");
    let unmount = Unmount(mounted.unmounter());
    let session = std::thread::spawn(move || mounted.run());

    let dev = LoopDev::attach_direct(&file);
    // Random 4 KiB writes, so the block layer merges none of them.
    let mut fio = Command::new("fio");
    fio.args([
        "--name=depth",
        "--ioengine=libaio",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--norandommap",
        &format!("--iodepth={DEPTH}"),
        &format!("--size={SIZE}"),
        &format!("--number_ios={}", DEPTH * 4),
        &format!("--filename={}", dev.dev),
    ]);
    let fio = Bg::spawn(&mut fio);

    let most = gate.wait_open(Instant::now() + DEADLINE);
    // Let fio finish whatever happened.
    gate.open();
    let run = fio.wait(LONG);
    drop(dev);
    drop(unmount);
    session
        .join()
        .expect("the session thread")
        .expect("serving the file");
    run.expect_ok();
    assert!(
        most >= DEPTH,
        "the backend never held more than {most} of fio's {DEPTH} writes at once: \
         the kernel holds the rest back (FUSE max_background)"
    );
}
