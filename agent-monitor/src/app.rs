//! Wiring and shutdown: config → monitor → output writer; SIGTERM/SIGINT stop intake,
//! drain every lane, flush the output and detach the probes.

use std::sync::{Arc, Mutex, RwLock};

use log::{error, info};
use tokio::{signal::unix::SignalKind, sync::mpsc};

use crate::{
    config::listen_addr,
    config::{Config, PodSourceKind},
    detect::{Anomaly, DetectConfig, Engine},
    events::Record,
    identity::pods::{self, PodStore},
    monitor::{Monitor, MonitorError},
    outputs::{
        falco,
        falcosidekick::{self, SidekickConfig},
        fanout::{Counters, DaemonStatus, HubSink, Observer},
        grpc::{GrpcConfig, GrpcServer, Hub, TlsConfig},
        jsonl,
        metrics::{self, Health, Metrics},
        protojson, Sink,
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
}

/// How often rate-limit summaries are flushed.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// No record at all for this long means the kernel side went silent: on a live node
/// processes fork, exec and exit all the time.
pub const KERNEL_SILENCE: std::time::Duration = std::time::Duration::from_secs(60);

type EventSink = Box<dyn Sink<Record> + Send>;
type AlertSink = Box<dyn Sink<Anomaly> + Send>;

/// The stage after the monitor: every record to the event output, through detection,
/// and every anomaly to the alert output. Flushes whenever the queue is empty, so a quiet
/// stream is never left sitting in a buffer.
/// `silence` is how long without any record counts as the kernel side gone silent
/// ([`KERNEL_SILENCE`] in the daemon).
pub async fn pipeline(
    mut rx: mpsc::Receiver<Record>,
    mut events: Vec<EventSink>,
    mut alerts: Vec<AlertSink>,
    mut engine: Engine,
    silence: std::time::Duration,
) -> std::io::Result<()> {
    let mut flush = tokio::time::interval(FLUSH_INTERVAL);
    let mut last_record = std::time::Instant::now();
    let mut silence_reported = false;
    loop {
        tokio::select! {
            rec = rx.recv() => {
                let Some(rec) = rec else { break };
                last_record = std::time::Instant::now();
                silence_reported = false;
                for s in events.iter_mut() {
                    s.write(&rec)?;
                }
                for a in engine.process(&rec) {
                    for s in alerts.iter_mut() {
                        s.write(&a)?;
                    }
                }
                if rx.is_empty() {
                    for s in events.iter_mut() {
                        s.flush()?;
                    }
                    for s in alerts.iter_mut() {
                        s.flush()?;
                    }
                }
            }
            _ = flush.tick() => {
                let mut summaries = engine.flush();
                let silent = last_record.elapsed();
                if silent >= silence && !silence_reported {
                    silence_reported = true;
                    summaries.push(engine.kernel_silent(silent));
                }
                for s in alerts.iter_mut() {
                    for a in &summaries {
                        s.write(a)?;
                    }
                    s.flush()?;
                }
            }
        }
    }
    for a in engine.flush() {
        for s in alerts.iter_mut() {
            s.write(&a)?;
        }
    }
    for s in events.iter_mut() {
        s.flush()?;
    }
    for s in alerts.iter_mut() {
        s.flush()?;
    }
    Ok(())
}

fn open_output(output: &str) -> Result<Option<Box<dyn std::io::Write + Send>>, AppError> {
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
            let first = pods::file::load(&file).map_err(|e| AppError::PodSource(e.to_string()))?;
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
    let hostname = falco::hostname();
    let mut events: Vec<EventSink> = Vec::new();
    let mut alerts: Vec<AlertSink> = Vec::new();
    if let Some(w) = open_output(&config.output)? {
        let lines = protojson::EventLines::new(w).map_err(|source| AppError::Output {
            output: config.output.clone(),
            source,
        })?;
        events.push(Box::new(lines));
    }
    if let Some(w) = open_output(&config.alerts.output)? {
        alerts.push(Box::new(falco::FalcoLines::new(w, hostname.clone())));
    }
    let policy_count = policies.policies().len();
    // Files and cluster objects feed one owner, which recomputes the set the engine reads
    // (files first: they win when both select a workload).
    let sources = PolicySources::new(policies);
    let _reloader = (!config.detect.policies.is_empty()).then(|| {
        crate::policy::spawn_reloader(
            config.detect.policies.clone(),
            sources.clone(),
            std::time::Duration::from_secs(1),
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
    let engine = Engine::new(
        DetectConfig::from_settings(&config.detect, config.alerts.rate_limit_per_minute),
        policies,
    );

    // Falcosidekick.
    let mut sidekick_task = None;
    let mut sidekick_counters = None;
    if let Some(url) = &config.falcosidekick.url {
        let cfg = SidekickConfig {
            url: url.clone(),
            queue: config.falcosidekick.queue,
            ca: config.falcosidekick.ca.clone(),
            ..SidekickConfig::default()
        };
        let (sink, task, counters) =
            falcosidekick::spawn(cfg, hostname.clone()).map_err(|e| AppError::Output {
                output: url.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        alerts.push(Box::new(sink));
        sidekick_task = Some(task);
        sidekick_counters = Some(counters);
    }

    // Metrics and health.
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(KERNEL_SILENCE));
    let counters = Arc::new(Mutex::new(Counters::default()));
    events.push(Box::new(Observer {
        metrics: metrics.clone(),
        health: health.clone(),
        counters: counters.clone(),
    }));
    alerts.push(Box::new(Observer {
        metrics: metrics.clone(),
        health: health.clone(),
        counters: counters.clone(),
    }));

    // The gRPC API.
    let hub = Hub::new(config.grpc.queue_per_client);
    events.push(Box::new(HubSink(hub.clone())));
    alerts.push(Box::new(HubSink(hub.clone())));

    let mut term =
        tokio::signal::unix::signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
    // Weak: a strong sender here would keep the pipeline from ever seeing the end.
    let depth_tx = tx.downgrade();
    let writer = tokio::spawn(pipeline(rx, events, alerts, engine, KERNEL_SILENCE));
    let pods = PodStore::new();
    let _pod_source = start_pod_source(&config, &pods).await?;
    let monitor = Monitor::start(&config, pods.clone(), tx)?;
    metrics.set_probes_attached(monitor.attached().len() as i64);
    {
        // Gauges owned by the lane consumer, copied into the metrics once a second.
        let (metrics, watch, cache) = (
            metrics.clone(),
            monitor.watch_status(),
            monitor.identity_cache_size(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                metrics.set_watch(&watch);
                metrics.set_identity_cache_size(
                    i64::try_from(cache.load(std::sync::atomic::Ordering::Relaxed))
                        .unwrap_or(i64::MAX),
                );
            }
        });
    }
    health.set_probes_attached(monitor.attached().len() as u64);

    let (stop_servers, servers_stopped) = tokio::sync::watch::channel(false);
    let stopped_signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let grpc_cfg = GrpcConfig {
        tcp: listen_addr(&config.grpc.listen),
        unix: config.grpc.unix_socket.clone(),
        tls: config.grpc.tls.as_ref().map(|t| TlsConfig {
            cert: t.cert.clone(),
            key: t.key.clone(),
            client_ca: t.client_ca.clone(),
        }),
        queue_per_client: config.grpc.queue_per_client,
    };
    let grpc_task = if grpc_cfg.tcp.is_some() || grpc_cfg.unix.is_some() {
        let status = Arc::new(DaemonStatus {
            probes: monitor.attached().to_vec(),
            counters: counters.clone(),
            sidekick: sidekick_counters.clone(),
            identity_cache: monitor.identity_cache_size(),
            watch: monitor.watch_status(),
            queue_depth: Arc::new(move || {
                depth_tx
                    .upgrade()
                    .map_or(0, |t| (OUTPUT_QUEUE - t.capacity()) as u64)
            }),
        });
        let server = GrpcServer::bind(&grpc_cfg)
            .await
            .map_err(|e| AppError::Server(format!("gRPC: {e}")))?;
        info!(
            "gRPC API on {}{}",
            server
                .local_addr()
                .map_or("-".to_owned(), |a| a.to_string()),
            server
                .unix_path()
                .map_or(String::new(), |p| format!(" and {}", p.display()))
        );
        Some(tokio::spawn(server.run(
            hub.clone(),
            status,
            stopped_signal(servers_stopped.clone()),
        )))
    } else {
        None
    };
    let admin_task = match listen_addr(&config.admin.listen) {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| AppError::Server(format!("admin endpoint {addr}: {e}")))?;
            let bound = listener.local_addr().unwrap_or(addr);
            info!("metrics, /healthz and /readyz on http://{bound}");
            Some(tokio::spawn(metrics::serve_admin_on(
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
    info!("{signal} received: draining lanes and flushing output");
    health.set_ready(false);
    let stopped = monitor.stop().await;
    let written = match writer.await {
        Ok(r) => r.map_err(AppError::Write),
        Err(e) => Err(AppError::Write(std::io::Error::other(format!(
            "output stage failed: {e}"
        )))),
    };
    if let Err(e) = &written {
        error!("{e}");
    }
    let _ = stop_servers.send(true);
    if let Some(t) = grpc_task {
        if let Ok(Err(e)) = t.await {
            error!("gRPC server: {e}");
        }
    }
    if let Some(t) = admin_task {
        if let Ok(Err(e)) = t.await {
            error!("admin endpoint: {e}");
        }
    }
    if let Some(t) = sidekick_task {
        // The pipeline dropped its sink: the sender drains within its grace period.
        let _ = t.await;
    }
    stopped?;
    written?;
    info!("agent-monitor stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{detect::KERNEL_SILENT, events::LostRecord};

    /// Collects alerts in memory.
    struct Collect(Arc<Mutex<Vec<Anomaly>>>);

    impl Sink<Anomaly> for Collect {
        fn write(&mut self, a: &Anomaly) -> std::io::Result<()> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .push(a.clone());
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
            DetectConfig::default(),
            Arc::new(RwLock::new(PolicySet::default())),
        );
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(pipeline(
            rx,
            Vec::new(),
            vec![Box::new(Collect(got.clone()))],
            engine,
            std::time::Duration::from_millis(300),
        ));
        tx.send(Record::Lost(LostRecord {
            seq: 1,
            time: "2026-11-23T07:00:00.000000001Z".into(),
            lane: "network".into(),
            count: 2,
            total: 2,
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
}
