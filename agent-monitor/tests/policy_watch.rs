//! Cluster policies against the fake API server (`support/fake_api.rs`): AgentPolicy
//! objects listed and watched, namespaces defaulted, invalid versions rejected while the
//! last valid one stays, deletions, a 410 Gone relist, and file policies winning over
//! cluster objects.

#[path = "support/logs.rs"]
mod logs;

#[path = "support/fake_api.rs"]
mod fake_api;

use std::{collections::BTreeMap, path::Path};

use agent_monitor::{
    identity::Workload,
    policy::{cluster, parse_policies, AgentPolicy, ObjectKey, PolicySet, PolicySources, Tier},
};
use fake_api::{event, gone, FakeApiServer, WAIT};
use logs::{logged, record_logs};
use serde_json::{json, Value};
use tokio::sync::watch;

const PATH: &str = "/apis/agent-monitor.dev/v1alpha1/agentpolicies";

/// The policy file: the proxy of namespace `agents`. Its namespace and name are those of a
/// cluster object too, which is not a conflict.
const FILE: &str = r#"
apiVersion: agent-monitor.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: agents-default
  namespace: agents
spec:
  selector:
    namespaces: [agents]
    serviceAccounts: [agent-proxy]
  tier: proxy
"#;

// ---------------------------------------------------------------------------------------
// Objects and the sources' state
// ---------------------------------------------------------------------------------------

/// An AgentPolicy object as the API server sends it, managed fields included.
fn object(ns: &str, name: &str, spec: Value, rv: &str) -> Value {
    json!({
        "apiVersion": "agent-monitor.dev/v1alpha1", "kind": "AgentPolicy",
        "metadata": {
            "namespace": ns, "name": name, "resourceVersion": rv,
            "uid": format!("uid-{ns}-{name}"),
            "managedFields": [{
                "manager": "kubectl", "operation": "Apply",
                "apiVersion": "agent-monitor.dev/v1alpha1",
                "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:selector": {}}}
            }]
        },
        "spec": spec,
    })
}

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

/// The cluster part of the combined set (after the one file policy), by `namespace/name`.
fn cluster_part(sources: &PolicySources) -> BTreeMap<String, AgentPolicy> {
    let combined = sources.combined();
    let set = combined.read().expect("lock");
    assert_eq!(
        set.policies()[0].spec.tier,
        Some(Tier::Proxy),
        "the file policy comes first"
    );
    set.policies()[1..]
        .iter()
        .map(|p| {
            let ns = p.metadata.namespace.clone().unwrap_or_default();
            let name = p.metadata.name.clone().unwrap_or_default();
            (format!("{ns}/{name}"), p.clone())
        })
        .collect()
}

fn workload(ns: &str, sa: &str) -> Workload {
    Workload {
        namespace: Some(ns.into()),
        service_account: Some(sa.into()),
        ..Workload::default()
    }
}

/// The policy the engine would apply to `w`: its namespace/name and tier.
fn chosen(sources: &PolicySources, w: &Workload) -> Option<(String, Option<Tier>)> {
    let combined = sources.combined();
    let set = combined.read().expect("lock");
    set.for_workload(w).map(|p| {
        (
            format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            ),
            p.spec.tier,
        )
    })
}

