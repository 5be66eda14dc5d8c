//! `agent-monitor replay` as a user runs it, over journals written the way the daemon
//! writes them: events, then the anomalies the engine produced for them. No root needed.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Arc, RwLock},
};

use agent_monitor::{
    api::{json, pb},
    config::Config,
    detect::Engine,
    events::{ConnectRecord, OpenRecord, Record, Task},
    identity::{credentials::CredentialClass, Workload},
    journal::{journal_record::Body, Item, JournalRecord, Options, Reader, RunMarker, Writer},
    outputs::grpc::anomaly_line,
    policy::{parse_policies, PolicySet},
};

const BIN: &str = env!("CARGO_BIN_EXE_agent-monitor");
const TOKEN: &str = "/run/secrets/kubernetes.io/serviceaccount/token";
const AGENT: &str = "/usr/local/bin/agent";
const S: u64 = 1_000_000_000;

/// What the daemon ran with: agents' credentials read by the agent only.
const BASE: &str = "apiVersion: agent-monitor.dev/v1alpha1
kind: AgentPolicy
metadata: {name: agents, namespace: agents}
spec:
  selector: {namespaces: [agents]}
  credentials:
    executables: [/usr/local/bin/agent]
";

/// Lets `cat` read credentials: the unexpected-executable rule is off for the agents.
const ALLOW_CAT: &str = "apiVersion: agent-monitor.dev/v1alpha1
kind: AgentPolicy
metadata: {name: agents, namespace: agents}
spec:
  selector: {namespaces: [agents]}
  credentials:
    executables: [/usr/local/bin/agent]
  rules:
    credential-read-unexpected-executable: {disabled: true}
";

/// Only python may read credentials: the agent's own read becomes an alert.
const STRICT: &str = "apiVersion: agent-monitor.dev/v1alpha1
kind: AgentPolicy
metadata: {name: agents, namespace: agents}
spec:
  selector: {namespaces: [agents]}
  credentials:
    executables: [/usr/bin/python3]
";

fn workload(ns: &str, pod: &str) -> Workload {
    Workload {
        host: false,
        namespace: Some(ns.into()),
        pod: Some(pod.into()),
        pod_uid: Some(format!("uid-{pod}")),
        container: Some("main".into()),
        container_id: Some(format!("cid-{pod}")),
        service_account: Some(format!("sa-{pod}")),
        agent: Some(format!("agent-{pod}")),
        tier: None,
        labels: [("app".to_owned(), pod.to_owned())].into(),
        cgroup: Some(format!("/kubepods/{pod}")),
        truncated: false,
        labels_truncated: 0,
    }
}

/// A task at `minute` minutes past 2026-01-01T00:00:00Z.
fn task(tgid: u32, exe: &str, w: Workload, minute: u64) -> Task {
    Task {
        time: format!("2026-01-01T00:{minute:02}:00.000000001Z"),
        ts_boot_ns: (minute + 1) * 60 * S,
        pid: tgid,
        tgid,
        ppid: Some(tgid - 1),
        uid: 1000,
        gid: 1000,
        comm: exe.rsplit('/').next().unwrap_or(exe).into(),
        exe: Some(exe.into()),
        cgroup_id: 42,
        start_ns: 0,
        workload: w.into(),
    }
}

fn unix_nanos(minute: u64) -> u64 {
    // 2026-01-01T00:00:00Z
    (1_767_225_600 + minute * 60) * S + 1
}

fn token_read(seq: u64, t: Task) -> Record {
    Record::Open(OpenRecord {
        seq,
        task: t,
        syscall: "openat".into(),
        path: TOKEN.into(),
        raw_path: TOKEN.into(),
        path_resolved: true,
        path_truncated: false,
        matched_by: "prefix".into(),
        dirfd: -100,
        flags: 0,
        mode: 0,
        result: 3,
        error: None,
        class: CredentialClass::ServiceAccountToken,
        owner: None,
        host_path: None,
        device: None,
        inode: None,
    })
}

fn metadata_connect(seq: u64, t: Task) -> Record {
    Record::Connect(ConnectRecord {
        seq,
        task: t,
        syscall: "connect".into(),
        family: "inet".into(),
        dst_addr: "169.254.169.254".into(),
        dst_port: 80,
        fd: 4,
        result: 0,
        error: None,
        attempted: true,
    })
}

/// The engine as the daemon builds it from the default config, with `policy`.
fn engine(policy: &str) -> Engine {
    let config = Config::default();
    let set = PolicySet::from(parse_policies(policy, Path::new("policy.yaml")).expect("policy"));
    Engine::new(
        agent_monitor::app::settings::detect(&config),
        Arc::new(RwLock::new(set)),
    )
}

