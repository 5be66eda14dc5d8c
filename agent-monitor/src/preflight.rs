//! Everything `run` checks before it starts, short of loading the eBPF programs.
//!
//! `check-config` and `run` both call [`check`] on the final config (the file plus the
//! command line), so a config that `check-config` passes is not refused by `run` at
//! start-up for anything this machine could have told in advance, and both print the
//! same message: the file, the field and what was expected. Checks that need the running
//! kernel's verifier or a free port (loading the programs, binding the listeners) stay
//! with `run`.

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs::OpenOptions,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use agent_monitor_common::{MAX_MONITORED_CGROUPS, MAX_WATCHED_BASENAMES, MAX_WATCHED_PREFIXES};

use crate::{
    config::{listen_addr, Config, ConfigError, PodSourceKind},
    outputs::{
        falcosidekick::{self, SidekickError, SidekickSettings},
        grpc::{self, TlsSettings},
    },
    policy::{PolicyError, PolicySet},
};

/// Moved to [`crate::errors`]; kept here under its old path.
pub use crate::errors::error_chain;

/// What makes a config unusable on this machine.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// A field names something this machine does not have or cannot use (a missing
    /// directory, an unreadable file, more entries than a kernel map holds).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A policy file named by `detect.policies` could not be loaded; the error names the
    /// policy file and the field within it.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Runs every check `run` makes before it loads the probes and returns the policies
/// loaded from `detect.policies`. `file` names the config in messages.
pub async fn check(config: &Config, file: &Path) -> Result<PolicySet, PreflightError> {
    let c = Checker { file };
    c.kernel_map_limits(config)?;
    c.output("output", &config.output)?;
    c.output("alerts.output", &config.alerts.output)?;
    c.journal(config)?;
    let policies = PolicySet::load(&config.detect.policies)?;
    c.falcosidekick(config)?;
    c.listeners(config)?;
    c.cgroups(config)?;
    c.cgroup_root(config)?;
    match config.identity.pods.source {
        PodSourceKind::None => {}
        PodSourceKind::File => c.pods_file(config).await?,
        PodSourceKind::Kube => c.kube_client("identity.pods.source").await?,
    }
    if config.detect.cluster_policies {
        c.kube_client("detect.cluster_policies").await?;
    }
    Ok(policies)
}

struct Checker<'a> {
    file: &'a Path,
}

/// What a path turned out to be, for messages.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a regular file"
    }
}

/// Whether this process may create entries in `dir` (access(2) with the real ids, which
/// are the daemon's: it is not set-uid). Catches read-only mounts even for root.
fn writable_dir(dir: &Path) -> std::io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "contains NUL"))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The filesystem type of `path` (statfs(2) `f_type`).
fn fs_type(path: &Path) -> std::io::Result<libc::__fsword_t> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "contains NUL"))?;
    // SAFETY: statfs is plain old data; all-zero is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid path and `st` a valid out-pointer for the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 {
        Ok(st.f_type)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The directory a new file at `path` would be created in.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

