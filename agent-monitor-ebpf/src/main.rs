//! eBPF side of agent-monitor: syscall and sched tracepoints only, because kprobes, fentry
//! and BPF-LSM are not available on every node we target.
//!
//! Three lanes, each with its own ring buffer so that a flood in one cannot push out
//! events of another: credential opens, network destinations, process lifecycle. A record
//! that does not fit in its ring is counted in the per-CPU `DROPS` array, never lost
//! silently.
//!
//! Syscall record offsets come from `/sys/kernel/tracing/events/syscalls/<name>/format`;
//! the syscall tracepoint layouts are stable ABI. The sched tracepoints changed layout
//! (`sched_process_fork` moved `child_pid` when its comms became `__data_loc`), so the daemon reads
//! their format files and hands the offsets in as globals.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// For `atomic_xadd`: the BPF target offers no `AtomicU64::fetch_add` (see probes.rs).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod probes;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: eBPF programs cannot panic; the verifier rejects any reachable path here.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
