//! Ring-buffer bytes to typed kernel records.
//!
//! Records come from our own programs, but they are still input from outside the process:
//! every length and tag is checked, and a bad record is an error, not a panic.

use agent_monitor_common::{
    ConnectEvent, EventHeader, EventKind, OpenEvent, ProcEvent, DPATH_CAP, OPEN_FIXED, PATH_CAP,
};

/// A record as the kernel wrote it, checked for size and kind.
#[derive(Clone, Copy)]
#[expect(
    clippy::large_enum_variant,
    reason = "a record is decoded once and moved a few times on the consumer's stack; boxing every open would allocate per event"
)]
pub enum RawEvent {
    Open(OpenEvent),
    Connect(ConnectEvent),
    Proc(ProcEvent),
}

/// A ring-buffer record that is not one of ours.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the record header.
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    /// The kind tag is not known.
    #[error("record kind {0} is unknown")]
    UnknownKind(u16),
    /// The size does not match the kind.
    #[error("{kind:?} record of {got} bytes, expected {expected}")]
    Size {
        kind: EventKind,
        got: usize,
        expected: usize,
    },
    /// An open record's string lengths exceed their capacity or disagree with its size.
    #[error(
        "open record of {got} bytes with a {path_len}-byte path and {dpath_len} bytes of names"
    )]
    OpenStrings {
        got: usize,
        path_len: u16,
        dpath_len: u16,
    },
}

/// Reads a `T` from the start of `bytes` if it is exactly `size_of::<T>()` long.
fn read_exact<T: Copy>(bytes: &[u8], kind: EventKind) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() != expected {
        return Err(DecodeError::Size {
            kind,
            got: bytes.len(),
            expected,
        });
    }
    // SAFETY: the length was checked; T is a repr(C) plain-old-data type from
    // agent-monitor-common for which every bit pattern is valid; read_unaligned because
    // the slice carries no alignment guarantee.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Reads an open record in its ring form (see [`OPEN_FIXED`]) into the full struct, the
/// unused string bytes zero.
fn read_open(bytes: &[u8]) -> Result<OpenEvent, DecodeError> {
    let Some(fixed) = bytes.get(..OPEN_FIXED) else {
        return Err(DecodeError::Size {
            kind: EventKind::Open,
            got: bytes.len(),
            expected: OPEN_FIXED,
        });
    };
    // SAFETY: OpenEvent is a repr(C) plain-old-data type from agent-monitor-common for
    // which every bit pattern, all zeros included, is valid.
    let mut ev: OpenEvent = unsafe { std::mem::zeroed() };
    // SAFETY: `fixed` is exactly the OPEN_FIXED bytes that precede `path` in the struct
    // (an offset the common crate computes), written over the zeroed value.
    unsafe {
        std::ptr::copy_nonoverlapping(
            fixed.as_ptr(),
            std::ptr::from_mut(&mut ev).cast::<u8>(),
            OPEN_FIXED,
        );
    }
    let (path_len, dpath_len) = (usize::from(ev.path_len), usize::from(ev.dpath_len));
    let strings = &bytes[OPEN_FIXED..];
    if path_len >= PATH_CAP || dpath_len > DPATH_CAP || strings.len() != path_len + dpath_len {
        return Err(DecodeError::OpenStrings {
            got: bytes.len(),
            path_len: ev.path_len,
            dpath_len: ev.dpath_len,
        });
    }
    let (path, dpath) = strings.split_at(path_len);
    ev.path[..path_len].copy_from_slice(path);
    ev.dpath[..dpath_len].copy_from_slice(dpath);
    Ok(ev)
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<RawEvent, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    let tag = u16::from_ne_bytes([bytes[0], bytes[1]]);
    let kind = EventKind::from_u16(tag).ok_or(DecodeError::UnknownKind(tag))?;
    Ok(match kind {
        EventKind::Open => RawEvent::Open(read_open(bytes)?),
        EventKind::Connect => RawEvent::Connect(read_exact(bytes, kind)?),
        EventKind::Exec | EventKind::Fork | EventKind::Exit => {
            RawEvent::Proc(read_exact(bytes, kind)?)
        }
    })
}