/// Waits, change by change, until `cond` holds for the sources.
async fn wait_for(
    sources: &PolicySources,
    changes: &mut watch::Receiver<u64>,
    what: &str,
    cond: impl Fn(&PolicySources) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        changes.borrow_and_update();
        if cond(sources) {
            return;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(res) => res.expect("sources alive"),
            Err(_) => panic!(
                "timed out waiting for {what}; cluster policies: {:?}, rejections: {:?}",
                cluster_part(sources).keys().collect::<Vec<_>>(),
                sources.cluster_rejections()
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn follows_agentpolicies_rejects_bad_versions_and_files_win() {
    record_logs();
    let mut server = FakeApiServer::start("AgentPolicyList").await;
    server.set_list(
        "10",
        vec![
            // Every pod of `agents`, as a worker: no namespaces, so its own.
            object(
                "agents",
                "agents-default",
                json!({"tier": "worker", "learningWindow": "10m"}),
                "8",
            ),
            // Written in `agents`, for the pods of `kube-system`: rejected.
            object(
                "agents",
                "reach-out",
                json!({"selector": {"namespaces": ["kube-system"]}, "tier": "worker"}),
                "9",
            ),
        ],
    );
    let files = parse_policies(FILE, Path::new("files.yaml")).expect("file policy");
    let sources = PolicySources::new(PolicySet::from(files));
    let mut changes = sources.changed();
    let task = cluster::spawn(server.client(), sources.clone());

    // 1. Initial list: one object in force, one rejected.
    server.expect_list_at(PATH).await;
    wait_for(&sources, &mut changes, "the initial list", |s| {
        s.cluster_count() == 1 && s.cluster_rejections().len() == 1
    })
    .await;
    let cluster = cluster_part(&sources);
    let default = &cluster["agents/agents-default"];
    assert_eq!(
        default.spec.selector.namespaces,
        ["agents"],
        "namespaces default to the object's own"
    );
    assert!(
        default.metadata.managed_fields.is_none()
            || default.metadata.managed_fields == Some(Vec::new()),
        "managed fields are stripped"
    );
    assert_eq!(cluster.len(), 1);

    // The object selecting another namespace: rejected, reported with the reason.
    let reason = &sources.cluster_rejections()[&key("agents", "reach-out")];
    assert!(
        reason.contains("spec.selector.namespaces[0]")
            && reason.contains("own namespace `agents`")
            && reason.contains("`kube-system`"),
        "{reason}"
    );
    assert!(logged(&[
        "WARN",
        "AgentPolicy agents/reach-out rejected",
        "spec.selector.namespaces[0]",
        "applies to no workload",
    ]));
    assert_eq!(
        chosen(&sources, &workload("kube-system", "agent-proxy")),
        None
    );

    // Files win: the file policy and the cluster object both select agents/agent-proxy
    // (and share a namespace and name); the file's proxy tier applies.
    assert_eq!(
        chosen(&sources, &workload("agents", "agent-proxy")),
        Some(("agents/agents-default".to_owned(), Some(Tier::Proxy)))
    );
    assert_eq!(
        chosen(&sources, &workload("agents", "agent-worker-1")),
        Some(("agents/agents-default".to_owned(), Some(Tier::Worker)))
    );

    // 2. ADDED: a new object, in force, its namespaces defaulted.
    let events = server
        .expect_watch_at(PATH, "10")
        .await
        .watch
        .expect("watch sender");
    let researchers = |window: &str, cidr: &str, rv: &str| {
        object(
            "research",
            "researchers",
            json!({
                "selector": {"serviceAccounts": ["researcher-*"]},
                "tier": "worker",
                "learningWindow": window,
                "egress": {"allow": [{"cidr": cidr, "ports": [443]}]},
            }),
            rv,
        )
    };
    events
        .send(event("ADDED", researchers("10m", "203.0.113.0/24", "11")))
        .expect("watch open");
    wait_for(&sources, &mut changes, "ADDED research/researchers", |s| {
        cluster_part(s).contains_key("research/researchers")
    })
    .await;
    let added = &cluster_part(&sources)["research/researchers"];
    assert_eq!(added.spec.selector.namespaces, ["research"]);
    assert_eq!(added.spec.learning_window.as_deref(), Some("10m"));
    assert_eq!(
        chosen(&sources, &workload("research", "researcher-1")),
        Some(("research/researchers".to_owned(), Some(Tier::Worker)))
    );
    assert_eq!(chosen(&sources, &workload("tools", "researcher-1")), None);

    // 3. MODIFIED to an invalid version: the previous one stays, the rejection is recorded.
    events
        .send(event("MODIFIED", researchers("20m", "10.0.0.0/99", "12")))
        .expect("watch open");
    wait_for(
        &sources,
        &mut changes,
        "the invalid version's rejection",
        |s| {
            s.cluster_rejections()
                .contains_key(&key("research", "researchers"))
        },
    )
    .await;
    let reason = &sources.cluster_rejections()[&key("research", "researchers")];
    assert!(
        reason.contains("spec.egress.allow[0].cidr") && reason.contains("`10.0.0.0/99`"),
        "{reason}"
    );
    assert!(logged(&[
        "WARN",
        "AgentPolicy research/researchers rejected",
        "spec.egress.allow[0].cidr",
        "keeping its last valid version",
    ]));
    let kept = &cluster_part(&sources)["research/researchers"];
    assert_eq!(
        kept.spec.learning_window.as_deref(),
        Some("10m"),
        "the last valid version stays in force"
    );
    assert_eq!(
        kept.spec.egress.allow[0].cidr.as_deref(),
        Some("203.0.113.0/24")
    );

    // 4. MODIFIED back to a valid version: in force, rejection cleared.
    events
        .send(event(
            "MODIFIED",
            researchers("20m", "198.51.100.0/24", "13"),
        ))
        .expect("watch open");
    wait_for(&sources, &mut changes, "the fixed version", |s| {
        cluster_part(s)["research/researchers"]
            .spec
            .learning_window
            .as_deref()
            == Some("20m")
    })
    .await;
    assert!(!sources
        .cluster_rejections()
        .contains_key(&key("research", "researchers")));
    assert!(logged(&[
        "INFO",
        "AgentPolicy research/researchers is valid again"
    ]));

    // 5. DELETED: gone.
    events
        .send(event(
            "DELETED",
            researchers("20m", "198.51.100.0/24", "14"),
        ))
        .expect("watch open");
    wait_for(
        &sources,
        &mut changes,
        "DELETED research/researchers",
        |s| !cluster_part(s).contains_key("research/researchers"),
    )
    .await;
    assert_eq!(
        chosen(&sources, &workload("research", "researcher-1")),
        None
    );
    assert_eq!(sources.cluster_count(), 1);

    // 6. 410 Gone: the relist replaces everything. agents-default is now invalid and keeps
    //    its last valid version; reach-out was deleted while the watch was broken, and its
    //    rejection goes with it; tools/coders is new.
    server.set_list(
        "20",
        vec![
            object(
                "agents",
                "agents-default",
                json!({"tier": "worker", "learningWindow": "soon"}),
                "18",
            ),
            object(
                "tools",
                "coders",
                json!({"selector": {"namespaces": ["tools"]}, "tier": "worker"}),
                "19",
            ),
        ],
    );
    events.send(gone()).expect("watch open");
    server.expect_list_at(PATH).await;
    wait_for(&sources, &mut changes, "the relist", |s| {
        cluster_part(s).contains_key("tools/coders")
    })
    .await;
    assert_eq!(
        cluster_part(&sources).keys().collect::<Vec<_>>(),
        ["agents/agents-default", "tools/coders"]
    );
    assert_eq!(
        cluster_part(&sources)["agents/agents-default"]
            .spec
            .learning_window
            .as_deref(),
        Some("10m"),
        "the relisted invalid object keeps its last valid version"
    );
    let rejections = sources.cluster_rejections();
    assert_eq!(
        rejections.keys().collect::<Vec<_>>(),
        [&key("agents", "agents-default")]
    );
    assert!(rejections[&key("agents", "agents-default")].contains("spec.learningWindow"));
    assert_eq!(sources.file_count(), 1, "the file part is untouched");

    // The watch resumes from the relist's resourceVersion; the source is still running.
    let _events = server.expect_watch_at(PATH, "20").await;
    assert!(!task.is_finished());
    task.abort();
}
