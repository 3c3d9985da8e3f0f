//! The data path's gRPC messages decoded from HTTP/2 frames without
//! gathering them into one buffer first, and read data sent without copying
//! it.
//!
//! tonic copies every DATA frame of a request stream into a contiguous
//! buffer before decoding a message, and the replica then copies each write
//! payload again into an aligned buffer for O_DIRECT. Here the frames stay
//! as they arrived from h2 (slices of its receive buffer, not copies): a
//! gRPC message is a list of frame slices ([`Segments`]), its `IoBatch` is
//! parsed in place, and a write payload is copied once, from the frame
//! slices straight into its aligned buffer.
//!
//! The same is done for the `LayerData` stream a rebuild pulls from a peer
//! replica ([`messages`], [`decode_layer_data`]): tonic's decode buffer grows by
//! reallocating, which copied every 1 MiB chunk up to twice more before the
//! copy into its aligned buffer (31% of the pulling replica's samples).
//!
//! The engine decodes the replies of the data stream the same way
//! ([`decode_reply_batch`]), so a read payload reaches it as a slice of
//! the frame that carried it.
//!
//! The source of that stream sends each chunk the other way round
//! ([`layer_data_frames`]): the message's fields as one frame and the data
//! as the next, straight from the buffer it was read into; tonic's encoder
//! copied it into a growing encode buffer first. The data stream's reply
//! batches go out the same way ([`reply_batch_frames`]): large read
//! payloads as frames of their own.
//!
//! The wire format is the ordinary gRPC message stream of `IoBatch` or
//! `LayerData` (`proto/proto/replica.proto`), so any gRPC peer can speak it;
//! only compressed messages are refused.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes};

use crate::replica as pb;

/// Why a request stream could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// A message's compressed flag is set.
    #[error("compressed messages are not supported on the data stream; send them uncompressed")]
    Compressed,
    /// A message is longer than the limit.
    #[error("message of {len} bytes is larger than the limit of {limit} bytes")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The protobuf encoding is invalid.
    #[error("invalid protobuf message: {0}")]
    Invalid(&'static str),
    /// The stream ended inside a message.
    #[error("the stream ended inside a message ({missing} bytes missing)")]
    Truncated {
        /// Bytes the message still needed.
        missing: usize,
    },
}

/// Bytes held as a list of shared chunks.
#[derive(Clone, Debug, Default)]
pub struct Segments {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Segments {
    /// Total length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a chunk (empty chunks are dropped).
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.chunks.push_back(b);
        }
    }

    /// The chunks, in order.
    pub fn chunks(&self) -> impl Iterator<Item = &Bytes> {
        self.chunks.iter()
    }

    /// Splits off the first `n` bytes (sharing the chunks, not copying).
    fn split_to(&mut self, n: usize) -> Result<Segments, WireError> {
        if n > self.len {
            return Err(WireError::Invalid(
                "a field runs past the end of its message",
            ));
        }
        let mut out = Segments::default();
        let mut left = n;
        while left > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                if let Some(c) = self.chunks.pop_front() {
                    out.push(c);
                }
            } else {
                out.push(front.split_to(left));
                left = 0;
            }
        }
        self.len -= n;
        Ok(out)
    }

    fn get_u8(&mut self) -> Result<u8, WireError> {
        let front = self.chunks.front_mut().ok_or(WireError::Invalid(
            "a field runs past the end of its message",
        ))?;
        let b = front[0];
        front.advance(1);
        if front.is_empty() {
            self.chunks.pop_front();
        }
        self.len -= 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.get_u8()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                // The tenth byte holds bit 63 alone: more would not fit, and
                // protobuf parsers (prost among them) refuse it.
                if i == 9 && b > 1 {
                    return Err(WireError::Invalid("a varint overflows 64 bits"));
                }
                return Ok(v);
            }
        }
        Err(WireError::Invalid("a varint is longer than 10 bytes"))
    }

    /// Copies everything into `out` (exactly `self.len()` bytes long).
    pub fn copy_to(&self, out: &mut [u8]) {
        let mut at = 0;
        for c in &self.chunks {
            out[at..at + c.len()].copy_from_slice(c);
            at += c.len();
        }
    }

    /// One contiguous `Bytes` (free when there is a single chunk).
    pub fn to_bytes(&self) -> Bytes {
        match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks[0].clone(),
            _ => {
                let mut v = vec![0; self.len];
                self.copy_to(&mut v);
                Bytes::from(v)
            }
        }
    }
}

