//! Keeps every log record of the test process, so a test can check what the daemon
//! reported (and wait for a background task to have seen a change).

use std::sync::{Mutex, Once, PoisonError};

static LOGGED: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Recorder;

impl log::Log for Recorder {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}", record.level(), record.args());
        LOGGED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
    }

    fn flush(&self) {}
}

/// Installs the recorder (once per test binary) at level info.
pub fn record_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        log::set_logger(&Recorder).expect("no other logger");
        log::set_max_level(log::LevelFilter::Info);
    });
}

/// How many log records hold every needle.
pub fn count_logged(needles: &[&str]) -> usize {
    LOGGED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// Whether a record containing every needle was logged.
pub fn logged(needles: &[&str]) -> bool {
    count_logged(needles) > 0
}
