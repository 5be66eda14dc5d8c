//! Names of the errno values open and connect return.

use nix::errno::Errno;

/// The symbolic name of `errno` (positive), such as `ENOENT`, or `E<n>` for a value this
/// platform does not define.
pub fn name(errno: i64) -> String {
    match i32::try_from(errno).map(Errno::from_raw) {
        // Errno's Debug is the constant's name.
        Ok(e) if e != Errno::UnknownErrno => format!("{e:?}"),
        _ => format!("E{errno}"),
    }
}

/// `Some(name)` when a syscall result is `-errno`.
pub fn of_result(result: i64) -> Option<String> {
    (result < 0).then(|| name(-result))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(of_result(-2).as_deref(), Some("ENOENT"));
        assert_eq!(of_result(-115).as_deref(), Some("EINPROGRESS"));
        assert_eq!(
            of_result(-i64::from(libc::EACCES)).as_deref(),
            Some("EACCES")
        );
        assert_eq!(
            of_result(-i64::from(libc::ECONNREFUSED)).as_deref(),
            Some("ECONNREFUSED")
        );
        assert_eq!(of_result(3), None);
        assert_eq!(name(4095), "E4095");
        assert_eq!(name(1 << 40), format!("E{}", 1u64 << 40));
    }
}
