//! The journal as the real daemon writes it: under load, a SIGKILL mid-write loses nothing
//! that had reached the journal's files (the records synced before it among them), the
//! restart cuts off a torn tail (and says so in the log and the metrics)
//! and starts a new run with its own id and start marker, and SIGTERM ends a run with a
//! stop marker that counts the run's records. Needs root and BPF.

#[path = "support/daemon.rs"]
mod support_daemon;
#[path = "support/privileged.rs"]
mod support_privileged;

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use support_daemon::{Cgroup, Daemon};
use support_privileged::privileged;

use agent_monitor::journal::{journal_record::Body, Damage, Item, JournalRecord, Reader};

/// Longest any one expected thing may take (BPF load, records reaching the journal).
const WAIT: Duration = Duration::from_secs(60);

/// The newest segment file of the journal.
fn newest_segment(dir: &Path) -> PathBuf {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("journal dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "amj"))
        .collect();
    names.sort();
    names.pop().expect("a segment")
}

/// Every record of the journal in order, and the damage after the last record: the only
/// damage a journal may show is the torn end of the segment being written (or of the one a
/// kill cut short), and nothing can follow it. Panics on any other damage.
fn read(dir: &Path) -> (Vec<JournalRecord>, Option<Damage>) {
    let mut records = Vec::new();
    let mut damage: Vec<Damage> = Vec::new();
    for item in Reader::open(dir).expect("reader") {
        match item {
            Item::Record { record, .. } => {
                assert!(damage.is_empty(), "records after damage: {damage:?}");
                records.push(*record);
            }
            Item::Damage(d) => {
                assert!(d.reason.is_torn(), "damage other than a torn end: {d:?}");
                damage.push(d);
            }
        }
    }
    // A torn record at the end of one segment, then at most a new segment's torn header.
    assert!(damage.len() <= 2, "{damage:?}");
    (records, damage.into_iter().next())
}

fn of_run<'a>(records: &'a [JournalRecord], run: &str) -> Vec<&'a JournalRecord> {
    records.iter().filter(|r| r.run_id == run).collect()
}

fn is_event(r: &JournalRecord) -> bool {
    matches!(r.body, Some(Body::Event(_)))
}

