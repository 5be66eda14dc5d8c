//! The one place where the config file's sections become what each component runs with:
//! `config` is the file's schema only, and no component reads it.

use crate::{
    config::{
        AdminConfig, BudgetConfig, Config, GrpcConfig, IdentityConfig, JournalConfig, PodSourceKind,
    },
    detect::{destinations, DetectSettings},
    identity::IdentitySettings,
    monitor::MonitorSettings,
    outputs::listen::ConnLimits,
    probes::{Budget, ProbeSettings, DEFAULT_BUDGETS},
};
use agent_monitor_common::Lane;

/// What the probes are loaded with.
pub fn probes(c: &Config) -> ProbeSettings {
    ProbeSettings {
        ring_bytes: [
            c.lanes.credential.ring_bytes,
            c.lanes.network.ring_bytes,
            c.lanes.process.ring_bytes,
        ],
        budgets: [
            budget(&c.lanes.credential.budget, Lane::Credential),
            budget(&c.lanes.network.budget, Lane::Network),
            budget(&c.lanes.process.budget, Lane::Process),
        ],
        cgroups: c.cgroups.clone(),
        proc_environ: c.watch.proc_environ,
        kernel_log: c.kernel_log,
        exfil_window_ms: c.detect.exfil_window_ms,
        watched_filesystems: c.kernel_maps.watched_filesystems,
        inventory_files: c.kernel_maps.inventory_files,
        prefixes: c.effective_prefixes(),
        basenames: c.watch.basenames.clone(),
    }
}

/// A lane's budget, the fields the file leaves out taken from the lane's default.
fn budget(c: &BudgetConfig, lane: Lane) -> Budget {
    let default = DEFAULT_BUDGETS[lane as usize];
    Budget {
        per_second: c.per_second.unwrap_or(default.per_second),
        burst: c.burst.unwrap_or(default.burst),
        pressure_percent: c.pressure_percent.unwrap_or(default.pressure_percent),
    }
}

/// What attribution needs of the identity section.
pub fn identity(c: &IdentityConfig) -> IdentitySettings {
    IdentitySettings {
        kubelet_root: c.kubelet_root.clone(),
        agent_label: c.agent_label.clone(),
        tier_label: c.tier_label.clone(),
    }
}

/// What the lane consumer runs with.
pub fn monitor(c: &Config) -> MonitorSettings {
    MonitorSettings {
        probes: probes(c),
        identity: identity(&c.identity),
        cgroup_root: c.identity.cgroup_root.clone(),
        has_pod_source: c.identity.pods.source != PodSourceKind::None,
        pending_wait: std::time::Duration::from_millis(c.identity.pending.max_wait_ms),
        pending_max: c.identity.pending.max_events,
        watch_prefixes: c.watch.prefixes.clone(),
        poll_interval: std::time::Duration::from_millis(c.poll_interval_ms),
    }
}

/// What detection runs with, from validated settings (entries that do not parse were
/// rejected by validation). Without `detect.dns_servers` this reads the DNS servers from
/// /etc/resolv.conf.
pub fn detect(c: &Config) -> DetectSettings {
    let s = &c.detect;
    DetectSettings {
        destinations: destinations::Destinations {
            api_servers: s
                .api_servers
                .iter()
                .filter_map(|a| destinations::Endpoint::parse(a))
                .collect(),
            dns_servers: s.effective_dns_servers(),
            cluster: s
                .cluster_cidrs
                .iter()
                .filter_map(|c| crate::policy::matching::parse_cidr(c).ok())
                .collect(),
        },
        exfil_window: std::time::Duration::from_millis(s.exfil_window_ms),
        rate_limit_per_minute: c.alerts.rate_limit_per_minute,
        suspicious_readers: s.suspicious_readers.clone(),
        node_agents: s.node_agents.clone(),
    }
}

/// The journal's own options.
pub fn journal(c: &JournalConfig) -> crate::journal::Options {
    crate::journal::Options {
        segment_bytes: c.segment_bytes,
        max_bytes: c.max_bytes,
        max_age: c.max_age(),
    }
}

/// The connection limits of each gRPC listener.
pub fn grpc_limits(c: &GrpcConfig) -> ConnLimits {
    ConnLimits {
        max_connections: c.max_connections,
        handshake_timeout: std::time::Duration::from_millis(c.handshake_timeout_ms),
        idle_timeout: std::time::Duration::from_millis(c.idle_timeout_ms),
    }
}

/// The connection limits of the admin listener.
pub fn admin_limits(c: &AdminConfig) -> ConnLimits {
    ConnLimits {
        max_connections: c.max_connections,
        handshake_timeout: std::time::Duration::from_millis(c.handshake_timeout_ms),
        idle_timeout: std::time::Duration::from_millis(c.idle_timeout_ms),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/am.yaml")).expect("valid config")
    }

    #[test]
    fn journal_options_follow_the_section_and_default_to_the_journal_defaults() {
        assert_eq!(
            journal(&parse("").journal),
            crate::journal::Options::default()
        );
        let o = journal(&parse("journal: {max_age: none, segment_bytes: 8192}\n").journal);
        assert_eq!(o.max_age, None);
        assert_eq!(o.segment_bytes, 8192);
    }

    #[test]
    fn default_listener_limits_are_the_listeners_own_defaults() {
        let c = parse("");
        assert_eq!(grpc_limits(&c.grpc), ConnLimits::GRPC);
        assert_eq!(admin_limits(&c.admin), ConnLimits::ADMIN);
    }

    #[test]
    fn probes_watch_the_kubelet_paths_under_its_configured_root() {
        let p = probes(&parse("identity: {kubelet_root: /data/kubelet}\n"));
        for extra in [
            "/data/kubelet/pods/",
            "/data/kubelet/pki/",
            "/data/kubelet/kubeconfig",
        ] {
            assert!(p.prefixes.iter().any(|x| x == extra), "{extra} missing");
        }
        assert_eq!(p.ring_bytes, [1 << 20; 3]);
        assert_eq!(p.budgets, DEFAULT_BUDGETS);
    }

    #[test]
    fn budget_fields_left_out_take_the_lanes_defaults() {
        let p = probes(&parse(
            "lanes:\n  credential:\n    ring_bytes: 4096\n    budget: {per_second: 7}\n  network:\n    ring_bytes: 4096\n    budget: {per_second: 0}\n",
        ));
        let [cred, net, proc] = p.budgets;
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
}
