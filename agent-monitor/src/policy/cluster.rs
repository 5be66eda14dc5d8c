//! Cluster policies: the `AgentPolicy` objects of every namespace, from the API server
//! (`detect.cluster_policies`).
//!
//! [`run`] lists and watches them with [`kube::runtime::watcher()`] (paging, resuming from
//! the last resourceVersion, relisting after a 410 Gone, default backoff) and hands every
//! event to [`PolicySources::apply_cluster_event`], which keeps a [`ClusterPolicies`] and
//! recomputes the set the detection engine reads. What is admitted, per object
//! (`namespace/name`):
//! - the object must pass the checks policy files pass ([`validate_policy`]);
//! - it may only select pods of its own namespace ([`admit`]): an empty
//!   `spec.selector.namespaces` becomes `[<its namespace>]`, and an object listing any other
//!   namespace is rejected. Whoever may write AgentPolicies in one namespace must not set
//!   the policy of another namespace's agents (for instance, allow them more egress);
//! - a valid version replaces the object's previous one; an invalid version keeps the
//!   previous valid version of the same object (if any), is logged as a warning naming the
//!   object and the reason, and is recorded in [`ClusterPolicies::rejections`] until a valid
//!   version comes or the object is deleted;
//! - a deleted object is removed, with its rejection;
//! - `Init` .. `InitApply`* .. `InitDone` (a full (re)list) is buffered and then replaces
//!   everything, so objects deleted while the watch was broken disappear; objects now
//!   invalid keep their last valid version.
//!
//! Objects are watched untyped ([`DynamicObject`]) and decoded one by one: with a typed
//! watch, one object this daemon cannot decode (a CRD newer than the daemon, say) would
//! fail the whole list, retried forever, and no cluster policy would apply at all. Decoded
//! here, that object alone is rejected.

use std::{collections::BTreeMap, fmt, sync::Arc};

use futures::StreamExt;
use kube::{
    api::{ApiResource, DynamicObject},
    runtime::{watcher, WatchStreamExt},
    Api, ResourceExt,
};
use serde::Deserialize as _;
use serde_json::Value;
use tracing::{debug, info, warn};

use super::{
    error::FieldError,
    load::{API_VERSION, KIND},
    sources::PolicySources,
    types::{AgentPolicy, AgentPolicySpec},
    validate::validate_policy,
};

/// An `AgentPolicy` object of the cluster: its namespace and name. Orders by namespace,
/// then name, the order cluster policies are consulted in; displays as `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// The object's namespace.
    pub namespace: String,
    /// The object's name.
    pub name: String,
}

