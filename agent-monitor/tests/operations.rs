//! The daemon as an operator runs it: the real binary, real files, real cgroups, real
//! signals. A quiet node stays healthy; SIGHUP reopens the outputs for log rotation; output
//! files are 0600 whatever the umask; a restart after SIGKILL never appends onto a torn
//! line; pod metadata over the limits is cut and marked; a flood of identical warnings is
//! one line and a count; loss reports are numbered. Needs root and BPF.

#[path = "support/daemon.rs"]
mod support_daemon;
#[path = "support/privileged.rs"]
mod support_privileged;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use support_daemon::{Cgroup, Daemon};
use support_privileged::privileged;

use serde_json::Value;

/// Longest any one expected thing may take (BPF load, a record reaching a file).
const WAIT: Duration = Duration::from_secs(60);

fn json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{} line {}: {e}: {l:.200}", path.display(), i + 1))
        })
        .collect()
}

/// Waits until the JSON lines of `path` satisfy `done`; returns them.
fn wait_lines(path: &Path, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        // A line being written may be half there: read only whole lines.
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let whole = text.rfind('\n').map_or("", |i| &text[..=i]);
        let lines: Vec<Value> = whole
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:.200}: {e}")))
            .collect();
        if done(&lines) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{}: condition not met: {} lines",
            path.display(),
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

fn seq(v: &Value) -> u64 {
    v["seq"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no seq: {v}"))
}

fn is_silence_notice(a: &Value) -> bool {
    a["rule"] == "monitor-kernel-silent"
}

/// A metric's value from `/metrics`.
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn a_quiet_node_stays_healthy_and_reports_its_silence() {
    if !privileged("a_quiet_node_stays_healthy_and_reports_its_silence") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // A cgroup nothing runs in: the kernel reports nothing at all.
    let cg = Cgroup::nested(&format!("am-ops-quiet-{}", std::process::id()), "");
    let (events, alerts) = (
        dir.path().join("events.jsonl"),
        dir.path().join("alerts.jsonl"),
    );
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "cgroups: [\"{}\"]\noutput: \"{}\"\nalerts: {{output: \"{}\"}}\n\
             grpc: {{listen: none}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
             health: {{kernel_silence_ms: 1000}}\n",
            cg.path.display(),
            events.display(),
            alerts.display()
        ),
    )
    .expect("config");
    let d = Daemon::start(&config);
    // The silence window passes: one notice, at Notice priority.
    let notices = wait_lines(&alerts, |a| a.iter().any(is_silence_notice));
    let notice = notices
        .iter()
        .find(|a| is_silence_notice(a))
        .expect("notice");
    assert_eq!(notice["priority"], "Notice", "{notice}");
    // Past the window, and with no kernel record ever: alive.
    let health = d.get("/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("\r\n\r\nok\n"), "{health}");
    let metrics = d.get("/metrics");
    let silence = metric(&metrics, "agent_monitor_kernel_silence_seconds")
        .unwrap_or_else(|| panic!("no silence metric:\n{metrics}"));
    assert!(silence >= 1.0, "{silence}\n{metrics}");
    // The queue between the lane consumer and the outputs is reported (and empty).
    assert_eq!(
        metric(&metrics, "agent_monitor_queue_depth{queue=\"pipeline\"}"),
        Some(0.0),
        "{metrics}"
    );
    // Nothing was reported: the node really was quiet.
    assert!(json_lines(&events).is_empty());
    d.stop();
}

