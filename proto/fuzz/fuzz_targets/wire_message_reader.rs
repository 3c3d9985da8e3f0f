//! `wire::MessageReader`, which splits every data-path stream (both ends'
//! `Io` bodies, a rebuild's `ReadLayer` response) into gRPC messages, on any
//! bytes arriving in any frames, with a limit of 4 × byte 0.
//!
//! Properties: it never panics; it yields exactly the messages, error or
//! truncation that reading the stream in one piece by the gRPC framing
//! yields (a 5-byte prefix: a compressed flag that must be 0 and a
//! big-endian length no larger than the limit; then that many bytes), each
//! message as views of the frames; each prefix is what `message_prefix`
//! encodes for that length.
#![no_main]

use std::ops::Range;

use libfuzzer_sys::fuzz_target;
use zebu_proto::wire::{MessageReader, WireError, message_prefix};
use zebu_proto_fuzz::{Framed, assert_views, write_seeds};

fn seeds() -> Vec<Vec<u8>> {
    let mut stream = Vec::new();
    for body in [&b""[..], b"one message", &[7; 300]] {
        stream.extend(message_prefix(body.len()).expect("small"));
        stream.extend(body);
    }
    vec![
        [&[255][..], &Framed::input(&stream, &[])].concat(),
        [&[255][..], &Framed::input(&stream, &[1, 5, 6, 17, 200])].concat(),
        [&[2][..], &Framed::input(&stream[..20], &[])].concat(),
    ]
}

/// The messages of `stream` read in one piece (their ranges), and how it
/// ends: whole, with an error, or cut inside a message.
fn model(stream: &[u8], limit: usize) -> (Vec<Range<usize>>, Result<(), WireError>) {
    let mut messages = Vec::new();
    let mut at = 0;
    loop {
        let left = stream.len() - at;
        if left == 0 {
            return (messages, Ok(()));
        }
        if left < 5 {
            return (messages, Err(WireError::Truncated { missing: 5 - left }));
        }
        let prefix = &stream[at..at + 5];
        if prefix[0] != 0 {
            return (messages, Err(WireError::Compressed));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > limit {
            return (messages, Err(WireError::TooLarge { len, limit }));
        }
        if left - 5 < len {
            return (
                messages,
                Err(WireError::Truncated {
                    missing: len - (left - 5),
                }),
            );
        }
        assert_eq!(&message_prefix(len).expect("under 4 GiB")[..], prefix);
        messages.push(at + 5..at + 5 + len);
        at += 5 + len;
    }
}

fuzz_target!(init: write_seeds(seeds()), |data: &[u8]| {
    let Some((&limit, data)) = data.split_first() else {
        return;
    };
    let limit = usize::from(limit) * 4;
    let input = Framed::new(data);
    let mut reader = MessageReader::new(limit);
    let mut messages = Vec::new();
    let mut end = None;
    'frames: for frame in input.frames() {
        reader.push(frame);
        loop {
            match reader.next_message() {
                Ok(Some(m)) => messages.push(m),
                Ok(None) => break,
                Err(e) => {
                    end = Some(Err(e));
                    break 'frames;
                }
            }
        }
    }
    let end = end.unwrap_or_else(|| reader.finish());
    let (want, want_end) = model(&input.stream, limit);
    assert_eq!(end, want_end);
    assert_eq!(messages.len(), want.len());
    for (m, range) in messages.iter().zip(want) {
        assert_eq!(m.to_bytes(), input.stream[range]);
        assert_views(&input.stream, m.chunks());
    }
});
