//! Resumed streams: a client that passes `resume_after` (the run id and sequence number of
//! the last item it received) is served what followed from the journal, then the live
//! stream, with no gap and no duplicate.
//!
//! # Why nothing falls between the journal and the live stream
//!
//! The live subscription is taken first; then a barrier goes through the journal writer's
//! queue, so every item published before the subscription (the pipeline hands each item
//! to the journal before the hub) is in the journal's files when the scan starts. Items
//! published after the subscription are in the live queue, and may be in the journal too:
//! the live part skips the current run's items the scan already served.
//!
//! # What the client is told
//!
//! A [`pb::Gap`] where items are missing: `EXPIRED` when the resume point is older than
//! what the journal keeps (with the count of the run's items known to be gone, or
//! `at_least` when the run is gone entirely), `NOT_JOURNALED` where a run's sequence jumps
//! in the journal (its write queue was full, or a damaged stretch), `SLOW_CLIENT` when the
//! live queue overflowed (while the client read the journal, too).

use std::{
    collections::{BTreeSet, HashSet},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use super::{
    filter::Matcher,
    hub::{Delivery, Subscription},
};
use crate::{
    api::pb,
    journal::{journal_record::Body, Item, Reader},
    outputs::EventItem,
};

/// The daemon's journal, as resumed streams read it.
pub trait JournalSource: Send + Sync + 'static {
    /// The journal directory.
    fn dir(&self) -> &Path;

    /// Blocks until everything handed to the journal before the call is in its files, or
    /// `timeout` passed; false when that could not be confirmed (the writer stopped or is
    /// far behind).
    fn barrier(&self, timeout: Duration) -> bool;
}

/// How long a resumed stream waits for the journal writer to catch up before it scans.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(10);

/// Items between the journal scan (or the live part) and the client's connection: the
/// scan waits for a slow client rather than reading ahead without bound.
const RESUME_CHANNEL: usize = 256;

/// The current run's sequence numbers the scan served are remembered up to this many
/// (the newest): the live queue holds at most a client's queue length of items that may
/// also be in the journal.
const SEEN_MIN: usize = 65_536;

/// An event or an anomaly: what a resumable stream carries.
pub trait Resumable: Clone + Send + Sync + 'static {
    /// What the hub hands a live client.
    type Live: Send + Sync + 'static;
    /// The item a journal record holds, if it holds one of this kind.
    fn from_body(body: Body) -> Option<Self>;
    /// The message a live item is sent as.
    fn from_live(live: &Self::Live) -> Self;
    fn seq(&self) -> u64;
    fn run_id(&self) -> &str;
    fn selected(&self, m: &Matcher) -> bool;
}

impl Resumable for pb::Event {
    type Live = EventItem;
    fn from_body(body: Body) -> Option<Self> {
        match body {
            Body::Event(e) => Some(e),
            _ => None,
        }
    }
    fn from_live(live: &EventItem) -> Self {
        live.wire()
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn run_id(&self) -> &str {
        &self.run_id
    }
    fn selected(&self, m: &Matcher) -> bool {
        m.pb_event(self)
    }
}

impl Resumable for pb::Anomaly {
    type Live = pb::Anomaly;
    fn from_body(body: Body) -> Option<Self> {
        match body {
            Body::Anomaly(a) => Some(a),
            _ => None,
        }
    }
    fn from_live(live: &pb::Anomaly) -> Self {
        live.clone()
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn run_id(&self) -> &str {
        &self.run_id
    }
    fn selected(&self, m: &Matcher) -> bool {
        m.pb_anomaly(self)
    }
}

/// What a stream sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Out<T> {
    Item(T),
    Gap(pb::Gap),
    /// The journal could not be read; the stream ends with this error.
    Failed(String),
}

/// A gap of `missed` items for a slow client.
pub fn slow_client_gap(missed: u64) -> pb::Gap {
    pb::Gap {
        missed,
        reason: pb::GapReason::SlowClient as i32,
        at_least: false,
        after: None,
    }
}

fn cursor(run: &str, seq: u64) -> Option<pb::Cursor> {
    Some(pb::Cursor {
        run_id: run.to_owned(),
        seq,
    })
}

/// The current run's sequence numbers read from the journal, newest kept.
#[derive(Debug, Default)]
struct Seen {
    recent: BTreeSet<u64>,
    /// Older numbers were dropped from `recent`.
    trimmed: bool,
}

impl Seen {
    fn add(&mut self, seq: u64) {
        self.recent.insert(seq);
        if self.recent.len() > SEEN_MIN {
            self.recent.pop_first();
            self.trimmed = true;
        }
    }

