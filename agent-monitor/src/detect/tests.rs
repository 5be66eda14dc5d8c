//! Every rule: fires, and does not fire, over synthetic records.

use std::sync::{Arc, RwLock};

use super::*;
use crate::{
    events::{ConnectRecord, ExecRecord, LostRecord, OpenRecord, Record, Task},
    identity::credentials::{CredentialClass, Owner},
    policy::{parse_policies, PolicySet},
};

const S: u64 = 1_000_000_000;
const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

fn pod_workload(uid: &str, name: &str, tier: Option<&str>) -> Workload {
    Workload {
        host: false,
        namespace: Some("agents".into()),
        pod: Some(name.into()),
        pod_uid: Some(uid.into()),
        container: Some("agent".into()),
        container_id: Some("c0ffee".into()),
        service_account: Some(format!("sa-{name}")),
        agent: Some(format!("agent-of-{name}")),
        tier: tier.map(str::to_owned),
        labels: Default::default(),
        cgroup: Some("/kubepods".into()),
        truncated: false,
        labels_truncated: 0,
    }
}

fn host() -> Workload {
    Workload {
        host: true,
        ..Workload::default()
    }
}

fn task(tgid: u32, ppid: u32, exe: &str, w: Workload, ts: u64) -> Task {
    Task {
        time: "2026-11-23T07:00:00.000000001Z".into(),
        ts_boot_ns: ts,
        pid: tgid,
        tgid,
        ppid: Some(ppid),
        uid: 0,
        gid: 0,
        comm: exe
            .rsplit('/')
            .next()
            .unwrap_or(exe)
            .chars()
            .take(15)
            .collect(),
        exe: Some(exe.into()),
        cgroup_id: 42,
        start_ns: 0,
        workload: w.into(),
    }
}

fn open(seq: u64, t: Task, path: &str, class: CredentialClass, owner: Option<&str>) -> Record {
    Record::Open(OpenRecord {
        seq,
        task: t,
        syscall: "openat".into(),
        path: path.into(),
        raw_path: path.into(),
        path_resolved: true,
        path_truncated: false,
        matched_by: "prefix".into(),
        dirfd: -100,
        flags: 0,
        mode: 0,
        result: 3,
        error: None,
        class,
        owner: owner.map(|u| Owner {
            pod_uid: Some(u.into()),
            namespace: Some("agents".into()),
            name: Some(format!("pod-{}", &u[..1])),
            pid: None,
        }),
        host_path: None,
        device: None,
        inode: None,
    })
}

fn connect(seq: u64, t: Task, ip: &str, port: u16) -> Record {
    Record::Connect(ConnectRecord {
        seq,
        task: t,
        syscall: "connect".into(),
        family: if ip.contains(':') { "inet6" } else { "inet" }.into(),
        dst_addr: ip.into(),
        dst_port: port,
        fd: 3,
        result: 0,
        error: None,
        attempted: true,
    })
}

const TOKEN: &str = "/run/secrets/kubernetes.io/serviceaccount/token";
const AGENT: &str = "/usr/local/bin/agent";

fn engine(policy_yaml: &str) -> Engine {
    let set = if policy_yaml.is_empty() {
        PolicySet::default()
    } else {
        let policies =
            parse_policies(policy_yaml, std::path::Path::new("test.yaml")).expect("policy");
        PolicySet::from(policies)
    };
    let mut cfg = DetectSettings::default();
    cfg.destinations.api_servers =
        vec![destinations::Endpoint::parse("10.96.0.1:443").expect("ep")];
    cfg.destinations.cluster =
        vec![crate::policy::matching::parse_cidr("10.244.0.0/16").expect("cidr")];
    // Only these are DNS: port 53 elsewhere is cluster or external traffic.
    cfg.destinations.dns_servers = vec![
        "10.96.0.10".parse().expect("ip"),
        "10.96.0.11".parse().expect("ip"),
    ];
    Engine::new(cfg, Arc::new(RwLock::new(set)))
}

fn fired(e: &mut Engine, records: &[Record]) -> Vec<String> {
    records
        .iter()
        .flat_map(|r| e.process(r))
        .map(|a| a.rule)
        .collect()
}

const POLICY: &str = "apiVersion: agent-monitor.dev/v1alpha1
kind: AgentPolicy
metadata: {name: workers, namespace: agents}
spec:
  selector: {namespaces: [agents]}
  tier: worker
  credentials:
    executables: [/usr/local/bin/agent]
  egress:
    allow:
      - class: dns
      - cidr: 203.0.113.0/24
        ports: [443]
  learningWindow: 60s
