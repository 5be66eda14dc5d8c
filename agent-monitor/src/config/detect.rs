//! Detection's inputs: policy files, destination classes, the exfiltration window.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

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
