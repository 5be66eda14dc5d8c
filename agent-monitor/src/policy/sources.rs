//! Where policies come from, combined: policy files and the cluster's `AgentPolicy`
//! objects, into the one [`PolicySet`] the detection engine reads.
//!
//! Order of the combined set: the file policies first, in their load order, then the
//! cluster policies sorted by namespace and name. [`PolicySet::for_workload`] takes the
//! first match, so **files win** when a file policy and a cluster object both select a
//! workload: files are written by whoever deploys the daemon, cluster objects by anyone
//! allowed to write AgentPolicies in a namespace. A file policy and a cluster object with
//! the same namespace and name are not a conflict: they are different sources, and both
//! stay in the set.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use kube::{api::DynamicObject, runtime::watcher};
use tokio::sync::watch;
use tracing::info;

use super::{
    cluster::{ClusterPolicies, ObjectKey},
    set::PolicySet,
};

/// The two parts, updated under one lock so that two updates cannot publish out of order.
#[derive(Debug, Default)]
struct Parts {
    files: PolicySet,
    cluster: ClusterPolicies,
}

/// The owner of the file policies and the cluster policies. Every change to either part
/// recomputes the combined set (files first: see the module documentation) into the
/// `Arc<RwLock<PolicySet>>` of [`PolicySources::combined`], which the engine reads.
/// Readers can wait for a change with [`PolicySources::changed`].
#[derive(Debug)]
pub struct PolicySources {
    parts: Mutex<Parts>,
    combined: Arc<RwLock<PolicySet>>,
    version: watch::Sender<u64>,
}

impl PolicySources {
    /// Sources holding the file policies `files` and no cluster policies yet.
    pub fn new(files: PolicySet) -> Arc<Self> {
        Arc::new(Self {
            combined: Arc::new(RwLock::new(files.clone())),
            parts: Mutex::new(Parts {
                files,
                cluster: ClusterPolicies::default(),
            }),
            version: watch::channel(0).0,
        })
    }

    /// The combined set, as the engine reads it; kept current by every update.
    pub fn combined(&self) -> Arc<RwLock<PolicySet>> {
        self.combined.clone()
    }

    /// Replaces the file policies. Returns `false`, changing nothing, when `files` holds
    /// the same policies in the same order as the current ones.
    pub fn replace_files(&self, files: PolicySet) -> bool {
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        if parts.files == files {
            return false;
        }
        parts.files = files;
        self.publish(&parts);
        true
    }

    /// Applies one event of the cluster watcher (see [`ClusterPolicies::apply`]).
    pub fn apply_cluster_event(&self, event: watcher::Event<DynamicObject>) {
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        if parts.cluster.apply(event) {
            self.publish(&parts);
        }
    }

    /// How many policies come from files.
    pub fn file_count(&self) -> usize {
        self.parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .files
            .len()
    }

    /// How many cluster objects have a policy in force.
    pub fn cluster_count(&self) -> usize {
        self.parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cluster
            .len()
    }

    /// The cluster objects whose current version is rejected, by `namespace/name`, with
    /// the reason. An object here may still have its last valid version in force.
    pub fn cluster_rejections(&self) -> BTreeMap<ObjectKey, String> {
        self.parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cluster
            .rejections()
            .clone()
    }

    /// A receiver that sees a new value after every update of either part (policies or
    /// rejections).
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Recomputes the combined set from `parts` and, when it differs, swaps it in.
    fn publish(&self, parts: &Parts) {
        let set = PolicySet::from(
            parts
                .files
                .policies()
                .iter()
                .chain(parts.cluster.policies())
                .cloned()
                .collect::<Vec<_>>(),
        );
        let mut current = self
            .combined
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if *current != set {
            *current = set;
            drop(current);
            info!(
                "policies in force: {} from files, {} from the cluster",
                parts.files.len(),
                parts.cluster.len()
            );
        }
        self.version.send_modify(|v| *v += 1);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        identity::Workload,
        policy::{AgentPolicy, AgentPolicySpec, Selector},
    };

    fn file_policy(name: &str, selector: Selector) -> AgentPolicy {
        AgentPolicy::new(
            name,
            AgentPolicySpec {
                selector,
                ..AgentPolicySpec::default()
            },
        )
    }

    fn cluster_object(ns: &str, name: &str) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "agent-monitor.dev/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"namespace": ns, "name": name},
            "spec": {"selector": {"serviceAccounts": ["agent-*"]}},
        }))
        .expect("object")
    }

    fn workload(ns: &str, sa: &str) -> Workload {
        Workload {
            namespace: Some(ns.into()),
            service_account: Some(sa.into()),
            ..Workload::default()
        }
    }

    fn chosen(sources: &PolicySources, w: &Workload) -> Option<String> {
        let set = sources.combined();
        let set = set.read().expect("lock");
        set.for_workload(w).map(|p| {
            format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or("-"),
                p.metadata.name.as_deref().unwrap_or_default()
            )
        })
    }

    #[test]
    fn files_come_first_and_both_parts_update_the_combined_set() {
        let proxy = Selector {
            namespaces: vec!["agents".into()],
            service_accounts: vec!["agent-proxy".into()],
            ..Selector::default()
        };
        let sources = PolicySources::new(PolicySet::from(vec![file_policy("proxy", proxy)]));
        let changed = sources.changed();
        // Same name as the file policy: not a conflict.
        sources.apply_cluster_event(watcher::Event::Apply(cluster_object("agents", "proxy")));
        assert!(changed.has_changed().expect("sender alive"));
        assert_eq!((sources.file_count(), sources.cluster_count()), (1, 1));
        assert_eq!(sources.combined().read().expect("lock").len(), 2);
        assert_eq!(
            chosen(&sources, &workload("agents", "agent-proxy")).as_deref(),
            Some("-/proxy"),
            "the file wins"
        );
        assert_eq!(
            chosen(&sources, &workload("agents", "agent-worker")).as_deref(),
            Some("agents/proxy")
        );
        assert_eq!(chosen(&sources, &workload("tools", "agent-worker")), None);

        // Reloading the same files changes nothing; other files replace the file part only.
        let same = sources.combined().read().expect("lock").policies()[..1].to_vec();
        assert!(!sources.replace_files(PolicySet::from(same)));
        assert!(sources.replace_files(PolicySet::default()));
        assert_eq!(
            chosen(&sources, &workload("agents", "agent-proxy")).as_deref(),
            Some("agents/proxy")
        );
        assert_eq!((sources.file_count(), sources.cluster_count()), (0, 1));
    }
}
