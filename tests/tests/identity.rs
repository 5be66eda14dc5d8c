//! Who did it and whose credential it was, on a simulated node: pod cgroups named exactly
//! as the kubelet's systemd driver names them, pod metadata from a pods file, a kubelet
//! root laid out as the kubelet lays out projected volumes (`..data` → timestamp dir), and
//! the container's view of its token through a private mount namespace.
//! Needs root and BPF (see `agent_monitor_tests::privileged`).

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use agent_monitor::{
    config::{Config, PodSourceKind},
    events::{OpenRecord, Record},
    identity::{credentials::CredentialClass, pods::PodStore},
};
use agent_monitor_tests::{
    privileged,
    sim::{pods_file, run_in_pod, SimPod, NS},
    testkid, unique, Harness, TempTree, TestCgroup,
};

const WAIT: Duration = Duration::from_secs(15);

fn config(kubelet_root: &Path, top: &TestCgroup, pods: &Path) -> Config {
    let mut c = Config::default();
    c.identity.kubelet_root = kubelet_root.display().to_string();
    c.identity.pods.source = PodSourceKind::File;
    c.identity.pods.file = Some(pods.to_owned());
    c.cgroups = vec![top.path.clone()];
    c
}

fn start(config: &Config, pods_path: &Path, expect: usize) -> (Harness, Arc<PodStore>) {
    Harness::start_with_pods_file(config, pods_path, expect)
}

