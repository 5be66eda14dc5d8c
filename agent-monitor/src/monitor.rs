//! The lane consumer: reads the three ring buffers, decodes, enriches with the process
//! table, and hands [`Record`]s down the pipe. Losses are turned into `lost` records.
//!
//! One task reads all lanes. Before each credential or network record it drains the
//! process lane, so an exec or fork that happened before an open is always applied first
//! (a record is committed to its ring before the next syscall of that thread starts).

use std::{
    collections::{BTreeSet, VecDeque},
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use agent_monitor_common::{
    path_flags, EventHeader, EventKind, Lane, Syscall, GROUP_ALIVE, GROUP_UNKNOWN, LANE_COUNT,
};
use aya::maps::{MapData, RingBuf};
use log::{info, warn};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    config::Config,
    events::{
        decode::{c_string, decode, RawEvent},
        errno, ConnectRecord, ExecRecord, ExitRecord, ForkRecord, LostRecord, OpenRecord, Record,
        Task, LANE_NAMES,
    },
    identity::{
        credentials::CredentialClass,
        pods::PodStore,
        process::{ProcessTable, DEFAULT_CAPACITY},
        Identity,
    },
    probes::{ProbeError, Probes, Rings},
};

/// How often dead processes are pruned from the process table.
const PRUNE_INTERVAL: Duration = Duration::from_secs(30);

