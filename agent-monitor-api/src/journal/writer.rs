//! Writing a journal: append, rotate, retain, sync, and recover after a crash.
//!
//! A [`Writer`] owns plain files and no async machinery, so it is `Send` and meant to live
//! on one dedicated thread fed by a bounded channel: a slow disk then delays that thread,
//! never the event lanes.

use std::collections::VecDeque;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{BufReader, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use prost::Message as _;

use super::reader::{DamageReason, SegmentScan, Step};
use super::{
    header_bytes, list_segments, segment_name, JournalError, JournalRecord, FRAME_HEADER_LEN,
    HEADER_LEN, MAX_RECORD_BYTES,
};

/// Default size at which a segment is closed and a new one started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Default cap on the journal's total size.
pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024 * 1024;

/// Default age after which a closed segment is deleted.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Smallest accepted `segment_bytes`: a header and a small record, so tests can rotate
/// often; real journals use megabytes.
pub const MIN_SEGMENT_BYTES: u64 = 64;

/// Appended records are buffered up to this many bytes before being written, so a burst of
/// small records costs one write; `sync` writes whatever is buffered first.
const FLUSH_BYTES: usize = 64 * 1024;

/// Permissions of the journal directory: it records which credentials were read, by whom.
const DIR_MODE: u32 = 0o700;

/// Permissions of segment files.
const FILE_MODE: u32 = 0o600;

/// Limits of a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// A segment is closed before a record would take it past this size (a single record
    /// larger than this gets a segment of its own).
    pub segment_bytes: u64,
    /// Total size of all segments; the oldest closed segments are deleted to stay under
    /// it. The segment being written is never deleted, so it can be exceeded by up to one
    /// segment.
    pub max_bytes: u64,
    /// Closed segments whose last write is older than this are deleted; None keeps them
    /// until `max_bytes` needs the room.
    pub max_age: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_bytes: DEFAULT_MAX_BYTES,
            max_age: Some(DEFAULT_MAX_AGE),
        }
    }
}

impl Options {
    fn validate(&self) -> Result<(), JournalError> {
        if self.segment_bytes < MIN_SEGMENT_BYTES {
            return Err(JournalError::InvalidOptions(
                "segment_bytes is below the minimum",
            ));
        }
        if self.max_bytes < self.segment_bytes {
            return Err(JournalError::InvalidOptions(
                "max_bytes is smaller than segment_bytes",
            ));
        }
        Ok(())
    }
}

/// What [`Writer::open`] found at the end of the newest existing segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailState {
    /// No segment yet, or it ended on a record boundary.
    Clean,
    /// It ended inside a header or record (a kill mid-write): the partial bytes were
    /// removed.
    Torn,
    /// A record was damaged: it and everything after it were removed, as nothing after an
    /// untrusted frame can be framed safely.
    Corrupt(DamageReason),
    /// Its header is not this format's (foreign file, newer version) or it could not be
    /// read: it was left as it is.
    LeftAlone(DamageReason),
}

/// The outcome of crash recovery in [`Writer::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The newest existing segment, which was checked; None for a new journal.
    pub segment: Option<PathBuf>,
    /// Intact records in it (kept).
    pub records_intact: u64,
    /// Bytes removed from its end (the whole file for a torn header).
    pub dropped_bytes: u64,
    /// What its end looked like.
    pub tail: TailState,
}

/// Counters of a writer, since it was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Records accepted by `append`.
    pub records: u64,
    /// Bytes of those records, framing included.
    pub bytes: u64,
    /// Segments started (the first one included).
    pub segments_created: u64,
    /// Segments deleted by retention.
    pub segments_deleted: u64,
    /// Bytes of those segments.
    pub bytes_deleted: u64,
    /// fdatasync calls (by `sync` and at each rotation).
    pub syncs: u64,
    /// Time spent in them.
    pub sync_total: Duration,
    /// The longest one.
    pub sync_max: Duration,
    /// The latest one.
    pub sync_last: Duration,
    /// Failed writes; the records buffered at the time were lost.
    pub write_errors: u64,
}

/// A segment other than the one being written, oldest first in [`Writer::closed`].
#[derive(Debug)]
struct ClosedSegment {
    path: PathBuf,
    bytes: u64,
    modified: SystemTime,
}

