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
    extract::{ConnectInfo, State},
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

use crate::outputs::listen::{ConnHandle, ConnLimits, ConnMetrics, LimitedListener};

/// The `Content-Type` of `GET /metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long `/healthz` tolerates a daemon loop that has not turned, by default. The lane
/// consumer turns at least every `poll_interval_ms` (at most 10 s) and the pipeline every
/// second, busy or idle, so a loop this late is stuck, not waiting for work.
pub const DEFAULT_LOOP_STALL: Duration = Duration::from_secs(30);

/// Upper bounds (seconds) of the pipeline latency histogram: 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The event lanes, pre-created at zero so that dashboards see every series from the start.
pub const LANES: [&str; 3] = ["credential", "network", "process"];

/// A label set of `N` labels with static keys; values borrow when they are known constants.
/// Workloads given their own `agent_monitor_budget_drops` series.
pub const MAX_BUDGET_WORKLOADS: usize = 100;

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
    connections: Family<Labels<1>, Gauge>,
    connections_closed: Family<Labels<2>, Counter>,
    sink_failures: Family<Labels<1>, Counter>,
    policies: Family<Labels<2>, Gauge>,
    watched: Family<Labels<1>, Gauge>,
    kernel_map_refusals: Counter,
    kernel_silence: Gauge<f64, AtomicU64>,
    journal_dropped: Counter,
    journal_records: Counter,
    journal_bytes: Counter,
    journal_sync: Histogram,
    journal_recoveries: Family<Labels<1>, Counter>,
    journal_truncated_bytes: Counter,
    budget_drops: Family<Labels<3>, Counter>,
    /// (namespace, pod) pairs given their own `budget_drops` series so far.
    budget_workloads: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
}

/// Upper bounds (seconds) of the journal's fsync latency histogram: 100 µs to 10 s.
pub const SYNC_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0,
];

/// The `source` and `state` labels of `agent_monitor_policies`.
const POLICY_SERIES: [(&str, &str); 3] = [
    ("file", "in_force"),
    ("cluster", "in_force"),
    ("cluster", "rejected"),
];

