//! Keeps every log record of the test process, so a test can check what the daemon
//! reported (and wait for a background task to have seen a change).
//!
//! The daemon logs through `tracing`; the recorder is a `tracing-subscriber` layer, and the
//! records of the `log` crate (dependencies) reach it through `tracing-log`'s bridge, as
//! they reach the daemon's own log.

use std::sync::{Mutex, Once, PoisonError};

use tracing_subscriber::{filter::LevelFilter, layer::SubscriberExt as _, Layer};

static LOGGED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The message and fields of one event, as the daemon's text log writes them.
#[derive(Default)]
struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        match field.name() {
            "message" => {
                let _ = write!(self.0, "{value:?}");
            }
            // The bridge's own fields (target, module, file, line of a `log` record).
            name if name.starts_with("log.") => {}
            name => {
                let _ = write!(self.0, " {name}={value:?}");
            }
        }
    }
}

struct Recorder;

impl<S: tracing::Subscriber> Layer<S> for Recorder {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let level = event.metadata().level();
        let mut message = Message::default();
        event.record(&mut message);
        LOGGED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(format!("{level} {}", message.0));
    }
}

/// Installs the recorder (once per test binary) at level info.
pub fn record_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let subscriber =
            tracing_subscriber::registry().with(Recorder.with_filter(LevelFilter::INFO));
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
        tracing_log::LogTracer::builder()
            .with_max_level(log::LevelFilter::Info)
            .init()
            .expect("no other logger");
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
