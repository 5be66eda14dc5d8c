//! Loading, configuring and attaching the eBPF programs, and reading their counters.

pub mod btf;
pub mod tracefs;

use std::{os::unix::fs::MetadataExt as _, path::PathBuf};

use agent_monitor_common::{
    FileKey, Lane, LaneBudget, BASENAME_CAP, INVENTORY_FILE, LANE_COUNT, NO_FIELD, PATH_CAP,
};
use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use tracing::{debug, info, warn};

/// The eBPF object, built by build.rs from agent-monitor-ebpf.
static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-monitor-probes"));

/// Ring-buffer map names, indexed by [`Lane`].
pub const RING_MAPS: [&str; LANE_COUNT as usize] = ["CRED_EVENTS", "NET_EVENTS", "PROC_EVENTS"];

/// A lane wakes the daemon when this fraction of its ring is waiting; below it the
/// daemon's poll tick collects records without a wakeup per event.
const WAKEUP_DIVISOR: u64 = 4;

/// (program, tracepoint category, tracepoint name, required). Opens are decided at exit
/// alone (see the eBPF crate); the network exit programs are attached before their entry
/// programs so that no entry stashes arguments that no exit will collect.
const ATTACHMENTS: &[(&str, &str, &str, bool)] = &[
    ("open_exit", "syscalls", "sys_exit_open", false),
    ("open_exit", "syscalls", "sys_exit_openat", true),
    ("open_exit", "syscalls", "sys_exit_openat2", false),
    ("open_exit", "syscalls", "sys_exit_creat", false),
    ("open_exit", "syscalls", "sys_exit_open_by_handle_at", false),
    ("io_uring_submit", "io_uring", "io_uring_submit_req", false),
    ("io_uring_complete", "io_uring", "io_uring_complete", false),
    ("net_exit", "syscalls", "sys_exit_connect", true),
    ("net_exit", "syscalls", "sys_exit_sendto", true),
    ("net_exit", "syscalls", "sys_exit_sendmsg", true),
    ("connect_enter", "syscalls", "sys_enter_connect", true),
    ("sendto_enter", "syscalls", "sys_enter_sendto", true),
    ("sendmsg_enter", "syscalls", "sys_enter_sendmsg", true),
    ("tcp_syn_sent", "sock", "inet_sock_set_state", true),
    ("sock_send", "sock", "sock_send_length", false),
    ("sched_exec", "sched", "sched_process_exec", true),
    ("sched_fork", "sched", "sched_process_fork", true),
    ("sched_exit", "sched", "sched_process_exit", true),
];

/// Kernel map names, for errors and status.
pub const WATCH_DEVS_MAP: &str = "WATCH_DEVS";
pub const WATCH_FILES_MAP: &str = "WATCH_FILES";
pub const WATCH_PREFIXES_MAP: &str = "WATCH_PREFIXES";

