//! The kube pod source against a scripted API server: initial list, watch events, and a
//! 410 Gone that forces a relist replacing the store.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_monitor::identity::pods::{kube as kube_source, PodStore};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

const NODE: &str = "node-a";
const SELECTOR: &str = "spec.nodeName=node-a";
/// How long any one expected change may take (the relist waits out a backoff of ~1 s).
const WAIT: Duration = Duration::from_secs(15);

/// A test double for the Kubernetes API server: no real API server can run here, so this
/// speaks just enough HTTP/1.1 for kube's pod list+watch. Every request is reported on
/// [`FakeApiServer::next_request`]; a list answers with the pods set by
/// [`FakeApiServer::set_list`] and closes, a watch stays open (chunked) and streams the
/// events the test pushes through the request's `watch` sender.
struct FakeApiServer {
    addr: SocketAddr,
    list: Arc<Mutex<(String, Vec<Value>)>>,
    requests: mpsc::UnboundedReceiver<Request>,
}

/// One request the fake server received.
#[derive(Debug)]
struct Request {
    path: String,
    query: HashMap<String, String>,
    /// For a watch: where to push the events streamed to the client.
    watch: Option<mpsc::UnboundedSender<Value>>,
}

impl FakeApiServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let list = Arc::new(Mutex::new((String::from("1"), Vec::new())));
        let (tx, requests) = mpsc::unbounded_channel();
        let shared = list.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, shared.clone(), tx.clone()));
            }
        });
        Self {
            addr,
            list,
            requests,
        }
    }

    /// What the next list returns.
    fn set_list(&self, resource_version: &str, pods: Vec<Value>) {
        *self.list.lock().expect("list lock") = (resource_version.to_owned(), pods);
    }

    async fn next_request(&mut self) -> Request {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .expect("timed out waiting for a request")
            .expect("server running")
    }

    /// The next request, which must be a list of this node's pods.
    async fn expect_list(&mut self) {
        let req = self.next_request().await;
        assert_eq!(req.path, "/api/v1/pods");
        assert!(req.watch.is_none(), "expected a list, got {req:?}");
        assert_eq!(
            req.query.get("fieldSelector").map(String::as_str),
            Some(SELECTOR)
        );
    }

    /// The next request, which must be a watch of this node's pods from `resource_version`.
    async fn expect_watch(&mut self, resource_version: &str) -> mpsc::UnboundedSender<Value> {
        let req = self.next_request().await;
        assert_eq!(req.path, "/api/v1/pods");
        assert_eq!(req.query.get("watch").map(String::as_str), Some("true"));
        assert_eq!(
            req.query.get("fieldSelector").map(String::as_str),
            Some(SELECTOR)
        );
        assert_eq!(
            req.query.get("resourceVersion").map(String::as_str),
            Some(resource_version)
        );
        req.watch.expect("watch request has an event sender")
    }
}

/// Serves one connection: one request, then a closed list or an open watch.
async fn serve(
    conn: TcpStream,
    list: Arc<Mutex<(String, Vec<Value>)>>,
    requests: mpsc::UnboundedSender<Request>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 || header == "\r\n" {
            break;
        }
    }
    let mut conn = reader.into_inner();
    let target = request_line.split_whitespace().nth(1).unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query: HashMap<String, String> = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let path = path.to_owned();

    if query.get("watch").map(String::as_str) == Some("true") {
        let (tx, mut events) = mpsc::unbounded_channel::<Value>();
        conn.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await?;
        conn.flush().await?;
        let _ = requests.send(Request {
            path,
            query,
            watch: Some(tx),
        });
        while let Some(event) = events.recv().await {
            let line = format!("{event}\n");
            conn.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
                .await?;
            conn.flush().await?;
        }
        conn.write_all(b"0\r\n\r\n").await?;
    } else {
        let (rv, items) = list.lock().expect("list lock").clone();
        let body = json!({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": rv},
            "items": items,
        })
        .to_string();
        let _ = requests.send(Request {
            path,
            query,
            watch: None,
        });
        conn.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
    }
    conn.shutdown().await
}

/// Decodes `application/x-www-form-urlencoded` (what kube encodes query values with).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
    let _ = env_logger::builder().is_test(true).try_init();
    let mut server = FakeApiServer::start().await;
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
