//! Policy files as users write them: malformed ones are rejected with the file, the field
//! and what was expected; the shipped examples and the CRD stay valid and in sync; and the
//! reloader swaps in good versions and keeps the last good one over a bad one.

#[path = "support/logs.rs"]
mod logs;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::RwLock,
    time::{Duration, Instant},
};

use agent_monitor::{
    identity::Workload,
    policy::{
        crd_yaml,
        matching::{path_glob, Globs},
        parse_policies, spawn_reloader, DestinationClass, PolicySet, PolicySources, Tier,
    },
};
use logs::{logged, record_logs};

const HEADER: &str = "apiVersion: agent-monitor.dev/v1alpha1\nkind: AgentPolicy\n";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is in a workspace")
        .to_owned()
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("am-policy")
        .tempdir()
        .expect("tempdir")
}

/// A policy document named `name` with `spec` (indented by two spaces).
fn doc(name: &str, spec: &str) -> String {
    format!("{HEADER}metadata:\n  name: {name}\nspec:\n{spec}")
}

#[test]
fn malformed_policies_name_file_field_and_expectation() {
    let good = doc("ok", "  tier: worker\n");
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "api-version",
            good.replace("agent-monitor.dev/v1alpha1", "agent-monitor.dev/v1"),
            &[
                "field `apiVersion`",
                "expected `agent-monitor.dev/v1alpha1`",
                "got `agent-monitor.dev/v1`",
            ],
        ),
        (
            "no-api-version",
            good.replace("apiVersion: agent-monitor.dev/v1alpha1\n", ""),
            &[
                "field `apiVersion`",
                "expected `agent-monitor.dev/v1alpha1`",
                "got nothing",
            ],
        ),
        (
            "kind",
            good.replace("kind: AgentPolicy", "kind: NetworkPolicy"),
            &[
                "field `kind`",
                "expected `AgentPolicy`",
                "got `NetworkPolicy`",
            ],
        ),
        (
            "no-name",
            format!("{HEADER}metadata:\n  namespace: agents\nspec: {{}}\n"),
            &["field `metadata.name`", "expected a policy name"],
        ),
        (
            "bad-name",
            doc("Agent_Proxy", "  tier: proxy\n"),
            &[
                "field `metadata.name`",
                "expected a DNS subdomain name",
                "`Agent_Proxy`",
            ],
        ),
        (
            "no-spec",
            format!("{HEADER}metadata:\n  name: x\n"),
            &["field `spec`", "missing field `spec`"],
        ),
        (
            "top-level-typo",
            format!("{HEADER}metadata:\n  name: x\nspec: {{}}\nstauts: {{}}\n"),
            &[
                "field `stauts`",
                "expected one of `apiVersion`, `kind`, `metadata`, `spec`",
            ],
        ),
        (
            "unknown-field",
            doc("x", "  egres:\n    allow: []\n"),
            &[
                "field `spec.egres`",
                "unknown field `egres`",
                "expected one of",
                "line 6",
            ],
        ),
        (
            "nested-unknown-field",
            doc(
                "x",
                "  egress:\n    allow:\n      - class: dns\n        port: [53]\n",
            ),
            &[
                "field `spec.egress.allow[0].port`",
                "unknown field `port`",
                "`ports`",
            ],
        ),
        (
            "bad-cidr-prefix",
            doc(
                "x",
                "  egress:\n    allow:\n      - class: dns\n      - cidr: 10.0.0.0/33\n",
            ),
            &[
                "field `spec.egress.allow[1].cidr`",
                "prefix length is a number from 0 to 32",
                "`10.0.0.0/33`",
            ],
        ),
        (
            "bad-cidr-address",
            doc(
                "x",
                "  egress:\n    allow:\n      - cidr: llm.example.com/32\n",
            ),
            &[
                "field `spec.egress.allow[0].cidr`",
                "an IPv4 or IPv6 address or CIDR",
                "`llm.example.com/32`",
            ],
        ),
        (
            "bad-cidr-v6-prefix",
            doc(
                "x",
                "  egress:\n    allow:\n      - cidr: \"2001:db8::/129\"\n",
            ),
            &["field `spec.egress.allow[0].cidr`", "from 0 to 128 (IPv6)"],
        ),
        (
            "class-and-cidr",
            doc(
                "x",
                "  egress:\n    allow:\n      - class: cluster\n        cidr: 10.0.0.0/8\n",
            ),
            &[
                "field `spec.egress.allow[0]`",
                "expected exactly one of `class` or `cidr`",
                "got both",
            ],
        ),
        (
            "neither-class-nor-cidr",
            doc("x", "  egress:\n    allow:\n      - ports: [443]\n"),
            &[
                "field `spec.egress.allow[0]`",
                "expected exactly one of `class` or `cidr`",
                "got neither",
            ],
        ),
        (
            "unknown-class",
            doc("x", "  egress:\n    allow:\n      - class: internet\n"),
            &[
                "field `spec.egress.allow[0].class`",
                "unknown variant `internet`",
                "`api-server`",
            ],
        ),
        (
            "ports-not-a-list",
            doc(
                "x",
                "  egress:\n    allow:\n      - class: dns\n        ports: fifty-three\n",
            ),
            &["field `spec.egress.allow[0].ports`", "expected a sequence"],
        ),
        (
            "port-not-a-number",
            doc(
                "x",
                "  egress:\n    allow:\n      - class: dns\n        ports: [53, https]\n",
            ),
            &[
                "field `spec.egress.allow[0].ports[1]`",
                "invalid type: string \"https\"",
                "expected u16",
            ],
        ),
        (
            "port-out-of-range",
            doc(
                "x",
                "  egress:\n    allow:\n      - class: dns\n        ports: [70000]\n",
            ),
            &["field `spec.egress.allow[0].ports[0]`", "70000", "u16"],
        ),
        (
            "port-zero",
            doc(
                "x",
                "  egress:\n    allow:\n      - class: dns\n        ports: [0]\n",
            ),
            &[
                "field `spec.egress.allow[0].ports[0]`",
                "expected a port from 1 to 65535",
                "got 0",
            ],
        ),
        (
            "empty-grant",
            doc("x", "  credentials:\n    allowed:\n      - {}\n"),
            &[
                "field `spec.credentials.allowed[0]`",
                "expected at least one of `class` or `path`",
                "got neither",
            ],
        ),
        (
            "unknown-credential-class",
            doc(
                "x",
                "  credentials:\n    allowed:\n      - class: password\n",
            ),
            &[
                "field `spec.credentials.allowed[0].class`",
                "unknown variant `password`",
                "`service_account_token`",
            ],
        ),
        (
            "bad-glob",
            doc(
                "x",
                "  credentials:\n    allowed:\n      - path: /etc/openai/[ab]*\n",
            ),
            &[
                "field `spec.credentials.allowed[0].path`",
                "only `*` and `?` as wildcards",
                "`/etc/openai/[ab]*`",
            ],
        ),
        (
            "relative-grant-path",
            doc(
                "x",
                "  credentials:\n    allowed:\n      - path: etc/openai/*\n",
            ),
            &[
                "field `spec.credentials.allowed[0].path`",
                "an absolute path or glob",
                "`etc/openai/*`",
            ],
        ),
        (
            "relative-executable",
            doc(
                "x",
                "  credentials:\n    executables: [/usr/local/bin/agent, python3]\n",
            ),
            &[
                "field `spec.credentials.executables[1]`",
                "an absolute path or glob (starting with /)",
                "`python3`",
            ],
        ),
        (
            "empty-service-account",
            doc("x", "  selector:\n    serviceAccounts: [\"\"]\n"),
            &[
                "field `spec.selector.serviceAccounts[0]`",
                "a non-empty glob",
            ],
        ),
        (
            "bad-namespace",
            doc("x", "  selector:\n    namespaces: [Agents]\n"),
            &[
                "field `spec.selector.namespaces[0]`",
                "a namespace name",
                "`Agents`",
            ],
        ),
        (
            "bad-learning-window",
            doc("x", "  learningWindow: ten minutes\n"),
            &[
                "field `spec.learningWindow`",
                "a positive duration such as `10m`",
                "`ten minutes`",
            ],
        ),
        (
            "zero-learning-window",
            doc("x", "  learningWindow: 0s\n"),
            &["field `spec.learningWindow`", "a positive duration", "`0s`"],
        ),
        (
            "unknown-rule",
            doc(
                "x",
                "  rules:\n    credential-theft:\n      disabled: true\n",
            ),
            &[
                "field `spec.rules.credential-theft`",
                "a rule id, one of `foreign-credential-read`",
                "unknown rule id `credential-theft`",
            ],
        ),
        (
            "bad-priority",
            doc(
                "x",
                "  rules:\n    proc-environ-read:\n      priority: High\n",
            ),
            &[
                "field `spec.rules.proc-environ-read.priority`",
                "unknown variant `High`",
                "`Warning`",
            ],
        ),
        (
            "bad-tier",
            doc("x", "  tier: manager\n"),
            &["field `spec.tier`", "unknown variant `manager`", "`proxy`"],
        ),
        (
            "second-document",
            format!(
                "{}---\n{}",
                doc("first", "  tier: proxy\n"),
                doc(
                    "second",
                    "  egress:\n    allow:\n      - cidr: 10.0.0.0/8\n        ports: \"443\"\n"
                )
            ),
            &[
                "document 2",
                "field `spec.egress.allow[0].ports`",
                "expected a sequence",
            ],
        ),
        (
            "second-document-invalid",
            format!(
                "{}---\n{}",
                doc("first", "  tier: proxy\n"),
                doc("second", "  learningWindow: soon\n")
            ),
            &[
                "document 2",
                "field `spec.learningWindow`",
                "a positive duration",
            ],
        ),
        (
            "not-a-mapping",
            "- apiVersion: agent-monitor.dev/v1alpha1\n".to_owned(),
            &["expected an AgentPolicy (a mapping", "got a sequence"],
        ),
        (
            "not-yaml",
            format!("{HEADER}metadata: {{name: x\nspec: {{}}\n"),
            &["line "],
        ),
    ];
    assert!(cases.len() >= 12);
    let dir = temp_dir();
    for (name, text, needles) in &cases {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, text).expect("write policy");
        let err = PolicySet::load(std::slice::from_ref(&file))
            .expect_err(&format!("{name} must be rejected:\n{text}"))
            .to_string();
        let file_name = format!("{name}.yaml");
        assert!(
            err.contains(&file_name),
            "{name}: {err:?} lacks the file name"
        );
        for needle in *needles {
            assert!(err.contains(needle), "{name}: {err:?} lacks {needle:?}");
        }
        // The same message from text alone.
        let direct = parse_policies(text, &file).expect_err(name).to_string();
        assert_eq!(direct, err, "{name}");
    }
}

