//! The process table: parent and resolved executable of every process the daemon has seen,
//! kept from exec/fork/exit records and seeded from /proc at start.
//!
//! Records of one process arrive on different lanes; the monitor drains the process lane
//! before the others, so an exec is applied before the opens that follow it.

use std::{
    num::NonZeroUsize,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lru::LruCache;
use procfs::process::Process;

use agent_monitor_common::AT_FDCWD;

/// Upper bound of the table; past it, dead entries are pruned, then the least recently
/// used entry makes room (a later lookup of it reads /proc again).
pub const DEFAULT_CAPACITY: usize = 65_536;

/// How long an exited process stays in the table. Its exit record can be read before
/// records it wrote earlier on other lanes (the process lane is drained first), and those
/// still need its parent and executable.
pub const EXIT_GRACE: Duration = Duration::from_secs(5);

/// What the table knows of one process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcInfo {
    pub ppid: Option<u32>,
    pub exe: Option<String>,
}

/// Process id to [`ProcInfo`], bounded, least recently used first out.
pub struct ProcessTable {
    procs: LruCache<u32, ProcInfo, foldhash::fast::RandomState>,
    /// Processes that exited, with when we learned it; removed after [`EXIT_GRACE`].
    exited: foldhash::HashMap<u32, Instant>,
    proc_root: PathBuf,
}

impl ProcessTable {
    /// An empty table reading `/proc`.
    pub fn new(capacity: usize) -> Self {
        Self::with_proc_root(capacity, PathBuf::from("/proc"))
    }

    /// An empty table reading another procfs mount (a host's /proc mounted in a container).
    pub fn with_proc_root(capacity: usize, proc_root: PathBuf) -> Self {
        Self {
            procs: LruCache::with_hasher(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
                foldhash::fast::RandomState::default(),
            ),
            exited: foldhash::HashMap::default(),
            proc_root,
        }
    }

