//! Self-observability: Prometheus/OpenMetrics counters and gauges about the monitor itself,
//! liveness/readiness state, and the small HTTP admin server that exposes them
//! (`GET /metrics`, `/healthz`, `/readyz`).
//!
//! [`Metrics`] and [`Health`] are meant to be created once and shared as `Arc`s between the
//! pipeline (which records) and [`serve_admin`] (which reports). Recording is lock-free apart
//! from a read lock on the label family; the three known lanes never allocate.

use std::{
    borrow::Cow,
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;

/// The `Content-Type` of `GET /metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long `/healthz` tolerates silence from the kernel by default. On a live node
/// fork/exec/exit records never stop, so a minute without any means the probes are dead.
pub const DEFAULT_STALENESS: Duration = Duration::from_secs(60);

/// Upper bounds (seconds) of the pipeline latency histogram: 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The event lanes, pre-created at zero so that dashboards see every series from the start.
pub const LANES: [&str; 3] = ["credential", "network", "process"];

/// A label set of `N` labels with static keys; values borrow when they are known constants.
type Labels<const N: usize> = [(&'static str, Cow<'static, str>); N];

/// Maps a lane name to a borrowed label value when it is one of [`LANES`], so the hot path
/// does not allocate.
fn lane_value(lane: &str) -> Cow<'static, str> {
    match LANES.iter().find(|l| **l == lane) {
        Some(l) => Cow::Borrowed(l),
        None => Cow::Owned(lane.to_owned()),
    }
}

fn owned(value: &str) -> Cow<'static, str> {
    Cow::Owned(value.to_owned())
}

