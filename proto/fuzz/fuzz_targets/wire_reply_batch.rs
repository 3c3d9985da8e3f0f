//! `wire::decode_reply_batch` (the engine's decoding of the replica's
//! `IoReplyBatch` replies) on any bytes, cut into any frames, and
//! `wire::reply_batch_frames`, the replica's encoder, on what it decodes.
//!
//! Properties: decoding never panics; where the frames are cut changes
//! nothing; it accepts exactly what prost accepts, with the same fields;
//! what it decodes, framed by `reply_batch_frames`, is byte for byte what
//! prost encodes (one gRPC message, its prefix included) and decodes back
//! to the same replies.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use zebu_proto::replica as pb;
use zebu_proto::wire::{decode_reply_batch, message_prefix, reply_batch_frames};
use zebu_proto_fuzz::{Framed, agree_with_prost, one_message, write_seeds};

fn seeds() -> Vec<Vec<u8>> {
    let batch = pb::IoReplyBatch {
        responses: vec![
            pb::IoResponse {
                id: 1,
                payload: Bytes::from_static(b"read data"),
                crc32: 0xdead_beef,
                ..Default::default()
            },
            pb::IoResponse {
                id: 2,
                status: pb::IoStatus::IoOutOfRange as i32,
                message: "out of range".into(),
                ..Default::default()
            },
        ],
    };
    let frames = reply_batch_frames(&batch).expect("a small batch").concat();
    // Without the gRPC prefix: the decoder takes the message.
    vec![
        Framed::input(&frames[5..], &[]),
        Framed::input(&frames[5..], &[2, 9]),
    ]
}

fuzz_target!(init: write_seeds(seeds()), |data: &[u8]| {
    let input = Framed::new(data);
    let ours = decode_reply_batch(input.whole());
    assert_eq!(decode_reply_batch(input.split()), ours, "the frames' cuts matter");
    agree_with_prost(&ours, &pb::IoReplyBatch::decode(input.stream.clone()).map(|b| b.responses));
    let Ok(responses) = ours else {
        return;
    };
    let batch = pb::IoReplyBatch { responses };
    let frames = reply_batch_frames(&batch).expect("under 4 GiB");
    let mut want = message_prefix(batch.encoded_len()).expect("under 4 GiB").to_vec();
    want.extend(batch.encode_to_vec());
    assert_eq!(frames.concat(), want, "framed as prost encodes");
    let again = decode_reply_batch(one_message(frames)).expect("our own framing decodes");
    assert_eq!(again, batch.responses);
});
