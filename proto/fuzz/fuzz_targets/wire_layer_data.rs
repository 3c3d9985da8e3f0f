//! `wire::decode_layer_data` (a rebuild's decoding of the `LayerData`
//! chunks it pulls from a peer) on any bytes, cut into any frames, and
//! `wire::layer_data_frames`, the peer's encoder, on what it decodes.
//!
//! Properties: decoding never panics; where the frames are cut changes
//! nothing; it accepts exactly what prost accepts, with the same fields; the
//! data is a view of the input's bytes; a chunk's offset, CRC and data,
//! framed by `layer_data_frames`, are one gRPC message that decodes back to
//! them.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use zebu_proto::replica as pb;
use zebu_proto::wire::{LayerData, decode_layer_data, layer_data_frames};
use zebu_proto_fuzz::{Framed, agree_with_prost, assert_views, one_message, write_seeds};

fn seeds() -> Vec<Vec<u8>> {
    let [head, data] = layer_data_frames(1 << 20, 0x0bad_cafe, Bytes::from_static(b"layer bytes"))
        .expect("a small chunk");
    let chunk = [&head[5..], &data[..]].concat();
    let first = pb::LayerData {
        layer: "head-3".into(),
        epoch: 4,
        session: 9,
        punch_length: 1 << 16,
        ..Default::default()
    }
    .encode_to_vec();
    vec![
        Framed::input(&chunk, &[]),
        Framed::input(&chunk, &[4]),
        Framed::input(&first, &[]),
    ]
}

/// The chunk as prost's type, for comparing.
fn to_pb(m: &LayerData) -> pb::LayerData {
    pb::LayerData {
        layer: m.layer.clone(),
        offset: m.offset,
        data: m.data.to_bytes(),
        crc32: m.crc32,
        punch_length: m.punch_length,
        epoch: m.epoch,
        session: m.session,
    }
}

fuzz_target!(init: write_seeds(seeds()), |data: &[u8]| {
    let input = Framed::new(data);
    let split = decode_layer_data(input.split());
    let ours = decode_layer_data(input.whole()).map(|m| to_pb(&m));
    assert_eq!(split.as_ref().map(to_pb), ours.as_ref().cloned(), "the frames' cuts matter");
    agree_with_prost(&ours, &pb::LayerData::decode(input.stream.clone()));
    let (Ok(split), Ok(ours)) = (split, ours) else {
        return;
    };
    assert_views(&input.stream, split.data.chunks());
    let frames = layer_data_frames(ours.offset, ours.crc32, ours.data.clone()).expect("< 4 GiB");
    let again = decode_layer_data(one_message(frames)).expect("our own framing decodes");
    let (offset, crc32, data) = (ours.offset, ours.crc32, ours.data);
    let want = pb::LayerData { offset, crc32, data, ..Default::default() };
    assert_eq!(to_pb(&again), want);
});