/// The monitor's own metrics, on a private prometheus-client [`Registry`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    events: Family<Labels<1>, Counter>,
    lost: Family<Labels<1>, Counter>,
    alerts: Family<Labels<2>, Counter>,
    latency: Histogram,
    queue_depth: Family<Labels<1>, Gauge>,
    identity_cache_size: Gauge,
    probes_attached: Gauge,
    grpc_clients: Gauge,
    sink_failures: Family<Labels<1>, Counter>,
    watched: Family<Labels<1>, Gauge>,
    kernel_map_refusals: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric. The per-lane event and loss counters start at 0.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let events = Family::<Labels<1>, Counter>::default();
        let lost = Family::<Labels<1>, Counter>::default();
        let alerts = Family::<Labels<2>, Counter>::default();
        let latency = Histogram::new(LATENCY_BUCKETS);
        let queue_depth = Family::<Labels<1>, Gauge>::default();
        let identity_cache_size = Gauge::default();
        let probes_attached = Gauge::default();
        let grpc_clients = Gauge::default();
        let sink_failures = Family::<Labels<1>, Counter>::default();
        let watched = Family::<Labels<1>, Gauge>::default();
        let kernel_map_refusals = Counter::default();
        registry.register(
            "agent_monitor_watched",
            "Entries the kernel matches opens against by file identity: pod volume filesystems and node credential inventory entries",
            watched.clone(),
        );
        registry.register(
            "agent_monitor_kernel_map_refusals",
            "Inserts a full kernel map refused since start (each is retried on the next sync)",
            kernel_map_refusals.clone(),
        );

        // Counter names get their `_total` suffix, and units their `_seconds`, from the
        // encoder.
        registry.register(
            "agent_monitor_events",
            "Kernel records decoded, by lane",
            events.clone(),
        );
        registry.register(
            "agent_monitor_events_lost",
            "Kernel records lost before user space read them, by lane",
            lost.clone(),
        );
        registry.register(
            "agent_monitor_alerts",
            "Alerts raised, by rule and priority",
            alerts.clone(),
        );
        registry.register_with_unit(
            "agent_monitor_pipeline_latency",
            "Time from the kernel timestamp of a record to its output",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register(
            "agent_monitor_queue_depth",
            "Items waiting in an internal queue",
            queue_depth.clone(),
        );
        registry.register(
            "agent_monitor_identity_cache_size",
            "Entries in the process identity cache",
            identity_cache_size.clone(),
        );
        registry.register(
            "agent_monitor_probes_attached",
            "eBPF programs currently attached",
            probes_attached.clone(),
        );
        registry.register(
            "agent_monitor_grpc_clients",
            "Connected gRPC subscribers",
            grpc_clients.clone(),
        );
        registry.register(
            "agent_monitor_sink_failures",
            "Failed writes to an output sink, by sink",
            sink_failures.clone(),
        );

        for lane in LANES {
            let key = [("lane", Cow::Borrowed(lane))];
            drop(events.get_or_create(&key));
            drop(lost.get_or_create(&key));
        }

        Self {
            registry,
            events,
            lost,
            alerts,
            latency,
            queue_depth,
            identity_cache_size,
            probes_attached,
            grpc_clients,
            sink_failures,
            watched,
            kernel_map_refusals,
        }
    }

    /// Counts one decoded record in `lane` (`credential`, `network` or `process`).
    pub fn record_event(&self, lane: &str) {
        self.events
            .get_or_create(&[("lane", lane_value(lane))])
            .inc();
    }

    /// Counts `count` records the kernel dropped in `lane`.
    pub fn record_lost(&self, lane: &str, count: u64) {
        self.lost
            .get_or_create(&[("lane", lane_value(lane))])
            .inc_by(count);
    }

    /// Counts one alert raised by `rule` at `priority`.
    pub fn record_alert(&self, rule: &str, priority: &str) {
        self.alerts
            .get_or_create(&[("rule", owned(rule)), ("priority", owned(priority))])
            .inc();
    }

    /// Records the time from a record's kernel timestamp to its output.
    pub fn observe_latency(&self, latency: Duration) {
        self.latency.observe(latency.as_secs_f64());
    }

    /// Sets the current depth of the named internal queue.
    pub fn set_queue_depth(&self, queue: &str, depth: i64) {
        self.queue_depth
            .get_or_create(&[("queue", owned(queue))])
            .set(depth);
    }

    /// Sets the number of entries in the identity cache.
    pub fn set_identity_cache_size(&self, size: i64) {
        self.identity_cache_size.set(size);
    }

    /// Copies what the kernel watches by file identity, and the refusals of full maps.
    pub fn set_watch(&self, w: &crate::watching::WatchStatus) {
        use std::sync::atomic::Ordering::Relaxed;
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.watched
            .get_or_create(&[("kind", owned("filesystems"))])
            .set(gauge(w.volumes.load(Relaxed)));
        self.watched
            .get_or_create(&[("kind", owned("inventory"))])
            .set(gauge(w.inventory.load(Relaxed)));
        // A counter: it only grows, so the delta since the last copy is added.
        let total = w.map_full.load(Relaxed);
        self.kernel_map_refusals
            .inc_by(total.saturating_sub(self.kernel_map_refusals.get()));
    }

    /// Sets the number of attached eBPF programs.
    pub fn set_probes_attached(&self, n: i64) {
        self.probes_attached.set(n);
    }

    /// Sets the number of connected gRPC subscribers.
    pub fn set_grpc_clients(&self, n: i64) {
        self.grpc_clients.set(n);
    }

    /// Counts one failed write to the named sink.
    pub fn record_sink_failure(&self, sink: &str) {
        self.sink_failures
            .get_or_create(&[("sink", owned(sink))])
            .inc();
    }

    /// Renders every metric in the OpenMetrics text format, `# EOF` included.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail and no custom collector is registered, so an
        // error here would be a bug in the encoder; report it rather than panic.
        if let Err(e) = encode(&mut out, &self.registry) {
            log::warn!("encoding metrics failed: {e}");
        }
        out
    }
}

/// Liveness and readiness state behind `/healthz` and `/readyz`.
#[derive(Debug)]
pub struct Health {
    /// Reference point for `last_activity`.
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last kernel record, plus one; 0 means never.
    last_activity: AtomicU64,
    probes_attached: AtomicU64,
    ready: AtomicBool,
    staleness: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(DEFAULT_STALENESS)
    }
}

