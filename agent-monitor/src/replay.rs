//! `agent-monitor replay`: the alerts of a forensic journal, offline.
//!
//! Without policies, replay prints the anomalies the daemon recorded, as it recorded them.
//! With policies, it runs detection again over the recorded events, each with the identity
//! (workload, process) it was recorded with: nothing is looked up on this machine, so a copy
//! of a journal replays the same anywhere, without root, BPF or a cluster. With `diff`, it
//! prints only the alerts the new policies add (`+`) and remove (`-`).
//!
//! # Runs
//!
//! Each daemon run (`run_id`) is replayed with a fresh [`Engine`], as the daemon starts
//! each run with one: baselines, exfiltration windows, the process tree and rate limits do
//! not cross a restart live, so they must not in replay either (and a run's boot-clock
//! timestamps mean nothing in the next if the node rebooted).
//!
//! # Diff key
//!
//! A recorded and a replayed alert are the same alert when they have the same run, rule
//! and triggering event sequence numbers (`event_seqs`). Within a run an event's sequence
//! number names one event, so it pins the process, the workload and the time too. A match
//! whose priority differs (a policy override) is printed as a `-`/`+` pair; other
//! differences (the output text, rate-limit counters, the anomaly's own `seq`) are not.
//! Alerts without a triggering event (rate-limit summaries, `monitor-kernel-silent`) depend
//! on the daemon's wall-clock timers and are left out of the diff. A recorded alert whose
//! events are not all in the journal (deleted by retention, or in a damaged stretch) cannot
//! be reproduced and is left out as well, with a count on stderr.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    api::{json, pb},
    detect::{Anomaly, DetectSettings, Engine},
    events::Record,
    journal::{journal_record::Body, Damage, Item, JournalError, Reader},
    outputs::{
        falco::FalcoAlert,
        grpc::{anomaly_line, Matcher},
    },
    policy::PolicySet,
};

/// How each alert is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// The proto3 JSON form of `agent_monitor.v1.Anomaly`, as `tail --json` prints it.
    Json,
    /// The Falco JSON line the daemon's Falco output writes (`hostname` is the node the
    /// run was recorded on).
    Falco,
    /// One short line: time, priority, rule, namespace/pod, process, file or destination.
    #[default]
    Table,
}

/// Which alerts are printed. Every part that is set must match; a list matches any of its
/// entries.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// At or after.
    pub since: Option<SystemTime>,
    /// At or before.
    pub until: Option<SystemTime>,
    /// Which workloads: the API's filter, matched as a stream client's is (pods by name,
    /// `namespace/name` or UID).
    pub workloads: Matcher,
}

impl Filter {
    /// Whether alert `a`, at `when`, is wanted.
    fn wants(&self, a: &pb::Anomaly, when: SystemTime) -> bool {
        self.since.is_none_or(|s| when >= s)
            && self.until.is_none_or(|u| when <= u)
            && self.workloads.pb_anomaly(a)
    }
}

/// What to replay and how.
pub struct Options {
    pub journal: PathBuf,
    /// Policies to run detection with; none: print the recorded alerts.
    pub policies: Option<PolicySet>,
    /// Detection settings (destinations, windows, readers) for a re-run.
    pub detect: DetectSettings,
    pub filter: Filter,
    pub format: Format,
    /// Print only what `policies` adds and removes.
    pub diff: bool,
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The journal directory could not be listed.
    #[error("reading the journal: {0}")]
    Journal(#[from] JournalError),
    /// Stdout failed.
    #[error("writing the output: {0}")]
    Output(#[from] io::Error),
    /// `diff` without policies: there is nothing to compare the recorded alerts with.
    #[error("--diff needs --policy: the alerts of the given policies are compared with the recorded ones")]
    DiffWithoutPolicies,
}

/// A time argument that is neither RFC 3339 nor a duration.
#[derive(Debug, thiserror::Error)]
#[error(
    "{value:?}: expected an RFC 3339 time (2026-11-23T08:00:00Z) or a duration before now \
     (30m, 1h, 2days)"
)]
pub struct TimeError {
    value: String,
}

/// Parses `--since`/`--until`: an RFC 3339 time, or a duration meaning that long before
/// `now`.
pub fn parse_time(value: &str, now: SystemTime) -> Result<SystemTime, TimeError> {
    let err = || TimeError {
        value: value.to_owned(),
    };
    if let Ok(t) = humantime::parse_rfc3339_weak(value) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(value).map_err(|_| err())?;
    now.checked_sub(ago).ok_or_else(err)
}

