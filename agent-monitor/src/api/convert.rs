//! Conversions between the daemon's model ([`Record`], [`Anomaly`]) and the wire messages.
//!
//! The forward direction is what the server sends, the journal stores and the JSON outputs
//! print: [`Origin`] stamps each message with the run, the node and the boot it came from.
//! The reverse direction turns journaled messages back into the model for `replay` (its
//! records re-run through detection, its alerts printed as Falco alerts).

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use agent_monitor_api::wkt::{value::Kind as PbKind, ListValue, Struct, Timestamp};
use serde_json::Value;

use super::pb;
use crate::{
    detect::Anomaly,
    events::{
        ConnectRecord, ExecRecord, ExitRecord, ForkRecord, LostReason, LostRecord, OpenRecord,
        Record, Task,
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

/// A wire message that does not convert to the daemon's model (a journaled or received
/// message without a field the model needs, or with a value out of its range).
#[derive(Debug, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct Malformed(pub String);

/// Where messages come from: the daemon run, the node and its boot. Every event and
/// anomaly the daemon hands out is stamped with it. Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// A random id per start of the daemon.
    pub run_id: Arc<str>,
    pub node: Arc<str>,
    /// The node's boot id, the first part of every process key.
    pub boot_id: Arc<str>,
}

/// Where the kernel publishes this boot's id.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// A fresh random UUID from the kernel on every read.
const RANDOM_UUID: &str = "/proc/sys/kernel/random/uuid";

fn read_trimmed(path: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

impl Origin {
    /// This daemon run on `node`: a new random run id and this boot's id. Without /proc
    /// (never, for a daemon that needs tracefs) the run id is the pid and the time, unique
    /// in practice, and the boot id is empty.
    pub fn new_run(node: &str) -> Self {
        let run_id = read_trimmed(RANDOM_UUID).unwrap_or_else(|| {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            format!("{:x}-{nanos:x}", std::process::id())
        });
        Self {
            run_id: run_id.into(),
            node: node.into(),
            boot_id: read_trimmed(BOOT_ID).unwrap_or_default().into(),
        }
    }

    /// `r` as the wire event of this run.
    pub fn event(&self, r: &Record) -> pb::Event {
        self.event_of(r.clone())
    }

    /// `r` as the wire event of this run, its strings moved into it.
    pub fn event_of(&self, r: Record) -> pb::Event {
        let (mut e, shared) = self.event_parts(r);
        put_workload(&mut e, shared.as_deref());
        e
    }

    /// `r` as the wire event of this run, its strings moved into it, but for the shared
    /// workload of a kernel event, which is returned beside it unconverted (the wire
    /// event's `workload` is then empty): the pipeline's sinks take its wire form, or its
    /// JSON, from what they keep per shared workload, instead of a copy of a dozen
    /// strings and the pod's labels in every event.
    pub fn event_parts(&self, r: Record) -> (pb::Event, Option<Arc<Workload>>) {
        let (mut e, shared) = split(r);
        e.run_id = self.run_id.to_string();
        e.node = self.node.to_string();
        if let Some(key) = e.process.as_mut().and_then(|p| p.key.as_mut()) {
            key.boot_id = self.boot_id.to_string();
        }
        (e, shared)
    }

    /// `a` as the wire anomaly of this run.
    pub fn anomaly(&self, a: &Anomaly) -> pb::Anomaly {
        let mut p = pb::Anomaly::from(a);
        p.run_id = self.run_id.to_string();
        p.node = self.node.to_string();
        p
    }
}

/// The daemon's names of a wire enum's values, both ways: a name the table lacks maps to
/// the enum's UNSPECIFIED value, an UNSPECIFIED value to an empty name.
struct Names<E: 'static> {
    table: &'static [(&'static str, E)],
    unspecified: E,
}

impl<E: Copy + PartialEq> Names<E> {
    fn to_pb(&self, name: &str) -> E {
        self.table
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(self.unspecified, |(_, e)| *e)
    }

    fn name(&self, e: E) -> &'static str {
        self.table
            .iter()
            .find(|(_, v)| *v == e)
            .map_or("", |(n, _)| n)
    }
}

