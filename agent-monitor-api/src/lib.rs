//! agent-monitor's one schema and its forensic journal format.
//!
//! - [`pb`]: the `agent_monitor.v1` messages (`proto/agent_monitor/v1/`): what the gRPC API
//!   streams, what the journal stores, and what the JSON outputs print in proto3 JSON (their
//!   generated `serde` impls).
//! - [`wkt`]: the well-known types the messages use (`google.protobuf.Timestamp`, `Struct`,
//!   `Value`), with their proto3 JSON forms.
//! - [`journal`]: the journal's segment files of length-prefixed, checksummed
//!   [`pb::JournalRecord`]s: writer (rotation, retention, torn-tail recovery) and reader.
//!
//! A crate of its own so that what reads journals (replay tools, the fuzz target) needs
//! neither the daemon nor its dependencies.

pub mod journal;
pub mod wkt;

/// Code generated from `proto/` (prost-build messages, pbjson-build serde impls), in the
/// module tree of the proto packages, so that the paths between packages resolve.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    rust_2018_idioms
)]
mod generated {
    pub mod agent_monitor {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/agent_monitor.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/agent_monitor.v1.serde.rs"));

            /// The encoded `FileDescriptorSet` of the schema and its imports (for server
            /// reflection).
            pub const FILE_DESCRIPTOR_SET: &[u8] =
                include_bytes!(concat!(env!("OUT_DIR"), "/agent_monitor_descriptor.bin"));
        }
    }

    pub mod google {
        pub mod protobuf {
            include!(concat!(env!("OUT_DIR"), "/google.protobuf.rs"));
        }
    }
}

/// Messages generated from `proto/agent_monitor/v1/*.proto`. Each message and enum
/// implements `serde::Serialize` and `Deserialize` in the proto3 JSON mapping, with the
/// proto field names (`run_id`, not `runId`).
pub use generated::agent_monitor::v1 as pb;
