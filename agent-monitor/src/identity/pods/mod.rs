//! Pod metadata: what the node's pods are, keyed by pod UID, behind one [`PodStore`] that
//! a pod source keeps up to date:
//! - [`kube`]: a watcher on the pods of this node (`spec.nodeName=$NODE_NAME`);
//! - [`file`]: the JSON `kubectl get pods -o json` prints, reloaded when it changes;
//! - none: host-process identity only.
//!
//! Both sources deserialize the same Kubernetes `Pod` objects and convert them with
//! [`PodMeta::from_pod`], so a pods file and the API server give identical identities.
//!
//! Pod metadata is copied into every event of the pod, so it is bounded once, where it
//! enters the [`PodStore`] ([`PodMeta::bounded`]): names, label count and size, image,
//! container ids. A pods file can say anything (a 1 MB name, 2,001 labels once made 4.5 MB
//! event lines that gRPC clients could not receive); what is cut is marked.

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
    /// A name, the namespace, the ServiceAccount, a container's name, image or id, or the
    /// list of containers, mounts or addresses was cut to its limit ([`PodMeta::bounded`]).
    pub truncated: bool,
    /// Labels left out (over the count or byte limit, or a key too long) or with their
    /// value cut.
    pub labels_truncated: u32,
}

/// Longest name kept (pod, namespace, ServiceAccount, container, volume, node): Kubernetes'
/// own limit for object names (a DNS subdomain).
pub const MAX_NAME: usize = 253;
/// Longest label key kept: a 253-byte DNS prefix, `/`, a 63-byte name. A longer key is left
/// out rather than cut, since a cut key would be a different label.
pub const MAX_LABEL_KEY: usize = 317;
/// Longest label value kept (Kubernetes' limit).
pub const MAX_LABEL_VALUE: usize = 63;
/// Most labels kept per pod (the agent and tier labels first).
pub const MAX_LABELS: usize = 64;
/// Most label bytes (keys and values) kept per pod.
pub const MAX_LABEL_BYTES: usize = 8 * 1024;
/// Longest container image reference kept.
pub const MAX_IMAGE: usize = 1024;
/// Longest container id kept (runtimes use 64 hex digits).
pub const MAX_CONTAINER_ID: usize = 128;
/// Longest mount path kept (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Most containers, mounts per container and pod addresses kept.
pub const MAX_CONTAINERS: usize = 256;
pub const MAX_MOUNTS: usize = 256;
pub const MAX_POD_IPS: usize = 16;
/// A pod UID longer than this is not a pod's: it could never match a cgroup, so the pod
/// is not stored at all.
pub const MAX_UID: usize = 128;
/// Marks a cut string.
pub const ELLIPSIS: &str = "\u{2026}";

/// Cuts `s` to at most `max` bytes, ending in [`ELLIPSIS`], on a character boundary.
/// Returns whether it was cut.
pub fn cut(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(ELLIPSIS);
    true
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
            truncated: false,
            labels_truncated: 0,
        })
    }

    /// The same pod within the limits above: strings cut (marked with [`ELLIPSIS`]),
    /// lists shortened, and `truncated` / `labels_truncated` saying so. The labels named in
    /// `keep_labels` (the agent and tier labels) are kept before any other. `None` for a UID
    /// longer than [`MAX_UID`].
    pub fn bounded(mut self, keep_labels: &[String]) -> Option<Self> {
        if self.uid.len() > MAX_UID {
            return None;
        }
        let mut cut_any = false;
        for name in [
            &mut self.namespace,
            &mut self.name,
            &mut self.service_account,
        ] {
            cut_any |= cut(name, MAX_NAME);
        }
        if let Some(node) = self.node_name.as_mut() {
            cut_any |= cut(node, MAX_NAME);
        }
        if self.containers.len() > MAX_CONTAINERS {
            self.containers.truncate(MAX_CONTAINERS);
            cut_any = true;
        }
        for c in &mut self.containers {
            cut_any |= cut(&mut c.name, MAX_NAME);
            cut_any |= cut(&mut c.image, MAX_IMAGE);
            if let Some(id) = c.container_id.as_mut() {
                cut_any |= cut(id, MAX_CONTAINER_ID);
            }
            if c.mounts.len() > MAX_MOUNTS {
                c.mounts.truncate(MAX_MOUNTS);
                cut_any = true;
            }
            for m in &mut c.mounts {
                cut_any |= cut(&mut m.volume, MAX_NAME);
                cut_any |= cut(&mut m.mount_path, MAX_PATH);
            }
        }
        if self.pod_ips.len() > MAX_POD_IPS {
            self.pod_ips.truncate(MAX_POD_IPS);
            cut_any = true;
        }
        self.truncated |= cut_any;

        let mut all = std::mem::take(&mut self.labels);
        let first: Vec<(String, String)> = keep_labels
            .iter()
            .filter_map(|k| all.remove_entry(k))
            .collect();
        let mut kept = BTreeMap::new();
        let (mut bytes, mut affected) = (0usize, 0u32);
        for (k, mut v) in first.into_iter().chain(all) {
            if k.len() > MAX_LABEL_KEY {
                affected = affected.saturating_add(1);
                continue;
            }
            let value_cut = cut(&mut v, MAX_LABEL_VALUE);
            if kept.len() >= MAX_LABELS || bytes + k.len() + v.len() > MAX_LABEL_BYTES {
                affected = affected.saturating_add(1);
                continue;
            }
            if value_cut {
                affected = affected.saturating_add(1);
            }
            bytes += k.len() + v.len();
            kept.insert(k, v);
        }
        self.labels = kept;
        self.labels_truncated = self.labels_truncated.saturating_add(affected);
        Some(self)
    }

    /// The container with this runtime id.
    pub fn container_by_id(&self, id: &str) -> Option<&ContainerMeta> {
        self.containers
            .iter()
            .find(|c| c.container_id.as_deref() == Some(id))
    }
}

