//! Daemon configuration: a YAML file, parsed and validated once, before anything starts.
//!
//! Every error names the file, the field and what was expected, so that a bad config never
//! starts a half-working daemon (the CLI exits 64 on [`ConfigError`]).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use agent_monitor_common::{Lane, BASENAME_CAP, PATH_CAP};

use crate::probes::{Budget, DEFAULT_BUDGETS};
use serde::Deserialize;

/// Smallest ring buffer the kernel accepts: one page.
pub const MIN_RING_BYTES: u32 = 4096;
/// Largest ring buffer we accept (1 GiB); bigger rings are a typo, not a need.
pub const MAX_RING_BYTES: u32 = 1 << 30;

/// Paths that hold credentials on a Kubernetes node or in a container, matched as prefixes
/// of the path an open syscall receives.
pub const DEFAULT_PREFIXES: &[&str] = &[
    // In-container ServiceAccount tokens, Secret volumes and projected workload-identity
    // tokens (kubernetes.io/serviceaccount, eks.amazonaws.com/serviceaccount, azure/tokens).
    "/var/run/secrets/",
    "/run/secrets/",
    // The kubelet's view of every pod volume on the node: tokens and Secrets of all pods.
    "/var/lib/kubelet/pods/",
    // Node credentials: kubelet kubeconfig and client certificates, admin kubeconfigs, PKI.
    "/var/lib/kubelet/kubeconfig",
    "/var/lib/kubelet/pki/",
    "/etc/kubernetes/",
    "/etc/rancher/k3s/",
    "/var/lib/rancher/k3s/server/",
    // Cloud and cluster credentials of the node's root user.
    "/root/.kube/",
    "/root/.aws/",
    "/root/.azure/",
    "/root/.config/gcloud/",
    "/root/.docker/config.json",
];

/// Last path components that mark a credential when an open names a relative path.
pub const DEFAULT_BASENAMES: &[&str] = &[
    "token",
    "kubeconfig",
    "admin.conf",
    "super-admin.conf",
    "kubelet.conf",
    "credentials",
    "application_default_credentials.json",
    "accessTokens.json",
    "msal_token_cache.json",
];

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

/// The daemon's own log (stderr); its level comes from `--log-level` or RUST_LOG.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (one human-readable line per record) or `json` (one JSON object per line,
    /// for log collectors).
    pub format: LogFormat,
}

/// How the daemon's log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `[<RFC 3339 time> <LEVEL> <target>] <message>`.
    #[default]
    Text,
    /// `{"timestamp":..,"level":..,"target":..,"message":..}` and the event's fields.
    Json,
}

/// Default of `journal.sync_interval_ms`.
pub const DEFAULT_JOURNAL_SYNC_INTERVAL_MS: u64 = 1000;

/// Smallest `journal.segment_bytes` accepted here: the journal itself takes less (so its
/// tests can rotate often), but a daemon rotating every few records would spend its time
/// creating files.
pub const MIN_JOURNAL_SEGMENT_BYTES: u64 = 4096;

/// Largest `journal.segment_bytes`: past this a segment is a file too big to copy off a
/// node comfortably, and retention frees space in too coarse steps.
pub const MAX_JOURNAL_SEGMENT_BYTES: u64 = 1 << 30;

/// Largest `journal.max_bytes` (1 TiB): more is a typo, not a node's disk budget.
pub const MAX_JOURNAL_BYTES: u64 = 1 << 40;

/// Forensic journal settings: every event and alert, appended to checksummed segment
/// files that outlive the daemon (see `crate::journal`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Absolute directory of the journal (created 0700 if missing). Unset: no journal.
    pub dir: Option<PathBuf>,
    /// A segment file is closed at about this size and a new one started.
    pub segment_bytes: u64,
    /// Total size of the journal; the oldest segments are deleted to stay under it (the
    /// segment being written can take it over by up to one segment).
    pub max_bytes: u64,
    /// Segments last written longer ago than this are deleted (`7days`, `36h`; humantime
    /// units), or `none` to keep them until `max_bytes` needs the room.
    pub max_age: String,
    /// How often what was appended is written and fsynced, in milliseconds: at most this
    /// much is lost to a power cut or a kill (a kill loses only what was still queued).
    pub sync_interval_ms: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        let o = crate::journal::Options::default();
        Self {
            dir: None,
            segment_bytes: o.segment_bytes,
            max_bytes: o.max_bytes,
            max_age: o.max_age.map_or_else(
                || "none".to_owned(),
                |a| humantime::format_duration(a).to_string(),
            ),
            sync_interval_ms: DEFAULT_JOURNAL_SYNC_INTERVAL_MS,
        }
    }
}

impl JournalConfig {
    /// `max_age` as a duration; None for `none` (and for text that validation refused).
    pub fn max_age(&self) -> Option<std::time::Duration> {
        if self.max_age == "none" {
            return None;
        }
        humantime::parse_duration(&self.max_age).ok()
    }

    /// The journal's own options.
    pub fn options(&self) -> crate::journal::Options {
        crate::journal::Options {
            segment_bytes: self.segment_bytes,
            max_bytes: self.max_bytes,
            max_age: self.max_age(),
        }
    }

    /// `sync_interval_ms` as a duration.
    pub fn sync_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.sync_interval_ms)
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, expected: String, got: String| ConfigError::Invalid {
            file: file.to_owned(),
            field: format!("journal.{field}"),
            expected,
            got,
        };
        if let Some(dir) = &self.dir {
            if !dir.is_absolute() || dir.as_os_str().as_encoded_bytes().contains(&0) {
                return Err(invalid(
                    "dir",
                    "an absolute directory (/var/lib/agent-monitor/journal)".to_owned(),
                    format!("{:?}", dir.display().to_string()),
                ));
            }
        }
        if !(MIN_JOURNAL_SEGMENT_BYTES..=MAX_JOURNAL_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(invalid(
                "segment_bytes",
                format!("{MIN_JOURNAL_SEGMENT_BYTES} to {MAX_JOURNAL_SEGMENT_BYTES}"),
                self.segment_bytes.to_string(),
            ));
        }
        if !(self.segment_bytes..=MAX_JOURNAL_BYTES).contains(&self.max_bytes) {
            return Err(invalid(
                "max_bytes",
                format!(
                    "segment_bytes ({}) to {MAX_JOURNAL_BYTES}",
                    self.segment_bytes
                ),
                self.max_bytes.to_string(),
            ));
        }
        if self.max_age != "none" {
            // A minute at least: retention runs on every sync, and an age shorter than a
            // few syncs would delete segments as soon as they close.
            let ok = humantime::parse_duration(&self.max_age).is_ok_and(|d| {
                (std::time::Duration::from_secs(60)
                    ..=std::time::Duration::from_secs(10 * 365 * 86_400))
                    .contains(&d)
            });
            if !ok {
                return Err(invalid(
                    "max_age",
                    "`none` or a duration from 1m to 10years (7days, 36h)".to_owned(),
                    format!("{:?}", self.max_age),
                ));
            }
        }
        if !(10..=60_000).contains(&self.sync_interval_ms) {
            return Err(invalid(
                "sync_interval_ms",
                "10 to 60000".to_owned(),
                self.sync_interval_ms.to_string(),
            ));
        }
        Ok(())
    }
}

