//! The journal sink: every record and every anomaly, as a [`JournalRecord`] of this run,
//! to the on-disk journal (`crate::journal`).
//!
//! The sinks run on the pipeline thread and only convert and hand over: a bounded channel
//! feeds one dedicated writer thread, which appends and fsyncs every `sync_interval`. When
//! the disk is slow and the channel full, a record is dropped and counted
//! (`agent_monitor_journal_dropped_total`), never waited for: the journal is a forensic
//! copy, and stalling the pipeline for it would stall the live outputs and fill the kernel
//! rings instead.
//!
//! # Sequence numbers
//!
//! A journal record's `seq` comes from one counter per run, shared by the event sink, the
//! anomaly sink and the run markers, taken when the record is handed to the channel. So
//! within a run it is unique over every record, increasing in the order the pipeline
//! produced them, and a gap means records dropped before the disk (a full queue). The
//! event's own `seq` (the lane consumer's) and the anomaly's (the engine's) stay in the
//! bodies: they are separate counters and would collide with each other.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use tracing::{error, info, warn};

use crate::{
    api::{pb, Origin},
    journal::{
        journal_record::Body, JournalError, JournalRecord, Options, Recovery, RunMarker, TailState,
        Writer, WriterStats,
    },
    outputs::{grpc::JournalSource, metrics::Metrics, AlertItem, EventItem, Sink},
};

/// Records queued for the writer thread. Sized to ride out a slow fsync at a busy node's
/// rate (thousands of records a second) while bounding memory to tens of MiB.
pub const JOURNAL_QUEUE: usize = 16_384;

/// What the writer thread is sent.
enum Msg {
    Record(Box<JournalRecord>),
    /// Write what is buffered to the file and answer: everything queued before is then
    /// visible to a reader.
    Barrier(SyncSender<()>),
    /// Append this stop marker, close the journal and answer with the final counters.
    Stop {
        marker: Box<JournalRecord>,
        done: SyncSender<Result<WriterStats, JournalError>>,
    },
}

/// Where and how to journal.
#[derive(Debug, Clone)]
pub struct JournalSettings {
    pub dir: PathBuf,
    pub options: Options,
    pub sync_interval: Duration,
    /// This run (its id and node name are in every record and the run markers).
    pub origin: Origin,
    pub queue: usize,
}

/// The open journal of this run: hands out sinks and writes the stop marker.
pub struct Journal {
    tx: SyncSender<Msg>,
    run: Run,
    node: String,
    dir: PathBuf,
}

/// What every record of the run shares.
#[derive(Clone)]
struct Run {
    origin: Origin,
    seq: Arc<AtomicU64>,
    metrics: Option<Arc<Metrics>>,
}

impl Run {
    fn record(&self, body: Body) -> JournalRecord {
        JournalRecord {
            run_id: self.origin.run_id.to_string(),
            // Starts at 1: the start marker is the first record of a run.
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            unix_nanos: unix_nanos(),
            body: Some(body),
        }
    }

