//! Benchmarks. Each figure is reported next to a baseline measured in the same run.
//!
//! # `cargo xtask bench overhead`
//!
//! What the probes add to an open+close, a connect and an unrelated syscall.
//!
//! In one run, tight loops (am-testkid `time-opens`, `time-connects`, `time-getppid`) on an
//! unwatched and a watched file, TCP connects to a local listener, and `getppid`, without
//! the daemon and with the release daemon attached, alternating over several rounds; the
//! median of each is reported with the ratio to its own baseline. With the daemon attached,
//! the kernel's per-program statistics (`kernel.bpf_stats_enabled`) say what each eBPF
//! program cost per run during each loop.
//!
//! # `cargo xtask bench flood`
//!
//! Fairness under flood, with the release daemon and its default config: a victim workload
//! (its own cgroup) reads a watched file at a steady pace alone (the baseline), then while a
//! flooder (another cgroup, on the same CPU) opens a watched file and connects to a local
//! listener as fast as it can, with the per-workload budgets on and then off. Reported: the
//! victim's reads delivered and the mean time of one of its opens (ratio to the baseline),
//! the flooder's offered, delivered, over-budget and ring-full rates. Then the zero-loss
//! rate: one workload's paced watched opens at rising rates, and the highest rate whose
//! opens were all delivered.
//!
//! # `cargo xtask bench latency`
//!
//! Time from the syscall to a real gRPC client, with the release daemon and its default
//! config (but for the watched prefix, a free loopback gRPC port, no JSON outputs and a
//! rate limit above the alerts raised). Three rounds, each measuring both rates; for each
//! rate, a fresh daemon and `am-latency`
//! (`tests/src/bin/am-latency.rs`, the generated tonic client) subscribed to the events
//! and anomalies streams before the load starts; then one workload (its own cgroup) opens
//! a watched file paced at 1,000/s (the baseline) or 50,000/s, while an alert actor (its
//! own cgroup) reads a cloud-credentials file every 20 ms, each read raising
//! `node-credential-read`. Latency is the client's CLOCK_BOOTTIME at receipt minus the
//! kernel's timestamp on the event (for an alert, on the event that fired it). Reported:
//! per round, events and alerts delivered of those made, p50, p99 and max, losses and
//! gaps; the median round's p50 and p99 per rate with the ratio of 50,000/s to the
//! baseline; and whether the median alert p99 at 50,000/s is ≤ 50 ms with nothing lost
//! and the load at the rate asked.
//!
//! # `cargo xtask bench journal` and `cargo xtask bench replay`
//!
//! The forensic journal, measured by `am-bench` (`tests/src/bin/am-bench.rs`, which links
//! the agent-monitor library) on a tmpfs directory and on a directory of the real disk:
//! the pipeline thread's cost per record in the journal sink next to the JSON-lines output,
//! records dropped, the storage writer's and the whole sink's write throughput next to raw
//! writes and to each other, disk bytes per event and per anomaly next to their JSON lines,
//! and `agent-monitor replay` (with and without `--policy`) next to the storage reader
//! alone and `cat`. `replay` records a journal and runs the last part only.
//!
//! # `cargo xtask bench pipeline`
//!
//! The userspace pipeline on a recorded stream of kernel records (`am-pipeline`, see its
//! module comment): events per CPU-second of decode alone, then with enrichment,
//! detection, the JSON-lines and Falco outputs, the gRPC hub with draining clients and the
//! metrics, each next to the stage before.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, Env};

const ROUNDS: usize = 5;

/// CPU pinning: the measured loop on the last CPU, the daemon on the others, so the
/// figures compare the same core with and without probes rather than scheduler luck.
fn pinned(cpus: &str, program: &Path) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpus]).arg(program);
    cmd
}

fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn kid_cpus() -> String {
    (cpu_count() - 1).to_string()
}

fn daemon_cpus() -> String {
    match cpu_count() {
        1 => "0".to_owned(),
        n => format!("0-{}", n - 2),
    }
}

