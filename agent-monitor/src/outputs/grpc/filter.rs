//! A stream's [`pb::Filter`], compiled: which events and anomalies a client is sent.
//!
//! The same filter applies to live items (the daemon's model, before conversion, so an
//! item no client wants is never converted) and to items served from the journal (wire
//! messages), through one [`View`] of either.

use std::collections::HashSet;

use crate::{
    api::{self, pb},
    detect::Anomaly,
    events::Record,
    identity::Workload,
    outputs::EventItem,
    policy::Priority,
};

/// What a filter looks at in an item.
#[derive(Debug, Default, Clone, Copy)]
struct View<'a> {
    /// None for a loss report, which belongs to no workload.
    workload: Option<WorkloadView<'a>>,
    /// Events only.
    kind: Option<pb::EventKind>,
    /// Anomalies only.
    rule: Option<&'a str>,
    priority: Option<Priority>,
}

#[derive(Debug, Default, Clone, Copy)]
struct WorkloadView<'a> {
    namespace: Option<&'a str>,
    pod: Option<&'a str>,
    pod_uid: Option<&'a str>,
    agent: Option<&'a str>,
}

impl<'a> WorkloadView<'a> {
    fn of(w: &'a Workload) -> Self {
        Self {
            namespace: w.namespace.as_deref(),
            pod: w.pod.as_deref(),
            pod_uid: w.pod_uid.as_deref(),
            agent: w.agent.as_deref(),
        }
    }

    fn of_pb(w: Option<&'a pb::Workload>) -> Self {
        let non_empty = |s: &'a String| (!s.is_empty()).then_some(s.as_str());
        w.map_or_else(Self::default, |w| Self {
            namespace: non_empty(&w.namespace),
            pod: non_empty(&w.pod),
            pod_uid: non_empty(&w.pod_uid),
            agent: non_empty(&w.agent),
        })
    }
}

fn kind_of(r: &Record) -> pb::EventKind {
    match r {
        Record::Open(_) => pb::EventKind::Open,
        Record::Connect(_) => pb::EventKind::Connect,
        Record::Exec(_) => pb::EventKind::Exec,
        Record::Fork(_) => pb::EventKind::Fork,
        Record::Exit(_) => pb::EventKind::Exit,
        Record::Lost(_) => pb::EventKind::Lost,
    }
}

fn kind_of_pb(e: &pb::Event) -> Option<pb::EventKind> {
    use pb::event::Kind;
    Some(match e.kind.as_ref()? {
        Kind::Open(_) => pb::EventKind::Open,
        Kind::Connect(_) => pb::EventKind::Connect,
        Kind::Exec(_) => pb::EventKind::Exec,
        Kind::Fork(_) => pb::EventKind::Fork,
        Kind::Exit(_) => pb::EventKind::Exit,
        Kind::Lost(_) => pb::EventKind::Lost,
    })
}

/// One compiled [`pb::Selector`].
#[derive(Debug, Clone, Default)]
struct Lists {
    namespaces: HashSet<String>,
    pods: HashSet<String>,
    agents: HashSet<String>,
    rules: HashSet<String>,
}

impl Lists {
    fn new(s: Option<&pb::Selector>) -> Self {
        let set = |v: &[String]| {
            v.iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect::<HashSet<_>>()
        };
        s.map_or_else(Self::default, |s| Self {
            namespaces: set(&s.namespaces),
            pods: set(&s.pods),
            agents: set(&s.agents),
            rules: set(&s.rules),
        })
    }

    /// `pods` holds a pod name, `namespace/name` or the pod's UID of `w`.
    fn has_pod(&self, w: &WorkloadView<'_>) -> bool {
        w.pod.is_some_and(|p| {
            self.pods.contains(p)
                || w.namespace
                    .is_some_and(|ns| self.pods.contains(&format!("{ns}/{p}")))
        }) || w.pod_uid.is_some_and(|u| self.pods.contains(u))
    }

    fn has(set: &HashSet<String>, value: Option<&str>) -> bool {
        value.is_some_and(|v| set.contains(v))
    }

    /// Allow: every non-empty list holds the item's value.
    fn allows(&self, v: &View<'_>) -> bool {
        let rule_ok = self.rules.is_empty() || v.rule.is_none() || Self::has(&self.rules, v.rule);
        let Some(w) = &v.workload else {
            return rule_ok;
        };
        rule_ok
            && (self.namespaces.is_empty() || Self::has(&self.namespaces, w.namespace))
            && (self.pods.is_empty() || self.has_pod(w))
            && (self.agents.is_empty() || Self::has(&self.agents, w.agent))
    }

