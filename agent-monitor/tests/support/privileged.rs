//! Whether a test that runs the real daemon can run here: root, tracefs and a cgroup2
//! mount. It skips with the reason when they are missing, and fails instead when
//! `AGENT_MONITOR_REQUIRE_PRIVILEGED=1` (as `cargo xtask test` sets) promises it runs.

use std::path::Path;

pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tracefs = Path::new("/sys/kernel/tracing/events/syscalls").is_dir()
        || Path::new("/sys/kernel/debug/tracing/events/syscalls").is_dir();
    let cgroup2 = agent_monitor::identity::cgroup::cgroup2_mount().is_some();
    let why = match (root, tracefs, cgroup2) {
        (false, _, _) => "not root",
        (_, false, _) => "tracefs is not mounted (cargo xtask setup)",
        (_, _, false) => "no cgroup2 mount",
        _ => return true,
    };
    if std::env::var("AGENT_MONITOR_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test}: required privileged test cannot run: {why}");
    }
    eprintln!("SKIPPED {test}: needs root and BPF: {why}");
    false
}