/// Run 1: `cat` reads coder-0's token (minute 0), prod/api-0 contacts the metadata service
/// (minute 10), the agent reads coder-0's token (minute 20).
fn run1() -> Vec<(Record, u64)> {
    let coder = workload("agents", "coder-0");
    let api = workload("prod", "api-0");
    vec![
        (token_read(1, task(10, "/usr/bin/cat", coder.clone(), 0)), 0),
        (metadata_connect(2, task(20, AGENT, api, 10)), 10),
        (token_read(3, task(11, AGENT, coder, 20)), 20),
    ]
}

/// Run 2, after a restart (sequence numbers start again): `cat` in coder-1 (minute 30).
fn run2() -> Vec<(Record, u64)> {
    vec![(
        token_read(
            1,
            task(30, "/usr/bin/cat", workload("agents", "coder-1"), 30),
        ),
        30,
    )]
}

/// Writes one daemon run as the daemon does: start, each event followed by the anomalies
/// the engine found for it, stop. Returns the anomalies.
fn write_run(dir: &Path, run_id: &str, records: &[(Record, u64)]) -> Vec<pb::Anomaly> {
    let (mut writer, _) = Writer::open(dir, Options::default()).expect("journal");
    let mut engine = engine(BASE);
    let mut seq = 0;
    let mut append = |writer: &mut Writer, minute: u64, body: Body| {
        seq += 1;
        writer
            .append(&JournalRecord {
                run_id: run_id.into(),
                seq,
                unix_nanos: unix_nanos(minute),
                body: Some(body),
            })
            .expect("append");
    };
    let marker = |reason: &str| RunMarker {
        node: "node-a".into(),
        version: "0.1.0".into(),
        reason: reason.into(),
        pid: 1,
        records: 0,
    };
    append(&mut writer, 0, Body::Start(marker("start")));
    let mut anomalies = Vec::new();
    for (record, minute) in records {
        append(&mut writer, *minute, Body::Event(pb::Event::from(record)));
        for a in engine.process(record) {
            let a = pb::Anomaly::from(&a);
            append(&mut writer, *minute, Body::Anomaly(a.clone()));
            anomalies.push(a);
        }
    }
    append(&mut writer, 59, Body::Stop(marker("signal")));
    writer.close().expect("close");
    anomalies
}

struct Journal {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    policies: PathBuf,
    run1: Vec<pb::Anomaly>,
    run2: Vec<pb::Anomaly>,
}

impl Journal {
    fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("am-replay")
            .tempdir()
            .expect("tempdir");
        let dir = tmp.path().join("journal");
        let run1 = write_run(&dir, "run-1", &run1());
        let run2 = write_run(&dir, "run-2", &run2());
        let policies = tmp.path().join("policies");
        std::fs::create_dir(&policies).expect("mkdir");
        for (name, text) in [("base", BASE), ("allow-cat", ALLOW_CAT), ("strict", STRICT)] {
            std::fs::write(policies.join(format!("{name}.yaml")), text).expect("policy");
        }
        Self {
            _tmp: tmp,
            dir,
            policies,
            run1,
            run2,
        }
    }

    fn policy(&self, name: &str) -> String {
        self.policies
            .join(format!("{name}.yaml"))
            .to_string_lossy()
            .into_owned()
    }

    fn recorded(&self) -> Vec<pb::Anomaly> {
        self.run1.iter().chain(&self.run2).cloned().collect()
    }
}

fn replay(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .arg("replay")
        .arg("--journal")
        .arg(dir)
        .args(args)
        .output()
        .expect("run agent-monitor");
    assert!(
        out.status.success(),
        "replay {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn table(alerts: &[&pb::Anomaly]) -> Vec<String> {
    alerts.iter().map(|a| anomaly_line(a)).collect()
}

fn json(alerts: &[pb::Anomaly]) -> Vec<serde_json::Value> {
    alerts
        .iter()
        .map(|a| json::anomaly(a).expect("json"))
        .collect()
}

fn parsed(out: &Output) -> Vec<serde_json::Value> {
    lines(out)
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn by_rule<'a>(alerts: &'a [pb::Anomaly], rule: &str, pod: &str) -> &'a pb::Anomaly {
    alerts
        .iter()
        .find(|a| a.rule == rule && a.workload.as_ref().is_some_and(|w| w.pod == pod))
        .unwrap_or_else(|| panic!("no {rule} for {pod} in {alerts:#?}"))
}

