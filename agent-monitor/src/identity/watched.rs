//! Which files the kernel-side matcher watches, by file identity rather than by path.
//!
//! A path is a poor key in the kernel: one file has many spellings (bind mounts, the
//! container's view, `/var/run`, the kubelet's `..data` swaps), and resolving a path on
//! every `open` is costly. The kernel side instead matches an opened file by its
//! superblock's device (a pod's Secret or projected volume is its own tmpfs), by its
//! (device, inode), or by its parent directory's (device, inode). This module computes
//! those sets in userspace from the mount table and from file metadata (`stat`, `lstat`,
//! `read_dir`); it never opens a credential file. It also maps what the kernel reports
//! back (a device and a path within that filesystem) to a host path.

use std::{
    collections::BTreeSet,
    fs::Metadata,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::credentials::{classify, normalize, CredentialClass};

/// Counters for status and metrics, shared with the outputs (kept current by `watching`).
#[derive(Debug, Default)]
pub struct WatchStatus {
    /// Filesystems (pod volumes) watched in the kernel.
    pub volumes: std::sync::atomic::AtomicU64,
    /// Inventory files and directories watched in the kernel.
    pub inventory: std::sync::atomic::AtomicU64,
    /// Inserts the kernel refused (map full); retried on the next sync.
    pub map_full: std::sync::atomic::AtomicU64,
    /// Entries waiting for room in a full map right now.
    pub pending: std::sync::atomic::AtomicU64,
    /// Walks of the inventory begun, and the number of the last one finished: a walk
    /// numbered above what `walks_begun` read at some moment saw the files as they were
    /// then.
    pub walks_begun: std::sync::atomic::AtomicU64,
    pub walks_done: std::sync::atomic::AtomicU64,
    /// The watched filesystems as read back from the kernel map after the last sync.
    pub kernel_filesystems: std::sync::Mutex<Vec<u32>>,
}

/// Bits of the minor number in the kernel's `dev_t`: `MINORBITS` in
/// https://github.com/torvalds/linux/blob/v6.18/include/linux/kdev_t.h
const KERNEL_MINOR_BITS: u32 = 20;
/// `MINORMASK` in the same header.
const KERNEL_MINOR_MASK: u32 = (1 << KERNEL_MINOR_BITS) - 1;
/// Most entries read from one directory of the inventory; a credential directory with
/// more is not one, and reading it whole would cost memory for nothing.
const MAX_DIR_SCAN: usize = 65_536;
/// Most errors kept by one inventory (the rest are counted in the last message).
const MAX_ERRORS: usize = 64;
/// Most home directories taken from `/home`.
const MAX_HOME_DIRS: usize = 4_096;
/// The kubelet's volume directories: `<plugin dir>` under `pods/<uid>/volumes/`. See
/// `getPodVolumeDir` in
/// https://github.com/kubernetes/kubernetes/blob/v1.34.0/pkg/kubelet/kubelet_getters.go
const SECRET_PLUGIN_DIR: &str = "kubernetes.io~secret";
const PROJECTED_PLUGIN_DIR: &str = "kubernetes.io~projected";
const CSI_PLUGIN_DIR: &str = "kubernetes.io~csi";

/// The kernel's encoding of a device number, as in `super_block.s_dev`: `MKDEV(ma, mi)`,
/// https://github.com/torvalds/linux/blob/v6.18/include/linux/kdev_t.h
/// (unlike glibc's `st_dev`, which splits the minor around the major).
pub fn kernel_dev(major: u32, minor: u32) -> u32 {
    // Kernel minors fit in 20 bits; masking keeps a bogus one from clobbering the major.
    (major << KERNEL_MINOR_BITS) | (minor & KERNEL_MINOR_MASK)
}

/// `major:minor` of a device number in the kernel's encoding, as mountinfo prints it.
pub fn dev_name(dev: u32) -> String {
    // Written without `format!`: one per open event.
    let mut name = String::with_capacity(12);
    name.push_str(itoa::Buffer::new().format(dev >> KERNEL_MINOR_BITS));
    name.push(':');
    name.push_str(itoa::Buffer::new().format(dev & KERNEL_MINOR_MASK));
    name
}

/// The kernel encoding of a userspace `st_dev` (`new_encode_dev` in kdev_t.h turns the
/// kernel's into this one; libc's `major`/`minor` undo it).
pub fn kernel_dev_of_st_dev(st_dev: u64) -> u32 {
    kernel_dev(libc::major(st_dev), libc::minor(st_dev))
}

/// One line of `/proc/<pid>/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem mounted here (`/` unless a bind mount of a subtree).
    pub root: String,
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    /// The device in the kernel's encoding.
    pub fn dev(&self) -> u32 {
        kernel_dev(self.major, self.minor)
    }
}

