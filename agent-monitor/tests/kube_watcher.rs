//! The kube pod source against a scripted API server: initial list, watch events, and a
//! 410 Gone that forces a relist replacing the store.

#[path = "support/fake_api.rs"]
mod fake_api;

use std::collections::BTreeMap;

use agent_monitor::identity::pods::{kube as kube_source, PodStore};
use fake_api::{FakeApiServer, WAIT};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

const NODE: &str = "node-a";
const SELECTOR: &str = "spec.nodeName=node-a";

/// The requests of the pod source to the fake API server: lists and watches of this
/// node's pods.
trait NodePods {
    /// The next request, which must be a list of this node's pods.
    async fn expect_list(&mut self);
    /// The next request, which must be a watch of this node's pods from `resource_version`.
    async fn expect_watch(&mut self, resource_version: &str) -> mpsc::UnboundedSender<Value>;
}

impl NodePods for FakeApiServer {
    async fn expect_list(&mut self) {
        let req = self.expect_list_at("/api/v1/pods").await;
        assert_eq!(
            req.query.get("fieldSelector").map(String::as_str),
            Some(SELECTOR)
        );
    }

    async fn expect_watch(&mut self, resource_version: &str) -> mpsc::UnboundedSender<Value> {
        let req = self.expect_watch_at("/api/v1/pods", resource_version).await;
        assert_eq!(
            req.query.get("fieldSelector").map(String::as_str),
            Some(SELECTOR)
        );
        req.watch.expect("watch request has an event sender")
    }
}

/// A pod of node-a, with managed fields as the API server sends them.
fn pod(uid: &str, ns: &str, name: &str, sa: &str, labels: &[(&str, &str)], rv: &str) -> Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "uid": uid, "namespace": ns, "name": name, "resourceVersion": rv, "labels": labels,
            "managedFields": [{
                "manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:status": {"f:phase": {}}}
            }]
        },
        "spec": {
            "nodeName": NODE, "serviceAccountName": sa,
            "containers": [{"name": "agent", "image": "ghcr.io/acme/agent:1"}]
        }
    })
}

fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

/// The store as uid -> namespace/name.
fn snapshot(store: &PodStore) -> BTreeMap<String, String> {
    store
        .all()
        .iter()
        .map(|p| (p.uid.clone(), format!("{}/{}", p.namespace, p.name)))
        .collect()
}

/// Waits, change by change, until `cond` holds for the store.
async fn wait_for(
    store: &PodStore,
    changes: &mut watch::Receiver<u64>,
    what: &str,
    cond: impl Fn(&PodStore) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        changes.borrow_and_update();
        if cond(store) {
            return;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(res) => res.expect("store alive"),
            Err(_) => panic!("timed out waiting for {what}; store: {:?}", snapshot(store)),
        }
    }
}

fn label(store: &PodStore, uid: &str, key: &str) -> Option<String> {
    store.get(uid)?.labels.get(key).cloned()
}

#[tokio::test]
async fn follows_list_watch_and_relists_after_gone() {
    // RUST_LOG, else errors only, through the test harness's capture.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut server = FakeApiServer::start("PodList").await;
    let a = pod(
        "uid-a",
        "agents",
        "worker-a",
        "sa-a",
        &[("app", "researcher")],
        "8",
    );
    let b = pod(
        "uid-b",
        "tools",
        "worker-b",
        "sa-b",
        &[("app", "coder")],
        "9",
    );
    server.set_list("10", vec![a, b]);

    let config = kube::Config::new(format!("http://{}", server.addr).parse().expect("url"));
    let client = kube::Client::try_from(config).expect("client");
    let store = PodStore::new();
    let mut changes = store.changed();
    let task = kube_source::spawn(client, NODE.into(), store.clone());

    // 1. Initial list.
    server.expect_list().await;
    wait_for(&store, &mut changes, "the initial list", |s| s.len() == 2).await;
    let a = store.get("uid-a").expect("pod a");
    assert_eq!(
        (a.namespace.as_str(), a.name.as_str()),
        ("agents", "worker-a")
    );
    assert_eq!(a.service_account, "sa-a");
    assert_eq!(
        a.labels,
        BTreeMap::from([("app".into(), "researcher".into())])
    );
    assert_eq!(a.node_name.as_deref(), Some(NODE));
    let b = store.get("uid-b").expect("pod b");
    assert_eq!(
        (b.namespace.as_str(), b.name.as_str()),
        ("tools", "worker-b")
    );
    assert_eq!(b.service_account, "sa-b");
    assert_eq!(b.labels, BTreeMap::from([("app".into(), "coder".into())]));

    // 2. Watch events.
    let events = server.expect_watch("10").await;
    let c = |app: &str, rv: &str| pod("uid-c", "agents", "worker-c", "sa-c", &[("app", app)], rv);
    events
        .send(event("ADDED", c("planner", "11")))
        .expect("watch open");
    wait_for(&store, &mut changes, "ADDED pod c", |s| {
        s.get("uid-c").is_some()
    })
    .await;
    let got = store.get("uid-c").expect("pod c");
    assert_eq!(
        (got.namespace.as_str(), got.name.as_str()),
        ("agents", "worker-c")
    );
    assert_eq!(got.service_account, "sa-c");
    assert_eq!(label(&store, "uid-c", "app").as_deref(), Some("planner"));

    events
        .send(json!({"type": "BOOKMARK", "object": {
            "kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "11"}}}))
        .expect("watch open");
    events
        .send(event("MODIFIED", c("reviewer", "12")))
        .expect("watch open");
    wait_for(&store, &mut changes, "MODIFIED label of pod c", |s| {
        label(s, "uid-c", "app").as_deref() == Some("reviewer")
    })
    .await;

    events
        .send(event("DELETED", c("reviewer", "13")))
        .expect("watch open");
    wait_for(&store, &mut changes, "DELETED pod c", |s| {
        s.get("uid-c").is_none()
    })
    .await;
    assert_eq!(
        snapshot(&store),
        BTreeMap::from([
            ("uid-a".into(), "agents/worker-a".into()),
            ("uid-b".into(), "tools/worker-b".into()),
        ])
    );

    // 3. 410 Gone: the relist has pod a (relabelled) and a new pod d; pod b vanished while
    //    the watch was broken and must disappear.
    server.set_list(
        "20",
        vec![
            pod(
                "uid-a",
                "agents",
                "worker-a",
                "sa-a",
                &[("app", "lead")],
                "18",
            ),
            pod(
                "uid-d",
                "agents",
                "worker-d",
                "sa-d",
                &[("app", "tester")],
                "19",
            ),
        ],
    );
    events
        .send(event(
            "ERROR",
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "reason": "Expired", "code": 410, "message": "too old resource version"}),
        ))
        .expect("watch open");
    server.expect_list().await;
    wait_for(&store, &mut changes, "the relist", |s| {
        s.get("uid-d").is_some()
    })
    .await;
    assert_eq!(
        snapshot(&store),
        BTreeMap::from([
            ("uid-a".into(), "agents/worker-a".into()),
            ("uid-d".into(), "agents/worker-d".into()),
        ])
    );
    assert_eq!(label(&store, "uid-a", "app").as_deref(), Some("lead"));
    assert_eq!(store.get("uid-d").expect("pod d").service_account, "sa-d");

    // The watch resumes from the relist's resourceVersion; the source is still running.
    let _events = server.expect_watch("20").await;
    assert!(!task.is_finished());
    task.abort();
}