    fn dropped(&self) {
        if let Some(m) = &self.metrics {
            m.record_journal_dropped();
        }
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn marker(node: &str, reason: &str, records: u64) -> RunMarker {
    RunMarker {
        node: node.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        reason: reason.to_owned(),
        pid: std::process::id(),
        records,
    }
}

/// The `tail` label and a log line for what opening found.
fn describe(dir: &Path, r: &Recovery) -> (&'static str, String) {
    let seg = r
        .segment
        .as_ref()
        .map_or_else(|| "-".to_owned(), |p| p.display().to_string());
    let dir = dir.display();
    match &r.tail {
        TailState::Clean if r.segment.is_none() => ("clean", format!("journal {dir}: new")),
        TailState::Clean => (
            "clean",
            format!(
                "journal {dir}: newest segment {seg} ended cleanly after {} records",
                r.records_intact
            ),
        ),
        TailState::Torn => (
            "torn",
            format!(
                "journal {dir}: newest segment {seg} had a torn tail (a write cut short by a \
                 kill or crash): truncated {} bytes after {} intact records",
                r.dropped_bytes, r.records_intact
            ),
        ),
        TailState::Corrupt(reason) => (
            "corrupt",
            format!(
                "journal {dir}: newest segment {seg} had a damaged record ({reason}): \
                 truncated {} bytes from it on, after {} intact records",
                r.dropped_bytes, r.records_intact
            ),
        ),
        TailState::LeftAlone(reason) => (
            "left_alone",
            format!("journal {dir}: newest segment {seg} left as it is: {reason}"),
        ),
    }
}

impl Journal {
    /// Opens the journal (recovering a torn tail), writes and syncs this run's start
    /// marker, and starts the writer thread.
    pub fn open(cfg: JournalSettings, metrics: Option<Arc<Metrics>>) -> Result<Self, JournalError> {
        let (mut writer, recovery) = Writer::open(&cfg.dir, cfg.options.clone())?;
        let (tail, line) = describe(&cfg.dir, &recovery);
        if tail == "clean" {
            info!("{line}");
        } else {
            warn!("{line}");
        }
        if let Some(m) = &metrics {
            m.record_journal_recovery(tail, recovery.dropped_bytes);
        }
        let node = cfg.origin.node.to_string();
        let run = Run {
            origin: cfg.origin,
            seq: Arc::new(AtomicU64::new(0)),
            metrics: metrics.clone(),
        };
        // Durable before any event: a run without its start marker would be unattributable.
        writer.append(&run.record(Body::Start(marker(&node, "start", 0))))?;
        writer.sync()?;
        publish(&metrics, &writer, true);
        info!(
            "journal {}: run {} (sync every {} ms, segments of {} bytes, at most {} bytes{})",
            cfg.dir.display(),
            run.origin.run_id,
            cfg.sync_interval.as_millis(),
            cfg.options.segment_bytes,
            cfg.options.max_bytes,
            cfg.options.max_age.map_or(String::new(), |a| format!(
                ", {} at most",
                humantime::format_duration(a)
            )),
        );
        let (tx, rx) = mpsc::sync_channel(cfg.queue.max(1));
        let interval = cfg.sync_interval;
        std::thread::Builder::new()
            .name("agent-monitor-journal".to_owned())
            .spawn(move || write_loop(writer, rx, interval, metrics))
            .map_err(|e| JournalError::Io {
                op: "starting the writer thread for",
                path: cfg.dir.clone(),
                source: e,
            })?;
        Ok(Self {
            tx,
            run,
            node,
            dir: cfg.dir,
        })
    }

    /// This run's id.
    pub fn run_id(&self) -> &str {
        &self.run.origin.run_id
    }

    /// What resumed gRPC streams read: the directory, and a barrier through the writer.
    pub fn source(&self) -> JournalReadAccess {
        JournalReadAccess {
            tx: self.tx.clone(),
            dir: self.dir.clone(),
        }
    }

    /// A sink for records or anomalies of this run.
    pub fn sink(&self) -> JournalSink {
        JournalSink {
            tx: self.tx.clone(),
            run: self.run.clone(),
        }
    }

    /// Appends the stop marker after everything queued, closes (syncs) the journal and
    /// returns its counters. Blocks while the writer catches up: call it off the runtime
    /// and bound the wait.
    pub fn stop(self, reason: &str) -> Result<WriterStats, JournalError> {
        let (done, answer) = mpsc::sync_channel(1);
        // Its `records` is filled in by the writer thread, which knows the count.
        let marker = Box::new(self.run.record(Body::Stop(marker(&self.node, reason, 0))));
        let gone = || JournalError::Io {
            op: "stopping",
            path: self.dir.clone(),
            source: std::io::Error::other("the journal writer thread has ended"),
        };
        self.tx
            .send(Msg::Stop { marker, done })
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

/// Copies the writer's counters into the metrics.
fn publish(metrics: &Option<Arc<Metrics>>, writer: &Writer, synced: bool) {
    if let Some(m) = metrics {
        let s = writer.stats();
        m.set_journal_written(s.records, s.bytes, synced.then_some(s.sync_last));
    }
}

fn failed(metrics: &Option<Arc<Metrics>>, e: &JournalError) {
    if let Some(m) = metrics {
        m.record_sink_failure("journal");
    }
    crate::error_limited!("journal-write", "journal: {e}");
}

/// The writer thread: appends what arrives, syncs every `interval` when something was
/// appended, and ends at a stop message (or when every sender is gone, closing too).
fn write_loop(
    mut writer: Writer,
    rx: mpsc::Receiver<Msg>,
    interval: Duration,
    metrics: Option<Arc<Metrics>>,
) {
    let mut next_sync = Instant::now() + interval;
    let mut dirty = false;
    loop {
        let msg = rx.recv_timeout(next_sync.saturating_duration_since(Instant::now()));
        match msg {
            Ok(Msg::Record(r)) => match writer.append(&r) {
                Ok(()) => dirty = true,
                Err(e) => failed(&metrics, &e),
            },
            Ok(Msg::Barrier(done)) => {
                if let Err(e) = writer.write_buffered() {
                    failed(&metrics, &e);
                }
                let _ = done.send(());
            }
            Ok(Msg::Stop { mut marker, done }) => {
                if let Some(Body::Stop(m)) = &mut marker.body {
                    m.records = writer.stats().records;
                }
                if let Err(e) = writer.append(&marker) {
                    failed(&metrics, &e);
                }
                publish(&metrics, &writer, false);
                let closed = writer.close();
                if let (Some(m), Ok(s)) = (&metrics, &closed) {
                    m.set_journal_written(s.records, s.bytes, Some(s.sync_last));
                }
                let _ = done.send(closed);
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                // Every sink and the handle are gone without a stop (the daemon is
                // failing): what was appended is still made durable.
                if let Err(e) = writer.close() {
                    error!("journal: closing: {e}");
                }
                return;
            }
        }
        // Checked after every record too: under load the channel never times out.
        if Instant::now() >= next_sync {
            if dirty {
                match writer.sync() {
                    Ok(()) => publish(&metrics, &writer, true),
                    Err(e) => failed(&metrics, &e),
                }
                dirty = false;
            }
            next_sync = Instant::now() + interval;
        }
    }
}

/// The journal as resumed streams see it.
pub struct JournalReadAccess {
    tx: SyncSender<Msg>,
    dir: PathBuf,
}

impl JournalSource for JournalReadAccess {
    fn dir(&self) -> &Path {
        &self.dir
    }

    fn barrier(&self, timeout: Duration) -> bool {
        let (done, answer) = mpsc::sync_channel(1);
        // Waits for room in a full queue: this runs on the blocking pool, for one client.
        if self.tx.send(Msg::Barrier(done)).is_err() {
            return false;
        }
        answer.recv_timeout(timeout).is_ok()
    }
}

/// Hands records and anomalies to the writer thread; never blocks.
pub struct JournalSink {
    tx: SyncSender<Msg>,
    run: Run,
}

impl JournalSink {
    fn send(&self, body: Body) {
        let record = Box::new(self.run.record(body));
        match self.tx.try_send(Msg::Record(record)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.run.dropped();
                crate::warn_limited!(
                    "journal-full",
                    "journal: the writer's queue is full (the disk is slower than the events); records dropped and counted in agent_monitor_journal_dropped_total"
                );
            }
            Err(TrySendError::Disconnected(_)) => {
                // The writer has stopped (shutdown, after the stop marker): counted, so
                // the journal's gap is explained.
                self.run.dropped();
            }
        }
    }
}

impl Sink<EventItem> for JournalSink {
    fn write(&mut self, e: &EventItem) -> std::io::Result<()> {
        // The event with the workload as it was when the event was seen. The journal
        // record owns its body: a copy of the shared message, not a second conversion.
        self.send(Body::Event(e.wire()));
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Durability is the writer thread's sync interval; flushing per batch here would
        // tie the pipeline to the disk.
        Ok(())
    }
}

impl Sink<AlertItem> for JournalSink {
    fn write(&mut self, a: &AlertItem) -> std::io::Result<()> {
        self.send(Body::Anomaly(pb::Anomaly::clone(&a.api)));
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        detect::Anomaly,
        events::{LostRecord, Record},
        journal::{Item, Reader},
    };

    fn lost(seq: u64) -> Record {
        Record::Lost(LostRecord {
            seq,
            time: "2026-11-23T07:00:00.000000001Z".into(),
            lane: "process".into(),
            count: 1,
            total: seq,
            reason: crate::events::LostReason::RingFull,
            workload: None,
        })
    }

    fn config(dir: &Path, queue: usize) -> JournalSettings {
        JournalSettings {
            dir: dir.to_owned(),
            options: Options::default(),
            sync_interval: Duration::from_millis(20),
            // A new run id per open, as the daemon makes one per start.
            origin: Origin::new_run("node-a"),
            queue,
        }
    }

    fn records(dir: &Path) -> Vec<JournalRecord> {
        Reader::open(dir)
            .expect("reader")
            .map(|i| match i {
                Item::Record { record, .. } => *record,
                Item::Damage(d) => panic!("damage: {d:?}"),
            })
            .collect()
    }

    #[test]
    fn a_run_is_start_records_anomalies_stop_with_one_sequence() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("journal");
        let metrics = Arc::new(Metrics::new());
        let j = Journal::open(config(&dir, 64), Some(metrics.clone())).expect("open");
        let (mut events, mut alerts) = (j.sink(), j.sink());
        Sink::<EventItem>::write(&mut events, &Origin::default().event_item(lost(7)))
            .expect("write");
        let anomaly = Anomaly {
            seq: 1,
            time: "2026-11-23T07:00:00.000000001Z".into(),
            rule: "events-lost".into(),
            priority: crate::policy::Priority::Error,
            output: "lost".into(),
            tags: Vec::new(),
            workload: Default::default(),
            fields: Default::default(),
            events: vec![7],
        };
        Sink::<AlertItem>::write(&mut alerts, &Origin::default().alert_item(anomaly))
            .expect("write");
        Sink::<EventItem>::write(&mut events, &Origin::default().event_item(lost(8)))
            .expect("write");
        let run = j.run_id().to_owned();
        let stats = j.stop("signal SIGTERM").expect("stop");
        assert_eq!(stats.records, 5);
        let got = records(&dir);
        assert_eq!(got.len(), 5);
        assert!(got.iter().all(|r| r.run_id == run));
        assert_eq!(
            got.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        match &got[0].body {
            Some(Body::Start(m)) => {
                assert_eq!(m.node, "node-a");
                assert_eq!(m.pid, std::process::id());
                assert_eq!(m.version, env!("CARGO_PKG_VERSION"));
            }
            other => panic!("{other:?}"),
        }
        match &got[1].body {
            Some(Body::Event(e)) => assert_eq!(e.seq, 7),
            other => panic!("{other:?}"),
        }
        match &got[2].body {
            Some(Body::Anomaly(a)) => assert_eq!(a.rule, "events-lost"),
            other => panic!("{other:?}"),
        }
        match &got[4].body {
            // Every record of the run before it: start, two events, one anomaly.
            Some(Body::Stop(m)) => {
                assert_eq!(m.records, 4);
                assert_eq!(m.reason, "signal SIGTERM");
            }
            other => panic!("{other:?}"),
        }
        let text = metrics.render();
        assert!(
            text.contains("agent_monitor_journal_records_total 5\n"),
            "{text}"
        );
        assert!(
            text.contains("agent_monitor_journal_recoveries_total{tail=\"clean\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("agent_monitor_journal_dropped_total 0\n"),
            "{text}"
        );
        // A second run: a new id, its own start marker, sequence from 1 again.
        let j = Journal::open(config(&dir, 64), None).expect("reopen");
        let second = j.run_id().to_owned();
        assert_ne!(second, run);
        j.stop("signal SIGINT").expect("stop");
        let got = records(&dir);
        let mine: Vec<_> = got.iter().filter(|r| r.run_id == second).collect();
        assert_eq!(mine.len(), 2);
        assert!(matches!(mine[0].body, Some(Body::Start(_))));
        assert_eq!(mine[0].seq, 1);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("journal");
        let metrics = Arc::new(Metrics::new());
        let j = Journal::open(config(&dir, 1), Some(metrics.clone())).expect("open");
        // A writer that cannot keep up: stand in for it with a sink whose channel nobody
        // reads.
        let (tx, rx) = mpsc::sync_channel(1);
        let mut sink = JournalSink {
            tx,
            run: j.run.clone(),
        };
        for i in 0..10 {
            Sink::<EventItem>::write(&mut sink, &Origin::default().event_item(lost(i)))
                .expect("never fails");
        }
        assert!(
            metrics
                .render()
                .contains("agent_monitor_journal_dropped_total 9\n"),
            "{}",
            metrics.render()
        );
        drop(rx);
        j.stop("signal SIGTERM").expect("stop");
        // The dropped records left a gap in the run's sequence: start (1), then the stop
        // marker after the ten numbers the sink took.
        let seqs: Vec<u64> = records(&dir).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 12]);
    }
}