#[test]
fn load_reads_directories_in_order_and_rejects_duplicates() {
    let dir = temp_dir();
    std::fs::write(
        dir.path().join("b.yaml"),
        doc("catch-all", "  tier: worker\n"),
    )
    .expect("write b");
    std::fs::write(
        dir.path().join("a.yml"),
        doc("proxy", "  selector:\n    serviceAccounts: [agent-proxy]\n"),
    )
    .expect("write a");
    std::fs::write(dir.path().join("notes.txt"), "not a policy").expect("write notes");
    std::fs::write(dir.path().join(".hidden.yaml"), "not: [a policy").expect("write hidden");
    let set = PolicySet::load(&[dir.path().to_owned()]).expect("directory");
    let names: Vec<_> = set
        .policies()
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(names, ["proxy", "catch-all"], "sorted by file name");
    let proxy = Workload {
        namespace: Some("agents".into()),
        service_account: Some("agent-proxy".into()),
        ..Workload::default()
    };
    let picked = set
        .for_workload(&proxy)
        .and_then(|p| p.metadata.name.clone());
    assert_eq!(picked.as_deref(), Some("proxy"));

    let again = dir.path().join("c.yaml");
    std::fs::write(&again, doc("proxy", "  tier: proxy\n")).expect("write c");
    let err = PolicySet::load(&[dir.path().to_owned()])
        .expect_err("duplicate name")
        .to_string();
    assert!(
        err.contains("c.yaml")
            && err.contains("`proxy` is already defined in")
            && err.contains("a.yml"),
        "{err}"
    );

    let missing = dir.path().join("missing.yaml");
    let err = PolicySet::load(&[missing])
        .expect_err("missing")
        .to_string();
    assert!(
        err.contains("missing.yaml") && err.contains("cannot read"),
        "{err}"
    );
    assert!(PolicySet::load(&[]).expect("no paths").is_empty());
}