/// Counts of a replay, for the closing line on stderr.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub runs: u64,
    pub records: u64,
    pub damaged: u64,
    pub printed: u64,
    /// Recorded alerts left out of a diff because their events are not in the journal.
    pub not_comparable: u64,
}

/// Inclusive ranges of sequence numbers seen, sorted and disjoint: events of a run arrive
/// in order, so this is one range per gap, not one entry per event.
#[derive(Debug, Default)]
struct SeqRanges(Vec<(u64, u64)>);

impl SeqRanges {
    fn insert(&mut self, s: u64) {
        let i = self.0.partition_point(|&(_, end)| end < s);
        if self.0.get(i).is_some_and(|&(start, _)| start <= s) {
            return;
        }
        let prev = i
            .checked_sub(1)
            .and_then(|p| self.0.get(p).map(|r| (p, *r)));
        let joins_prev = prev.filter(|(_, (_, end))| end.checked_add(1) == Some(s));
        let joins_next = self
            .0
            .get(i)
            .is_some_and(|&(start, _)| s.checked_add(1) == Some(start));
        match (joins_prev, joins_next) {
            (Some((p, _)), true) => {
                let end = self.0.remove(i).1;
                if let Some(r) = self.0.get_mut(p) {
                    r.1 = end;
                }
            }
            (Some((p, _)), false) => {
                if let Some(r) = self.0.get_mut(p) {
                    r.1 = s;
                }
            }
            (None, true) => {
                if let Some(r) = self.0.get_mut(i) {
                    r.0 = s;
                }
            }
            (None, false) => self.0.insert(i, (s, s)),
        }
    }

    fn contains(&self, s: u64) -> bool {
        let i = self.0.partition_point(|&(_, end)| end < s);
        self.0.get(i).is_some_and(|&(start, _)| start <= s)
    }
}

/// An alert and the time the filters judge it by.
struct Timed {
    anomaly: pb::Anomaly,
    when: SystemTime,
}

/// What is known of one daemon run so far.
#[derive(Default)]
struct Run {
    /// Detection for this run (re-run mode only).
    engine: Option<Engine>,
    /// The node, from the start marker.
    node: Option<String>,
    /// The last journal sequence number seen, to notice records lost before the disk.
    last_seq: Option<u64>,
    events: SeqRanges,
    /// Diff mode: the recorded and the replayed alerts that pass the filter.
    recorded: Vec<Timed>,
    replayed: Vec<Timed>,
}

fn nanos_time(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

/// The time of an alert: that of the record that fired it, else when it was journaled.
fn when(a: &pb::Anomaly, journaled: SystemTime) -> SystemTime {
    a.time
        .and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(journaled)
}

/// `(rule, event_seqs)`, or none for an alert no event triggered.
fn key(a: &pb::Anomaly) -> Option<(String, Vec<u64>)> {
    (!a.event_seqs.is_empty()).then(|| (a.rule.clone(), a.event_seqs.clone()))
}

struct Replay<'o, W: Write, E: Write> {
    opts: &'o Options,
    policies: Option<Arc<RwLock<PolicySet>>>,
    out: W,
    err: E,
    runs: HashMap<String, Run>,
    /// Run ids in the order first seen, so runs left open are finished in journal order.
    order: Vec<String>,
    summary: Summary,
}

