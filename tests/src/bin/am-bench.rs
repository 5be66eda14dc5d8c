//! `am-bench`: the measuring program of `cargo xtask bench journal` and
//! `cargo xtask bench replay` (the forensic journal's benchmarks).
//!
//! ```text
//! am-bench journal|replay --agent-monitor PATH --tmpfs DIR --disk DIR [--events N] [--rounds R]
//! ```
//!
//! Every figure is printed next to a baseline measured in the same run, and their ratio;
//! nothing is asserted. What it measures, with realistic records (a two-tier agent
//! namespace and a batch namespace: full workload identity, six labels, kubelet volume
//! paths, executables):
//!
//! 1. Pipeline cost: ns per record the pipeline thread spends in each sink's `write`
//!    (the journal sink converts and hands over to a bounded queue), next to an empty sink
//!    (the loop itself) and the daemon's JSON-lines event output (to /dev/null). The
//!    journal sink is run paced (bursts of half its queue, each followed by a wait until
//!    its writer thread is idle: a node below the writer's capacity) and at full speed
//!    (the loop flat out: the queue fills and drops). Records dropped because the queue
//!    was full are counted.
//! 2. Write throughput: the storage `Writer` alone (records already converted, read back
//!    from a journal), next to raw sequential writes of the same bytes; and the journal
//!    sink end to end (conversion, queue, writer thread, fsync every sync interval) until
//!    the last record is synced, next to the `Writer` alone. On tmpfs and on a real disk.
//! 3. Disk bytes per event and per anomaly, next to the daemon's JSON line (events) and
//!    Falco line (anomalies) of the same item.
//! 4. Replay: the real `agent-monitor replay --format json` over the paced journal, with
//!    and without `--policy`, next to the storage `Reader` alone and `cat` of the segments;
//!    and once over the full-speed journal, whose drops left gaps.
//!
//! `replay` records the paced journal (unmeasured) and runs part 4 only.
//!
//! The library calls the benchmark depends on (journal, sinks, detection) are in [`am`];
//! the records are built from the internal model types in [`workload`].

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant, SystemTime},
};

use agent_monitor::{detect::Anomaly, events::Record, outputs::Sink};
use anyhow::{bail, Context as _, Result};

/// One anomaly is written every this many events, a busy node's alert rate.
const ANOMALY_EVERY: u64 = 1000;
/// Distinct records cycled through (each re-stamped with its own sequence and time).
const POOL: usize = 4096;
/// Distinct anomalies cycled through (produced by the real detection engine).
const ANOMALY_POOL: usize = 512;
/// Simulated time between two records: 1 ms (a node producing 1000 events/s).
const STEP_NS: u64 = 1_000_000;
/// Records read back for the `Writer`-alone loop.
const WRITER_POOL: usize = 65_536;
/// Events and anomalies of the small journals that measure bytes per item.
const BYTES_EVENTS: u64 = 100_000;
const BYTES_ANOMALIES: u64 = 20_000;
/// Events through the JSON-lines baseline per round, at most: it is the slowest sink and
/// its cost per record does not depend on the count.
const LINES_EVENTS: u64 = 200_000;

const USAGE: &str = "usage: am-bench journal|replay --agent-monitor PATH --tmpfs DIR --disk DIR [--events N] [--rounds R]";

struct Args {
    only_replay: bool,
    agent_monitor: PathBuf,
    tmpfs: PathBuf,
    disk: PathBuf,
    events: u64,
    rounds: usize,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let only_replay = match it.next().as_deref() {
        Some("journal") => false,
        Some("replay") => true,
        _ => bail!("{USAGE}"),
    };
    let (mut agent_monitor, mut tmpfs, mut disk) = (None, None, None);
    let (mut events, mut rounds) = (1_000_000u64, 3usize);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--agent-monitor" => agent_monitor = Some(PathBuf::from(value)),
            "--tmpfs" => tmpfs = Some(PathBuf::from(value)),
            "--disk" => disk = Some(PathBuf::from(value)),
            "--events" => events = value.parse().context("--events")?,
            "--rounds" => rounds = value.parse().context("--rounds")?,
            _ => bail!("unknown argument {flag}; {USAGE}"),
        }
    }
    Ok(Args {
        only_replay,
        agent_monitor: agent_monitor.context(USAGE)?,
        tmpfs: tmpfs.context(USAGE)?,
        disk: disk.context(USAGE)?,
        events: events.max(ANOMALY_EVERY),
        rounds: rounds.max(1),
    })
}