/// How the newest segment ended when the journal was opened, as the `tail` label.
pub const JOURNAL_TAILS: [&str; 4] = ["clean", "torn", "corrupt", "left_alone"];

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
        let connections = Family::<Labels<1>, Gauge>::default();
        let connections_closed = Family::<Labels<2>, Counter>::default();
        let sink_failures = Family::<Labels<1>, Counter>::default();
        let policies = Family::<Labels<2>, Gauge>::default();
        let watched = Family::<Labels<1>, Gauge>::default();
        let kernel_map_refusals = Counter::default();
        let kernel_silence = Gauge::<f64, AtomicU64>::default();
        let journal_dropped = Counter::default();
        let journal_records = Counter::default();
        let journal_bytes = Counter::default();
        let journal_sync = Histogram::new(SYNC_BUCKETS);
        let journal_recoveries = Family::<Labels<1>, Counter>::default();
        let journal_truncated_bytes = Counter::default();
        let budget_drops = Family::<Labels<3>, Counter>::default();
        registry.register(
            "agent_monitor_budget_drops",
            "Kernel records dropped because one workload went over its lane budget, by lane, namespace and pod (the first 100 workloads by name, the rest as namespace=\"other\", pod=\"other\")",
            budget_drops.clone(),
        );
        registry.register(
            "agent_monitor_journal_dropped",
            "Records not journaled because the journal writer's queue was full (a slow disk) or the writer had stopped",
            journal_dropped.clone(),
        );
        registry.register(
            "agent_monitor_journal_records",
            "Records appended to the journal (run markers included)",
            journal_records.clone(),
        );
        registry.register_with_unit(
            "agent_monitor_journal",
            "Bytes appended to the journal, framing included",
            Unit::Bytes,
            journal_bytes.clone(),
        );
        registry.register_with_unit(
            "agent_monitor_journal_sync",
            "Time of each periodic fsync of the journal",
            Unit::Seconds,
            journal_sync.clone(),
        );
        registry.register(
            "agent_monitor_journal_recoveries",
            "Journal opens, by how the newest segment ended: clean, torn (a kill mid-write; cut off), corrupt (a damaged record; it and what followed cut off), left_alone (not this format)",
            journal_recoveries.clone(),
        );
        registry.register_with_unit(
            "agent_monitor_journal_truncated",
            "Bytes cut off the end of the journal when it was opened (a torn or corrupt tail)",
            Unit::Bytes,
            journal_truncated_bytes.clone(),
        );
        registry.register_with_unit(
            "agent_monitor_kernel_silence",
            "Time since the last record from the kernel (since start when there was none yet); a quiet node is not a fault, so this is reported, not a health failure",
            Unit::Seconds,
            kernel_silence.clone(),
        );
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
            "Items waiting in an internal queue: pipeline (records between the lane consumer and the outputs), falcosidekick (alerts waiting for delivery)",
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
            "gRPC stream clients connected now (StreamEvents and StreamAnomalies calls in progress)",
            grpc_clients.clone(),
        );
        registry.register(
            "agent_monitor_connections",
            "Connections admitted now, by listener (grpc_tcp, grpc_unix, admin)",
            connections.clone(),
        );
        registry.register(
            "agent_monitor_connections_closed",
            "Connections the daemon closed, by listener and reason: limit (new connection over max_connections), evicted (a connection without a request closed to make room), handshake_timeout, idle_timeout",
            connections_closed.clone(),
        );
        registry.register(
            "agent_monitor_sink_failures",
            "Failed writes to an output sink, by sink: events and alerts (file or stdout writes), journal (failed appends or syncs), falcosidekick (failed POSTs, rejected alerts, alerts dropped on a full queue or undelivered at shutdown)",
            sink_failures.clone(),
        );

        registry.register(
            "agent_monitor_policies",
            "AgentPolicies by source and state: file in_force (detect.policies), cluster in_force and cluster rejected (AgentPolicy objects whose current version was refused; the reasons are in GetStatus and the log)",
            policies.clone(),
        );

        for lane in LANES {
            let key = [("lane", Cow::Borrowed(lane))];
            drop(events.get_or_create(&key));
            drop(lost.get_or_create(&key));
        }
        // The sinks every daemon has; the journal and Falcosidekick are declared when
        // configured (`declare_sink`).
        for sink in ["events", "alerts"] {
            drop(sink_failures.get_or_create(&[("sink", Cow::Borrowed(sink))]));
        }
        for (source, state) in POLICY_SERIES {
            drop(policies.get_or_create(&[
                ("source", Cow::Borrowed(source)),
                ("state", Cow::Borrowed(state)),
            ]));
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
            connections,
            connections_closed,
            sink_failures,
            policies,
            watched,
            kernel_map_refusals,
            kernel_silence,
            journal_dropped,
            journal_records,
            journal_bytes,
            journal_sync,
            journal_recoveries,
            journal_truncated_bytes,
            budget_drops,
            budget_workloads: std::sync::Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Counts a record the journal did not take.
    pub fn record_journal_dropped(&self) {
        self.journal_dropped.inc();
    }

    /// Brings the journal's write counters up to the writer's totals and records the
    /// latest sync's time (`sync`: None when no sync happened since the last call).
    pub fn set_journal_written(&self, records: u64, bytes: u64, sync: Option<Duration>) {
        self.journal_records
            .inc_by(records.saturating_sub(self.journal_records.get()));
        self.journal_bytes
            .inc_by(bytes.saturating_sub(self.journal_bytes.get()));
        if let Some(d) = sync {
            self.journal_sync.observe(d.as_secs_f64());
        }
    }

    /// Counts one journal open whose newest segment ended as `tail` (one of
    /// [`JOURNAL_TAILS`]), and the bytes cut off it.
    pub fn record_journal_recovery(&self, tail: &'static str, truncated_bytes: u64) {
        for t in JOURNAL_TAILS {
            // Every series exists from the first open, so a dashboard sees the zeros.
            drop(
                self.journal_recoveries
                    .get_or_create(&[("tail", Cow::Borrowed(t))]),
            );
        }
        self.journal_recoveries
            .get_or_create(&[("tail", Cow::Borrowed(tail))])
            .inc();
        self.journal_truncated_bytes.inc_by(truncated_bytes);
    }

    /// Counts `count` decoded records in `lane` (`credential`, `network` or `process`).
    pub fn record_events(&self, lane: &str, count: u64) {
        self.events
            .get_or_create(&[("lane", lane_value(lane))])
            .inc_by(count);
    }

    /// Counts `count` records the kernel dropped in `lane`.
    pub fn record_lost(&self, lane: &str, count: u64) {
        self.lost
            .get_or_create(&[("lane", lane_value(lane))])
            .inc_by(count);
    }

    /// Counts `count` records of the workload `namespace`/`pod` that its budget dropped in
    /// `lane`. Series are bounded: past [`MAX_BUDGET_WORKLOADS`] workloads the rest share
    /// one `other` series.
    pub fn record_budget_drop(&self, lane: &str, namespace: &str, pod: &str, count: u64) {
        let key = (namespace.to_owned(), pod.to_owned());
        let own = self.budget_workloads.lock().is_ok_and(|mut seen| {
            seen.contains(&key) || (seen.len() < MAX_BUDGET_WORKLOADS && seen.insert(key.clone()))
        });
        let (ns, pod) = if own {
            (owned(namespace), owned(pod))
        } else {
            (Cow::Borrowed("other"), Cow::Borrowed("other"))
        };
        self.budget_drops
            .get_or_create(&[("lane", lane_value(lane)), ("namespace", ns), ("pod", pod)])
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
    pub fn set_watch(&self, w: &crate::identity::watched::WatchStatus) {
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

    /// Sets the number of connected gRPC stream clients.
    pub fn set_grpc_clients(&self, n: i64) {
        self.grpc_clients.set(n);
    }

    /// The metrics a listener reports its connections to (`listener`: `grpc_tcp`,
    /// `grpc_unix`, `admin`); every series starts at 0.
    pub fn connection_metrics(&self, listener: &'static str) -> ConnMetrics {
        let closed = |reason: &'static str| {
            self.connections_closed
                .get_or_create(&[
                    ("listener", Cow::Borrowed(listener)),
                    ("reason", Cow::Borrowed(reason)),
                ])
                .clone()
        };
        ConnMetrics {
            open: self
                .connections
                .get_or_create(&[("listener", Cow::Borrowed(listener))])
                .clone(),
            refused: closed("limit"),
            evicted: closed("evicted"),
            handshake_timeouts: closed("handshake_timeout"),
            idle_timeouts: closed("idle_timeout"),
        }
    }

    /// Makes the named sink's failure counter visible at 0 before its first failure.
    pub fn declare_sink(&self, sink: &str) {
        drop(self.sink_failures.get_or_create(&[("sink", owned(sink))]));
    }

    /// Copies the number of policies in force and of rejected cluster objects.
    pub fn set_policies(&self, sources: &crate::policy::sources::PolicySources) {
        let counts = [
            sources.file_count(),
            sources.cluster_count(),
            sources.cluster_rejections().len(),
        ];
        for ((source, state), n) in POLICY_SERIES.into_iter().zip(counts) {
            self.policies
                .get_or_create(&[
                    ("source", Cow::Borrowed(source)),
                    ("state", Cow::Borrowed(state)),
                ])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Counts one failed write to the named sink.
    pub fn record_sink_failure(&self, sink: &str) {
        self.sink_failures
            .get_or_create(&[("sink", owned(sink))])
            .inc();
    }

    /// Brings the named sink's failure counter up to `total`, a count kept elsewhere (the
    /// Falcosidekick sender's); a counter never goes down, so a smaller total is ignored.
    pub fn set_sink_failures_total(&self, sink: &str, total: u64) {
        let c = self.sink_failures.get_or_create(&[("sink", owned(sink))]);
        c.inc_by(total.saturating_sub(c.get()));
    }

    /// Sets the time since the last kernel record.
    pub fn set_kernel_silence(&self, silence: Duration) {
        self.kernel_silence.set(silence.as_secs_f64());
    }

    /// Renders every metric in the OpenMetrics text format, `# EOF` included.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail and no custom collector is registered, so an
        // error here would be a bug in the encoder; report it rather than panic.
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!("encoding metrics failed: {e}");
        }
        out
    }
}

/// Proof of life of one of the daemon's loops: the loop calls [`Heartbeat::beat`] on every
/// turn and `/healthz` fails when it has not for too long. Cheap to clone (the clones share
/// the stamp) and to beat (one clock read, one atomic store).
#[derive(Debug, Clone)]
pub struct Heartbeat {
    born: Instant,
    /// Nanoseconds after `born` of the last beat.
    last: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeat {
    /// A heartbeat that beat just now.
    pub fn new() -> Self {
        Self {
            born: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The loop is alive now.
    pub fn beat(&self) {
        let nanos = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> Duration {
        let at = Duration::from_nanos(self.last.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(at)
    }
}

/// Liveness and readiness state behind `/healthz` and `/readyz`.
///
/// Liveness means "the daemon's own loops are alive and the probes are attached": it never
/// depends on what the node does. A quiet node (nothing forks, or a cgroup filter that
/// matches nothing) is healthy; the silence is reported by
/// `agent_monitor_kernel_silence_seconds` and at most a low-priority notice.
#[derive(Debug)]
pub struct Health {
    /// Reference point for `last_activity`, and the start of the silence before the first
    /// record.
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last kernel record, plus one; 0 means never.
    last_activity: AtomicU64,
    probes_attached: AtomicU64,
    ready: AtomicBool,
    /// A loop whose heartbeat is older than this is stalled.
    stall: Duration,
    loops: std::sync::Mutex<Vec<(&'static str, Heartbeat)>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(DEFAULT_LOOP_STALL)
    }
}

impl Health {
    /// New state: no probes, no loops, not ready. `/healthz` fails once a loop registered
    /// with [`Health::watch_loop`] has not beaten for `stall`.
    pub fn new(stall: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            last_activity: AtomicU64::new(0),
            probes_attached: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            stall,
            loops: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The stall window this state was built with.
    pub fn stall(&self) -> Duration {
        self.stall
    }

    /// Watches a loop: from now on `/healthz` fails, naming it, when `heartbeat` is older
    /// than the stall window.
    pub fn watch_loop(&self, name: &'static str, heartbeat: Heartbeat) {
        if let Ok(mut loops) = self.loops.lock() {
            loops.push((name, heartbeat));
        }
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

    /// Time since the last kernel record, or since this state was created when there was
    /// none yet.
    pub fn kernel_silence(&self) -> Duration {
        self.since_kernel_activity()
            .unwrap_or_else(|| self.epoch.elapsed())
    }

    /// `Ok` when probes are attached and every watched loop beat within the stall window;
    /// otherwise a one-line reason naming what is wrong.
    pub fn liveness(&self) -> Result<(), String> {
        if self.probes_attached.load(Ordering::Relaxed) == 0 {
            return Err("no probes attached".to_owned());
        }
        let loops = self
            .loops
            .lock()
            .map_err(|_| "health state poisoned".to_owned())?;
        let stalled: Vec<String> = loops
            .iter()
            .filter_map(|(name, hb)| {
                let age = hb.age();
                (age > self.stall)
                    .then(|| format!("{name} loop stalled for {} ms", age.as_millis()))
            })
            .collect();
        if stalled.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} (limit {} ms)",
                stalled.join(", "),
                self.stall.as_millis()
            ))
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

/// Serves the admin endpoints on an already-bound listener, with the default
/// [`ConnLimits::ADMIN`] and unregistered connection metrics. See [`serve_admin_limited`].
pub async fn serve_admin_on(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let listener = LimitedListener::new(
        listener,
        "admin listener",
        ConnLimits::ADMIN,
        ConnMetrics::default(),
    );
    serve_admin_limited(listener, metrics, health, shutdown).await
}

/// Serves the admin endpoints on a listener with connection limits (see
/// [`crate::outputs::listen`]) until `shutdown` resolves; then the listener is closed at
/// once and in-flight requests finish:
///
/// - `GET /metrics`: [`Metrics::render`] as `application/openmetrics-text`;
/// - `GET /healthz`: 200 `ok`, or 503 with the reason from [`Health::liveness`] (no probes,
///   or a stalled loop named);
/// - `GET /readyz`: 200 `ready` once [`Health::set_ready`]`(true)`, else 503;
/// - any other path: 404 (another method on those paths: 405).
pub async fn serve_admin_limited(
    listener: LimitedListener<TcpListener>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let app = router(metrics, health)
        // A request ends its connection's handshake phase (see `listen`).
        .layer(axum::middleware::from_fn(mark_request))
        .into_make_service_with_connect_info::<ConnHandle>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(AdminError::Serve)
}

async fn mark_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if let Some(ConnectInfo(conn)) = req.extensions().get::<ConnectInfo<ConnHandle>>() {
        conn.mark_request();
    }
    next.run(req).await
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
    // Read at scrape time: exact, and no task has to keep it current.
    state
        .metrics
        .set_kernel_silence(state.health.kernel_silence());
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
        m.record_events("other", 1);
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
    fn budget_drop_series_are_bounded() {
        let m = Metrics::new();
        for i in 0..=MAX_BUDGET_WORKLOADS {
            m.record_budget_drop("network", "agents", &format!("pod-{i}"), 2);
        }
        m.record_budget_drop("network", "agents", "pod-0", 1);
        let text = m.render();
        assert!(text.contains(
            "agent_monitor_budget_drops_total{lane=\"network\",namespace=\"agents\",pod=\"pod-0\"} 3\n"
        ));
        assert!(text.contains(
            "agent_monitor_budget_drops_total{lane=\"network\",namespace=\"other\",pod=\"other\"} 2\n"
        ));
    }

    #[test]
    fn liveness_is_probes_and_loops_not_kernel_activity() {
        let h = Health::new(Duration::from_secs(3600));
        assert_eq!(h.liveness(), Err("no probes attached".to_owned()));
        h.set_probes_attached(2);
        // Nothing from the kernel yet: still alive.
        assert_eq!(h.liveness(), Ok(()));
        assert!(h.since_kernel_activity().is_none());
        let lane = Heartbeat::new();
        h.watch_loop("lane consumer", lane.clone());
        assert_eq!(h.liveness(), Ok(()));
        // A loop that stops beating fails liveness, by name.
        let stalled = Health::new(Duration::ZERO);
        stalled.set_probes_attached(1);
        let pipeline = Heartbeat::new();
        stalled.watch_loop("pipeline", pipeline.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        let reason = loop {
            match stalled.liveness() {
                Err(r) => break r,
                Ok(()) => assert!(Instant::now() < deadline, "never stalled"),
            }
            std::thread::yield_now();
        };
        assert!(
            reason.starts_with("pipeline loop stalled for ") && reason.ends_with(" (limit 0 ms)"),
            "{reason}"
        );
    }

    #[test]
    fn kernel_silence_counts_from_start_then_from_the_last_record() {
        let h = Health::new(DEFAULT_LOOP_STALL);
        let before = h.kernel_silence();
        std::thread::sleep(Duration::from_millis(5));
        assert!(h.kernel_silence() > before, "grows from start");
        h.mark_kernel_activity();
        assert!(h.since_kernel_activity().is_some());
        let m = Metrics::new();
        m.set_kernel_silence(Duration::from_millis(1500));
        assert!(
            m.render()
                .contains("agent_monitor_kernel_silence_seconds 1.5\n"),
            "{}",
            m.render()
        );
    }

    #[test]
    fn sink_failure_totals_only_grow() {
        let m = Metrics::new();
        m.set_sink_failures_total("falcosidekick", 3);
        m.set_sink_failures_total("falcosidekick", 2);
        m.record_sink_failure("events");
        let text = m.render();
        assert!(text.contains("agent_monitor_sink_failures_total{sink=\"falcosidekick\"} 3\n"));
        assert!(text.contains("agent_monitor_sink_failures_total{sink=\"events\"} 1\n"));
    }

    #[test]
    fn policy_counts_and_sink_failures_have_series_from_the_start() {
        use kube::{api::DynamicObject, runtime::watcher};

        use crate::policy::{set::PolicySet, sources::PolicySources};

        let m = Metrics::new();
        let text = m.render();
        for zero in [
            "agent_monitor_sink_failures_total{sink=\"events\"} 0\n",
            "agent_monitor_sink_failures_total{sink=\"alerts\"} 0\n",
            "agent_monitor_policies{source=\"cluster\",state=\"rejected\"} 0\n",
        ] {
            assert!(text.contains(zero), "no {zero:?} in {text}");
        }
        assert!(!text.contains("sink=\"journal\""));
        m.declare_sink("journal");
        assert!(m
            .render()
            .contains("agent_monitor_sink_failures_total{sink=\"journal\"} 0\n"));

        let object = |name: &str, spec: serde_json::Value| -> DynamicObject {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "agent-monitor.dev/v1alpha1", "kind": "AgentPolicy",
                "metadata": {"namespace": "agents", "name": name, "resourceVersion": "1"},
                "spec": spec,
            }))
            .expect("a DynamicObject")
        };
        let sources = PolicySources::new(PolicySet::default());
        sources.apply_cluster_event(watcher::Event::Apply(object(
            "workers",
            serde_json::json!({"selector": {"serviceAccounts": ["agent-*"]}}),
        )));
        sources.apply_cluster_event(watcher::Event::Apply(object(
            "typo",
            serde_json::json!({"egress": {"allow": [{"cidr": "10.0.0.0/99"}]}}),
        )));
        m.set_policies(&sources);
        let text = m.render();
        for want in [
            "agent_monitor_policies{source=\"file\",state=\"in_force\"} 0\n",
            "agent_monitor_policies{source=\"cluster\",state=\"in_force\"} 1\n",
            "agent_monitor_policies{source=\"cluster\",state=\"rejected\"} 1\n",
        ] {
            assert!(text.contains(want), "no {want:?} in {text}");
        }
    }
}
