//! `am-pipeline`: the measuring program of `cargo xtask bench pipeline`, the userspace
//! pipeline's events per CPU-second on a recorded stream.
//!
//! ```text
//! am-pipeline [--events N] [--rounds R]
//! ```
//!
//! The stream: records built byte for byte as the eBPF programs write them, from
//! agent-monitor-common's `#[repr(C)]` types (`ProcEvent`, `OpenEvent`, `ConnectEvent`),
//! not recorded from live probes, so the run is the same on every machine. Its node: a
//! dozen simulated pods (real cgroup2 directories named as the kubelet's systemd driver
//! names them, so the cgroup ids are the kernel's; a pods file; each pod's token volume
//! its own tmpfs under a kubelet root, so opens matched by file identity name a real
//! filesystem). Per ten records of a pod: a fork, an exec of a tool, three credential
//! opens matched by volume identity (the pod's own token), one matched by path (another
//! pod's token through a hostPath: a foreign read, an alert), three connects and a DNS
//! `sendto`, and the tool's exit.
//!
//! Each stage runs the whole stream through the library's own code and is measured in CPU
//! time of the whole process (`getrusage(RUSAGE_SELF)`: every thread that works, the
//! enricher, the output thread and the draining client alike), printed as events per
//! CPU-second next to the stage before it, so one sees where the cost is:
//!
//! 1. `decode`: ring bytes to typed records;
//! 2. `+ enrich`: [`agent_monitor::monitor::Enricher::feed`] (translation, process table,
//!    identity, pending queue, numbering), as the lane consumer runs it;
//! 3. `+ detect`: the records sent over the daemon's channel to `app::pipeline` on its
//!    own thread, with the detection engine and no sink;
//! 4. `+ JSON`: and the JSON-lines event output to /dev/null;
//! 5. `+ Falco`: and the Falco alert output to /dev/null;
//! 6. `+ hub`: and the gRPC hub, with one event client and one anomaly client subscribed
//!    and drained on a thread of their own (the hub's fan-out; the HTTP/2 framing of a
//!    remote client is not in it);
//! 7. `+ metrics`: and the metrics/status observer: the daemon's full set of sinks
//!    without a journal.
//!
//! Requires root (cgroups, tmpfs mounts). Nothing is asserted; the figures are printed.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use agent_monitor::{
    api::{pb, Origin},
    app::{pipeline, PipelineControl},
    config::{Config, PodSourceKind},
    detect::Engine,
    events::decode::decode,
    identity::{pods::PodStore, watched::kernel_dev_of_st_dev},
    monitor::{send_all, Enricher, SEND_BATCH},
    outputs::{
        falco::FalcoLines,
        fanout::{Counters, HubSink, Observer},
        grpc::{Delivery, Hub, Matcher},
        jsonl::{open_writer, EventLines},
        metrics::{Health, Metrics},
        AlertItem, EventItem, Plain, Sink,
    },
    policy::PolicySet,
};
use agent_monitor_common::{
    ConnectEvent, EventHeader, EventKind, MatchKind, OpenEvent, ProcEvent, Syscall, AT_FDCWD,
    GROUP_DEAD, OPEN_FIXED,
};
use agent_monitor_tests::sim::{pods_file, SimPod};
use anyhow::{bail, Context as _, Result};

/// The daemon's allocator (agent-monitor/src/main.rs), so the figures are the daemon's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use futures::StreamExt as _;

const USAGE: &str = "usage: am-pipeline [--events N] [--rounds R] [--stages K]";
/// Simulated pods.
const PODS: u32 = 12;
/// Records per pod and round of the stream (see the module comment).
const PER_ROUND: usize = 10;
/// Simulated time between two records (a node at 100k events/s).
const STEP_NS: u64 = 10_000;
/// Distinct children per pod before pids are reused.
const CHILDREN: u32 = 500;
/// The output channel, as the daemon sizes it.
const QUEUE: usize = agent_monitor::app::OUTPUT_QUEUE;
/// Each client's queue in the hub (the daemon's default).
const CLIENT_QUEUE: usize = 4096;

