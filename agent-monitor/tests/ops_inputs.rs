//! Hostile input files: the config, policy files and the pods file replaced by a FIFO,
//! `/dev/zero`, a 100 MB file or a deeply nested document. Each is refused with a clear
//! error naming the file within a second, the reloaders keep the last good set and still
//! pick up the next valid version, and `check-config` exits 64 on each. A ConfigMap-style
//! policy volume (`..data` symlinks) loads and follows updates.
//!
//! The reloaders run as the daemon runs them (real files, the real runtime's tasks); the
//! daemon test at the end runs the real binary, with its BPF probes, and needs root.

#[path = "support/logs.rs"]
mod logs;

use std::{
    ffi::CString,
    io::{BufRead as _, BufReader},
    os::unix::{ffi::OsStrExt as _, fs::symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{mpsc, PoisonError, RwLock},
    time::{Duration, Instant},
};

use logs::{count_logged, logged, record_logs};

use agent_monitor::{
    identity::pods::{file as pods_file, PodStore},
    policy::{spawn_reloader, PolicySet, PolicySources},
};

const BIN: &str = env!("CARGO_BIN_EXE_agent-monitor");

/// How fast a bad file must be refused: the bound the issue sets.
const REFUSE_WITHIN: Duration = Duration::from_secs(1);
/// The reloaders' poll in these tests.
const POLL: Duration = Duration::from_millis(20);
/// How long to wait for something that should happen at once before failing (not an
/// assertion about speed: it only bounds a failure).
const PATIENCE: Duration = Duration::from_secs(10);

fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(name)
        .tempdir()
        .expect("tempdir")
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

/// Puts `what` at `path` the way an editor or the kubelet does: made beside it, then
/// renamed over it (so it replaces a FIFO or a symlink instead of writing through it).
fn replace(path: &Path, what: &Version) {
    let dir = path.parent().expect("parent");
    let name = path.file_name().expect("name").to_string_lossy();
    let tmp = dir.join(format!(".{name}.new"));
    let _ = std::fs::remove_file(&tmp);
    match what {
        Version::Fifo => mkfifo(&tmp),
        Version::DevZero => symlink("/dev/zero", &tmp).expect("symlink"),
        Version::Huge => {
            // 100 MB (sparse: its size is what counts).
            let f = std::fs::File::create(&tmp).expect("create");
            f.set_len(100_000_000).expect("set_len");
        }
        Version::Deep(text) | Version::Valid(text) => std::fs::write(&tmp, text).expect("write"),
    }
    std::fs::rename(&tmp, path).expect("rename");
}

/// What replaces a file.
enum Version {
    Fifo,
    DevZero,
    Huge,
    Deep(String),
    Valid(String),
}

/// The bad versions of a file, each with what its error must say after the file name:
/// `cap` is the file's size cap as the message puts it, `deep` a deeply nested version and
/// `deep_at` where its 65th level starts.
fn bad_versions(
    cap: &str,
    (deep, deep_at): (String, &str),
) -> Vec<(&'static str, Version, String)> {
    vec![
        (
            "a FIFO",
            Version::Fifo,
            "not a regular file (a FIFO)".to_owned(),
        ),
        (
            "/dev/zero",
            Version::DevZero,
            "not a regular file (a character device)".to_owned(),
        ),
        (
            "a 100 MB file",
            Version::Huge,
            format!("larger than {cap}: 100000000 bytes"),
        ),
        (
            "a deeply nested document",
            Version::Deep(deep),
            format!("nested deeper than 64 levels at {deep_at}"),
        ),
    ]
}

/// `{a: {a: ...}}` 50,000 levels deep (200 KB): 13 s of CPU in serde_yaml 0.9 (release
/// build) before its own recursion limit applied; the parse must stop at level 65.
fn deep_yaml() -> (String, &'static str) {
    (
        format!("{}1{}", "{a: ".repeat(50_000), "}".repeat(50_000)),
        "line 1 column 257",
    )
}

/// A pods list whose first item is 100,000 arrays deep (200 KB).
fn deep_json() -> (String, &'static str) {
    (
        format!(
            r#"{{"kind":"List","items":[{}{}]}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        ),
        "line 1 column 87",
    )
}

fn policy(name: &str) -> String {
    format!(
        "apiVersion: agent-monitor.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\n\
         spec:\n  selector:\n    serviceAccounts: [\"{name}\"]\n"
    )
}

fn pods(names: &[&str]) -> String {
    let items: Vec<String> = names
        .iter()
        .map(|n| {
            format!(
                r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{n}","namespace":"ns","uid":"uid-{n}"}},"spec":{{"serviceAccountName":"sa","containers":[{{"name":"c","image":"i"}}]}}}}"#
            )
        })
        .collect();
    format!(
        r#"{{"apiVersion":"v1","kind":"List","items":[{}]}}"#,
        items.join(",")
    )
}

fn names(set: &RwLock<PolicySet>) -> Vec<String> {
    set.read()
        .unwrap_or_else(PoisonError::into_inner)
        .policies()
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

/// Waits until `cond` holds; returns how long that took. Fails after [`PATIENCE`].
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    start.elapsed()
}

// ---------------------------------------------------------------------------------------
// The policy reloader
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reloader_refuses_bad_files_and_keeps_the_last_good_set() {
    record_logs();
    let dir = temp_dir("am-ops-policy");
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, policy("v0")).expect("write v0");
    let paths = vec![file.clone()];
    let sources = PolicySources::new(PolicySet::load(&paths).expect("v0"));
    let current = sources.combined();
    let task = spawn_reloader(paths, sources.clone(), POLL);
    let file_name = file.display().to_string();

    for (i, (what, bad, message)) in bad_versions("1 MiB", deep_yaml()).into_iter().enumerate() {
        let good = names(&current);
        replace(&file, &bad);
        let took = wait_for(what, || {
            logged(&["WARN", &format!("policy {file_name}: {message}")])
        })
        .await;
        eprintln!("policy file as {what}: refused after {took:?}");
        assert!(took < REFUSE_WITHIN, "{what}: refused after {took:?}");
        assert!(
            logged(&[
                "WARN",
                &file_name,
                &message,
                "keeping the 1 policies already loaded from files"
            ]),
            "{what}: the error says the last good set is kept"
        );
        assert_eq!(names(&current), good, "{what}: the last good set stays");

        // Many polls later: still one message for this one change.
        tokio::time::sleep(POLL * 10).await;
        assert_eq!(
            count_logged(&["WARN", &format!("policy {file_name}: {message}")]),
            1,
            "{what}: logged once per change"
        );

        // The next valid version is loaded.
        let next = format!("v{}", i + 1);
        replace(&file, &Version::Valid(policy(&next)));
        wait_for(&format!("{next} after {what}"), || {
            names(&current) == [next.as_str()]
        })
        .await;
    }
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_a_policy_directory_is_reported_not_skipped() {
    record_logs();
    let dir = temp_dir("am-ops-policy-dir");
    std::fs::write(dir.path().join("10-a.yaml"), policy("a")).expect("write a");
    let paths = vec![dir.path().to_owned()];
    let sources = PolicySources::new(PolicySet::load(&paths).expect("dir"));
    let current = sources.combined();
    let task = spawn_reloader(paths, sources.clone(), POLL);

    let fifo = dir.path().join("20-b.yaml");
    mkfifo(&fifo);
    let fifo_name = fifo.display().to_string();
    let took = wait_for("the FIFO to be refused", || {
        logged(&[
            "WARN",
            &format!("policy {fifo_name}: not a regular file (a FIFO)"),
            "keeping the 1 policies",
        ])
    })
    .await;
    assert!(took < REFUSE_WITHIN, "refused after {took:?}");
    assert_eq!(names(&current), ["a"]);

    std::fs::remove_file(&fifo).expect("rm fifo");
    std::fs::write(dir.path().join("30-c.yaml"), policy("c")).expect("write c");
    wait_for("the next valid file", || names(&current) == ["a", "c"]).await;
    task.abort();
}

/// A ConfigMap volume as the kubelet writes it: each key a symlink to `..data/<key>`,
/// `..data` a symlink to a timestamped directory, an update a new directory and an atomic
/// rename of `..data`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_volume_of_policies_loads_and_follows_updates() {
    record_logs();
    let dir = temp_dir("am-ops-configmap");
    let volume = dir.path();
    let publish = |stamp: &str, files: &[(&str, String)]| {
        let data = volume.join(stamp);
        std::fs::create_dir(&data).expect("mkdir");
        for (name, text) in files {
            std::fs::write(data.join(name), text).expect("write key");
        }
        let tmp = volume.join("..data_tmp");
        symlink(stamp, &tmp).expect("symlink ..data_tmp");
        std::fs::rename(&tmp, volume.join("..data")).expect("swap ..data");
        for (name, _) in files {
            let key = volume.join(name);
            if std::fs::symlink_metadata(&key).is_err() {
                symlink(format!("..data/{name}"), &key).expect("key symlink");
            }
        }
    };
    publish(
        "..2026_01_01_00_00_00.1",
        &[("agents.yaml", policy("first"))],
    );

    // As a directory, and as the key's path.
    let by_dir = PolicySet::load(&[volume.to_owned()]).expect("the volume loads");
    let by_file = PolicySet::load(&[volume.join("agents.yaml")]).expect("the key loads");
    assert_eq!(by_dir.len(), 1);
    assert_eq!(by_dir, by_file);

    let sources = PolicySources::new(by_dir);
    let current = sources.combined();
    let task = spawn_reloader(vec![volume.to_owned()], sources.clone(), POLL);
    publish(
        "..2026_01_01_00_05_00.2",
        &[("agents.yaml", policy("second"))],
    );
    wait_for("the updated ConfigMap", || names(&current) == ["second"]).await;
    task.abort();
}

// ---------------------------------------------------------------------------------------
// The pods file reloader
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_reloader_refuses_bad_files_and_keeps_the_last_good_pods() {
    record_logs();
    let dir = temp_dir("am-ops-pods");
    let file = dir.path().join("pods.json");
    std::fs::write(&file, pods(&["p0"])).expect("write");
    let store = PodStore::new();
    let task = pods_file::spawn(file.clone(), store.clone(), POLL);
    wait_for("the first load", || store.get("uid-p0").is_some()).await;
    let file_name = file.display().to_string();

    for (i, (what, bad, message)) in bad_versions("64 MiB", deep_json()).into_iter().enumerate() {
        let before = store.len();
        replace(&file, &bad);
        let took = wait_for(what, || {
            logged(&["WARN", &format!("pods file {file_name}: {message}")])
        })
        .await;
        eprintln!("pods file as {what}: refused after {took:?}");
        assert!(took < REFUSE_WITHIN, "{what}: refused after {took:?}");
        assert!(
            logged(&[
                "WARN",
                &file_name,
                &message,
                &format!("keeping the {before} pods already known")
            ]),
            "{what}: the error says the last good pods are kept"
        );
        assert_eq!(store.len(), before, "{what}: the last good pods stay");
        assert!(store.get(&format!("uid-p{i}")).is_some(), "{what}");

        tokio::time::sleep(POLL * 10).await;
        assert_eq!(
            count_logged(&["WARN", &format!("pods file {file_name}: {message}")]),
            1,
            "{what}: logged once per change"
        );

        let next = format!("p{}", i + 1);
        replace(&file, &Version::Valid(pods(&[&next])));
        wait_for(&format!("{next} after {what}"), || {
            store.get(&format!("uid-{next}")).is_some()
        })
        .await;
        assert_eq!(store.len(), 1, "the new version replaced the old one");
    }
    task.abort();
}

// ---------------------------------------------------------------------------------------
// check-config, the real binary
// ---------------------------------------------------------------------------------------

/// Runs `agent-monitor check-config --config <config>`; returns its output and how long it
/// ran. A run that does not end is killed and fails the test.
fn check_config(config: &Path) -> (std::process::Output, Duration) {
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .spawn()
        .expect("start agent-monitor");
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > PATIENCE {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect");
            panic!(
                "check-config {} did not exit\n{}",
                config.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = start.elapsed();
    (child.wait_with_output().expect("collect"), took)
}

#[test]
fn check_config_refuses_a_bad_config_file_quickly() {
    let dir = temp_dir("am-ops-config");
    let config = dir.path().join("config.yaml");
    let deep = format!("watch: {}1{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let quiet = "grpc: {listen: none}\nadmin: {listen: none}\n";
    for (what, bad, message) in bad_versions("1 MiB", (deep, "line 1 column 71")) {
        replace(&config, &bad);
        let (out, took) = check_config(&config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "config as {what}: exit {:?} after {took:?}",
            out.status.code()
        );
        assert_eq!(out.status.code(), Some(64), "{what}: {stderr}");
        assert!(
            stderr.contains(&format!("config {}: {message}", config.display())),
            "{what}: {stderr}"
        );
        assert!(took < REFUSE_WITHIN, "{what}: exited after {took:?}");
    }
    replace(&config, &Version::Valid(quiet.to_owned()));
    let (out, _) = check_config(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_refuses_bad_policy_files_quickly_and_loads_configmap_symlinks() {
    let dir = temp_dir("am-ops-config-policy");
    let policy_file = dir.path().join("policy.yaml");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "detect:\n  policies: [\"{}\"]\ngrpc: {{listen: none}}\nadmin: {{listen: none}}\n",
            policy_file.display()
        ),
    )
    .expect("write config");
    for (what, bad, message) in bad_versions("1 MiB", deep_yaml()) {
        replace(&policy_file, &bad);
        let (out, took) = check_config(&config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "policy file as {what} (check-config): exit {:?} after {took:?}",
            out.status.code()
        );
        assert_eq!(out.status.code(), Some(64), "{what}: {stderr}");
        assert!(
            stderr.contains(&format!("policy {}: {message}", policy_file.display())),
            "{what}: {stderr}"
        );
        assert!(took < REFUSE_WITHIN, "{what}: exited after {took:?}");
    }

    // ConfigMap style: the key a symlink into `..data`.
    std::fs::remove_file(&policy_file).expect("rm");
    let stamped = dir.path().join("..2026_01_01_00_00_00.1");
    std::fs::create_dir(&stamped).expect("mkdir");
    std::fs::write(stamped.join("policy.yaml"), policy("linked")).expect("write");
    symlink("..2026_01_01_00_00_00.1", dir.path().join("..data")).expect("..data");
    symlink("..data/policy.yaml", &policy_file).expect("key");
    let (out, _) = check_config(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(1 policies)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

// ---------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------

/// Root and a cgroup2 mount, or a skip with the reason (a failure under
/// AGENT_MONITOR_REQUIRE_PRIVILEGED=1).
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

/// The daemon, killed when the test ends however it ends, and its log lines.
struct Daemon {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    log: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Waits for a log line holding every needle; returns how long that took.
    fn wait_for(&mut self, what: &str, needles: &[&str]) -> Duration {
        let start = Instant::now();
        loop {
            let left = PATIENCE.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push_str(&line);
                    self.log.push('\n');
                    if needles.iter().all(|n| line.contains(n)) {
                        return start.elapsed();
                    }
                }
                Err(_) => panic!(
                    "timed out waiting for {what}; the daemon said:\n{}",
                    self.log
                ),
            }
        }
    }
}

#[test]
fn the_running_daemon_survives_bad_policy_and_pods_files() {
    let Some(cg_root) = privileged("the_running_daemon_survives_bad_policy_and_pods_files") else {
        return;
    };
    let dir = temp_dir("am-ops-daemon");
    let policy_file = dir.path().join("policy.yaml");
    let pods_path = dir.path().join("pods.json");
    std::fs::write(&policy_file, policy("v0")).expect("write policy");
    std::fs::write(&pods_path, pods(&["p0"])).expect("write pods");
    // An empty cgroup of its own: the daemon watches nothing else.
    let cgroup = cg_root.join(format!("am-test-ops-{}", std::process::id()));
    std::fs::create_dir(&cgroup).expect("mkdir cgroup");
    struct RemoveCgroup(PathBuf);
    impl Drop for RemoveCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _cgroup = RemoveCgroup(cgroup.clone());
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "output: none\nalerts: {{output: none}}\ngrpc: {{listen: none}}\nadmin: {{listen: none}}\n\
             cgroups: [\"{}\"]\ndetect:\n  policies: [\"{}\"]\n\
             identity:\n  pods: {{source: file, file: \"{}\"}}\n",
            cgroup.display(),
            policy_file.display(),
            pods_path.display()
        ),
    )
    .expect("write config");

    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .spawn()
        .expect("start daemon");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut daemon = Daemon {
        child,
        lines,
        log: String::new(),
    };
    daemon.wait_for("the daemon to start", &["agent-monitor running"]);

    let policy_name = policy_file.display().to_string();
    let pods_name = pods_path.display().to_string();
    let cases = [
        (
            bad_versions("1 MiB", deep_yaml()),
            &policy_file,
            &policy_name,
            "policy",
        ),
        (
            bad_versions("64 MiB", deep_json()),
            &pods_path,
            &pods_name,
            "pods file",
        ),
    ];
    let mut n = 0;
    for (versions, path, name, prefix) in cases {
        for (what, bad, message) in versions {
            let kept = if prefix == "policy" {
                "keeping the 1 policies already loaded from files"
            } else {
                "keeping the 1 pods already known"
            };
            replace(path, &bad);
            let took = daemon.wait_for(
                &format!("the {prefix} as {what} to be refused"),
                &["WARN", &format!("{prefix} {name}: {message}"), kept],
            );
            // From the change to the message: up to two polls of 250 ms, then the load.
            eprintln!("running daemon, {prefix} as {what}: refused after {took:?}");
            assert!(
                took < REFUSE_WITHIN,
                "{prefix} as {what}: refused after {took:?}"
            );
            n += 1;
            if prefix == "policy" {
                replace(
                    path,
                    &Version::Valid(format!("{}---\n{}", policy("v0"), policy(&format!("v{n}")))),
                );
                daemon.wait_for(
                    &format!("the valid policy after {what}"),
                    &["policies reloaded: 2 policies from files"],
                );
                // Back to one policy, so the next message says 1 is kept.
                replace(path, &Version::Valid(policy(&format!("w{n}"))));
                daemon.wait_for(
                    &format!("one policy again after {what}"),
                    &["policies reloaded: 1 policies from files"],
                );
            } else {
                replace(path, &Version::Valid(pods(&[&format!("p{n}")])));
                daemon.wait_for(
                    &format!("the valid pods file after {what}"),
                    &[&format!("pods file {name}: 1 pods")],
                );
            }
        }
    }
    // Still running.
    assert!(
        daemon.child.try_wait().expect("wait").is_none(),
        "the daemon exited:\n{}",
        daemon.log
    );
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let status = daemon.child.wait().expect("wait daemon");
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        daemon.log
    );
}
