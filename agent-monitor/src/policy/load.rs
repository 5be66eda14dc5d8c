//! Policy files: read (bounded), parsed and validated.
//!
//! A policy file holds one or more YAML documents, each an `AgentPolicy` exactly as it
//! would be applied to the cluster. Every problem is reported with the file, the document
//! (when the file holds several), the field path (`spec.egress.allow[1].cidr`) and what was
//! expected, so that a bad policy never silently weakens detection.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{
    error::{parse_error, quoted, FieldError, Origin, PolicyError},
    types::AgentPolicy,
    validate::validate_policy,
};
use crate::{
    boundedfile::{self, ReadError},
    yaml,
};

/// The `apiVersion` of a policy.
pub const API_VERSION: &str = "agent-monitor.dev/v1alpha1";
/// The `kind` of a policy.
pub const KIND: &str = "AgentPolicy";

/// Largest policy file read: a policy is a few KiB, and a ConfigMap (where a DaemonSet
/// takes its policy files from) holds at most 1 MiB.
pub const MAX_POLICY_FILE_BYTES: u64 = boundedfile::MIB;

/// The top-level fields of a policy document.
const TOP_LEVEL_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];

/// A short description of a YAML value, for messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".to_owned(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("`{n}`"),
        Value::String(s) => quoted(s),
        Value::Array(_) => "a sequence".to_owned(),
        Value::Object(_) => "a mapping".to_owned(),
    }
}

/// Checks `apiVersion`, `kind` and the top-level fields of one document.
fn check_header(doc: &Value) -> Result<(), Result<FieldError, String>> {
    let Value::Object(map) = doc else {
        return Err(Err(describe(doc)));
    };
    for (field, want) in [("apiVersion", API_VERSION), ("kind", KIND)] {
        match map.get(field) {
            Some(Value::String(s)) if s == want => {}
            other => {
                return Err(Ok(FieldError::new(
                    field,
                    quoted(want),
                    other.map_or_else(|| "nothing".to_owned(), describe),
                )))
            }
        }
    }
    for name in map.keys() {
        if !TOP_LEVEL_FIELDS.contains(&name.as_str()) {
            let fields: Vec<String> = TOP_LEVEL_FIELDS.iter().map(|f| quoted(f)).collect();
            return Err(Ok(FieldError::new(
                name.clone(),
                format!("one of {}", fields.join(", ")),
                format!("unknown field {}", quoted(name)),
            )));
        }
    }
    Ok(())
}

/// Parses and validates the policies in `text`; `file` is only used in messages. The
/// text may hold several YAML documents; empty ones are skipped.
pub fn parse_policies(text: &str, file: &Path) -> Result<Vec<AgentPolicy>, PolicyError> {
    let documents = yaml::documents(text);
    let several = documents.len() > 1;
    let number = |i: usize| several.then_some(i + 1);
    // First pass, over every document before any is used: untyped, to find the empty
    // ones and check the header (kube's AgentPolicy ignores apiVersion, kind and unknown
    // top-level fields). Nesting is capped here, before anything else looks at the text.
    let mut values = Vec::with_capacity(documents.len());
    for (i, &(doc, lines_before)) in documents.iter().enumerate() {
        let value: Value =
            yaml::from_str(doc).map_err(|e| parse_error(file, number(i), lines_before, e))?;
        values.push(value);
    }
    let origin = |i: usize| Origin {
        file: file.to_owned(),
        document: number(i),
        position: None,
    };
    // Second pass: typed, for field paths and positions.
    let mut policies = Vec::new();
    for (i, (&(doc, lines_before), value)) in documents.iter().zip(&values).enumerate() {
        if value.is_null() {
            continue;
        }
        check_header(value).map_err(|e| match e {
            Ok(error) => PolicyError::Invalid {
                at: origin(i),
                error: Box::new(error),
            },
            Err(got) => PolicyError::NotAPolicy { at: origin(i), got },
        })?;
        let policy: AgentPolicy =
            yaml::from_str(doc).map_err(|e| parse_error(file, number(i), lines_before, e))?;
        validate_policy(&policy).map_err(|error| PolicyError::Invalid {
            at: origin(i),
            error: Box::new(error),
        })?;
        policies.push(policy);
    }
    Ok(policies)
}

/// Reads (a regular file of at most [`MAX_POLICY_FILE_BYTES`], symlinks followed) and
/// parses one policy file.
pub fn load_file(file: &Path) -> Result<Vec<AgentPolicy>, PolicyError> {
    let text = boundedfile::read_to_string(file, MAX_POLICY_FILE_BYTES).map_err(|source| {
        PolicyError::Read {
            path: file.to_owned(),
            source,
        }
    })?;
    parse_policies(&text, file)
}

/// Whether a directory entry is a policy file: a `*.yaml` or `*.yml` name, not hidden,
/// that exists and is not a directory. A FIFO or a device under such a name counts, so
/// that loading it fails saying what it is rather than it being skipped in silence; a
/// dangling symlink (a ConfigMap key in the middle of an update) does not.
fn is_policy_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let yaml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e == "yaml" || e == "yml");
    !hidden && yaml && std::fs::metadata(path).is_ok_and(|m| !m.is_dir())
}