/// Undoes the octal escapes of `mangle()` (space, tab, newline, backslash), see
/// `show_mountinfo` in https://github.com/torvalds/linux/blob/v6.18/fs/proc_namespace.c
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| {
            b[i] == b'\\' && d[0] <= b'3' && d.iter().all(|c| (b'0'..=b'7').contains(c))
        });
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |acc, c| (acc << 3) | (c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    // Fields are separated by single spaces; a field may be empty (an empty source).
    let mut it = line.split(' ');
    let mount_id = it.next()?.parse().ok()?;
    let parent_id = it.next()?.parse().ok()?;
    let (major, minor) = it.next()?.split_once(':')?;
    let (major, minor) = (major.parse().ok()?, minor.parse().ok()?);
    let root = unescape(it.next()?);
    let mount_point = unescape(it.next()?);
    let _options = it.next()?;
    // Optional fields (`shared:5 master:1`, or none) end at a lone "-".
    it.by_ref().find(|f| *f == "-")?;
    let fs_type = unescape(it.next()?);
    let source = unescape(it.next()?);
    if !root.starts_with('/') || !mount_point.starts_with('/') || fs_type.is_empty() {
        return None;
    }
    Some(MountEntry {
        mount_id,
        parent_id,
        major,
        minor,
        root,
        mount_point,
        fs_type,
        source,
    })
}

/// Parses `/proc/<pid>/mountinfo`, skipping malformed lines.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

/// The volume plugin of a pod's credential volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VolumePlugin {
    Secret,
    Projected,
    /// A CSI volume, such as the Secrets Store CSI driver's.
    Csi,
}

/// A pod credential volume that is a filesystem of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFs {
    /// Kernel encoding.
    pub dev: u32,
    pub pod_uid: String,
    pub plugin: VolumePlugin,
    pub volume: String,
    pub mount_point: String,
}

/// The pod, plugin and volume of a normalized mount point, if it is exactly a credential
/// volume's directory: `<uid>/volumes/<plugin>/<volume>` under `pods_dir` (for CSI, the
/// `mount` directory below it, where the kubelet has the driver mount).
fn volume_dir(pods_dir: &str, mount_point: &str) -> Option<(String, VolumePlugin, String)> {
    let parts: Vec<&str> = mount_point.strip_prefix(pods_dir)?.split('/').collect();
    let (uid, plugin, volume, tail) = match parts.as_slice() {
        [uid, "volumes", plugin, volume, tail @ ..] => (*uid, *plugin, *volume, tail),
        _ => return None,
    };
    let plugin = match (plugin, tail) {
        (SECRET_PLUGIN_DIR, []) => VolumePlugin::Secret,
        (PROJECTED_PLUGIN_DIR, []) => VolumePlugin::Projected,
        (CSI_PLUGIN_DIR, ["mount"]) => VolumePlugin::Csi,
        _ => return None,
    };
    (!uid.is_empty() && !volume.is_empty()).then(|| (uid.to_owned(), plugin, volume.to_owned()))
}

