//! Ring-buffer bytes to typed kernel records.
//!
//! Records come from our own programs, but they are still input from outside the process:
//! every length and tag is checked, and a bad record is an error, not a panic.

use agent_monitor_common::{ConnectEvent, EventHeader, EventKind, OpenEvent, ProcEvent};

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

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<RawEvent, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    let tag = u16::from_ne_bytes([bytes[0], bytes[1]]);
    let kind = EventKind::from_u16(tag).ok_or(DecodeError::UnknownKind(tag))?;
    Ok(match kind {
        EventKind::Open => RawEvent::Open(read_exact(bytes, kind)?),
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
    }

    #[test]
    fn decodes_an_open() {
        let mut bytes = vec![0u8; size_of::<OpenEvent>()];
        bytes[..2].copy_from_slice(&(EventKind::Open as u16).to_ne_bytes());
        match decode(&bytes) {
            Ok(RawEvent::Open(ev)) => assert_eq!(ev.header.kind, EventKind::Open as u16),
            _ => panic!("not an open"),
        }
    }

    #[test]
    fn c_strings_stop_at_nul_and_length() {
        assert_eq!(c_string(b"cat\0\0\0", 6), "cat");
        assert_eq!(c_string(b"/etc/x", 4), "/etc");
        assert_eq!(c_string(b"abc", 99), "abc");
    }
}