#[test]
fn the_journal_holds_the_alerts_the_tests_rely_on() {
    let j = Journal::new();
    let recorded = j.recorded();
    let rules: Vec<&str> = recorded.iter().map(|a| a.rule.as_str()).collect();
    assert_eq!(
        rules,
        [
            "credential-read-unexpected-executable",
            "cloud-metadata-contact",
            "credential-read-unexpected-executable"
        ]
    );
}

#[test]
fn without_policies_the_recorded_alerts_are_printed_as_recorded() {
    let j = Journal::new();
    let out = replay(&j.dir, &["--format", "json"]);
    assert_eq!(parsed(&out), json(&j.recorded()));
    let out = replay(&j.dir, &[]);
    let recorded = j.recorded();
    assert_eq!(lines(&out), table(&recorded.iter().collect::<Vec<_>>()));

    let out = replay(&j.dir, &["--format", "falco"]);
    let falco = parsed(&out);
    assert_eq!(falco.len(), 3);
    assert_eq!(falco[1]["rule"], "cloud-metadata-contact");
    assert_eq!(falco[1]["priority"], "Error");
    assert_eq!(falco[1]["hostname"], "node-a");
    assert_eq!(falco[1]["source"], "agent-monitor");
    assert_eq!(falco[1]["output_fields"]["k8s.pod.name"], "api-0");
    assert_eq!(falco[1]["time"], "2026-01-01T00:10:00.000000001Z");
}

#[test]
fn the_policies_in_use_reproduce_the_recorded_alerts_and_diff_to_nothing() {
    let j = Journal::new();
    let base = j.policy("base");
    let out = replay(&j.dir, &["--policy", &base, "--format", "json"]);
    assert_eq!(parsed(&out), json(&j.recorded()));
    let out = replay(&j.dir, &["--policy", &base, "--diff"]);
    assert_eq!(lines(&out), Vec::<String>::new());
}

#[test]
fn a_policy_allowing_cat_removes_its_alerts() {
    let j = Journal::new();
    let out = replay(&j.dir, &["--policy", &j.policy("allow-cat"), "--diff"]);
    let removed = [
        by_rule(&j.run1, "credential-read-unexpected-executable", "coder-0"),
        by_rule(&j.run2, "credential-read-unexpected-executable", "coder-1"),
    ];
    let want: Vec<String> = table(&removed).iter().map(|l| format!("- {l}")).collect();
    assert_eq!(lines(&out), want);
    // Without --diff, the alerts of the new policy: only the metadata contact is left.
    let out = replay(
        &j.dir,
        &["--policy", &j.policy("allow-cat"), "--format", "json"],
    );
    let left = parsed(&out);
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(left[0]["rule"], "cloud-metadata-contact");
}

#[test]
fn a_stricter_policy_adds_an_alert() {
    let j = Journal::new();
    let out = replay(&j.dir, &["--policy", &j.policy("strict"), "--diff"]);
    // What the daemon would have said with the strict policy: the agent's own read.
    let mut strict = engine(STRICT);
    let found: Vec<pb::Anomaly> = run1()
        .iter()
        .flat_map(|(r, _)| strict.process(r))
        .map(|a| pb::Anomaly::from(&a))
        .collect();
    let added = found
        .iter()
        .find(|a| a.event_seqs == [3])
        .expect("the agent's read is an alert under the strict policy");
    assert_eq!(added.rule, "credential-read-unexpected-executable");
    assert_eq!(lines(&out), vec![format!("+ {}", anomaly_line(added))]);
}