#[test]
fn sighup_reopens_outputs_and_files_are_owner_only_under_umask_000() {
    if !privileged("sighup_reopens_outputs_and_files_are_owner_only_under_umask_000") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cg = Cgroup::nested(&format!("am-ops-hup-{}", std::process::id()), "");
    let (events, alerts) = (
        dir.path().join("events.jsonl"),
        dir.path().join("alerts.jsonl"),
    );
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "cgroups: [\"{}\"]\noutput: \"{}\"\nalerts: {{output: \"{}\"}}\n\
             grpc: {{listen: none}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
             health: {{kernel_silence_ms: 1000}}\n",
            cg.path.display(),
            events.display(),
            alerts.display()
        ),
    )
    .expect("config");
    let mut d = Daemon::start_under_open_umask(&config);
    assert_eq!(mode(&events), 0o600, "event file under umask 000");
    assert_eq!(mode(&alerts), 0o600, "alert file under umask 000");

    // Records and an alert in the first files.
    cg.run("exec /bin/true");
    let before = wait_lines(&events, |e| e.iter().any(|r| r.get("exit").is_some()));
    wait_lines(&alerts, |a| a.iter().any(is_silence_notice));

    // Rotate: move both files away, then SIGHUP.
    let (old_events, old_alerts) = (dir.path().join("events.1"), dir.path().join("alerts.1"));
    std::fs::rename(&events, &old_events).expect("rotate events");
    std::fs::rename(&alerts, &old_alerts).expect("rotate alerts");
    d.signal(libc::SIGHUP);
    d.wait_log(&["SIGHUP received"]);
    d.wait_log(&["output", &events.display().to_string(), "reopened"]);
    d.wait_log(&["output", &alerts.display().to_string(), "reopened"]);
    assert_eq!(mode(&events), 0o600, "reopened event file under umask 000");
    assert_eq!(mode(&alerts), 0o600, "reopened alert file under umask 000");

    // New records land in new files at the original paths.
    cg.run("exec /bin/true");
    let after = wait_lines(&events, |e| e.iter().any(|r| r.get("exit").is_some()));
    wait_lines(&alerts, |a| a.iter().any(is_silence_notice));
    let log = d.stop();
    assert!(
        !log.iter()
            .any(|l| l.contains("reopening the") && l.contains("failed")),
        "{log:?}"
    );

    // The old files are complete: whole lines only, everything from before the rotation.
    let old = json_lines(&old_events);
    assert_eq!(
        old, before,
        "the old event file holds exactly what was written before"
    );
    assert!(json_lines(&old_alerts).iter().any(is_silence_notice));
    // The new file continues the sequence.
    let last_old = old.iter().map(seq).max().expect("old records");
    assert!(after.iter().all(|r| seq(r) > last_old), "{after:?}");
    json_lines(&events);
    json_lines(&alerts);
}

#[test]
fn a_restart_after_sigkill_never_appends_onto_a_torn_line() {
    if !privileged("a_restart_after_sigkill_never_appends_onto_a_torn_line") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cg = Cgroup::nested(&format!("am-ops-torn-{}", std::process::id()), "");
    let (events, alerts) = (
        dir.path().join("events.jsonl"),
        dir.path().join("alerts.jsonl"),
    );
    // What a SIGKILL mid-write leaves: whole lines, then a fragment.
    let torn = "{\"seq\":\"3\",\"process\":{\"pid\":12";
    std::fs::write(
        &events,
        format!("{{\"seq\":\"1\"}}\n{{\"seq\":\"2\"}}\n{torn}"),
    )
    .expect("torn events");
    let torn_alert = "{\"rule\":\"monitor-ker";
    std::fs::write(&alerts, format!("{{\"rule\":\"x\"}}\n{torn_alert}")).expect("torn alerts");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "cgroups: [\"{}\"]\noutput: \"{}\"\nalerts: {{output: \"{}\"}}\n\
             grpc: {{listen: none}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
             health: {{kernel_silence_ms: 1000}}\n",
            cg.path.display(),
            events.display(),
            alerts.display()
        ),
    )
    .expect("config");

    let mut d = Daemon::start(&config);
    d.wait_log(&[
        &events.display().to_string(),
        &format!("dropped the {}-byte torn last line", torn.len()),
    ]);
    d.wait_log(&[
        &alerts.display().to_string(),
        &format!("dropped the {}-byte torn last line", torn_alert.len()),
    ]);
    cg.run("exec /bin/true");
    wait_lines(&events, |e| e.iter().any(|r| r.get("exit").is_some()));
    wait_lines(&alerts, |a| a.iter().any(is_silence_notice));

    // Killed under load: a writer in the cgroup keeps the outputs busy.
    let load = format!(
        "echo $$ > {}/cgroup.procs && while :; do /bin/true; done",
        cg.path.display()
    );
    let mut loader = Command::new("sh")
        .args(["-c", &load])
        .spawn()
        .expect("load");
    wait_lines(&events, |e| e.len() > 500);
    d.signal(libc::SIGKILL);
    let _ = d.child.wait();
    let _ = loader.kill();
    let _ = loader.wait();
    drop(d);

    // Whatever the kill left, the restart leaves only whole lines and appends after them.
    let d = Daemon::start(&config);
    cg.run("exec /bin/true");
    let count = json_lines(&events).len();
    wait_lines(&events, |e| e.len() > count);
    d.stop();
    let all = json_lines(&events);
    assert_eq!(all[0]["seq"], "1");
    assert_eq!(all[1]["seq"], "2");
    assert!(all[2].get("process").is_some(), "{}", all[2]);
    json_lines(&alerts);
}