fn main() -> ExitCode {
    match parse_args().and_then(|a| bench(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("am-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every call into the agent-monitor library that is not building a model value: if a
/// signature changes, this is the one place to adapt.
mod am {
    use std::{
        path::{Path, PathBuf},
        sync::{Arc, RwLock},
        time::Duration,
    };

    use agent_monitor::{
        api::Origin,
        config::{Config, DEFAULT_JOURNAL_SYNC_INTERVAL_MS},
        detect::{Anomaly, Engine},
        events::Record,
        journal::{Item, JournalRecord, Options, Reader, Writer},
        outputs::{
            falco::FalcoLines,
            journal::{Journal, JournalSettings, JOURNAL_QUEUE},
            jsonl::{open_writer, EventLines, Output, Reopen},
            metrics::Metrics,
            AlertItem, EventItem, Sink,
        },
        policy::PolicySet,
    };
    use anyhow::{Context as _, Result};

    /// The daemon's default sync interval.
    pub fn sync_interval() -> Duration {
        Duration::from_millis(DEFAULT_JOURNAL_SYNC_INTERVAL_MS)
    }

    pub const QUEUE: usize = JOURNAL_QUEUE;

    /// The daemon's journal options, with room for the whole benchmark (the default cap,
    /// 1 GiB, could make retention delete segments the replay then misses).
    pub fn options() -> Options {
        Options {
            max_bytes: 64 << 30,
            ..Options::default()
        }
    }

    pub fn segment_bytes() -> u64 {
        Options::default().segment_bytes
    }

    /// The journal as the daemon opens it, with its metrics (for the dropped count).
    pub fn open_journal(dir: &Path) -> Result<(Journal, Arc<Metrics>)> {
        let metrics = Arc::new(Metrics::new());
        let journal = Journal::open(
            JournalSettings {
                dir: dir.to_owned(),
                options: options(),
                sync_interval: sync_interval(),
                // A run as the daemon starts one: a fresh run id, this node's boot id.
                origin: Origin::new_run("bench-node-1"),
                queue: JOURNAL_QUEUE,
            },
            Some(metrics.clone()),
        )
        .with_context(|| format!("opening the journal {}", dir.display()))?;
        Ok((journal, metrics))
    }

    /// Sinks for events and anomalies, as the daemon pushes them.
    pub fn journal_sinks(j: &Journal) -> (Box<dyn Sink<Record>>, Box<dyn Sink<Anomaly>>) {
        (
            Box::new(Convert::new(j.sink())),
            Box::new(Convert::new(j.sink())),
        )
    }

    /// What the pipeline does before its sinks: each item converted to its wire form
    /// once (here with a copy of the pooled item, which the pipeline gets by value).
    pub struct Convert<S> {
        origin: Origin,
        inner: S,
    }

    impl<S> Convert<S> {
        pub fn new(inner: S) -> Self {
            Self {
                origin: Origin::new_run("bench-node-1"),
                inner,
            }
        }
    }

    impl<S: Sink<EventItem>> Sink<Record> for Convert<S> {
        fn write(&mut self, r: &Record) -> std::io::Result<()> {
            self.inner.write(&self.origin.event_item(r.clone()))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }

    impl<S: Sink<AlertItem>> Sink<Anomaly> for Convert<S> {
        fn write(&mut self, a: &Anomaly) -> std::io::Result<()> {
            self.inner.write(&self.origin.alert_item(a.clone()))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }

    /// Writes the stop marker, syncs, and returns the records written to disk (markers
    /// included).
    pub fn stop_journal(j: Journal) -> Result<u64> {
        Ok(j.stop("bench done")
            .context("stopping the journal")?
            .records)
    }

    /// Records the journal sink dropped because its queue was full (or the writer was gone).
    pub fn dropped(metrics: &Metrics) -> u64 {
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix("agent_monitor_journal_dropped_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// The daemon's output file (`/dev/null` here), as `output:` opens it.
    pub fn dev_null() -> Result<Output> {
        open_writer("/dev/null").context("opening /dev/null")
    }

    /// The daemon's JSON-lines event output (proto3 JSON of each event).
    pub fn event_lines<W: std::io::Write + Reopen + 'static>(
        w: W,
    ) -> Result<Box<dyn Sink<Record>>> {
        Ok(Box::new(Convert::new(EventLines::new(w))))
    }

    /// The daemon's Falco alert output.
    pub fn falco_lines<W: std::io::Write + Reopen + 'static>(w: W) -> Box<dyn Sink<Anomaly>> {
        Box::new(FalcoLines::new(w, "bench-node-1".to_owned()))
    }

    /// Detection as the daemon (and `replay --config --policy`) sets it up.
    pub fn engine(config: &Path, policy: &Path) -> Result<Engine> {
        let c = Config::load(config).context("loading the bench config")?;
        let policies = PolicySet::load(&[policy.to_owned()]).context("loading the bench policy")?;
        Ok(Engine::new(
            agent_monitor::app::settings::detect(&c),
            Arc::new(RwLock::new(policies)),
        ))
    }

    pub fn detect(engine: &mut Engine, record: &Record) -> Vec<Anomaly> {
        let mut found = engine.process(record);
        found.extend(engine.flush());
        found
    }

    /// Up to `max` stored records of a journal, converted and ready to append.
    pub fn read_back(dir: &Path, max: usize) -> Result<Vec<JournalRecord>> {
        let mut out = Vec::new();
        for item in Reader::open(dir)? {
            if let Item::Record { record, .. } = item {
                out.push(*record);
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Reads every record of a journal: (records, damaged stretches).
    pub fn read_all(dir: &Path) -> Result<(u64, u64)> {
        let (mut records, mut damaged) = (0, 0);
        for item in Reader::open(dir)? {
            match item {
                Item::Record { record, .. } => {
                    std::hint::black_box(record);
                    records += 1;
                }
                Item::Damage(_) => damaged += 1,
            }
        }
        Ok((records, damaged))
    }

    /// The storage writer alone: appends `n` records cycling through `pool`, syncing on the
    /// daemon's interval (as the writer thread does), and closes. (records, bytes).
    pub fn write_alone(dir: &Path, pool: &[JournalRecord], n: u64) -> Result<(u64, u64)> {
        let (mut w, _) = Writer::open(dir, options())?;
        let interval = sync_interval();
        let mut next_sync = std::time::Instant::now() + interval;
        for i in 0..n {
            w.append(&pool[(i % pool.len() as u64) as usize])?;
            if i % 64 == 0 && std::time::Instant::now() >= next_sync {
                w.sync()?;
                next_sync = std::time::Instant::now() + interval;
            }
        }
        let stats = w.close()?;
        Ok((stats.records, stats.bytes))
    }

    /// Segment files of a journal directory.
    pub fn segments(dir: &Path) -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == agent_monitor::journal::SEGMENT_EXTENSION)
            })
            .collect();
        v.sort();
        Ok(v)
    }
}

/// The simulated node: pods, processes and the records they produce, built from the
/// internal model types.
mod workload {
    use std::collections::BTreeMap;

    use agent_monitor::{
        events::{ConnectRecord, ExecRecord, ExitRecord, ForkRecord, OpenRecord, Record, Task},
        identity::{
            credentials::{CredentialClass, Owner},
            Workload,
        },
    };

    pub struct Pod {
        pub workload: Workload,
        uid: String,
        /// The agent process.
        tgid: u32,
        exe: &'static str,
        comm: &'static str,
        user: u32,
        cgroup_id: u64,
        worker: bool,
    }

    /// Deterministic hex digits.
    fn hex(seed: u64, len: usize) -> String {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut s = String::with_capacity(len);
        while s.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push_str(&format!("{x:016x}"));
        }
        s.truncate(len);
        s
    }

    /// 12 pods: a proxy and eight workers in `agent-system`, three batch pods in `ml-batch`.
    pub fn pods() -> Vec<Pod> {
        let mut v = Vec::new();
        for p in 0..12u64 {
            let (ns, name, sa, tier, agent, component) = match p {
                0 => (
                    "agent-system",
                    "agent-proxy".to_owned(),
                    "agent-proxy".to_owned(),
                    Some("proxy"),
                    true,
                    "proxy",
                ),
                1..=8 => (
                    "agent-system",
                    format!("agent-worker-{p}"),
                    format!("agent-worker-{p}"),
                    Some("worker"),
                    true,
                    "worker",
                ),
                _ => (
                    "ml-batch",
                    format!("feature-pipeline-{}", p - 8),
                    "feature-pipeline".to_owned(),
                    None,
                    false,
                    "batch",
                ),
            };
            let h = hex(p + 1, 40);
            let uid = format!(
                "{}-{}-4{}-a{}-{}",
                &h[0..8],
                &h[8..12],
                &h[12..15],
                &h[15..18],
                &h[18..30]
            );
            let template = hex(p + 100, 10);
            let pod = format!("{name}-{template}-{}", &hex(p + 200, 5));
            let cid = hex(p + 300, 64);
            let mut labels = BTreeMap::new();
            labels.insert("app.kubernetes.io/name".to_owned(), name.clone());
            labels.insert(
                "app.kubernetes.io/instance".to_owned(),
                format!("{name}-prod"),
            );
            labels.insert(
                "app.kubernetes.io/component".to_owned(),
                component.to_owned(),
            );
            labels.insert(
                "app.kubernetes.io/part-of".to_owned(),
                "agent-platform".to_owned(),
            );
            labels.insert("pod-template-hash".to_owned(), template.clone());
            labels.insert(
                "agent-monitor.dev/agent".to_owned(),
                if agent {
                    name.clone()
                } else {
                    "none".to_owned()
                },
            );
            let workload = Workload {
                host: false,
                namespace: Some(ns.to_owned()),
                pod: Some(pod),
                pod_uid: Some(uid.clone()),
                container: Some(if agent { "agent" } else { "pipeline" }.to_owned()),
                container_id: Some(cid.clone()),
                service_account: Some(sa),
                agent: agent.then(|| name.clone()),
                tier: tier.map(str::to_owned),
                labels,
                cgroup: Some(format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{cid}.scope",
                    uid.replace('-', "_")
                )),
                truncated: false,
                labels_truncated: 0,
            };
            let (exe, comm) = match p {
                0 => ("/usr/local/bin/agent-proxy", "agent-proxy"),
                1..=8 => ("/usr/bin/python3.12", "python3"),
                _ => ("/opt/conda/bin/python3.11", "python"),
            };
            v.push(Pod {
                workload,
                uid,
                tgid: 4_000 + 1_000 * p as u32 + 7,
                exe,
                comm,
                user: if p == 0 { 65_532 } else { 1_000 },
                cgroup_id: 81_234 + p,
                worker: (1..=8).contains(&p),
            });
        }
        v
    }

    fn task(pod: &Pod, pid: u32, ppid: u32, exe: &str, comm: &str) -> Task {
        Task {
            time: String::with_capacity(32),
            ts_boot_ns: 0,
            pid,
            tgid: pid,
            ppid: Some(ppid),
            uid: pod.user,
            gid: pod.user,
            comm: comm.to_owned(),
            exe: Some(exe.to_owned()),
            cgroup_id: pod.cgroup_id,
            start_ns: u64::from(pid) * 1_000_000,
            workload: pod.workload.clone().into(),
        }
    }

    const TOOLS: [(&str, &str); 4] = [
        ("/usr/bin/git", "git"),
        ("/usr/bin/curl", "curl"),
        ("/bin/sh", "sh"),
        ("/usr/bin/python3.12", "python3"),
    ];

    /// Record `i` of the pool: per ten records three forks, an exec, three exits, two
    /// connects and a credential open; now and then a hostile read or connect.
    pub fn record(pods: &[Pod], i: usize) -> Record {
        let pod = &pods[(i / 10) % pods.len()];
        let other = &pods[(i / 10 + 5) % pods.len()];
        let round = i / 10;
        let child = pod.tgid + 1 + (round % 200) as u32;
        let (tool, tool_comm) = TOOLS[round % TOOLS.len()];
        match i % 10 {
            0..=2 => Record::Fork(ForkRecord {
                seq: 0,
                task: task(pod, pod.tgid, 1, pod.exe, pod.comm),
                child_pid: child,
            }),
            3 => Record::Exec(ExecRecord {
                seq: 0,
                task: task(pod, child, pod.tgid, tool, tool_comm),
                filename: tool.to_owned(),
                old_pid: child,
            }),
            4..=6 => Record::Exit(ExitRecord {
                seq: 0,
                task: task(pod, child, pod.tgid, tool, tool_comm),
            }),
            7 | 8 => {
                let hostile = pod.worker && round % 97 == 3;
                let (syscall, addr, port) = if hostile {
                    ("connect", "198.51.100.23", 443)
                } else {
                    match (i % 10 == 7, pod.worker, round % 3) {
                        (true, _, _) => ("sendto", "10.96.0.10", 53),
                        (false, true, 0) => ("connect", "10.96.14.7", 8080),
                        (false, true, _) => ("connect", "203.0.113.10", 443),
                        (false, false, _) => ("connect", "10.96.0.1", 443),
                    }
                };
                Record::Connect(ConnectRecord {
                    seq: 0,
                    task: task(pod, pod.tgid, 1, pod.exe, pod.comm),
                    syscall: syscall.into(),
                    family: "inet".into(),
                    dst_addr: addr.to_owned(),
                    dst_port: port,
                    fd: 9,
                    result: if syscall == "sendto" { 42 } else { -115 },
                    error: (syscall == "connect").then(|| "EINPROGRESS".to_owned()),
                    attempted: true,
                })
            }
            _ => {
                let kubelet = "/var/lib/kubelet/pods";
                let (reader, path, raw, class, owner) = if pod.worker && round % 89 == 5 {
                    // A shell in a worker reads another pod's token through a hostPath.
                    let path = format!(
                        "{kubelet}/{}/volumes/kubernetes.io~projected/kube-api-access-{}/token",
                        other.uid,
                        &hex(7, 5)
                    );
                    let raw = format!("/run/host{path}");
                    (
                        ("/usr/bin/cat", "cat"),
                        path,
                        raw,
                        CredentialClass::ServiceAccountToken,
                        other,
                    )
                } else if pod.worker && round.is_multiple_of(2) {
                    (
                        (pod.exe, pod.comm),
                        format!(
                            "{kubelet}/{}/volumes/kubernetes.io~secret/openai-api-key/api-key",
                            pod.uid
                        ),
                        "/etc/openai/api-key".to_owned(),
                        CredentialClass::SecretVolume,
                        pod,
                    )
                } else {
                    (
                        (pod.exe, pod.comm),
                        format!(
                            "{kubelet}/{}/volumes/kubernetes.io~projected/kube-api-access-{}/token",
                            pod.uid,
                            &hex(pod.tgid as u64, 5)
                        ),
                        "/var/run/secrets/kubernetes.io/serviceaccount/token".to_owned(),
                        CredentialClass::ServiceAccountToken,
                        pod,
                    )
                };
                let pid = if reader.1 == "cat" { child } else { pod.tgid };
                Record::Open(OpenRecord {
                    seq: 0,
                    task: task(pod, pid, pod.tgid, reader.0, reader.1),
                    syscall: "openat".into(),
                    host_path: Some(path.clone()),
                    path,
                    raw_path: raw,
                    path_resolved: true,
                    path_truncated: false,
                    matched_by: "volume".into(),
                    dirfd: -100,
                    flags: 0o2_000_000,
                    mode: 0,
                    result: 7,
                    error: None,
                    class,
                    owner: Some(Owner {
                        pod_uid: Some(owner.uid.clone()),
                        namespace: owner.workload.namespace.clone(),
                        name: owner.workload.pod.clone(),
                        pid: None,
                    }),
                    device: Some("0:312".to_owned()),
                    inode: Some(1_048_576 + i as u64),
                })
            }
        }
    }
}

/// The simulated clock: record `i` happens `i` ms after the start.
struct Clock {
    start: SystemTime,
    boot_ns: u64,
}

impl Clock {
    fn new() -> Result<Self> {
        Ok(Self {
            start: humantime::parse_rfc3339("2026-11-23T07:00:00Z")?,
            boot_ns: 86_400 * 1_000_000_000,
        })
    }

    /// Gives record `r` the sequence number and the time of record `i`, as the lanes do.
    fn stamp(&self, r: &mut Record, i: u64) {
        r.set_seq(i + 1);
        if let Some(t) = r.task_mut() {
            t.ts_boot_ns = self.boot_ns + i * STEP_NS;
            t.time.clear();
            let when = self.start + Duration::from_nanos(i * STEP_NS);
            let _ = write!(t.time, "{}", humantime::format_rfc3339_nanos(when));
        }
    }
}

/// Counts what passes to the daemon's output (here /dev/null).
struct Counted<W> {
    inner: W,
    bytes: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<W: std::io::Write> std::io::Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes.set(self.bytes.get() + n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W> agent_monitor::outputs::jsonl::Reopen for Counted<W> {
    fn reopen(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Nothing;

impl<T> Sink<T> for Nothing {
    fn write(&mut self, item: &T) -> std::io::Result<()> {
        std::hint::black_box(item);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything the runs share.
struct Bench {
    clock: Clock,
    pool: Vec<Record>,
    anomalies: Vec<Anomaly>,
    events: u64,
}

impl Bench {
    fn anomaly_count(&self, events: u64) -> u64 {
        events / ANOMALY_EVERY
    }

    /// The pipeline's loop: records `events` of the stream, one anomaly every
    /// [`ANOMALY_EVERY`], through the given sinks, then a flush. Returns the time it took.
    fn drive(
        &mut self,
        events: std::ops::Range<u64>,
        ev: &mut dyn Sink<Record>,
        al: &mut dyn Sink<Anomaly>,
    ) -> Result<Duration> {
        let started = Instant::now();
        let pool = self.pool.len() as u64;
        for i in events {
            let r = &mut self.pool[(i % pool) as usize];
            self.clock.stamp(r, i);
            ev.write(r)?;
            if i % ANOMALY_EVERY == ANOMALY_EVERY - 1 {
                let a = &self.anomalies[((i / ANOMALY_EVERY) as usize) % self.anomalies.len()];
                al.write(a)?;
            }
        }
        ev.flush()?;
        al.flush()?;
        Ok(started.elapsed())
    }

    /// Anomalies only, through the given sink.
    fn drive_anomalies(&mut self, n: u64, al: &mut dyn Sink<Anomaly>) -> Result<()> {
        for i in 0..n {
            al.write(&self.anomalies[(i as usize) % self.anomalies.len()])?;
        }
        al.flush()?;
        Ok(())
    }
}

/// One run through the journal sink.
struct JournalRun {
    /// Pipeline-side time (the loop).
    pipeline: Duration,
    /// Until the stop marker was synced.
    total: Duration,
    offered: u64,
    written: u64,
    dropped: u64,
    disk_bytes: u64,
}

/// Writes back every dirty page of the machine, so that a measurement does not pay for
/// the writeback of the one before.
fn settle() {
    // SAFETY: sync(2) has no preconditions and cannot fail.
    unsafe { libc::sync() };
}

/// Runs `events` through the journal sink into a new journal in `dir`. At full speed, the
/// pipeline loop runs flat out and what the writer thread cannot take is dropped (and
/// counted). Paced, it runs as a node below the writer's capacity would: bursts of half
/// the queue, each followed by a wait until the writer thread is idle (the journal's size
/// stops growing); `pipeline` is then the time of the bursts alone.
fn journal_run(b: &mut Bench, dir: &Path, events: u64, paced: bool) -> Result<JournalRun> {
    let _ = std::fs::remove_dir_all(dir);
    settle();
    let (journal, metrics) = am::open_journal(dir)?;
    let (mut ev, mut al) = am::journal_sinks(&journal);
    let started = Instant::now();
    let burst = if paced {
        (am::QUEUE / 2) as u64
    } else {
        events
    };
    let mut pipeline = Duration::ZERO;
    let mut i = 0;
    while i < events {
        let end = (i + burst).min(events);
        pipeline += b.drive(i..end, ev.as_mut(), al.as_mut())?;
        i = end;
        if paced {
            wait_idle(dir)?;
        }
    }
    drop((ev, al));
    let written = am::stop_journal(journal)?;
    let total = started.elapsed();
    Ok(JournalRun {
        pipeline,
        total,
        offered: events + b.anomaly_count(events),
        // Start and stop markers are not the pipeline's.
        written: written.saturating_sub(2),
        dropped: am::dropped(&metrics),
        disk_bytes: dir_bytes(dir)?,
    })
}

/// Waits until the journal's writer thread is idle: the directory's size has not changed
/// over two 1 ms polls (the writer writes out every 64 KiB, under 100 records, and it
/// appends hundreds a millisecond).
fn wait_idle(dir: &Path) -> Result<()> {
    let mut last = dir_bytes(dir)?;
    let mut still = 0;
    while still < 2 {
        std::thread::sleep(Duration::from_millis(1));
        let now = dir_bytes(dir)?;
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    Ok(())
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        total += e?.metadata()?.len();
    }
    Ok(total)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mb(bytes: f64) -> f64 {
    bytes / 1e6
}

/// Writes `bytes` in 64 KiB writes to files of `segment` bytes, fdatasync at each file's
/// end and every `interval`: the file system's own speed for what the writer does.
fn raw_write(dir: &Path, bytes: u64, segment: u64, interval: Duration) -> Result<Duration> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    settle();
    let buf = vec![0x5au8; 64 * 1024];
    let started = Instant::now();
    let mut next_sync = started + interval;
    let (mut left, mut index) = (bytes, 0u32);
    while left > 0 {
        let mut f = std::fs::File::create(dir.join(format!("{index:08}.raw")))?;
        index += 1;
        let mut in_file = 0u64;
        while left > 0 && in_file < segment {
            let n = left.min(buf.len() as u64).min(segment - in_file) as usize;
            f.write_all(&buf[..n])?;
            left -= n as u64;
            in_file += n as u64;
            if Instant::now() >= next_sync {
                f.sync_data()?;
                next_sync = Instant::now() + interval;
            }
        }
        f.sync_data()?;
    }
    Ok(started.elapsed())
}

fn write_files(work: &Path) -> Result<(PathBuf, PathBuf)> {
    let config = work.join("config.yaml");
    std::fs::write(
        &config,
        "detect:\n  api_servers: [\"10.96.0.1:443\"]\n  dns_servers: [\"10.96.0.10\"]\n  cluster_cidrs: [\"10.244.0.0/16\", \"10.96.0.0/12\"]\n",
    )?;
    let policy = work.join("agentpolicies.yaml");
    std::fs::write(
        &policy,
        r#"apiVersion: agent-monitor.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: agent-proxy
  namespace: agent-system
spec:
  selector:
    namespaces: [agent-system]
    serviceAccounts: [agent-proxy]
  tier: proxy
  credentials:
    allowed:
      - class: service_account_token
  egress:
    allow:
      - class: api-server
      - class: dns
---
apiVersion: agent-monitor.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: agent-workers
  namespace: agent-system
spec:
  selector:
    namespaces: [agent-system]
    serviceAccounts: ["agent-worker-*"]
  tier: worker
  credentials:
    allowed:
      - class: service_account_token
      - path: /etc/openai/*
    executables:
      - /usr/local/bin/agent
      - /usr/bin/python3*
  egress:
    allow:
      - class: dns
      - class: cluster
      - cidr: 203.0.113.0/24
        ports: [443]
  learningWindow: 10m
"#,
    )?;
    Ok((config, policy))
}

/// Anomalies from the real engine over the simulated stream.
fn make_anomalies(
    pool: &mut [Record],
    clock: &Clock,
    config: &Path,
    policy: &Path,
) -> Result<(Vec<Anomaly>, BTreeMap<String, u64>)> {
    let mut engine = am::engine(config, policy)?;
    let mut out = Vec::new();
    let mut rules = BTreeMap::new();
    let n = pool.len() as u64;
    for i in 0..400_000u64 {
        let r = &mut pool[(i % n) as usize];
        clock.stamp(r, i);
        for a in am::detect(&mut engine, r) {
            *rules.entry(a.rule.clone()).or_insert(0) += 1;
            out.push(a);
        }
        if out.len() >= ANOMALY_POOL {
            break;
        }
    }
    if out.is_empty() {
        bail!("the detection engine raised nothing on the simulated stream");
    }
    Ok((out, rules))
}

fn bench(args: &Args) -> Result<()> {
    let work = args.tmpfs.join("work");
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&args.disk)?;
    let (config, policy) = write_files(&work)?;
    let clock = Clock::new()?;
    let pods = workload::pods();
    let mut pool: Vec<Record> = (0..POOL).map(|i| workload::record(&pods, i)).collect();
    let (anomalies, rules) = make_anomalies(&mut pool, &clock, &config, &policy)?;
    let mut b = Bench {
        clock,
        pool,
        anomalies,
        events: args.events,
    };
    let n = b.events;
    let rounds = args.rounds;
    let anomalies_per_run = b.anomaly_count(n);
    println!(
        "journal bench: {n} events and {anomalies_per_run} anomalies per run (one every {ANOMALY_EVERY}), median of {rounds} rounds"
    );
    println!(
        "  events: per 10, 3 fork, 1 exec, 3 exit, 2 connect, 1 credential open; 12 pods in 2 namespaces, full identity and 6 labels each; {POOL} distinct records re-stamped"
    );
    println!(
        "  anomalies: {} distinct from the detection engine over the same stream ({})",
        b.anomalies.len(),
        rules
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  journal: sync every {} ms, queue {}, segments of {} MiB; tmpfs {}, disk {} ({})",
        am::sync_interval().as_millis(),
        am::QUEUE,
        am::segment_bytes() >> 20,
        args.tmpfs.display(),
        args.disk.display(),
        fs_type(&args.disk)
    );
    // The journal replayed (and whose records the Writer-alone loop appends): a paced
    // one, without drops, on tmpfs (the replay reads it from the page cache wherever it
    // is).
    let replay_dir = args.tmpfs.join("replay-journal");
    let gapped = if args.only_replay {
        eprintln!("am-bench: recording the journal to replay");
        let run = journal_run(&mut b, &replay_dir, n, true)?;
        println!(
            "  replayed journal: {} records through the journal sink, paced ({} dropped, {:.1} s)",
            run.written,
            run.dropped,
            run.total.as_secs_f64()
        );
        None
    } else {
        write_section(&mut b, args, &replay_dir)?
    };
    replay_section(args, &replay_dir, gapped.as_ref(), &config, &policy)?;
    Ok(())
}

/// A journal recorded at full speed, thinned by queue-full drops.
struct Gapped {
    dir: PathBuf,
    dropped: u64,
    offered: u64,
}

fn fs_type(path: &Path) -> String {
    // The longest mount point that is a prefix of the path.
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return "?".to_owned();
    };
    let mut best = (0, "?".to_owned());
    for line in info.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mount), Some(fstype), Some(source)) =
            (fields.get(4), fields.get(dash + 1), fields.get(dash + 2))
        else {
            continue;
        };
        if path.starts_with(mount) && mount.len() >= best.0 {
            best = (mount.len(), format!("{fstype} on {source}"));
        }
    }
    best.1
}

/// The journal-sink runs of part 1 and 2: (label, on disk, paced).
const SINK_RUNS: [(&str, bool, bool); 4] = [
    ("tmpfs, paced", false, true),
    ("disk, paced", true, true),
    ("tmpfs, full speed", false, false),
    ("disk, full speed", true, false),
];

/// Parts 1 to 3. Leaves the last paced tmpfs journal in `replay_dir`; returns the last
/// full-speed tmpfs journal when it has gaps.
fn write_section(b: &mut Bench, args: &Args, replay_dir: &Path) -> Result<Option<Gapped>> {
    let n = b.events;
    let rounds = args.rounds;
    let fss: [(&str, PathBuf); 2] = [("tmpfs", args.tmpfs.clone()), ("disk", args.disk.clone())];

    // Part 1 and the end-to-end half of part 2: every variant once per round.
    let lines_n = n.min(LINES_EVENTS);
    let mut empty = Vec::new();
    let mut lines = Vec::new();
    let mut line_bytes = (0u64, 0u64);
    let mut sink_ns: [Vec<f64>; 4] = Default::default();
    let mut e2e: [Vec<f64>; 4] = Default::default();
    let mut e2e_mbs: [Vec<f64>; 4] = Default::default();
    let mut offered_rate: [Vec<f64>; 4] = Default::default();
    let mut drops = [0u64; 4];
    let mut offered = [0u64; 4];
    let mut lost = [0i64; 4];
    let mut last_run: [Option<(u64, u64)>; 4] = Default::default();
    let mut gapped = None;
    for round in 0..rounds {
        let last = round == rounds - 1;
        let t = b.drive(0..n, &mut Nothing, &mut Nothing)?;
        empty.push(t.as_nanos() as f64 / n as f64);

        let ev_bytes = std::rc::Rc::new(std::cell::Cell::new(0));
        let al_bytes = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut ev = am::event_lines(Counted {
            inner: am::dev_null()?,
            bytes: ev_bytes.clone(),
        })?;
        let mut al = am::falco_lines(Counted {
            inner: am::dev_null()?,
            bytes: al_bytes.clone(),
        });
        let t = b.drive(0..lines_n, ev.as_mut(), al.as_mut())?;
        lines.push(t.as_nanos() as f64 / lines_n as f64);
        line_bytes = (ev_bytes.get(), al_bytes.get());

        for (k, (_, on_disk, paced)) in SINK_RUNS.iter().enumerate() {
            let base = if *on_disk { &args.disk } else { &args.tmpfs };
            let dir = base.join("journal");
            let run = journal_run(b, &dir, n, *paced)?;
            sink_ns[k].push(run.pipeline.as_nanos() as f64 / n as f64);
            e2e[k].push(run.written as f64 / run.total.as_secs_f64());
            e2e_mbs[k].push(mb(run.disk_bytes as f64) / run.total.as_secs_f64());
            offered_rate[k].push(run.offered as f64 / run.pipeline.as_secs_f64());
            drops[k] += run.dropped;
            offered[k] += run.offered;
            lost[k] += run.offered as i64 - run.written as i64 - run.dropped as i64;
            last_run[k] = Some((run.disk_bytes, run.written));
            if last && !on_disk && *paced {
                let _ = std::fs::remove_dir_all(replay_dir);
                std::fs::rename(&dir, replay_dir)?;
            } else if last && !on_disk && !paced && run.dropped > 0 {
                // Kept, to show what gaps do to a replay.
                let keep = base.join("gapped-journal");
                let _ = std::fs::remove_dir_all(&keep);
                std::fs::rename(&dir, &keep)?;
                gapped = Some(Gapped {
                    dir: keep,
                    dropped: run.dropped,
                    offered: run.offered,
                });
            } else {
                std::fs::remove_dir_all(&dir)?;
            }
        }
        eprintln!("am-bench: pipeline round {}/{rounds} done", round + 1);
    }

    // The Writer alone, and raw writes of the same bytes.
    let stored = am::read_back(replay_dir, WRITER_POOL)?;
    let mut alone: [Vec<f64>; 2] = Default::default();
    let mut alone_mbs: [Vec<f64>; 2] = Default::default();
    let mut raw_mbs: [Vec<f64>; 2] = Default::default();
    // The journal's bytes per run, for the raw writes: known after the first Writer run.
    let mut run_bytes = [0u64; 2];
    for round in 0..rounds {
        for (k, (_, base)) in fss.iter().enumerate() {
            // Alternating which goes first, so neither always follows the other's
            // deletions and writeback.
            for writer_turn in [round % 2 == 0 || run_bytes[k] == 0, round % 2 == 1] {
                if writer_turn && alone[k].len() <= round {
                    let dir = base.join("writer");
                    let _ = std::fs::remove_dir_all(&dir);
                    settle();
                    let started = Instant::now();
                    let (records, bytes) = am::write_alone(&dir, &stored, n)?;
                    let t = started.elapsed().as_secs_f64();
                    std::fs::remove_dir_all(&dir)?;
                    alone[k].push(records as f64 / t);
                    alone_mbs[k].push(mb(bytes as f64) / t);
                    run_bytes[k] = bytes;
                } else if !writer_turn && raw_mbs[k].len() <= round {
                    let raw_dir = base.join("raw");
                    let t = raw_write(
                        &raw_dir,
                        run_bytes[k],
                        am::segment_bytes(),
                        am::sync_interval(),
                    )?;
                    std::fs::remove_dir_all(&raw_dir)?;
                    raw_mbs[k].push(mb(run_bytes[k] as f64) / t.as_secs_f64());
                }
            }
        }
        eprintln!("am-bench: writer round {}/{rounds} done", round + 1);
    }

    // Bytes per item: small journals of events only and of anomalies only, divided by what
    // was written (paced: nothing is dropped).
    let dir = args.tmpfs.join("bytes-events");
    let _ = std::fs::remove_dir_all(&dir);
    let (journal, _) = am::open_journal(&dir)?;
    let (mut ev, _) = am::journal_sinks(&journal);
    for start in (0..BYTES_EVENTS).step_by(am::QUEUE / 2) {
        b.drive(
            start..(start + (am::QUEUE / 2) as u64).min(BYTES_EVENTS),
            ev.as_mut(),
            &mut Nothing,
        )?;
        wait_idle(&dir)?;
    }
    drop(ev);
    let events_written = am::stop_journal(journal)?.saturating_sub(2);
    let dir_a = args.tmpfs.join("bytes-anomalies");
    let _ = std::fs::remove_dir_all(&dir_a);
    let (journal, _) = am::open_journal(&dir_a)?;
    let (_, mut al) = am::journal_sinks(&journal);
    b.drive_anomalies(BYTES_ANOMALIES, al.as_mut())?;
    drop(al);
    let anomalies_written = am::stop_journal(journal)?.saturating_sub(2);
    let empty_journal = {
        let d = args.tmpfs.join("bytes-empty");
        let _ = std::fs::remove_dir_all(&d);
        let (journal, _) = am::open_journal(&d)?;
        am::stop_journal(journal)?;
        let bytes = dir_bytes(&d)?;
        std::fs::remove_dir_all(&d)?;
        bytes
    };
    // The empty journal (header, start and stop markers) is taken out.
    let per_anomaly =
        dir_bytes(&dir_a)?.saturating_sub(empty_journal) as f64 / anomalies_written.max(1) as f64;
    let per_event =
        dir_bytes(&dir)?.saturating_sub(empty_journal) as f64 / events_written.max(1) as f64;
    std::fs::remove_dir_all(&dir)?;
    std::fs::remove_dir_all(&dir_a)?;
    let json_per_event = line_bytes.0 as f64 / lines_n as f64;
    let falco_per_anomaly = line_bytes.1 as f64 / b.anomaly_count(lines_n).max(1) as f64;

    // Report.
    let e = median(&mut empty);
    let l = median(&mut lines);
    println!();
    println!("1. pipeline thread, ns per event in the sinks' write (anomaly writes included, 1 per {ANOMALY_EVERY}); added: minus the empty sink; ratio: added / json-lines' added");
    println!("   json-lines over {lines_n} events a round, the journal sink over {n}, its writer thread running on the other core; paced: bursts of {} records, each followed by a wait until the writer is idle (the time of the bursts only); full speed: flat out, the writer cannot keep up and the queue drops", am::QUEUE / 2);
    println!(
        "{:<46} {:>10} {:>10} {:>14} {:>14}",
        "sink", "ns/event", "added", "vs json-lines", "dropped"
    );
    println!(
        "{:<46} {:>10.0} {:>10} {:>14} {:>14}",
        "empty sink (stamping + loop)", e, "-", "-", "-"
    );
    println!(
        "{:<46} {:>10.0} {:>10.0} {:>14.3} {:>14}",
        "json-lines event + falco output, /dev/null",
        l,
        l - e,
        1.0,
        "-"
    );
    for (k, (label, _, _)) in SINK_RUNS.iter().enumerate() {
        let j = median(&mut sink_ns[k]);
        println!(
            "{:<46} {:>10.0} {:>10.0} {:>14.3} {:>13.1}%",
            format!("journal sink ({label})"),
            j,
            j - e,
            (j - e) / (l - e),
            100.0 * drops[k] as f64 / offered[k].max(1) as f64
        );
    }
    for (k, (label, _, _)) in SINK_RUNS.iter().enumerate() {
        println!(
            "  journal ({label}): offered at {:.0} records/s; dropped (queue full): {} of {} offered over {rounds} rounds; unaccounted (neither written nor dropped): {}",
            median(&mut offered_rate[k]),
            drops[k],
            offered[k],
            lost[k]
        );
    }

    println!();
    println!("2. journal write throughput");
    println!(
        "{:<38} {:>11} {:>8}   {:<30} {:>16} {:>7}",
        "measured", "records/s", "MB/s", "baseline", "baseline", "ratio"
    );
    for (k, (name, _)) in fss.iter().enumerate() {
        let a = median(&mut alone[k]);
        let am_ = median(&mut alone_mbs[k]);
        let r = median(&mut raw_mbs[k]);
        println!(
            "{:<38} {:>11.0} {:>8.1}   {:<30} {:>11.1} MB/s {:>7.3}",
            format!("Writer alone ({name})"),
            a,
            am_,
            "raw 64 KiB writes, same bytes",
            r,
            am_ / r
        );
    }
    let alone_median: Vec<f64> = alone.iter_mut().map(|v| median(v)).collect();
    for (k, (label, on_disk, _)) in SINK_RUNS.iter().enumerate() {
        let x = median(&mut e2e[k]);
        let xm = median(&mut e2e_mbs[k]);
        let fs = usize::from(*on_disk);
        let a = alone_median[fs];
        println!(
            "{:<38} {:>11.0} {:>8.1}   {:<30} {:>10.0} rec/s {:>7.3}",
            format!("sink end to end ({label})"),
            x,
            xm,
            format!("Writer alone ({})", fss[fs].0),
            a,
            x / a
        );
    }
    println!(
        "  end to end: records written / time from the first write to the stop marker synced (dropped records not counted; paced: the waits included); Writer alone: {} converted records cycled, sync every {} ms, closed (synced) at the end; raw: 64 MiB files, fdatasync at each file's end and every {} ms",
        stored.len(),
        am::sync_interval().as_millis(),
        am::sync_interval().as_millis()
    );

    println!();
    println!(
        "3. disk bytes per item (journal directory bytes, framing and segment headers included)"
    );
    println!(
        "{:<36} {:>10}   {:<36} {:>10} {:>8}",
        "measured", "bytes", "baseline", "bytes", "ratio"
    );
    println!(
        "{:<36} {:>10.1}   {:<36} {:>10.1} {:>8.3}",
        "journal, per event",
        per_event,
        "json-lines event output line",
        json_per_event,
        per_event / json_per_event
    );
    println!(
        "{:<36} {:>10.1}   {:<36} {:>10.1} {:>8.3}",
        "journal, per anomaly",
        per_anomaly,
        "falco output line",
        falco_per_anomaly,
        per_anomaly / falco_per_anomaly
    );
    for (k, (label, _, _)) in SINK_RUNS.iter().enumerate() {
        if let Some((bytes, records)) = last_run[k] {
            println!(
                "  whole run ({label}): {bytes} bytes for {records} records = {:.1} bytes/record",
                bytes as f64 / records.max(1) as f64
            );
        }
    }
    Ok(gapped)
}

/// Runs a command with stdout to /dev/null; its time and its stderr.
fn timed(cmd: &mut Command) -> Result<(Duration, String)> {
    let started = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    let t = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}: {}", out.status, err.trim());
    }
    Ok((t, err))
}

/// `... replay: N records of R runs, D damaged stretches, A alerts printed`: (N, A).
fn replay_summary(stderr: &str) -> (Option<u64>, Option<u64>) {
    let Some(line) = stderr.lines().rev().find(|l| l.contains("records of")) else {
        return (None, None);
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let before = |w: &str| {
        words
            .iter()
            .position(|x| x.trim_end_matches(',') == w)
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| words[i].parse().ok())
    };
    (before("records"), before("alerts"))
}

fn replay_section(
    args: &Args,
    dir: &Path,
    gapped: Option<&Gapped>,
    config: &Path,
    policy: &Path,
) -> Result<()> {
    let rounds = args.rounds;
    let segments = am::segments(dir)?;
    let bytes = dir_bytes(dir)?;
    // Warm the page cache and count.
    let (records, damaged) = am::read_all(dir)?;
    if damaged > 0 {
        bail!("the recorded journal has {damaged} damaged stretches");
    }
    let mut cat = Vec::new();
    let mut reader = Vec::new();
    let mut plain = Vec::new();
    let mut policy_runs = Vec::new();
    let mut gapped_runs = Vec::new();
    let gapped_records = match gapped {
        Some(g) => am::read_all(&g.dir)?.0,
        None => 0,
    };
    let mut printed = (None, None);
    let mut counted = (None, None);
    for round in 0..rounds {
        let (t, _) = timed(Command::new("cat").args(&segments))?;
        cat.push(records as f64 / t.as_secs_f64());

        let started = Instant::now();
        let (r, _) = am::read_all(dir)?;
        reader.push(r as f64 / started.elapsed().as_secs_f64());

        let (t, err) = timed(
            Command::new(&args.agent_monitor)
                .args(["replay", "--format", "json", "--journal"])
                .arg(dir),
        )?;
        plain.push(records as f64 / t.as_secs_f64());
        let (n, a) = replay_summary(&err);
        counted.0 = n;
        printed.0 = a;

        let (t, err) = timed(
            Command::new(&args.agent_monitor)
                .args(["replay", "--format", "json", "--journal"])
                .arg(dir)
                .arg("--policy")
                .arg(policy)
                .arg("--config")
                .arg(config),
        )?;
        policy_runs.push(records as f64 / t.as_secs_f64());
        let (n, a) = replay_summary(&err);
        counted.1 = n;
        printed.1 = a;

        // Once: it only shows what the gaps cost.
        if let Some(g) = gapped.filter(|_| round == rounds - 1) {
            let (t, _) = timed(
                Command::new(&args.agent_monitor)
                    .args(["replay", "--format", "json", "--journal"])
                    .arg(&g.dir),
            )?;
            gapped_runs.push(gapped_records as f64 / t.as_secs_f64());
        }
        eprintln!("am-bench: replay round {}/{rounds} done", round + 1);
    }
    let show = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
    println!();
    println!(
        "4. replay throughput: {records} records ({:.1} MB, {} segments) on {} (page cache warm), stdout to /dev/null, median of {rounds} rounds",
        mb(bytes as f64),
        segments.len(),
        fs_type(dir)
    );
    let r = median(&mut reader);
    let c = median(&mut cat);
    println!(
        "{:<52} {:>12} {:>14} {:>10}",
        "measured", "records/s", "vs Reader", "vs cat"
    );
    println!(
        "{:<52} {:>12.0} {:>14.3} {:>10.4}",
        "cat of the segments (I/O floor)",
        c,
        c / r,
        1.0
    );
    println!(
        "{:<52} {:>12.0} {:>14.3} {:>10.4}",
        "storage Reader alone, in process (decode floor)",
        r,
        1.0,
        r / c
    );
    let p = median(&mut plain);
    println!(
        "{:<52} {:>12.0} {:>14.3} {:>10.4}",
        "agent-monitor replay --format json (recorded)",
        p,
        p / r,
        p / c
    );
    let q = median(&mut policy_runs);
    println!(
        "{:<52} {:>12.0} {:>14.3} {:>10.4}",
        "agent-monitor replay --policy --format json",
        q,
        q / r,
        q / c
    );
    if let Some(g) = gapped {
        let x = median(&mut gapped_runs);
        println!(
            "{:<52} {:>12.0} {:>14.3} {:>10.4}",
            "replay --format json, journal with gaps (1 run)",
            x,
            x / r,
            x / c
        );
        println!(
            "  (that journal: {gapped_records} records, {} of {} offered dropped; replay writes one stderr note per gap)",
            g.dropped, g.offered
        );
    }
    println!(
        "  replay said: recorded: {} records, {} alerts printed; with --policy: {} records, {} alerts printed (re-detection, default rate limit); process start and policy loading included",
        show(counted.0),
        show(printed.0),
        show(counted.1),
        show(printed.1),
    );
    Ok(())
}
