//! Monitor health: records lost in a lane, the kernel side silent.

use std::{collections::BTreeMap, time::Duration};

use serde_json::json;

use super::{
    fields::{opt, or_dash, workload_fields},
    rule, Anomaly, Engine, Hit, EVENTS_LOST, KERNEL_SILENT, RULES,
};
use crate::{
    events::{LostReason, LostRecord},
    identity::Workload,
    policy::Priority,
};

impl Engine {
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

    pub(super) fn on_lost(&mut self, l: &LostRecord, hits: &mut Vec<Hit<'_>>) {
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
            // Records lost are rare and always reported: built at once.
            details: Box::new(move || (output, fields)),
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
