//! The project's own image, run under podman exactly as `deploy/base` runs it: every
//! capability dropped but the DaemonSet's, its host PID namespace, its read-only root, its
//! hostPath mounts (read-only, with the same propagation) and its config. The capability
//! list, mounts and config are read from the rendered DaemonSet, so what passes here is
//! what is deployed.
//!
//! The node is simulated (kubelet-named pod cgroup, a kubelet root whose token volume is
//! its own tmpfs mounted after the daemon started, a pods file); the container, the
//! kernel, the capabilities and the seccomp filter are real.
//!
//! Needs root, podman and runc, and the image (`cargo xtask image`, which `cargo xtask
//! test` runs first).

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use agent_monitor_tests::{
    privileged,
    sim::{pods_file, run_in_pod, SimPod},
    unique, TempTree,
};
use serde_json::Value;

/// The one hostPath the DaemonSet mounts writable: the journal, which must outlive the pod.
const JOURNAL: &str = "/var/lib/agent-monitor/journal";

/// How long the daemon in the container may take to start, and an event to arrive.
const WAIT: Duration = Duration::from_secs(60);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// `localhost/agent-monitor:<workspace version>`, as `cargo xtask image` tags it.
fn image() -> String {
    format!("localhost/agent-monitor:{}", env!("CARGO_PKG_VERSION"))
}

fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--storage-driver", "vfs"]);
    cmd
}

