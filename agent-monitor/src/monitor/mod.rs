//! The lane consumer: reads the three ring buffers, decodes, enriches with the process
//! table, and hands [`Record`]s down the pipe. Losses are turned into `lost` records.
//!
//! One task reads all lanes. Before each credential or network record it drains the
//! process lane, so an exec or fork that happened before an open is always applied first
//! (a record is committed to its ring before the next syscall of that thread starts).

mod pending;
mod translate;

use pending::PendingQueue;

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use agent_monitor_common::{Lane, LANE_COUNT};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use self::translate::by_identity;
use crate::{
    config::Config,
    events::{
        clock_ns,
        decode::{decode, RawEvent},
        LostRecord, Record, LANE_NAMES,
    },
    identity::{
        pods::PodStore,
        process::{ProcessTable, DEFAULT_CAPACITY},
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

/// Fills in the workload (and, for opens, the credential class and owner). Returns
/// false while the pod may still become known.
fn attribute(identity: &mut Identity, record: &mut Record) -> bool {
    let Some(task) = record.task_mut() else {
        return true;
    };
    let attribution = identity.attribute(task.cgroup_id);
    task.workload = attribution.workload.clone();
    if let Record::Open(open) = record {
        if by_identity(&open.matched_by) {
            // Class and owner came from the file itself; only the owner's name is
            // looked up (it may arrive later than the record).
            if let Some(owner) = open.owner.as_mut() {
                if let Some(pod) = owner
                    .pod_uid
                    .as_deref()
                    .and_then(|u| identity.pods().get(u))
                {
                    owner.namespace = Some(pod.namespace.clone());
                    owner.name = Some(pod.name.clone());
                }
            }
        } else {
            let (class, owner) = identity.credential(&open.path, &attribution);
            open.class = class;
            open.owner = owner;
        }
    }
    !attribution.incomplete
}

/// Enrichment state: owned by the consumer task alone.
struct Enricher {
    table: ProcessTable,
    identity: Identity,
    clock: Clock,
    seq: u64,
    lost_reported: [u64; LANE_COUNT as usize],
    /// Budget drops already reported, per workload (cgroup id), indexed by lane.
    budget_reported: std::collections::HashMap<u64, [u64; LANE_COUNT as usize]>,
    decode_errors: u64,
    pending: PendingQueue,
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
        attribute(&mut self.identity, record)
    }

    /// Attributes a record and sends it, or parks it until its pod is known.
    async fn emit(&mut self, mut record: Record, out: &mpsc::Sender<Record>) -> bool {
        let complete = self.attribute(&mut record);
        let offer = self.pending.offer(record, complete, Instant::now());
        if let Some(oldest) = offer.evicted {
            // One line per interval with the count: one unknown pod can push out every
            // record it makes.
            crate::warn_limited!(
                "pending-queue-full",
                "pending queue full ({} records, identity.pending.max_events): a record leaves without its pod's metadata",
                self.pending.capacity()
            );
            if !self.send(oldest, out).await {
                return false;
            }
        }
        match offer.send {
            Some(record) => self.send(record, out).await,
            None => true,
        }
    }

    /// Sends parked records whose pod became known or whose wait is over, in order.
    async fn release_pending(&mut self, out: &mpsc::Sender<Record>) -> bool {
        let identity = &mut self.identity;
        let ready = self
            .pending
            .release(Instant::now(), |r| attribute(identity, r));
        for record in ready {
            if !self.send(record, out).await {
                return false;
            }
        }
        true
    }

    async fn send(&mut self, mut record: Record, out: &mpsc::Sender<Record>) -> bool {
        record.set_seq(self.next_seq());
        out.send(record).await.is_ok()
    }
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
        let mut probes = Probes::load(&config.probe_settings(), std::process::id())?;
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
            identity: Identity::new(
                config.identity.settings(),
                cgroup_root,
                pods,
                has_pod_source,
            ),
            clock: Clock::new(),
            seq: 0,
            lost_reported: [0; LANE_COUNT as usize],
            budget_reported: std::collections::HashMap::new(),
            decode_errors: 0,
            pending: PendingQueue::new(
                Duration::from_millis(config.identity.pending.max_wait_ms),
                config.identity.pending.max_events,
            ),
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
            for record in st.pending.drain() {
                if !st.send(record, &out).await {
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
            reason: crate::events::LostReason::RingFull,
            workload: None,
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
    report_budget_drops(probes, st, out).await
}

/// Emits a `lost` record naming the workload for every workload and lane whose budget
/// drop counter moved. Returns false when the output channel is closed.
async fn report_budget_drops(
    probes: &Probes,
    st: &mut Enricher,
    out: &mpsc::Sender<Record>,
) -> bool {
    let drops = match probes.budget_drops() {
        Ok(d) => d,
        Err(e) => {
            crate::warn_limited!("budget-counters", "reading budget drop counters: {e}");
            return true;
        }
    };
    // Workloads the kernel forgot (its map is an LRU) are forgotten here too.
    st.budget_reported
        .retain(|id, _| drops.iter().any(|(cgroup_id, _)| cgroup_id == id));
    for (cgroup_id, totals) in drops {
        let reported = st.budget_reported.entry(cgroup_id).or_default();
        // A counter below what was reported belongs to a workload the kernel forgot and
        // counted again from zero.
        let before = if totals.iter().zip(reported.iter()).any(|(t, r)| t < r) {
            [0; LANE_COUNT as usize]
        } else {
            *reported
        };
        *reported = totals;
        let moved: Vec<(usize, u64, u64)> = totals
            .into_iter()
            .zip(before)
            .enumerate()
            .filter(|(_, (total, before))| total > before)
            .map(|(lane, (total, before))| (lane, total - before, total))
            .collect();
        if moved.is_empty() {
            continue;
        }
        let workload = st.identity.attribute(cgroup_id).workload;
        for (lane, count, total) in moved {
            crate::warn_limited!(
                "records-over-budget",
                "{count} {} records of {} dropped over its budget; {total} in all",
                LANE_NAMES[lane],
                workload_label(&workload, cgroup_id)
            );
            let rec = Record::Lost(LostRecord {
                seq: 0,
                time: now_rfc3339(),
                lane: LANE_NAMES[lane].to_owned(),
                count,
                total,
                reason: crate::events::LostReason::Budget,
                workload: Some(workload.clone()),
            });
            if !st.send(rec, out).await {
                return false;
            }
        }
    }
    true
}

/// `namespace/pod`, or the cgroup, for a log line.
fn workload_label(w: &crate::events::Workload, cgroup_id: u64) -> String {
    match (&w.namespace, &w.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => w
            .cgroup
            .clone()
            .unwrap_or_else(|| format!("cgroup {cgroup_id}")),
    }
}
