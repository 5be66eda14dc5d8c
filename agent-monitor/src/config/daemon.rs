//! The daemon itself: its own log, liveness, the shutdown bound.

use serde::Deserialize;

/// The daemon's own log (stderr); its level comes from `--log-level` or RUST_LOG.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (one human-readable line per record) or `json` (one JSON object per line,
    /// for log collectors).
    pub format: LogFormat,
}

/// How the daemon's log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `[<RFC 3339 time> <LEVEL> <target>] <message>`.
    #[default]
    Text,
    /// `{"timestamp":..,"level":..,"target":..,"message":..}` and the event's fields.
    Json,
}

/// Default of `shutdown_timeout_ms`.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;

/// Liveness settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// `/healthz` fails when the lane consumer or the pipeline loop has not turned for this
    /// long, in milliseconds.
    pub loop_stall_ms: u64,
    /// No record from the kernel for this long raises one `monitor-kernel-silent` notice
    /// per silent spell, in milliseconds; 0: never. Silence is not a health failure (a
    /// quiet node is healthy); its length is always in `agent_monitor_kernel_silence_seconds`.
    pub kernel_silence_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            loop_stall_ms: 30_000,
            kernel_silence_ms: 60_000,
        }
    }
}
