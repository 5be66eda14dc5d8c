//! The admin server over real HTTP: `/metrics` contents, `/healthz` liveness (probes
//! attached, the daemon's loops turning; never kernel activity), `/readyz`, and 404 for
//! anything else. No root needed.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_monitor::outputs::metrics::{
    serve_admin_on, Health, Heartbeat, Metrics, OPENMETRICS_CONTENT_TYPE,
};
use http_body_util::{BodyExt as _, Empty};
use hyper::{body::Bytes, header, Uri};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// Short enough that the test waits little for a stall, long enough that a request sent
/// right after a heartbeat lands well inside it.
const STALL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(30);

struct Server {
    base: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), agent_monitor::outputs::metrics::AdminError>>,
}

async fn start(metrics: Arc<Metrics>, health: Arc<Health>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_admin_on(listener, metrics, health, async move {
        let _ = stopped.await;
    }));
    Server {
        base: format!("http://{addr}"),
        stop,
        task,
    }
}

/// A plain HTTP/1.1 client.
type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(client: &HttpClient, url: &str) -> (u16, String, String) {
    let uri: Uri = url.parse().expect("uri");
    let resp = client.get(uri).await.expect("request");
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().expect("ascii content type").to_owned())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let body = String::from_utf8(body.to_vec()).expect("utf-8 body");
    (status, ctype, body)
}

fn assert_line(body: &str, line: &str) {
    assert!(
        body.lines().any(|l| l == line),
        "missing line {line:?} in:\n{body}"
    );
}

