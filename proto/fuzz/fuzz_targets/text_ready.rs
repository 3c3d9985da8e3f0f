//! `ReplicaReady::parse` and `EngineReady::parse` (the ready lines the
//! agent, the tests and the benchmarks read from a child's stdout) on any
//! text, and their `Display` on values made from it.
//!
//! Properties: parsing never panics; a line that parses, printed again,
//! parses to the same value; a value within the format's contract (a
//! replica directory of any text, addresses and names without spaces, at
//! least one NBD listener) is printed as a line that parses back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zebu_proto::ready::{EngineReady, ReplicaReady};
use zebu_proto_fuzz::write_seeds;

fn replica(dir: &str) -> ReplicaReady {
    ReplicaReady {
        dir: dir.into(),
        address: "127.0.0.1:4000".into(),
        id: "5abeba00-2592-48f9-85d2-0f1be81805dd".into(),
        size_bytes: 1 << 30,
        block_size: 4096,
        io_engine: "uring".into(),
        clean: true,
    }
}

fn engine(volume: &str, nbd: Vec<String>) -> EngineReady {
    EngineReady {
        volume: volume.into(),
        nbd,
        control: "127.0.0.1:9000".into(),
        epoch: 7,
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let nbd = vec![
        "unix:/run/zebu/pvc-1.sock".into(),
        "tcp:127.0.0.1:10809".into(),
    ];
    [
        replica("/var/lib/zebu/d 1/on (id x").to_string(),
        engine("pvc-1", nbd).to_string(),
    ]
    .map(String::into_bytes)
    .to_vec()
}

/// A name without spaces or commas made of `s`, or `default` where none is left.
fn token(s: &str, default: &str) -> String {
    let t: String = s
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ',')
        .collect();
    if t.is_empty() { default.into() } else { t }
}

fuzz_target!(init: write_seeds(seeds()), |data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(r) = ReplicaReady::parse(line) {
        assert_eq!(ReplicaReady::parse(&r.to_string()), Some(r));
    }
    if let Some(e) = EngineReady::parse(line) {
        assert_eq!(EngineReady::parse(&e.to_string()), Some(e));
    }
    // Values from the text: NUL separates the fields.
    let mut fields = line.split('\0');
    let mut next = || fields.next().unwrap_or_default();
    let (dir, address, id, io_engine) = (next(), next(), next(), next());
    let r = ReplicaReady {
        address: token(address, "a:1"),
        id: token(id, "id"),
        size_bytes: data.len() as u64 * 4096,
        block_size: line.chars().count() as u32,
        io_engine: token(io_engine, "threads"),
        clean: data.len().is_multiple_of(2),
        ..replica(dir)
    };
    assert_eq!(ReplicaReady::parse(&r.to_string()), Some(r));
    let (volume, listeners, control) = (next(), next(), next());
    let nbd = listeners.split(',').map(|l| format!("unix:{}", token(l, "/s"))).collect();
    let e = EngineReady {
        control: token(control, "c:1"),
        epoch: data.len() as u64,
        ..engine(&token(volume, "v"), nbd)
    };
    assert_eq!(EngineReady::parse(&e.to_string()), Some(e));
});
