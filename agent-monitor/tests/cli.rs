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
        open["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{open}"
    );
    assert_eq!(open["workload"]["host"], true, "{open}");
    // The envelope: this run and this node; enums by name.
    assert!(
        open["run_id"].as_str().is_some_and(|r| r.len() >= 32),
        "{open}"
    );
    assert!(
        open["node"].as_str().is_some_and(|n| !n.is_empty()),
        "{open}"
    );
    assert_eq!(open["open"]["syscall"], "SYSCALL_OPENAT", "{open}");
    assert_eq!(open["open"]["matched_by"], "MATCH_KIND_INODE", "{open}");
    // The process key: this boot, the process id and when the kernel started it (before
    // the open, after boot).
    let key = &open["process"]["key"];
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot_id");
    assert_eq!(key["boot_id"], boot_id.trim(), "{open}");
    assert_eq!(key["pid"], open["process"]["tgid"], "{open}");
    let start: u64 = key["start_time_ns"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("start_time_ns");
    let at: u64 = open["process"]["ts_boot_ns"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("ts_boot_ns");
    assert!(
        start > 0 && start <= at,
        "start {start} not before the open at {at}: {open}"
    );

    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = daemon.wait().expect("wait daemon");
    assert!(status.success(), "daemon exit after SIGTERM: {status}");
    // Cleanup: cat has exited, so the cgroup is empty and can go.
    let _ = std::fs::remove_dir(&cgroup);
}

/// Runs `agent-monitor <args>` to completion. A daemon that started anyway (a check that
/// should have refused the config did not) is killed and the test fails, rather than
/// hanging: this bounds a failure, it asserts nothing about speed.
fn run_to_end(args: &[&std::ffi::OsStr], envs: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start agent-monitor");
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect");
            panic!(
                "{args:?} did not exit: it started instead of refusing the config\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect")
}

/// A server certificate and key, and a key that does not belong to it.
fn write_tls_files(dir: &std::path::Path) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    std::fs::write(dir.join("server.pem"), cert.pem()).expect("write cert");
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).expect("write key");
    let other = rcgen::KeyPair::generate().expect("other key");
    std::fs::write(dir.join("other-key.pem"), other.serialize_pem()).expect("write key");
    std::fs::write(dir.join("garbage.pem"), "not a certificate\n").expect("write garbage");
}