#[test]
fn shipped_policies_parse() {
    // Each example under deploy/examples/ keeps its policies in `agentpolicies.yaml`.
    let dir = repo_root().join("deploy/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/examples")
        .map(|e| e.expect("entry").path().join("agentpolicies.yaml"))
        .filter(|f| f.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no example policies in {}",
        dir.display()
    );
    for file in &files {
        let set = PolicySet::load(std::slice::from_ref(file))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!set.is_empty(), "{} holds no policy", file.display());
    }
}

#[test]
fn two_tier_example_says_what_it_means() {
    let set = PolicySet::load(&[repo_root().join("deploy/examples/two-tier/agentpolicies.yaml")])
        .expect("two-tier/agentpolicies.yaml");
    let workload = |sa: &str| Workload {
        namespace: Some("agent-system".into()),
        service_account: Some(sa.into()),
        ..Workload::default()
    };
    let proxy = set
        .compiled_for_workload(&workload("agent-proxy"))
        .expect("proxy policy");
    assert_eq!(proxy.tier(), Some(Tier::Proxy));
    let api: IpAddr = "10.96.0.1".parse().expect("ip");
    assert_eq!(
        proxy.egress_allows(DestinationClass::ApiServer, api, 443),
        Some(true)
    );
    assert_eq!(
        proxy.egress_allows(DestinationClass::Dns, api, 53),
        Some(true)
    );
    let outside: IpAddr = "203.0.113.10".parse().expect("ip");
    assert_eq!(
        proxy.egress_allows(DestinationClass::External, outside, 443),
        Some(false)
    );

    let worker = set
        .compiled_for_workload(&workload("agent-worker-3"))
        .expect("worker policy");
    assert_eq!(worker.tier(), Some(Tier::Worker));
    assert_eq!(
        worker.egress_allows(DestinationClass::ApiServer, api, 443),
        Some(false)
    );
    assert_eq!(worker.learning_window(), Some(Duration::from_secs(600)));
    assert!(worker.allows_executable("/usr/local/bin/agent"));
    assert!(worker.allows_executable("/usr/bin/python3.12"));
    assert!(!worker.allows_executable("/usr/bin/sh"));
    assert!(set.for_workload(&workload("default")).is_none());
    let other_ns = Workload {
        namespace: Some("default".into()),
        ..workload("agent-proxy")
    };
    assert!(set.for_workload(&other_ns).is_none());
}

