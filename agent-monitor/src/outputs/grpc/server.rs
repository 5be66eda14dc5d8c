//! The tonic service and the listeners it runs on.

use std::{
    future::Future,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use futures::{Stream, StreamExt as _};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::watch,
    task::JoinHandle,
};
use tonic::{
    service::InterceptorLayer,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
    Request, Response, Status,
};

use super::{
    authority::AuthorityFix,
    filter::Matcher,
    hub::{Delivery, Hub, Subscription},
    resume::{self, Out, Resumable},
    GrpcError,
};
use crate::{
    api::{
        pb::{
            self,
            agent_monitor_server::{AgentMonitor, AgentMonitorServer},
        },
        Origin,
    },
    outputs::listen::{
        self, ConnHandle, ConnLimits, ConnMetrics, Limited, LimitedListener, RawListener,
    },
};

/// Queue length per streaming client when not configured (`grpc.queue_per_client`): the
/// one default of the library and the daemon's config. Items are shared between clients,
/// so a full queue costs a slot per item, not a copy of the event.
pub const DEFAULT_QUEUE_PER_CLIENT: usize = 10_000;

/// Default HTTP/2 keepalive: a connection silent this long is pinged...
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and closed when the ping is not answered within this. A quiet stream client that
/// answers keeps its connection; a vanished one is noticed within interval + timeout.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The status a stream client's stream ends with when the daemon stops.
pub const SHUTTING_DOWN: &str = "agent-monitor is shutting down";

/// Where the daemon's status comes from.
pub trait StatusSource: Send + Sync + 'static {
    /// The current status. `clients`, `gaps_sent` and `items_missed` are filled in by the
    /// service from its [`Hub`], whatever this returns for them.
    fn status(&self) -> pb::GetStatusResponse;
}

/// Server TLS: the server's certificate chain and key (PEM); with `client_ca`, clients
/// must present a certificate signed by it (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Where and how the API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcSettings {
    /// TCP address (TLS applies here when configured).
    pub tcp: Option<SocketAddr>,
    /// Unix socket path, created with mode 0600 (plaintext: the file mode is the access
    /// control). A stale socket file is replaced; a live one is an error.
    pub unix: Option<PathBuf>,
    pub tls: Option<TlsSettings>,
    /// Queue length per streaming client (see [`GrpcSettings::hub`]).
    pub queue_per_client: usize,
    /// Connection cap and timeouts of each listener (TCP and Unix socket each).
    pub limits: ConnLimits,
    /// HTTP/2 keepalive ping interval.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
}

impl Default for GrpcSettings {
    fn default() -> Self {
        Self {
            tcp: None,
            unix: None,
            tls: None,
            queue_per_client: DEFAULT_QUEUE_PER_CLIENT,
            limits: ConnLimits::GRPC,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        }
    }
}

impl GrpcSettings {
    /// A hub with this config's queue length, handing out items of `origin`.
    pub fn hub(&self, origin: Origin) -> Hub {
        Hub::new(self.queue_per_client, origin)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// What follows a client's last item: a subscription only ends when the hub shut down, and
/// the client is told so with UNAVAILABLE (retry later, elsewhere) rather than a plain OK
/// that reads as "nothing more will ever come".
fn ending<T: Send + 'static>(hub: Hub) -> impl Stream<Item = Result<T, Status>> + Send {
    futures::stream::once(async move { hub.is_shut_down() })
        .filter_map(|down| async move { down.then(|| Err(Status::unavailable(SHUTTING_DOWN))) })
}

/// The `agent_monitor.v1.AgentMonitor` service.
#[derive(Clone)]
pub struct AgentMonitorService {
    hub: Hub,
    status: Arc<dyn StatusSource>,
}

impl AgentMonitorService {
    pub fn new(hub: Hub, status: Arc<dyn StatusSource>) -> Self {
        Self { hub, status }
    }

