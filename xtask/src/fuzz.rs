//! `cargo xtask fuzz [SECONDS]`: a bounded run of the journal reader's fuzz target
//! (`fuzz/fuzz_targets/journal_reader.rs`, cargo-fuzz with libFuzzer and AddressSanitizer,
//! on the nightly toolchain setup already provides). `cargo xtask test` runs it too.
//!
//! The target depends on agent-monitor-api only (the schema and the journal format), so
//! its sanitized build is small. Anything libFuzzer finds is left in `fuzz/artifacts/`
//! and fails the run.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::{cargo_bin_dir, output, run, Env};

/// cargo-fuzz, installed by this task when missing or another version.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The target.
const TARGET: &str = "journal_reader";
/// Seconds of fuzzing in `cargo xtask test`.
pub const TEST_SECONDS: u64 = 30;

fn cargo_fuzz() -> Result<()> {
    let bin = cargo_bin_dir().join("cargo-fuzz");
    let version = output(Command::new(&bin).arg("--version")).unwrap_or_default();
    if version.split_whitespace().nth(1) == Some(CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    run(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
        "--force",
    ]))
}

/// Fuzzes the journal reader for `seconds`.
pub fn run_bounded(root: &Path, env: &Env, seconds: u64) -> Result<()> {
    cargo_fuzz()?;
    let toolchain = env
        .iter()
        .find(|(k, _)| k == "AGENT_MONITOR_EBPF_TOOLCHAIN")
        .map(|(_, v)| v.clone())
        .context("setup names no nightly toolchain")?;
    let dir = root.join("fuzz");
    let corpus = dir.join("corpus").join(TARGET);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    eprintln!(
        "fuzz: {TARGET} for {seconds} s (corpus {})",
        corpus.display()
    );
    run(Command::new("cargo")
        .arg(format!("+{toolchain}"))
        .args(["fuzz", "run", TARGET])
        .current_dir(&dir)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // Each input is one segment read whole; a bigger one tells nothing new.
        .arg("-max_len=65536")
        .arg("-rss_limit_mb=2048"))
}
