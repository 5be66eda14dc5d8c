//! cgroup id → cgroup path → pod UID and container ID.
//!
//! `bpf_get_current_cgroup_id()` is the inode number of the task's cgroup2 directory. We
//! map it to a path by walking the cgroup2 mount (found in /proc/self/mountinfo), cache the
//! result, and rescan on a miss (rate-limited). The path is then parsed for the kubelet's
//! two cgroup drivers and the common runtimes:
//!
//! | driver  | runtime    | container cgroup |
//! |---------|------------|------------------|
//! | systemd | containerd | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` |
//! | systemd | CRI-O      | `.../kubepods-pod<uid>.slice/crio-<id>.scope` (and `crio-conmon-<id>.scope`, the runtime monitor) |
//! | systemd | docker     | `.../kubepods-besteffort-pod<uid>.slice/docker-<id>.scope` |
//! | systemd | containerd outside systemd's tree | `.../kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>` |
//! | cgroupfs| any        | `kubepods/burstable/pod<uid>/<id>` (CRI-O: `crio-<id>`) |

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use super::watched::parse_mountinfo;

/// Most cgroups cached before the cache is cleared and rebuilt.
pub const CACHE_CAPACITY: usize = 16_384;
/// A miss rescans the tree at most this often.
pub const RESCAN_INTERVAL: Duration = Duration::from_millis(50);
/// Deepest directory level walked under the cgroup2 mount.
const MAX_WALK_DEPTH: usize = 16;

/// What a cgroup path says about its tasks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CgroupInfo {
    /// Path relative to the cgroup2 mount, starting with `/`.
    pub path: String,
    /// Pod UID (with dashes), when the cgroup is a pod's or below one.
    pub pod_uid: Option<String>,
    /// Runtime container id (hex), when the cgroup is a container's or below one.
    pub container_id: Option<String>,
    /// The runtime that named the container cgroup: `containerd`, `cri-o` or `docker`.
    pub runtime: Option<&'static str>,
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod UID: 8-4-4-4-12 hex with dashes, or a static pod's 32-hex config hash.
fn valid_pod_uid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let uuid = parts.len() == 5
        && parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts.iter().all(|p| is_hex(p));
    uuid || (s.len() == 32 && is_hex(s))
}

/// A container id: at least 12 hex digits (runtimes use 64).
fn valid_container_id(s: &str) -> bool {
    s.len() >= 12 && is_hex(s)
}

/// The pod UID named by one path component, if it names a pod.
fn pod_uid_of(component: &str) -> Option<String> {
    // systemd: kubepods[-<qos>]-pod<uid_with_underscores>.slice
    if let Some(slice) = component.strip_suffix(".slice") {
        let (_, uid) = slice.rsplit_once("-pod")?;
        let uid = uid.replace('_', "-");
        return valid_pod_uid(&uid).then_some(uid);
    }
    // cgroupfs: pod<uid>
    let uid = component.strip_prefix("pod")?;
    valid_pod_uid(uid).then(|| uid.to_owned())
}

/// The container id and runtime named by one path component, if it names a container.
fn container_of(component: &str) -> Option<(String, Option<&'static str>)> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    // CRI-O's monitor process lives beside the container, not in it.
    if name.starts_with("crio-conmon-") {
        return None;
    }
    for (prefix, runtime) in [
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("docker-", "docker"),
    ] {
        if let Some(id) = name.strip_prefix(prefix) {
            return valid_container_id(id).then(|| (id.to_owned(), Some(runtime)));
        }
    }
    // cgroupfs driver: the bare id.
    valid_container_id(name).then(|| (name.to_owned(), None))
}

/// Parses a cgroup path (relative to the cgroup2 mount) for pod and container.
pub fn parse_path(path: &str) -> CgroupInfo {
    let mut info = CgroupInfo {
        path: path.to_owned(),
        ..CgroupInfo::default()
    };
    let mut components = path.split('/').filter(|c| !c.is_empty());
    while let Some(component) = components.next() {
        // containerd with the systemd driver but outside systemd's tree joins pod slice
        // and container with colons: kubepods-...-pod<uid>.slice:cri-containerd:<id>
        if let Some((slice, rest)) = component.split_once(':') {
            if let Some(uid) = pod_uid_of(slice) {
                info.pod_uid = Some(uid);
                if let Some((kind, id)) = rest.split_once(':') {
                    if valid_container_id(id) {
                        let runtime = match kind {
                            "cri-containerd" => Some("containerd"),
                            "crio" => Some("cri-o"),
                            "docker" => Some("docker"),
                            _ => None,
                        };
                        info.container_id = Some(id.to_owned());
                        info.runtime = runtime;
                    }
                }
                return info;
            }
        }
        if let Some(uid) = pod_uid_of(component) {
            info.pod_uid = Some(uid);
            // The container is the next component; deeper ones (a container's own
            // sub-cgroups) belong to it.
            if let Some((id, runtime)) = components.next().and_then(container_of) {
                info.container_id = Some(id);
                info.runtime = runtime;
            }
            return info;
        }
    }
    info
}

