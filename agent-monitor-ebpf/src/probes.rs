//! The tracepoint programs. Entry points are thin wrappers around `try_*` functions.

use core::{
    intrinsics::{atomic_xadd, AtomicOrdering},
    mem::size_of,
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use agent_monitor_common::{
    dev_flags, path_flags, BudgetState, ConnectArgs, ConnectEvent, EventHeader, EventKind, FileKey,
    KernelOffsets, Lane, LaneBudget, MatchKind, OpenEvent, PathKey, ProcEvent, Syscall, AT_FDCWD,
    BASENAME_CAP, DPATH_CAP, GROUP_ALIVE, GROUP_DEAD, GROUP_UNKNOWN, INVENTORY_FILE, LANE_COUNT,
    MAX_BUDGET_CGROUPS, MAX_BUDGET_DROP_CGROUPS, MAX_CGROUP_DEPTH, MAX_DENTRY_DEPTH, MAX_INVENTORY,
    MAX_MONITORED_CGROUPS, MAX_WATCHED_BASENAMES, MAX_WATCHED_FS, MAX_WATCHED_PREFIXES, NAME_CAP,
    NO_FIELD, OPEN_FIXED, PATH_CAP,
};
use aya_ebpf::{
    bindings::{
        BPF_F_NO_COMMON_LRU, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel as kernel_read, bpf_probe_read_user,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id,
            bpf_get_current_task_btf, bpf_ktime_get_boot_ns, bpf_loop, bpf_probe_read_kernel,
            bpf_probe_read_kernel_str, bpf_probe_read_user_str, bpf_task_pt_regs,
        },
    },
    macros::{map, tracepoint},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext, Global,
};
use aya_log_ebpf::warn;

/// Default ring sizes; the daemon overrides them from its config at load time.
const DEFAULT_RING_BYTES: u32 = 256 * 1024;
/// Syscalls in flight at once whose entry matched (per map). Stale entries of threads that
/// never returned are evicted first (LRU).
const STASH_ENTRIES: u32 = 16 * 1024;
const MAX_PREFIXES: u32 = MAX_WATCHED_PREFIXES;
const MAX_BASENAMES: u32 = MAX_WATCHED_BASENAMES;
const MAX_CGROUPS: u32 = MAX_MONITORED_CGROUPS;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// `sizeof(struct sockaddr_in6)`; large enough for `sockaddr_in` too.
const SOCKADDR_CAP: usize = 28;

// ---- configuration, set by the daemon at load time ----

/// The daemon's own process id: never reported.
#[unsafe(no_mangle)]
static OWN_TGID: Global<u32> = Global::new(0);
/// Non-zero: only tasks in (or below) a cgroup listed in `MONITORED_CGROUPS` are reported.
#[unsafe(no_mangle)]
static CGROUP_FILTER: Global<u8> = Global::new(0);
/// Non-zero: opens of `/proc/<pid>/environ` are credential events.
#[unsafe(no_mangle)]
static WATCH_PROC_ENVIRON: Global<u8> = Global::new(1);
/// Unconsumed bytes in a lane's ring above which a submit wakes the daemon. Below it the
/// daemon finds the record on its next poll tick: waking userspace costs microseconds per
/// event, a tick costs nothing per event.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<[u64; LANE_COUNT as usize]> = Global::new([0; LANE_COUNT as usize]);
/// Per-workload budget of each lane, indexed by [`Lane`]; see [`admit`].
#[unsafe(no_mangle)]
static BUDGETS: Global<[LaneBudget; LANE_COUNT as usize]> = Global::new(
    [LaneBudget {
        interval_ns: 0,
        tolerance_ns: 0,
        pressure_bytes: 0,
    }; LANE_COUNT as usize],
);
/// Offset of `child_pid` in the `sched_process_fork` record.
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: Global<u32> = Global::new(NO_FIELD);
/// Offset of `group_dead` in the `sched_process_exit` record, or `NO_FIELD`.
#[unsafe(no_mangle)]
static EXIT_GROUP_DEAD_OFFSET: Global<u32> = Global::new(NO_FIELD);

// ---- maps ----

#[map]
static CRED_EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);
#[map]
static NET_EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);
#[map]
static PROC_EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);
/// Records that found their ring full (or their stash full), per lane, per CPU.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LANE_COUNT, 0);

/// Each workload's (cgroup's) budget schedule, for [`admit`].
#[map]
static BUDGET_STATE: LruHashMap<u64, BudgetState> =
    LruHashMap::with_max_entries(MAX_BUDGET_CGROUPS, 0);
/// Records a budget refused, per cgroup, indexed by [`Lane`]; the daemon reports them
/// naming the workload. Apart from `DROPS`: a ring-full loss is nobody's fault in
/// particular, a budget drop is one workload's.
#[map]
static BUDGET_DROPS: LruHashMap<u64, [u64; LANE_COUNT as usize]> =
    LruHashMap::with_max_entries(MAX_BUDGET_DROP_CGROUPS, 0);

/// Watched absolute path prefixes.
#[map]
static WATCH_PREFIXES: LpmTrie<[u8; PATH_CAP], u8> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
/// Watched basenames for relative paths, NUL-padded.
#[map]
static WATCH_BASENAMES: HashMap<[u8; BASENAME_CAP], u8> =
    HashMap::with_max_entries(MAX_BASENAMES, 0);
/// Cgroup ids whose tasks (and descendants' tasks) are reported when `CGROUP_FILTER` is on.
#[map]
static MONITORED_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_CGROUPS, 0);

/// Connect/send destinations between syscall entry and exit, by pid_tgid.
#[map]
static NET_STASH: LruHashMap<u64, ConnectArgs> =
    LruHashMap::with_max_entries(STASH_ENTRIES, BPF_F_NO_COMMON_LRU);
/// Network stash entries made and not yet collected. An exit program whose counter is
/// zero returns without a hash lookup, which is most of the cost it adds to every
/// unrelated call. Entries that never meet their exit (evicted, or a thread killed in
/// between) keep the count above zero: that only costs speed, never an event.
#[map]
static INFLIGHT: Array<u64> = Array::with_max_entries(1, 0);
const INFLIGHT_NET: u32 = 0;

// ---- syscall record offsets (stable ABI; see the format files) ----

/// `sys_enter_*`: first argument; each further argument is 8 bytes on.
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG4: usize = 48;
/// `sys_exit_*`: `long ret`.
const EXIT_RET: usize = 16;
/// `sched_process_exec`: `__data_loc char[] filename` at 8, `pid_t old_pid` at 16.
const EXEC_FILENAME_LOC: usize = 8;
const EXEC_OLD_PID: usize = 16;

/// Reads a field of the tracepoint record. Tracepoint programs may load from their context
/// directly; the record is at least `offset + size_of::<T>()` bytes for every caller here.
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: offsets come from the tracepoint format files (see the constants above) and
    // are aligned for T: an unaligned read would be split into byte loads.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(offset) as *const T) }
}

/// Reads a field at an offset known only at load time. Direct context loads must use
/// constant offsets, so this goes through the kernel-read helper.
#[inline(always)]
fn field_at_runtime_offset<T: Copy>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    // SAFETY: the helper checks the read; the offset came from this kernel's format file.
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

/// Adds `delta` (wrapping; `u64::MAX` subtracts one) to an in-flight counter.
#[inline(always)]
fn inflight_add(index: u32, delta: u64) {
    if let Some(n) = INFLIGHT.get_ptr_mut(index) {
        // SAFETY: a valid, aligned map value. The BPF target has no compare-and-swap, so
        // `AtomicU64::fetch_add` does not exist there; the intrinsic lowers to the BPF
        // atomic add instruction (BPF_ATOMIC | BPF_ADD), atomic across CPUs.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, delta) };
    }
}

/// Whether any stash entry of this kind may be waiting for its exit.
#[inline(always)]
fn inflight(index: u32) -> bool {
    INFLIGHT.get(index).is_some_and(|n| *n != 0)
}