    fn contains(&self, seq: u64) -> bool {
        self.recent.contains(&seq)
            || (self.trimmed && self.recent.first().is_some_and(|first| seq < *first))
    }
}

/// The journal part of one resumed stream.
struct Scan<'a, T> {
    tx: &'a mpsc::Sender<Out<T>>,
    matcher: &'a Matcher,
    current_run: &'a str,
    seen: Seen,
    /// The last item of this kind read (before filtering), while emitting.
    last: Option<(String, u64)>,
    /// Runs whose start marker was read: their beginning is in the journal.
    started: HashSet<String>,
    served: u64,
}

/// The client went away.
struct Gone;

impl<T: Resumable> Scan<'_, T> {
    fn send(&self, out: Out<T>) -> Result<(), Gone> {
        self.tx.blocking_send(out).map_err(|_| Gone)
    }

    fn gap(
        &self,
        reason: pb::GapReason,
        missed: u64,
        at_least: bool,
        after: Option<pb::Cursor>,
    ) -> Result<(), Gone> {
        self.send(Out::Gap(pb::Gap {
            missed,
            reason: reason as i32,
            at_least,
            after,
        }))
    }

    /// Why items of `run` before the first one read are missing.
    fn missing_reason(&self, run: &str) -> pb::GapReason {
        if self.started.contains(run) {
            pb::GapReason::NotJournaled
        } else {
            pb::GapReason::Expired
        }
    }

    /// One item after the resume point: told the gap before it, if any, then sent if the
    /// filter selects it.
    fn emit(&mut self, run: &str, item: T) -> Result<(), Gone> {
        let seq = item.seq();
        match &self.last {
            Some((r, s)) if r == run && seq > s + 1 => {
                self.gap(
                    pb::GapReason::NotJournaled,
                    seq - s - 1,
                    false,
                    cursor(r, *s),
                )?;
            }
            Some((r, _)) if r == run => {}
            // The first item of a run: the ones before it in that run are gone, by
            // retention when the run's start is gone too, else they never reached the
            // journal.
            _ if seq > 1 => {
                let reason = self.missing_reason(run);
                self.gap(reason, seq - 1, false, None)?;
            }
            _ => {}
        }
        self.last = Some((run.to_owned(), seq));
        if run == self.current_run {
            self.seen.add(seq);
        }
        if item.selected(self.matcher) {
            self.served += 1;
            self.send(Out::Item(item))?;
        }
        Ok(())
    }

    /// Reads the whole journal. Searching for the resume point (`after` given), items up
    /// to it are skipped; false when its run was not found at all.
    fn pass(&mut self, dir: &Path, after: Option<&pb::Cursor>) -> Result<bool, Gone> {
        let reader = match Reader::open(dir) {
            Ok(r) => r,
            Err(e) => {
                self.send(Out::Failed(format!("cannot read the journal: {e}")))?;
                return Err(Gone);
            }
        };
        // Searching: whether an item of the resume point's run was seen (all at or before
        // the point).
        let mut searching = after.map(|_| false);
        // A record of the resume point's run (an item, or its start or stop marker) was read.
        let mut run_present = false;
        for item in reader {
            let Item::Record { record, .. } = item else {
                // Damage: the sequence jump around it tells the client what is missing.
                continue;
            };
            let run = record.run_id;
            run_present |= after.is_some_and(|c| c.run_id == run);
            if matches!(record.body, Some(Body::Start(_))) {
                self.started.insert(run.clone());
            }
            let Some(item) = record.body.and_then(T::from_body) else {
                continue;
            };
            if let (Some(seen_run), Some(c)) = (searching, after) {
                if run != c.run_id {
                    if !run_present {
                        // A run older than the resume point's.
                        continue;
                    }
                    // The resume point's run ends here (at or before the point: what the
                    // client has); the next run starts.
                    self.last = Some((c.run_id.clone(), c.seq));
                } else if item.seq() <= c.seq {
                    searching = Some(true);
                    continue;
                } else {
                    let missing = item.seq() - c.seq - 1;
                    if missing > 0 {
                        let reason = if seen_run {
                            // Some of the run before the stretch is there: it was never
                            // written (a full queue) or is damaged.
                            pb::GapReason::NotJournaled
                        } else {
                            self.missing_reason(&run)
                        };
                        self.gap(reason, missing, false, cursor(&c.run_id, c.seq))?;
                    }
                    self.last = Some((run.clone(), item.seq() - 1));
                }
                searching = None;
            }
            self.emit(&run, item)?;
        }
        Ok(after.is_none() || run_present)
    }
}

