//! The forensic journal's section.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// Default of `journal.sync_interval_ms`.
pub const DEFAULT_JOURNAL_SYNC_INTERVAL_MS: u64 = 1000;

/// Smallest `journal.segment_bytes` accepted here: the journal itself takes less (so its
/// tests can rotate often), but a daemon rotating every few records would spend its time
/// creating files.
pub const MIN_JOURNAL_SEGMENT_BYTES: u64 = 4096;

/// Largest `journal.segment_bytes`: past this a segment is a file too big to copy off a
/// node comfortably, and retention frees space in too coarse steps.
pub const MAX_JOURNAL_SEGMENT_BYTES: u64 = 1 << 30;

/// Largest `journal.max_bytes` (1 TiB): more is a typo, not a node's disk budget.
pub const MAX_JOURNAL_BYTES: u64 = 1 << 40;

/// Forensic journal settings: every event and alert, appended to checksummed segment
/// files that outlive the daemon (see `crate::journal`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Absolute directory of the journal (created 0700 if missing). Unset: no journal.
    pub dir: Option<PathBuf>,
    /// A segment file is closed at about this size and a new one started.
    pub segment_bytes: u64,
    /// Total size of the journal; the oldest segments are deleted to stay under it (the
    /// segment being written can take it over by up to one segment).
    pub max_bytes: u64,
    /// Segments last written longer ago than this are deleted (`7days`, `36h`; humantime
    /// units), or `none` to keep them until `max_bytes` needs the room.
    pub max_age: String,
    /// How often what was appended is written and fsynced, in milliseconds: at most this
    /// much is lost to a power cut or a kill (a kill loses only what was still queued).
    pub sync_interval_ms: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        let o = crate::journal::Options::default();
        Self {
            dir: None,
            segment_bytes: o.segment_bytes,
            max_bytes: o.max_bytes,
            max_age: o.max_age.map_or_else(
                || "none".to_owned(),
                |a| humantime::format_duration(a).to_string(),
            ),
            sync_interval_ms: DEFAULT_JOURNAL_SYNC_INTERVAL_MS,
        }
    }
}

impl JournalConfig {
    /// `max_age` as a duration; None for `none` (and for text that validation refused).
    pub fn max_age(&self) -> Option<std::time::Duration> {
        if self.max_age == "none" {
            return None;
        }
        humantime::parse_duration(&self.max_age).ok()
    }

    /// `sync_interval_ms` as a duration.
    pub fn sync_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.sync_interval_ms)
    }

    pub(super) fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, expected: String, got: String| ConfigError::Invalid {
            file: file.to_owned(),
            field: format!("journal.{field}"),
            expected,
            got,
        };
        if let Some(dir) = &self.dir {
            if !dir.is_absolute() || dir.as_os_str().as_encoded_bytes().contains(&0) {
                return Err(invalid(
                    "dir",
                    "an absolute directory (/var/lib/agent-monitor/journal)".to_owned(),
                    format!("{:?}", dir.display().to_string()),
                ));
            }
        }
        if !(MIN_JOURNAL_SEGMENT_BYTES..=MAX_JOURNAL_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(invalid(
                "segment_bytes",
                format!("{MIN_JOURNAL_SEGMENT_BYTES} to {MAX_JOURNAL_SEGMENT_BYTES}"),
                self.segment_bytes.to_string(),
            ));
        }
        if !(self.segment_bytes..=MAX_JOURNAL_BYTES).contains(&self.max_bytes) {
            return Err(invalid(
                "max_bytes",
                format!(
                    "segment_bytes ({}) to {MAX_JOURNAL_BYTES}",
                    self.segment_bytes
                ),
                self.max_bytes.to_string(),
            ));
        }
        if self.max_age != "none" {
            // A minute at least: retention runs on every sync, and an age shorter than a
            // few syncs would delete segments as soon as they close.
            let ok = humantime::parse_duration(&self.max_age).is_ok_and(|d| {
                (std::time::Duration::from_secs(60)
                    ..=std::time::Duration::from_secs(10 * 365 * 86_400))
                    .contains(&d)
            });
            if !ok {
                return Err(invalid(
                    "max_age",
                    "`none` or a duration from 1m to 10years (7days, 36h)".to_owned(),
                    format!("{:?}", self.max_age),
                ));
            }
        }
        if !(10..=60_000).contains(&self.sync_interval_ms) {
            return Err(invalid(
                "sync_interval_ms",
                "10 to 60000".to_owned(),
                self.sync_interval_ms.to_string(),
            ));
        }
        Ok(())
    }
}