/// Default of `shutdown_timeout_ms`.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;

/// Liveness settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// `/healthz` fails when the lane consumer or the pipeline loop has not turned for this
    /// long, in milliseconds.
    pub loop_stall_ms: u64,
    /// No record from the kernel for this long raises one `monitor-kernel-silent` notice
    /// per silent spell, in milliseconds; 0: never. Silence is not a health failure (a
    /// quiet node is healthy); its length is always in `agent_monitor_kernel_silence_seconds`.
    pub kernel_silence_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            loop_stall_ms: 30_000,
            kernel_silence_ms: 60_000,
        }
    }
}

/// gRPC API settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// TCP address, or `none`.
    pub listen: String,
    /// Unix socket path (mode 0600), optional.
    pub unix_socket: Option<PathBuf>,
    /// Server certificate and key (PEM); with `client_ca`, mutual TLS.
    pub tls: Option<TlsConfig>,
    /// Messages queued per streaming client before it is sent a gap notice.
    pub queue_per_client: usize,
    /// Connections admitted at once, per listener (TCP and the Unix socket each). Over
    /// it, the oldest connection that made no request yet is closed, or else the new one.
    pub max_connections: usize,
    /// Longest time from accept to the first call (TLS and HTTP/2 handshakes included).
    pub handshake_timeout_ms: u64,
    /// Longest silence from a client after its first call; keepalive pings are answered
    /// by every gRPC client, so a quiet stream stays open.
    pub idle_timeout_ms: u64,
    /// HTTP/2 keepalive: a connection silent this long is pinged...
    pub keepalive_interval_ms: u64,
    /// ...and closed if the ping is not answered within this.
    pub keepalive_timeout_ms: u64,
    /// Serve plain-text gRPC on a non-loopback `listen` address. Without it such a config
    /// is refused: the API streams credential events, so off the node it needs `tls`
    /// (or this, when something else such as a NetworkPolicy restricts who connects).
    pub allow_insecure: bool,
}

/// TLS files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".to_owned(),
            unix_socket: None,
            tls: None,
            queue_per_client: crate::outputs::grpc::DEFAULT_QUEUE_PER_CLIENT,
            max_connections: crate::outputs::listen::DEFAULT_GRPC_MAX_CONNECTIONS,
            handshake_timeout_ms: ms(crate::outputs::listen::DEFAULT_HANDSHAKE_TIMEOUT),
            idle_timeout_ms: ms(crate::outputs::listen::DEFAULT_IDLE_TIMEOUT),
            keepalive_interval_ms: ms(crate::outputs::grpc::DEFAULT_KEEPALIVE_INTERVAL),
            keepalive_timeout_ms: ms(crate::outputs::grpc::DEFAULT_KEEPALIVE_TIMEOUT),
            allow_insecure: false,
        }
    }
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl GrpcConfig {
    /// The connection limits of each gRPC listener.
    pub fn limits(&self) -> crate::outputs::listen::ConnLimits {
        crate::outputs::listen::ConnLimits {
            max_connections: self.max_connections,
            handshake_timeout: std::time::Duration::from_millis(self.handshake_timeout_ms),
            idle_timeout: std::time::Duration::from_millis(self.idle_timeout_ms),
        }
    }
}

impl AdminConfig {
    /// The connection limits of the admin listener.
    pub fn limits(&self) -> crate::outputs::listen::ConnLimits {
        crate::outputs::listen::ConnLimits {
            max_connections: self.max_connections,
            handshake_timeout: std::time::Duration::from_millis(self.handshake_timeout_ms),
            idle_timeout: std::time::Duration::from_millis(self.idle_timeout_ms),
        }
    }
}

/// Falcosidekick settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidekickConfig {
    /// `http://falcosidekick:2801/`; unset: no Falcosidekick output.
    pub url: Option<String>,
    /// Alerts waiting for delivery before new ones are dropped (and counted).
    pub queue: usize,
    /// Extra CA certificates (PEM) for an https URL.
    pub ca: Option<PathBuf>,
}

impl Default for SidekickConfig {
    fn default() -> Self {
        Self {
            url: None,
            queue: 10_000,
            ca: None,
        }
    }
}

/// Admin endpoint settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// TCP address of `/metrics`, `/healthz` and `/readyz`, or `none`. Any address is
    /// accepted without TLS: metrics and health carry no credentials or events.
    pub listen: String,
    /// Connections admitted at once (see `grpc.max_connections`).
    pub max_connections: usize,
    /// Longest time from accept to the first request.
    pub handshake_timeout_ms: u64,
    /// Longest silence after a request before a kept-alive connection is closed.
    pub idle_timeout_ms: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9880".to_owned(),
            max_connections: crate::outputs::listen::DEFAULT_ADMIN_MAX_CONNECTIONS,
            handshake_timeout_ms: ms(crate::outputs::listen::DEFAULT_HANDSHAKE_TIMEOUT),
            idle_timeout_ms: ms(crate::outputs::listen::DEFAULT_IDLE_TIMEOUT),
        }
    }
}

/// `none`, or a socket address.
pub fn listen_addr(s: &str) -> Option<std::net::SocketAddr> {
    if s == "none" {
        None
    } else {
        s.parse().ok()
    }
}

