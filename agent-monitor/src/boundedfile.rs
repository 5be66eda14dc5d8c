//! Bounded reads of the files the daemon is handed: the config, the policy files and the
//! pods file.
//!
//! Policy and pods files are read again by reloaders while the daemon runs, and whoever can
//! write where they point can replace them with anything. Each must then cost a clear
//! error, not a thread stuck for good, all the memory or minutes of CPU:
//!
//! - Only regular files are read. Symlinks are followed, since a ConfigMap volume is a
//!   tree of them (`policy.yaml -> ..data/policy.yaml`, `..data -> ..2024_01_01_...`);
//!   what must be a regular file is the final target, checked before the open (opening a
//!   device can have effects of its own) and again with fstat on what was opened (the path
//!   may have been swapped in between).
//! - The open is non-blocking, so a FIFO swapped in between the check and the open does
//!   not wait for a writer.
//! - Size is capped: checked from fstat before reading, and while reading (a file still
//!   being appended to, or one whose size is not known, like `/proc` files), so that at
//!   most one byte past the cap is ever read.
//! - Nesting is capped ([`MAX_NESTING`]): for YAML by the parser's own budget
//!   ([`crate::yaml`]), which stops at the first collection past the cap; for JSON by
//!   [`check_json_nesting`] before the text is handed to serde_json.

use std::{
    fmt,
    fs::{Metadata, OpenOptions},
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::Path,
};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// Deepest nesting of sequences and mappings accepted in a YAML or JSON file. Policies and
/// configs need under 10 levels and a `kubectl get pods -o json` list about 20 (a List,
/// a Pod, its affinity terms, their label selectors' expressions); anything near 64 is
/// not a real input. It is below serde_json's own limit (128), so every file deeper than
/// real inputs gets this cap's message, with the position.
pub const MAX_NESTING: usize = 64;

/// A file could not be read within the bounds.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be found, opened or read.
    #[error("cannot read: {0}")]
    Io(#[source] std::io::Error),
    /// The path, symlinks followed, is something other than a regular file.
    #[error("not a regular file ({kind})")]
    NotRegular {
        /// What it is: `a FIFO`, `a character device`, `a directory`...
        kind: &'static str,
    },
    /// The file holds more bytes than the cap.
    #[error("larger than {}{}", Size(*limit), size.map_or_else(String::new, |s| format!(": {s} bytes")))]
    TooLarge {
        /// The cap, in bytes.
        limit: u64,
        /// The file's size, when known before reading (not for a file that grew while
        /// being read, or a `/proc` file).
        size: Option<u64>,
    },
    /// The file is not UTF-8 text.
    #[error("not UTF-8 text: {0}")]
    NotUtf8(#[source] std::str::Utf8Error),
}

/// A document nests sequences and mappings deeper than the cap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("nested deeper than {limit} levels at line {line} column {column}")]
pub struct TooDeep {
    /// The cap.
    pub limit: usize,
    /// Where the first collection beyond the cap starts, counting from 1.
    pub line: usize,
    /// Its column, counting from 1.
    pub column: usize,
}

/// A byte count for messages: in MiB or KiB when it is a whole number of them.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= MIB && n.is_multiple_of(MIB) {
            write!(f, "{} MiB", n / MIB)
        } else if n >= 1024 && n.is_multiple_of(1024) {
            write!(f, "{} KiB", n / 1024)
        } else {
            write!(f, "{n} bytes")
        }
    }
}

/// What a file is, for messages; `None` for a regular file.
fn not_regular(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    }
}

fn check_regular(meta: &Metadata) -> Result<(), ReadError> {
    match not_regular(meta) {
        Some(kind) => Err(ReadError::NotRegular { kind }),
        None => Ok(()),
    }
}

/// Reads the regular file at `path` (symlinks followed), at most `limit` bytes. Never
/// blocks on a FIFO and never reads more than `limit + 1` bytes.
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    // Refuse what is not a regular file before opening it: opening a device can do things
    // of its own (a terminal, a tape that rewinds).
    check_regular(&std::fs::metadata(path).map_err(ReadError::Io)?)?;
    // O_NONBLOCK: should a FIFO have been swapped in since, the open returns at once
    // instead of waiting for a writer; reads of a regular file ignore the flag.
    // O_NOCTTY: nor does a terminal swapped in become the daemon's.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(ReadError::Io)?;
    // What counts is what was opened.
    let meta = file.metadata().map_err(ReadError::Io)?;
    check_regular(&meta)?;
    if meta.len() > limit {
        return Err(ReadError::TooLarge {
            limit,
            size: Some(meta.len()),
        });
    }
    // The size is a hint only (a file being appended to; `/proc` files say 0): one byte
    // past the cap is enough to know it is too large.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge { limit, size: None });
    }
    Ok(bytes)
}