/// Pod credential volumes that are filesystems of their own, one per device.
///
/// The kubelet mounts each Secret and projected volume as a tmpfs of its own (and CSI
/// drivers mount theirs), so matching the superblock's device matches exactly that
/// volume's files, whatever the kubelet's atomic writer renames. A volume that shares its
/// device with `/`, or that is a bind mount of a subtree (root other than `/`), is not
/// its own filesystem (e.g. the kubelet runs without tmpfs) and is left out: its device
/// would match unrelated files.
pub fn volume_filesystems(mounts: &[MountEntry], kubelet_root: &str) -> Vec<VolumeFs> {
    let pods_dir = format!("{}/pods/", normalize(kubelet_root).trim_end_matches('/'));
    let root_devs: BTreeSet<u32> = mounts
        .iter()
        .filter(|m| normalize(&m.mount_point) == "/")
        .map(MountEntry::dev)
        .collect();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for m in mounts {
        let dev = m.dev();
        if m.root != "/" || root_devs.contains(&dev) {
            continue;
        }
        let Some((pod_uid, plugin, volume)) = volume_dir(&pods_dir, &normalize(&m.mount_point))
        else {
            continue;
        };
        // The same tmpfs may appear twice (propagated into another mount namespace view);
        // the first, the kubelet's own mount, is kept.
        if seen.insert(dev) {
            out.push(VolumeFs {
                dev,
                pod_uid,
                plugin,
                volume,
                mount_point: m.mount_point.clone(),
            });
        }
    }
    out
}

/// The rest of `path` after `prefix`, when `prefix` is a leading run of its components.
fn strip_components<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// The host path of a file the kernel reports as `within_fs` (its dentry path up to the
/// superblock's root) on device `dev` (kernel encoding): through the mount of that device
/// that shows it with the shortest mount point, preferring a mount of the whole
/// filesystem (root `/`) over a bind mount of a subtree.
pub fn host_path(mounts: &[MountEntry], dev: u32, within_fs: &str) -> Option<String> {
    let within_fs = format!("/{}", within_fs.trim_start_matches('/'));
    let (m, rest) = mounts
        .iter()
        .filter(|m| m.dev() == dev)
        .filter_map(|m| Some((m, strip_components(&within_fs, &m.root)?)))
        .min_by_key(|(m, _)| (m.root != "/", m.mount_point.len()))?;
    let path = format!("{}{rest}", m.mount_point.trim_end_matches('/'));
    Some(path)
        .filter(|p| !p.is_empty())
        .or_else(|| Some("/".into()))
}

/// One watched file or directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryEntry {
    /// Kernel encoding.
    pub dev: u32,
    pub ino: u64,
    /// A directory: the kernel matches files whose parent it is.
    pub is_dir: bool,
    pub path: String,
    /// For a directory, the class of a file in it.
    pub class: CredentialClass,
}

/// A file or directory tree of node credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryRoot {
    pub path: PathBuf,
    /// `None`: classify each file by its path.
    pub class: Option<CredentialClass>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InventoryLimits {
    /// Most entries, over all roots.
    pub max_entries: usize,
    /// Deepest level walked below a root directory (its children are level 1; 0 keeps
    /// only the root directory itself).
    pub max_depth: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub entries: Vec<InventoryEntry>,
    /// `max_entries` (or `MAX_DIR_SCAN` in one directory) was reached.
    pub truncated: bool,
    /// Unreadable roots and directories, each with its path.
    pub errors: Vec<String>,
}

/// What [`Walk::add`] did.
#[derive(PartialEq, Eq)]
enum Added {
    New,
    /// Already recorded: not again, and a directory is not walked again (a bind mount of
    /// a directory below itself would otherwise loop down to `max_depth`).
    Seen,
    /// `max_entries` reached.
    Full,
}

/// Builds one inventory; holds what the walk of every root shares.
struct Walk<'a> {
    kubelet_root: &'a str,
    limits: InventoryLimits,
    /// (dev, ino) already recorded: hard links, symlinks and overlapping roots are one file.
    seen: BTreeSet<(u32, u64)>,
    out: Inventory,
    errors_dropped: usize,
}