/// Detection settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// AgentPolicy YAML files or directories of them; reloaded when they change.
    pub policies: Vec<PathBuf>,
    /// Also apply the cluster's AgentPolicy objects (all namespaces), watched through the
    /// API server. Needs a Kubernetes client: in a pod, its ServiceAccount, allowed to list
    /// and watch `agentpolicies.agent-monitor.dev` in all namespaces; it does not need
    /// `identity.pods.source: kube`. An object selects pods of its own namespace only, and
    /// the policy files come first: when both select a workload, the file policy applies.
    pub cluster_policies: bool,
    /// API server endpoints (`10.96.0.1:443`, `192.168.1.10`): the `api-server` class.
    /// Empty: the `kubernetes` Service from KUBERNETES_SERVICE_HOST/PORT, when set.
    pub api_servers: Vec<String>,
    /// The cluster's DNS servers (`10.96.0.10`): the `dns` class, on port 53 or 853 only.
    /// Absent: the nameservers of [`RESOLV_CONF`]; `[]`: no address is DNS.
    pub dns_servers: Option<Vec<String>>,
    /// Pod and Service CIDRs: the `cluster` class.
    pub cluster_cidrs: Vec<String>,
    /// How long after a credential read egress counts as exfiltration, in milliseconds.
    pub exfil_window_ms: u64,
    /// Executable names that may never read a credential (shells, file utilities).
    pub suspicious_readers: Vec<String>,
    /// Executable names of the node's own agents (the kubelet), which read node
    /// credentials as their job: `node-credential-read` does not fire for host processes
    /// running them.
    pub node_agents: Vec<String>,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            policies: Vec::new(),
            cluster_policies: false,
            api_servers: Vec::new(),
            dns_servers: None,
            cluster_cidrs: Vec::new(),
            exfil_window_ms: 30_000,
            suspicious_readers: crate::detect::DEFAULT_SUSPICIOUS_READERS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            node_agents: crate::detect::DEFAULT_NODE_AGENTS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        }
    }
}

/// Where the default DNS servers come from. In a pod with dnsPolicy ClusterFirst (or
/// ClusterFirstWithHostNet) it names the cluster DNS, the same servers workloads use.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

impl DetectConfig {
    /// The DNS servers: the configured ones (validated), or those of [`RESOLV_CONF`].
    pub fn effective_dns_servers(&self) -> Vec<IpAddr> {
        match &self.dns_servers {
            Some(list) => list.iter().filter_map(|s| s.parse().ok()).collect(),
            None => read_resolv_conf(Path::new(RESOLV_CONF)),
        }
    }
}

/// The conversion lives with the schema: `detect` does not know the config file.
impl crate::detect::DetectSettings {
    /// From validated settings (entries that do not parse were rejected by validation).
    /// Without `detect.dns_servers` this reads the DNS servers from /etc/resolv.conf.
    pub fn from_settings(s: &DetectConfig, rate_limit_per_minute: u32) -> Self {
        Self {
            destinations: crate::detect::destinations::Destinations {
                api_servers: s
                    .api_servers
                    .iter()
                    .filter_map(|a| crate::detect::destinations::Endpoint::parse(a))
                    .collect(),
                dns_servers: s.effective_dns_servers(),
                cluster: s
                    .cluster_cidrs
                    .iter()
                    .filter_map(|c| crate::policy::matching::parse_cidr(c).ok())
                    .collect(),
            },
            exfil_window: std::time::Duration::from_millis(s.exfil_window_ms),
            rate_limit_per_minute,
            suspicious_readers: s.suspicious_readers.clone(),
            node_agents: s.node_agents.clone(),
        }
    }
}

/// The `nameserver` addresses of resolv.conf text, in order, without duplicates. Comments,
/// other options and lines that do not hold an address are skipped, as the resolver does;
/// a `%zone` suffix (link-local IPv6) is dropped, since connects report no zone.
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        let addr = addr.split('%').next().unwrap_or_default();
        if let Ok(ip) = addr.parse::<IpAddr>() {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

/// The nameservers of the resolv.conf at `path`. A file that cannot be read, or names none,
/// leaves the `dns` class empty: logged, not fatal, since DNS then reads as cluster or
/// external traffic rather than being lost.
pub fn read_resolv_conf(path: &Path) -> Vec<IpAddr> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let servers = parse_resolv_conf(&text);
            if servers.is_empty() {
                tracing::info!(
                    "{}: no nameserver; the dns destination class is empty (set detect.dns_servers)",
                    path.display()
                );
            } else {
                tracing::info!("dns destination class: {servers:?} from {}", path.display());
            }
            servers
        }
        Err(e) => {
            tracing::info!(
                "{}: {e}; the dns destination class is empty (set detect.dns_servers)",
                path.display()
            );
            Vec::new()
        }
    }
}

/// Alert output settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Falco JSON lines: `-` for stdout, a file path (appended), or `none`.
    pub output: String,
    /// Alerts per rule and workload per minute; the excess is counted and reported.
    pub rate_limit_per_minute: u32,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            output: "-".to_owned(),
            rate_limit_per_minute: 20,
        }
    }
}

/// Where pod metadata comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodSourceKind {
    /// No pod metadata: events carry cgroup-derived pod UIDs and container ids only.
    None,
    /// A file as `kubectl get pods -o json` prints it, reloaded when it changes.
    File,
    /// The API server: a watch on this node's pods (in-cluster credentials).
    Kube,
}

/// Identity settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// The kubelet's root directory; `<root>/pods/` is watched and owners are read from it.
    pub kubelet_root: String,
    /// Where the node's cgroup2 hierarchy is mounted (or its parent on a hybrid v1+v2 node,
    /// with cgroup2 at `<dir>/unified`). Default: the first cgroup2 mount of the daemon's own
    /// mount namespace, which in a container is only the container's own cgroup.
    pub cgroup_root: Option<PathBuf>,
    /// Pod label naming the agent.
    pub agent_label: String,
    /// Pod label naming the agent's tier (`proxy`, `worker`).
    pub tier_label: String,
    pub pods: PodsConfig,
    /// How long and how many events of a brand-new pod wait for its metadata.
    pub pending: PendingConfig,
}

/// Pod source settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PodsConfig {
    /// `none`, `file` or `kube`.
    pub source: PodSourceKind,
    /// The pods file, for `source: file`.
    pub file: Option<PathBuf>,
    /// This node's name, for `source: kube`; the NODE_NAME environment variable overrides it.
    pub node_name: Option<String>,
}