/// Appends records to a journal directory. See the module docs for threading.
#[derive(Debug)]
pub struct Writer {
    dir: PathBuf,
    options: Options,
    file: File,
    path: PathBuf,
    index: u64,
    /// Size of the current segment, buffered bytes included.
    bytes: u64,
    /// Bytes of the current segment written to the file.
    written: u64,
    has_records: bool,
    /// A failed write could not be undone: the next append starts a new segment, so no
    /// record is ever written after a partial one.
    broken: bool,
    pending: Vec<u8>,
    closed: VecDeque<ClosedSegment>,
    stats: WriterStats,
}

impl Writer {
    /// Opens (creating if needed) the journal in `dir`: checks the newest segment and cuts
    /// off a torn or corrupt tail, applies retention, and starts a new segment for this run.
    pub fn open(dir: &Path, options: Options) -> Result<(Self, Recovery), JournalError> {
        options.validate()?;
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|e| JournalError::io("creating", dir, e))?;
        // An existing directory keeps its mode otherwise.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
            .map_err(|e| JournalError::io("setting permissions of", dir, e))?;

        let mut segments = list_segments(dir)?;
        let next_index = match segments.last() {
            Some((index, _)) => index.checked_add(1).ok_or(JournalError::IndexOverflow)?,
            None => 0,
        };
        let recovery = match segments.last() {
            Some((_, path)) => {
                let recovery = recover(path)?;
                if !path.exists() {
                    segments.pop();
                }
                recovery
            }
            None => Recovery {
                segment: None,
                records_intact: 0,
                dropped_bytes: 0,
                tail: TailState::Clean,
            },
        };
        let mut closed = VecDeque::with_capacity(segments.len());
        for (_, path) in segments {
            // A segment that vanished or cannot be stat'ed is not counted; it is not ours
            // to fix and the reader reports it.
            if let Ok(meta) = std::fs::metadata(&path) {
                closed.push_back(ClosedSegment {
                    path,
                    bytes: meta.len(),
                    modified: meta.modified().unwrap_or_else(|_| SystemTime::now()),
                });
            }
        }
        let (file, path) = create_segment(dir, next_index)?;
        let mut writer = Self {
            dir: dir.to_path_buf(),
            options,
            file,
            path,
            index: next_index,
            bytes: HEADER_LEN as u64,
            written: HEADER_LEN as u64,
            has_records: false,
            broken: false,
            pending: Vec::with_capacity(FLUSH_BYTES),
            closed,
            stats: WriterStats {
                segments_created: 1,
                ..WriterStats::default()
            },
        };
        writer.apply_retention()?;
        Ok((writer, recovery))
    }

    /// Appends one record. It is buffered and reaches the file within [`FLUSH_BYTES`] or at
    /// the next [`Writer::sync`]; it is durable after that sync.
    pub fn append(&mut self, record: &JournalRecord) -> Result<(), JournalError> {
        let len = record.encoded_len();
        if len == 0 {
            return Err(JournalError::EmptyRecord);
        }
        if len > MAX_RECORD_BYTES {
            return Err(JournalError::RecordTooLarge { len });
        }
        let frame_len = (FRAME_HEADER_LEN + len) as u64;
        if self.broken || (self.has_records && self.bytes + frame_len > self.options.segment_bytes)
        {
            self.rotate()?;
        }
        let start = self.pending.len();
        // Both fit in u32: len <= MAX_RECORD_BYTES.
        self.pending.extend_from_slice(&(len as u32).to_le_bytes());
        self.pending.extend_from_slice(&[0; 4]);
        record.encode_raw(&mut self.pending);
        let crc = crc32c::crc32c(&self.pending[start + FRAME_HEADER_LEN..]);
        self.pending[start + 4..start + FRAME_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        self.bytes += frame_len;
        self.has_records = true;
        self.stats.records += 1;
        self.stats.bytes += frame_len;
        if self.pending.len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes buffered records and fdatasyncs the current segment, then applies age
    /// retention. The caller calls it on its sync interval.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.flush()?;
        self.sync_file()?;
        self.apply_retention()
    }

    /// Writes buffered records to the segment file (no sync): a reader opened after this
    /// sees every record appended before it.
    pub fn write_buffered(&mut self) -> Result<(), JournalError> {
        self.flush()
    }

    /// Syncs and closes the journal; the counters at the end.
    pub fn close(mut self) -> Result<WriterStats, JournalError> {
        self.flush()?;
        self.sync_file()?;
        Ok(self.stats.clone())
    }

    /// Counters since open.
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// The segment being written.
    pub fn current_segment(&self) -> &Path {
        &self.path
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sync_file(&mut self) -> Result<(), JournalError> {
        let started = Instant::now();
        self.file
            .sync_data()
            .map_err(|e| JournalError::io("syncing", &self.path, e))?;
        let took = started.elapsed();
        self.stats.syncs += 1;
        self.stats.sync_total += took;
        self.stats.sync_max = self.stats.sync_max.max(took);
        self.stats.sync_last = took;
        Ok(())
    }

    /// Writes the buffer. On failure the buffered records are dropped and the file cut back
    /// to its last complete record, or, if that fails too, abandoned for a new segment.
    fn flush(&mut self) -> Result<(), JournalError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(&self.pending);
        let flushed = self.pending.len() as u64;
        self.pending.clear();
        match result {
            Ok(()) => {
                self.written += flushed;
                Ok(())
            }
            Err(e) => {
                self.stats.write_errors += 1;
                // O_APPEND: after the cut, the next write lands right after the last
                // complete record.
                match self.file.set_len(self.written) {
                    Ok(()) => self.bytes = self.written,
                    Err(_) => self.broken = true,
                }
                Err(JournalError::io("writing", &self.path, e))
            }
        }
    }

    /// Closes the current segment (durably) and starts the next.
    fn rotate(&mut self) -> Result<(), JournalError> {
        if !self.broken {
            self.flush()?;
            self.sync_file()?;
        }
        let index = self
            .index
            .checked_add(1)
            .ok_or(JournalError::IndexOverflow)?;
        let (file, path) = create_segment(&self.dir, index)?;
        let old = std::mem::replace(&mut self.path, path);
        self.closed.push_back(ClosedSegment {
            path: old,
            bytes: self.written,
            modified: SystemTime::now(),
        });
        self.file = file;
        self.index = index;
        self.bytes = HEADER_LEN as u64;
        self.written = HEADER_LEN as u64;
        self.has_records = false;
        self.broken = false;
        self.stats.segments_created += 1;
        self.apply_retention()
    }

    /// Deletes the oldest closed segments while the journal is over `max_bytes`, and
    /// closed segments older than `max_age`. Never the current segment.
    fn apply_retention(&mut self) -> Result<(), JournalError> {
        let mut total: u64 = self.bytes + self.closed.iter().map(|s| s.bytes).sum::<u64>();
        let expired_before = self
            .options
            .max_age
            .and_then(|age| SystemTime::now().checked_sub(age));
        while let Some(oldest) = self.closed.front() {
            let over_size = total > self.options.max_bytes;
            let expired = expired_before.is_some_and(|t| oldest.modified < t);
            if !over_size && !expired {
                break;
            }
            match std::fs::remove_file(&oldest.path) {
                Ok(()) => {}
                // Already gone (removed by hand): just forget it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Kept in the list so the next sync or rotation retries.
                Err(e) => return Err(JournalError::io("deleting", &oldest.path, e)),
            }
            total -= oldest.bytes;
            self.stats.segments_deleted += 1;
            self.stats.bytes_deleted += oldest.bytes;
            self.closed.pop_front();
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Best effort: a writer dropped without close still gets its buffered records to
        // the page cache. Errors have nowhere to go here.
        let _ = self.flush();
    }
}

/// Creates segment `index` with its header, and makes its directory entry durable.
fn create_segment(dir: &Path, index: u64) -> Result<(File, PathBuf), JournalError> {
    let path = dir.join(segment_name(index));
    let mut file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&path)
        .map_err(|e| JournalError::io("creating", &path, e))?;
    file.write_all(&header_bytes())
        .map_err(|e| JournalError::io("writing", &path, e))?;
    sync_dir(dir)?;
    Ok((file, path))
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| JournalError::io("syncing", dir, e))
}

