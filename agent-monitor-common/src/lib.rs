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
/// Capacity of the kernel's watched-device map: pods' Secret and projected volumes on this
/// node (a node runs at most a few hundred pods, each with a handful of volumes) and the
/// few filesystems that hold inventory entries.
pub const MAX_WATCHED_FS: u32 = 16 * 1024;
/// Capacity of the kernel's node credential inventory (files).
pub const MAX_INVENTORY: u32 = 64 * 1024;
/// Capacity of the kernel's watched-prefix trie.
pub const MAX_WATCHED_PREFIXES: u32 = 4096;
/// Capacity of the kernel's watched-basename map (`watch.basenames`).
pub const MAX_WATCHED_BASENAMES: u32 = 1024;
/// Capacity of the kernel's monitored-cgroup map (`cgroups`).
pub const MAX_MONITORED_CGROUPS: u32 = 16 * 1024;
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

/// Which syscall (or kernel path) produced an open or network record. Stored in `syscall`
/// fields.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syscall {
    Open = 1,
    Openat = 2,
    Openat2 = 3,
    Connect = 4,
    Sendto = 5,
    Sendmsg = 6,
    Creat = 7,
    OpenByHandleAt = 8,
    /// `IORING_OP_OPENAT` submitted through io_uring (no open syscall is made).
    IoUringOpenat = 9,
    /// `IORING_OP_OPENAT2` submitted through io_uring.
    IoUringOpenat2 = 10,
    /// A TCP socket entered SYN-SENT: a connect by any path (syscall, io_uring, TCP fast
    /// open), seen once.
    TcpConnect = 11,
    /// Data left on an inet socket of a process that read a credential.
    Send = 12,
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
            7 => Self::Creat,
            8 => Self::OpenByHandleAt,
            9 => Self::IoUringOpenat,
            10 => Self::IoUringOpenat2,
            11 => Self::TcpConnect,
            12 => Self::Send,
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
            Self::Creat => "creat",
            Self::OpenByHandleAt => "open_by_handle_at",
            Self::IoUringOpenat => "io_uring_openat",
            Self::IoUringOpenat2 => "io_uring_openat2",
            Self::TcpConnect => "tcp_connect",
            Self::Send => "send",
        }
    }
}

/// Why an open was reported. Stored in [`OpenEvent::matched`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchKind {
    /// The file lives on a watched filesystem (a pod's Secret or projected volume).
    Volume = 1,
    /// The file's (device, inode) is in the node credential inventory.
    Inode = 2,
    /// The path as passed starts with a watched prefix (failed opens).
    Prefix = 4,
    /// The relative path as passed ends in a watched basename (failed opens).
    Basename = 5,
    /// `/proc/<pid>/environ`, by its procfs file or by its path.
    ProcEnviron = 6,
}

impl MatchKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Volume,
            2 => Self::Inode,
            4 => Self::Prefix,
            5 => Self::Basename,
            6 => Self::ProcEnviron,
            _ => return None,
        })
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
    /// `start_boottime` of the task's thread-group leader (CLOCK_BOOTTIME ns): with the
    /// tgid, it names the process across pid reuse. 0 when the kernel lacks the fields.
    pub start_ns: u64,
}
const _: () = assert!(size_of::<EventHeader>() == 64);

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

/// Bits of [`OpenEvent::path_flags`].
pub mod path_flags {
    /// The path did not start with `/`: relative to the cwd or to `dirfd`.
    pub const RELATIVE: u16 = 1;
    /// The path was longer than [`crate::PATH_CAP`] - 1 bytes and was cut.
    pub const TRUNCATED: u16 = 2;
    /// The dentry chain was deeper or longer than [`crate::DPATH_CAP`] allows and is cut.
    pub const DPATH_TRUNCATED: u16 = 8;
    /// The path as passed could not be read (io_uring without it, `open_by_handle_at`).
    pub const NO_PATH: u16 = 16;
}

/// Bytes of [`OpenEvent::dpath`]: the opened file's dentry names up to its filesystem's
/// root. Each name is read at an offset below `DPATH_CAP / 2` (a mask the verifier can
/// follow) and is at most [`NAME_CAP`] long, so it always fits.
pub const DPATH_CAP: usize = 512;
/// Longest dentry name read (`NAME_MAX` + NUL).
pub const NAME_CAP: usize = 256;
/// Deepest dentry chain walked from a file to its filesystem's root.
pub const MAX_DENTRY_DEPTH: u32 = 24;

/// An open of a watched file (credential lane). The kernel resolved the returned
/// descriptor to its file: `dev`/`ino` identify it whatever name it was opened by.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OpenEvent {
    pub header: EventHeader,
    /// The syscall's return value: a file descriptor, or `-errno`.
    pub ret: i64,
    /// Inode number of the opened file (0 when the open failed).
    pub ino: u64,
    /// `super_block.s_dev` of the opened file, kernel encoding `(major << 20) | minor`.
    pub dev: u32,
    /// A [`Syscall`].
    pub syscall: u16,
    /// [`path_flags`] bits.
    pub path_flags: u16,
    pub flags: u32,
    pub mode: u32,
    pub dirfd: i32,
    /// A [`MatchKind`].
    pub matched: u8,
    /// Names in `dpath`.
    pub depth: u8,
    /// Bytes of `path` before the NUL.
    pub path_len: u16,
    /// Bytes of `dpath` used.
    pub dpath_len: u16,
    pub _pad: [u8; 6],
    /// The path exactly as the process passed it.
    pub path: [u8; PATH_CAP],
    /// The file's dentry names, leaf first, each NUL-terminated, up to (not including) the
    /// root of its filesystem.
    pub dpath: [u8; DPATH_CAP],
}
const _: () = assert!(size_of::<OpenEvent>() == 880);