/// Bounds of the wait for a new pod's metadata.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PendingConfig {
    /// Longest an event waits, in milliseconds.
    pub max_wait_ms: u64,
    /// Most events waiting at once; past it the oldest leaves without pod metadata.
    pub max_events: usize,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            kubelet_root: crate::identity::DEFAULT_KUBELET_ROOT.to_owned(),
            cgroup_root: None,
            agent_label: crate::identity::DEFAULT_AGENT_LABEL.to_owned(),
            tier_label: crate::identity::DEFAULT_TIER_LABEL.to_owned(),
            pods: PodsConfig::default(),
            pending: PendingConfig::default(),
        }
    }
}

impl IdentityConfig {
    /// What attribution needs of this section.
    pub fn settings(&self) -> crate::identity::IdentitySettings {
        crate::identity::IdentitySettings {
            kubelet_root: self.kubelet_root.clone(),
            agent_label: self.agent_label.clone(),
            tier_label: self.tier_label.clone(),
        }
    }
}

impl Default for PodsConfig {
    fn default() -> Self {
        Self {
            source: PodSourceKind::None,
            file: None,
            node_name: None,
        }
    }
}

impl Default for PendingConfig {
    fn default() -> Self {
        Self {
            max_wait_ms: 3000,
            max_events: 10_000,
        }
    }
}

/// Watched credential paths.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// Absolute path prefixes.
    pub prefixes: Vec<String>,
    /// Basenames matched when the opened path is relative.
    pub basenames: Vec<String>,
    /// Report opens of `/proc/<pid>/environ`.
    pub proc_environ: bool,
}

/// Capacities of the kernel's file-identity maps. What does not fit is logged, counted
/// (`agent_monitor_kernel_map_refusals_total`, `GetStatus.kernel_map_pending`) and retried on
/// every sync.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KernelMapsConfig {
    /// Filesystems watched whole (pods' Secret and projected volumes) or holding inventory
    /// files.
    pub watched_filesystems: u32,
    /// Node credential files watched by (device, inode).
    pub inventory_files: u32,
}

/// Largest capacity accepted for a kernel map.
const MAX_KERNEL_MAP_ENTRIES: u32 = 1 << 20;

impl Default for KernelMapsConfig {
    fn default() -> Self {
        Self {
            watched_filesystems: agent_monitor_common::MAX_WATCHED_FS,
            inventory_files: agent_monitor_common::MAX_INVENTORY,
        }
    }
}

/// The three lanes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LanesConfig {
    pub credential: LaneConfig,
    pub network: LaneConfig,
    pub process: LaneConfig,
}

/// One lane.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneConfig {
    /// Ring buffer size in bytes: a power of two, at least one page.
    pub ring_bytes: u32,
    /// Per-workload (per-cgroup) budget; fields left out take the lane's default.
    #[serde(default)]
    pub budget: BudgetConfig,
}

/// `lanes.<lane>.budget`: how many records of this lane one workload (one cgroup) may
/// make, so that one pod's flood cannot cost another pod its events. What a budget
/// refuses is counted per workload and alerted naming it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Sustained records per second per workload; 0 turns the budget off.
    pub per_second: Option<u32>,
    /// Records a workload may make at once above its sustained rate (at least 1).
    pub burst: Option<u32>,
    /// Enforced only while this percentage of the lane's ring is waiting to be read (0:
    /// always; below 100).
    pub pressure_percent: Option<u8>,
}

impl BudgetConfig {
    /// The budget with the fields left out taken from `default`.
    pub fn resolve(&self, default: Budget) -> Budget {
        Budget {
            per_second: self.per_second.unwrap_or(default.per_second),
            burst: self.burst.unwrap_or(default.burst),
            pressure_percent: self.pressure_percent.unwrap_or(default.pressure_percent),
        }
    }
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

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            prefixes: DEFAULT_PREFIXES.iter().map(|s| (*s).to_owned()).collect(),
            basenames: DEFAULT_BASENAMES.iter().map(|s| (*s).to_owned()).collect(),
            proc_environ: true,
        }
    }
}