/// Serves the journal after `after` into `tx`: blocking; run on the blocking pool.
/// Returns the current run's numbers it read, or `None` when the client went away.
fn scan_journal<T: Resumable>(
    journal: &dyn JournalSource,
    after: &pb::Cursor,
    matcher: &Matcher,
    current_run: &str,
    tx: &mpsc::Sender<Out<T>>,
) -> Option<Seen> {
    let started = Instant::now();
    if !journal.barrier(BARRIER_TIMEOUT) {
        warn!(
            "resumed stream: the journal writer did not confirm within {} s; the newest items may come from the live stream only",
            BARRIER_TIMEOUT.as_secs()
        );
    }
    let mut scan = Scan {
        tx,
        matcher,
        current_run,
        seen: Seen::default(),
        last: None,
        started: HashSet::new(),
        served: 0,
    };
    let found = scan.pass(journal.dir(), Some(after)).ok()?;
    if !found {
        // The resume point's run is not in the journal: deleted by retention (or not
        // this node's). Everything kept follows it.
        scan.gap(
            pb::GapReason::Expired,
            0,
            true,
            cursor(&after.run_id, after.seq),
        )
        .ok()?;
        scan.last = None;
        scan.pass(journal.dir(), None).ok()?;
    }
    info!(
        "resumed stream after {}/{}: {} items from the journal in {} ms{}",
        after.run_id,
        after.seq,
        scan.served,
        started.elapsed().as_millis(),
        if found {
            ""
        } else {
            " (its run is no longer in the journal)"
        }
    );
    Some(scan.seen)
}

