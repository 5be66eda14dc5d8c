//! agent-monitor's one schema and its forensic journal format.
//!
//! - [`pb`]: the `agent_monitor.v1` messages (`proto/agent_monitor/v1/`): what the gRPC API
//!   streams, what the journal stores, and what the JSON outputs print in proto3 JSON.
//! - [`journal`]: the journal's segment files of length-prefixed, checksummed
//!   [`pb::JournalRecord`]s: writer (rotation, retention, torn-tail recovery) and reader.
//!
//! A crate of its own so that what reads journals (replay tools, the fuzz target) needs
//! neither the daemon nor its dependencies.

pub mod journal;

/// Messages generated from `proto/agent_monitor/v1/*.proto`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    rust_2018_idioms
)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/agent_monitor.v1.rs"));

    /// The encoded `FileDescriptorSet` of the schema and its imports (for reflection and
    /// proto3 JSON).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/agent_monitor_descriptor.bin"));
}
