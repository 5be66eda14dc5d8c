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
    path::PathBuf,
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
    events::{
        clock_ns,
        decode::{decode, RawEvent},
        LostRecord, Record, LANE_NAMES,
    },
    identity::IdentitySettings,
    identity::{
        pods::PodStore,
        process::{ProcessTable, DEFAULT_CAPACITY},
        Identity,
    },
    outputs::metrics::Heartbeat,
    probes::{ProbeError, ProbeSettings, Probes, Rings},
    watching::{DirWatch, WatchStatus, Watching, MOUNTINFO},
};

/// Records a drain enriches before it hands them to the output channel together: the
/// output thread, woken by the first, finds the rest queued, instead of being woken (a
/// futex wake and two context switches) for every record. At most this many records'
/// enrichment (a few hundred microseconds) is added to their latency.
pub const SEND_BATCH: usize = 256;
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

/// Length of `YYYY-MM-DDTHH:MM:SS.` in humantime's RFC 3339 form (years 0-9999).
const SECOND_PREFIX: usize = 20;

/// Converts kernel CLOCK_BOOTTIME stamps to wall-clock time.
struct Clock {
    /// CLOCK_REALTIME - CLOCK_BOOTTIME, in nanoseconds, when the daemon started.
    offset_ns: i128,
    /// The wall-clock second last formatted and its `YYYY-MM-DDTHH:MM:SS.`: records come
    /// many to a second, and only their nanoseconds differ.
    second: Option<(u64, String)>,
}