impl Walk<'_> {
    fn error(&mut self, path: &Path, e: impl std::fmt::Display) {
        if self.out.errors.len() < MAX_ERRORS {
            self.out.errors.push(format!("{}: {e}", path.display()));
        } else {
            self.errors_dropped += 1;
        }
    }

    /// Records one entry.
    fn add(&mut self, path: &Path, md: &Metadata, class: Option<CredentialClass>) -> Added {
        let dev = kernel_dev_of_st_dev(md.dev());
        if self.seen.contains(&(dev, md.ino())) {
            return Added::Seen;
        }
        if self.out.entries.len() >= self.limits.max_entries {
            self.out.truncated = true;
            return Added::Full;
        }
        self.seen.insert((dev, md.ino()));
        let path = path.to_string_lossy().into_owned();
        let class = class.unwrap_or_else(|| {
            // A directory is classified as a file in it would be.
            let probe = if md.is_dir() {
                format!("{path}/x")
            } else {
                path.clone()
            };
            classify(&probe, self.kubelet_root, None, None).class
        });
        self.out.entries.push(InventoryEntry {
            dev,
            ino: md.ino(),
            is_dir: md.is_dir(),
            path,
            class,
        });
        Added::New
    }

    /// Walks below the root directory `dir`; false once `max_entries` is reached.
    fn walk(&mut self, dir: &Path, root_st_dev: u64, class: Option<CredentialClass>) -> bool {
        // Depth-first, children in name order; the stack holds (directory, its depth).
        let mut stack = vec![(dir.to_path_buf(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            if depth >= self.limits.max_depth {
                continue;
            }
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) => {
                    self.error(&dir, e);
                    continue;
                }
            };
            let mut names = Vec::new();
            for entry in rd {
                match entry {
                    Ok(_) if names.len() >= MAX_DIR_SCAN => {
                        self.out.truncated = true;
                        self.error(&dir, format!("more than {MAX_DIR_SCAN} entries"));
                        break;
                    }
                    Ok(e) => names.push(e.file_name()),
                    Err(e) => self.error(&dir, e),
                }
            }
            names.sort();
            let mut subdirs = Vec::new();
            for name in names {
                let path = dir.join(name);
                // lstat: a symlinked directory is never followed (loops, trees elsewhere).
                let Ok(lmd) = std::fs::symlink_metadata(&path) else {
                    continue; // Gone since read_dir.
                };
                let md = if lmd.file_type().is_symlink() {
                    // A symlinked file is recorded by its target's inode (the kubelet's
                    // `kubelet-client-current.pem`); a dangling one is skipped.
                    match std::fs::metadata(&path) {
                        Ok(md) if md.is_file() => md,
                        _ => continue,
                    }
                } else {
                    lmd
                };
                // Another filesystem mounted below the root is not walked into.
                if !(md.is_file() || (md.is_dir() && md.dev() == root_st_dev)) {
                    continue;
                }
                match self.add(&path, &md, class) {
                    Added::Full => return false,
                    Added::New if md.is_dir() => subdirs.push(path),
                    _ => {}
                }
            }
            stack.extend(subdirs.into_iter().rev().map(|p| (p, depth + 1)));
        }
        true
    }
}

/// The (device, inode) of every node credential file and directory under `roots`.
///
/// The device is `stat`'s, which is the superblock's on ext4, xfs and tmpfs; on btrfs it
/// is the subvolume's anonymous device instead (`btrfs_getattr` in
/// https://github.com/torvalds/linux/blob/v6.18/fs/btrfs/inode.c), not `s_dev`.
pub fn node_inventory(
    roots: &[InventoryRoot],
    kubelet_root: &str,
    limits: InventoryLimits,
) -> Inventory {
    let mut w = Walk {
        kubelet_root,
        limits,
        seen: BTreeSet::new(),
        out: Inventory::default(),
        errors_dropped: 0,
    };
    for root in roots {
        // stat, not lstat: a root that is a symlink stands for its target.
        let md = match std::fs::metadata(&root.path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                w.error(&root.path, e);
                continue;
            }
        };
        if !(md.is_file() || md.is_dir()) {
            continue;
        }
        match w.add(&root.path, &md, root.class) {
            Added::Full => break,
            Added::New if md.is_dir() && !w.walk(&root.path, md.dev(), root.class) => break,
            _ => {}
        }
    }
    if w.errors_dropped > 0 {
        w.out
            .errors
            .push(format!("{} more errors not shown", w.errors_dropped));
    }
    w.out
}