impl ObjectKey {
    /// The key of object `name` in `namespace`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of an object as received; `None` without a namespace or a name (which the
    /// API server always sets on a namespaced object).
    fn of(object: &DynamicObject) -> Option<Self> {
        Some(Self::new(
            object.metadata.namespace.clone()?,
            object.metadata.name.clone()?,
        ))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Errors of the cluster policy source. Transient API errors (the CRD not installed yet,
/// RBAC missing, the API server restarting) are not among them: the watcher retries those
/// with backoff, so only what cannot heal by retrying stops the source.
#[derive(Debug, thiserror::Error)]
pub enum ClusterSourceError {
    /// The watch stream ended. It only does so once the backoff has given up; the last
    /// error it reported, if any, is the cause.
    #[error("the AgentPolicy watch stream ended")]
    StreamEnded {
        /// The last error the watcher reported before ending.
        #[source]
        last_error: Option<watcher::Error>,
    },
}

fn field_error(field: &str, expected: impl Into<String>, got: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_owned(),
        expected: expected.into(),
        got: got.into(),
    }
}

/// Checks one cluster object and returns the policy as it applies: the checks of policy
/// files ([`validate_policy`]), then the cluster rule that a namespaced object selects pods
/// of its own namespace only. An empty `spec.selector.namespaces` is set to the object's
/// namespace; any other namespace listed is an error, as is an object without a namespace.
pub fn admit(mut policy: AgentPolicy) -> Result<AgentPolicy, FieldError> {
    validate_policy(&policy)?;
    let Some(own) = policy.metadata.namespace.clone() else {
        return Err(field_error(
            "metadata.namespace",
            "the namespace of the AgentPolicy object",
            "nothing",
        ));
    };
    let namespaces = &mut policy.spec.selector.namespaces;
    if let Some((i, other)) = namespaces.iter().enumerate().find(|(_, ns)| **ns != own) {
        return Err(field_error(
            &format!("spec.selector.namespaces[{i}]"),
            format!(
                "only the object's own namespace `{own}` (an {KIND} object may not select pods of other namespaces)"
            ),
            format!("`{other}`"),
        ));
    }
    if namespaces.is_empty() {
        namespaces.push(own);
    }
    Ok(policy)
}

/// Decodes an object as received into an `AgentPolicy` (not yet checked: see [`admit`]).
fn decode(object: DynamicObject) -> Result<AgentPolicy, FieldError> {
    let DynamicObject {
        metadata, mut data, ..
    } = object;
    let spec = match data.get_mut("spec").map(Value::take) {
        None | Some(Value::Null) => {
            return Err(field_error("spec", format!("an {KIND} spec"), "nothing"))
        }
        Some(spec) => AgentPolicySpec::deserialize(spec).map_err(|e| {
            field_error(
                "spec",
                format!("an {KIND} spec of {API_VERSION} as this agent-monitor knows it"),
                e.to_string(),
            )
        })?,
    };
    Ok(AgentPolicy { metadata, spec })
}

/// An object as received: its key and the admitted policy, or why it is rejected.
type Received = (ObjectKey, Result<AgentPolicy, FieldError>);

/// [`decode`] and [`admit`] one object; `None` (logged) for an object without a key.
fn receive(object: DynamicObject) -> Option<Received> {
    let Some(key) = ObjectKey::of(&object) else {
        debug!(
            "{KIND} object {} without a namespace or name ignored",
            object.name_any()
        );
        return None;
    };
    let result = decode(object).and_then(admit);
    Some((key, result))
}

/// The `AgentPolicy` objects of the cluster as far as detection is concerned: the last
/// valid version of every object, and the objects whose current version is rejected. Fed
/// the watcher's events by [`ClusterPolicies::apply`]; pure, so that it can be tested
/// without an API server.
#[derive(Debug, Default)]
pub struct ClusterPolicies {
    /// The last valid version of each object, namespaces defaulted.
    admitted: BTreeMap<ObjectKey, AgentPolicy>,
    /// Objects whose current version is invalid, with the reason.
    rejected: BTreeMap<ObjectKey, String>,
    /// The objects of a (re)list in progress; `None` outside one.
    relist: Option<Vec<Received>>,
}

impl ClusterPolicies {
    /// Applies one watcher event. Returns whether the policies or the rejections may have
    /// changed: `false` while a (re)list is only being buffered.
    pub fn apply(&mut self, event: watcher::Event<DynamicObject>) -> bool {
        match event {
            // A (re)list starts; a previous one that failed part-way is discarded with it.
            watcher::Event::Init => {
                self.relist = Some(Vec::new());
                false
            }
            watcher::Event::InitApply(object) => {
                let Some(received) = receive(object) else {
                    return false;
                };
                match &mut self.relist {
                    Some(objects) => {
                        objects.push(received);
                        false
                    }
                    // The watcher always sends Init first; applying keeps the object anyway.
                    None => {
                        self.upsert(received);
                        true
                    }
                }
            }
            watcher::Event::InitDone => {
                let objects = self.relist.take().unwrap_or_default();
                self.replace_all(objects);
                true
            }
            watcher::Event::Apply(object) => match receive(object) {
                Some(received) => {
                    self.upsert(received);
                    true
                }
                None => false,
            },
            watcher::Event::Delete(object) => match ObjectKey::of(&object) {
                Some(key) => {
                    let was = self.admitted.remove(&key).is_some();
                    self.rejected.remove(&key);
                    debug!(
                        "{KIND} {key} deleted{}",
                        if was { "" } else { " (it was not in force)" }
                    );
                    true
                }
                None => false,
            },
        }
    }

    /// A new version of one object.
    fn upsert(&mut self, (key, result): Received) {
        match result {
            Ok(policy) => {
                if self.rejected.remove(&key).is_some() {
                    info!("{KIND} {key} is valid again");
                }
                self.admitted.insert(key, policy);
            }
            Err(error) => {
                let reason = error.to_string();
                self.warn_rejected(&key, &reason);
                self.rejected.insert(key, reason);
            }
        }
    }

    /// A full (re)list: replaces everything, keeping the last valid version of objects that
    /// are listed but now invalid.
    fn replace_all(&mut self, objects: Vec<Received>) {
        let mut admitted = BTreeMap::new();
        let mut rejected = BTreeMap::new();
        for (key, result) in objects {
            match result {
                Ok(policy) => {
                    admitted.insert(key, policy);
                }
                Err(error) => {
                    let reason = error.to_string();
                    // A relist delivers unchanged objects again: an object already rejected
                    // for the same reason was reported when that version came.
                    if self.rejected.get(&key) != Some(&reason) {
                        self.warn_rejected(&key, &reason);
                    }
                    if let Some(previous) = self.admitted.remove(&key) {
                        admitted.insert(key.clone(), previous);
                    }
                    rejected.insert(key, reason);
                }
            }
        }
        self.admitted = admitted;
        self.rejected = rejected;
        info!(
            "{KIND} list: {} objects in force, {} rejected",
            self.admitted.len(),
            self.rejected.len()
        );
    }

    fn warn_rejected(&self, key: &ObjectKey, reason: &str) {
        if self.admitted.contains_key(key) {
            warn!("{KIND} {key} rejected: {reason}; keeping its last valid version");
        } else {
            warn!("{KIND} {key} rejected: {reason}; it applies to no workload until a valid version is applied");
        }
    }

    /// The policies in force, sorted by namespace and name.
    pub fn policies(&self) -> impl Iterator<Item = &AgentPolicy> {
        self.admitted.values()
    }

    /// The policy in force for one object.
    pub fn get(&self, key: &ObjectKey) -> Option<&AgentPolicy> {
        self.admitted.get(key)
    }

    /// How many objects have a policy in force.
    pub fn len(&self) -> usize {
        self.admitted.len()
    }

    /// Whether no object has a policy in force.
    pub fn is_empty(&self) -> bool {
        self.admitted.is_empty()
    }

    /// The objects whose current version is rejected, with the reason (a [`FieldError`]'s
    /// message). An object here may still have a policy in force: its last valid version.
    pub fn rejections(&self) -> &BTreeMap<ObjectKey, String> {
        &self.rejected
    }
}

/// Watches the `AgentPolicy` objects of every namespace and keeps the cluster part of
/// `sources` equal to the API server's view of them (see the module documentation).
///
/// Watch errors are logged and retried with the watcher's default exponential backoff
/// instead of ending the source: until the first list succeeds (the CRD installed, RBAC
/// granted) the file policies alone apply, and afterwards the last known objects stay in
/// force. Runs until the returned future is dropped.
pub async fn run(
    client: kube::Client,
    sources: Arc<PolicySources>,
) -> Result<(), ClusterSourceError> {
    let resource = ApiResource::erase::<AgentPolicy>(&());
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    // Managed fields are never read and can be the bulk of an object.
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default())
        .modify(|object| object.managed_fields_mut().clear())
        .default_backoff());
    let mut last_error = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => sources.apply_cluster_event(event),
            Err(e) => {
                // Once per backoff while the API server is away: counted, not repeated.
                crate::warn_limited!(
                    "policy-watch",
                    "{KIND} watch: {e}; retrying with backoff (is the CRD installed, and may the \
                     ServiceAccount list and watch agentpolicies in all namespaces?)"
                );
                last_error = Some(e);
            }
        }
    }
    Err(ClusterSourceError::StreamEnded { last_error })
}

