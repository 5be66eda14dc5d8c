//! Test harness: real cgroups, real child processes, the real monitor.
//!
//! Tests that need root and BPF call [`privileged`] first: without privileges they skip
//! and say why, unless `AGENT_MONITOR_REQUIRE_PRIVILEGED=1` (set by `cargo xtask test` and
//! CI), where a missing privilege is a failure.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

pub mod netns;
pub mod sim;

use agent_monitor::{config::Config, events::Record, identity::pods::PodStore, monitor::Monitor};
use tokio::sync::mpsc;

/// Whether root/BPF tests can run here. Panics when they cannot but are required.
pub fn privileged(test: &str) -> bool {
    let reason = if unsafe_geteuid() != 0 {
        Some("not running as root")
    } else if !Path::new("/sys/kernel/tracing/events/syscalls").is_dir()
        && !Path::new("/sys/kernel/debug/tracing/events/syscalls").is_dir()
    {
        Some("tracefs is not mounted (run `cargo xtask setup`)")
    } else if cgroup2_root().is_none() {
        Some("no cgroup2 mount")
    } else {
        None
    };
    match reason {
        None => true,
        Some(why) if std::env::var("AGENT_MONITOR_REQUIRE_PRIVILEGED").as_deref() == Ok("1") => {
            panic!("{test}: required privileged test cannot run: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: needs root and BPF: {why}");
            false
        }
    }
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> Option<PathBuf> {
    agent_monitor::identity::cgroup::cgroup2_mount()
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A unique name for this process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// A cgroup2 directory created for one test; its processes are killed and the directory
/// removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
    pub id: u64,
}

impl TestCgroup {
    /// Creates `<cgroup2>/<relative>` (parents included).
    pub fn create(relative: &str) -> Self {
        let root = cgroup2_root().expect("cgroup2 mount");
        let path = root.join(relative);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let id = std::fs::metadata(&path).expect("stat cgroup").ino();
        Self { path, id }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                // SAFETY: plain kill(2) of a test child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // The kernel needs the last task gone before rmdir succeeds.
        let deadline = Instant::now() + Duration::from_secs(5);
        let root = cgroup2_root();
        let mut dir = self.path.clone();
        loop {
            if std::fs::remove_dir(&dir).is_err() && Instant::now() < deadline && dir.exists() {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            // Remove the parents this test created, up to the mount.
            match dir.parent() {
                Some(p) if Some(p) != root.as_deref() && p.file_name().is_some() => {
                    if std::fs::read_dir(p)
                        .map(|mut d| d.next().is_none())
                        .unwrap_or(false)
                        || std::fs::remove_dir(p).is_ok()
                    {
                        dir = p.to_owned();
                        continue;
                    }
                    break;
                }
                _ => break,
            }
        }
    }
}

/// Path of the scripted child binary. Cargo builds it beside the integration test
/// binaries' directory (`target/<profile>/am-testkid`, tests in `target/<profile>/deps`).
pub fn testkid() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    let kid = profile_dir.join("am-testkid");
    assert!(
        kid.exists(),
        "{} is missing: build agent-monitor-tests",
        kid.display()
    );
    kid
}

/// What a finished child did.
pub struct KidRun {
    pub pid: u32,
    pub output: Output,
}

impl KidRun {
    /// The return value the child printed for `action`.
    pub fn result(&self, action: &str) -> i64 {
        let stdout = String::from_utf8_lossy(&self.output.stdout);
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(action)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("child printed no result for {action:?}: {stdout}"))
    }
}

