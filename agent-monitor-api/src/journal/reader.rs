//! Reading a journal: every intact record in order, and every damaged stretch reported.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message as _;

use super::{
    list_segments, JournalError, JournalRecord, FORMAT_VERSION, FRAME_HEADER_LEN, HEADER_LEN,
    MAGIC, MAX_RECORD_BYTES,
};

/// Read buffer per open segment: large enough to amortise syscalls over small records.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Name given to the segment of [`Reader::from_bytes`].
const IN_MEMORY_SEGMENT: &str = "<memory>";

/// What a reader yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// An intact record.
    Record {
        /// The segment file it is in.
        segment: Arc<Path>,
        /// Byte offset of its frame in the segment.
        offset: u64,
        /// The record.
        record: Box<JournalRecord>,
    },
    /// Bytes that could not be read as records.
    Damage(Damage),
}

/// A damaged stretch of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub segment: Arc<Path>,
    /// Byte offset where the damage starts.
    pub offset: u64,
    /// Bytes not read as records from there: the rest of the segment, except for an
    /// undecodable record, which is skipped alone.
    pub bytes_skipped: u64,
    /// What is wrong.
    pub reason: DamageReason,
}

/// Why bytes of a segment could not be read as records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DamageReason {
    /// The segment is shorter than its header (a crash right after it was created).
    #[error("segment shorter than its header")]
    TruncatedHeader,
    /// The segment does not start with the journal's magic.
    #[error("not a journal segment (bad magic)")]
    BadMagic,
    /// The segment is of a format version this code does not read.
    #[error("unsupported segment format version {0}")]
    UnsupportedVersion(u32),
    /// The header's reserved word is not zero.
    #[error("segment header's reserved word is {0:#x}, not zero")]
    BadHeader(u32),
    /// A record's length is zero or above the limit: the length itself is damaged.
    #[error("impossible record length {0}")]
    ImpossibleLength(u32),
    /// The segment ends inside a record (a write cut short, or the segment being written
    /// right now).
    #[error("segment ends inside a record")]
    TruncatedRecord,
    /// A record's payload does not match its checksum.
    #[error("record checksum mismatch")]
    BadChecksum,
    /// A record's checksum matches but it is not a valid JournalRecord.
    #[error("record does not decode: {0}")]
    Undecodable(String),
    /// The segment could not be opened or read.
    #[error("segment unreadable: {0}")]
    Unreadable(io::ErrorKind),
    /// The segment was listed but is gone (deleted by retention meanwhile).
    #[error("segment vanished while reading")]
    Vanished,
}

impl DamageReason {
    /// True when the damage is the end of a write cut short: the file simply stops before
    /// the header or record is complete.
    pub fn is_torn(&self) -> bool {
        matches!(self, Self::TruncatedHeader | Self::TruncatedRecord)
    }
}

/// One step of a segment scan.
pub(super) enum Step {
    Record {
        offset: u64,
        record: Box<JournalRecord>,
    },
    Damage {
        offset: u64,
        bytes_skipped: u64,
        reason: DamageReason,
    },
}

/// Scans one segment's bytes. Reads at most `len` bytes, the segment's length when the scan
/// began, so a segment growing meanwhile is read as a consistent prefix.
pub(super) struct SegmentScan<R> {
    src: io::Take<R>,
    /// Segment length the scan is bounded by.
    len: u64,
    /// Offset of the next unread byte.
    offset: u64,
    header_checked: bool,
    done: bool,
    /// Payload buffer, reused; never grown past MAX_RECORD_BYTES.
    buf: Vec<u8>,
}

impl<R: Read> SegmentScan<R> {
    pub(super) fn new(src: R, len: u64) -> Self {
        Self {
            src: src.take(len),
            len,
            offset: 0,
            header_checked: false,
            done: false,
            buf: Vec::new(),
        }
    }

    /// End of the last intact frame (or of the header) seen so far.
    pub(super) fn offset(&self) -> u64 {
        self.offset
    }

    fn end(&mut self, offset: u64, reason: DamageReason) -> Option<Step> {
        self.done = true;
        Some(Step::Damage {
            offset,
            bytes_skipped: self.len.saturating_sub(offset),
            reason,
        })
    }

