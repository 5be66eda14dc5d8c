//! Rate-limited log lines: a warning that can repeat once per record (a full pending
//! queue, an undecodable ring record, a refused alert) is logged at most once per key and
//! [`INTERVAL`]; the repeats are counted and reported in one line when the interval ends:
//! `<first message> (N more in the last 60 s)`.
//!
//! One flood once wrote 90,002 identical lines for one unknown pod: the log is for people,
//! the counts are what they need. [`warn_limited!`] and [`error_limited!`] are the call
//! sites' form; [`flush`] (called every second by the daemon, and once at shutdown) writes
//! the counts of intervals that ended.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

pub use tracing::Level;

/// At most one line per key in this long.
pub const INTERVAL: Duration = Duration::from_secs(60);

/// Most keys tracked at once. Keys are call sites (static strings), so this is never
/// reached in practice; past it, the oldest entry is reported and forgotten.
const MAX_KEYS: usize = 1024;

/// One key's current interval.
#[derive(Debug)]
struct Entry {
    started: Instant,
    level: Level,
    /// The line logged when the interval began, repeated with the count at its end.
    message: String,
    suppressed: u64,
}

/// A line to log now.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    pub level: Level,
    pub text: String,
}

/// The per-key bookkeeping, free of global state so it can be tested with its own clock.
#[derive(Debug)]
pub struct Limiter {
    interval: Duration,
    entries: HashMap<&'static str, Entry>,
}

impl Limiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            entries: HashMap::new(),
        }
    }

    /// One occurrence of `key` at `now`: the lines to log (none while the key's interval
    /// runs; the summary of an ended interval and then the new message otherwise).
    /// `message` is only formatted when it is logged.
    pub fn occur(
        &mut self,
        key: &'static str,
        level: Level,
        now: Instant,
        message: impl FnOnce() -> String,
    ) -> Vec<Line> {
        let mut out = Vec::new();
        if let Some(e) = self.entries.get_mut(key) {
            if now.saturating_duration_since(e.started) < self.interval {
                e.suppressed += 1;
                return out;
            }
            if let Some(line) = summary(e, now) {
                out.push(line);
            }
        } else if self.entries.len() >= MAX_KEYS {
            self.evict_oldest(now, &mut out);
        }
        let text = message();
        out.push(Line {
            level,
            text: text.clone(),
        });
        self.entries.insert(
            key,
            Entry {
                started: now,
                level,
                message: text,
                suppressed: 0,
            },
        );
        out
    }

    /// The summaries of every interval that ended by `now` (or of all intervals, with
    /// `all`: at shutdown nothing more will come); their keys start afresh.
    pub fn flush(&mut self, now: Instant, all: bool) -> Vec<Line> {
        let interval = self.interval;
        let mut out = Vec::new();
        self.entries.retain(|_, e| {
            let ended = all || now.saturating_duration_since(e.started) >= interval;
            if ended {
                out.extend(summary(e, now));
            }
            !ended
        });
        out
    }

    fn evict_oldest(&mut self, now: Instant, out: &mut Vec<Line>) {
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.started)
            .map(|(k, _)| *k);
        if let Some(e) = oldest.and_then(|k| self.entries.remove(k)) {
            out.extend(summary(&e, now));
        }
    }
}

/// `<message> (N more in the last S s)` when the interval had repeats.
fn summary(e: &Entry, now: Instant) -> Option<Line> {
    (e.suppressed > 0).then(|| {
        // Whole seconds, at least 1: "in the last 0 s" reads as a bug.
        let secs = now.saturating_duration_since(e.started).as_secs().max(1);
        Line {
            level: e.level,
            text: format!("{} ({} more in the last {secs} s)", e.message, e.suppressed),
        }
    })
}

static LIMITER: Mutex<Option<Limiter>> = Mutex::new(None);

fn emit(lines: Vec<Line>) {
    for Line { level, text } in lines {
        // tracing's macros take the level as a constant.
        if level == Level::ERROR {
            tracing::error!("{text}");
        } else if level == Level::WARN {
            tracing::warn!("{text}");
        } else if level == Level::INFO {
            tracing::info!("{text}");
        } else if level == Level::DEBUG {
            tracing::debug!("{text}");
        } else {
            tracing::trace!("{text}");
        }
    }
}

/// Whether a line at `level` would be logged (by the daemon's filter, for this module).
fn enabled(level: Level) -> bool {
    if level == Level::ERROR {
        tracing::enabled!(Level::ERROR)
    } else if level == Level::WARN {
        tracing::enabled!(Level::WARN)
    } else if level == Level::INFO {
        tracing::enabled!(Level::INFO)
    } else if level == Level::DEBUG {
        tracing::enabled!(Level::DEBUG)
    } else {
        tracing::enabled!(Level::TRACE)
    }
}