const SYSCALLS: Names<pb::Syscall> = Names {
    table: &[
        ("open", pb::Syscall::Open),
        ("openat", pb::Syscall::Openat),
        ("openat2", pb::Syscall::Openat2),
        ("creat", pb::Syscall::Creat),
        ("open_by_handle_at", pb::Syscall::OpenByHandleAt),
        ("io_uring_openat", pb::Syscall::IoUringOpenat),
        ("io_uring_openat2", pb::Syscall::IoUringOpenat2),
        ("connect", pb::Syscall::Connect),
        ("sendto", pb::Syscall::Sendto),
        ("sendmsg", pb::Syscall::Sendmsg),
        ("tcp_connect", pb::Syscall::TcpConnect),
        ("send", pb::Syscall::Send),
    ],
    unspecified: pb::Syscall::Unspecified,
};

const MATCH_KINDS: Names<pb::MatchKind> = Names {
    table: &[
        ("volume", pb::MatchKind::Volume),
        ("inode", pb::MatchKind::Inode),
        ("prefix", pb::MatchKind::Prefix),
        ("basename", pb::MatchKind::Basename),
        ("proc_environ", pb::MatchKind::ProcEnviron),
    ],
    unspecified: pb::MatchKind::Unspecified,
};

const FAMILIES: Names<pb::AddressFamily> = Names {
    table: &[
        ("inet", pb::AddressFamily::Inet),
        ("inet6", pb::AddressFamily::Inet6),
    ],
    unspecified: pb::AddressFamily::Unspecified,
};

/// The lane an event travelled in: its kind's, or for a loss report the lane it counts.
pub fn event_lane(e: &pb::Event) -> &'static str {
    use pb::event::Kind;
    LANES.name(match &e.kind {
        Some(Kind::Open(_)) => pb::Lane::Credential,
        Some(Kind::Connect(_)) => pb::Lane::Network,
        Some(Kind::Exec(_) | Kind::Fork(_) | Kind::Exit(_)) => pb::Lane::Process,
        Some(Kind::Lost(l)) => l.lane(),
        None => pb::Lane::Unspecified,
    })
}

const LANES: Names<pb::Lane> = Names {
    table: &[
        ("credential", pb::Lane::Credential),
        ("network", pb::Lane::Network),
        ("process", pb::Lane::Process),
    ],
    unspecified: pb::Lane::Unspecified,
};

/// The daemon's name of a wire syscall (`openat`, `tcp_connect`, ...); empty for
/// UNSPECIFIED.
pub fn syscall_name(s: pb::Syscall) -> &'static str {
    SYSCALLS.name(s)
}

/// `inet` or `inet6`; empty for UNSPECIFIED.
pub fn family_name(f: pb::AddressFamily) -> &'static str {
    FAMILIES.name(f)
}

/// The lane name of a wire lane; empty for UNSPECIFIED.
pub fn lane_name(l: pb::Lane) -> &'static str {
    LANES.name(l)
}

/// The wire tier of a tier label value.
fn tier_to_pb(tier: Option<&str>) -> pb::Tier {
    match tier {
        None => pb::Tier::Unspecified,
        Some("proxy") => pb::Tier::Proxy,
        Some("worker") => pb::Tier::Worker,
        Some(_) => pb::Tier::Other,
    }
}

/// The tier label value of a wire tier. OTHER only says the label had another value;
/// detection treats every such value alike (neither tier), so none is made up here.
fn tier_from_pb(t: pb::Tier) -> Option<String> {
    match t {
        pb::Tier::Proxy => Some("proxy".into()),
        pb::Tier::Worker => Some("worker".into()),
        pb::Tier::Unspecified | pb::Tier::Other => None,
    }
}

/// A JSON value as a `google.protobuf.Value`.
fn value_to_pb(v: &Value) -> agent_monitor_api::wkt::Value {
    let kind = match v {
        Value::Null => PbKind::NullValue(0),
        Value::Bool(b) => PbKind::BoolValue(*b),
        // Struct numbers are doubles: exact for the integers rules put in fields (pids,
        // uids, ports, inode numbers below 2^53).
        Value::Number(n) => PbKind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => PbKind::StringValue(s.clone()),
        Value::Array(a) => PbKind::ListValue(ListValue {
            values: a.iter().map(value_to_pb).collect(),
        }),
        Value::Object(o) => PbKind::StructValue(Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), value_to_pb(v))).collect(),
        }),
    };
    agent_monitor_api::wkt::Value { kind: Some(kind) }
}

