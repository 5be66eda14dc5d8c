//! Wiring and shutdown: config → monitor → output writer; SIGTERM/SIGINT stop intake,
//! drain every lane, flush the output and detach the probes. SIGHUP reopens the output
//! files (log rotation).

pub mod settings;

use std::sync::{Arc, Mutex, RwLock};

use tokio::{
    signal::unix::SignalKind,
    sync::{mpsc, Notify},
};
use tracing::{error, info};

use crate::{
    api::{pb, Origin},
    config::listen_addr,
    config::{Config, PodSourceKind},
    detect::Engine,
    events::Record,
    identity::pods::{self, PodStore},
    monitor::{Monitor, MonitorError},
    outputs::{
        falco,
        falcosidekick::{self, SidekickSettings},
        fanout::{Counters, DaemonStatus, HubSink, Observer},
        grpc::{GrpcServer, GrpcSettings, Hub, RunningGrpc, TlsSettings},
        journal::{Journal, JournalSettings, JOURNAL_QUEUE},
        jsonl::{self, EventLines},
        listen::{self, LimitedListener},
        metrics::{self, Health, Heartbeat, Metrics},
        AlertItem, EventItem, Plain, Sink,
    },
    policy::{PolicySet, PolicySources},
};

/// Records queued between the lane consumer and the output writer. When the writer falls
/// behind, the consumer waits, the rings fill, and the kernel counts the overflow as
/// `lost` records: never a silent loss.
pub const OUTPUT_QUEUE: usize = 65_536;

