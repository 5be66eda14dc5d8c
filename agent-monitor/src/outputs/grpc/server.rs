//! The tonic service and the listeners it runs on.

use std::{
    future::Future,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
};

use futures::{Stream, StreamExt as _};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::watch,
};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{
    transport::{server::TcpIncoming, Certificate, Identity, Server, ServerTlsConfig},
    Request, Response, Status,
};

use super::{
    hub::{Delivery, Hub},
    pb::{
        self,
        agent_monitor_server::{AgentMonitor, AgentMonitorServer},
    },
    GrpcError,
};

/// Queue length per streaming client when not configured.
pub const DEFAULT_QUEUE_PER_CLIENT: usize = 1024;

/// Where the daemon's status comes from.
pub trait StatusSource: Send + Sync + 'static {
    /// The current status. `clients`, `gaps_sent` and `items_missed` are filled in by the
    /// service from its [`Hub`], whatever this returns for them.
    fn status(&self) -> pb::StatusResponse;
}

/// Server TLS: the server's certificate chain and key (PEM); with `client_ca`, clients
/// must present a certificate signed by it (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Where and how the API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcConfig {
    /// TCP address (TLS applies here when configured).
    pub tcp: Option<SocketAddr>,
    /// Unix socket path, created with mode 0600 (plaintext: the file mode is the access
    /// control). A stale socket file is replaced; a live one is an error.
    pub unix: Option<PathBuf>,
    pub tls: Option<TlsConfig>,
    /// Queue length per streaming client (see [`GrpcConfig::hub`]).
    pub queue_per_client: usize,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            tcp: None,
            unix: None,
            tls: None,
            queue_per_client: DEFAULT_QUEUE_PER_CLIENT,
        }
    }
}

impl GrpcConfig {
    /// A hub with this config's queue length.
    pub fn hub(&self) -> Hub {
        Hub::new(self.queue_per_client)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

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

#[tonic::async_trait]
impl AgentMonitor for AgentMonitorService {
    type StreamEventsStream = BoxStream<pb::StreamEventsResponse>;
    type StreamAnomaliesStream = BoxStream<pb::StreamAnomaliesResponse>;

    async fn stream_events(
        &self,
        request: Request<pb::Filter>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        use pb::stream_events_response::Item;
        let sub = self.hub.subscribe_events(request.get_ref());
        let stream = sub.map(|d| {
            let item = match d {
                Delivery::Item(e) => Item::Event((*e).clone()),
                Delivery::Gap(missed) => Item::Gap(pb::Gap { missed }),
            };
            Ok(pb::StreamEventsResponse { item: Some(item) })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn stream_anomalies(
        &self,
        request: Request<pb::Filter>,
    ) -> Result<Response<Self::StreamAnomaliesStream>, Status> {
        use pb::stream_anomalies_response::Item;
        let sub = self.hub.subscribe_anomalies(request.get_ref());
        let stream = sub.map(|d| {
            let item = match d {
                Delivery::Item(a) => Item::Anomaly((*a).clone()),
                Delivery::Gap(missed) => Item::Gap(pb::Gap { missed }),
            };
            Ok(pb::StreamAnomaliesResponse { item: Some(item) })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let mut status = self.status.status();
        status.clients = self.hub.clients() as u64;
        status.gaps_sent = self.hub.gaps_sent();
        status.items_missed = self.hub.missed();
        Ok(Response::new(status))
    }
}

/// Bound listeners, ready to serve. [`serve`] is `bind` then `run`; binding first lets a
/// caller learn the port of `127.0.0.1:0` before serving.
#[derive(Debug)]
pub struct GrpcServer {
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
    tls: Option<ServerTlsConfig>,
}

fn read_tls_file(path: &Path) -> Result<Vec<u8>, GrpcError> {
    std::fs::read(path).map_err(|source| GrpcError::TlsFile {
        path: path.to_owned(),
        source,
    })
}

fn server_tls(cfg: &TlsConfig) -> Result<ServerTlsConfig, GrpcError> {
    let identity = Identity::from_pem(read_tls_file(&cfg.cert)?, read_tls_file(&cfg.key)?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &cfg.client_ca {
        tls = tls
            .client_ca_root(Certificate::from_pem(read_tls_file(ca)?))
            .client_auth_optional(false);
    }
    Ok(tls)
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
    /// Binds the configured listeners and loads the TLS files.
    pub async fn bind(cfg: &GrpcConfig) -> Result<Self, GrpcError> {
        if cfg.tcp.is_none() && cfg.unix.is_none() {
            return Err(GrpcError::NoListener);
        }
        let tls = cfg.tls.as_ref().map(server_tls).transpose()?;
        let tcp = match cfg.tcp {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| GrpcError::Bind { addr, source })?,
            ),
            None => None,
        };
        let unix = match &cfg.unix {
            Some(path) => Some((bind_unix(path)?, path.clone())),
            None => None,
        };
        Ok(Self { tcp, unix, tls })
    }

    /// The bound TCP address (the real port when configured with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The Unix socket path.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(_, p)| p.as_path())
    }

    /// Serves until `shutdown` completes, then drains connections and removes the socket.
    pub async fn run(
        self,
        hub: Hub,
        status: Arc<dyn StatusSource>,
        shutdown: impl Future<Output = ()> + Send + 'static,
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

        let (stop_tx, stop_rx) = watch::channel(false);
        let trigger = tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let signal = |mut rx: watch::Receiver<bool>| async move {
            // An error means the sender is gone, which only happens after it sent.
            let _ = rx.wait_for(|stop| *stop).await;
        };

        let tcp = {
            let (service, health) = (service.clone(), health.clone());
            let (r1, r1a) = (reflection_v1.clone(), reflection_v1alpha.clone());
            let rx = stop_rx.clone();
            let listener = self.tcp;
            let tls = self.tls;
            async move {
                let Some(listener) = listener else {
                    return Ok(());
                };
                let mut builder = Server::builder();
                if let Some(tls) = tls {
                    builder = builder.tls_config(tls).map_err(GrpcError::Tls)?;
                }
                builder
                    .add_service(health)
                    .add_service(r1)
                    .add_service(r1a)
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        TcpIncoming::from(listener).with_nodelay(Some(true)),
                        signal(rx),
                    )
                    .await
                    .map_err(GrpcError::Serve)
            }
        };
        let unix_path = self.unix.as_ref().map(|(_, p)| p.clone());
        let unix = {
            let rx = stop_rx;
            let listener = self.unix.map(|(l, _)| l);
            async move {
                let Some(listener) = listener else {
                    return Ok(());
                };
                Server::builder()
                    .add_service(health)
                    .add_service(reflection_v1)
                    .add_service(reflection_v1alpha)
                    .add_service(service)
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal(rx))
                    .await
                    .map_err(GrpcError::Serve)
            }
        };
        let result = tokio::try_join!(tcp, unix).map(|_| ());
        trigger.abort();
        if let Some(path) = unix_path {
            let _ = std::fs::remove_file(path);
        }
        result
    }
}

/// Serves the API on the configured listeners until `shutdown` completes.
pub async fn serve(
    cfg: GrpcConfig,
    hub: Hub,
    status: Arc<dyn StatusSource>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GrpcError> {
    GrpcServer::bind(&cfg)
        .await?
        .run(hub, status, shutdown)
        .await
}
