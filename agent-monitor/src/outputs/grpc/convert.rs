//! Conversions between the daemon's model ([`Record`], [`Anomaly`]) and the wire messages.
//!
//! The forward direction is what the server sends. The reverse direction lets a client
//! (`tail --json`) print exactly the JSON the daemon's own JSON-lines output would.

use std::{collections::BTreeMap, time::SystemTime};

use prost_types::Timestamp;
use serde_json::Value;

use super::{pb, GrpcError};
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

/// Parses an RFC 3339 time (as the daemon writes it) into a protobuf timestamp; `None` when
/// the text is not such a time.
pub fn timestamp(rfc3339: &str) -> Option<Timestamp> {
    humantime::parse_rfc3339_weak(rfc3339)
        .ok()
        .map(Timestamp::from)
}

/// Formats a protobuf timestamp as RFC 3339 with nanoseconds (UTC); `None` when it is out
/// of range.
pub fn rfc3339(ts: &Timestamp) -> Option<String> {
    let t = SystemTime::try_from(*ts).ok()?;
    Some(humantime::format_rfc3339_nanos(t).to_string())
}

fn rfc3339_or_empty(ts: Option<&Timestamp>) -> String {
    ts.and_then(rfc3339).unwrap_or_default()
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_default()
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// The wire priority of a Falco priority.
pub fn priority_to_pb(p: Priority) -> pb::Priority {
    match p {
        Priority::Emergency => pb::Priority::Emergency,
        Priority::Alert => pb::Priority::Alert,
        Priority::Critical => pb::Priority::Critical,
        Priority::Error => pb::Priority::Error,
        Priority::Warning => pb::Priority::Warning,
        Priority::Notice => pb::Priority::Notice,
        Priority::Informational => pb::Priority::Informational,
        Priority::Debug => pb::Priority::Debug,
    }
}

/// The Falco priority of a wire priority; `None` for `PRIORITY_UNSPECIFIED`.
pub fn priority_from_pb(p: pb::Priority) -> Option<Priority> {
    Some(match p {
        pb::Priority::Unspecified => return None,
        pb::Priority::Emergency => Priority::Emergency,
        pb::Priority::Alert => Priority::Alert,
        pb::Priority::Critical => Priority::Critical,
        pb::Priority::Error => Priority::Error,
        pb::Priority::Warning => Priority::Warning,
        pb::Priority::Notice => Priority::Notice,
        pb::Priority::Informational => Priority::Informational,
        pb::Priority::Debug => Priority::Debug,
    })
}

/// Falco's name of a priority (`Critical`, `Warning`, ...).
pub fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::Emergency => "Emergency",
        Priority::Alert => "Alert",
        Priority::Critical => "Critical",
        Priority::Error => "Error",
        Priority::Warning => "Warning",
        Priority::Notice => "Notice",
        Priority::Informational => "Informational",
        Priority::Debug => "Debug",
    }
}

fn class_to_pb(c: CredentialClass) -> pb::CredentialClass {
    match c {
        CredentialClass::ServiceAccountToken => pb::CredentialClass::ServiceAccountToken,
        CredentialClass::ProjectedToken => pb::CredentialClass::ProjectedToken,
        CredentialClass::SecretVolume => pb::CredentialClass::SecretVolume,
        CredentialClass::NodeKubeconfig => pb::CredentialClass::NodeKubeconfig,
        CredentialClass::NodePki => pb::CredentialClass::NodePki,
        CredentialClass::CloudCredentials => pb::CredentialClass::CloudCredentials,
        CredentialClass::ProcEnviron => pb::CredentialClass::ProcEnviron,
        CredentialClass::NonSecret => pb::CredentialClass::NonSecret,
        CredentialClass::Other => pb::CredentialClass::Other,
    }
}

