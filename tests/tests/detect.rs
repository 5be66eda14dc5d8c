//! Detection on a simulated node with real events: a benign agent raises nothing, a shell
//! reading the token, a read of another pod's token and a token read followed by egress
//! to a network namespace outside the allowlist each raise their rule, and every alert
//! passes Falcosidekick's input checks. Needs root and BPF.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use agent_monitor::{
    config::{Config, PodSourceKind},
    detect::{self, destinations::Endpoint, Anomaly, DetectSettings, Engine},
    events::Record,
    outputs::falco::FalcoAlert,
    policy::PolicySet,
};
use agent_monitor_tests::{
    netns::NetNs,
    privileged,
    sim::{pods_file, proxy_policy, run_in_pod, SimPod},
    unique, Harness, TempTree, TestCgroup,
};

const WAIT: Duration = Duration::from_secs(15);

/// The checks Falcosidekick applies to `POST /` before accepting an alert.
fn falcosidekick_accepts(alert: &serde_json::Value) -> Result<(), String> {
    const PRIORITIES: &[&str] = &[
        "emergency",
        "alert",
        "critical",
        "error",
        "warning",
        "notice",
        "informational",
        "debug",
    ];
    let p = alert["priority"].as_str().ok_or("no priority")?;
    if !PRIORITIES.contains(&p.to_lowercase().as_str()) {
        return Err(format!("unknown priority {p}"));
    }
    if alert["rule"].as_str().is_none_or(str::is_empty) {
        return Err("empty rule".into());
    }
    let t = alert["time"].as_str().ok_or("no time")?;
    humantime::parse_rfc3339(t).map_err(|e| format!("bad time {t}: {e}"))?;
    if alert["output_fields"]
        .as_object()
        .is_none_or(|f| f.is_empty())
    {
        return Err("empty output_fields".into());
    }
    Ok(())
}

struct Scene {
    h: Harness,
    engine: Engine,
    fed: usize,
    anomalies: Vec<Anomaly>,
}

impl Scene {
    /// Waits for `n` opens or connects of am-testkid or cat in `cgroup`, feeds every new
    /// record to the engine and returns what it raised.
    fn step(&mut self, cgroup: u64, comm: &str, n: usize) -> Vec<Anomaly> {
        let matching = |r: &[Record]| {
            r.iter()
                .filter(|r| {
                    matches!(r, Record::Open(_) | Record::Connect(_))
                        && r.task()
                            .is_some_and(|t| t.cgroup_id == cgroup && t.comm == comm)
                })
                .count()
        };
        let before = matching(&self.h.records[..self.fed]);
        self.h.wait_until(WAIT, |r| matching(r) >= before + n);
        self.h.settle(Duration::from_millis(200));
        let mut raised = Vec::new();
        for r in &self.h.records[self.fed..] {
            raised.extend(self.engine.process(r));
        }
        self.fed = self.h.records.len();
        self.anomalies.extend(raised.clone());
        raised
    }
}

