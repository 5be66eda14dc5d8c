//! Keeps the kernel's file-identity maps current: the filesystems of pods' Secret and
//! projected volumes (found in the mount table) and the node credential inventory (found
//! by walking the node's credential directories), and answers, for a record, which volume
//! or inventory entry a (device, inode) is.
//!
//! The maps are kept declaratively: every sync computes what should be watched, removes
//! what no longer should and adds what is new. An insert the kernel refuses (a full map)
//! is logged, counted, and retried on the next sync, never forgotten.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use agent_monitor_common::FileKey;
use log::{info, warn};

use crate::{
    identity::watched::{
        default_node_roots, home_dirs, host_path, node_inventory, parse_mountinfo,
        volume_filesystems, InventoryEntry, InventoryLimits, InventoryRoot, MountEntry, VolumeFs,
    },
    probes::{Probes, WATCH_FILES_MAP, WATCH_FS_MAP},
};

/// The mount table the daemon sees: the host's, since the DaemonSet runs in the host's
/// mount namespace (or with the host's `/proc` mounted).
pub const MOUNTINFO: &str = "/proc/self/mountinfo";
/// Most inventory entries pushed into the kernel (the map holds
/// [`agent_monitor_common::MAX_INVENTORY`]).
const INVENTORY_MAX_ENTRIES: usize = agent_monitor_common::MAX_INVENTORY as usize;
/// Deepest directory walked below an inventory root.
const INVENTORY_MAX_DEPTH: usize = 8;
/// How long a volume stays known after its filesystem is unmounted, so that records read
/// after a pod's deletion still name the owner.
const RETIRED_GRACE: Duration = Duration::from_secs(120);
/// At most one "map full" warning per map per this interval.
const FULL_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Counters for status and metrics, shared with the outputs.
#[derive(Debug, Default)]
pub struct WatchStatus {
    /// Filesystems (pod volumes) watched in the kernel.
    pub volumes: AtomicU64,
    /// Inventory files and directories watched in the kernel.
    pub inventory: AtomicU64,
    /// Inserts the kernel refused (map full); retried on the next sync.
    pub map_full: AtomicU64,
    /// Entries waiting for room in a full map right now.
    pub pending: AtomicU64,
    /// The watched filesystems as read back from the kernel map after the last sync.
    pub kernel_filesystems: Mutex<Vec<u32>>,
}

/// The kernel's file-identity maps and what each entry stands for.
pub struct Watching {
    kubelet_root: String,
    roots: Vec<InventoryRoot>,
    mounts: Vec<MountEntry>,
    volumes: BTreeMap<u32, VolumeFs>,
    retired: BTreeMap<u32, (VolumeFs, Instant)>,
    inventory: BTreeMap<FileKey, InventoryEntry>,
    status: Arc<WatchStatus>,
    last_full_warn: Option<Instant>,
}

fn key(e: &InventoryEntry) -> FileKey {
    FileKey {
        dev: e.dev,
        _pad: 0,
        ino: e.ino,
    }
}

impl Watching {
    /// `extra_roots` are the configured watch prefixes that are directories or files on
    /// the node: they join the inventory.
    pub fn new(kubelet_root: &str, extra_roots: &[String]) -> Self {
        let mut roots = default_node_roots(kubelet_root, &home_dirs());
        for p in extra_roots {
            let path = std::path::PathBuf::from(p.trim_end_matches('/'));
            // The kubelet's pod directory is covered by the volume filesystems; walking
            // it would add every pod's bookkeeping files.
            if p.trim_end_matches('/')
                .ends_with(&format!("{}/pods", kubelet_root.trim_end_matches('/')))
            {
                continue;
            }
            if !roots.iter().any(|r| r.path == path) {
                roots.push(InventoryRoot { path, class: None });
            }
        }
        Self {
            kubelet_root: kubelet_root.to_owned(),
            roots,
            mounts: Vec::new(),
            volumes: BTreeMap::new(),
            retired: BTreeMap::new(),
            inventory: BTreeMap::new(),
            status: Arc::new(WatchStatus::default()),
            last_full_warn: None,
        }
    }

    pub fn status(&self) -> Arc<WatchStatus> {
        self.status.clone()
    }

    /// The volume a filesystem belongs to (also shortly after it was unmounted).
    pub fn volume(&self, dev: u32) -> Option<&VolumeFs> {
        self.volumes
            .get(&dev)
            .or_else(|| self.retired.get(&dev).map(|(v, _)| v))
    }

    /// The inventory entry of a file or directory.
    pub fn inventory(&self, dev: u32, ino: u64) -> Option<&InventoryEntry> {
        self.inventory.get(&FileKey { dev, _pad: 0, ino })
    }

    /// The node path of a file given by its filesystem and its path within it.
    pub fn host_path(&self, dev: u32, within_fs: &str) -> Option<String> {
        host_path(&self.mounts, dev, within_fs)
    }

