//! The journal's storage core end to end: round trips through Writer and Reader across
//! rotations and reopens, damage of every kind, and recovery after a kill mid-write.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use agent_monitor_api::journal::{
    journal_record::Body, DamageReason, Item, JournalRecord, Options, Reader, RunMarker, TailState,
    Writer,
};
use agent_monitor_api::pb::{event, Anomaly, CredentialAccess, Event, Workload};
use proptest::prelude::*;
use prost::Message as _;

fn options(segment_bytes: u64) -> Options {
    Options {
        segment_bytes,
        max_bytes: u64::MAX,
        max_age: None,
    }
}

/// A record with a given shape; `seq` is unique across a test so records can be matched.
fn record(seq: u64, shape: u8, text: &str) -> JournalRecord {
    let marker = RunMarker {
        node: "node-a".into(),
        version: "0.1.0".into(),
        reason: text.into(),
        pid: 7,
        records: seq,
    };
    let body = match shape % 4 {
        0 => Body::Event(Event {
            seq,
            workload: Some(Workload {
                namespace: "agents".into(),
                pod: text.into(),
                ..Workload::default()
            }),
            kind: Some(event::Kind::Open(CredentialAccess {
                path: format!("/var/run/secrets/{text}"),
                ..CredentialAccess::default()
            })),
            ..Event::default()
        }),
        1 => Body::Anomaly(Anomaly {
            seq,
            rule: "exfil".into(),
            output: text.into(),
            tags: vec![text.into()],
            event_seqs: vec![seq],
            ..Anomaly::default()
        }),
        2 => Body::Start(marker),
        _ => Body::Stop(marker),
    };
    JournalRecord {
        run_id: format!("run-{}", seq / 1000),
        seq,
        unix_nanos: 1_700_000_000_000_000_000 + seq,
        body: Some(body),
    }
}

/// Records with their segment and frame offset, and the damage reported.
struct Read {
    records: Vec<(PathBuf, u64, JournalRecord)>,
    damage: Vec<(PathBuf, u64, DamageReason)>,
}

fn read(dir: &Path) -> Read {
    let mut out = Read {
        records: Vec::new(),
        damage: Vec::new(),
    };
    for item in Reader::open(dir).expect("reader") {
        match item {
            Item::Record {
                segment,
                offset,
                record,
            } => out.records.push((segment.to_path_buf(), offset, *record)),
            Item::Damage(d) => out
                .damage
                .push((d.segment.to_path_buf(), d.offset, d.reason)),
        }
    }
    out
}

fn arb_records() -> impl Strategy<Value = Vec<(u8, String)>> {
    prop::collection::vec((any::<u8>(), "[a-z0-9/é\\x00]{0,40}"), 1..40)
}

/// Writes `specs` as records seq 0.. into a fresh journal with small segments.
fn write_journal(dir: &Path, specs: &[(u8, String)], segment_bytes: u64) -> Vec<JournalRecord> {
    let (mut w, _) = Writer::open(dir, options(segment_bytes)).expect("open");
    let records: Vec<_> = specs
        .iter()
        .enumerate()
        .map(|(i, (shape, text))| record(i as u64, *shape, text))
        .collect();
    for r in &records {
        w.append(r).expect("append");
    }
    w.close().expect("close");
    records
}

#[derive(Debug, Clone)]
enum Corruption {
    Flip { at: usize, mask: u8 },
    Truncate { at: usize },
    Append { garbage: Vec<u8> },
}

