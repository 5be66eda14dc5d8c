//! The gRPC API end to end: a real tonic client against the real server, on 127.0.0.1:0
//! and on a Unix socket in a temporary directory. No root needed.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use agent_monitor::{
    api::{self, pb, Origin},
    detect::Anomaly,
    events::{ExitRecord, LostRecord, Record, Task},
    identity::Workload,
    outputs::grpc::{
        channel, connect, ClientTls, GrpcError, GrpcServer, GrpcSettings, Hub, StatusSource,
        TlsSettings, DEFAULT_QUEUE_PER_CLIENT,
    },
    policy::Priority,
};
use tokio::{sync::oneshot, task::JoinHandle, time::timeout};
use tonic::transport::Channel;

/// Generous bound so that a broken test fails instead of hanging; nothing asserts speed.
const PATIENCE: Duration = Duration::from_secs(120);

struct FixedStatus;

impl StatusSource for FixedStatus {
    fn status(&self) -> pb::GetStatusResponse {
        pb::GetStatusResponse {
            probes_attached: vec!["tracepoint/syscalls/sys_enter_openat".into()],
            events_per_lane: [("credential".to_owned(), 7)].into(),
            identity_cache_size: 3,
            // The service overwrites these from its hub.
            clients: 999,
            gaps_sent: 999,
            ..Default::default()
        }
    }
}

struct Running {
    tcp: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), GrpcError>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(PATIENCE, self.task)
            .await
            .expect("server stops")
            .expect("server task")
            .expect("server result");
    }

    fn http(&self) -> String {
        format!("http://{}", self.tcp.expect("tcp listener"))
    }
}

async fn start(cfg: GrpcSettings, hub: Hub) -> Running {
    let server = GrpcServer::bind(&cfg).await.expect("bind");
    let tcp = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(hub, Arc::new(FixedStatus), async move {
        let _ = stopped.await;
    }));
    Running {
        tcp,
        stop: Some(stop),
        task,
    }
}

fn tcp_config(queue: usize) -> GrpcSettings {
    GrpcSettings {
        tcp: Some("127.0.0.1:0".parse().expect("addr")),
        queue_per_client: queue,
        ..GrpcSettings::default()
    }
}

fn workload(ns: &str, pod: &str, agent: &str) -> Workload {
    Workload {
        namespace: Some(ns.into()),
        pod: Some(pod.into()),
        pod_uid: Some(format!("uid-{ns}-{pod}")),
        agent: Some(agent.into()),
        ..Workload::default()
    }
}

fn exit(seq: u64, w: Workload) -> Record {
    Record::Exit(ExitRecord {
        seq,
        task: Task {
            time: "2026-11-23T08:00:00.000000001Z".into(),
            ts_boot_ns: seq,
            pid: 100,
            tgid: 100,
            ppid: Some(1),
            uid: 0,
            gid: 0,
            comm: "agent".into(),
            exe: None,
            cgroup_id: 1,
            start_ns: 0,
            workload: w.into(),
        },
    })
}

fn anomaly(seq: u64, rule: &str, priority: Priority, w: Workload) -> Anomaly {
    Anomaly {
        seq,
        time: "2026-11-23T08:00:00Z".into(),
        rule: rule.into(),
        priority,
        output: format!("anomaly {seq}"),
        tags: vec!["k8s".into()],
        workload: w,
        fields: BTreeMap::new(),
        events: vec![seq],
    }
}

/// A filter of `allow` only.
fn allow(namespaces: &[&str], pods: &[&str], agents: &[&str], rules: &[&str]) -> pb::Filter {
    pb::Filter {
        allow: Some(selector(namespaces, pods, agents, rules)),
        ..Default::default()
    }
}

fn selector(namespaces: &[&str], pods: &[&str], agents: &[&str], rules: &[&str]) -> pb::Selector {
    let v = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect();
    pb::Selector {
        namespaces: v(namespaces),
        pods: v(pods),
        agents: v(agents),
        rules: v(rules),
    }
}