";

#[test]
fn foreign_credential_read() {
    let mut e = engine("");
    let a = pod_workload(A, "a", None);
    let own = open(
        1,
        task(10, 1, AGENT, a.clone(), S),
        TOKEN,
        CredentialClass::ServiceAccountToken,
        Some(A),
    );
    let other = open(
        2,
        task(10, 1, AGENT, a.clone(), S),
        "/var/lib/kubelet/pods/b/volumes/x/token",
        CredentialClass::ServiceAccountToken,
        Some(B),
    );
    assert_eq!(fired(&mut e, &[own]), Vec::<String>::new());
    assert_eq!(
        fired(&mut e, std::slice::from_ref(&other)),
        vec![FOREIGN_CREDENTIAL_READ]
    );
    // The kubelet (a host process) reads every pod's volumes.
    let kubelet = open(
        3,
        task(11, 1, "/usr/bin/kubelet", host(), S),
        "/var/lib/kubelet/pods/b/volumes/x/token",
        CredentialClass::ServiceAccountToken,
        Some(B),
    );
    assert!(fired(&mut e, &[kubelet]).is_empty());
    // ca.crt of another pod is not a secret; a missing file was not read.
    let ca = open(
        4,
        task(10, 1, AGENT, a.clone(), S),
        "/x/ca.crt",
        CredentialClass::NonSecret,
        Some(B),
    );
    assert!(fired(&mut e, &[ca]).is_empty());
    let mut missing = other;
    if let Record::Open(o) = &mut missing {
        o.result = -i64::from(libc::ENOENT);
    }
    assert!(fired(&mut e, &[missing]).is_empty());
}

#[test]
fn unexpected_executable() {
    let mut e = engine("");
    let a = pod_workload(A, "a", None);
    let by_cat = open(
        1,
        task(10, 1, "/usr/bin/cat", a.clone(), S),
        TOKEN,
        CredentialClass::ServiceAccountToken,
        Some(A),
    );
    let by_agent = open(
        2,
        task(11, 1, AGENT, a.clone(), S),
        TOKEN,
        CredentialClass::ServiceAccountToken,
        Some(A),
    );
    assert_eq!(fired(&mut e, &[by_cat]), vec![UNEXPECTED_EXECUTABLE]);
    assert!(fired(&mut e, &[by_agent]).is_empty());
    // With a policy, anything it does not name.
    let mut e = engine(POLICY);
    let by_python = open(
        3,
        task(12, 1, "/usr/bin/python3", a.clone(), S),
        TOKEN,
        CredentialClass::ServiceAccountToken,
        Some(A),
    );
    let by_agent = open(
        4,
        task(13, 1, AGENT, a, S),
        TOKEN,
        CredentialClass::ServiceAccountToken,
        Some(A),
    );
    assert_eq!(fired(&mut e, &[by_python]), vec![UNEXPECTED_EXECUTABLE]);
    assert!(fired(&mut e, &[by_agent]).is_empty());
    // Host processes are not judged by pod rules: a shell reading a pod's token through
    // the kubelet's directory is not "unexpected"; only the node-credential rule, which
    // covers host processes, fires for a cloud credential file.
    let mut e = engine("");
    let host_cat_token = open(
        5,
        task(14, 1, "/usr/bin/cat", host(), S),
        "/var/lib/kubelet/pods/a/volumes/x/token",
        CredentialClass::ServiceAccountToken,
        Some(A),
    );
    assert!(fired(&mut e, &[host_cat_token]).is_empty());
    let host_cat = open(
        6,
        task(14, 1, "/usr/bin/cat", host(), S),
        "/root/.aws/credentials",
        CredentialClass::CloudCredentials,
        None,
    );
    assert_eq!(fired(&mut e, &[host_cat]), vec![NODE_CREDENTIAL_READ]);
}