/// The monitor could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// Loading or reading the probes failed.
    #[error(transparent)]
    Probes(#[from] ProbeError),
    /// A ring buffer could not be registered with the async runtime.
    #[error("registering ring buffer {lane} with the runtime: {source}")]
    Register {
        lane: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The consumer task panicked or was cancelled.
    #[error("the lane consumer task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Converts kernel CLOCK_BOOTTIME stamps to wall-clock time.
#[derive(Clone, Copy)]
struct Clock {
    /// CLOCK_REALTIME - CLOCK_BOOTTIME, in nanoseconds, when the daemon started.
    offset_ns: i128,
}

pub(crate) fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; both clocks exist on every Linux we support.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl Clock {
    fn new() -> Self {
        Self {
            offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_BOOTTIME),
        }
    }

    fn wall(&self, boot_ns: u64) -> SystemTime {
        let ns = (i128::from(boot_ns) + self.offset_ns).max(0);
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }

    fn rfc3339(&self, boot_ns: u64) -> String {
        humantime::format_rfc3339_nanos(self.wall(boot_ns)).to_string()
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// A record waiting for its pod's metadata.
struct Pending {
    record: Record,
    deadline: Instant,
}

/// Enrichment state: owned by the consumer task alone.
struct Enricher {
    table: ProcessTable,
    identity: Identity,
    clock: Clock,
    seq: u64,
    lost_reported: [u64; LANE_COUNT as usize],
    decode_errors: u64,
    pending: VecDeque<Pending>,
    max_wait: Duration,
    max_pending: usize,
    /// Volume prefixes added to the kernel filter from pod specs.
    learned_prefixes: BTreeSet<String>,
    /// Processes, cgroups and pods known, for status and metrics.
    cache_size: Arc<std::sync::atomic::AtomicU64>,
    configured_prefixes: Vec<String>,
}

impl Enricher {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Fills in the workload (and, for opens, the credential class and owner). Returns
    /// false while the pod may still become known.
    fn attribute(&mut self, record: &mut Record) -> bool {
        let Some(task) = record.task_mut() else {
            return true;
        };
        let attribution = self.identity.attribute(task.cgroup_id);
        task.workload = attribution.workload.clone();
        if let Record::Open(open) = record {
            let (class, owner) = self.identity.credential(&open.path, &attribution);
            open.class = class;
            open.owner = owner;
        }
        !attribution.incomplete
    }

    /// Attributes a record and sends it, or parks it until its pod is known. Records of a
    /// pod that is already waiting wait behind it, so one pod's records stay in order.
    async fn emit(&mut self, mut record: Record, out: &mpsc::Sender<Record>) -> bool {
        let complete = self.attribute(&mut record);
        let uid = record.task().and_then(|t| t.workload.pod_uid.clone());
        let behind_waiting = uid.is_some()
            && self
                .pending
                .iter()
                .any(|p| p.record.task().and_then(|t| t.workload.pod_uid.as_ref()) == uid.as_ref());
        if complete && !behind_waiting {
            return self.send(record, out).await;
        }
        if self.pending.len() >= self.max_pending {
            if let Some(oldest) = self.pending.pop_front() {
                warn!(
                    "pending queue full ({}): a record leaves without its pod",
                    self.max_pending
                );
                if !self.send(oldest.record, out).await {
                    return false;
                }
            }
        }
        self.pending.push_back(Pending {
            record,
            deadline: Instant::now() + self.max_wait,
        });
        true
    }

    /// Sends parked records whose pod became known or whose wait is over, in order.
    async fn release_pending(&mut self, out: &mpsc::Sender<Record>) -> bool {
        let now = Instant::now();
        let mut keep = VecDeque::with_capacity(self.pending.len());
        let mut blocked: BTreeSet<String> = BTreeSet::new();
        while let Some(mut p) = self.pending.pop_front() {
            let complete = self.attribute(&mut p.record);
            let uid = p.record.task().and_then(|t| t.workload.pod_uid.clone());
            let is_blocked = uid.as_ref().is_some_and(|u| blocked.contains(u));
            if (complete || now >= p.deadline) && !is_blocked {
                if !self.send(p.record, out).await {
                    return false;
                }
            } else {
                if let Some(u) = uid {
                    blocked.insert(u);
                }
                keep.push_back(p);
            }
        }
        self.pending = keep;
        true
    }

    async fn send(&mut self, mut record: Record, out: &mpsc::Sender<Record>) -> bool {
        record.set_seq(self.next_seq());
        out.send(record).await.is_ok()
    }

    /// Adds the Secret and projected volume mount paths of known pods to the kernel's
    /// watched prefixes, and removes those of pods that are gone.
    fn sync_volume_prefixes(&mut self, probes: &mut Probes) {
        let wanted: BTreeSet<String> = self
            .identity
            .custom_volume_prefixes()
            .into_iter()
            .filter(|p| {
                !self
                    .configured_prefixes
                    .iter()
                    .any(|c| p.starts_with(c.as_str()))
            })
            .filter(|p| p.len() < agent_monitor_common::PATH_CAP)
            .collect();
        for gone in self.learned_prefixes.difference(&wanted) {
            if let Err(e) = probes.unwatch_prefix(gone) {
                warn!("removing learned prefix {gone}: {e}");
            }
        }
        for new in wanted.difference(&self.learned_prefixes) {
            match probes.watch_prefix(new) {
                Ok(()) => info!("watching volume mount path {new} learned from a pod spec"),
                Err(e) => warn!("adding learned prefix {new}: {e}"),
            }
        }
        self.learned_prefixes = wanted;
    }

    fn task(&mut self, h: &EventHeader) -> Task {
        let info = self.table.get(h.tgid);
        Task {
            time: self.clock.rfc3339(h.ts_ns),
            ts_boot_ns: h.ts_ns,
            pid: h.pid,
            tgid: h.tgid,
            ppid: info.ppid,
            uid: h.uid,
            gid: h.gid,
            comm: c_string(&h.comm, h.comm.len()),
            exe: info.exe,
            cgroup_id: h.cgroup_id,
            workload: Default::default(),
        }
    }

    /// Turns a kernel record into an output record, updating the process table.
    fn enrich(&mut self, raw: RawEvent) -> Option<Record> {
        match raw {
            RawEvent::Open(ev) => {
                let a = &ev.args;
                let raw_path = c_string(&a.path.data, usize::from(a.path_len));
                let relative = a.path_flags & path_flags::RELATIVE != 0;
                let resolved = if relative {
                    self.table
                        .resolve_relative(ev.header.tgid, ev.header.pid, a.dirfd, &raw_path)
                } else {
                    Some(raw_path.clone())
                };
                let matched_by = if relative {
                    "basename"
                } else if a.path_flags & path_flags::PROC_ENVIRON != 0 {
                    "proc_environ"
                } else {
                    "prefix"
                };
                Some(Record::Open(OpenRecord {
                    seq: 0,
                    task: self.task(&ev.header),
                    syscall: Syscall::from_u16(a.syscall)
                        .map_or("open", Syscall::name)
                        .to_owned(),
                    path_resolved: resolved.is_some(),
                    path: resolved.unwrap_or_else(|| raw_path.clone()),
                    raw_path,
                    path_truncated: a.path_flags & path_flags::TRUNCATED != 0,
                    matched_by: matched_by.to_owned(),
                    dirfd: a.dirfd,
                    flags: a.flags,
                    mode: a.mode,
                    result: ev.ret,
                    error: errno::of_result(ev.ret),
                    class: CredentialClass::Other,
                    owner: None,
                }))
            }
            RawEvent::Connect(ev) => {
                let a = &ev.args;
                let (family, addr) = if a.family == libc::AF_INET as u16 {
                    let v4 = Ipv4Addr::new(a.addr[0], a.addr[1], a.addr[2], a.addr[3]);
                    ("inet", v4.to_string())
                } else {
                    ("inet6", Ipv6Addr::from(a.addr).to_string())
                };
                Some(Record::Connect(ConnectRecord {
                    seq: 0,
                    task: self.task(&ev.header),
                    syscall: Syscall::from_u16(a.syscall)
                        .map_or("connect", Syscall::name)
                        .to_owned(),
                    family: family.to_owned(),
                    dst_addr: addr,
                    dst_port: a.port,
                    fd: a.fd,
                    result: ev.ret,
                    error: errno::of_result(ev.ret),
                    attempted: attempted(ev.ret),
                }))
            }
            RawEvent::Proc(ev) => {
                let h = &ev.header;
                match EventKind::from_u16(h.kind) {
                    Some(EventKind::Exec) => {
                        let filename = c_string(&ev.filename, usize::from(ev.filename_len));
                        self.table.on_exec(h.tgid, &filename);
                        Some(Record::Exec(ExecRecord {
                            seq: 0,
                            task: self.task(h),
                            filename,
                            old_pid: ev.child_pid,
                        }))
                    }
                    Some(EventKind::Fork) => {
                        self.table.on_fork(h.tgid, ev.child_pid);
                        Some(Record::Fork(ForkRecord {
                            seq: 0,
                            task: self.task(h),
                            child_pid: ev.child_pid,
                        }))
                    }
                    Some(EventKind::Exit) => {
                        // Without group_dead (older kernels) only a leader's exit ends a process.
                        if ev.group_dead == GROUP_ALIVE
                            || (ev.group_dead == GROUP_UNKNOWN && h.pid != h.tgid)
                        {
                            return None;
                        }
                        let rec = Record::Exit(ExitRecord {
                            seq: 0,
                            task: self.task(h),
                        });
                        self.table.on_exit(h.tgid);
                        Some(rec)
                    }
                    _ => None,
                }
            }
        }
    }
}

/// Whether a connect or send reached the network: it succeeded, is in progress on a
/// non-blocking socket, or failed only after packets left (refused, reset, timed out,
/// unreachable host). Local failures (bad address, permission) are not attempts.
fn attempted(ret: i64) -> bool {
    ret >= 0
        || [
            libc::EINPROGRESS,
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
        ]
        .iter()
        .any(|e| ret == -i64::from(*e))
}

/// Lane rings registered with the runtime.
struct LaneFds {
    credential: AsyncFd<RingBuf<MapData>>,
    network: AsyncFd<RingBuf<MapData>>,
    process: AsyncFd<RingBuf<MapData>>,
}

fn register(
    ring: RingBuf<MapData>,
    lane: &'static str,
) -> Result<AsyncFd<RingBuf<MapData>>, MonitorError> {
    // SAFETY: the ring owns its map fd, which stays open and unchanged for as long as the
    // AsyncFd owns the ring.
    unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
        MonitorError::Register {
            lane,
            source: e.into_parts().1,
        }
    })
}

/// Decodes the next record of a ring, skipping (and counting) records that do not decode.
fn next_raw(ring: &mut RingBuf<MapData>, errors: &mut u64) -> Option<RawEvent> {
    loop {
        let item = ring.next()?;
        match decode(&item) {
            Ok(raw) => return Some(raw),
            Err(e) => {
                *errors += 1;
                warn!("undecodable ring record skipped: {e}");
            }
        }
    }
}

/// A running lane consumer. Dropping it without [`Monitor::stop`] detaches the probes
/// when the task ends.
pub struct Monitor {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), MonitorError>>,
    attached: Vec<String>,
    identity_cache_size: Arc<std::sync::atomic::AtomicU64>,
}