    /// Fills the table with every process now running.
    pub fn seed(&mut self) -> usize {
        let Ok(all) = procfs::process::all_processes_with_root(&self.proc_root) else {
            return 0;
        };
        // A process that ended since the directory was listed is left out.
        for p in all.flatten() {
            if let (Ok(pid), Some(info)) = (u32::try_from(p.pid()), proc_info(&p)) {
                self.insert(pid, info);
            }
        }
        self.procs.len()
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// `pid`'s directory in /proc; `None` when there is no such process (any more).
    fn process(&self, pid: u32) -> Option<Process> {
        Process::new_with_root(self.proc_root.join(pid.to_string())).ok()
    }

    fn read_exe(&self, pid: u32) -> Option<String> {
        exe_of(&self.process(pid)?)
    }

    fn read_proc(&self, pid: u32) -> Option<ProcInfo> {
        proc_info(&self.process(pid)?)
    }

    fn insert(&mut self, pid: u32, info: ProcInfo) {
        if self.procs.len() >= self.procs.cap().get() && !self.procs.contains(&pid) {
            self.prune(Instant::now());
        }
        if let Some((gone, _)) = self.procs.push(pid, info) {
            if gone != pid {
                self.exited.remove(&gone);
            }
        }
    }

    /// Drops entries of processes that exited more than [`EXIT_GRACE`] before `now`, or
    /// that no longer exist although no exit was seen. Returns how many went.
    pub fn prune(&mut self, now: Instant) -> usize {
        let before = self.procs.len();
        let root = self.proc_root.clone();
        let exited = &mut self.exited;
        exited.retain(|_, at| now.duration_since(*at) < EXIT_GRACE);
        let gone: Vec<u32> = self
            .procs
            .iter()
            .map(|(pid, _)| *pid)
            .filter(|pid| !exited.contains_key(pid) && !root.join(pid.to_string()).exists())
            .collect();
        for pid in gone {
            self.procs.pop(&pid);
        }
        before - self.procs.len()
    }

    /// What is known of `tgid`, reading /proc for a process not seen before.
    pub fn get(&mut self, tgid: u32) -> ProcInfo {
        if let Some(info) = self.procs.get(&tgid) {
            return info.clone();
        }
        let info = self.read_proc(tgid).unwrap_or_default();
        if info != ProcInfo::default() {
            self.insert(tgid, info.clone());
        }
        info
    }

    /// A process forked: the child starts with its parent's executable.
    pub fn on_fork(&mut self, parent_tgid: u32, child_pid: u32) {
        // A reused pid is a new process.
        self.exited.remove(&child_pid);
        let exe = self.get(parent_tgid).exe;
        self.insert(
            child_pid,
            ProcInfo {
                ppid: Some(parent_tgid),
                exe,
            },
        );
    }

    /// A process called execve with `filename`: the executable is that path with symlinks
    /// resolved inside the process's own root, or, for a relative path, what /proc says
    /// while the process lives. `host`: the process is not in a pod (its cgroup says so),
    /// so the node's root (that of pid 1) is its root too.
    pub fn on_exec(&mut self, tgid: u32, filename: &str, host: bool) -> Option<String> {
        // The path the kernel recorded comes first: /proc says what the process runs when
        // the record is read, which is a later program if it exec'd again since. Its
        // symlinks are the container's, so they are resolved under /proc/<pid>/root, not
        // in the daemon's own filesystem. A process already gone (a `cat` that exits at
        // once) is resolved in its parent's root, which a process shares unless it is a
        // container's first one; a host process whose parent is gone too, in the node's
        // root (pid 1's, else the daemon's own). When none can be read (gone, or the daemon lacks CAP_SYS_PTRACE for them)
        // the path stays as recorded.
        let ppid = match self.procs.get(&tgid) {
            Some(info) => info.ppid,
            None => self.read_proc(tgid).and_then(|i| i.ppid),
        };
        let exe = if filename.starts_with('/') {
            let root = |pid: u32| self.proc_root.join(pid.to_string()).join("root");
            Some(
                realpath_in(&root(tgid), filename)
                    .or_else(|| ppid.and_then(|p| realpath_in(&root(p), filename)))
                    .or_else(|| {
                        // The node's root is pid 1's; the daemon's own when it runs on the
                        // node rather than in a container (and /proc/1 is out of reach).
                        host.then(|| {
                            realpath_in(&root(1), filename)
                                .or_else(|| realpath_in(Path::new("/"), filename))
                        })
                        .flatten()
                    })
                    .unwrap_or_else(|| filename.to_owned()),
            )
        } else {
            self.read_exe(tgid)
        };
        self.insert(
            tgid,
            ProcInfo {
                ppid,
                exe: exe.clone(),
            },
        );
        exe
    }

    /// A process ended. Its entry stays for [`EXIT_GRACE`] (see there).
    pub fn on_exit(&mut self, tgid: u32) {
        if self.procs.contains(&tgid) {
            self.exited.insert(tgid, Instant::now());
        }
    }

    /// Makes a relative path absolute against the directory it was relative to: the
    /// thread's cwd for `AT_FDCWD`, else the directory open as `dirfd`. `None` when the
    /// process is already gone.
    pub fn resolve_relative(&self, tgid: u32, pid: u32, dirfd: i32, raw: &str) -> Option<String> {
        let task = self.proc_root.join(tgid.to_string());
        let base = if dirfd == AT_FDCWD {
            std::fs::read_link(task.join("task").join(pid.to_string()).join("cwd"))
                .or_else(|_| std::fs::read_link(task.join("cwd")))
                .ok()?
        } else {
            std::fs::read_link(task.join("fd").join(dirfd.to_string())).ok()?
        };
        if !base.is_absolute() {
            return None;
        }
        Some(base.join(raw).to_string_lossy().into_owned())
    }
}

/// Parent and executable of `p`, both read through its /proc directory, which stays that
/// process's (never a later one's with the same pid). `None` when its `stat` cannot be
/// read: the process is gone. A zombie (exited, not yet reaped) has a parent and no
/// executable.
fn proc_info(p: &Process) -> Option<ProcInfo> {
    let stat = p.stat().ok()?;
    Some(ProcInfo {
        ppid: u32::try_from(stat.ppid).ok(),
        exe: exe_of(p),
    })
}

/// What `p`'s `exe` link points to; `None` for a zombie or a kernel thread, or without
/// the right to read it.
fn exe_of(p: &Process) -> Option<String> {
    Some(p.exe().ok()?.to_string_lossy().into_owned())
}

/// Symlinks followed while resolving one path, as the kernel's own limit (`MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

/// `path` (absolute) with every symlink resolved as a process whose root directory is
/// `root` sees it: absolute link targets restart at `root`, `..` never climbs above it.
/// Each component is looked at with `lstat`, so the kernel follows no symlink itself and
/// none can lead out of `root`. `None` when a component does not exist or cannot be read.
///
/// `root` is opened once and each component looked at relative to it: through
/// `/proc/<pid>/root`, the kernel would otherwise look up the process and check the right
/// to see its root again for every component.
fn realpath_in(root: &Path, path: &str) -> Option<String> {
    use nix::{
        fcntl::readlinkat,
        sys::stat::{fstatat, SFlag},
    };
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(root)
        .ok()?;
    let mut resolved = PathBuf::from("/");
    // Components still to resolve, the next one last.
    let mut pending: Vec<std::ffi::OsString> = Path::new(path)
        .iter()
        .rev()
        .map(|c| c.to_os_string())
        .collect();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        match c.to_str() {
            Some("/" | "." | "") => continue,
            Some("..") => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let candidate = resolved.join(&c);
        let relative = candidate.strip_prefix("/").ok()?;
        let meta = fstatat(&dir, relative, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
        if SFlag::from_bits_truncate(meta.st_mode) & SFlag::S_IFMT != SFlag::S_IFLNK {
            resolved = candidate;
            continue;
        }
        links += 1;
        if links > MAX_SYMLINKS {
            return None;
        }
        let target = PathBuf::from(readlinkat(&dir, relative).ok()?);
        if target.is_absolute() {
            resolved = PathBuf::from("/");
        }
        pending.extend(target.iter().rev().map(|c| c.to_os_string()));
    }
    Some(resolved.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child `sleep`, killed and reaped on drop.
    struct Kid(std::process::Child);

    impl Kid {
        fn sleep() -> Self {
            Self(
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .expect("sleep"),
            )
        }
    }

    /// Where `sleep` is, from the PATH.
    fn which_sleep() -> PathBuf {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join("sleep"))
            .find(|p| p.is_file())
            .expect("sleep on the PATH")
    }

    impl Drop for Kid {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn knows_the_parent_of_a_process_whose_name_has_spaces_and_parentheses() {
        // The name is the second field of /proc/<pid>/stat, in parentheses, and may hold
        // both: the parent is the field after the last `)`.
        // A process is named after the file it executed: a link to sleep named so.
        let dir = tempfile::tempdir().expect("tempdir");
        let name = "a) b) S 7 (c";
        let sleep = which_sleep();
        std::os::unix::fs::symlink(&sleep, dir.path().join(name)).expect("ln");
        let kid = Kid(std::process::Command::new(dir.path().join(name))
            .arg("30")
            .spawn()
            .expect("sleep"));
        let pid = kid.0.id();
        // spawn may return before the child has executed (its name is still ours then).
        let comm_path = format!("/proc/{pid}/comm");
        let mut comm = String::new();
        for _ in 0..500 {
            comm = std::fs::read_to_string(&comm_path).expect("comm");
            if comm.trim_end() == name {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(comm.trim_end(), name);
        let mut t = ProcessTable::new(4);
        let info = t.get(pid);
        assert_eq!(info.ppid, Some(std::process::id()));
        assert!(info.exe.expect("a live process").ends_with("/sleep"));
    }

    #[test]
    fn a_zombie_has_its_parent_and_no_executable_and_a_reaped_one_is_unknown() {
        let mut kid = std::process::Command::new("true").spawn().expect("true");
        let pid = kid.id();
        let stat = format!("/proc/{pid}/stat");
        // Not reaped yet: a zombie once it has exited (state `Z` after the name). Bounded
        // wait, no timing asserted: a child that never exits fails the test.
        let zombie = (0..1000).any(|_| {
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            let zombie = state
                .rsplit(')')
                .next()
                .is_some_and(|s| s.starts_with(" Z"));
            if !zombie {
                std::thread::sleep(Duration::from_millis(10));
            }
            zombie
        });
        assert!(zombie, "true did not exit");
        let mut t = ProcessTable::new(4);
        assert_eq!(
            t.get(pid),
            ProcInfo {
                ppid: Some(std::process::id()),
                exe: None,
            }
        );
        kid.wait().expect("reap");
        let mut t = ProcessTable::new(4);
        assert_eq!(t.get(pid), ProcInfo::default());
    }

    #[test]
    fn seeding_reads_every_live_process() {
        let kid = Kid::sleep();
        let mut t = ProcessTable::new(DEFAULT_CAPACITY);
        assert!(t.seed() >= 2);
        let info = t.procs.peek(&kid.0.id()).expect("seeded").clone();
        assert_eq!(info.ppid, Some(std::process::id()));
        assert!(info.exe.expect("its executable").ends_with("/sleep"));
        let me = t.procs.peek(&std::process::id()).expect("seeded").clone();
        assert_eq!(me.ppid, Some(std::os::unix::process::parent_id()));
        // Another procfs mount, as a host's /proc in a container: nothing there, nothing
        // seeded.
        let empty = tempfile::tempdir().expect("tempdir");
        let mut t = ProcessTable::with_proc_root(4, empty.path().to_owned());
        assert_eq!(t.seed(), 0);
    }

    #[test]
    fn knows_this_process_and_its_parent() {
        let mut t = ProcessTable::new(16);
        let me = std::process::id();
        let info = t.get(me);
        assert_eq!(info.ppid, Some(std::os::unix::process::parent_id()));
        let exe = std::env::current_exe().expect("current exe");
        assert_eq!(info.exe.as_deref(), exe.to_str());
    }

    #[test]
    fn a_full_table_drops_the_least_recently_used_entry() {
        // Three live children: prune keeps them all, so room comes from recency. A kept
        // entry has the executable inherited at fork (ours); an evicted one, read from
        // /proc again, has its own (sleep).
        let mut kids: Vec<_> = (0..3)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .expect("sleep")
            })
            .collect();
        let [c1, c2, c3] = [0, 1, 2].map(|i| kids[i].id());
        let me = std::process::id();
        let mut t = ProcessTable::new(3);
        t.on_fork(me, c1);
        t.on_fork(me, c2);
        let ours = t.get(me).exe;
        assert!(ours.is_some());
        // Used again: c2 is now the least recently used (me is used by every fork).
        assert_eq!(t.get(c1).exe, ours);
        t.on_fork(me, c3);
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(c1).exe, ours, "kept");
        assert_eq!(t.get(c3).exe, ours, "kept");
        let reread = t.get(c2).exe.expect("a live process");
        assert!(
            reread.ends_with("/sleep"),
            "evicted, then read from /proc: {reread}"
        );
        for k in &mut kids {
            let _ = k.kill();
            let _ = k.wait();
        }
    }

    #[test]
    fn fork_inherits_exe_and_exit_forgets() {
        let mut t = ProcessTable::new(16);
        let me = std::process::id();
        t.on_fork(me, 999_999_999);
        assert_eq!(t.get(999_999_999).ppid, Some(me));
        assert_eq!(t.get(999_999_999).exe, t.get(me).exe);
        t.on_exit(999_999_999);
        // Still known during the grace period, for records read after the exit.
        assert_eq!(t.get(999_999_999).ppid, Some(me));
        let now = Instant::now();
        t.prune(now);
        assert_eq!(t.get(999_999_999).ppid, Some(me));
        // Once the grace period is over the entry goes (the pid does not exist).
        t.prune(now + EXIT_GRACE + Duration::from_secs(1));
        assert_eq!(t.get(999_999_999), ProcInfo::default());
    }

    #[test]
    fn exec_resolves_symlinks_in_the_process_root_and_keeps_a_gone_ones_path() {
        let mut t = ProcessTable::new(16);
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        std::fs::write(&real, b"").expect("write");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let link = link.to_str().expect("utf-8");
        let exe = t.on_exec(std::process::id(), link, false);
        assert_eq!(exe.as_deref(), real.canonicalize().expect("canon").to_str());
        // A process that is gone: resolved in its parent's root.
        t.on_fork(std::process::id(), 999_999_997);
        let exe = t.on_exec(999_999_997, link, false);
        assert_eq!(exe.as_deref(), real.canonicalize().expect("canon").to_str());
        // Gone, parent unknown: the path stays as recorded, unless it ran on the host.
        assert_eq!(t.on_exec(999_999_998, link, false).as_deref(), Some(link));
        let exe = t.on_exec(999_999_996, link, true);
        assert_eq!(exe.as_deref(), real.canonicalize().expect("canon").to_str());
    }

    #[test]
    fn realpath_stays_inside_the_root() {
        // A container root where /usr/bin/python3 -> /usr/bin/python3.12 (absolute) and
        // /bin -> usr/bin; the host may have neither.
        let root = tempfile::tempdir().expect("tempdir");
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        std::fs::write(bin.join("python3.12"), b"").expect("write");
        std::os::unix::fs::symlink("/usr/bin/python3.12", bin.join("python3")).expect("ln");
        std::os::unix::fs::symlink("usr/bin", root.path().join("bin")).expect("ln");
        assert_eq!(
            realpath_in(root.path(), "/bin/python3").as_deref(),
            Some("/usr/bin/python3.12")
        );
        assert_eq!(
            realpath_in(root.path(), "/../../usr/./bin/python3").as_deref(),
            Some("/usr/bin/python3.12")
        );
        assert_eq!(realpath_in(root.path(), "/usr/bin/missing"), None);
        // A loop ends instead of spinning.
        std::os::unix::fs::symlink("/loop", root.path().join("loop")).expect("ln");
        assert_eq!(realpath_in(root.path(), "/loop"), None);
    }

    #[test]
    fn capacity_bounds_the_table() {
        let mut t = ProcessTable::new(2);
        for pid in 900_000_000..900_000_010 {
            t.on_fork(std::process::id(), pid);
        }
        assert!(t.len() <= 2, "{}", t.len());
    }

    #[test]
    fn resolves_against_cwd() {
        let t = ProcessTable::new(4);
        let me = std::process::id();
        let cwd = std::env::current_dir().expect("cwd");
        // The main thread's id is the process id.
        let got = t.resolve_relative(me, me, AT_FDCWD, "x/token");
        assert_eq!(
            got,
            Some(cwd.join("x/token").to_string_lossy().into_owned())
        );
        assert_eq!(
            t.resolve_relative(999_999_997, 999_999_997, AT_FDCWD, "token"),
            None
        );
    }
}
