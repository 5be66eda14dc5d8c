//! Builds the eBPF programs (agent-monitor-ebpf) for bpfel-unknown-none with the pinned
//! nightly toolchain and bpf-linker; `cargo xtask setup` installs both. Also compiles the
//! gRPC API (`proto/`) in pure Rust (protox, no protoc) and writes its encoded file
//! descriptor set to `$OUT_DIR/agent_monitor_descriptor.bin` for server reflection.
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The toolchain that builds the eBPF crate. Override with AGENT_MONITOR_EBPF_TOOLCHAIN;
/// `cargo xtask setup` builds bpf-linker against this toolchain's own LLVM.
const DEFAULT_EBPF_TOOLCHAIN: &str = "nightly";

/// The API's proto files, relative to `proto/`: the gRPC API and the journal's record.
const PROTO_FILES: [&str; 2] = [
    "agent_monitor/v1/agent_monitor.proto",
    "agent_monitor/v1/journal.proto",
];

/// File name (in OUT_DIR) of the encoded file descriptor set.
const DESCRIPTOR_FILE: &str = "agent_monitor_descriptor.bin";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    compile_protos(Path::new(&manifest_dir))?;
    build_ebpf(&manifest_dir)
}

/// Generates the gRPC messages and service, and the descriptor set for reflection.
fn compile_protos(manifest_dir: &Path) -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    let include = manifest_dir.join("proto");
    let mut compiler = protox::Compiler::new([&include]).context("proto include path")?;
    compiler.include_source_info(true).include_imports(true);
    compiler
        .open_files(PROTO_FILES)
        .with_context(|| format!("compiling {PROTO_FILES:?}"))?;
    let descriptor_path = out_dir.join(DESCRIPTOR_FILE);
    std::fs::write(&descriptor_path, compiler.encode_file_descriptor_set())
        .with_context(|| format!("writing {}", descriptor_path.display()))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
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
