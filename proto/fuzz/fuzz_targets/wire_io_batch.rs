//! `wire::decode_batch` (the replica's decoding of the engine's `IoBatch`
//! requests, in place over h2's frames) on any bytes, cut into any frames.
//!
//! Properties: decoding never panics; where the frames are cut changes
//! nothing; it accepts exactly what prost (tonic's codec) accepts and
//! decodes the same fields; every payload is a view of the input's bytes;
//! what it decodes, encoded again, decodes to the same requests.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use zebu_proto::replica as pb;
use zebu_proto::wire::{IoRequest, decode_batch};
use zebu_proto_fuzz::{Framed, agree_with_prost, assert_views, whole, write_seeds};

fn seeds() -> Vec<Vec<u8>> {
    let write = pb::IoRequest {
        id: 1,
        op: pb::Op::Write as i32,
        offset: 4096,
        length: 8,
        payload: Bytes::from_static(b"8 bytes!"),
        crc32: 0x1234_5678,
        revision: 3,
        epoch: 2,
        alone: true,
    };
    let read = pb::IoRequest {
        id: u64::MAX,
        op: pb::Op::Read as i32,
        length: 4096,
        ..Default::default()
    };
    let batch = pb::IoBatch {
        requests: vec![write, read],
    }
    .encode_to_vec();
    vec![
        Framed::input(&[], &[]),
        Framed::input(&batch, &[]),
        Framed::input(&batch, &[3, 20, 21]),
    ]
}

/// The request as prost's type, for comparing.
fn to_pb(r: &IoRequest) -> pb::IoRequest {
    pb::IoRequest {
        id: r.id,
        op: r.op,
        offset: r.offset,
        length: r.length,
        payload: r.payload.to_bytes(),
        crc32: r.crc32,
        revision: r.revision,
        epoch: r.epoch,
        alone: r.alone,
    }
}

fuzz_target!(init: write_seeds(seeds()), |data: &[u8]| {
    let input = Framed::new(data);
    let as_pb = |rs: &Vec<IoRequest>| rs.iter().map(to_pb).collect::<Vec<_>>();
    let split = decode_batch(input.split());
    let ours = decode_batch(input.whole()).map(|rs| as_pb(&rs));
    assert_eq!(split.as_ref().map(as_pb), ours.as_ref().cloned(), "the frames' cuts matter");
    agree_with_prost(&ours, &pb::IoBatch::decode(input.stream.clone()).map(|b| b.requests));
    let (Ok(split), Ok(ours)) = (split, ours) else {
        return;
    };
    assert_views(&input.stream, split.iter().flat_map(|r| r.payload.chunks()));
    let again = pb::IoBatch { requests: ours.clone() }.encode_to_vec();
    let again = decode_batch(whole(again.into())).expect("our own re-encoding decodes");
    assert_eq!(as_pb(&again), ours);
});