impl Health {
    /// New state: no probes, no activity, not ready. `/healthz` fails once the last kernel
    /// record is older than `staleness`.
    pub fn new(staleness: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            last_activity: AtomicU64::new(0),
            probes_attached: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            staleness,
        }
    }

    /// The staleness window this state was built with.
    pub fn staleness(&self) -> Duration {
        self.staleness
    }

    /// Records how many eBPF programs are attached.
    pub fn set_probes_attached(&self, n: u64) {
        self.probes_attached.store(n, Ordering::Relaxed);
    }

    /// Records that a kernel record arrived now (monotonic clock).
    pub fn mark_kernel_activity(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last_activity
            .fetch_max(nanos.saturating_add(1), Ordering::Relaxed);
    }

    /// Marks the daemon ready (consuming, outputs open) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether [`Health::set_ready`] last set `true`.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Time since the last kernel record, `None` if there was none yet.
    pub fn since_kernel_activity(&self) -> Option<Duration> {
        match self.last_activity.load(Ordering::Relaxed) {
            0 => None,
            stamp => {
                let at = Duration::from_nanos(stamp - 1);
                Some(self.epoch.elapsed().saturating_sub(at))
            }
        }
    }

    /// `Ok` when probes are attached and the kernel spoke within the staleness window;
    /// otherwise a one-line reason.
    pub fn liveness(&self) -> Result<(), String> {
        if self.probes_attached.load(Ordering::Relaxed) == 0 {
            return Err("no probes attached".to_owned());
        }
        match self.since_kernel_activity() {
            None => Err("no kernel activity observed yet".to_owned()),
            Some(age) if age > self.staleness => Err(format!(
                "no kernel activity for {} ms (window {} ms)",
                age.as_millis(),
                self.staleness.as_millis()
            )),
            Some(_) => Ok(()),
        }
    }
}

/// Why the admin server could not run.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The listen address could not be bound (in use, no permission, bad interface).
    #[error("binding admin server to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The server failed while accepting or serving connections.
    #[error("admin server: {0}")]
    Serve(#[source] std::io::Error),
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Binds `addr` and serves the admin endpoints until `shutdown` resolves.
/// See [`serve_admin_on`].
pub async fn serve_admin(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    serve_admin_on(listener, metrics, health, shutdown).await
}

/// Serves the admin endpoints on an already-bound listener until `shutdown` resolves,
/// then lets in-flight requests finish:
///
/// - `GET /metrics`: [`Metrics::render`] as `application/openmetrics-text`;
/// - `GET /healthz`: 200 `ok`, or 503 with the reason from [`Health::liveness`];
/// - `GET /readyz`: 200 `ready` once [`Health::set_ready`]`(true)`, else 503;
/// - any other path: 404 (another method on those paths: 405).
pub async fn serve_admin_on(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(AdminError::Serve)
}

fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .route("/readyz", get(readyz_handler))
        .fallback(not_found)
        .with_state(AdminState { metrics, health })
}

async fn metrics_handler(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

async fn healthz_handler(State(state): State<AdminState>) -> Response {
    match state.health.liveness() {
        Ok(()) => plain(StatusCode::OK, "ok".to_owned()),
        Err(reason) => plain(StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}

async fn readyz_handler(State(state): State<AdminState>) -> Response {
    if state.health.is_ready() {
        plain(StatusCode::OK, "ready".to_owned())
    } else {
        plain(StatusCode::SERVICE_UNAVAILABLE, "not ready".to_owned())
    }
}

async fn not_found() -> Response {
    plain(StatusCode::NOT_FOUND, "not found".to_owned())
}

fn plain(status: StatusCode, mut body: String) -> Response {
    body.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_lanes_start_at_zero_and_unknown_lanes_are_kept() {
        let m = Metrics::new();
        m.record_event("other");
        let text = m.render();
        for lane in LANES {
            assert!(text.contains(&format!(
                "agent_monitor_events_total{{lane=\"{lane}\"}} 0\n"
            )));
            assert!(text.contains(&format!(
                "agent_monitor_events_lost_total{{lane=\"{lane}\"}} 0\n"
            )));
        }
        assert!(text.contains("agent_monitor_events_total{lane=\"other\"} 1\n"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn liveness_reasons() {
        let h = Health::new(Duration::from_secs(3600));
        assert_eq!(h.liveness(), Err("no probes attached".to_owned()));
        h.set_probes_attached(2);
        assert_eq!(
            h.liveness(),
            Err("no kernel activity observed yet".to_owned())
        );
        h.mark_kernel_activity();
        assert_eq!(h.liveness(), Ok(()));
        let stale = Health::new(Duration::ZERO);
        stale.set_probes_attached(1);
        stale.mark_kernel_activity();
        let deadline = Instant::now() + Duration::from_secs(10);
        while stale.liveness().is_ok() {
            assert!(Instant::now() < deadline, "never went stale");
            std::thread::yield_now();
        }
    }
}
