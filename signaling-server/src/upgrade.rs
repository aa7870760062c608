//! The websocket upgrade (RFC 6455 section 4.2), done here instead of by axum's `ws`
//! extractor so that the server chooses how a connection's socket is read.
//!
//! tungstenite reads at most its read-buffer size per call, and that buffer is kept small
//! (256 bytes) because every idle connection holds one. Read straight from the socket,
//! every signal would then take two to six `recv` system calls; and without a write
//! buffer every frame is its own `send`, while a write buffer inside tungstenite keeps
//! its largest size for the connection's life. [`Buffered`] reads up to [`READ_AHEAD`]
//! bytes per system call and collects written frames until a flush, in buffers that
//! exist only while they hold data: an idle connection holds neither.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Bytes read from a busy socket per system call.
pub(crate) const READ_AHEAD: usize = 8 * 1024;
/// Written bytes collected before they are sent without waiting for a flush.
pub(crate) const WRITE_BEHIND: usize = 16 * 1024;

/// A connection's websocket as the signaling code sees it.
pub(crate) type Socket = WebSocketStream<Buffered<TokioIo<Upgraded>>>;

/// The error a read ends in once more bytes were read since the last message than any
/// message may take ([`Buffered::with_read_cap`]): frames that carry nothing (empty
/// continuation frames, which tungstenite joins into one message without a word) are
/// no message the rate limit could count.
#[derive(Debug)]
pub(crate) struct FrameFlood;

impl std::fmt::Display for FrameFlood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("more bytes of frames than any message may take")
    }
}

impl std::error::Error for FrameFlood {}

/// Reads the inner stream in chunks of up to `chunk` bytes and hands them out in
/// whatever sizes the caller asks for; collects writes until a flush or until `batch`
/// bytes wait. The read buffer is allocated when a read is attempted and freed when the
/// inner stream has nothing to give (pending, end or error); the write buffer is freed
/// once written. Reads of at least `chunk` bytes and writes of at least `batch` bytes
/// into empty buffers go to the inner stream directly.
pub(crate) struct Buffered<S> {
    inner: S,
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    chunk: usize,
    out: Vec<u8>,
    batch: usize,
    /// Bytes handed to the reader since [`Buffered::take_read`].
    read: usize,
    /// The most `read` may reach: past it reads fail with [`FrameFlood`].
    read_cap: usize,
}

impl<S> Buffered<S> {
    pub(crate) fn new(inner: S, chunk: usize, batch: usize) -> Self {
        Self {
            inner,
            buf: None,
            start: 0,
            end: 0,
            chunk: chunk.max(1),
            out: Vec::new(),
            batch: batch.max(1),
            read: 0,
            read_cap: usize::MAX,
        }
    }

    /// Reads fail once `cap` bytes were handed out since the last [`Buffered::take_read`].
    pub(crate) fn with_read_cap(mut self, cap: usize) -> Self {
        self.read_cap = cap;
        self
    }

    /// The bytes handed out since the last call.
    pub(crate) fn take_read(&mut self) -> usize {
        std::mem::take(&mut self.read)
    }

    /// Counts `n` bytes handed out: an error past the cap.
    fn charge(&mut self, n: usize) -> io::Result<()> {
        self.read = self.read.saturating_add(n);
        if self.read > self.read_cap {
            return Err(io::Error::other(FrameFlood));
        }
        Ok(())
    }

    /// Whether a buffer is held (for tests: an idle connection holds none).
    #[cfg(test)]
    fn holds_buffer(&self) -> bool {
        self.buf.is_some() || self.out.capacity() > 0
    }
}