/// A metric's value from `/metrics`.
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn a_sigkill_loses_nothing_written_and_the_restart_is_a_new_run_ending_in_a_stop_marker() {
    if !privileged(
        "a_sigkill_loses_nothing_written_and_the_restart_is_a_new_run_ending_in_a_stop_marker",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let journal = tmp.path().join("journal");
    let cg = Cgroup::create(&format!("am-journal-{}", std::process::id()));
    let config = tmp.path().join("config.yaml");
    // Small segments, so the load rotates through several; a short sync interval.
    std::fs::write(
        &config,
        format!(
            "cgroups: [\"{}\"]\noutput: none\nalerts: {{output: none}}\n\
             grpc: {{listen: none}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
             journal: {{dir: \"{}\", segment_bytes: 65536, sync_interval_ms: 100}}\n",
            cg.path.display(),
            journal.display()
        ),
    )
    .expect("config");

    let mut first = Daemon::start(&config);
    let run1 = first.run_id(&journal);
    // Load: processes started as fast as a shell can, each an exec, fork and exit.
    let mut load = cg.spawn("while :; do /bin/true; done");
    let deadline = Instant::now() + WAIT;
    let before_kill = loop {
        let (records, _) = read(&journal);
        let events = of_run(&records, &run1)
            .into_iter()
            .filter(|r| is_event(r))
            .count();
        if events >= 2_000 {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "only {events} events journaled:\n{}",
            first.log.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Mid-write: the load is still running, the writer appending.
    first.kill();
    let _ = load.kill();
    let _ = load.wait();
    cg.kill_all();

    // What the kill left, before anything repairs it. A kill rarely tears a frame (the
    // writer hands the kernel whole buffers), so when it did not, the end of a write cut
    // short is made by hand: a frame header promising 200 bytes, and 50 of them.
    let (killed, torn) = read(&journal);
    let torn = torn.or_else(|| {
        let mut partial = 200u32.to_le_bytes().to_vec();
        partial.extend_from_slice(&[0; 4]);
        partial.extend_from_slice(&[0xa5; 50]);
        std::fs::OpenOptions::new()
            .append(true)
            .open(newest_segment(&journal))
            .and_then(|mut f| f.write_all(&partial))
            .expect("tear the newest segment");
        let (again, torn) = read(&journal);
        assert_eq!(again, killed, "the torn end hides no record");
        torn
    });
    let torn = torn.expect("a torn tail");
    let run1_records = of_run(&killed, &run1);
    assert!(
        matches!(run1_records[0].body, Some(Body::Start(_))) && run1_records[0].seq == 1,
        "{:?}",
        run1_records[0]
    );
    assert!(
        !run1_records
            .iter()
            .any(|r| matches!(r.body, Some(Body::Stop(_)))),
        "a killed run has no stop marker"
    );

    let mut second = Daemon::start(&config);
    let run2 = second.run_id(&journal);
    assert_ne!(run1, run2, "a restart is a new run");
    // The torn end is cut off, and the log and the metrics say so.
    second.wait_log(&[
        "torn tail",
        &torn.segment.display().to_string(),
        &format!("truncated {} bytes", torn.bytes_skipped),
    ]);
    let metrics = second.metrics();
    assert_eq!(
        metric(
            &metrics,
            "agent_monitor_journal_recoveries_total{tail=\"torn\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "agent_monitor_journal_truncated_bytes_total"),
        Some(torn.bytes_skipped as f64),
        "{metrics}"
    );

    // Every record that had reached the journal's files before the kill (a superset of
    // those synced by then) is still there, unchanged, and nothing is damaged but the
    // end of the segment the new run is writing.
    let (after, _) = read(&journal);
    let by_key: BTreeMap<(&str, u64), &JournalRecord> = after
        .iter()
        .map(|r| ((r.run_id.as_str(), r.seq), r))
        .collect();
    assert_eq!(by_key.len(), after.len(), "(run_id, seq) is not unique");
    for r in before_kill.iter().chain(&killed) {
        assert_eq!(
            by_key.get(&(r.run_id.as_str(), r.seq)),
            Some(&r),
            "record {} of run {} lost or changed",
            r.seq,
            r.run_id
        );
    }
    // Sequence numbers increase within each run, in the journal's order.
    for run in [&run1, &run2] {
        let seqs: Vec<u64> = of_run(&after, run).iter().map(|r| r.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "run {run}: {seqs:?}");
    }
    // The new run starts with its marker: this daemon, this node, this version.
    let run2_records = of_run(&after, &run2);
    match &run2_records[0].body {
        Some(Body::Start(m)) => {
            assert_eq!(run2_records[0].seq, 1);
            assert_eq!(m.pid, second.pid());
            assert_eq!(m.version, env!("CARGO_PKG_VERSION"));
            assert!(!m.node.is_empty());
        }
        other => panic!("run {run2} starts with {other:?}"),
    }

    // A clean stop: the last record of the run is its stop marker, counting every record
    // of the run before it.
    let log = second.stop();
    assert!(
        log.iter()
            .any(|l| l.contains("journal: stop marker written")),
        "{}",
        log.join("\n")
    );
    let (stopped, damage) = read(&journal);
    assert!(damage.is_none(), "after a clean stop: {damage:?}");
    let run2_records = of_run(&stopped, &run2);
    let (last, before) = run2_records.split_last().expect("records");
    match &last.body {
        Some(Body::Stop(m)) => {
            assert_eq!(m.records, before.len() as u64, "stop marker count");
            assert!(m.reason.contains("SIGTERM"), "{}", m.reason);
        }
        other => panic!("run {run2} ends with {other:?}"),
    }
}
