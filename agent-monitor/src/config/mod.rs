//! Daemon configuration: a YAML file, parsed and validated once, before anything starts.
//!
//! Every error names the file, the field and what was expected, so that a bad config never
//! starts a half-working daemon (the CLI exits 64 on [`ConfigError`]).

mod daemon;
mod detect;
mod identity;
mod journal;
mod kernel;
mod outputs;
mod validate;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use self::{daemon::*, detect::*, identity::*, journal::*, kernel::*, outputs::*};

/// A config file could not be used. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read: missing, unreadable, not a regular file, or larger than
    /// [`MAX_CONFIG_BYTES`].
    #[error("config {file}: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: crate::boundedfile::ReadError,
    },
    /// The YAML is malformed, has an unknown field, or a value of the wrong type.
    #[error("config {file}: {message}")]
    Parse { file: PathBuf, message: String },
    /// A value has the right type but is not acceptable.
    #[error("config {file}: field `{field}`: expected {expected}, got {got}")]
    Invalid {
        file: PathBuf,
        field: String,
        expected: String,
        got: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// What counts as a credential open.
    pub watch: WatchConfig,
    /// cgroup2 directories whose processes (and their descendants' processes) are
    /// monitored. Empty: every process on the node.
    pub cgroups: Vec<PathBuf>,
    /// Ring buffer of each lane.
    pub lanes: LanesConfig,
    /// Capacities of the kernel's file-identity maps.
    pub kernel_maps: KernelMapsConfig,
    /// How often the daemon collects records that did not wake it, in milliseconds. This
    /// bounds the delay of a lone event; a lane that fills a quarter of its ring wakes the
    /// daemon at once.
    pub poll_interval_ms: u64,
    /// Where event JSON lines go: `-` for stdout, a file path (appended), or `none`.
    pub output: String,
    /// Forward kernel-side diagnostics (aya-log) to the daemon's log.
    pub kernel_log: bool,
    /// Who did it: pods, containers, ServiceAccounts, agents.
    pub identity: IdentityConfig,
    /// Rules and their inputs.
    pub detect: DetectConfig,
    /// Where alerts go.
    pub alerts: AlertsConfig,
    /// The gRPC API.
    pub grpc: GrpcConfig,
    /// Alerts to Falcosidekick.
    pub falcosidekick: SidekickConfig,
    /// Prometheus metrics, `/healthz` and `/readyz`.
    pub admin: AdminConfig,
    /// What `/healthz` and the kernel-silence notice judge.
    pub health: HealthConfig,
    /// Longest SIGTERM/SIGINT shutdown, in milliseconds: listeners close at once, lanes
    /// and outputs drain, stream clients are told; what is left at the bound is logged
    /// and abandoned. Well under Kubernetes' default 30 s grace period.
    pub shutdown_timeout_ms: u64,
    /// The forensic journal on local disk; off unless `journal.dir` is set.
    pub journal: JournalConfig,
    /// The daemon's own log on stderr.
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            watch: WatchConfig::default(),
            cgroups: Vec::new(),
            lanes: LanesConfig::default(),
            kernel_maps: KernelMapsConfig::default(),
            poll_interval_ms: 10,
            output: "-".to_owned(),
            kernel_log: false,
            identity: IdentityConfig::default(),
            detect: DetectConfig::default(),
            alerts: AlertsConfig::default(),
            grpc: GrpcConfig::default(),
            falcosidekick: SidekickConfig::default(),
            admin: AdminConfig::default(),
            health: HealthConfig::default(),
            shutdown_timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
            journal: JournalConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// Largest config file read: a config is a few KiB, and a ConfigMap (where a DaemonSet
/// takes it from) holds at most 1 MiB.
pub const MAX_CONFIG_BYTES: u64 = crate::boundedfile::MIB;

impl Config {
    /// `shutdown_timeout_ms` as a duration.
    pub fn shutdown_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// Reads (a regular file of at most [`MAX_CONFIG_BYTES`]), parses and validates a
    /// config file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text =
            crate::boundedfile::read_to_string(file, MAX_CONFIG_BYTES).map_err(|source| {
                ConfigError::Read {
                    file: file.to_owned(),
                    source,
                }
            })?;
        Self::parse(&text, file)
    }

    /// Parses and validates config text; `file` is only used in messages. The NODE_NAME
    /// environment variable overrides `identity.pods.node_name`.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        // An empty file is the built-in default, not an error.
        let mut config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            crate::yaml::from_str(text).map_err(|e| ConfigError::Parse {
                file: file.to_owned(),
                message: e.to_string(),
            })?
        };
        if let Ok(node) = std::env::var("NODE_NAME") {
            if !node.is_empty() {
                config.identity.pods.node_name = Some(node);
            }
        }
        // In a pod, the `kubernetes` Service's address is in the environment: it is what
        // a workload's connect() sees for the API server (before kube-proxy's DNAT).
        if config.detect.api_servers.is_empty() {
            if let (Ok(host), Ok(port)) = (
                std::env::var("KUBERNETES_SERVICE_HOST"),
                std::env::var("KUBERNETES_SERVICE_PORT"),
            ) {
                let endpoint = if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                config.detect.api_servers.push(endpoint);
            }
        }
        config.validate(file)?;
        Ok(config)
    }

    /// The watched prefixes: the configured ones plus the kubelet's pod volumes, PKI and
    /// kubeconfig under `identity.kubelet_root`, without duplicates.
    pub fn effective_prefixes(&self) -> Vec<String> {
        let root = self.identity.kubelet_root.trim_end_matches('/');
        let mut out = self.watch.prefixes.clone();
        for extra in [
            format!("{root}/pods/"),
            format!("{root}/pki/"),
            format!("{root}/kubeconfig"),
        ] {
            if !out.contains(&extra) {
                out.push(extra);
            }
        }
        out
    }
}
