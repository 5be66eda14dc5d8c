//! Kernel/user ABI of agent-monitor.
//!
//! Every type here crosses the boundary between the eBPF programs and the daemon, either as
//! a ring-buffer record or as a map key or value. They are `#[repr(C)]`, `Copy`, and their
//! sizes are pinned with compile-time assertions so that a layout change breaks the build
//! instead of silently corrupting decoding.
#![no_std]

use core::mem::size_of;

/// Longest path captured, in bytes including the terminating NUL. The watched-prefix map is
/// a BPF LPM trie, whose key data may not exceed 256 bytes (`LPM_DATA_SIZE_MAX`,
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/lpm_trie.c>), so a longer capture
/// could not be matched anyway; longer paths are emitted truncated and flagged.
pub const PATH_CAP: usize = 256;
/// Longest watched basename, including the terminating NUL.
pub const BASENAME_CAP: usize = 64;
/// `TASK_COMM_LEN` in the kernel.
pub const COMM_LEN: usize = 16;
/// Deepest cgroup level checked by the cgroup filter (a kubelet container scope sits at
/// level 4 or 5 under the systemd driver).
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// Number of lanes, each with its own ring buffer and drop counter.
pub const LANE_COUNT: u32 = 3;

/// `AT_FDCWD` from `include/uapi/linux/fcntl.h`.
pub const AT_FDCWD: i32 = -100;

/// Ring buffer and drop-counter index of each lane.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Credential = 0,
    Network = 1,
    Process = 2,
}

/// What a record is. Stored in [`EventHeader::kind`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Open = 1,
    Connect = 2,
    Exec = 3,
    Fork = 4,
    Exit = 5,
}

impl EventKind {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Open,
            2 => Self::Connect,
            3 => Self::Exec,
            4 => Self::Fork,
            5 => Self::Exit,
            _ => return None,
        })
    }
}

/// Which syscall produced an open or network record. Stored in `syscall` fields.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syscall {
    Open = 1,
    Openat = 2,
    Openat2 = 3,
    Connect = 4,
    Sendto = 5,
    Sendmsg = 6,
}

impl Syscall {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Open,
            2 => Self::Openat,
            3 => Self::Openat2,
            4 => Self::Connect,
            5 => Self::Sendto,
            6 => Self::Sendmsg,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Openat => "openat",
            Self::Openat2 => "openat2",
            Self::Connect => "connect",
            Self::Sendto => "sendto",
            Self::Sendmsg => "sendmsg",
        }
    }
}

/// Common to every record: who did it and when.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An [`EventKind`].
    pub kind: u16,
    pub _pad: [u8; 6],
    /// `bpf_ktime_get_boot_ns()` when the syscall entered (CLOCK_BOOTTIME).
    pub ts_ns: u64,
    /// Thread id.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Inode number of the task's cgroup2 directory.
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<EventHeader>() == 56);

/// Key of the watched-prefix LPM trie and scratch space for the path being matched. Same
/// layout as `aya::maps::lpm_trie::Key<[u8; PATH_CAP]>`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PathKey {
    /// Number of significant bits of `data`.
    pub prefix_len: u32,
    pub data: [u8; PATH_CAP],
}
const _: () = assert!(size_of::<PathKey>() == 260);

/// Bits of [`OpenArgs::path_flags`].
pub mod path_flags {
    /// The path did not start with `/`: relative to the cwd or to `dirfd`.
    pub const RELATIVE: u16 = 1;
    /// The path was longer than [`crate::PATH_CAP`] - 1 bytes and was cut.
    pub const TRUNCATED: u16 = 2;
    /// Matched as `/proc/<pid>/environ` rather than by prefix or basename.
    pub const PROC_ENVIRON: u16 = 4;
}

/// What an open syscall asked for, captured at entry. Stashed per thread until the syscall
/// exits, then copied into an [`OpenEvent`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OpenArgs {
    pub path: PathKey,
    /// Bytes of `path.data` before the NUL.
    pub path_len: u16,
    /// A [`Syscall`].
    pub syscall: u16,
    pub flags: u32,
    pub mode: u32,
    pub dirfd: i32,
    /// [`path_flags`] bits.
    pub path_flags: u16,
    pub _pad: u16,
    pub ts_ns: u64,
}
const _: () = assert!(size_of::<OpenArgs>() == 288);

/// An open of a watched path (credential lane).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OpenEvent {
    pub header: EventHeader,
    /// The syscall's return value: a file descriptor, or `-errno`.
    pub ret: i64,
    pub args: OpenArgs,
}
const _: () = assert!(size_of::<OpenEvent>() == 352);

/// Destination of a connect or of a send with an explicit address, captured at entry.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnectArgs {
    pub ts_ns: u64,
    /// IPv4 in the first four bytes, or IPv6; network byte order.
    pub addr: [u8; 16],
    pub fd: i32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Destination port, host byte order.
    pub port: u16,
    /// A [`Syscall`].
    pub syscall: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<ConnectArgs>() == 40);

/// An outbound connection attempt or addressed datagram (network lane).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnectEvent {
    pub header: EventHeader,
    /// 0, `-EINPROGRESS` (attempted), another `-errno`, or bytes sent.
    pub ret: i64,
    pub args: ConnectArgs,
}
const _: () = assert!(size_of::<ConnectEvent>() == 104);

/// Exec, fork or exit (process lane). Which fields mean something depends on the kind.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcEvent {
    pub header: EventHeader,
    /// Fork: the new task's id. Exec: the pid before exec (`old_pid`). Exit: unused.
    pub child_pid: u32,
    /// Exit: [`GROUP_DEAD`], [`GROUP_ALIVE`] or [`GROUP_UNKNOWN`].
    pub group_dead: u8,
    pub _pad: u8,
    /// Exec: bytes of `filename` before the NUL.
    pub filename_len: u16,
    /// Exec: the path passed to execve.
    pub filename: [u8; PATH_CAP],
}
const _: () = assert!(size_of::<ProcEvent>() == 320);

/// [`ProcEvent::group_dead`]: the last thread of the process exited.
pub const GROUP_DEAD: u8 = 1;
/// [`ProcEvent::group_dead`]: a thread exited, the process lives on.
pub const GROUP_ALIVE: u8 = 0;
/// [`ProcEvent::group_dead`]: the kernel's tracepoint has no `group_dead` field.
pub const GROUP_UNKNOWN: u8 = 2;

/// Marker for "this tracepoint field does not exist on this kernel" in offset globals.
pub const NO_FIELD: u32 = u32::MAX;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data: repr(C), Copy, every bit pattern valid.
    unsafe impl aya::Pod for PathKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OpenArgs {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnectArgs {}
}