fn class_from_pb(c: pb::CredentialClass) -> CredentialClass {
    match c {
        pb::CredentialClass::ServiceAccountToken => CredentialClass::ServiceAccountToken,
        pb::CredentialClass::ProjectedToken => CredentialClass::ProjectedToken,
        pb::CredentialClass::SecretVolume => CredentialClass::SecretVolume,
        pb::CredentialClass::NodeKubeconfig => CredentialClass::NodeKubeconfig,
        pb::CredentialClass::NodePki => CredentialClass::NodePki,
        pb::CredentialClass::CloudCredentials => CredentialClass::CloudCredentials,
        pb::CredentialClass::ProcEnviron => CredentialClass::ProcEnviron,
        pb::CredentialClass::NonSecret => CredentialClass::NonSecret,
        pb::CredentialClass::Other | pb::CredentialClass::Unspecified => CredentialClass::Other,
    }
}

impl From<&Workload> for pb::Workload {
    fn from(w: &Workload) -> Self {
        pb::Workload {
            host: w.host,
            namespace: opt(&w.namespace),
            pod: opt(&w.pod),
            pod_uid: opt(&w.pod_uid),
            container: opt(&w.container),
            container_id: opt(&w.container_id),
            service_account: opt(&w.service_account),
            agent: opt(&w.agent),
            tier: opt(&w.tier),
            labels: w
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            cgroup: opt(&w.cgroup),
            truncated: w.truncated,
            labels_truncated: w.labels_truncated,
        }
    }
}

impl From<&pb::Workload> for Workload {
    fn from(w: &pb::Workload) -> Self {
        Workload {
            host: w.host,
            namespace: non_empty(&w.namespace),
            pod: non_empty(&w.pod),
            pod_uid: non_empty(&w.pod_uid),
            container: non_empty(&w.container),
            container_id: non_empty(&w.container_id),
            service_account: non_empty(&w.service_account),
            agent: non_empty(&w.agent),
            tier: non_empty(&w.tier),
            labels: w
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            cgroup: non_empty(&w.cgroup),
            truncated: w.truncated,
            labels_truncated: w.labels_truncated,
        }
    }
}

impl From<&Task> for pb::Process {
    fn from(t: &Task) -> Self {
        pb::Process {
            pid: t.pid,
            tgid: t.tgid,
            ppid: t.ppid,
            uid: t.uid,
            gid: t.gid,
            comm: t.comm.clone(),
            exe: t.exe.clone(),
            cgroup_id: t.cgroup_id,
            time: timestamp(&t.time),
            ts_boot_ns: t.ts_boot_ns,
        }
    }
}

impl From<&Owner> for pb::Owner {
    fn from(o: &Owner) -> Self {
        pb::Owner {
            pod_uid: o.pod_uid.clone(),
            namespace: o.namespace.clone(),
            name: o.name.clone(),
            pid: o.pid,
        }
    }
}

impl From<&pb::Owner> for Owner {
    fn from(o: &pb::Owner) -> Self {
        Owner {
            pod_uid: o.pod_uid.clone(),
            namespace: o.namespace.clone(),
            name: o.name.clone(),
            pid: o.pid,
        }
    }
}

impl From<&Record> for pb::Event {
    fn from(r: &Record) -> Self {
        use pb::event::Kind;
        let kind = match r {
            Record::Open(o) => Kind::Open(pb::CredentialAccess {
                path: o.path.clone(),
                raw_path: o.raw_path.clone(),
                syscall: o.syscall.clone(),
                flags: o.flags,
                mode: o.mode,
                dirfd: o.dirfd,
                result: o.result,
                error: o.error.clone(),
                class: class_to_pb(o.class) as i32,
                owner: o.owner.as_ref().map(pb::Owner::from),
                matched_by: o.matched_by.clone(),
                path_resolved: o.path_resolved,
                path_truncated: o.path_truncated,
                host_path: o.host_path.clone(),
                device: o.device.clone(),
                inode: o.inode,
            }),
            Record::Connect(c) => Kind::Connect(pb::Connect {
                syscall: c.syscall.clone(),
                family: c.family.clone(),
                dst_addr: c.dst_addr.clone(),
                dst_port: u32::from(c.dst_port),
                fd: c.fd,
                result: c.result,
                error: c.error.clone(),
                attempted: c.attempted,
            }),
            Record::Exec(e) => Kind::Exec(pb::Exec {
                filename: e.filename.clone(),
                old_pid: e.old_pid,
            }),
            Record::Fork(f) => Kind::Fork(pb::Fork {
                child_pid: f.child_pid,
            }),
            Record::Exit(_) => Kind::Exit(pb::Exit {}),
            Record::Lost(l) => Kind::Lost(pb::Lost {
                lane: l.lane.clone(),
                count: l.count,
                total: l.total,
                time: timestamp(&l.time),
            }),
        };
        pb::Event {
            seq: r.seq(),
            process: r.task().map(pb::Process::from),
            workload: r.task().map(|t| pb::Workload::from(&t.workload)),
            kind: Some(kind),
        }
    }
}

