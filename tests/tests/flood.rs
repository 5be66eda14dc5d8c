//! Fairness under flood (CVE-2019-8339 is the flood evasion this guards against): one
//! simulated pod opens a watched file and connects to a local listener as fast as it can,
//! pinned to one CPU, while another pod reads its own token 1,000 times. Every one of the
//! second pod's reads arrives, with its identity, and what the flooder's budget dropped is
//! counted and reported naming the flooder. Needs root and BPF.

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use agent_monitor::{
    config::{Config, PodSourceKind},
    events::{LostReason, Record},
};
use agent_monitor_tests::{
    privileged,
    sim::{pods_file, run_in_pod, SimPod},
    testkid, unique, Harness, TempTree, TestCgroup,
};

/// Reads the victim makes.
const READS: usize = 1000;
/// Microseconds between the victim's reads: a workload reading its token steadily.
const READ_GAP_US: u64 = 500;
/// Opens per connect in the flooder's loop: a connect costs ten times an open, so this
/// keeps both lanes busy.
const OPENS_PER_CONNECT: u32 = 16;
/// The credential ring: 64 KiB holds ~340 open records, a quarter of them (what stays
/// free for workloads within their share) ~85, some 40 ms of the victim's reads.
const CREDENTIAL_RING_BYTES: u32 = 64 * 1024;
/// The CPU the flooder is pinned to.
const FLOOD_CPU: usize = 0;
/// How long the flood runs before the victim starts, so the credential ring is under
/// pressure when it does.
const HEAD_START: Duration = Duration::from_secs(1);

#[test]
fn a_flooding_pod_costs_another_pod_none_of_its_credential_reads() {
    if !privileged("a_flooding_pod_costs_another_pod_none_of_its_credential_reads") {
        return;
    }
    let tree = TempTree::new("am-flood");
    let kroot = tree.root.join("kubelet");
    let top_name = unique("am-test-flood");
    let top = TestCgroup::create(&top_name);
    let flooder = SimPod::new(&top_name, 0x7100_0001, "agent-f", "flooder");
    let victim = SimPod::new(&top_name, 0x7100_0002, "agent-v", "victim");
    let flood_vol = flooder.kubelet_volume(&kroot);
    victim.kubelet_volume(&kroot);
    let pods = tree.root.join("pods.json");
    pods_file(&pods, &[flooder.json(None), victim.json(None)]);

    let mut config = Config::default();
    config.identity.kubelet_root = kroot.display().to_string();
    config.identity.pods.source = PodSourceKind::File;
    config.identity.pods.file = Some(pods.clone());
    config.cgroups = vec![top.path.clone()];
    // A small credential ring, so that the flood puts it under pressure however fast this
    // machine drains it: the budget then has to hold, and its drops to be reported.
    config.lanes.credential.ring_bytes = CREDENTIAL_RING_BYTES;
    let (mut h, _store) = Harness::start_with_pods_file(&config, &pods, 2);

    // The listener accepts and drops, so the flooder's connects never wait for a backlog.
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                drop(conn);
            }
        })
    };

    let victim_cg = victim.cgroup.id;
    let flooder_cg = flooder.cgroup.id;
    let mut flood_opens_delivered = 0u64;
    let keep = |flood_opens: &mut u64, r: &Record| match r {
        Record::Open(o) if o.task.cgroup_id == flooder_cg => {
            *flood_opens += 1;
            false
        }
        Record::Open(o) => o.task.cgroup_id == victim_cg,
        Record::Lost(_) => true,
        _ => false,
    };

    let mut flood = Command::new(testkid())
        .arg("--cgroup")
        .arg(&flooder.cgroup.path)
        .arg("--cpu")
        .arg(FLOOD_CPU.to_string())
        .arg(format!(
            "flood-mixed:{}/token:127.0.0.1:{port}:0:{OPENS_PER_CONNECT}",
            flood_vol.display()
        ))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn flooder");
    h.pump(HEAD_START, |r| keep(&mut flood_opens_delivered, r));

    let reader = {
        let kroot = kroot.clone();
        std::thread::spawn(move || {
            let out = run_in_pod(
                &victim,
                &kroot,
                &[],
                &[format!(
                    "paced-opens:/var/run/secrets/kubernetes.io/serviceaccount/token:{READS}:{READ_GAP_US}"
                )],
                false,
            );
            (victim, out)
        })
    };
    while !reader.is_finished() {
        h.pump(Duration::from_millis(50), |r| {
            keep(&mut flood_opens_delivered, r)
        });
    }
    let (victim, out) = reader.join().expect("victim thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("paced-opens:") && l.ends_with(&format!(" {READS}"))),
        "the victim's reads all succeeded: {stdout}"
    );
    // The flooder is this test's own child, ended by its id.
    flood.kill().expect("stop the flooder");
    let _ = flood.wait();
    stop.store(true, Ordering::Relaxed);
    let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    let _ = acceptor.join();
    // What is still in the rings and the last drop counters.
    h.pump(Duration::from_secs(2), |r| {
        keep(&mut flood_opens_delivered, r)
    });

    let reads: Vec<_> = h
        .records
        .iter()
        .filter_map(|r| match r {
            Record::Open(o) if o.task.cgroup_id == victim_cg && o.result >= 0 => Some(o),
            _ => None,
        })
        .collect();
    let lost: Vec<_> = h
        .records
        .iter()
        .filter_map(|r| match r {
            Record::Lost(l) => Some(l),
            _ => None,
        })
        .collect();
    assert_eq!(
        reads.len(),
        READS,
        "every read of the victim arrives (flooder opens delivered: {flood_opens_delivered}; lost records: {lost:?})"
    );
    for o in &reads {
        assert_eq!(o.task.workload.pod.as_deref(), Some(victim.name.as_str()));
        assert_eq!(
            o.owner.as_ref().and_then(|x| x.pod_uid.as_deref()),
            Some(victim.uid.as_str()),
            "its own token"
        );
    }
    let over_budget = |pod: &str| -> u64 {
        lost.iter()
            .filter(|l| {
                l.reason == LostReason::Budget
                    && l.workload.as_ref().and_then(|w| w.pod.as_deref()) == Some(pod)
            })
            .map(|l| l.count)
            .sum()
    };
    let flooder_dropped = over_budget(&flooder.name);
    assert!(
        flooder_dropped > 0,
        "the flooder's budget drops are reported naming it (flooder opens delivered: {flood_opens_delivered}; lost: {lost:?})"
    );
    assert_eq!(
        over_budget(&victim.name),
        0,
        "the victim stayed within budget"
    );
    // The flooder never forks or exits while it floods: its process lane has nothing for
    // a budget to drop, and a count there is a miscounted one.
    let process_drops: u64 = lost
        .iter()
        .filter(|l| {
            l.reason == LostReason::Budget
                && l.lane == "process"
                && l.workload.as_ref().and_then(|w| w.pod.as_deref()) == Some(flooder.name.as_str())
        })
        .map(|l| l.count)
        .sum();
    assert_eq!(
        process_drops, 0,
        "process-lane budget drops of the flooder: {lost:?}"
    );
    let named = lost
        .iter()
        .find(|l| l.reason == LostReason::Budget)
        .and_then(|l| l.workload.as_ref())
        .expect("a budget drop");
    assert_eq!(named.namespace.as_deref(), Some("agents"));
    assert_eq!(named.pod_uid.as_deref(), Some(flooder.uid.as_str()));
    eprintln!(
        "flood: victim {} / {READS} reads delivered; flooder: {flood_opens_delivered} opens delivered, {flooder_dropped} records dropped over budget",
        reads.len()
    );
}