/// Bytes of an [`OpenEvent`] before its strings. On the ring an open record is only the
/// bytes in use: these fixed bytes, then `path_len` bytes of `path` (no NUL), then
/// `dpath_len` bytes of `dpath`. A typical record is a fifth of the full struct, so the
/// kernel copies less, touches fewer cache lines the consumer reads, and the ring holds
/// five times as many records.
pub const OPEN_FIXED: usize = core::mem::offset_of!(OpenEvent, path);
const _: () = assert!(OPEN_FIXED == 112);
// The kernel writes each dentry name (up to NAME_CAP bytes) at an offset below
// OPEN_FIXED + PATH_CAP + DPATH_CAP / 2 of its record buffer: it must stay inside.
const _: () =
    assert!(OPEN_FIXED + (PATH_CAP - 1) + (DPATH_CAP / 2 - 1) + NAME_CAP <= size_of::<OpenEvent>());

/// Key of the file inventory: a file or directory by identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileKey {
    /// `super_block.s_dev`, kernel encoding.
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
}
const _: () = assert!(size_of::<FileKey>() == 16);

/// Bits of the watched-device map's values: what the kernel checks for a file on that
/// filesystem. A device without an entry is checked for nothing but procfs.
pub mod dev_flags {
    /// Every file of the filesystem is watched (a pod's Secret or projected volume).
    pub const VOLUME: u8 = 1;
    /// Some of its files are in the inventory.
    pub const FILES: u8 = 2;
}

/// Value of the file inventory map's entries.
pub const INVENTORY_FILE: u8 = 1;

/// Offsets into kernel structures, read from the running kernel's BTF at load time (aya
/// has no CO-RE relocations for Rust programs). [`NO_FIELD`] marks a field this kernel
/// lacks; the programs that need it then do nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_inode: u32,
    pub file_dentry: u32,
    pub file_private_data: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub sb_dev: u32,
    pub sb_magic: u32,
    pub dentry_parent: u32,
    pub dentry_name: u32,
    pub dentry_inode: u32,
    pub socket_type: u32,
    pub sk_daddr: u32,
    pub sk_dport: u32,
    pub sk_v6_daddr: u32,
    pub sk_family: u32,
    /// `pt_regs` slots of the first three syscall arguments.
    pub regs_arg: [u32; 3],
    /// `io_kiocb` to `io_open.filename` (the command area holds the `io_open`).
    pub req_open_filename: u32,
    /// `filename.name`.
    pub filename_name: u32,
    /// `task_struct.group_leader`.
    pub task_group_leader: u32,
    /// `task_struct.start_boottime`.
    pub task_start_boottime: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 104);

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
const _: () = assert!(size_of::<ConnectEvent>() == 112);

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
const _: () = assert!(size_of::<ProcEvent>() == 328);

/// [`ProcEvent::group_dead`]: the last thread of the process exited.
pub const GROUP_DEAD: u8 = 1;
/// [`ProcEvent::group_dead`]: a thread exited, the process lives on.
pub const GROUP_ALIVE: u8 = 0;
/// [`ProcEvent::group_dead`]: the kernel's tracepoint has no `group_dead` field.
pub const GROUP_UNKNOWN: u8 = 2;

/// Capacity of the kernel's per-workload budget map (`BUDGET_STATE`): one entry per cgroup
/// that made a record recently; the least recently used is forgotten first (it then
/// starts again with a full burst, which only ever admits more).
pub const MAX_BUDGET_CGROUPS: u32 = 16 * 1024;
/// Capacity of the kernel's per-workload budget drop counters (`BUDGET_DROPS`): only
/// workloads that went over a budget have an entry.
pub const MAX_BUDGET_DROP_CGROUPS: u32 = 4096;

/// One lane's per-workload (per-cgroup) budget, set by the daemon at load time. The kernel
/// keeps a GCRA schedule (the token bucket in its virtual-time form: one timestamp per
/// cgroup and lane) in `BUDGET_STATE`: a record is over budget when the workload's
/// schedule runs more than `tolerance_ns` ahead of now.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneBudget {
    /// Budget one record costs, in nanoseconds (10^9 / records per second); 0: no budget.
    pub interval_ns: u64,
    /// How far ahead of now a workload's schedule may run: (burst - 1) × `interval_ns`.
    pub tolerance_ns: u64,
    /// The budget is enforced only while at least this many bytes wait in the lane's ring
    /// (0: always). The credential lane uses it so that a workload's burst is cut only
    /// when the ring is filling up, never when there is room for it.
    pub pressure_bytes: u64,
}
const _: () = assert!(size_of::<LaneBudget>() == 24);

/// Value of the per-workload budget map: the GCRA schedule of each lane, indexed by
/// [`Lane`] (CLOCK_BOOTTIME ns; 0 before the first record).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetState {
    pub tat_ns: [u64; LANE_COUNT as usize],
}
const _: () = assert!(size_of::<BudgetState>() == 24);

/// Marker for "this tracepoint field does not exist on this kernel" in offset globals.
pub const NO_FIELD: u32 = u32::MAX;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data: repr(C), Copy, every bit pattern valid.
    unsafe impl aya::Pod for PathKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FileKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnectArgs {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LaneBudget {}
}
