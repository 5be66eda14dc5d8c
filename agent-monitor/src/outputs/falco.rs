//! Falco-compatible alerts: the JSON Falco prints and Falcosidekick accepts on `POST /`
//! (`time`, `rule`, `priority`, `output`, `output_fields`, `source`, `tags`, `hostname`).

use std::{collections::BTreeMap, io::Write};

use serde::Serialize;
use serde_json::Value;

use super::{
    jsonl::{JsonLines, Reopen},
    Sink,
};
use crate::{detect::Anomaly, policy::Priority};

/// The `source` of every alert.
pub const SOURCE: &str = "agent-monitor";

/// One alert as Falco formats it.
#[derive(Debug, Serialize)]
pub struct FalcoAlert<'a> {
    pub time: &'a str,
    pub rule: &'a str,
    pub priority: Priority,
    pub output: &'a str,
    pub output_fields: &'a BTreeMap<String, Value>,
    pub source: &'static str,
    pub tags: &'a [String],
    pub hostname: &'a str,
}

impl<'a> FalcoAlert<'a> {
    pub fn new(a: &'a Anomaly, hostname: &'a str) -> Self {
        Self {
            time: &a.time,
            rule: &a.rule,
            priority: a.priority,
            output: &a.output,
            output_fields: &a.fields,
            source: SOURCE,
            tags: &a.tags,
            hostname,
        }
    }
}

/// This node's name for the `hostname` field: NODE_NAME, else the kernel's hostname.
pub fn hostname() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Writes each anomaly as one line of Falco JSON.
pub struct FalcoLines<W: Write> {
    lines: JsonLines<W>,
    hostname: String,
}

impl<W: Write> FalcoLines<W> {
    pub fn new(out: W, hostname: String) -> Self {
        Self {
            lines: JsonLines::new(out),
            hostname,
        }
    }
}

impl<W: Write + Reopen> Sink<Anomaly> for FalcoLines<W> {
    fn write(&mut self, a: &Anomaly) -> std::io::Result<()> {
        self.lines.write(&FalcoAlert::new(a, &self.hostname))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Sink::<FalcoAlert<'_>>::flush(&mut self.lines)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        self.lines.reopen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_falco() {
        let mut fields = BTreeMap::new();
        fields.insert("k8s.ns.name".to_owned(), Value::from("agents"));
        let a = Anomaly {
            seq: 1,
            time: "2026-11-23T07:06:34.915522513Z".into(),
            rule: "foreign-credential-read".into(),
            priority: Priority::Critical,
            output: "Foreign credential read".into(),
            tags: vec!["T1528".into()],
            workload: Default::default(),
            fields,
            events: vec![3],
        };
        let mut buf = Vec::new();
        {
            let mut sink = FalcoLines::new(&mut buf, "node-a".into());
            sink.write(&a).expect("write");
            sink.flush().expect("flush");
        }
        let v: Value = serde_json::from_slice(&buf).expect("json");
        assert_eq!(v["priority"], "Critical");
        assert_eq!(v["source"], "agent-monitor");
        assert_eq!(v["hostname"], "node-a");
        assert_eq!(v["output_fields"]["k8s.ns.name"], "agents");
        assert_eq!(v["time"], "2026-11-23T07:06:34.915522513Z");
        assert_eq!(v["tags"][0], "T1528");
    }
}