impl Monitor {
    /// Loads and attaches the probes and starts consuming their lanes into `out`. Must be
    /// called inside a tokio runtime. The daemon's own process is never reported.
    pub fn start(
        config: &Config,
        pods: Arc<PodStore>,
        out: mpsc::Sender<Record>,
    ) -> Result<Self, MonitorError> {
        let mut probes = Probes::load(config, std::process::id())?;
        let attached = probes.attached().to_vec();
        let Rings {
            credential,
            network,
            process,
        } = probes.take_rings()?;
        let fds = LaneFds {
            credential: register(credential, LANE_NAMES[Lane::Credential as usize])?,
            network: register(network, LANE_NAMES[Lane::Network as usize])?,
            process: register(process, LANE_NAMES[Lane::Process as usize])?,
        };
        if config.kernel_log {
            match probes.take_logger() {
                Ok(logger) => spawn_kernel_logger(logger),
                Err(e) => warn!("kernel log requested but unavailable: {e}"),
            }
        }
        let mut table = ProcessTable::new(DEFAULT_CAPACITY);
        let seeded = table.seed();
        info!("process table seeded with {seeded} processes");
        let has_pod_source = config.identity.pods.source != crate::config::PodSourceKind::None;
        let enricher = Enricher {
            table,
            identity: Identity::new(config.identity.clone(), pods, has_pod_source),
            clock: Clock::new(),
            seq: 0,
            lost_reported: [0; LANE_COUNT as usize],
            decode_errors: 0,
            pending: VecDeque::new(),
            max_wait: Duration::from_millis(config.identity.pending.max_wait_ms),
            max_pending: config.identity.pending.max_events,
            learned_prefixes: BTreeSet::new(),
            configured_prefixes: config.effective_prefixes(),
            cache_size: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        };
        let identity_cache_size = enricher.cache_size.clone();
        let (stop, stop_rx) = watch::channel(false);
        let poll = Duration::from_millis(config.poll_interval_ms);
        let task = tokio::spawn(consume(probes, fds, enricher, out, stop_rx, poll));
        Ok(Self {
            stop,
            task,
            attached,
            identity_cache_size,
        })
    }