/// A `google.protobuf.Value` as JSON; whole doubles come back as integers.
pub fn value_from_pb(v: &agent_monitor_api::wkt::Value) -> Value {
    match &v.kind {
        None | Some(PbKind::NullValue(_)) => Value::Null,
        Some(PbKind::BoolValue(b)) => Value::Bool(*b),
        Some(PbKind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                // Exact: |n| < 2^53 and whole.
                #[expect(clippy::cast_possible_truncation, reason = "whole and below 2^53")]
                Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(PbKind::StringValue(s)) => Value::String(s.clone()),
        Some(PbKind::ListValue(l)) => Value::Array(l.values.iter().map(value_from_pb).collect()),
        Some(PbKind::StructValue(s)) => Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), value_from_pb(v)))
                .collect(),
        ),
    }
}

/// Anomaly fields as a `google.protobuf.Struct`.
pub fn fields_to_pb(fields: &BTreeMap<String, Value>) -> Struct {
    Struct {
        fields: fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_pb(v)))
            .collect(),
    }
}

/// Anomaly fields from a `google.protobuf.Struct`.
pub fn fields_from_pb(s: Option<&Struct>) -> BTreeMap<String, Value> {
    s.map(|s| {
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_from_pb(v)))
            .collect()
    })
    .unwrap_or_default()
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
            tier: tier_to_pb(w.tier.as_deref()) as i32,
            labels: w.labels.clone(),
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
            tier: tier_from_pb(w.tier()),
            labels: w.labels.clone(),
            cgroup: non_empty(&w.cgroup),
            truncated: w.truncated,
            labels_truncated: w.labels_truncated,
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

/// The event of `r`, without its [`Origin`] (run, node, boot id): [`Origin::event`] is
/// what the daemon hands out. A copy of [`From<Record>`], for callers that keep the record.
impl From<&Record> for pb::Event {
    fn from(r: &Record) -> Self {
        pb::Event::from(r.clone())
    }
}

/// The process of `t`; the key's boot id is the [`Origin`]'s to fill.
impl From<Task> for pb::Process {
    fn from(t: Task) -> Self {
        pb::Process {
            pid: t.pid,
            tgid: t.tgid,
            ppid: t.ppid,
            uid: t.uid,
            gid: t.gid,
            comm: t.comm,
            exe: t.exe,
            cgroup_id: t.cgroup_id,
            ts_boot_ns: t.ts_boot_ns,
            key: Some(pb::ProcessKey {
                boot_id: String::new(),
                pid: t.tgid,
                start_time_ns: t.start_ns,
            }),
        }
    }
}

/// The event of `r`, its strings moved, not copied: the pipeline converts each record once
/// and keeps only the wire form.
impl From<Record> for pb::Event {
    fn from(r: Record) -> Self {
        let (mut e, shared) = split(r);
        put_workload(&mut e, shared.as_deref());
        e
    }
}

/// Puts the wire form of `shared`, the workload [`Origin::event_parts`] kept apart from
/// `e`, into `e` (nothing for `None`: a loss report's workload is in it already).
pub fn put_workload(e: &mut pb::Event, shared: Option<&Workload>) {
    if let Some(w) = shared {
        e.workload = Some(pb::Workload::from(w));
    }
}

