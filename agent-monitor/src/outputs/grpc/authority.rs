//! Makes the Unix socket usable from gRPC clients that send the socket path as the HTTP/2
//! `:authority`.
//!
//! grpc-core (Python `grpcio`, and the C++, Ruby, PHP clients) names a `unix:///path`
//! target's authority after the path, percent-encoded (`tmp%2Fx.sock`); grpc-java sends
//! the path itself. Neither is an RFC 3986 authority, and the HTTP/2 layer under tonic (h2)
//! resets every such request with PROTOCOL_ERROR before any of our code sees it, with no
//! option to relax the check. Over a Unix socket the authority names nothing (the socket
//! file is the address), so this layer, between the socket and the HTTP/2 server, replaces
//! an invalid `:authority` with `localhost` in every request header block the client sends.
//!
//! Rewriting a header means decoding the block with the client's HPACK context and
//! encoding it again with a context of our own, which the server's decoder then follows:
//! the two compression contexts (client → us, us → server) are kept separately, so the
//! dynamic-table indices of each stay right whatever is rewritten. Everything but request
//! header blocks (HEADERS and CONTINUATION frames) passes through unchanged, and the
//! server's direction is not touched at all.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a client sends first on an HTTP/2 connection (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload a client may send and we may emit: the server advertises no
/// SETTINGS_MAX_FRAME_SIZE, so the protocol's initial value holds.
const MAX_FRAME: usize = 16_384;
/// The dynamic table size the server advertises (none: the protocol's initial 4,096), and
/// so the most the client's encoder may use.
const HEADER_TABLE_SIZE: usize = 4_096;
/// Largest header block accepted across HEADERS and CONTINUATION frames; the server
/// would refuse more anyway (hyper's default header list limit is 16 KiB).
const MAX_BLOCK: usize = 256 * 1024;
/// What an invalid `:authority` becomes.
const REPLACEMENT: &[u8] = b"localhost";

/// Why a connection's client stream could not be rewritten; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// A frame's declared length exceeds the protocol's maximum frame size.
    #[error("HTTP/2 frame of {0} bytes exceeds the maximum frame size")]
    FrameTooLarge(usize),
    /// HEADERS padding or priority fields do not fit in the frame.
    #[error("malformed HEADERS frame")]
    MalformedHeaders,
    /// A header block was interrupted by another frame than its CONTINUATION.
    #[error("header block interrupted by a frame of type {0:#x}")]
    Interrupted(u8),
    /// A header block grew past [`MAX_BLOCK`].
    #[error("header block larger than {MAX_BLOCK} bytes")]
    BlockTooLarge,
    /// The client's header block is not valid HPACK.
    #[error("undecodable header block: {0:?}")]
    Hpack(loona_hpack::decoder::DecoderError),
}