impl<S: AsyncWrite + Unpin> Buffered<S> {
    /// Writes out everything collected, then frees the write buffer.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.out.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out = Vec::new();
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Buffered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.start == this.end {
            if out.remaining() >= this.chunk {
                this.buf = None;
                let before = out.filled().len();
                let read = Pin::new(&mut this.inner).poll_read(cx, out);
                if let Err(e) = this.charge(out.filled().len() - before) {
                    return Poll::Ready(Err(e));
                }
                return read;
            }
            let chunk = this.chunk;
            let buf = this
                .buf
                .get_or_insert_with(|| vec![0; chunk].into_boxed_slice());
            let mut read = ReadBuf::new(buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                    this.start = 0;
                    this.end = read.filled().len();
                }
                other => {
                    // Nothing arrived (or the end, or an error): hold no memory meanwhile.
                    this.buf = None;
                    return other;
                }
            }
        }
        if let Some(buf) = &this.buf {
            let n = out.remaining().min(this.end - this.start);
            out.put_slice(&buf[this.start..this.start + n]);
            this.start += n;
            return Poll::Ready(this.charge(n));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Buffered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.out.len() + data.len() > this.batch {
            match this.poll_write_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if this.out.is_empty() && data.len() >= this.batch {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        if this.out.capacity() == 0 {
            // One allocation for the whole burst, not a doubling series.
            this.out = Vec::with_capacity(this.batch);
        }
        this.out.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_write_out(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_write_out(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

/// Why an upgrade request was refused, answered as plain text.
#[derive(Debug)]
pub(crate) struct Refusal {
    status: StatusCode,
    why: &'static str,
}

fn bad(status: StatusCode, why: &'static str) -> Refusal {
    Refusal { status, why }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut r = (self.status, format!("{}\n", self.why)).into_response();
        if self.status == StatusCode::UPGRADE_REQUIRED {
            // RFC 6455 section 4.4: name the version this server speaks.
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        r
    }
}

/// Whether the comma-separated header `name` holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Checks a websocket opening handshake. Returns the `101 Switching Protocols` answer and
/// the upgrade to await once it is sent, or the error to answer with.
pub(crate) fn accept(parts: &mut Parts) -> Result<(Response, OnUpgrade), Refusal> {
    if parts.method != Method::GET {
        return Err(bad(
            StatusCode::METHOD_NOT_ALLOWED,
            "websocket upgrades use GET",
        ));
    }
    let h = &parts.headers;
    if !has_token(h, header::CONNECTION, "upgrade") || !has_token(h, header::UPGRADE, "websocket") {
        return Err(bad(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks websocket only",
        ));
    }
    if h.get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(bad(
            StatusCode::UPGRADE_REQUIRED,
            "websocket version 13 is required",
        ));
    }
    // The key must be 16 bytes in base64 (RFC 6455 section 4.1).
    let key = h
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k.as_bytes())
                .is_ok_and(|b| b.len() == 16)
        })
        .ok_or_else(|| {
            bad(
                StatusCode::BAD_REQUEST,
                "missing or malformed Sec-WebSocket-Key",
            )
        })?;
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = parts.extensions.remove::<OnUpgrade>().ok_or_else(|| {
        bad(
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        )
    })?;
    let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let rh = r.headers_mut();
    rh.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    rh.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        rh.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    Ok((r, upgrade))
}

/// Completes an accepted upgrade: the websocket over the upgraded connection, whose reads
/// fail past `read_cap` bytes between two messages ([`Buffered::with_read_cap`]).
pub(crate) async fn socket(
    upgrade: OnUpgrade,
    config: WebSocketConfig,
    read_cap: usize,
) -> Option<Socket> {
    let io = upgrade.await.ok()?;
    let io = Buffered::new(TokioIo::new(io), READ_AHEAD, WRITE_BEHIND).with_read_cap(read_cap);
    Some(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_are_served_from_one_chunk_and_the_buffer_is_freed_when_idle() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut r = Buffered::new(a, 64, 64);
        let data: Vec<u8> = (0..100u8).collect();
        b.write_all(&data).await.expect("io");
        let mut got = Vec::new();
        let mut small = [0u8; 7];
        while got.len() < data.len() {
            let n = r.read(&mut small).await.expect("io");
            assert!(n > 0);
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data, "bytes arrive whole and in order");
        // Drained, the next read finds nothing: the chunk buffer is given back.
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), r.read(&mut small)).await;
        assert!(pending.is_err(), "nothing to read yet");
        assert!(!r.holds_buffer(), "an idle reader holds no chunk buffer");
        // Large reads bypass the buffer; the end of the stream reads as 0.
        b.write_all(&data).await.expect("io");
        drop(b);
        let mut big = vec![0u8; 256];
        let n = r.read(&mut big).await.expect("io");
        assert_eq!(&big[..n], &data[..n]);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.expect("io");
        assert_eq!([&big[..n], &rest[..]].concat(), data);
        assert!(!r.holds_buffer());
    }

    #[tokio::test]
    async fn writes_wait_for_a_flush_or_a_full_batch_and_nothing_is_held_after() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut w = Buffered::new(a, 64, 100);
        w.write_all(b"first ").await.expect("io");
        w.write_all(b"second").await.expect("io");
        let mut got = [0u8; 64];
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(50), b.read(&mut got)).await;
        assert!(early.is_err(), "nothing is sent before the flush");
        w.flush().await.expect("io");
        assert!(!w.holds_buffer(), "a flushed writer holds no buffer");
        let n = b.read(&mut got).await.expect("io");
        assert_eq!(&got[..n], b"first second", "one write carries both");
        // Past the batch size, what waited goes out without a flush, in order.
        let big: Vec<u8> = (0..250u8).collect();
        w.write_all(b"head").await.expect("io");
        w.write_all(&big).await.expect("io");
        let mut seen = Vec::new();
        while seen.len() < 254 {
            let mut chunk = [0u8; 512];
            let n = b.read(&mut chunk).await.expect("io");
            seen.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(seen, [&b"head"[..], &big].concat());
        w.shutdown().await.expect("io");
        assert!(!w.holds_buffer());
    }
}
