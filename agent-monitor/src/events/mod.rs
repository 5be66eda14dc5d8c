//! The event model: what the daemon reports, one record per kernel event or per loss.
//!
//! [`decode`] turns ring-buffer bytes into [`RawEvent`]s; the monitor enriches them with
//! the process table into [`Record`]s, which every output prints as one JSON object.

pub mod decode;
pub mod errno;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

pub use decode::{decode, DecodeError, RawEvent};

// The identity an event is attributed: filled in by `identity`, which is downstream of
// this model and imports it (never the other way).

/// The workload an event came from. For a host process `host` is true and the rest empty.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Workload {
    /// Not in any pod's cgroup.
    pub host: bool,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    pub container: Option<String>,
    pub container_id: Option<String>,
    pub service_account: Option<String>,
    pub agent: Option<String>,
    pub tier: Option<String>,
    /// The pod's labels (policy selectors match them).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// cgroup path relative to the cgroup2 mount; `None` when the cgroup id could not be
    /// resolved.
    pub cgroup: Option<String>,
    /// The pod's metadata was over a limit and a name, the namespace, the ServiceAccount
    /// or the container name may be cut (ending in `…`); see `identity::pods::PodMeta::bounded`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Labels of the pod left out of `labels` or with their value cut.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub labels_truncated: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What kind of credential a path holds.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CredentialClass {
    /// A ServiceAccount token (the `kube-api-access-*` projected volume's `token`).
    ServiceAccountToken,
    /// Another projected token: an audience token such as EKS's or Azure's workload identity.
    ProjectedToken,
    /// A file of a Secret volume (or a CSI secrets-store volume).
    SecretVolume,
    /// A node or admin kubeconfig (kubelet's, `/etc/kubernetes/*.conf`, k3s, root's).
    NodeKubeconfig,
    /// Node PKI: `/etc/kubernetes/pki`, the kubelet's client certificates and keys.
    NodePki,
    /// A cloud provider credential file (AWS, GCP, Azure).
    CloudCredentials,
    /// `/proc/<pid>/environ` of a process.
    ProcEnviron,
    /// A file in a credential directory that holds nothing secret (`ca.crt`, `namespace`).
    NonSecret,
    /// A watched path that fits none of the above.
    Other,
}

impl CredentialClass {
    /// Every class, in declaration order.
    pub const ALL: [CredentialClass; 9] = [
        Self::ServiceAccountToken,
        Self::ProjectedToken,
        Self::SecretVolume,
        Self::NodeKubeconfig,
        Self::NodePki,
        Self::CloudCredentials,
        Self::ProcEnviron,
        Self::NonSecret,
        Self::Other,
    ];

    /// The name JSON and alerts use (the serde name), without building a JSON value.
    pub fn name(self) -> &'static str {
        match self {
            Self::ServiceAccountToken => "service_account_token",
            Self::ProjectedToken => "projected_token",
            Self::SecretVolume => "secret_volume",
            Self::NodeKubeconfig => "node_kubeconfig",
            Self::NodePki => "node_pki",
            Self::CloudCredentials => "cloud_credentials",
            Self::ProcEnviron => "proc_environ",
            Self::NonSecret => "non_secret",
            Self::Other => "other",
        }
    }
}

/// Whose credential it is.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Owner {
    pub pod_uid: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// For `/proc/<pid>/environ`: the process.
    pub pid: Option<u32>,
}