/// A request header block being collected.
struct Block {
    stream: u32,
    end_stream: bool,
    /// The HEADERS frame's priority fields (stream dependency and weight), kept as sent.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The client-to-server byte stream transformer (no I/O, so it can be tested alone).
pub(crate) struct Rewriter {
    /// Bytes of the preface still expected; `None` once it has been checked.
    preface: Option<usize>,
    /// Not HTTP/2 with prior knowledge: bytes pass through untouched (the server rejects
    /// them itself).
    passthrough: bool,
    /// Received bytes not yet forming a whole frame.
    pending: Vec<u8>,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
}

impl Rewriter {
    pub(crate) fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            preface: Some(0),
            passthrough: false,
            pending: Vec::new(),
            block: None,
            decoder,
            encoder: loona_hpack::Encoder::new(),
        }
    }

    /// Takes bytes the client sent, appends what the server should receive to `out`.
    pub(crate) fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        if self.passthrough {
            out.extend_from_slice(input);
            return Ok(());
        }
        if let Some(seen) = self.preface {
            let want = PREFACE.len() - seen;
            let n = want.min(input.len());
            if input[..n] != PREFACE[seen..seen + n] {
                self.passthrough = true;
                out.extend_from_slice(input);
                return Ok(());
            }
            out.extend_from_slice(&input[..n]);
            input = &input[n..];
            self.preface = (seen + n < PREFACE.len()).then_some(seen + n);
            if self.preface.is_some() {
                return Ok(());
            }
        }
        self.pending.extend_from_slice(input);
        let mut at = 0;
        while self.pending.len() - at >= FRAME_HEADER {
            let h = &self.pending[at..at + FRAME_HEADER];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            if len > MAX_FRAME {
                return Err(RewriteError::FrameTooLarge(len));
            }
            if self.pending.len() - at < FRAME_HEADER + len {
                break;
            }
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let frame = at..at + FRAME_HEADER + len;
            let payload = at + FRAME_HEADER..at + FRAME_HEADER + len;
            at += FRAME_HEADER + len;
            match (kind, self.block.is_some()) {
                (HEADERS, false) => {
                    let payload = &self.pending[payload];
                    let block = start_block(stream, flags, payload)?;
                    self.block = Some(block);
                }
                (CONTINUATION, true) => {
                    let block = self.block.as_mut().ok_or(RewriteError::Interrupted(kind))?;
                    if block.stream != stream {
                        return Err(RewriteError::Interrupted(kind));
                    }
                    block
                        .fragment
                        .extend_from_slice(&self.pending[payload.clone()]);
                    if block.fragment.len() > MAX_BLOCK {
                        return Err(RewriteError::BlockTooLarge);
                    }
                }
                (_, true) => return Err(RewriteError::Interrupted(kind)),
                (_, false) => {
                    out.extend_from_slice(&self.pending[frame]);
                    continue;
                }
            }
            if flags & END_HEADERS != 0 {
                if let Some(block) = self.block.take() {
                    self.emit(block, out)?;
                }
            }
        }
        self.pending.drain(..at);
        Ok(())
    }

    /// Decodes a whole header block, fixes `:authority`, and writes it as HEADERS (and
    /// CONTINUATION frames when it no longer fits in one).
    fn emit(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let mut fields = self
            .decoder
            .decode(&block.fragment)
            .map_err(RewriteError::Hpack)?;
        for (name, value) in fields.iter_mut() {
            if name.as_slice() == b":authority"
                && axum::http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                *value = REPLACEMENT.to_vec();
            }
        }
        let encoded = self
            .encoder
            .encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
        let first = (MAX_FRAME - priority.len()).min(encoded.len());
        let (head, mut rest) = encoded.split_at(first);
        let mut flags = if block.end_stream { END_STREAM } else { 0 };
        if block.priority.is_some() {
            flags |= PRIORITY;
        }
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        frame(out, HEADERS, flags, block.stream, &[priority, head]);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(MAX_FRAME.min(rest.len()));
            rest = tail;
            let flags = if rest.is_empty() { END_HEADERS } else { 0 };
            frame(out, CONTINUATION, flags, block.stream, &[chunk]);
        }
        Ok(())
    }
}

