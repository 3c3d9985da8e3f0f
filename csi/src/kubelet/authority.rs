//! An HTTP/2 shim that makes the kubelet's registration calls acceptable to
//! tonic.
//!
//! The kubelet (1.34 and earlier) dials a plugin's registration socket with
//! grpc-go and no authority override, so every request carries the socket's
//! *path* as `:authority` (`/var/lib/kubelet/plugins_registry/...`). That is
//! not a valid URI authority, and the `h2` server under tonic rejects the
//! stream with PROTOCOL_ERROR before any service sees it (kubernetes#108254;
//! the kubelet fixed the same for CSI calls, not for registration). The
//! node-driver-registrar sidecar is written in Go and never noticed.
//!
//! So each accepted connection is relayed to the tonic server over an
//! in-process pipe; on the way in, every header block is decoded with the
//! connection's HPACK state, `:authority` becomes `localhost`, and the block
//! is re-encoded as literals without indexing (so the server's decoding
//! table never diverges from what it was sent). Everything else — the
//! preface, SETTINGS, DATA, every frame the server sends back — passes
//! through byte for byte.
//!
//! Invariant: a connection this shim cannot parse is closed, never
//! forwarded half-rewritten.

use httlib_hpack::{Decoder, Encoder};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE's
/// initial value); re-encoded blocks are split to fit.
const MAX_FRAME: usize = 16_384;
/// Largest header block accepted from the client.
const MAX_BLOCK: usize = 1 << 20;
/// What `:authority` becomes.
const AUTHORITY: &[u8] = b"localhost";

/// Why a connection was closed.
#[derive(Debug, Error)]
pub enum ShimError {
    /// Reading or writing either side failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The client does not speak HTTP/2.
    #[error("the client did not open with the HTTP/2 preface")]
    Preface,
    /// A frame broke HTTP/2's framing rules.
    #[error("malformed frame: {0}")]
    Frame(&'static str),
    /// A header block is not valid HPACK.
    #[error("undecodable header block: {0:?}")]
    Hpack(httlib_hpack::DecoderError),
    /// A header field could not be encoded again.
    #[error("header block could not be re-encoded: {0:?}")]
    Encode(httlib_hpack::EncoderError),
}

/// Relays `client` (the kubelet) to `server` (tonic) and back until either
/// side closes, rewriting `:authority` on the way in.
pub async fn relay<C, S>(client: C, server: S) -> Result<(), ShimError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut server_rd, mut server_wr) = tokio::io::split(server);
    let inbound = rewrite(&mut client_rd, &mut server_wr);
    let outbound = async {
        tokio::io::copy(&mut server_rd, &mut client_wr).await?;
        client_wr.shutdown().await?;
        Ok::<_, ShimError>(())
    };
    // Whichever direction ends first ends the connection.
    tokio::select! {
        r = inbound => r,
        r = outbound => r,
    }
}

/// Copies frames from `rd` to `wr`, rewriting every header block.
async fn rewrite<R, W>(rd: &mut R, wr: &mut W) -> Result<(), ShimError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    rd.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(ShimError::Preface);
    }
    wr.write_all(&preface).await?;
    let mut decoder = Decoder::default();
    // A header block being collected: stream, flags of its HEADERS frame, bytes.
    let mut block: Option<(u32, u8, Vec<u8>)> = None;
    loop {
        let mut head = [0u8; FRAME_HEADER];
        match rd.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                wr.shutdown().await?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        rd.read_exact(&mut payload).await?;
        match (kind, &mut block) {
            (HEADERS, None) => {
                let fragment = headers_fragment(&payload, flags)?;
                block = Some((stream, flags, fragment.to_vec()));
            }
            (CONTINUATION, Some((s, _, bytes))) if *s == stream => {
                bytes.extend_from_slice(&payload);
            }
            (_, Some(_)) => {
                return Err(ShimError::Frame(
                    "a header block interrupted by another frame",
                ));
            }
            (CONTINUATION, None) => return Err(ShimError::Frame("CONTINUATION without HEADERS")),
            _ => {
                wr.write_all(&head).await?;
                wr.write_all(&payload).await?;
                continue;
            }
        }
        if block.as_ref().is_some_and(|(_, _, b)| b.len() > MAX_BLOCK) {
            return Err(ShimError::Frame("header block too large"));
        }
        if flags & END_HEADERS == 0 {
            continue;
        }
        let Some((stream, first_flags, bytes)) = block.take() else {
            continue;
        };
        let encoded = rewrite_block(&mut decoder, bytes)?;
        write_headers(wr, stream, first_flags & END_STREAM, &encoded).await?;
    }
}

/// The header block fragment of a HEADERS frame's payload (without padding
/// and priority fields).
fn headers_fragment(payload: &[u8], flags: u8) -> Result<&[u8], ShimError> {
    let mut p = payload;
    let mut pad = 0usize;
    if flags & PADDED != 0 {
        let (&n, rest) = p
            .split_first()
            .ok_or(ShimError::Frame("empty padded HEADERS"))?;
        pad = usize::from(n);
        p = rest;
    }
    if flags & PRIORITY != 0 {
        p = p
            .get(5..)
            .ok_or(ShimError::Frame("short priority fields"))?;
    }
    let keep = p
        .len()
        .checked_sub(pad)
        .ok_or(ShimError::Frame("padding longer than the frame"))?;
    Ok(&p[..keep])
}