    /// Deny: any list holds the item's value.
    fn denies(&self, v: &View<'_>) -> bool {
        Self::has(&self.rules, v.rule)
            || v.workload.as_ref().is_some_and(|w| {
                Self::has(&self.namespaces, w.namespace)
                    || self.has_pod(w)
                    || Self::has(&self.agents, w.agent)
            })
    }
}

/// A compiled [`pb::Filter`].
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    allow: Lists,
    deny: Lists,
    /// Empty: every kind.
    kinds: Vec<pb::EventKind>,
    /// Only anomalies at least this severe.
    min_priority: Option<Priority>,
}

impl Matcher {
    /// Compiles a filter; an enum value this daemon does not know is refused (the text
    /// becomes the INVALID_ARGUMENT status), so no client silently gets more than it asked.
    pub fn new(f: Option<&pb::Filter>) -> Result<Self, String> {
        let Some(f) = f else {
            return Ok(Self::default());
        };
        let kinds = f
            .kinds
            .iter()
            .map(|&k| match pb::EventKind::try_from(k) {
                Ok(pb::EventKind::Unspecified) | Err(_) => {
                    Err(format!("filter.kinds: unknown event kind {k}"))
                }
                Ok(kind) => Ok(kind),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let min_priority = match pb::Priority::try_from(f.min_priority) {
            Ok(p) => api::priority_from_pb(p),
            Err(_) => {
                return Err(format!(
                    "filter.min_priority: unknown priority {}",
                    f.min_priority
                ))
            }
        };
        Ok(Self {
            allow: Lists::new(f.allow.as_ref()),
            deny: Lists::new(f.deny.as_ref()),
            kinds,
            min_priority,
        })
    }

    fn matches(&self, v: &View<'_>) -> bool {
        v.kind
            .is_none_or(|k| self.kinds.is_empty() || self.kinds.contains(&k))
            && self
                .min_priority
                .is_none_or(|min| v.priority.is_none_or(|p| p <= min))
            && self.allow.allows(v)
            && !self.deny.denies(v)
    }

    /// A live record. A `lost` record has no workload: only `kinds` can refuse it, since
    /// it tells the client that events it may have wanted were dropped.
    pub fn record(&self, r: &Record) -> bool {
        self.matches(&View {
            workload: r.task().map(|t| WorkloadView::of(&t.workload)),
            kind: Some(kind_of(r)),
            ..View::default()
        })
    }

    /// A live anomaly.
    pub fn anomaly(&self, a: &Anomaly) -> bool {
        self.matches(&View {
            workload: Some(WorkloadView::of(&a.workload)),
            rule: Some(&a.rule),
            priority: Some(a.priority),
            ..View::default()
        })
    }

    /// An event as the pipeline converted it: by its shared workload when it has one,
    /// else as [`Matcher::pb_event`].
    pub fn event_item(&self, e: &EventItem) -> bool {
        match &e.workload {
            Some(w) => self.matches(&View {
                workload: Some(WorkloadView::of(w)),
                kind: kind_of_pb(&e.api),
                ..View::default()
            }),
            None => self.pb_event(&e.api),
        }
    }

    /// A journaled event.
    pub fn pb_event(&self, e: &pb::Event) -> bool {
        let kind = kind_of_pb(e);
        let lost = kind == Some(pb::EventKind::Lost);
        self.matches(&View {
            workload: (!lost).then(|| WorkloadView::of_pb(e.workload.as_ref())),
            kind,
            ..View::default()
        })
    }

    /// A journaled anomaly.
    pub fn pb_anomaly(&self, a: &pb::Anomaly) -> bool {
        self.matches(&View {
            workload: Some(WorkloadView::of_pb(a.workload.as_ref())),
            rule: Some(&a.rule),
            priority: api::priority_from_pb(a.priority()),
            ..View::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ExitRecord, LostRecord, Task};

    fn workload(ns: &str, pod: &str, agent: &str) -> Workload {
        Workload {
            namespace: Some(ns.into()),
            pod: Some(pod.into()),
            pod_uid: Some(format!("uid-{pod}")),
            agent: Some(agent.into()),
            ..Workload::default()
        }
    }

    fn exit(w: Workload) -> Record {
        Record::Exit(ExitRecord {
            seq: 1,
            task: Task {
                time: String::new(),
                ts_boot_ns: 0,
                pid: 1,
                tgid: 1,
                ppid: None,
                uid: 0,
                gid: 0,
                comm: String::new(),
                exe: None,
                cgroup_id: 0,
                start_ns: 0,
                workload: w.into(),
            },
        })
    }

    fn lost() -> Record {
        Record::Lost(LostRecord {
            seq: 2,
            time: String::new(),
            lane: "network".into(),
            count: 1,
            total: 1,
            reason: crate::events::LostReason::RingFull,
            workload: None,
        })
    }

    fn anomaly(rule: &str, priority: Priority, w: Workload) -> Anomaly {
        Anomaly {
            seq: 1,
            time: String::new(),
            rule: rule.into(),
            priority,
            output: String::new(),
            tags: vec![],
            workload: w,
            fields: Default::default(),
            events: vec![],
        }
    }

    fn selector(ns: &[&str], pods: &[&str], agents: &[&str], rules: &[&str]) -> pb::Selector {
        let v = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect();
        pb::Selector {
            namespaces: v(ns),
            pods: v(pods),
            agents: v(agents),
            rules: v(rules),
        }
    }

    fn matcher(f: pb::Filter) -> Matcher {
        Matcher::new(Some(&f)).expect("valid filter")
    }

    #[test]
    fn allow_lists_all_must_match_and_deny_refuses_any() {
        let m = matcher(pb::Filter {
            allow: Some(selector(&["agents"], &[], &[], &[])),
            deny: Some(selector(&[], &["agents/noisy"], &["scraper"], &[])),
            ..Default::default()
        });
        assert!(m.record(&exit(workload("agents", "coder", "coder"))));
        assert!(
            !m.record(&exit(workload("prod", "coder", "coder"))),
            "not allowed"
        );
        assert!(
            !m.record(&exit(workload("agents", "noisy", "coder"))),
            "pod denied"
        );
        assert!(
            !m.record(&exit(workload("agents", "x", "scraper"))),
            "agent denied"
        );
        // The journal path decides the same.
        let pb_exit = pb::Event::from(&exit(workload("agents", "noisy", "coder")));
        assert!(!m.pb_event(&pb_exit));
        let pb_exit = pb::Event::from(&exit(workload("agents", "coder", "coder")));
        assert!(m.pb_event(&pb_exit));
        // Loss reports are refused by no workload list.
        assert!(m.record(&lost()) && m.pb_event(&pb::Event::from(&lost())));
    }

    #[test]
    fn pods_match_by_name_namespace_slash_name_or_uid() {
        for pod in ["coder", "agents/coder", "uid-coder"] {
            let m = matcher(pb::Filter {
                allow: Some(selector(&[], &[pod], &[], &[])),
                ..Default::default()
            });
            assert!(m.record(&exit(workload("agents", "coder", "a"))), "{pod}");
            assert!(!m.record(&exit(workload("agents", "other", "a"))), "{pod}");
        }
    }

    #[test]
    fn kinds_select_event_kinds_including_lost() {
        let m = matcher(pb::Filter {
            kinds: vec![pb::EventKind::Open as i32],
            ..Default::default()
        });
        assert!(!m.record(&exit(workload("a", "b", "c"))));
        assert!(!m.record(&lost()));
        let m = matcher(pb::Filter {
            kinds: vec![pb::EventKind::Exit as i32, pb::EventKind::Lost as i32],
            ..Default::default()
        });
        assert!(m.record(&exit(workload("a", "b", "c"))) && m.record(&lost()));
    }

    #[test]
    fn rules_and_priority_apply_to_anomalies() {
        let m = matcher(pb::Filter {
            allow: Some(selector(&[], &[], &[], &["r1", "r2"])),
            deny: Some(selector(&[], &[], &[], &["r2"])),
            min_priority: pb::Priority::Warning as i32,
            ..Default::default()
        });
        let w = workload("a", "b", "c");
        assert!(m.anomaly(&anomaly("r1", Priority::Critical, w.clone())));
        assert!(
            !m.anomaly(&anomaly("r2", Priority::Critical, w.clone())),
            "denied"
        );
        assert!(
            !m.anomaly(&anomaly("r3", Priority::Critical, w.clone())),
            "not allowed"
        );
        assert!(
            !m.anomaly(&anomaly("r1", Priority::Notice, w.clone())),
            "too low"
        );
        assert!(m.pb_anomaly(&pb::Anomaly::from(&anomaly("r1", Priority::Warning, w))));
        // Rule lists do not refuse events, which have no rule.
        assert!(m.record(&exit(workload("a", "b", "c"))));
    }

    #[test]
    fn unknown_enum_values_are_refused() {
        for f in [
            pb::Filter {
                kinds: vec![99],
                ..Default::default()
            },
            pb::Filter {
                kinds: vec![0],
                ..Default::default()
            },
            pb::Filter {
                min_priority: 42,
                ..Default::default()
            },
        ] {
            assert!(Matcher::new(Some(&f)).is_err(), "{f:?}");
        }
        assert!(Matcher::new(None).expect("no filter").record(&lost()));
    }
}
