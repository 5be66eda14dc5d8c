//! The tracepoint programs. Entry points are thin wrappers around `try_*` functions.

use core::{
    intrinsics::{atomic_xadd, AtomicOrdering},
    mem::size_of,
    ptr::addr_of_mut,
};

use agent_monitor_common::{
    path_flags, ConnectArgs, ConnectEvent, EventHeader, EventKind, Lane, OpenArgs, OpenEvent,
    ProcEvent, Syscall, AT_FDCWD, BASENAME_CAP, GROUP_ALIVE, GROUP_DEAD, GROUP_UNKNOWN, LANE_COUNT,
    MAX_CGROUP_DEPTH, NO_FIELD, PATH_CAP,
};
use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel_buf, bpf_probe_read_user,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns,
            bpf_loop, bpf_probe_read_kernel, bpf_probe_read_kernel_str, bpf_probe_read_user_str,
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
const MAX_PREFIXES: u32 = 4096;
const MAX_BASENAMES: u32 = 1024;
const MAX_CGROUPS: u32 = 16 * 1024;

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

/// Open arguments between syscall entry and exit, by pid_tgid.
#[map]
static OPEN_STASH: LruHashMap<u64, OpenArgs> =
    LruHashMap::with_max_entries(STASH_ENTRIES, BPF_F_NO_COMMON_LRU);
/// Connect/send destinations between syscall entry and exit, by pid_tgid.
#[map]
static NET_STASH: LruHashMap<u64, ConnectArgs> =
    LruHashMap::with_max_entries(STASH_ENTRIES, BPF_F_NO_COMMON_LRU);
/// Stash entries made and not yet collected, for opens (index 0) and network syscalls
/// (index 1). An exit program whose counter is zero returns without a hash lookup, which
/// is most of the cost it adds to every unwatched open. Entries that never meet their
/// exit (evicted, or a thread killed in between) keep the count above zero: that only
/// costs speed, never an event.
#[map]
static INFLIGHT: Array<u64> = Array::with_max_entries(2, 0);
const INFLIGHT_OPEN: u32 = 0;
const INFLIGHT_NET: u32 = 1;

/// Per-CPU scratch: the 288-byte open arguments do not fit the 512-byte stack with the rest.
#[map]
static OPEN_SCRATCH: PerCpuArray<OpenArgs> = PerCpuArray::with_max_entries(1, 0);
#[map]
static BASENAME_SCRATCH: PerCpuArray<[u8; BASENAME_CAP]> = PerCpuArray::with_max_entries(1, 0);

// ---- syscall record offsets (stable ABI; see the format files) ----

/// `sys_enter_*`: first argument; each further argument is 8 bytes on.
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
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

/// Fills the header of a reserved record for the current task.
///
/// # Safety
/// `h` points to a reserved, writable ring-buffer record.
#[inline(always)]
unsafe fn fill_header(h: *mut EventHeader, kind: EventKind, ts_ns: u64) {
    let id = bpf_get_current_pid_tgid();
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
        (*h).cgroup_id = bpf_get_current_cgroup_id();
        (*h).comm = bpf_get_current_comm().unwrap_or([0; 16]);
    }
}

// ------------------------------------------------------------------ opens

#[tracepoint]
pub fn open_enter(ctx: TracePointContext) -> u32 {
    // sys_enter_open: filename, flags, mode.
    let filename: u64 = field(&ctx, ARG0);
    let flags: u64 = field(&ctx, ARG1);
    let mode: u64 = field(&ctx, ARG2);
    match try_open_enter(filename, AT_FDCWD, flags as u32, mode as u32, Syscall::Open) {
        Ok(r) | Err(r) => r,
    }
}

#[tracepoint]
pub fn openat_enter(ctx: TracePointContext) -> u32 {
    // sys_enter_openat: dfd, filename, flags, mode.
    let dfd: u64 = field(&ctx, ARG0);
    let filename: u64 = field(&ctx, ARG1);
    let flags: u64 = field(&ctx, ARG2);
    let mode: u64 = field(&ctx, ARG2 + 8);
    match try_open_enter(
        filename,
        dfd as i32,
        flags as u32,
        mode as u32,
        Syscall::Openat,
    ) {
        Ok(r) | Err(r) => r,
    }
}

