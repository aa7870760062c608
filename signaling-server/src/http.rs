//! The server's TCP and HTTP layer, bounded below the websocket: every connection counts
//! against one cap (set below the open-file limit) and against its network address's
//! share of it (so that a few addresses cannot hold every connection), a request's head
//! must arrive within
//! a deadline (slow headers and idle keep-alive connections are closed), and a write that
//! makes no progress for too long ends its connection (a download nobody reads).
//!
//! axum's `serve` offers none of these, so the accept loop is here: hyper's HTTP/1
//! connection with its header-read timer, over a socket wrapper that keeps the
//! connection's slot for as long as the socket lives, upgraded to a websocket or not.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::Hub;
use crate::signaling::{AddressCounts, AddressShare};

/// Bounds on every TCP connection, whatever it carries.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// A request's head must arrive within this, and so must the next request on a
    /// kept-alive connection: slow senders (slowloris) and idle connections are closed.
    pub header_read_timeout: Duration,
    /// A write that makes no progress for this long fails and ends its connection.
    pub write_stall_timeout: Duration,
    /// Bytes a second a connection's writes must average while they wait for its reader
    /// (from the first write that had to wait, until one does not), once they have waited
    /// [`HttpLimits::slow_grace`]; slower, the connection ends. 0: no floor. A reader that
    /// took a few KB every few seconds held its connection, and a file's buffers, for
    /// hours: 256 such connections an address.
    pub min_write_rate: u64,
    /// See [`HttpLimits::min_write_rate`].
    pub slow_grace: Duration,
    /// Most TCP connections open at once, websockets included. Past it a connection is
    /// answered `503` and closed at once; keep it below the open-file limit.
    pub max_connections: usize,
    /// Most TCP connections open at once from one network address (an IPv4 address or an
    /// IPv6 /64); past it a connection is answered `429` and closed at once. 0: no share
    /// (a trusted proxy's connections take none: [`HttpLimits::trusted_proxies`]).
    pub max_connections_per_address: usize,
    /// Reverse proxies in front of the server: a connection from one of these addresses
    /// takes no per-address share (it carries many clients; the total still bounds it),
    /// and each request on it is from the address its `X-Forwarded-For` ends with (the
    /// one the proxy appended), for every per-address rule: caps, rates, neighbour draws,
    /// the swarm's networks. A request from one without that header is the proxy's own.
    pub trusted_proxies: Vec<IpAddr>,
}

/// The client a request on a connection from `peer` came from: `peer`, unless it is a
/// trusted proxy; then the `X-Forwarded-For` entries (of every such header, in order)
/// are read from the last back, past those of trusted proxies (a chain of them), and the
/// first other one is the client. Entries before it are whatever the client sent and
/// count for nothing; one that is not an address ends the walk at the last trusted
/// proxy's. Addresses compare canonically: on a server listening on `::` an IPv4 proxy
/// connects as `::ffff:a.b.c.d`.
pub fn client_address(
    peer: SocketAddr,
    trusted: &[IpAddr],
    headers: &axum::http::HeaderMap,
) -> SocketAddr {
    let is_trusted = |ip: IpAddr| {
        trusted
            .iter()
            .any(|t| t.to_canonical() == ip.to_canonical())
    };
    if !is_trusted(peer.ip()) {
        return peer;
    }
    let mut client = peer;
    let headers: Vec<&axum::http::HeaderValue> =
        headers.get_all("x-forwarded-for").iter().collect();
    for value in headers.iter().rev() {
        // Entry by entry, not the header's whole value as text: a client's byte that is
        // not ASCII before the proxy's entry made the whole value unreadable, and the
        // client counted as the proxy itself.
        for entry in value.as_bytes().rsplit(|&b| b == b',') {
            let Some(ip) = std::str::from_utf8(entry)
                .ok()
                .and_then(|e| e.trim().parse::<IpAddr>().ok())
            else {
                return client;
            };
            client = SocketAddr::new(ip.to_canonical(), 0);
            if !is_trusted(ip) {
                return client;
            }
        }
    }
    client
}

/// Bytes of a request's head (request line and headers) a connection buffers: a longer
/// one is answered `431` and the connection closed. hyper's own default is about 400
/// KB, which an address's 256 connections could hold for the head's 10 s (about 100 MB);
/// a browser's heads are a few KB.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;

/// [`HttpLimits::min_write_rate`] by default, 8 KiB/s (64 kbit/s): a slow mobile link
/// downloads the bundle at a few times that.
pub const MIN_WRITE_RATE: u64 = 8 * 1024;