fn arb_corruption() -> impl Strategy<Value = (usize, Corruption)> {
    let c = prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Corruption::Flip { at, mask }),
        any::<usize>().prop_map(|at| Corruption::Truncate { at }),
        prop::collection::vec(any::<u8>(), 1..64)
            .prop_map(|garbage| Corruption::Append { garbage }),
    ];
    (any::<usize>(), c)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Several runs (each a Writer opened, filled and closed) read back as one ordered
    /// sequence, whatever the segment size.
    #[test]
    fn round_trip_across_rotations_and_reopens(
        runs in prop::collection::vec(arb_records(), 1..4),
        segment_bytes in 64u64..2048,
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut expected = Vec::new();
        for (run, specs) in runs.iter().enumerate() {
            let (mut w, recovery) = Writer::open(tmp.path(), options(segment_bytes)).expect("open");
            prop_assert_eq!(recovery.tail, TailState::Clean);
            prop_assert_eq!(recovery.dropped_bytes, 0);
            for (i, (shape, text)) in specs.iter().enumerate() {
                let r = record(run as u64 * 1000 + i as u64, *shape, text);
                w.append(&r).expect("append");
                expected.push(r);
            }
            w.close().expect("close");
        }
        let got = read(tmp.path());
        prop_assert!(got.damage.is_empty(), "{:?}", got.damage);
        let records: Vec<_> = got.records.into_iter().map(|(_, _, r)| r).collect();
        prop_assert_eq!(records, expected);
    }

    /// One segment is damaged (a byte flipped, cut at any offset, garbage appended): every
    /// record of the other segments and every record before the damage in that segment is
    /// read, nothing that was not written is read, and the damage is reported.
    #[test]
    fn corruption_loses_only_what_it_touches(
        specs in arb_records(),
        segment_bytes in 64u64..1024,
        (which, corruption) in arb_corruption(),
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let written = write_journal(tmp.path(), &specs, segment_bytes);
        let clean = read(tmp.path());
        prop_assert!(clean.damage.is_empty());
        let mut segments: Vec<PathBuf> = std::fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("entry").path())
            .collect();
        segments.sort();
        let target = segments[which % segments.len()].clone();
        let mut bytes = std::fs::read(&target).expect("segment");
        let len = bytes.len();
        // Records of the target segment that must survive: frames ending before the damage.
        let damage_at = match &corruption {
            Corruption::Flip { at, mask } => {
                let at = at % len;
                bytes[at] ^= mask;
                at
            }
            Corruption::Truncate { at } => {
                let at = at % (len + 1);
                bytes.truncate(at);
                at
            }
            Corruption::Append { garbage } => {
                bytes.extend_from_slice(garbage);
                len
            }
        };
        std::fs::write(&target, &bytes).expect("write");

        let mut frame_end: HashMap<u64, u64> = HashMap::new();
        let in_target: Vec<_> = clean.records.iter().filter(|(s, _, _)| *s == target).collect();
        for (i, (_, _, r)) in in_target.iter().enumerate() {
            let end = in_target.get(i + 1).map_or(len as u64, |(_, next, _)| *next);
            frame_end.insert(r.seq, end);
        }
        let got = read(tmp.path());
        let got_seqs: Vec<u64> = got.records.iter().map(|(_, _, r)| r.seq).collect();
        // Never a record that was not written, never out of order, never altered.
        let by_seq: HashMap<u64, &JournalRecord> = written.iter().map(|r| (r.seq, r)).collect();
        prop_assert!(got_seqs.windows(2).all(|w| w[0] < w[1]), "{:?}", got_seqs);
        for (_, _, r) in &got.records {
            prop_assert_eq!(Some(&r), by_seq.get(&r.seq));
        }
        for r in &written {
            let must = match frame_end.get(&r.seq) {
                None => true,
                Some(end) => *end <= damage_at as u64,
            };
            if must {
                prop_assert!(got_seqs.contains(&r.seq), "record {} lost", r.seq);
            }
        }
        // A cut at a frame boundary leaves a shorter but valid segment.
        let at_boundary = damage_at == len
            || damage_at == agent_monitor_api::journal::HEADER_LEN
            || in_target.iter().any(|(_, o, _)| *o == damage_at as u64);
        match corruption {
            Corruption::Truncate { .. } if at_boundary => {
                prop_assert!(got.damage.is_empty(), "{:?}", got.damage);
            }
            _ => {
                prop_assert!(!got.damage.is_empty(), "damage not reported");
                prop_assert!(got.damage.iter().all(|(s, _, _)| *s == target));
            }
        }
    }

    /// Reopening after a cut at any offset of the newest segment always succeeds, keeps
    /// every complete record and leaves a journal that reads without damage.
    #[test]
    fn reopen_after_any_cut_recovers(
        specs in arb_records(),
        cut in any::<usize>(),
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let written = write_journal(tmp.path(), &specs, 1 << 20);
        let segment = std::fs::read_dir(tmp.path()).expect("list").next().expect("one").expect("entry").path();
        let bytes = std::fs::read(&segment).expect("segment");
        let cut = cut % (bytes.len() + 1);
        std::fs::write(&segment, &bytes[..cut]).expect("write");
        let before = read(tmp.path()).records.len() as u64;
        let (w, recovery) = Writer::open(tmp.path(), options(1 << 20)).expect("reopen");
        w.close().expect("close");
        prop_assert!(recovery.records_intact == before || cut < agent_monitor_api::journal::HEADER_LEN);
        let after = read(tmp.path());
        prop_assert!(after.damage.is_empty(), "{:?}", after.damage);
        let seqs: Vec<u64> = after.records.iter().map(|(_, _, r)| r.seq).collect();
        let expected: Vec<u64> = written.iter().map(|r| r.seq).take(seqs.len()).collect();
        prop_assert_eq!(seqs, expected);
    }
}

