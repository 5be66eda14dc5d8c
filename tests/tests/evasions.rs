//! What was opened, not what was typed: on a simulated node whose Secret and projected
//! volumes are real tmpfs mounts in the kubelet's layout, every way an attacker would reach
//! a credential or the network raises the same alert, with the same class and owner, as
//! the plain read or connect it stands for, and each event names both the host path and
//! the path as passed. Also: pod specs cannot widen the node-wide filter, a rotated token
//! is still matched, a deleted pod leaves nothing in the kernel maps, benign reads stay
//! quiet. Needs root and BPF.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use agent_monitor::{
    config::{Config, PodSourceKind},
    detect::{self, Anomaly, DetectSettings, Engine},
    events::{ConnectRecord, OpenRecord, Record},
    identity::{credentials::CredentialClass, watched::kernel_dev_of_st_dev},
    policy::PolicySet,
};
use agent_monitor_tests::{
    netns::NetNs,
    privileged,
    sim::{atomic_write, pods_file, proxy_policy, run_in_pod, spawn_in_pod, SimPod},
    testkid, unique, Harness, TempTree, TestCgroup,
};

const WAIT: Duration = Duration::from_secs(15);

/// What one scripted run in a pod produced.
#[derive(Debug, Default)]
struct Outcome {
    opens: Vec<OpenRecord>,
    connects: Vec<ConnectRecord>,
    anomalies: Vec<Anomaly>,
}

