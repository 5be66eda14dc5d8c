//! The proto3 JSON form of the API's messages: one schema everywhere. The JSON-lines
//! event output and `tail --json` print exactly what a gRPC client decodes, field for field
//! (proto field names, 64-bit integers as strings, timestamps in RFC 3339, enums by name,
//! default values left out), as the proto3 JSON mapping prescribes.
//!
//! The messages' `serde` impls are generated with them (pbjson-build, in
//! agent-monitor-api): a message is serialized straight from its fields, with no
//! intermediate encoding.

use std::io::Write;

use serde::Serialize;

use super::{
    grpc::pb,
    jsonl::{JsonLines, Reopen},
    EventItem, Sink,
};

/// A message as a proto3 JSON value (its object's keys sorted, as `serde_json` keeps them).
pub fn to_value<M: Serialize>(msg: &M) -> std::io::Result<serde_json::Value> {
    serde_json::to_value(msg).map_err(std::io::Error::other)
}

/// An event as proto3 JSON.
pub fn event(e: &pb::Event) -> std::io::Result<serde_json::Value> {
    to_value(e)
}

/// An anomaly as proto3 JSON.
pub fn anomaly(a: &pb::Anomaly) -> std::io::Result<serde_json::Value> {
    to_value(a)
}

/// Writes each record as one line of the proto3 JSON form of `agent_monitor.v1.Event`
/// (the wire event the pipeline converted once), serialized straight into the buffered
/// writer (no intermediate JSON value), its fields in the schema's order.
pub struct EventLines<W: Write> {
    lines: JsonLines<W>,
}

impl<W: Write> EventLines<W> {
    pub fn new(out: W) -> Self {
        Self {
            lines: JsonLines::new(out),
        }
    }
}

impl<W: Write + Reopen> Sink<EventItem> for EventLines<W> {
    fn write(&mut self, e: &EventItem) -> std::io::Result<()> {
        self.lines
            .line(|s| e.api.serialize(s).map_err(std::io::Error::other))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Sink::<serde_json::Value>::flush(&mut self.lines)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        self.lines.reopen()
    }
}

#[cfg(test)]
mod tests;