    /// The next record or damage; None at the end of the segment or after damage that
    /// ends it.
    pub(super) fn next_step(&mut self) -> Option<Step> {
        if self.done {
            return None;
        }
        if !self.header_checked {
            self.header_checked = true;
            let mut header = [0u8; HEADER_LEN];
            match read_full(&mut self.src, &mut header) {
                Err(e) => return self.end(0, DamageReason::Unreadable(e.kind())),
                Ok(n) if n < HEADER_LEN => return self.end(0, DamageReason::TruncatedHeader),
                Ok(_) => {}
            }
            if header[..MAGIC.len()] != MAGIC {
                return self.end(0, DamageReason::BadMagic);
            }
            let version = le_u32(&header[MAGIC.len()..]);
            if version != FORMAT_VERSION {
                return self.end(0, DamageReason::UnsupportedVersion(version));
            }
            // Must be zero: a revision that uses them bumps the version, and so a flipped
            // bit here is reported rather than ignored.
            let reserved = le_u32(&header[MAGIC.len() + 4..]);
            if reserved != 0 {
                return self.end(0, DamageReason::BadHeader(reserved));
            }
            self.offset = HEADER_LEN as u64;
        }
        let start = self.offset;
        let mut frame = [0u8; FRAME_HEADER_LEN];
        match read_full(&mut self.src, &mut frame) {
            Err(e) => return self.end(start, DamageReason::Unreadable(e.kind())),
            Ok(0) => {
                self.done = true;
                return None;
            }
            Ok(n) if n < FRAME_HEADER_LEN => return self.end(start, DamageReason::TruncatedRecord),
            Ok(_) => {}
        }
        let raw_len = le_u32(&frame[..4]);
        let crc = le_u32(&frame[4..]);
        let len = raw_len as usize;
        if len == 0 || len > MAX_RECORD_BYTES {
            return self.end(start, DamageReason::ImpossibleLength(raw_len));
        }
        // Checked against the bytes left before allocating, so a damaged length never
        // costs more than the file holds (and never more than MAX_RECORD_BYTES).
        let payload_end = start + FRAME_HEADER_LEN as u64 + u64::from(raw_len);
        if payload_end > self.len {
            return self.end(start, DamageReason::TruncatedRecord);
        }
        self.buf.clear();
        self.buf.resize(len, 0);
        match read_full(&mut self.src, &mut self.buf) {
            Err(e) => return self.end(start, DamageReason::Unreadable(e.kind())),
            Ok(n) if n < len => return self.end(start, DamageReason::TruncatedRecord),
            Ok(_) => {}
        }
        if crc32c::crc32c(&self.buf) != crc {
            return self.end(start, DamageReason::BadChecksum);
        }
        self.offset = payload_end;
        match JournalRecord::decode(self.buf.as_slice()) {
            Ok(record) => Some(Step::Record {
                offset: start,
                record: Box::new(record),
            }),
            // The checksum vouches for the frame's boundaries: skip this record alone.
            Err(e) => Some(Step::Damage {
                offset: start,
                bytes_skipped: payload_end - start,
                reason: DamageReason::Undecodable(e.to_string()),
            }),
        }
    }
}

/// Reads until `buf` is full or the source ends; the count read.
fn read_full(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    u32::from_le_bytes(w)
}

/// The segment being read.
enum Current {
    File(SegmentScan<BufReader<File>>),
    Memory(SegmentScan<io::Cursor<Vec<u8>>>),
}

/// Iterates every record of a journal, oldest segment first, and reports damage as
/// [`Item::Damage`]. Segments are listed when the reader is created; one written later is
/// not read. Memory is bounded: one read buffer and one record at a time.
pub struct Reader {
    pending: VecDeque<PathBuf>,
    current: Option<(Arc<Path>, Current)>,
}

impl Reader {
    /// A reader over the segments now in `dir`.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        let pending = list_segments(dir)?
            .into_iter()
            .map(|(_, path)| path)
            .collect();
        Ok(Self {
            pending,
            current: None,
        })
    }

    /// A reader over one segment given as bytes (tests and fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let len = bytes.len() as u64;
        let scan = SegmentScan::new(io::Cursor::new(bytes), len);
        Self {
            pending: VecDeque::new(),
            current: Some((
                Arc::from(Path::new(IN_MEMORY_SEGMENT)),
                Current::Memory(scan),
            )),
        }
    }

    /// Opens the next listed segment; an item for one that cannot be opened.
    fn open_next(&mut self) -> Option<Result<(), Item>> {
        let path = self.pending.pop_front()?;
        let segment: Arc<Path> = Arc::from(path.as_path());
        let opened = File::open(&path).and_then(|f| f.metadata().map(|m| (f, m.len())));
        Some(match opened {
            Ok((file, len)) => {
                let reader = BufReader::with_capacity(READ_BUFFER_BYTES, file);
                self.current = Some((segment, Current::File(SegmentScan::new(reader, len))));
                Ok(())
            }
            Err(e) => Err(Item::Damage(Damage {
                segment,
                offset: 0,
                bytes_skipped: 0,
                reason: if e.kind() == io::ErrorKind::NotFound {
                    DamageReason::Vanished
                } else {
                    DamageReason::Unreadable(e.kind())
                },
            })),
        })
    }
}