#[tokio::test]
async fn admin_endpoints_over_http() {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(STALL));
    let server = start(metrics.clone(), health.clone()).await;
    let client = http_client();
    let url = |path: &str| format!("{}{path}", server.base);

    // --- /metrics ---
    for _ in 0..3 {
        metrics.record_events("credential", 1);
    }
    for _ in 0..2 {
        metrics.record_events("network", 1);
    }
    metrics.record_events("process", 1);
    metrics.record_lost("network", 7);
    metrics.record_lost("process", 1);
    metrics.record_lost("process", 4);
    metrics.record_alert("Agent reads foreign credential", "CRITICAL");
    metrics.record_alert("Agent reads foreign credential", "CRITICAL");
    metrics.record_alert("Unexpected egress", "WARNING");
    metrics.observe_latency(Duration::from_micros(250));
    metrics.observe_latency(Duration::from_millis(30));
    metrics.observe_latency(Duration::from_secs(20));
    metrics.set_queue_depth("records", 12);
    metrics.set_identity_cache_size(5);
    metrics.set_probes_attached(9);
    metrics.set_grpc_clients(2);
    metrics.record_sink_failure("falcosidekick");

    let (status, ctype, body) = get(&client, &url("/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(ctype, OPENMETRICS_CONTENT_TYPE);
    assert_line(&body, "agent_monitor_events_total{lane=\"credential\"} 3");
    assert_line(&body, "agent_monitor_events_total{lane=\"network\"} 2");
    assert_line(&body, "agent_monitor_events_total{lane=\"process\"} 1");
    assert_line(
        &body,
        "agent_monitor_events_lost_total{lane=\"credential\"} 0",
    );
    assert_line(&body, "agent_monitor_events_lost_total{lane=\"network\"} 7");
    assert_line(&body, "agent_monitor_events_lost_total{lane=\"process\"} 5");
    assert_line(
        &body,
        "agent_monitor_alerts_total{rule=\"Agent reads foreign credential\",priority=\"CRITICAL\"} 2",
    );
    assert_line(
        &body,
        "agent_monitor_alerts_total{rule=\"Unexpected egress\",priority=\"WARNING\"} 1",
    );
    assert_line(
        &body,
        "# TYPE agent_monitor_pipeline_latency_seconds histogram",
    );
    assert_line(
        &body,
        "# UNIT agent_monitor_pipeline_latency_seconds seconds",
    );
    assert_line(&body, "agent_monitor_pipeline_latency_seconds_count 3");
    assert_line(
        &body,
        "agent_monitor_pipeline_latency_seconds_bucket{le=\"0.0001\"} 0",
    );
    assert_line(
        &body,
        "agent_monitor_pipeline_latency_seconds_bucket{le=\"0.00025\"} 1",
    );
    assert_line(
        &body,
        "agent_monitor_pipeline_latency_seconds_bucket{le=\"0.05\"} 2",
    );
    assert_line(
        &body,
        "agent_monitor_pipeline_latency_seconds_bucket{le=\"10.0\"} 2",
    );
    assert_line(
        &body,
        "agent_monitor_pipeline_latency_seconds_bucket{le=\"+Inf\"} 3",
    );
    assert_line(&body, "agent_monitor_queue_depth{queue=\"records\"} 12");
    assert_line(&body, "agent_monitor_identity_cache_size 5");
    assert_line(&body, "agent_monitor_probes_attached 9");
    assert_line(&body, "agent_monitor_grpc_clients 2");
    assert_line(
        &body,
        "agent_monitor_sink_failures_total{sink=\"falcosidekick\"} 1",
    );
    // Read from the health state at scrape time: no kernel record yet, so the time since
    // the state was created.
    assert!(
        body.lines()
            .any(|l| l.starts_with("agent_monitor_kernel_silence_seconds ")),
        "{body}"
    );
    assert_line(&body, "# TYPE agent_monitor_kernel_silence_seconds gauge");
    assert_eq!(body.lines().last(), Some("# EOF"));

    // --- /healthz ---
    let (status, _, body) = get(&client, &url("/healthz")).await;
    assert_eq!(status, 503, "no probes yet: {body}");
    assert_eq!(body, "no probes attached\n");

    health.set_probes_attached(4);
    // No kernel record ever: a quiet node is alive.
    let (status, _, body) = get(&client, &url("/healthz")).await;
    assert_eq!(status, 200, "probes, no activity: {body}");
    assert_eq!(body, "ok\n");

    let pipeline = Heartbeat::new();
    health.watch_loop("pipeline", pipeline.clone());
    pipeline.beat();
    let (status, _, body) = get(&client, &url("/healthz")).await;
    assert_eq!(status, 200, "fresh heartbeat: {body}");

    // A loop that stops turning fails health, by name, once the window has passed.
    let deadline = Instant::now() + TIMEOUT;
    let body = loop {
        let (status, _, body) = get(&client, &url("/healthz")).await;
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200, "unexpected status, body {body}");
        assert!(Instant::now() < deadline, "/healthz never saw the stall");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        body.starts_with("pipeline loop stalled for ") && body.ends_with(" ms (limit 1000 ms)\n"),
        "stall reason: {body:?}"
    );
    assert!(pipeline.age() > STALL, "stalled before the window passed");

    // A new turn revives it; kernel activity alone would not have.
    pipeline.beat();
    let (status, _, body) = get(&client, &url("/healthz")).await;
    assert_eq!(status, 200, "revived: {body}");

    // Detaching probes fails it regardless of the loops.
    health.set_probes_attached(0);
    pipeline.beat();
    let (status, _, _) = get(&client, &url("/healthz")).await;
    assert_eq!(status, 503);

    // --- /readyz ---
    let (status, _, body) = get(&client, &url("/readyz")).await;
    assert_eq!(status, 503);
    assert_eq!(body, "not ready\n");
    health.set_ready(true);
    let (status, _, body) = get(&client, &url("/readyz")).await;
    assert_eq!(status, 200);
    assert_eq!(body, "ready\n");

    // --- anything else ---
    for path in ["/", "/nope", "/metrics/extra", "/healthz/"] {
        let (status, _, _) = get(&client, &url(path)).await;
        assert_eq!(status, 404, "{path}");
    }

    // --- graceful shutdown ---
    drop(client);
    server.stop.send(()).expect("server still running");
    let result = tokio::time::timeout(TIMEOUT, server.task)
        .await
        .expect("server stopped within timeout")
        .expect("server task did not panic");
    assert!(result.is_ok(), "serve returned {result:?}");
}

#[tokio::test]
async fn bind_failure_is_reported() {
    let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = taken.local_addr().expect("local addr");
    let err = agent_monitor::outputs::metrics::serve_admin(
        addr,
        Arc::new(Metrics::new()),
        Arc::new(Health::default()),
        std::future::pending(),
    )
    .await
    .expect_err("address in use");
    assert!(
        matches!(err, agent_monitor::outputs::metrics::AdminError::Bind { addr: a, .. } if a == addr),
        "{err:?}"
    );
}