    /// The tonic server wrapper for this service.
    pub fn into_server(self) -> AgentMonitorServer<Self> {
        AgentMonitorServer::new(self)
    }
}

impl AgentMonitorService {
    /// The stream of one client: live, or resumed after a cursor from the journal.
    fn stream<T: Resumable, R: Send + 'static>(
        &self,
        filter: Option<&pb::Filter>,
        resume_after: Option<pb::Cursor>,
        subscribe: impl FnOnce(&Hub, Matcher) -> Subscription<T::Live>,
        wrap: fn(Out<T>) -> Result<R, Status>,
    ) -> Result<BoxStream<R>, Status> {
        if self.hub.is_shut_down() {
            return Err(Status::unavailable(SHUTTING_DOWN));
        }
        let matcher = Matcher::new(filter).map_err(Status::invalid_argument)?;
        let ending = ending(self.hub.clone());
        let Some(after) = resume_after else {
            let live = subscribe(&self.hub, matcher).map(|d| match d {
                Delivery::Item(item) => Out::Item(T::from_live(&item)),
                Delivery::Gap(missed) => Out::Gap(resume::slow_client_gap(missed)),
            });
            return Ok(Box::pin(live.map(wrap).chain(ending)));
        };
        let journal = self.hub.journal().ok_or_else(|| {
            Status::failed_precondition(
                "resume_after needs the daemon's journal, and this daemon keeps none (journal.dir is not set)",
            )
        })?;
        // Live first: everything published from here on is queued for this client; what
        // was published before is in the journal once the scan's barrier passed.
        let live = subscribe(&self.hub, matcher.clone());
        let run = self.hub.origin().run_id.clone();
        let stream = resume::resumed(journal, live, after, matcher, run);
        Ok(Box::pin(stream.map(wrap).chain(ending)))
    }
}

fn failed<R>(reason: String) -> Result<R, Status> {
    Err(Status::unavailable(reason))
}

fn event_response(out: Out<pb::Event>) -> Result<pb::StreamEventsResponse, Status> {
    use pb::stream_events_response::Item;
    let item = match out {
        Out::Item(e) => Item::Event(e),
        Out::Gap(g) => Item::Gap(g),
        Out::Failed(reason) => return failed(reason),
    };
    Ok(pb::StreamEventsResponse { item: Some(item) })
}

fn anomaly_response(out: Out<pb::Anomaly>) -> Result<pb::StreamAnomaliesResponse, Status> {
    use pb::stream_anomalies_response::Item;
    let item = match out {
        Out::Item(a) => Item::Anomaly(a),
        Out::Gap(g) => Item::Gap(g),
        Out::Failed(reason) => return failed(reason),
    };
    Ok(pb::StreamAnomaliesResponse { item: Some(item) })
}

#[tonic::async_trait]
impl AgentMonitor for AgentMonitorService {
    type StreamEventsStream = BoxStream<pb::StreamEventsResponse>;
    type StreamAnomaliesStream = BoxStream<pb::StreamAnomaliesResponse>;

    async fn stream_events(
        &self,
        request: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        let r = request.into_inner();
        self.stream(
            r.filter.as_ref(),
            r.resume_after,
            |hub, m| hub.subscribe_events(m),
            event_response,
        )
        .map(Response::new)
    }

    async fn stream_anomalies(
        &self,
        request: Request<pb::StreamAnomaliesRequest>,
    ) -> Result<Response<Self::StreamAnomaliesStream>, Status> {
        let r = request.into_inner();
        self.stream(
            r.filter.as_ref(),
            r.resume_after,
            |hub, m| hub.subscribe_anomalies(m),
            anomaly_response,
        )
        .map(Response::new)
    }

    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let mut status = self.status.status();
        status.clients = self.hub.clients() as u64;
        status.gaps_sent = self.hub.gaps_sent();
        status.items_missed = self.hub.missed();
        status.run_id = self.hub.origin().run_id.to_string();
        status.node = self.hub.origin().node.to_string();
        Ok(Response::new(status))
    }
}

/// Bound listeners, ready to serve. [`serve`] is `bind` then `run`; binding first lets a
/// caller learn the port of `127.0.0.1:0` before serving.
#[derive(Debug)]
pub struct GrpcServer {
    tcp: Option<LimitedListener<TcpListener>>,
    unix: Option<UnixSocket>,
    tls: Option<ServerTlsConfig>,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
}

/// The bound Unix socket and the identity of its file, so that only our own file is
/// removed (a restarted daemon may already have bound a new one at the same path).
#[derive(Debug)]
struct UnixSocket {
    listener: LimitedListener<UnixListener>,
    path: PathBuf,
    file: (u64, u64),
}