/// One request of an `IoBatch`, its payload as received.
#[derive(Clone, Debug, Default)]
pub struct IoRequest {
    /// `IoRequest.id`.
    pub id: u64,
    /// `IoRequest.op` (an `Op` value).
    pub op: i32,
    /// `IoRequest.offset`.
    pub offset: u64,
    /// `IoRequest.length`.
    pub length: u32,
    /// `IoRequest.payload`.
    pub payload: Segments,
    /// `IoRequest.crc32`.
    pub crc32: u32,
    /// `IoRequest.revision`.
    pub revision: u64,
    /// `IoRequest.epoch`.
    pub epoch: u64,
    /// `IoRequest.alone`.
    pub alone: bool,
}

impl From<pb::IoRequest> for IoRequest {
    fn from(r: pb::IoRequest) -> IoRequest {
        let mut payload = Segments::default();
        payload.push(r.payload);
        IoRequest {
            id: r.id,
            op: r.op,
            offset: r.offset,
            length: r.length,
            payload,
            crc32: r.crc32,
            revision: r.revision,
            epoch: r.epoch,
            alone: r.alone,
        }
    }
}

/// One `LayerData` message of a rebuild's copy, its data as received.
#[derive(Clone, Debug, Default)]
pub struct LayerData {
    /// `LayerData.layer`.
    pub layer: String,
    /// `LayerData.offset`.
    pub offset: u64,
    /// `LayerData.data`.
    pub data: Segments,
    /// `LayerData.crc32`.
    pub crc32: u32,
    /// `LayerData.punch_length`.
    pub punch_length: u64,
    /// `LayerData.epoch`.
    pub epoch: u64,
    /// `LayerData.session`.
    pub session: u64,
}

impl From<pb::LayerData> for LayerData {
    fn from(m: pb::LayerData) -> LayerData {
        let mut data = Segments::default();
        data.push(m.data);
        LayerData {
            layer: m.layer,
            offset: m.offset,
            data,
            crc32: m.crc32,
            punch_length: m.punch_length,
            epoch: m.epoch,
            session: m.session,
        }
    }
}

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

const START_GROUP: u64 = 3;
const END_GROUP: u64 = 4;
/// Deepest nesting of (deprecated) groups skipped, as prost allows.
const MAX_DEPTH: u32 = 100;

/// Skips an unknown field (groups included, as protobuf parsers must).
fn skip(buf: &mut Segments, field: u64, wire_type: u64, depth: u32) -> Result<(), WireError> {
    match wire_type {
        VARINT => buf.varint().map(drop),
        FIXED64 => buf.split_to(8).map(drop),
        LEN => {
            let n = len_of(buf)?;
            buf.split_to(n).map(drop)
        }
        FIXED32 => buf.split_to(4).map(drop),
        START_GROUP => {
            if depth >= MAX_DEPTH {
                return Err(WireError::Invalid("groups nested too deeply"));
            }
            loop {
                let (f, w) = key(buf)?;
                if w == END_GROUP {
                    return if f == field {
                        Ok(())
                    } else {
                        Err(WireError::Invalid(
                            "a group ends with another field's number",
                        ))
                    };
                }
                skip(buf, f, w, depth + 1)?;
            }
        }
        END_GROUP => Err(WireError::Invalid("a group ends that never started")),
        _ => Err(WireError::Invalid("unsupported wire type")),
    }
}

fn len_of(buf: &mut Segments) -> Result<usize, WireError> {
    let n = buf.varint()?;
    usize::try_from(n).map_err(|_| WireError::Invalid("a length does not fit in memory"))
}

fn key(buf: &mut Segments) -> Result<(u64, u64), WireError> {
    let k = buf.varint()?;
    // Keys are 32 bits (field numbers end at 2^29 - 1), as prost checks.
    if k > u64::from(u32::MAX) {
        return Err(WireError::Invalid("a field key is larger than 32 bits"));
    }
    let field = k >> 3;
    if field == 0 {
        return Err(WireError::Invalid("field number 0"));
    }
    Ok((field, k & 7))
}

fn expect(wire_type: u64, want: u64) -> Result<(), WireError> {
    if wire_type == want {
        Ok(())
    } else {
        Err(WireError::Invalid("a known field has the wrong wire type"))
    }
}