/// Runs one am-testkid timing action and returns its ns per call.
fn time_action(kid: &Path, action: &str) -> Result<f64> {
    let out = pinned(&kid_cpus(), kid)
        .arg(action)
        .output()
        .context("running am-testkid")?;
    if !out.status.success() {
        bail!(
            "am-testkid failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("ns_per_call "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("am-testkid printed no ns_per_call: {text}"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Daemon {
    child: std::process::Child,
    /// The gRPC API's address, as the daemon logged it (`grpc.listen: 127.0.0.1:0` binds
    /// a free port, named in this line).
    grpc: Option<String>,
}

/// The daemon's log line naming the gRPC API's bound address.
const GRPC_LOG_PREFIX: &str = "gRPC API on ";

impl Daemon {
    fn start(bin: &Path, config: &Path) -> Result<Self> {
        let mut child = pinned(&daemon_cpus(), bin)
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting agent-monitor")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut grpc = None;
        loop {
            let Some(line) = lines.next() else {
                reap(&mut child);
                bail!("agent-monitor exited before it was running");
            };
            let line = line?;
            if line.contains("agent-monitor running") {
                break;
            }
            if let Some((_, rest)) = line.split_once(GRPC_LOG_PREFIX) {
                grpc = rest.split_whitespace().next().map(str::to_owned);
            }
            if Instant::now() > deadline {
                reap(&mut child);
                bail!("agent-monitor did not start within 30 s");
            }
        }
        // Keep draining stderr so the daemon never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Self { child, grpc })
    }

    fn stop(mut self) -> Result<()> {
        // SIGTERM, as an orchestrator would send it; kill(1) keeps xtask free of libc.
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("agent-monitor exited with {status}");
        }
        Ok(())
    }
}

/// A benchmark that fails half-way does not leave the daemon (and its probes) running.
impl Drop for Daemon {
    fn drop(&mut self) {
        reap(&mut self.child);
    }
}

/// Kills and waits for a child that is still running.
fn reap(child: &mut std::process::Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The credential lane in the proto3 JSON of a `lost` record (enum value names).
const CREDENTIAL_LANE_JSON: &str = "LANE_CREDENTIAL";

/// Counts delivered open records and lost credential records in a daemon output file
/// (the proto3 JSON form of `agent_monitor.v1.Event`, one per line).
fn count_output(path: &Path) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut opens = 0;
    let mut lost = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("daemon output line is not JSON: {line}"))?;
        if v.get("open").is_some() {
            opens += 1;
        } else if v["lost"]["lane"] == CREDENTIAL_LANE_JSON {
            // uint64 fields are strings in proto3 JSON.
            lost += v["lost"]["count"]
                .as_str()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok((opens, lost))
}

/// Builds the release daemon and am-testkid; returns their paths.
fn build_release(root: &Path, env: &Env) -> Result<(PathBuf, PathBuf)> {
    cargo(
        root,
        env,
        &[
            "build",
            "--release",
            "-p",
            "agent-monitor",
            "-p",
            "agent-monitor-tests",
        ],
    )?;
    let release = target_dir(root, env)?.join("release");
    Ok((release.join("agent-monitor"), release.join("am-testkid")))
}

/// Accept backlog of the connect loops' listener: deeper than a whole loop's worth of
/// connects the accepting thread may fall behind by. With std's default (128) SYNs
/// overflowed it while nothing else slowed the loop, so the no-probes baseline measured
/// the kernel's SYN retries (236 µs a connect against 62 µs with the probes attached).
const LISTEN_BACKLOG: i32 = 4096;

/// A local TCP listener for connect loops, accepting and closing on a thread.
fn local_listener() -> Result<std::net::SocketAddr> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).context("TCP socket")?;
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket
        .listen(LISTEN_BACKLOG)
        .context("listening on 127.0.0.1")?;
    let listener: std::net::TcpListener = socket.into();
    let target = listener.local_addr()?;
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    Ok(target)
}

/// Writes a daemon config for a benchmark: the default config watching only `watched`
/// (a directory), every record as a JSON line to `output`, no alerts, no listeners, and
/// `extra` (more YAML, e.g. lanes) appended.
fn write_config(config: &Path, watched: &Path, output: &Path, extra: &str) -> Result<()> {
    std::fs::write(
        config,
        format!(
            "watch:\n  prefixes: [\"{}/\"]\n  basenames: []\noutput: \"{}\"\nalerts: {{output: none}}\ngrpc: {{listen: none}}\nadmin: {{listen: none}}\n{extra}",
            watched.display(),
            output.display()
        ),
    )
    .with_context(|| format!("writing {}", config.display()))
}