#[test]
fn pod_metadata_over_the_limits_is_cut_and_marked_in_events() {
    if !privileged("pod_metadata_over_the_limits_is_cut_and_marked_in_events") {
        return;
    }
    const UID: &str = "5e5e5e5e-1b2c-4d5e-8f90-a1b2c3d4e5f6";
    const CID: &str = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";
    let dir = tempfile::tempdir().expect("tempdir");
    let top = format!("am-ops-meta-{}", std::process::id());
    let cg = Cgroup::nested(
        &top,
        &format!(
            "kubepods-besteffort-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        ),
    );
    // A 1 MB name, a 1 MB label value and 2,001 labels.
    let name = "n".repeat(1 << 20);
    let mut labels = serde_json::Map::new();
    labels.insert("agent-monitor.dev/agent".into(), "researcher".into());
    // Sorts before the 2,000 others, so it is among the labels kept, and cut.
    labels.insert("a-big".into(), "v".repeat(1 << 20).into());
    for i in 0..2000 {
        labels.insert(format!("a{i:04}"), "x".into());
    }
    let pod = serde_json::json!({"items": [{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "agents", "uid": UID, "labels": labels},
        "spec": {"serviceAccountName": "agent-sa", "containers": [{"name": "agent", "image": "i"}]},
        "status": {"containerStatuses": [{"name": "agent", "containerID": format!("containerd://{CID}"),
                   "image": "i", "imageID": "i", "ready": true, "restartCount": 0}]}
    }]});
    let pods = dir.path().join("pods.json");
    std::fs::write(&pods, pod.to_string()).expect("pods file");
    let events = dir.path().join("events.jsonl");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "cgroups: [\"{}\"]\noutput: \"{}\"\nalerts: {{output: none}}\n\
             grpc: {{listen: none}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
             identity: {{pods: {{source: file, file: \"{}\"}}}}\n",
            cg.top.display(),
            events.display(),
            pods.display()
        ),
    )
    .expect("config");
    let mut d = Daemon::start(&config);
    d.wait_log(&["pod agents/nnn", "metadata over the limits is cut"]);
    cg.run("exec /bin/true");
    let lines = wait_lines(&events, |e| {
        e.iter()
            .any(|r| r.get("exec").is_some() && r["workload"]["pod_uid"] == UID)
    });
    d.stop();
    let raw = std::fs::read_to_string(&events).expect("events");
    let longest = raw.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 32 * 1024, "an event line of {longest} bytes");
    let exec = lines
        .iter()
        .find(|r| r.get("exec").is_some() && r["workload"]["pod_uid"] == UID)
        .expect("exec in the pod");
    let w = &exec["workload"];
    let pod_name = w["pod"].as_str().expect("pod name");
    assert_eq!(pod_name.len(), 253, "{pod_name}");
    assert!(
        pod_name.starts_with("nnnn") && pod_name.ends_with('…'),
        "{pod_name}"
    );
    assert_eq!(w["truncated"], true, "{w}");
    // 2,002 labels: 64 kept (the agent label first), the 1 MB value cut.
    let kept = w["labels"].as_object().expect("labels");
    assert_eq!(kept.len(), 64, "{w}");
    assert_eq!(w["agent"], "researcher");
    assert_eq!(kept["a-big"].as_str().map(str::len), Some(63));
    assert_eq!(w["labels_truncated"], 2002 - 64 + 1, "{w}");
    assert_eq!(w["namespace"], "agents");
}

#[test]
fn ten_thousand_unknown_pod_records_make_one_warning_and_a_count() {
    if !privileged("ten_thousand_unknown_pod_records_make_one_warning_and_a_count") {
        return;
    }
    const UID: &str = "6f6f6f6f-1b2c-4d5e-8f90-a1b2c3d4e5f6";
    const CID: &str = "6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f";
    let dir = tempfile::tempdir().expect("tempdir");
    let top = format!("am-ops-flood-{}", std::process::id());
    let cg = Cgroup::nested(
        &top,
        &format!(
            "kubepods-besteffort-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        ),
    );
    let watched = dir.path().join("secrets");
    std::fs::create_dir(&watched).expect("mkdir");
    // No pod in the file: every record of the pod waits for metadata that never comes,
    // and with room for one waiting record each new one pushes the previous one out.
    let pods = dir.path().join("pods.json");
    std::fs::write(&pods, "{\"items\":[]}").expect("pods file");
    let events = dir.path().join("events.jsonl");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "cgroups: [\"{}\"]\noutput: \"{}\"\nalerts: {{output: none}}\n\
             grpc: {{listen: none}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
             watch: {{prefixes: [\"{}/\"]}}\n\
             identity: {{pods: {{source: file, file: \"{}\"}}, pending: {{max_wait_ms: 60000, max_events: 1}}}}\n",
            cg.top.display(),
            events.display(),
            watched.display(),
            pods.display()
        ),
    )
    .expect("config");
    let d = Daemon::start(&config);
    // 10,000 failed opens of a watched path, from the shell itself (no fork per open).
    cg.run(&format!(
        "i=0; while [ $i -lt 10000 ]; do true < {}/missing 2>/dev/null; i=$((i+1)); done",
        watched.display()
    ));
    let log = d.stop();
    let warnings: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("pending queue full"))
        .collect();
    assert_eq!(warnings.len(), 2, "one line, then the count: {warnings:?}");
    let count: u64 = warnings[1]
        .split(" (")
        .last()
        .and_then(|s| s.split(" more in the last ").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {}", warnings[1]));
    // Every record of the pod but the last left the queue pushed out by the next one: one
    // warning each, all counted.
    // Loss reports name the pod too (a budget drop is one workload's) but never wait in
    // the queue.
    let of_pod = json_lines(&events)
        .iter()
        .filter(|r| r["workload"]["pod_uid"] == UID && r.get("lost").is_none())
        .count() as u64;
    assert!(of_pod > 1000, "{of_pod} records of the pod");
    assert_eq!(1 + count, of_pod - 1, "{}", warnings[1]);
}

#[test]
fn loss_reports_are_numbered_in_the_stream() {
    if !privileged("loss_reports_are_numbered_in_the_stream") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cg = Cgroup::nested(&format!("am-ops-lost-{}", std::process::id()), "");
    let watched = dir.path().join("secrets");
    std::fs::create_dir(&watched).expect("mkdir");
    let events = dir.path().join("events.jsonl");
    let config = dir.path().join("config.yaml");
    // The smallest credential ring: a burst of opens overflows it.
    std::fs::write(
        &config,
        format!(
            "cgroups: [\"{}\"]\noutput: \"{}\"\nalerts: {{output: none}}\n\
             grpc: {{listen: none}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
             watch: {{prefixes: [\"{}/\"]}}\nlanes: {{credential: {{ring_bytes: 4096}}}}\n\
             poll_interval_ms: 1000\n",
            cg.path.display(),
            events.display(),
            watched.display()
        ),
    )
    .expect("config");
    let d = Daemon::start(&config);
    cg.run(&format!(
        "i=0; while [ $i -lt 5000 ]; do true < {}/missing 2>/dev/null; i=$((i+1)); done",
        watched.display()
    ));
    let lines = wait_lines(&events, |e| e.iter().any(|r| r.get("lost").is_some()));
    d.stop();
    let all = json_lines(&events);
    assert!(all.len() >= lines.len());
    let seqs: Vec<u64> = all.iter().map(seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "one increasing sequence, loss reports included"
    );
    assert!(all.iter().any(|r| r.get("lost").is_some()));
}