/// Decodes an `IoBatch` message.
pub fn decode_batch(buf: Segments) -> Result<Vec<IoRequest>, WireError> {
    decode_repeated(buf, decode_request)
}

/// The messages of a batch's repeated field 1 (its only field), each
/// decoded by `one`.
fn decode_repeated<T>(
    mut buf: Segments,
    one: fn(Segments) -> Result<T, WireError>,
) -> Result<Vec<T>, WireError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (field, wt) = key(&mut buf)?;
        if field == 1 {
            expect(wt, LEN)?;
            let n = len_of(&mut buf)?;
            out.push(one(buf.split_to(n)?)?);
        } else {
            skip(&mut buf, field, wt, 0)?;
        }
    }
    Ok(out)
}

fn decode_request(mut buf: Segments) -> Result<IoRequest, WireError> {
    let mut r = IoRequest::default();
    while !buf.is_empty() {
        let (field, wt) = key(&mut buf)?;
        match field {
            1..=4 | 6..=9 => {
                expect(wt, VARINT)?;
                let v = buf.varint()?;
                match field {
                    1 => r.id = v,
                    2 => r.op = v as i32,
                    3 => r.offset = v,
                    4 => r.length = v as u32,
                    6 => r.crc32 = v as u32,
                    7 => r.revision = v,
                    8 => r.epoch = v,
                    // prost reads any non-zero varint as true.
                    _ => r.alone = v != 0,
                }
            }
            5 => {
                expect(wt, LEN)?;
                let n = len_of(&mut buf)?;
                r.payload = buf.split_to(n)?;
            }
            _ => skip(&mut buf, field, wt, 0)?,
        }
    }
    Ok(r)
}

/// Decodes an `IoReplyBatch` message into the generated responses. A
/// payload that lies within one frame (a large read payload has a frame of
/// its own: [`reply_batch_frames`]; small ones share their batch's frame) is
/// a slice of h2's receive buffer, not a copy; tonic's decoder copied every
/// message into a buffer it grew by reallocating.
pub fn decode_reply_batch(buf: Segments) -> Result<Vec<pb::IoResponse>, WireError> {
    decode_repeated(buf, decode_response)
}

fn decode_response(mut buf: Segments) -> Result<pb::IoResponse, WireError> {
    let mut r = pb::IoResponse::default();
    while !buf.is_empty() {
        let (field, wt) = key(&mut buf)?;
        match field {
            1 | 2 | 5 => {
                expect(wt, VARINT)?;
                let v = buf.varint()?;
                match field {
                    1 => r.id = v,
                    2 => r.status = v as i32,
                    _ => r.crc32 = v as u32,
                }
            }
            3 | 4 => {
                expect(wt, LEN)?;
                let n = len_of(&mut buf)?;
                let value = buf.split_to(n)?.to_bytes();
                if field == 4 {
                    r.payload = value;
                } else {
                    r.message = String::from_utf8(value.to_vec())
                        .map_err(|_| WireError::Invalid("a message is not UTF-8"))?;
                }
            }
            _ => skip(&mut buf, field, wt, 0)?,
        }
    }
    Ok(r)
}

/// Decodes a `LayerData` message.
pub fn decode_layer_data(mut buf: Segments) -> Result<LayerData, WireError> {
    let mut m = LayerData::default();
    while !buf.is_empty() {
        let (field, wt) = key(&mut buf)?;
        match field {
            1 | 3 => {
                expect(wt, LEN)?;
                let n = len_of(&mut buf)?;
                let value = buf.split_to(n)?;
                if field == 3 {
                    m.data = value;
                } else {
                    m.layer = String::from_utf8(value.to_bytes().to_vec())
                        .map_err(|_| WireError::Invalid("a layer name is not UTF-8"))?;
                }
            }
            2 | 4..=7 => {
                expect(wt, VARINT)?;
                let v = buf.varint()?;
                match field {
                    2 => m.offset = v,
                    4 => m.crc32 = v as u32,
                    5 => m.punch_length = v,
                    6 => m.epoch = v,
                    _ => m.session = v,
                }
            }
            _ => skip(&mut buf, field, wt, 0)?,
        }
    }
    Ok(m)
}