impl TryFrom<&pb::Event> for Record {
    type Error = GrpcError;

    fn try_from(e: &pb::Event) -> Result<Self, GrpcError> {
        use pb::event::Kind;
        let kind = e
            .kind
            .as_ref()
            .ok_or_else(|| GrpcError::Malformed("event without a kind".into()))?;
        let seq = e.seq;
        let task = || -> Result<Task, GrpcError> {
            let p = e
                .process
                .as_ref()
                .ok_or_else(|| GrpcError::Malformed(format!("event {seq} without a process")))?;
            Ok(Task {
                time: rfc3339_or_empty(p.time.as_ref()),
                ts_boot_ns: p.ts_boot_ns,
                pid: p.pid,
                tgid: p.tgid,
                ppid: p.ppid,
                uid: p.uid,
                gid: p.gid,
                comm: p.comm.clone(),
                exe: p.exe.clone(),
                cgroup_id: p.cgroup_id,
                workload: e.workload.as_ref().map(Workload::from).unwrap_or_default(),
            })
        };
        Ok(match kind {
            Kind::Open(o) => Record::Open(OpenRecord {
                seq,
                task: task()?,
                syscall: o.syscall.clone(),
                path: o.path.clone(),
                raw_path: o.raw_path.clone(),
                path_resolved: o.path_resolved,
                path_truncated: o.path_truncated,
                matched_by: o.matched_by.clone(),
                dirfd: o.dirfd,
                flags: o.flags,
                mode: o.mode,
                result: o.result,
                error: o.error.clone(),
                class: class_from_pb(o.class()),
                owner: o.owner.as_ref().map(Owner::from),
                host_path: o.host_path.clone(),
                device: o.device.clone(),
                inode: o.inode,
            }),
            Kind::Connect(c) => Record::Connect(ConnectRecord {
                seq,
                task: task()?,
                syscall: c.syscall.clone(),
                family: c.family.clone(),
                dst_addr: c.dst_addr.clone(),
                dst_port: u16::try_from(c.dst_port).map_err(|_| {
                    GrpcError::Malformed(format!("event {seq}: port {} out of range", c.dst_port))
                })?,
                fd: c.fd,
                result: c.result,
                error: c.error.clone(),
                attempted: c.attempted,
            }),
            Kind::Exec(x) => Record::Exec(ExecRecord {
                seq,
                task: task()?,
                filename: x.filename.clone(),
                old_pid: x.old_pid,
            }),
            Kind::Fork(f) => Record::Fork(ForkRecord {
                seq,
                task: task()?,
                child_pid: f.child_pid,
            }),
            Kind::Exit(_) => Record::Exit(ExitRecord { seq, task: task()? }),
            Kind::Lost(l) => Record::Lost(LostRecord {
                seq,
                time: rfc3339_or_empty(l.time.as_ref()),
                lane: l.lane.clone(),
                count: l.count,
                total: l.total,
            }),
        })
    }
}

impl From<&Anomaly> for pb::Anomaly {
    fn from(a: &Anomaly) -> Self {
        pb::Anomaly {
            seq: a.seq,
            time: timestamp(&a.time),
            rule: a.rule.clone(),
            priority: priority_to_pb(a.priority) as i32,
            output: a.output.clone(),
            tags: a.tags.clone(),
            workload: Some(pb::Workload::from(&a.workload)),
            fields: a
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            event_seqs: a.events.clone(),
        }
    }
}