/// Where node credentials live: kubeadm's, the kubelet's, k3s's, and the cloud CLIs' and
/// kubectl's in each home directory.
pub fn default_node_roots(kubelet_root: &str, home_dirs: &[PathBuf]) -> Vec<InventoryRoot> {
    use CredentialClass::*;
    let root = |path: PathBuf, class| InventoryRoot { path, class };
    let kroot = Path::new(kubelet_root);
    let mut out = vec![
        root("/etc/kubernetes".into(), None),
        root(kroot.join("pki"), Some(NodePki)),
        root(kroot.join("kubeconfig"), Some(NodeKubeconfig)),
        root("/etc/kubernetes/kubelet.conf".into(), Some(NodeKubeconfig)),
    ];
    if normalize(kubelet_root) != "/var/lib/kubelet" {
        out.push(root(
            "/var/lib/kubelet/kubeconfig".into(),
            Some(NodeKubeconfig),
        ));
    }
    out.push(root("/etc/rancher/k3s".into(), None));
    out.push(root("/var/lib/rancher/k3s/server".into(), None));
    for home in home_dirs {
        out.push(root(home.join(".kube"), Some(NodeKubeconfig)));
        for dir in [".aws", ".config/gcloud", ".azure"] {
            out.push(root(home.join(dir), Some(CloudCredentials)));
        }
    }
    out
}

/// `/root` and every directory in `/home`.
pub fn home_dirs() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir("/home")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .take(MAX_HOME_DIRS)
        .collect();
    out.sort();
    out.insert(0, PathBuf::from("/root"));
    out
}