/// The data stream's method path.
pub const IO_PATH: &str = "/zebu.replica.v1.Replica/Io";
/// Request header of an `Io` stream naming the data-stream session that the
/// replica's `Open` returned (`ReplicaInfo.session`); a stream without it,
/// or of a superseded session, is refused.
pub const SESSION_HEADER: &str = "zebu-session";
/// The `ReadLayer` method's path.
pub const READ_LAYER_PATH: &str = "/zebu.replica.v1.Replica/ReadLayer";

/// Payloads at least this long are sent as HTTP/2 frames of their own,
/// sharing the payload's buffer; shorter ones are copied in with their
/// message's fields, which costs less than a frame. Both ends use it: the
/// engine for write payloads, the replica for read payloads.
pub const SHARED_PAYLOAD_BYTES: usize = 64 << 10;

/// The 5-byte prefix of an uncompressed gRPC message of `len` bytes; fails
/// for a message over 4 GiB, which the prefix cannot express.
pub fn message_prefix(len: usize) -> Result<[u8; 5], WireError> {
    let len32 = u32::try_from(len).map_err(|_| WireError::TooLarge {
        len,
        limit: u32::MAX as usize,
    })?;
    let [a, b, c, d] = len32.to_be_bytes();
    Ok([0, a, b, c, d])
}

/// One `LayerData` message of a `ReadLayer` response, `data` at `offset`
/// with its CRC: the message's gRPC prefix and fields before the data, then
/// `data` itself. Sent as two DATA frames, the payload goes to the socket
/// from the buffer it was read into instead of being copied into an encode
/// buffer first. The fields are ordinary protobuf (data last), so any gRPC
/// client decodes them. Fails only for a message over 4 GiB, which the
/// prefix cannot express.
pub fn layer_data_frames(offset: u64, crc32: u32, data: Bytes) -> Result<[Bytes; 2], WireError> {
    use prost::encoding::{WireType, encode_key, encode_varint, uint32, uint64};
    let mut head = bytes::BytesMut::with_capacity(32);
    head.put_bytes(0, 5); // the prefix, filled in below
    uint64::encode(2, &offset, &mut head);
    uint32::encode(4, &crc32, &mut head);
    encode_key(3, WireType::LengthDelimited, &mut head);
    encode_varint(data.len() as u64, &mut head);
    let prefix = message_prefix(head.len() - 5 + data.len())?;
    head[..5].copy_from_slice(&prefix);
    Ok([head.freeze(), data])
}

/// One `IoReplyBatch` gRPC message as frames: byte for byte what prost
/// encodes (prefix included), except that each read payload of at least
/// [`SHARED_PAYLOAD_BYTES`] is its own frame, the buffer it was read into,
/// instead of being copied into an encode buffer. Fails only for a message
/// over 4 GiB, which the prefix cannot express.
pub fn reply_batch_frames(batch: &pb::IoReplyBatch) -> Result<Vec<Bytes>, WireError> {
    use prost::Message;
    use prost::encoding::{WireType, encode_key, encode_varint, int32, string, uint32, uint64};
    let len = batch.encoded_len();
    let prefix = message_prefix(len)?;
    let shared: usize = batch
        .responses
        .iter()
        .map(|r| r.payload.len())
        .filter(|&n| n >= SHARED_PAYLOAD_BYTES)
        .sum();
    let mut frames = Vec::new();
    let mut head = bytes::BytesMut::with_capacity(5 + len - shared);
    head.put_slice(&prefix);
    for r in &batch.responses {
        encode_key(1, WireType::LengthDelimited, &mut head);
        encode_varint(r.encoded_len() as u64, &mut head);
        // Fields in number order and defaults left out, as prost does.
        if r.id != 0 {
            uint64::encode(1, &r.id, &mut head);
        }
        if r.status != 0 {
            int32::encode(2, &r.status, &mut head);
        }
        if !r.message.is_empty() {
            string::encode(3, &r.message, &mut head);
        }
        if !r.payload.is_empty() {
            encode_key(4, WireType::LengthDelimited, &mut head);
            encode_varint(r.payload.len() as u64, &mut head);
            if r.payload.len() >= SHARED_PAYLOAD_BYTES {
                frames.push(head.split().freeze());
                frames.push(r.payload.clone());
            } else {
                head.put_slice(&r.payload);
            }
        }
        if r.crc32 != 0 {
            uint32::encode(5, &r.crc32, &mut head);
        }
    }
    if !head.is_empty() {
        frames.push(head.freeze());
    }
    Ok(frames)
}

