//! Translation of kernel records into the daemon's [`Record`]s: the process table applied
//! (exec, fork, exit), the task filled in, an open's path, class and owner taken from the
//! file the kernel resolved, a connect's destination and outcome.

use std::net::{Ipv4Addr, Ipv6Addr};

use agent_monitor_common::{
    path_flags, EventHeader, EventKind, MatchKind, Syscall, GROUP_ALIVE, GROUP_UNKNOWN,
};

use super::Enricher;
use crate::{
    events::{
        decode::{c_string, RawEvent},
        errno, ConnectRecord, ExecRecord, ExitRecord, ForkRecord, OpenRecord, Record, Task,
    },
    identity::{
        credentials::{normalize, projected_class, CredentialClass, Owner},
        watched::{dev_name, VolumePlugin},
    },
};

impl Enricher {
    /// Class and owner of a file matched by identity, from what is watched: the volume
    /// its filesystem is, or its inventory entry. Path-matched records get theirs in
    /// [`Enricher::attribute`].
    pub(super) fn file_class(
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

    pub(super) fn task(&mut self, h: &EventHeader) -> Task {
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
            workload: self.unattributed.clone(),
        }
    }

    /// Turns a kernel record into an output record, updating the process table.
    pub(super) fn enrich(&mut self, raw: RawEvent) -> Option<Record> {
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
                let matched = MatchKind::from_u8(ev.matched);
                let matched_by = match matched {
                    Some(MatchKind::Volume) => "volume",
                    Some(MatchKind::Inode) => "inode",
                    Some(MatchKind::Basename) => "basename",
                    Some(MatchKind::ProcEnviron) => "proc_environ",
                    Some(MatchKind::Prefix) | None => "prefix",
                };
                // The host path when the kernel's file names one; else the path as passed,
                // made absolute (a relative one through /proc, only then).
                let resolved = match &host_path {
                    Some(h) => Some(h.clone()),
                    None if relative => self.table.resolve_relative(
                        ev.header.tgid,
                        ev.header.pid,
                        ev.dirfd,
                        &raw_path,
                    ),
                    None if no_path => None,
                    None => Some(raw_path.clone()),
                };
                let path_resolved = resolved.is_some();
                let path = resolved
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
                        .into(),
                    path_resolved,
                    path,
                    raw_path,
                    path_truncated: ev.path_flags
                        & (path_flags::TRUNCATED | path_flags::DPATH_TRUNCATED)
                        != 0,
                    matched_by: matched_by.into(),
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
                        .into(),
                    family: family.into(),
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
pub(super) fn by_identity(matched_by: &str) -> bool {
    matches!(matched_by, "volume" | "inode")
}

/// The path of a file within its filesystem from the kernel's dentry names (leaf first,
/// each NUL-terminated).
fn within_fs_path(dpath: &[u8], len: usize) -> String {
    let bytes = &dpath[..len.min(dpath.len())];
    let mut out = String::with_capacity(bytes.len() + 1);
    // Root first: the names come leaf first. A valid name is copied as it is, without an
    // allocation of its own.
    for name in bytes.rsplit(|&b| b == 0).filter(|n| !n.is_empty()) {
        out.push('/');
        out.push_str(&String::from_utf8_lossy(name));
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dentry_names_leaf_first_become_a_path_within_the_filesystem() {
        let names = b"token\0..2026_11_23\0kube-api-access-x\0\0\0";
        assert_eq!(
            within_fs_path(names, 37),
            "/kube-api-access-x/..2026_11_23/token"
        );
        // A length past the buffer is clamped; nothing read is the filesystem's root.
        assert_eq!(within_fs_path(b"a\0", 99), "/a");
        assert_eq!(within_fs_path(b"", 0), "/");
        // A name that is not UTF-8 is written with replacement characters, in its place.
        assert_eq!(within_fs_path(b"f\xff\0d\0", 5), "/d/f\u{fffd}");
    }

    #[test]
    fn a_connect_is_an_attempt_when_packets_may_have_left() {
        for ret in [
            0,
            42,
            -i64::from(libc::EINPROGRESS),
            -i64::from(libc::ECONNREFUSED),
        ] {
            assert!(attempted(ret), "{ret}");
        }
        for ret in [-i64::from(libc::EACCES), -i64::from(libc::EINVAL)] {
            assert!(!attempted(ret), "{ret}");
        }
    }

    #[test]
    fn class_and_owner_come_from_the_file_for_identity_matches_only() {
        assert!(by_identity("volume") && by_identity("inode"));
        assert!(!by_identity("prefix") && !by_identity("basename"));
    }
}