/// Runs am-testkid in `cgroup` with `actions`, waiting for it to finish.
pub fn run_kid(cgroup: &TestCgroup, linger_ms: u64, actions: &[String]) -> KidRun {
    let child = Command::new(testkid())
        .arg("--cgroup")
        .arg(&cgroup.path)
        .arg("--linger-ms")
        .arg(linger_ms.to_string())
        .args(actions)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn am-testkid");
    let pid = child.id();
    let output = child.wait_with_output().expect("wait am-testkid");
    assert!(
        output.status.success(),
        "am-testkid failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    KidRun { pid, output }
}

/// A running monitor and everything it has reported so far.
pub struct Harness {
    pub runtime: tokio::runtime::Runtime,
    monitor: Option<Monitor>,
    rx: mpsc::Receiver<Record>,
    pub records: Vec<Record>,
}

impl Harness {
    /// Loads the probes with `config` and starts consuming, without pod metadata.
    pub fn start(config: &Config) -> Self {
        Self::start_with_pods(config, PodStore::new())
    }

    /// Loads the probes with `config` and starts consuming, reading pods from `pods`.
    pub fn start_with_pods(config: &Config, pods: Arc<PodStore>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (tx, rx) = mpsc::channel(1 << 16);
        let monitor = runtime
            .block_on(async {
                Monitor::start(agent_monitor::app::settings::monitor(config), pods, tx)
            })
            .unwrap_or_else(|e| panic!("monitor start: {e}"));
        Self {
            runtime,
            monitor: Some(monitor),
            rx,
            records: Vec::new(),
        }
    }

    /// Loads the probes with `config` and starts consuming, with pod metadata from the
    /// pods file at `pods_path` (as `identity.pods.source: file` reads it); returns once
    /// the file's `expect` pods are known.
    pub fn start_with_pods_file(
        config: &Config,
        pods_path: &Path,
        expect: usize,
    ) -> (Self, Arc<PodStore>) {
        let store = PodStore::new();
        let mut changed = store.changed();
        let h = Self::start_with_pods(config, store.clone());
        {
            let _in_runtime = h.runtime.enter();
            agent_monitor::identity::pods::file::spawn(
                pods_path.to_owned(),
                store.clone(),
                Duration::from_millis(50),
            );
        }
        h.runtime.block_on(async {
            while store.len() < expect {
                tokio::time::timeout(Duration::from_secs(15), changed.changed())
                    .await
                    .expect("pods file loaded")
                    .expect("store alive");
            }
        });
        (h, store)
    }

    /// Receives records for `period`, keeping only those `keep` accepts (a flood's
    /// records are counted by `keep`, not stored).
    pub fn pump(&mut self, period: Duration, mut keep: impl FnMut(&Record) -> bool) {
        let deadline = Instant::now() + period;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let next = self
                .runtime
                .block_on(async { tokio::time::timeout(left, self.rx.recv()).await });
            match next {
                Ok(Some(r)) if keep(&r) => self.records.push(r),
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => panic!("monitor stopped"),
            }
        }
    }

    /// What the kernel watches by file identity, as the monitor keeps it.
    pub fn watch_status(&self) -> Arc<agent_monitor::watching::WatchStatus> {
        self.monitor
            .as_ref()
            .expect("monitor running")
            .watch_status()
    }

    /// Collects records until `done` holds for what was collected, or panics after `timeout`.
    pub fn wait_until(&mut self, timeout: Duration, done: impl Fn(&[Record]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.records) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {timeout:?}; collected {} records:\n{}",
                self.records.len(),
                self.records
                    .iter()
                    .rev()
                    .take(20)
                    .map(|r| serde_json::to_string(r).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            let next = self
                .runtime
                .block_on(async { tokio::time::timeout(left, self.rx.recv()).await });
            match next {
                Ok(Some(r)) => self.records.push(r),
                Ok(None) => panic!("monitor stopped"),
                Err(_) => {}
            }
        }
    }

    /// Collects records until none arrived for `quiet`.
    pub fn settle(&mut self, quiet: Duration) {
        loop {
            let next = self
                .runtime
                .block_on(async { tokio::time::timeout(quiet, self.rx.recv()).await });
            match next {
                Ok(Some(r)) => self.records.push(r),
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// Stops the monitor (final drain) and collects what it flushed.
    pub fn stop(&mut self) {
        if let Some(m) = self.monitor.take() {
            self.runtime
                .block_on(m.stop())
                .unwrap_or_else(|e| panic!("monitor stop: {e}"));
            while let Ok(r) = self.rx.try_recv() {
                self.records.push(r);
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(m) = self.monitor.take() {
            let _ = self.runtime.block_on(m.stop());
        }
    }
}

/// A temporary directory tree for a test, removed on drop.
pub struct TempTree {
    pub root: PathBuf,
}

impl TempTree {
    pub fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(unique(name));
        std::fs::create_dir_all(&root).expect("mkdir temp tree");
        Self { root }
    }

    /// Creates a file (and its parents) with some non-secret content.
    pub fn file(&self, relative: &str) -> PathBuf {
        let p = self.root.join(relative);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, b"test fixture, not a credential\n").expect("write fixture");
        p
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