/// The `*.yaml` and `*.yml` files of a directory (not hidden ones), sorted.
pub(super) fn files_in(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let read_err = |source| PolicyError::Read {
        path: dir.to_owned(),
        source: ReadError::Io(source),
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        if is_policy_file(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The policy files `paths` name: files as given, directories expanded; without repeats.
pub(super) fn policy_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PolicyError> {
    let mut out: Vec<PathBuf> = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|source| PolicyError::Read {
            path: path.clone(),
            source: ReadError::Io(source),
        })?;
        let found = if meta.is_dir() {
            files_in(path)?
        } else {
            vec![path.clone()]
        };
        for f in found {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::{matching::CompiledPolicy, DestinationClass, PolicySet, Tier};

    const TWO: &str = r#"
# Two policies, an empty document between them.
apiVersion: agent-monitor.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: agent-proxy
  namespace: agents
spec:
  selector:
    namespaces: [agents]
    serviceAccounts: [agent-proxy]
  tier: proxy
  credentials:
    allowed:
      - class: service_account_token
  egress:
    allow:
      - class: api-server
        ports: [443, 6443]
      - class: dns
---
---
apiVersion: agent-monitor.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: agent-workers
spec:
  selector:
    matchLabels:
      app.kubernetes.io/part-of: agents
    serviceAccounts: ["agent-worker-*"]
  tier: worker
  credentials:
    allowed:
      - path: /etc/openai/*
      - class: secret_volume
        path: /var/run/secrets/llm/*
    executables: [/usr/local/bin/agent, "/usr/bin/python3*"]
  egress:
    allow:
      - cidr: 203.0.113.0/24
        ports: [443]
      - cidr: "2001:db8::/32"
  learningWindow: 10m
  rules:
    baseline-deviation:
      priority: Notice
    proc-environ-read:
      disabled: true
"#;

    #[test]
    fn parses_several_documents() {
        let policies = parse_policies(TWO, Path::new("two.yaml")).expect("valid");
        assert_eq!(policies.len(), 2);
        let proxy = &policies[0];
        assert_eq!(proxy.metadata.name.as_deref(), Some("agent-proxy"));
        assert_eq!(proxy.metadata.namespace.as_deref(), Some("agents"));
        assert_eq!(proxy.spec.tier, Some(Tier::Proxy));
        assert_eq!(proxy.spec.egress.allow[0].ports, vec![443, 6443]);
        let workers = &policies[1];
        assert_eq!(
            workers.spec.selector.service_accounts,
            vec!["agent-worker-*"]
        );
        assert_eq!(
            workers.spec.credentials.executables,
            vec!["/usr/local/bin/agent", "/usr/bin/python3*"]
        );
        assert!(workers.spec.rules["proc-environ-read"].disabled);
        let compiled = CompiledPolicy::compile(&workers.spec).expect("compiles");
        assert_eq!(compiled.learning_window(), Some(Duration::from_secs(600)));
        assert_eq!(
            compiled.egress_allows(
                DestinationClass::External,
                "203.0.113.9".parse().expect("ip"),
                443
            ),
            Some(true)
        );
        // Empty and comment-only texts hold no policies.
        assert!(parse_policies("", Path::new("e.yaml"))
            .expect("empty")
            .is_empty());
        assert!(parse_policies("# nothing\n---\n", Path::new("e.yaml"))
            .expect("comments")
            .is_empty());
    }

    #[test]
    fn errors_point_at_document_and_field() {
        let bad = TWO.replace("class: dns", "class: dns\n        cidr: 10.0.0.0/8");
        let err = parse_policies(&bad, Path::new("two.yaml"))
            .expect_err("both class and cidr")
            .to_string();
        assert!(
            err.contains("two.yaml, document 1")
                && err.contains("spec.egress.allow[1]")
                && err.contains("exactly one of `class` or `cidr`"),
            "{err}"
        );
        let bad = TWO.replace("  learningWindow: 10m", "  learningWindw: 10m");
        let err = parse_policies(&bad, Path::new("two.yaml"))
            .expect_err("typo")
            .to_string();
        assert!(
            err.contains("document 3")
                && err.contains("field `spec.learningWindw`")
                && err.contains("line "),
            "{err}"
        );
    }

    #[test]
    fn deep_nesting_is_refused_early() {
        // Flow mappings 50,000 deep: the parse stops at level 65.
        let deep = format!("spec: {}1{}", "{a: ".repeat(50_000), "}".repeat(50_000));
        let err = parse_policies(&deep, Path::new("deep.yaml")).expect_err("too deep");
        assert!(matches!(err, PolicyError::TooDeep { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "policy deep.yaml: nested deeper than 64 levels at line 1 column 259"
        );
        // Real policies are far from the cap.
        assert_eq!(
            parse_policies(TWO, Path::new("two.yaml"))
                .map(|p| p.len())
                .ok(),
            Some(2)
        );
    }

    #[test]
    fn policy_files_are_read_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big.yaml");
        std::fs::File::create(&big)
            .and_then(|f| f.set_len(MAX_POLICY_FILE_BYTES + 1))
            .expect("a file one byte over the cap");
        let err = load_file(&big).expect_err("too big").to_string();
        assert_eq!(
            err,
            format!(
                "policy {}: larger than 1 MiB: {} bytes",
                big.display(),
                MAX_POLICY_FILE_BYTES + 1
            )
        );
        // A directory's `*.yaml` entries that are not regular files are loaded, and so
        // refused, rather than skipped; subdirectories and dangling symlinks are skipped.
        std::fs::remove_file(&big).expect("rm");
        std::os::unix::fs::symlink("/dev/null", dir.path().join("null.yaml")).expect("symlink");
        std::os::unix::fs::symlink("..data/gone.yaml", dir.path().join("gone.yaml"))
            .expect("dangling symlink");
        std::fs::create_dir(dir.path().join("sub.yaml")).expect("mkdir");
        let err = PolicySet::load(&[dir.path().to_owned()])
            .expect_err("a device")
            .to_string();
        assert!(
            err.ends_with("null.yaml: not a regular file (a character device)"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("null.yaml")).expect("rm");
        assert!(PolicySet::load(&[dir.path().to_owned()])
            .expect("nothing left to load")
            .is_empty());
    }
}