#[inline(always)]
fn count_drop(lane: Lane) {
    if let Some(n) = DROPS.get_ptr_mut(lane as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *n += 1 };
    }
}

/// Whether the current workload (cgroup) may put one more record into `lane`'s `ring`:
/// the per-workload budget, called right before each reserve. A GCRA schedule (a token
/// bucket kept as one timestamp): each record moves the workload's schedule on by
/// `interval_ns`; a record that would put it more than `tolerance_ns` ahead of now is over
/// budget. While the lane is under its pressure mark the budget is counted but not
/// enforced, and a schedule never runs further ahead than the tolerance, so a workload
/// that flooded while there was room is cut at once when room runs short, while one that
/// was quiet still has its whole burst. CPUs update a schedule without a lock: a lost
/// update admits one record more, never fewer.
#[inline(always)]
fn admit(lane: Lane, ring: &RingBuf) -> bool {
    if BUDGETS.load()[lane as usize].interval_ns == 0 {
        return true;
    }
    // SAFETY: helpers without memory arguments.
    let (cgroup, now) = unsafe { (bpf_get_current_cgroup_id(), bpf_ktime_get_boot_ns()) };
    admit_at(lane, ring, cgroup, now)
}

/// [`admit`] for a caller that already read the task's cgroup and the clock (for its
/// record's header): each is a helper call, which is most of what a check costs.
#[inline(always)]
fn admit_at(lane: Lane, ring: &RingBuf, cgroup: u64, now: u64) -> bool {
    let budget = BUDGETS.load()[lane as usize];
    if budget.interval_ns == 0 {
        return true;
    }
    let Some(state) = BUDGET_STATE.get_ptr_mut(&cgroup) else {
        let mut fresh = BudgetState {
            tat_ns: [0; LANE_COUNT as usize],
        };
        fresh.tat_ns[lane as usize] = now + budget.interval_ns;
        // A full map evicts its least recently used workload; failure costs nothing but
        // this workload's schedule, which then starts again full.
        let _ = BUDGET_STATE.insert(&cgroup, &fresh, 0);
        return true;
    };
    // SAFETY: a valid value of this map; plain loads and stores (see above).
    let tat = unsafe { (*state).tat_ns[lane as usize] }.max(now);
    if tat - now > budget.tolerance_ns {
        if budget.pressure_bytes != 0
            && ring.query(BPF_RB_AVAIL_DATA as u64) < budget.pressure_bytes
        {
            // Room in the ring: admitted, and the schedule stays at its limit.
            return true;
        }
        count_budget_drop(cgroup, lane);
        return false;
    }
    // SAFETY: as above.
    unsafe { (*state).tat_ns[lane as usize] = tat + budget.interval_ns };
    true
}

/// Counts a record of `cgroup` that [`admit`] refused.
#[inline(always)]
fn count_budget_drop(cgroup: u64, lane: Lane) {
    if BUDGET_DROPS.get_ptr_mut(&cgroup).is_none() {
        // Zeroes written on the stack, one by one: a literal `&[0; N]` is promoted to a
        // constant in a read-only data section, and the value the kernel then copied held
        // 262,144 in every lane (every new workload started with that many drops).
        let mut zero = [1u64; LANE_COUNT as usize];
        for slot in &mut zero {
            // SAFETY: a valid, aligned slot of a local array.
            unsafe { core::ptr::write_volatile(slot, 0) };
        }
        // NOEXIST: a CPU that inserts at the same moment keeps its count.
        let _ = BUDGET_DROPS.insert(&cgroup, &zero, BPF_NOEXIST as u64);
    }
    if let Some(counts) = BUDGET_DROPS.get_ptr_mut(&cgroup) {
        // SAFETY: a valid, aligned map value; the atomic add (see `inflight_add`) keeps
        // counts of CPUs dropping for the same workload at once.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                addr_of_mut!((*counts)[lane as usize]),
                1,
            )
        };
    }
}

/// Submit flag for a lane: wake the daemon only when enough data is waiting.
#[inline(always)]
fn wakeup_flag(ring: &RingBuf, lane: Lane) -> u64 {
    let threshold = WAKEUP_BYTES.load()[lane as usize];
    if ring.query(BPF_RB_AVAIL_DATA as u64) >= threshold {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Whether the current task is one we report: not the daemon, and inside a monitored
/// cgroup subtree when the cgroup filter is on.
#[inline(always)]
fn task_is_monitored(tgid: u32) -> bool {
    if tgid == OWN_TGID.load() {
        return false;
    }
    if CGROUP_FILTER.load() == 0 {
        return true;
    }
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        // SAFETY: helper without memory arguments.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            return false;
        }
        // SAFETY: the value is only tested for presence.
        if unsafe { MONITORED_CGROUPS.get(&id) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// Fills the header of a reserved record for the current task, whose
/// `bpf_get_current_pid_tgid()` (`id`) and cgroup id the caller read: callers need them
/// for their own checks too, and each is a helper call.
///
/// # Safety
/// `h` points to a reserved, writable ring-buffer record.
#[inline(always)]
unsafe fn fill_header(h: *mut EventHeader, kind: EventKind, ts_ns: u64, id: u64, cgroup_id: u64) {
    let ug = bpf_get_current_uid_gid();
    // SAFETY: the caller guarantees `h` is valid for writes.
    unsafe {
        (*h).kind = kind as u16;
        (*h)._pad = [0; 6];
        (*h).ts_ns = ts_ns;
        (*h).pid = id as u32;
        (*h).tgid = (id >> 32) as u32;
        (*h).uid = ug as u32;
        (*h).gid = (ug >> 32) as u32;
        (*h).cgroup_id = cgroup_id;
        (*h).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*h).start_ns = process_start_ns();
    }
}

/// `start_boottime` of the current task's thread-group leader: with the tgid, a name for
/// the process that pid reuse cannot give to another. 0 when the kernel lacks the fields.
#[inline(always)]
fn process_start_ns() -> u64 {
    let o = OFFSETS.load();
    if o.task_group_leader == NO_FIELD || o.task_start_boottime == NO_FIELD {
        return 0;
    }
    // SAFETY: helper without arguments; the BTF pointer is valid for this program run.
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    // SAFETY: offsets of these very members in this kernel's BTF (direct loads through
    // the typed pointer, as in the open path); a faulting load reads 0.
    let leader: *const u8 = unsafe {
        core::ptr::read_volatile(task.add(o.task_group_leader as usize) as *const *const u8)
    };
    if leader.is_null() {
        return 0;
    }
    // SAFETY: as above; `leader` is a `task_struct *` the verifier typed from the load.
    unsafe { core::ptr::read_volatile(leader.add(o.task_start_boottime as usize) as *const u64) }
}

// ------------------------------------------------------------------ opens
//
// Opens are decided at syscall exit, from the file the kernel opened: the returned
// descriptor is resolved (task -> files -> fdtable -> file -> inode -> super_block) and the
// file is watched when its filesystem is a pod's credential volume, or its (device, inode)
// or its parent directory's is in the node credential inventory. That match holds whatever
// name the file was opened by: relative, through a symlink or a hard link, another mount,
// `/proc/<pid>/root/...` or `/proc/self/fd/N`. Only failed opens, which have no file, fall
// back to the path string and the prefix trie (files that do not exist yet).
//
// The path as passed is read at exit from the syscall's saved user registers, so no entry
// program runs and nothing is stashed per open.

/// `__syscall_nr` in `sys_exit_*` records.
const EXIT_NR: usize = 8;
/// x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
const NR_OPEN: i32 = 2;
const NR_CREAT: i32 = 85;
const NR_OPENAT: i32 = 257;
const NR_OPEN_BY_HANDLE_AT: i32 = 304;
const NR_OPENAT2: i32 = 437;
/// `PROC_SUPER_MAGIC` (include/uapi/linux/magic.h).
const PROC_SUPER_MAGIC: u64 = 0x9fa0;
/// Upper bound on file descriptors we resolve (`sysctl fs.nr_open` max is 2^30).
const MAX_FD: i64 = 1 << 30;
/// `IORING_OP_OPENAT` and `IORING_OP_OPENAT2` (include/uapi/linux/io_uring.h).
const IORING_OP_OPENAT: u8 = 18;
const IORING_OP_OPENAT2: u8 = 28;
/// io_uring opens submitted and not yet completed.
const IO_OPEN_ENTRIES: u32 = 4096;
/// Processes that read a watched file, remembered for the read-then-send correlation.
const CRED_READER_ENTRIES: u32 = 16 * 1024;
/// (process, socket) pairs already reported as sending after a credential read.
const SENT_ENTRIES: u32 = 16 * 1024;

/// Kernel structure offsets from the running kernel's BTF.
#[unsafe(no_mangle)]
static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    task_files: NO_FIELD,
    files_fdt: NO_FIELD,
    fdt_max_fds: NO_FIELD,
    fdt_fd: NO_FIELD,
    file_inode: NO_FIELD,
    file_dentry: NO_FIELD,
    file_private_data: NO_FIELD,
    inode_ino: NO_FIELD,
    inode_sb: NO_FIELD,
    sb_dev: NO_FIELD,
    sb_magic: NO_FIELD,
    dentry_parent: NO_FIELD,
    dentry_name: NO_FIELD,
    dentry_inode: NO_FIELD,
    socket_type: NO_FIELD,
    sk_daddr: NO_FIELD,
    sk_dport: NO_FIELD,
    sk_v6_daddr: NO_FIELD,
    sk_family: NO_FIELD,
    regs_arg: [NO_FIELD; 3],
    req_open_filename: NO_FIELD,
    filename_name: NO_FIELD,
    task_group_leader: NO_FIELD,
    task_start_boottime: NO_FIELD,
});
/// How long after a credential read data sent on an inet socket is reported.
#[unsafe(no_mangle)]
static EXFIL_WINDOW_NS: Global<u64> = Global::new(30_000_000_000);