/// [`HttpLimits::max_connections_per_address`] by default: room for 32 visitors behind
/// one address (a campus or carrier NAT; the signaling's own share of peers per task)
/// with a websocket and a browser's six page connections each, and far below any
/// server's total, so that holding every connection takes hundreds of addresses.
pub const DEFAULT_CONNECTIONS_PER_ADDRESS: usize = 256;

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            write_stall_timeout: Duration::from_secs(10),
            min_write_rate: MIN_WRITE_RATE,
            slow_grace: Duration::from_secs(30),
            max_connections: 20_000,
            max_connections_per_address: DEFAULT_CONNECTIONS_PER_ADDRESS,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Raises the soft open-file limit to the hard one and returns the limit in force (`None`
/// where it cannot be read). Every connection is a file descriptor: without this the
/// server runs out of them long before its connection cap.
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let now = getrlimit(Resource::Nofile);
        if now.current < now.maximum {
            let raised = Rlimit {
                current: now.maximum,
                maximum: now.maximum,
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                return Some(now.maximum.unwrap_or(u64::MAX));
            }
        }
        Some(now.current.unwrap_or(u64::MAX))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Holds one of the server's connection slots until dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP stream whose writes must make progress: one pending longer than `stall` fails
/// with `TimedOut`. It holds its connection's slot, and its place in its address's
/// share, for as long as it lives.
struct Guarded {
    inner: TcpStream,
    stall: Duration,
    /// When the pending write fails: at its stall deadline, or sooner where the writes
    /// behind the reader fall below the rate floor.
    stalled: Option<Pin<Box<Sleep>>>,
    /// [`HttpLimits::min_write_rate`] and [`HttpLimits::slow_grace`].
    min_rate: u64,
    slow_grace: Duration,
    /// Writes behind the reader: since when, and the bytes written since by writes that
    /// had to wait. Ends at a write that did not wait (the reader keeps up).
    behind: Option<(Instant, u64)>,
    /// Whether the write under way had to wait.
    waited: bool,
    _slot: Slot,
    _share: AddressShare,
    /// Its IPv6 /48's place ([`crate::signaling::take_shares`]).
    _wide: Option<AddressShare>,
}

impl Guarded {
    /// What a write (or, without `written`, a flush) that returned `result` means once
    /// the stall rule and the rate floor are applied.
    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
        written: Option<fn(&T) -> usize>,
    ) -> Poll<io::Result<T>> {
        if let Poll::Ready(r) = &result {
            if let (Ok(v), Some(written)) = (r, written) {
                match (&mut self.behind, self.waited) {
                    (Some((_, bytes)), true) => *bytes += written(v) as u64,
                    _ => self.behind = None,
                }
                self.waited = false;
            }
            self.stalled = None;
            return result;
        }
        let now = Instant::now();
        if written.is_some() {
            self.waited = true;
        }
        let (since, bytes) = *self.behind.get_or_insert((now, 0));
        let (stall, grace, min_rate) = (self.stall, self.slow_grace, self.min_rate);
        let timer = self.stalled.get_or_insert_with(|| {
            let mut at = now + stall;
            if min_rate > 0 {
                // When the average since `since` falls below the floor, if no byte more
                // goes out.
                let floor = grace.max(Duration::from_secs_f64(bytes as f64 / min_rate as f64));
                at = at.min(since + floor);
            }
            Box::pin(tokio::time::sleep_until(at.into()))
        });
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer read nothing for the write-stall timeout, or too slowly",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(cx, r, Some(|n| *n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(cx, r, Some(|n| *n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(cx, r, None)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The answer to a connection past the cap, written without waiting (and not at all if
/// the socket cannot take it at once).
const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
content-length: 27\r\nretry-after: 5\r\nconnection: close\r\n\r\nserver at connection limit\n";

/// The answer to a connection past its address's share.
const BUSY: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\n\
content-length: 39\r\nretry-after: 5\r\nconnection: close\r\n\r\ntoo many connections from your address\n";

/// Connections past the cap that are being answered at once; past this many more are
/// closed without an answer.
const MAX_REFUSING: usize = 64;

/// The most TCP connections a server whose open-file limit is `open_files` takes by
/// default: two descriptors each (its socket, and the file a download reads, served
/// while the connection lasts), less 64 kept for everything else (the ledger, its mark,
/// the state file, logs) and the [`MAX_REFUSING`] connections being answered past the
/// cap. One each let slow downloads use the descriptors up at about half the cap, before
/// any `503`: accepts failed, the ledger's seals and the state file's saves with them.
pub fn connection_cap(open_files: Option<u64>) -> usize {
    open_files.map_or(usize::MAX, |n| {
        usize::try_from(n.saturating_sub(64 + MAX_REFUSING as u64) / 2).unwrap_or(usize::MAX)
    })
}

/// Answers a connection past a cap with `answer` (`503` or `429`) and closes it. Closing
/// a socket with the client's request still unread would reset the connection and could
/// destroy the answer, so the request is read and dropped first, for at most a second.
fn refuse(stream: TcpStream, refusing: &Arc<AtomicUsize>, answer: &'static [u8]) {
    if refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let slot = Slot(Arc::clone(refusing));
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _slot = slot;
        let mut stream = stream;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            stream.write_all(answer).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<(), io::Error>(())
        })
        .await;
    });
}