pub fn overhead(root: &Path, env: &Env, iterations: u64) -> Result<()> {
    let (bin, kid) = build_release(root, env)?;
    let dir = std::env::temp_dir().join(format!("am-bench-{}", std::process::id()));
    let watched_dir = dir.join("watched");
    std::fs::create_dir_all(&watched_dir)?;
    let watched = watched_dir.join("token");
    let unwatched = dir.join("plain.txt");
    std::fs::write(&watched, b"x")?;
    std::fs::write(&unwatched, b"x")?;
    let output = dir.join("events.jsonl");
    let config = dir.join("config.yaml");
    write_config(&config, &watched_dir, &output, "")?;

    let target = local_listener()?;
    let connects = (iterations / 10).max(1);
    let loops: [(&str, String); 4] = [
        (
            "open unwatched",
            format!("time-opens:{}:{iterations}", unwatched.display()),
        ),
        (
            "open watched",
            format!("time-opens:{}:{iterations}", watched.display()),
        ),
        ("tcp connect", format!("time-connects:{target}:{connects}")),
        ("getppid", format!("time-getppid:{iterations}")),
    ];

    // The kernel counts run time per program only while statistics are enabled.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling kernel.bpf_stats_enabled")?;
    let mut base: Vec<Vec<f64>> = vec![Vec::new(); loops.len()];
    let mut probed: Vec<Vec<f64>> = vec![Vec::new(); loops.len()];
    let mut kernel: Vec<ProgStats> = vec![ProgStats::default(); loops.len()];
    for round in 0..ROUNDS {
        for (i, (_, action)) in loops.iter().enumerate() {
            base[i].push(time_action(&kid, action)?);
        }
        let daemon = Daemon::start(&bin, &config)?;
        for (i, (_, action)) in loops.iter().enumerate() {
            let before = prog_stats()?;
            probed[i].push(time_action(&kid, action)?);
            kernel[i].add_delta(&before, &prog_stats()?);
        }
        daemon.stop()?;
        eprintln!("bench overhead: round {}/{ROUNDS} done", round + 1);
    }
    let (opens, lost) = count_output(&output)?;
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "ns per call, median of {ROUNDS} rounds ({iterations} opens or getppid, {connects} connects per round); loop on CPU {}, daemon on CPU {}",
        kid_cpus(),
        daemon_cpus()
    );
    println!(
        "{:<16} {:>12} {:>14} {:>10} {:>8}",
        "loop", "no probes", "probes+daemon", "added", "ratio"
    );
    for (i, (name, _)) in loops.iter().enumerate() {
        let b = median(&mut base[i]);
        let p = median(&mut probed[i]);
        println!(
            "{:<16} {:>12.0} {:>14.0} {:>10.0} {:>8.3}",
            name,
            b,
            p,
            p - b,
            p / b
        );
    }
    println!("kernel side during each loop (all rounds; kernel.bpf_stats_enabled):");
    for (i, (name, _)) in loops.iter().enumerate() {
        let parts: Vec<String> = kernel[i]
            .0
            .iter()
            .filter(|(_, (_, runs))| *runs > 0)
            .map(|(prog, (ns, runs))| {
                format!("{prog} {:.0} ns/run x{runs}", *ns as f64 / *runs as f64)
            })
            .collect();
        println!(
            "  {:<16} {}",
            name,
            if parts.is_empty() {
                "no program ran".to_owned()
            } else {
                parts.join(", ")
            }
        );
    }
    let expected = iterations * ROUNDS as u64;
    println!(
        "watched opens made with the daemon attached: {expected}; delivered as events: {opens}; reported lost: {lost}; unaccounted: {}",
        expected as i64 - opens as i64 - lost as i64
    );
    Ok(())
}

/// Run time (ns) and run count per program name.
#[derive(Clone, Default)]
struct ProgStats(std::collections::BTreeMap<String, (u64, u64)>);

impl ProgStats {
    fn add_delta(&mut self, before: &ProgStats, after: &ProgStats) {
        for (name, (ns, runs)) in &after.0 {
            let (ns0, runs0) = before.0.get(name).copied().unwrap_or_default();
            let e = self.0.entry(name.clone()).or_default();
            e.0 += ns.saturating_sub(ns0);
            e.1 += runs.saturating_sub(runs0);
        }
    }
}

/// The agent-monitor programs loaded now, summed by name (one program can be attached to
/// several tracepoints but is loaded once).
fn prog_stats() -> Result<ProgStats> {
    const OURS: &[&str] = &[
        "open_exit",
        "io_uring_submit",
        "io_uring_comple",
        "net_exit",
        "connect_enter",
        "sendto_enter",
        "sendmsg_enter",
        "tcp_syn_sent",
        "sock_send",
        "sched_exec",
        "sched_fork",
        "sched_exit",
    ];
    let mut out = ProgStats::default();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded programs")?;
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if OURS.contains(&name) {
            let e = out.0.entry(name.to_owned()).or_default();
            e.0 += info.run_time().as_nanos() as u64;
            e.1 += info.run_count();
        }
    }
    Ok(out)
}