fn remove_if_ours(path: &Path, file: (u64, u64)) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if (meta.dev(), meta.ino()) == file {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn read_tls_file(path: &Path) -> Result<Vec<u8>, GrpcError> {
    std::fs::read(path).map_err(|source| GrpcError::TlsFile {
        path: path.to_owned(),
        source,
    })
}

fn server_tls(cfg: &TlsSettings) -> Result<ServerTlsConfig, GrpcError> {
    let identity = Identity::from_pem(read_tls_file(&cfg.cert)?, read_tls_file(&cfg.key)?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &cfg.client_ca {
        tls = tls
            .client_ca_root(Certificate::from_pem(read_tls_file(ca)?))
            .client_auth_optional(false);
    }
    Ok(tls)
}

/// Reads and parses the TLS files as the server does when it starts serving, without
/// binding anything: the daemon's start-up checks (and `check-config`) call it, so an
/// unreadable or unusable certificate, key or CA is refused before anything runs rather
/// than leaving a daemon without its API.
pub fn check_tls(cfg: &TlsSettings) -> Result<(), GrpcError> {
    Server::builder()
        .tls_config(server_tls(cfg)?)
        .map(drop)
        .map_err(GrpcError::Tls)
}

/// Binds a Unix socket at `path` with mode 0600 from the first moment: it is bound inside
/// a fresh 0700 directory next to `path`, restricted, then renamed into place.
fn bind_unix(path: &Path) -> Result<UnixListener, GrpcError> {
    let err = |source| GrpcError::UnixSocket {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(GrpcError::SocketInUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let staging = parent.join(format!(
        ".{}.{}.{nanos}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(err)?;
    let staged = staging.join("sock");
    let result = (|| {
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&staging);
    result.map_err(err)
}

impl GrpcServer {
    /// Binds the configured listeners (TCP with SO_REUSEADDR) and loads the TLS files.
    pub async fn bind(cfg: &GrpcSettings) -> Result<Self, GrpcError> {
        if cfg.tcp.is_none() && cfg.unix.is_none() {
            return Err(GrpcError::NoListener);
        }
        let tls = cfg
            .tls
            .as_ref()
            .map(server_tls)
            .transpose()?
            .map(|t| t.timeout(cfg.limits.handshake_timeout));
        let tcp = match cfg.tcp {
            Some(addr) => Some(LimitedListener::new(
                listen::bind_tcp(addr).map_err(|source| GrpcError::Bind { addr, source })?,
                "gRPC TCP listener",
                cfg.limits,
                ConnMetrics::default(),
            )),
            None => None,
        };
        let unix = match &cfg.unix {
            Some(path) => {
                let listener = bind_unix(path)?;
                let meta =
                    std::fs::symlink_metadata(path).map_err(|source| GrpcError::UnixSocket {
                        path: path.clone(),
                        source,
                    })?;
                Some(UnixSocket {
                    listener: LimitedListener::new(
                        listener,
                        "gRPC Unix socket",
                        cfg.limits,
                        ConnMetrics::default(),
                    ),
                    path: path.clone(),
                    file: (meta.dev(), meta.ino()),
                })
            }
            None => None,
        };
        Ok(Self {
            tcp,
            unix,
            tls,
            keepalive_interval: cfg.keepalive_interval,
            keepalive_timeout: cfg.keepalive_timeout,
        })
    }

    /// Reports each listener's connections to the given metrics.
    pub fn with_connection_metrics(mut self, tcp: ConnMetrics, unix: ConnMetrics) -> Self {
        self.tcp = self.tcp.map(|l| l.with_metrics(tcp));
        self.unix = self.unix.map(|u| UnixSocket {
            listener: u.listener.with_metrics(unix),
            path: u.path,
            file: u.file,
        });
        self
    }

    /// The bound TCP address (the real port when configured with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp
            .as_ref()
            .and_then(|l| l.get_ref().local_addr().ok())
    }

    /// The Unix socket path.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|u| u.path.as_path())
    }

    /// Serves until `shutdown` completes; then stops accepting (closes the listeners and
    /// removes the socket file), ends every stream client's stream with UNAVAILABLE
    /// ([`Hub::shut_down`]), and returns once the connections have closed.
    pub async fn run(
        self,
        hub: Hub,
        status: Arc<dyn StatusSource>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GrpcError> {
        let mut running = self.start(hub.clone(), status);
        tokio::select! {
            _ = shutdown => {}
            // Only an error ends the server before it is told to stop.
            ended = &mut running.task => return joined(ended),
        }
        running.stop_accepting();
        hub.shut_down();
        running.wait().await
    }

    /// Starts serving in a task. The caller stops it in steps (see [`RunningGrpc`]).
    pub fn start(self, hub: Hub, status: Arc<dyn StatusSource>) -> RunningGrpc {
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(self.serve(hub, status, stop_rx));
        RunningGrpc { stop, task }
    }

    async fn serve(
        self,
        hub: Hub,
        status: Arc<dyn StatusSource>,
        stop: watch::Receiver<bool>,
    ) -> Result<(), GrpcError> {
        let service = AgentMonitorService::new(hub, status).into_server();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<AgentMonitorServer<AgentMonitorService>>()
            .await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let (interval, timeout) = (self.keepalive_interval, self.keepalive_timeout);
        let builder = move || {
            Server::builder()
                .http2_keepalive_interval(Some(interval))
                .http2_keepalive_timeout(Some(timeout))
                // Every call, of any service, ends its connection's handshake phase.
                .layer(InterceptorLayer::new(|req: Request<()>| {
                    if let Some(conn) = req.extensions().get::<ConnHandle>() {
                        conn.mark_request();
                    }
                    Ok(req)
                }))
        };
        let signal = |mut rx: watch::Receiver<bool>| async move {
            // An error means the sender is gone: stop as well.
            let _ = rx.wait_for(|stop| *stop).await;
        };

        let tcp = {
            let (service, health) = (service.clone(), health.clone());
            let (r1, r1a) = (reflection_v1.clone(), reflection_v1alpha.clone());
            let rx = stop.clone();
            let listener = self.tcp;
            let tls = self.tls;
            async move {
                let Some(listener) = listener else {
                    return Ok(());
                };
                let mut server = builder();
                if let Some(tls) = tls {
                    server = server.tls_config(tls).map_err(GrpcError::Tls)?;
                }
                server
                    .add_service(health)
                    .add_service(r1)
                    .add_service(r1a)
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming(listener, rx.clone(), || {}), signal(rx))
                    .await
                    .map_err(GrpcError::Serve)
            }
        };
        let unix_file = self.unix.as_ref().map(|u| (u.path.clone(), u.file));
        let unix = {
            let rx = stop;
            let socket = self.unix;
            async move {
                let Some(UnixSocket {
                    listener,
                    path,
                    file,
                }) = socket
                else {
                    return Ok(());
                };
                builder()
                    .add_service(health)
                    .add_service(reflection_v1)
                    .add_service(reflection_v1alpha)
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        // Clients that name the socket path as the authority (grpcio) are
                        // made acceptable to the HTTP/2 layer (see `authority`).
                        incoming(listener, rx.clone(), move || remove_if_ours(&path, file))
                            .map(|conn| conn.map(AuthorityFix::new)),
                        signal(rx),
                    )
                    .await
                    .map_err(GrpcError::Serve)
            }
        };
        let result = tokio::try_join!(tcp, unix).map(|_| ());
        if let Some((path, file)) = unix_file {
            remove_if_ours(&path, file);
        }
        result
    }
}

/// The connections of a listener until `stop`: then the listener is closed at once (a
/// restarted daemon can bind its address while this one drains) and `on_close` runs.
fn incoming<L: RawListener>(
    listener: LimitedListener<L>,
    stop: watch::Receiver<bool>,
    on_close: impl FnOnce() + Send + 'static,
) -> impl Stream<Item = Result<Limited<L::Io>, std::io::Error>> + Send {
    futures::stream::unfold(Some((listener, stop, on_close)), |state| async move {
        let (listener, mut stop, on_close) = state?;
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => None,
            (io, _) = listener.accept() => Some(io),
        };
        match accepted {
            Some(io) => Some((Ok(io), Some((listener, stop, on_close)))),
            None => {
                drop(listener);
                on_close();
                None
            }
        }
    })
}

fn joined(ended: Result<Result<(), GrpcError>, tokio::task::JoinError>) -> Result<(), GrpcError> {
    ended.map_err(|e| GrpcError::Task(e.to_string()))?
}

/// A server started with [`GrpcServer::start`].
#[derive(Debug)]
pub struct RunningGrpc {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), GrpcError>>,
}

impl RunningGrpc {
    /// Stops accepting: the listeners close and the socket file is removed at once, and
    /// every connection is told (HTTP/2 GOAWAY) to open no new calls. Calls in progress,
    /// streams included, go on: [`Hub::shut_down`] ends the streams.
    pub fn stop_accepting(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the server stopped (after [`RunningGrpc::stop_accepting`], once every
    /// connection closed).
    pub async fn wait(self) -> Result<(), GrpcError> {
        joined(self.task.await)
    }
}

/// Serves the API on the configured listeners until `shutdown` completes.
pub async fn serve(
    cfg: GrpcSettings,
    hub: Hub,
    status: Arc<dyn StatusSource>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GrpcError> {
    GrpcServer::bind(&cfg)
        .await?
        .run(hub, status, shutdown)
        .await
}