#[tracepoint]
pub fn openat2_enter(ctx: TracePointContext) -> u32 {
    // sys_enter_openat2: dfd, filename, how (struct open_how *), usize.
    let dfd: u64 = field(&ctx, ARG0);
    let filename: u64 = field(&ctx, ARG1);
    let how: u64 = field(&ctx, ARG2);
    // struct open_how { __u64 flags; __u64 mode; __u64 resolve; } (include/uapi/linux/openat2.h)
    // SAFETY: user pointer read through the checked helper.
    let how = unsafe { bpf_probe_read_user(how as *const [u64; 2]) }.unwrap_or([0; 2]);
    match try_open_enter(
        filename,
        dfd as i32,
        how[0] as u32,
        how[1] as u32,
        Syscall::Openat2,
    ) {
        Ok(r) | Err(r) => r,
    }
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
    let Some(args) = OPEN_SCRATCH.get_ptr(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch slot filled by the caller on this CPU.
    if byte_at(unsafe { &(*args).path.data }, index as usize) == b'/' {
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

// Inlined into each entry point: BPF calls take at most five arguments.
#[inline(always)]
fn try_open_enter(
    filename: u64,
    dirfd: i32,
    flags: u32,
    mode: u32,
    syscall: Syscall,
) -> Result<u32, u32> {
    let id = bpf_get_current_pid_tgid();
    if !task_is_monitored((id >> 32) as u32) {
        return Ok(0);
    }
    let args = OPEN_SCRATCH.get_ptr_mut(0).ok_or(0u32)?;
    // SAFETY: per-CPU scratch slot, exclusively ours while this program runs.
    let args = unsafe { &mut *args };
    // SAFETY: the helper checks the user pointer and bounds the copy by the buffer size.
    let n = unsafe {
        bpf_probe_read_user_str(
            args.path.data.as_mut_ptr().cast(),
            PATH_CAP as u32,
            filename as *const _,
        )
    };
    if n <= 1 {
        return Ok(0);
    }
    // n counts the NUL; n == PATH_CAP means the string may have been cut there.
    let len = (n as usize - 1) & (PATH_CAP - 1);
    let mut pflags = 0u16;
    if n as usize >= PATH_CAP {
        pflags |= path_flags::TRUNCATED;
    }
    let watched = if args.path.data[0] == b'/' {
        args.path.prefix_len = (len * 8) as u32;
        // SAFETY: PathKey has the layout of Key<[u8; PATH_CAP]> (repr(C), u32 then bytes).
        let key = unsafe { &*(&args.path as *const _ as *const Key<[u8; PATH_CAP]>) };
        if WATCH_PREFIXES.get(key).is_some() {
            true
        } else if WATCH_PROC_ENVIRON.load() != 0 && is_proc_environ(&args.path.data, len) {
            pflags |= path_flags::PROC_ENVIRON;
            true
        } else {
            false
        }
    } else {
        pflags |= path_flags::RELATIVE;
        basename_is_watched(&args.path.data, len)
    };
    if !watched {
        return Ok(0);
    }
    args.path_len = len as u16;
    args.syscall = syscall as u16;
    args.flags = flags;
    args.mode = mode;
    args.dirfd = dirfd;
    args.path_flags = pflags;
    args._pad = 0;
    // SAFETY: helper without memory arguments.
    args.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
    if OPEN_STASH.insert(&id, &*args, 0).is_err() {
        count_drop(Lane::Credential);
    } else {
        inflight_add(INFLIGHT_OPEN, 1);
    }
    Ok(0)
}

/// Attached to `sys_exit_open`, `sys_exit_openat` and `sys_exit_openat2`.
#[tracepoint]
pub fn open_exit(ctx: TracePointContext) -> u32 {
    match try_open_exit(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_open_exit(ctx: &TracePointContext) -> Result<u32, u32> {
    if !inflight(INFLIGHT_OPEN) {
        return Ok(0);
    }
    let id = bpf_get_current_pid_tgid();
    let Some(args) = OPEN_STASH.get_ptr(&id) else {
        return Ok(0);
    };
    let ret: i64 = field(ctx, EXIT_RET);
    match CRED_EVENTS.reserve::<OpenEvent>(0) {
        Some(mut entry) => {
            let ev = entry.as_mut_ptr();
            // SAFETY: `ev` is the reserved record; `args` points into the stash map value,
            // copied with the kernel-read helper (one call instead of an unrolled memcpy).
            unsafe {
                let dst = core::slice::from_raw_parts_mut(
                    addr_of_mut!((*ev).args) as *mut u8,
                    size_of::<OpenArgs>(),
                );
                if bpf_probe_read_kernel_buf(args as *const u8, dst).is_err() {
                    entry.discard(0);
                    if OPEN_STASH.remove(&id).is_ok() {
                        inflight_add(INFLIGHT_OPEN, u64::MAX);
                    }
                    return Err(0);
                }
                fill_header(
                    addr_of_mut!((*ev).header),
                    EventKind::Open,
                    (*ev).args.ts_ns,
                );
                (*ev).ret = ret;
            }
            entry.submit(wakeup_flag(&CRED_EVENTS, Lane::Credential));
        }
        None => {
            count_drop(Lane::Credential);
            warn!(ctx, "credential ring full: open by tid {} lost", id as u32);
        }
    }
    if OPEN_STASH.remove(&id).is_ok() {
        inflight_add(INFLIGHT_OPEN, u64::MAX);
    }
    Ok(0)
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
    if NET_STASH.insert(&id, &args, 0).is_err() {
        count_drop(Lane::Network);
    } else {
        inflight_add(INFLIGHT_NET, 1);
    }
    Ok(0)
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
    match NET_EVENTS.reserve::<ConnectEvent>(0) {
        Some(mut entry) => {
            let ev = entry.as_mut_ptr();
            // SAFETY: `ev` is the reserved record; `args` points into the stash map value.
            unsafe {
                (*ev).args = *args;
                fill_header(
                    addr_of_mut!((*ev).header),
                    EventKind::Connect,
                    (*ev).args.ts_ns,
                );
                (*ev).ret = ret;
            }
            entry.submit(wakeup_flag(&NET_EVENTS, Lane::Network));
        }
        None => {
            count_drop(Lane::Network);
            warn!(ctx, "network ring full: connect by tid {} lost", id as u32);
        }
    }
    if NET_STASH.remove(&id).is_ok() {
        inflight_add(INFLIGHT_NET, u64::MAX);
    }
    Ok(0)
}

// ------------------------------------------------------------------ process lifecycle

/// Reserves a process record with its header filled, or counts a drop.
#[inline(always)]
fn reserve_proc(kind: EventKind) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<ProcEvent>> {
    let id = bpf_get_current_pid_tgid();
    if !task_is_monitored((id >> 32) as u32) {
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
        fill_header(addr_of_mut!((*ev).header), kind, bpf_ktime_get_boot_ns());
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