struct Args {
    events: usize,
    rounds: usize,
    /// Only the first this many stages (for profiling one of them).
    stages: usize,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        events: 400_000,
        rounds: 3,
        stages: Stage::ALL.len(),
    };
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--events" => a.events = value.parse().context("--events")?,
            "--rounds" => a.rounds = value.parse().context("--rounds")?,
            "--stages" => a.stages = value.parse().context("--stages")?,
            _ => bail!("unknown argument {flag}; {USAGE}"),
        }
    }
    a.rounds = a.rounds.max(1);
    Ok(a)
}

fn main() -> ExitCode {
    match parse_args().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("am-pipeline: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// CPU time of the whole process so far (every thread, user and system).
fn cpu_now() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The bytes of a kernel record, as the ring hands them over.
fn bytes<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: T is a repr(C) plain-old-data record of agent-monitor-common.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

fn zeroed<T: Copy>() -> T {
    // SAFETY: only used for agent-monitor-common's records, whose fields are integers and
    // byte arrays: all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

fn put(buf: &mut [u8], s: &[u8]) -> u16 {
    let n = s.len().min(buf.len());
    buf[..n].copy_from_slice(&s[..n]);
    n as u16
}

/// One simulated pod as the stream needs it.
struct Pod {
    sim: SimPod,
    /// The agent process.
    tgid: u32,
    /// Its token volume's filesystem (kernel encoding).
    dev: u32,
}

struct Node {
    pods: Vec<Pod>,
    kubelet: PathBuf,
    pods_file: PathBuf,
    _scratch: Scratch,
}

/// Removes the scratch directory when dropped (after the pods unmounted their volumes).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn node() -> Result<Node> {
    let scratch = Scratch(PathBuf::from(format!(
        "/dev/shm/am-pipeline-{}",
        std::process::id()
    )));
    let kubelet = scratch.0.join("kubelet");
    std::fs::create_dir_all(&kubelet)?;
    let top = format!("am-pipeline-{}", std::process::id());
    let mut pods = Vec::new();
    for p in 0..PODS {
        let name = format!("agent-worker-{}", (b'a' + p as u8) as char);
        let sim = SimPod::new(&top, 0x5150_0000 + p, &name, &name);
        let vol = sim.kubelet_volume(&kubelet);
        let dev = kernel_dev_of_st_dev(std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(
            &vol,
        )?));
        pods.push(Pod {
            sim,
            tgid: 100_000 + 1_000 * p,
            dev,
        });
    }
    let pods_path = scratch.0.join("pods.json");
    let json: Vec<String> = pods.iter().map(|p| p.sim.json(None)).collect();
    pods_file(&pods_path, &json);
    Ok(Node {
        pods,
        kubelet,
        pods_file: pods_path,
        _scratch: scratch,
    })
}

fn header(kind: EventKind, i: usize, pid: u32, tgid: u32, pod: &Pod, comm: &[u8]) -> EventHeader {
    let mut h: EventHeader = zeroed();
    h.kind = kind as u16;
    h.ts_ns = 86_400_000_000_000 + i as u64 * STEP_NS;
    h.pid = pid;
    h.tgid = tgid;
    h.uid = 1000;
    h.gid = 1000;
    h.cgroup_id = pod.sim.cgroup.id;
    put(&mut h.comm, comm);
    h.start_ns = u64::from(tgid) * 1_000;
    h
}

fn proc_event(h: EventHeader, child: u32, file: &str) -> Vec<u8> {
    let mut e: ProcEvent = zeroed();
    e.header = h;
    e.child_pid = child;
    e.group_dead = GROUP_DEAD;
    e.filename_len = put(&mut e.filename, file.as_bytes());
    bytes(&e)
}

/// An open matched by the file's identity (the pod's token volume), or by path.
fn open_event(h: EventHeader, pod: &Pod, path: &str, by_volume: bool, ino: u64) -> Vec<u8> {
    let mut e: OpenEvent = zeroed();
    e.header = h;
    e.ret = 7;
    e.syscall = Syscall::Openat as u16;
    e.flags = 0o2_000_000;
    e.dirfd = AT_FDCWD;
    e.path_len = put(&mut e.path, path.as_bytes());
    if by_volume {
        e.matched = MatchKind::Volume as u8;
        e.dev = pod.dev;
        e.ino = ino;
        let vol = &pod.sim.token_volume;
        let names = format!("token\0..2026_11_23_07_00_00.000000001\0{vol}\0");
        e.dpath_len = put(&mut e.dpath, names.as_bytes());
        e.depth = 3;
    } else {
        e.matched = MatchKind::Prefix as u8;
    }
    // The ring form: the fixed part, then the path, then the names (as the kernel writes).
    let mut v = bytes(&e);
    v.truncate(OPEN_FIXED);
    v.extend_from_slice(&e.path[..usize::from(e.path_len)]);
    v.extend_from_slice(&e.dpath[..usize::from(e.dpath_len)]);
    v
}

fn connect_event(h: EventHeader, syscall: Syscall, addr: [u8; 4], port: u16, ret: i64) -> Vec<u8> {
    let mut e: ConnectEvent = zeroed();
    e.header = h;
    e.ret = ret;
    e.args.ts_ns = h.ts_ns;
    e.args.addr[..4].copy_from_slice(&addr);
    e.args.fd = 9;
    e.args.family = libc::AF_INET as u16;
    e.args.port = port;
    e.args.syscall = syscall as u16;
    bytes(&e)
}

const TOOLS: [(&str, &[u8]); 3] = [
    ("/usr/bin/git", b"git"),
    ("/usr/bin/curl", b"curl"),
    ("/usr/bin/cat", b"cat"),
];

/// The recorded stream: the agents' execs, then `n` records, in kernel time order.
fn stream(node: &Node, n: usize) -> Vec<Vec<u8>> {
    let token = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    let pods = &node.pods;
    // First each agent's own exec, as the process table knows a running process (the
    // daemon seeds it from /proc at start).
    let execs = pods.iter().map(|pod| {
        proc_event(
            header(EventKind::Exec, 0, pod.tgid, pod.tgid, pod, b"python3"),
            pod.tgid,
            "/usr/bin/python3.12",
        )
    });
    execs
        .chain((0..n).map(|i| {
            let block = i / PER_ROUND;
            let pod = &pods[block % pods.len()];
            let round = block / pods.len();
            let child = pod.tgid + 1 + (round as u32 % CHILDREN);
            let (tool, comm) = TOOLS[round % TOOLS.len()];
            let agent = |kind| header(kind, i, pod.tgid, pod.tgid, pod, b"python3");
            let tool_h = |kind| header(kind, i, child, child, pod, comm);
            match i % PER_ROUND {
                0 => proc_event(agent(EventKind::Fork), child, ""),
                1 => proc_event(tool_h(EventKind::Exec), child, tool),
                2 | 4 => open_event(
                    agent(EventKind::Open),
                    pod,
                    token,
                    true,
                    1_000 + round as u64,
                ),
                3 => open_event(tool_h(EventKind::Open), pod, token, true, 1_000),
                5 => {
                    // The tool reads another pod's token through the host's kubelet root.
                    let other = &pods[(block + 5) % pods.len()];
                    let path = node.kubelet.join(format!(
                        "pods/{}/volumes/kubernetes.io~projected/{}/token",
                        other.sim.uid, other.sim.token_volume
                    ));
                    open_event(
                        tool_h(EventKind::Open),
                        pod,
                        &path.to_string_lossy(),
                        false,
                        0,
                    )
                }
                6 => connect_event(
                    agent(EventKind::Connect),
                    Syscall::Sendto,
                    [10, 96, 0, 10],
                    53,
                    42,
                ),
                7 => connect_event(
                    agent(EventKind::Connect),
                    Syscall::Connect,
                    [10, 96, 0, 1],
                    443,
                    -i64::from(libc::EINPROGRESS),
                ),
                8 => connect_event(
                    tool_h(EventKind::Connect),
                    Syscall::Connect,
                    [203, 0, 113, 10],
                    443,
                    -i64::from(libc::EINPROGRESS),
                ),
                _ => proc_event(tool_h(EventKind::Exit), 0, ""),
            }
        }))
        .collect()
}

fn config(node: &Node) -> Config {
    let mut c = Config::default();
    c.identity.kubelet_root = node.kubelet.to_string_lossy().into_owned();
    c.identity.pods.source = PodSourceKind::File;
    c.identity.pods.file = Some(node.pods_file.clone());
    c
}

fn enricher(node: &Node, config: &Config) -> Result<Enricher> {
    let pods = Arc::new(PodStore::default());
    pods.replace_all(
        agent_monitor::identity::pods::file::load(&node.pods_file).context("pods file")?,
    );
    let root = agent_monitor::identity::cgroup::cgroup2_root(None)?;
    let mut e = Enricher::new(&agent_monitor::app::settings::monitor(config), pods, root);
    e.sync_volumes();
    Ok(e)
}

/// What one stage produced.
struct Run {
    cpu: Duration,
    wall: Duration,
    records: u64,
    alerts: u64,
}

/// Which sinks the pipeline gets.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Stage {
    Decode,
    Enrich,
    Detect,
    Json,
    Falco,
    Hub,
    Metrics,
}