impl TryFrom<&pb::Anomaly> for Anomaly {
    type Error = GrpcError;

    fn try_from(a: &pb::Anomaly) -> Result<Self, GrpcError> {
        let priority = priority_from_pb(a.priority())
            .ok_or_else(|| GrpcError::Malformed(format!("anomaly {} without a priority", a.seq)))?;
        Ok(Anomaly {
            seq: a.seq,
            time: rfc3339_or_empty(a.time.as_ref()),
            rule: a.rule.clone(),
            priority,
            output: a.output.clone(),
            tags: a.tags.clone(),
            workload: a.workload.as_ref().map(Workload::from).unwrap_or_default(),
            fields: a
                .fields
                .iter()
                .map(|(k, v)| {
                    let value =
                        serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.clone()));
                    (k.clone(), value)
                })
                .collect::<BTreeMap<_, _>>(),
            events: a.event_seqs.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn workload() -> Workload {
        Workload {
            host: false,
            namespace: Some("agents".into()),
            pod: Some("coder-0".into()),
            pod_uid: Some("0b6a3c1e-uid".into()),
            container: Some("main".into()),
            container_id: Some("cid".into()),
            service_account: Some("coder".into()),
            agent: Some("coder".into()),
            tier: Some("worker".into()),
            labels: [("app".to_owned(), "coder".to_owned())].into(),
            cgroup: Some("/kubepods/pod0b6a3c1e/cid".into()),
            truncated: true,
            labels_truncated: 2,
        }
    }

    fn task() -> Task {
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
            workload: workload(),
        }
    }

    #[test]
    fn open_record_converts_and_round_trips() {
        let rec = Record::Open(OpenRecord {
            seq: 5,
            task: task(),
            syscall: "openat".into(),
            path: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            raw_path: "token".into(),
            path_resolved: true,
            path_truncated: false,
            matched_by: "prefix".into(),
            dirfd: -100,
            flags: 0,
            mode: 0,
            result: 3,
            error: None,
            class: CredentialClass::ServiceAccountToken,
            owner: Some(Owner {
                pod_uid: Some("other-uid".into()),
                namespace: Some("prod".into()),
                name: Some("api-0".into()),
                pid: None,
            }),
            host_path: Some("/var/lib/kubelet/pods/other-uid/volumes/kubernetes.io~projected/kube-api-access-1/token".into()),
            device: Some("0:52".into()),
            inode: Some(7),
        });
        let ev = pb::Event::from(&rec);
        assert_eq!(ev.seq, 5);
        let p = ev.process.as_ref().expect("process");
        assert_eq!((p.pid, p.tgid, p.ppid), (11, 10, Some(1)));
        assert_eq!(p.exe.as_deref(), Some("/usr/bin/python3"));
        let t = p.time.expect("time");
        assert_eq!(t.nanos, 123);
        assert_eq!(
            rfc3339(&t).as_deref(),
            Some("2026-11-23T08:00:01.000000123Z")
        );
        let w = ev.workload.as_ref().expect("workload");
        assert_eq!(
            (w.namespace.as_str(), w.pod.as_str()),
            ("agents", "coder-0")
        );
        assert_eq!(w.agent, "coder");
        assert!(w.truncated);
        assert_eq!(w.labels_truncated, 2);
        let Some(pb::event::Kind::Open(o)) = &ev.kind else {
            panic!("not an open: {ev:?}");
        };
        assert_eq!(o.class(), pb::CredentialClass::ServiceAccountToken);
        assert_eq!(o.result, 3);
        assert_eq!(
            o.owner.as_ref().and_then(|o| o.name.as_deref()),
            Some("api-0")
        );
        let back = Record::try_from(&ev).expect("back");
        assert_eq!(back, rec);
    }