/// A kill mid-write: records synced, then half a record on disk. Reopening cuts the torn
/// half, reports it, keeps every synced record, and the new run's records follow.
#[test]
fn crash_mid_write_truncates_torn_tail_and_new_run_follows() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut w, _) = Writer::open(tmp.path(), options(1 << 20)).expect("open");
    let first: Vec<_> = (0..10).map(|i| record(i, i as u8, "before")).collect();
    for r in &first {
        w.append(r).expect("append");
    }
    w.sync().expect("sync");
    let segment = w.current_segment().to_path_buf();
    // The process dies: nothing more is flushed or synced by this writer.
    std::mem::forget(w);

    let torn = record(10, 0, "torn");
    let payload = torn.encode_to_vec();
    let mut frame = Vec::new();
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    let half = frame.len() / 2;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .and_then(|mut f| f.write_all(&frame[..half]))
        .expect("append half a record");

    let (mut w, recovery) = Writer::open(tmp.path(), options(1 << 20)).expect("reopen");
    assert_eq!(recovery.segment.as_deref(), Some(segment.as_path()));
    assert_eq!(recovery.tail, TailState::Torn);
    assert_eq!(recovery.dropped_bytes, half as u64);
    assert_eq!(recovery.records_intact, 10);
    assert_ne!(
        w.current_segment(),
        segment,
        "a new run starts a new segment"
    );
    let second: Vec<_> = (1000..1005).map(|i| record(i, i as u8, "after")).collect();
    for r in &second {
        w.append(r).expect("append");
    }
    w.close().expect("close");

    let got = read(tmp.path());
    assert!(got.damage.is_empty(), "{:?}", got.damage);
    let records: Vec<_> = got.records.into_iter().map(|(_, _, r)| r).collect();
    let expected: Vec<_> = first.into_iter().chain(second).collect();
    assert_eq!(records, expected);
}

/// A damaged last record (not a short write) is cut and reported as corruption.
#[test]
fn corrupt_tail_is_cut_and_reported() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut w, _) = Writer::open(tmp.path(), options(1 << 20)).expect("open");
    for i in 0..3 {
        w.append(&record(i, 1, "x")).expect("append");
    }
    let segment = w.current_segment().to_path_buf();
    w.close().expect("close");
    let last_offset = read(tmp.path()).records[2].1;
    let mut bytes = std::fs::read(&segment).expect("segment");
    let end = bytes.len();
    bytes[end - 1] ^= 0xff;
    std::fs::write(&segment, &bytes).expect("write");

    let (w, recovery) = Writer::open(tmp.path(), options(1 << 20)).expect("reopen");
    w.close().expect("close");
    assert_eq!(recovery.tail, TailState::Corrupt(DamageReason::BadChecksum));
    assert_eq!(recovery.dropped_bytes, end as u64 - last_offset);
    assert_eq!(recovery.records_intact, 2);
    let got = read(tmp.path());
    assert!(got.damage.is_empty());
    assert_eq!(got.records.len(), 2);
}

/// An unreadable older segment is reported and reading goes on with the next one.
#[test]
fn damaged_older_segment_does_not_stop_the_reader() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let specs: Vec<(u8, String)> = (0..30).map(|i| (i, "abc".to_owned())).collect();
    let written = write_journal(tmp.path(), &specs, 128);
    let mut segments: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .expect("list")
        .map(|e| e.expect("entry").path())
        .collect();
    segments.sort();
    assert!(segments.len() >= 3);
    std::fs::write(&segments[0], b"garbage").expect("write");
    let got = read(tmp.path());
    assert_eq!(got.damage.len(), 1);
    assert_eq!(got.damage[0].2, DamageReason::TruncatedHeader);
    assert_eq!(
        got.records.last().map(|r| r.2.seq),
        written.last().map(|r| r.seq)
    );
}
