//! Builds the eBPF programs (agent-monitor-ebpf) for bpfel-unknown-none with the pinned
//! nightly toolchain and bpf-linker; `cargo xtask setup` installs both. Also generates the
//! gRPC service code of the API (`agent-monitor-api/proto/`, compiled in pure Rust by
//! protox) against the messages the agent-monitor-api crate generates.
use std::path::Path;

use anyhow::Context as _;

/// The toolchain that builds the eBPF crate. Override with AGENT_MONITOR_EBPF_TOOLCHAIN;
/// `cargo xtask setup` builds bpf-linker against this toolchain's own LLVM.
const DEFAULT_EBPF_TOOLCHAIN: &str = "nightly";

/// The service's proto file, relative to the schema crate's `proto/`.
const PROTO_FILE: &str = "agent_monitor/v1/agent_monitor.proto";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    compile_protos(Path::new(&manifest_dir))?;
    build_ebpf(&manifest_dir)
}

/// Generates the gRPC client and server; the messages are agent-monitor-api's.
fn compile_protos(manifest_dir: &Path) -> anyhow::Result<()> {
    let include = manifest_dir.join("../agent-monitor-api/proto");
    println!("cargo:rerun-if-changed={}", include.display());
    let mut compiler = protox::Compiler::new([&include]).context("proto include path")?;
    compiler.include_imports(true);
    compiler
        .open_files([PROTO_FILE])
        .with_context(|| format!("compiling {PROTO_FILE}"))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(".agent_monitor.v1", "::agent_monitor_api::pb")
        .compile_fds(compiler.file_descriptor_set())
        .context("generating gRPC code")
}

fn build_ebpf(manifest_dir: &str) -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AGENT_MONITOR_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("AGENT_MONITOR_EBPF_TOOLCHAIN")
        .unwrap_or_else(|_| DEFAULT_EBPF_TOOLCHAIN.to_owned());
    let root_dir = Path::new(manifest_dir).join("../agent-monitor-ebpf");
    let root_dir = root_dir
        .canonicalize()
        .with_context(|| format!("eBPF crate not found at {}", root_dir.display()))?;
    let root_dir = root_dir.to_str().context("eBPF crate path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-monitor-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context(
        "building the eBPF programs; run `cargo xtask setup` if bpf-linker or rust-src is missing",
    )
}