fn opens_in(records: &[Record], cgroup_id: u64) -> Vec<&OpenRecord> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Open(o) if o.task.cgroup_id == cgroup_id && o.task.comm == "am-testkid" => {
                Some(o)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_pod_reading_its_own_and_another_pods_token_is_named_with_both_owners() {
    if !privileged("a_pod_reading_its_own_and_another_pods_token_is_named_with_both_owners") {
        return;
    }
    let tree = TempTree::new("am-identity");
    let kroot = tree.root.join("kubelet");
    let top_name = unique("am-test-node");
    let top = TestCgroup::create(&top_name);
    let a = SimPod::new(&top_name, 0x1f7c9a2e, "agent-a", "researcher");
    let b = SimPod::new(&top_name, 0x2e8dab3f, "agent-b", "coder");
    a.kubelet_volume(&kroot);
    let b_vol = b.kubelet_volume(&kroot);
    // Pod A also has a Secret volume at a custom path, its own tmpfs as the kubelet mounts it.
    let secret_dir = a.secret_volume(&kroot, "openai", &["api-key"]);
    let pods_path = tree.root.join("pods.json");
    pods_file(
        &pods_path,
        &[
            a.json(Some(("openai", "/run/agent-creds/openai"))),
            b.json(None),
        ],
    );

    let (mut h, _store) = start(&config(&kroot, &top, &pods_path), &pods_path, 2);

    let b_token_via_data = b_vol.join("..data/token");
    let out = run_in_pod(
        &a,
        &kroot,
        &[(secret_dir.clone(), "/run/agent-creds/openai")],
        &[
            "openat:/var/run/secrets/kubernetes.io/serviceaccount/token".to_owned(),
            format!("openat:{}", b_token_via_data.display()),
            "openat:/run/agent-creds/openai/api-key".to_owned(),
        ],
        false,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let results: Vec<i64> = stdout
        .lines()
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(
        results.len() == 3 && results.iter().all(|&r| r >= 0),
        "all three opens succeeded: {stdout}"
    );

    h.wait_until(WAIT, |r| opens_in(r, a.cgroup.id).len() >= 3);
    let opens = opens_in(&h.records, a.cgroup.id);
    for o in &opens {
        let w = &o.task.workload;
        assert!(!w.host, "{o:?}");
        assert_eq!(w.namespace.as_deref(), Some(NS));
        assert_eq!(w.pod.as_deref(), Some("agent-a"));
        assert_eq!(w.pod_uid.as_deref(), Some(a.uid.as_str()));
        assert_eq!(w.container.as_deref(), Some("agent"));
        assert_eq!(w.container_id.as_deref(), Some(a.container_id.as_str()));
        assert_eq!(w.service_account.as_deref(), Some("sa-agent-a"));
        assert_eq!(w.agent.as_deref(), Some("researcher"));
        assert_eq!(w.tier.as_deref(), Some("worker"));
    }
    // Each event names the path as passed and the file's host path from the kernel.
    let stamp = "..2026_11_23_07_00_00.000000001";
    let a_vol = kroot.join(format!(
        "pods/{}/volumes/kubernetes.io~projected/{}",
        a.uid, a.token_volume
    ));
    let own = &opens[0];
    assert_eq!(
        own.raw_path,
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    );
    let own_host = a_vol.join(stamp).join("token").display().to_string();
    assert_eq!(own.host_path.as_deref(), Some(own_host.as_str()));
    assert_eq!(own.path, own_host);
    assert_eq!(own.matched_by, "volume");
    assert_eq!(own.class, CredentialClass::ServiceAccountToken);
    let owner = own.owner.as_ref().expect("owner of own token");
    assert_eq!(
        (
            owner.pod_uid.as_deref(),
            owner.namespace.as_deref(),
            owner.name.as_deref()
        ),
        (Some(a.uid.as_str()), Some(NS), Some("agent-a"))
    );

    let foreign = &opens[1];
    assert_eq!(foreign.raw_path, b_token_via_data.display().to_string());
    assert_eq!(
        foreign.path,
        b_vol.join(stamp).join("token").display().to_string()
    );
    assert_eq!(foreign.class, CredentialClass::ServiceAccountToken);
    let owner = foreign.owner.as_ref().expect("owner of B's token");
    assert_eq!(
        (
            owner.pod_uid.as_deref(),
            owner.namespace.as_deref(),
            owner.name.as_deref()
        ),
        (Some(b.uid.as_str()), Some(NS), Some("agent-b"))
    );

    let secret = &opens[2];
    assert_eq!(secret.raw_path, "/run/agent-creds/openai/api-key");
    assert_eq!(
        secret.path,
        secret_dir.join(stamp).join("api-key").display().to_string()
    );
    assert_eq!(secret.class, CredentialClass::SecretVolume);
    assert_eq!(
        secret.owner.as_ref().and_then(|o| o.pod_uid.as_deref()),
        Some(a.uid.as_str())
    );
    drop(b);
}

#[test]
fn a_pod_that_appears_a_second_late_still_names_its_events() {
    if !privileged("a_pod_that_appears_a_second_late_still_names_its_events") {
        return;
    }
    let tree = TempTree::new("am-late");
    let kroot = tree.root.join("kubelet");
    let watched = tree.file("watched/token");
    let top_name = unique("am-test-late");
    let top = TestCgroup::create(&top_name);
    let early = SimPod::new(&top_name, 0x3a3a3a3a, "agent-e", "planner");
    let late = SimPod::new(&top_name, 0x4b4b4b4b, "agent-l", "latecomer");
    let pods_path = tree.root.join("pods.json");
    pods_file(&pods_path, &[early.json(None)]);
    let mut config = config(&kroot, &top, &pods_path);
    config.watch.prefixes = vec![format!("{}/watched/", tree.root.display())];
    let (mut h, _store) = start(&config, &pods_path, 1);

    let status = Command::new(testkid())
        .arg("--cgroup")
        .arg(&late.cgroup.path)
        .arg(format!("openat:{}", watched.display()))
        .status()
        .expect("kid");
    assert!(status.success());
    std::thread::sleep(Duration::from_secs(1));
    h.settle(Duration::from_millis(100));
    assert!(
        opens_in(&h.records, late.cgroup.id).is_empty(),
        "nothing may leave before the pod is known"
    );
    pods_file(&pods_path, &[early.json(None), late.json(None)]);

    h.wait_until(WAIT, |r| !opens_in(r, late.cgroup.id).is_empty());
    let o = opens_in(&h.records, late.cgroup.id)[0];
    assert_eq!(o.task.workload.pod.as_deref(), Some("agent-l"));
    assert_eq!(o.task.workload.agent.as_deref(), Some("latecomer"));
    assert_eq!(
        o.task.workload.service_account.as_deref(),
        Some("sa-agent-l")
    );
    assert_eq!(o.task.workload.container.as_deref(), Some("agent"));
}