impl Stage {
    const ALL: [Stage; 7] = [
        Stage::Decode,
        Stage::Enrich,
        Stage::Detect,
        Stage::Json,
        Stage::Falco,
        Stage::Hub,
        Stage::Metrics,
    ];

    fn name(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Enrich => "+ enrich",
            Stage::Detect => "+ detect (channel, output thread)",
            Stage::Json => "+ JSON-lines events (/dev/null)",
            Stage::Falco => "+ Falco alerts (/dev/null)",
            Stage::Hub => "+ gRPC hub, 2 clients draining",
            Stage::Metrics => "+ metrics observer (all sinks)",
        }
    }
}

/// Counts alerts on their way to the other sinks.
struct CountAlerts(Arc<std::sync::atomic::AtomicU64>);

impl Sink<AlertItem> for CountAlerts {
    fn write(&mut self, _: &AlertItem) -> std::io::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn run_stage(stage: Stage, node: &Node, config: &Config, records: &[Vec<u8>]) -> Result<Run> {
    let mut enricher = enricher(node, config)?;
    let started = (Instant::now(), cpu_now());
    let mut ready = Vec::with_capacity(4);
    let mut out = 0u64;
    match stage {
        Stage::Decode => {
            for r in records {
                std::hint::black_box(decode(r).ok());
                out += 1;
            }
            return Ok(Run {
                cpu: cpu_now() - started.1,
                wall: started.0.elapsed(),
                records: out,
                alerts: 0,
            });
        }
        Stage::Enrich => {
            let now = Instant::now();
            for r in records {
                enricher.feed(r, now, &mut ready);
                out += ready.len() as u64;
                std::hint::black_box(&ready);
                ready.clear();
            }
            enricher.finish(&mut ready);
            out += ready.len() as u64;
            return Ok(Run {
                cpu: cpu_now() - started.1,
                wall: started.0.elapsed(),
                records: out,
                alerts: 0,
            });
        }
        _ => {}
    }
    let origin = Origin::new_run("bench-node-1");
    let alerts_seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut events: Vec<Box<dyn Sink<EventItem> + Send>> = Vec::new();
    let mut alerts: Vec<Box<dyn Sink<AlertItem> + Send>> =
        vec![Box::new(CountAlerts(alerts_seen.clone()))];
    if stage >= Stage::Json {
        events.push(Box::new(EventLines::new(open_writer("/dev/null")?)));
    }
    if stage >= Stage::Falco {
        alerts.push(Box::new(Plain(FalcoLines::new(
            open_writer("/dev/null")?,
            "bench-node-1".to_owned(),
        ))));
    }
    let mut clients = None;
    if stage >= Stage::Hub {
        let hub = Hub::new(CLIENT_QUEUE, origin.clone());
        let ev = hub.subscribe_events(Matcher::new(None).map_err(anyhow::Error::msg)?);
        let an = hub.subscribe_anomalies(Matcher::new(None).map_err(anyhow::Error::msg)?);
        events.push(Box::new(HubSink::<EventItem>::new(hub.clone())));
        alerts.push(Box::new(HubSink::<pb::Anomaly>::new(hub.clone())));
        clients = Some((hub, spawn_clients(ev, an)));
    }
    if stage >= Stage::Metrics {
        let (metrics, health) = (
            Arc::new(Metrics::new()),
            Arc::new(Health::new(Duration::from_secs(10))),
        );
        let counters = Arc::new(Mutex::new(Counters::default()));
        events.push(Box::new(Observer::new(
            metrics.clone(),
            health.clone(),
            counters.clone(),
        )));
        alerts.push(Box::new(Observer::new(metrics, health, counters)));
    }
    let c = config.clone();
    let engine = Engine::new(
        agent_monitor::app::settings::detect(&c),
        Arc::new(RwLock::new(PolicySet::default())),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
    let output = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(pipeline(
                rx,
                events,
                alerts,
                engine,
                PipelineControl {
                    origin,
                    ..PipelineControl::default()
                },
            ))
    });
    // The lane consumer runs on the daemon's runtime; here on one of its own.
    let consumer = tokio::runtime::Builder::new_current_thread().build()?;
    let now = Instant::now();
    for r in records {
        enricher.feed(r, now, &mut ready);
        // Handed over in batches, with the lane consumer's own send.
        if ready.len() >= SEND_BATCH {
            out += ready.len() as u64;
            if !consumer.block_on(send_all(&mut ready, &tx)) {
                bail!("output thread gone");
            }
        }
    }
    enricher.finish(&mut ready);
    out += ready.len() as u64;
    if !consumer.block_on(send_all(&mut ready, &tx)) {
        bail!("output thread gone");
    }
    drop(tx);
    output
        .join()
        .map_err(|_| anyhow::anyhow!("output thread panicked"))??;
    if let Some((hub, drained)) = clients {
        hub.shut_down();
        let (events, anomalies) = drained
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        if events + anomalies == 0 {
            bail!("the hub's clients received nothing");
        }
    }
    Ok(Run {
        cpu: cpu_now() - started.1,
        wall: started.0.elapsed(),
        records: out,
        alerts: alerts_seen.load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// Drains both subscriptions until the hub shuts down; returns the items received.
fn spawn_clients(
    mut events: agent_monitor::outputs::grpc::Subscription<agent_monitor::outputs::EventItem>,
    mut anomalies: agent_monitor::outputs::grpc::Subscription<pb::Anomaly>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
            return (0, 0);
        };
        rt.block_on(async move {
            let (mut e, mut a) = (0u64, 0u64);
            let (mut e_open, mut a_open) = (true, true);
            while e_open || a_open {
                tokio::select! {
                    d = events.next(), if e_open => match d {
                        Some(Delivery::Item(i)) => { std::hint::black_box(i); e += 1 }
                        Some(Delivery::Gap(_)) => {}
                        None => e_open = false,
                    },
                    d = anomalies.next(), if a_open => match d {
                        Some(Delivery::Item(i)) => { std::hint::black_box(i); a += 1 }
                        Some(Delivery::Gap(_)) => {}
                        None => a_open = false,
                    },
                }
            }
            (e, a)
        })
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(a: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root: it creates cgroups and mounts the pods' volumes");
    }
    let node = node()?;
    let config = config(&node);
    let records = stream(&node, a.events);
    println!(
        "# pipeline: {} recorded kernel records ({} pods), {} rounds, median of rounds; CPU time of every thread (getrusage)",
        records.len(),
        node.pods.len(),
        a.rounds
    );
    println!(
        "{:<40} {:>14} {:>10} {:>12} {:>10} {:>8}",
        "stage", "events/CPU-s", "ns/event", "events/s wall", "records", "alerts"
    );
    let mut previous: Option<f64> = None;
    let mut first = None;
    for stage in Stage::ALL.into_iter().take(a.stages) {
        let mut rates = Vec::new();
        let mut walls = Vec::new();
        let mut last = None;
        for _ in 0..a.rounds {
            let r = run_stage(stage, &node, &config, &records)?;
            rates.push(records.len() as f64 / r.cpu.as_secs_f64().max(1e-9));
            walls.push(records.len() as f64 / r.wall.as_secs_f64().max(1e-9));
            last = Some(r);
        }
        let rate = median(rates);
        let last = last.context("no round ran")?;
        println!(
            "{:<40} {:>14.0} {:>10.0} {:>12.0} {:>10} {:>8}",
            stage.name(),
            rate,
            1e9 / rate,
            median(walls),
            last.records,
            last.alerts
        );
        if let Some(p) = previous {
            println!(
                "{:<40} {:>+10.0} ns/event over the stage before",
                "",
                1e9 / rate - 1e9 / p
            );
        }
        first.get_or_insert(rate);
        previous = Some(rate);
    }
    if let (Some(base), Some(full)) = (first, previous) {
        println!(
            "whole pipeline: {full:.0} events per CPU-second ({:.1}x the cost of decode alone); target 300000",
            base / full
        );
    }
    Ok(())
}
