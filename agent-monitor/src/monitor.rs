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
    path_flags, EventHeader, EventKind, Lane, MatchKind, Syscall, GROUP_ALIVE, GROUP_UNKNOWN,
    LANE_COUNT,
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
        credentials::{normalize, projected_class, CredentialClass, Owner},
        pods::PodStore,
        process::{ProcessTable, DEFAULT_CAPACITY},
        watched::{dev_name, VolumePlugin},
        Identity,
    },
    outputs::metrics::Heartbeat,
    probes::{ProbeError, Probes, Rings},
    watching::{DirWatch, WatchStatus, Watching, MOUNTINFO},
};

/// How often dead processes are pruned from the process table.
const PRUNE_INTERVAL: Duration = Duration::from_secs(30);
/// How often the node credential inventory is walked again (rewritten kubeconfigs and
/// certificates get new inodes) and the mount table re-read even without a notification.
const INVENTORY_INTERVAL: Duration = Duration::from_secs(10);

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
    /// `identity.cgroup_root` is not the node's cgroup2 hierarchy.
    #[error(transparent)]
    CgroupRoot(#[from] crate::identity::cgroup::CgroupRootError),
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
    /// The kernel's file-identity maps.
    watching: Watching,
    /// Processes, cgroups and pods known, for status and metrics.
    cache_size: Arc<std::sync::atomic::AtomicU64>,
    /// Beaten at every turn of the consumer loop and for every record drained, so a long
    /// drain under load is alive and a stuck one is not.
    heartbeat: Heartbeat,
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
            if by_identity(&open.matched_by) {
                // Class and owner came from the file itself; only the owner's name is
                // looked up (it may arrive later than the record).
                if let Some(owner) = open.owner.as_mut() {
                    if let Some(pod) = owner
                        .pod_uid
                        .as_deref()
                        .and_then(|u| self.identity.pods().get(u))
                    {
                        owner.namespace = Some(pod.namespace.clone());
                        owner.name = Some(pod.name.clone());
                    }
                }
            } else {
                let (class, owner) = self.identity.credential(&open.path, &attribution);
                open.class = class;
                open.owner = owner;
            }
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
                // One line per interval with the count: one unknown pod can push out
                // every record it makes.
                crate::warn_limited!(
                    "pending-queue-full",
                    "pending queue full ({} records, identity.pending.max_events): a record leaves without its pod's metadata",
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

    /// Class and owner of a file matched by identity, from what is watched: the volume
    /// its filesystem is, or its inventory entry. Path-matched records get theirs in
    /// [`Enricher::attribute`].
    fn file_class(
        &self,
        matched: Option<MatchKind>,
        dev: u32,
        ino: u64,
        path: &str,
        within: Option<&str>,
    ) -> (CredentialClass, Option<Owner>) {
        match matched {
            Some(MatchKind::Volume) => {
                let Some(v) = self.watching.volume(dev) else {
                    return (CredentialClass::Other, None);
                };
                let normalized = normalize(within.unwrap_or(path));
                let file = normalized.rsplit('/').next().unwrap_or_default();
                let class = match v.plugin {
                    VolumePlugin::Projected => projected_class(&v.volume, file),
                    VolumePlugin::Secret | VolumePlugin::Csi => CredentialClass::SecretVolume,
                };
                let owner = Owner {
                    pod_uid: Some(v.pod_uid.clone()),
                    ..Owner::default()
                };
                (class, Some(owner))
            }
            Some(MatchKind::Inode) => (
                self.watching
                    .inventory(dev, ino)
                    .map_or(CredentialClass::Other, |e| e.class),
                None,
            ),
            _ => (CredentialClass::Other, None),
        }
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
            start_ns: h.start_ns,
            workload: Default::default(),
        }
    }

    /// Turns a kernel record into an output record, updating the process table.
    fn enrich(&mut self, raw: RawEvent) -> Option<Record> {
        match raw {
            RawEvent::Open(ev) => {
                let raw_path = c_string(&ev.path, usize::from(ev.path_len));
                let relative = ev.path_flags & path_flags::RELATIVE != 0;
                let no_path = ev.path_flags & path_flags::NO_PATH != 0;
                let opened = ev.ret >= 0 && ev.dev != 0;
                let within = opened.then(|| within_fs_path(&ev.dpath, usize::from(ev.dpath_len)));
                let host_path = within
                    .as_deref()
                    .and_then(|w| self.watching.host_path(ev.dev, w));
                let resolved = if relative {
                    self.table
                        .resolve_relative(ev.header.tgid, ev.header.pid, ev.dirfd, &raw_path)
                } else if no_path {
                    None
                } else {
                    Some(raw_path.clone())
                };
                let matched = MatchKind::from_u8(ev.matched);
                let matched_by = match matched {
                    Some(MatchKind::Volume) => "volume",
                    Some(MatchKind::Inode) => "inode",
                    Some(MatchKind::Basename) => "basename",
                    Some(MatchKind::ProcEnviron) => "proc_environ",
                    Some(MatchKind::Prefix) | None => "prefix",
                };
                let path_resolved = host_path.is_some() || resolved.is_some();
                let path = host_path
                    .clone()
                    .or(resolved)
                    .or_else(|| {
                        within
                            .as_ref()
                            .map(|w| format!("/proc{w}"))
                            .filter(|_| matched == Some(MatchKind::ProcEnviron))
                    })
                    .unwrap_or_else(|| raw_path.clone());
                let (class, owner) =
                    self.file_class(matched, ev.dev, ev.ino, &path, within.as_deref());
                Some(Record::Open(OpenRecord {
                    seq: 0,
                    task: self.task(&ev.header),
                    syscall: Syscall::from_u16(ev.syscall)
                        .map_or("open", Syscall::name)
                        .to_owned(),
                    path_resolved,
                    path,
                    raw_path,
                    path_truncated: ev.path_flags
                        & (path_flags::TRUNCATED | path_flags::DPATH_TRUNCATED)
                        != 0,
                    matched_by: matched_by.to_owned(),
                    dirfd: ev.dirfd,
                    flags: ev.flags,
                    mode: ev.mode,
                    result: ev.ret,
                    error: errno::of_result(ev.ret),
                    class,
                    owner,
                    host_path,
                    device: opened.then(|| dev_name(ev.dev)),
                    inode: opened.then_some(ev.ino),
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
                        let host = self.identity.attribute(h.cgroup_id).workload.host;
                        self.table.on_exec(h.tgid, &filename, host);
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

/// Whether an open's class and owner come from the file's identity (not its path).
fn by_identity(matched_by: &str) -> bool {
    matches!(matched_by, "volume" | "inode")
}

/// The path of a file within its filesystem from the kernel's dentry names (leaf first,
/// each NUL-terminated).
fn within_fs_path(dpath: &[u8], len: usize) -> String {
    let bytes = &dpath[..len.min(dpath.len())];
    let names: Vec<String> = bytes
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    let mut out = String::new();
    for n in names.iter().rev() {
        out.push('/');
        out.push_str(n);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
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
                crate::warn_limited!("undecodable-record", "undecodable ring record skipped: {e}");
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
    watch_status: Arc<WatchStatus>,
    heartbeat: Heartbeat,
}

impl Monitor {
    /// Loads and attaches the probes and starts consuming their lanes into `out`. Must be
    /// called inside a tokio runtime. The daemon's own process is never reported.
    pub fn start(
        config: &Config,
        pods: Arc<PodStore>,
        out: mpsc::Sender<Record>,
    ) -> Result<Self, MonitorError> {
        let cgroup_root =
            crate::identity::cgroup::cgroup2_root(config.identity.cgroup_root.as_deref())?;
        match &cgroup_root {
            Some(root) => info!("cgroup2 hierarchy at {}", root.display()),
            None => warn!("no cgroup2 mount found: events will name no pod or container"),
        }
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
        let mut enricher = Enricher {
            table,
            identity: Identity::new(config.identity.clone(), cgroup_root, pods, has_pod_source),
            clock: Clock::new(),
            seq: 0,
            lost_reported: [0; LANE_COUNT as usize],
            decode_errors: 0,
            pending: VecDeque::new(),
            max_wait: Duration::from_millis(config.identity.pending.max_wait_ms),
            max_pending: config.identity.pending.max_events,
            watching: Watching::new(
                &config.identity.kubelet_root,
                &config.watch.prefixes,
                config.kernel_maps.inventory_files as usize,
            ),
            cache_size: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            heartbeat: Heartbeat::new(),
        };
        // Before the first record is read, so that volumes and node credentials present at
        // start are matched from the first open on.
        enricher.watching.sync(&mut probes, true);
        let watch_status = enricher.watching.status();
        info!(
            "watching by file identity: {} pod volume filesystems, {} node credential files",
            watch_status
                .volumes
                .load(std::sync::atomic::Ordering::Relaxed),
            watch_status
                .inventory
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        let identity_cache_size = enricher.cache_size.clone();
        let heartbeat = enricher.heartbeat.clone();
        let (stop, stop_rx) = watch::channel(false);
        let poll = Duration::from_millis(config.poll_interval_ms);
        let task = tokio::spawn(consume(probes, fds, enricher, out, stop_rx, poll));
        Ok(Self {
            stop,
            task,
            attached,
            identity_cache_size,
            watch_status,
            heartbeat,
        })
    }

    /// The consumer loop's heartbeat (see [`crate::outputs::metrics::Health::watch_loop`]).
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// The tracepoints attached.
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// What the kernel watches by file identity, and map refusals.
    pub fn watch_status(&self) -> Arc<WatchStatus> {
        self.watch_status.clone()
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
    let mut inventory = tokio::time::interval(INVENTORY_INTERVAL);
    inventory.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The kernel flags the mount table with POLLPRI when a mount comes or goes, so a new
    // pod's volume is watched before its containers start.
    let mut mountinfo = std::fs::File::open(MOUNTINFO)
        .and_then(|f| {
            // SAFETY: the AsyncFd owns the file, so its descriptor stays open and unchanged
            // while registered.
            unsafe { AsyncFd::register_with_interest(f, Interest::PRIORITY) }
                .map_err(|e| e.into_parts().1)
        })
        .map_err(|e| warn!("no mount notifications ({MOUNTINFO}: {e}); volumes are rescanned every {INVENTORY_INTERVAL:?}"))
        .ok();
    // inotify on the inventory's directories: a file created or replaced there is walked
    // into the inventory at once.
    let mut dirwatch = DirWatch::new()
        .and_then(|w| {
            // SAFETY: the AsyncFd owns the watch, so its descriptor stays open and
            // unchanged while registered.
            unsafe { AsyncFd::register_with_interest(w, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
        })
        .map_err(|e| {
            warn!("no inotify ({e}); the inventory is walked every {INVENTORY_INTERVAL:?}")
        })
        .ok();
    if let Some(w) = dirwatch.as_mut() {
        w.get_mut().set(st.watching.inventory_dirs());
    }
    loop {
        st.heartbeat.beat();
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = prune.tick() => {
                st.table.prune();
                false
            }
            // A new pod's metadata releases its waiting records below; what is watched
            // comes from the mount table, not from pod specs.
            _ = pods_changed.changed() => false,
            _ = inventory.tick() => {
                resync_inventory(&mut st.watching, &mut probes, dirwatch.as_mut());
                false
            }
            r = dir_changed(dirwatch.as_mut()) => {
                if let Err(e) = r {
                    warn!("inotify stopped: {e}");
                    dirwatch = None;
                }
                resync_inventory(&mut st.watching, &mut probes, dirwatch.as_mut());
                false
            }
            r = mount_changed(mountinfo.as_mut()) => {
                if let Err(e) = r {
                    warn!("mount notifications stopped: {e}");
                    mountinfo = None;
                }
                st.watching.sync(&mut probes, false);
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

/// Waits for the mount table to change; never returns without a notification source.
async fn mount_changed(fd: Option<&mut AsyncFd<std::fs::File>>) -> std::io::Result<()> {
    match fd {
        Some(fd) => {
            let mut guard = fd.ready_mut(Interest::PRIORITY).await?;
            guard.clear_ready();
            Ok(())
        }
        None => std::future::pending().await,
    }
}

/// When the kernel stamped a record.
fn raw_ts(raw: &RawEvent) -> u64 {
    match raw {
        RawEvent::Open(e) => e.header.ts_ns,
        RawEvent::Connect(e) => e.header.ts_ns,
        RawEvent::Proc(e) => e.header.ts_ns,
    }
}

/// Syncs the volumes and walks the inventory again, then points inotify at the
/// inventory's directories as that walk found them.
fn resync_inventory(
    watching: &mut Watching,
    probes: &mut Probes,
    dirwatch: Option<&mut AsyncFd<DirWatch>>,
) {
    watching.sync(probes, true);
    if let Some(w) = dirwatch {
        w.get_mut().set(watching.inventory_dirs());
    }
}

/// Waits for a change in an inventory directory; never returns without inotify.
async fn dir_changed(fd: Option<&mut AsyncFd<DirWatch>>) -> std::io::Result<()> {
    match fd {
        Some(fd) => {
            let mut guard = fd.readable_mut().await?;
            guard.get_inner().drain();
            guard.clear_ready();
            Ok(())
        }
        None => std::future::pending().await,
    }
}

/// Drains every lane in kernel time order: the head records of the three rings are merged
/// by timestamp, so an exec or fork is applied to the process table after the opens and
/// connects that came before it and before those that came after (an open made just
/// before an exec keeps the executable the process had when it made it). Returns false
/// when the output channel is closed.
async fn drain(fds: &mut LaneFds, st: &mut Enricher, out: &mpsc::Sender<Record>) -> bool {
    let mut heads: [Option<RawEvent>; LANE_COUNT as usize] = [None, None, None];
    loop {
        for (i, head) in heads.iter_mut().enumerate() {
            if head.is_none() {
                let ring = match i {
                    0 => fds.credential.get_mut(),
                    1 => fds.network.get_mut(),
                    _ => fds.process.get_mut(),
                };
                *head = next_raw(ring, &mut st.decode_errors);
            }
        }
        let next = heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|r| (raw_ts(r), i)))
            .min();
        let Some((_, i)) = next else {
            return true;
        };
        let Some(raw) = heads[i].take() else {
            return true;
        };
        st.heartbeat.beat();
        if let Some(rec) = st.enrich(raw) {
            if !st.emit(rec, out).await {
                return false;
            }
        }
    }
}

/// Emits a `lost` record for every lane whose drop counter moved. Returns false when the
/// output channel is closed.
async fn report_drops(probes: &Probes, st: &mut Enricher, out: &mpsc::Sender<Record>) -> bool {
    let totals = match probes.drops() {
        Ok(t) => t,
        Err(e) => {
            crate::warn_limited!("drop-counters", "reading drop counters: {e}");
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
        // Per lane: a busy process lane must not hide a credential-lane loss.
        const KEYS: [&str; LANE_COUNT as usize] = [
            "records-lost-credential",
            "records-lost-network",
            "records-lost-process",
        ];
        crate::warn_limited!(
            KEYS.get(lane).copied().unwrap_or("records-lost"),
            "{} {} records lost (ring full); {total} in all",
            total - reported,
            LANE_NAMES[lane]
        );
        // Numbered from the same sequence as every other record, so a reader can tell
        // where in the stream the loss was noticed.
        if !st.send(rec, out).await {
            return false;
        }
    }
    true
}
