//! The forensic journal's storage core: an append-only, checksummed, size- and
//! age-bounded log of [`JournalRecord`]s on local disk.
//!
//! # On-disk format
//!
//! A journal is a directory (mode 0700) of segment files (mode 0600) named
//! `<index>.amj`, where `<index>` is a 20-digit zero-padded decimal counter that grows by
//! one per segment across runs, so names sort in write order whatever the wall clock or
//! the per-run event sequence did. Other files in the directory are ignored.
//!
//! Each segment is:
//!
//! ```text
//! header:  [8 bytes magic "AMJOURNL"][u32 LE format version = 1][u32 LE reserved = 0]
//! record:  [u32 LE len][u32 LE crc32c(payload)][payload: len bytes, a JournalRecord]
//! record:  ...
//! ```
//!
//! `len` is between 1 and [`MAX_RECORD_BYTES`]; anything else is corruption. A zero length
//! is refused because zero-filled blocks (what some filesystems leave after a crash) would
//! otherwise read as an endless run of valid empty records (the CRC-32C of nothing is 0).
//!
//! # Damage
//!
//! Within a segment, the reader stops at the first frame it cannot trust (impossible
//! length, bad checksum, truncated) and goes on with the next segment: it does not scan for
//! the next plausible frame, because event payloads hold strings the watched workloads
//! choose (paths, command names) and a forged frame inside one would read as a real record.
//! A frame whose checksum matches but whose payload does not decode is skipped alone: its
//! boundaries are trustworthy.

mod reader;
mod writer;

use std::io;
use std::path::{Path, PathBuf};

pub use crate::pb::{journal_record, JournalRecord, RunMarker};
pub use reader::{Damage, DamageReason, Item, Reader};
pub use writer::{Options, Recovery, TailState, Writer, WriterStats};

/// First bytes of every segment.
pub const MAGIC: [u8; 8] = *b"AMJOURNL";

/// The segment format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Size of the segment header: magic, version, reserved word.
pub const HEADER_LEN: usize = MAGIC.len() + 4 + 4;

/// Size of a record's frame header: length and checksum.
pub const FRAME_HEADER_LEN: usize = 4 + 4;

/// Largest record payload. The biggest real record is an anomaly with its fields and
/// labels, a few tens of KiB; a length above this is corruption, and it bounds what a
/// reader allocates.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// Extension of segment files.
pub const SEGMENT_EXTENSION: &str = "amj";

/// Digits in a segment's index: enough for any u64, zero-padded so names sort.
const SEGMENT_INDEX_DIGITS: usize = 20;

/// Errors of the journal's write path and of listing a journal directory.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The record encodes to more than [`MAX_RECORD_BYTES`]; it was not written.
    #[error("record of {len} bytes exceeds the journal's limit of {MAX_RECORD_BYTES}")]
    RecordTooLarge {
        /// Encoded size.
        len: usize,
    },
    /// The record encodes to nothing (every field default); it was not written, as a
    /// zero length marks corruption in the format.
    #[error("record is empty")]
    EmptyRecord,
    /// The options cannot work.
    #[error("invalid journal options: {0}")]
    InvalidOptions(&'static str),
    /// Segment indexes are exhausted (u64::MAX segments were created).
    #[error("segment index overflow")]
    IndexOverflow,
}

impl JournalError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The segment header this code writes.
fn header_bytes() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..MAGIC.len()].copy_from_slice(&MAGIC);
    h[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

/// File name of segment `index`.
fn segment_name(index: u64) -> String {
    format!(
        "{index:0width$}.{SEGMENT_EXTENSION}",
        width = SEGMENT_INDEX_DIGITS
    )
}

/// The index of a segment file name, or None for any other file.
fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(SEGMENT_EXTENSION)?.strip_suffix('.')?;
    if stem.len() != SEGMENT_INDEX_DIGITS || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// The segments of `dir`, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let entries = std::fs::read_dir(dir).map_err(|e| JournalError::io("listing", dir, e))?;
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("listing", dir, e))?;
        let name = entry.file_name();
        if let Some(index) = name.to_str().and_then(parse_segment_name) {
            segments.push((index, entry.path()));
        }
    }
    segments.sort_unstable_by_key(|(index, _)| *index);
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_sort_and_parse_back() {
        let names: Vec<String> = [0u64, 9, 10, 1_000, u64::MAX]
            .iter()
            .map(|i| segment_name(*i))
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        for (i, name) in [0u64, 9, 10, 1_000, u64::MAX].iter().zip(&names) {
            assert_eq!(parse_segment_name(name), Some(*i));
        }
    }

    #[test]
    fn other_names_are_not_segments() {
        for name in [
            "1.amj",
            "0000000000000000000a.amj",
            "00000000000000000001.amj.tmp",
            "00000000000000000001.txt",
            "99999999999999999999.amj", // above u64::MAX
            "",
        ] {
            assert_eq!(parse_segment_name(name), None, "{name}");
        }
    }

    #[test]
    fn header_layout() {
        let h = header_bytes();
        assert_eq!(&h[..8], b"AMJOURNL");
        assert_eq!(&h[8..12], &1u32.to_le_bytes());
        assert_eq!(&h[12..], &[0, 0, 0, 0]);
    }
}