/// Filesystems (by `s_dev`) that hold something watched, with [`dev_flags`]: pods' Secret
/// and projected volumes (every file), and filesystems with inventory files.
#[map]
static WATCH_DEVS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_WATCHED_FS, 0);
/// Node credential files by identity ([`INVENTORY_FILE`]).
#[map]
static WATCH_FILES: HashMap<FileKey, u8> = HashMap::with_max_entries(MAX_INVENTORY, 0);

/// io_uring opens between submission and completion, by request address.
#[map]
static IO_OPENS: LruHashMap<u64, IoOpen> = LruHashMap::with_max_entries(IO_OPEN_ENTRIES, 0);

/// Processes that opened a watched file, with when (boot ns).
#[map]
static CRED_READERS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(CRED_READER_ENTRIES, 0);
/// Non-zero once any process is in `CRED_READERS`: sends of everyone else then cost one
/// array lookup.
#[map]
static CRED_READERS_ACTIVE: Array<u64> = Array::with_max_entries(1, 0);
/// Sockets already reported as sending after a read, with when.
#[map]
static SENT: LruHashMap<SentKey, u64> = LruHashMap::with_max_entries(SENT_ENTRIES, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct SentKey {
    tgid: u32,
    _pad: u32,
    sk: u64,
}

/// What an io_uring open asked for, read at submission.
#[repr(C)]
#[derive(Clone, Copy)]
struct IoOpen {
    path: [u8; PATH_CAP],
    path_len: u16,
    syscall: u16,
    path_flags: u16,
    _pad: u16,
}

/// Per-CPU scratch for deciding an open before it is known to be wanted.
#[repr(C)]
struct OpenScratch {
    key: PathKey,
    /// Dentry walk state: the next dentry, bytes of names written after the path in
    /// [`OPEN_RECORD`], names written, and whether the chain was cut.
    dentry: u64,
    path_len: u64,
    dpath_len: u64,
    depth: u64,
    truncated: u64,
    io: IoOpen,
}

#[map]
static OPEN_SCRATCH: PerCpuArray<OpenScratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU open record being built in its ring form ([`OPEN_FIXED`] bytes, the path, the
/// dentry names), then copied to the ring with the bytes in use only.
#[map]
static OPEN_RECORD: PerCpuArray<OpenEvent> = PerCpuArray::with_max_entries(1, 0);
#[map]
static BASENAME_SCRATCH: PerCpuArray<[u8; BASENAME_CAP]> = PerCpuArray::with_max_entries(1, 0);

/// Reads a kernel pointer-sized value at `base + off`; 0 when unreadable.
#[inline(always)]
fn kread_u64(base: u64, off: u32) -> u64 {
    if base == 0 || off == NO_FIELD {
        return 0;
    }
    // SAFETY: the helper checks the kernel address.
    unsafe { kernel_read((base + u64::from(off)) as *const u64) }.unwrap_or(0)
}

#[inline(always)]
fn kread_u32(base: u64, off: u32) -> u32 {
    if base == 0 || off == NO_FIELD {
        return 0;
    }
    // SAFETY: the helper checks the kernel address.
    unsafe { kernel_read((base + u64::from(off)) as *const u32) }.unwrap_or(0)
}

/// The `struct file *` behind descriptor `fd` of the current task, or 0.
#[inline(always)]
fn fd_file(fd: i64) -> u64 {
    if !(0..MAX_FD).contains(&fd) {
        return 0;
    }
    let o = OFFSETS.load();
    // Direct loads through the BTF-typed task pointer: the verifier knows the offsets
    // (they are in the frozen .rodata) and checks them against the kernel's BTF, and the
    // JIT makes each a plain load with a fault handler, far cheaper than a helper call.
    // The chain stops at the fd array (`struct file **`), which the verifier does not
    // type, so the last step goes through the helper.
    // SAFETY: helper without arguments; the BTF pointer is valid for this program run.
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    // SAFETY: (for each load) offsets of these very members in this kernel's BTF; a
    // faulting load reads 0 (the JIT's exception table), a NULL pointer is checked.
    let files: *const u8 =
        unsafe { core::ptr::read_volatile(task.add(o.task_files as usize) as *const *const u8) };
    if files.is_null() {
        return 0;
    }
    // SAFETY: as above.
    let fdt: *const u8 =
        unsafe { core::ptr::read_volatile(files.add(o.files_fdt as usize) as *const *const u8) };
    if fdt.is_null() {
        return 0;
    }
    // SAFETY: as above.
    let max: u32 =
        unsafe { core::ptr::read_volatile(fdt.add(o.fdt_max_fds as usize) as *const u32) };
    if fd as u64 >= u64::from(max) {
        return 0;
    }
    // SAFETY: as above.
    let table: u64 = unsafe { core::ptr::read_volatile(fdt.add(o.fdt_fd as usize) as *const u64) };
    if table == 0 {
        return 0;
    }
    // SAFETY: fd < max_fds, inside the fd array; the helper checks the read.
    unsafe { kernel_read((table + fd as u64 * 8) as *const u64) }.unwrap_or(0)
}

/// What the kernel says of an opened file.
#[derive(Clone, Copy)]
struct FileId {
    dentry: u64,
    dev: u32,
    ino: u64,
    matched: u8,
}

/// Bytes read at once by [`kread_pair`]: two fields within this span cost one helper
/// call instead of two.
const WINDOW_BYTES: usize = 128;

/// Per-CPU landing area of [`kread_pair`]: twice the span read, so a field read at any
/// index below `WINDOW_BYTES` stays inside it, as the verifier requires.
#[map]
static WINDOW: PerCpuArray<[u8; 2 * WINDOW_BYTES]> = PerCpuArray::with_max_entries(1, 0);

/// Reads the fields at offsets `a` (a `T`) and `b` (a `U`) of the kernel object at
/// `base`. Helper calls dominate what a program costs here (tens of ns each), so two
/// nearby fields are copied with one call and picked out of the copy.
#[inline(always)]
fn kread_pair<T: Copy + Default, U: Copy + Default>(base: u64, a: u32, b: u32) -> (T, U) {
    if base == 0 || a == NO_FIELD || b == NO_FIELD {
        return (T::default(), U::default());
    }
    let lo = if a < b { a } else { b };
    let hi = if a < b { b } else { a };
    // Exactly the span: reading past the object could cross into an unmapped page, and a
    // faulting read costs microseconds (pt_regs sit at the very top of the kernel stack).
    let span = (hi - lo) as usize + core::mem::size_of::<T>().max(core::mem::size_of::<U>());
    if let (true, Some(w)) = (span <= WINDOW_BYTES, WINDOW.get_ptr_mut(0)) {
        // SAFETY: per-CPU scratch slot, exclusively ours while this program runs; the
        // helper checks the kernel address and writes at most `span` <= WINDOW_BYTES.
        let w = unsafe { &mut *w };
        let copied = unsafe {
            bpf_probe_read_kernel(
                w.as_mut_ptr().cast(),
                (span & (WINDOW_BYTES * 2 - 1)).min(WINDOW_BYTES) as u32,
                (base + u64::from(lo)) as *const _,
            )
        };
        if copied == 0 {
            // Any alignment: a u32 field may sit 4 bytes past the other.
            let ia = (a - lo) as usize & (WINDOW_BYTES - 1);
            let ib = (b - lo) as usize & (WINDOW_BYTES - 1);
            // SAFETY: both indices are below WINDOW_BYTES in a buffer twice that size;
            // unaligned reads.
            return unsafe {
                (
                    core::ptr::read_unaligned(w.as_ptr().add(ia) as *const T),
                    core::ptr::read_unaligned(w.as_ptr().add(ib) as *const U),
                )
            };
        }
    }
    // Far apart, or the window ran past a mapping: one read each.
    // SAFETY: the helper checks the kernel addresses.
    unsafe {
        (
            kernel_read((base + u64::from(a)) as *const T).unwrap_or_default(),
            kernel_read((base + u64::from(b)) as *const U).unwrap_or_default(),
        )
    }
}

/// Identifies `file` and decides whether it is watched. The common answer, "no", costs
/// the descriptor lookup, three window reads and one or two hash lookups; only
/// filesystems that hold something watched (per `WATCH_DEVS`) and procfs are looked at
/// further. Directories are not matched here: a file created in an inventory directory
/// joins the inventory when userspace's inotify watch on that directory fires.
#[inline(always)]
fn match_file(file: u64) -> Option<FileId> {
    if file == 0 {
        return None;
    }
    let o = OFFSETS.load();
    let (inode, dentry): (u64, u64) = kread_pair(file, o.file_inode, o.file_dentry);
    let (sb, ino): (u64, u64) = kread_pair(inode, o.inode_sb, o.inode_ino);
    let (dev, magic): (u32, u64) = kread_pair(sb, o.sb_dev, o.sb_magic);
    let mut id = FileId {
        dentry,
        dev,
        ino,
        matched: 0,
    };
    // SAFETY: the value is copied out.
    let flags = unsafe { WATCH_DEVS.get(&dev) }.copied().unwrap_or(0);
    if flags & dev_flags::VOLUME != 0 {
        id.matched = MatchKind::Volume as u8;
        return Some(id);
    }
    if flags & dev_flags::FILES != 0 {
        let key = FileKey { dev, _pad: 0, ino };
        // SAFETY: the value is copied out.
        if unsafe { WATCH_FILES.get(&key) }.copied() == Some(INVENTORY_FILE) {
            id.matched = MatchKind::Inode as u8;
            return Some(id);
        }
    }
    if WATCH_PROC_ENVIRON.load() != 0
        && magic & 0xffff_ffff == PROC_SUPER_MAGIC
        && dentry_is_environ(dentry)
    {
        id.matched = MatchKind::ProcEnviron as u8;
        return Some(id);
    }
    None
}

/// Whether a procfs dentry is named `environ`.
#[inline(always)]
fn dentry_is_environ(dentry: u64) -> bool {
    let name = kread_u64(dentry, OFFSETS.load().dentry_name);
    if name == 0 {
        return false;
    }
    // SAFETY: the helper checks the kernel address.
    let got = unsafe { kernel_read(name as *const [u8; 8]) }.unwrap_or([0; 8]);
    &got == b"environ\0"
}

/// The first three syscall arguments from the current task's saved user registers
/// (valid at syscall exit: the kernel writes only the return register), with one window
/// read where the registers lie together (x86_64: dx, si, di are adjacent).
#[inline(always)]
fn syscall_args() -> [u64; 3] {
    let r = OFFSETS.load().regs_arg;
    if r[0] == NO_FIELD || r[1] == NO_FIELD || r[2] == NO_FIELD {
        return [0; 3];
    }
    // SAFETY: helpers on the current task; the BTF task pointer is valid for the program.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    if r[0] == r[1] + 8 && r[1] == r[2] + 8 {
        // di, si, dx stored in descending order: one read of [dx, si, di].
        // SAFETY: the helper checks the kernel address.
        let [dx, si, di] =
            unsafe { kernel_read((regs + u64::from(r[2])) as *const [u64; 3]) }.unwrap_or([0; 3]);
        return [di, si, dx];
    }
    [
        kread_u64(regs, r[0]),
        kread_u64(regs, r[1]),
        kread_u64(regs, r[2]),
    ]
}

#[inline(always)]
fn byte_at(data: &[u8; PATH_CAP], i: usize) -> u8 {
    data[i & (PATH_CAP - 1)]
}

/// Whether `data[..len]` is `/proc/<something>/environ`.
#[inline(always)]
fn is_proc_environ(data: &[u8; PATH_CAP], len: usize) -> bool {
    const SUFFIX: &[u8; 8] = b"/environ";
    if len < 6 + SUFFIX.len() || &data[..6] != b"/proc/" {
        return false;
    }
    let mut i = 0;
    while i < SUFFIX.len() {
        if byte_at(data, len - SUFFIX.len() + i) != SUFFIX[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// State of the last-slash scan, on the caller's stack.
#[repr(C)]
struct SlashScan {
    len: u64,
    /// Index just past the last `/` seen so far.
    start: u64,
}

/// `bpf_loop` callback: one step of the scan for the last `/` of the scratch path. Run as
/// a callback, the loop is verified once; as an inline loop, the verifier tracks every
/// (position, last slash) pair and gives up at its instruction limit.
#[inline(never)]
extern "C" fn scan_slash(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: ctx is the SlashScan the caller passed to bpf_loop.
    let scan = unsafe { &mut *(ctx as *mut SlashScan) };
    if index >= scan.len {
        return 1;
    }
    let Some(s) = OPEN_SCRATCH.get_ptr(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch slot filled by the caller on this CPU.
    if byte_at(unsafe { &(*s).key.data }, index as usize) == b'/' {
        scan.start = index + 1;
    }
    0
}

/// Whether the last component of the relative path `data[..len]` is a watched basename.
#[inline(always)]
fn basename_is_watched(data: &[u8; PATH_CAP], len: usize) -> bool {
    let mut scan = SlashScan {
        len: len as u64,
        start: 0,
    };
    // SAFETY: the callback and its context outlive the call.
    unsafe {
        bpf_loop(
            PATH_CAP as u32,
            scan_slash as *mut _,
            &mut scan as *mut SlashScan as *mut _,
            0,
        )
    };
    let start = (scan.start as usize) & (PATH_CAP - 1);
    if start >= len || len - start >= BASENAME_CAP {
        return false;
    }
    let Some(name) = BASENAME_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU scratch slot, exclusively ours while this program runs.
    let name = unsafe { &mut *name };
    *name = [0; BASENAME_CAP];
    // Copied by the helper: an indexed byte loop here is reassociated by LLVM into a
    // pointer walk the verifier cannot bound.
    let n = ((len - start) & (BASENAME_CAP - 1)) as u32;
    // SAFETY: `start + n <= len < PATH_CAP`, inside `data`; the helper bounds the write to n.
    let copied = unsafe {
        bpf_probe_read_kernel(name.as_mut_ptr().cast(), n, data.as_ptr().add(start).cast())
    };
    if copied != 0 {
        return false;
    }
    // SAFETY: the value is only tested for presence.
    unsafe { WATCH_BASENAMES.get(&*name) }.is_some()
}

/// Matches the path in `key.data[..len]` (as passed) against prefixes, basenames and
/// `/proc/<pid>/environ`.
#[inline(always)]
fn match_path(key: &mut PathKey, len: usize) -> u8 {
    if key.data[0] == b'/' {
        key.prefix_len = (len * 8) as u32;
        // SAFETY: PathKey has the layout of Key<[u8; PATH_CAP]> (repr(C), u32 then bytes).
        let k = unsafe { &*(key as *const _ as *const Key<[u8; PATH_CAP]>) };
        if WATCH_PREFIXES.get(k).is_some() {
            return MatchKind::Prefix as u8;
        }
        if WATCH_PROC_ENVIRON.load() != 0 && is_proc_environ(&key.data, len) {
            return MatchKind::ProcEnviron as u8;
        }
        0
    } else if basename_is_watched(&key.data, len) {
        MatchKind::Basename as u8
    } else {
        0
    }
}

/// `bpf_loop` callback: appends the name of the scratch dentry to the record's names
/// (after its path) and steps to its parent; stops at the filesystem's root (its own
/// parent).
#[inline(never)]
extern "C" fn walk_dentry(_index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let (Some(s), Some(rec)) = (OPEN_SCRATCH.get_ptr_mut(0), OPEN_RECORD.get_ptr_mut(0)) else {
        return 1;
    };
    // SAFETY: per-CPU scratch slot, exclusively ours while this program runs.
    let s = unsafe { &mut *s };
    let o = OFFSETS.load();
    let d = s.dentry;
    // `d_parent` and `d_name.name` lie 16 bytes apart: one read for both.
    let (parent, name): (u64, u64) = kread_pair(d, o.dentry_parent, o.dentry_name);
    if d == 0 || parent == 0 || parent == d {
        return 1;
    }
    if s.dpath_len >= (DPATH_CAP / 2) as u64 {
        s.truncated = 1;
        return 1;
    }
    let off = OPEN_FIXED
        + (s.path_len as usize & (PATH_CAP - 1))
        + (s.dpath_len as usize & (DPATH_CAP / 2 - 1));
    // SAFETY: off < OPEN_FIXED + PATH_CAP + DPATH_CAP / 2 and at most NAME_CAP bytes are
    // written, so the write ends inside the record (size-asserted in the common crate).
    let n = unsafe {
        bpf_probe_read_kernel_str(
            (rec as *mut u8).add(off).cast(),
            NAME_CAP as u32,
            name as *const _,
        )
    };
    if n <= 0 {
        return 1;
    }
    s.dpath_len += n as u64;
    s.depth += 1;
    s.dentry = parent;
    0
}

/// Reports an open whose match is decided and which [`admit_at`] admitted at `now` for
/// `cgroup`. `file` is the opened file (0 for a failed open); the path as passed is
/// already in `rec.path` (`path_len`, `pflags`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit_open(
    ctx: &TracePointContext,
    s: *mut OpenScratch,
    rec: *mut OpenEvent,
    id: Option<FileId>,
    matched: u8,
    ret: i64,
    syscall: Syscall,
    args: [u64; 3],
    path_len: usize,
    pflags: u16,
    now: u64,
    cgroup: u64,
) -> Result<u32, u32> {
    let bytes = rec as *mut u8;
    // Read once for the header, a ring-full warning and the reader table.
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut pflags = pflags;
    // The path first (the names follow it): only the bytes in use, no NUL.
    let path_len = path_len & (PATH_CAP - 1);
    // The walk's state is written here, updated by `walk_dentry` inside `bpf_loop` through
    // its own lookup of the same slot, and read back here: raw volatile accesses, so the
    // compiler can neither keep it in registers across the call nor assume the call
    // leaves it alone (a `&mut` here let it forward the zeros past the walk once the
    // surrounding code changed, and every record came out without its names).
    // SAFETY (all accesses to `s` below): `s` is this CPU's scratch slot, exclusively ours
    // while this program runs.
    let (mut depth, mut dpath_len) = (0u64, 0u64);
    unsafe {
        write_volatile(addr_of_mut!((*s).path_len), path_len as u64);
        write_volatile(addr_of_mut!((*s).dpath_len), 0);
        write_volatile(addr_of_mut!((*s).depth), 0);
        write_volatile(addr_of_mut!((*s).truncated), 0);
    }
    if let Some(id) = id {
        // SAFETY: as above; the callback takes no context.
        unsafe {
            write_volatile(addr_of_mut!((*s).dentry), id.dentry);
            bpf_loop(
                MAX_DENTRY_DEPTH,
                walk_dentry as *mut _,
                core::ptr::null_mut(),
                0,
            );
            depth = read_volatile(addr_of!((*s).depth));
            dpath_len = read_volatile(addr_of!((*s).dpath_len));
            if read_volatile(addr_of!((*s).truncated)) != 0 || depth >= u64::from(MAX_DENTRY_DEPTH)
            {
                pflags |= path_flags::DPATH_TRUNCATED;
            }
        }
    }
    let dpath_len = (dpath_len as usize).min(DPATH_CAP);
    let (dirfd, flags, mode) = match syscall {
        Syscall::Open => (AT_FDCWD, args[1] as u32, args[2] as u32),
        Syscall::Creat => (
            AT_FDCWD,
            // creat(p, m) is open(p, O_CREAT|O_WRONLY|O_TRUNC, m).
            0o1101,
            args[1] as u32,
        ),
        Syscall::Openat => (args[0] as i32, args[2] as u32, 0),
        Syscall::OpenByHandleAt => (args[0] as i32, args[2] as u32, 0),
        _ => (AT_FDCWD, 0, 0),
    };
    // SAFETY: `rec` is this CPU's record buffer, exclusively ours while this program runs.
    unsafe {
        fill_header(
            addr_of_mut!((*rec).header),
            EventKind::Open,
            now,
            pid_tgid,
            cgroup,
        );
        (*rec).ret = ret;
        (*rec).ino = id.map_or(0, |i| i.ino);
        (*rec).dev = id.map_or(0, |i| i.dev);
        (*rec).syscall = syscall as u16;
        (*rec).path_flags = pflags;
        (*rec).dirfd = dirfd;
        (*rec).flags = flags;
        (*rec).mode = mode;
        (*rec).matched = matched;
        (*rec).depth = depth as u8;
        (*rec).path_len = path_len as u16;
        (*rec).dpath_len = dpath_len as u16;
        (*rec)._pad = [0; 6];
    }
    // A bound the verifier can follow; the names end inside the record (common crate).
    let size = (OPEN_FIXED + path_len + dpath_len).min(size_of::<OpenEvent>());
    // SAFETY: the first `size` bytes of the record buffer, all written above.
    let record = unsafe { core::slice::from_raw_parts(bytes as *const u8, size) };
    if CRED_EVENTS
        .output::<[u8]>(record, wakeup_flag(&CRED_EVENTS, Lane::Credential))
        .is_err()
    {
        count_drop(Lane::Credential);
        warn!(
            ctx,
            "credential ring full: open by tid {} lost", pid_tgid as u32
        );
        return Err(0);
    }
    if ret >= 0 {
        remember_reader((pid_tgid >> 32) as u32, now);
    }
    Ok(0)
}

/// Notes that process `tgid` read a watched file at `now` (boot ns), for [`sock_send`].
#[inline(always)]
fn remember_reader(tgid: u32, now: u64) {
    // An LRU insert takes the map's lock (~0.5 µs here); a process that read before only
    // gets its stamp refreshed in place.
    match CRED_READERS.get_ptr_mut(&tgid) {
        // SAFETY: a valid value of this map; a plain store of a newer stamp.
        Some(at) => unsafe { *at = now },
        None => {
            let _ = CRED_READERS.insert(&tgid, &now, 0);
        }
    }
    if let Some(n) = CRED_READERS_ACTIVE.get_ptr_mut(0) {
        // SAFETY: a valid map value; a plain load and store of a flag. Stored only when it
        // changes: the flag is one cache line shared by every CPU, and a store on each
        // watched open would take that line from the CPUs that read it on every send.
        unsafe {
            if *n == 0 {
                *n = 1;
            }
        }
    }
}

/// Reads the user path at `ptr` into `dst`; returns (length, path flags).
#[inline(always)]
fn read_user_path(dst: &mut [u8; PATH_CAP], ptr: u64) -> (usize, u16) {
    dst[0] = 0;
    if ptr == 0 {
        return (0, path_flags::NO_PATH);
    }
    // SAFETY: the helper checks the user pointer and bounds the copy by the buffer size.
    let n = unsafe {
        bpf_probe_read_user_str(dst.as_mut_ptr().cast(), PATH_CAP as u32, ptr as *const _)
    };
    if n <= 1 {
        dst[0] = 0;
        return (0, path_flags::NO_PATH);
    }
    let len = (n as usize - 1) & (PATH_CAP - 1);
    let mut pflags = 0;
    if n as usize >= PATH_CAP {
        pflags |= path_flags::TRUNCATED;
    }
    if dst[0] != b'/' {
        pflags |= path_flags::RELATIVE;
    }
    (len, pflags)
}

/// Attached to `sys_exit_open`, `openat`, `openat2`, `creat` and `open_by_handle_at`.
#[tracepoint]
pub fn open_exit(ctx: TracePointContext) -> u32 {
    match try_open_exit(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_open_exit(ctx: &TracePointContext) -> Result<u32, u32> {
    let id = bpf_get_current_pid_tgid();
    if !task_is_monitored((id >> 32) as u32) {
        return Ok(0);
    }
    let nr: i32 = field(ctx, EXIT_NR);
    let (syscall, path_arg) = match nr {
        NR_OPEN => (Syscall::Open, 0),
        NR_CREAT => (Syscall::Creat, 0),
        NR_OPENAT => (Syscall::Openat, 1),
        NR_OPENAT2 => (Syscall::Openat2, 1),
        NR_OPEN_BY_HANDLE_AT => (Syscall::OpenByHandleAt, 3),
        _ => return Ok(0),
    };
    let ret: i64 = field(ctx, EXIT_RET);
    decide_open(ctx, ret, syscall, |dst| {
        let args = syscall_args();
        let path = if path_arg < 3 {
            read_user_path(dst, args[path_arg & 1])
        } else {
            dst[0] = 0;
            (0, path_flags::NO_PATH)
        };
        (path, args)
    })
}

/// Decides an open that returned `ret` (a descriptor of the current task, or `-errno`)
/// and reports it when watched. `fill_path` puts the path as passed into its buffer
/// and returns (its length, path flags) and the syscall arguments; it runs only when the
/// file alone does not already say "not watched".
#[inline(always)]
fn decide_open(
    ctx: &TracePointContext,
    ret: i64,
    syscall: Syscall,
    fill_path: impl FnOnce(&mut [u8; PATH_CAP]) -> ((usize, u16), [u64; 3]),
) -> Result<u32, u32> {
    let file_id = if ret >= 0 {
        match_file(fd_file(ret))
    } else {
        None
    };
    if ret >= 0 && file_id.is_none() {
        // The file exists and is not watched, whatever its name.
        return Ok(0);
    }
    let s = OPEN_SCRATCH.get_ptr_mut(0).ok_or(0u32)?;
    // SAFETY: per-CPU scratch slot, exclusively ours while this program runs.
    let s = unsafe { &mut *s };
    // The budget is asked as soon as the record is known to be wanted, before the path and
    // the dentry names are read for it: a refused record costs no more than the decision.
    // A matched file decides here; a failed open once its path has matched. Nothing after
    // the check can drop the record but the ring, so what a budget refuses is unchanged.
    let mut who = None;
    if file_id.is_some() {
        let (now, cgroup) = now_and_cgroup();
        if !admit_at(Lane::Credential, &CRED_EVENTS, cgroup, now) {
            return Err(0);
        }
        who = Some((now, cgroup));
    }
    let rec = OPEN_RECORD.get_ptr_mut(0).ok_or(0u32)?;
    // A matched file's path goes straight into its record; a failed open's into the
    // scratch key, which the prefix trie needs, and into the record only if it matches.
    let ((len, pflags), args) = fill_path(if file_id.is_some() {
        // SAFETY: `rec` is this CPU's record buffer, exclusively ours while this program
        // runs.
        unsafe { &mut (*rec).path }
    } else {
        &mut s.key.data
    });
    let matched = match file_id {
        Some(f) => f.matched,
        None if len > 0 => match_path(&mut s.key, len),
        None => 0,
    };
    if matched == 0 {
        return Ok(0);
    }
    let (now, cgroup) = match who {
        Some(w) => w,
        None => {
            let (now, cgroup) = now_and_cgroup();
            if !admit_at(Lane::Credential, &CRED_EVENTS, cgroup, now) {
                return Err(0);
            }
            (now, cgroup)
        }
    };
    let mut len = len & (PATH_CAP - 1);
    // SAFETY: `rec.path` and the scratch key are both PATH_CAP bytes and `len` is below
    // that; the helper checks the copy.
    if file_id.is_none()
        && unsafe {
            bpf_probe_read_kernel(
                addr_of_mut!((*rec).path).cast(),
                len as u32,
                s.key.data.as_ptr().cast(),
            )
        } != 0
    {
        len = 0;
    }
    emit_open(
        ctx, s, rec, file_id, matched, ret, syscall, args, len, pflags, now, cgroup,
    )
}

/// The clock (the record's time stamp and the budget's now) and the task's cgroup (its
/// header and the budget's key), read once for both.
#[inline(always)]
fn now_and_cgroup() -> (u64, u64) {
    // SAFETY: helpers without memory arguments.
    unsafe { (bpf_ktime_get_boot_ns(), bpf_get_current_cgroup_id()) }
}

// ------------------------------------------------------------------ io_uring

/// `io_uring:io_uring_submit_req`: `void *req` at 16, `u8 opcode` at 32.
const IOU_REQ: usize = 16;
const IOU_OPCODE: usize = 32;
/// `io_uring:io_uring_complete`: `void *req` at 16, `int res` at 32.
const IOU_RES: usize = 32;

/// Remembers io_uring opens at submission, with the path they name (still held by the
/// request: `io_openat_prep` copied it into a `struct filename`).
#[tracepoint]
pub fn io_uring_submit(ctx: TracePointContext) -> u32 {
    let opcode: u8 = field(&ctx, IOU_OPCODE);
    let syscall = match opcode {
        IORING_OP_OPENAT => Syscall::IoUringOpenat,
        IORING_OP_OPENAT2 => Syscall::IoUringOpenat2,
        _ => return 0,
    };
    if !task_is_monitored((bpf_get_current_pid_tgid() >> 32) as u32) {
        return 0;
    }
    let req: u64 = field(&ctx, IOU_REQ);
    let Some(s) = OPEN_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch slot, exclusively ours while this program runs.
    let s = unsafe { &mut *s };
    let o = OFFSETS.load();
    let filename = kread_u64(req, o.req_open_filename);
    let name = kread_u64(filename, o.filename_name);
    s.io.path[0] = 0;
    s.io.path_len = 0;
    s.io.path_flags = path_flags::NO_PATH;
    s.io.syscall = syscall as u16;
    s.io._pad = 0;
    if name != 0 {
        // SAFETY: the helper checks the kernel address and bounds the copy.
        let n = unsafe {
            bpf_probe_read_kernel_str(
                s.io.path.as_mut_ptr().cast(),
                PATH_CAP as u32,
                name as *const _,
            )
        };
        if n > 1 {
            s.io.path_len = ((n as usize - 1) & (PATH_CAP - 1)) as u16;
            s.io.path_flags = if s.io.path[0] == b'/' {
                0
            } else {
                path_flags::RELATIVE
            };
            if n as usize >= PATH_CAP {
                s.io.path_flags |= path_flags::TRUNCATED;
            }
        }
    }
    if IO_OPENS.insert(&req, &s.io, 0).is_err() {
        count_drop(Lane::Credential);
    }
    0
}

/// Decides io_uring opens at completion, as [`open_exit`] does for the syscalls. The
/// completion runs in the submitting process or one of its io-wq workers, which share its
/// descriptor table.
#[tracepoint]
pub fn io_uring_complete(ctx: TracePointContext) -> u32 {
    match try_io_uring_complete(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_io_uring_complete(ctx: &TracePointContext) -> Result<u32, u32> {
    let req: u64 = field(ctx, IOU_REQ);
    // SAFETY: copied out before the entry is removed.
    let Some(io) = (unsafe { IO_OPENS.get(&req) }).copied() else {
        return Ok(0);
    };
    let _ = IO_OPENS.remove(&req);
    let res: i32 = field(ctx, IOU_RES);
    let syscall = if io.syscall == Syscall::IoUringOpenat2 as u16 {
        Syscall::IoUringOpenat2
    } else {
        Syscall::IoUringOpenat
    };
    decide_open(ctx, i64::from(res), syscall, |path| {
        *path = io.path;
        (
            (usize::from(io.path_len) & (PATH_CAP - 1), io.path_flags),
            [0; 3],
        )
    })
}

// ------------------------------------------------------------------ network

/// Reads a user `struct sockaddr` and keeps AF_INET / AF_INET6 destinations.
#[inline(always)]
fn read_sockaddr(addr: u64, fd: i32, syscall: Syscall) -> Option<ConnectArgs> {
    if addr == 0 {
        return None;
    }
    // SAFETY: user pointer read through the checked helper.
    let raw = unsafe { bpf_probe_read_user(addr as *const [u8; SOCKADDR_CAP]) }.ok()?;
    let family = u16::from_ne_bytes([raw[0], raw[1]]);
    let port = u16::from_be_bytes([raw[2], raw[3]]);
    let mut out = ConnectArgs {
        // SAFETY: helper without memory arguments.
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        addr: [0; 16],
        fd,
        family,
        port,
        syscall: syscall as u16,
        _pad: [0; 6],
    };
    match family {
        // struct sockaddr_in: family, port, 4-byte address.
        AF_INET => out.addr[..4].copy_from_slice(&raw[4..8]),
        // struct sockaddr_in6: family, port, flowinfo, 16-byte address.
        AF_INET6 => out.addr.copy_from_slice(&raw[8..24]),
        _ => return None,
    }
    Some(out)
}

#[inline(always)]
fn stash_destination(addr: u64, fd: i32, syscall: Syscall) -> Result<u32, u32> {
    let id = bpf_get_current_pid_tgid();
    if !task_is_monitored((id >> 32) as u32) {
        return Ok(0);
    }
    let Some(args) = read_sockaddr(addr, fd, syscall) else {
        return Ok(0);
    };
    if syscall == Syscall::Connect && is_stream_socket(i64::from(fd)) {
        return Ok(0);
    }
    if NET_STASH.insert(&id, &args, 0).is_err() {
        count_drop(Lane::Network);
    } else {
        inflight_add(INFLIGHT_NET, 1);
    }
    Ok(0)
}

/// `SOCK_STREAM` (include/linux/net.h).
const SOCK_STREAM: u16 = 1;
/// `TCP_SYN_SENT` (include/net/tcp_states.h) and `IPPROTO_TCP`.
const TCP_SYN_SENT: i32 = 2;
const IPPROTO_TCP: u16 = 6;

/// Whether descriptor `fd` of the current task is a stream socket. TCP connects are
/// reported where the socket enters SYN-SENT ([`tcp_syn_sent`]), whatever submitted them,
/// so the syscall path skips them to report each connect once.
#[inline(always)]
fn is_stream_socket(fd: i64) -> bool {
    let o = OFFSETS.load();
    if o.socket_type == NO_FIELD {
        return false;
    }
    let file = fd_file(fd);
    let sock = kread_u64(file, o.file_private_data);
    if sock == 0 {
        return false;
    }
    // SAFETY: the helper checks the kernel address.
    let ty = unsafe { kernel_read((sock + u64::from(o.socket_type)) as *const u16) }.unwrap_or(0);
    ty == SOCK_STREAM
}

#[tracepoint]
pub fn connect_enter(ctx: TracePointContext) -> u32 {
    // sys_enter_connect: fd, uservaddr, addrlen.
    let fd: u64 = field(&ctx, ARG0);
    let addr: u64 = field(&ctx, ARG1);
    match stash_destination(addr, fd as i32, Syscall::Connect) {
        Ok(r) | Err(r) => r,
    }
}

#[tracepoint]
pub fn sendto_enter(ctx: TracePointContext) -> u32 {
    // sys_enter_sendto: fd, buff, len, flags, addr, addr_len.
    let fd: u64 = field(&ctx, ARG0);
    let addr: u64 = field(&ctx, ARG4);
    match stash_destination(addr, fd as i32, Syscall::Sendto) {
        Ok(r) | Err(r) => r,
    }
}

#[tracepoint]
pub fn sendmsg_enter(ctx: TracePointContext) -> u32 {
    // sys_enter_sendmsg: fd, msg (struct user_msghdr *), flags. The destination is
    // msg->msg_name, the first member (include/linux/socket.h).
    let fd: u64 = field(&ctx, ARG0);
    let msg: u64 = field(&ctx, ARG1);
    if msg == 0 {
        return 0;
    }
    // SAFETY: user pointer read through the checked helper.
    let name = unsafe { bpf_probe_read_user(msg as *const u64) }.unwrap_or(0);
    match stash_destination(name, fd as i32, Syscall::Sendmsg) {
        Ok(r) | Err(r) => r,
    }
}

/// Attached to `sys_exit_connect`, `sys_exit_sendto` and `sys_exit_sendmsg`.
#[tracepoint]
pub fn net_exit(ctx: TracePointContext) -> u32 {
    match try_net_exit(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_net_exit(ctx: &TracePointContext) -> Result<u32, u32> {
    if !inflight(INFLIGHT_NET) {
        return Ok(0);
    }
    let id = bpf_get_current_pid_tgid();
    let Some(args) = NET_STASH.get_ptr(&id) else {
        return Ok(0);
    };
    let ret: i64 = field(ctx, EXIT_RET);
    // SAFETY: `args` points into the stash map value, removed only below.
    emit_net(ctx, unsafe { &*args }, ret);
    if NET_STASH.remove(&id).is_ok() {
        inflight_add(INFLIGHT_NET, u64::MAX);
    }
    Ok(0)
}

/// `sock:inet_sock_set_state` record offsets (see its format file).
const SS_NEWSTATE: usize = 20;
const SS_DPORT: usize = 26;
const SS_FAMILY: usize = 28;
const SS_PROTOCOL: usize = 30;
const SS_DADDR: usize = 36;
const SS_DADDR_V6: usize = 56;

/// A TCP socket entering SYN-SENT: reported in the context of the task that connects
/// (the connect syscall, an io_uring submitter or io-wq worker of the same process).
#[tracepoint]
pub fn tcp_syn_sent(ctx: TracePointContext) -> u32 {
    let newstate: i32 = field(&ctx, SS_NEWSTATE);
    let protocol: u16 = field(&ctx, SS_PROTOCOL);
    if newstate != TCP_SYN_SENT || protocol != IPPROTO_TCP {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    if !task_is_monitored((id >> 32) as u32) {
        return 0;
    }
    let family: u16 = field(&ctx, SS_FAMILY);
    let mut args = ConnectArgs {
        // SAFETY: helper without memory arguments.
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        addr: [0; 16],
        fd: -1,
        family,
        port: field(&ctx, SS_DPORT),
        syscall: Syscall::TcpConnect as u16,
        _pad: [0; 6],
    };
    // Loaded as whole words at constant offsets: the verifier refuses byte loads through
    // a moved context pointer, which is what an array copy compiles to.
    match family {
        AF_INET => {
            let a: u32 = field(&ctx, SS_DADDR);
            args.addr[..4].copy_from_slice(&a.to_ne_bytes());
        }
        AF_INET6 => {
            let lo: u64 = field(&ctx, SS_DADDR_V6);
            let hi: u64 = field(&ctx, SS_DADDR_V6 + 8);
            args.addr[..8].copy_from_slice(&lo.to_ne_bytes());
            args.addr[8..].copy_from_slice(&hi.to_ne_bytes());
        }
        _ => return 0,
    }
    emit_net(&ctx, &args, 0);
    0
}

/// Submits a network record for the current task, or counts (and logs) a drop.
#[inline(always)]
fn emit_net(ctx: &TracePointContext, args: &ConnectArgs, ret: i64) {
    if !admit(Lane::Network, &NET_EVENTS) {
        return;
    }
    match NET_EVENTS.reserve::<ConnectEvent>(0) {
        Some(mut entry) => {
            let ev = entry.as_mut_ptr();
            // SAFETY: `ev` is the reserved record.
            unsafe {
                (*ev).args = *args;
                fill_header(
                    addr_of_mut!((*ev).header),
                    EventKind::Connect,
                    args.ts_ns,
                    bpf_get_current_pid_tgid(),
                    bpf_get_current_cgroup_id(),
                );
                (*ev).ret = ret;
            }
            entry.submit(wakeup_flag(&NET_EVENTS, Lane::Network));
        }
        None => {
            count_drop(Lane::Network);
            warn!(
                ctx,
                "network ring full: record of tid {} lost",
                bpf_get_current_pid_tgid() as u32
            );
        }
    }
}

/// `sock:sock_send_length`: `void *sk` at 8, `__u16 family` at 16, `int ret` at 20.
const SEND_SK: usize = 8;
const SEND_FAMILY: usize = 16;
const SEND_RET: usize = 20;

/// Data leaving on an inet socket, whatever the syscall (`write`, `send*`, `sendfile`,
/// `splice`, io_uring): reported once per socket within the correlation window, and only
/// for processes that read a watched file within it. Everyone else pays one array lookup.
#[tracepoint]
pub fn sock_send(ctx: TracePointContext) -> u32 {
    if CRED_READERS_ACTIVE.get(0).is_none_or(|n| *n == 0) {
        return 0;
    }
    let family: u16 = field(&ctx, SEND_FAMILY);
    if family != AF_INET && family != AF_INET6 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    // SAFETY: copied out.
    let Some(read_at) = (unsafe { CRED_READERS.get(&tgid) }).copied() else {
        return 0;
    };
    // SAFETY: helper without memory arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let window = EXFIL_WINDOW_NS.load();
    if now.saturating_sub(read_at) > window || tgid == OWN_TGID.load() {
        return 0;
    }
    let sk: u64 = field(&ctx, SEND_SK);
    let key = SentKey { tgid, _pad: 0, sk };
    // SAFETY: copied out.
    if let Some(at) = unsafe { SENT.get(&key) }.copied() {
        if at >= read_at && now.saturating_sub(at) <= window {
            return 0;
        }
    }
    let _ = SENT.insert(&key, &now, 0);
    let o = OFFSETS.load();
    let mut args = ConnectArgs {
        ts_ns: now,
        addr: [0; 16],
        fd: -1,
        family,
        port: u16::from_be(kread_u32(sk, o.sk_dport) as u16),
        syscall: Syscall::Send as u16,
        _pad: [0; 6],
    };
    if family == AF_INET {
        args.addr[..4].copy_from_slice(&kread_u32(sk, o.sk_daddr).to_ne_bytes());
    } else if o.sk_v6_daddr != NO_FIELD {
        // SAFETY: the helper checks the kernel address.
        args.addr = unsafe { kernel_read((sk + u64::from(o.sk_v6_daddr)) as *const [u8; 16]) }
            .unwrap_or([0; 16]);
    }
    if args.addr == [0; 16] {
        // Not connected: a datagram with an address, reported by the sendto/sendmsg path.
        return 0;
    }
    let ret: i32 = field(&ctx, SEND_RET);
    emit_net(&ctx, &args, i64::from(ret));
    0
}

// ------------------------------------------------------------------ process lifecycle

/// Reserves a process record with its header filled, or counts a drop.
#[inline(always)]
fn reserve_proc(kind: EventKind) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<ProcEvent>> {
    let id = bpf_get_current_pid_tgid();
    if !task_is_monitored((id >> 32) as u32) {
        return None;
    }
    // What the process lane's budget may drop: forks and exits only. A lost exec would
    // leave the process named by its previous executable, which is what a flooder hiding
    // a `cat` behind its own name wants; an exec costs milliseconds, so it cannot flood
    // anyway. A lost fork or exit costs less: the table reads /proc for a process it has
    // not seen and prunes the dead ones.
    if kind != EventKind::Exec && !admit(Lane::Process, &PROC_EVENTS) {
        return None;
    }
    let Some(mut entry) = PROC_EVENTS.reserve::<ProcEvent>(0) else {
        count_drop(Lane::Process);
        return None;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved record.
    unsafe {
        // SAFETY: helper without memory arguments.
        fill_header(
            addr_of_mut!((*ev).header),
            kind,
            bpf_ktime_get_boot_ns(),
            id,
            bpf_get_current_cgroup_id(),
        );
        (*ev).child_pid = 0;
        (*ev).group_dead = GROUP_UNKNOWN;
        (*ev)._pad = 0;
        (*ev).filename_len = 0;
    }
    Some(entry)
}

#[tracepoint]
pub fn sched_exec(ctx: TracePointContext) -> u32 {
    let Some(mut entry) = reserve_proc(EventKind::Exec) else {
        return 0;
    };
    let ev = entry.as_mut_ptr();
    // __data_loc: low 16 bits are the offset of the string in the record, high 16 its length.
    let loc: u32 = field(&ctx, EXEC_FILENAME_LOC);
    let old_pid: u32 = field(&ctx, EXEC_OLD_PID);
    // SAFETY: `ev` is the reserved record; the source is inside the tracepoint record.
    unsafe {
        (*ev).child_pid = old_pid;
        let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
        let n = bpf_probe_read_kernel_str(
            addr_of_mut!((*ev).filename) as *mut _,
            PATH_CAP as u32,
            src as *const _,
        );
        (*ev).filename_len = if n > 0 { (n - 1) as u16 } else { 0 };
    }
    entry.submit(wakeup_flag(&PROC_EVENTS, Lane::Process));
    0
}

#[tracepoint]
pub fn sched_fork(ctx: TracePointContext) -> u32 {
    let off = FORK_CHILD_PID_OFFSET.load();
    if off == NO_FIELD {
        return 0;
    }
    let Some(mut entry) = reserve_proc(EventKind::Fork) else {
        return 0;
    };
    let ev = entry.as_mut_ptr();
    let child: u32 = field_at_runtime_offset(&ctx, off).unwrap_or(0);
    // SAFETY: `ev` is the reserved record.
    unsafe { (*ev).child_pid = child };
    entry.submit(wakeup_flag(&PROC_EVENTS, Lane::Process));
    0
}

#[tracepoint]
pub fn sched_exit(ctx: TracePointContext) -> u32 {
    let off = EXIT_GROUP_DEAD_OFFSET.load();
    let group_dead = if off == NO_FIELD {
        GROUP_UNKNOWN
    } else if field_at_runtime_offset::<u8>(&ctx, off).unwrap_or(1) != 0 {
        GROUP_DEAD
    } else {
        GROUP_ALIVE
    };
    // Threads ending inside a living process do not change the process table.
    if group_dead == GROUP_ALIVE {
        return 0;
    }
    let Some(mut entry) = reserve_proc(EventKind::Exit) else {
        return 0;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved record.
    unsafe { (*ev).group_dead = group_dead };
    entry.submit(wakeup_flag(&PROC_EVENTS, Lane::Process));
    0
}