fn rules(a: &[Anomaly]) -> Vec<&str> {
    let mut v: Vec<&str> = a.iter().map(|a| a.rule.as_str()).collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn benign_agent_is_quiet_and_each_misuse_raises_its_rule() {
    if !privileged("benign_agent_is_quiet_and_each_misuse_raises_its_rule") {
        return;
    }
    let tree = TempTree::new("am-detect");
    let kroot = tree.root.join("kubelet");
    let top_name = unique("am-test-detect");
    let top = TestCgroup::create(&top_name);
    let a = SimPod::new(&top_name, 0x5c5c5c5c, "agent-a", "researcher");
    let b = SimPod::new(&top_name, 0x6d6d6d6d, "agent-b", "coder");
    a.kubelet_volume(&kroot);
    let b_vol = b.kubelet_volume(&kroot);
    let pods_path = tree.root.join("pods.json");
    pods_file(&pods_path, &[a.json(None), b.json(None)]);

    let net = NetNs::create("detect", 7);
    let api = net.listen(6443);
    let elsewhere = net.listen(8443);

    let policy = tree.root.join("policy.yaml");
    proxy_policy(&policy);

    let mut config = Config::default();
    config.identity.kubelet_root = kroot.display().to_string();
    config.identity.pods.source = PodSourceKind::File;
    config.identity.pods.file = Some(pods_path.clone());
    config.cgroups = vec![top.path.clone()];
    config.detect.api_servers = vec![api.to_string()];
    config.detect.policies = vec![policy.clone()];

    let policies = PolicySet::load(std::slice::from_ref(&policy)).expect("policy loads");
    let mut dc = DetectSettings::from_settings(&config.detect, 100);
    assert_eq!(
        dc.destinations.api_servers,
        vec![Endpoint::parse(&api.to_string()).expect("ep")]
    );
    dc.exfil_window = Duration::from_secs(30);
    let engine = Engine::new(dc, Arc::new(RwLock::new(policies)));

    let store = agent_monitor::identity::pods::PodStore::new();
    let h = Harness::start_with_pods(&config, store.clone());
    store.replace_all(agent_monitor::identity::pods::file::load(&pods_path).expect("pods"));
    let mut s = Scene {
        h,
        engine,
        fed: 0,
        anomalies: Vec::new(),
    };
    let token = "/var/run/secrets/kubernetes.io/serviceaccount/token";

    // The benign agent: its own binary reads its own token, then talks to the API server.
    run_in_pod(
        &a,
        &kroot,
        &[],
        &[format!("openat:{token}"), format!("connect:{api}")],
        false,
    );
    let benign = s.step(a.cgroup.id, "am-testkid", 2);
    assert!(
        benign.is_empty(),
        "benign agent raised {:?}",
        benign.iter().map(|a| &a.output).collect::<Vec<_>>()
    );

    // A shell reads the token.
    run_in_pod(&a, &kroot, &[], &[format!("cat {token} > /dev/null")], true);
    let shell = s.step(a.cgroup.id, "cat", 1);
    assert_eq!(
        rules(&shell),
        vec![detect::UNEXPECTED_EXECUTABLE],
        "{shell:#?}"
    );
    assert!(
        shell[0].output.contains("/usr/bin/cat") || shell[0].output.contains("/bin/cat"),
        "{}",
        shell[0].output
    );
    assert!(
        shell[0].output.contains("researcher") && shell[0].output.contains("agent-a"),
        "{}",
        shell[0].output
    );

    // The agent reads another pod's token through the kubelet's directory.
    let foreign_path = b_vol.join("..data/token");
    run_in_pod(
        &a,
        &kroot,
        &[],
        &[format!("openat:{}", foreign_path.display())],
        false,
    );
    let foreign = s.step(a.cgroup.id, "am-testkid", 1);
    assert_eq!(
        rules(&foreign),
        vec![detect::FOREIGN_CREDENTIAL_READ],
        "{foreign:#?}"
    );
    assert_eq!(foreign[0].fields["agent.owner.pod"], "agent-b");

    // The agent reads its token and connects outside its allowlist.
    run_in_pod(
        &a,
        &kroot,
        &[],
        &[format!("openat:{token}"), format!("connect:{elsewhere}")],
        false,
    );
    let exfil = s.step(a.cgroup.id, "am-testkid", 2);
    let e = exfil
        .iter()
        .find(|x| x.rule == detect::EXFILTRATION)
        .unwrap_or_else(|| panic!("no exfiltration alert: {exfil:#?}"));
    let fed = &s.h.records;
    let read = fed
        .iter()
        .rev()
        .find_map(|r| match r {
            Record::Open(o) if o.task.cgroup_id == a.cgroup.id && o.raw_path == token => {
                Some(o.seq)
            }
            _ => None,
        })
        .expect("read record");
    let connect = fed
        .iter()
        .rev()
        .find_map(|r| match r {
            Record::Connect(c)
                if c.task.cgroup_id == a.cgroup.id && c.dst_port == elsewhere.port() =>
            {
                Some(c.seq)
            }
            _ => None,
        })
        .expect("connect record");
    assert_eq!(
        e.events,
        vec![read, connect],
        "the alert references both events"
    );
    assert!(
        e.output.contains(&elsewhere.ip().to_string()),
        "{}",
        e.output
    );

    // Every alert is acceptable to Falcosidekick.
    let host = "node-a".to_owned();
    assert!(!s.anomalies.is_empty());
    for a in &s.anomalies {
        let v = serde_json::to_value(FalcoAlert::new(a, &host)).expect("alert json");
        falcosidekick_accepts(&v).unwrap_or_else(|e| panic!("{e}: {v}"));
    }
    drop(net);
}
