//! The daemon binary as a user runs it.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_agent-monitor");

fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(name)
        .tempdir()
        .expect("tempdir")
}

#[test]
fn a_malformed_config_exits_64_naming_file_and_field() {
    let dir = temp_dir("am-cli");
    let cases = [
        (
            "lanes:\n  credential:\n    ring_bytes: 3000\n",
            "lanes.credential.ring_bytes",
        ),
        (
            "watch:\n  prefixes: [etc/kubernetes]\n",
            "watch.prefixes[0]",
        ),
        ("watch: {prefixes: [/a/}\n", "line 1"),
        ("unknown_key: 1\n", "unknown field `unknown_key`"),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&file, text).expect("write config");
        for sub in ["run", "check-config"] {
            let out = Command::new(BIN)
                .args([sub, "--config"])
                .arg(&file)
                .output()
                .expect("run agent-monitor");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{sub} {text:?}: {stderr}");
            assert!(
                stderr.contains(&*file.to_string_lossy()),
                "{sub}: no file name: {stderr}"
            );
            assert!(stderr.contains(field), "{sub}: no {field:?}: {stderr}");
        }
    }
    let out = Command::new(BIN)
        .args([
            "check-config",
            "--config",
            "/nonexistent/agent-monitor.yaml",
        ])
        .output()
        .expect("run agent-monitor");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn a_malformed_policy_exits_64_naming_it() {
    let dir = temp_dir("am-cli");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: agent-monitor.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: p}\nspec:\n  egress:\n    allow:\n      - cidr: 10.0.0.0/40\n",
    )
    .expect("write policy");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!("detect:\n  policies: [\"{}\"]\n", policy.display()),
    )
    .expect("write config");
    for sub in ["check-config", "run"] {
        let out = Command::new(BIN)
            .args([sub, "--config"])
            .arg(&config)
            .output()
            .expect("run agent-monitor");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{sub}: {stderr}");
        assert!(stderr.contains("policy.yaml"), "{sub}: {stderr}");
        assert!(
            stderr.contains("spec.egress.allow[0].cidr"),
            "{sub}: {stderr}"
        );
    }
}

#[test]
fn a_valid_config_checks_ok() {
    let dir = temp_dir("am-cli");
    let file = dir.path().join("ok.yaml");
    std::fs::write(
        &file,
        "watch:\n  prefixes: [/var/run/secrets/]\npoll_interval_ms: 5\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
}

#[test]
fn help_explains_every_run_option() {
    let out = Command::new(BIN)
        .args(["run", "--help"])
        .output()
        .expect("run");
    let help = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--config",
        "--output",
        "--cgroup",
        "--kernel-log",
        "--log-level",
    ] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
}

/// Root and BPF, or a skip with the reason (a failure under AGENT_MONITOR_REQUIRE_PRIVILEGED=1).
fn privileged(test: &str) -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let cgroup = agent_monitor::identity::cgroup::cgroup2_mount();
    if root && cgroup.is_some() {
        return cgroup;
    }
    let why = if root { "no cgroup2 mount" } else { "not root" };
    if std::env::var("AGENT_MONITOR_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test}: required privileged test cannot run: {why}");
    }
    eprintln!("SKIPPED {test}: needs root and BPF: {why}");
    None
}

/// Kills the daemon when an assertion fails, so no daemon outlives a failed test.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

#[test]
fn the_daemon_prints_json_lines_and_stops_cleanly_on_sigterm() {
    let Some(cg_root) = privileged("the_daemon_prints_json_lines_and_stops_cleanly_on_sigterm")
    else {
        return;
    };
    let dir = temp_dir("am-daemon");
    let watched = dir.path().join("watched");
    std::fs::create_dir(&watched).expect("mkdir");
    let token = watched.join("token");
    std::fs::write(&token, "fixture\n").expect("write");
    let cgroup = cg_root.join(format!("am-test-daemon-{}", std::process::id()));
    std::fs::create_dir(&cgroup).expect("mkdir cgroup");
    let cgroup_id = std::fs::metadata(&cgroup).expect("stat").ino();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "watch:\n  prefixes: [\"{}/\"]\ngrpc: {{listen: none}}\nadmin: {{listen: none}}\n",
            watched.display()
        ),
    )
    .expect("write config");

    let mut daemon = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .arg("--cgroup")
        .arg(&cgroup)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start daemon");
    let _kill_on_failure = KillOnDrop(daemon.id() as i32);
    let stderr = BufReader::new(daemon.stderr.take().expect("stderr"));
    let mut log = String::new();
    for line in stderr.lines() {
        let line = line.expect("stderr line");
        log.push_str(&line);
        log.push('\n');
        if line.contains("agent-monitor running") {
            break;
        }
    }
    assert!(
        log.contains("agent-monitor running"),
        "daemon did not start:\n{log}"
    );

    // A shell that joins the cgroup, then cat reads the token.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec cat {} > /dev/null",
        cgroup.display(),
        token.display()
    );
    let status = Command::new("sh")
        .args(["-c", &script])
        .status()
        .expect("sh");
    assert!(status.success());

    let mut stdout = BufReader::new(daemon.stdout.take().expect("stdout")).lines();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut found = None;
    while Instant::now() < deadline {
        let Some(Ok(line)) = stdout.next() else { break };
        let v: serde_json::Value = serde_json::from_str(&line).expect("every line is JSON");
        // The proto3 JSON form of agent_monitor.v1.Event.
        if v["open"]["path"] == token.to_string_lossy().as_ref() {
            found = Some(v);
            break;
        }
    }
    let open = found.expect("open event for the token on stdout");
    assert_eq!(
        open["process"]["cgroup_id"],
        cgroup_id.to_string(),
        "uint64 as a string: {open}"
    );
    assert_eq!(open["process"]["comm"], "cat");
    assert!(
        open["process"]["time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{open}"
    );
    assert_eq!(open["workload"]["host"], true, "{open}");

    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = daemon.wait().expect("wait daemon");
    assert!(status.success(), "daemon exit after SIGTERM: {status}");
    // Cleanup: cat has exited, so the cgroup is empty and can go.
    let _ = std::fs::remove_dir(&cgroup);
}