/// Cargo's target directory (CARGO_TARGET_DIR and cargo config included).
fn target_dir(root: &Path, env: &Env) -> Result<PathBuf> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata printed no JSON")?;
    v["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

/// Removes a directory tree when dropped (the benchmark's tmpfs and disk directories).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `journal` (every part) or `replay` (replay throughput only), with `events` events per
/// run.
pub fn journal(root: &Path, env: &Env, name: &str, events: u64) -> Result<()> {
    cargo(
        root,
        env,
        &[
            "build",
            "--release",
            "-p",
            "agent-monitor",
            "--bin",
            "agent-monitor",
            "-p",
            "agent-monitor-tests",
            "--bin",
            "am-bench",
        ],
    )?;
    let release = target_dir(root, env)?.join("release");
    let id = std::process::id();
    // tmpfs: /dev/shm is one on every Linux with glibc's shm_open; the disk: /var/tmp,
    // which systemd and Debian keep on persistent storage.
    let tmpfs = Scratch(PathBuf::from(format!("/dev/shm/am-bench-{id}")));
    let disk = Scratch(PathBuf::from(format!("/var/tmp/am-bench-{id}")));
    let status = Command::new(release.join("am-bench"))
        .arg(name)
        .arg("--agent-monitor")
        .arg(release.join("agent-monitor"))
        .arg("--tmpfs")
        .arg(&tmpfs.0)
        .arg("--disk")
        .arg(&disk.0)
        .args(["--events", &events.to_string()])
        .status()
        .context("running am-bench")?;
    drop((tmpfs, disk));
    if !status.success() {
        bail!("am-bench {name} failed: {status}");
    }
    Ok(())
}

/// `pipeline`: `am-pipeline` (`tests/src/bin/am-pipeline.rs`, which links the library)
/// runs a recorded stream of `events` kernel records through decode, enrichment,
/// detection and the outputs, stage by stage, and prints events per CPU-second.
pub fn pipeline(root: &Path, env: &Env, events: u64) -> Result<()> {
    cargo(
        root,
        env,
        &[
            "build",
            "--release",
            "-p",
            "agent-monitor-tests",
            "--bin",
            "am-pipeline",
        ],
    )?;
    let bin = target_dir(root, env)?.join("release").join("am-pipeline");
    let status = Command::new(bin)
        .args(["--events", &events.to_string()])
        .status()
        .context("running am-pipeline")?;
    if !status.success() {
        bail!("am-pipeline failed: {status}");
    }
    Ok(())
}

/// The cgroup2 mount the workloads of `bench flood` are put in.
const CGROUP2: &str = "/sys/fs/cgroup/unified";
/// `bench flood`: the victim's reads, at one every `VICTIM_GAP_US` µs.
const VICTIM_READS: u64 = 1000;
const VICTIM_GAP_US: u64 = 200;
/// `bench flood`: the flooder's rounds of `FLOOD_OPENS_PER_CONNECT` opens and a connect.
const FLOOD_ROUNDS: u64 = 40_000;
const FLOOD_OPENS_PER_CONNECT: u64 = 16;
/// `bench flood`: paced open rates tried from one workload, per second (0: flat out).
const PACED_RATES: [u64; 5] = [25_000, 50_000, 100_000, 200_000, 0];

/// A cgroup2 directory for a benchmark's workload, removed on drop.
struct BenchCgroup(PathBuf);

impl BenchCgroup {
    fn create(name: &str) -> Result<Self> {
        let path = Path::new(CGROUP2).join(name);
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        // Its processes have exited by now; the kernel may need a moment to let go.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The flooder's cgroup directory (under the cgroup2 mount).
fn flood_cgroup_name() -> String {
    format!("am-bench-flooder-{}", std::process::id())
}

/// What the daemon's output file says about one path and the losses.
#[derive(Default, Debug)]
struct FloodCount {
    victim_opens: u64,
    flooder_opens: u64,
    ring_full: u64,
    budget: u64,
}

fn count_flood_output(
    path: &Path,
    victim: &Path,
    flooder: &Path,
    flood_cgroup: &str,
) -> Result<FloodCount> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut c = FloodCount::default();
    let (victim, flooder) = (victim.display().to_string(), flooder.display().to_string());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("daemon output line is not JSON: {line}"))?;
        if let Some(o) = v.get("open") {
            let p = o["path"].as_str().unwrap_or("");
            if p == victim {
                c.victim_opens += 1;
            } else if p == flooder {
                c.flooder_opens += 1;
            }
        } else if v["lost"]["lane"] == CREDENTIAL_LANE_JSON {
            // uint64 fields are strings in proto3 JSON.
            let n = v["lost"]["count"]
                .as_str()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            if v["lost"]["reason"] == "LOST_REASON_BUDGET" {
                // Only the flooder's: the daemon watches the whole node, where other
                // workloads may go over their own budgets.
                let cgroup = v["workload"]["cgroup"].as_str().unwrap_or("");
                if cgroup.ends_with(flood_cgroup) {
                    c.budget += n;
                }
            } else {
                c.ring_full += n;
            }
        }
    }
    Ok(c)
}

/// Runs am-testkid in `cgroup` on the measured CPU with one action; returns its stdout.
fn kid_in(kid: &Path, cgroup: &BenchCgroup, action: &str) -> Result<std::process::Child> {
    pinned(&kid_cpus(), kid)
        .arg("--cgroup")
        .arg(&cgroup.0)
        .arg(action)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running am-testkid")
}