/// The block a HEADERS frame starts: its fragment without padding and priority fields.
fn start_block(stream: u32, flags: u8, payload: &[u8]) -> Result<Block, RewriteError> {
    let mut body = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, tail) = body.split_first().ok_or(RewriteError::MalformedHeaders)?;
        pad = usize::from(n);
        body = tail;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let fields: [u8; 5] = body
            .get(..5)
            .and_then(|p| p.try_into().ok())
            .ok_or(RewriteError::MalformedHeaders)?;
        priority = Some(fields);
        body = &body[5..];
    }
    let fragment = body
        .get(
            ..body
                .len()
                .checked_sub(pad)
                .ok_or(RewriteError::MalformedHeaders)?,
        )
        .ok_or(RewriteError::MalformedHeaders)?;
    Ok(Block {
        stream,
        end_stream: flags & END_STREAM != 0,
        priority,
        fragment: fragment.to_vec(),
    })
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    // At most MAX_FRAME by construction, so it fits the 24-bit length.
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// A client connection whose request header blocks pass through a [`Rewriter`].
#[derive(Debug)]
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet handed to the server, from `out_at` on.
    out: Vec<u8>,
    out_at: usize,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("passthrough", &self.passthrough)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            out_at: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_at < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_at);
                buf.put_slice(&this.out[this.out_at..this.out_at + n]);
                this.out_at += n;
                if this.out_at == this.out.len() {
                    this.out.clear();
                    this.out_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; 8192];
            let mut raw_buf = ReadBuf::new(&mut raw);
            match Pin::new(&mut this.inner).poll_read(cx, &mut raw_buf) {
                Poll::Ready(Ok(())) => {
                    let got = raw_buf.filled();
                    if got.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    this.rewriter
                        .feed(got, &mut this.out)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    // A partial frame produced nothing yet: read on.
                }
                other => return other,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> S::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoded header list.
    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    /// Splits a stream of frames (after the preface) into (type, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = (usize::from(bytes[0]) << 16)
                | (usize::from(bytes[1]) << 8)
                | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    fn headers(stream: u32, flags: u8, block: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame(&mut out, HEADERS, flags, stream, &[block]);
        out
    }

    /// What a client sends: the preface, SETTINGS, two requests whose `:authority` is a
    /// percent-encoded socket path (the second refers to the first's dynamic-table entry),
    /// a request with a valid authority, the first split over a CONTINUATION with padding
    /// and priority fields, and a DATA frame in between.
    fn client_bytes() -> Vec<u8> {
        let mut enc = loona_hpack::Encoder::new();
        let req = |enc: &mut loona_hpack::Encoder<'static>, path: &[u8], authority: &[u8]| {
            enc.encode([
                (&b":method"[..], &b"POST"[..]),
                (b":scheme", b"http"),
                (b":path", path),
                (b":authority", authority),
                (b"content-type", b"application/grpc"),
            ])
        };
        let b1 = req(&mut enc, b"/a.B/C", b"tmp%2Fx.sock");
        let b2 = req(&mut enc, b"/a.B/D", b"tmp%2Fx.sock");
        let b3 = req(&mut enc, b"/a.B/E", b"example:50051");
        let mut out = PREFACE.to_vec();
        frame(&mut out, 0x4, 0, 0, &[&[]]);
        // HEADERS (padded, with priority) + CONTINUATION.
        let (h, c) = b1.split_at(7);
        frame(
            &mut out,
            HEADERS,
            PADDED | PRIORITY,
            1,
            &[&[3], &[0, 0, 0, 0, 15], h, &[0, 0, 0]],
        );
        frame(&mut out, CONTINUATION, END_HEADERS, 1, &[c]);
        frame(&mut out, 0x0, END_STREAM, 1, &[b"data"]);
        out.extend(headers(3, END_HEADERS | END_STREAM, &b2));
        out.extend(headers(5, END_HEADERS, &b3));
        out
    }

    fn decode_all(server_side: &[u8]) -> Vec<(u8, u8, u32, Fields)> {
        assert!(server_side.starts_with(PREFACE));
        let mut dec = loona_hpack::Decoder::new();
        frames(&server_side[PREFACE.len()..])
            .into_iter()
            .map(|(kind, flags, stream, payload)| {
                let fields = if kind == HEADERS {
                    let body = if flags & PRIORITY != 0 {
                        &payload[5..]
                    } else {
                        &payload[..]
                    };
                    dec.decode(body).expect("server decodes")
                } else {
                    Vec::new()
                };
                (kind, flags, stream, fields)
            })
            .collect()
    }

    fn authority(fields: &[(Vec<u8>, Vec<u8>)]) -> &[u8] {
        &fields
            .iter()
            .find(|(n, _)| n == b":authority")
            .expect("authority")
            .1
    }

    #[test]
    fn invalid_authorities_become_localhost_whatever_the_chunking() {
        let input = client_bytes();
        for chunk in [1, 2, 7, 9, 100, input.len()] {
            let mut rw = Rewriter::new();
            let mut out = Vec::new();
            for piece in input.chunks(chunk) {
                rw.feed(piece, &mut out).expect("rewrite");
            }
            let got = decode_all(&out);
            let kinds: Vec<(u8, u8, u32)> = got.iter().map(|(k, f, s, _)| (*k, *f, *s)).collect();
            assert_eq!(
                kinds,
                [
                    (0x4, 0, 0),
                    (HEADERS, PRIORITY | END_HEADERS, 1),
                    (0x0, END_STREAM, 1),
                    (HEADERS, END_HEADERS | END_STREAM, 3),
                    (HEADERS, END_HEADERS, 5),
                ],
                "chunk {chunk}"
            );
            assert_eq!(authority(&got[1].3), b"localhost");
            assert_eq!(authority(&got[3].3), b"localhost");
            // A valid authority is left as it is.
            assert_eq!(authority(&got[4].3), b"example:50051");
            let path = |f: &[(Vec<u8>, Vec<u8>)]| {
                f.iter()
                    .find(|(n, _)| n == b":path")
                    .map(|(_, v)| v.clone())
            };
            assert_eq!(path(&got[3].3).as_deref(), Some(&b"/a.B/D"[..]));
        }
    }

    #[test]
    fn other_protocols_pass_through_and_broken_blocks_are_errors() {
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        rw.feed(b"GET / HTTP/1.1\r\n\r\n", &mut out)
            .expect("passthrough");
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");

        let mut rw = Rewriter::new();
        let mut bad = PREFACE.to_vec();
        bad.extend(headers(
            1,
            END_HEADERS,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ));
        assert!(matches!(
            rw.feed(&bad, &mut Vec::new()),
            Err(RewriteError::Hpack(_))
        ));

        let mut rw = Rewriter::new();
        let mut interrupted = PREFACE.to_vec();
        interrupted.extend(headers(1, 0, &[0x82]));
        frame(&mut interrupted, 0x0, 0, 1, &[b"x"]);
        assert!(matches!(
            rw.feed(&interrupted, &mut Vec::new()),
            Err(RewriteError::Interrupted(0))
        ));

        let mut rw = Rewriter::new();
        let mut huge = PREFACE.to_vec();
        huge.extend_from_slice(&[0x01, 0x00, 0x00, 0x0, 0, 0, 0, 0, 1]);
        assert!(matches!(
            rw.feed(&huge, &mut Vec::new()),
            Err(RewriteError::FrameTooLarge(65_536))
        ));
    }
}