impl Default for LanesConfig {
    fn default() -> Self {
        Self {
            credential: LaneConfig {
                ring_bytes: 1 << 20,
                budget: BudgetConfig::default(),
            },
            network: LaneConfig {
                ring_bytes: 1 << 20,
                budget: BudgetConfig::default(),
            },
            process: LaneConfig {
                ring_bytes: 1 << 20,
                budget: BudgetConfig::default(),
            },
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

    /// Connection limits, timeouts, exposure and the shutdown bound.
    fn validate_listeners(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, expected: &str, got: String| ConfigError::Invalid {
            file: file.to_owned(),
            field: field.to_owned(),
            expected: expected.to_owned(),
            got,
        };
        let g = &self.grpc;
        // A plain-text API reachable from other hosts streams credential events to anyone
        // who can connect. The admin listener has no such rule: metrics and health carry
        // no credentials or events, only counts.
        if let Some(addr) = listen_addr(&g.listen) {
            if g.tls.is_none() && !g.allow_insecure && !addr.ip().to_canonical().is_loopback() {
                return Err(invalid(
                    "grpc.listen",
                    "a loopback address (127.0.0.1:50051), or grpc.tls for a non-loopback one \
                     (or grpc.allow_insecure: true to serve plain-text gRPC on a non-loopback \
                     address, when something else restricts who can connect)",
                    format!("{:?} without grpc.tls", g.listen),
                ));
            }
        }
        for (field, n) in [
            ("grpc.max_connections", g.max_connections),
            ("admin.max_connections", self.admin.max_connections),
        ] {
            if n == 0 || n > 65_536 {
                return Err(invalid(field, "1 to 65536", n.to_string()));
            }
        }
        for (field, v) in [
            ("grpc.handshake_timeout_ms", g.handshake_timeout_ms),
            ("grpc.keepalive_timeout_ms", g.keepalive_timeout_ms),
            (
                "admin.handshake_timeout_ms",
                self.admin.handshake_timeout_ms,
            ),
            ("admin.idle_timeout_ms", self.admin.idle_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&v) {
                return Err(invalid(field, "100 to 3600000", v.to_string()));
            }
        }
        if !(1_000..=3_600_000).contains(&g.keepalive_interval_ms) {
            return Err(invalid(
                "grpc.keepalive_interval_ms",
                "1000 to 3600000",
                g.keepalive_interval_ms.to_string(),
            ));
        }
        // A quiet stream client only sends keepalive answers: the idle timeout must leave
        // room for a ping and its answer, or healthy clients would be cut off.
        let min_idle = g
            .keepalive_interval_ms
            .saturating_add(g.keepalive_timeout_ms);
        if g.idle_timeout_ms <= min_idle || g.idle_timeout_ms > 86_400_000 {
            return Err(invalid(
                "grpc.idle_timeout_ms",
                &format!(
                    "more than keepalive_interval_ms + keepalive_timeout_ms ({min_idle}), at most 86400000"
                ),
                g.idle_timeout_ms.to_string(),
            ));
        }
        if !(100..=600_000).contains(&self.shutdown_timeout_ms) {
            return Err(invalid(
                "shutdown_timeout_ms",
                "100 to 600000 (keep it under the pod's terminationGracePeriodSeconds)",
                self.shutdown_timeout_ms.to_string(),
            ));
        }
        Ok(())
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

    /// What the probes are loaded with.
    pub fn probe_settings(&self) -> crate::probes::ProbeSettings {
        crate::probes::ProbeSettings {
            ring_bytes: [
                self.lanes.credential.ring_bytes,
                self.lanes.network.ring_bytes,
                self.lanes.process.ring_bytes,
            ],
            budgets: self.budgets(),
            cgroups: self.cgroups.clone(),
            proc_environ: self.watch.proc_environ,
            kernel_log: self.kernel_log,
            exfil_window_ms: self.detect.exfil_window_ms,
            watched_filesystems: self.kernel_maps.watched_filesystems,
            inventory_files: self.kernel_maps.inventory_files,
            prefixes: self.effective_prefixes(),
            basenames: self.watch.basenames.clone(),
        }
    }

    /// Each lane's budget, defaults filled in, indexed by lane.
    pub fn budgets(&self) -> [Budget; 3] {
        let l = &self.lanes;
        [
            l.credential
                .budget
                .resolve(DEFAULT_BUDGETS[Lane::Credential as usize]),
            l.network
                .budget
                .resolve(DEFAULT_BUDGETS[Lane::Network as usize]),
            l.process
                .budget
                .resolve(DEFAULT_BUDGETS[Lane::Process as usize]),
        ]
    }

    /// Checks what types alone cannot.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |field: String, expected: &str, got: String| ConfigError::Invalid {
            file: file.to_owned(),
            field,
            expected: expected.to_owned(),
            got,
        };
        for (i, p) in self.watch.prefixes.iter().enumerate() {
            let field = format!("watch.prefixes[{i}]");
            if !p.starts_with('/') {
                return Err(invalid(
                    field,
                    "an absolute path (starting with /)",
                    format!("{p:?}"),
                ));
            }
            if p.len() >= PATH_CAP || p.contains('\0') {
                return Err(invalid(
                    field,
                    &format!("at most {} bytes and no NUL", PATH_CAP - 1),
                    format!("{} bytes", p.len()),
                ));
            }
        }
        for (i, b) in self.watch.basenames.iter().enumerate() {
            let field = format!("watch.basenames[{i}]");
            if b.is_empty() || b.contains('/') || b.contains('\0') || b == "." || b == ".." {
                return Err(invalid(
                    field,
                    "a file name without / (e.g. token)",
                    format!("{b:?}"),
                ));
            }
            if b.len() >= BASENAME_CAP {
                return Err(invalid(
                    field,
                    &format!("at most {} bytes", BASENAME_CAP - 1),
                    format!("{} bytes", b.len()),
                ));
            }
        }
        for (name, lane) in [
            ("credential", &self.lanes.credential),
            ("network", &self.lanes.network),
            ("process", &self.lanes.process),
        ] {
            let n = lane.ring_bytes;
            if !n.is_power_of_two() || !(MIN_RING_BYTES..=MAX_RING_BYTES).contains(&n) {
                return Err(invalid(
                    format!("lanes.{name}.ring_bytes"),
                    &format!("a power of two from {MIN_RING_BYTES} to {MAX_RING_BYTES}"),
                    n.to_string(),
                ));
            }
            let b = lane.budget;
            if b.burst == Some(0) {
                return Err(invalid(
                    format!("lanes.{name}.budget.burst"),
                    "at least 1 record",
                    "0".to_owned(),
                ));
            }
            if let Some(p) = b.pressure_percent.filter(|p| *p >= 100) {
                return Err(invalid(
                    format!("lanes.{name}.budget.pressure_percent"),
                    "0 (always) to 99",
                    p.to_string(),
                ));
            }
        }
        if let Some(root) = &self.identity.cgroup_root {
            if !root.is_absolute() {
                return Err(invalid(
                    "identity.cgroup_root".to_owned(),
                    "an absolute directory where the node's cgroup2 hierarchy is mounted",
                    format!("{:?}", root.display().to_string()),
                ));
            }
        }
        for (i, c) in self.cgroups.iter().enumerate() {
            if !c.is_absolute() {
                return Err(invalid(
                    format!("cgroups[{i}]"),
                    "an absolute cgroup2 directory",
                    format!("{:?}", c.display().to_string()),
                ));
            }
        }
        for (field, n) in [
            (
                "kernel_maps.watched_filesystems",
                self.kernel_maps.watched_filesystems,
            ),
            (
                "kernel_maps.inventory_files",
                self.kernel_maps.inventory_files,
            ),
        ] {
            if n == 0 || n > MAX_KERNEL_MAP_ENTRIES {
                return Err(invalid(
                    field.to_owned(),
                    "1 to 1048576 entries",
                    n.to_string(),
                ));
            }
        }
        if self.poll_interval_ms == 0 || self.poll_interval_ms > 10_000 {
            return Err(invalid(
                "poll_interval_ms".to_owned(),
                "1 to 10000",
                self.poll_interval_ms.to_string(),
            ));
        }
        let id = &self.identity;
        if !id.kubelet_root.starts_with('/')
            || id.kubelet_root.len() + "/kubeconfig".len() >= PATH_CAP
        {
            return Err(invalid(
                "identity.kubelet_root".to_owned(),
                "an absolute directory path",
                format!("{:?}", id.kubelet_root),
            ));
        }
        for (field, label) in [
            ("identity.agent_label", &id.agent_label),
            ("identity.tier_label", &id.tier_label),
        ] {
            if label.is_empty() || label.contains(char::is_whitespace) {
                return Err(invalid(
                    field.to_owned(),
                    "a label key such as agent-monitor.dev/agent",
                    format!("{label:?}"),
                ));
            }
        }
        match id.pods.source {
            PodSourceKind::File if id.pods.file.is_none() => {
                return Err(invalid(
                    "identity.pods.file".to_owned(),
                    "a pods file path when identity.pods.source is file",
                    "nothing".to_owned(),
                ));
            }
            PodSourceKind::Kube if id.pods.node_name.as_deref().is_none_or(str::is_empty) => {
                return Err(invalid(
                    "identity.pods.node_name".to_owned(),
                    "this node's name (or the NODE_NAME environment variable) when identity.pods.source is kube",
                    "nothing".to_owned(),
                ));
            }
            _ => {}
        }
        if id.pending.max_wait_ms > 60_000 || id.pending.max_events == 0 {
            return Err(invalid(
                "identity.pending".to_owned(),
                "max_wait_ms at most 60000 and max_events at least 1",
                format!(
                    "max_wait_ms {} max_events {}",
                    id.pending.max_wait_ms, id.pending.max_events
                ),
            ));
        }
        for (i, a) in self.detect.api_servers.iter().enumerate() {
            if crate::detect::destinations::Endpoint::parse(a).is_none() {
                return Err(invalid(
                    format!("detect.api_servers[{i}]"),
                    "an IP address with an optional port (10.96.0.1:443)",
                    format!("{a:?}"),
                ));
            }
        }
        for (i, d) in self.detect.dns_servers.iter().flatten().enumerate() {
            if d.parse::<IpAddr>().is_err() {
                return Err(invalid(
                    format!("detect.dns_servers[{i}]"),
                    "an IP address without a port (10.96.0.10, fd00::a)",
                    format!("{d:?}"),
                ));
            }
        }
        for (i, c) in self.detect.cluster_cidrs.iter().enumerate() {
            if crate::policy::matching::parse_cidr(c).is_err() {
                return Err(invalid(
                    format!("detect.cluster_cidrs[{i}]"),
                    "a CIDR (10.244.0.0/16, fd00::/64)",
                    format!("{c:?}"),
                ));
            }
        }
        if self.detect.exfil_window_ms == 0 || self.detect.exfil_window_ms > 3_600_000 {
            return Err(invalid(
                "detect.exfil_window_ms".to_owned(),
                "1 to 3600000",
                self.detect.exfil_window_ms.to_string(),
            ));
        }
        if self.alerts.rate_limit_per_minute == 0 {
            return Err(invalid(
                "alerts.rate_limit_per_minute".to_owned(),
                "at least 1".to_owned().as_str(),
                "0".to_owned(),
            ));
        }
        for (field, value) in [
            ("grpc.listen", &self.grpc.listen),
            ("admin.listen", &self.admin.listen),
        ] {
            if value != "none" && value.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    field.to_owned(),
                    "`none` or an address with a port (127.0.0.1:50051)",
                    format!("{value:?}"),
                ));
            }
        }
        self.validate_listeners(file)?;
        // A loop turns at least every poll interval (the lane consumer) and every second
        // (the pipeline): a shorter limit would fail a healthy daemon.
        let min_stall = (2 * self.poll_interval_ms).max(2_000);
        if self.health.loop_stall_ms < min_stall || self.health.loop_stall_ms > 3_600_000 {
            return Err(invalid(
                "health.loop_stall_ms".to_owned(),
                &format!("{min_stall} (twice poll_interval_ms, at least 2000) to 3600000"),
                self.health.loop_stall_ms.to_string(),
            ));
        }
        if self.health.kernel_silence_ms > 86_400_000 {
            return Err(invalid(
                "health.kernel_silence_ms".to_owned(),
                "0 (never) to 86400000",
                self.health.kernel_silence_ms.to_string(),
            ));
        }
        if self.grpc.queue_per_client == 0 || self.falcosidekick.queue == 0 {
            return Err(invalid(
                "grpc.queue_per_client / falcosidekick.queue".to_owned(),
                "at least 1",
                "0".to_owned(),
            ));
        }
        if let Some(url) = &self.falcosidekick.url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    "falcosidekick.url".to_owned(),
                    "an http:// or https:// URL",
                    format!("{url:?}"),
                ));
            }
        }
        if self.alerts.output.is_empty() {
            return Err(invalid(
                "alerts.output".to_owned(),
                "`-`, `none` or a file path",
                "\"\"".to_owned(),
            ));
        }
        if self.output.is_empty() {
            return Err(invalid(
                "output".to_owned(),
                "`-` or a file path",
                "\"\"".to_owned(),
            ));
        }
        self.journal.validate(file)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/am.yaml"))
    }

    #[test]
    fn empty_file_is_the_default() {
        let c = parse("").expect("default config");
        assert_eq!(c.watch.prefixes.len(), DEFAULT_PREFIXES.len());
        assert!(c.watch.prefixes.iter().any(|p| p == "/var/run/secrets/"));
        assert!(c.cgroups.is_empty());
    }

    #[test]
    fn journal_is_off_by_default_with_the_journal_defaults() {
        let c = parse("").expect("default config");
        assert!(c.journal.dir.is_none());
        assert_eq!(c.journal.options(), crate::journal::Options::default());
        assert_eq!(c.journal.sync_interval_ms, DEFAULT_JOURNAL_SYNC_INTERVAL_MS);
        let c = parse("journal: {dir: /var/lib/am/j, max_age: none, sync_interval_ms: 250}\n")
            .expect("valid");
        assert_eq!(c.journal.dir.as_deref(), Some(Path::new("/var/lib/am/j")));
        assert_eq!(c.journal.options().max_age, None);
        assert_eq!(
            c.journal.sync_interval(),
            std::time::Duration::from_millis(250)
        );
        let c = parse("journal: {max_age: 36h}\n").expect("valid");
        assert_eq!(
            c.journal.max_age(),
            Some(std::time::Duration::from_secs(36 * 3600))
        );
    }

    #[test]
    fn fields_override_defaults() {
        let c =
            parse("watch:\n  prefixes: [/tmp/x/]\nlanes:\n  credential:\n    ring_bytes: 4096\n")
                .expect("valid");
        assert_eq!(c.watch.prefixes, vec!["/tmp/x/".to_owned()]);
        assert_eq!(c.watch.basenames.len(), DEFAULT_BASENAMES.len());
        assert_eq!(c.lanes.credential.ring_bytes, 4096);
        assert_eq!(c.lanes.network.ring_bytes, 1 << 20);
    }

    #[test]
    fn budget_fields_left_out_take_the_lanes_defaults() {
        let c = parse(
            "lanes:\n  credential:\n    ring_bytes: 4096\n    budget: {per_second: 7}\n  network:\n    ring_bytes: 4096\n    budget: {per_second: 0}\n",
        )
        .expect("valid");
        let [cred, net, proc] = c.budgets();
        assert_eq!(
            cred,
            Budget {
                per_second: 7,
                ..DEFAULT_BUDGETS[0]
            }
        );
        assert_eq!(net.per_second, 0, "0 turns the budget off");
        assert_eq!(proc, DEFAULT_BUDGETS[2]);
    }

    #[test]
    fn errors_name_file_field_and_expectation() {
        let cases: &[(&str, &[&str])] = &[
            (
                "watch:\n  prefixes: [relative/]\n",
                &["/etc/am.yaml", "watch.prefixes[0]", "absolute"],
            ),
            (
                "watch:\n  basenames: [a/b]\n",
                &["watch.basenames[0]", "without /"],
            ),
            (
                "lanes:\n  network:\n    ring_bytes: 5000\n",
                &["lanes.network.ring_bytes", "power of two", "5000"],
            ),
            (
                "lanes:\n  network:\n    ring_bytes: 4096\n    budget: {burst: 0}\n",
                &["lanes.network.budget.burst", "at least 1"],
            ),
            (
                "lanes:\n  credential:\n    ring_bytes: 4096\n    budget: {pressure_percent: 100}\n",
                &["lanes.credential.budget.pressure_percent", "0 (always) to 99", "100"],
            ),
            (
                "lanes:\n  network:\n    ring_bytes: big\n",
                &["/etc/am.yaml", "lanes.network.ring_bytes", "u32"],
            ),
            ("wach: {}\n", &["unknown field `wach`"]),
            ("poll_interval_ms: 0\n", &["poll_interval_ms", "1 to 10000"]),
            (
                "kernel_maps: {watched_filesystems: 0}\n",
                &["kernel_maps.watched_filesystems", "1 to 1048576"],
            ),
            ("cgroups: [kubepods]\n", &["cgroups[0]", "absolute"]),
            ("watch: [\n", &["/etc/am.yaml"]),
            (
                "identity:\n  pods:\n    source: file\n",
                &["identity.pods.file", "source is file"],
            ),
            (
                "identity:\n  pods:\n    source: cluster\n",
                &["identity.pods.source", "unknown variant `cluster`"],
            ),
            (
                "log: {format: logfmt}\n",
                &["log.format", "unknown variant `logfmt`"],
            ),
            ("log: {level: debug}\n", &["log", "unknown field `level`"]),
            (
                "identity:\n  kubelet_root: var/lib/kubelet\n",
                &["identity.kubelet_root", "absolute"],
            ),
            (
                "identity:\n  agent_label: \"\"\n",
                &["identity.agent_label"],
            ),
            (
                "identity:\n  pending: {max_events: 0}\n",
                &["identity.pending"],
            ),
            (
                "detect:\n  dns_servers: [10.96.0.10, kube-dns]\n",
                &[
                    "/etc/am.yaml",
                    "detect.dns_servers[1]",
                    "an IP address",
                    "kube-dns",
                ],
            ),
            (
                "detect:\n  dns_servers: [\"10.96.0.10:53\"]\n",
                &["detect.dns_servers[0]", "without a port", "10.96.0.10:53"],
            ),
            (
                "detect:\n  dns_servers: 10.96.0.10\n",
                &["/etc/am.yaml", "detect.dns_servers"],
            ),
            (
                "health: {loop_stall_ms: 500}\n",
                &["health.loop_stall_ms", "at least 2000", "500"],
            ),
            (
                "poll_interval_ms: 5000\nhealth: {loop_stall_ms: 9000}\n",
                &["health.loop_stall_ms", "10000", "9000"],
            ),
            (
                "journal: {dir: var/journal}\n",
                &["journal.dir", "absolute", "var/journal"],
            ),
            (
                "journal: {dir: /j, segment_bytes: 100}\n",
                &["journal.segment_bytes", "4096 to", "100"],
            ),
            (
                "journal: {segment_bytes: 1048576, max_bytes: 65536}\n",
                &["journal.max_bytes", "segment_bytes (1048576)", "65536"],
            ),
            (
                "journal: {max_age: 5s}\n",
                &["journal.max_age", "1m to 10years", "5s"],
            ),
            ("journal: {max_age: soon}\n", &["journal.max_age", "soon"]),
            (
                "journal: {sync_interval_ms: 0}\n",
                &["journal.sync_interval_ms", "10 to 60000", "0"],
            ),
            ("journal: {dirr: /j}\n", &["unknown field `dirr`"]),
        ];
        for (text, needles) in cases {
            let err = parse(text).expect_err(text).to_string();
            for n in *needles {
                assert!(err.contains(n), "{text:?}: {err:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn non_loopback_plain_text_grpc_needs_tls_or_an_explicit_allowance() {
        for listen in ["0.0.0.0:50051", "10.0.0.5:50051", "[::]:50051"] {
            let err = parse(&format!("grpc: {{listen: \"{listen}\"}}\n"))
                .expect_err(listen)
                .to_string();
            for needle in [
                "/etc/am.yaml",
                "grpc.listen",
                "grpc.tls",
                "grpc.allow_insecure: true",
                listen,
            ] {
                assert!(err.contains(needle), "{listen}: {err:?} lacks {needle:?}");
            }
            parse(&format!(
                "grpc: {{listen: \"{listen}\", allow_insecure: true}}\n"
            ))
            .expect("explicitly allowed");
            parse(&format!(
                "grpc: {{listen: \"{listen}\", tls: {{cert: /c.pem, key: /k.pem}}}}\n"
            ))
            .expect("with TLS");
        }
        for listen in [
            "127.0.0.1:50051",
            "127.3.4.5:1",
            "[::1]:50051",
            "[::ffff:127.0.0.1]:9",
            "none",
        ] {
            parse(&format!("grpc: {{listen: \"{listen}\"}}\n")).expect(listen);
        }
        // The admin listener carries no credentials: any address.
        parse("admin: {listen: \"0.0.0.0:9880\"}\n").expect("admin anywhere");
    }

    #[test]
    fn listener_limits_and_shutdown_bound() {
        let c = parse("").expect("default");
        assert_eq!(
            c.grpc.queue_per_client,
            crate::outputs::grpc::DEFAULT_QUEUE_PER_CLIENT
        );
        assert_eq!(
            crate::outputs::grpc::GrpcSettings::default().queue_per_client,
            c.grpc.queue_per_client
        );
        assert_eq!(c.grpc.limits(), crate::outputs::listen::ConnLimits::GRPC);
        assert_eq!(c.admin.limits(), crate::outputs::listen::ConnLimits::ADMIN);
        assert_eq!(c.shutdown_timeout(), std::time::Duration::from_secs(10));
        let cases: &[(&str, &[&str])] = &[
            (
                "grpc: {max_connections: 0}\n",
                &["grpc.max_connections", "1 to 65536"],
            ),
            ("admin: {max_connections: 0}\n", &["admin.max_connections"]),
            (
                "grpc: {idle_timeout_ms: 40000}\n",
                &["grpc.idle_timeout_ms", "(50000)"],
            ),
            (
                "admin: {handshake_timeout_ms: 5}\n",
                &["admin.handshake_timeout_ms"],
            ),
            (
                "shutdown_timeout_ms: 0\n",
                &["shutdown_timeout_ms", "100 to 600000"],
            ),
        ];
        for (text, needles) in cases {
            let err = parse(text).expect_err(text).to_string();
            for n in *needles {
                assert!(err.contains(n), "{text:?}: {err:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn cluster_policies_are_off_by_default_and_need_no_kube_pod_source() {
        assert!(!parse("").expect("default").detect.cluster_policies);
        let c = parse("detect:\n  cluster_policies: true\n").expect("valid");
        assert!(c.detect.cluster_policies);
        assert_eq!(c.identity.pods.source, PodSourceKind::None);
    }

    #[test]
    fn log_format_is_text_by_default_and_json_on_request() {
        assert_eq!(parse("").expect("default").log.format, LogFormat::Text);
        let c = parse("log:\n  format: json\n").expect("valid");
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn kubelet_paths_are_always_watched() {
        let c = parse("identity:\n  kubelet_root: /tmp/k/\nwatch:\n  prefixes: [/x/]\n")
            .expect("valid");
        assert_eq!(
            c.effective_prefixes(),
            vec!["/x/", "/tmp/k/pods/", "/tmp/k/pki/", "/tmp/k/kubeconfig"]
        );
    }

    #[test]
    fn dns_servers_configured_empty_or_absent() {
        let c = parse("detect:\n  dns_servers: [10.96.0.10, \"fd00::a\"]\n").expect("valid");
        let want: Vec<IpAddr> = vec![
            "10.96.0.10".parse().expect("ip"),
            "fd00::a".parse().expect("ip"),
        ];
        assert_eq!(c.detect.effective_dns_servers(), want);
        // `[]` is "no DNS servers", not "use the default".
        let c = parse("detect:\n  dns_servers: []\n").expect("valid");
        assert_eq!(c.detect.dns_servers, Some(Vec::new()));
        assert!(c.detect.effective_dns_servers().is_empty());
        assert_eq!(parse("").expect("valid").detect.dns_servers, None);
    }

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# Generated by NetworkManager\n\
                    search cluster.local svc.cluster.local\n\
                    nameserver 10.96.0.10\n\
                    \tnameserver   fd00::a  # trailing comment\n\
                    ;nameserver 10.0.0.1\n\
                    #nameserver 10.0.0.2\n\
                    nameserver fe80::1%eth0\n\
                    nameserver kube-dns.kube-system\n\
                    nameserver\n\
                    nameservers 10.0.0.3\n\
                    nameserver 10.96.0.10\n\
                    options ndots:5\n\
                    nameserver 169.254.20.10;comment\r\n";
        let want: Vec<IpAddr> = ["10.96.0.10", "fd00::a", "fe80::1", "169.254.20.10"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        assert_eq!(parse_resolv_conf(text), want);
        assert!(parse_resolv_conf("").is_empty());
        assert!(parse_resolv_conf("\u{0}\u{ff}garbage\nnameserver 999.1.1.1\n").is_empty());
    }

    #[test]
    fn resolv_conf_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("resolv.conf");
        assert!(read_resolv_conf(&path).is_empty(), "missing file");
        std::fs::write(&path, "nameserver 10.96.0.10\n").expect("write");
        assert_eq!(
            read_resolv_conf(&path),
            vec!["10.96.0.10".parse::<IpAddr>().expect("ip")]
        );
        // A directory cannot be read as a file.
        assert!(read_resolv_conf(dir.path()).is_empty(), "unreadable");
    }

    #[test]
    fn deep_nesting_is_refused_early() {
        let deep = format!("watch: {}1{}\n", "[".repeat(70), "]".repeat(70));
        let err = parse(&deep).expect_err("too deep").to_string();
        assert_eq!(
            err,
            "config /etc/am.yaml: nested deeper than 64 levels at line 1 column 71"
        );
    }

    #[test]
    fn load_reads_only_bounded_regular_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big.yaml");
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(MAX_CONFIG_BYTES + 1).expect("grow");
        let err = Config::load(&big).expect_err("too big").to_string();
        assert_eq!(
            err,
            format!(
                "config {}: larger than 1 MiB: {} bytes",
                big.display(),
                MAX_CONFIG_BYTES + 1
            )
        );
        let err = Config::load(dir.path())
            .expect_err("a directory")
            .to_string();
        assert!(err.ends_with(": not a regular file (a directory)"), "{err}");
        let ok = dir.path().join("ok.yaml");
        std::fs::write(&ok, "poll_interval_ms: 20\n").expect("write");
        assert_eq!(Config::load(&ok).expect("valid").poll_interval_ms, 20);
    }

    #[test]
    fn overlong_prefix_is_rejected() {
        let long = format!("/{}", "a".repeat(PATH_CAP));
        let err = parse(&format!("watch:\n  prefixes: [{long}]\n")).expect_err("too long");
        assert!(err.to_string().contains("at most 255 bytes"), "{err}");
    }
}