impl Clock {
    fn new() -> Self {
        Self {
            offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_BOOTTIME),
            second: None,
        }
    }

    fn wall(&self, boot_ns: u64) -> SystemTime {
        let ns = (i128::from(boot_ns) + self.offset_ns).max(0);
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }

    /// The wall-clock time of `boot_ns` as humantime's `format_rfc3339_nanos` writes it
    /// (`2026-11-23T07:00:00.000000001Z`), the date and time formatted once per second.
    fn rfc3339(&mut self, boot_ns: u64) -> String {
        let since_epoch = self
            .wall(boot_ns)
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let (secs, nanos) = (since_epoch.as_secs(), since_epoch.subsec_nanos());
        let prefix = match &self.second {
            Some((s, prefix)) if *s == secs => prefix,
            _ => {
                let full = humantime::format_rfc3339_nanos(
                    SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
                )
                .to_string();
                // Past year 9999 the form is not fixed-width: formatted whole, every time.
                let Some(prefix) = full.get(..SECOND_PREFIX).filter(|p| p.ends_with('.')) else {
                    return humantime::format_rfc3339_nanos(self.wall(boot_ns)).to_string();
                };
                &self.second.insert((secs, prefix.to_owned())).1
            }
        };
        // Nine digits and the zone, as humantime writes them.
        let mut digits = [b'0'; 9];
        let mut n = nanos;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        let mut out = String::with_capacity(SECOND_PREFIX + digits.len() + 1);
        out.push_str(prefix);
        out.extend(digits.iter().map(|&d| char::from(d)));
        out.push('Z');
        out
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// Fills in the workload (and, for opens, the credential class and owner). Returns
/// false while the pod may still become known.
fn attribute(identity: &mut Identity, record: &mut Record) -> bool {
    let Some(cgroup_id) = record.task().map(|t| t.cgroup_id) else {
        return true;
    };
    let attribution = identity.attribute(cgroup_id);
    if let Record::Open(open) = &mut *record {
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
    let complete = !attribution.incomplete;
    // Moved, not copied: the workload (labels and all) is built once per record.
    if let Some(task) = record.task_mut() {
        task.workload = attribution.workload;
    }
    complete
}

/// The enrichment stage between the rings and the outputs: kernel records in, numbered
/// and attributed [`Record`]s out, with the process table, identity and the pending queue
/// it keeps. The lane consumer owns one; [`Enricher::feed`] is the same path for records
/// that come from elsewhere (a recording, a benchmark).
pub struct Enricher {
    table: ProcessTable,
    identity: Identity,
    clock: Clock,
    seq: u64,
    lost_reported: [u64; LANE_COUNT as usize],
    /// Budget drops already reported, per workload (cgroup id), indexed by lane.
    budget_reported: std::collections::HashMap<u64, [u64; LANE_COUNT as usize]>,
    decode_errors: u64,
    /// The workload of a record not attributed yet (shared, so a record costs no
    /// allocation before attribution gives it its own).
    unattributed: Arc<crate::events::Workload>,
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
    /// An enricher with `settings`, over the pod store `pods` and the cgroup2 hierarchy at
    /// `cgroup_root` (see [`crate::identity::cgroup::cgroup2_root`]). Its process table
    /// starts empty and no volume is known until [`Enricher::sync_volumes`] (or the
    /// monitor's sync with the kernel maps).
    pub fn new(
        settings: &MonitorSettings,
        pods: Arc<PodStore>,
        cgroup_root: Option<PathBuf>,
    ) -> Self {
        Self {
            table: ProcessTable::new(DEFAULT_CAPACITY),
            identity: Identity::new(
                settings.identity.clone(),
                cgroup_root,
                pods,
                settings.has_pod_source,
            ),
            clock: Clock::new(),
            seq: 0,
            lost_reported: [0; LANE_COUNT as usize],
            budget_reported: std::collections::HashMap::new(),
            decode_errors: 0,
            unattributed: Arc::default(),
            pending: PendingQueue::new(settings.pending_wait, settings.pending_max),
            watching: Watching::new(
                &settings.identity.kubelet_root,
                &settings.watch_prefixes,
                settings.probes.inventory_files as usize,
            ),
            cache_size: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            heartbeat: Heartbeat::new(),
        }
    }

    /// Reads the mount table and learns the pod volume filesystems on it, without touching
    /// any kernel map: opens the kernel matched by volume are then classified and owned.
    pub fn sync_volumes(&mut self) {
        self.watching.sync_volumes();
    }

    /// Ring records that did not decode (skipped).
    pub fn decode_errors(&self) -> u64 {
        self.decode_errors
    }

    /// One ring record as the kernel wrote it: decoded (a record that does not decode is
    /// counted and skipped), translated, attributed, and appended to `out` with its
    /// sequence number, or parked until its pod is known (see [`Enricher::release`]).
    /// A full pending queue may push out an older record first.
    pub fn feed(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<Record>) {
        match decode(bytes) {
            Ok(raw) => self.ingest(raw, now, out),
            Err(e) => self.undecodable(&e),
        }
    }

    fn undecodable(&mut self, e: &crate::events::decode::DecodeError) {
        self.decode_errors += 1;
        crate::warn_limited!("undecodable-record", "undecodable ring record skipped: {e}");
    }

    /// A decoded record: see [`Enricher::feed`].
    fn ingest(&mut self, raw: RawEvent, now: Instant, out: &mut Vec<Record>) {
        self.heartbeat.beat();
        let Some(mut record) = self.enrich(raw) else {
            return;
        };
        let complete = self.attribute(&mut record);
        let offer = self.pending.offer(record, complete, now);
        if let Some(oldest) = offer.evicted {
            // One line per interval with the count: one unknown pod can push out every
            // record it makes.
            crate::warn_limited!(
                "pending-queue-full",
                "pending queue full ({} records, identity.pending.max_events): a record leaves without its pod's metadata",
                self.pending.capacity()
            );
            self.number(oldest, out);
        }
        if let Some(record) = offer.send {
            self.number(record, out);
        }
    }

    /// Appends to `out` the parked records whose pod became known or whose wait is over
    /// at `now`, in order.
    pub fn release(&mut self, now: Instant, out: &mut Vec<Record>) {
        let identity = &mut self.identity;
        let ready = self.pending.release(now, |r| attribute(identity, r));
        for record in ready {
            self.number(record, out);
        }
    }

    /// Appends every parked record to `out` as it is: nothing more will arrive.
    pub fn finish(&mut self, out: &mut Vec<Record>) {
        for record in self.pending.drain() {
            self.number(record, out);
        }
    }

    fn number(&mut self, mut record: Record, out: &mut Vec<Record>) {
        self.seq += 1;
        record.set_seq(self.seq);
        out.push(record);
    }

    /// Fills in the workload (and, for opens, the credential class and owner). Returns
    /// false while the pod may still become known.
    fn attribute(&mut self, record: &mut Record) -> bool {
        attribute(&mut self.identity, record)
    }
}

/// Sends what the enricher made ready, in order, leaving `ready` empty. False when the
/// output channel is closed.
///
/// Room is reserved for up to [`SEND_BATCH`] records at a time, then they are sent
/// together: when the output thread is behind and the channel full, this task is woken
/// once a batch's worth of room is free, not (a futex wake and two context switches) for
/// every record the output thread takes.
pub async fn send_all(ready: &mut Vec<Record>, out: &mpsc::Sender<Record>) -> bool {
    let mut records = ready.drain(..);
    loop {
        // Never more than the channel holds: `reserve_many` refuses that outright.
        let n = records.len().min(SEND_BATCH).min(out.max_capacity());
        if n == 0 {
            return true;
        }
        let Ok(permits) = out.reserve_many(n).await else {
            // Dropping the rest of the drain empties `ready`.
            return false;
        };
        for (permit, record) in permits.zip(records.by_ref()) {
            permit.send(record);
        }
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
fn next_raw(ring: &mut RingBuf<MapData>, st: &mut Enricher) -> Option<RawEvent> {
    loop {
        let item = ring.next()?;
        match decode(&item) {
            Ok(raw) => return Some(raw),
            Err(e) => st.undecodable(&e),
        }
    }
}

/// What the lane consumer runs with (made from the config file in `app::settings`).
#[derive(Debug, Clone)]
pub struct MonitorSettings {
    /// What the probes are loaded with.
    pub probes: ProbeSettings,
    /// What attribution needs.
    pub identity: IdentitySettings,
    /// Where the node's cgroup2 hierarchy is mounted (None: the daemon's own first
    /// cgroup2 mount).
    pub cgroup_root: Option<std::path::PathBuf>,
    /// Whether pod metadata will come (a pods file or the API server): events of an
    /// unknown pod then wait for it.
    pub has_pod_source: bool,
    /// Longest a record waits for its pod's metadata.
    pub pending_wait: Duration,
    /// Most records waiting at once.
    pub pending_max: usize,
    /// The configured watch prefixes (the inventory walks those that name node files).
    pub watch_prefixes: Vec<String>,
    /// How often records that did not wake the consumer are collected.
    pub poll_interval: Duration,
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
        settings: MonitorSettings,
        pods: Arc<PodStore>,
        out: mpsc::Sender<Record>,
    ) -> Result<Self, MonitorError> {
        let cgroup_root = crate::identity::cgroup::cgroup2_root(settings.cgroup_root.as_deref())?;
        match &cgroup_root {
            Some(root) => info!("cgroup2 hierarchy at {}", root.display()),
            None => warn!("no cgroup2 mount found: events will name no pod or container"),
        }
        let mut probes = Probes::load(&settings.probes, std::process::id())?;
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
        if settings.probes.kernel_log {
            match probes.take_logger() {
                Ok(logger) => spawn_kernel_logger(logger),
                Err(e) => warn!("kernel log requested but unavailable: {e}"),
            }
        }
        let mut enricher = Enricher::new(&settings, pods, cgroup_root);
        let seeded = enricher.table.seed();
        info!("process table seeded with {seeded} processes");
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
        let poll = settings.poll_interval;
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
    // Records the enricher made ready, reused from drain to drain.
    let mut ready: Vec<Record> = Vec::new();
    loop {
        st.heartbeat.beat();
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = prune.tick() => {
                st.table.prune(Instant::now());
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
        if !drain(&mut fds, &mut st, &out, &mut ready).await
            || !report_drops(&probes, &mut st, &out).await
            || !{
                st.release(Instant::now(), &mut ready);
                send_all(&mut ready, &out).await
            }
        {
            info!("output closed; lane consumer stopping");
            return Ok(());
        }
        if stopping {
            // Nothing more will arrive: what still waits for its pod leaves as it is.
            st.finish(&mut ready);
            send_all(&mut ready, &out).await;
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
async fn drain(
    fds: &mut LaneFds,
    st: &mut Enricher,
    out: &mpsc::Sender<Record>,
    ready: &mut Vec<Record>,
) -> bool {
    let mut heads: [Option<RawEvent>; LANE_COUNT as usize] = [None, None, None];
    loop {
        for (i, head) in heads.iter_mut().enumerate() {
            if head.is_none() {
                let ring = match i {
                    0 => fds.credential.get_mut(),
                    1 => fds.network.get_mut(),
                    _ => fds.process.get_mut(),
                };
                *head = next_raw(ring, st);
            }
        }
        let next = heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|r| (raw_ts(r), i)))
            .min();
        let Some((_, i)) = next else {
            return send_all(ready, out).await;
        };
        let Some(raw) = heads[i].take() else {
            return send_all(ready, out).await;
        };
        st.ingest(raw, Instant::now(), ready);
        if ready.len() >= SEND_BATCH && !send_all(ready, out).await {
            return false;
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
        let mut ready = Vec::with_capacity(1);
        st.number(rec, &mut ready);
        if !send_all(&mut ready, out).await {
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
                workload: Some(crate::events::Workload::clone(&workload)),
            });
            let mut ready = Vec::with_capacity(1);
            st.number(rec, &mut ready);
            if !send_all(&mut ready, out).await {
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use agent_monitor_common::{EventHeader, EventKind, MatchKind, OpenEvent, ProcEvent};

    use super::*;
    use crate::identity::pods::{ContainerMeta, PodMeta};

    const UID: &str = "0b6a3c1e-1111-4222-8333-444455556666";
    const CID: &str = "aaaabbbbccccddddeeeeffff00001111aaaabbbbccccddddeeeeffff00001111";

    fn bytes<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: T is a repr(C) plain-old-data record from agent-monitor-common, read
        // as the bytes the kernel writes.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn header(kind: EventKind, ts_ns: u64, tgid: u32, cgroup_id: u64) -> EventHeader {
        // SAFETY: every field of the header is an integer or a byte array: all zeroes is a
        // valid value.
        let mut h: EventHeader = unsafe { std::mem::zeroed() };
        h.kind = kind as u16;
        h.ts_ns = ts_ns;
        h.pid = tgid;
        h.tgid = tgid;
        h.cgroup_id = cgroup_id;
        h.comm[..4].copy_from_slice(b"curl");
        h
    }

    fn exec(ts_ns: u64, tgid: u32, cgroup_id: u64, file: &str) -> Vec<u8> {
        // SAFETY: integers and byte arrays only: all zeroes is valid.
        let mut e: ProcEvent = unsafe { std::mem::zeroed() };
        e.header = header(EventKind::Exec, ts_ns, tgid, cgroup_id);
        e.filename[..file.len()].copy_from_slice(file.as_bytes());
        e.filename_len = file.len() as u16;
        e.child_pid = tgid;
        bytes(&e)
    }

    fn open(ts_ns: u64, tgid: u32, cgroup_id: u64, path: &str) -> Vec<u8> {
        // SAFETY: integers and byte arrays only: all zeroes is valid.
        let mut e: OpenEvent = unsafe { std::mem::zeroed() };
        e.header = header(EventKind::Open, ts_ns, tgid, cgroup_id);
        e.path[..path.len()].copy_from_slice(path.as_bytes());
        e.path_len = path.len() as u16;
        e.matched = MatchKind::Prefix as u8;
        e.dirfd = agent_monitor_common::AT_FDCWD;
        e.ret = 3;
        // The ring form: the fixed part, then the path (no dentry names here).
        let mut v = bytes(&e);
        v.truncate(agent_monitor_common::OPEN_FIXED);
        v.extend_from_slice(path.as_bytes());
        v
    }

    fn pod() -> PodMeta {
        PodMeta {
            uid: UID.into(),
            namespace: "agents".into(),
            name: "coder-0".into(),
            labels: [("agent-monitor.dev/agent".to_owned(), "coder".to_owned())].into(),
            service_account: "coder".into(),
            node_name: None,
            containers: vec![ContainerMeta {
                name: "main".into(),
                image: "python:3.12".into(),
                container_id: Some(CID.into()),
                mounts: Vec::new(),
            }],
            pod_ips: Vec::new(),
            truncated: false,
            labels_truncated: 0,
        }
    }

    /// A cgroup tree named as the kubelet's systemd driver names it; the pod's cgroup id
    /// is its directory's inode, as `bpf_get_current_cgroup_id` reports it.
    fn tree() -> (tempfile::TempDir, u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        ));
        std::fs::create_dir_all(&path).expect("mkdir");
        let id = std::fs::metadata(&path).expect("stat").ino();
        (dir, id)
    }

    /// What the daemon runs with by default, with a pod source and this pending wait.
    fn config(max_wait_ms: u64) -> MonitorSettings {
        MonitorSettings {
            probes: ProbeSettings {
                ring_bytes: [1 << 20; LANE_COUNT as usize],
                budgets: crate::probes::DEFAULT_BUDGETS,
                cgroups: Vec::new(),
                proc_environ: true,
                kernel_log: false,
                exfil_window_ms: 30_000,
                watched_filesystems: agent_monitor_common::MAX_WATCHED_FS,
                inventory_files: agent_monitor_common::MAX_INVENTORY,
                prefixes: Vec::new(),
                basenames: Vec::new(),
            },
            identity: IdentitySettings {
                kubelet_root: crate::identity::DEFAULT_KUBELET_ROOT.into(),
                agent_label: crate::identity::DEFAULT_AGENT_LABEL.into(),
                tier_label: crate::identity::DEFAULT_TIER_LABEL.into(),
            },
            cgroup_root: None,
            has_pod_source: true,
            pending_wait: Duration::from_millis(max_wait_ms),
            pending_max: 10_000,
            watch_prefixes: Vec::new(),
            poll_interval: Duration::from_millis(10),
        }
    }

    #[test]
    fn fed_bytes_become_numbered_attributed_records_with_the_exec_applied() {
        let (dir, cgroup) = tree();
        let pods = PodStore::new();
        pods.upsert(pod());
        let mut st = Enricher::new(&config(500), pods, Some(dir.path().to_owned()));
        let mut out = Vec::new();
        let now = Instant::now();
        st.feed(&exec(10, 4242, cgroup, "/usr/bin/curl"), now, &mut out);
        st.feed(
            &open(
                20,
                4242,
                cgroup,
                "/var/run/secrets/kubernetes.io/serviceaccount/token",
            ),
            now,
            &mut out,
        );
        // Not one of ours: counted, skipped, not numbered.
        st.feed(&[1, 2, 3], now, &mut out);
        assert_eq!(st.decode_errors(), 1);
        assert_eq!(out.len(), 2, "{out:?}");
        let Record::Open(o) = &out[1] else {
            panic!("second record is not the open: {:?}", out[1]);
        };
        assert_eq!(o.seq, 2);
        assert_eq!(o.task.exe.as_deref(), Some("/usr/bin/curl"));
        assert_eq!(o.task.comm, "curl");
        assert_eq!(o.matched_by, "prefix");
        assert_eq!(o.task.workload.pod.as_deref(), Some("coder-0"));
        assert_eq!(o.task.workload.container.as_deref(), Some("main"));
        assert_eq!(o.task.workload.service_account.as_deref(), Some("coder"));
        assert_eq!(o.task.workload.agent.as_deref(), Some("coder"));
        assert_eq!(
            o.class,
            crate::identity::credentials::CredentialClass::ServiceAccountToken
        );
        assert_eq!(
            o.owner.as_ref().and_then(|w| w.pod_uid.as_deref()),
            Some(UID)
        );
    }

    fn lost(seq: u64) -> Record {
        Record::Lost(LostRecord {
            seq,
            time: String::new(),
            lane: "network".into(),
            count: 1,
            total: seq,
            reason: crate::events::LostReason::RingFull,
            workload: None,
        })
    }

    #[tokio::test]
    async fn batches_larger_than_the_channel_arrive_whole_and_in_order() {
        // A channel smaller than a batch, drained while the sender waits for room.
        let (tx, mut rx) = mpsc::channel::<Record>(3);
        let total = 2 * SEND_BATCH as u64 + 5;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(r) = rx.recv().await {
                got.push(r.seq());
            }
            got
        });
        let mut ready: Vec<Record> = (1..=total).map(lost).collect();
        assert!(send_all(&mut ready, &tx).await);
        assert!(ready.is_empty());
        drop(tx);
        let got = reader.await.expect("reader");
        assert_eq!(got, (1..=total).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_closed_channel_ends_the_send_and_empties_what_was_ready() {
        let (tx, rx) = mpsc::channel(4);
        drop(rx);
        let mut ready: Vec<Record> = (1..=10).map(lost).collect();
        assert!(!send_all(&mut ready, &tx).await);
        assert!(ready.is_empty());
    }

    #[test]
    fn wall_times_are_written_as_humantime_writes_them() {
        let mut clock = Clock::new();
        // Across second boundaries, back and forth, at the ends of a second.
        let boot = [
            5_000_000_000,
            5_000_000_001,
            5_999_999_999,
            6_000_000_000,
            5_123_456_789,
            86_400_000_000_007,
            86_400_000_000_000,
        ];
        for ns in boot {
            let want = humantime::format_rfc3339_nanos(clock.wall(ns)).to_string();
            assert_eq!(clock.rfc3339(ns), want, "boot {ns}");
        }
    }

    #[test]
    fn records_of_a_workload_share_it_until_its_pod_changes() {
        let (dir, cgroup) = tree();
        let pods = PodStore::new();
        pods.upsert(pod());
        let mut st = Enricher::new(&config(500), pods.clone(), Some(dir.path().to_owned()));
        let mut out = Vec::new();
        let now = Instant::now();
        st.feed(&exec(10, 4242, cgroup, "/usr/bin/curl"), now, &mut out);
        st.feed(
            &open(20, 4242, cgroup, "/etc/kubernetes/admin.conf"),
            now,
            &mut out,
        );
        let workload = |r: &Record| r.task().expect("task").workload.clone();
        assert!(
            Arc::ptr_eq(&workload(&out[0]), &workload(&out[1])),
            "one workload for both records"
        );
        // The pod is relabelled: what follows names the new agent, what left keeps the old.
        let mut relabelled = pod();
        relabelled
            .labels
            .insert("agent-monitor.dev/agent".into(), "reviewer".into());
        pods.upsert(relabelled);
        st.feed(
            &open(30, 4242, cgroup, "/etc/kubernetes/admin.conf"),
            now,
            &mut out,
        );
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(workload(&out[1]).agent.as_deref(), Some("coder"));
        assert_eq!(workload(&out[2]).agent.as_deref(), Some("reviewer"));
        assert_eq!(
            workload(&out[2])
                .labels
                .get("agent-monitor.dev/agent")
                .map(String::as_str),
            Some("reviewer")
        );
    }

    #[test]
    fn records_of_an_unknown_pod_wait_for_it_and_leave_in_order() {
        let (dir, cgroup) = tree();
        let pods = PodStore::new();
        let mut st = Enricher::new(&config(60_000), pods.clone(), Some(dir.path().to_owned()));
        let mut out = Vec::new();
        let now = Instant::now();
        st.feed(&exec(10, 7, cgroup, "/bin/sh"), now, &mut out);
        st.feed(
            &open(20, 7, cgroup, "/etc/kubernetes/admin.conf"),
            now,
            &mut out,
        );
        assert!(out.is_empty(), "parked while the pod is unknown: {out:?}");
        st.release(now, &mut out);
        assert!(out.is_empty(), "still waiting: {out:?}");
        pods.upsert(pod());
        st.release(now, &mut out);
        let got: Vec<(u64, Option<&str>)> = out
            .iter()
            .map(|r| {
                let t = r.task().expect("task");
                (r.seq(), t.workload.pod.as_deref())
            })
            .collect();
        assert_eq!(got, [(1, Some("coder-0")), (2, Some("coder-0"))]);
    }

    #[test]
    fn what_still_waits_at_the_end_leaves_as_it_is() {
        let (dir, cgroup) = tree();
        let mut st = Enricher::new(
            &config(60_000),
            PodStore::new(),
            Some(dir.path().to_owned()),
        );
        let mut out = Vec::new();
        st.feed(&exec(10, 7, cgroup, "/bin/sh"), Instant::now(), &mut out);
        assert!(out.is_empty());
        st.finish(&mut out);
        assert_eq!(out.len(), 1);
        let w = &out[0].task().expect("task").workload;
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.pod, None);
    }
}