/// Checks the newest segment and cuts off a torn or corrupt tail.
fn recover(path: &Path) -> Result<Recovery, JournalError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| JournalError::io("opening", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| JournalError::io("reading", path, e))?
        .len();
    let mut scan = SegmentScan::new(BufReader::new(&file), len);
    let mut records_intact = 0;
    let mut end = None;
    while let Some(step) = scan.next_step() {
        match step {
            Step::Record { .. } => records_intact += 1,
            // Framed and checksummed: its bytes are what was written; the reader reports it.
            Step::Damage {
                reason: DamageReason::Undecodable(_),
                ..
            } => {}
            Step::Damage { offset, reason, .. } => end = Some((offset, reason)),
        }
    }
    let mut recovery = Recovery {
        segment: Some(path.to_path_buf()),
        records_intact,
        dropped_bytes: 0,
        tail: TailState::Clean,
    };
    let Some((offset, reason)) = end else {
        return Ok(recovery);
    };
    debug_assert!(offset <= scan.offset() || offset == 0);
    match reason {
        // Created but its header never completed: nothing of value in it.
        DamageReason::TruncatedHeader => {
            drop(file);
            std::fs::remove_file(path).map_err(|e| JournalError::io("removing", path, e))?;
            recovery.dropped_bytes = len;
            recovery.tail = TailState::Torn;
        }
        DamageReason::BadMagic
        | DamageReason::BadHeader(_)
        | DamageReason::UnsupportedVersion(_)
        | DamageReason::Unreadable(_)
        | DamageReason::Vanished => recovery.tail = TailState::LeftAlone(reason),
        reason => {
            file.set_len(offset)
                .and_then(|()| file.sync_data())
                .map_err(|e| JournalError::io("truncating", path, e))?;
            recovery.dropped_bytes = len - offset;
            recovery.tail = if reason.is_torn() {
                TailState::Torn
            } else {
                TailState::Corrupt(reason)
            };
        }
    }
    Ok(recovery)
}