impl<W: Write, E: Write> Replay<'_, W, E> {
    fn run_mut(&mut self, id: &str) -> &mut Run {
        if !self.runs.contains_key(id) {
            self.order.push(id.to_owned());
            self.summary.runs += 1;
        }
        let detect = &self.opts.detect;
        let policies = &self.policies;
        self.runs.entry(id.to_owned()).or_insert_with(|| Run {
            engine: policies
                .as_ref()
                .map(|p| Engine::new(detect.clone(), p.clone())),
            ..Run::default()
        })
    }

    /// A note on stderr. Failing to write it is not worth stopping the replay for.
    fn note(&mut self, message: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.err, "agent-monitor: replay: {message}");
    }

    fn damage(&mut self, d: &Damage) {
        self.summary.damaged += 1;
        self.note(format_args!(
            "damaged journal: segment {}, offset {}, {} bytes skipped: {}",
            d.segment.display(),
            d.offset,
            d.bytes_skipped,
            d.reason
        ));
    }

    fn print(&mut self, a: &pb::Anomaly, node: &str, prefix: &str) -> Result<(), ReplayError> {
        let line = match self.opts.format {
            Format::Table => anomaly_line(a),
            Format::Json => json::anomaly(a)?.to_string(),
            Format::Falco => match Anomaly::try_from(a) {
                Ok(model) => serde_json::to_string(&FalcoAlert::new(&model, node))
                    .map_err(io::Error::other)?,
                Err(e) => {
                    self.note(format_args!("alert {} not printed: {e}", a.seq));
                    return Ok(());
                }
            },
        };
        writeln!(self.out, "{prefix}{line}")?;
        self.summary.printed += 1;
        Ok(())
    }

    /// Prints alert `a` of `run` now, or keeps it for the run's diff.
    fn alert(
        &mut self,
        run_id: &str,
        a: pb::Anomaly,
        journaled: SystemTime,
        recorded: bool,
    ) -> Result<(), ReplayError> {
        let when = when(&a, journaled);
        if !self.opts.filter.wants(&a, when) {
            return Ok(());
        }
        let diff = self.opts.diff;
        let run = self.run_mut(run_id);
        if diff {
            let list = if recorded {
                &mut run.recorded
            } else {
                &mut run.replayed
            };
            list.push(Timed { anomaly: a, when });
            return Ok(());
        }
        let node = run.node.clone().unwrap_or_else(|| "unknown".to_owned());
        self.print(&a, &node, "")
    }

    fn event(
        &mut self,
        run_id: &str,
        e: &pb::Event,
        journaled: SystemTime,
        at: &str,
    ) -> Result<(), ReplayError> {
        let run = self.run_mut(run_id);
        run.events.insert(e.seq);
        if run.engine.is_none() {
            return Ok(());
        }
        // The identity is restored from the record as the daemon saw it then.
        let record = match Record::try_from(e) {
            Ok(r) => r,
            Err(err) => {
                self.note(format_args!("{at}: event {} skipped: {err}", e.seq));
                return Ok(());
            }
        };
        let Some(engine) = self.run_mut(run_id).engine.as_mut() else {
            return Ok(());
        };
        let mut found = engine.process(&record);
        // The daemon flushes rate-limit summaries on a timer; after each record is as
        // soon as the engine's clock (record time) can have ended a window.
        found.extend(engine.flush());
        for a in found {
            self.alert(run_id, pb::Anomaly::from(&a), journaled, false)?;
        }
        Ok(())
    }

    /// Ends a run: its last rate-limit summaries and, in diff mode, its diff.
    fn finish(&mut self, run_id: &str) -> Result<(), ReplayError> {
        let summaries = self
            .runs
            .get_mut(run_id)
            .and_then(|r| r.engine.as_mut())
            .map(Engine::flush)
            .unwrap_or_default();
        for a in summaries {
            // A summary carries the time of the engine's last record.
            self.alert(run_id, pb::Anomaly::from(&a), UNIX_EPOCH, false)?;
        }
        let Some(run) = self.runs.remove(run_id) else {
            return Ok(());
        };
        self.order.retain(|r| r != run_id);
        if self.opts.diff {
            self.diff(run_id, run)?;
        }
        Ok(())
    }

    fn diff(&mut self, run_id: &str, run: Run) -> Result<(), ReplayError> {
        let node = run.node.clone().unwrap_or_else(|| "unknown".to_owned());
        let mut recorded: BTreeMap<(String, Vec<u64>), VecDeque<Timed>> = BTreeMap::new();
        let mut not_comparable = 0u64;
        for t in run.recorded {
            let Some(k) = key(&t.anomaly) else { continue };
            if !k.1.iter().all(|s| run.events.contains(*s)) {
                not_comparable += 1;
                continue;
            }
            recorded.entry(k).or_default().push_back(t);
        }
        // (time, '-' before '+', alert): printed in time order.
        let mut changes: Vec<(SystemTime, u8, pb::Anomaly)> = Vec::new();
        for t in run.replayed {
            let Some(k) = key(&t.anomaly) else { continue };
            match recorded.get_mut(&k).and_then(VecDeque::pop_front) {
                Some(old) if old.anomaly.priority == t.anomaly.priority => {}
                Some(old) => {
                    changes.push((old.when, 0, old.anomaly));
                    changes.push((t.when, 1, t.anomaly));
                }
                None => changes.push((t.when, 1, t.anomaly)),
            }
        }
        for old in recorded.into_values().flatten() {
            changes.push((old.when, 0, old.anomaly));
        }
        changes.sort_by_key(|c| (c.0, c.1));
        for (_, sign, a) in changes {
            self.print(&a, &node, if sign == 0 { "- " } else { "+ " })?;
        }
        if not_comparable > 0 {
            self.summary.not_comparable += not_comparable;
            self.note(format_args!(
                "run {run_id}: {not_comparable} recorded alerts not compared: their events are \
                 not in the journal (deleted by retention, or damaged)"
            ));
        }
        Ok(())
    }

    fn record(
        &mut self,
        segment: &Path,
        offset: u64,
        rec: crate::journal::JournalRecord,
    ) -> Result<(), ReplayError> {
        self.summary.records += 1;
        let at = format!("segment {}, offset {offset}", segment.display());
        let journaled = nanos_time(rec.unix_nanos);
        let run_id = rec.run_id;
        let first = !self.runs.contains_key(&run_id);
        let run = self.run_mut(&run_id);
        let gap = match run.last_seq {
            Some(last) if rec.seq > last.saturating_add(1) => Some((last + 1, rec.seq - 1)),
            _ => None,
        };
        run.last_seq = Some(rec.seq);
        if let Some((from, to)) = gap {
            self.note(format_args!(
                "run {run_id}: journal records {from}..={to} missing before {at} (lost before \
                 they reached the disk, or in a damaged stretch)"
            ));
        }
        if first && self.policies.is_some() && !matches!(rec.body, Some(Body::Start(_))) {
            self.note(format_args!(
                "run {run_id}: its first record in the journal is not its start marker (its \
                 beginning was deleted by retention or damaged): detection starts without what \
                 came before"
            ));
        }
        match rec.body {
            Some(Body::Start(m)) => self.run_mut(&run_id).node = Some(m.node),
            Some(Body::Event(e)) => self.event(&run_id, &e, journaled, &at)?,
            Some(Body::Anomaly(a)) => {
                // Re-run mode prints only the new alerts; the recorded ones are kept for the
                // diff.
                if self.policies.is_none() || self.opts.diff {
                    self.alert(&run_id, a, journaled, true)?;
                }
            }
            Some(Body::Stop(_)) => self.finish(&run_id)?,
            // Written by a newer version with a kind of record this one does not know.
            None => self.note(format_args!(
                "{at}: record of run {run_id} with no known body skipped"
            )),
        }
        Ok(())
    }
}

