//! The API schema every output shares: the `agent_monitor.v1` messages ([`pb`]), the
//! conversions between them and the daemon's model ([`Origin`] stamps what the daemon
//! hands out; replay turns journaled messages back into records), and their proto3 JSON
//! form ([`json`]).
//!
//! It sits between `detect` and `outputs` in the flow: it converts records (`events`,
//! `identity`) and anomalies (`detect`, `policy`), and every output (the gRPC streams, the
//! journal, the JSON lines, Falco, metrics, `tail`) reads the converted form from here.

mod convert;
pub mod json;

pub use convert::{
    event_lane, family_name, fields_from_pb, fields_to_pb, lane_name, priority_from_pb,
    priority_name, priority_to_pb, put_workload, syscall_name, timestamp, value_from_pb, Malformed,
    Origin,
};

/// The `agent_monitor.v1` messages (agent-monitor-api) and the service generated for them.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    rust_2018_idioms
)]
pub mod pb {
    pub use agent_monitor_api::pb::*;

    tonic::include_proto!("agent_monitor.v1");

    /// The fully qualified service name.
    pub const SERVICE_NAME: &str = "agent_monitor.v1.AgentMonitor";
}