/// Spawns [`run`] on the current tokio runtime. A fatal error is logged and ends the task;
/// the cluster policies last admitted stay in force.
pub fn spawn(client: kube::Client, sources: Arc<PolicySources>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = run(client, sources).await {
            match std::error::Error::source(&e) {
                Some(cause) => tracing::error!("cluster policy source stopped: {e}: {cause}"),
                None => tracing::error!("cluster policy source stopped: {e}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// An object as the API server sends it.
    fn object(ns: &str, name: &str, spec: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"namespace": ns, "name": name, "resourceVersion": "1"},
            "spec": spec,
        }))
        .expect("a DynamicObject")
    }

    fn valid(sa: &str) -> Value {
        json!({"selector": {"serviceAccounts": [sa]}, "tier": "worker"})
    }

    fn invalid() -> Value {
        json!({"egress": {"allow": [{"cidr": "10.0.0.0/99"}]}})
    }

    fn key(ns: &str, name: &str) -> ObjectKey {
        ObjectKey::new(ns, name)
    }

    /// The service accounts each policy in force selects, by object.
    fn in_force(c: &ClusterPolicies) -> Vec<(String, Vec<String>)> {
        c.admitted
            .iter()
            .map(|(k, p)| (k.to_string(), p.spec.selector.service_accounts.clone()))
            .collect()
    }

    fn relist(c: &mut ClusterPolicies, objects: Vec<DynamicObject>) {
        assert!(!c.apply(watcher::Event::Init));
        for o in objects {
            assert!(!c.apply(watcher::Event::InitApply(o)), "buffered");
        }
        assert!(c.apply(watcher::Event::InitDone));
    }

    #[test]
    fn admit_defaults_namespaces_and_rejects_other_namespaces() {
        let admitted = admit(
            object("agents", "p", valid("a"))
                .try_parse()
                .expect("parse"),
        )
        .expect("valid");
        assert_eq!(admitted.spec.selector.namespaces, vec!["agents"]);

        let own = json!({"selector": {"namespaces": ["agents"]}});
        let admitted =
            admit(object("agents", "p", own).try_parse().expect("parse")).expect("own namespace");
        assert_eq!(admitted.spec.selector.namespaces, vec!["agents"]);

        let other = json!({"selector": {"namespaces": ["agents", "kube-system"]}});
        let err = admit(object("agents", "p", other).try_parse().expect("parse"))
            .expect_err("another namespace");
        assert_eq!(err.field, "spec.selector.namespaces[1]");
        assert_eq!(err.got, "`kube-system`");
        assert!(err.expected.contains("own namespace `agents`"), "{err}");

        let mut no_ns: AgentPolicy = object("agents", "p", valid("a"))
            .try_parse()
            .expect("parse");
        no_ns.metadata.namespace = None;
        assert_eq!(
            admit(no_ns).expect_err("no namespace").field,
            "metadata.namespace"
        );

        // The file checks apply too.
        let err = admit(object("agents", "p", invalid()).try_parse().expect("parse"))
            .expect_err("bad cidr");
        assert_eq!(err.field, "spec.egress.allow[0].cidr");
    }

    #[test]
    fn undecodable_objects_are_rejected_alone() {
        let mut c = ClusterPolicies::default();
        relist(
            &mut c,
            vec![
                object("agents", "good", valid("a")),
                object("agents", "typo", json!({"selectr": {}})),
                object("agents", "wrong-type", json!({"tier": 7})),
            ],
        );
        assert_eq!(
            in_force(&c),
            [("agents/good".to_owned(), vec!["a".to_owned()])]
        );
        let typo = &c.rejections()[&key("agents", "typo")];
        assert!(
            typo.contains("field `spec`") && typo.contains("selectr"),
            "{typo}"
        );
        assert!(c.rejections().contains_key(&key("agents", "wrong-type")));

        // No spec at all.
        let mut bare = object("agents", "bare", json!(null));
        bare.data = json!({});
        assert!(c.apply(watcher::Event::Apply(bare)));
        assert!(c.rejections()[&key("agents", "bare")].contains("got nothing"));
    }

    #[test]
    fn invalid_versions_keep_the_last_valid_one_until_fixed_or_deleted() {
        let mut c = ClusterPolicies::default();
        assert!(c.apply(watcher::Event::Apply(object("agents", "p", valid("a")))));
        assert_eq!(
            in_force(&c),
            [("agents/p".to_owned(), vec!["a".to_owned()])]
        );

        assert!(c.apply(watcher::Event::Apply(object("agents", "p", invalid()))));
        assert_eq!(
            in_force(&c),
            [("agents/p".to_owned(), vec!["a".to_owned()])],
            "the last valid version stays"
        );
        let reason = &c.rejections()[&key("agents", "p")];
        assert!(reason.contains("spec.egress.allow[0].cidr"), "{reason}");

        assert!(c.apply(watcher::Event::Apply(object("agents", "p", valid("b")))));
        assert_eq!(
            in_force(&c),
            [("agents/p".to_owned(), vec!["b".to_owned()])]
        );
        assert!(
            c.rejections().is_empty(),
            "a valid version clears the rejection"
        );

        // Invalid from the start: nothing in force, rejection recorded; deletion clears it.
        assert!(c.apply(watcher::Event::Apply(object("tools", "q", invalid()))));
        assert!(c.get(&key("tools", "q")).is_none());
        assert!(c.rejections().contains_key(&key("tools", "q")));
        assert!(c.apply(watcher::Event::Delete(object("tools", "q", invalid()))));
        assert!(c.rejections().is_empty());

        assert!(c.apply(watcher::Event::Apply(object("agents", "p", invalid()))));
        assert!(c.apply(watcher::Event::Delete(object("agents", "p", invalid()))));
        assert!(c.is_empty() && c.rejections().is_empty(), "deleted: gone");
    }

    #[test]
    fn relist_replaces_everything_and_keeps_the_last_valid_versions() {
        let mut c = ClusterPolicies::default();
        relist(
            &mut c,
            vec![
                object("agents", "stays", valid("a")),
                object("agents", "breaks", valid("b")),
                object("agents", "vanishes", valid("c")),
                object("tools", "vanishes-rejected", invalid()),
                object("tools", "fixed", invalid()),
            ],
        );
        assert_eq!(c.len(), 3);
        assert_eq!(c.rejections().len(), 2);

        // Events seen while the list was buffered do not apply until it is done.
        assert!(!c.apply(watcher::Event::Init));
        assert!(!c.apply(watcher::Event::InitApply(object(
            "agents",
            "stays",
            valid("a2")
        ))));
        assert_eq!(
            c.get(&key("agents", "stays"))
                .map(|p| p.spec.selector.service_accounts.clone()),
            Some(vec!["a".to_owned()])
        );
        assert!(!c.apply(watcher::Event::InitApply(object(
            "agents",
            "breaks",
            invalid()
        ))));
        assert!(!c.apply(watcher::Event::InitApply(object(
            "tools",
            "fixed",
            valid("f")
        ))));
        assert!(!c.apply(watcher::Event::InitApply(object(
            "tools",
            "new",
            valid("n")
        ))));
        assert!(!c.apply(watcher::Event::InitApply(object(
            "tools",
            "new-bad",
            invalid()
        ))));
        assert!(c.apply(watcher::Event::InitDone));

        assert_eq!(
            in_force(&c),
            [
                ("agents/breaks".to_owned(), vec!["b".to_owned()]),
                ("agents/stays".to_owned(), vec!["a2".to_owned()]),
                ("tools/fixed".to_owned(), vec!["f".to_owned()]),
                ("tools/new".to_owned(), vec!["n".to_owned()]),
            ],
            "breaks keeps its last valid version; the vanished objects are gone"
        );
        assert_eq!(
            c.rejections()
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["agents/breaks", "tools/new-bad"]
        );

        // A relist that fails part-way is discarded by the next one.
        assert!(!c.apply(watcher::Event::Init));
        assert!(!c.apply(watcher::Event::InitApply(object("x", "half", valid("h")))));
        relist(&mut c, vec![object("agents", "stays", valid("a3"))]);
        assert_eq!(
            in_force(&c),
            [("agents/stays".to_owned(), vec!["a3".to_owned()])]
        );
        assert!(c.rejections().is_empty());
    }

    #[test]
    fn policies_are_sorted_by_namespace_then_name() {
        let mut c = ClusterPolicies::default();
        for (ns, name) in [("b", "a"), ("a-b", "z"), ("a", "z"), ("a", "b")] {
            c.apply(watcher::Event::Apply(object(ns, name, valid("x"))));
        }
        let order: Vec<String> = c
            .policies()
            .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
            .collect();
        // By namespace first: `a` before `a-b`, although "a-b/z" < "a/b" as strings.
        assert_eq!(order, ["a/b", "a/z", "a-b/z", "b/a"]);
    }
}
