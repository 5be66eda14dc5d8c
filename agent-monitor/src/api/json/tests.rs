//! The generated serde impls print what prost-reflect printed (the daemon's JSON before
//! them), byte for byte: every message is serialized both ways and compared.

use std::sync::OnceLock;

use agent_monitor_api::wkt;
use proptest::prelude::*;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::json;

use super::*;
use crate::api::Origin;
use crate::{
    detect::Anomaly,
    events::{
        ConnectRecord, ExecRecord, ExitRecord, ForkRecord, LostRecord, OpenRecord, Record, Task,
    },
    identity::{
        credentials::{CredentialClass, Owner},
        Workload,
    },
    policy::Priority,
};

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).expect("descriptors"))
}

fn dynamic<M: prost::Message>(msg: &M, name: &str) -> DynamicMessage {
    let desc = pool().get_message_by_name(name).expect(name);
    DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()).expect("decodes")
}

fn options() -> SerializeOptions {
    SerializeOptions::new().use_proto_field_name(true)
}

/// What the daemon printed before: the message encoded, decoded into a prost-reflect
/// `DynamicMessage` of `name` and serialized with the proto field names.
fn reflected<M: prost::Message>(msg: &M, name: &str) -> Result<String, String> {
    let mut out = Vec::new();
    dynamic(msg, name)
        .serialize_with_options(&mut serde_json::Serializer::new(&mut out), &options())
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8(out).expect("UTF-8"))
}

/// What `tail --json` and `replay --format json` printed before: the same, through a
/// `serde_json::Value` (keys sorted).
fn reflected_value<M: prost::Message>(msg: &M, name: &str) -> serde_json::Value {
    dynamic(msg, name)
        .serialize_with_options(serde_json::value::Serializer, &options())
        .expect("prost-reflect serializes it")
}

/// What the daemon prints now.
fn generated<M: Serialize>(msg: &M) -> Result<String, String> {
    serde_json::to_string(msg).map_err(|e| e.to_string())
}

/// Both serializers print the same bytes (for a message whose maps hold at most one entry:
/// prost-reflect lists a map's entries in hash order), and the sorted form `tail --json`
/// and `replay --format json` print is the same too.
fn assert_same<M: prost::Message + Serialize + std::fmt::Debug>(msg: &M, name: &str) -> String {
    let old = reflected(msg, name).expect("prost-reflect serializes it");
    let new = generated(msg).expect("the generated impl serializes it");
    assert_eq!(new, old, "{msg:?}");
    assert_eq!(
        to_value(msg).expect("value").to_string(),
        reflected_value(msg, name).to_string()
    );
    new
}

/// For messages with maps of several entries: the same JSON, keys in any order.
fn assert_same_value<M: prost::Message + Serialize + std::fmt::Debug>(msg: &M, name: &str) {
    assert_eq!(
        to_value(msg).expect("value"),
        reflected_value(msg, name),
        "{msg:?}"
    );
}

fn ts(seconds: i64, nanos: i32) -> Option<wkt::Timestamp> {
    Some(wkt::Timestamp { seconds, nanos })
}

fn workload() -> pb::Workload {
    pb::Workload {
        host: true,
        namespace: "agents".into(),
        pod: "coder-0".into(),
        pod_uid: "0b6a3c1e-uid".into(),
        container: "main".into(),
        container_id: "containerd://cid".into(),
        service_account: "coder".into(),
        agent: "coder".into(),
        tier: pb::Tier::Other as i32,
        labels: [("agent-monitor.dev/agent".to_owned(), "coder".to_owned())].into(),
        cgroup: "/kubepods/pod0b6a3c1e/cid".into(),
        truncated: true,
        labels_truncated: u32::MAX,
    }
}

fn process() -> pb::Process {
    pb::Process {
        pid: 11,
        tgid: 10,
        // Set to the default value: present all the same (proto3 `optional`).
        ppid: Some(0),
        uid: 1000,
        gid: u32::MAX,
        comm: "python3".into(),
        exe: Some(String::new()),
        cgroup_id: u64::MAX,
        ts_boot_ns: 42,
        key: Some(pb::ProcessKey {
            boot_id: "boot-1".into(),
            pid: 10,
            start_time_ns: 99,
        }),
    }
}

