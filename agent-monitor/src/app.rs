//! Wiring and shutdown: config → monitor → output writer; SIGTERM/SIGINT stop intake,
//! drain every lane, flush the output and detach the probes.

use std::sync::{Arc, RwLock};

use log::{error, info};
use tokio::{signal::unix::SignalKind, sync::mpsc};

use crate::{
    config::{Config, PodSourceKind},
    detect::{Anomaly, DetectConfig, Engine},
    events::Record,
    identity::pods::{self, PodStore},
    monitor::{Monitor, MonitorError},
    outputs::{falco, jsonl, Sink},
    policy::PolicySet,
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
    /// The pod source could not start.
    #[error("pod source: {0}")]
    PodSource(String),
    /// Writing records failed (e.g. the stdout pipe closed).
    #[error("writing records: {0}")]
    Write(#[source] std::io::Error),
}

/// How often rate-limit summaries are flushed.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

type EventSink = Box<dyn Sink<Record> + Send>;
type AlertSink = Box<dyn Sink<Anomaly> + Send>;

/// The stage after the monitor: every record to the event output, through detection,
/// and every anomaly to the alert output. Flushes whenever the queue is empty, so a quiet
/// stream is never left sitting in a buffer.
pub async fn pipeline(
    mut rx: mpsc::Receiver<Record>,
    mut events: Option<EventSink>,
    mut alerts: Option<AlertSink>,
    mut engine: Engine,
) -> std::io::Result<()> {
    let mut flush = tokio::time::interval(FLUSH_INTERVAL);
    loop {
        tokio::select! {
            rec = rx.recv() => {
                let Some(rec) = rec else { break };
                if let Some(s) = events.as_mut() {
                    s.write(&rec)?;
                }
                for a in engine.process(&rec) {
                    if let Some(s) = alerts.as_mut() {
                        s.write(&a)?;
                    }
                }
                if rx.is_empty() {
                    if let Some(s) = events.as_mut() {
                        s.flush()?;
                    }
                    if let Some(s) = alerts.as_mut() {
                        s.flush()?;
                    }
                }
            }
            _ = flush.tick() => {
                let summaries = engine.flush();
                if let Some(s) = alerts.as_mut() {
                    for a in &summaries {
                        s.write(a)?;
                    }
                    s.flush()?;
                }
            }
        }
    }
    for a in engine.flush() {
        if let Some(s) = alerts.as_mut() {
            s.write(&a)?;
        }
    }
    if let Some(s) = events.as_mut() {
        s.flush()?;
    }
    if let Some(s) = alerts.as_mut() {
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
    let events: Option<EventSink> =
        open_output(&config.output)?.map(|w| Box::new(jsonl::JsonLines::new(w)) as EventSink);
    let alerts: Option<AlertSink> = open_output(&config.alerts.output)?
        .map(|w| Box::new(falco::FalcoLines::new(w, falco::hostname())) as AlertSink);
    let policy_count = policies.policies().len();
    let policies = Arc::new(RwLock::new(policies));
    let _reloader = (!config.detect.policies.is_empty()).then(|| {
        crate::policy::spawn_reloader(
            config.detect.policies.clone(),
            policies.clone(),
            std::time::Duration::from_secs(1),
        )
    });
    let engine = Engine::new(
        DetectConfig::from_settings(&config.detect, config.alerts.rate_limit_per_minute),
        policies,
    );
    let mut term =
        tokio::signal::unix::signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
    let writer = tokio::spawn(pipeline(rx, events, alerts, engine));
    let pods = PodStore::new();
    let _pod_source = start_pod_source(&config, &pods).await?;
    let monitor = Monitor::start(&config, pods.clone(), tx)?;
    info!(
        "agent-monitor running: {} tracepoints, {} policies, {} watched prefixes, {} basenames, cgroup filter {}; events to {}, alerts to {}",
        monitor.attached().len(),
        policy_count,
        config.watch.prefixes.len(),
        config.watch.basenames.len(),
        if config.cgroups.is_empty() { "off".to_owned() } else { format!("{} cgroups", config.cgroups.len()) },
        if config.output == "-" { "stdout" } else { &config.output },
        if config.alerts.output == "-" { "stdout" } else { &config.alerts.output },
    );
    let signal = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!("{signal} received: draining lanes and flushing output");
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
    stopped?;
    written?;
    info!("agent-monitor stopped");
    Ok(())
}