#[test]
fn executable_globs_keep_star_within_one_directory() {
    // `*` stays within one path segment; `**` as a whole segment crosses `/`.
    let policy = POLICY.replace(
        "executables: [/usr/local/bin/agent]",
        "executables: [\"/opt/agent/*\", \"/opt/tools/**\"]",
    );
    let mut e = engine(&policy);
    let a = pod_workload(A, "a", None);
    let read_by = |seq, exe: &str| {
        open(
            seq,
            task(10 + seq as u32, 1, exe, a.clone(), S),
            "/etc/openai/api-key",
            CredentialClass::SecretVolume,
            Some(A),
        )
    };
    for (seq, exe, fires) in [
        (1, "/opt/agent/run", false),
        (2, "/opt/agent/plugins/run", true),
        (3, "/opt/tools/run", false),
        (4, "/opt/tools/a/b/run", false),
        (5, "/opt/toolsx/run", true),
    ] {
        let want: Vec<String> = if fires {
            vec![UNEXPECTED_EXECUTABLE.to_owned()]
        } else {
            Vec::new()
        };
        assert_eq!(fired(&mut e, &[read_by(seq, exe)]), want, "{exe}");
    }
}

#[test]
fn exfiltration_within_the_window_and_up_the_process_tree() {
    let a = pod_workload(A, "a", None);
    let read = open(
        1,
        task(10, 1, AGENT, a.clone(), S),
        TOKEN,
        CredentialClass::ServiceAccountToken,
        Some(A),
    );
    // A child of the reader connects outside: fires, referencing both records.
    let mut e = engine("");
    let out = [
        read.clone(),
        connect(
            2,
            task(20, 10, "/usr/bin/curl", a.clone(), 5 * S),
            "198.51.100.7",
            443,
        ),
    ]
    .iter()
    .flat_map(|r| e.process(r))
    .collect::<Vec<_>>();
    let ex = out
        .iter()
        .find(|x| x.rule == EXFILTRATION)
        .expect("exfiltration");
    assert_eq!(ex.events, vec![1, 2]);
    assert_eq!(ex.priority, Priority::Critical);
    // Too late.
    let mut e = engine("");
    let late = fired(
        &mut e,
        &[
            read.clone(),
            connect(
                2,
                task(10, 1, AGENT, a.clone(), 40 * S),
                "198.51.100.7",
                443,
            ),
        ],
    );
    assert!(!late.contains(&EXFILTRATION.to_owned()), "{late:?}");
    // Allowed destinations (cluster, DNS) are not exfiltration.
    let mut e = engine("");
    let ok = fired(
        &mut e,
        &[
            read.clone(),
            connect(2, task(10, 1, AGENT, a.clone(), 2 * S), "10.244.1.9", 8080),
            connect(3, task(10, 1, AGENT, a.clone(), 2 * S), "10.96.0.10", 53),
        ],
    );
    assert!(ok.is_empty(), "{ok:?}");
    // Port 53 to an outside resolver after a read is exfiltration (a DNS tunnel), not DNS.
    let mut e = engine("");
    let tunnel = fired(
        &mut e,
        &[
            read.clone(),
            connect(2, task(10, 1, AGENT, a.clone(), 2 * S), "203.0.113.53", 53),
        ],
    );
    assert!(tunnel.contains(&EXFILTRATION.to_owned()), "{tunnel:?}");
    // An unrelated process.
    let mut e = engine("");
    let other = fired(
        &mut e,
        &[
            read,
            connect(2, task(99, 1, AGENT, a, 2 * S), "198.51.100.7", 443),
        ],
    );
    assert!(!other.contains(&EXFILTRATION.to_owned()), "{other:?}");
}

#[test]
fn egress_outside_allowlist_and_metadata() {
    let a = pod_workload(A, "a", None);
    // Without a policy, only the metadata service is judged.
    let mut e = engine("");
    assert!(fired(
        &mut e,
        &[connect(
            1,
            task(10, 1, AGENT, a.clone(), S),
            "198.51.100.7",
            443
        )]
    )
    .is_empty());
    assert_eq!(
        fired(
            &mut e,
            &[connect(
                2,
                task(10, 1, AGENT, a.clone(), S),
                "169.254.169.254",
                80
            )]
        ),
        vec![CLOUD_METADATA]
    );
    // With one, anything it does not allow.
    let mut e = engine(POLICY);
    assert_eq!(
        fired(
            &mut e,
            &[connect(
                3,
                task(10, 1, AGENT, a.clone(), S),
                "198.51.100.7",
                443
            )]
        ),
        vec![EGRESS_OUTSIDE_ALLOWLIST]
    );
    assert!(fired(
        &mut e,
        &[connect(
            4,
            task(10, 1, AGENT, a.clone(), S),
            "203.0.113.5",
            443
        )]
    )
    .is_empty());
    assert_eq!(
        fired(
            &mut e,
            &[connect(
                5,
                task(10, 1, AGENT, a.clone(), S),
                "203.0.113.5",
                80
            )]
        ),
        vec![EGRESS_OUTSIDE_ALLOWLIST]
    );
    assert!(fired(
        &mut e,
        &[connect(
            6,
            task(10, 1, AGENT, a.clone(), S),
            "10.96.0.10",
            53
        )]
    )
    .is_empty());
    // `class: dns` does not let port 53 reach an outside resolver.
    assert_eq!(
        fired(
            &mut e,
            &[connect(7, task(10, 1, AGENT, a, S), "8.8.8.8", 53)]
        ),
        vec![EGRESS_OUTSIDE_ALLOWLIST]
    );
}