/// The daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The output could not be opened.
    #[error("cannot open output {output}: {source}")]
    Output {
        output: String,
        #[source]
        source: std::io::Error,
    },
    /// The journal could not be opened (or its start marker written).
    #[error("journal: {0}")]
    Journal(#[from] crate::journal::JournalError),
    /// The monitor failed to start or stopped with an error.
    #[error(transparent)]
    Monitor(#[from] MonitorError),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signal(#[source] std::io::Error),
    /// A server (gRPC, admin) could not start.
    #[error("{0}")]
    Server(String),
    /// The pod source could not start.
    #[error("pod source: {0}")]
    PodSource(String),
    /// A policy source (the cluster's AgentPolicy objects) could not start.
    #[error("policy source: {0}")]
    PolicySource(String),
    /// Writing records failed (e.g. the stdout pipe closed).
    #[error("writing records: {0}")]
    Write(#[source] std::io::Error),
    /// SIGTERM/SIGINT: the drain did not finish within `shutdown_timeout_ms`; the daemon
    /// exited anyway, abandoning what is listed.
    #[error("shutdown did not finish within {bound_ms} ms; abandoned: {abandoned}")]
    ShutdownIncomplete { bound_ms: u128, abandoned: String },
}

/// Most records the output thread takes off the channel at once (the lane consumer hands
/// them over in batches of [`crate::monitor::SEND_BATCH`]).
const RECEIVE_BATCH: usize = 256;

/// How often rate-limit summaries are flushed.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

type EventSink = Box<dyn Sink<EventItem> + Send>;
type AlertSink = Box<dyn Sink<AlertItem> + Send>;

/// What the pipeline reports about itself and listens to, besides its records.
#[derive(Clone, Default)]
pub struct PipelineControl {
    /// No record for this long raises one `monitor-kernel-silent` notice per silent spell
    /// (`health.kernel_silence_ms`); `None`: never.
    pub silence: Option<std::time::Duration>,
    /// Notified (SIGHUP) to reopen every sink's output.
    pub reopen: Arc<Notify>,
    /// Beaten at every turn of the loop, for `/healthz`.
    pub heartbeat: Heartbeat,
    /// Where failed writes are counted (`agent_monitor_sink_failures_total`, sinks
    /// `events` and `alerts`).
    pub metrics: Option<Arc<Metrics>>,
    /// The run every record and anomaly is stamped with when it is converted to its wire
    /// form, once, for every sink.
    pub origin: Origin,
}

impl PipelineControl {
    fn count_failure(&self, sink: &str) {
        if let Some(m) = &self.metrics {
            m.record_sink_failure(sink);
        }
    }

    /// Counts a failed write to `sink` and passes the error on.
    fn failed(&self, sink: &str, e: std::io::Error) -> std::io::Error {
        self.count_failure(sink);
        e
    }
}

/// Writes to every sink of one kind, counting failures under `name`.
fn write_all<T>(
    sinks: &mut [Box<dyn Sink<T> + Send>],
    item: &T,
    name: &str,
    control: &PipelineControl,
) -> std::io::Result<()> {
    for s in sinks.iter_mut() {
        s.write(item).map_err(|e| control.failed(name, e))?;
    }
    Ok(())
}

fn flush_all<T>(
    sinks: &mut [Box<dyn Sink<T> + Send>],
    name: &str,
    control: &PipelineControl,
) -> std::io::Result<()> {
    for s in sinks.iter_mut() {
        s.flush().map_err(|e| control.failed(name, e))?;
    }
    Ok(())
}

/// Reopens every sink of one kind. A sink that cannot reopen keeps writing where it did
/// (logged and counted): losing the output over a failed rotation would be worse.
fn reopen_all<T>(sinks: &mut [Box<dyn Sink<T> + Send>], name: &str, control: &PipelineControl) {
    for s in sinks.iter_mut() {
        if let Err(e) = s.reopen() {
            control.count_failure(name);
            error!("reopening the {name} output failed: {e}; still writing to the old file");
        }
    }
}

/// The stage after the monitor: every record to the event output, through detection,
/// and every anomaly to the alert output. Flushes whenever the queue is empty, so a quiet
/// stream is never left sitting in a buffer; reopens the outputs when
/// [`PipelineControl::reopen`] is notified.
pub async fn pipeline(
    mut rx: mpsc::Receiver<Record>,
    mut events: Vec<EventSink>,
    mut alerts: Vec<AlertSink>,
    mut engine: Engine,
    control: PipelineControl,
) -> std::io::Result<()> {
    let mut flush = tokio::time::interval(FLUSH_INTERVAL);
    let mut last_record = std::time::Instant::now();
    let mut silence_reported = false;
    let mut batch = Vec::with_capacity(RECEIVE_BATCH);
    loop {
        control.heartbeat.beat();
        tokio::select! {
            // Taken many at a time: one look at the channel (and one release of room to
            // the lane consumer) per batch instead of per record. Each is still handled
            // alone, in order.
            n = rx.recv_many(&mut batch, RECEIVE_BATCH) => {
                if n == 0 { break }
                last_record = std::time::Instant::now();
                silence_reported = false;
                for rec in batch.drain(..) {
                    let found = engine.process(&rec);
                    write_all(&mut events, &control.origin.event_item(rec), "events", &control)?;
                    for a in found {
                        write_all(&mut alerts, &control.origin.alert_item(a), "alerts", &control)?;
                    }
                }
                if rx.is_empty() {
                    flush_all(&mut events, "events", &control)?;
                    flush_all(&mut alerts, "alerts", &control)?;
                }
            }
            _ = control.reopen.notified() => {
                // Everything written so far goes to the old files, whole; what follows
                // to new ones at the configured paths.
                reopen_all(&mut events, "events", &control);
                reopen_all(&mut alerts, "alerts", &control);
            }
            _ = flush.tick() => {
                let mut summaries = engine.flush();
                let silent = last_record.elapsed();
                if control.silence.is_some_and(|s| silent >= s) && !silence_reported {
                    silence_reported = true;
                    summaries.push(engine.kernel_silent(silent));
                }
                for a in summaries {
                    write_all(&mut alerts, &control.origin.alert_item(a), "alerts", &control)?;
                }
                flush_all(&mut alerts, "alerts", &control)?;
                crate::ratelog::flush(false);
            }
        }
    }
    for a in engine.flush() {
        write_all(
            &mut alerts,
            &control.origin.alert_item(a),
            "alerts",
            &control,
        )?;
    }
    flush_all(&mut events, "events", &control)?;
    flush_all(&mut alerts, "alerts", &control)?;
    // The lane consumer has ended (the channel closed): the counts of repeated warnings
    // are final.
    crate::ratelog::flush(true);
    Ok(())
}

/// Runs [`pipeline`] on a thread of its own, with its own single-threaded runtime. Output
/// writes are blocking writes: one that never returns (an output FIFO nobody reads, a hung
/// disk) then stalls only this thread. The lanes fill and the kernel counts what it drops,
/// the pipeline's heartbeat goes stale (so `/healthz` says which loop stopped), and the
/// runtime keeps serving `/healthz`, gRPC and the signals; on a runtime worker it would
/// take one of them with it.
fn spawn_pipeline(
    rx: mpsc::Receiver<Record>,
    events: Vec<EventSink>,
    alerts: Vec<AlertSink>,
    engine: Engine,
    control: PipelineControl,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("agent-monitor-outputs")
            .build()?
            .block_on(pipeline(rx, events, alerts, engine, control))
    })
}