/// What to add to and remove from a kernel map holding `installed` so it holds `wanted`.
pub fn diff<K: Ord + Clone>(installed: &BTreeSet<K>, wanted: &BTreeSet<K>) -> (Vec<K>, Vec<K>) {
    (
        wanted.difference(installed).cloned().collect(),
        installed.difference(wanted).cloned().collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn device_names_are_major_colon_minor() {
        assert_eq!(dev_name(kernel_dev(8, 1)), "8:1");
        assert_eq!(dev_name(kernel_dev(0, 0)), "0:0");
        assert_eq!(dev_name(kernel_dev(4095, 1_048_575)), "4095:1048575");
    }

    const A: &str = "1f7c9a2e-5b3d-4c1a-9e8f-0a1b2c3d4e5f";
    const B: &str = "0a0a0a0a-1111-2222-3333-444444444444";

    #[test]
    fn device_numbers_use_the_kernel_encoding() {
        assert_eq!(kernel_dev(8, 1), 0x0080_0001);
        assert_eq!(kernel_dev(0, 27), 27);
        assert_eq!(kernel_dev(259, 0x12345), (259 << 20) | 0x12345);
        // glibc's st_dev for 8:1 is 0x801; for 259:0x12345 the minor is split.
        assert_eq!(kernel_dev_of_st_dev(0x801), kernel_dev(8, 1));
        let st = (0x12345u64 & 0xff) | (259 << 8) | ((0x12345u64 & !0xff) << 12);
        assert_eq!(kernel_dev_of_st_dev(st), kernel_dev(259, 0x12345));
    }

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw,nosuid shared:5 master:1 - proc proc rw
24 22 0:5 / /dev rw - devtmpfs udev rw,size=4k
25 22 8:1 /var/lib/my\\040dir /mnt/with\\040space\\011tab rw - ext4 /dev/sda1 rw
26 22 0:30 / /empty rw - tmpfs  rw
garbage line
27 22 x:1 / /bad rw - ext4 /dev/sda1 rw
28 22 0:31 / /nodash rw tmpfs tmpfs rw
";

    #[test]
    fn parses_mountinfo() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 5, "{m:#?}");
        let (ids, dev) = ((m[0].mount_id, m[0].parent_id), (m[0].major, m[0].minor));
        assert_eq!((ids, dev, m[0].dev()), ((22, 1), (8, 1), kernel_dev(8, 1)));
        assert_eq!((m[0].root.as_str(), m[0].mount_point.as_str()), ("/", "/"));
        assert_eq!(
            (m[0].fs_type.as_str(), m[0].source.as_str()),
            ("ext4", "/dev/sda1")
        );
        assert_eq!(
            (m[1].fs_type.as_str(), m[1].source.as_str()),
            ("proc", "proc")
        );
        assert_eq!(
            (m[2].major, m[2].minor, m[2].fs_type.as_str()),
            (0, 5, "devtmpfs")
        );
        assert_eq!(m[3].root, "/var/lib/my dir");
        assert_eq!(m[3].mount_point, "/mnt/with space\ttab");
        // An empty source is a field of its own.
        assert_eq!((m[4].fs_type.as_str(), m[4].source.as_str()), ("tmpfs", ""));
        assert_eq!(unescape(r"a\012b\134c\9"), "a\nb\\c\\9");
        assert_eq!(unescape(r"trailing\04"), r"trailing\04");
    }

    /// A node's table: pods A and B; the same tmpfs twice at its path and bind-mounted
    /// elsewhere; then mounts that are not credential volumes, or not exactly at a volume
    /// directory, or not filesystems of their own.
    const NODE: &str = "\
1 0 8:1 / / rw shared:1 - ext4 /dev/sda1 rw
2 1 0:40 / $P/$A/volumes/kubernetes.io~projected/kube-api-access-a rw shared:40 - tmpfs tmpfs rw
3 1 0:41 / $P/$A/volumes/kubernetes.io~secret/db rw shared:41 - tmpfs tmpfs rw
4 1 0:42 / $P/$B/volumes/kubernetes.io~csi/store/mount rw - tmpfs tmpfs rw
5 1 0:43 / $P/$B/volumes/kubernetes.io~projected/kube-api-access-b rw - tmpfs tmpfs rw
6 3 0:41 / $P/$A/volumes/kubernetes.io~secret/db rw shared:41 - tmpfs tmpfs rw
7 1 0:40 / /run/containerd/x/serviceaccount rw master:40 - tmpfs tmpfs rw
8 1 0:44 / $P/$A/volumes/kubernetes.io~empty-dir/x rw - tmpfs tmpfs rw
9 1 0:45 / $P/$B/volumes/kubernetes.io~csi/store rw - tmpfs tmpfs rw
10 1 0:46 / $P/$A/volumes/kubernetes.io~secret/db/sub rw - tmpfs tmpfs rw
11 1 8:1 / $P/$B/volumes/kubernetes.io~secret/on-root rw - ext4 /dev/sda1 rw
12 1 0:47 /x $P/$B/volumes/kubernetes.io~secret/subtree rw - tmpfs tmpfs rw
13 1 8:1 /etc/kubernetes /host-etc-k8s rw - ext4 /dev/sda1 rw
";

    fn node_mounts(pods_dir: &str) -> Vec<MountEntry> {
        let text = NODE.replace("$P", pods_dir).replace("$A", A);
        parse_mountinfo(&text.replace("$B", B))
    }

    #[test]
    fn finds_pod_volume_filesystems() {
        use VolumePlugin::*;
        let want = [
            ((0, 40), A, Projected, "kube-api-access-a"),
            ((0, 41), A, Secret, "db"),
            ((0, 42), B, Csi, "store"),
            ((0, 43), B, Projected, "kube-api-access-b"),
        ]
        .map(|((ma, mi), u, p, v)| (kernel_dev(ma, mi), u.to_owned(), p, v.to_owned()));
        let mounts = node_mounts("/var/lib/kubelet/pods");
        assert_eq!(mounts.len(), 13);
        for root in [
            "/var/lib/kubelet",
            "/var/lib/kubelet/",
            "//var/lib/./kubelet",
        ] {
            let got: Vec<_> = volume_filesystems(&mounts, root)
                .into_iter()
                .map(|v| (v.dev, v.pod_uid, v.plugin, v.volume))
                .collect();
            assert_eq!(got, want, "{root}");
        }
        let first = &volume_filesystems(&mounts, "/var/lib/kubelet")[0];
        assert_eq!(first.mount_point, mounts[1].mount_point);
        assert!(volume_filesystems(&mounts, "/var/lib/other").is_empty());
        // A /var/run kubelet root matches mount points spelled either way.
        for pods_dir in ["/run/k/pods", "/var/run/k/pods"] {
            let got = volume_filesystems(&node_mounts(pods_dir), "/var/run/k/");
            assert_eq!(got.len(), 4, "{pods_dir}");
        }
    }

    #[test]
    fn maps_kernel_paths_to_host_paths() {
        let mounts = node_mounts("/var/lib/kubelet/pods");
        let root = kernel_dev(8, 1);
        let h = |dev, p| host_path(&mounts, dev, p);
        assert_eq!(
            h(root, "/etc/kubernetes/admin.conf").as_deref(),
            Some("/etc/kubernetes/admin.conf")
        );
        assert_eq!(h(root, "/").as_deref(), Some("/"));
        // Only the bind mount shows its subtree.
        let only_bind = vec![mounts[12].clone()];
        assert_eq!(
            host_path(&only_bind, root, "/etc/kubernetes/pki/ca.key").as_deref(),
            Some("/host-etc-k8s/pki/ca.key")
        );
        assert_eq!(
            host_path(&only_bind, root, "/etc/kubernetes").as_deref(),
            Some("/host-etc-k8s")
        );
        assert_eq!(host_path(&only_bind, root, "/etc/kubernetesX/a"), None);
        // A volume's tmpfs: through the shortest mount point showing it.
        assert_eq!(
            h(kernel_dev(0, 40), "/..2026_11_23_07_00_00.1/token").as_deref(),
            Some("/run/containerd/x/serviceaccount/..2026_11_23_07_00_00.1/token")
        );
        assert_eq!(
            h(kernel_dev(0, 41), "password").as_deref(),
            Some(
                format!("/var/lib/kubelet/pods/{A}/volumes/kubernetes.io~secret/db/password")
                    .as_str()
            )
        );
        assert_eq!(h(kernel_dev(9, 9), "/x"), None);
    }

    fn limits(max_entries: usize, max_depth: usize) -> InventoryLimits {
        InventoryLimits {
            max_entries,
            max_depth,
        }
    }

    fn root(path: PathBuf, class: Option<CredentialClass>) -> InventoryRoot {
        InventoryRoot { path, class }
    }

    /// `<t>/k8s/{admin.conf, pki/{ca.key, etcd/peer.key}, link.conf -> ../outside/real.conf,
    /// linkdir -> ../outside, dangling -> nowhere}`, `<t>/outside/real.conf`.
    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        let k = t.path().join("k8s");
        std::fs::create_dir_all(k.join("pki/etcd")).expect("mkdir");
        std::fs::create_dir_all(t.path().join("outside")).expect("mkdir");
        for f in ["admin.conf", "pki/ca.key", "pki/etcd/peer.key"] {
            std::fs::write(k.join(f), "x").expect("write");
        }
        std::fs::write(t.path().join("outside/real.conf"), "x").expect("write");
        symlink("../outside/real.conf", k.join("link.conf")).expect("symlink");
        symlink("../outside", k.join("linkdir")).expect("symlink");
        symlink("nowhere", k.join("dangling")).expect("symlink");
        t
    }

    fn ino(p: &Path) -> u64 {
        std::fs::metadata(p).expect("stat").ino()
    }

    fn names(inv: &Inventory, t: &Path) -> Vec<String> {
        inv.entries
            .iter()
            .filter_map(|e| {
                e.path
                    .strip_prefix(&*t.to_string_lossy())
                    .map(str::to_owned)
            })
            .collect()
    }

    #[test]
    fn inventories_a_tree() {
        let t = tree();
        let k = t.path().join("k8s");
        // The last is inside the first: recorded once.
        let roots = [
            root(k.clone(), Some(CredentialClass::NodePki)),
            root(t.path().join("missing"), None),
            root(k.join("admin.conf"), None),
        ];
        let inv = node_inventory(&roots, "/var/lib/kubelet", limits(100, 8));
        let want = "/k8s /k8s/admin.conf /k8s/link.conf /k8s/pki /k8s/pki/ca.key /k8s/pki/etcd /k8s/pki/etcd/peer.key";
        assert_eq!(names(&inv, t.path()).join(" "), want);
        assert!(!inv.truncated && inv.errors.is_empty(), "{inv:?}");
        assert!(inv
            .entries
            .iter()
            .all(|e| e.class == CredentialClass::NodePki));
        let dirs: Vec<bool> = inv.entries.iter().map(|e| e.is_dir).collect();
        assert_eq!(dirs, [true, false, false, true, false, true, false]);
        // The symlinked file is its target.
        assert_eq!(inv.entries[2].ino, ino(&t.path().join("outside/real.conf")));
        let st_dev = std::fs::metadata(&k).expect("stat").dev();
        assert_eq!(inv.entries[0].dev, kernel_dev_of_st_dev(st_dev));
        assert_eq!(inv.entries[0].ino, ino(&k));
    }

    #[test]
    fn a_symlinked_root_file_is_its_target_under_its_own_name() {
        let t = tree();
        let link = t.path().join("k8s/link.conf");
        let roots = [root(link.clone(), None)];
        let inv = node_inventory(&roots, "/var/lib/kubelet", limits(10, 1));
        assert_eq!(inv.entries.len(), 1);
        let e = &inv.entries[0];
        assert_eq!(
            (e.path.as_str(), e.is_dir),
            (&*link.to_string_lossy(), false)
        );
        assert_eq!(e.ino, ino(&t.path().join("outside/real.conf")));
        // Unclassified: a temp path is no credential.
        assert_eq!(e.class, CredentialClass::Other);
    }

    #[test]
    fn limits_are_kept() {
        let t = tree();
        let roots = [root(t.path().join("k8s"), None)];
        let inv = node_inventory(&roots, "/var/lib/kubelet", limits(3, 8));
        assert_eq!(
            names(&inv, t.path()),
            ["/k8s", "/k8s/admin.conf", "/k8s/link.conf"]
        );
        assert!(inv.truncated);
        let inv = node_inventory(&roots, "/var/lib/kubelet", limits(100, 1));
        let want = "/k8s /k8s/admin.conf /k8s/link.conf /k8s/pki";
        assert_eq!(names(&inv, t.path()).join(" "), want);
        assert!(!inv.truncated);
        let inv = node_inventory(&roots, "/var/lib/kubelet", limits(100, 0));
        assert_eq!(names(&inv, t.path()), ["/k8s"]);
    }

    #[test]
    fn default_roots_cover_node_credentials() {
        let roots = default_node_roots("/data/kubelet/", &[PathBuf::from("/root")]);
        let paths: Vec<_> = roots
            .iter()
            .map(|r| (r.path.to_string_lossy().into_owned(), r.class))
            .collect();
        use CredentialClass::*;
        for want in [
            ("/etc/kubernetes", None),
            ("/data/kubelet/pki", Some(NodePki)),
            ("/data/kubelet/kubeconfig", Some(NodeKubeconfig)),
            ("/var/lib/kubelet/kubeconfig", Some(NodeKubeconfig)),
            ("/root/.kube", Some(NodeKubeconfig)),
            ("/root/.config/gcloud", Some(CloudCredentials)),
        ] {
            assert!(paths.contains(&(want.0.to_owned(), want.1)), "{want:?}");
        }
        let std_roots = default_node_roots("/var/lib/kubelet", &[]);
        assert_eq!(std_roots.len(), 6);
        assert_eq!(home_dirs()[0], PathBuf::from("/root"));
    }

    #[test]
    fn diff_adds_and_removes() {
        let installed: BTreeSet<u32> = [1, 2, 3].into();
        let wanted: BTreeSet<u32> = [2, 3, 4, 5].into();
        assert_eq!(diff(&installed, &wanted), (vec![4, 5], vec![1]));
        assert_eq!(diff(&wanted, &wanted), (vec![], vec![]));
    }
}
