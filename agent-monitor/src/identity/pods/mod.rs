//! Pod metadata: what the node's pods are, keyed by pod UID, behind one [`PodStore`] that
//! a pod source keeps up to date:
//! - [`kube`]: a watcher on the pods of this node (`spec.nodeName=$NODE_NAME`);
//! - [`file`]: the JSON `kubectl get pods -o json` prints, reloaded when it changes;
//! - none: host-process identity only.
//!
//! Both sources deserialize the same Kubernetes `Pod` objects and convert them with
//! [`PodMeta::from_pod`], so a pods file and the API server give identical identities.

pub mod file;
pub mod kube;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

/// What kind of volume a mount comes from, as far as credentials are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeKind {
    /// A Secret volume.
    Secret,
    /// A projected volume (the ServiceAccount token volume `kube-api-access-*`, or a
    /// workload-identity token such as EKS's `aws-iam-token`).
    Projected,
    /// Anything else (configMap, emptyDir, hostPath, ...).
    Other,
}

/// A volume mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountMeta {
    pub volume: String,
    pub kind: VolumeKind,
    /// Where the container sees it.
    pub mount_path: String,
}

/// One container of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerMeta {
    pub name: String,
    pub image: String,
    /// The runtime's container id without its `containerd://` (or other) scheme, once the
    /// kubelet has reported it.
    pub container_id: Option<String>,
    pub mounts: Vec<MountMeta>,
}

/// What the monitor needs to know of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName` (`default` when unset, as the API server defaults it).
    pub service_account: String,
    pub node_name: Option<String>,
    /// Regular, init and ephemeral containers.
    pub containers: Vec<ContainerMeta>,
    pub pod_ips: Vec<IpAddr>,
}

/// Strips the runtime scheme (`containerd://`, `cri-o://`, `docker://`) of a container id.
pub fn strip_runtime_scheme(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, rest)| rest)
}