/// Decodes a header block, replaces `:authority` and encodes it again as
/// literals without indexing.
fn rewrite_block(decoder: &mut Decoder<'_>, mut bytes: Vec<u8>) -> Result<Vec<u8>, ShimError> {
    let mut fields = Vec::new();
    decoder
        .decode(&mut bytes, &mut fields)
        .map_err(ShimError::Hpack)?;
    let mut encoder = Encoder::with_dynamic_size(0);
    let mut out = Vec::new();
    for (name, value, _) in fields {
        let value = if name == b":authority" {
            AUTHORITY.to_vec()
        } else {
            value
        };
        encoder
            .encode_literal(name, value, 0x0, &mut out)
            .map_err(ShimError::Encode)?;
    }
    Ok(out)
}

/// Writes `block` as one HEADERS frame and as many CONTINUATION frames as
/// it needs.
async fn write_headers<W: AsyncWrite + Unpin>(
    wr: &mut W,
    stream: u32,
    end_stream: u8,
    block: &[u8],
) -> Result<(), ShimError> {
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut first = true;
    // An empty block still needs its HEADERS frame.
    let empty: &[u8] = &[];
    if chunks.peek().is_none() {
        return write_frame(wr, HEADERS, end_stream | END_HEADERS, stream, empty).await;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let (kind, mut flags) = if first {
            (HEADERS, end_stream)
        } else {
            (CONTINUATION, 0)
        };
        if last {
            flags |= END_HEADERS;
        }
        write_frame(wr, kind, flags, stream, chunk).await?;
        first = false;
    }
    Ok(())
}

async fn write_frame<W: AsyncWrite + Unpin>(
    wr: &mut W,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> Result<(), ShimError> {
    let len = payload.len();
    let mut head = [0u8; FRAME_HEADER];
    head[0] = (len >> 16) as u8;
    head[1] = (len >> 8) as u8;
    head[2] = len as u8;
    head[3] = kind;
    head[4] = flags;
    head[5..9].copy_from_slice(&stream.to_be_bytes());
    wr.write_all(&head).await?;
    wr.write_all(payload).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(fields: &[(&[u8], &[u8])], enc: &mut Encoder<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in fields {
            // With incremental indexing and Huffman, as grpc-go sends them.
            enc.encode((n.to_vec(), v.to_vec(), 0x1 | 0x2 | 0x4 | 0x10), &mut out)
                .unwrap();
        }
        out
    }

    fn decode(block: &[u8], dec: &mut Decoder<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut b = block.to_vec();
        let mut out = Vec::new();
        dec.decode(&mut b, &mut out).unwrap();
        out.into_iter().map(|(n, v, _)| (n, v)).collect()
    }

    #[test]
    fn the_authority_is_replaced_and_indexed_fields_still_resolve() {
        let sock: &[u8] = b"/var/lib/kubelet/plugins_registry/zebu.csi.dev-reg.sock";
        let req = |path: &'static [u8]| -> Vec<(&'static [u8], &[u8])> {
            vec![
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path),
                (b":authority", sock),
                (b"content-type", b"application/grpc"),
            ]
        };
        let (mut client, mut shim, mut server) =
            (Encoder::default(), Decoder::default(), Decoder::default());
        // The second request refers to the first one's fields by dynamic index.
        for path in [
            &b"/pluginregistration.Registration/GetInfo"[..],
            &b"/pluginregistration.Registration/NotifyRegistrationStatus"[..],
        ] {
            let block = encode(&req(path), &mut client);
            let out = rewrite_block(&mut shim, block).unwrap();
            let seen = decode(&out, &mut server);
            assert!(seen.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
            assert!(seen.contains(&(b":path".to_vec(), path.to_vec())));
            assert!(seen.contains(&(b"content-type".to_vec(), b"application/grpc".to_vec())));
        }
    }

    #[test]
    fn padding_and_priority_are_stripped() {
        // PADDED | PRIORITY: pad length 2, 5 priority bytes, fragment, padding.
        let payload = [2, 0, 0, 0, 0, 16, 0xaa, 0xbb, 0, 0];
        assert_eq!(
            headers_fragment(&payload, PADDED | PRIORITY).unwrap(),
            &[0xaa, 0xbb]
        );
        assert!(headers_fragment(&[9, 1], PADDED).is_err());
    }

    #[tokio::test]
    async fn frames_pass_through_and_blocks_are_split_to_fit() {
        let mut input = PREFACE.to_vec();
        // A SETTINGS frame passes unchanged.
        input.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        let mut enc = Encoder::default();
        let big = vec![b'x'; 20_000];
        let block = encode(
            &[(b":authority", b"/some/path"), (b"x-big", &big)],
            &mut enc,
        );
        // Sent as HEADERS + CONTINUATION.
        let (a, b) = block.split_at(10);
        let mut w = Vec::new();
        write_frame(&mut w, HEADERS, END_STREAM, 1, a)
            .await
            .unwrap();
        write_frame(&mut w, CONTINUATION, END_HEADERS, 1, b)
            .await
            .unwrap();
        input.extend_from_slice(&w);
        let mut out = Vec::new();
        rewrite(&mut &input[..], &mut out).await.unwrap();
        assert_eq!(&out[..24], PREFACE);
        assert_eq!(&out[24..33], &[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        // Re-read what came out: HEADERS (END_STREAM) then CONTINUATION(s).
        let mut rest = &out[33..];
        let mut block = Vec::new();
        let mut kinds = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            assert!(len <= MAX_FRAME);
            kinds.push((rest[3], rest[4]));
            block.extend_from_slice(&rest[9..9 + len]);
            rest = &rest[9 + len..];
        }
        assert_eq!(kinds[0], (HEADERS, END_STREAM));
        assert_eq!(kinds.last().unwrap().1 & END_HEADERS, END_HEADERS);
        let seen = decode(&block, &mut Decoder::default());
        assert_eq!(seen[0], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(seen[1].1.len(), 20_000);
    }
}