/// Loading or attaching the probes failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// tracefs is not mounted (needed for tracepoints and their formats).
    #[error("tracefs is not mounted at any of {0:?}; mount it (`mount -t tracefs nodev /sys/kernel/tracing`) or run `cargo xtask setup`")]
    NoTracefs(&'static [&'static str]),
    /// A tracepoint format file could not be read.
    #[error("cannot read tracepoint format {path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tracepoint field the programs need is missing on this kernel.
    #[error("tracepoint {tracepoint} has no field `{field}` on this kernel")]
    MissingField {
        tracepoint: &'static str,
        field: &'static str,
    },
    /// The kernel refused the object (verifier, permissions, map creation).
    #[error("loading the eBPF object failed (are you root, with CAP_BPF and CAP_PERFMON?): {0}")]
    Load(#[source] Box<aya::EbpfError>),
    /// The object lacks a program or map this code expects: a build mismatch.
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    /// A program could not be loaded into the kernel.
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A required tracepoint could not be attached.
    #[error("attaching {name} to {category}/{tracepoint}: {source}")]
    Attach {
        name: &'static str,
        category: &'static str,
        tracepoint: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map could not be opened or written.
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// A prefix is longer than the kernel side can match.
    #[error("prefix {0:?} is longer than {max} bytes", max = PATH_CAP - 1)]
    PrefixTooLong(String),
    /// The kernel's BTF could not give the structure offsets the programs need.
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    /// A configured cgroup directory does not exist.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> ProbeError {
    move |e| ProbeError::Map {
        name,
        source: Box::new(e),
    }
}

/// Loaded and attached programs; dropping this detaches them.
pub struct Probes {
    ebpf: Ebpf,
    drops: PerCpuArray<MapData, u64>,
    attached: Vec<String>,
}

/// The three ring buffers, taken out of [`Probes`] by the consumer.
pub struct Rings {
    pub credential: RingBuf<MapData>,
    pub network: RingBuf<MapData>,
    pub process: RingBuf<MapData>,
}

fn read_format(events: &std::path::Path, tracepoint: &str) -> Result<String, ProbeError> {
    let path = events.join(tracepoint).join("format");
    std::fs::read_to_string(&path).map_err(|source| ProbeError::Format { path, source })
}

/// A lane's budget with its defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Sustained records per second per workload; 0: no budget.
    pub per_second: u32,
    /// Records a workload may make at once above that rate.
    pub burst: u32,
    /// Enforced only while this percentage of the ring waits to be read (0: always).
    pub pressure_percent: u8,
}

/// Default budgets, indexed by lane. Credential events are cut only when the ring is
/// three quarters full: while there is room a workload's reads all go through, however
/// many; under pressure each workload's share is 1,000 a second above a burst of 2,000
/// (a pod reading its token 1,000 times at once keeps every read), so the last quarter of
/// the ring stays for the workloads within their share as long as the daemon drains more
/// than those shares. A share must stay below what the daemon drains, or a flooder within
/// its share fills the ring anyway (seen at 20,000 a second with a debug build on a busy
/// machine). Network and
/// process records are budgeted always: 20,000 connects or sends a second is far above
/// what an agent makes, and the process budget only ever drops forks and exits (see the
/// eBPF crate's `reserve_proc`).
pub const DEFAULT_BUDGETS: [Budget; LANE_COUNT as usize] = [
    Budget {
        per_second: 1_000,
        burst: 2_000,
        pressure_percent: 75,
    },
    Budget {
        per_second: 20_000,
        burst: 20_000,
        pressure_percent: 0,
    },
    Budget {
        per_second: 5_000,
        burst: 10_000,
        pressure_percent: 0,
    },
];

/// What the probes are loaded with: the kernel-side part of the config, converted by the
/// wiring (`app::settings::probes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSettings {
    /// Ring size in bytes of each lane, indexed by [`Lane`].
    pub ring_bytes: [u32; LANE_COUNT as usize],
    /// Per-workload budget of each lane, indexed by [`Lane`].
    pub budgets: [Budget; LANE_COUNT as usize],
    /// Cgroup directories whose processes alone are traced; empty: every process.
    pub cgroups: Vec<PathBuf>,
    /// Whether reads of `/proc/<pid>/environ` are watched.
    pub proc_environ: bool,
    /// Whether the programs' own log is forwarded.
    pub kernel_log: bool,
    /// The kernel's read-then-connect window, in milliseconds.
    pub exfil_window_ms: u64,
    /// Entries of the watched-filesystem map.
    pub watched_filesystems: u32,
    /// Entries of the inventory-file map.
    pub inventory_files: u32,
    /// Watched path prefixes (already including the kubelet's).
    pub prefixes: Vec<String>,
    /// Watched file basenames.
    pub basenames: Vec<String>,
}

impl Budget {
    /// The kernel's form of this budget for a lane whose ring is `ring_bytes` long.
    fn kernel(self, ring_bytes: u32) -> LaneBudget {
        const NS_PER_SEC: u64 = 1_000_000_000;
        if self.per_second == 0 {
            return LaneBudget {
                interval_ns: 0,
                tolerance_ns: 0,
                pressure_bytes: 0,
            };
        }
        // At least 1 ns: a rate above 10^9 records a second is no budget at all.
        let interval_ns = (NS_PER_SEC / u64::from(self.per_second)).max(1);
        LaneBudget {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(self.burst.saturating_sub(1))),
            pressure_bytes: u64::from(ring_bytes) * u64::from(self.pressure_percent) / 100,
        }
    }
}