#[test]
fn api_server_contact_by_tier() {
    let mut e = engine("");
    let worker = pod_workload(A, "a", Some("worker"));
    let proxy = pod_workload(B, "b", Some("proxy"));
    assert_eq!(
        fired(
            &mut e,
            &[connect(1, task(10, 1, AGENT, worker, S), "10.96.0.1", 443)]
        ),
        vec![API_SERVER_NOT_ALLOWED]
    );
    assert!(fired(
        &mut e,
        &[connect(2, task(11, 1, AGENT, proxy, S), "10.96.0.1", 443)]
    )
    .is_empty());
    // No tier, no policy: nothing says it may not.
    let mut e = engine("");
    assert!(fired(
        &mut e,
        &[connect(
            3,
            task(12, 1, AGENT, pod_workload(A, "a", None), S),
            "10.96.0.1",
            443
        )]
    )
    .is_empty());
}

#[test]
fn node_credentials_and_environ() {
    let mut e = engine("");
    let a = pod_workload(A, "a", None);
    let kubeconfig = open(
        1,
        task(10, 1, AGENT, a.clone(), S),
        "/etc/kubernetes/admin.conf",
        CredentialClass::NodeKubeconfig,
        None,
    );
    assert_eq!(fired(&mut e, &[kubeconfig]), vec![NODE_CREDENTIAL_READ]);
    // Host processes too: a shell on the node (or a dev box) reading the admin
    // kubeconfig, PKI or cloud credentials...
    for (seq, path, class) in [
        (
            2,
            "/etc/kubernetes/admin.conf",
            CredentialClass::NodeKubeconfig,
        ),
        (21, "/etc/kubernetes/pki/ca.key", CredentialClass::NodePki),
        (
            22,
            "/home/dev/.aws/credentials",
            CredentialClass::CloudCredentials,
        ),
    ] {
        let host_read = open(
            seq,
            task(11, 1, "/usr/bin/cat", host(), S),
            path,
            class,
            None,
        );
        let anomalies = e.process(&host_read);
        assert_eq!(
            anomalies
                .iter()
                .map(|a| a.rule.as_str())
                .collect::<Vec<_>>(),
            vec![NODE_CREDENTIAL_READ],
            "{path}"
        );
        assert!(
            anomalies[0]
                .output
                .starts_with("Node credential read by a host process: host process cat"),
            "{}",
            anomalies[0].output
        );
        assert!(anomalies[0].workload.host);
    }
    // ...but not the node's own agents doing their job, by executable name (or comm
    // when the executable is unknown).
    let kubelet = open(
        23,
        task(12, 1, "/usr/bin/kubelet", host(), S),
        "/var/lib/kubelet/pki/kubelet-client-current.pem",
        CredentialClass::NodePki,
        None,
    );
    assert!(fired(&mut e, &[kubelet]).is_empty());
    let mut no_exe = task(13, 1, "/usr/bin/kubelet", host(), S);
    no_exe.exe = None;
    let kubelet_by_comm = open(
        24,
        no_exe,
        "/var/lib/kubelet/kubeconfig",
        CredentialClass::NodeKubeconfig,
        None,
    );
    assert!(fired(&mut e, &[kubelet_by_comm]).is_empty());
    // The exemption is for host processes only: a container running a binary named
    // kubelet is still a container reading node credentials.
    let fake_kubelet = open(
        25,
        task(14, 1, "/usr/bin/kubelet", a.clone(), S),
        "/var/lib/kubelet/kubeconfig",
        CredentialClass::NodeKubeconfig,
        None,
    );
    assert_eq!(fired(&mut e, &[fake_kubelet]), vec![NODE_CREDENTIAL_READ]);
    let environ = |seq, pid: u32, w: Workload| {
        let mut r = open(
            seq,
            task(10, 1, AGENT, w, S),
            &format!("/proc/{pid}/environ"),
            CredentialClass::ProcEnviron,
            None,
        );
        if let Record::Open(o) = &mut r {
            o.owner = Some(Owner {
                pid: Some(pid),
                ..Owner::default()
            });
        }
        r
    };
    assert_eq!(
        fired(&mut e, &[environ(3, 4242, a.clone())]),
        vec![PROC_ENVIRON_READ]
    );
    assert!(
        fired(&mut e, &[environ(4, 10, a.clone())]).is_empty(),
        "own environment"
    );
    // A host process reading another process's environment, too; its own is fine.
    assert_eq!(
        fired(&mut e, &[environ(5, 4242, host())]),
        vec![PROC_ENVIRON_READ]
    );
    assert!(
        fired(&mut e, &[environ(6, 10, host())]).is_empty(),
        "own environment"
    );
}