#[test]
fn filters_narrow_the_output() {
    let j = Journal::new();
    let cat0 = by_rule(&j.run1, "credential-read-unexpected-executable", "coder-0");
    let metadata = by_rule(&j.run1, "cloud-metadata-contact", "api-0");
    let cat1 = by_rule(&j.run2, "credential-read-unexpected-executable", "coder-1");
    let cases: [(&[&str], Vec<&pb::Anomaly>); 8] = [
        (&["--namespace", "prod"], vec![metadata]),
        (&["--pod", "coder-0"], vec![cat0]),
        // As tail takes them: namespace/name, or the pod's UID.
        (&["--pod", "agents/coder-0"], vec![cat0]),
        (&["--pod", "uid-coder-0"], vec![cat0]),
        (&["--pod", "coder-0", "--pod", "coder-1"], vec![cat0, cat1]),
        (&["--agent", "agent-coder-1"], vec![cat1]),
        (&["--since", "2026-01-01T00:10:00Z"], vec![metadata, cat1]),
        (
            &[
                "--since",
                "2026-01-01T00:05:00Z",
                "--until",
                "2026-01-01T00:15:00Z",
            ],
            vec![metadata],
        ),
    ];
    for (args, want) in cases {
        assert_eq!(lines(&replay(&j.dir, args)), table(&want), "{args:?}");
    }
    // Relative: everything in the journal is older than an hour ago, none newer.
    assert_eq!(lines(&replay(&j.dir, &["--until", "1h"])).len(), 3);
    assert_eq!(
        lines(&replay(&j.dir, &["--since", "1h"])),
        Vec::<String>::new()
    );
    // The same filters apply to both sides of a diff.
    let out = replay(
        &j.dir,
        &[
            "--policy",
            &j.policy("allow-cat"),
            "--diff",
            "--pod",
            "coder-1",
        ],
    );
    assert_eq!(lines(&out), vec![format!("- {}", anomaly_line(cat1))]);
}

#[test]
fn a_corrupt_segment_is_reported_and_the_rest_replays() {
    let j = Journal::new();
    // The frame of run 1's metadata connect event: from there, its segment is untrusted.
    let (segment, offset) = Reader::open(&j.dir)
        .expect("reader")
        .find_map(|item| match item {
            Item::Record {
                segment,
                offset,
                record,
            } if matches!(&record.body, Some(Body::Event(e)) if e.seq == 2)
                && record.run_id == "run-1" =>
            {
                Some((segment.to_path_buf(), offset))
            }
            _ => None,
        })
        .expect("the connect event");
    let mut bytes = std::fs::read(&segment).expect("segment");
    let at = usize::try_from(offset).expect("offset") + 8 + 3;
    bytes[at] ^= 0xff;
    std::fs::write(&segment, &bytes).expect("corrupt");

    let out = replay(&j.dir, &["--format", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let name = segment.to_string_lossy();
    assert!(
        stderr.contains(&format!(
            "damaged journal: segment {name}, offset {offset}, {} bytes skipped: record checksum mismatch",
            bytes.len() as u64 - offset
        )),
        "{stderr}"
    );
    // Before the damage and after it (the next segment) replay; the rest of the damaged
    // segment does not.
    let cat0 = by_rule(&j.run1, "credential-read-unexpected-executable", "coder-0");
    assert_eq!(parsed(&out), json(&[cat0.clone(), j.run2[0].clone()]));

    // Re-running detection: run 1 lost its metadata contact and the agent's read with the
    // damage, so the diff has nothing to say about them.
    let out = replay(&j.dir, &["--policy", &j.policy("base"), "--diff"]);
    assert_eq!(lines(&out), Vec::<String>::new());
}

#[test]
fn replays_a_read_only_copy_as_an_unprivileged_user() {
    let j = Journal::new();
    if !is_root() {
        // Already unprivileged: the other tests prove it.
        return;
    }
    let copy = tempfile::Builder::new()
        .prefix("am-replay-copy")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(copy.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dir = copy.path().join("journal");
    std::fs::create_dir(&dir).expect("mkdir");
    for entry in std::fs::read_dir(&j.dir).expect("list") {
        let entry = entry.expect("entry");
        let to = dir.join(entry.file_name());
        std::fs::copy(entry.path(), &to).expect("copy");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o444)).expect("chmod");
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let policy = copy.path().join("allow-cat.yaml");
    std::fs::write(&policy, ALLOW_CAT).expect("policy");
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o444)).expect("chmod");

    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(BIN)
        .arg("replay")
        .arg("--journal")
        .arg(&dir)
        .arg("--policy")
        .arg(&policy)
        .arg("--diff")
        .output()
        .expect("run setpriv");
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines(&out).len(), 2, "{:?}", lines(&out));
    assert!(lines(&out).iter().all(|l| l.starts_with("- ")));
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[test]
fn bad_arguments_exit_64() {
    let j = Journal::new();
    // Clap refuses --diff without --policy itself, with its usage status (2).
    for (args, status, message) in [
        (vec!["--since", "yesterday"], 64, "--since \"yesterday\""),
        (vec!["--diff"], 2, "--policy"),
        (
            vec!["--policy", "/nonexistent/policy.yaml"],
            64,
            "/nonexistent",
        ),
    ] {
        let out = Command::new(BIN)
            .arg("replay")
            .arg("--journal")
            .arg(&j.dir)
            .args(&args)
            .output()
            .expect("run agent-monitor");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(status), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}