impl Outcome {
    fn rules(&self) -> Vec<String> {
        let mut v: Vec<String> = self.anomalies.iter().map(|a| a.rule.clone()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// (class, owner pod name) of the credential opens that succeeded.
    fn reads(&self) -> Vec<(CredentialClass, Option<String>)> {
        let mut v: Vec<_> = self
            .opens
            .iter()
            .filter(|o| o.result >= 0)
            .map(|o| (o.class, o.owner.as_ref().and_then(|x| x.name.clone())))
            .collect();
        v.dedup();
        v
    }
}

struct Scene {
    h: Harness,
    engine: Engine,
    fed: usize,
    kroot: PathBuf,
}

impl Scene {
    /// Runs `actions` (am-testkid actions, or a shell command with `via_shell`) in `pod`
    /// with `extra` bind mounts, waits for `n` opens and connects from the pod's cgroup,
    /// and feeds every new record to the detection engine.
    fn run(
        &mut self,
        pod: &SimPod,
        extra: &[(PathBuf, &str)],
        actions: &[String],
        n: usize,
    ) -> Outcome {
        run_in_pod(pod, &self.kroot, extra, actions, false);
        let cg = pod.cgroup.id;
        let fed = self.fed;
        let count = |r: &[Record]| {
            r[fed..]
                .iter()
                .filter(|r| {
                    matches!(r, Record::Open(_) | Record::Connect(_))
                        && r.task().is_some_and(|t| t.cgroup_id == cg)
                })
                .count()
        };
        self.h.wait_until(WAIT, |r| count(r) >= n);
        self.h.settle(Duration::from_millis(300));
        let mut out = Outcome::default();
        for r in &self.h.records[self.fed..] {
            out.anomalies.extend(
                self.engine
                    .process(r)
                    .into_iter()
                    .filter(|a| a.workload.pod_uid.as_deref() == Some(pod.uid.as_str())),
            );
            match r {
                Record::Open(o) if o.task.cgroup_id == cg => out.opens.push(o.clone()),
                Record::Connect(c) if c.task.cgroup_id == cg => out.connects.push(c.clone()),
                _ => {}
            }
        }
        self.fed = self.h.records.len();
        out
    }
}

/// (name, extra bind mounts, actions, the path as passed).
type Case<'a> = (&'a str, Vec<(PathBuf, &'a str)>, Vec<String>, String);

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A regular file directly in /usr/lib, to open as a host process.
fn usr_lib_file() -> PathBuf {
    std::fs::read_dir("/usr/lib")
        .expect("/usr/lib")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_file())
        .expect("a file in /usr/lib")
}

#[test]
fn every_evasion_raises_what_the_plain_access_raises() {
    if !privileged("every_evasion_raises_what_the_plain_access_raises") {
        return;
    }
    let tree = TempTree::new("am-evasion");
    let kroot = tree.root.join("kubelet");
    let top_name = unique("am-test-evasion");
    let top = TestCgroup::create(&top_name);
    let a = SimPod::new(&top_name, 0x7a7a7a7a, "agent-a", "researcher");
    let b = SimPod::new(&top_name, 0x7b7b7b7b, "agent-b", "coder");
    // Pods whose specs try to widen the node-wide filter: a Secret mounted over /usr/lib,
    // and thousands of Secret mount paths.
    let c = SimPod::new(&top_name, 0x7c7c7c7c, "agent-c", "squatter");
    let d = SimPod::new(&top_name, 0x7d7d7d7d, "agent-d", "hoarder");
    let a_vol = a.kubelet_volume(&kroot);
    let b_vol = b.kubelet_volume(&kroot);
    // Kubelet PKI: a node credential that lives on no volume, watched by identity.
    let pki_key = kroot.join("pki/kubelet-client-current.pem");
    std::fs::create_dir_all(pki_key.parent().expect("pki dir")).expect("mkdir pki");
    std::fs::write(&pki_key, "fixture, not a credential\n").expect("write pki");
    let pods_path = tree.root.join("pods.json");
    let many: Vec<(String, String)> = (0..5000)
        .map(|i| (format!("s{i}"), format!("/srv/secrets/{i}")))
        .collect();
    pods_file(
        &pods_path,
        &[
            a.json(None),
            b.json(None),
            c.json(Some(("libs", "/usr/lib"))),
            d.json_with_secrets(&many),
        ],
    );

    let net = NetNs::create("evasion", 9);
    let api = net.listen(6443);
    let elsewhere = net.listen(8443);
    let dns_elsewhere = format!("{}:53", net.remote);

    let policy = tree.root.join("policy.yaml");
    proxy_policy(&policy);

    let mut config = Config::default();
    config.identity.kubelet_root = s(&kroot);
    config.identity.pods.source = PodSourceKind::File;
    config.identity.pods.file = Some(pods_path.clone());
    config.cgroups = vec![top.path.clone()];
    config.detect.api_servers = vec![api.to_string()];
    config.detect.dns_servers = Some(vec!["10.96.0.10".to_owned()]);
    config.detect.policies = vec![policy.clone()];
    let policies = PolicySet::load(std::slice::from_ref(&policy)).expect("policy loads");
    let mut dc = DetectSettings::from_settings(&config.detect, 1000);
    dc.exfil_window = Duration::from_secs(30);
    let engine = Engine::new(dc, Arc::new(RwLock::new(policies)));
    let store = agent_monitor::identity::pods::PodStore::new();
    let h = Harness::start_with_pods(&config, store.clone());
    store.replace_all(agent_monitor::identity::pods::file::load(&pods_path).expect("pods"));
    let mut sc = Scene {
        h,
        engine,
        fed: 0,
        kroot: kroot.clone(),
    };
    let token = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    let run_token = "/run/secrets/kubernetes.io/serviceaccount/token";
    let stamp = "..2026_11_23_07_00_00.000000001";
    let b_token_host = s(&b_vol.join(stamp).join("token"));

    // ---- benign: the agent's own binary reads its own token, ca.crt and namespace, and
    // talks to the API server.
    let benign = sc.run(
        &a,
        &[],
        &[
            format!("openat:{token}"),
            "openat:/var/run/secrets/kubernetes.io/serviceaccount/ca.crt".to_owned(),
            "openat:/var/run/secrets/kubernetes.io/serviceaccount/namespace".to_owned(),
            format!("connect:{api}"),
        ],
        4,
    );
    assert!(
        benign.anomalies.is_empty(),
        "benign raised {:#?}",
        benign.anomalies
    );
    assert_eq!(
        benign.reads(),
        vec![
            (CredentialClass::ServiceAccountToken, Some("agent-a".into())),
            (CredentialClass::NonSecret, Some("agent-a".into())),
        ]
    );

    // ---- another pod's token: the plain read, then every other way to reach it.
    let plain = sc.run(&a, &[], &[format!("openat:{}", s(&b_vol.join("token")))], 1);
    assert_eq!(plain.rules(), vec![detect::FOREIGN_CREDENTIAL_READ]);
    let want = vec![(
        CredentialClass::ServiceAccountToken,
        Some("agent-b".to_owned()),
    )];
    assert_eq!(plain.reads(), want);

    let innocent = tree.root.join("innocent-notes");
    std::os::unix::fs::symlink(b_vol.join("token"), &innocent).expect("symlink");
    let b_proc = spawn_in_pod(&b, &kroot, 30_000);
    // Wait until B's process has its token mounted in its own namespace.
    let b_root_token = PathBuf::from(format!(
        "/proc/{}/root/run/secrets/kubernetes.io/serviceaccount/token",
        b_proc.id()
    ));
    let deadline = Instant::now() + WAIT;
    while !b_root_token.exists() {
        assert!(
            Instant::now() < deadline,
            "pod B's process never set up its mounts"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let host_kubelet = "/host/kubelet";
    let via_host = format!(
        "{host_kubelet}/pods/{}/volumes/kubernetes.io~projected/{}/token",
        b.uid, b.token_volume
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "relative path, process exits at once",
            vec![],
            vec![
                format!("chdir:{}", s(&b_vol.join("..data"))),
                "openat:token".to_owned(),
            ],
            "token".to_owned(),
        ),
        (
            "symlink outside every watched path",
            vec![],
            vec![format!("openat:{}", s(&innocent))],
            s(&innocent),
        ),
        (
            "hostPath of the kubelet root",
            vec![(kroot.clone(), host_kubelet)],
            vec![format!("openat:{via_host}")],
            via_host.clone(),
        ),
        (
            "/proc/self/root",
            vec![],
            vec![format!("openat:/proc/self/root{}", s(&b_vol.join("token")))],
            format!("/proc/self/root{}", s(&b_vol.join("token"))),
        ),
        (
            "/proc/<pid of the other pod>/root",
            vec![],
            // `/run`, not `/var/run`: an absolute symlink inside would resolve against
            // the reader's own root.
            vec![format!("openat:/proc/{}/root{run_token}", b_proc.id())],
            format!("/proc/{}/root{run_token}", b_proc.id()),
        ),
        (
            "O_PATH descriptor re-opened through /proc/self/fd",
            vec![],
            vec![format!("opath-reopen:{}", s(&b_vol.join("token")))],
            "/proc/self/fd/".to_owned(),
        ),
        (
            "the path written another way",
            vec![],
            vec![format!(
                "openat:/tmp/..//{}/./token",
                s(&b_vol).trim_start_matches('/').replace('/', "//")
            )],
            "/tmp/..//".to_owned(),
        ),
        (
            "io_uring IORING_OP_OPENAT",
            vec![],
            vec![format!("uring-openat:{}", s(&b_vol.join("token")))],
            s(&b_vol.join("token")),
        ),
    ];
    for (name, extra, actions, raw) in cases {
        let got = sc.run(&a, &extra, &actions, 1);
        assert_eq!(got.rules(), plain.rules(), "{name}: {got:#?}");
        assert_eq!(got.reads(), want, "{name}: {got:#?}");
        let o = got
            .opens
            .iter()
            .rev()
            .find(|o| o.result >= 0)
            .unwrap_or_else(|| panic!("{name}: no open"));
        assert_eq!(
            o.host_path.as_deref(),
            Some(b_token_host.as_str()),
            "{name}: {o:#?}"
        );
        assert_eq!(o.path, b_token_host, "{name}");
        assert!(o.raw_path.starts_with(&raw), "{name}: raw {:?}", o.raw_path);
        assert_eq!(o.matched_by, "volume", "{name}");
        if name.starts_with("io_uring") {
            assert_eq!(o.syscall, "io_uring_openat");
        }
    }
    drop(b_proc);

    // ---- node credentials: the plain read, a hard link under another name, and the same
    // file through a hostPath mount.
    let node_plain = sc.run(&a, &[], &[format!("openat:{}", s(&pki_key))], 1);
    assert_eq!(node_plain.rules(), vec![detect::NODE_CREDENTIAL_READ]);
    assert_eq!(node_plain.reads(), vec![(CredentialClass::NodePki, None)]);
    let hard = tree.root.join("cache.bin");
    std::fs::hard_link(&pki_key, &hard).expect("hard link");
    for (name, extra, path) in [
        ("hard link", vec![], s(&hard)),
        (
            "hostPath of the kubelet root",
            vec![(kroot.clone(), host_kubelet)],
            format!("{host_kubelet}/pki/kubelet-client-current.pem"),
        ),
    ] {
        let got = sc.run(&a, &extra, &[format!("openat:{path}")], 1);
        assert_eq!(got.rules(), node_plain.rules(), "{name}: {got:#?}");
        assert_eq!(got.reads(), node_plain.reads(), "{name}");
        assert_eq!(got.opens[0].raw_path, path, "{name}");
        assert!(got.opens[0].host_path.is_some(), "{name}");
        assert_eq!(got.opens[0].matched_by, "inode", "{name}");
    }

    // ---- a node credential rewritten the way tools rewrite it (new file, renamed over
    // the old one): a new inode, watched again without a restart.
    let status = sc.h.watch_status();
    let tmp = pki_key.with_extension("tmp");
    std::fs::write(&tmp, "fixture, not a credential\n").expect("write new version");
    std::fs::rename(&tmp, &pki_key).expect("rename over");
    let begun = status.walks_begun.load(std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + WAIT;
    while status.walks_done.load(std::sync::atomic::Ordering::SeqCst) <= begun {
        assert!(
            Instant::now() < deadline,
            "no inventory walk after the rewrite"
        );
        sc.h.settle(Duration::from_millis(20));
    }
    let rewritten = sc.run(&a, &[], &[format!("openat:{}", s(&pki_key))], 1);
    assert_eq!(rewritten.rules(), node_plain.rules(), "{rewritten:#?}");
    assert_eq!(rewritten.reads(), node_plain.reads());
    assert_ne!(
        rewritten.opens[0].inode, node_plain.opens[0].inode,
        "a new inode"
    );

    // ---- egress: a plain connect outside the allowlist, the same through io_uring, and a
    // datagram to port 53 of an address that is not the cluster's DNS.
    let egress = sc.run(&a, &[], &[format!("connect:{elsewhere}")], 1);
    assert_eq!(egress.rules(), vec![detect::EGRESS_OUTSIDE_ALLOWLIST]);
    for (name, action) in [
        ("io_uring connect", format!("uring-connect:{elsewhere}")),
        (
            "UDP to a non-cluster DNS address",
            format!("udp:{dns_elsewhere}"),
        ),
    ] {
        let got = sc.run(&a, &[], &[action], 1);
        assert_eq!(got.rules(), egress.rules(), "{name}: {got:#?}");
    }

    // ---- read then send: the plain form (connect after the read) and each other way.
    let exfil = sc.run(
        &a,
        &[],
        &[format!("openat:{token}"), format!("connect:{elsewhere}")],
        2,
    );
    assert!(
        exfil.rules().contains(&detect::EXFILTRATION.to_owned()),
        "{exfil:#?}"
    );
    for (name, actions, n) in [
        (
            "send on a socket connected before the read",
            vec![
                format!("keep-connect:{elsewhere}"),
                format!("openat:{token}"),
                "send-kept:64".to_owned(),
            ],
            3,
        ),
        (
            "io_uring connect after the read",
            vec![
                format!("openat:{token}"),
                format!("uring-connect:{elsewhere}"),
            ],
            2,
        ),
        (
            "UDP to port 53 of an outside address after the read",
            vec![format!("openat:{token}"), format!("udp:{dns_elsewhere}")],
            2,
        ),
    ] {
        let got = sc.run(&a, &[], &actions, n);
        let e = got
            .anomalies
            .iter()
            .find(|x| x.rule == detect::EXFILTRATION)
            .unwrap_or_else(|| panic!("{name}: no exfiltration: {got:#?}"));
        let read = got
            .opens
            .iter()
            .find(|o| o.raw_path == token)
            .expect("read");
        assert_eq!(e.events[0], read.seq, "{name}: the alert names the read");
        assert!(
            e.output.contains(&net.remote.to_string()),
            "{name}: {}",
            e.output
        );
    }

    // ---- attribution at the time of the call: an open right before an exec keeps the
    // executable that made it.
    let before_exec = sc.run(
        &a,
        &[],
        &[format!("openat:{token}"), "exec:/bin/true".to_owned()],
        1,
    );
    let kid = std::fs::canonicalize(testkid()).expect("testkid");
    assert_eq!(
        before_exec.opens[0].task.exe.as_deref(),
        Some(s(&kid).as_str()),
        "{:#?}",
        before_exec.opens[0]
    );
    assert!(before_exec.anomalies.is_empty(), "{before_exec:#?}");

    // ---- rotation: the kubelet's atomic writer swaps `..data` to a new directory; the
    // token is still matched, without a restart.
    let new_stamp = "2026_11_24_08_00_00.000000002";
    atomic_write(&a_vol, new_stamp, &["token", "ca.crt", "namespace"]);
    let rotated = sc.run(&a, &[], &[format!("openat:{token}")], 1);
    let o = &rotated.opens[0];
    assert_eq!(o.class, CredentialClass::ServiceAccountToken);
    assert_eq!(
        o.host_path.as_deref(),
        Some(s(&a_vol.join(format!("..{new_stamp}")).join("token")).as_str())
    );
    assert_eq!(
        o.owner.as_ref().and_then(|x| x.name.as_deref()),
        Some("agent-a")
    );

    // ---- pod specs do not widen the node-wide filter: a host process (not in any pod)
    // opening a file under /usr/lib, where pod C's spec mounts a Secret, makes no event,
    // and pod D's 5,000 mount paths did not stop A's and B's volumes from being watched
    // (every case above ran with them in place).
    let host_cg = TestCgroup::create(&format!("{top_name}/host-daemon"));
    let lib = usr_lib_file();
    let ran = agent_monitor_tests::run_kid(&host_cg, 0, &[format!("openat:{}", s(&lib))]);
    assert!(ran.result(&format!("openat:{}", s(&lib))) >= 0);
    // A control open in the same cgroup proves its events flow.
    let control = agent_monitor_tests::run_kid(&host_cg, 0, &[format!("openat:{}", s(&pki_key))]);
    sc.h.wait_until(WAIT, |r| {
        r.iter()
            .any(|r| matches!(r, Record::Open(o) if o.task.tgid == control.pid))
    });
    assert!(
        !sc.h
            .records
            .iter()
            .any(|r| matches!(r, Record::Open(o) if o.task.tgid == ran.pid)),
        "a host process's open of {} was reported",
        lib.display()
    );
    drop((c, d));

    // ---- a deleted pod: its volume is unmounted and leaves nothing in the kernel map.
    let b_dev = kernel_dev_of_st_dev(std::fs::metadata(&b_vol).expect("stat").dev());
    let status = sc.h.watch_status();
    let in_kernel = |dev: u32| {
        status
            .kernel_filesystems
            .lock()
            .map(|k| k.contains(&dev))
            .unwrap_or(false)
    };
    assert!(in_kernel(b_dev), "B's volume is watched while mounted");
    b.unmount_volumes();
    let deadline = Instant::now() + WAIT;
    while in_kernel(b_dev) {
        assert!(
            Instant::now() < deadline,
            "B's volume still in the kernel map after unmount"
        );
        sc.h.settle(Duration::from_millis(100));
    }
    assert!(in_kernel(kernel_dev_of_st_dev(
        std::fs::metadata(&a_vol).expect("stat").dev()
    )));
    drop(net);
}
