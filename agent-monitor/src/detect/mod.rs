//! Detection: built-in rules over enriched records, tuned by AgentPolicy.
//!
//! Each rule has a stable id, a Falco priority and MITRE ATT&CK tags ([`RULES`]). The
//! engine sees records in order, keeps bounded state ([`state`]), and returns anomalies;
//! it never reads files or the network, so a journal replay decides exactly as live.

mod credential;
pub mod destinations;
mod fields;
mod health;
mod network;
pub mod state;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use self::health::lost_priority;
use self::{
    destinations::Destinations,
    state::{Baselines, Limit, Parents, RateLimiter, Reads},
};
use crate::{
    events::Record,
    identity::Workload,
    policy::{matching::CompiledPolicy, PolicySet, Priority},
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

/// What an alert says: its one-line `output` and its Falco `output_fields`.
type Details<'r> = Box<dyn FnOnce() -> (String, BTreeMap<String, Value>) + 'r>;

/// A candidate alert before overrides and rate limiting.
struct Hit<'r> {
    rule: &'static str,
    /// Instead of the rule's default (before policy overrides).
    priority: Option<Priority>,
    /// Built only for a hit that becomes an alert: under a flood the rate limiter
    /// suppresses most hits, and the words and fields (a map of a dozen owned strings)
    /// cost more than the rules.
    details: Details<'r>,
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
        // Borrowed, not copied: most records raise nothing, and a task holds the whole
        // workload (labels included).
        let task = record.task();
        if let Some(t) = task {
            self.last_ts = self.last_ts.max(t.ts_boot_ns);
            self.last_time.clone_from(&t.time);
            if let Some(ppid) = t.ppid {
                self.parents.record(t.tgid, ppid, t.ts_boot_ns);
            }
        }
        let policy = task.and_then(|t| self.policy_for(&t.workload));
        match record {
            Record::Open(o) => self.on_open(o, policy.as_deref(), &mut hits),
            Record::Connect(c) => self.on_connect(c, policy.as_deref(), &mut hits),
            Record::Fork(f) => self
                .parents
                .record(f.child_pid, f.task.tgid, f.task.ts_boot_ns),
            Record::Lost(l) => self.on_lost(l, &mut hits),
            Record::Exec(_) | Record::Exit(_) => {}
        }
        if hits.is_empty() {
            return Vec::new();
        }
        let time = match record {
            Record::Lost(l) => l.time.as_str(),
            _ => task.map_or("", |t| t.time.as_str()),
        };
        let none = Workload::default();
        let workload = match record {
            // A budget drop is one workload's: its alert names it.
            Record::Lost(l) => l.workload.as_ref(),
            _ => task.map(|t| &*t.workload),
        }
        .unwrap_or(&none);
        let ts = task.map_or(self.last_ts, |t| t.ts_boot_ns);
        hits.into_iter()
            .filter_map(|hit| self.finish(hit, policy.as_deref(), workload, time, ts))
            .collect()
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

    /// Applies overrides and rate limiting, and builds the anomaly.
    fn finish(
        &mut self,
        hit: Hit<'_>,
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
        let key =
            workload
                .pod_uid
                .as_deref()
                .unwrap_or(if workload.host { "host" } else { "unknown" });
        let suppressed_before = match self.limiter.check(hit.rule, key, ts) {
            Limit::Suppressed => return None,
            Limit::Pass { suppressed_before } => suppressed_before,
        };
        let (output, mut fields) = (hit.details)();
        fields.insert("agent.suppressed".into(), json!(suppressed_before));
        fields.insert("agent.rule".into(), json!(hit.rule));
        fields.insert("agent.events".into(), json!(hit.events));
        self.seq += 1;
        Some(Anomaly {
            seq: self.seq,
            time: time.to_owned(),
            rule: hit.rule.to_owned(),
            priority,
            output,
            tags: info.tags.iter().map(|t| (*t).to_owned()).collect(),
            workload: workload.clone(),
            fields,
            events: hit.events,
        })
    }
}