#[test]
fn baseline_deviation_after_the_learning_window() {
    let mut e = engine(POLICY);
    let a = pod_workload(A, "a", None);
    let learn = [
        open(
            1,
            task(10, 1, AGENT, a.clone(), S),
            TOKEN,
            CredentialClass::ServiceAccountToken,
            Some(A),
        ),
        connect(2, task(10, 1, AGENT, a.clone(), 2 * S), "10.96.0.10", 53),
    ];
    assert!(fired(&mut e, &learn).is_empty());
    // After 60 s: a known class is quiet, a new one is a Notice.
    let after = [
        connect(3, task(10, 1, AGENT, a.clone(), 70 * S), "10.96.0.11", 53),
        open(
            4,
            task(10, 1, AGENT, a.clone(), 71 * S),
            "/etc/openai/key",
            CredentialClass::SecretVolume,
            Some(A),
        ),
    ];
    let out: Vec<Anomaly> = after.iter().flat_map(|r| e.process(r)).collect();
    assert_eq!(
        out.iter().map(|x| x.rule.as_str()).collect::<Vec<_>>(),
        vec![BASELINE_DEVIATION]
    );
    assert_eq!(out[0].priority, Priority::Notice);
    assert!(out[0].output.contains("secret_volume"), "{}", out[0].output);
}

#[test]
fn lost_events_are_alerts() {
    let mut e = engine("");
    let lost = |lane: &str| {
        Record::Lost(LostRecord {
            seq: 1,
            time: "2026-11-23T07:00:00.000000001Z".into(),
            lane: lane.into(),
            count: 5,
            total: 5,
            reason: crate::events::LostReason::RingFull,
            workload: None,
        })
    };
    let cred = e.process(&lost("credential"));
    assert_eq!(
        (cred[0].rule.as_str(), cred[0].priority),
        (EVENTS_LOST, Priority::Critical)
    );
    let proc_lane = e.process(&lost("process"));
    assert_eq!(proc_lane[0].priority, Priority::Warning);
    // Records without findings raise nothing.
    let exec = Record::Exec(ExecRecord {
        seq: 2,
        task: task(10, 1, AGENT, host(), S),
        filename: AGENT.into(),
        old_pid: 10,
    });
    assert!(e.process(&exec).is_empty());
}

#[test]
fn budget_drops_are_alerts_naming_the_workload() {
    let mut e = engine("");
    let flooder = pod_workload(A, "flooder", None);
    let rec = Record::Lost(LostRecord {
        seq: 3,
        time: "2026-11-23T07:00:00.000000001Z".into(),
        lane: "credential".into(),
        count: 40,
        total: 90,
        reason: crate::events::LostReason::Budget,
        workload: Some(flooder.clone()),
    });
    let out = e.process(&rec);
    assert_eq!(out.len(), 1);
    let a = &out[0];
    assert_eq!(
        (a.rule.as_str(), a.priority),
        (EVENTS_LOST, Priority::Critical)
    );
    assert_eq!(a.workload, flooder, "the alert is the flooder's");
    let pod = flooder.pod.as_deref().expect("pod name");
    assert!(
        a.output.contains(pod) && a.output.contains("over budget"),
        "{}",
        a.output
    );
    assert_eq!(a.fields["k8s.pod.name"], serde_json::json!(pod));
    assert_eq!(a.fields["agent.lost_reason"], serde_json::json!("budget"));
}

