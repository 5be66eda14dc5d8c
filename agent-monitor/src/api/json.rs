//! The proto3 JSON form of the API's messages: one schema everywhere. The JSON-lines
//! event output and `tail --json` print exactly what a gRPC client decodes, field for field
//! (proto field names, 64-bit integers as strings, timestamps in RFC 3339, enums by name,
//! default values left out), as the proto3 JSON mapping prescribes.
//!
//! The messages' `serde` impls are generated with them (pbjson-build, in
//! agent-monitor-api): a message is serialized straight from its fields, with no
//! intermediate encoding.

use serde::Serialize;

use super::pb;

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

#[cfg(test)]
pub(crate) mod tests;
