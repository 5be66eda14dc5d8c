//! Developer tasks. `cargo xtask --help` lists them.
//!
//! `setup` is idempotent and is run first by `run`, `test` and `bench`: a fresh machine
//! needs nothing but rustup and cargo before `cargo xtask run` or `cargo xtask test`.

mod bench;
mod fuzz;
mod image;
mod layers;
mod manifests;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

/// The nightly that builds the eBPF crate when the machine has no `nightly` toolchain. Its
/// LLVM must match bpf-linker's; setup builds bpf-linker against whichever it uses.
const PINNED_NIGHTLY: &str = "nightly-2026-05-20";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM majors bpf-linker 0.13 can be built for.
const BPF_LINKER_LLVM_MAJORS: &[u32] = &[21, 22, 23];
/// Debian packages the tests use (ip for network namespaces, unshare for mount namespaces,
/// podman and runc for the image and the container test, kubectl to render `deploy/`).
/// runc is named because podman's default runtime, crun, refuses a hybrid cgroup layout.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("unshare", "util-linux"),
    ("podman", "podman"),
    ("runc", "runc"),
    ("kubectl", "kubernetes-client"),
];

#[derive(Parser)]
#[command(about = "agent-monitor developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install and mount what building and running need (idempotent): Debian packages,
    /// tracefs and bpffs, the eBPF toolchain's rust-src, bpf-linker built against that
    /// toolchain's own LLVM.
    Setup,
    /// Set up, build in release mode and run the daemon with the built-in default config,
    /// printing every event as one JSON line. Arguments after `--` go to `agent-monitor run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then check formatting and lints, build the image, run every test (including
    /// the ones that need root, BPF and podman, which fail here rather than skip), fuzz the
    /// journal reader for 30 s, validate the rendered manifests (kubernetes-validate,
    /// checkov) and run the demo.
    Test,
    /// Check that no module of agent-monitor imports a module downstream of it in the
    /// flow declared in `xtask/src/layers.rs` (also run by `test`).
    Layers,
    /// Set up and fuzz the journal reader (cargo-fuzz, installed if missing) for SECONDS.
    Fuzz {
        #[arg(default_value_t = 60)]
        seconds: u64,
    },
    /// Set up and run the two-tier demo on this machine: simulated pods, the real daemon,
    /// one benign and a few hostile actions, and the alerts they raise.
    Demo,
    /// Set up, build the release binary and the OCI image `localhost/agent-monitor:<version>`
    /// (FROM scratch, podman with the vfs storage driver; no Docker engine or registry).
    Image,
    /// Set up and run a benchmark: `overhead` (cost the probes add to open+close, a
    /// connect and getppid), `journal` (the forensic journal: pipeline cost, write
    /// throughput on tmpfs and disk, bytes per event, replay throughput), `replay` (replay
    /// throughput only), `pipeline` (the userspace pipeline's events per CPU-second on a
    /// recorded stream, stage by stage) or `flood` (a workload's reads during another's
    /// flood, with budgets on and off, next to the same reads alone; the highest paced open
    /// rate from one workload delivered with zero loss) or `latency` (syscall to a gRPC
    /// client, p50/p99/max of events and alerts, at 50,000 watched opens/s next to 1,000/s).
    Bench {
        #[arg(default_value = "overhead")]
        name: String,
        /// Loop iterations per measurement (overhead: opens or getppid calls, default
        /// 200000; journal and replay: events per run, default 1000000; pipeline: records
        /// in the recorded stream, default 400000; flood: paced opens per rate, default
        /// 200000; latency: seconds of load per rate and round, default 8).
        #[arg(long)]
        iterations: Option<u64>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.task {
        Task::Setup => {
            setup()?;
        }
        Task::Run { args } => {
            let env = setup()?;
            cargo(
                &root,
                &env,
                &["build", "--release", "--package", "agent-monitor"],
            )?;
            let bin = root.join("target/release/agent-monitor");
            let mut cmd = Command::new(&bin);
            cmd.arg("run").args(&args);
            let err = exec(cmd);
            bail!("running {}: {err}", bin.display());
        }
        Task::Test => {
            let env = setup()?;
            cargo(&root, &env, &["fmt", "--all", "--", "--check"])?;
            cargo(
                &root,
                &env,
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            )?;
            layers::check(&root)?;
            // The container test runs the image.
            image::build(&root, &env)?;
            let mut env = env;
            // Privileged tests fail instead of skipping: this command promises they ran.
            env.push(("AGENT_MONITOR_REQUIRE_PRIVILEGED".into(), "1".into()));
            cargo(&root, &env, &["test", "--workspace"])?;
            fuzz::run_bounded(&root, &env, fuzz::TEST_SECONDS)?;
            manifests::check(&root)?;
            demo(&root, &env)?;
            println!(
                "xtask test: formatting, lints, every test, the fuzz run, the manifest checks and the demo passed"
            );
        }
        Task::Layers => {
            layers::check(&root)?;
        }
        Task::Fuzz { seconds } => {
            let env = setup()?;
            fuzz::run_bounded(&root, &env, seconds)?;
        }
        Task::Demo => {
            let env = setup()?;
            demo(&root, &env)?;
        }
        Task::Image => {
            let env = setup()?;
            image::build(&root, &env)?;
        }
        Task::Bench { name, iterations } => {
            let env = setup()?;
            match name.as_str() {
                "overhead" => bench::overhead(&root, &env, iterations.unwrap_or(200_000))?,
                "journal" | "replay" => {
                    bench::journal(&root, &env, &name, iterations.unwrap_or(1_000_000))?
                }
                "pipeline" => bench::pipeline(&root, &env, iterations.unwrap_or(400_000))?,
                "flood" => bench::flood(&root, &env, iterations.unwrap_or(200_000))?,
                "latency" => bench::latency(&root, &env, iterations.unwrap_or(8))?,
                other => bail!(
                    "unknown benchmark {other:?}; available: overhead, journal, replay, pipeline, flood, latency"
                ),
            }
        }
    }
    Ok(())
}

