//! Offline validation of the Kubernetes manifests in `deploy/`: each kustomization is
//! rendered with `kubectl kustomize` into `target/manifests/<name>.yaml`, checked against
//! the Kubernetes API schemas by `kubernetes-validate` (strict: unknown fields are errors)
//! and against security best practice by `checkov`. Both tools run from a Python venv at
//! `target/pyenv`, created and filled with pinned versions on first use and reused after.
//!
//! Every checkov finding is either fixed in the manifests or skipped next to the object
//! with a `checkov.io/skipN: CKV_K8S_xx=<reason>` annotation and a YAML comment saying why
//! (deploy/base/daemonset.yaml holds the daemon's).
//!
//! The object types, RBAC and the daemon's config are checked by
//! `agent-monitor/tests/deploy_manifests.rs`; this adds the upstream schemas and checkov.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

/// kubernetes-validate, pinned; it bundles the API schemas of Kubernetes 1.25 to 1.37.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// checkov, pinned, so that a new release's new checks do not fail an unchanged tree.
const CHECKOV_VERSION: &str = "3.3.30";
/// The Kubernetes version whose schemas the manifests are validated against: the oldest
/// the project supports (kubectl 1.32 renders them).
const KUBERNETES_VERSION: &str = "1.32.0";
/// Custom resources, as (apiVersion, kind), that kubernetes-validate has no schema for: it
/// warns about each and validates nothing. They are checked instead by
/// agent-monitor/tests/deploy_manifests.rs, against the Rust types that generate their CRD
/// (unknown fields rejected) and by `policy::validate_policy`. A warning about any other
/// kind fails the check.
const CUSTOM_RESOURCES: &[(&str, &str)] = &[("agent-monitor.dev/v1alpha1", "AgentPolicy")];

/// Renders every kustomization of `deploy/` and runs kubernetes-validate and checkov on them.
pub fn check(root: &Path) -> Result<()> {
    let started = Instant::now();
    let venv = root.join("target/pyenv");
    let bin = python_tools(&venv)?;
    let installed = started.elapsed();

    let out_dir = root.join("target/manifests");
    let files = render(root, &out_dir)?;

    let t = Instant::now();
    kubernetes_validate(&bin, &files)?;
    let validated = t.elapsed();

    let t = Instant::now();
    let summary = checkov(&bin, &files)?;
    let checked = t.elapsed();

    println!(
        "manifests: {} kustomizations valid against Kubernetes {KUBERNETES_VERSION} \
         (kubernetes-validate {KUBERNETES_VALIDATE_VERSION}, {:.1} s); checkov \
         {CHECKOV_VERSION}: {summary} ({:.1} s); tools ready in {:.1} s",
        files.len(),
        validated.as_secs_f64(),
        checked.as_secs_f64(),
        installed.as_secs_f64(),
    );
    Ok(())
}

/// The venv's bin directory, with the pinned tools installed. A venv whose recorded pins
/// match is reused as it is.
fn python_tools(venv: &Path) -> Result<PathBuf> {
    let bin = venv.join("bin");
    let pins =
        format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}\ncheckov=={CHECKOV_VERSION}\n");
    let marker = venv.join("agent-monitor-pins.txt");
    if bin.join("python").exists()
        && std::fs::read_to_string(&marker).is_ok_and(|installed| installed == pins)
    {
        return Ok(bin);
    }
    if !bin.join("python").exists() {
        println!("manifests: creating a Python venv at {}", venv.display());
        run(
            Command::new("python3").arg("-m").arg("venv").arg(venv),
            "python3 -m venv (needs python3 with the venv module; on Debian: apt-get install python3-venv)",
        )?;
    }
    println!(
        "manifests: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} and checkov \
         {CHECKOV_VERSION} into {}",
        venv.display()
    );
    let t = Instant::now();
    run(
        Command::new(bin.join("python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            ))
            .arg(format!("checkov=={CHECKOV_VERSION}")),
        "pip install kubernetes-validate checkov",
    )?;
    println!("manifests: installed in {:.0} s", t.elapsed().as_secs_f64());
    std::fs::write(&marker, pins).with_context(|| format!("writing {}", marker.display()))?;
    Ok(bin)
}

/// The kustomizations, as (file stem, directory under deploy/): the base, each overlay and
/// each example.
fn kustomizations(root: &Path) -> Result<Vec<(String, String)>> {
    let mut out = vec![("base".to_owned(), "base".to_owned())];
    for (group, prefix) in [("overlays", ""), ("examples", "example-")] {
        let dir = root.join("deploy").join(group);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let entry = entry.with_context(|| format!("{}", dir.display()))?;
            if entry.path().join("kustomization.yaml").is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        for name in names {
            out.push((format!("{prefix}{name}"), format!("{group}/{name}")));
        }
    }
    Ok(out)
}

/// Renders each kustomization into `out_dir/<name>.yaml` (after removing what an earlier
/// run left there) and returns the files.
fn render(root: &Path, out_dir: &Path) -> Result<Vec<PathBuf>> {
    if out_dir.exists() {
        std::fs::remove_dir_all(out_dir)
            .with_context(|| format!("removing {}", out_dir.display()))?;
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut files = Vec::new();
    for (name, dir) in kustomizations(root)? {
        let path = root.join("deploy").join(&dir);
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(&path)
            .output()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    anyhow::anyhow!(
                        "kubectl is not installed: the manifests are rendered with \
                         `kubectl kustomize` (kubectl 1.27 or later; no cluster needed)"
                    )
                } else {
                    anyhow::anyhow!("running kubectl kustomize {}: {e}", path.display())
                }
            })?;
        ensure!(
            out.status.success(),
            "kubectl kustomize {} failed ({}):\n{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let file = out_dir.join(format!("{name}.yaml"));
        std::fs::write(&file, &out.stdout).with_context(|| format!("{}", file.display()))?;
        files.push(file);
    }
    Ok(files)
}