/// Whether this test can run; panics with the reason when it cannot but must
/// (`AGENT_MONITOR_REQUIRE_PRIVILEGED=1`, as in `cargo xtask test`).
fn can_run(test: &str) -> bool {
    if !privileged(test) {
        return false;
    }
    let missing = if Command::new("podman").arg("--version").output().is_err() {
        Some("podman is not installed (cargo xtask setup installs it)".to_owned())
    } else if !podman()
        .args(["image", "exists", &image()])
        .status()
        .is_ok_and(|s| s.success())
    {
        Some(format!(
            "image {} is missing (run `cargo xtask image`)",
            image()
        ))
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) if std::env::var("AGENT_MONITOR_REQUIRE_PRIVILEGED").as_deref() == Ok("1") => {
            panic!("{test}: required container test cannot run: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// The objects of `kubectl kustomize deploy/base`, as JSON values.
fn rendered_base() -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(repo_root().join("deploy/base"))
        .output()
        .expect("kubectl (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/base: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    text.split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_saphyr::from_str(d).expect("rendered object parses"))
        .collect()
}

fn kind<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/base"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What the DaemonSet asks of its node, read from the rendered manifest.
struct Deployed {
    capabilities: Vec<String>,
    host_pid: bool,
    read_only_root: bool,
    no_new_privileges: bool,
    /// hostPath → (mount path, read-only, propagation).
    host_mounts: Vec<(String, String, bool, Option<String>)>,
    /// The config file's text, from the ConfigMap mounted at the `--config` path.
    config: String,
    config_path: String,
}

fn deployed() -> Deployed {
    let objects = rendered_base();
    let ds = kind(&objects, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let sc = &container["securityContext"];
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let volumes = pod["volumes"].as_array().expect("volumes");
    let mut host_mounts = Vec::new();
    let mut config_map = None;
    for m in container["volumeMounts"].as_array().expect("volumeMounts") {
        let v = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .expect("mount of a declared volume");
        let mount_path = m["mountPath"].as_str().expect("mountPath").to_owned();
        if let Some(host) = v["hostPath"]["path"].as_str() {
            host_mounts.push((
                host.to_owned(),
                mount_path,
                m["readOnly"] == true,
                m["mountPropagation"].as_str().map(str::to_owned),
            ));
        } else if let Some(cm) = v["configMap"]["name"].as_str() {
            if m["subPath"] == "config.yaml" || mount_path == "/etc/agent-monitor" {
                config_map = Some(cm.to_owned());
            }
        }
    }
    let args = strings(&container["args"]);
    let config_path = args
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1].clone())
        .expect("--config in the DaemonSet's args");
    let config_map = config_map.expect("the config ConfigMap mounted");
    let cm = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == config_map.as_str())
        .expect("config ConfigMap rendered");
    Deployed {
        capabilities: strings(&sc["capabilities"]["add"]),
        host_pid: pod["hostPID"] == true,
        read_only_root: sc["readOnlyRootFilesystem"] == true,
        no_new_privileges: sc["allowPrivilegeEscalation"] == false,
        host_mounts,
        config: cm["data"]["config.yaml"]
            .as_str()
            .expect("config.yaml key")
            .to_owned(),
        config_path,
    }
}

/// Debian 12's podman default seccomp profile, amended to what the DaemonSet's
/// `seccompProfile: RuntimeDefault` means on a containerd node: containerd's default
/// profile allows `bpf` to a holder of CAP_BPF and `perf_event_open` to a holder of
/// CAP_PERFMON; this older profile (containers-common 0.50) only allows them with
/// CAP_SYS_ADMIN. Nothing else is changed.
fn runtime_default_seccomp(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string("/usr/share/containers/seccomp.json")
        .expect("podman's default seccomp profile");
    let mut profile: Value = serde_json::from_str(&text).expect("seccomp profile parses");
    let gated = [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")];
    let rules = profile["syscalls"].as_array_mut().expect("syscalls");
    for rule in rules.iter_mut() {
        let admin_allow = rule["action"] == "SCMP_ACT_ALLOW"
            && rule["includes"]["caps"] == serde_json::json!(["CAP_SYS_ADMIN"]);
        if !admin_allow {
            if let Some(names) = rule["names"].as_array_mut() {
                names.retain(|n| !gated.iter().any(|(s, _)| n == s));
            }
        }
    }
    for (syscall, cap) in gated {
        rules.push(serde_json::json!({
            "names": [syscall], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}
        }));
    }
    let path = dir.join("seccomp.json");
    std::fs::write(&path, profile.to_string()).expect("write seccomp profile");
    path
}

/// `dir` bind-mounted onto itself and made recursively shared; unmounted on drop.
struct SharedMount(PathBuf);

impl SharedMount {
    fn new(dir: &Path) -> Self {
        for args in [&["--bind"][..], &["--make-rshared"][..]] {
            let out = Command::new("mount")
                .args(args)
                .args(if args[0] == "--bind" {
                    vec![dir, dir]
                } else {
                    vec![dir]
                })
                .output()
                .expect("mount");
            assert!(
                out.status.success(),
                "mount {args:?} {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Self(dir.to_owned())
    }
}

impl Drop for SharedMount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A podman container of the image; stopped (SIGTERM, as the kubelet stops it) and
/// removed on drop.
struct Container {
    name: String,
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Container {
    fn run(name: &str, args: &[String]) -> Self {
        let mut child = podman()
            .args(["--runtime", "runc", "run", "--rm", "--name", name])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("podman run");
        let lines = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().expect("stdout")));
        let stderr = lines(Box::new(child.stderr.take().expect("stderr")));
        Self {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for a log line containing `needle`; panics with the log so far if the
    /// container exits or `WAIT` passes first.
    fn wait_log(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match self.stderr.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.contains(needle) => return,
                Ok(line) => seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("no log line with {needle:?}; log:\n{}", seen.join("\n"));
    }

    /// The container's exit status and its whole log, once it ended by itself.
    fn wait_exit(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().expect("wait podman");
        let log: Vec<String> = self.stderr.try_iter().collect();
        (status, log.join("\n"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["stop", "--time", "10", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

/// The podman arguments of the DaemonSet's container, with `caps` added and the host
/// paths the simulated node keeps elsewhere substituted (`host_paths`: DaemonSet hostPath
/// → this test's directory).
fn podman_args(
    d: &Deployed,
    caps: &[String],
    host_paths: &[(&str, &Path)],
    config_dir: &Path,
    seccomp: &Path,
) -> Vec<String> {
    let mut a: Vec<String> = [
        "--network=none",
        // Without explicit limits runc fails here with "setrlimit RLIMIT_NOFILE:
        // Operation not permitted"; a kubelet passes its own.
        "--ulimit=nofile=1024:1024",
        "--ulimit=nproc=1024:1024",
        "--cap-drop=all",
        "--env=NODE_NAME=sim-node",
    ]
    .map(str::to_owned)
    .to_vec();
    if !caps.is_empty() {
        a.push(format!("--cap-add={}", caps.join(",")));
    }
    a.push(format!("--security-opt=seccomp={}", seccomp.display()));
    if d.no_new_privileges {
        a.push("--security-opt=no-new-privileges".to_owned());
    }
    if d.host_pid {
        a.push("--pid=host".to_owned());
    }
    if d.read_only_root {
        a.push("--read-only".to_owned());
    }
    for (host, mount, ro, propagation) in &d.host_mounts {
        let source = host_paths
            .iter()
            .find(|(h, _)| h == host)
            .map_or_else(|| PathBuf::from(host), |(_, p)| p.to_path_buf());
        let mut opts = vec![if *ro { "ro" } else { "rw" }];
        match propagation.as_deref() {
            Some("HostToContainer") => opts.push("rslave"),
            Some("Bidirectional") => opts.push("rshared"),
            _ => opts.push("rprivate"),
        }
        a.push(format!(
            "--volume={}:{mount}:{}",
            source.display(),
            opts.join(",")
        ));
    }
    let config_dir_in = Path::new(&d.config_path)
        .parent()
        .expect("config dir")
        .display()
        .to_string();
    a.push(format!(
        "--volume={}:{config_dir_in}:ro",
        config_dir.display()
    ));
    a.push(image());
    a.extend([
        "run".to_owned(),
        "--config".to_owned(),
        d.config_path.clone(),
    ]);
    a
}

/// The deployed config, changed only where this node has no cluster: pods from a file
/// (no API server), no cluster policies, and events on stdout for the test to read.
fn node_config(d: &Deployed, dir: &Path) {
    let mut c: Value = serde_saphyr::from_str(&d.config).expect("deployed config");
    let pods_in = Path::new(&d.config_path)
        .parent()
        .expect("config dir")
        .join("pods.json");
    c["output"] = "-".into();
    c["identity"]["pods"] =
        serde_saphyr::from_str(&format!("{{source: file, file: {}}}", pods_in.display()))
            .expect("pods yaml");
    if let Some(detect) = c.get_mut("detect").and_then(|d| d.as_object_mut()) {
        detect.remove("cluster_policies");
        detect.remove("policies");
    }
    std::fs::write(
        dir.join(Path::new(&d.config_path).file_name().expect("config file")),
        serde_saphyr::to_string(&c).expect("config yaml"),
    )
    .expect("write config");
}

#[test]
fn the_image_with_only_the_documented_capabilities_reports_a_token_read_with_its_pod() {
    if !can_run("container") {
        return;
    }
    let d = deployed();
    assert!(d.host_pid, "the DaemonSet shares the host PID namespace");
    assert!(
        d.host_mounts
            .iter()
            .all(|(host, _, ro, _)| *ro || host == JOURNAL),
        "every hostPath read-only but the journal's"
    );
    let tree = TempTree::new("container");
    let kroot = tree.root.join("kubelet");
    let etc_kubernetes = tree.root.join("etc-kubernetes");
    std::fs::create_dir_all(kroot.join("pods")).expect("kubelet root");
    // As the kubelet does at start (`MakeRShared` of its root directory): a bind mount of
    // the root onto itself, made shared, so the volumes it mounts later propagate into
    // the containers that mount the root with HostToContainer.
    let _shared = SharedMount::new(&kroot);
    std::fs::create_dir_all(&etc_kubernetes).expect("etc/kubernetes");
    let config_dir = tree.root.join("config");
    std::fs::create_dir_all(&config_dir).expect("config dir");
    let seccomp = runtime_default_seccomp(&tree.root);
    let pod = SimPod::new(&unique("am-container"), 0x0c0a_7a1e, "agent-c", "courier");
    pods_file(&config_dir.join("pods.json"), &[pod.json(None)]);
    node_config(&d, &config_dir);
    let journal = tree.root.join("journal");
    std::fs::create_dir_all(&journal).expect("journal dir");
    let host_paths = [
        ("/var/lib/kubelet", kroot.as_path()),
        ("/etc/kubernetes", etc_kubernetes.as_path()),
        (JOURNAL, journal.as_path()),
    ];

    // Each documented capability is necessary: without it the daemon does not start, and
    // says why.
    for dropped in &d.capabilities {
        let fewer: Vec<String> = d
            .capabilities
            .iter()
            .filter(|c| *c != dropped)
            .cloned()
            .collect();
        let name = unique("am-cap-test");
        let args = podman_args(&d, &fewer, &host_paths, &config_dir, &seccomp);
        let (status, log) = Container::run(&name, &args).wait_exit();
        assert!(
            !status.success()
                && (log.contains("loading the eBPF object failed")
                    || log.contains("BPF_PROG_LOAD")),
            "without CAP_{dropped} the daemon must fail to load its programs: {status}\n{log}"
        );
    }

    // With exactly the documented set it attaches, sees a volume the kubelet mounts after
    // it started, and names the pod that read the token.
    let name = unique("am-container");
    let args = podman_args(&d, &d.capabilities, &host_paths, &config_dir, &seccomp);
    let mut c = Container::run(&name, &args);
    c.wait_log("agent-monitor running");
    pod.kubelet_volume(&kroot);
    let vol_count = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.contains(&pod.uid))
        .count();
    assert!(vol_count >= 1, "the token volume is mounted on the host");
    let token = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    let deadline = Instant::now() + WAIT;
    // uint64 is a string in proto3 JSON.
    let cgroup_id = pod.cgroup.id.to_string();
    let mut opens = Vec::new();
    let found = loop {
        // Read until the daemon has taken the new volume in (its mount table is only
        // re-read when the mount event reaches it).
        run_in_pod(&pod, &kroot, &[], &[format!("openat:{token}")], false);
        let until = Instant::now() + Duration::from_secs(2);
        let mut hit = None;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            let Ok(line) = c.stdout.recv_timeout(left) else {
                break;
            };
            let Ok(ev) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if ev["open"].is_object() && ev["process"]["cgroup_id"].as_str() == Some(&cgroup_id) {
                opens.push(ev.clone());
                if ev["open"]["matched_by"] == "MATCH_KIND_VOLUME" {
                    hit = Some(ev);
                    break;
                }
            }
        }
        if let Some(ev) = hit {
            break ev;
        }
        assert!(
            Instant::now() < deadline,
            "no token read reported from the container; opens seen: {opens:#?}; log:\n{}",
            c.stderr.try_iter().collect::<Vec<_>>().join("\n")
        );
    };
    let w = &found["workload"];
    assert_eq!(w["namespace"], agent_monitor_tests::sim::NS);
    assert_eq!(w["pod"], pod.name.as_str());
    assert_eq!(w["pod_uid"], pod.uid.as_str());
    assert_eq!(w["service_account"], pod.sa.as_str());
    assert_eq!(w["agent"], pod.agent.as_str());
    assert_eq!(w["container_id"], pod.container_id.as_str());
    let open = &found["open"];
    assert_eq!(open["raw_path"], token);
    assert_eq!(open["class"], "CREDENTIAL_CLASS_SERVICE_ACCOUNT_TOKEN");
    assert_eq!(open["owner"]["pod_uid"], pod.uid.as_str());
    assert!(
        open["path"]
            .as_str()
            .is_some_and(|p| p.starts_with(&format!("/var/lib/kubelet/pods/{}/", pod.uid))),
        "host path as the DaemonSet sees the kubelet root: {open}"
    );
    // SIGTERM, as the kubelet sends it: the daemon drains and exits in the grace period.
    let out = podman()
        .args(["stop", "--time", "30", &name])
        .output()
        .expect("podman stop");
    assert!(out.status.success(), "podman stop");
    let (status, log) = c.wait_exit();
    assert!(status.success(), "exit after SIGTERM: {status}\n{log}");
    assert!(log.contains("agent-monitor stopped"), "{log}");
    // The journal, on its writable hostPath under a read-only root, holds the run: its
    // start, the token read with the pod's identity, and the stop of a clean shutdown.
    use agent_monitor::journal::{journal_record::Body, Item, Reader};
    let records: Vec<_> = Reader::open(&journal)
        .expect("journal")
        .map(|item| match item {
            Item::Record { record, .. } => *record,
            Item::Damage(d) => panic!("journal damaged: {d:?}"),
        })
        .collect();
    assert!(matches!(
        records.first().and_then(|r| r.body.as_ref()),
        Some(Body::Start(_))
    ));
    assert!(matches!(
        records.last().and_then(|r| r.body.as_ref()),
        Some(Body::Stop(_))
    ));
    assert!(
        records
            .iter()
            .any(|r| matches!(&r.body, Some(Body::Event(e))
            if e.workload.as_ref().is_some_and(|w| w.pod_uid == pod.uid)
                && e.process.as_ref().is_some_and(|p| p.cgroup_id == pod.cgroup.id))),
        "the token read is in the journal with its pod"
    );
}
