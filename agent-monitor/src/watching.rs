//! Keeps the kernel's file-identity maps current: the filesystems of pods' Secret and
//! projected volumes (found in the mount table) and the node credential inventory (found
//! by walking the node's credential directories, again whenever inotify says one of them
//! changed), and answers, for a record, which volume or inventory entry a (device, inode)
//! is.
//!
//! The maps are kept declaratively: every sync computes what should be watched, removes
//! what no longer should and adds what is new. An insert the kernel refuses (a full map)
//! is logged, counted, and retried on the next sync, never forgotten.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use agent_monitor_common::{dev_flags, FileKey};
use tracing::info;

use crate::{
    identity::watched::{
        default_node_roots, dev_name, diff, home_dirs, host_path, node_inventory, parse_mountinfo,
        volume_filesystems, InventoryEntry, InventoryLimits, InventoryRoot, MountEntry, VolumeFs,
    },
    probes::{Probes, WATCH_DEVS_MAP, WATCH_FILES_MAP},
};

pub use crate::identity::watched::WatchStatus;

/// The mount table the daemon sees: the host's, since the DaemonSet runs in the host's
/// mount namespace (or with the host's `/proc` mounted).
pub const MOUNTINFO: &str = "/proc/self/mountinfo";
/// Deepest directory walked below an inventory root.
const INVENTORY_MAX_DEPTH: usize = 8;
/// How long a volume stays known after its filesystem is unmounted, so that records read
/// after a pod's deletion still name the owner.
const RETIRED_GRACE: Duration = Duration::from_secs(120);

