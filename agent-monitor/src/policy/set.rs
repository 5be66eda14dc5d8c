//! The loaded set: policies in load order, each compiled once, and the selection of the
//! policy that applies to a workload.

use std::{path::PathBuf, sync::Arc};

use tracing::warn;

use super::{
    error::{Origin, PolicyError},
    load::{load_file, policy_files},
    matching::CompiledPolicy,
    types::AgentPolicy,
};
use crate::identity::Workload;

fn display_name(p: &AgentPolicy) -> String {
    let name = p.metadata.name.as_deref().unwrap_or_default();
    match p.metadata.namespace.as_deref() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

/// The loaded policies, in load order: files in the order given, a directory's files
/// sorted by name, a file's documents in order. The set the detection engine reads is
/// combined by [`PolicySources`](super::PolicySources): file policies first, then the
/// cluster's AgentPolicy objects, so that files win when both select a workload.
///
/// Each policy is compiled ([`CompiledPolicy`]) when the set is built, so that detection
/// matches every event against compiled globs and CIDRs.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<AgentPolicy>,
    /// `policies[i]`, compiled; `None` for a policy that does not compile, which selects
    /// no workload. Validation refuses such policies, so only a set built from policies
    /// that were never validated can hold one.
    compiled: Vec<Option<Arc<CompiledPolicy>>>,
}

/// Same policies in the same order (kube's `AgentPolicy` does not derive `PartialEq`; the
/// compiled forms follow from the policies).
impl PartialEq for PolicySet {
    fn eq(&self, other: &Self) -> bool {
        self.policies.len() == other.policies.len()
            && self
                .policies
                .iter()
                .zip(&other.policies)
                .all(|(a, b)| a.metadata == b.metadata && a.spec == b.spec)
    }
}

impl From<Vec<AgentPolicy>> for PolicySet {
    fn from(policies: Vec<AgentPolicy>) -> Self {
        let compiled = policies
            .iter()
            .map(|p| match CompiledPolicy::compile(&p.spec) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    warn!("policy {}: {e}; it applies to no workload", display_name(p));
                    None
                }
            })
            .collect();
        Self { policies, compiled }
    }
}

impl PolicySet {
    /// Loads every policy of `paths`: files, or directories of `*.yaml` and `*.yml` files
    /// (sorted by name). Any bad file fails the whole load, as do two policies with the same
    /// namespace and name.
    pub fn load(paths: &[PathBuf]) -> Result<PolicySet, PolicyError> {
        let mut policies = Vec::new();
        let mut seen: Vec<(String, PathBuf)> = Vec::new();
        for file in policy_files(paths)? {
            let loaded = load_file(&file)?;
            for p in loaded {
                let name = display_name(&p);
                if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
                    return Err(PolicyError::Duplicate {
                        at: Origin {
                            file: file.clone(),
                            document: None,
                            position: None,
                        },
                        name,
                        first: first.clone(),
                    });
                }
                seen.push((name, file.clone()));
                policies.push(p);
            }
        }
        Ok(Self::from(policies))
    }

    /// The policies, in load order.
    pub fn policies(&self) -> &[AgentPolicy] {
        &self.policies
    }

    /// How many policies there are.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The first policy, in load order, whose selector matches `w`, and its compiled form.
    fn find(&self, w: &Workload) -> Option<(&AgentPolicy, &Arc<CompiledPolicy>)> {
        if w.host {
            return None;
        }
        self.policies
            .iter()
            .zip(&self.compiled)
            .find_map(|(p, c)| c.as_ref().filter(|c| c.selects(w)).map(|c| (p, c)))
    }

    /// The first policy, in load order, whose selector matches `w`.
    pub fn for_workload(&self, w: &Workload) -> Option<&AgentPolicy> {
        self.find(w).map(|(p, _)| p)
    }

    /// The compiled form of [`for_workload`](Self::for_workload)'s policy: what the
    /// detection engine applies to `w`.
    pub fn compiled_for_workload(&self, w: &Workload) -> Option<&Arc<CompiledPolicy>> {
        self.find(w).map(|(_, c)| c)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::policy::types::{AgentPolicySpec, Selector};

    fn workload(ns: &str, sa: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            namespace: Some(ns.into()),
            service_account: Some(sa.into()),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Workload::default()
        }
    }

    fn policy(name: &str, selector: Selector) -> AgentPolicy {
        AgentPolicy::new(
            name,
            AgentPolicySpec {
                selector,
                ..AgentPolicySpec::default()
            },
        )
    }

    #[test]
    fn selectors_pick_the_first_matching_policy() {
        let set = PolicySet::from(vec![
            policy(
                "proxy",
                Selector {
                    namespaces: vec!["agents".into()],
                    service_accounts: vec!["agent-proxy".into()],
                    ..Selector::default()
                },
            ),
            policy(
                "workers",
                Selector {
                    namespaces: vec!["agents".into()],
                    match_labels: BTreeMap::from([("app".into(), "worker".into())]),
                    service_accounts: vec!["agent-worker-*".into()],
                },
            ),
            policy("catch-all", Selector::default()),
        ]);
        let name = |w: &Workload| {
            set.for_workload(w)
                .and_then(|p| p.metadata.name.clone())
                .unwrap_or_default()
        };
        assert_eq!(name(&workload("agents", "agent-proxy", &[])), "proxy");
        assert_eq!(
            name(&workload(
                "agents",
                "agent-worker-7",
                &[("app", "worker"), ("x", "y")]
            )),
            "workers"
        );
        // Wrong label value, missing label, other namespace: fall through to the catch-all.
        assert_eq!(
            name(&workload("agents", "agent-worker-7", &[("app", "proxy")])),
            "catch-all"
        );
        assert_eq!(
            name(&workload("agents", "agent-worker-7", &[])),
            "catch-all"
        );
        assert_eq!(
            name(&workload("other", "agent-proxy", &[("app", "worker")])),
            "catch-all"
        );
        // Unknown namespace or ServiceAccount: only selectors without them match.
        assert_eq!(name(&Workload::default()), "catch-all");
        let host = Workload {
            host: true,
            ..Workload::default()
        };
        assert!(
            set.for_workload(&host).is_none(),
            "host processes match nothing"
        );
        assert!(PolicySet::default()
            .for_workload(&workload("a", "b", &[]))
            .is_none());
        assert!(PolicySet::default().is_empty());
        assert_eq!(set.len(), 3);
    }

    #[test]
    fn a_policy_that_does_not_compile_selects_nothing() {
        // Only possible without validation, which refuses `{...}` globs.
        let set = PolicySet::from(vec![
            policy(
                "broken",
                Selector {
                    service_accounts: vec!["agent-{a,b}".into()],
                    ..Selector::default()
                },
            ),
            policy("catch-all", Selector::default()),
        ]);
        assert_eq!(set.len(), 2);
        let picked = set
            .for_workload(&workload("agents", "agent-a", &[]))
            .and_then(|p| p.metadata.name.clone());
        assert_eq!(picked.as_deref(), Some("catch-all"));
        assert!(set
            .compiled_for_workload(&workload("agents", "agent-a", &[]))
            .is_some());
    }
}
