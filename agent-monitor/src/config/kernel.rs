//! The kernel side: what counts as a credential open, the lanes' ring buffers, the
//! file-identity maps' capacities.

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
pub(super) const MAX_KERNEL_MAP_ENTRIES: u32 = 1 << 20;

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
