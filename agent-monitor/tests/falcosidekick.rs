//! The Falcosidekick output against a local receiver that checks input the way
//! Falcosidekick does: delivery in order, retries while the receiver is down, rejected
//! alerts, and a full queue.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_monitor::{
    detect::Anomaly,
    outputs::{
        falcosidekick::{spawn, SidekickCounters, SidekickSettings, SidekickSink, SidekickStats},
        Sink,
    },
    policy::Priority,
};
use axum::{
    body::Bytes,
    extract::State,
    http::{header, HeaderMap, StatusCode},
    routing::post,
    Router,
};
use http_body_util::Full;
use hyper::Request;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde_json::{json, Value};
use tokio::{net::TcpSocket, task::JoinHandle};

const PRIORITIES: &[&str] = &[
    "emergency",
    "alert",
    "critical",
    "error",
    "warning",
    "notice",
    "informational",
    "debug",
];

/// Generous bound for anything the tests wait on.
const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Received {
    /// Accepted alerts, in arrival order, with their Content-Type.
    accepted: Vec<(Value, Option<String>)>,
    /// Why each refused POST was refused.
    refused: Vec<String>,
}

/// A test double of Falcosidekick: enforces Falcosidekick's input checks on `POST /`
/// (JSON body, non-empty `rule`, a known `priority` in any case, an RFC 3339 `time`,
/// non-empty `output_fields`), answering 400 with the reason when one fails and 200
/// otherwise, and records what it accepted.
struct FalcosidekickDouble {
    addr: SocketAddr,
    /// Bound to the port but not listening, until [`Self::listen`].
    reserved: Option<TcpSocket>,
    server: Option<JoinHandle<()>>,
    received: Arc<Mutex<Received>>,
}

impl FalcosidekickDouble {
    /// Takes a port without listening on it: connections are refused until `listen`.
    fn reserve() -> Self {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let addr = socket.local_addr().expect("local addr");
        Self {
            addr,
            reserved: Some(socket),
            server: None,
            received: Arc::default(),
        }
    }

    /// A receiver already listening.
    fn start() -> Self {
        let mut d = Self::reserve();
        d.listen();
        d
    }

    /// Starts listening on the reserved port.
    fn listen(&mut self) {
        let socket = self.reserved.take().expect("listen once");
        let listener = socket.listen(1024).expect("listen");
        let app = Router::new()
            .route("/", post(receive))
            .with_state(Arc::clone(&self.received));
        self.server = Some(tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        }));
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    fn accepted(&self) -> Vec<(Value, Option<String>)> {
        self.received.lock().expect("lock").accepted.clone()
    }

    fn refused(&self) -> Vec<String> {
        self.received.lock().expect("lock").refused.clone()
    }
}

impl Drop for FalcosidekickDouble {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            s.abort();
        }
    }
}

async fn receive(
    State(received): State<Arc<Mutex<Received>>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut r = received.lock().expect("lock");
    match check(&body) {
        Ok(alert) => {
            r.accepted.push((alert, content_type));
            (StatusCode::OK, String::new())
        }
        Err(why) => {
            r.refused.push(why.clone());
            (StatusCode::BAD_REQUEST, why)
        }
    }
}

/// Falcosidekick's checks of an incoming alert.
fn check(body: &[u8]) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let rule = v["rule"].as_str().unwrap_or("");
    if rule.is_empty() {
        return Err("empty rule".into());
    }
    let priority = v["priority"].as_str().unwrap_or("");
    if !PRIORITIES.iter().any(|p| p.eq_ignore_ascii_case(priority)) {
        return Err(format!("unknown priority {priority:?}"));
    }
    let time = v["time"].as_str().unwrap_or("");
    humantime::parse_rfc3339(time).map_err(|e| format!("bad time {time:?}: {e}"))?;
    if v["output_fields"].as_object().is_none_or(|o| o.is_empty()) {
        return Err("empty output_fields".into());
    }
    Ok(v)
}