#[test]
fn check_config_refuses_what_run_would_refuse_at_start() {
    let dir = temp_dir("am-preflight");
    let d = dir.path().display().to_string();
    write_tls_files(dir.path());
    std::fs::write(dir.path().join("pods.json"), "{\"items\": [").expect("write pods");
    let too_many: Vec<String> = (0..4094).map(|i| format!("/w/{i}/")).collect();
    // Keep the daemon's listeners out of the way in case a check is missing.
    let quiet = "grpc: {listen: none}\nadmin: {listen: none}\n";
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            format!("cgroups: [{d}/no-such-cgroup]\n{quiet}"),
            vec!["`cgroups[0]`", "an existing cgroup2 directory", "No such file or directory"],
        ),
        (
            format!("cgroups: [{d}]\n{quiet}"),
            vec!["`cgroups[0]`", "not cgroup2"],
        ),
        (
            format!("output: {d}\n{quiet}"),
            vec!["`output`", "a file to append to", "which is a directory"],
        ),
        (
            format!("alerts:\n  output: {d}/missing/alerts.jsonl\n{quiet}"),
            vec!["`alerts.output`", "a file to append to", "No such file or directory"],
        ),
        (
            format!("identity:\n  pods: {{source: file, file: {d}/missing-pods.json}}\n{quiet}"),
            vec!["`identity.pods.file`", "kubectl get pods -o json", "No such file or directory"],
        ),
        (
            format!("identity:\n  pods: {{source: file, file: {d}/pods.json}}\n{quiet}"),
            vec!["`identity.pods.file`", "kubectl get pods -o json", "pods.json"],
        ),
        (
            format!("identity:\n  cgroup_root: {d}\n{quiet}"),
            vec!["`identity.cgroup_root`", "cgroup2 mount", d.as_str()],
        ),
        (
            format!(
                "grpc:\n  listen: 127.0.0.1:0\n  tls: {{cert: {d}/missing.pem, key: {d}/server-key.pem}}\nadmin: {{listen: none}}\n"
            ),
            vec!["`grpc.tls.cert`", "a readable PEM certificate", "missing.pem"],
        ),
        (
            format!(
                "grpc:\n  listen: 127.0.0.1:0\n  tls: {{cert: {d}/server.pem, key: {d}/server-key.pem, client_ca: {d}/missing-ca.pem}}\nadmin: {{listen: none}}\n"
            ),
            vec!["`grpc.tls.client_ca`", "missing-ca.pem"],
        ),
        (
            format!(
                "grpc:\n  listen: 127.0.0.1:0\n  tls: {{cert: {d}/garbage.pem, key: {d}/server-key.pem}}\nadmin: {{listen: none}}\n"
            ),
            vec!["`grpc.tls`", "PEM certificate chain", "certificate"],
        ),
        (
            format!(
                "grpc:\n  listen: 127.0.0.1:0\n  tls: {{cert: {d}/server.pem, key: {d}/garbage.pem}}\nadmin: {{listen: none}}\n"
            ),
            vec!["`grpc.tls`", "private key"],
        ),
        (
            format!(
                "grpc:\n  listen: 127.0.0.1:0\n  tls: {{cert: {d}/server.pem, key: {d}/other-key.pem}}\nadmin: {{listen: none}}\n"
            ),
            vec!["`grpc.tls`", "KeyMismatch"],
        ),
        (
            format!(
                "grpc:\n  listen: 127.0.0.1:0\n  tls: {{cert: {d}/server.pem, key: {d}/server-key.pem, client_ca: {d}/server-key.pem}}\nadmin: {{listen: none}}\n"
            ),
            vec!["`grpc.tls`", "trust anchors"],
        ),
        (
            format!("grpc: {{listen: none, unix_socket: {d}/missing/am.sock}}\nadmin: {{listen: none}}\n"),
            vec!["`grpc.unix_socket`", "existing directory", "No such file or directory"],
        ),
        (
            format!(
                "watch:\n  prefixes: [{}]\n{quiet}",
                too_many.join(", ")
            ),
            vec!["`watch.prefixes`", "at most 4096", "4097 prefixes"],
        ),
        (
            format!("falcosidekick: {{url: \"http://127.0.0.1:2801/\", ca: {d}/missing-ca.pem}}\n{quiet}"),
            vec!["`falcosidekick.ca`", "missing-ca.pem"],
        ),
        (
            format!("identity:\n  pods: {{source: kube, node_name: node-a}}\n{quiet}"),
            vec!["`identity.pods.source`", "Kubernetes client configuration"],
        ),
        (
            format!("detect:\n  cluster_policies: true\n{quiet}"),
            vec!["`detect.cluster_policies`", "Kubernetes client configuration"],
        ),
    ];
    // No kubeconfig and no in-cluster environment: the Kubernetes client cannot be built.
    let home = dir.path().join("home");
    std::fs::create_dir(&home).expect("mkdir home");
    let envs = [
        ("KUBECONFIG", "/nonexistent/kubeconfig"),
        ("HOME", home.to_str().expect("utf-8 path")),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("case{i}.yaml"));
        std::fs::write(&file, text).expect("write config");
        let out = run_to_end(
            &[
                "check-config".as_ref(),
                "--config".as_ref(),
                file.as_os_str(),
            ],
            &envs,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "case {i} {text:?}: {stderr}");
        assert!(
            stderr.contains(&format!("config {}: field ", file.display())),
            "case {i}: no file: {stderr}"
        );
        for n in needles {
            assert!(stderr.contains(n), "case {i}: no {n:?} in {stderr}");
        }
        // Some of them through `run` as well: the same message, before anything starts.
        let through_run = [
            "`cgroups[0]`",
            "`output`",
            "`grpc.tls.cert`",
            "`watch.prefixes`",
        ];
        if through_run.contains(&needles[0]) {
            let run = run_to_end(
                &["run".as_ref(), "--config".as_ref(), file.as_os_str()],
                &envs,
            );
            let run_stderr = String::from_utf8_lossy(&run.stderr);
            assert_eq!(run.status.code(), Some(64), "run case {i}: {run_stderr}");
            assert!(
                run_stderr.contains(stderr.trim()),
                "run case {i} says something else: {run_stderr}"
            );
        }
    }
    // Nothing was created by checking.
    assert!(!dir.path().join("missing").exists());
}

