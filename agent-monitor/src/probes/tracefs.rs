//! Tracepoint record layouts read from tracefs.
//!
//! The sched tracepoints are not stable ABI: `sched_process_fork` stores its comms inline on
//! older kernels and as `__data_loc` strings on newer ones, which moves `child_pid` (offset
//! 44 on 5.15, 20 on 6.18; both layouts are in the tests below). We read the offsets this
//! kernel uses from `events/<category>/<name>/format` and pass them to the programs.

use std::path::{Path, PathBuf};

/// Where tracefs may be mounted, newest convention first.
pub const TRACEFS_ROOTS: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs events directory, if tracefs is mounted.
pub fn events_dir() -> Option<PathBuf> {
    TRACEFS_ROOTS
        .iter()
        .map(|root| Path::new(root).join("events"))
        .find(|p| p.join("sched").is_dir())
}

/// Offset of `field` in a tracepoint format description, or `None` if it has no such field.
///
/// Format lines look like
/// `\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;`
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        // The name is the last word of the declaration, without any array suffix.
        let name = decl.split_whitespace().last()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        let offset = rest.trim().strip_prefix("offset:")?;
        offset.split(';').next()?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // sched_process_fork as printed by Linux 6.18.
    const FORK_618: &str = "name: sched_process_fork
ID: 311
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;
";

    // The same tracepoint as printed by Linux 5.15 (inline comms).
    const FORK_515: &str = "format:
\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:1;
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:1;
\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;
";

    #[test]
    fn finds_offsets_in_both_layouts() {
        assert_eq!(field_offset(FORK_618, "child_pid"), Some(20));
        assert_eq!(field_offset(FORK_515, "child_pid"), Some(44));
        assert_eq!(field_offset(FORK_515, "child_comm"), Some(28));
        assert_eq!(field_offset(FORK_618, "group_dead"), None);
        assert_eq!(field_offset("garbage\nfield:int", "int"), None);
    }
}