fn open_output(output: &str) -> Result<Option<jsonl::Output>, AppError> {
    if output == "none" {
        return Ok(None);
    }
    jsonl::open_writer(output)
        .map(Some)
        .map_err(|source| AppError::Output {
            output: output.to_owned(),
            source,
        })
}

/// Starts the configured pod source; its task keeps `pods` current until aborted.
async fn start_pod_source(
    config: &Config,
    pods: &Arc<PodStore>,
) -> Result<Option<tokio::task::JoinHandle<()>>, AppError> {
    let p = &config.identity.pods;
    Ok(match p.source {
        PodSourceKind::None => {
            info!("no pod source: events carry pod UIDs and container ids from cgroups only");
            None
        }
        PodSourceKind::File => {
            let file = p.file.clone().ok_or(AppError::PodSource(
                "identity.pods.file is not set".to_owned(),
            ))?;
            // Fail early on a file that is unusable now; later bad versions are survived.
            let first = pods::file::load_async(file.clone())
                .await
                .map_err(|e| AppError::PodSource(e.to_string()))?;
            pods.replace_all(first);
            Some(pods::file::spawn(
                file,
                pods.clone(),
                pods::file::DEFAULT_POLL,
            ))
        }
        PodSourceKind::Kube => {
            let node = p.node_name.clone().unwrap_or_default();
            let client = kube::Client::try_default()
                .await
                .map_err(|e| AppError::PodSource(format!("kube client: {e}")))?;
            info!("watching pods of node {node} through the API server");
            Some(pods::kube::spawn(client, node, pods.clone()))
        }
    })
}