fn event_of(kind: pb::event::Kind) -> pb::Event {
    pb::Event {
        seq: 7,
        process: Some(process()),
        workload: Some(workload()),
        run_id: "run-1".into(),
        node: "node-a".into(),
        time: ts(1_795_420_801, 123),
        kind: Some(kind),
    }
}

/// One event of every kind, every field set (optional ones to their default values, too).
fn events() -> Vec<pb::Event> {
    use pb::event::Kind;
    vec![
        event_of(Kind::Open(pb::CredentialAccess {
            path: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            raw_path: "token\n\"quoted\" \u{1} é ✓".into(),
            syscall: pb::Syscall::IoUringOpenat2 as i32,
            flags: 0o2_000_000,
            mode: 0o600,
            dirfd: -100,
            result: i64::MIN,
            error: Some(String::new()),
            class: pb::CredentialClass::ProcEnviron as i32,
            owner: Some(pb::Owner {
                pod_uid: Some("other-uid".into()),
                namespace: Some(String::new()),
                name: None,
                pid: Some(0),
            }),
            matched_by: pb::MatchKind::ProcEnviron as i32,
            path_resolved: true,
            path_truncated: true,
            host_path: Some("/var/lib/kubelet/pods/x/token".into()),
            device: Some("0:52".into()),
            inode: Some(u64::MAX),
        })),
        event_of(Kind::Open(pb::CredentialAccess {
            matched_by: pb::MatchKind::Basename as i32,
            result: -2,
            error: Some("ENOENT".into()),
            owner: Some(pb::Owner::default()),
            ..Default::default()
        })),
        event_of(Kind::Connect(pb::Connect {
            syscall: pb::Syscall::TcpConnect as i32,
            family: pb::AddressFamily::Inet6 as i32,
            dst_addr: "fd00::1".into(),
            dst_port: 443,
            fd: -1,
            result: i64::MAX,
            error: Some("EINPROGRESS".into()),
            attempted: true,
        })),
        event_of(Kind::Exec(pb::Exec {
            filename: "/usr/bin/curl".into(),
            old_pid: 12,
        })),
        event_of(Kind::Fork(pb::Fork { child_pid: 13 })),
        event_of(Kind::Exit(pb::Exit {})),
        pb::Event {
            seq: u64::MAX,
            time: ts(0, 0),
            kind: Some(Kind::Lost(pb::Lost {
                lane: pb::Lane::Credential as i32,
                count: 3,
                total: 12,
                reason: pb::LostReason::Budget as i32,
            })),
            ..Default::default()
        },
        // Nothing set: `{}`.
        pb::Event::default(),
        // Empty messages set: present, as `{}`.
        pb::Event {
            process: Some(pb::Process::default()),
            workload: Some(pb::Workload::default()),
            time: ts(-62_135_596_800, 1_000_000),
            kind: Some(Kind::Connect(pb::Connect::default())),
            ..Default::default()
        },
        pb::Event {
            time: ts(253_402_300_799, 999_999_999),
            kind: Some(Kind::Lost(pb::Lost::default())),
            ..Default::default()
        },
    ]
}

fn fields() -> wkt::Struct {
    let v = json!({
        "proc.pid": 10,
        "proc.exepath": "/usr/bin/python3",
        "fd.name": "/token \"x\"\n",
        "k8s.ns.name": null,
        "agent.suppressed": true,
        "ratio": 0.1,
        "big": 1e300,
        "negative": -2.5,
        "zero": -0.0,
        "list": [1, "two", null, false, [], {}],
        "nested": {"b": {"c": [1.5]}, "a": "x"},
        "": "empty key",
    });
    serde_json::from_value(v).expect("a Struct")
}

fn anomalies() -> Vec<pb::Anomaly> {
    vec![
        pb::Anomaly {
            seq: 3,
            time: ts(1_795_420_801, 500_000_000),
            rule: "foreign-credential-read".into(),
            priority: pb::Priority::Critical as i32,
            output: "coder read prod/api-0's token".into(),
            tags: vec!["k8s".into(), "T1528".into(), String::new()],
            workload: Some(workload()),
            fields: Some(fields()),
            event_seqs: vec![0, 5, u64::MAX],
            run_id: "run-1".into(),
            node: "node-a".into(),
        },
        pb::Anomaly::default(),
        pb::Anomaly {
            priority: pb::Priority::Debug as i32,
            fields: Some(wkt::Struct::default()),
            workload: Some(pb::Workload::default()),
            ..Default::default()
        },
    ]
}