/// Alert number `n`, carried in `output_fields` as `test.n`.
fn anomaly(n: u64) -> Anomaly {
    let mut fields = BTreeMap::new();
    fields.insert("test.n".to_owned(), json!(n));
    fields.insert("k8s.ns.name".to_owned(), json!("agents"));
    Anomaly {
        seq: n,
        time: "2026-11-23T07:06:34.915522513Z".into(),
        rule: "foreign-credential-read".into(),
        priority: Priority::Critical,
        output: format!("Foreign credential read number {n}"),
        tags: vec!["T1528".into()],
        workload: Default::default(),
        fields,
        events: vec![n],
    }
}

fn numbers(accepted: &[(Value, Option<String>)]) -> Vec<u64> {
    accepted
        .iter()
        .map(|(v, _)| v["output_fields"]["test.n"].as_u64().expect("test.n"))
        .collect()
}

fn config(url: String) -> SidekickSettings {
    SidekickSettings {
        url,
        timeout: Duration::from_secs(5),
        max_backoff: Duration::from_millis(500),
        ..Default::default()
    }
}

fn init_log() {
    // RUST_LOG, else errors only, through the test harness's capture.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Polls the counters until `done` holds, failing after [`PATIENCE`].
async fn wait_for(counters: &SidekickCounters, what: &str, done: impl Fn(&SidekickStats) -> bool) {
    let outcome = tokio::time::timeout(PATIENCE, async {
        loop {
            if done(&counters.snapshot()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        outcome.is_ok(),
        "timed out waiting for {what}: {:?}",
        counters.snapshot()
    );
}

/// Drops the sink and waits for the sender task to end.
async fn shut_down(sink: SidekickSink, task: JoinHandle<()>) {
    drop(sink);
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("sender task ends")
        .expect("sender task does not panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_every_alert_in_order() {
    init_log();
    let double = FalcosidekickDouble::start();
    let (mut sink, task, counters) = spawn(config(double.url()), "node-a".into()).expect("spawn");
    for n in 0..50 {
        sink.write(&anomaly(n)).expect("write");
    }
    sink.flush().expect("flush");
    wait_for(&counters, "50 sent", |s| s.sent == 50).await;
    shut_down(sink, task).await;

    let accepted = double.accepted();
    assert_eq!(numbers(&accepted), (0..50).collect::<Vec<_>>());
    assert!(double.refused().is_empty(), "{:?}", double.refused());
    for (alert, content_type) in &accepted {
        assert_eq!(content_type.as_deref(), Some("application/json"));
        assert_eq!(alert["hostname"], "node-a");
        assert_eq!(alert["source"], "agent-monitor");
        assert_eq!(alert["priority"], "Critical");
    }
    let s = counters.snapshot();
    assert_eq!(
        (s.sent, s.rejected, s.dropped_queue_full, s.undelivered),
        (50, 0, 0, 0),
        "{s:?}"
    );
    assert_eq!((s.queued, s.in_flight), (0, 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_out_a_receiver_outage_without_losing_alerts() {
    init_log();
    let mut double = FalcosidekickDouble::reserve();
    let (mut sink, task, counters) = spawn(config(double.url()), "node-a".into()).expect("spawn");
    // 200 alerts while nothing listens, over 5 s.
    for n in 0..100 {
        sink.write(&anomaly(n)).expect("write");
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for n in 100..200 {
        sink.write(&anomaly(n)).expect("write");
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(counters.snapshot().sent, 0);
    double.listen();

    wait_for(&counters, "200 sent", |s| s.sent == 200).await;
    shut_down(sink, task).await;

    assert_eq!(numbers(&double.accepted()), (0..200).collect::<Vec<_>>());
    let s = counters.snapshot();
    assert!(s.retries > 0, "{s:?}");
    assert!(s.failed_attempts > 0, "{s:?}");
    assert_eq!(
        (s.sent, s.rejected, s.dropped_queue_full, s.undelivered),
        (200, 0, 0, 0),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_alert_does_not_block_the_rest() {
    init_log();
    let double = FalcosidekickDouble::start();
    let (mut sink, task, counters) = spawn(config(double.url()), "node-a".into()).expect("spawn");
    for n in 0..10 {
        let mut a = anomaly(n);
        if n == 4 {
            a.fields.clear();
        }
        sink.write(&a).expect("write");
    }
    wait_for(&counters, "10 handled", |s| s.sent + s.rejected == 10).await;
    shut_down(sink, task).await;

    let expected: Vec<u64> = (0..10).filter(|n| *n != 4).collect();
    assert_eq!(numbers(&double.accepted()), expected);
    assert_eq!(double.refused(), vec!["empty output_fields".to_owned()]);
    let s = counters.snapshot();
    assert_eq!((s.sent, s.rejected, s.retries), (9, 1, 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_and_counts_without_blocking() {
    init_log();
    let mut double = FalcosidekickDouble::reserve();
    let cfg = SidekickSettings {
        queue: 10,
        ..config(double.url())
    };
    let (mut sink, task, counters) = spawn(cfg, "node-a".into()).expect("spawn");

    // The first alert is taken off the queue and held by the sender, which retries it
    // while nothing listens; the queue behind it holds 10 more, so of the 49 written
    // next exactly 39 are dropped.
    sink.write(&anomaly(0)).expect("write");
    wait_for(&counters, "alert 0 in flight", |s| {
        s.in_flight == 1 && s.queued == 0 && s.failed_attempts > 0
    })
    .await;
    let writes = tokio::task::spawn_blocking(move || {
        let results: Vec<_> = (1..50).map(|n| sink.write(&anomaly(n))).collect();
        (sink, results)
    });
    // `write` must never wait for the sender: 49 writes within the patience bound.
    let (sink, results) = tokio::time::timeout(PATIENCE, writes)
        .await
        .expect("writes do not block")
        .expect("writer does not panic");
    for r in results {
        r.expect("a full queue is not an error");
    }
    let s = counters.snapshot();
    assert_eq!(s.in_flight, 1, "{s:?}");
    assert_eq!(s.queued, 10, "{s:?}");
    assert_eq!(s.dropped_queue_full, 39, "{s:?}");
    assert_eq!(s.queued + s.in_flight + s.dropped_queue_full, 50, "{s:?}");
    assert_eq!(s.sent, 0, "{s:?}");

    // What was kept is the oldest 11, and it all arrives once the receiver is up.
    double.listen();
    wait_for(&counters, "11 sent", |s| s.sent == 11).await;
    shut_down(sink, task).await;
    assert_eq!(numbers(&double.accepted()), (0..11).collect::<Vec<_>>());
    let s = counters.snapshot();
    assert_eq!(
        (s.sent, s.dropped_queue_full, s.undelivered, s.queued),
        (11, 39, 0, 0),
        "{s:?}"
    );
}

/// The double itself refuses what Falcosidekick refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_double_enforces_falcosidekick_checks() {
    let double = FalcosidekickDouble::start();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let good = json!({
        "time": "2026-11-23T07:06:34.915522513Z",
        "rule": "r",
        "priority": "cRiTiCaL",
        "output": "o",
        "output_fields": {"a": 1},
    });
    let post = |body: String| {
        let client = client.clone();
        let url = double.url();
        async move {
            let req = Request::post(url)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("request");
            client.request(req).await.expect("post").status()
        }
    };
    assert_eq!(post(good.to_string()).await, StatusCode::OK);
    assert_eq!(post("{not json".into()).await, StatusCode::BAD_REQUEST);
    for (key, value) in [
        ("rule", json!("")),
        ("priority", json!("severe")),
        ("time", json!("yesterday")),
        ("output_fields", json!({})),
    ] {
        let mut bad = good.clone();
        bad[key] = value;
        assert_eq!(
            post(bad.to_string()).await,
            StatusCode::BAD_REQUEST,
            "{key}"
        );
    }
    assert_eq!(double.accepted().len(), 1);
    assert_eq!(double.refused().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_after_the_grace_period() {
    init_log();
    // Nothing ever listens.
    let double = FalcosidekickDouble::reserve();
    let (mut sink, task, counters) = spawn(config(double.url()), "node-a".into()).expect("spawn");
    for n in 0..3 {
        sink.write(&anomaly(n)).expect("write");
    }
    wait_for(&counters, "a failed attempt", |s| s.failed_attempts > 0).await;
    // The task ends on its own (bounded by the grace period), counting all 3.
    shut_down(sink, task).await;
    let s = counters.snapshot();
    assert_eq!(
        (s.sent, s.undelivered, s.queued, s.in_flight),
        (0, 3, 0, 0),
        "{s:?}"
    );
}

/// An alert received and its Content-Type.
type Alert = (Value, Option<String>);

/// A TLS receiver on 127.0.0.1 with a self-signed certificate (written as a PEM file):
/// accepts every POST with 200 and records the bodies and their Content-Type.
struct TlsReceiver {
    url: String,
    ca: std::path::PathBuf,
    _dir: tempfile::TempDir,
    received: Arc<Mutex<Vec<Alert>>>,
    server: JoinHandle<()>,
}

impl TlsReceiver {
    async fn start() -> Self {
        use hyper::{body::Incoming, server::conn::http1, service::service_fn, Response};
        use hyper_util::rt::TokioIo;
        use rustls::pki_types::PrivatePkcs8KeyDer;

        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, cert.pem()).expect("write ca");
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::<Mutex<Vec<Alert>>>::default();
        let rec = Arc::clone(&received);
        let server = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let rec = Arc::clone(&rec);
                tokio::spawn(async move {
                    // A client that does not trust the certificate fails here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req: hyper::Request<Incoming>| {
                        let rec = Arc::clone(&rec);
                        async move {
                            use http_body_util::BodyExt as _;
                            let ctype = req
                                .headers()
                                .get(header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            let body = req.into_body().collect().await?.to_bytes();
                            let alert: Value = serde_json::from_slice(&body).expect("json");
                            rec.lock().expect("lock").push((alert, ctype));
                            Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            url: format!("https://{addr}/"),
            ca,
            _dir: dir,
            received,
            server,
        }
    }
}

impl Drop for TlsReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// `https` with the receiver's CA given as the extra CA file: delivered. Without it (only
/// the webpki roots) the certificate is not trusted and nothing is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_an_extra_ca() {
    init_log();
    let receiver = TlsReceiver::start().await;

    let untrusted = spawn(config(receiver.url.clone()), "node-a".into());
    let (mut sink, task, counters) = untrusted.expect("spawn");
    sink.write(&anomaly(0)).expect("write");
    wait_for(&counters, "a failed attempt", |s| s.failed_attempts > 0).await;
    drop(sink);
    task.abort();
    assert_eq!(counters.snapshot().sent, 0);
    assert!(receiver.received.lock().expect("lock").is_empty());

    let cfg = SidekickSettings {
        ca: Some(receiver.ca.clone()),
        ..config(receiver.url.clone())
    };
    let (mut sink, task, counters) = spawn(cfg, "node-a".into()).expect("spawn");
    for n in 1..4 {
        sink.write(&anomaly(n)).expect("write");
    }
    wait_for(&counters, "3 sent", |s| s.sent == 3).await;
    shut_down(sink, task).await;
    let received = receiver.received.lock().expect("lock").clone();
    assert_eq!(numbers(&received), vec![1, 2, 3]);
    assert!(received
        .iter()
        .all(|(_, ctype)| ctype.as_deref() == Some("application/json")));
}