#[test]
fn policy_overrides_disable_and_reprioritize() {
    let yaml = format!("{POLICY}  rules:\n    foreign-credential-read: {{priority: Notice}}\n    credential-read-unexpected-executable: {{disabled: true}}\n");
    let mut e = engine(&yaml);
    let a = pod_workload(A, "a", None);
    let r = open(
        1,
        task(10, 1, "/usr/bin/cat", a, S),
        "/var/lib/kubelet/pods/b/volumes/x/token",
        CredentialClass::ServiceAccountToken,
        Some(B),
    );
    let out = e.process(&r);
    assert_eq!(out.len(), 1, "{out:#?}");
    assert_eq!(
        (out[0].rule.as_str(), out[0].priority),
        (FOREIGN_CREDENTIAL_READ, Priority::Notice)
    );
}

#[test]
fn rate_limit_reports_what_it_suppressed() {
    let mut e = engine("");
    let a = pod_workload(A, "a", None);
    let mut passed = 0;
    for i in 0..25u64 {
        let r = open(
            i,
            task(10, 1, "/usr/bin/cat", a.clone(), S + i),
            TOKEN,
            CredentialClass::ServiceAccountToken,
            Some(A),
        );
        passed += e.process(&r).len();
    }
    assert_eq!(passed, 20);
    assert!(e.flush().is_empty(), "the window is still open");
    // Time moves on (any record advances it); the summary names the count.
    let later = open(
        99,
        task(10, 1, AGENT, a, 70 * S),
        TOKEN,
        CredentialClass::ServiceAccountToken,
        Some(A),
    );
    e.process(&later);
    let summary = e.flush();
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0].fields["agent.suppressed"], 5);
    assert!(
        summary[0].output.contains("5 more"),
        "{}",
        summary[0].output
    );
}

#[test]
fn reads_outside_the_policys_credential_grants_fire_and_granted_ones_do_not() {
    let policy = POLICY.replace(
        "    executables: [/usr/local/bin/agent]",
        "    executables: [/usr/local/bin/agent]\n    allowed:\n      - class: service_account_token\n      - path: /var/run/secrets/openai/*",
    );
    let mut e = engine(&policy);
    let a = pod_workload(A, "a", None);
    let read = |seq, path: &str, raw: &str, class| {
        let mut r = open(seq, task(10, 1, AGENT, a.clone(), S), path, class, Some(A));
        if let Record::Open(o) = &mut r {
            o.raw_path = raw.into();
        }
        r
    };
    let host = "/var/lib/kubelet/pods/a/volumes/kubernetes.io~secret/openai/..data/api-key";
    for (seq, path, raw, class, fires) in [
        // Granted by class.
        (1, TOKEN, TOKEN, CredentialClass::ServiceAccountToken, false),
        // Granted by path: the path as passed, through the kubelet's `..data` and the
        // `/var/run` symlink, matches the glob; the host path does not need to.
        (
            2,
            host,
            "/var/run/secrets/openai/..data/api-key",
            CredentialClass::SecretVolume,
            false,
        ),
        // `*` stays within the directory.
        (
            3,
            host,
            "/var/run/secrets/openai/nested/key",
            CredentialClass::SecretVolume,
            true,
        ),
        // A Secret the policy does not grant.
        (
            4,
            "/var/lib/kubelet/pods/a/volumes/kubernetes.io~secret/db/password",
            "/etc/db/password",
            CredentialClass::SecretVolume,
            true,
        ),
        // Nothing secret: never a grant question.
        (
            5,
            "/run/secrets/kubernetes.io/serviceaccount/ca.crt",
            "ca.crt",
            CredentialClass::NonSecret,
            false,
        ),
    ] {
        let want: Vec<String> = if fires {
            vec![CREDENTIAL_NOT_ALLOWED.to_owned()]
        } else {
            Vec::new()
        };
        assert_eq!(fired(&mut e, &[read(seq, path, raw, class)]), want, "{raw}");
    }
    // Without grants in the policy, the rule says nothing.
    let mut e = engine(POLICY);
    let secret = read(
        6,
        "/var/lib/kubelet/pods/a/volumes/kubernetes.io~secret/db/password",
        "/etc/db/password",
        CredentialClass::SecretVolume,
    );
    assert!(fired(&mut e, &[secret]).is_empty());
}