/// Name of the kernel's per-workload budget drop counters.
const BUDGET_DROPS_MAP: &str = "BUDGET_DROPS";

impl Probes {
    /// Loads the programs with `config`, fills the filter maps and attaches every
    /// tracepoint. `own_tgid` is the process whose syscalls are never reported.
    pub fn load(config: &ProbeSettings, own_tgid: u32) -> Result<Self, ProbeError> {
        let events = tracefs::events_dir().ok_or(ProbeError::NoTracefs(tracefs::TRACEFS_ROOTS))?;
        let fork_format = read_format(&events, "sched/sched_process_fork")?;
        let fork_child =
            tracefs::field_offset(&fork_format, "child_pid").ok_or(ProbeError::MissingField {
                tracepoint: "sched/sched_process_fork",
                field: "child_pid",
            })?;
        let exit_format = read_format(&events, "sched/sched_process_exit")?;
        let exit_group_dead = tracefs::field_offset(&exit_format, "group_dead").unwrap_or(NO_FIELD);
        if exit_group_dead == NO_FIELD {
            info!("sched_process_exit has no group_dead field; thread exits will be reported too");
        }

        let ring_bytes = config.ring_bytes;
        let budgets: [LaneBudget; LANE_COUNT as usize] =
            std::array::from_fn(|lane| config.budgets[lane].kernel(ring_bytes[lane]));
        let wakeup: [u64; LANE_COUNT as usize] = ring_bytes.map(|b| u64::from(b) / WAKEUP_DIVISOR);
        let cgroup_ids = config
            .cgroups
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .map(|m| m.ino())
                    .map_err(|source| ProbeError::Cgroup {
                        path: p.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<u64>, _>>()?;
        let cgroup_filter: u8 = u8::from(!cgroup_ids.is_empty());
        let proc_environ: u8 = u8::from(config.proc_environ);
        let log_level: u8 = if config.kernel_log {
            aya_log::Level::Trace as u8
        } else {
            0
        };

        let offsets = btf::kernel_offsets()?;
        if !offsets.missing.is_empty() {
            warn!(
                "kernel BTF lacks {}; what needs them is not traced on this kernel",
                offsets.missing.join(", ")
            );
        }
        let exfil_window_ns: u64 = config.exfil_window_ms.saturating_mul(1_000_000);

        let mut loader = EbpfLoader::new();
        loader
            .override_global("OFFSETS", &offsets.kernel, true)
            .override_global("EXFIL_WINDOW_NS", &exfil_window_ns, true)
            .override_global("OWN_TGID", &own_tgid, true)
            .override_global("CGROUP_FILTER", &cgroup_filter, true)
            .override_global("WATCH_PROC_ENVIRON", &proc_environ, true)
            .override_global("WAKEUP_BYTES", &wakeup, true)
            .override_global("BUDGETS", &budgets, true)
            .override_global("FORK_CHILD_PID_OFFSET", &fork_child, true)
            .override_global("EXIT_GROUP_DEAD_OFFSET", &exit_group_dead, true)
            .override_global(aya_log::LEVEL, &log_level, false);
        for (name, bytes) in RING_MAPS.iter().zip(ring_bytes) {
            loader.map_max_entries(name, bytes);
        }
        loader
            .map_max_entries(WATCH_DEVS_MAP, config.watched_filesystems)
            .map_max_entries(WATCH_FILES_MAP, config.inventory_files);
        let mut ebpf = loader
            .load(PROBES_OBJECT)
            .map_err(|e| ProbeError::Load(Box::new(e)))?;

        fill_filters(&mut ebpf, config, &cgroup_ids)?;

        let mut attached = Vec::new();
        for &(name, category, tracepoint, required) in ATTACHMENTS {
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or(ProbeError::Missing {
                    kind: "program",
                    name,
                })?
                .try_into()
                .map_err(|e| ProbeError::Program {
                    name,
                    source: Box::new(e),
                })?;
            if program.fd().is_err() {
                program.load().map_err(|e| ProbeError::Program {
                    name,
                    source: Box::new(e),
                })?;
            }
            match program.attach(category, tracepoint) {
                Ok(_) => attached.push(format!("{category}/{tracepoint}")),
                Err(e) if !required => {
                    warn!("optional tracepoint {category}/{tracepoint} not attached: {e}");
                }
                Err(e) => {
                    return Err(ProbeError::Attach {
                        name,
                        category,
                        tracepoint,
                        source: Box::new(e),
                    })
                }
            }
        }
        info!(
            "attached {} tracepoints: {}",
            attached.len(),
            attached.join(", ")
        );

        let drops = PerCpuArray::try_from(ebpf.take_map("DROPS").ok_or(ProbeError::Missing {
            kind: "map",
            name: "DROPS",
        })?)
        .map_err(map_err("DROPS"))?;
        Ok(Self {
            ebpf,
            drops,
            attached,
        })
    }

    /// The tracepoints attached, as `category/name`.
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// Sets what the kernel checks for files of the filesystem whose `s_dev` (kernel
    /// encoding) is `dev`: [`agent_monitor_common::dev_flags`] bits.
    pub fn set_dev_flags(&mut self, dev: u32, flags: u8) -> Result<(), ProbeError> {
        self.devs_map()?
            .insert(dev, flags, 0)
            .map_err(map_err(WATCH_DEVS_MAP))
    }

    /// Forgets a filesystem set with [`Probes::set_dev_flags`].
    pub fn clear_dev(&mut self, dev: u32) -> Result<(), ProbeError> {
        self.devs_map()?
            .remove(&dev)
            .map_err(map_err(WATCH_DEVS_MAP))
    }

    fn devs_map(&mut self) -> Result<HashMap<&mut MapData, u32, u8>, ProbeError> {
        map_mut(&mut self.ebpf, WATCH_DEVS_MAP)
    }

    /// The watched-device map as the kernel holds it: (device, flags).
    pub fn watched_devs(&self) -> Result<Vec<(u32, u8)>, ProbeError> {
        let map: HashMap<&MapData, u32, u8> = HashMap::try_from(
            self.ebpf
                .map(WATCH_DEVS_MAP)
                .ok_or(missing_map(WATCH_DEVS_MAP))?,
        )
        .map_err(map_err(WATCH_DEVS_MAP))?;
        map.iter()
            .collect::<Result<Vec<(u32, u8)>, _>>()
            .map_err(map_err(WATCH_DEVS_MAP))
    }

    /// Watches a file by identity.
    pub fn watch_file(&mut self, key: FileKey) -> Result<(), ProbeError> {
        self.files_map()?
            .insert(key, INVENTORY_FILE, 0)
            .map_err(map_err(WATCH_FILES_MAP))
    }

    /// Stops watching a file added with [`Probes::watch_file`].
    pub fn unwatch_file(&mut self, key: FileKey) -> Result<(), ProbeError> {
        self.files_map()?
            .remove(&key)
            .map_err(map_err(WATCH_FILES_MAP))
    }

    fn files_map(&mut self) -> Result<HashMap<&mut MapData, FileKey, u8>, ProbeError> {
        map_mut(&mut self.ebpf, WATCH_FILES_MAP)
    }

    /// Takes the ring buffers out for the consumer. Fails if called twice.
    pub fn take_rings(&mut self) -> Result<Rings, ProbeError> {
        let mut take = |name: &'static str| -> Result<RingBuf<MapData>, ProbeError> {
            let map = self
                .ebpf
                .take_map(name)
                .ok_or(ProbeError::Missing { kind: "map", name })?;
            RingBuf::try_from(map).map_err(map_err(name))
        };
        Ok(Rings {
            credential: take(RING_MAPS[Lane::Credential as usize])?,
            network: take(RING_MAPS[Lane::Network as usize])?,
            process: take(RING_MAPS[Lane::Process as usize])?,
        })
    }

    /// Records lost so far in each lane (summed over CPUs), indexed by [`Lane`].
    pub fn drops(&self) -> Result<[u64; LANE_COUNT as usize], ProbeError> {
        let mut out = [0u64; LANE_COUNT as usize];
        for (lane, slot) in out.iter_mut().enumerate() {
            let values = self
                .drops
                .get(&(lane as u32), 0)
                .map_err(map_err("DROPS"))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// Records each lane's budget refused so far, per workload: (cgroup id, counts indexed
    /// by [`Lane`]). Only workloads that went over a budget are listed.
    pub fn budget_drops(&self) -> Result<Vec<(u64, [u64; LANE_COUNT as usize])>, ProbeError> {
        let map: HashMap<&MapData, u64, [u64; LANE_COUNT as usize]> = HashMap::try_from(
            self.ebpf
                .map(BUDGET_DROPS_MAP)
                .ok_or(missing_map(BUDGET_DROPS_MAP))?,
        )
        .map_err(map_err(BUDGET_DROPS_MAP))?;
        map.iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(BUDGET_DROPS_MAP))
    }

    /// Starts forwarding kernel-side log records to the `log` crate (which the daemon
    /// bridges into its `tracing` log). Only meaningful when
    /// the probes were loaded with `kernel_log`.
    pub fn take_logger(
        &mut self,
    ) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }
}

fn missing_map(name: &'static str) -> ProbeError {
    ProbeError::Missing { kind: "map", name }
}

/// The map `name` of the loaded object, opened as `M` (a `HashMap`, an `LpmTrie`, ...).
fn map_mut<'a, M>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<M, ProbeError>
where
    M: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    M::try_from(ebpf.map_mut(name).ok_or(missing_map(name))?).map_err(map_err(name))
}