/// Runs the daemon until SIGTERM or SIGINT, with the policies already loaded (and
/// validated) from `config.detect.policies`.
pub async fn run(config: Config, policies: PolicySet) -> Result<(), AppError> {
    // First, so that a SIGHUP during start-up (a log rotation) does not kill the daemon:
    // the reopen is served once the pipeline runs.
    let mut hangup = tokio::signal::unix::signal(SignalKind::hangup()).map_err(AppError::Signal)?;
    let hostname = falco::hostname();
    // This run: its id, the node and the boot stamped on every event and anomaly.
    let origin = Origin::new_run(&hostname);
    info!("run {} on node {}", origin.run_id, origin.node);
    let mut events: Vec<EventSink> = Vec::new();
    let mut alerts: Vec<AlertSink> = Vec::new();
    if let Some(w) = open_output(&config.output)? {
        events.push(Box::new(EventLines::new(w)));
    }
    if let Some(w) = open_output(&config.alerts.output)? {
        alerts.push(Box::new(Plain(falco::FalcoLines::new(w, hostname.clone()))));
    }
    let policy_count = policies.policies().len();
    // Files and cluster objects feed one owner, which recomputes the set the engine reads
    // (files first: they win when both select a workload).
    let sources = PolicySources::new(policies);
    let _reloader = (!config.detect.policies.is_empty()).then(|| {
        crate::policy::spawn_reloader(
            config.detect.policies.clone(),
            sources.clone(),
            crate::policy::DEFAULT_POLL,
        )
    });
    let _cluster_policies = if config.detect.cluster_policies {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| AppError::PolicySource(format!("kube client: {e}")))?;
        info!("policies: {policy_count} from files; watching AgentPolicy objects of all namespaces through the API server");
        Some(crate::policy::cluster::spawn(client, sources.clone()))
    } else {
        info!("policies: {policy_count} from files; cluster AgentPolicy objects not used (detect.cluster_policies)");
        None
    };
    let policies: Arc<RwLock<PolicySet>> = sources.combined();
    let engine = Engine::new(settings::detect(&config), policies);

    // Falcosidekick.
    let mut sidekick_task = None;
    let metrics = Arc::new(Metrics::new());
    let mut sidekick_counters = None;
    if let Some(url) = &config.falcosidekick.url {
        let cfg = SidekickSettings {
            url: url.clone(),
            queue: config.falcosidekick.queue,
            ca: config.falcosidekick.ca.clone(),
            ..SidekickSettings::default()
        };
        let (sink, task, counters) =
            falcosidekick::spawn(cfg, hostname.clone()).map_err(|e| AppError::Output {
                output: url.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        alerts.push(Box::new(Plain(sink)));
        metrics.declare_sink("falcosidekick");
        sidekick_task = Some(task);
        sidekick_counters = Some(counters);
    }

    // Metrics and health.
    let health = Arc::new(Health::new(std::time::Duration::from_millis(
        config.health.loop_stall_ms,
    )));
    let counters = Arc::new(Mutex::new(Counters::default()));
    events.push(Box::new(Observer::new(
        metrics.clone(),
        health.clone(),
        counters.clone(),
    )));
    alerts.push(Box::new(Observer::new(
        metrics.clone(),
        health.clone(),
        counters.clone(),
    )));

    // The journal: opened (and a torn tail cut off) before the first record can reach it.
    let journal = match &config.journal.dir {
        Some(dir) => {
            let journal = Journal::open(
                JournalSettings {
                    dir: dir.clone(),
                    options: settings::journal(&config.journal),
                    sync_interval: config.journal.sync_interval(),
                    origin: origin.clone(),
                    queue: JOURNAL_QUEUE,
                },
                Some(metrics.clone()),
            )?;
            metrics.declare_sink("journal");
            events.push(Box::new(journal.sink()));
            alerts.push(Box::new(journal.sink()));
            Some(journal)
        }
        None => None,
    };

    // The gRPC API.
    let hub = Hub::new(config.grpc.queue_per_client, origin.clone());
    if let Some(j) = &journal {
        hub.set_journal(Arc::new(j.source()));
    }
    {
        // Fed on every subscribe and disconnect, so a scrape sees the clients of that moment.
        let metrics = metrics.clone();
        hub.observe_clients(move |n| {
            metrics.set_grpc_clients(i64::try_from(n).unwrap_or(i64::MAX));
        });
    }
    events.push(Box::new(HubSink::<EventItem>::new(hub.clone())));
    alerts.push(Box::new(HubSink::<pb::Anomaly>::new(hub.clone())));

    let mut term =
        tokio::signal::unix::signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
    // Empty until the probes are loaded; the once-a-second copy below starts after that,
    // and /metrics may be scraped before (a slow load on a busy node took over a second).
    metrics.set_queue_depth("pipeline", 0);
    // Weak: a strong sender here would keep the pipeline from ever seeing the end.
    let depth_tx = tx.downgrade();
    let pipeline_depth = depth_tx.clone();
    let control = PipelineControl {
        silence: (config.health.kernel_silence_ms > 0)
            .then(|| std::time::Duration::from_millis(config.health.kernel_silence_ms)),
        reopen: Arc::new(Notify::new()),
        heartbeat: Heartbeat::new(),
        metrics: Some(metrics.clone()),
        origin: origin.clone(),
    };
    health.watch_loop("pipeline", control.heartbeat.clone());
    let reopen = control.reopen.clone();
    let writer = spawn_pipeline(rx, events, alerts, engine, control);
    // Events of pods over the metadata limits keep the configured agent and tier labels.
    let pods = Arc::new(PodStore::with_keep_labels(vec![
        config.identity.agent_label.clone(),
        config.identity.tier_label.clone(),
    ]));
    let _pod_source = start_pod_source(&config, &pods).await?;
    let monitor = Monitor::start(settings::monitor(&config), pods.clone(), tx)?;
    health.watch_loop("lane consumer", monitor.heartbeat());
    metrics.set_probes_attached(monitor.attached().len() as i64);
    {
        // Values owned by other tasks, copied into the metrics once a second.
        let (metrics, watch, cache, sidekick, sources) = (
            metrics.clone(),
            monitor.watch_status(),
            monitor.identity_cache_size(),
            sidekick_counters.clone(),
            sources.clone(),
        );
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                metrics.set_watch(&watch);
                metrics.set_policies(&sources);
                metrics.set_identity_cache_size(gauge(
                    cache.load(std::sync::atomic::Ordering::Relaxed),
                ));
                // Records between the lane consumer and the outputs: a backlog here is
                // the first sign of an output that cannot keep up.
                let depth = pipeline_depth
                    .upgrade()
                    .map_or(0, |t| (OUTPUT_QUEUE - t.capacity()) as u64);
                metrics.set_queue_depth("pipeline", gauge(depth));
                if let Some(k) = &sidekick {
                    let s = k.snapshot();
                    metrics.set_queue_depth("falcosidekick", gauge(s.queued));
                    metrics.set_sink_failures_total(
                        "falcosidekick",
                        s.failed_attempts + s.rejected + s.dropped_queue_full + s.undelivered,
                    );
                }
            }
        });
    }
    health.set_probes_attached(monitor.attached().len() as u64);

    // SIGHUP: reopen the output files (log rotation). The pipeline flushes what it wrote
    // to the old files first, so they end with whole lines.
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            info!("SIGHUP received: reopening the event and alert outputs");
            reopen.notify_one();
        }
    });

    let (stop_servers, servers_stopped) = tokio::sync::watch::channel(false);
    let stopped_signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let grpc_cfg = GrpcSettings {
        tcp: listen_addr(&config.grpc.listen),
        unix: config.grpc.unix_socket.clone(),
        tls: config.grpc.tls.as_ref().map(|t| TlsSettings {
            cert: t.cert.clone(),
            key: t.key.clone(),
            client_ca: t.client_ca.clone(),
        }),
        queue_per_client: config.grpc.queue_per_client,
        limits: settings::grpc_limits(&config.grpc),
        keepalive_interval: std::time::Duration::from_millis(config.grpc.keepalive_interval_ms),
        keepalive_timeout: std::time::Duration::from_millis(config.grpc.keepalive_timeout_ms),
    };
    // Every admitted connection holds a descriptor; the daemon's own (maps, programs,
    // rings, watched directories, outputs: about a hundred) come on top.
    listen::ensure_descriptors(
        2 * config.grpc.max_connections as u64 + config.admin.max_connections as u64 + 256,
    );
    let grpc = if grpc_cfg.tcp.is_some() || grpc_cfg.unix.is_some() {
        let status = Arc::new(DaemonStatus {
            probes: monitor.attached().to_vec(),
            counters: counters.clone(),
            sidekick: sidekick_counters.clone(),
            identity_cache: monitor.identity_cache_size(),
            watch: monitor.watch_status(),
            policies: sources.clone(),
            queue_depth: Arc::new(move || {
                depth_tx
                    .upgrade()
                    .map_or(0, |t| (OUTPUT_QUEUE - t.capacity()) as u64)
            }),
        });
        let server = GrpcServer::bind(&grpc_cfg)
            .await
            .map_err(|e| AppError::Server(format!("gRPC: {e}")))?
            .with_connection_metrics(
                metrics.connection_metrics("grpc_tcp"),
                metrics.connection_metrics("grpc_unix"),
            );
        info!(
            "gRPC API on {}{}",
            server
                .local_addr()
                .map_or("-".to_owned(), |a| a.to_string()),
            server
                .unix_path()
                .map_or(String::new(), |p| format!(" and {}", p.display()))
        );
        Some(server.start(hub.clone(), status))
    } else {
        None
    };
    let admin_task = match listen_addr(&config.admin.listen) {
        Some(addr) => {
            let listener = listen::bind_tcp(addr)
                .map_err(|e| AppError::Server(format!("admin endpoint {addr}: {e}")))?;
            let bound = listener.local_addr().unwrap_or(addr);
            info!("metrics, /healthz and /readyz on http://{bound}");
            let listener = LimitedListener::new(
                listener,
                "admin listener",
                settings::admin_limits(&config.admin),
                metrics.connection_metrics("admin"),
            );
            Some(tokio::spawn(metrics::serve_admin_limited(
                listener,
                metrics.clone(),
                health.clone(),
                stopped_signal(servers_stopped.clone()),
            )))
        }
        None => None,
    };
    health.set_ready(true);
    info!(
        "agent-monitor running: {} tracepoints, {} policies, {} watched prefixes, {} basenames, cgroup filter {}; events to {}, alerts to {}{}",
        monitor.attached().len(),
        policy_count,
        config.watch.prefixes.len(),
        config.watch.basenames.len(),
        if config.cgroups.is_empty() { "off".to_owned() } else { format!("{} cgroups", config.cgroups.len()) },
        if config.output == "-" { "stdout" } else { &config.output },
        if config.alerts.output == "-" { "stdout" } else { &config.alerts.output },
        config.falcosidekick.url.as_ref().map_or(String::new(), |u| format!(" and {u}")),
    );
    let signal = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    shut_down(
        signal,
        config.shutdown_timeout(),
        Running {
            health,
            stop_listeners: stop_servers,
            grpc,
            admin: admin_task,
            hub,
            monitor,
            writer,
            sidekick: sidekick_task,
            journal,
        },
    )
    .await
}