/// Who did it and when; common to every kernel event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Wall-clock time of the syscall, RFC 3339 with nanoseconds.
    pub time: String,
    /// CLOCK_BOOTTIME nanoseconds, as the kernel stamped it.
    pub ts_boot_ns: u64,
    /// Thread id.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    /// Parent process id, when known.
    pub ppid: Option<u32>,
    pub uid: u32,
    pub gid: u32,
    /// The thread's command name (up to 15 bytes, set by the process itself).
    pub comm: String,
    /// Resolved path of the executable, when known.
    pub exe: Option<String>,
    /// Inode number of the task's cgroup2 directory.
    pub cgroup_id: u64,
    /// When the process (its thread-group leader) started, CLOCK_BOOTTIME nanoseconds:
    /// with `tgid` and the boot id, the process key that pid reuse cannot confuse. 0 when
    /// the kernel does not expose it.
    #[serde(default)]
    pub start_ns: u64,
    /// The pod, container, ServiceAccount and agent of the task: one value shared by the
    /// records of a workload (built once per cgroup and pod metadata, see
    /// `identity::Identity::attribute`), not a copy per record.
    #[serde(with = "shared_workload")]
    pub workload: std::sync::Arc<Workload>,
}

/// A shared workload serialized as the workload itself (serde's `rc` feature would do the
/// same for every `Arc` in the build).
mod shared_workload {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Workload;

    pub fn serialize<S: Serializer>(w: &Arc<Workload>, s: S) -> Result<S::Ok, S::Error> {
        w.as_ref().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Workload>, D::Error> {
        Workload::deserialize(d).map(Arc::new)
    }
}

/// An open of a watched file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRecord {
    pub seq: u64,
    #[serde(flatten)]
    pub task: Task,
    /// `open`, `openat`, `openat2`, `creat`, `open_by_handle_at`, `io_uring_openat(2)`.
    pub syscall: Cow<'static, str>,
    /// The file's path on the node: the kernel's host path when the open succeeded, else
    /// the path as passed (a relative one resolved against the cwd or dirfd).
    pub path: String,
    /// The path exactly as the process passed it.
    pub raw_path: String,
    /// False when a relative path could not be resolved (the process was already gone);
    /// `path` is then the raw path.
    pub path_resolved: bool,
    /// The path was longer than the capture limit and is cut.
    pub path_truncated: bool,
    /// Why it matched: `volume`, `inode`, `prefix`, `basename` or
    /// `proc_environ`.
    pub matched_by: Cow<'static, str>,
    pub dirfd: i32,
    pub flags: u32,
    pub mode: u32,
    /// File descriptor, or `-errno`.
    pub result: i64,
    /// Name of the errno when the open failed.
    pub error: Option<String>,
    /// What kind of credential the file holds.
    pub class: CredentialClass,
    /// Whose credential it is (a pod, or a process for environ).
    pub owner: Option<Owner>,
    /// The host path of the opened file, from the kernel's dentry chain and the node's
    /// mount of its filesystem.
    #[serde(default)]
    pub host_path: Option<String>,
    /// `major:minor` of the opened file's filesystem.
    #[serde(default)]
    pub device: Option<String>,
    /// Inode number of the opened file.
    #[serde(default)]
    pub inode: Option<u64>,
}

/// An outbound connect, or a datagram sent to an explicit address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectRecord {
    pub seq: u64,
    #[serde(flatten)]
    pub task: Task,
    /// `connect`, `sendto` or `sendmsg`.
    pub syscall: Cow<'static, str>,
    /// `inet` or `inet6`.
    pub family: Cow<'static, str>,
    pub dst_addr: String,
    pub dst_port: u16,
    pub fd: i32,
    /// 0, bytes sent, or `-errno`.
    pub result: i64,
    pub error: Option<String>,
    /// The connection was attempted: success, `EINPROGRESS` on a non-blocking socket, or a
    /// failure after packets left (refused, reset, timed out, host unreachable).
    pub attempted: bool,
}

/// A successful execve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRecord {
    pub seq: u64,
    #[serde(flatten)]
    pub task: Task,
    /// The path passed to execve.
    pub filename: String,
    /// The thread id that called execve (differs from `pid` when a non-leader thread did).
    pub old_pid: u32,
}

/// A new task (process or thread).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkRecord {
    pub seq: u64,
    #[serde(flatten)]
    pub task: Task,
    pub child_pid: u32,
}

/// A process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub seq: u64,
    #[serde(flatten)]
    pub task: Task,
}

