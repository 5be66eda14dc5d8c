//! Detection: built-in rules over enriched records, tuned by AgentPolicy.
//!
//! Each rule has a stable id, a Falco priority and MITRE ATT&CK tags ([`RULES`]). The
//! engine sees records in order, keeps bounded state ([`state`]), and returns anomalies;
//! it never reads files or the network, so a journal replay decides exactly as live.

pub mod destinations;
pub mod state;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use self::{
    destinations::Destinations,
    state::{Baselines, Limit, Parents, RateLimiter, Read, Reads},
};
use crate::{
    events::{ConnectRecord, LostReason, LostRecord, OpenRecord, Record, Task},
    identity::{credentials::CredentialClass, Workload},
    policy::{matching::CompiledPolicy, DestinationClass, PolicySet, Priority, Tier},
};

pub use crate::policy::rules::{
    rule, RuleInfo, API_SERVER_NOT_ALLOWED, BASELINE_DEVIATION, CLOUD_METADATA,
    CREDENTIAL_NOT_ALLOWED, DEFAULT_NODE_AGENTS, DEFAULT_SUSPICIOUS_READERS,
    EGRESS_OUTSIDE_ALLOWLIST, EVENTS_LOST, EXFILTRATION, FOREIGN_CREDENTIAL_READ, KERNEL_SILENT,
    NODE_CREDENTIAL_READ, PROC_ENVIRON_READ, RULES, UNEXPECTED_EXECUTABLE,
};

/// An alert: what rule fired, for whom, because of which records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Anomaly {
    /// Increasing within one engine.
    pub seq: u64,
    /// RFC 3339 time of the record that fired it.
    pub time: String,
    pub rule: String,
    pub priority: Priority,
    /// One line naming agent, pod, namespace, ServiceAccount, executable and target.
    pub output: String,
    pub tags: Vec<String>,
    pub workload: Workload,
    /// Falco `output_fields`.
    pub fields: BTreeMap<String, Value>,
    /// Sequence numbers of the records behind it (for the exfiltration rule: the read,
    /// then the connect).
    pub events: Vec<u64>,
}

/// Detection settings (validated in `config`).
#[derive(Debug, Clone)]
pub struct DetectSettings {
    pub destinations: Destinations,
    pub exfil_window: Duration,
    /// Alerts per (rule, workload) per minute before suppression.
    pub rate_limit_per_minute: u32,
    pub suspicious_readers: Vec<String>,
    /// Host executables that may read node credentials (see [`DEFAULT_NODE_AGENTS`]).
    pub node_agents: Vec<String>,
}

impl Default for DetectSettings {
    fn default() -> Self {
        Self {
            destinations: Destinations::default(),
            exfil_window: Duration::from_secs(30),
            rate_limit_per_minute: 20,
            suspicious_readers: DEFAULT_SUSPICIOUS_READERS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            node_agents: DEFAULT_NODE_AGENTS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        }
    }
}

const MINUTE_NS: u64 = 60_000_000_000;

/// Credential classes that hold secrets.
fn is_secret(class: CredentialClass) -> bool {
    !matches!(class, CredentialClass::NonSecret | CredentialClass::Other)
}

fn opt(s: &Option<String>) -> Value {
    s.as_ref().map_or(Value::Null, |v| Value::String(v.clone()))
}

fn or_dash(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("-")
}

/// Who, in words: `agent researcher (pod agents/agent-a, sa sa-agent-a, exe /usr/bin/cat)`.
fn who(task: &Task) -> String {
    let w = &task.workload;
    if w.host {
        return format!(
            "host process {} (pid {}, exe {})",
            task.comm,
            task.tgid,
            or_dash(&task.exe)
        );
    }
    format!(
        "agent {} (pod {}/{}, sa {}, exe {}, pid {})",
        or_dash(&w.agent),
        or_dash(&w.namespace),
        w.pod.as_deref().or(w.pod_uid.as_deref()).unwrap_or("-"),
        or_dash(&w.service_account),
        or_dash(&task.exe),
        task.tgid
    )
}

