//! Resumable streams against the real daemon: a client that disconnects and comes back
//! with `resume_after` receives every anomaly exactly once, what happened while it was
//! away served from the journal (across a daemon restart too), then the live stream, while
//! anomalies keep coming during the switch; a resume point the journal no longer has is
//! answered with a Gap; `agent-monitor tail --resume` keeps its place in a file. The
//! anomalies are real: processes in a test cgroup reading another process's
//! /proc/<pid>/environ (a test `sleep`'s). Needs root and BPF.

#[path = "support/daemon.rs"]
mod support_daemon;
#[path = "support/privileged.rs"]
mod support_privileged;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use agent_monitor::{
    api::pb,
    journal::{journal_record::Body, Item, Reader},
    outputs::grpc::connect,
};
use support_daemon::{Cgroup, Daemon};
use support_privileged::privileged;
use tokio::time::timeout;

const BIN: &str = env!("CARGO_BIN_EXE_agent-monitor");
/// Longest any one expected thing may take; nothing asserts speed.
const WAIT: Duration = Duration::from_secs(60);
/// How long a stream must stay quiet to show that nothing more (no duplicate) comes.
const QUIET: Duration = Duration::from_millis(700);

/// (run id, seq) of an anomaly.
type Key = (String, u64);

fn key(a: &pb::Anomaly) -> Key {
    (a.run_id.clone(), a.seq)
}

/// The anomalies in the journal, in order.
fn journaled(dir: &Path) -> Vec<pb::Anomaly> {
    Reader::open(dir)
        .expect("journal")
        .filter_map(|i| match i {
            Item::Record { record, .. } => match record.body {
                Some(Body::Anomaly(a)) => Some(a),
                _ => None,
            },
            Item::Damage(_) => None,
        })
        .collect()
}

/// Waits until the journal holds `n` anomalies of `run`.
fn wait_journaled(dir: &Path, run: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let have = journaled(dir).iter().filter(|a| a.run_id == run).count();
        if have >= n {
            assert_eq!(have, n, "more anomalies of {run} than the test made");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{have} of {n} anomalies of {run} journaled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The test's anomaly maker: `n` processes in the cgroup `cg`, one after the other, each
/// reading the environ of `target` (a process of the test's own) into /dev/null.
fn make_anomalies(cg: &Path, target: u32, n: usize) {
    for _ in 0..n {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec cat /proc/{target}/environ > /dev/null",
            cg.display()
        );
        let status = Command::new("sh")
            .args(["-c", &script])
            .status()
            .expect("reader");
        assert!(status.success(), "reader: {status}");
    }
}

struct Scene {
    _tmp: tempfile::TempDir,
    journal: std::path::PathBuf,
    config: std::path::PathBuf,
    socket: std::path::PathBuf,
    cg: Cgroup,
    target: Child,
}

impl Scene {
    fn new(name: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let journal = tmp.path().join("journal");
        let socket = tmp.path().join("api.sock");
        let cg = Cgroup::create(&format!("am-{name}-{}", std::process::id()));
        let config = tmp.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "cgroups: [\"{}\"]\noutput: none\n\
                 alerts: {{output: none, rate_limit_per_minute: 100000}}\n\
                 grpc: {{listen: \"127.0.0.1:0\", unix_socket: \"{}\"}}\n\
                 admin: {{listen: \"127.0.0.1:0\"}}\n\
                 journal: {{dir: \"{}\", sync_interval_ms: 100}}\n",
                cg.path.display(),
                socket.display(),
                journal.display()
            ),
        )
        .expect("config");
        let target = Command::new("sleep")
            .arg("600")
            .stdout(Stdio::null())
            .spawn()
            .expect("sleep");
        Self {
            _tmp: tmp,
            journal,
            config,
            socket,
            cg,
            target,
        }
    }

    fn endpoint(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    fn anomalies(&self, n: usize) {
        make_anomalies(&self.cg.path, self.target.id(), n);
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = self.target.kill();
        let _ = self.target.wait();
    }
}

type Stream = tonic::Streaming<pb::StreamAnomaliesResponse>;

