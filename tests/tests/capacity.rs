//! A full kernel map is reported and retried, never silently dropped: with room for two
//! watched filesystems, a third pod volume is refused (counted, pending) and its reads are
//! not matched by identity; once another pod's volume is unmounted, the refused one is
//! installed on the next sync and its reads are reported. Needs root and BPF.

use std::{
    os::unix::fs::MetadataExt as _,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use agent_monitor::{config::Config, events::Record, identity::watched::kernel_dev_of_st_dev};
use agent_monitor_tests::{
    privileged, run_kid, sim::SimPod, unique, Harness, TempTree, TestCgroup,
};

const WAIT: Duration = Duration::from_secs(15);

#[test]
fn a_full_watched_filesystem_map_is_reported_and_retried() {
    if !privileged("a_full_watched_filesystem_map_is_reported_and_retried") {
        return;
    }
    let tree = TempTree::new("am-capacity");
    let kroot = tree.root.join("kubelet");
    let top_name = unique("am-test-capacity");
    let top = TestCgroup::create(&top_name);
    let pods: Vec<SimPod> = (0..3)
        .map(|i| SimPod::new(&top_name, 0x5100_0000 + i, &format!("agent-{i}"), "x"))
        .collect();
    let vols: Vec<_> = pods.iter().map(|p| p.kubelet_volume(&kroot)).collect();
    let devs: Vec<u32> = vols
        .iter()
        .map(|v| kernel_dev_of_st_dev(std::fs::metadata(v).expect("stat").dev()))
        .collect();

    let mut config = Config::default();
    config.identity.kubelet_root = kroot.display().to_string();
    config.cgroups = vec![top.path.clone()];
    config.watch.prefixes = Vec::new();
    config.kernel_maps.watched_filesystems = 2;
    let mut h = Harness::start(&config);
    let status = h.watch_status();
    assert_eq!(
        status.inventory.load(Ordering::SeqCst),
        0,
        "this test expects a node without credential files of its own"
    );
    let in_kernel = || {
        status
            .kernel_filesystems
            .lock()
            .map(|k| k.clone())
            .unwrap_or_default()
    };
    let installed = in_kernel();
    assert_eq!(installed.len(), 2, "two fit: {installed:?}");
    assert_eq!(status.volumes.load(Ordering::SeqCst), 2);
    assert_eq!(
        status.pending.load(Ordering::SeqCst),
        1,
        "one waits for room"
    );
    assert!(
        status.map_full.load(Ordering::SeqCst) >= 1,
        "the refusal is counted"
    );
    let refused = (0..3)
        .find(|i| !installed.contains(&devs[*i]))
        .expect("one volume is not in the kernel");
    let kept = (0..3).find(|i| *i != refused).expect("another volume");

    // The refused volume's token is not matched by identity; a kept one is (control).
    let cg = TestCgroup::create(&format!("{top_name}/reader"));
    let miss = run_kid(
        &cg,
        0,
        &[format!("openat:{}/token", vols[refused].display())],
    );
    let hit = run_kid(&cg, 0, &[format!("openat:{}/token", vols[kept].display())]);
    let opens_of = |r: &[Record], pid: u32| {
        r.iter()
            .filter(|r| matches!(r, Record::Open(o) if o.task.tgid == pid))
            .count()
    };
    h.wait_until(WAIT, |r| opens_of(r, hit.pid) == 1);
    h.settle(Duration::from_millis(200));
    assert_eq!(opens_of(&h.records, miss.pid), 0);

    // Room appears when a pod is deleted: the refused volume is installed on the next sync.
    pods[kept].unmount_volumes();
    let deadline = Instant::now() + WAIT;
    while !in_kernel().contains(&devs[refused]) {
        assert!(
            Instant::now() < deadline,
            "the refused volume was never retried"
        );
        h.settle(Duration::from_millis(50));
    }
    assert_eq!(status.pending.load(Ordering::SeqCst), 0);
    let now = run_kid(
        &cg,
        0,
        &[format!("openat:{}/token", vols[refused].display())],
    );
    h.wait_until(WAIT, |r| opens_of(r, now.pid) == 1);
    let o = h
        .records
        .iter()
        .find_map(|r| match r {
            Record::Open(o) if o.task.tgid == now.pid => Some(o),
            _ => None,
        })
        .expect("open");
    assert_eq!(o.matched_by, "volume");
    assert_eq!(
        o.owner.as_ref().and_then(|x| x.pod_uid.as_deref()),
        Some(pods[refused].uid.as_str())
    );
}