impl Iterator for Reader {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        loop {
            if let Some((segment, current)) = &mut self.current {
                let step = match current {
                    Current::File(scan) => scan.next_step(),
                    Current::Memory(scan) => scan.next_step(),
                };
                match step {
                    Some(Step::Record { offset, record }) => {
                        return Some(Item::Record {
                            segment: segment.clone(),
                            offset,
                            record,
                        })
                    }
                    Some(Step::Damage {
                        offset,
                        bytes_skipped,
                        reason,
                    }) => {
                        return Some(Item::Damage(Damage {
                            segment: segment.clone(),
                            offset,
                            bytes_skipped,
                            reason,
                        }))
                    }
                    None => self.current = None,
                }
            }
            match self.open_next()? {
                Ok(()) => {}
                Err(item) => return Some(item),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::header_bytes;
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn record(seq: u64) -> JournalRecord {
        JournalRecord {
            run_id: "r".into(),
            seq,
            unix_nanos: 1,
            body: None,
        }
    }

    fn items(bytes: Vec<u8>) -> Vec<Item> {
        Reader::from_bytes(bytes).collect()
    }

    fn damage_reasons(items: &[Item]) -> Vec<DamageReason> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Damage(d) => Some(d.reason.clone()),
                Item::Record { .. } => None,
            })
            .collect()
    }

    #[test]
    fn empty_and_short_headers_are_damage() {
        for len in 0..HEADER_LEN {
            let items = items(header_bytes()[..len].to_vec());
            assert_eq!(damage_reasons(&items), [DamageReason::TruncatedHeader]);
        }
        assert!(items(header_bytes().to_vec()).is_empty());
    }

    #[test]
    fn bad_magic_and_version() {
        let mut h = header_bytes();
        h[0] ^= 1;
        assert_eq!(damage_reasons(&items(h.to_vec())), [DamageReason::BadMagic]);
        let mut h = header_bytes();
        h[8] = 2;
        assert_eq!(
            damage_reasons(&items(h.to_vec())),
            [DamageReason::UnsupportedVersion(2)]
        );
    }

    #[test]
    fn records_then_damage_stops_the_segment() {
        let mut bytes = header_bytes().to_vec();
        bytes.extend(frame(&record(1).encode_to_vec()));
        let bad_at = bytes.len() as u64;
        let mut bad = frame(&record(2).encode_to_vec());
        let last = bad.len() - 1;
        bad[last] ^= 0x80;
        bytes.extend(bad);
        bytes.extend(frame(&record(3).encode_to_vec()));
        let total = bytes.len() as u64;
        let items = items(bytes);
        assert_eq!(items.len(), 2);
        assert!(matches!(&items[0], Item::Record { record, offset: 16, .. } if record.seq == 1));
        match &items[1] {
            Item::Damage(d) => {
                assert_eq!(d.reason, DamageReason::BadChecksum);
                assert_eq!(d.offset, bad_at);
                assert_eq!(d.bytes_skipped, total - bad_at);
            }
            other => panic!("expected damage, got {other:?}"),
        }
    }

    #[test]
    fn impossible_lengths_do_not_allocate() {
        for len in [0u32, MAX_RECORD_BYTES as u32 + 1, u32::MAX] {
            let mut bytes = header_bytes().to_vec();
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&[0; 4]);
            assert_eq!(
                damage_reasons(&items(bytes)),
                [DamageReason::ImpossibleLength(len)]
            );
        }
        // Plausible length, but past the end of the segment.
        let mut bytes = header_bytes().to_vec();
        bytes.extend_from_slice(&1000u32.to_le_bytes());
        bytes.extend_from_slice(&[0; 10]);
        assert_eq!(
            damage_reasons(&items(bytes)),
            [DamageReason::TruncatedRecord]
        );
    }

    #[test]
    fn undecodable_record_is_skipped_alone() {
        let mut bytes = header_bytes().to_vec();
        // Field 1, wire type 7: invalid, but framed and checksummed correctly.
        bytes.extend(frame(&[0x0f]));
        bytes.extend(frame(&record(5).encode_to_vec()));
        let items = items(bytes);
        assert_eq!(items.len(), 2);
        assert!(
            matches!(&items[0], Item::Damage(d) if matches!(d.reason, DamageReason::Undecodable(_)) && d.bytes_skipped == 9)
        );
        assert!(matches!(&items[1], Item::Record { record, .. } if record.seq == 5));
    }

    #[test]
    fn zero_filled_tail_is_damage_not_records() {
        let mut bytes = header_bytes().to_vec();
        bytes.extend(frame(&record(1).encode_to_vec()));
        bytes.extend([0u8; 4096]);
        let items = items(bytes);
        assert_eq!(items.len(), 2);
        assert_eq!(damage_reasons(&items), [DamageReason::ImpossibleLength(0)]);
    }
}