    /// The tracepoints attached.
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// Entries in the identity caches (processes, cgroups, pods), updated as records flow.
    pub fn identity_cache_size(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.identity_cache_size.clone()
    }

    /// Stops consuming after a last drain of every lane (so nothing already in a ring is
    /// lost), detaches the probes and closes the output channel.
    pub async fn stop(self) -> Result<(), MonitorError> {
        // A send error means the task already ended; its result says why.
        let _ = self.stop.send(true);
        self.task.await?
    }
}

fn spawn_kernel_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring fd for as long as the AsyncFd owns the logger.
    match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(mut fd) => {
            tokio::spawn(async move {
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        break;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => warn!("kernel log unavailable: {}", e.into_parts().1),
    }
}

async fn consume(
    mut probes: Probes,
    mut fds: LaneFds,
    mut st: Enricher,
    out: mpsc::Sender<Record>,
    mut stop: watch::Receiver<bool>,
    poll: Duration,
) -> Result<(), MonitorError> {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut prune = tokio::time::interval(PRUNE_INTERVAL);
    let mut pods_changed = st.identity.pods().changed();
    st.sync_volume_prefixes(&mut probes);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = prune.tick() => {
                st.table.prune();
                false
            }
            r = pods_changed.changed() => {
                if r.is_ok() {
                    st.sync_volume_prefixes(&mut probes);
                }
                false
            }
            r = fds.process.readable_mut() => { if let Ok(mut g) = r { g.clear_ready(); } false }
            r = fds.credential.readable_mut() => { if let Ok(mut g) = r { g.clear_ready(); } false }
            r = fds.network.readable_mut() => { if let Ok(mut g) = r { g.clear_ready(); } false }
            _ = stop.changed() => true,
        };
        let size = st.table.len() + st.identity.cgroup_cache_len() + st.identity.pods().len();
        st.cache_size
            .store(size as u64, std::sync::atomic::Ordering::Relaxed);
        if !drain(&mut fds, &mut st, &out).await
            || !report_drops(&probes, &mut st, &out).await
            || !st.release_pending(&out).await
        {
            info!("output closed; lane consumer stopping");
            return Ok(());
        }
        if stopping {
            // Nothing more will arrive: what still waits for its pod leaves as it is.
            for p in std::mem::take(&mut st.pending) {
                if !st.send(p.record, &out).await {
                    break;
                }
            }
            info!(
                "lane consumer stopped after {} records ({} undecodable)",
                st.seq, st.decode_errors
            );
            return Ok(());
        }
    }
}