    /// Re-reads the mount table and brings the volume map up to date; with `inventory`,
    /// also walks the node credential directories again.
    pub fn sync(&mut self, probes: &mut Probes, inventory: bool) {
        match std::fs::read_to_string(MOUNTINFO) {
            Ok(text) => self.mounts = parse_mountinfo(&text),
            Err(e) => warn!("reading {MOUNTINFO}: {e}; watched volumes not updated"),
        }
        let mut full = 0u64;
        let wanted: BTreeMap<u32, VolumeFs> = volume_filesystems(&self.mounts, &self.kubelet_root)
            .into_iter()
            .map(|v| (v.dev, v))
            .collect();
        let gone: Vec<u32> = self
            .volumes
            .keys()
            .filter(|d| !wanted.contains_key(d))
            .copied()
            .collect();
        for dev in gone {
            if let Err(e) = probes.unwatch_fs(dev) {
                warn!("removing watched filesystem {dev:#x}: {e}");
            }
            if let Some(v) = self.volumes.remove(&dev) {
                info!(
                    "volume {} of pod {} unmounted; no longer watched",
                    v.volume, v.pod_uid
                );
                self.retired.insert(dev, (v, Instant::now()));
            }
        }
        for (dev, v) in wanted {
            if self.volumes.contains_key(&dev) {
                continue;
            }
            match probes.watch_fs(dev) {
                Ok(()) => {
                    info!(
                        "watching volume {} of pod {} ({}, dev {}:{})",
                        v.volume,
                        v.pod_uid,
                        v.mount_point,
                        dev >> 20,
                        dev & 0xf_ffff
                    );
                    self.retired.remove(&dev);
                    self.volumes.insert(dev, v);
                }
                Err(e) => {
                    full += 1;
                    self.warn_full(WATCH_FS_MAP, &v.mount_point, &e.to_string());
                }
            }
        }
        let now = Instant::now();
        self.retired
            .retain(|_, (_, at)| now.duration_since(*at) < RETIRED_GRACE);

        if inventory {
            full += self.sync_inventory(probes);
        }
        self.status
            .volumes
            .store(self.volumes.len() as u64, Ordering::Relaxed);
        self.status
            .inventory
            .store(self.inventory.len() as u64, Ordering::Relaxed);
        self.status.pending.store(full, Ordering::Relaxed);
        match probes.watched_fs() {
            Ok(devs) => {
                if let Ok(mut k) = self.status.kernel_filesystems.lock() {
                    *k = devs;
                }
            }
            Err(e) => warn!("reading back {WATCH_FS_MAP}: {e}"),
        }
        self.status.map_full.fetch_add(full, Ordering::Relaxed);
    }

    fn sync_inventory(&mut self, probes: &mut Probes) -> u64 {
        let found = node_inventory(
            &self.roots,
            &self.kubelet_root,
            InventoryLimits {
                max_entries: INVENTORY_MAX_ENTRIES,
                max_depth: INVENTORY_MAX_DEPTH,
            },
        );
        for e in &found.errors {
            warn!("credential inventory: {e}");
        }
        if found.truncated {
            warn!(
                "credential inventory stopped at {INVENTORY_MAX_ENTRIES} entries; files beyond are watched by path only"
            );
        }
        let wanted: BTreeMap<FileKey, InventoryEntry> =
            found.entries.into_iter().map(|e| (key(&e), e)).collect();
        let installed: BTreeSet<FileKey> = self.inventory.keys().copied().collect();
        let gone: Vec<FileKey> = installed
            .iter()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for k in gone {
            if let Err(e) = probes.unwatch_file(k) {
                warn!("removing inventory entry {}:{}: {e}", k.dev, k.ino);
            }
            self.inventory.remove(&k);
        }
        let mut full = 0;
        for (k, e) in wanted {
            // A rewritten file keeps its key only if it kept its inode; the entry is
            // refreshed either way (its path or class may have changed).
            if installed.contains(&k) {
                self.inventory.insert(k, e);
                continue;
            }
            match probes.watch_file(k, e.is_dir) {
                Ok(()) => {
                    self.inventory.insert(k, e);
                }
                Err(err) => {
                    full += 1;
                    self.warn_full(WATCH_FILES_MAP, &e.path, &err.to_string());
                }
            }
        }
        full
    }

    fn warn_full(&mut self, map: &str, what: &str, err: &str) {
        let now = Instant::now();
        if self
            .last_full_warn
            .is_none_or(|t| now.duration_since(t) >= FULL_WARN_INTERVAL)
        {
            self.last_full_warn = Some(now);
            warn!("kernel map {map} refused {what}: {err}; retried on the next sync (further refusals counted in agent_monitor_kernel_map_full_total)");
        }
    }
}