/// The gRPC messages of an HTTP/2 body as they arrive, each as the frame
/// slices that hold it; `what` names the stream in errors ("decoding
/// {what}: ..."). A response body (`response`) ends with trailers carrying
/// the call's status: an error status ends the stream with that error, and
/// a response that ends without a status is an error too. A request body
/// just ends; trailers on it are ignored.
pub fn messages(
    body: tonic::body::Body,
    what: &'static str,
    response: bool,
) -> impl futures::Stream<Item = Result<Segments, tonic::Status>> + Send {
    use http_body_util::BodyExt;
    let status = move |e| status(what, e);
    let reader = MessageReader::new(crate::MAX_MESSAGE_BYTES);
    futures::stream::unfold(Some((body, reader)), move |state| async move {
        let (mut body, mut reader) = state?;
        loop {
            match reader.next_message() {
                Ok(Some(message)) => return Some((Ok(message), Some((body, reader)))),
                Ok(None) => {}
                Err(e) => return Some((Err(status(e)), None)),
            }
            let end = match body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        reader.push(data);
                        continue;
                    }
                    Err(frame) if response => match frame.into_trailers() {
                        Ok(trailers) => match tonic::Status::from_header_map(&trailers) {
                            Some(s) if s.code() != tonic::Code::Ok => Err(s),
                            Some(_) => reader.finish().map_err(status),
                            None => Err(tonic::Status::internal(format!(
                                "{what} ended with trailers that carry no gRPC status"
                            ))),
                        },
                        Err(_) => continue,
                    },
                    Err(_) => continue,
                },
                Some(Err(s)) => Err(s),
                None if response => Err(tonic::Status::internal(format!(
                    "{what} ended without a gRPC status"
                ))),
                None => reader.finish().map_err(status),
            };
            return end.err().map(|e| (Err(e), None));
        }
    })
}

/// The status of a stream, named by `what`, that cannot be decoded.
pub fn status(what: &str, e: WireError) -> tonic::Status {
    tonic::Status::invalid_argument(format!("decoding {what}: {e}"))
}

/// Splits a gRPC message stream into messages as its frames arrive.
#[derive(Debug)]
pub struct MessageReader {
    buf: Segments,
    /// The length of the message whose prefix was read.
    body: Option<usize>,
    limit: usize,
}

impl MessageReader {
    /// A reader refusing messages longer than `limit`.
    pub fn new(limit: usize) -> MessageReader {
        MessageReader {
            buf: Segments::default(),
            body: None,
            limit,
        }
    }

    /// Adds a DATA frame.
    pub fn push(&mut self, frame: Bytes) {
        self.buf.push(frame);
    }