/// Drains every lane, the process lane before each record of the others. Returns false
/// when the output channel is closed.
async fn drain(fds: &mut LaneFds, st: &mut Enricher, out: &mpsc::Sender<Record>) -> bool {
    for lane in [Lane::Process, Lane::Credential, Lane::Network] {
        loop {
            while let Some(raw) = next_raw(fds.process.get_mut(), &mut st.decode_errors) {
                if let Some(rec) = st.enrich(raw) {
                    if !st.emit(rec, out).await {
                        return false;
                    }
                }
            }
            let ring = match lane {
                Lane::Process => break,
                Lane::Credential => fds.credential.get_mut(),
                Lane::Network => fds.network.get_mut(),
            };
            let Some(raw) = next_raw(ring, &mut st.decode_errors) else {
                break;
            };
            if let Some(rec) = st.enrich(raw) {
                if !st.emit(rec, out).await {
                    return false;
                }
            }
        }
    }
    true
}

/// Emits a `lost` record for every lane whose drop counter moved. Returns false when the
/// output channel is closed.
async fn report_drops(probes: &Probes, st: &mut Enricher, out: &mpsc::Sender<Record>) -> bool {
    let totals = match probes.drops() {
        Ok(t) => t,
        Err(e) => {
            warn!("reading drop counters: {e}");
            return true;
        }
    };
    for (lane, total) in totals.into_iter().enumerate() {
        let reported = st.lost_reported[lane];
        if total <= reported {
            continue;
        }
        st.lost_reported[lane] = total;
        let rec = Record::Lost(LostRecord {
            seq: 0,
            time: now_rfc3339(),
            lane: LANE_NAMES[lane].to_owned(),
            count: total - reported,
            total,
        });
        warn!(
            "{} {} records lost (ring full); {total} in all",
            total - reported,
            LANE_NAMES[lane]
        );
        if out.send(rec).await.is_err() {
            return false;
        }
    }
    true
}
