//! Who did it: the kubelet root, the cgroup2 mount, pod labels, the pod source.

use std::path::PathBuf;

use serde::Deserialize;

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
