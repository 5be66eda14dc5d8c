//! The gRPC API (`agent_monitor.v1.AgentMonitor`): live streams of events and anomalies
//! with server-side filters, and the daemon's status.
//!
//! - [`Hub`] fans records and anomalies out to clients without ever waiting on one: a slow
//!   client loses items, and is told how many with a `Gap`.
//! - [`serve`] runs the service on TCP (optionally TLS or mutual TLS) and/or a Unix socket
//!   (mode 0600), with gRPC health checking and server reflection.
//! - [`tail`] is a client that prints the streams as a table or as JSON lines.
//!
//! The wire types and their conversions are in [`crate::api`]: the messages of
//! agent-monitor-api (`agent-monitor-api/proto/agent_monitor/v1/agent_monitor.proto`) and
//! the service.

mod authority;
mod filter;
mod hub;
mod resume;
mod server;
mod tail;

use std::path::PathBuf;

pub use filter::Matcher;
pub use hub::{Delivery, Hub, Subscription};
pub use resume::{JournalSource, BARRIER_TIMEOUT};
pub use server::{
    check_tls, serve, AgentMonitorService, GrpcServer, GrpcSettings, RunningGrpc, StatusSource,
    TlsSettings, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT, DEFAULT_QUEUE_PER_CLIENT,
    SHUTTING_DOWN,
};
pub use tail::{
    anomaly_line, channel, connect, parse_priority, tail, ClientTls, EventKind, OutputFormat,
    TailOptions,
};

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
    #[error("TLS configuration: {}", crate::errors::error_chain(.0))]
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
    /// The server's task panicked or was cancelled.
    #[error("gRPC server task: {0}")]
    Task(String),
    /// The client endpoint is not a valid `http://`, `https://` or `unix:` address.
    #[error(
        "invalid gRPC endpoint {endpoint}: {}",
        crate::errors::error_chain(source)
    )]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    /// The client could not connect. tonic says only "transport error": the message is
    /// the innermost cause (connection refused, no such socket, a certificate problem).
    #[error("cannot connect to {endpoint}: {}", root_cause(source))]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    /// A call failed or the stream ended with an error status.
    #[error("{}", status_words(.0))]
    Rpc(Box<tonic::Status>),
    /// The server sent a message that has no proto3 JSON form (`tail --json`: a time out
    /// of the range RFC 3339 can write, a field that is not a finite number).
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

/// The innermost cause of `e`: what actually happened under tonic's "transport error".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// A status in words: `unavailable: <message>: <cause>`, instead of the struct tonic
/// displays (`status: Unavailable, message: ..., details: [], metadata: ...`).
fn status_words(s: &tonic::Status) -> String {
    use tonic::Code;
    let code = match s.code() {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "the call failed",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "not implemented by this server (is it agent-monitor?)",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    };
    let mut words = code.to_owned();
    if !s.message().is_empty() {
        words.push_str(": ");
        words.push_str(s.message());
    }
    // The message often already holds the first causes (hyper and h2 repeat each other).
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !words.contains(&text) {
            words.push_str(": ");
            words.push_str(&text);
        }
        cause = c.source();
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_words() {
        let e = GrpcError::from(tonic::Status::unavailable("agent-monitor is shutting down"));
        assert_eq!(e.to_string(), "unavailable: agent-monitor is shutting down");
        let e = GrpcError::from(tonic::Status::unimplemented(""));
        assert_eq!(
            e.to_string(),
            "not implemented by this server (is it agent-monitor?)"
        );
        let e = GrpcError::from(tonic::Status::from_error(Box::new(std::io::Error::other(
            "connection reset",
        ))));
        let text = e.to_string();
        assert!(text.contains("connection reset"), "{text}");
        assert!(!text.contains("metadata"), "{text}");
    }
}
