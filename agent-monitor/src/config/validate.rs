//! What types alone cannot check, section by section; every error names the file, the
//! field and what was expected.

use std::{net::IpAddr, path::Path};

use agent_monitor_common::{BASENAME_CAP, PATH_CAP};

use super::{
    listen_addr, Config, ConfigError, PodSourceKind, MAX_KERNEL_MAP_ENTRIES, MAX_RING_BYTES,
    MIN_RING_BYTES,
};

impl Config {
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
