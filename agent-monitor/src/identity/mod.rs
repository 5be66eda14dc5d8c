//! Who did it: the process table, and cgroup → pod → container → ServiceAccount → agent;
//! and whose credential it was.

pub mod cgroup;
pub mod credentials;
pub mod pods;
pub mod process;
pub mod watched;

use std::sync::Arc;

use self::{
    cgroup::{CgroupInfo, CgroupResolver},
    credentials::{classify, Classified, CredentialClass, Owner},
    pods::{ContainerMeta, PodMeta, PodStore},
};

pub use crate::events::Workload;

/// The pod label naming the agent, unless configured otherwise.
pub const DEFAULT_AGENT_LABEL: &str = "agent-monitor.dev/agent";
/// The pod label naming the agent's tier, unless configured otherwise.
pub const DEFAULT_TIER_LABEL: &str = "agent-monitor.dev/tier";
/// The kubelet's root directory, unless configured otherwise.
pub const DEFAULT_KUBELET_ROOT: &str = "/var/lib/kubelet";

/// What attribution needs of the config's `identity` section, converted by the wiring
/// (`app::settings::identity`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySettings {
    /// The kubelet's root directory; owners of pod volumes are read under it.
    pub kubelet_root: String,
    /// Pod label naming the agent.
    pub agent_label: String,
    /// Pod label naming the agent's tier (`proxy`, `worker`).
    pub tier_label: String,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            kubelet_root: DEFAULT_KUBELET_ROOT.to_owned(),
            agent_label: DEFAULT_AGENT_LABEL.to_owned(),
            tier_label: DEFAULT_TIER_LABEL.to_owned(),
        }
    }
}

/// The outcome of attributing one cgroup.
pub struct Attribution {
    /// Shared by every record of the cgroup while its pod's metadata stays the same.
    pub workload: Arc<Workload>,
    pub pod: Option<Arc<PodMeta>>,
    /// Whether more may be learned by waiting: the cgroup is unknown, or it names a pod
    /// whose metadata has not arrived.
    pub incomplete: bool,
}

impl Attribution {
    /// The reader's pod and container, for credential classification.
    pub fn reader(&self) -> Option<(&PodMeta, Option<&ContainerMeta>)> {
        let pod = self.pod.as_deref()?;
        let container = self
            .workload
            .container_id
            .as_deref()
            .and_then(|id| pod.container_by_id(id));
        Some((pod, container))
    }
}

/// Most cgroups whose workload is kept built (see [`Identity::attribute`]); past it the
/// cache starts over. A node runs a few hundred containers at most.
pub const WORKLOAD_CACHE: usize = 4096;

/// A workload as built for a cgroup, with what it was built from.
struct BuiltWorkload {
    info: Arc<CgroupInfo>,
    pod: Option<Arc<PodMeta>>,
    workload: Arc<Workload>,
}

/// Resolves cgroups to workloads and paths to credential owners.
pub struct Identity {
    cgroups: CgroupResolver,
    /// The workload last built per cgroup id: every record of a cgroup shares it instead
    /// of copying a dozen strings and the pod's labels.
    built: foldhash::HashMap<u64, BuiltWorkload>,
    pods: Arc<PodStore>,
    config: IdentitySettings,
    /// Whether pod metadata can arrive at all (a pod source is configured).
    has_pod_source: bool,
}

impl Identity {
    /// Identity over the cgroup2 hierarchy at `cgroup_root` (see [`cgroup::cgroup2_root`]).
    pub fn new(
        config: IdentitySettings,
        cgroup_root: Option<std::path::PathBuf>,
        pods: Arc<PodStore>,
        has_pod_source: bool,
    ) -> Self {
        Self {
            cgroups: CgroupResolver::with_root(cgroup_root),
            built: foldhash::HashMap::default(),
            pods,
            config,
            has_pod_source,
        }
    }

    /// Cached cgroups (for status).
    pub fn cgroup_cache_len(&self) -> usize {
        self.cgroups.len()
    }

