//! `cargo xtask bench overhead`: what the probes add to an open+close.
//!
//! In one run, a tight open+close loop (am-testkid `time-opens`) on an unwatched and on a
//! watched file, without the daemon and with the release daemon attached, alternating over
//! several rounds; the median of each is reported with the ratio to its own baseline.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, Env};

const ROUNDS: usize = 5;

/// CPU pinning: the measured loop on the last CPU, the daemon on the others, so the
/// figures compare the same core with and without probes rather than scheduler luck.
fn pinned(cpus: &str, program: &Path) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpus]).arg(program);
    cmd
}

fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn kid_cpus() -> String {
    (cpu_count() - 1).to_string()
}

fn daemon_cpus() -> String {
    match cpu_count() {
        1 => "0".to_owned(),
        n => format!("0-{}", n - 2),
    }
}

fn time_opens(kid: &Path, path: &Path, iterations: u64) -> Result<f64> {
    let out = pinned(&kid_cpus(), kid)
        .arg(format!("time-opens:{}:{iterations}", path.display()))
        .output()
        .context("running am-testkid")?;
    if !out.status.success() {
        bail!(
            "am-testkid failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("ns_per_call "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("am-testkid printed no ns_per_call: {text}"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Daemon {
    child: std::process::Child,
}

impl Daemon {
    fn start(bin: &Path, config: &Path) -> Result<Self> {
        let mut child = pinned(&daemon_cpus(), bin)
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting agent-monitor")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let Some(line) = lines.next() else {
                bail!("agent-monitor exited before it was running");
            };
            let line = line?;
            if line.contains("agent-monitor running") {
                break;
            }
            if Instant::now() > deadline {
                bail!("agent-monitor did not start within 30 s");
            }
        }
        // Keep draining stderr so the daemon never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Self { child })
    }

    fn stop(mut self) -> Result<()> {
        // SIGTERM, as an orchestrator would send it; kill(1) keeps xtask free of libc.
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("agent-monitor exited with {status}");
        }
        Ok(())
    }
}

/// Counts delivered open records and lost credential records in a daemon output file
/// (the proto3 JSON form of `agent_monitor.v1.Event`, one per line).
fn count_output(path: &Path) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut opens = 0;
    let mut lost = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("daemon output line is not JSON: {line}"))?;
        if v.get("open").is_some() {
            opens += 1;
        } else if v["lost"]["lane"] == "credential" {
            // uint64 fields are strings in proto3 JSON.
            lost += v["lost"]["count"]
                .as_str()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok((opens, lost))
}

pub fn overhead(root: &Path, env: &Env, iterations: u64) -> Result<()> {
    cargo(
        root,
        env,
        &[
            "build",
            "--release",
            "-p",
            "agent-monitor",
            "-p",
            "agent-monitor-tests",
        ],
    )?;
    let bin = root.join("target/release/agent-monitor");
    let kid = root.join("target/release/am-testkid");
    let dir = std::env::temp_dir().join(format!("am-bench-{}", std::process::id()));
    let watched_dir = dir.join("watched");
    std::fs::create_dir_all(&watched_dir)?;
    let watched = watched_dir.join("token");
    let unwatched = dir.join("plain.txt");
    std::fs::write(&watched, b"x")?;
    std::fs::write(&unwatched, b"x")?;
    let output = dir.join("events.jsonl");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "watch:\n  prefixes: [\"{}/\"]\n  basenames: []\noutput: \"{}\"\nalerts: {{output: none}}\ngrpc: {{listen: none}}\nadmin: {{listen: none}}\n",
            watched_dir.display(),
            output.display()
        ),
    )?;

    let mut base = (Vec::new(), Vec::new());
    let mut probed = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        base.0.push(time_opens(&kid, &unwatched, iterations)?);
        base.1.push(time_opens(&kid, &watched, iterations)?);
        let daemon = Daemon::start(&bin, &config)?;
        probed.0.push(time_opens(&kid, &unwatched, iterations)?);
        probed.1.push(time_opens(&kid, &watched, iterations)?);
        daemon.stop()?;
        eprintln!("bench overhead: round {}/{ROUNDS} done", round + 1);
    }
    let (opens, lost) = count_output(&output)?;
    let _ = std::fs::remove_dir_all(&dir);

    let b_un = median(&mut base.0);
    let b_w = median(&mut base.1);
    let p_un = median(&mut probed.0);
    let p_w = median(&mut probed.1);
    println!(
        "open+close, {iterations} iterations, median of {ROUNDS} rounds (ns per call); loop on CPU {}, daemon on CPU {}",
        kid_cpus(),
        daemon_cpus()
    );
    println!(
        "{:<12} {:>12} {:>14} {:>10} {:>8}",
        "file", "no probes", "probes+daemon", "added", "ratio"
    );
    println!(
        "{:<12} {:>12.0} {:>14.0} {:>10.0} {:>8.3}",
        "unwatched",
        b_un,
        p_un,
        p_un - b_un,
        p_un / b_un
    );
    println!(
        "{:<12} {:>12.0} {:>14.0} {:>10.0} {:>8.3}",
        "watched",
        b_w,
        p_w,
        p_w - b_w,
        p_w / b_w
    );
    let expected = iterations * ROUNDS as u64;
    println!(
        "watched opens made with the daemon attached: {expected}; delivered as events: {opens}; reported lost: {lost}; unaccounted: {}",
        expected as i64 - opens as i64 - lost as i64
    );
    Ok(())
}