#[test]
fn events_and_anomalies_print_as_prost_reflect_printed_them() {
    for e in events() {
        assert_same(&e, "agent_monitor.v1.Event");
    }
    for a in anomalies() {
        assert_same(&a, "agent_monitor.v1.Anomaly");
    }
}

/// The same line, spelled out: field names, order and forms.
#[test]
fn an_event_line_is_the_proto3_json_mapping() {
    let e = &events()[2];
    assert_eq!(
        assert_same(e, "agent_monitor.v1.Event"),
        concat!(
            r#"{"seq":"7","#,
            r#""process":{"pid":11,"tgid":10,"ppid":0,"uid":1000,"gid":4294967295,"#,
            r#""comm":"python3","exe":"","cgroup_id":"18446744073709551615","#,
            r#""ts_boot_ns":"42","key":{"boot_id":"boot-1","pid":10,"start_time_ns":"99"}},"#,
            r#""workload":{"host":true,"namespace":"agents","pod":"coder-0","#,
            r#""pod_uid":"0b6a3c1e-uid","container":"main","container_id":"containerd://cid","#,
            r#""service_account":"coder","agent":"coder","tier":"TIER_OTHER","#,
            r#""labels":{"agent-monitor.dev/agent":"coder"},"#,
            r#""cgroup":"/kubepods/pod0b6a3c1e/cid","truncated":true,"#,
            r#""labels_truncated":4294967295},"#,
            r#""run_id":"run-1","node":"node-a","time":"2026-11-23T08:00:01.000000123Z","#,
            r#""connect":{"syscall":"SYSCALL_TCP_CONNECT","family":"ADDRESS_FAMILY_INET6","#,
            r#""dst_addr":"fd00::1","dst_port":443,"fd":-1,"result":"9223372036854775807","#,
            r#""error":"EINPROGRESS","attempted":true}}"#
        )
    );
    let a = &anomalies()[0];
    let line = assert_same(a, "agent_monitor.v1.Anomaly");
    assert!(
        line.contains(concat!(
            r#""fields":{"":"empty key","agent.suppressed":true,"big":1e+300,"#,
            r#""fd.name":"/token \"x\"\n","k8s.ns.name":null,"#,
            r#""list":[1.0,"two",null,false,[],{}],"negative":-2.5,"#,
            r#""nested":{"a":"x","b":{"c":[1.5]}},"proc.exepath":"/usr/bin/python3","#,
            r#""proc.pid":10.0,"ratio":0.1,"zero":-0.0}"#
        )),
        "{line}"
    );
    assert!(
        line.contains(r#""event_seqs":["0","5","18446744073709551615"]"#),
        "{line}"
    );
}

/// Labels print sorted (a `BTreeMap`); prost-reflect printed them in hash order.
#[test]
fn labels_print_sorted() {
    let mut e = events().remove(3);
    if let Some(w) = e.workload.as_mut() {
        w.labels = [("b", "2"), ("a", "1"), ("c", "3")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
    }
    assert_same_value(&e, "agent_monitor.v1.Event");
    let line = generated(&e).expect("json");
    assert!(
        line.contains(r#""labels":{"a":"1","b":"2","c":"3"}"#),
        "{line}"
    );
}

/// The other messages of the schema, for `tail`, the journal and the status.
#[test]
fn every_other_message_prints_as_prost_reflect_printed_it() {
    let gap = pb::Gap {
        missed: 9,
        reason: pb::GapReason::NotJournaled as i32,
        at_least: true,
        after: Some(pb::Cursor {
            run_id: "run-0".into(),
            seq: 4,
        }),
    };
    assert_same(&gap, "agent_monitor.v1.Gap");
    for item in [
        pb::stream_events_response::Item::Event(events().remove(0)),
        pb::stream_events_response::Item::Gap(gap.clone()),
    ] {
        let r = pb::StreamEventsResponse { item: Some(item) };
        assert_same(&r, "agent_monitor.v1.StreamEventsResponse");
    }
    let r = pb::StreamAnomaliesResponse {
        item: Some(pb::stream_anomalies_response::Item::Anomaly(
            anomalies().remove(0),
        )),
    };
    assert_same(&r, "agent_monitor.v1.StreamAnomaliesResponse");
    let selector = pb::Selector {
        namespaces: vec!["agents".into()],
        pods: vec!["agents/coder-0".into(), "uid".into()],
        agents: vec![],
        rules: vec!["r".into()],
    };
    let req = pb::StreamEventsRequest {
        filter: Some(pb::Filter {
            allow: Some(selector.clone()),
            deny: Some(pb::Selector::default()),
            kinds: vec![pb::EventKind::Open as i32, pb::EventKind::Lost as i32],
            min_priority: pb::Priority::Warning as i32,
        }),
        resume_after: Some(pb::Cursor::default()),
    };
    assert_same(&req, "agent_monitor.v1.StreamEventsRequest");
    let req = pb::StreamAnomaliesRequest {
        filter: Some(pb::Filter::default()),
        resume_after: None,
    };
    assert_same(&req, "agent_monitor.v1.StreamAnomaliesRequest");
    assert_same(
        &pb::GetStatusRequest {},
        "agent_monitor.v1.GetStatusRequest",
    );
    let one = |k: &str, v: u64| [(k.to_owned(), v)].into_iter().collect();
    let status = pb::GetStatusResponse {
        probes_attached: vec!["openat".into(), "connect".into()],
        events_per_lane: one("credential", u64::MAX),
        drops_per_lane: one("network", 0),
        alerts_per_rule: one("r", 1),
        queue_depths: one("journal", 2),
        identity_cache_size: 3,
        sink_states: [("grpc".to_owned(), "ok".to_owned())].into_iter().collect(),
        clients: 4,
        gaps_sent: 5,
        items_missed: 6,
        watched_filesystems: 7,
        watched_inventory: 8,
        kernel_map_refusals: 9,
        kernel_map_pending: 10,
        run_id: "run-1".into(),
        node: "node-a".into(),
        policy_files: 11,
        cluster_policies: 12,
        cluster_policy_rejections: [("agents/p".to_owned(), "bad cidr".to_owned())]
            .into_iter()
            .collect(),
    };
    assert_same(&status, "agent_monitor.v1.GetStatusResponse");
    let mut many = status.clone();
    many.events_per_lane.insert("network".into(), 1);
    many.events_per_lane.insert("process".into(), 2);
    assert_same_value(&many, "agent_monitor.v1.GetStatusResponse");
    use pb::journal_record::Body;
    for body in [
        Some(Body::Event(events().remove(0))),
        Some(Body::Anomaly(anomalies().remove(0))),
        Some(Body::Start(pb::RunMarker {
            node: "node-a".into(),
            version: "0.1.0".into(),
            reason: "start".into(),
            pid: 1,
            records: 0,
        })),
        Some(Body::Stop(pb::RunMarker {
            records: u64::MAX,
            ..Default::default()
        })),
        None,
    ] {
        let r = pb::JournalRecord {
            run_id: "run-1".into(),
            seq: 2,
            unix_nanos: 1_795_420_801_000_000_123,
            body,
        };
        assert_same(&r, "agent_monitor.v1.JournalRecord");
    }
}

/// What neither can print: a timestamp past year 9999 or before year 1, a NaN or an
/// infinity in a Struct.
#[test]
fn both_refuse_what_proto3_json_cannot_hold() {
    for time in [ts(253_402_300_800, 0), ts(-62_135_596_801, 0)] {
        let e = pb::Event {
            time,
            ..Default::default()
        };
        assert!(reflected(&e, "agent_monitor.v1.Event").is_err());
        assert!(generated(&e).is_err());
    }
    for n in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let a = pb::Anomaly {
            fields: Some(wkt::Struct {
                fields: [(
                    "n".to_owned(),
                    wkt::Value {
                        kind: Some(wkt::value::Kind::NumberValue(n)),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        };
        assert!(reflected(&a, "agent_monitor.v1.Anomaly").is_err());
        assert!(generated(&a).is_err());
    }
}

/// The one difference: an enum value the schema does not name (from a newer daemon)
/// printed as its number; the generated impls refuse it.
#[test]
fn an_unknown_enum_value_is_refused() {
    let e = pb::Event {
        kind: Some(pb::event::Kind::Lost(pb::Lost {
            lane: 99,
            ..Default::default()
        })),
        ..Default::default()
    };
    assert_eq!(
        reflected(&e, "agent_monitor.v1.Event").as_deref(),
        Ok(r#"{"lost":{"lane":99}}"#)
    );
    assert!(generated(&e).is_err());
}

fn task(workload: Workload) -> Task {
    Task {
        time: "2026-11-23T08:00:01.000000123Z".into(),
        ts_boot_ns: 42,
        pid: 11,
        tgid: 10,
        ppid: Some(1),
        uid: 1000,
        gid: 1000,
        comm: "python3".into(),
        exe: Some("/usr/bin/python3".into()),
        cgroup_id: 777,
        start_ns: 99,
        workload: workload.into(),
    }
}

/// The daemon's own records, every kind, converted by their [`Origin`]: the bytes
/// prost-reflect printed (`outputs::jsonl::EventLines` prints these bytes, one line each).
#[test]
fn records_of_every_kind_print_as_before() {
    let w = Workload {
        namespace: Some("agents".into()),
        pod: Some("coder-0".into()),
        pod_uid: Some("uid".into()),
        agent: Some("coder".into()),
        tier: Some("worker".into()),
        labels: [("app".to_owned(), "coder".to_owned())].into(),
        ..Workload::default()
    };
    let records = [
        Record::Open(OpenRecord {
            seq: 1,
            task: task(w.clone()),
            syscall: "openat".into(),
            path: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            raw_path: "token".into(),
            path_resolved: true,
            path_truncated: false,
            matched_by: "volume".into(),
            dirfd: -100,
            flags: 0,
            mode: 0,
            result: 3,
            error: None,
            class: CredentialClass::ServiceAccountToken,
            owner: Some(Owner {
                pod_uid: Some("other".into()),
                namespace: Some("prod".into()),
                name: Some("api-0".into()),
                pid: None,
            }),
            host_path: Some("/var/lib/kubelet/pods/other/token".into()),
            device: Some("0:52".into()),
            inode: Some(7),
        }),
        Record::Connect(ConnectRecord {
            seq: 2,
            task: task(w.clone()),
            syscall: "connect".into(),
            family: "inet".into(),
            dst_addr: "169.254.169.254".into(),
            dst_port: 80,
            fd: 4,
            result: -115,
            error: Some("EINPROGRESS".into()),
            attempted: true,
        }),
        Record::Exec(ExecRecord {
            seq: 3,
            task: task(w.clone()),
            filename: "/bin/sh".into(),
            old_pid: 11,
        }),
        Record::Fork(ForkRecord {
            seq: 4,
            task: task(Workload {
                host: true,
                ..Workload::default()
            }),
            child_pid: 12,
        }),
        Record::Exit(ExitRecord {
            seq: 5,
            task: task(w),
        }),
        Record::Lost(LostRecord {
            seq: 6,
            time: "2026-11-23T07:00:00.5Z".into(),
            lane: "process".into(),
            count: 3,
            total: 12,
            reason: crate::events::LostReason::RingFull,
            workload: None,
        }),
    ];
    let origin = Origin {
        run_id: "run-1".into(),
        node: "node-a".into(),
        boot_id: "boot-1".into(),
    };
    for r in &records {
        assert_same(&origin.event(r), "agent_monitor.v1.Event");
    }
}

#[test]
fn anomalies_of_the_daemon_print_as_before() {
    let a = Anomaly {
        seq: 3,
        time: "2026-11-23T08:00:01.5Z".into(),
        rule: "foreign-credential-read".into(),
        priority: Priority::Critical,
        output: "coder read prod/api-0's token".into(),
        tags: vec!["k8s".into(), "T1528".into()],
        workload: Workload::default(),
        fields: [
            ("proc.pid".to_owned(), json!(10)),
            ("fd.name".to_owned(), json!("/token")),
            ("k8s.ns.name".to_owned(), serde_json::Value::Null),
            ("list".to_owned(), json!([1, {"a": 0.5}])),
        ]
        .into(),
        events: vec![5, 6],
    };
    let origin = Origin {
        run_id: "run-1".into(),
        node: "node-a".into(),
        boot_id: "boot-1".into(),
    };
    let p = origin.anomaly(&a);
    assert_same(&p, "agent_monitor.v1.Anomaly");
    let v = anomaly(&p).expect("json");
    assert_eq!(v["seq"], "3");
    assert_eq!(v["priority"], "PRIORITY_CRITICAL");
    assert_eq!(v["time"], "2026-11-23T08:00:01.500Z");
    assert_eq!(v["fields"]["proc.pid"], 10.0);
}

#[test]
fn events_print_in_the_proto3_json_mapping() {
    let r = Record::Lost(LostRecord {
        seq: 9,
        time: "2026-11-23T07:00:00.000000001Z".into(),
        lane: "credential".into(),
        count: 3,
        total: 12,
        reason: crate::events::LostReason::RingFull,
        workload: None,
    });
    let v = event(&pb::Event::from(&r)).expect("json");
    // uint64 is a string in proto3 JSON.
    assert_eq!(v["seq"], "9");
    assert_eq!(v["lost"]["lane"], "LANE_CREDENTIAL");
    assert_eq!(v["lost"]["total"], "12");
}

/// The generated impls read back what they print.
#[test]
fn events_and_anomalies_read_back() {
    for e in events() {
        let back: pb::Event =
            serde_json::from_str(&generated(&e).expect("json")).expect("reads back");
        assert_eq!(back, e);
    }
    // Struct numbers are doubles: compare what they print.
    for a in anomalies() {
        let line = generated(&a).expect("json");
        let back: pb::Anomaly = serde_json::from_str(&line).expect("reads back");
        assert_eq!(generated(&back).expect("json"), line);
    }
}

// Random messages, compared both ways.

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z/._-]{1,12}", any::<String>()]
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    prop::option::of(text())
}

fn enum_value(max: i32) -> impl Strategy<Value = i32> {
    0..=max
}

fn timestamp() -> impl Strategy<Value = Option<wkt::Timestamp>> {
    prop::option::of(
        (
            -62_135_596_800_i64..=253_402_300_799,
            prop_oneof![
                Just(0),
                (0..1000).prop_map(|ms| ms * 1_000_000),
                (0..1_000_000).prop_map(|us| us * 1000),
                0..1_000_000_000,
            ],
        )
            .prop_map(|(seconds, nanos)| wkt::Timestamp { seconds, nanos }),
    )
}

fn arb_workload() -> impl Strategy<Value = pb::Workload> {
    (
        (any::<bool>(), text(), text(), text(), text(), text()),
        (text(), text(), enum_value(3)),
        prop::collection::btree_map(text(), text(), 0..=1),
        (text(), any::<bool>(), any::<u32>()),
    )
        .prop_map(
            |(
                (host, namespace, pod, pod_uid, container, container_id),
                (service_account, agent, tier),
                labels,
                (cgroup, truncated, labels_truncated),
            )| pb::Workload {
                host,
                namespace,
                pod,
                pod_uid,
                container,
                container_id,
                service_account,
                agent,
                tier,
                labels,
                cgroup,
                truncated,
                labels_truncated,
            },
        )
}

fn arb_process() -> impl Strategy<Value = pb::Process> {
    (
        (
            any::<u32>(),
            any::<u32>(),
            any::<Option<u32>>(),
            any::<u32>(),
        ),
        (any::<u32>(), text(), opt_text(), any::<u64>(), any::<u64>()),
        prop::option::of((text(), any::<u32>(), any::<u64>())),
    )
        .prop_map(
            |((pid, tgid, ppid, uid), (gid, comm, exe, cgroup_id, ts_boot_ns), key)| pb::Process {
                pid,
                tgid,
                ppid,
                uid,
                gid,
                comm,
                exe,
                cgroup_id,
                ts_boot_ns,
                key: key.map(|(boot_id, pid, start_time_ns)| pb::ProcessKey {
                    boot_id,
                    pid,
                    start_time_ns,
                }),
            },
        )
}

fn arb_kind() -> impl Strategy<Value = pb::event::Kind> {
    use pb::event::Kind;
    let open = (
        (text(), text(), enum_value(12), any::<u32>(), any::<u32>()),
        (any::<i32>(), any::<i64>(), opt_text(), enum_value(9)),
        prop::option::of((opt_text(), opt_text(), opt_text(), any::<Option<u32>>())),
        (
            prop::sample::select(vec![0, 1, 2, 4, 5, 6]),
            any::<bool>(),
            any::<bool>(),
        ),
        (opt_text(), opt_text(), any::<Option<u64>>()),
    )
        .prop_map(
            |(
                (path, raw_path, syscall, flags, mode),
                (dirfd, result, error, class),
                owner,
                (matched_by, path_resolved, path_truncated),
                (host_path, device, inode),
            )| {
                Kind::Open(pb::CredentialAccess {
                    path,
                    raw_path,
                    syscall,
                    flags,
                    mode,
                    dirfd,
                    result,
                    error,
                    class,
                    owner: owner.map(|(pod_uid, namespace, name, pid)| pb::Owner {
                        pod_uid,
                        namespace,
                        name,
                        pid,
                    }),
                    matched_by,
                    path_resolved,
                    path_truncated,
                    host_path,
                    device,
                    inode,
                })
            },
        );
    let connect = (
        (enum_value(12), enum_value(2), text(), any::<u32>()),
        (any::<i32>(), any::<i64>(), opt_text(), any::<bool>()),
    )
        .prop_map(
            |((syscall, family, dst_addr, dst_port), (fd, result, error, attempted))| {
                Kind::Connect(pb::Connect {
                    syscall,
                    family,
                    dst_addr,
                    dst_port,
                    fd,
                    result,
                    error,
                    attempted,
                })
            },
        );
    prop_oneof![
        open,
        connect,
        (text(), any::<u32>())
            .prop_map(|(filename, old_pid)| Kind::Exec(pb::Exec { filename, old_pid })),
        any::<u32>().prop_map(|child_pid| Kind::Fork(pb::Fork { child_pid })),
        Just(Kind::Exit(pb::Exit {})),
        (enum_value(3), any::<u64>(), any::<u64>(), enum_value(2)).prop_map(
            |(lane, count, total, reason)| Kind::Lost(pb::Lost {
                lane,
                count,
                total,
                reason
            })
        ),
    ]
}

pub(crate) fn arb_event() -> impl Strategy<Value = pb::Event> {
    (
        (any::<u64>(), prop::option::of(arb_process())),
        (prop::option::of(arb_workload()), text(), text()),
        (timestamp(), prop::option::of(arb_kind())),
    )
        .prop_map(
            |((seq, process), (workload, run_id, node), (time, kind))| pb::Event {
                seq,
                process,
                workload,
                run_id,
                node,
                time,
                kind,
            },
        )
}

fn arb_value() -> impl Strategy<Value = wkt::Value> {
    use wkt::value::Kind;
    let number = prop_oneof![
        any::<f64>().prop_filter("finite", |n| n.is_finite()),
        (-1_000_000_i64..1_000_000).prop_map(|n| n as f64),
    ];
    let leaf = prop_oneof![
        Just(Kind::NullValue(0)),
        any::<bool>().prop_map(Kind::BoolValue),
        number.prop_map(Kind::NumberValue),
        text().prop_map(Kind::StringValue),
    ]
    .prop_map(|k| wkt::Value { kind: Some(k) });
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|values| Kind::ListValue(wkt::ListValue { values })),
            prop::collection::btree_map(text(), inner, 0..4)
                .prop_map(|fields| Kind::StructValue(wkt::Struct { fields })),
        ]
        .prop_map(|k| wkt::Value { kind: Some(k) })
    })
}

fn arb_anomaly() -> impl Strategy<Value = pb::Anomaly> {
    (
        (any::<u64>(), timestamp(), text(), enum_value(8), text()),
        (
            prop::collection::vec(text(), 0..3),
            prop::option::of(arb_workload()),
        ),
        (
            prop::option::of(prop::collection::btree_map(text(), arb_value(), 0..6)),
            prop::collection::vec(any::<u64>(), 0..3),
            text(),
            text(),
        ),
    )
        .prop_map(
            |(
                (seq, time, rule, priority, output),
                (tags, workload),
                (fields, event_seqs, run_id, node),
            )| pb::Anomaly {
                seq,
                time,
                rule,
                priority,
                output,
                tags,
                workload,
                fields: fields.map(|fields| wkt::Struct { fields }),
                event_seqs,
                run_id,
                node,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_events_print_as_before(e in arb_event()) {
        assert_same(&e, "agent_monitor.v1.Event");
    }

    #[test]
    fn random_anomalies_print_as_before(a in arb_anomaly()) {
        assert_same(&a, "agent_monitor.v1.Anomaly");
    }
}