/// Waits until the hub has `n` streaming clients (the server subscribes when a call
/// arrives, which may be after the client sees response headers).
async fn wait_clients(hub: &Hub, n: usize) {
    timeout(PATIENCE, async {
        while hub.clients() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("clients subscribed");
}

/// Reads event seqs until `last` arrives; panics on a gap.
async fn event_seqs_until(
    stream: &mut tonic::Streaming<pb::StreamEventsResponse>,
    last: u64,
) -> Vec<u64> {
    use pb::stream_events_response::Item;
    let mut seqs = Vec::new();
    timeout(PATIENCE, async {
        loop {
            let msg = stream
                .message()
                .await
                .expect("stream ok")
                .expect("stream open");
            match msg.item.expect("item") {
                Item::Event(e) => {
                    seqs.push(e.seq);
                    if e.seq == last {
                        return;
                    }
                }
                Item::Gap(g) => panic!("unexpected gap of {}", g.missed),
            }
        }
    })
    .await
    .expect("events arrive");
    seqs
}

async fn anomaly_seqs_until(
    stream: &mut tonic::Streaming<pb::StreamAnomaliesResponse>,
    last: u64,
) -> Vec<u64> {
    use pb::stream_anomalies_response::Item;
    let mut seqs = Vec::new();
    timeout(PATIENCE, async {
        loop {
            let msg = stream
                .message()
                .await
                .expect("stream ok")
                .expect("stream open");
            match msg.item.expect("item") {
                Item::Anomaly(a) => {
                    seqs.push(a.seq);
                    if a.seq == last {
                        return;
                    }
                }
                Item::Gap(g) => panic!("unexpected gap of {}", g.missed),
            }
        }
    })
    .await
    .expect("anomalies arrive");
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomaly_filters_select_namespace_agent_rule_and_priority() {
    let hub = Hub::new(1024, Origin::default());
    let server = start(tcp_config(1024), hub.clone()).await;
    let mut client = connect(&server.http(), None).await.expect("connect");

    let filters = [
        pb::Filter::default(),
        allow(&["prod"], &[], &[], &[]),
        allow(&[], &[], &["coder"], &[]),
        allow(&[], &[], &[], &["cloud-metadata-contact"]),
        pb::Filter {
            min_priority: pb::Priority::Critical as i32,
            ..Default::default()
        },
        allow(&["prod"], &[], &["coder"], &[]),
        // Deny: any list that holds the item's value refuses it.
        pb::Filter {
            deny: Some(selector(&["dev"], &[], &["other"], &[])),
            ..Default::default()
        },
    ];
    let mut streams = Vec::new();
    for f in filters {
        streams.push(
            client
                .stream_anomalies(pb::StreamAnomaliesRequest {
                    filter: Some(f),
                    resume_after: None,
                })
                .await
                .expect("subscribe")
                .into_inner(),
        );
    }
    wait_clients(&hub, streams.len()).await;

    let published = [
        anomaly(
            1,
            "egress-outside-allowlist",
            Priority::Warning,
            workload("prod", "a", "coder"),
        ),
        anomaly(
            2,
            "cloud-metadata-contact",
            Priority::Error,
            workload("dev", "b", "coder"),
        ),
        anomaly(
            3,
            "foreign-credential-read",
            Priority::Critical,
            workload("dev", "c", "helper"),
        ),
        anomaly(
            4,
            "cloud-metadata-contact",
            Priority::Emergency,
            workload("prod", "d", "helper"),
        ),
        anomaly(
            5,
            "baseline-deviation",
            Priority::Notice,
            workload("staging", "e", "other"),
        ),
        // The sentinel: matches every filter above.
        anomaly(
            6,
            "cloud-metadata-contact",
            Priority::Critical,
            workload("prod", "f", "coder"),
        ),
    ];
    for a in &published {
        hub.publish_anomaly(a);
    }

    let expected: [&[u64]; 7] = [
        &[1, 2, 3, 4, 5, 6],
        &[1, 4, 6],
        &[1, 2, 6],
        &[2, 4, 6],
        &[3, 4, 6],
        &[1, 6],
        &[1, 4, 6],
    ];
    for (stream, want) in streams.iter_mut().zip(expected) {
        assert_eq!(anomaly_seqs_until(stream, 6).await, want);
    }

    // The anomaly arrives whole.
    let mut all = client
        .stream_anomalies(pb::StreamAnomaliesRequest::default())
        .await
        .expect("subscribe")
        .into_inner();
    wait_clients(&hub, streams.len() + 1).await;
    let mut a = anomaly(
        7,
        "foreign-credential-read",
        Priority::Critical,
        workload("prod", "a", "coder"),
    );
    a.fields
        .insert("proc.name".into(), serde_json::json!("cat"));
    hub.publish_anomaly(&a);
    let msg = timeout(PATIENCE, all.message())
        .await
        .expect("arrives")
        .expect("ok")
        .expect("open");
    let Some(pb::stream_anomalies_response::Item::Anomaly(got)) = msg.item else {
        panic!("not an anomaly: {msg:?}");
    };
    assert_eq!(got, pb::Anomaly::from(&a));
    assert_eq!(got.priority(), pb::Priority::Critical);
    assert_eq!(
        api::fields_from_pb(got.fields.as_ref())["proc.name"],
        serde_json::json!("cat")
    );
    assert_eq!(Anomaly::try_from(&got).expect("back").rule, a.rule);

    drop(streams);
    drop(all);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_filters_select_namespace_pod_and_agent() {
    let hub = Hub::new(1024, Origin::default());
    let server = start(tcp_config(1024), hub.clone()).await;
    let mut client = connect(&server.http(), None).await.expect("connect");

    let filters = [
        pb::Filter::default(),
        allow(&["prod"], &[], &[], &[]),
        allow(&[], &[], &["coder"], &[]),
        // `namespace/name` or a bare name.
        allow(&[], &["dev/b", "f"], &[], &[]),
        // Rules and priority do not apply to events.
        pb::Filter {
            min_priority: pb::Priority::Emergency as i32,
            ..allow(&[], &[], &[], &["no-such-rule"])
        },
        // Kinds: the server sends no other kind (here: no loss report).
        pb::Filter {
            kinds: vec![pb::EventKind::Exit as i32],
            ..Default::default()
        },
        // Deny by pod; loss reports are refused by no workload list.
        pb::Filter {
            deny: Some(selector(&[], &["dev/b"], &[], &[])),
            ..Default::default()
        },
    ];
    let mut streams = Vec::new();
    for f in filters {
        streams.push(
            client
                .stream_events(pb::StreamEventsRequest {
                    filter: Some(f),
                    resume_after: None,
                })
                .await
                .expect("subscribe")
                .into_inner(),
        );
    }
    wait_clients(&hub, streams.len()).await;

    hub.publish_event(&exit(1, workload("prod", "a", "coder")));
    hub.publish_event(&exit(2, workload("dev", "b", "helper")));
    hub.publish_event(&exit(3, workload("dev", "c", "coder")));
    // Lost records carry no workload and reach every event client.
    hub.publish_event(&Record::Lost(LostRecord {
        seq: 4,
        time: "2026-11-23T08:00:00Z".into(),
        lane: "credential".into(),
        count: 1,
        total: 1,
        reason: agent_monitor::events::LostReason::RingFull,
        workload: None,
    }));
    hub.publish_event(&exit(5, workload("staging", "e", "other")));
    // The sentinel matches every filter.
    let sentinel = exit(6, workload("prod", "f", "coder"));
    hub.publish_event(&sentinel);

    let expected: [&[u64]; 7] = [
        &[1, 2, 3, 4, 5, 6],
        &[1, 4, 6],
        &[1, 3, 4, 6],
        &[2, 4, 6],
        &[1, 2, 3, 4, 5, 6],
        &[1, 2, 3, 5, 6],
        &[1, 3, 4, 5, 6],
    ];
    for (stream, want) in streams.iter_mut().zip(expected) {
        assert_eq!(event_seqs_until(stream, 6).await, want);
    }
    drop(streams);
    server.stop().await;
}

/// The pipeline hands the hub its events with the workload kept apart (shared, not
/// copied into each); a client still receives the whole event, workload included, the
/// same message the record converts to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_event_carries_its_whole_workload() {
    let origin = Origin {
        run_id: "run-1".into(),
        node: "node-a".into(),
        boot_id: "boot-1".into(),
    };
    let hub = Hub::new(16, origin.clone());
    let server = start(tcp_config(16), hub.clone()).await;
    let mut client = connect(&server.http(), None).await.expect("connect");
    let mut stream = client
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .expect("subscribe")
        .into_inner();
    wait_clients(&hub, 1).await;
    let mut w = workload("prod", "a", "coder");
    w.labels = BTreeMap::from([("team".to_owned(), "research".to_owned())]);
    let record = exit(1, w);
    let (api, shared) = origin.event_parts(record.clone());
    assert!(api.workload.is_none() && shared.is_some(), "kept apart");
    hub.publish_events(&[Arc::new(agent_monitor::outputs::EventItem {
        api: Arc::new(api),
        workload: shared,
    })]);
    use pb::stream_events_response::Item;
    let got = timeout(PATIENCE, stream.message())
        .await
        .expect("in time")
        .expect("ok")
        .and_then(|m| m.item);
    let Some(Item::Event(e)) = got else {
        panic!("expected the event, got {got:?}");
    };
    let w = e.workload.as_ref().expect("workload");
    assert_eq!(
        (w.namespace.as_str(), w.pod.as_str(), w.agent.as_str()),
        ("prod", "a", "coder")
    );
    assert_eq!(w.labels.get("team").map(String::as_str), Some("research"));
    assert_eq!(e, origin.event(&record));
    drop(stream);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_delays_neither_fast_client_nor_publisher_and_gets_exact_gap() {
    const TOTAL: u64 = 100_000;
    const BATCH: u64 = 512;
    let hub = Hub::new(1024, Origin::default());
    let server = start(tcp_config(1024), hub.clone()).await;
    let mut fast_client = connect(&server.http(), None).await.expect("connect");
    let mut slow_client = connect(&server.http(), None).await.expect("connect");

    let mut slow = slow_client
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .expect("subscribe")
        .into_inner();
    let mut fast = fast_client
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .expect("subscribe")
        .into_inner();
    wait_clients(&hub, 2).await;

    // The fast client reads everything, reporting progress.
    let (progress, mut received) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        use pb::stream_events_response::Item;
        let mut next = 0u64;
        while next < TOTAL {
            let msg = fast.message().await.expect("ok").expect("open");
            match msg.item.expect("item") {
                Item::Event(e) => {
                    assert_eq!(e.seq, next, "fast client out of order");
                    next += 1;
                    let _ = progress.send(next);
                }
                Item::Gap(g) => panic!("fast client got a gap of {}", g.missed),
            }
        }
        next
    });

    // Publish in batches smaller than a queue, pacing only on the fast client (the test's
    // own pacing, so that the fast client never overflows). `publish_event` is a plain
    // function: were it waiting for the slow client, this loop would never finish.
    let w = workload("prod", "a", "coder");
    timeout(PATIENCE, async {
        let mut seq = 0;
        while seq < TOTAL {
            let end = (seq + BATCH).min(TOTAL);
            for s in seq..end {
                hub.publish_event(&exit(s, w.clone()));
            }
            seq = end;
            received
                .wait_for(|n| *n >= seq)
                .await
                .expect("fast reader alive");
        }
    })
    .await
    .expect("publishing 100k events completes while a client is stalled");
    let fast_got = timeout(PATIENCE, reader)
        .await
        .expect("fast client finishes")
        .expect("fast reader");
    assert_eq!(fast_got, TOTAL);
    assert!(hub.missed() > 0, "the slow client must have overflowed");

    // Now the slow client reads: some events, then the gap accounting for all the rest.
    use pb::stream_events_response::Item;
    let (mut events, mut missed, mut gaps, mut last) = (0u64, 0u64, 0u64, None::<u64>);
    timeout(PATIENCE, async {
        while events + missed < TOTAL {
            let msg = slow.message().await.expect("ok").expect("open");
            match msg.item.expect("item") {
                Item::Event(e) => {
                    assert!(last.is_none_or(|l| e.seq > l), "slow client out of order");
                    last = Some(e.seq);
                    events += 1;
                }
                Item::Gap(g) => {
                    gaps += 1;
                    missed += g.missed;
                }
            }
        }
    })
    .await
    .expect("slow client catches up");
    assert!(gaps >= 1, "the slow client was told of its loss");
    assert_eq!(events + missed, TOTAL);
    assert_eq!(missed, hub.missed(), "only the slow client lost events");
    assert_eq!(hub.gaps_sent(), gaps);

    // Status reports the hub's numbers.
    let status = fast_client
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    // The fast reader's stream ended with its task; the slow one is still subscribed.
    assert_eq!(status.clients, 1);
    assert_eq!(status.gaps_sent, gaps);
    assert_eq!(status.items_missed, missed);

    drop(slow);
    server.stop().await;
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A CA, a server certificate for localhost and 127.0.0.1, and a client certificate.
    fn generate() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("write pem");
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "agent-monitor test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("ca key"))
            .expect("ca cert");
        write("ca.pem", &ca.pem());

        let leaf = |names: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose, stem: &str| {
            let mut p = CertificateParams::new(names).expect("leaf params");
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![eku];
            let key = KeyPair::generate().expect("leaf key");
            let cert = p.signed_by(&key, &ca).expect("leaf cert");
            write(&format!("{stem}.pem"), &cert.pem());
            write(&format!("{stem}-key.pem"), &key.serialize_pem());
        };
        leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            "agent-monitor",
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        leaf(
            vec!["tail".into()],
            "tail",
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        Self { dir }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate() {
    let pki = Pki::generate();
    let cfg = GrpcSettings {
        tls: Some(TlsSettings {
            cert: pki.path("server.pem"),
            key: pki.path("server-key.pem"),
            client_ca: Some(pki.path("ca.pem")),
        }),
        ..tcp_config(64)
    };
    let hub = Hub::new(64, Origin::default());
    let server = start(cfg, hub).await;
    let endpoint = format!("https://{}", server.tcp.expect("tcp"));

    let with_cert = ClientTls {
        ca: pki.path("ca.pem"),
        cert: Some(pki.path("client.pem")),
        key: Some(pki.path("client-key.pem")),
        domain: None,
    };
    let mut client = connect(&endpoint, Some(&with_cert))
        .await
        .expect("mTLS connect");
    let status = client
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("status over mTLS")
        .into_inner();
    assert_eq!(status.identity_cache_size, 3);
    assert_eq!(status.probes_attached.len(), 1);
    assert_eq!(status.events_per_lane["credential"], 7);
    assert_eq!(status.clients, 0, "filled in from the hub");

    // Also by name rather than address.
    let by_name = ClientTls {
        domain: Some("localhost".into()),
        ..with_cert.clone()
    };
    let mut client = connect(&endpoint, Some(&by_name))
        .await
        .expect("connect by name");
    client
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("status by name");

    // Without a certificate: the handshake or the first call fails.
    let without_cert = ClientTls {
        ca: pki.path("ca.pem"),
        cert: None,
        key: None,
        domain: None,
    };
    let rejected = async {
        let mut client = connect(&endpoint, Some(&without_cert)).await?;
        client.get_status(pb::GetStatusRequest {}).await?;
        Ok::<_, GrpcError>(())
    }
    .await;
    assert!(
        rejected.is_err(),
        "a client without a certificate was served"
    );

    // Plaintext is not served on a TLS port either.
    let plaintext = async {
        let mut client = connect(&format!("http://{}", server.tcp.expect("tcp")), None).await?;
        client.get_status(pb::GetStatusRequest {}).await?;
        Ok::<_, GrpcError>(())
    }
    .await;
    assert!(plaintext.is_err(), "a plaintext client was served");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_is_private_replaces_a_stale_file_and_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent-monitor.sock");
    // A stale socket file from a previous run.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    assert!(path.exists());

    let hub = Hub::new(64, Origin::default());
    let cfg = GrpcSettings {
        unix: Some(path.clone()),
        ..GrpcSettings::default()
    };
    let server = start(cfg.clone(), hub.clone()).await;
    let meta = std::fs::metadata(&path).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // No staging leftovers next to it.
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(entries, [std::ffi::OsString::from("agent-monitor.sock")]);

    // A second server on the same live socket is refused.
    match GrpcServer::bind(&cfg).await {
        Err(GrpcError::SocketInUse(p)) => assert_eq!(p, path),
        other => panic!("expected SocketInUse, got {other:?}"),
    }

    let endpoint = format!("unix:{}", path.display());
    let mut client = connect(&endpoint, None)
        .await
        .expect("connect over unix socket");
    let status = client
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.identity_cache_size, 3);

    let mut events = client
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .expect("subscribe")
        .into_inner();
    wait_clients(&hub, 1).await;
    hub.publish_event(&exit(1, workload("prod", "a", "coder")));
    assert_eq!(event_seqs_until(&mut events, 1).await, [1]);
    drop(events);

    server.stop().await;
    assert!(!path.exists(), "socket removed on shutdown");
}

async fn health_and_reflection(channel: Channel) {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let mut health = HealthClient::new(channel.clone());
    let resp = health
        .check(HealthCheckRequest {
            service: pb::SERVICE_NAME.into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(resp.status(), ServingStatus::Serving);

    {
        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut client = ServerReflectionClient::new(channel.clone());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .expect("reflection v1")
            .into_inner();
        let resp = stream.message().await.expect("ok").expect("response");
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected reflection response {resp:?}");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(
            names.contains(&"agent_monitor.v1.AgentMonitor"),
            "{names:?}"
        );
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

        // The descriptor of the service resolves, with its Timestamp import.
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "agent_monitor.v1.AgentMonitor".into(),
            )),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .expect("reflection v1")
            .into_inner();
        let resp = stream.message().await.expect("ok").expect("response");
        let Some(MessageResponse::FileDescriptorResponse(files)) = resp.message_response else {
            panic!("unexpected reflection response {resp:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
    {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut client = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .expect("reflection v1alpha")
            .into_inner();
        let resp = stream.message().await.expect("ok").expect("response");
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected reflection response {resp:?}");
        };
        assert!(list
            .service
            .iter()
            .any(|s| s.name == "agent_monitor.v1.AgentMonitor"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving_and_reflection_lists_the_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("am.sock");
    let cfg = GrpcSettings {
        unix: Some(sock.clone()),
        ..tcp_config(64)
    };
    let server = start(cfg, Hub::new(64, Origin::default())).await;
    health_and_reflection(channel(&server.http(), None).await.expect("tcp channel")).await;
    health_and_reflection(
        channel(&format!("unix:{}", sock.display()), None)
            .await
            .expect("unix channel"),
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn configuration_errors_are_reported() {
    assert!(matches!(
        GrpcServer::bind(&GrpcSettings::default()).await,
        Err(GrpcError::NoListener)
    ));
    let missing = GrpcSettings {
        tls: Some(TlsSettings {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
        }),
        ..tcp_config(8)
    };
    assert!(matches!(
        GrpcServer::bind(&missing).await,
        Err(GrpcError::TlsFile { .. })
    ));
    // A regular file where the socket should go is left alone.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").expect("write");
    let cfg = GrpcSettings {
        unix: Some(file.clone()),
        ..GrpcSettings::default()
    };
    assert!(matches!(
        GrpcServer::bind(&cfg).await,
        Err(GrpcError::UnixSocket { .. })
    ));
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");
    assert!(matches!(
        channel("https://127.0.0.1:1", None).await,
        Err(GrpcError::Config(_))
    ));
    assert_eq!(
        GrpcSettings::default().queue_per_client,
        DEFAULT_QUEUE_PER_CLIENT
    );
}