/// Builds the daemon and the demo driver (`tests/src/bin/am-demo.rs`) and runs the demo,
/// which fails when an expected alert is missing.
fn demo(root: &Path, env: &Env) -> Result<()> {
    cargo(
        root,
        env,
        &[
            "build",
            "--package",
            "agent-monitor",
            "--bin",
            "agent-monitor",
            "--package",
            "agent-monitor-tests",
            "--bin",
            "am-demo",
        ],
    )?;
    let mut cmd = Command::new(root.join("target/debug/am-demo"));
    cmd.current_dir(root)
        .arg("--daemon")
        .arg(root.join("target/debug/agent-monitor"))
        .arg("--policies")
        .arg(root.join("deploy/examples/two-tier/agentpolicies.yaml"));
    run(&mut cmd)
}

fn exec(mut cmd: Command) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    cmd.exec()
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask has no parent directory")?
        .to_owned())
}

/// Extra environment for cargo invocations, decided by setup.
type Env = Vec<(String, String)>;

fn cargo(root: &Path, env: &Env, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Everything a build, a run and the tests need. Returns the environment cargo must see.
fn setup() -> Result<Env> {
    if !is_root() {
        bail!("agent-monitor loads eBPF programs and creates cgroups: run as root");
    }
    apt_packages()?;
    python_packages()?;
    mounts()?;
    let toolchain = ebpf_toolchain()?;
    rust_src(&toolchain)?;
    bpf_linker(&toolchain)?;
    Ok(vec![("AGENT_MONITOR_EBPF_TOOLCHAIN".to_owned(), toolchain)])
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {missing:?}");
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Python packages of the test that talks to the daemon with a gRPC client nobody here
/// wrote (grpcio, stubs generated by grpcio-tools).
const PYTHON_PACKAGES: &[(&str, &str)] = &[("grpc", "grpcio"), ("grpc_tools", "grpcio-tools")];

fn python_packages() -> Result<()> {
    let missing: Vec<&str> = PYTHON_PACKAGES
        .iter()
        .filter(|(module, _)| {
            !Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Python packages {missing:?}");
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(&missing)
        .env("PIP_ROOT_USER_ACTION", "ignore"))
}

fn is_mountpoint(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(4) == Some(path)))
        .unwrap_or(false)
}

fn mounts() -> Result<()> {
    for (path, fstype) in [("/sys/kernel/tracing", "tracefs"), ("/sys/fs/bpf", "bpf")] {
        if is_mountpoint(path) {
            continue;
        }
        eprintln!("setup: mounting {fstype} at {path}");
        std::fs::create_dir_all(path).with_context(|| format!("creating {path}"))?;
        run(Command::new("mount").args(["-t", fstype, "nodev", path]))?;
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    if !mountinfo.lines().any(|l| l.contains(" - cgroup2 ")) {
        let path = "/sys/fs/cgroup/unified";
        eprintln!("setup: mounting cgroup2 at {path}");
        std::fs::create_dir_all(path)?;
        run(Command::new("mount").args(["-t", "cgroup2", "nodev", path]))?;
    }
    Ok(())
}

/// `nightly` when installed, else the pinned nightly (installed if missing). An explicit
/// AGENT_MONITOR_EBPF_TOOLCHAIN wins.
fn ebpf_toolchain() -> Result<String> {
    if let Ok(tc) = std::env::var("AGENT_MONITOR_EBPF_TOOLCHAIN") {
        return Ok(tc);
    }
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))?;
    let names: Vec<&str> = installed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    if names
        .iter()
        .any(|n| n.starts_with("nightly-x86_64") || *n == "nightly")
    {
        return Ok("nightly".to_owned());
    }
    if !names.iter().any(|n| n.starts_with(PINNED_NIGHTLY)) {
        eprintln!("setup: installing {PINNED_NIGHTLY}");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            PINNED_NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    Ok(PINNED_NIGHTLY.to_owned())
}

fn rust_src(toolchain: &str) -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to {toolchain}");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", toolchain]))
}