/// The pods known now, by UID. One writer (the pod source), many readers. Readers can
/// wait for a change with [`PodStore::changed`]. Every pod is bounded
/// ([`PodMeta::bounded`]) on its way in, whichever source it comes from.
#[derive(Debug)]
pub struct PodStore {
    pods: RwLock<foldhash::HashMap<String, Arc<PodMeta>>>,
    version: watch::Sender<u64>,
    /// Label keys kept before any other when a pod has too many labels.
    keep_labels: Vec<String>,
}

impl Default for PodStore {
    fn default() -> Self {
        Self::with_keep_labels(vec![
            super::DEFAULT_AGENT_LABEL.to_owned(),
            super::DEFAULT_TIER_LABEL.to_owned(),
        ])
    }
}

impl PodStore {
    /// A store that keeps the default agent and tier labels first.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A store that keeps these label keys (the configured agent and tier labels) before
    /// any other when a pod has more labels than are kept.
    pub fn with_keep_labels(keep_labels: Vec<String>) -> Self {
        Self {
            pods: RwLock::new(foldhash::HashMap::default()),
            version: watch::channel(0).0,
            keep_labels,
        }
    }

    /// A pod within the limits, logged (rate-limited) when it was not.
    fn bound(&self, pod: PodMeta) -> Option<PodMeta> {
        let uid_len = pod.uid.len();
        let Some(pod) = pod.bounded(&self.keep_labels) else {
            crate::warn_limited!(
                "pod-uid-too-long",
                "a pod with a {uid_len}-byte UID (more than {MAX_UID}) is ignored: no cgroup can name it"
            );
            return None;
        };
        if pod.truncated || pod.labels_truncated > 0 {
            crate::warn_limited!(
                "pod-metadata-truncated",
                "pod {}/{} ({}): metadata over the limits is cut and marked in its events (truncated: {}, labels_truncated: {})",
                pod.namespace,
                pod.name,
                pod.uid,
                pod.truncated,
                pod.labels_truncated
            );
        }
        Some(pod)
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
            .filter_map(|p| self.bound(p))
            .map(|p| (p.uid.clone(), Arc::new(p)))
            .collect();
        if let Ok(mut guard) = self.pods.write() {
            *guard = map;
        }
        self.bump();
    }

    /// Adds or updates one pod.
    pub fn upsert(&self, pod: PodMeta) {
        let Some(pod) = self.bound(pod) else {
            return;
        };
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
    fn metadata_is_bounded_and_marked_where_it_enters_the_store() {
        let mut pod: Pod = serde_json::from_str(POD).expect("pod json");
        let huge = "n".repeat(1 << 20);
        pod.metadata.name = Some(huge.clone());
        let labels = pod.metadata.labels.get_or_insert_with(Default::default);
        // 2,001 labels whose keys sort before the agent label, one 1 MB value, one key
        // over the key limit.
        for i in 0..2000 {
            labels.insert(format!("a{i:04}"), "v".to_owned());
        }
        labels.insert("a-huge".to_owned(), "x".repeat(1 << 20));
        labels.insert(format!("k/{}", "y".repeat(400)), "v".to_owned());
        let store = PodStore::new();
        store.upsert(PodMeta::from_pod(&pod).expect("uid"));
        let m = store
            .get("1f7c9a2e-0000-4000-8000-000000000001")
            .expect("stored");
        assert!(m.truncated);
        assert_eq!(m.name.len(), MAX_NAME);
        assert!(m.name.ends_with(ELLIPSIS));
        assert!(m.name.starts_with("nnn"));
        assert_eq!(m.labels.len(), MAX_LABELS);
        let bytes: usize = m.labels.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes <= MAX_LABEL_BYTES);
        // The agent and tier labels survive, whatever sorts before them.
        assert_eq!(m.labels["agent-monitor.dev/agent"], "researcher");
        assert_eq!(m.labels["agent-monitor.dev/tier"], "worker");
        // 2,004 labels, 64 kept: 1,940 left out (the over-long key among them), and the
        // 1 MB value was cut ("a-huge" sorts before "a0000", so it is kept, cut).
        assert_eq!(m.labels["a-huge"].len(), MAX_LABEL_VALUE);
        assert!(m.labels["a-huge"].ends_with(ELLIPSIS));
        assert_eq!(m.labels_truncated, 2004 - 64 + 1);
        // Within the limits: untouched and unmarked.
        let plain: Pod = serde_json::from_str(POD).expect("pod json");
        let plain = PodMeta::from_pod(&plain).expect("uid");
        let bounded = plain.clone().bounded(&[]).expect("uid ok");
        assert_eq!(bounded, plain);
        // A UID no cgroup can name is not stored.
        let mut odd: Pod = serde_json::from_str(POD).expect("pod json");
        odd.metadata.uid = Some("u".repeat(MAX_UID + 1));
        let before = store.len();
        store.upsert(PodMeta::from_pod(&odd).expect("uid"));
        assert_eq!(store.len(), before);
    }

    #[test]
    fn cut_keeps_characters_whole() {
        let mut s = "é".repeat(200);
        assert!(cut(&mut s, 63));
        assert!(s.len() <= 63);
        assert!(s.ends_with(ELLIPSIS));
        let mut short = "abc".to_owned();
        assert!(!cut(&mut short, 63));
        assert_eq!(short, "abc");
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