/// The event of `r` with its strings moved, and apart from it the shared workload of a
/// kernel event (the event's `workload` left empty); a loss report's workload, which is
/// not shared, is in the event.
fn split(r: Record) -> (pb::Event, Option<Arc<Workload>>) {
    use pb::event::Kind;
    let seq = r.seq();
    let (task, kind) = match r {
        Record::Open(o) => (
            o.task,
            Kind::Open(pb::CredentialAccess {
                path: o.path,
                raw_path: o.raw_path,
                syscall: SYSCALLS.to_pb(&o.syscall) as i32,
                flags: o.flags,
                mode: o.mode,
                dirfd: o.dirfd,
                result: o.result,
                error: o.error,
                class: class_to_pb(o.class) as i32,
                owner: o.owner.as_ref().map(pb::Owner::from),
                matched_by: MATCH_KINDS.to_pb(&o.matched_by) as i32,
                path_resolved: o.path_resolved,
                path_truncated: o.path_truncated,
                host_path: o.host_path,
                device: o.device,
                inode: o.inode,
            }),
        ),
        Record::Connect(c) => (
            c.task,
            Kind::Connect(pb::Connect {
                syscall: SYSCALLS.to_pb(&c.syscall) as i32,
                family: FAMILIES.to_pb(&c.family) as i32,
                dst_addr: c.dst_addr,
                dst_port: u32::from(c.dst_port),
                fd: c.fd,
                result: c.result,
                error: c.error,
                attempted: c.attempted,
            }),
        ),
        Record::Exec(e) => (
            e.task,
            Kind::Exec(pb::Exec {
                filename: e.filename,
                old_pid: e.old_pid,
            }),
        ),
        Record::Fork(f) => (
            f.task,
            Kind::Fork(pb::Fork {
                child_pid: f.child_pid,
            }),
        ),
        Record::Exit(e) => (e.task, Kind::Exit(pb::Exit {})),
        Record::Lost(l) => {
            let e = pb::Event {
                seq,
                process: None,
                workload: l.workload.as_ref().map(pb::Workload::from),
                run_id: String::new(),
                node: String::new(),
                time: timestamp(&l.time),
                kind: Some(Kind::Lost(pb::Lost {
                    lane: LANES.to_pb(&l.lane) as i32,
                    count: l.count,
                    total: l.total,
                    reason: match l.reason {
                        LostReason::RingFull => pb::LostReason::RingFull,
                        LostReason::Budget => pb::LostReason::Budget,
                    } as i32,
                })),
            };
            return (e, None);
        }
    };
    let shared = Some(task.workload.clone());
    let e = pb::Event {
        seq,
        workload: None,
        time: timestamp(&task.time),
        process: Some(pb::Process::from(task)),
        run_id: String::new(),
        node: String::new(),
        kind: Some(kind),
    };
    (e, shared)
}

impl TryFrom<&pb::Event> for Record {
    type Error = Malformed;

    fn try_from(e: &pb::Event) -> Result<Self, Malformed> {
        use pb::event::Kind;
        let kind = e
            .kind
            .as_ref()
            .ok_or_else(|| Malformed("event without a kind".into()))?;
        let seq = e.seq;
        let time = rfc3339_or_empty(e.time.as_ref());
        let task = || -> Result<Task, Malformed> {
            let p = e
                .process
                .as_ref()
                .ok_or_else(|| Malformed(format!("event {seq} without a process")))?;
            Ok(Task {
                time: time.clone(),
                ts_boot_ns: p.ts_boot_ns,
                pid: p.pid,
                tgid: p.tgid,
                ppid: p.ppid,
                uid: p.uid,
                gid: p.gid,
                comm: p.comm.clone(),
                exe: p.exe.clone(),
                cgroup_id: p.cgroup_id,
                start_ns: p.key.as_ref().map_or(0, |k| k.start_time_ns),
                workload: e
                    .workload
                    .as_ref()
                    .map(Workload::from)
                    .unwrap_or_default()
                    .into(),
            })
        };
        Ok(match kind {
            Kind::Open(o) => Record::Open(OpenRecord {
                seq,
                task: task()?,
                syscall: SYSCALLS.name(o.syscall()).into(),
                path: o.path.clone(),
                raw_path: o.raw_path.clone(),
                path_resolved: o.path_resolved,
                path_truncated: o.path_truncated,
                matched_by: MATCH_KINDS.name(o.matched_by()).into(),
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
                syscall: SYSCALLS.name(c.syscall()).into(),
                family: FAMILIES.name(c.family()).into(),
                dst_addr: c.dst_addr.clone(),
                dst_port: u16::try_from(c.dst_port).map_err(|_| {
                    Malformed(format!("event {seq}: port {} out of range", c.dst_port))
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
                time: time.clone(),
                lane: LANES.name(l.lane()).to_owned(),
                count: l.count,
                total: l.total,
                reason: match l.reason() {
                    pb::LostReason::Budget => LostReason::Budget,
                    pb::LostReason::RingFull | pb::LostReason::Unspecified => LostReason::RingFull,
                },
                workload: e.workload.as_ref().map(Workload::from),
            }),
        })
    }
}

/// The anomaly `a`, without its [`Origin`]: [`Origin::anomaly`] is what the daemon hands
/// out.
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
            fields: Some(fields_to_pb(&a.fields)),
            event_seqs: a.events.clone(),
            run_id: String::new(),
            node: String::new(),
        }
    }
}