/// A finished am-testkid's printed `name <value>`.
fn kid_value(out: &std::process::Output, name: &str) -> Result<f64> {
    if !out.status.success() {
        bail!(
            "am-testkid failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("am-testkid printed no {name}: {text}"))
}

/// One scenario of `bench flood`: the victim's paced reads, alone or during a flood.
struct Scenario {
    victim_delivered: u64,
    victim_ns: f64,
    flood: Option<FloodFigures>,
}

struct FloodFigures {
    offered_per_s: f64,
    admitted_per_s: f64,
    budget_per_s: f64,
    ring_full_per_s: f64,
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the scenario's parts"
)]
fn flood_scenario(
    bin: &Path,
    kid: &Path,
    dir: &Path,
    budget: bool,
    flood: bool,
    victim_file: &Path,
    flood_file: &Path,
    target: std::net::SocketAddr,
) -> Result<Scenario> {
    let output = dir.join(format!("flood-{budget}-{flood}.jsonl"));
    let config = dir.join("flood.yaml");
    let lanes = if budget {
        String::new()
    } else {
        let off = "{ring_bytes: 1048576, budget: {per_second: 0}}";
        format!("lanes: {{credential: {off}, network: {off}, process: {off}}}\n")
    };
    write_config(
        &config,
        victim_file.parent().unwrap_or(dir),
        &output,
        &lanes,
    )?;
    let victim_cg = BenchCgroup::create(&format!("am-bench-victim-{}", std::process::id()))?;
    let flood_cg = BenchCgroup::create(&flood_cgroup_name())?;
    let daemon = Daemon::start(bin, &config)?;
    let flooder = if flood {
        let child = kid_in(
            kid,
            &flood_cg,
            &format!(
                "flood-mixed:{}:{}:{}:{FLOOD_ROUNDS}:{FLOOD_OPENS_PER_CONNECT}",
                flood_file.display(),
                target.ip(),
                target.port()
            ),
        )?;
        // The flood's head start: the credential ring is under pressure when the victim reads.
        std::thread::sleep(Duration::from_millis(300));
        Some(child)
    } else {
        None
    };
    let victim = kid_in(
        kid,
        &victim_cg,
        &format!(
            "paced-opens:{}:{VICTIM_READS}:{VICTIM_GAP_US}",
            victim_file.display()
        ),
    )?
    .wait_with_output()?;
    let victim_ns = kid_value(&victim, "ns_per_call")?;
    let flood_out = match flooder {
        Some(f) => Some(f.wait_with_output()?),
        None => None,
    };
    // What is still in the rings and the last drop counters reach the output.
    std::thread::sleep(Duration::from_millis(500));
    daemon.stop()?;
    let c = count_flood_output(&output, victim_file, flood_file, &flood_cgroup_name())?;
    let flood = match flood_out {
        Some(out) => {
            let secs = kid_value(&out, "elapsed_ns")? / 1e9;
            let offered = kid_value(&out, "opens")?;
            Some(FloodFigures {
                offered_per_s: offered / secs,
                admitted_per_s: c.flooder_opens as f64 / secs,
                budget_per_s: c.budget as f64 / secs,
                ring_full_per_s: c.ring_full as f64 / secs,
            })
        }
        None => None,
    };
    Ok(Scenario {
        victim_delivered: c.victim_opens,
        victim_ns,
        flood,
    })
}

/// `cargo xtask bench flood`: fairness under a flood and the zero-loss rate of one workload.
pub fn flood(root: &Path, env: &Env, paced_opens: u64) -> Result<()> {
    let (bin, kid) = build_release(root, env)?;
    let dir = std::env::temp_dir().join(format!("am-bench-flood-{}", std::process::id()));
    let watched = dir.join("watched");
    std::fs::create_dir_all(&watched)?;
    let victim_file = watched.join("victim-token");
    let flood_file = watched.join("flooder-token");
    std::fs::write(&victim_file, b"x")?;
    std::fs::write(&flood_file, b"x")?;
    let target = local_listener()?;

    let scenarios = [
        ("alone (baseline)", true, false),
        ("flood, budgets on", true, true),
        ("flood, budgets off", false, true),
    ];
    let mut results = Vec::new();
    for (name, budget, flood) in scenarios {
        results.push((
            name,
            flood_scenario(
                &bin,
                &kid,
                &dir,
                budget,
                flood,
                &victim_file,
                &flood_file,
                target,
            )?,
        ));
        eprintln!("bench flood: {name} done");
    }

    // Zero-loss rate: one workload's paced watched opens at rising rates, default config.
    let mut paced = Vec::new();
    for rate in PACED_RATES {
        let output = dir.join(format!("paced-{rate}.jsonl"));
        let config = dir.join("paced.yaml");
        write_config(&config, &watched, &output, "")?;
        let cg_name = format!("am-bench-paced-{}", std::process::id());
        let cg = BenchCgroup::create(&cg_name)?;
        let daemon = Daemon::start(&bin, &config)?;
        let gap_us = 1_000_000u64.checked_div(rate).unwrap_or(0);
        let start = Instant::now();
        let out = kid_in(
            &kid,
            &cg,
            &format!(
                "paced-opens:{}:{paced_opens}:{gap_us}",
                victim_file.display()
            ),
        )?
        .wait_with_output()?;
        let secs = start.elapsed().as_secs_f64();
        kid_value(&out, "ns_per_call")?;
        std::thread::sleep(Duration::from_millis(500));
        daemon.stop()?;
        let c = count_flood_output(&output, &victim_file, &flood_file, &cg_name)?;
        paced.push((rate, paced_opens as f64 / secs, c));
        eprintln!("bench flood: paced {rate}/s done");
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "fairness: a victim workload reads a watched file {VICTIM_READS} times ({VICTIM_GAP_US} µs apart) while another floods (opens + connects, {FLOOD_OPENS_PER_CONNECT}:1, both on CPU {}; daemon on CPU {}, default 1 MiB rings)",
        kid_cpus(),
        daemon_cpus()
    );
    println!(
        "{:<20} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "scenario", "victim", "victim open", "flood", "flood", "flood over", "flood ring"
    );
    println!(
        "{:<20} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "", "delivered", "ns (ratio)", "offered/s", "delivered/s", "budget/s", "full/s"
    );
    let base_ns = results.first().map_or(1.0, |(_, s)| s.victim_ns);
    for (name, s) in &results {
        let (offered, admitted, budget, full) = s.flood.as_ref().map_or(
            (
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
            ),
            |f| {
                (
                    format!("{:.0}", f.offered_per_s),
                    format!("{:.0}", f.admitted_per_s),
                    format!("{:.0}", f.budget_per_s),
                    format!("{:.0}", f.ring_full_per_s),
                )
            },
        );
        println!(
            "{:<20} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12}",
            name,
            format!("{}/{VICTIM_READS}", s.victim_delivered),
            format!("{:.0} ({:.2})", s.victim_ns, s.victim_ns / base_ns),
            offered,
            admitted,
            budget,
            full
        );
    }
    println!(
        "zero-loss rate: {paced_opens} watched opens from one workload on CPU {}, paced (0: flat out), default config",
        kid_cpus()
    );
    println!(
        "{:>12} {:>12} {:>12} {:>12} {:>12}",
        "asked/s", "made/s", "delivered", "ring full", "over budget"
    );
    let mut best: Option<f64> = None;
    for (rate, made, c) in &paced {
        println!(
            "{:>12} {:>12.0} {:>12} {:>12} {:>12}",
            if *rate == 0 {
                "flat out".to_owned()
            } else {
                rate.to_string()
            },
            made,
            c.victim_opens,
            c.ring_full,
            c.budget
        );
        if c.victim_opens == paced_opens && c.ring_full == 0 && c.budget == 0 {
            best = Some(best.map_or(*made, |b: f64| b.max(*made)));
        }
    }
    match best {
        Some(b) => println!("highest rate delivered with zero loss: {b:.0} opens/s"),
        None => println!("no rate tried was delivered with zero loss"),
    }
    Ok(())
}

/// `bench latency`: the paced open rate of the baseline, per second.
const LATENCY_BASE_RATE: u64 = 1_000;
/// `bench latency`: the paced open rate measured against it (issue 12's target load).
const LATENCY_RATE: u64 = 50_000;
/// `bench latency`: the alert actor's gap between two credential reads (50 alerts/s).
const ALERT_GAP_US: u64 = 20_000;
/// `bench latency`: the target, alert latency p99 at [`LATENCY_RATE`], in ms.
const ALERT_P99_TARGET_MS: f64 = 50.0;
/// `bench latency`: alerts per minute allowed before rate limiting (default 20 per rule
/// and workload): every read of the alert actor must raise its alert to be measured.
const LATENCY_RATE_LIMIT: u64 = 1_000_000;
/// `bench latency`: rounds, each measuring both rates.
const LATENCY_ROUNDS: usize = 3;
/// `bench latency`: the share of the asked rate the load must make for the target to
/// count as measured at that rate.
const LOAD_REACHED: f64 = 0.95;

/// The cgroup directory of `bench latency`'s load (under the cgroup2 mount).
fn load_cgroup_name() -> String {
    format!("am-bench-latency-load-{}", std::process::id())
}

/// What `am-latency` printed for one rate, and what the workloads made.
struct LatencyRun {
    round: usize,
    rate: u64,
    offered: u64,
    made_per_s: f64,
    alert_reads: u64,
    client: serde_json::Value,
}

impl LatencyRun {
    /// Items the client received and measured: `events` or `alerts`.
    fn delivered(&self, kind: &str) -> u64 {
        self.client[kind]["count"].as_u64().unwrap_or(0)
    }

    /// Every open of the load and every alert of the alert actor reached the client.
    fn complete(&self) -> bool {
        self.delivered("events") == self.offered && self.delivered("alerts") == self.alert_reads
    }
}

/// Kills a child (the gRPC client) that a failing benchmark leaves behind.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        reap(&mut self.0);
    }
}