/// The kernel's file-identity maps and what each entry stands for.
pub struct Watching {
    kubelet_root: String,
    roots: Vec<InventoryRoot>,
    mounts: Vec<MountEntry>,
    volumes: BTreeMap<u32, VolumeFs>,
    retired: BTreeMap<u32, (VolumeFs, Instant)>,
    inventory: BTreeMap<FileKey, InventoryEntry>,
    inventory_capacity: usize,
    /// Inventory files the kernel refused on the last walk (retried on the next).
    inventory_refused: u64,
    /// Inventory directories, for inotify.
    dirs: Vec<String>,
    /// What the kernel's watched-device map holds (as far as inserts succeeded).
    devs: BTreeMap<u32, u8>,
    status: Arc<WatchStatus>,
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
    /// `inventory_capacity` is the kernel inventory map's size: the walk stops there.
    pub fn new(kubelet_root: &str, extra_roots: &[String], inventory_capacity: usize) -> Self {
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
            inventory_capacity,
            inventory_refused: 0,
            dirs: Vec::new(),
            devs: BTreeMap::new(),
            status: Arc::new(WatchStatus::default()),
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

    /// The inventory's directories, as of the last walk.
    pub fn inventory_dirs(&self) -> &[String] {
        &self.dirs
    }

    /// The node path of a file given by its filesystem and its path within it.
    pub fn host_path(&self, dev: u32, within_fs: &str) -> Option<String> {
        host_path(&self.mounts, dev, within_fs)
    }

    /// Re-reads the mount table and learns which filesystems are pod volumes (those
    /// unmounted are kept a grace period). No kernel map is touched: [`Watching::sync`]
    /// installs what this learned.
    pub fn sync_volumes(&mut self) {
        match std::fs::read_to_string(MOUNTINFO) {
            Ok(text) => self.mounts = parse_mountinfo(&text),
            Err(e) => crate::warn_limited!(
                "mountinfo-read",
                "reading {MOUNTINFO}: {e}; watched volumes not updated"
            ),
        }
        let wanted: BTreeMap<u32, VolumeFs> = volume_filesystems(&self.mounts, &self.kubelet_root)
            .into_iter()
            .map(|v| (v.dev, v))
            .collect();
        let known: BTreeSet<u32> = self.volumes.keys().copied().collect();
        let (add, gone) = diff(&known, &wanted.keys().copied().collect());
        for dev in gone {
            if let Some(v) = self.volumes.remove(&dev) {
                info!(
                    "volume {} of pod {} unmounted; no longer watched",
                    v.volume, v.pod_uid
                );
                self.retired.insert(dev, (v, Instant::now()));
            }
        }
        for dev in add {
            if let Some(v) = wanted.get(&dev) {
                info!(
                    "watching volume {} of pod {} ({}, dev {})",
                    v.volume,
                    v.pod_uid,
                    v.mount_point,
                    dev_name(dev)
                );
                self.retired.remove(&dev);
                self.volumes.insert(dev, v.clone());
            }
        }
        let now = Instant::now();
        self.retired
            .retain(|_, (_, at)| now.duration_since(*at) < RETIRED_GRACE);
    }

    /// Re-reads the mount table and brings the volume map up to date; with `inventory`,
    /// also walks the node credential directories again.
    pub fn sync(&mut self, probes: &mut Probes, inventory: bool) {
        self.sync_volumes();
        let mut refused = 0;
        if inventory {
            refused += self.sync_inventory(probes);
        }
        let devs_refused = self.sync_devs(probes);
        refused += devs_refused;
        let volumes_in_kernel = self
            .devs
            .values()
            .filter(|f| *f & dev_flags::VOLUME != 0)
            .count();
        self.status
            .volumes
            .store(volumes_in_kernel as u64, Ordering::Relaxed);
        self.status
            .inventory
            .store(self.inventory.len() as u64, Ordering::Relaxed);
        // What waits for room now: devices refused just now, inventory files refused by
        // the last walk.
        self.status
            .pending
            .store(devs_refused + self.inventory_refused, Ordering::Relaxed);
        match probes.watched_devs() {
            Ok(devs) => {
                if let Ok(mut k) = self.status.kernel_filesystems.lock() {
                    *k = devs
                        .into_iter()
                        .filter(|(_, f)| f & dev_flags::VOLUME != 0)
                        .map(|(d, _)| d)
                        .collect();
                }
            }
            Err(e) => crate::warn_limited!("devs-read-back", "reading back {WATCH_DEVS_MAP}: {e}"),
        }
        self.status.map_full.fetch_add(refused, Ordering::Relaxed);
    }

    fn sync_inventory(&mut self, probes: &mut Probes) -> u64 {
        let walk = self.status.walks_begun.fetch_add(1, Ordering::SeqCst) + 1;
        let full = self.walk_inventory(probes);
        self.status.walks_done.store(walk, Ordering::SeqCst);
        full
    }

    fn walk_inventory(&mut self, probes: &mut Probes) -> u64 {
        let found = node_inventory(
            &self.roots,
            &self.kubelet_root,
            InventoryLimits {
                max_entries: self.inventory_capacity,
                max_depth: INVENTORY_MAX_DEPTH,
            },
        );
        for e in &found.errors {
            crate::warn_limited!("inventory-walk", "credential inventory: {e}");
        }
        if found.truncated {
            crate::warn_limited!(
                "inventory-full",
                "credential inventory stopped at {} entries (kernel_maps.inventory_files); files beyond are watched by path only",
                self.inventory_capacity
            );
        }
        // Files go to the kernel; directories are watched with inotify, so a file created
        // in one joins the inventory at once.
        let (dirs, files): (Vec<InventoryEntry>, Vec<InventoryEntry>) =
            found.entries.into_iter().partition(|e| e.is_dir);
        self.dirs = dirs.into_iter().map(|e| e.path).collect();
        let wanted: BTreeMap<FileKey, InventoryEntry> =
            files.into_iter().map(|e| (key(&e), e)).collect();
        let installed: BTreeSet<FileKey> = self.inventory.keys().copied().collect();
        let (add, gone) = diff(&installed, &wanted.keys().copied().collect());
        for k in gone {
            if let Err(e) = probes.unwatch_file(k) {
                crate::warn_limited!(
                    "inventory-remove",
                    "removing inventory entry {}:{}: {e}",
                    k.dev,
                    k.ino
                );
            }
            self.inventory.remove(&k);
        }
        let mut full = 0;
        for k in add {
            let Some(e) = wanted.get(&k) else {
                continue;
            };
            match probes.watch_file(k) {
                Ok(()) => {
                    self.inventory.insert(k, e.clone());
                }
                Err(err) => {
                    full += 1;
                    self.warn_full(WATCH_FILES_MAP, &e.path, &err.to_string());
                }
            }
        }
        // Entries kept refresh their path and class (a rewritten file that kept its inode).
        for (k, e) in wanted {
            if let Some(slot) = self.inventory.get_mut(&k) {
                *slot = e;
            }
        }
        self.inventory_refused = full;
        full
    }

    /// Brings the kernel's watched-device map in line with the volumes and the inventory
    /// entries in the kernel. Returns the inserts refused.
    fn sync_devs(&mut self, probes: &mut Probes) -> u64 {
        let mut wanted: BTreeMap<u32, u8> = BTreeMap::new();
        for dev in self.volumes.keys() {
            *wanted.entry(*dev).or_default() |= dev_flags::VOLUME;
        }
        for e in self.inventory.values() {
            *wanted.entry(e.dev).or_default() |= dev_flags::FILES;
        }
        let installed: BTreeSet<u32> = self.devs.keys().copied().collect();
        let (_, gone) = diff(&installed, &wanted.keys().copied().collect());
        for dev in gone {
            if let Err(e) = probes.clear_dev(dev) {
                crate::warn_limited!(
                    "device-remove",
                    "removing watched device {}: {e}",
                    dev_name(dev)
                );
            }
            self.devs.remove(&dev);
        }
        let mut full = 0;
        for (dev, flags) in wanted {
            if self.devs.get(&dev) == Some(&flags) {
                continue;
            }
            match probes.set_dev_flags(dev, flags) {
                Ok(()) => {
                    self.devs.insert(dev, flags);
                }
                Err(e) => {
                    full += 1;
                    let what = format!("device {}", dev_name(dev));
                    self.warn_full(WATCH_DEVS_MAP, &what, &e.to_string());
                }
            }
        }
        full
    }

    fn warn_full(&mut self, map: &str, what: &str, err: &str) {
        crate::warn_limited!(
            "kernel-map-full",
            "kernel map {map} refused {what}: {err}; retried on the next sync (refusals counted in agent_monitor_kernel_map_refusals_total)"
        );
    }
}

/// Most directories watched with inotify (each costs one of the user's
/// `fs.inotify.max_user_watches`).
const MAX_DIR_WATCHES: usize = 1024;

/// inotify watches on the inventory's directories: any entry created, removed, renamed or
/// rewritten in one of them makes the daemon walk the inventory again, so a rewritten
/// kubeconfig or a rotated certificate is watched by its new inode at once.
pub struct DirWatch {
    fd: std::os::fd::OwnedFd,
    watches: BTreeMap<String, i32>,
}

impl std::os::fd::AsRawFd for DirWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl DirWatch {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Self {
            fd,
            watches: BTreeMap::new(),
        })
    }

    /// Watches exactly `dirs` (up to [`MAX_DIR_WATCHES`]).
    pub fn set(&mut self, dirs: &[String]) {
        use std::os::fd::AsRawFd as _;
        let wanted: BTreeSet<&String> = dirs.iter().take(MAX_DIR_WATCHES).collect();
        let gone: Vec<String> = self
            .watches
            .keys()
            .filter(|d| !wanted.contains(d))
            .cloned()
            .collect();
        for d in gone {
            if let Some(wd) = self.watches.remove(&d) {
                // SAFETY: plain syscall on our descriptor; a stale wd is harmless.
                unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
            }
        }
        const MASK: u32 = libc::IN_CREATE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE
            | libc::IN_CLOSE_WRITE
            | libc::IN_ATTRIB
            | libc::IN_DELETE_SELF
            | libc::IN_ONLYDIR;
        for d in wanted {
            if self.watches.contains_key(d) {
                continue;
            }
            let Ok(c) = std::ffi::CString::new(d.as_str()) else {
                continue;
            };
            // SAFETY: valid C string and our descriptor.
            let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
            if wd < 0 {
                crate::warn_limited!(
                    "inotify-add",
                    "inotify on {d}: {}; files created there are found by the periodic walk",
                    std::io::Error::last_os_error()
                );
                continue;
            }
            self.watches.insert(d.clone(), wd);
        }
        if dirs.len() > MAX_DIR_WATCHES {
            crate::warn_limited!(
                "inotify-too-many",
                "{} inventory directories; inotify watches the first {MAX_DIR_WATCHES}, the rest are walked every sync",
                dirs.len()
            );
        }
    }

    /// Reads and discards every pending event; returns whether there was any.
    pub fn drain(&self) -> bool {
        use std::os::fd::AsRawFd as _;
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            // SAFETY: the buffer is valid for its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return any;
            }
            any = true;
        }
    }
}