async fn subscribe(endpoint: &str, resume_after: Option<pb::Cursor>) -> Stream {
    let mut client = connect(endpoint, None).await.expect("connect");
    client
        .stream_anomalies(pb::StreamAnomaliesRequest {
            filter: None,
            resume_after,
        })
        .await
        .expect("StreamAnomalies")
        .into_inner()
}

/// Reads `n` items from the stream.
async fn take(stream: &mut Stream, n: usize) -> Vec<pb::stream_anomalies_response::Item> {
    let mut got = Vec::new();
    while got.len() < n {
        let msg = timeout(WAIT, stream.message())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} items arrived: {got:?}", got.len()))
            .expect("stream ok")
            .expect("stream open");
        got.extend(msg.item);
    }
    got
}

/// Reads `n` anomalies; any gap fails.
async fn take_anomalies(stream: &mut Stream, n: usize) -> Vec<pb::Anomaly> {
    use pb::stream_anomalies_response::Item;
    take(stream, n)
        .await
        .into_iter()
        .map(|i| match i {
            Item::Anomaly(a) => a,
            Item::Gap(g) => panic!("unexpected gap: {g:?}"),
        })
        .collect()
}

/// Nothing more arrives for a while.
async fn quiet(stream: &mut Stream) {
    if let Ok(msg) = timeout(QUIET, stream.message()).await {
        panic!("more than expected arrived: {msg:?}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_resumed_client_gets_every_anomaly_once_across_a_restart_and_the_switch_to_live() {
    if !privileged(
        "a_resumed_client_gets_every_anomaly_once_across_a_restart_and_the_switch_to_live",
    ) {
        return;
    }
    let scene = Scene::new("resume");
    let rt = runtime();
    let endpoint = scene.endpoint();

    // Run 1: a live client receives 5 anomalies, then goes away.
    let mut first = Daemon::start(&scene.config);
    let run1 = first.run_id(&scene.journal);
    let mut live = rt.block_on(subscribe(&endpoint, None));
    scene.anomalies(5);
    let before = rt.block_on(take_anomalies(&mut live, 5));
    assert!(before.iter().all(|a| a.run_id == run1), "{before:?}");
    assert!(
        before.iter().all(|a| a.rule == "proc-environ-read"),
        "{before:?}"
    );
    drop(live);
    let cursor = before.last().map(|a| pb::Cursor {
        run_id: a.run_id.clone(),
        seq: a.seq,
    });

    // Missed: 4 more in run 1, a restart, 3 in run 2.
    scene.anomalies(4);
    wait_journaled(&scene.journal, &run1, 9);
    first.stop();
    let mut second = Daemon::start(&scene.config);
    let run2 = second.run_id(&scene.journal);
    assert_ne!(run1, run2);
    scene.anomalies(3);
    wait_journaled(&scene.journal, &run2, 3);

    // The client comes back while anomalies keep coming: the switch from the journal to
    // the live stream happens under load.
    let (done_tx, done_rx) = mpsc::channel();
    let maker = {
        let cg_path = scene.cg.path.clone();
        let target = scene.target.id();
        std::thread::spawn(move || {
            for _ in 0..20 {
                make_anomalies(&cg_path, target, 1);
                std::thread::sleep(Duration::from_millis(15));
            }
            let _ = done_tx.send(());
        })
    };
    let mut resumed = rt.block_on(subscribe(&endpoint, cursor.clone()));
    done_rx.recv_timeout(WAIT).expect("anomaly maker finished");
    maker.join().expect("maker");
    wait_journaled(&scene.journal, &run2, 23);
    let after = rt.block_on(async {
        let got = take_anomalies(&mut resumed, 4 + 23).await;
        quiet(&mut resumed).await;
        got
    });

    // Exactly once, in order: what the first session got plus what the resumed one got is
    // the journal, every anomaly of both runs.
    let all: Vec<Key> = journaled(&scene.journal).iter().map(key).collect();
    let received: Vec<Key> = before.iter().chain(&after).map(key).collect();
    assert_eq!(received, all, "received (left) vs journaled (right)");
    assert_eq!(all.len(), 32);
    assert!(after[..4].iter().all(|a| a.run_id == run1));
    assert!(after[4..].iter().all(|a| a.run_id == run2));

    // A resume point whose run the journal does not have: a gap saying so, then the
    // oldest anomaly kept.
    let mut lost = rt.block_on(subscribe(
        &endpoint,
        Some(pb::Cursor {
            run_id: "no-such-run".into(),
            seq: 7,
        }),
    ));
    let items = rt.block_on(take(&mut lost, 2));
    use pb::stream_anomalies_response::Item as I;
    match &items[0] {
        I::Gap(g) => {
            assert_eq!(g.reason(), pb::GapReason::Expired, "{g:?}");
            assert!(g.at_least, "{g:?}");
        }
        other => panic!("not a gap first: {other:?}"),
    }
    match &items[1] {
        I::Anomaly(a) => assert_eq!(key(a), all[0]),
        other => panic!("not the oldest anomaly: {other:?}"),
    }
    drop((lost, resumed));
    second.stop();
}

/// `tail --resume FILE -o json`, until it printed `n` lines; then SIGTERM. Returns the
/// (run id, seq) of each line.
fn tail_until(endpoint: &str, position: &Path, n: usize, make: impl FnOnce()) -> Vec<Key> {
    let mut tail = Command::new(BIN)
        .args(["tail", "--endpoint", endpoint, "-o", "json", "--resume"])
        .arg(position)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tail");
    let stdout = BufReader::new(tail.stdout.take().expect("stdout"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The tail is subscribed once the daemon counts its client.
    make();
    let mut keys = Vec::new();
    while keys.len() < n {
        let line = rx.recv_timeout(WAIT).expect("tail prints");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        let seq = v["seq"].as_str().and_then(|s| s.parse().ok()).expect("seq");
        keys.push((v["run_id"].as_str().expect("run_id").to_owned(), seq));
    }
    // SAFETY: kill(2) of our child.
    unsafe { libc::kill(tail.id() as i32, libc::SIGTERM) };
    let out = tail.wait_with_output().expect("tail exit");
    assert!(
        out.status.success(),
        "tail: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "more lines than expected"
    );
    keys
}

/// Waits until the daemon's status counts `n` stream clients.
fn wait_clients(rt: &tokio::runtime::Runtime, endpoint: &str, n: u64) {
    rt.block_on(async {
        let mut client = connect(endpoint, None).await.expect("connect");
        let deadline = Instant::now() + WAIT;
        loop {
            let status = client
                .get_status(pb::GetStatusRequest::default())
                .await
                .expect("GetStatus")
                .into_inner();
            if status.clients == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} clients, not {n}",
                status.clients
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn tail_resume_keeps_its_place_in_a_file() {
    if !privileged("tail_resume_keeps_its_place_in_a_file") {
        return;
    }
    let scene = Scene::new("tail-resume");
    let rt = runtime();
    let endpoint = scene.endpoint();
    let position = scene.journal.with_file_name("position.json");
    let mut daemon = Daemon::start(&scene.config);
    let run = daemon.run_id(&scene.journal);

    // No position yet: live from now.
    let first = tail_until(&endpoint, &position, 2, || {
        wait_clients(&rt, &endpoint, 1);
        scene.anomalies(2);
    });
    // Made while no tail runs; the next tail starts after the position it saved.
    scene.anomalies(2);
    let second = tail_until(&endpoint, &position, 3, || {
        wait_clients(&rt, &endpoint, 1);
        scene.anomalies(1);
    });
    // The tail may print an anomaly before the journal writer syncs it to the file.
    wait_journaled(&scene.journal, &run, 5);
    let all: Vec<Key> = journaled(&scene.journal).iter().map(key).collect();
    let printed: Vec<Key> = first.into_iter().chain(second).collect();
    assert_eq!(printed, all, "printed (left) vs journaled (right)");
    assert_eq!(all.len(), 5);
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&position).expect("position")).expect("JSON");
    assert_eq!(saved["seq"], all[4].1, "{saved}");
    drop(daemon);
}