/// Falco output fields of a task.
fn task_fields(task: &Task) -> BTreeMap<String, Value> {
    let mut f = workload_fields(&task.workload);
    f.insert("proc.pid".into(), json!(task.tgid));
    f.insert("proc.tid".into(), json!(task.pid));
    f.insert("proc.ppid".into(), json!(task.ppid));
    f.insert("proc.name".into(), json!(task.comm));
    f.insert("proc.exepath".into(), opt(&task.exe));
    f.insert("user.uid".into(), json!(task.uid));
    f
}

/// Falco output fields of a workload.
fn workload_fields(w: &Workload) -> BTreeMap<String, Value> {
    let mut f = BTreeMap::new();
    f.insert("k8s.ns.name".into(), opt(&w.namespace));
    f.insert("k8s.pod.name".into(), opt(&w.pod));
    f.insert("k8s.pod.uid".into(), opt(&w.pod_uid));
    f.insert("k8s.sa.name".into(), opt(&w.service_account));
    f.insert("container.id".into(), opt(&w.container_id));
    f.insert("container.name".into(), opt(&w.container));
    f.insert("agent.name".into(), opt(&w.agent));
    f.insert("agent.tier".into(), opt(&w.tier));
    f.insert("agent.host".into(), json!(w.host));
    f
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The detection engine. One owner; records in order.
pub struct Engine {
    config: DetectSettings,
    policies: Arc<RwLock<PolicySet>>,
    parents: Parents,
    reads: Reads,
    baselines: Baselines,
    limiter: RateLimiter,
    seq: u64,
    /// Latest record time seen, for flushing rate-limit summaries.
    last_ts: u64,
    last_time: String,
}

/// A candidate alert before overrides and rate limiting.
struct Hit {
    rule: &'static str,
    /// Instead of the rule's default (before policy overrides).
    priority: Option<Priority>,
    output: String,
    fields: BTreeMap<String, Value>,
    events: Vec<u64>,
}

impl Engine {
    pub fn new(config: DetectSettings, policies: Arc<RwLock<PolicySet>>) -> Self {
        let per = config.rate_limit_per_minute;
        Self {
            config,
            policies,
            parents: Parents::default(),
            reads: Reads::default(),
            baselines: Baselines::default(),
            limiter: RateLimiter::new(per, MINUTE_NS),
            seq: 0,
            last_ts: 0,
            last_time: String::new(),
        }
    }

    /// The policy for a workload, if any, as compiled when the set was loaded.
    fn policy_for(&self, w: &Workload) -> Option<Arc<CompiledPolicy>> {
        self.policies.read().ok()?.compiled_for_workload(w).cloned()
    }

    /// Runs every rule over one record.
    pub fn process(&mut self, record: &Record) -> Vec<Anomaly> {
        let mut hits = Vec::new();
        let task = record.task().cloned();
        if let Some(t) = &task {
            self.last_ts = self.last_ts.max(t.ts_boot_ns);
            self.last_time.clone_from(&t.time);
            if let Some(ppid) = t.ppid {
                self.parents.record(t.tgid, ppid, t.ts_boot_ns);
            }
        }
        let policy = task.as_ref().and_then(|t| self.policy_for(&t.workload));
        match record {
            Record::Open(o) => self.on_open(o, policy.as_deref(), &mut hits),
            Record::Connect(c) => self.on_connect(c, policy.as_deref(), &mut hits),
            Record::Fork(f) => self
                .parents
                .record(f.child_pid, f.task.tgid, f.task.ts_boot_ns),
            Record::Lost(l) => self.on_lost(l, &mut hits),
            Record::Exec(_) | Record::Exit(_) => {}
        }
        let time = match record {
            Record::Lost(l) => l.time.clone(),
            _ => task.as_ref().map(|t| t.time.clone()).unwrap_or_default(),
        };
        let workload = match record {
            // A budget drop is one workload's: its alert names it.
            Record::Lost(l) => l.workload.clone(),
            _ => task.as_ref().map(|t| t.workload.clone()),
        }
        .unwrap_or_default();
        let ts = task.as_ref().map_or(self.last_ts, |t| t.ts_boot_ns);
        let mut out = Vec::new();
        for hit in hits {
            if let Some(a) = self.finish(hit, policy.as_deref(), &workload, &time, ts) {
                out.push(a);
            }
        }
        out
    }

    /// Rate-limit summaries of windows that ended: the count of alerts suppressed.
    pub fn flush(&mut self) -> Vec<Anomaly> {
        let expired = self.limiter.expired(self.last_ts);
        let mut out = Vec::new();
        for (rule_id, key, count) in expired {
            let Some(info) = rule(&rule_id) else { continue };
            self.seq += 1;
            let mut fields = BTreeMap::new();
            fields.insert("agent.rule".into(), json!(rule_id));
            fields.insert("agent.workload".into(), json!(key));
            fields.insert("agent.suppressed".into(), json!(count));
            out.push(Anomaly {
                seq: self.seq,
                time: self.last_time.clone(),
                rule: rule_id.clone(),
                priority: info.priority,
                output: format!(
                    "Rate limit: {count} more {rule_id} alerts for {key} were suppressed in the last minute"
                ),
                tags: info.tags.iter().map(|t| (*t).to_owned()).collect(),
                workload: Workload::default(),
                fields,
                events: Vec::new(),
            });
        }
        out
    }

    /// A health alert when the kernel side has been silent for `silent` (the caller
    /// measures it on the wall clock and calls this once per silent spell).
    pub fn kernel_silent(&mut self, silent: Duration) -> Anomaly {
        let info = rule(KERNEL_SILENT).unwrap_or(&RULES[0]);
        self.seq += 1;
        let mut fields = BTreeMap::new();
        fields.insert("agent.rule".into(), json!(KERNEL_SILENT));
        fields.insert("agent.silent_seconds".into(), json!(silent.as_secs()));
        Anomaly {
            seq: self.seq,
            time: humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
            rule: KERNEL_SILENT.to_owned(),
            priority: info.priority,
            output: format!(
                "Kernel side silent: no record for {} s (normal on an idle node or with a narrow cgroup filter)",
                silent.as_secs()
            ),
            tags: info.tags.iter().map(|t| (*t).to_owned()).collect(),
            workload: Workload::default(),
            fields,
            events: Vec::new(),
        }
    }

    /// Applies overrides and rate limiting, and builds the anomaly.
    fn finish(
        &mut self,
        hit: Hit,
        policy: Option<&CompiledPolicy>,
        workload: &Workload,
        time: &str,
        ts: u64,
    ) -> Option<Anomaly> {
        let info = rule(hit.rule)?;
        let over = policy.and_then(|p| p.rule_override(hit.rule));
        if over.is_some_and(|o| o.disabled) {
            return None;
        }
        let priority = over
            .and_then(|o| o.priority)
            .or(hit.priority)
            .unwrap_or(info.priority);
        let key = workload.pod_uid.clone().unwrap_or_else(|| {
            if workload.host {
                "host".to_owned()
            } else {
                "unknown".to_owned()
            }
        });
        let mut fields = hit.fields;
        match self.limiter.check(hit.rule, &key, ts) {
            Limit::Suppressed => return None,
            Limit::Pass { suppressed_before } => {
                fields.insert("agent.suppressed".into(), json!(suppressed_before));
            }
        }
        fields.insert("agent.rule".into(), json!(hit.rule));
        fields.insert("agent.events".into(), json!(hit.events));
        self.seq += 1;
        Some(Anomaly {
            seq: self.seq,
            time: time.to_owned(),
            rule: hit.rule.to_owned(),
            priority,
            output: hit.output,
            tags: info.tags.iter().map(|t| (*t).to_owned()).collect(),
            workload: workload.clone(),
            fields,
            events: hit.events,
        })
    }

    fn on_open(&mut self, o: &OpenRecord, policy: Option<&CompiledPolicy>, hits: &mut Vec<Hit>) {
        let t = &o.task;
        let w = &t.workload;
        // A missing file reveals nothing and reads nothing.
        if o.result == -i64::from(libc::ENOENT) || !is_secret(o.class) {
            return;
        }
        let mut fields = task_fields(t);
        fields.insert("fd.name".into(), json!(o.path));
        fields.insert("agent.path_as_passed".into(), json!(o.raw_path));
        fields.insert("agent.credential.class".into(), json!(o.class));
        fields.insert(
            "agent.owner.pod_uid".into(),
            o.owner.as_ref().map_or(Value::Null, |x| opt(&x.pod_uid)),
        );
        fields.insert(
            "agent.owner.ns".into(),
            o.owner.as_ref().map_or(Value::Null, |x| opt(&x.namespace)),
        );
        fields.insert(
            "agent.owner.pod".into(),
            o.owner.as_ref().map_or(Value::Null, |x| opt(&x.name)),
        );
        fields.insert("evt.res".into(), json!(o.result));
        let class = serde_json::to_value(o.class)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        if o.result >= 0 {
            self.reads.record(Read {
                ts: t.ts_boot_ns,
                seq: o.seq,
                path: o.path.clone(),
                class: o.class,
                tgid: t.tgid,
            });
        }
        let own_uid = w.pod_uid.as_deref();
        let exe = t.exe.as_deref().unwrap_or("");
        let exe_name = if exe.is_empty() {
            t.comm.as_str()
        } else {
            basename(exe)
        };

        // 1. Another pod's credential (the kubelet, a host process, reads every pod's).
        if let Some(owner) = o.owner.as_ref().and_then(|x| x.pod_uid.as_deref()) {
            if !w.host && own_uid.is_some_and(|u| u != owner) {
                let on = o.owner.as_ref();
                hits.push(Hit {
                    priority: None,
                    rule: FOREIGN_CREDENTIAL_READ,
                    output: format!(
                        "Foreign credential read: {} read {class} of pod {}/{} at {}",
                        who(t),
                        on.and_then(|x| x.namespace.as_deref()).unwrap_or("-"),
                        on.and_then(|x| x.name.as_deref()).unwrap_or(owner),
                        o.path
                    ),
                    fields: fields.clone(),
                    events: vec![o.seq],
                });
            }
        }
        // 6. Node credentials; another process's environment. Host processes too: on a
        // node these are how a node compromise shows, and on a dev box they are the rules a
        // newcomer sees fire first. The node's own agents read node credentials as their
        // job and are left out.
        let node_agent = w.host && self.config.node_agents.iter().any(|a| a == exe_name);
        match o.class {
            CredentialClass::NodeKubeconfig
            | CredentialClass::NodePki
            | CredentialClass::CloudCredentials
                if !node_agent =>
            {
                let from = if w.host {
                    "by a host process"
                } else {
                    "from a container"
                };
                hits.push(Hit {
                    priority: None,
                    rule: NODE_CREDENTIAL_READ,
                    output: format!(
                        "Node credential read {from}: {} read {class} at {}",
                        who(t),
                        o.path
                    ),
                    fields: fields.clone(),
                    events: vec![o.seq],
                });
            }
            CredentialClass::ProcEnviron => {
                let target = o.owner.as_ref().and_then(|x| x.pid);
                if target.is_some_and(|pid| pid != t.tgid) {
                    hits.push(Hit {
                        priority: None,
                        rule: PROC_ENVIRON_READ,
                        output: format!(
                            "Environment of another process read: {} read {}",
                            who(t),
                            o.path
                        ),
                        fields: fields.clone(),
                        events: vec![o.seq],
                    });
                }
            }
            _ => {}
        }
        // The other rules judge pods: their readers, their policies, their baselines.
        if w.host {
            return;
        }
        // 2. The reader itself.
        let suspicious = self.config.suspicious_readers.iter().any(|s| s == exe_name);
        let off_policy = policy.is_some_and(|p| !p.allows_executable(exe));
        if suspicious || off_policy {
            let why = if suspicious {
                "a shell or file utility"
            } else {
                "an executable its policy does not name"
            };
            hits.push(Hit {
                priority: None,
                rule: UNEXPECTED_EXECUTABLE,
                output: format!(
                    "Credential read by {why}: {} read {class} at {}",
                    who(t),
                    o.path
                ),
                fields: fields.clone(),
                events: vec![o.seq],
            });
        }
        // 2b. What was read: the policy's grants, when it lists any. Files that hold
        // nothing secret (`ca.crt`, `namespace`) are not credentials to grant.
        if o.class != CredentialClass::NonSecret
            && policy.and_then(|p| p.allows_credential(o.class, &[&o.path, &o.raw_path]))
                == Some(false)
        {
            hits.push(Hit {
                priority: None,
                rule: CREDENTIAL_NOT_ALLOWED,
                output: format!(
                    "Credential read its policy does not grant: {} read {class} at {}",
                    who(t),
                    o.path
                ),
                fields: fields.clone(),
                events: vec![o.seq],
            });
        }
        // 7. Baseline: credential classes and the executables reading them.
        if let Some(window) = policy.and_then(CompiledPolicy::learning_window) {
            if let Some(agent) = w.agent.clone() {
                let win = window.as_nanos() as u64;
                for (kind, item) in [
                    ("credential class", class.clone()),
                    ("credential reader", exe.to_owned()),
                ] {
                    if self
                        .baselines
                        .observe(&agent, win, t.ts_boot_ns, kind, item.clone())
                    {
                        hits.push(Hit {
                            priority: None,
                            rule: BASELINE_DEVIATION,
                            output: format!(
                                "Baseline deviation: {} shows a new {kind} {item}",
                                who(t)
                            ),
                            fields: fields.clone(),
                            events: vec![o.seq],
                        });
                    }
                }
            }
        }
    }

    /// The destination classes allowed when a policy does not list any.
    fn default_allows(tier: Option<Tier>, class: DestinationClass, has_policy: bool) -> bool {
        match class {
            DestinationClass::Dns | DestinationClass::Cluster | DestinationClass::Loopback => true,
            // Without a policy nothing says the workload may not talk to the API server.
            DestinationClass::ApiServer => {
                tier == Some(Tier::Proxy) || (!has_policy && tier != Some(Tier::Worker))
            }
            DestinationClass::Metadata | DestinationClass::External => false,
        }
    }

    fn tier_of(policy: Option<&CompiledPolicy>, w: &Workload) -> Option<Tier> {
        policy
            .and_then(CompiledPolicy::tier)
            .or(match w.tier.as_deref() {
                Some("proxy") => Some(Tier::Proxy),
                Some("worker") => Some(Tier::Worker),
                _ => None,
            })
    }

    fn egress_allowed(
        policy: Option<&CompiledPolicy>,
        w: &Workload,
        class: DestinationClass,
        ip: IpAddr,
        port: u16,
    ) -> bool {
        let tier = Self::tier_of(policy, w);
        match policy.and_then(|p| p.egress_allows(class, ip, port)) {
            Some(allowed) => allowed,
            None => Self::default_allows(tier, class, policy.is_some()),
        }
    }

    fn on_connect(
        &mut self,
        c: &ConnectRecord,
        policy: Option<&CompiledPolicy>,
        hits: &mut Vec<Hit>,
    ) {
        let t = &c.task;
        let w = &t.workload;
        if !c.attempted || w.host {
            return;
        }
        let Ok(ip) = c.dst_addr.parse::<IpAddr>() else {
            return;
        };
        let class = self.config.destinations.classify(ip, c.dst_port);
        let class_name = serde_json::to_value(class)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let mut fields = task_fields(t);
        fields.insert("fd.sip".into(), json!(c.dst_addr));
        fields.insert("fd.sport".into(), json!(c.dst_port));
        fields.insert("agent.destination.class".into(), json!(class_name));
        fields.insert("evt.type".into(), json!(c.syscall));
        let dest = format!("{}:{} ({class_name})", c.dst_addr, c.dst_port);
        let allowed = Self::egress_allowed(policy, w, class, ip, c.dst_port);

        // Data sent on a socket connected earlier: the connection was judged when it was
        // made; the send matters only for the read-then-send correlation below.
        let new_destination = c.syscall != "send";
        if new_destination && class == DestinationClass::Metadata && !allowed {
            hits.push(Hit {
                priority: None,
                rule: CLOUD_METADATA,
                output: format!("Cloud metadata contact: {} connected to {dest}", who(t)),
                fields: fields.clone(),
                events: vec![c.seq],
            });
        }
        if new_destination && class == DestinationClass::ApiServer && !allowed {
            hits.push(Hit {
                priority: None,
                rule: API_SERVER_NOT_ALLOWED,
                output: format!(
                    "API server contact not allowed for tier {}: {} connected to {dest}",
                    Self::tier_of(policy, w).map_or("-", |t| if t == Tier::Proxy {
                        "proxy"
                    } else {
                        "worker"
                    }),
                    who(t)
                ),
                fields: fields.clone(),
                events: vec![c.seq],
            });
        }
        if new_destination
            && policy.is_some()
            && !allowed
            && !matches!(
                class,
                DestinationClass::Metadata | DestinationClass::ApiServer
            )
        {
            hits.push(Hit {
                priority: None,
                rule: EGRESS_OUTSIDE_ALLOWLIST,
                output: format!(
                    "Egress outside the allowlist: {} connected to {dest}",
                    who(t)
                ),
                fields: fields.clone(),
                events: vec![c.seq],
            });
        }
        // 3. A credential read shortly before, anywhere up the process tree.
        if !allowed {
            let window = self.config.exfil_window.as_nanos() as u64;
            let ancestry = self.parents.ancestry(t.tgid);
            if let Some(read) = self.reads.recent(&ancestry, t.ts_boot_ns, window).cloned() {
                let mut f = fields.clone();
                f.insert("fd.name".into(), json!(read.path));
                f.insert("agent.credential.class".into(), json!(read.class));
                f.insert("agent.reader.pid".into(), json!(read.tgid));
                f.insert(
                    "agent.read_to_connect_ms".into(),
                    json!((t.ts_boot_ns - read.ts) / 1_000_000),
                );
                hits.push(Hit {
                    priority: None,
                    rule: EXFILTRATION,
                    output: format!(
                        "Credential read then egress outside the allowlist: {} connected to {dest} {} ms after pid {} read {}",
                        who(t),
                        (t.ts_boot_ns - read.ts) / 1_000_000,
                        read.tgid,
                        read.path
                    ),
                    fields: f,
                    events: vec![read.seq, c.seq],
                });
            }
        }
        if let Some(window) = policy.and_then(CompiledPolicy::learning_window) {
            if let Some(agent) = w.agent.clone() {
                if self.baselines.observe(
                    &agent,
                    window.as_nanos() as u64,
                    t.ts_boot_ns,
                    "destination class",
                    class_name.clone(),
                ) {
                    hits.push(Hit {
                        priority: None,
                        rule: BASELINE_DEVIATION,
                        output: format!("Baseline deviation: {} shows a new destination class {class_name} ({dest})", who(t)),
                        fields,
                        events: vec![c.seq],
                    });
                }
            }
        }
    }

    fn on_lost(&mut self, l: &LostRecord, hits: &mut Vec<Hit>) {
        let mut fields = BTreeMap::new();
        fields.insert("agent.lane".into(), json!(l.lane));
        fields.insert("agent.lost".into(), json!(l.count));
        fields.insert("agent.lost_total".into(), json!(l.total));
        fields.insert("agent.lost_reason".into(), json!(l.reason.name()));
        let output = match (&l.reason, &l.workload) {
            (LostReason::Budget, Some(w)) => {
                fields.extend(workload_fields(w));
                fields.insert("agent.cgroup".into(), opt(&w.cgroup));
                let name = if w.host {
                    format!("host cgroup {}", or_dash(&w.cgroup))
                } else {
                    format!(
                        "pod {}/{} (container {}, agent {})",
                        or_dash(&w.namespace),
                        w.pod.as_deref().or(w.pod_uid.as_deref()).unwrap_or("-"),
                        or_dash(&w.container),
                        or_dash(&w.agent)
                    )
                };
                format!(
                    "Events dropped over budget: {name} flooded the {} lane; {} of its records dropped ({} since start); other workloads keep their share (lanes.{}.budget)",
                    l.lane, l.count, l.total, l.lane
                )
            }
            _ => format!(
                "Events lost: the kernel dropped {} {} records ({} since start); raise lanes.{}.ring_bytes",
                l.count, l.lane, l.total, l.lane
            ),
        };
        hits.push(Hit {
            rule: EVENTS_LOST,
            priority: Some(lost_priority(&l.lane)),
            output,
            fields,
            events: vec![l.seq],
        });
    }
}

/// Lost process records do not hide credential use: they are reported lower.
pub fn lost_priority(lane: &str) -> Priority {
    if lane == "process" {
        Priority::Warning
    } else {
        Priority::Critical
    }
}