/// What SIGTERM/SIGINT stops.
struct Running {
    health: Arc<Health>,
    /// Tells the admin server to close its listener and finish.
    stop_listeners: tokio::sync::watch::Sender<bool>,
    grpc: Option<RunningGrpc>,
    admin: Option<tokio::task::JoinHandle<Result<(), metrics::AdminError>>>,
    hub: Hub,
    monitor: Monitor,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
    sidekick: Option<tokio::task::JoinHandle<()>>,
    journal: Option<Journal>,
}

/// SIGTERM/SIGINT, within `bound`:
///
/// 1. the listeners close at once (the Unix socket file is removed), so a restarted daemon
///    can bind the same ports and path while this one drains;
/// 2. the lanes and the outputs drain; stream clients still receive what was in flight;
/// 3. every stream client's stream ends with UNAVAILABLE "agent-monitor is shutting down",
///    and the connections close;
/// 4. Falcosidekick deliveries finish;
/// 5. the journal gets its stop marker after what was queued, and is synced.
///
/// Whatever is not done at the bound is logged and abandoned, and the daemon exits: a
/// client that never reads, or an output that blocks, cannot hold the node's old daemon
/// past the pod's grace period (and the port past its end).
async fn shut_down(signal: &str, bound: std::time::Duration, r: Running) -> Result<(), AppError> {
    use tokio::time::{timeout_at, Instant};
    let started = Instant::now();
    // Exiting takes time too (detaching the probes, closing every descriptor): the waits
    // end a little before the bound so that the process is gone by then.
    let deadline = started + bound - (bound / 10).min(std::time::Duration::from_millis(500));
    // The drain may not take the whole bound: stream clients must still be told why their
    // stream ends, and that takes a moment after the drain.
    let drain_deadline = deadline - (bound / 4).min(std::time::Duration::from_secs(2));
    r.health.set_ready(false);
    if let Some(grpc) = &r.grpc {
        grpc.stop_accepting();
    }
    let _ = r.stop_listeners.send(true);
    info!(
        "{signal} received: closing the listeners; draining lanes and outputs (at most {} ms)",
        bound.as_millis()
    );

    let mut abandoned: Vec<String> = Vec::new();
    let mut stopped = Ok(());
    let mut written = Ok(());
    match timeout_at(drain_deadline, r.monitor.stop()).await {
        Ok(s) => {
            stopped = s;
            match timeout_at(drain_deadline, r.writer).await {
                Ok(Ok(w)) => written = w.map_err(AppError::Write),
                Ok(Err(e)) => {
                    written = Err(AppError::Write(std::io::Error::other(format!(
                        "output stage failed: {e}"
                    ))))
                }
                Err(_) => abandoned.push(
                    "the outputs (records still queued for them, and their unflushed lines)"
                        .to_owned(),
                ),
            }
        }
        Err(_) => abandoned.push(
            "the lanes (records still in the kernel rings) and the outputs behind them".to_owned(),
        ),
    }
    if let Err(e) = &written {
        error!("{e}");
    }
    // Started now, after the drain, so the stop marker follows every record that made it;
    // waited for last, alongside the other steps.
    let journal = r.journal.map(|j| {
        let reason = if abandoned.is_empty() {
            format!("signal {signal}")
        } else {
            format!("signal {signal}; outputs abandoned at the shutdown bound")
        };
        tokio::task::spawn_blocking(move || j.stop(&reason))
    });
    let clients = r.hub.clients();
    r.hub.shut_down();
    if let Some(grpc) = r.grpc {
        match timeout_at(deadline, grpc.wait()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!("gRPC server: {e}"),
            Err(_) => abandoned.push(format!(
                "gRPC connections still open ({clients} stream clients were told to go away)"
            )),
        }
    }
    if let Some(admin) = r.admin {
        match timeout_at(deadline, admin).await {
            Ok(Ok(Err(e))) => error!("admin endpoint: {e}"),
            Ok(_) => {}
            Err(_) => abandoned.push("admin connections still open".to_owned()),
        }
    }
    if let Some(sidekick) = r.sidekick {
        // The pipeline dropped its sink: the sender drains within its own grace period.
        if timeout_at(deadline, sidekick).await.is_err() {
            abandoned.push("Falcosidekick deliveries still queued".to_owned());
        }
    }
    if let Some(journal) = journal {
        match timeout_at(deadline, journal).await {
            Ok(Ok(Ok(s))) => info!(
                "journal: stop marker written and synced ({} records, {} bytes this run)",
                s.records, s.bytes
            ),
            Ok(Ok(Err(e))) => error!("journal: {e}"),
            Ok(Err(e)) => error!("journal: {e}"),
            Err(_) => abandoned.push("journal records not yet synced (slow disk)".to_owned()),
        }
    }
    stopped?;
    written?;
    if !abandoned.is_empty() {
        return Err(AppError::ShutdownIncomplete {
            bound_ms: bound.as_millis(),
            abandoned: abandoned.join("; "),
        });
    }
    info!(
        "agent-monitor stopped in {} ms",
        started.elapsed().as_millis()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        detect::{Anomaly, KERNEL_SILENT},
        events::LostRecord,
    };

    /// Collects alerts in memory.
    struct Collect(Arc<Mutex<Vec<Anomaly>>>);

    impl Sink<AlertItem> for Collect {
        fn write(&mut self, a: &AlertItem) -> std::io::Result<()> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .push(a.item.clone());
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn records_become_alerts_and_silence_is_reported_once() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let engine = Engine::new(
            crate::detect::DetectSettings::default(),
            Arc::new(RwLock::new(PolicySet::default())),
        );
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(pipeline(
            rx,
            Vec::new(),
            vec![Box::new(Collect(got.clone()))],
            engine,
            PipelineControl {
                silence: Some(std::time::Duration::from_millis(300)),
                ..PipelineControl::default()
            },
        ));
        tx.send(Record::Lost(LostRecord {
            seq: 1,
            time: "2026-11-23T07:00:00.000000001Z".into(),
            lane: "network".into(),
            count: 2,
            total: 2,
            reason: crate::events::LostReason::RingFull,
            workload: None,
        }))
        .await
        .expect("send");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let rules: Vec<String> = got
                .lock()
                .expect("lock")
                .iter()
                .map(|a| a.rule.clone())
                .collect();
            if rules.iter().any(|r| r == KERNEL_SILENT) {
                assert_eq!(rules[0], crate::detect::EVENTS_LOST);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no silence alert: {rules:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let notice = got
            .lock()
            .expect("lock")
            .iter()
            .find(|a| a.rule == KERNEL_SILENT)
            .map(|a| a.priority);
        // A quiet node is not a fault: a notice, not an error.
        assert_eq!(notice, Some(crate::policy::Priority::Notice));
        // Still silent: not reported again.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let silent = got
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| a.rule == KERNEL_SILENT)
            .count();
        assert_eq!(silent, 1);
        drop(tx);
        task.await.expect("join").expect("pipeline");
    }

    /// An event sink that counts reopens and fails every write after `fail_after`.
    struct Flaky {
        reopened: Arc<std::sync::atomic::AtomicU64>,
        writes: u64,
        fail_after: u64,
    }

    impl Sink<EventItem> for Flaky {
        fn write(&mut self, _: &EventItem) -> std::io::Result<()> {
            self.writes += 1;
            if self.writes > self.fail_after {
                return Err(std::io::Error::other("disk full"));
            }
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn reopen(&mut self) -> std::io::Result<()> {
            self.reopened
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    fn lost(seq: u64) -> Record {
        Record::Lost(LostRecord {
            seq,
            time: "2026-11-23T07:00:00.000000001Z".into(),
            lane: "process".into(),
            count: 1,
            total: seq,
            reason: crate::events::LostReason::RingFull,
            workload: None,
        })
    }

    #[tokio::test]
    async fn reopen_reaches_the_sinks_and_failed_writes_are_counted() {
        let reopened = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let metrics = Arc::new(Metrics::new());
        let control = PipelineControl {
            metrics: Some(metrics.clone()),
            ..PipelineControl::default()
        };
        let reopen = control.reopen.clone();
        let engine = Engine::new(
            crate::detect::DetectSettings::default(),
            Arc::new(RwLock::new(PolicySet::default())),
        );
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(pipeline(
            rx,
            vec![Box::new(Flaky {
                reopened: reopened.clone(),
                writes: 0,
                fail_after: 1,
            })],
            Vec::new(),
            engine,
            control,
        ));
        tx.send(lost(1)).await.expect("send");
        // A SIGHUP while the pipeline runs (or before it waits: the permit is kept).
        reopen.notify_one();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while reopened.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "never reopened");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The second write fails: counted under the sink's kind, and the error ends the
        // pipeline as before.
        tx.send(lost(2)).await.expect("send");
        let err = task.await.expect("join").expect_err("write failed");
        assert_eq!(err.to_string(), "disk full");
        assert!(
            metrics
                .render()
                .contains("agent_monitor_sink_failures_total{sink=\"events\"} 1\n"),
            "{}",
            metrics.render()
        );
    }
}