/// Replays `opts.journal`, printing alerts to `out` and damage and notes to `err`. The
/// journal is only read (segments are opened read-only), so a copy or a read-only mount
/// works, and so does a journal a daemon is writing: its segments are read as they were
/// when listed.
pub fn replay<W: Write, E: Write>(opts: &Options, out: W, err: E) -> Result<Summary, ReplayError> {
    if opts.diff && opts.policies.is_none() {
        return Err(ReplayError::DiffWithoutPolicies);
    }
    let reader = Reader::open(&opts.journal)?;
    let mut r = Replay {
        opts,
        policies: opts.policies.clone().map(|p| Arc::new(RwLock::new(p))),
        out,
        err,
        runs: HashMap::new(),
        order: Vec::new(),
        summary: Summary::default(),
    };
    for item in reader {
        match item {
            Item::Record {
                segment,
                offset,
                record,
            } => r.record(&segment, offset, *record)?,
            Item::Damage(d) => r.damage(&d),
        }
    }
    // Runs without a stop marker: a crash, a kill, or the run still being written.
    for run_id in r.order.clone() {
        r.finish(&run_id)?;
    }
    r.out.flush()?;
    Ok(r.summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_ranges_merge_and_answer() {
        let mut r = SeqRanges::default();
        for s in [1, 2, 3, 7, 5, 6, 10, 4] {
            r.insert(s);
        }
        assert_eq!(r.0, vec![(1, 7), (10, 10)]);
        assert!((1..=7).all(|s| r.contains(s)));
        assert!(!r.contains(0) && !r.contains(8) && !r.contains(11));
        r.insert(u64::MAX);
        assert!(r.contains(u64::MAX));
    }

    #[test]
    fn times_are_rfc3339_or_before_now() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(
            parse_time("1h", now).expect("relative"),
            UNIX_EPOCH + Duration::from_secs(6_400)
        );
        assert_eq!(
            parse_time("1970-01-01T00:00:05Z", now).expect("absolute"),
            UNIX_EPOCH + Duration::from_secs(5)
        );
        assert!(parse_time("yesterday", now).is_err());
        assert_eq!(
            parse_time("2h 30m", now).expect("relative"),
            UNIX_EPOCH + Duration::from_secs(1_000)
        );
    }
}
