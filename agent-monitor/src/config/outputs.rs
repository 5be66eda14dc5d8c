//! Where events and alerts leave the daemon: the gRPC API, the admin endpoint,
//! Falcosidekick, the alert output.

use std::path::PathBuf;

use serde::Deserialize;

/// gRPC API settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// TCP address, or `none`.
    pub listen: String,
    /// Unix socket path (mode 0600), optional.
    pub unix_socket: Option<PathBuf>,
    /// Server certificate and key (PEM); with `client_ca`, mutual TLS.
    pub tls: Option<TlsConfig>,
    /// Messages queued per streaming client before it is sent a gap notice.
    pub queue_per_client: usize,
    /// Connections admitted at once, per listener (TCP and the Unix socket each). Over
    /// it, the oldest connection that made no request yet is closed, or else the new one.
    pub max_connections: usize,
    /// Longest time from accept to the first call (TLS and HTTP/2 handshakes included).
    pub handshake_timeout_ms: u64,
    /// Longest silence from a client after its first call; keepalive pings are answered
    /// by every gRPC client, so a quiet stream stays open.
    pub idle_timeout_ms: u64,
    /// HTTP/2 keepalive: a connection silent this long is pinged...
    pub keepalive_interval_ms: u64,
    /// ...and closed if the ping is not answered within this.
    pub keepalive_timeout_ms: u64,
    /// Serve plain-text gRPC on a non-loopback `listen` address. Without it such a config
    /// is refused: the API streams credential events, so off the node it needs `tls`
    /// (or this, when something else such as a NetworkPolicy restricts who connects).
    pub allow_insecure: bool,
}

/// TLS files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".to_owned(),
            unix_socket: None,
            tls: None,
            queue_per_client: crate::outputs::grpc::DEFAULT_QUEUE_PER_CLIENT,
            max_connections: crate::outputs::listen::DEFAULT_GRPC_MAX_CONNECTIONS,
            handshake_timeout_ms: ms(crate::outputs::listen::DEFAULT_HANDSHAKE_TIMEOUT),
            idle_timeout_ms: ms(crate::outputs::listen::DEFAULT_IDLE_TIMEOUT),
            keepalive_interval_ms: ms(crate::outputs::grpc::DEFAULT_KEEPALIVE_INTERVAL),
            keepalive_timeout_ms: ms(crate::outputs::grpc::DEFAULT_KEEPALIVE_TIMEOUT),
            allow_insecure: false,
        }
    }
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Falcosidekick settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidekickConfig {
    /// `http://falcosidekick:2801/`; unset: no Falcosidekick output.
    pub url: Option<String>,
    /// Alerts waiting for delivery before new ones are dropped (and counted).
    pub queue: usize,
    /// Extra CA certificates (PEM) for an https URL.
    pub ca: Option<PathBuf>,
}

impl Default for SidekickConfig {
    fn default() -> Self {
        Self {
            url: None,
            queue: 10_000,
            ca: None,
        }
    }
}

/// Admin endpoint settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// TCP address of `/metrics`, `/healthz` and `/readyz`, or `none`. Any address is
    /// accepted without TLS: metrics and health carry no credentials or events.
    pub listen: String,
    /// Connections admitted at once (see `grpc.max_connections`).
    pub max_connections: usize,
    /// Longest time from accept to the first request.
    pub handshake_timeout_ms: u64,
    /// Longest silence after a request before a kept-alive connection is closed.
    pub idle_timeout_ms: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9880".to_owned(),
            max_connections: crate::outputs::listen::DEFAULT_ADMIN_MAX_CONNECTIONS,
            handshake_timeout_ms: ms(crate::outputs::listen::DEFAULT_HANDSHAKE_TIMEOUT),
            idle_timeout_ms: ms(crate::outputs::listen::DEFAULT_IDLE_TIMEOUT),
        }
    }
}

/// `none`, or a socket address.
pub fn listen_addr(s: &str) -> Option<std::net::SocketAddr> {
    if s == "none" {
        None
    } else {
        s.parse().ok()
    }
}

/// Alert output settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Falco JSON lines: `-` for stdout, a file path (appended), or `none`.
    pub output: String,
    /// Alerts per rule and workload per minute; the excess is counted and reported.
    pub rate_limit_per_minute: u32,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            output: "-".to_owned(),
            rate_limit_per_minute: 20,
        }
    }
}
