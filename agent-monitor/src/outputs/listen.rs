//! Connection limits and timeouts shared by every listener: the gRPC TCP listener, the
//! gRPC Unix socket and the admin (metrics, health) listener.
//!
//! Idle connections once took every descriptor the daemon had (12,000 of them), and with
//! them `/healthz` and the pods file. So each listener:
//!
//! - admits at most `max_connections` at once. When it is full, the oldest connection that
//!   has not made a request yet is closed to make room ("evicted"): a flood of connections
//!   that never speak cannot lock out a health probe or a real client. When every admitted
//!   connection has made a request, the new one is closed at once ("limit");
//! - closes a connection that has not made its first request within `handshake_timeout`
//!   (TLS and HTTP/2 handshakes included; bytes trickled in do not extend it);
//! - after the first request, closes a connection that sends nothing for `idle_timeout`.
//!   gRPC keepalive pings make a quiet but healthy stream client answer well within it.
//!
//! Every close is counted per listener ([`ConnMetrics`]). What counts as "a request" is
//! reported by the protocol layer through [`ConnHandle::mark_request`], which it finds in
//! the request's extensions (tonic's `Connected` info, axum's `ConnectInfo`).

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::task::AtomicWaker;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    time::{Instant, Sleep},
};

/// Default for how long a new connection may take to make its first request.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for how long a connection may send nothing after its first request. Longer than
/// the usual Prometheus scrape intervals (15 to 60 s), so a scraper's kept-alive
/// connection is not closed under it, and than gRPC keepalive interval + timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default cap of each gRPC listener (TCP and the Unix socket each).
pub const DEFAULT_GRPC_MAX_CONNECTIONS: usize = 256;
/// Default cap of the admin listener: a scraper and the kubelet's probes need a handful.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections admitted at once.
    pub max_connections: usize,
    /// Longest time from accept to the first request.
    pub handshake_timeout: Duration,
    /// Longest silence from the peer after its first request.
    pub idle_timeout: Duration,
}

impl ConnLimits {
    /// The gRPC listeners' defaults.
    pub const GRPC: Self = Self {
        max_connections: DEFAULT_GRPC_MAX_CONNECTIONS,
        handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: DEFAULT_IDLE_TIMEOUT,
    };
    /// The admin listener's defaults.
    pub const ADMIN: Self = Self {
        max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
        handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: DEFAULT_IDLE_TIMEOUT,
    };
}

/// What one listener reports. The default is a set of unregistered metrics; the daemon
/// gets registered ones from [`crate::outputs::metrics::Metrics::connection_metrics`].
#[derive(Debug, Clone, Default)]
pub struct ConnMetrics {
    /// Connections admitted now.
    pub open: Gauge,
    /// New connections closed at once because every admitted one had made a request.
    pub refused: Counter,
    /// Connections without a request closed to make room for a new one.
    pub evicted: Counter,
    /// Connections closed for not making a first request within the handshake timeout.
    pub handshake_timeouts: Counter,
    /// Connections closed after sending nothing for the idle timeout.
    pub idle_timeouts: Counter,
}

/// One admitted connection's state, shared between its I/O and its requests.
#[derive(Debug)]
struct ConnState {
    id: u64,
    /// The connection made a request (set by the protocol layer).
    requested: AtomicBool,
    /// The gate closed this connection to make room.
    evicted: AtomicBool,
    /// Wakes the connection's I/O when it is evicted.
    waker: AtomicWaker,
}

/// A handle on an admitted connection, found in its requests' extensions.
#[derive(Debug, Clone)]
pub struct ConnHandle(Arc<ConnState>);

impl ConnHandle {
    /// Records that the connection made a request: its handshake is over, and from now on
    /// only the idle timeout applies. Never evicted after this.
    pub fn mark_request(&self) {
        self.0.requested.store(true, Ordering::Relaxed);
    }
}