impl PodMeta {
    /// Converts a Kubernetes Pod. `None` when it has no UID (it is not a real pod object).
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let md = &pod.metadata;
        let uid = md.uid.clone()?;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let volume_kind: HashMap<&str, VolumeKind> = spec
            .and_then(|s| s.volumes.as_ref())
            .map(|vs| {
                vs.iter()
                    .map(|v| {
                        let kind = if v.secret.is_some() {
                            VolumeKind::Secret
                        } else if v.projected.is_some() {
                            VolumeKind::Projected
                        } else {
                            VolumeKind::Other
                        };
                        (v.name.as_str(), kind)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut ids: HashMap<&str, &str> = HashMap::new();
        if let Some(st) = status {
            for list in [
                st.container_statuses.as_ref(),
                st.init_container_statuses.as_ref(),
                st.ephemeral_container_statuses.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                for cs in list {
                    if let Some(id) = cs.container_id.as_deref() {
                        ids.insert(cs.name.as_str(), strip_runtime_scheme(id));
                    }
                }
            }
        }
        let mounts = |vm: Option<&Vec<k8s_openapi::api::core::v1::VolumeMount>>| -> Vec<MountMeta> {
            vm.map(|vm| {
                vm.iter()
                    .map(|m| MountMeta {
                        volume: m.name.clone(),
                        kind: volume_kind
                            .get(m.name.as_str())
                            .copied()
                            .unwrap_or(VolumeKind::Other),
                        mount_path: m.mount_path.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
        };
        let mut containers = Vec::new();
        if let Some(spec) = spec {
            for c in spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
            {
                containers.push(ContainerMeta {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    container_id: ids.get(c.name.as_str()).map(|s| (*s).to_owned()),
                    mounts: mounts(c.volume_mounts.as_ref()),
                });
            }
            for c in spec.ephemeral_containers.iter().flatten() {
                containers.push(ContainerMeta {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    container_id: ids.get(c.name.as_str()).map(|s| (*s).to_owned()),
                    mounts: mounts(c.volume_mounts.as_ref()),
                });
            }
        }
        let pod_ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
            .unwrap_or_default();
        Some(Self {
            uid,
            namespace: md.namespace.clone().unwrap_or_else(|| "default".to_owned()),
            name: md.name.clone().unwrap_or_default(),
            labels: md.labels.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned()),
            node_name: spec.and_then(|s| s.node_name.clone()),
            containers,
            pod_ips,
        })
    }

    /// The container with this runtime id.
    pub fn container_by_id(&self, id: &str) -> Option<&ContainerMeta> {
        self.containers
            .iter()
            .find(|c| c.container_id.as_deref() == Some(id))
    }
}

/// The pods known now, by UID. One writer (the pod source), many readers. Readers can
/// wait for a change with [`PodStore::changed`].
#[derive(Debug)]
pub struct PodStore {
    pods: RwLock<HashMap<String, Arc<PodMeta>>>,
    version: watch::Sender<u64>,
}

impl Default for PodStore {
    fn default() -> Self {
        Self {
            pods: RwLock::new(HashMap::new()),
            version: watch::channel(0).0,
        }
    }
}

impl PodStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// The pod with this UID.
    pub fn get(&self, uid: &str) -> Option<Arc<PodMeta>> {
        self.pods.read().ok()?.get(uid).cloned()
    }

    /// Every pod.
    pub fn all(&self) -> Vec<Arc<PodMeta>> {
        self.pods
            .read()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.pods.read().map(|p| p.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces everything (a full list or a reloaded file).
    pub fn replace_all(&self, pods: impl IntoIterator<Item = PodMeta>) {
        let map = pods
            .into_iter()
            .map(|p| (p.uid.clone(), Arc::new(p)))
            .collect();
        if let Ok(mut guard) = self.pods.write() {
            *guard = map;
        }
        self.bump();
    }

    /// Adds or updates one pod.
    pub fn upsert(&self, pod: PodMeta) {
        if let Ok(mut guard) = self.pods.write() {
            guard.insert(pod.uid.clone(), Arc::new(pod));
        }
        self.bump();
    }

    /// Removes one pod.
    pub fn remove(&self, uid: &str) {
        if let Ok(mut guard) = self.pods.write() {
            guard.remove(uid);
        }
        self.bump();
    }

    /// A receiver that sees a new value after every change.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = r#"{
      "apiVersion": "v1", "kind": "Pod",
      "metadata": {"name": "worker-1", "namespace": "agents", "uid": "1f7c9a2e-0000-4000-8000-000000000001",
                   "labels": {"agent-monitor.dev/agent": "researcher", "agent-monitor.dev/tier": "worker"}},
      "spec": {"serviceAccountName": "agent-worker-1", "nodeName": "node-a",
               "containers": [{"name": "agent", "image": "ghcr.io/acme/agent:1",
                               "volumeMounts": [{"name": "kube-api-access-x1", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
                                                {"name": "openai", "mountPath": "/etc/openai"}]}],
               "volumes": [{"name": "kube-api-access-x1", "projected": {"sources": []}},
                           {"name": "openai", "secret": {"secretName": "openai-key"}}]},
      "status": {"podIPs": [{"ip": "10.244.1.7"}],
                 "containerStatuses": [{"name": "agent", "containerID": "containerd://abc123", "image": "x", "imageID": "y",
                                        "ready": true, "restartCount": 0}]}
    }"#;

    #[test]
    fn converts_a_pod() {
        let pod: Pod = serde_json::from_str(POD).expect("pod json");
        let m = PodMeta::from_pod(&pod).expect("has uid");
        assert_eq!(m.namespace, "agents");
        assert_eq!(m.service_account, "agent-worker-1");
        assert_eq!(m.labels["agent-monitor.dev/agent"], "researcher");
        let c = m.container_by_id("abc123").expect("container by id");
        assert_eq!(c.name, "agent");
        assert_eq!(c.mounts[0].kind, VolumeKind::Projected);
        assert_eq!(c.mounts[1].kind, VolumeKind::Secret);
        assert_eq!(c.mounts[1].mount_path, "/etc/openai");
        assert_eq!(m.pod_ips, vec!["10.244.1.7".parse::<IpAddr>().expect("ip")]);
    }

    #[test]
    fn store_notifies_on_change() {
        let store = PodStore::new();
        let mut rx = store.changed();
        let pod: Pod = serde_json::from_str(POD).expect("pod json");
        store.upsert(PodMeta::from_pod(&pod).expect("uid"));
        assert!(rx.has_changed().expect("sender alive"));
        rx.mark_unchanged();
        assert_eq!(store.len(), 1);
        store.remove("1f7c9a2e-0000-4000-8000-000000000001");
        assert!(store.is_empty());
        assert!(rx.has_changed().expect("sender alive"));
    }
}