/// Accepts connections on `listener` and serves `router` on each until `shutdown`
/// resolves; then tells every websocket to close, lets in-flight requests finish for at
/// most `grace`, and returns.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    hub: Arc<Hub>,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    let trusted: Arc<[IpAddr]> = limits.trusted_proxies.clone().into();
    let shares: AddressCounts = Arc::default();
    let refusing = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut shutdown = pin!(shutdown);
    let mut refused = 0u64;
    let mut last_said = None::<Instant>;
    loop {
        let (stream, addr) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors or memory: say so, and let some close.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if open.load(Ordering::Relaxed) >= limits.max_connections {
            refuse(stream, &refusing, FULL);
            hub.metrics
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            refused += 1;
            if last_said.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(
                    "at the connection limit ({}): refused {refused} connection(s) since the last warning",
                    limits.max_connections
                );
                refused = 0;
                last_said = Some(Instant::now());
            }
            continue;
        }
        // (A share of 0 is no share: `take` always gives a place; a proxy takes none.)
        let group = crate::signaling::address_group(addr.ip());
        let per_address = if trusted
            .iter()
            .any(|t| t.to_canonical() == addr.ip().to_canonical())
        {
            0
        } else {
            limits.max_connections_per_address
        };
        let Some((share, wide)) = crate::signaling::take_shares(&shares, group, per_address) else {
            refuse(stream, &refusing, BUSY);
            hub.metrics
                .refused_connections_per_address
                .fetch_add(1, Ordering::Relaxed);
            continue;
        };
        open.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let io = Guarded {
            inner: stream,
            stall: limits.write_stall_timeout,
            stalled: None,
            min_rate: limits.min_write_rate,
            slow_grace: limits.slow_grace,
            behind: None,
            waited: false,
            _slot: Slot(Arc::clone(&open)),
            _share: share,
            _wide: wide,
        };
        let router = router.clone();
        let mut stopped = stopped.clone();
        let header_timeout = limits.header_read_timeout;
        let trusted = Arc::clone(&trusted);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    let client = client_address(addr, &trusted, request.headers());
                    request.extensions_mut().insert(ConnectInfo(client));
                    let mut router = router.clone();
                    async move { tower_service::Service::call(&mut router, request).await }
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_HEAD_BYTES)
                .max_header_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let mut connection = pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = async { drop(stopped.wait_for(|s| *s).await) } => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    hub.shut_down();
    stop.send_replace(true);
    let deadline = Instant::now() + grace;
    while open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = open.load(Ordering::Relaxed);
    if left > 0 {
        tracing::warn!("{left} connection(s) still open after {grace:?}; closing them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(values: &[&str]) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().expect("a header value"));
        }
        h
    }

    #[test]
    fn each_connection_is_counted_two_descriptors() {
        assert_eq!(connection_cap(Some(1024)), (1024 - 128) / 2);
        assert_eq!(connection_cap(Some(100)), 0);
        assert_eq!(connection_cap(None), usize::MAX);
    }

    /// Behind a chain of trusted proxies the client is the last entry none of them added;
    /// an IPv4 proxy seen as IPv6-mapped (a server on `::`) is still trusted; an entry that
    /// is not an address stops the walk at the last trusted hop.
    #[test]
    fn the_client_is_the_last_forwarded_address_no_trusted_proxy_added() {
        let lb: IpAddr = [10, 0, 0, 2].into();
        let nginx: IpAddr = [127, 0, 0, 1].into();
        let trusted = [lb, nginx];
        let at = |ip: IpAddr| SocketAddr::new(ip, 40_000);
        let client =
            |peer, values: &[&str]| client_address(peer, &trusted, &forwarded(values)).ip();
        let user: IpAddr = [203, 0, 113, 5].into();
        assert_eq!(client(at(nginx), &["203.0.113.5"]), user);
        assert_eq!(
            client(at(nginx), &["198.51.100.1, 203.0.113.5, 10.0.0.2"]),
            user
        );
        assert_eq!(
            client(at(nginx), &["198.51.100.1, 203.0.113.5", "10.0.0.2"]),
            user
        );
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().expect("an address");
        assert_eq!(client(at(mapped), &["203.0.113.5"]), user);
        assert_eq!(client(at(nginx), &["203.0.113.5, unknown"]), nginx);
        assert_eq!(client(at(nginx), &["203.0.113.5, junk, 10.0.0.2"]), lb);
        assert_eq!(client(at(nginx), &[]), nginx);
        // Anyone else's header counts for nothing.
        let other: IpAddr = [192, 0, 2, 7].into();
        assert_eq!(client(at(other), &["203.0.113.5"]), other);
        // A byte that is not ASCII in what the client sent ends the walk there, after the
        // proxy's entry (it made the whole header unreadable: the client was the proxy).
        let mut h = axum::http::HeaderMap::new();
        h.append(
            "x-forwarded-for",
            axum::http::HeaderValue::from_bytes(b"\xff, 203.0.113.5").expect("a header value"),
        );
        assert_eq!(client_address(at(nginx), &trusted, &h).ip(), user);
    }
}