/// A stream resumed after `after`: the journal from there, then `live` (subscribed by the
/// caller before this is called) without what the journal already served.
pub fn resumed<T: Resumable>(
    journal: Arc<dyn JournalSource>,
    live: Subscription<T::Live>,
    after: pb::Cursor,
    matcher: Matcher,
    current_run: Arc<str>,
) -> impl Stream<Item = Out<T>> + Send {
    let (tx, rx) = mpsc::channel(RESUME_CHANNEL);
    tokio::spawn(async move {
        let scan_tx = tx.clone();
        let run = current_run.clone();
        let resume_at = after.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            scan_journal(&*journal, &resume_at, &matcher, &run, &scan_tx)
        })
        .await;
        let Ok(Some(seen)) = scanned else {
            return;
        };
        let mut live = live;
        loop {
            // A client that hangs up ends its subscription now, not at the next item a
            // quiet stream may not get for hours (it would count as a client till then).
            let delivery = tokio::select! {
                d = live.next() => d,
                () = tx.closed() => None,
            };
            let Some(delivery) = delivery else { return };
            let out = match delivery {
                Delivery::Item(item) => {
                    let item = T::from_live(&item);
                    let own_run = item.run_id() == &*current_run;
                    let seq = item.seq();
                    if own_run
                        && (seen.contains(seq)
                            || (after.run_id == *current_run && seq <= after.seq))
                    {
                        continue;
                    }
                    Out::Item(item)
                }
                Delivery::Gap(missed) => Out::Gap(slow_client_gap(missed)),
            };
            if tx.send(out).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{JournalRecord, Options, RunMarker, Writer};

    struct Dir(std::path::PathBuf);

    impl JournalSource for Dir {
        fn dir(&self) -> &Path {
            &self.0
        }
        fn barrier(&self, _: Duration) -> bool {
            true
        }
    }

    enum Rec {
        Start(&'static str),
        Anomaly(&'static str, u64),
    }

    /// A journal of these records, in this order.
    fn journal(records: &[Rec]) -> (tempfile::TempDir, Dir) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("j");
        let (mut w, _) = Writer::open(&dir, Options::default()).expect("writer");
        for (n, r) in records.iter().enumerate() {
            let (run, body) = match r {
                Rec::Start(run) => (*run, Body::Start(RunMarker::default())),
                Rec::Anomaly(run, seq) => (
                    *run,
                    Body::Anomaly(pb::Anomaly {
                        seq: *seq,
                        run_id: (*run).to_owned(),
                        rule: "r".into(),
                        priority: pb::Priority::Warning as i32,
                        ..Default::default()
                    }),
                ),
            };
            w.append(&JournalRecord {
                run_id: run.to_owned(),
                seq: n as u64 + 1,
                unix_nanos: 1,
                body: Some(body),
            })
            .expect("append");
        }
        w.close().expect("close");
        (tmp, Dir(dir))
    }

    /// What a stream resumed after (run, seq) is served from the journal, as short text:
    /// `run:seq` for an item, `gap:<reason>:<missed>[+]` for a gap.
    fn served(j: &Dir, run: &str, seq: u64, current: &str) -> Vec<String> {
        let (tx, mut rx) = mpsc::channel::<Out<pb::Anomaly>>(256);
        let after = pb::Cursor {
            run_id: run.into(),
            seq,
        };
        scan_journal(j, &after, &Matcher::default(), current, &tx).expect("client there");
        drop(tx);
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            out.push(match o {
                Out::Item(a) => format!("{}:{}", a.run_id, a.seq),
                Out::Gap(g) => format!(
                    "gap:{}:{}{}",
                    g.reason().as_str_name(),
                    g.missed,
                    if g.at_least { "+" } else { "" }
                ),
                Out::Failed(e) => format!("failed:{e}"),
            });
        }
        out
    }

    #[test]
    fn serves_what_follows_the_resume_point_and_names_every_gap() {
        use Rec::{Anomaly as A, Start as S};
        let (_tmp, j) = journal(&[
            S("a"),
            A("a", 1),
            A("a", 2),
            A("a", 3),
            A("a", 5),
            S("b"),
            A("b", 1),
            A("b", 2),
        ]);
        // After a:2: the rest of run a (a:4 never reached the journal), then run b.
        assert_eq!(
            served(&j, "a", 2, "b"),
            ["a:3", "gap:GAP_REASON_NOT_JOURNALED:1", "a:5", "b:1", "b:2"]
        );
        // After the last item: nothing (the live stream continues).
        assert!(served(&j, "b", 2, "b").is_empty());
        // A point beyond what the run journaled (the client had it live): nothing more of
        // that run, and no older run again.
        assert!(served(&j, "b", 40, "b").is_empty());
        assert_eq!(served(&j, "a", 40, "b"), ["b:1", "b:2"]);
        // A run the journal does not have: everything kept, after a gap saying so.
        assert_eq!(
            served(&j, "gone", 9, "b"),
            [
                "gap:GAP_REASON_EXPIRED:0+",
                "a:1",
                "a:2",
                "a:3",
                "gap:GAP_REASON_NOT_JOURNALED:1",
                "a:5",
                "b:1",
                "b:2"
            ]
        );
    }

    #[test]
    fn a_run_whose_start_was_deleted_reports_its_lost_head_as_expired() {
        use Rec::{Anomaly as A, Start as S};
        // Retention deleted run c's start marker and its first three anomalies.
        let (_tmp, j) = journal(&[A("c", 4), A("c", 5), S("d"), A("d", 1)]);
        assert_eq!(
            served(&j, "c", 1, "d"),
            ["gap:GAP_REASON_EXPIRED:2", "c:4", "c:5", "d:1"]
        );
        // Items of the current run are remembered for the live part.
        let (tx, _rx) = mpsc::channel::<Out<pb::Anomaly>>(256);
        let after = pb::Cursor {
            run_id: "c".into(),
            seq: 5,
        };
        let seen = scan_journal(&j, &after, &Matcher::default(), "d", &tx).expect("seen");
        assert!(seen.contains(1) && !seen.contains(2));
    }

    #[test]
    fn seen_remembers_the_newest_and_treats_older_as_served_once_trimmed() {
        let mut s = Seen::default();
        s.add(5);
        s.add(7);
        assert!(s.contains(5) && s.contains(7));
        assert!(!s.contains(6) && !s.contains(4), "never trimmed: exact");
        for seq in 100..100 + SEEN_MIN as u64 + 1 {
            s.add(seq);
        }
        assert!(s.contains(3), "older than the kept window: served");
        assert!(!s.contains(100 + SEEN_MIN as u64 + 5), "newer: not served");
    }

    #[tokio::test]
    async fn a_resumed_client_that_hangs_up_leaves_at_once_on_a_quiet_stream() {
        use Rec::{Anomaly as A, Start as S};
        let (_tmp, j) = journal(&[S("a"), A("a", 1), A("a", 2)]);
        let hub = super::super::Hub::new(16, crate::api::Origin::new_run("node-a"));
        let live = hub.subscribe_anomalies(Matcher::default());
        assert_eq!(hub.clients(), 1);
        let mut stream = Box::pin(resumed::<pb::Anomaly>(
            Arc::new(j),
            live,
            pb::Cursor {
                run_id: "a".into(),
                seq: 1,
            },
            Matcher::default(),
            Arc::from("a"),
        ));
        // The journal part arrives; then the client hangs up while nothing is published.
        match stream.next().await {
            Some(Out::Item(a)) => assert_eq!(a.seq, 2),
            _ => panic!("expected a:2 from the journal"),
        }
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(10);
        while hub.clients() != 0 {
            assert!(
                Instant::now() < deadline,
                "the subscription outlived its client"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
