//! The gRPC API (`agent_monitor.v1.AgentMonitor`): live streams of events and anomalies
//! with server-side filters, and the daemon's status.
//!
//! - [`Hub`] fans records and anomalies out to clients without ever waiting on one: a slow
//!   client loses items, and is told how many with a `Gap`.
//! - [`serve`] runs the service on TCP (optionally TLS or mutual TLS) and/or a Unix socket
//!   (mode 0600), with gRPC health checking and server reflection.
//! - [`tail`] is a client that prints the streams as a table or as JSON lines.
//!
//! The wire types are in [`pb`], generated from `proto/agent_monitor/v1/agent_monitor.proto`.

mod convert;
mod hub;
mod server;
mod tail;

use std::path::PathBuf;

pub use convert::{priority_from_pb, priority_name, priority_to_pb, rfc3339, timestamp};
pub use hub::{Delivery, Hub, Subscription};
pub use server::{
    serve, AgentMonitorService, GrpcConfig, GrpcServer, StatusSource, TlsConfig,
    DEFAULT_QUEUE_PER_CLIENT,
};
pub use tail::{channel, connect, tail, ClientTls};

/// Messages and service generated from `agent_monitor/v1/agent_monitor.proto`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    rust_2018_idioms
)]
pub mod pb {
    tonic::include_proto!("agent_monitor.v1");

    /// The encoded `FileDescriptorSet` of the API and its imports (for reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/agent_monitor_descriptor.bin"));

    /// The fully qualified service name.
    pub const SERVICE_NAME: &str = "agent_monitor.v1.AgentMonitor";
}

/// What can go wrong serving or calling the API.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// Neither a TCP address nor a Unix socket path was configured.
    #[error("no gRPC listener configured: set a TCP address and/or a Unix socket path")]
    NoListener,
    /// The TCP listener could not be bound.
    #[error("binding gRPC TCP listener on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The Unix socket could not be created, secured or cleaned up.
    #[error("gRPC Unix socket {path}: {source}")]
    UnixSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process is listening on the Unix socket path.
    #[error("gRPC Unix socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    /// A certificate, key or CA file could not be read.
    #[error("reading TLS file {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TLS configuration is invalid (tonic rejected the certificate or key).
    #[error("TLS configuration: {0}")]
    Tls(#[source] tonic::transport::Error),
    /// A setting does not make sense (e.g. a client certificate without a key).
    #[error("gRPC configuration: {0}")]
    Config(String),
    /// The reflection service could not be built from the descriptor set.
    #[error("building gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server failed while serving.
    #[error("gRPC server: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// The client endpoint is not a valid `http://`, `https://` or `unix:` address.
    #[error("invalid gRPC endpoint {endpoint}: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    /// The client could not connect.
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    /// A call failed or the stream ended with an error status.
    #[error("gRPC call failed: {0}")]
    Rpc(Box<tonic::Status>),
    /// The server sent a message that does not convert to the daemon's model.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Writing the client's output failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl From<tonic::Status> for GrpcError {
    fn from(s: tonic::Status) -> Self {
        GrpcError::Rpc(Box::new(s))
    }
}