/// Path globs as a policy file writes them: `*` stays within one directory, `**` crosses
/// `/`. The globs are compiled by the same code detection matches with.
#[test]
fn path_globs_keep_star_within_one_directory() {
    let dir = temp_dir();
    let file = dir.path().join("globs.yaml");
    std::fs::write(
        &file,
        doc(
            "llm",
            "  credentials:\n    allowed:\n      - path: /etc/openai/*\n      - path: /etc/llm/**\n    executables: [\"/opt/agent/*\", \"/opt/tools/**\"]\n",
        ),
    )
    .expect("write policy");
    let set = PolicySet::load(std::slice::from_ref(&file)).expect("the policy loads");
    let policy = &set.policies()[0];
    let grants = |i: usize| {
        let path = policy.spec.credentials.allowed[i]
            .path
            .clone()
            .expect("a path grant");
        Globs::new("spec.credentials.allowed", &[path], path_glob).expect("compiles")
    };
    let star = grants(0);
    assert!(star.is_match("/etc/openai/api-key"));
    assert!(!star.is_match("/etc/openai/a/b"), "`*` does not cross `/`");
    assert!(!star.is_match("/etc/openai"));
    let globstar = grants(1);
    assert!(globstar.is_match("/etc/llm/api-key"));
    assert!(globstar.is_match("/etc/llm/a/b"), "`**` crosses `/`");
    assert!(!globstar.is_match("/etc/llmx/a"));

    // Executables, as the detection engine applies them to every credential read.
    let compiled = set
        .compiled_for_workload(&Workload::default())
        .expect("the policy selects any workload");
    assert!(compiled.allows_executable("/opt/agent/run"));
    assert!(!compiled.allows_executable("/opt/agent/a/b"));
    assert!(compiled.allows_executable("/opt/tools/a/b"));
    assert!(!compiled.allows_executable("/usr/bin/cat"));
}