/// Logs `message` under `key` unless the key already logged within [`INTERVAL`]; then it
/// is only counted. Use through [`warn_limited!`] / [`error_limited!`].
pub fn log_limited(key: &'static str, level: Level, message: impl FnOnce() -> String) {
    if !enabled(level) {
        return;
    }
    let lines = {
        let mut guard = LIMITER.lock().unwrap_or_else(PoisonError::into_inner);
        guard.get_or_insert_with(|| Limiter::new(INTERVAL)).occur(
            key,
            level,
            Instant::now(),
            message,
        )
    };
    // Logged outside the lock: a logger that itself warns must not deadlock.
    emit(lines);
}

/// Writes the counts of intervals that ended (every interval, with `all`).
pub fn flush(all: bool) {
    let lines = {
        let mut guard = LIMITER.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_mut() {
            Some(l) => l.flush(Instant::now(), all),
            None => Vec::new(),
        }
    };
    emit(lines);
}

/// `tracing::warn!` at most once per key and [`INTERVAL`], with the repeats counted:
/// `warn_limited!("pending-full", "pending queue full ({n})")`.
#[macro_export]
macro_rules! warn_limited {
    ($key:expr, $($arg:tt)+) => {
        $crate::ratelog::log_limited($key, $crate::ratelog::Level::WARN, || format!($($arg)+))
    };
}

/// `tracing::error!` at most once per key and [`INTERVAL`], with the repeats counted.
#[macro_export]
macro_rules! error_limited {
    ($key:expr, $($arg:tt)+) => {
        $crate::ratelog::log_limited($key, $crate::ratelog::Level::ERROR, || format!($($arg)+))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Level = Level::WARN;

    fn texts(lines: &[Line]) -> Vec<&str> {
        lines.iter().map(|l| l.text.as_str()).collect()
    }

    #[test]
    fn one_line_per_key_and_interval_then_the_count() {
        let mut l = Limiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let first = l.occur("full", W, t0, || "pending queue full".to_owned());
        assert_eq!(texts(&first), ["pending queue full"]);
        let mut formatted = 0;
        for i in 1..=10_000u64 {
            let lines = l.occur("full", W, t0 + Duration::from_millis(i), || {
                formatted += 1;
                "pending queue full".to_owned()
            });
            assert!(lines.is_empty());
        }
        assert_eq!(formatted, 0, "suppressed messages are never formatted");
        // Not over yet: nothing to flush.
        assert!(l.flush(t0 + Duration::from_secs(59), false).is_empty());
        let summary = l.flush(t0 + Duration::from_secs(60), false);
        assert_eq!(
            texts(&summary),
            ["pending queue full (10000 more in the last 60 s)"]
        );
        // The key starts afresh: the next occurrence is logged at once.
        let again = l.occur("full", W, t0 + Duration::from_secs(61), || "again".into());
        assert_eq!(texts(&again), ["again"]);
    }

    #[test]
    fn keys_are_independent_and_a_lone_line_has_no_summary() {
        let mut l = Limiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(l.occur("a", W, t0, || "a".into()).len(), 1);
        assert_eq!(l.occur("b", W, t0, || "b".into()).len(), 1);
        assert!(l.occur("a", W, t0, || "a".into()).is_empty());
        let lines = l.flush(t0 + Duration::from_secs(60), false);
        assert_eq!(texts(&lines), ["a (1 more in the last 60 s)"]);
    }

    #[test]
    fn an_ended_interval_is_summed_up_before_the_next_line() {
        let mut l = Limiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        l.occur("k", W, t0, || "first".into());
        l.occur("k", W, t0 + Duration::from_secs(1), || "second".into());
        l.occur("k", W, t0 + Duration::from_secs(2), || "third".into());
        let lines = l.occur("k", W, t0 + Duration::from_secs(12), || "fourth".into());
        assert_eq!(texts(&lines), ["first (2 more in the last 12 s)", "fourth"]);
    }

    #[test]
    fn shutdown_flushes_every_count() {
        let mut l = Limiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        l.occur("k", Level::ERROR, t0, || "boom".into());
        l.occur("k", Level::ERROR, t0, || "boom".into());
        let lines = l.flush(t0, true);
        assert_eq!(
            lines,
            [Line {
                level: Level::ERROR,
                text: "boom (1 more in the last 1 s)".into()
            }]
        );
        assert!(l.flush(t0, true).is_empty());
    }

    #[test]
    fn keys_are_bounded() {
        let mut l = Limiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let keys: Vec<&'static str> = (0..=MAX_KEYS)
            .map(|i| &*Box::leak(format!("k{i}").into_boxed_str()))
            .collect();
        l.occur(keys[0], W, t0, || "oldest".into());
        l.occur(keys[0], W, t0, || "oldest".into());
        for (i, k) in keys.iter().enumerate().skip(1) {
            let lines = l.occur(k, W, t0 + Duration::from_millis(i as u64), || (*k).into());
            if i == MAX_KEYS {
                // The oldest entry is reported, then forgotten.
                assert_eq!(texts(&lines), ["oldest (1 more in the last 1 s)", *k]);
            }
        }
        assert_eq!(l.entries.len(), MAX_KEYS);
    }
}