/// The cgroup2 mount points of this process's mount namespace, in mount table order
/// (read with the one mountinfo parser, [`parse_mountinfo`], escapes undone).
fn cgroup2_mounts() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    parse_mountinfo(&info)
        .into_iter()
        .filter(|m| m.fs_type == "cgroup2")
        .map(|m| PathBuf::from(m.mount_point))
        .collect()
}

/// The first cgroup2 mount point of this process's mount namespace.
pub fn cgroup2_mount() -> Option<PathBuf> {
    cgroup2_mounts().into_iter().next()
}

/// The configured root of the node's cgroup2 hierarchy was not one.
#[derive(Debug, thiserror::Error)]
#[error(
    "identity.cgroup_root {dir}: neither it nor {dir}/unified is a cgroup2 mount in /proc/self/mountinfo \
     (mount the node's /sys/fs/cgroup there)"
)]
pub struct CgroupRootError {
    /// The configured directory.
    pub dir: String,
}

/// Where the node's cgroup2 hierarchy is: `configured` when it is a cgroup2 mount, or its
/// `unified` child on a node with the hybrid (v1 + v2) layout; without a configured root,
/// the first cgroup2 mount of this mount namespace.
///
/// A DaemonSet's own `/sys/fs/cgroup` is usually a cgroup namespace showing only the
/// container's cgroup, which names no pod: the node's hierarchy is mounted elsewhere
/// (`/host/sys/fs/cgroup` in `deploy/`) and configured here.
pub fn cgroup2_root(configured: Option<&Path>) -> Result<Option<PathBuf>, CgroupRootError> {
    let Some(dir) = configured else {
        return Ok(cgroup2_mount());
    };
    let mounts = cgroup2_mounts();
    [dir.to_path_buf(), dir.join("unified")]
        .into_iter()
        .find(|d| mounts.contains(d))
        .map(Some)
        .ok_or_else(|| CgroupRootError {
            dir: dir.display().to_string(),
        })
}

/// Cached cgroup id → [`CgroupInfo`].
pub struct CgroupResolver {
    root: Option<PathBuf>,
    cache: foldhash::HashMap<u64, Arc<CgroupInfo>>,
    last_scan: Option<Instant>,
}