/// [`read`], as UTF-8 text.
pub fn read_to_string(path: &Path, limit: u64) -> Result<String, ReadError> {
    String::from_utf8(read(path, limit)?).map_err(|e| ReadError::NotUtf8(e.utf8_error()))
}

/// Checks that the JSON `bytes` do not nest arrays and objects deeper than `limit`. A
/// single pass that skips strings; malformed JSON is left to the parser that follows
/// (whose own recursion limit still holds).
pub fn check_json_nesting(bytes: &[u8], limit: usize) -> Result<(), TooDeep> {
    let mut depth = 0usize;
    let (mut line, mut line_start) = (1usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Err(TooDeep {
                        limit,
                        line,
                        column: i - line_start + 1,
                    });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'\n' => {
                line += 1;
                line_start = i + 1;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, os::unix::fs::symlink};

    use super::*;

    #[test]
    fn regular_files_are_read_through_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A ConfigMap volume: the key is a symlink to `..data/key`, `..data` a symlink to
        // the timestamped directory.
        let stamped = dir.path().join("..2024_01_01_00_00_00.1");
        std::fs::create_dir(&stamped).expect("mkdir");
        std::fs::write(stamped.join("p.yaml"), "a: 1\n").expect("write");
        symlink("..2024_01_01_00_00_00.1", dir.path().join("..data")).expect("..data");
        symlink("..data/p.yaml", dir.path().join("p.yaml")).expect("key");
        assert_eq!(
            read_to_string(&dir.path().join("p.yaml"), MIB).expect("read"),
            "a: 1\n"
        );
    }

    #[test]
    fn what_is_not_a_regular_file_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let link = dir.path().join("zero");
        symlink("/dev/zero", &link).expect("symlink");
        for (path, kind) in [
            (fifo.as_path(), "a FIFO"),
            (Path::new("/dev/zero"), "a character device"),
            (link.as_path(), "a character device"),
            (dir.path(), "a directory"),
        ] {
            let err = read(path, MIB).expect_err("not regular");
            assert!(
                matches!(err, ReadError::NotRegular { kind: k } if k == kind),
                "{}: {err}",
                path.display()
            );
            assert_eq!(err.to_string(), format!("not a regular file ({kind})"));
        }
        let err = read(&dir.path().join("missing"), MIB).expect_err("missing");
        assert!(err.to_string().starts_with("cannot read: "), "{err}");
    }

    #[test]
    fn size_is_capped_before_and_while_reading() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big");
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(&[b'x'; 2048]).expect("write");
        assert_eq!(read(&path, 2048).expect("at the cap").len(), 2048);
        let err = read(&path, 1024).expect_err("over the cap");
        assert!(
            matches!(
                err,
                ReadError::TooLarge {
                    limit: 1024,
                    size: Some(2048)
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "larger than 1 KiB: 2048 bytes");
        // A regular file whose size is not known in advance: /proc files report 0.
        let maps = Path::new("/proc/self/maps");
        assert_eq!(std::fs::metadata(maps).expect("stat").len(), 0);
        let err = read(maps, 16).expect_err("more than 16 bytes");
        assert!(
            matches!(
                err,
                ReadError::TooLarge {
                    limit: 16,
                    size: None
                }
            ),
            "{err:?}"
        );
        assert_eq!(Size(MIB).to_string(), "1 MiB");
        assert_eq!(Size(64 * MIB).to_string(), "64 MiB");
        assert_eq!(Size(1000).to_string(), "1000 bytes");
        std::fs::write(&path, [0xff, 0xfe]).expect("write");
        let err = read_to_string(&path, MIB).expect_err("not text");
        assert!(err.to_string().starts_with("not UTF-8 text"), "{err}");
    }

    #[test]
    fn json_nesting_skips_strings() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(check_json_nesting(deep(64).as_bytes(), 64), Ok(()));
        assert_eq!(
            check_json_nesting(deep(65).as_bytes(), 64),
            Err(TooDeep {
                limit: 64,
                line: 1,
                column: 65
            })
        );
        let text = br#"{"a": "[[[[\"[[[[", "b": [
  {"c": "\\"}, [[1]]]}"#;
        assert_eq!(check_json_nesting(text, 4), Ok(()));
        assert_eq!(
            check_json_nesting(text, 3),
            Err(TooDeep {
                limit: 3,
                line: 2,
                column: 17
            })
        );
    }
}