/// Why records were lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostReason {
    /// The lane's ring was full: nobody's fault in particular.
    #[default]
    RingFull,
    /// One workload went over its budget for the lane (`lanes.<lane>.budget`); the
    /// record names it.
    Budget,
}

impl LostReason {
    /// The name used in JSON and alerts.
    pub fn name(self) -> &'static str {
        match self {
            Self::RingFull => "ring_full",
            Self::Budget => "budget",
        }
    }
}

/// Records the kernel could not deliver: a lane's ring was full, or a workload went over
/// its budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRecord {
    pub seq: u64,
    pub time: String,
    /// `credential`, `network` or `process`.
    pub lane: String,
    /// Lost since the previous lost record of this lane.
    pub count: u64,
    /// Lost in this lane since the probes were loaded (for a budget: by this workload).
    pub total: u64,
    #[serde(default)]
    pub reason: LostReason,
    /// For [`LostReason::Budget`]: the workload whose records were dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
}

/// One line of output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Open(OpenRecord),
    Connect(ConnectRecord),
    Exec(ExecRecord),
    Fork(ForkRecord),
    Exit(ExitRecord),
    Lost(LostRecord),
}

impl Record {
    /// The task, for every record but `lost`.
    pub fn task_mut(&mut self) -> Option<&mut Task> {
        match self {
            Record::Open(r) => Some(&mut r.task),
            Record::Connect(r) => Some(&mut r.task),
            Record::Exec(r) => Some(&mut r.task),
            Record::Fork(r) => Some(&mut r.task),
            Record::Exit(r) => Some(&mut r.task),
            Record::Lost(_) => None,
        }
    }

    /// Sets the sequence number.
    pub fn set_seq(&mut self, seq: u64) {
        match self {
            Record::Open(r) => r.seq = seq,
            Record::Connect(r) => r.seq = seq,
            Record::Exec(r) => r.seq = seq,
            Record::Fork(r) => r.seq = seq,
            Record::Exit(r) => r.seq = seq,
            Record::Lost(r) => r.seq = seq,
        }
    }

    /// The task, for every record but `lost`.
    pub fn task(&self) -> Option<&Task> {
        match self {
            Record::Open(r) => Some(&r.task),
            Record::Connect(r) => Some(&r.task),
            Record::Exec(r) => Some(&r.task),
            Record::Fork(r) => Some(&r.task),
            Record::Exit(r) => Some(&r.task),
            Record::Lost(_) => None,
        }
    }

    /// The sequence number, unique and increasing within one daemon run.
    pub fn seq(&self) -> u64 {
        match self {
            Record::Open(r) => r.seq,
            Record::Connect(r) => r.seq,
            Record::Exec(r) => r.seq,
            Record::Fork(r) => r.seq,
            Record::Exit(r) => r.seq,
            Record::Lost(r) => r.seq,
        }
    }
}

/// Lane names, indexed by `agent_monitor_common::Lane`.
pub const LANE_NAMES: [&str; 3] = ["credential", "network", "process"];

/// The time of `clock` in nanoseconds (CLOCK_BOOTTIME is the clock of the kernel's
/// record stamps, `ts_boot_ns`).
pub(crate) fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; both clocks exist on every Linux we support.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_are_the_serde_names() {
        for class in CredentialClass::ALL {
            let json = serde_json::to_value(class).expect("serialize");
            assert_eq!(json.as_str(), Some(class.name()), "{class:?}");
        }
    }

    #[test]
    fn records_round_trip_as_tagged_json() {
        let rec = Record::Lost(LostRecord {
            seq: 7,
            time: "2026-11-23T00:00:00.000000001Z".into(),
            lane: "credential".into(),
            count: 3,
            total: 5,
            reason: crate::events::LostReason::RingFull,
            workload: None,
        });
        let json = serde_json::to_string(&rec).expect("serialize");
        assert!(json.starts_with(r#"{"type":"lost","seq":7"#), "{json}");
        let back: Record = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, rec);
    }
}
