//! The request side of a replica data stream: queued requests gathered into
//! `IoBatch` messages and framed as gRPC messages by hand, so that large
//! write payloads go to the HTTP/2 connection without being copied.
//!
//! tonic's encoder writes every message into one contiguous buffer, which
//! copies each payload once per replica: for a 1 MiB write to 3 replicas
//! that is 3 MiB of `memcpy` in the engine before the kernel copies it
//! again. Here a message is a list of chunks: the protobuf framing of every
//! request in one buffer, and each payload of at least
//! [`SHARED_PAYLOAD_BYTES`] bytes as a chunk of its own that shares the payload the
//! frontend received (a reference count, not a copy). h2 writes large DATA
//! frames with vectored writes straight from those chunks. Smaller payloads
//! are copied into the framing buffer, where one DATA frame per batch costs
//! less than a frame per payload.
//!
//! The bytes on the wire are an ordinary gRPC message stream of `IoBatch`
//! (uncompressed, length-prefixed); the replica decodes it with tonic.
//!
//! Invariants:
//! - A message never exceeds [`zebu_proto::MAX_MESSAGE_BYTES`]: a batch
//!   takes requests while their payloads fit in [`MAX_BATCH_PAYLOAD`], and a
//!   request that does not fit starts the next batch (one request alone is
//!   at most the frontend's 32 MiB).
//! - Requests are sent in the order they were queued.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tokio::sync::mpsc;

use zebu_proto::replica as pb;
use zebu_proto::wire::SHARED_PAYLOAD_BYTES;

/// Most requests in one batch message.
pub const MAX_BATCH: usize = 256;

/// Payload bytes after which a batch takes no further request.
pub const MAX_BATCH_PAYLOAD: usize = 16 << 20;

/// `IoBatch.requests`.
const BATCH_REQUESTS_FIELD: u32 = 1;
/// `IoRequest.payload`.
const REQUEST_PAYLOAD_FIELD: u32 = 5;

/// The request body of a data stream: gathers what is queued on `rx` into
/// `IoBatch` messages when the connection asks for data. It ends when every
/// sender is gone.
pub struct BatchBody {
    rx: mpsc::UnboundedReceiver<pb::IoRequest>,
    /// A request taken from `rx` that did not fit the previous batch.
    held: Option<pb::IoRequest>,
    /// Encoded chunks not yet handed to the connection.
    chunks: VecDeque<Bytes>,
}

impl BatchBody {
    /// A body sending what is queued on `rx`.
    pub fn new(rx: mpsc::UnboundedReceiver<pb::IoRequest>) -> BatchBody {
        BatchBody {
            rx,
            held: None,
            chunks: VecDeque::new(),
        }
    }

    /// Takes the next batch: everything queued, up to the limits.
    fn gather(&mut self, first: pb::IoRequest) -> Vec<pb::IoRequest> {
        let mut payload = first.payload.len();
        let mut batch = Vec::with_capacity(self.rx.len().min(MAX_BATCH - 1) + 1);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            let Ok(r) = self.rx.try_recv() else { break };
            if payload + r.payload.len() > MAX_BATCH_PAYLOAD {
                self.held = Some(r);
                break;
            }
            payload += r.payload.len();
            batch.push(r);
        }
        batch
    }
}

impl http_body::Body for BatchBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(c) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        let first = match self.held.take() {
            Some(r) => r,
            None => match ready!(self.rx.poll_recv(cx)) {
                Some(r) => r,
                None => return Poll::Ready(None),
            },
        };
        let batch = self.gather(first);
        encode(batch, &mut self.chunks);
        match self.chunks.pop_front() {
            Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
            None => Poll::Ready(None), // encode always yields a chunk
        }
    }
}

/// Length of `r` encoded with `payload` as its payload.
fn request_len(r: &pb::IoRequest, payload: usize) -> usize {
    r.encoded_len()
        + if payload > 0 {
            key_len(REQUEST_PAYLOAD_FIELD) + encoded_len_varint(payload as u64) + payload
        } else {
            0
        }
}