#[cfg(test)]
mod tests {
    use super::super::Reader;
    use super::super::{journal_record, Item, RunMarker};
    use super::*;

    fn small() -> Options {
        Options {
            segment_bytes: 256,
            max_bytes: 1 << 20,
            max_age: None,
        }
    }

    fn marker(seq: u64) -> JournalRecord {
        JournalRecord {
            run_id: "run".into(),
            seq,
            unix_nanos: 1_700_000_000_000_000_000 + seq,
            body: Some(journal_record::Body::Start(RunMarker {
                node: "node-a".into(),
                version: "0.1.0".into(),
                reason: "start".into(),
                pid: 42,
                records: 0,
            })),
        }
    }

    fn read_all(dir: &Path) -> (Vec<u64>, usize) {
        let mut seqs = Vec::new();
        let mut damage = 0;
        for item in Reader::open(dir).expect("reader") {
            match item {
                Item::Record { record, .. } => seqs.push(record.seq),
                Item::Damage(_) => damage += 1,
            }
        }
        (seqs, damage)
    }

    #[test]
    fn writer_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Writer>();
    }

    #[test]
    fn new_journal_round_trips_and_has_modes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("journal");
        let (mut w, recovery) = Writer::open(&dir, small()).expect("open");
        assert_eq!(recovery.tail, TailState::Clean);
        assert_eq!(recovery.segment, None);
        for seq in 0..20 {
            w.append(&marker(seq)).expect("append");
        }
        w.sync().expect("sync");
        let stats = w.close().expect("close");
        assert_eq!(stats.records, 20);
        assert!(stats.segments_created > 1, "{stats:?}");
        assert!(stats.syncs >= 1);
        let (seqs, damage) = read_all(&dir);
        assert_eq!(seqs, (0..20).collect::<Vec<_>>());
        assert_eq!(damage, 0);
        let dir_mode = std::fs::metadata(&dir).expect("dir").permissions().mode();
        assert_eq!(dir_mode & 0o777, DIR_MODE);
        for (_, path) in list_segments(&dir).expect("list") {
            let mode = std::fs::metadata(&path).expect("seg").permissions().mode();
            assert_eq!(mode & 0o777, FILE_MODE);
            let len = std::fs::metadata(&path).expect("seg").len();
            assert!(len <= 256, "{} is {len} bytes", path.display());
        }
    }

    #[test]
    fn empty_and_oversized_records_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (mut w, _) = Writer::open(tmp.path(), small()).expect("open");
        assert!(matches!(
            w.append(&JournalRecord::default()),
            Err(JournalError::EmptyRecord)
        ));
        let big = JournalRecord {
            run_id: "x".repeat(MAX_RECORD_BYTES),
            ..JournalRecord::default()
        };
        assert!(matches!(
            w.append(&big),
            Err(JournalError::RecordTooLarge { .. })
        ));
        assert_eq!(w.stats().records, 0);
    }

    #[test]
    fn invalid_options_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tiny = Options {
            segment_bytes: 1,
            ..small()
        };
        assert!(matches!(
            Writer::open(tmp.path(), tiny),
            Err(JournalError::InvalidOptions(_))
        ));
        let inverted = Options {
            max_bytes: 100,
            ..small()
        };
        assert!(matches!(
            Writer::open(tmp.path(), inverted),
            Err(JournalError::InvalidOptions(_))
        ));
    }

    #[test]
    fn size_retention_deletes_oldest_first_never_current() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let options = Options {
            segment_bytes: 256,
            max_bytes: 1024,
            max_age: None,
        };
        let (mut w, _) = Writer::open(tmp.path(), options).expect("open");
        for seq in 0..200 {
            w.append(&marker(seq)).expect("append");
        }
        w.sync().expect("sync");
        assert!(w.stats().segments_deleted > 0);
        let current = w.current_segment().to_path_buf();
        let total: u64 = list_segments(tmp.path())
            .expect("list")
            .iter()
            .map(|(_, p)| std::fs::metadata(p).expect("seg").len())
            .sum();
        assert!(total <= 1024, "{total}");
        assert!(current.exists());
        drop(w);
        // What is left is the newest records, contiguous up to the last one.
        let (seqs, damage) = read_all(tmp.path());
        assert_eq!(damage, 0);
        assert_eq!(seqs.last(), Some(&199));
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[test]
    fn age_retention_deletes_closed_segments_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (mut w, _) = Writer::open(tmp.path(), small()).expect("open");
        for seq in 0..20 {
            w.append(&marker(seq)).expect("append");
        }
        w.close().expect("close");
        let before = list_segments(tmp.path()).expect("list").len();
        assert!(before > 1);
        let options = Options {
            max_age: Some(Duration::ZERO),
            ..small()
        };
        let (mut w, _) = Writer::open(tmp.path(), options).expect("reopen");
        w.sync().expect("sync");
        assert_eq!(w.stats().segments_deleted, before as u64);
        let left = list_segments(tmp.path()).expect("list");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1, w.current_segment());
    }

    #[test]
    fn torn_header_segment_is_removed_on_open() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (w, _) = Writer::open(tmp.path(), small()).expect("open");
        let first = w.current_segment().to_path_buf();
        w.close().expect("close");
        let torn = tmp.path().join(segment_name(1));
        std::fs::write(&torn, &header_bytes()[..5]).expect("write");
        let (w, recovery) = Writer::open(tmp.path(), small()).expect("reopen");
        assert_eq!(recovery.tail, TailState::Torn);
        assert_eq!(recovery.dropped_bytes, 5);
        assert!(!torn.exists());
        assert!(first.exists());
        assert_eq!(w.current_segment(), tmp.path().join(segment_name(2)));
    }

    #[test]
    fn foreign_newest_segment_is_left_alone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let foreign = tmp.path().join(segment_name(7));
        std::fs::write(&foreign, b"not a journal segment at all").expect("write");
        let (w, recovery) = Writer::open(tmp.path(), small()).expect("open");
        assert_eq!(recovery.tail, TailState::LeftAlone(DamageReason::BadMagic));
        assert_eq!(recovery.dropped_bytes, 0);
        assert!(foreign.exists());
        assert_eq!(w.current_segment(), tmp.path().join(segment_name(8)));
    }
}
