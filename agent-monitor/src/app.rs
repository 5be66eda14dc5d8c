//! Wiring and shutdown: config → monitor → output writer; SIGTERM/SIGINT stop intake,
//! drain every lane, flush the output and detach the probes.

use std::{sync::Arc, thread::JoinHandle};

use log::{error, info};
use tokio::{signal::unix::SignalKind, sync::mpsc};

use crate::{
    config::{Config, PodSourceKind},
    events::Record,
    identity::pods::{self, PodStore},
    monitor::{Monitor, MonitorError},
    outputs::{jsonl, Sink},
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

/// Runs a sink on its own thread until the channel closes; flushes whenever the queue is
/// empty so a quiet stream is never left sitting in a buffer.
fn spawn_writer(
    mut sink: impl Sink + Send + 'static,
    mut rx: mpsc::Receiver<Record>,
) -> JoinHandle<std::io::Result<()>> {
    std::thread::spawn(move || {
        while let Some(rec) = rx.blocking_recv() {
            sink.write(&rec)?;
            if rx.is_empty() {
                sink.flush()?;
            }
        }
        sink.flush()
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

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), AppError> {
    let sink = jsonl::open(&config.output).map_err(|source| AppError::Output {
        output: config.output.clone(),
        source,
    })?;
    let mut term =
        tokio::signal::unix::signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
    let writer = spawn_writer(sink, rx);
    let pods = PodStore::new();
    let _pod_source = start_pod_source(&config, &pods).await?;
    let monitor = Monitor::start(&config, pods.clone(), tx)?;
    info!(
        "agent-monitor running: {} tracepoints, {} watched prefixes, {} basenames, cgroup filter {}; output {}",
        monitor.attached().len(),
        config.watch.prefixes.len(),
        config.watch.basenames.len(),
        if config.cgroups.is_empty() { "off".to_owned() } else { format!("{} cgroups", config.cgroups.len()) },
        if config.output == "-" { "stdout" } else { &config.output },
    );
    let signal = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!("{signal} received: draining lanes and flushing output");
    let stopped = monitor.stop().await;
    let written = match writer.join() {
        Ok(r) => r.map_err(AppError::Write),
        Err(_) => Err(AppError::Write(std::io::Error::other(
            "output writer panicked",
        ))),
    };
    if let Err(e) = &written {
        error!("{e}");
    }
    stopped?;
    written?;
    info!("agent-monitor stopped");
    Ok(())
}