impl Checker<'_> {
    fn invalid(&self, field: impl Into<String>, expected: &str, got: String) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            field: field.into(),
            expected: expected.to_owned(),
            got,
        }
    }

    /// The kernel's filter maps have fixed capacities (set in the eBPF object): a config
    /// with more entries would fail while filling them, after the probes loaded.
    fn kernel_map_limits(&self, config: &Config) -> Result<(), ConfigError> {
        // The maps are keyed by the string, so repeats take one entry.
        let prefixes: BTreeSet<String> = config.effective_prefixes().into_iter().collect();
        if prefixes.len() > MAX_WATCHED_PREFIXES as usize {
            return Err(self.invalid(
                "watch.prefixes",
                &format!(
                    "at most {MAX_WATCHED_PREFIXES} distinct prefixes, counting the 3 kubelet \
                     paths under identity.kubelet_root (the kernel's prefix map holds no more)"
                ),
                format!("{} prefixes", prefixes.len()),
            ));
        }
        let basenames: BTreeSet<&String> = config.watch.basenames.iter().collect();
        if basenames.len() > MAX_WATCHED_BASENAMES as usize {
            return Err(self.invalid(
                "watch.basenames",
                &format!(
                    "at most {MAX_WATCHED_BASENAMES} distinct basenames (the kernel's basename \
                     map holds no more)"
                ),
                format!("{} basenames", basenames.len()),
            ));
        }
        Ok(())
    }

    /// An output `run` appends to: `-`, `none`, an existing file it may open for append,
    /// or a new file in an existing directory it may create files in. Nothing is created
    /// here.
    fn output(&self, field: &str, output: &str) -> Result<(), ConfigError> {
        if output == "-" || output == "none" {
            return Ok(());
        }
        let expected = "`-`, `none`, or a file to append to: an existing file this process \
                        may write, or a new one in an existing directory it may create files in";
        let path = Path::new(output);
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                Err(self.invalid(field, expected, format!("{output:?}, which is a directory")))
            }
            // Opening a FIFO for writing waits for a reader, as `run` does; whether one
            // will be there is not something to decide here.
            Ok(meta) if meta.file_type().is_fifo() => Ok(()),
            // As `run` opens it: a regular file also for reading (it looks for a torn last
            // line), anything else for writing only, and never waiting on a device.
            Ok(meta) => OpenOptions::new()
                .append(true)
                .read(meta.is_file())
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map(drop)
                .map_err(|e| self.invalid(field, expected, format!("{output:?}: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let dir = parent_dir(path);
                match std::fs::metadata(&dir) {
                    Ok(m) if m.is_dir() => writable_dir(&dir).map_err(|e| {
                        self.invalid(
                            field,
                            expected,
                            format!("{output:?}: cannot create it in {}: {e}", dir.display()),
                        )
                    }),
                    Ok(m) => Err(self.invalid(
                        field,
                        expected,
                        format!("{output:?}: {} is {}", dir.display(), kind_of(&m)),
                    )),
                    Err(e) => Err(self.invalid(
                        field,
                        expected,
                        format!("{output:?}: directory {}: {e}", dir.display()),
                    )),
                }
            }
            Err(e) => Err(self.invalid(field, expected, format!("{output:?}: {e}"))),
        }
    }

    /// The journal directory: an existing directory this process may create files in, or
    /// a missing one whose nearest existing ancestor is such a directory (`run` creates
    /// it). Nothing is created here.
    fn journal(&self, config: &Config) -> Result<(), ConfigError> {
        let Some(dir) = &config.journal.dir else {
            return Ok(());
        };
        let field = "journal.dir";
        let expected = "a directory this process may create files in, or a missing one under \
                        such a directory (it is created)";
        let got = |what: String| format!("{:?}: {what}", dir.display().to_string());
        let mut probe = dir.as_path();
        loop {
            match std::fs::metadata(probe) {
                Ok(m) if m.is_dir() => {
                    return writable_dir(probe).map_err(|e| {
                        let what = if probe == dir {
                            format!("not writable: {e}")
                        } else {
                            format!("cannot create it in {}: {e}", probe.display())
                        };
                        self.invalid(field, expected, got(what))
                    });
                }
                Ok(m) => {
                    return Err(self.invalid(
                        field,
                        expected,
                        got(format!("{} is {}", probe.display(), kind_of(&m))),
                    ))
                }
                // ENOTDIR: an ancestor is not a directory; walking up names it.
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(libc::ENOTDIR) =>
                {
                    match probe.parent() {
                        Some(parent) => probe = parent,
                        // Only `/` has no parent, and it exists: unreachable in practice.
                        None => return Err(self.invalid(field, expected, got(e.to_string()))),
                    }
                }
                Err(e) => return Err(self.invalid(field, expected, got(e.to_string()))),
            }
        }
    }

    /// A file `run` reads whole at start-up: it must be a regular file this process can
    /// open (a FIFO or a device would make the reader wait or read forever).
    fn readable_file(&self, field: &str, path: &Path, expected: &str) -> Result<(), ConfigError> {
        let got = |what: String| format!("{:?}: {what}", path.display().to_string());
        let meta = std::fs::metadata(path)
            .map_err(|e| self.invalid(field, expected, got(e.to_string())))?;
        if !meta.is_file() {
            return Err(self.invalid(field, expected, got(kind_of(&meta).to_owned())));
        }
        std::fs::File::open(path)
            .map(drop)
            .map_err(|e| self.invalid(field, expected, got(e.to_string())))
    }

    fn falcosidekick(&self, config: &Config) -> Result<(), ConfigError> {
        let Some(url) = &config.falcosidekick.url else {
            return Ok(());
        };
        // The same settings `run` starts the output with.
        let cfg = SidekickSettings {
            url: url.clone(),
            queue: config.falcosidekick.queue,
            ca: config.falcosidekick.ca.clone(),
            ..SidekickSettings::default()
        };
        if let Some(ca) = &cfg.ca {
            self.readable_file(
                "falcosidekick.ca",
                ca,
                "a readable PEM file of CA certificates",
            )?;
        }
        falcosidekick::check(&cfg).map(drop).map_err(|e| {
            let (field, expected) = match e {
                SidekickError::BadCa { .. } => {
                    ("falcosidekick.ca", "a PEM file of CA certificates")
                }
                SidekickError::BadSetting { .. } => ("falcosidekick", "usable settings"),
                _ => (
                    "falcosidekick.url",
                    "an http:// or https:// URL with a host (http://falcosidekick:2801/)",
                ),
            };
            self.invalid(field, expected, e.to_string())
        })
    }

    /// The gRPC and admin listeners: their TLS files, the Unix socket's place, and two
    /// listeners on one address. Binding itself is left to `run` (the port may be taken
    /// by the very daemon this config is checked for).
    fn listeners(&self, config: &Config) -> Result<(), ConfigError> {
        let grpc_tcp = listen_addr(&config.grpc.listen);
        let admin = listen_addr(&config.admin.listen);
        if let (Some(g), Some(a)) = (grpc_tcp, admin) {
            if g == a && g.port() != 0 {
                return Err(self.invalid(
                    "admin.listen",
                    "an address other than grpc.listen's",
                    format!("{a} for both"),
                ));
            }
        }
        let grpc_on = grpc_tcp.is_some() || config.grpc.unix_socket.is_some();
        if let Some(path) = config.grpc.unix_socket.as_ref().filter(|_| grpc_on) {
            let expected = "a socket path in an existing directory this process may create \
                            files in (a stale socket there is replaced)";
            match std::fs::symlink_metadata(path) {
                Ok(m) if !m.file_type().is_socket() => {
                    return Err(self.invalid(
                        "grpc.unix_socket",
                        expected,
                        format!("{:?}, which is {}", path.display().to_string(), kind_of(&m)),
                    ))
                }
                _ => {}
            }
            let dir = parent_dir(path);
            let usable = match std::fs::metadata(&dir) {
                Ok(m) if m.is_dir() => writable_dir(&dir).map_err(|e| e.to_string()),
                Ok(m) => Err(format!("it is {}", kind_of(&m))),
                Err(e) => Err(e.to_string()),
            };
            if let Err(why) = usable {
                return Err(self.invalid(
                    "grpc.unix_socket",
                    expected,
                    format!(
                        "{:?}: directory {}: {why}",
                        path.display().to_string(),
                        dir.display()
                    ),
                ));
            }
        }
        // The server reads the TLS files whenever it starts, whichever listeners it has.
        if let Some(tls) = config.grpc.tls.as_ref().filter(|_| grpc_on) {
            self.readable_file("grpc.tls.cert", &tls.cert, "a readable PEM certificate")?;
            self.readable_file("grpc.tls.key", &tls.key, "a readable PEM private key")?;
            if let Some(ca) = &tls.client_ca {
                self.readable_file(
                    "grpc.tls.client_ca",
                    ca,
                    "a readable PEM file of CA certificates",
                )?;
            }
            let cfg = TlsSettings {
                cert: tls.cert.clone(),
                key: tls.key.clone(),
                client_ca: tls.client_ca.clone(),
            };
            grpc::check_tls(&cfg).map_err(|e| {
                let why = match &e {
                    // Its own text ("TLS configuration") would repeat the field.
                    grpc::GrpcError::Tls(inner) => error_chain(inner),
                    other => error_chain(other),
                };
                self.invalid(
                    "grpc.tls",
                    "a PEM certificate chain (cert) with its private key (key) and, for mutual \
                     TLS, PEM CA certificates (client_ca), all usable by TLS",
                    why,
                )
            })?;
        }
        Ok(())
    }

    /// Every monitored cgroup: an existing cgroup2 directory. The kernel filter compares
    /// cgroup ids, which are the directories' inode numbers: any other directory would
    /// be accepted by the kernel and match nothing.
    fn cgroups(&self, config: &Config) -> Result<(), ConfigError> {
        let expected = "an existing cgroup2 directory";
        let mut ids = BTreeSet::new();
        for (i, dir) in config.cgroups.iter().enumerate() {
            let field = format!("cgroups[{i}]");
            let shown = format!("{:?}", dir.display().to_string());
            let meta = std::fs::metadata(dir)
                .map_err(|e| self.invalid(&field, expected, format!("{shown}: {e}")))?;
            if !meta.is_dir() {
                return Err(self.invalid(
                    field,
                    expected,
                    format!("{shown}, which is {}", kind_of(&meta)),
                ));
            }
            match fs_type(dir) {
                Ok(t) if t == libc::CGROUP2_SUPER_MAGIC => {}
                Ok(t) => {
                    return Err(self.invalid(
                        field,
                        expected,
                        format!("{shown}, a directory on a filesystem of type {t:#x}, not cgroup2"),
                    ))
                }
                Err(e) => return Err(self.invalid(field, expected, format!("{shown}: {e}"))),
            }
            ids.insert(meta.ino());
        }
        if ids.len() > MAX_MONITORED_CGROUPS as usize {
            return Err(self.invalid(
                "cgroups",
                &format!(
                    "at most {MAX_MONITORED_CGROUPS} distinct cgroups (the kernel's cgroup map \
                     holds no more; each covers its descendants)"
                ),
                format!("{} cgroups", ids.len()),
            ));
        }
        Ok(())
    }

    fn cgroup_root(&self, config: &Config) -> Result<(), ConfigError> {
        crate::identity::cgroup::cgroup2_root(config.identity.cgroup_root.as_deref())
            .map(drop)
            .map_err(|e| {
                self.invalid(
                    "identity.cgroup_root",
                    "a cgroup2 mount point of this mount namespace, or a directory whose \
                     `unified` child is one (in a container: the node's /sys/fs/cgroup mounted \
                     there)",
                    format!("{:?}, not one", e.dir),
                )
            })
    }

    /// The pods file `run` loads before it starts: read as the daemon reads it (bounded,
    /// regular files only) and parsed.
    async fn pods_file(&self, config: &Config) -> Result<(), ConfigError> {
        let expected = "a readable pods file as `kubectl get pods -o json` prints it";
        let Some(path) = &config.identity.pods.file else {
            // Config::validate already refuses `source: file` without a file.
            return Err(self.invalid("identity.pods.file", expected, "nothing".to_owned()));
        };
        crate::identity::pods::file::load_async(path.clone())
            .await
            .map(drop)
            .map_err(|e| self.invalid("identity.pods.file", expected, e.to_string()))
    }

    /// The Kubernetes client `run` builds for the pod source and cluster policies: in a
    /// pod its ServiceAccount, elsewhere a kubeconfig. Reads configuration only; nothing
    /// is sent to the API server.
    async fn kube_client(&self, field: &str) -> Result<(), ConfigError> {
        let expected = "a Kubernetes client configuration: in a pod, its ServiceAccount \
                        (KUBERNETES_SERVICE_HOST and the mounted token); elsewhere KUBECONFIG \
                        or ~/.kube/config";
        let cfg = kube::Config::infer()
            .await
            .map_err(|e| self.invalid(field, expected, error_chain(&e)))?;
        kube::Client::try_from(cfg)
            .map(drop)
            .map_err(|e| self.invalid(field, expected, error_chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_prefixes_and_basenames_are_refused() {
        let file = PathBuf::from("/etc/am.yaml");
        let c = Checker { file: &file };
        let mut config = Config::default();
        // The kubelet's three paths come on top of the configured ones.
        config.watch.prefixes = (0..MAX_WATCHED_PREFIXES - 3)
            .map(|i| format!("/p{i}/"))
            .collect();
        c.kernel_map_limits(&config).expect("exactly the capacity");
        config.watch.prefixes.push("/one-more/".into());
        // A repeat takes no entry.
        config.watch.prefixes.push("/p0/".into());
        let m = c.kernel_map_limits(&config).expect_err("over").to_string();
        for part in [
            "/etc/am.yaml",
            "watch.prefixes",
            "at most 4096",
            "4097 prefixes",
        ] {
            assert!(m.contains(part), "{part:?} not in {m}");
        }

        let mut config = Config::default();
        config.watch.basenames = (0..=MAX_WATCHED_BASENAMES)
            .map(|i| format!("b{i}"))
            .collect();
        let m = c.kernel_map_limits(&config).expect_err("over").to_string();
        assert!(
            m.contains("watch.basenames") && m.contains("1025 basenames"),
            "{m}"
        );
    }

    #[test]
    fn outputs_are_checked_without_being_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("am.yaml");
        let c = Checker { file: &file };
        let new = dir.path().join("events.jsonl");
        c.output("output", &new.display().to_string())
            .expect("a new file in a directory");
        assert!(!new.exists(), "check mode created the file");
        std::fs::write(&new, "").expect("write");
        c.output("output", &new.display().to_string())
            .expect("an existing file");
        let e = c
            .output("alerts.output", &dir.path().display().to_string())
            .expect_err("a directory")
            .to_string();
        assert!(
            e.contains("`alerts.output`") && e.contains("a directory"),
            "{e}"
        );
        let e = c
            .output(
                "output",
                &dir.path().join("no/such/x").display().to_string(),
            )
            .expect_err("missing directory")
            .to_string();
        assert!(e.contains("No such file"), "{e}");
        c.output("output", "-").expect("stdout");
        c.output("output", "none").expect("none");
    }

    #[test]
    fn journal_dir_is_checked_without_being_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("am.yaml");
        let c = Checker { file: &file };
        let mut config = Config::default();
        c.journal(&config).expect("no journal");
        // Missing, two levels deep: `run` creates both.
        let new = dir.path().join("a/journal");
        config.journal.dir = Some(new.clone());
        c.journal(&config).expect("a new directory");
        assert!(!dir.path().join("a").exists(), "check mode created it");
        config.journal.dir = Some(dir.path().to_owned());
        c.journal(&config).expect("an existing directory");
        // Under a regular file: cannot be created.
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").expect("write");
        config.journal.dir = Some(plain.join("journal"));
        let m = c.journal(&config).expect_err("under a file").to_string();
        assert!(
            m.contains("`journal.dir`") && m.contains("is a regular file"),
            "{m}"
        );
        config.journal.dir = Some(plain);
        let m = c.journal(&config).expect_err("a file").to_string();
        assert!(m.contains("a regular file"), "{m}");
    }

    #[test]
    fn cgroups_must_be_cgroup2_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("am.yaml");
        let c = Checker { file: &file };
        let mut config = Config {
            cgroups: vec![dir.path().join("missing")],
            ..Config::default()
        };
        let m = c.cgroups(&config).expect_err("missing").to_string();
        assert!(
            m.contains("cgroups[0]") && m.contains("No such file"),
            "{m}"
        );
        // A directory, but not a cgroup: the kernel filter would match nothing.
        config.cgroups = vec![dir.path().to_owned()];
        let m = c.cgroups(&config).expect_err("not cgroup2").to_string();
        assert!(m.contains("not cgroup2"), "{m}");
        if let Some(root) = crate::identity::cgroup::cgroup2_mount() {
            config.cgroups = vec![root];
            c.cgroups(&config).expect("the cgroup2 mount itself");
        }
    }
}