#[test]
fn check_config_accepts_usable_files_and_creates_nothing() {
    let dir = temp_dir("am-preflight-ok");
    let d = dir.path().display().to_string();
    write_tls_files(dir.path());
    std::fs::write(
        dir.path().join("pods.json"),
        "{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": []}",
    )
    .expect("write pods");
    std::fs::write(dir.path().join("events.jsonl"), "").expect("write output");
    let cgroups = agent_monitor::identity::cgroup::cgroup2_mount()
        .map(|m| format!("cgroups: [{}]\n", m.display()))
        .unwrap_or_default();
    let text = format!(
        "output: {d}/events.jsonl\nalerts: {{output: {d}/alerts.jsonl}}\n{cgroups}\
         identity:\n  pods: {{source: file, file: {d}/pods.json}}\n\
         grpc:\n  listen: 127.0.0.1:0\n  unix_socket: {d}/am.sock\n  tls: {{cert: {d}/server.pem, key: {d}/server-key.pem}}\n\
         admin: {{listen: \"127.0.0.1:0\"}}\n"
    );
    let file = dir.path().join("ok.yaml");
    std::fs::write(&file, &text).expect("write config");
    let out = run_to_end(
        &[
            "check-config".as_ref(),
            "--config".as_ref(),
            file.as_os_str(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dir.path().join("alerts.jsonl").exists(),
        "check-config created the alert output"
    );
    assert!(
        !dir.path().join("am.sock").exists(),
        "check-config bound the socket"
    );
}

// ---------------------------------------------------------------------------------------
// tail
// ---------------------------------------------------------------------------------------

mod tail {
    use std::{
        io::{BufRead as _, BufReader},
        process::{Command, Stdio},
        sync::Arc,
        time::Duration,
    };

    use agent_monitor::{
        api::{pb, Origin},
        detect::Anomaly,
        events::{ExitRecord, LostRecord, Record, Task},
        identity::Workload,
        outputs::grpc::{GrpcServer, GrpcSettings, Hub, StatusSource},
        policy::Priority,
    };

    use super::BIN;

    struct NoStatus;

    impl StatusSource for NoStatus {
        fn status(&self) -> pb::GetStatusResponse {
            pb::GetStatusResponse::default()
        }
    }

    /// A real API server (the daemon's own) on 127.0.0.1, fed by the test through its hub.
    struct Server {
        /// The server's tasks run here; dropping it stops them.
        _runtime: tokio::runtime::Runtime,
        hub: Hub,
        endpoint: String,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    }

    impl Server {
        fn start() -> Self {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let hub = Hub::new(1024, Origin::default());
            let cfg = GrpcSettings {
                tcp: Some("127.0.0.1:0".parse().expect("addr")),
                ..GrpcSettings::default()
            };
            let server = runtime.block_on(GrpcServer::bind(&cfg)).expect("bind");
            let endpoint = format!("http://{}", server.local_addr().expect("tcp address"));
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            runtime.spawn(server.run(hub.clone(), Arc::new(NoStatus), async move {
                let _ = stopped.await;
            }));
            Self {
                _runtime: runtime,
                hub,
                endpoint,
                stop: Some(stop),
            }
        }

        /// Waits until `n` clients stream (a client subscribes when its call arrives).
        fn wait_clients(&self, n: usize) {
            while self.hub.clients() < n {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
        }
    }

    fn task() -> Task {
        Task {
            time: "2026-11-23T08:00:00.000000001Z".into(),
            ts_boot_ns: 1,
            pid: 100,
            tgid: 100,
            ppid: Some(1),
            uid: 0,
            gid: 0,
            comm: "agent".into(),
            exe: None,
            cgroup_id: 1,
            start_ns: 0,
            workload: Workload {
                namespace: Some("agents".into()),
                pod: Some("coder-0".into()),
                ..Workload::default()
            }
            .into(),
        }
    }

    fn exit(seq: u64) -> Record {
        Record::Exit(ExitRecord { seq, task: task() })
    }

    fn lost(seq: u64) -> Record {
        Record::Lost(LostRecord {
            seq,
            time: "2026-11-23T08:00:00Z".into(),
            lane: "network".into(),
            count: 1,
            total: seq,
            reason: agent_monitor::events::LostReason::RingFull,
            workload: None,
        })
    }

    fn anomaly(seq: u64, rule: &str, priority: Priority) -> Anomaly {
        Anomaly {
            seq,
            time: "2026-11-23T08:00:00Z".into(),
            rule: rule.into(),
            priority,
            output: format!("anomaly {seq}"),
            tags: Vec::new(),
            workload: Workload::clone(&task().workload),
            fields: Default::default(),
            events: vec![seq],
        }
    }

    fn tail(args: &[&str]) -> std::process::Child {
        Command::new(BIN)
            .arg("tail")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tail")
    }

    /// A TCP port with nothing listening on it.
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }

    #[test]
    fn a_daemon_that_is_not_there_is_named_with_the_cause() {
        let endpoint = format!("http://127.0.0.1:{}", closed_port());
        let out = tail(&["--endpoint", &endpoint])
            .wait_with_output()
            .expect("tail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("cannot connect to {endpoint}: Connection refused")),
            "{stderr}"
        );
        assert!(stderr.contains("is agent-monitor running?"), "{stderr}");
        assert!(!stderr.contains("transport error"), "{stderr}");

        let dir = super::temp_dir("am-tail");
        let socket = format!("unix:{}/am.sock", dir.path().display());
        let out = tail(&["--endpoint", &socket])
            .wait_with_output()
            .expect("tail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("No such file or directory"), "{stderr}");
    }

    #[test]
    fn piped_into_head_it_exits_quietly() {
        let server = Server::start();
        let mut child = tail(&["--endpoint", &server.endpoint, "--events"]);
        server.wait_clients(1);
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        server.hub.publish_event(&exit(1));
        let mut first = String::new();
        stdout.read_line(&mut first).expect("first line");
        assert!(first.contains(" exit "), "{first:?}");
        // What `head -1` does after its line: close the pipe.
        drop(stdout);
        let mut seq = 2;
        while child.try_wait().expect("wait").is_none() {
            server.hub.publish_event(&exit(seq));
            seq += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = child.wait_with_output().expect("tail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(stderr.is_empty(), "{stderr}");
    }

    /// Reads lines from `child` until one satisfies `want`, then stops it.
    fn first_line(mut child: std::process::Child, want: impl Fn(&str) -> bool) -> String {
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut found = None;
        for line in stdout.lines() {
            let line = line.expect("line");
            if want(&line) {
                found = Some(line);
                break;
            }
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("tail");
        found.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)))
    }

    #[test]
    fn min_priority_is_case_insensitive_and_filters_on_the_server() {
        for written in ["warning", "WARNING", "Warning", "warn"] {
            let server = Server::start();
            let child = tail(&[
                "--endpoint",
                &server.endpoint,
                "--min-priority",
                written,
                "--output",
                "json",
            ]);
            server.wait_clients(1);
            server
                .hub
                .publish_anomaly(&anomaly(1, "baseline-deviation", Priority::Notice));
            server
                .hub
                .publish_anomaly(&anomaly(2, "egress-outside-allowlist", Priority::Warning));
            let line = first_line(child, |_| true);
            let v: serde_json::Value = serde_json::from_str(&line).expect("json");
            assert_eq!(v["rule"], "egress-outside-allowlist", "{written}: {line}");
        }
    }

    #[test]
    fn event_kinds_are_filtered() {
        let server = Server::start();
        let child = tail(&[
            "--endpoint",
            &server.endpoint,
            "--events",
            "--kind",
            "lost,open",
        ]);
        server.wait_clients(1);
        server.hub.publish_event(&exit(1));
        server.hub.publish_event(&lost(2));
        let line = first_line(child, |_| true);
        assert!(line.contains(" lost "), "the exit was printed: {line}");
    }

    #[test]
    fn the_default_output_is_one_compact_line_and_json_stays_available() {
        let server = Server::start();
        let child = tail(&["--endpoint", &server.endpoint]);
        server.wait_clients(1);
        server
            .hub
            .publish_anomaly(&anomaly(1, "cloud-metadata-contact", Priority::Error));
        let line = first_line(child, |_| true);
        assert_eq!(
            line,
            "08:00:00.000Z Error    cloud-metadata-contact agents/coder-0 - anomaly 1"
        );

        let server = Server::start();
        let child = tail(&["--endpoint", &server.endpoint, "--json"]);
        server.wait_clients(1);
        server
            .hub
            .publish_anomaly(&anomaly(2, "cloud-metadata-contact", Priority::Error));
        let line = first_line(child, |_| true);
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["priority"], "PRIORITY_ERROR");
    }

    #[test]
    fn filters_that_cannot_match_are_refused() {
        let out = Command::new(BIN)
            .args(["tail", "--rule", "foreign-credential-reads"])
            .output()
            .expect("tail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains("\"foreign-credential-reads\": no such rule"),
            "{stderr}"
        );
        for rule in agent_monitor::detect::RULES {
            assert!(stderr.contains(rule.id), "{} not listed: {stderr}", rule.id);
        }

        for args in [
            &["tail", "--events", "--rule", "foreign-credential-read"][..],
            &["tail", "--events", "--min-priority", "warning"][..],
        ] {
            let out = Command::new(BIN).args(args).output().expect("tail");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
            assert!(stderr.contains("selects anomalies"), "{args:?}: {stderr}");
        }

        let out = Command::new(BIN)
            .args(["tail", "--min-priority", "high"])
            .output()
            .expect("tail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains("warning") && stderr.contains("\"high\""),
            "{stderr}"
        );

        // Event kinds without events, and a kind that does not exist: usage errors.
        for args in [
            &["tail", "--kind", "open"][..],
            &["tail", "--events", "--kind", "opens"][..],
        ] {
            let out = Command::new(BIN).args(args).output().expect("tail");
            assert_eq!(out.status.code(), Some(2), "{args:?}");
        }
    }
}