/// LLVM major version and the libLLVM file of a toolchain.
fn toolchain_llvm(toolchain: &str) -> Result<(u32, PathBuf)> {
    let vv = output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .arg("-vV"),
    )?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc -vV prints no LLVM version")?;
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("unparsable LLVM version {version:?}"))?;
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .args(["--print", "sysroot"]),
    )?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let lib = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        })
        .with_context(|| format!("no libLLVM.so.{major}* in {}", lib_dir.display()))?;
    Ok((major, lib))
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// Builds bpf-linker against the eBPF toolchain's own libLLVM (a copy in a stable prefix,
/// so a toolchain update cannot break the linker), unless that build is already there.
fn bpf_linker(toolchain: &str) -> Result<()> {
    let (major, lib) = toolchain_llvm(toolchain)?;
    if !BPF_LINKER_LLVM_MAJORS.contains(&major) {
        bail!("{toolchain} uses LLVM {major}; bpf-linker {BPF_LINKER_VERSION} supports {BPF_LINKER_LLVM_MAJORS:?}");
    }
    let lib_name = lib.file_name().context("libLLVM has no name")?;
    let prefix = PathBuf::from(format!("/opt/bpf-linker-llvm{major}"));
    let prefix_lib = prefix.join("lib");
    let linker = cargo_bin_dir().join("bpf-linker");
    if linker.exists() {
        let ldd = output(Command::new("ldd").arg(&linker)).unwrap_or_default();
        let expected = prefix_lib.join(lib_name);
        let ok = ldd.lines().any(|l| {
            l.contains(&*lib_name.to_string_lossy()) && l.contains(&*expected.to_string_lossy())
        });
        let version = output(Command::new(&linker).arg("--version")).unwrap_or_default();
        if ok && expected.exists() && version.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} of {toolchain} (about a minute)");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    std::fs::copy(&lib, prefix_lib.join(lib_name))
        .with_context(|| format!("copying {}", lib.display()))?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(lib_name, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
}