fn prefix_map(ebpf: &mut Ebpf) -> Result<LpmTrie<&mut MapData, [u8; PATH_CAP], u8>, ProbeError> {
    map_mut(ebpf, WATCH_PREFIXES_MAP)
}

/// The LPM key of a prefix: its bytes, matched bit for bit.
fn prefix_key(prefix: &str) -> Result<Key<[u8; PATH_CAP]>, ProbeError> {
    if prefix.len() >= PATH_CAP {
        return Err(ProbeError::PrefixTooLong(prefix.to_owned()));
    }
    let mut data = [0u8; PATH_CAP];
    data[..prefix.len()].copy_from_slice(prefix.as_bytes());
    Ok(Key::new((prefix.len() * 8) as u32, data))
}

/// Writes the watched prefixes, basenames and monitored cgroups into their maps.
fn fill_filters(
    ebpf: &mut Ebpf,
    config: &ProbeSettings,
    cgroup_ids: &[u64],
) -> Result<(), ProbeError> {
    let mut prefixes = prefix_map(ebpf)?;
    let all = &config.prefixes;
    for prefix in all {
        prefixes
            .insert(&prefix_key(prefix)?, 1, 0)
            .map_err(map_err("WATCH_PREFIXES"))?;
    }
    debug!("watching {} path prefixes", all.len());

    let mut basenames: HashMap<_, [u8; BASENAME_CAP], u8> = map_mut(ebpf, "WATCH_BASENAMES")?;
    for name in &config.basenames {
        let mut key = [0u8; BASENAME_CAP];
        key[..name.len()].copy_from_slice(name.as_bytes());
        basenames
            .insert(key, 1, 0)
            .map_err(map_err("WATCH_BASENAMES"))?;
    }

    let mut cgroups: HashMap<_, u64, u8> = map_mut(ebpf, "MONITORED_CGROUPS")?;
    for id in cgroup_ids {
        cgroups
            .insert(id, 1, 0)
            .map_err(map_err("MONITORED_CGROUPS"))?;
    }
    Ok(())
}