/// Appends one gRPC message holding `batch` to `out`, as chunks.
pub fn encode(batch: Vec<pb::IoRequest>, out: &mut VecDeque<Bytes>) {
    // The payloads are taken out of the requests; each request is encoded
    // without it and the payload field appended after the others (protobuf
    // allows fields in any order).
    let parts: Vec<(pb::IoRequest, Bytes, usize)> = batch
        .into_iter()
        .map(|mut r| {
            let payload = std::mem::take(&mut r.payload);
            let len = request_len(&r, payload.len());
            (r, payload, len)
        })
        .collect();
    // The message's length, and how much of it is copied into the framing
    // buffer (all but the payloads sent as chunks of their own).
    let (mut body, mut copied) = (0, 0);
    for (_, payload, len) in &parts {
        let framed = key_len(BATCH_REQUESTS_FIELD) + encoded_len_varint(*len as u64) + len;
        body += framed;
        copied += if payload.len() >= SHARED_PAYLOAD_BYTES {
            framed - payload.len()
        } else {
            framed
        };
    }
    let mut buf = BytesMut::with_capacity(5 + copied);
    buf.put_u8(0); // not compressed
    buf.put_u32(body as u32);
    for (r, payload, len) in parts {
        encode_key(BATCH_REQUESTS_FIELD, WireType::LengthDelimited, &mut buf);
        encode_varint(len as u64, &mut buf);
        r.encode_raw(&mut buf);
        if payload.is_empty() {
            continue;
        }
        encode_key(REQUEST_PAYLOAD_FIELD, WireType::LengthDelimited, &mut buf);
        encode_varint(payload.len() as u64, &mut buf);
        if payload.len() >= SHARED_PAYLOAD_BYTES {
            out.push_back(buf.split().freeze());
            out.push_back(payload);
        } else {
            buf.extend_from_slice(&payload);
        }
    }
    if !buf.is_empty() {
        out.push_back(buf.freeze());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: u64, payload: usize) -> pb::IoRequest {
        let payload: Bytes = (0..payload).map(|i| (i * 31 + id as usize) as u8).collect();
        pb::IoRequest {
            id,
            op: if payload.is_empty() {
                pb::Op::Read as i32
            } else {
                pb::Op::Write as i32
            },
            offset: id * 4096,
            length: payload.len().max(4096) as u32,
            crc32: crc32fast::hash(&payload),
            payload,
            revision: id + 7,
            epoch: 3,
            alone: id.is_multiple_of(2),
        }
    }

    /// Joins the chunks and decodes them as tonic would.
    fn decode(chunks: &VecDeque<Bytes>) -> pb::IoBatch {
        let all: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(all[0], 0, "uncompressed");
        let len = u32::from_be_bytes([all[1], all[2], all[3], all[4]]) as usize;
        assert_eq!(len, all.len() - 5, "the prefix gives the message length");
        pb::IoBatch::decode(&all[5..]).expect("a valid IoBatch")
    }

    #[test]
    fn a_batch_decodes_to_the_requests_sent() {
        for sizes in [
            vec![0],
            vec![4096],
            vec![4096, 0, 512, 4096],
            vec![1 << 20],
            vec![
                4096,
                1 << 20,
                0,
                SHARED_PAYLOAD_BYTES - 1,
                SHARED_PAYLOAD_BYTES,
                300,
            ],
            vec![0; 200],
        ] {
            let batch: Vec<pb::IoRequest> = sizes
                .iter()
                .enumerate()
                .map(|(i, &s)| req(i as u64 + 1, s))
                .collect();
            let mut out = VecDeque::new();
            encode(batch.clone(), &mut out);
            assert_eq!(decode(&out).requests, batch, "sizes {sizes:?}");
        }
    }

    #[test]
    fn large_payloads_are_shared_not_copied() {
        let big = req(1, 1 << 20);
        let small = req(2, 4096);
        let big_ptr = big.payload.as_ptr();
        let mut out = VecDeque::new();
        encode(vec![small.clone(), big, small], &mut out);
        assert_eq!(
            out.len(),
            3,
            "framing, the payload, the rest of the framing"
        );
        assert_eq!(
            out[1].as_ptr(),
            big_ptr,
            "the 1 MiB payload is the caller's bytes"
        );
        assert_eq!(out[1].len(), 1 << 20);
    }

    #[tokio::test]
    async fn batches_keep_order_and_stay_within_the_message_limit() {
        use http_body_util::BodyExt;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut sent = Vec::new();
        // 5 x 32 MiB (more than one message may carry), then small ones
        // (more than MAX_BATCH of them).
        for i in 0..5 {
            sent.push(req(i, 32 << 20));
        }
        for i in 5..(5 + MAX_BATCH as u64 + 10) {
            sent.push(req(i, 4096));
        }
        for r in &sent {
            tx.send(r.clone()).unwrap();
        }
        drop(tx);
        let mut body = BatchBody::new(rx);
        let mut stream = Vec::new();
        while let Some(frame) = body.frame().await {
            stream.extend_from_slice(frame.unwrap().data_ref().unwrap());
        }
        let mut got = Vec::new();
        let mut at = 0;
        let mut messages = 0;
        while at < stream.len() {
            let len = u32::from_be_bytes(stream[at + 1..at + 5].try_into().unwrap()) as usize;
            assert!(
                len <= zebu_proto::MAX_MESSAGE_BYTES,
                "message of {len} bytes"
            );
            let batch = pb::IoBatch::decode(&stream[at + 5..at + 5 + len]).unwrap();
            assert!(batch.requests.len() <= MAX_BATCH);
            got.extend(batch.requests);
            at += 5 + len;
            messages += 1;
        }
        assert!(messages >= 5, "{messages} messages");
        assert_eq!(got, sent);
    }
}