/// One rate of `bench latency`: a fresh daemon, the client subscribed, the paced load and
/// the alert actor in their own cgroups for `secs` seconds, then the client's figures.
fn latency_run(
    release: &Path,
    dir: &Path,
    load_file: &Path,
    alert_file: &Path,
    rate: u64,
    secs: u64,
    round: usize,
) -> Result<LatencyRun> {
    let watched = load_file
        .parent()
        .context("the load file has no directory")?;
    let config = dir.join(format!("latency-{rate}.yaml"));
    // The default config but for: the watched prefix of the benchmark's files, no JSON
    // outputs (the measured path is the gRPC one), the gRPC API on a free loopback port,
    // no admin endpoint, and a rate limit above what the alert actor raises.
    std::fs::write(
        &config,
        format!(
            "watch:\n  prefixes: [\"{}/\"]\n  basenames: []\noutput: none\nalerts: {{output: none, rate_limit_per_minute: {LATENCY_RATE_LIMIT}}}\ngrpc: {{listen: \"127.0.0.1:0\"}}\nadmin: {{listen: none}}\n",
            watched.display()
        ),
    )?;
    let load_cg = BenchCgroup::create(&load_cgroup_name())?;
    let alert_cg = BenchCgroup::create(&format!("am-bench-latency-alert-{}", std::process::id()))?;
    let daemon = Daemon::start(&release.join("agent-monitor"), &config)?;
    let endpoint = daemon
        .grpc
        .clone()
        .context("the daemon logged no gRPC address")?;
    // Not pinned: the client is any process of the node, placed by the scheduler.
    let mut client = ChildGuard(
        Command::new(release.join("am-latency"))
            .args(["--endpoint", &endpoint])
            .arg("--load-path")
            .arg(load_file)
            .arg("--alert-path")
            .arg(alert_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting am-latency")?,
    );
    let mut client_out = BufReader::new(client.0.stdout.take().context("no client stdout")?);
    let mut line = String::new();
    client_out.read_line(&mut line)?;
    if line.trim() != "subscribed" {
        bail!("am-latency did not subscribe (printed {line:?})");
    }

    let opens = rate * secs;
    let load_action = format!(
        "paced-opens:{}:{opens}:{}",
        load_file.display(),
        1_000_000 / rate
    );
    let alert_reads = secs * 1_000_000 / ALERT_GAP_US;
    let alert_action = format!(
        "paced-opens:{}:{alert_reads}:{ALERT_GAP_US}",
        alert_file.display()
    );
    let start = Instant::now();
    let load = kid_in(&release.join("am-testkid"), &load_cg, &load_action)?;
    let alert = kid_in(&release.join("am-testkid"), &alert_cg, &alert_action)?;
    let load = load.wait_with_output()?;
    let made_per_s = opens as f64 / start.elapsed().as_secs_f64();
    let alert = alert.wait_with_output()?;
    let offered = kid_value(&load, &load_action)? as u64;
    let alert_reads = kid_value(&alert, &alert_action)? as u64;

    // The load is over: the client drains until its streams are quiet and reports.
    drop(client.0.stdin.take());
    let mut report = String::new();
    client_out.read_to_string(&mut report)?;
    let status = client.0.wait()?;
    if !status.success() {
        bail!("am-latency failed: {status}");
    }
    daemon.stop()?;
    let client: serde_json::Value = serde_json::from_str(report.trim())
        .with_context(|| format!("am-latency printed no JSON: {report}"))?;
    Ok(LatencyRun {
        round,
        rate,
        offered,
        made_per_s,
        alert_reads,
        client,
    })
}

fn ms(ns: &serde_json::Value) -> f64 {
    ns.as_u64().unwrap_or(0) as f64 / 1e6
}

/// `cargo xtask bench latency`: time from the syscall (the kernel's timestamp on the
/// event) to a real gRPC client of the release daemon, at 50,000 watched opens/s next to
/// 1,000/s, for the events and for the alerts raised meanwhile.
pub fn latency(root: &Path, env: &Env, secs: u64) -> Result<()> {
    build_release(root, env)?;
    let release = target_dir(root, env)?.join("release");
    let dir =
        Scratch(std::env::temp_dir().join(format!("am-bench-latency-{}", std::process::id())));
    let watched = dir.0.join("watched");
    // A path the classifier calls cloud credentials: a host process reading it raises
    // `node-credential-read` with the default config. The load's file is of no class
    // (`Other`): its opens are events and raise nothing.
    let alert_dir = watched.join(".aws");
    std::fs::create_dir_all(&alert_dir)?;
    let load_file = watched.join("load");
    let alert_file = alert_dir.join("credentials");
    std::fs::write(&load_file, b"x")?;
    std::fs::write(&alert_file, b"fixture, not a credential\n")?;

    let mut runs = Vec::new();
    // Rounds alternate the rates, so that a burst of noise from the rest of the machine
    // falls on both rather than on one.
    for round in 1..=LATENCY_ROUNDS {
        for rate in [LATENCY_BASE_RATE, LATENCY_RATE] {
            runs.push(latency_run(
                &release,
                &dir.0,
                &load_file,
                &alert_file,
                rate,
                secs,
                round,
            )?);
            eprintln!("bench latency: round {round}/{LATENCY_ROUNDS}, {rate}/s done");
        }
    }
    drop(dir);

    println!(
        "latency from the syscall (kernel CLOCK_BOOTTIME stamp) to receipt by a gRPC client (am-latency, StreamEvents + StreamAnomalies), release daemon, default config; {secs} s per rate and round; load and alert actor on CPU {}, daemon on CPU {}, client unpinned; an alert every {} ms",
        kid_cpus(),
        daemon_cpus(),
        ALERT_GAP_US / 1000
    );
    println!(
        "{:>5} {:>7} {:>7} {:>17} {:>7} {:>7} {:>7} {:>9} {:>7} {:>7} {:>7}",
        "round",
        "asked/s",
        "made/s",
        "events delivered",
        "p50 ms",
        "p99 ms",
        "max ms",
        "alerts",
        "p50 ms",
        "p99 ms",
        "max ms"
    );
    for r in &runs {
        let (e, a) = (&r.client["events"], &r.client["alerts"]);
        println!(
            "{:>5} {:>7} {:>7.0} {:>17} {:>7.2} {:>7.2} {:>7.2} {:>9} {:>7.2} {:>7.2} {:>7.2}",
            r.round,
            r.rate,
            r.made_per_s,
            format!("{}/{}", r.delivered("events"), r.offered),
            ms(&e["p50_ns"]),
            ms(&e["p99_ns"]),
            ms(&e["max_ns"]),
            format!("{}/{}", r.delivered("alerts"), r.alert_reads),
            ms(&a["p50_ns"]),
            ms(&a["p99_ns"]),
            ms(&a["max_ns"]),
        );
    }
    println!("losses and other items (credential records the kernel reported lost, by reason and budget workload; the load's cgroup is {}):", load_cgroup_name());
    for r in &runs {
        println!(
            "  round {} {:>6}/s: load opens not delivered {}; reported lost {}; slow-client gaps: {} events, {} anomalies; alert-path opens received {}; anomalies not tied to one {}",
            r.round,
            r.rate,
            r.offered.saturating_sub(r.delivered("events")),
            r.client["lost_credential"],
            r.client["events_gap_missed"],
            r.client["anomalies_gap_missed"],
            r.client["alert_opens"],
            r.client["unmatched_alerts"],
        );
    }
    // The median round of each figure, per rate.
    let med = |rate: u64, kind: &str, p: &str| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|r| r.rate == rate)
            .map(|r| ms(&r.client[kind][p]))
            .collect();
        median(&mut v)
    };
    println!("median of {LATENCY_ROUNDS} rounds (ms), and the ratio {LATENCY_RATE}/s to {LATENCY_BASE_RATE}/s:");
    for (kind, p) in [
        ("events", "p50_ns"),
        ("events", "p99_ns"),
        ("alerts", "p50_ns"),
        ("alerts", "p99_ns"),
    ] {
        let (b, h) = (med(LATENCY_BASE_RATE, kind, p), med(LATENCY_RATE, kind, p));
        println!(
            "  {kind:<6} {:<3} {b:>8.2} {h:>8.2}   ratio {}",
            p.trim_end_matches("_ns"),
            if b > 0.0 {
                format!("{:.2}", h / b)
            } else {
                "-".to_owned()
            }
        );
    }
    let high: Vec<&LatencyRun> = runs.iter().filter(|r| r.rate == LATENCY_RATE).collect();
    let p99 = med(LATENCY_RATE, "alerts", "p99_ns");
    let worst = high
        .iter()
        .map(|r| ms(&r.client["alerts"]["p99_ns"]))
        .fold(0.0, f64::max);
    let complete = high.iter().all(|r| r.complete());
    let slowest = high.iter().map(|r| r.made_per_s).fold(f64::MAX, f64::min);
    let reached = slowest >= LATENCY_RATE as f64 * LOAD_REACHED;
    let mut caveats = Vec::new();
    if !complete {
        caveats.push("events or alerts were lost, which counts against it".to_owned());
    }
    if !reached {
        caveats.push(format!("the load reached only {slowest:.0}/s in one round"));
    }
    println!(
        "target alert p99 <= {ALERT_P99_TARGET_MS} ms at {LATENCY_RATE}/s: {} (median p99 {p99:.2} ms, worst round {worst:.2} ms; {}){}",
        if p99 <= ALERT_P99_TARGET_MS && complete && reached {
            "met"
        } else {
            "NOT met"
        },
        if complete {
            "every event and alert delivered in every round"
        } else {
            "not everything delivered"
        },
        if caveats.is_empty() {
            String::new()
        } else {
            format!(": {}", caveats.join("; "))
        },
    );
    Ok(())
}