/// The admission state of one listener.
#[derive(Debug)]
struct Gate {
    name: &'static str,
    limits: ConnLimits,
    metrics: ConnMetrics,
    next_id: AtomicU64,
    /// Admitted connections by admission order (ids only grow).
    conns: Mutex<BTreeMap<u64, Arc<ConnState>>>,
}

impl Gate {
    fn conns(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<ConnState>>> {
        // A poisoned lock only means a panic elsewhere; the map is still consistent.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_open(&self, n: usize) {
        self.metrics.open.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Admits a new connection, evicting the oldest one without a request if the listener
    /// is full; `None` when it is full of connections that made requests.
    fn admit(&self) -> Option<Arc<ConnState>> {
        let mut conns = self.conns();
        if conns.len() >= self.limits.max_connections {
            let victim = conns
                .iter()
                .find(|(_, c)| !c.requested.load(Ordering::Relaxed))
                .map(|(id, _)| *id);
            match victim.and_then(|id| conns.remove(&id)) {
                Some(victim) => {
                    victim.evicted.store(true, Ordering::Relaxed);
                    victim.waker.wake();
                    self.metrics.evicted.inc();
                }
                None => {
                    self.metrics.refused.inc();
                    let (name, max) = (self.name, self.limits.max_connections);
                    crate::warn_limited!(
                        "listener-full",
                        "{name}: {max} connections open, all of them in use: refusing new connections (max_connections)"
                    );
                    return None;
                }
            }
        }
        let state = Arc::new(ConnState {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            requested: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        conns.insert(state.id, state.clone());
        self.set_open(conns.len());
        Some(state)
    }

    fn release(&self, id: u64) {
        let mut conns = self.conns();
        if conns.remove(&id).is_some() {
            self.set_open(conns.len());
        }
    }
}

/// A listener whose connections are admitted and timed as the module describes.
#[derive(Debug)]
pub struct LimitedListener<L> {
    inner: L,
    gate: Arc<Gate>,
}

/// The raw accept of the listeners this module wraps.
pub trait RawListener: Send + Sync + 'static {
    /// The connection type.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The peer address type.
    type Addr: Send + 'static;
    /// Accepts one connection.
    fn accept_raw(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;
}

impl RawListener for TcpListener {
    type Io = TcpStream;
    type Addr = std::net::SocketAddr;
    async fn accept_raw(&self) -> io::Result<(TcpStream, std::net::SocketAddr)> {
        let (s, addr) = self.accept().await?;
        // gRPC and HTTP responses are small writes that must not wait for Nagle.
        let _ = s.set_nodelay(true);
        Ok((s, addr))
    }
}

impl RawListener for UnixListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    async fn accept_raw(&self) -> io::Result<(UnixStream, tokio::net::unix::SocketAddr)> {
        self.accept().await
    }
}

impl<L: RawListener> LimitedListener<L> {
    /// Wraps `inner`; `name` names the listener in log lines (`gRPC 127.0.0.1:50051`).
    pub fn new(inner: L, name: &'static str, limits: ConnLimits, metrics: ConnMetrics) -> Self {
        Self {
            inner,
            gate: Arc::new(Gate {
                name,
                limits,
                metrics,
                next_id: AtomicU64::new(0),
                conns: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// The same listener reporting to `metrics` (before it accepted anything).
    pub fn with_metrics(self, metrics: ConnMetrics) -> Self {
        Self::new(self.inner, self.gate.name, self.gate.limits, metrics)
    }

    /// The wrapped listener.
    pub fn get_ref(&self) -> &L {
        &self.inner
    }

    /// The limits in force.
    pub fn limits(&self) -> ConnLimits {
        self.gate.limits
    }

    /// The next admitted connection. Connections over the limit are closed here, and
    /// accept errors (out of descriptors, aborted handshakes) are logged and retried, so
    /// this only returns a connection.
    pub async fn accept(&self) -> (Limited<L::Io>, L::Addr) {
        loop {
            match self.inner.accept_raw().await {
                Ok((io, addr)) => {
                    if let Some(state) = self.gate.admit() {
                        return (Limited::new(io, state, self.gate.clone()), addr);
                    }
                    // Over the limit: dropping `io` closes it at once.
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    // EMFILE/ENFILE/ENOMEM: retrying at once would spin; the peers wait in
                    // the backlog meanwhile.
                    let name = self.gate.name;
                    crate::warn_limited!("accept-error", "{name}: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl axum::serve::Listener for LimitedListener<TcpListener> {
    type Io = Limited<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        LimitedListener::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl<'a>
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'a, LimitedListener<TcpListener>>,
    > for ConnHandle
{
    fn connect_info(stream: axum::serve::IncomingStream<'a, LimitedListener<TcpListener>>) -> Self {
        stream.io().handle()
    }
}

/// An admitted connection: the I/O of the accepted stream, closed (an I/O error to the
/// protocol layer) when it times out or is evicted; its slot is released on drop.
#[derive(Debug)]
pub struct Limited<S> {
    inner: S,
    state: Arc<ConnState>,
    gate: Arc<Gate>,
    deadline: Pin<Box<Sleep>>,
    /// The peer made a request; the deadline is now the idle timeout.
    established: bool,
    /// When the peer last sent bytes (after its first request).
    last_read: Instant,
}

impl<S> Limited<S> {
    fn new(inner: S, state: Arc<ConnState>, gate: Arc<Gate>) -> Self {
        let now = Instant::now();
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep_until(
                now + gate.limits.handshake_timeout,
            )),
            state,
            gate,
            established: false,
            last_read: now,
        }
    }

    /// The handle the protocol layer marks requests on.
    pub fn handle(&self) -> ConnHandle {
        ConnHandle(self.state.clone())
    }

    /// The accepted stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes arrived from the peer.
    fn on_read(&mut self) {
        if self.established {
            // The deadline is moved lazily, when it fires: resetting a timer per read
            // would cost more than the read.
            self.last_read = Instant::now();
        }
    }

    /// Whether the connection must close now; registers for the wake-ups that could
    /// change the answer. Called when the inner stream has nothing to give or take.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.state.waker.register(cx.waker());
        if self.state.evicted.load(Ordering::Relaxed) {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room: the listener is full and this connection made no request",
            ));
        }
        if !self.established && self.state.requested.load(Ordering::Relaxed) {
            self.established = true;
            self.last_read = Instant::now();
            let at = self.last_read + self.gate.limits.idle_timeout;
            self.deadline.as_mut().reset(at);
        }
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return None;
            }
            if !self.established {
                self.gate.metrics.handshake_timeouts.inc();
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the handshake timeout",
                ));
            }
            let at = self.last_read + self.gate.limits.idle_timeout;
            if at <= Instant::now() {
                self.gate.metrics.idle_timeouts.inc();
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "nothing received within the idle timeout",
                ));
            }
            // Bytes came since the timer was set: wait for the rest of the window.
            self.deadline.as_mut().reset(at);
        }
    }
}

impl<S> Drop for Limited<S> {
    fn drop(&mut self) {
        self.gate.release(self.state.id);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.on_read();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.expired(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            // A peer that stops reading what it is sent stalls here; it is not sending
            // either, so the same deadline applies.
            Poll::Pending => match this.expired(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            ready => ready,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => match this.expired(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            ready => ready,
        }
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

impl<S: Send + 'static> tonic::transport::server::Connected for Limited<S> {
    type ConnectInfo = ConnHandle;

    fn connect_info(&self) -> ConnHandle {
        self.handle()
    }
}

/// Binds a TCP listener with SO_REUSEADDR, so that a restarted daemon can bind its port
/// while connections of the previous one linger in TIME_WAIT.
pub fn bind_tcp(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // The kernel caps this at net.core.somaxconn.
    socket.listen(1024)
}

/// Makes sure the process may open `needed` descriptors: raises the soft RLIMIT_NOFILE
/// up to the hard limit when it is lower, and says so when even that is not enough.
pub fn ensure_descriptors(needed: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur >= needed {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: needed.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        lim.rlim_cur = raised.rlim_cur;
    }
    if lim.rlim_cur < needed {
        tracing::warn!(
            "open file limit {} is below the {needed} descriptors the connection limits and the probes may need (max_connections); lower them or raise the limit",
            lim.rlim_cur
        );
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn limits(max: usize, handshake_ms: u64, idle_ms: u64) -> ConnLimits {
        ConnLimits {
            max_connections: max,
            handshake_timeout: Duration::from_millis(handshake_ms),
            idle_timeout: Duration::from_millis(idle_ms),
        }
    }

    async fn listener(l: ConnLimits) -> (LimitedListener<TcpListener>, std::net::SocketAddr) {
        let raw = bind_tcp("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = raw.local_addr().expect("addr");
        (
            LimitedListener::new(raw, "test", l, ConnMetrics::default()),
            addr,
        )
    }

    /// Reads until EOF or error: the server side closed the connection.
    async fn closed(mut c: TcpStream) {
        let mut buf = [0u8; 16];
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    #[tokio::test]
    async fn full_listener_evicts_the_oldest_silent_connection_then_refuses() {
        let (l, addr) = listener(limits(2, 60_000, 60_000)).await;
        let metrics = l.gate.metrics.clone();
        let c1 = TcpStream::connect(addr).await.expect("c1");
        let (mut s1, _) = l.accept().await;
        let _c2 = TcpStream::connect(addr).await.expect("c2");
        let (s2, _) = l.accept().await;
        s2.handle().mark_request();
        // Full: the third evicts s1, the oldest connection without a request.
        let _c3 = TcpStream::connect(addr).await.expect("c3");
        let (s3, _) = l.accept().await;
        s3.handle().mark_request();
        let mut buf = [0u8; 1];
        let err = s1.read(&mut buf).await.expect_err("evicted");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        drop(s1);
        closed(c1).await;
        assert_eq!(metrics.evicted.get(), 1);
        // Full of connections that made requests: the fourth is closed at once.
        let c4 = TcpStream::connect(addr).await.expect("c4");
        let accepted = tokio::time::timeout(Duration::from_millis(300), l.accept()).await;
        assert!(accepted.is_err(), "a fourth connection was admitted");
        closed(c4).await;
        assert_eq!(metrics.refused.get(), 1);
        assert_eq!(metrics.open.get(), 2);
        drop(s2);
        assert_eq!(metrics.open.get(), 1);
    }

    #[tokio::test]
    async fn handshake_and_idle_timeouts() {
        let (l, addr) = listener(limits(8, 300, 2_000)).await;
        let metrics = l.gate.metrics.clone();
        // Trickling bytes without a request does not extend the handshake timeout.
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let (mut s, _) = l.accept().await;
        let mut buf = [0u8; 8];
        let mut trickled = 0;
        let err = loop {
            trickled += 1;
            assert!(trickled < 200, "trickling kept the connection open");
            if let Err(e) = c.write_all(b"x").await {
                panic!("client write: {e}");
            }
            match s.read(&mut buf).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(metrics.handshake_timeouts.get(), 1);

        // After a request, traffic well within the idle timeout keeps the connection
        // open far longer than the timeout; silence then closes it.
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let (mut s, _) = l.accept().await;
        s.handle().mark_request();
        for _ in 0..15 {
            c.write_all(b"y").await.expect("write");
            assert_eq!(s.read(&mut buf).await.expect("byte"), 1);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let err = s.read(&mut buf).await.expect_err("idle timeout");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(metrics.idle_timeouts.get(), 1);
        assert_eq!(metrics.handshake_timeouts.get(), 1);
    }
}