    /// The pod store this identity reads.
    pub fn pods(&self) -> &Arc<PodStore> {
        &self.pods
    }

    fn workload_of(&self, info: &CgroupInfo, pod: Option<&Arc<PodMeta>>) -> Workload {
        let Some(uid) = info.pod_uid.clone() else {
            return Workload {
                host: true,
                cgroup: Some(info.path.clone()),
                ..Workload::default()
            };
        };
        let mut w = Workload {
            host: false,
            pod_uid: Some(uid),
            container_id: info.container_id.clone(),
            cgroup: Some(info.path.clone()),
            ..Workload::default()
        };
        if let Some(p) = pod {
            w.namespace = Some(p.namespace.clone());
            w.pod = Some(p.name.clone());
            w.service_account = Some(p.service_account.clone());
            w.agent = p.labels.get(&self.config.agent_label).cloned();
            w.tier = p.labels.get(&self.config.tier_label).cloned();
            w.labels = p.labels.clone();
            w.truncated = p.truncated;
            w.labels_truncated = p.labels_truncated;
            w.container = info
                .container_id
                .as_deref()
                .and_then(|id| p.container_by_id(id))
                .map(|c| c.name.clone());
        }
        w
    }

    /// Who a task of cgroup `cgroup_id` is.
    pub fn attribute(&mut self, cgroup_id: u64) -> Attribution {
        let Some(info) = self.cgroups.resolve(cgroup_id) else {
            return Attribution {
                workload: Arc::default(),
                pod: None,
                incomplete: true,
            };
        };
        let pod = info.pod_uid.as_deref().and_then(|uid| self.pods.get(uid));
        // Built again only when what it is built from changed: the cgroup was resolved
        // anew, or the pod's metadata arrived or was replaced (the store swaps the Arc).
        let workload = match self.built.get(&cgroup_id) {
            Some(b)
                if Arc::ptr_eq(&b.info, &info)
                    && match (&b.pod, &pod) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    } =>
            {
                b.workload.clone()
            }
            _ => {
                let workload = Arc::new(self.workload_of(&info, pod.as_ref()));
                if self.built.len() >= WORKLOAD_CACHE {
                    self.built.clear();
                }
                self.built.insert(
                    cgroup_id,
                    BuiltWorkload {
                        info: info.clone(),
                        pod: pod.clone(),
                        workload: workload.clone(),
                    },
                );
                workload
            }
        };
        let incomplete = workload.pod_uid.is_some() && pod.is_none() && self.has_pod_source;
        Attribution {
            workload,
            pod,
            incomplete,
        }
    }

    /// The cgroup of a live process, from /proc/<pid>/cgroup (cgroup2 line `0::<path>`).
    fn cgroup_of_pid(pid: u32) -> Option<CgroupInfo> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(cgroup::parse_path(path))
    }

    /// Class and owner of a credential path opened by `reader`.
    pub fn credential(&self, path: &str, reader: &Attribution) -> (CredentialClass, Option<Owner>) {
        let container = reader.reader().and_then(|(_, c)| c);
        let Classified {
            class,
            owner_pod_uid,
            environ_pid,
            ..
        } = classify(
            path,
            &self.config.kubelet_root,
            reader.workload.pod_uid.as_deref(),
            container,
        );
        let owner_uid = match environ_pid {
            Some(pid) => Self::cgroup_of_pid(pid).and_then(|c| c.pod_uid),
            None => owner_pod_uid,
        };
        if owner_uid.is_none() && environ_pid.is_none() {
            return (class, None);
        }
        let pod = owner_uid.as_deref().and_then(|u| self.pods.get(u));
        let owner = Owner {
            namespace: pod.as_ref().map(|p| p.namespace.clone()),
            name: pod.as_ref().map(|p| p.name.clone()),
            pod_uid: owner_uid,
            pid: environ_pid,
        };
        (class, Some(owner))
    }

    /// The kubelet root directory, as configured.
    pub fn kubelet_root(&self) -> &str {
        &self.config.kubelet_root
    }
}