/// The bytes of a NUL-padded C string buffer up to `len` (clamped) as text.
pub fn c_string(buf: &[u8], len: usize) -> String {
    let bytes = &buf[..len.min(buf.len())];
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u16) -> Vec<u8> {
        let mut v = vec![0u8; size_of::<EventHeader>()];
        v[..2].copy_from_slice(&kind.to_ne_bytes());
        v
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(decode(&[1, 2, 3]).err(), Some(DecodeError::Short(3)));
        assert_eq!(
            decode(&header(99)).err(),
            Some(DecodeError::UnknownKind(99))
        );
        let err = decode(&header(EventKind::Open as u16)).err();
        assert!(
            matches!(err, Some(DecodeError::Size { got: 64, .. })),
            "{err:?}"
        );
        let err = decode(&header(EventKind::Connect as u16)).err();
        assert!(
            matches!(err, Some(DecodeError::Size { got: 64, .. })),
            "{err:?}"
        );
    }

    /// An open record in its ring form: the fixed part, then the path, then the names.
    fn open_record(path: &[u8], dpath: &[u8]) -> Vec<u8> {
        // SAFETY: plain-old-data, valid all zeros.
        let mut ev: OpenEvent = unsafe { std::mem::zeroed() };
        ev.header.kind = EventKind::Open as u16;
        ev.ino = 42;
        ev.path_len = u16::try_from(path.len()).expect("short");
        ev.dpath_len = u16::try_from(dpath.len()).expect("short");
        // SAFETY: reading the struct's own bytes.
        let all = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&ev).cast::<u8>(), size_of::<OpenEvent>())
        };
        let mut v = all[..OPEN_FIXED].to_vec();
        v.extend_from_slice(path);
        v.extend_from_slice(dpath);
        v
    }

    #[test]
    fn decodes_an_open_of_only_the_bytes_in_use() {
        let bytes = open_record(b"/etc/token", b"token\0etc\0");
        assert_eq!(bytes.len(), OPEN_FIXED + 10 + 10);
        let Ok(RawEvent::Open(ev)) = decode(&bytes) else {
            panic!("not an open");
        };
        assert_eq!(ev.header.kind, EventKind::Open as u16);
        assert_eq!(ev.ino, 42);
        assert_eq!(c_string(&ev.path, usize::from(ev.path_len)), "/etc/token");
        assert_eq!(
            &ev.path[10..12],
            &[0, 0],
            "the path ends where its length says"
        );
        assert_eq!(&ev.dpath[..usize::from(ev.dpath_len)], b"token\0etc\0");
        // Nothing but the fixed part: an open without path or names (open_by_handle_at).
        let Ok(RawEvent::Open(ev)) = decode(&open_record(b"", b"")) else {
            panic!("not an open");
        };
        assert_eq!((ev.path_len, ev.dpath_len), (0, 0));
    }

    #[test]
    fn rejects_opens_whose_lengths_disagree_with_their_size() {
        let mut bytes = open_record(b"/etc/token", b"token\0");
        bytes.push(0);
        assert_eq!(
            decode(&bytes).err(),
            Some(DecodeError::OpenStrings {
                got: OPEN_FIXED + 17,
                path_len: 10,
                dpath_len: 6
            })
        );
        bytes.truncate(OPEN_FIXED + 15);
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::OpenStrings { got, .. }) if got == OPEN_FIXED + 15
        ));
        // Lengths past the capacity are refused even when the bytes are there.
        let long = vec![b'a'; PATH_CAP];
        assert!(matches!(
            decode(&open_record(&long, b"")),
            Err(DecodeError::OpenStrings { path_len, .. }) if usize::from(path_len) == PATH_CAP
        ));
    }

    #[test]
    fn c_strings_stop_at_nul_and_length() {
        assert_eq!(c_string(b"cat\0\0\0", 6), "cat");
        assert_eq!(c_string(b"/etc/x", 4), "/etc");
        assert_eq!(c_string(b"abc", 99), "abc");
    }
}