impl CgroupResolver {
    /// A resolver over the hierarchy at `root` (none: every lookup misses); see
    /// [`cgroup2_root`].
    pub fn with_root(root: Option<PathBuf>) -> Self {
        Self {
            root,
            cache: foldhash::HashMap::default(),
            last_scan: None,
        }
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// What cgroup `id` is. Rescans the tree on a miss, at most every [`RESCAN_INTERVAL`].
    pub fn resolve(&mut self, id: u64) -> Option<Arc<CgroupInfo>> {
        if let Some(info) = self.cache.get(&id) {
            return Some(info.clone());
        }
        if self
            .last_scan
            .is_some_and(|t| t.elapsed() < RESCAN_INTERVAL)
        {
            return None;
        }
        self.rescan();
        self.cache.get(&id).cloned()
    }

    /// Forgets everything and walks the cgroup2 tree again.
    pub fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        if self.cache.len() >= CACHE_CAPACITY {
            self.cache.clear();
        }
        let mut stack = vec![(root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let rel = dir
                .strip_prefix(&root)
                .map(|p| format!("/{}", p.display()))
                .unwrap_or_else(|_| "/".to_owned());
            let rel = if rel == "/" {
                rel
            } else {
                rel.trim_end_matches('/').to_owned()
            };
            self.cache
                .entry(meta.ino())
                .or_insert_with(|| Arc::new(parse_path(&rel)));
            if depth >= MAX_WALK_DEPTH || self.cache.len() >= CACHE_CAPACITY {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }

    /// Resolves a path under the mount directly (tests and tools).
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1f7c9a2e-5b3d-4c1a-9e8f-0a1b2c3d4e5f";
    const UID_: &str = "1f7c9a2e_5b3d_4c1a_9e8f_0a1b2c3d4e5f";
    const ID: &str = "4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c";

    fn check(path: &str, uid: Option<&str>, id: Option<&str>, runtime: Option<&str>) {
        let info = parse_path(path);
        assert_eq!(info.pod_uid.as_deref(), uid, "{path}");
        assert_eq!(info.container_id.as_deref(), id, "{path}");
        assert_eq!(info.runtime, runtime, "{path}");
        assert_eq!(info.path, path);
    }

    #[test]
    fn systemd_driver_with_each_runtime() {
        for qos in ["kubepods-burstable", "kubepods-besteffort"] {
            let pod = format!("/kubepods.slice/{qos}.slice/{qos}-pod{UID_}.slice");
            check(
                &format!("{pod}/cri-containerd-{ID}.scope"),
                Some(UID),
                Some(ID),
                Some("containerd"),
            );
            check(
                &format!("{pod}/crio-{ID}.scope"),
                Some(UID),
                Some(ID),
                Some("cri-o"),
            );
            check(
                &format!("{pod}/docker-{ID}.scope"),
                Some(UID),
                Some(ID),
                Some("docker"),
            );
            check(
                &format!("{pod}/crio-conmon-{ID}.scope"),
                Some(UID),
                None,
                None,
            );
            check(&pod, Some(UID), None, None);
        }
        // Guaranteed QoS pods sit directly under kubepods.slice.
        check(
            &format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            Some(UID),
            Some(ID),
            Some("containerd"),
        );
        // A container's own sub-cgroups (systemd inside the container, cgroup namespaces).
        check(
            &format!(
                "/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope/init.scope"
            ),
            Some(UID),
            Some(ID),
            Some("containerd"),
        );
        // kind/k3s nest the whole tree under another slice.
        check(
            &format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            Some(UID),
            Some(ID),
            Some("containerd"),
        );
    }

    #[test]
    fn systemd_driver_with_colon_names() {
        check(
            &format!("/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{ID}"),
            Some(UID),
            Some(ID),
            Some("containerd"),
        );
    }

    #[test]
    fn cgroupfs_driver() {
        check(
            &format!("/kubepods/burstable/pod{UID}/{ID}"),
            Some(UID),
            Some(ID),
            None,
        );
        check(
            &format!("/kubepods/pod{UID}/{ID}"),
            Some(UID),
            Some(ID),
            None,
        );
        check(
            &format!("/kubepods/besteffort/pod{UID}/crio-{ID}"),
            Some(UID),
            Some(ID),
            Some("cri-o"),
        );
        check(
            &format!("/kubepods/besteffort/pod{UID}"),
            Some(UID),
            None,
            None,
        );
    }

    #[test]
    fn static_pods_use_a_config_hash() {
        let hash = "6d3b8c4a7f1e2b3c4d5e6f7a8b9c0d1e";
        check(
            &format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{hash}.slice/cri-containerd-{ID}.scope"),
            Some(hash),
            Some(ID),
            Some("containerd"),
        );
    }

    #[test]
    fn host_cgroups_name_no_pod() {
        check("/", None, None, None);
        check("/system.slice/sshd.service", None, None, None);
        check("/user.slice/user-0.slice/session-1.scope", None, None, None);
        check("/kubepods.slice/kubepods-burstable.slice", None, None, None);
        check("/kubepods/podnot-a-uid/abc", None, None, None);
        check(
            &format!("/kubepods-pod{UID_}x.slice/{ID}"),
            None,
            None,
            None,
        );
    }

    /// Every cgroup2 mount the mount table lists is one (statfs says so), in table order,
    /// the first being what `cgroup2_mount` gives.
    #[test]
    fn finds_the_cgroup2_mounts_of_the_mount_table() {
        let mounts = cgroup2_mounts();
        // The daemon needs one, and every machine it is tested on has one (on a hybrid
        // layout at /sys/fs/cgroup/unified).
        assert!(!mounts.is_empty(), "no cgroup2 mount found");
        for m in &mounts {
            let path = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).expect("path");
            // SAFETY: an all-zero statfs is a valid value; `path` is NUL-terminated and
            // outlives the call, which writes only into `fs`.
            let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let rc = unsafe { libc::statfs(path.as_ptr(), &mut fs) };
            assert_eq!(rc, 0, "statfs {}", m.display());
            assert_eq!(fs.f_type, libc::CGROUP2_SUPER_MAGIC, "{}", m.display());
        }
        assert_eq!(cgroup2_mount(), mounts.first().cloned());
    }

    #[test]
    fn resolves_ids_by_walking_a_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pod = dir.path().join(format!(
            "kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"
        ));
        std::fs::create_dir_all(&pod).expect("mkdir");
        let mut r = CgroupResolver::with_root(Some(dir.path().to_owned()));
        let id = std::fs::metadata(&pod).expect("stat").ino();
        let info = r.resolve(id).expect("found after a scan");
        assert_eq!(info.pod_uid.as_deref(), Some(UID));
        assert_eq!(info.container_id.as_deref(), Some(ID));
        // A directory made later is found by the next rescan.
        let later = dir.path().join("system.slice");
        std::fs::create_dir_all(&later).expect("mkdir");
        let later_id = std::fs::metadata(&later).expect("stat").ino();
        std::thread::sleep(RESCAN_INTERVAL);
        let info = r.resolve(later_id).expect("found by rescan");
        assert_eq!(info.path, "/system.slice");
        assert_eq!(info.pod_uid, None);
    }
}