/// The committed CRD is the one the Rust types generate. Run with
/// `AGENT_MONITOR_UPDATE_CRD=1` to rewrite it after changing the types.
#[test]
fn committed_crd_matches_the_types() {
    let path = repo_root().join("deploy/crds/agentpolicies.agent-monitor.dev.yaml");
    let generated = crd_yaml();
    if std::env::var_os("AGENT_MONITOR_UPDATE_CRD").is_some_and(|v| !v.is_empty()) {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create deploy/crds");
        }
        std::fs::write(&path, &generated).expect("write the CRD");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is out of date with agent-monitor/src/policy/types.rs; regenerate it with \
         `AGENT_MONITOR_UPDATE_CRD=1 cargo test -p agent-monitor --test policy_files`",
        path.display()
    );
}

/// Waits until `cond` holds, for at most five seconds.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn names(set: &RwLock<PolicySet>) -> Vec<String> {
    set.read()
        .expect("lock")
        .policies()
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

#[tokio::test]
async fn reloader_swaps_in_good_versions_and_keeps_the_last_good_one() {
    record_logs();
    let dir = temp_dir();
    let file = dir.path().join("policies.yaml");
    std::fs::write(&file, doc("first", "  tier: proxy\n")).expect("write v1");
    let paths = vec![file.clone()];
    let sources = PolicySources::new(PolicySet::load(&paths).expect("v1"));
    let current = sources.combined();
    let task = spawn_reloader(paths, sources.clone(), Duration::from_millis(20));

    std::fs::write(
        &file,
        format!(
            "{}---\n{}",
            doc("second", "  tier: proxy\n"),
            doc("third", "  tier: worker\n")
        ),
    )
    .expect("write v2");
    wait_for("the second version", || {
        names(&current) == ["second", "third"]
    })
    .await;

    std::fs::write(
        &file,
        doc(
            "broken",
            "  egress:\n    allow:\n      - cidr: 10.0.0.0/99\n",
        ),
    )
    .expect("write a bad version");
    let file_name = file.display().to_string();
    wait_for("the bad version to be rejected", || {
        logged(&[
            "WARN",
            &file_name,
            "spec.egress.allow[0].cidr",
            "`10.0.0.0/99`",
            "keeping the 2 policies already loaded",
        ])
    })
    .await;
    assert_eq!(
        names(&current),
        ["second", "third"],
        "a bad version keeps the last good set"
    );

    std::fs::write(&file, doc("fourth", "  tier: worker\n")).expect("write v3");
    wait_for("the third version", || names(&current) == ["fourth"]).await;
    task.abort();
}

#[tokio::test]
async fn reloader_watches_directories() {
    record_logs();
    let dir = temp_dir();
    std::fs::write(dir.path().join("10-a.yaml"), doc("a", "  tier: proxy\n")).expect("write a");
    let paths = vec![dir.path().to_owned()];
    let sources = PolicySources::new(PolicySet::load(&paths).expect("dir"));
    let current = sources.combined();
    let task = spawn_reloader(paths, sources.clone(), Duration::from_millis(20));

    std::fs::write(dir.path().join("20-b.yaml"), doc("b", "  tier: worker\n")).expect("write b");
    wait_for("a new file", || names(&current) == ["a", "b"]).await;

    let bad = dir.path().join("30-c.yaml");
    std::fs::write(&bad, "kind: [").expect("write c");
    let bad_name = bad.display().to_string();
    wait_for("the bad file to be rejected", || {
        logged(&["WARN", &bad_name, "keeping the 2 policies already loaded"])
    })
    .await;
    assert_eq!(
        names(&current),
        ["a", "b"],
        "a bad file keeps the last good set"
    );

    std::fs::remove_file(&bad).expect("rm c");
    std::fs::remove_file(dir.path().join("10-a.yaml")).expect("rm a");
    wait_for("removed files", || names(&current) == ["b"]).await;
    task.abort();
}