    #[test]
    fn lost_and_connect_records_convert() {
        let lost = Record::Lost(LostRecord {
            seq: 9,
            time: "2026-11-23T00:00:00Z".into(),
            lane: "network".into(),
            count: 3,
            total: 8,
        });
        let ev = pb::Event::from(&lost);
        // A loss report is numbered like every other event.
        assert_eq!(ev.seq, 9);
        assert!(ev.process.is_none() && ev.workload.is_none());
        let Some(pb::event::Kind::Lost(l)) = &ev.kind else {
            panic!("not lost: {ev:?}");
        };
        assert_eq!((l.lane.as_str(), l.count, l.total), ("network", 3, 8));
        assert_eq!(
            Record::try_from(&ev).expect("back"),
            Record::Lost(LostRecord {
                time: "2026-11-23T00:00:00.000000000Z".into(),
                ..match lost {
                    Record::Lost(l) => l,
                    _ => unreachable!(),
                }
            })
        );

        let conn = Record::Connect(ConnectRecord {
            seq: 10,
            task: task(),
            syscall: "connect".into(),
            family: "inet".into(),
            dst_addr: "169.254.169.254".into(),
            dst_port: 80,
            fd: 4,
            result: -115,
            error: Some("EINPROGRESS".into()),
            attempted: true,
        });
        let ev = pb::Event::from(&conn);
        let Some(pb::event::Kind::Connect(c)) = &ev.kind else {
            panic!("not connect: {ev:?}");
        };
        assert_eq!((c.dst_addr.as_str(), c.dst_port), ("169.254.169.254", 80));
        assert_eq!(Record::try_from(&ev).expect("back"), conn);
    }

    #[test]
    fn anomaly_converts_and_round_trips() {
        let a = Anomaly {
            seq: 3,
            time: "2026-11-23T08:00:01.5Z".into(),
            rule: "foreign-credential-read".into(),
            priority: Priority::Critical,
            output: "coder read prod/api-0's token".into(),
            tags: vec!["k8s".into(), "T1528".into()],
            workload: workload(),
            fields: [
                ("proc.pid".to_owned(), json!(10)),
                ("fd.name".to_owned(), json!("/token")),
                ("k8s.ns.name".to_owned(), Value::Null),
            ]
            .into(),
            events: vec![5, 6],
        };
        let p = pb::Anomaly::from(&a);
        assert_eq!(p.priority(), pb::Priority::Critical);
        assert_eq!(p.time.expect("time").nanos, 500_000_000);
        assert_eq!(p.fields["proc.pid"], "10");
        assert_eq!(p.fields["fd.name"], "\"/token\"");
        assert_eq!(p.fields["k8s.ns.name"], "null");
        assert_eq!(p.event_seqs, vec![5, 6]);
        let back = Anomaly::try_from(&p).expect("back");
        assert_eq!(
            back,
            Anomaly {
                time: "2026-11-23T08:00:01.500000000Z".into(),
                ..a
            }
        );
    }

    #[test]
    fn unparsable_time_is_none() {
        assert_eq!(timestamp("yesterday"), None);
        assert_eq!(timestamp(""), None);
        let a = Anomaly {
            seq: 1,
            time: "not a time".into(),
            rule: "r".into(),
            priority: Priority::Debug,
            output: String::new(),
            tags: vec![],
            workload: Workload::default(),
            fields: BTreeMap::new(),
            events: vec![],
        };
        assert!(pb::Anomaly::from(&a).time.is_none());
    }

    #[test]
    fn priorities_map_both_ways() {
        for p in [
            Priority::Emergency,
            Priority::Alert,
            Priority::Critical,
            Priority::Error,
            Priority::Warning,
            Priority::Notice,
            Priority::Informational,
            Priority::Debug,
        ] {
            assert_eq!(priority_from_pb(priority_to_pb(p)), Some(p));
            assert_eq!(
                serde_json::to_value(p).expect("json"),
                json!(priority_name(p))
            );
        }
        assert_eq!(priority_from_pb(pb::Priority::Unspecified), None);
    }
}