/// kubernetes-validate, strict, against [`KUBERNETES_VERSION`]: any error, and any warning
/// other than "no schema" for one of [`CUSTOM_RESOURCES`], fails.
fn kubernetes_validate(bin: &Path, files: &[PathBuf]) -> Result<()> {
    let out = Command::new(bin.join("kubernetes-validate"))
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .args(files)
        .output()
        .context("running kubernetes-validate")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = |line: &str| {
        line.starts_with("WARN ")
            && line.contains("Couldn't find schema for kind")
            && CUSTOM_RESOURCES.iter().any(|(api_version, kind)| {
                line.contains(&format!("kind {kind} with api version {api_version} "))
            })
    };
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !expected(l))
        .collect();
    if !out.status.success() || !problems.is_empty() {
        bail!(
            "kubernetes-validate (Kubernetes {KUBERNETES_VERSION}, strict) found problems \
             ({}):\n{}",
            out.status,
            problems.join("\n")
        );
    }
    Ok(())
}

/// checkov's Kubernetes checks; any failed check fails. Returns a one-line summary.
fn checkov(bin: &Path, files: &[PathBuf]) -> Result<String> {
    let mut cmd = Command::new(bin.join("checkov"));
    // Not --quiet: with it the JSON report leaves out the skipped checks.
    cmd.args(["--framework", "kubernetes", "--output", "json"])
        // No calls to the vendor's platform (guidelines, suppressions): offline and
        // reproducible.
        .arg("--skip-download");
    for f in files {
        cmd.arg("--file").arg(f);
    }
    let out = cmd.output().context("running checkov")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "checkov printed no JSON report ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    // One report per framework: an object, or a list of them.
    let reports: Vec<&Value> = match &report {
        Value::Array(list) => list.iter().collect(),
        one => vec![one],
    };
    let mut passed = 0;
    let mut failed = Vec::new();
    let mut skipped = std::collections::BTreeMap::<String, usize>::new();
    for r in reports {
        let results = &r["results"];
        passed += r["summary"]["passed"].as_u64().unwrap_or(0);
        for c in results["failed_checks"].as_array().into_iter().flatten() {
            failed.push(format!(
                "{} {} — {} ({}:{})",
                c["check_id"].as_str().unwrap_or("?"),
                c["check_name"].as_str().unwrap_or("?"),
                c["resource"].as_str().unwrap_or("?"),
                c["file_path"].as_str().unwrap_or("?"),
                c["file_line_range"]
                    .as_array()
                    .and_then(|r| r.first())
                    .map(Value::to_string)
                    .unwrap_or_default(),
            ));
        }
        for c in results["skipped_checks"].as_array().into_iter().flatten() {
            *skipped
                .entry(c["check_id"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        }
    }
    if !failed.is_empty() {
        bail!(
            "checkov {CHECKOV_VERSION}: {} failed checks; fix each in deploy/, or skip it on \
             the object with a `checkov.io/skipN: <check id>=<reason>` annotation and a \
             comment saying why:\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    // checkov exits 1 on failed checks only; anything else non-zero is a crash.
    ensure!(
        out.status.success(),
        "checkov failed ({}) without failed checks:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(passed > 0, "checkov ran no check on {files:?}");
    let skipped_ids: Vec<&str> = skipped.keys().map(String::as_str).collect();
    Ok(format!(
        "{passed} passed, 0 failed, {} skipped ({})",
        skipped.values().sum::<usize>(),
        skipped_ids.join(", ")
    ))
}

/// Runs `cmd`, failing with `what` and its output when it fails.
fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}