    /// The next complete message, if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Segments>, WireError> {
        if self.body.is_none() {
            if self.buf.len() < 5 {
                return Ok(None);
            }
            let prefix = self.buf.split_to(5)?.to_bytes();
            if prefix[0] != 0 {
                return Err(WireError::Compressed);
            }
            let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
            if len > self.limit {
                return Err(WireError::TooLarge {
                    len,
                    limit: self.limit,
                });
            }
            self.body = Some(len);
        }
        match self.body {
            Some(len) if self.buf.len() >= len => {
                self.body = None;
                self.buf.split_to(len).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Checks that the stream did not end inside a message.
    pub fn finish(&self) -> Result<(), WireError> {
        let missing = match self.body {
            Some(len) => len - self.buf.len(),
            None if self.buf.is_empty() => return Ok(()),
            None => 5 - self.buf.len(),
        };
        Err(WireError::Truncated { missing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    fn segments(data: &[u8], cuts: &[usize]) -> Segments {
        let data = Bytes::copy_from_slice(data);
        let mut s = Segments::default();
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        cuts.sort();
        for c in cuts {
            s.push(data.slice(at..c));
            at = c;
        }
        s.push(data.slice(at..));
        s
    }

    fn same(a: &IoRequest, b: &pb::IoRequest) -> bool {
        a.id == b.id
            && a.op == b.op
            && a.offset == b.offset
            && a.length == b.length
            && a.payload.to_bytes() == b.payload
            && a.crc32 == b.crc32
            && a.revision == b.revision
            && a.epoch == b.epoch
            && a.alone == b.alone
    }

    fn request() -> impl Strategy<Value = pb::IoRequest> {
        (
            any::<u64>(),
            -3i32..8,
            any::<u64>(),
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..300),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
        )
            .prop_map(
                |(id, op, offset, length, payload, crc32, revision, epoch, alone)| pb::IoRequest {
                    id,
                    op,
                    offset,
                    length,
                    payload: payload.into(),
                    crc32,
                    revision,
                    epoch,
                    alone,
                },
            )
    }

    proptest! {
        #[test]
        fn decodes_what_prost_encodes_however_the_frames_split_it(
            reqs in prop::collection::vec(request(), 0..6),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let wire = pb::IoBatch { requests: reqs.clone() }.encode_to_vec();
            let got = decode_batch(segments(&wire, &cuts)).unwrap();
            prop_assert_eq!(got.len(), reqs.len());
            for (g, w) in got.iter().zip(&reqs) {
                prop_assert!(same(g, w), "{:?} vs {:?}", g, w);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_agree_with_prost(
            data in prop::collection::vec(any::<u8>(), 0..64),
            cuts in prop::collection::vec(any::<usize>(), 0..4),
        ) {
            let ours = decode_batch(segments(&data, &cuts));
            if let Ok(theirs) = pb::IoBatch::decode(&data[..]) {
                let ours = ours.expect("prost accepted it");
                prop_assert_eq!(ours.len(), theirs.requests.len());
                for (g, w) in ours.iter().zip(&theirs.requests) {
                    prop_assert!(same(g, w));
                }
            }
        }

        #[test]
        fn layer_data_decodes_as_prost_encodes_it_however_the_frames_split_it(
            layer in "[a-z0-9.-]{0,12}",
            offset in any::<u64>(),
            data in prop::collection::vec(any::<u8>(), 0..300),
            crc32 in any::<u32>(),
            punch_length in any::<u64>(),
            epoch in any::<u64>(),
            session in any::<u64>(),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let m = pb::LayerData { layer, offset, data: data.into(), crc32, punch_length, epoch, session };
            let got = decode_layer_data(segments(&m.encode_to_vec(), &cuts)).unwrap();
            prop_assert_eq!(
                (&got.layer, got.offset, got.data.to_bytes(), got.crc32, got.punch_length, got.epoch, got.session),
                (&m.layer, m.offset, m.data.clone(), m.crc32, m.punch_length, m.epoch, m.session)
            );
        }

        #[test]
        fn layer_data_frames_are_one_grpc_message_that_prost_and_the_pull_decode(
            offset in any::<u64>(),
            data in prop::collection::vec(any::<u8>(), 0..300),
            crc32 in any::<u32>(),
        ) {
            let data = Bytes::from(data);
            let [head, rest] = layer_data_frames(offset, crc32, data.clone()).unwrap();
            prop_assert!(rest.as_ptr() == data.as_ptr(), "the payload is not copied");
            let mut reader = MessageReader::new(crate::MAX_MESSAGE_BYTES);
            reader.push(head);
            reader.push(rest);
            let message = reader.next_message().unwrap().expect("one whole message");
            prop_assert!(reader.next_message().unwrap().is_none());
            reader.finish().unwrap();
            let want = pb::LayerData { offset, data: data.clone(), crc32, ..Default::default() };
            prop_assert_eq!(pb::LayerData::decode(message.to_bytes()).unwrap(), want);
            let got = decode_layer_data(message).unwrap();
            prop_assert_eq!((got.offset, got.data.to_bytes(), got.crc32), (offset, data, crc32));
        }

        #[test]
        fn reply_batch_frames_are_what_prost_encodes_with_large_payloads_shared(
            responses in prop::collection::vec(
                (
                    any::<u64>(),
                    -2i32..8,
                    "[a-z ]{0,20}",
                    prop_oneof![0usize..64, Just(SHARED_PAYLOAD_BYTES - 1), SHARED_PAYLOAD_BYTES..SHARED_PAYLOAD_BYTES + 300],
                    any::<u32>(),
                ),
                0..5,
            ),
        ) {
            let batch = pb::IoReplyBatch {
                responses: responses
                    .into_iter()
                    .map(|(id, status, message, n, crc32)| pb::IoResponse {
                        id,
                        status,
                        message,
                        payload: (0..n).map(|i| (i * 7 + n) as u8).collect::<Vec<u8>>().into(),
                        crc32,
                    })
                    .collect(),
            };
            let frames = reply_batch_frames(&batch).unwrap();
            let mut want = vec![0u8];
            want.extend((batch.encoded_len() as u32).to_be_bytes());
            want.extend(batch.encode_to_vec());
            prop_assert_eq!(frames.concat(), want);
            // Large payloads are their own frames, the very buffers given.
            for r in batch.responses.iter().filter(|r| r.payload.len() >= SHARED_PAYLOAD_BYTES) {
                prop_assert!(frames.iter().any(|f| f.as_ptr() == r.payload.as_ptr() && f.len() == r.payload.len()));
            }
        }

        #[test]
        fn reply_batches_decode_as_prost_encodes_them_however_the_frames_split_them(
            responses in prop::collection::vec(
                (any::<u64>(), -3i32..8, "[a-z ]{0,20}", prop::collection::vec(any::<u8>(), 0..300), any::<u32>()),
                0..6,
            ),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let batch = pb::IoReplyBatch {
                responses: responses
                    .into_iter()
                    .map(|(id, status, message, payload, crc32)| pb::IoResponse {
                        id, status, message, payload: payload.into(), crc32,
                    })
                    .collect(),
            };
            let got = decode_reply_batch(segments(&batch.encode_to_vec(), &cuts)).unwrap();
            prop_assert_eq!(got, batch.responses);
        }

        #[test]
        fn arbitrary_reply_bytes_never_panic_and_agree_with_prost(
            data in prop::collection::vec(any::<u8>(), 0..64),
            cuts in prop::collection::vec(any::<usize>(), 0..4),
        ) {
            let ours = decode_reply_batch(segments(&data, &cuts));
            if let Ok(theirs) = pb::IoReplyBatch::decode(&data[..]) {
                prop_assert_eq!(ours.expect("prost accepted it"), theirs.responses);
            }
        }

        #[test]
        fn arbitrary_layer_data_bytes_never_panic_and_agree_with_prost(
            data in prop::collection::vec(any::<u8>(), 0..64),
            cuts in prop::collection::vec(any::<usize>(), 0..4),
        ) {
            let ours = decode_layer_data(segments(&data, &cuts));
            if let Ok(m) = pb::LayerData::decode(&data[..]) {
                let got = ours.expect("prost accepted it");
                prop_assert_eq!(
                    (got.layer, got.offset, got.data.to_bytes(), got.crc32, got.punch_length, got.epoch),
                    (m.layer, m.offset, m.data, m.crc32, m.punch_length, m.epoch)
                );
            }
        }

        #[test]
        fn messages_come_out_whole_across_any_frames(
            bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..100), 1..5),
            cuts in prop::collection::vec(any::<usize>(), 0..10),
        ) {
            let mut stream = Vec::new();
            for b in &bodies {
                stream.push(0);
                stream.extend((b.len() as u32).to_be_bytes());
                stream.extend(b);
            }
            let mut reader = MessageReader::new(1000);
            let mut got = Vec::new();
            for frame in segments(&stream, &cuts).chunks() {
                reader.push(frame.clone());
                while let Some(m) = reader.next_message().unwrap() {
                    got.push(m.to_bytes().to_vec());
                }
            }
            reader.finish().unwrap();
            prop_assert_eq!(got, bodies);
        }
    }

    #[test]
    fn a_payload_split_across_frames_is_shared_not_copied() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let wire = pb::IoBatch {
            requests: vec![pb::IoRequest {
                id: 9,
                op: pb::Op::Write as i32,
                length: 10_000,
                payload: payload.clone().into(),
                ..Default::default()
            }],
        }
        .encode_to_vec();
        let segs = segments(&wire, &[3000, 7000]);
        let first_chunk = segs.chunks().nth(1).unwrap().as_ptr();
        let got = decode_batch(segs).unwrap();
        let p = &got[0].payload;
        assert_eq!(p.len(), 10_000);
        assert!(p.chunks().count() >= 2);
        assert!(
            p.chunks().any(|c| c.as_ptr() == first_chunk),
            "a frame slice, not a copy"
        );
        let mut flat = vec![0; p.len()];
        p.copy_to(&mut flat);
        assert_eq!(flat, payload);
    }

    #[test]
    fn a_large_read_payload_is_decoded_as_the_frame_it_was_sent_in() {
        let big: Bytes = (0..(1u32 << 20))
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into();
        let batch = pb::IoReplyBatch {
            responses: vec![
                pb::IoResponse {
                    id: 1,
                    payload: vec![7; 4096].into(),
                    crc32: 5,
                    ..Default::default()
                },
                pb::IoResponse {
                    id: 2,
                    payload: big.clone(),
                    crc32: 9,
                    ..Default::default()
                },
                pb::IoResponse {
                    id: 3,
                    status: 4,
                    message: "no".into(),
                    ..Default::default()
                },
            ],
        };
        let mut reader = MessageReader::new(crate::MAX_MESSAGE_BYTES);
        let frames = reply_batch_frames(&batch).unwrap();
        // As h2 hands them over: each frame its own buffer, not copies.
        let sent: Vec<Bytes> = frames.iter().map(|f| Bytes::from(f.to_vec())).collect();
        let big_frame = sent
            .iter()
            .find(|f| f.len() == big.len())
            .expect("the payload's frame");
        let big_at = big_frame.as_ptr();
        for f in sent {
            reader.push(f);
        }
        let message = reader.next_message().unwrap().expect("one whole message");
        let got = decode_reply_batch(message).unwrap();
        assert_eq!(got, batch.responses);
        assert_eq!(
            got[1].payload.as_ptr(),
            big_at,
            "a slice of the frame, not a copy"
        );
    }

    #[test]
    fn bad_streams_get_errors_that_say_what_is_wrong() {
        let mut r = MessageReader::new(100);
        r.push(Bytes::from_static(&[1, 0, 0, 0, 1, 0]));
        assert_eq!(r.next_message().unwrap_err(), WireError::Compressed);
        let mut r = MessageReader::new(100);
        r.push(Bytes::from_static(&[0, 0, 0, 1, 0]));
        let e = r.next_message().unwrap_err();
        assert!(
            e.to_string()
                .contains("256 bytes is larger than the limit of 100"),
            "{e}"
        );
        let mut r = MessageReader::new(100);
        r.push(Bytes::from_static(&[0, 0, 0, 0, 10, 1, 2]));
        assert!(r.next_message().unwrap().is_none());
        assert_eq!(r.finish().unwrap_err(), WireError::Truncated { missing: 8 });
        // A request whose payload claims more bytes than the message holds.
        let e = decode_batch(segments(&[0x0a, 3, 0x2a, 9, 1], &[])).unwrap_err();
        assert!(e.to_string().contains("runs past the end"), "{e}");
        // A known field with the wrong wire type.
        let e = decode_batch(segments(&[0x0a, 2, 0x0d, 1], &[])).unwrap_err();
        assert!(e.to_string().contains("wrong wire type"), "{e}");
    }

    /// Found by the fuzz target `wire_layer_data` (`proto/fuzz`): bytes
    /// prost refuses were decoded, a key over 32 bits as an unknown field
    /// and a varint over 64 bits as its low 64 bits.
    #[test]
    fn keys_over_32_bits_and_varints_over_64_bits_are_refused_as_prost_refuses_them() {
        // Field 2^32 (key 2^35, a varint), value 0.
        let key = [0x80, 0x80, 0x80, 0x80, 0x80, 0x01, 0x00];
        // Field 2 (`offset`), ten bytes whose last carries bits 63 and 64.
        let offset = [
            0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
        ];
        for (bad, what) in [
            (&key[..], "larger than 32 bits"),
            (&offset, "overflows 64 bits"),
        ] {
            assert!(pb::LayerData::decode(bad).is_err());
            let e = decode_layer_data(segments(bad, &[])).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
            let e = decode_reply_batch(segments(&[&[0x0a, bad.len() as u8], bad].concat(), &[3]));
            assert!(e.unwrap_err().to_string().contains(what));
        }
        // The largest of each still decodes: field 2^29 - 1, and u64::MAX.
        let last = [0xf8, 0xff, 0xff, 0xff, 0x0f, 0x00];
        assert_eq!(decode_layer_data(segments(&last, &[])).unwrap().offset, 0);
        let max = [
            0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        assert_eq!(
            decode_layer_data(segments(&max, &[])).unwrap().offset,
            u64::MAX
        );
    }
}
