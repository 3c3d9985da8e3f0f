//! What the wire and text fuzz targets share: their seed inputs, and a fuzz
//! input read as a message and the HTTP/2 frames it arrived in.

use bytes::Bytes;
use zebu_proto::wire::{MessageReader, Segments, WireError};

/// Writes `seeds` (valid inputs made by the code's own encoders) into the
/// directory `ZEBU_FUZZ_SEEDS` names, if set, as `seed-0`, `seed-1`, …: a
/// target's `init` runs before libFuzzer reads the corpus `.ci/fuzz` names.
pub fn write_seeds(seeds: impl IntoIterator<Item = Vec<u8>>) {
    if let Some(dir) = std::env::var_os("ZEBU_FUZZ_SEEDS").map(std::path::PathBuf::from) {
        std::fs::create_dir_all(&dir).expect("creating the seed directory");
        for (i, seed) in seeds.into_iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed).expect("writing a seed");
        }
    }
}

/// A fuzz input as a byte stream and the frames that carried it: the low
/// three bits of byte 0 count the cuts, each a big-endian `u16` offset into
/// the stream (modulo its length + 1) that follow; the rest is the stream.
#[derive(Debug)]
pub struct Framed {
    /// The bytes, in one buffer that every frame is a slice of.
    pub stream: Bytes,
    cuts: Vec<usize>,
}

impl Framed {
    /// Reads `data` as above; an input too short for its cuts has fewer.
    pub fn new(data: &[u8]) -> Framed {
        let count = data.first().map_or(0, |b| usize::from(b & 7));
        let cuts_end = (1 + 2 * count).min(data.len());
        let stream = Bytes::copy_from_slice(data.get(cuts_end..).unwrap_or_default());
        let mut cuts: Vec<usize> = data
            .get(1..cuts_end)
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|c| usize::from(u16::from_be_bytes([c[0], c[1]])) % (stream.len() + 1))
            .collect();
        cuts.sort_unstable();
        Framed { stream, cuts }
    }

    /// The input that makes `stream` arrive in frames cut at `cuts` (at most
    /// seven of them, each under 65536): a seed.
    pub fn input(stream: &[u8], cuts: &[u16]) -> Vec<u8> {
        assert!(cuts.len() < 8, "at most seven cuts");
        let mut data = vec![cuts.len() as u8];
        data.extend(cuts.iter().flat_map(|c| c.to_be_bytes()));
        data.extend(stream);
        data
    }

    /// The frames, in order: slices of [`Framed::stream`] (some may be empty).
    pub fn frames(&self) -> Vec<Bytes> {
        let mut at = 0;
        let mut frames = Vec::with_capacity(self.cuts.len() + 1);
        for &cut in self.cuts.iter().chain([&self.stream.len()]) {
            frames.push(self.stream.slice(at..cut));
            at = cut;
        }
        frames
    }

    /// The stream as its frames.
    pub fn split(&self) -> Segments {
        let mut s = Segments::default();
        for f in self.frames() {
            s.push(f);
        }
        s
    }

    /// The stream in one piece.
    pub fn whole(&self) -> Segments {
        whole(self.stream.clone())
    }
}

/// `bytes` as one frame.
pub fn whole(bytes: Bytes) -> Segments {
    let mut s = Segments::default();
    s.push(bytes);
    s
}

/// Asserts that our decoding of a message and prost's (tonic's codec)
/// agree: both refuse it, or both decode the same value. Only prost may
/// refuse at its recursion limit, which counts nested messages as well as
/// groups, where ours counts the groups of one message.
pub fn agree_with_prost<T: PartialEq + std::fmt::Debug>(
    ours: &Result<T, WireError>,
    theirs: &Result<T, prost::DecodeError>,
) {
    match (ours, theirs) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        (Ok(_), Err(e)) if e.to_string().contains("recursion limit") => {}
        _ => panic!("prost decodes {theirs:?}, we decode {ours:?}"),
    }
}

/// Asserts that every chunk lies within `stream`: a view, not a copy.
pub fn assert_views<'a>(stream: &Bytes, chunks: impl IntoIterator<Item = &'a Bytes>) {
    let base = stream.as_ptr_range();
    for chunk in chunks {
        let at = chunk.as_ptr_range();
        assert!(
            base.start <= at.start && at.end <= base.end,
            "a copy, not a view of the input"
        );
    }
}

/// The one gRPC message `frames` hold, read by [`MessageReader`] as the
/// data path reads it: nothing before, after or around it.
pub fn one_message(frames: impl IntoIterator<Item = Bytes>) -> Segments {
    let mut reader = MessageReader::new(usize::MAX);
    for f in frames {
        reader.push(f);
    }
    let message = reader
        .next_message()
        .expect("valid")
        .expect("one whole message");
    assert!(
        reader.next_message().expect("valid").is_none(),
        "one message only"
    );
    reader.finish().expect("nothing left over");
    message
}
