//! Builds the eBPF programs (agent-monitor-ebpf) for bpfel-unknown-none with the pinned
//! nightly toolchain and bpf-linker; `cargo xtask setup` installs both.
use std::path::Path;

use anyhow::Context as _;

/// The toolchain that builds the eBPF crate. Override with AGENT_MONITOR_EBPF_TOOLCHAIN;
/// `cargo xtask setup` builds bpf-linker against this toolchain's own LLVM.
const DEFAULT_EBPF_TOOLCHAIN: &str = "nightly";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AGENT_MONITOR_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("AGENT_MONITOR_EBPF_TOOLCHAIN")
        .unwrap_or_else(|_| DEFAULT_EBPF_TOOLCHAIN.to_owned());
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir = Path::new(&manifest_dir).join("../agent-monitor-ebpf");
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