impl TryFrom<&pb::Anomaly> for Anomaly {
    type Error = Malformed;

    fn try_from(a: &pb::Anomaly) -> Result<Self, Malformed> {
        let priority = priority_from_pb(a.priority())
            .ok_or_else(|| Malformed(format!("anomaly {} without a priority", a.seq)))?;
        Ok(Anomaly {
            seq: a.seq,
            time: rfc3339_or_empty(a.time.as_ref()),
            rule: a.rule.clone(),
            priority,
            output: a.output.clone(),
            tags: a.tags.clone(),
            workload: a.workload.as_ref().map(Workload::from).unwrap_or_default(),
            fields: fields_from_pb(a.fields.as_ref()),
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
            start_ns: 99,
            workload: workload().into(),
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
        let origin = Origin {
            run_id: "run-1".into(),
            node: "node-a".into(),
            boot_id: "boot-1".into(),
        };
        let ev = origin.event(&rec);
        assert_eq!(ev.seq, 5);
        assert_eq!((ev.run_id.as_str(), ev.node.as_str()), ("run-1", "node-a"));
        let p = ev.process.as_ref().expect("process");
        assert_eq!((p.pid, p.tgid, p.ppid), (11, 10, Some(1)));
        assert_eq!(p.exe.as_deref(), Some("/usr/bin/python3"));
        assert_eq!(
            p.key,
            Some(pb::ProcessKey {
                boot_id: "boot-1".into(),
                pid: 10,
                start_time_ns: 99,
            })
        );
        let t = ev.time.expect("time");
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
        assert_eq!(o.syscall(), pb::Syscall::Openat);
        assert_eq!(o.matched_by(), pb::MatchKind::Prefix);
        assert_eq!(w.tier(), pb::Tier::Worker);
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
            reason: crate::events::LostReason::RingFull,
            workload: None,
        });
        let ev = pb::Event::from(&lost);
        // A loss report is numbered like every other event.
        assert_eq!(ev.seq, 9);
        assert!(ev.process.is_none() && ev.workload.is_none());
        let Some(pb::event::Kind::Lost(l)) = &ev.kind else {
            panic!("not lost: {ev:?}");
        };
        assert_eq!((l.lane(), l.count, l.total), (pb::Lane::Network, 3, 8));
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

        // A budget drop names its workload, on the event as for any other record.
        let budget = Record::Lost(LostRecord {
            seq: 11,
            time: "2026-11-23T00:00:00.000000000Z".into(),
            lane: "credential".into(),
            count: 5,
            total: 5,
            reason: LostReason::Budget,
            workload: Some(Workload::clone(&task().workload)),
        });
        let ev = pb::Event::from(&budget);
        let Some(pb::event::Kind::Lost(l)) = &ev.kind else {
            panic!("not lost: {ev:?}");
        };
        assert_eq!(l.reason(), pb::LostReason::Budget);
        assert_eq!(
            ev.workload.as_ref().map(|w| w.pod.as_str()),
            task().workload.pod.as_deref()
        );
        assert_eq!(Record::try_from(&ev).expect("back"), budget);

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
        assert_eq!(
            (c.syscall(), c.family()),
            (pb::Syscall::Connect, pb::AddressFamily::Inet)
        );
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
        let f = &p.fields.as_ref().expect("fields").fields;
        use agent_monitor_api::wkt::value::Kind as K;
        assert_eq!(f["proc.pid"].kind, Some(K::NumberValue(10.0)));
        assert_eq!(f["fd.name"].kind, Some(K::StringValue("/token".into())));
        assert_eq!(f["k8s.ns.name"].kind, Some(K::NullValue(0)));
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
