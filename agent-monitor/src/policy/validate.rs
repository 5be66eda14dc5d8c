//! Validation: what the types alone cannot check, so that a bad policy never silently
//! weakens detection. Globs and CIDRs are checked by compiling them
//! ([`CompiledPolicy::compile`]), as the policy set will.

use super::{
    error::{quoted, FieldError},
    matching::{path_glob, CompiledPolicy},
    types::{AgentPolicy, AgentPolicySpec},
};

/// Whether `s` is a DNS subdomain (RFC 1123), as Kubernetes object names are.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Whether `s` is a DNS label (RFC 1123), as namespace names are.
fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && is_dns_subdomain(s)
}

/// Checks what the types alone cannot: `metadata.name`, and in `spec` CIDRs, globs,
/// paths, the learning window and rule ids.
pub fn validate_policy(policy: &AgentPolicy) -> Result<(), FieldError> {
    match policy.metadata.name.as_deref() {
        None => return Err(FieldError::new("metadata.name", "a policy name", "nothing")),
        Some(name) if !is_dns_subdomain(name) => {
            return Err(FieldError::new(
                "metadata.name",
                "a DNS subdomain name (lowercase letters, digits, `-` and `.`)",
                quoted(name),
            ))
        }
        Some(_) => {}
    }
    validate_spec(&policy.spec)
}

/// Checks a policy's spec (see [`validate_policy`]).
pub fn validate_spec(spec: &AgentPolicySpec) -> Result<(), FieldError> {
    let sel = &spec.selector;
    for (i, ns) in sel.namespaces.iter().enumerate() {
        if !is_dns_label(ns) {
            return Err(FieldError::new(
                format!("spec.selector.namespaces[{i}]"),
                "a namespace name (lowercase letters, digits and `-`)",
                quoted(ns),
            ));
        }
    }
    for key in sel.match_labels.keys() {
        if key.is_empty() {
            return Err(FieldError::new(
                "spec.selector.matchLabels",
                "non-empty label keys",
                "an empty key",
            ));
        }
    }
    for (i, grant) in spec.credentials.allowed.iter().enumerate() {
        let field = format!("spec.credentials.allowed[{i}]");
        if grant.class.is_none() && grant.path.is_none() {
            return Err(FieldError::new(
                field,
                "at least one of `class` or `path`",
                "neither",
            ));
        }
        if let Some(path) = &grant.path {
            path_glob(path).map_err(|expected| {
                FieldError::new(format!("{field}.path"), expected, quoted(path))
            })?;
        }
    }
    for (i, rule) in spec.egress.allow.iter().enumerate() {
        let field = format!("spec.egress.allow[{i}]");
        match (&rule.class, &rule.cidr) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    field,
                    "exactly one of `class` or `cidr`",
                    "both",
                ))
            }
            (None, None) => {
                return Err(FieldError::new(
                    field,
                    "exactly one of `class` or `cidr`",
                    "neither",
                ))
            }
            // The CIDR itself is checked by compiling, below.
            (None, Some(_)) | (Some(_), None) => {}
        }
        if let Some(j) = rule.ports.iter().position(|&p| p == 0) {
            return Err(FieldError::new(
                format!("{field}.ports[{j}]"),
                "a port from 1 to 65535",
                "0",
            ));
        }
    }
    if let Some(window) = &spec.learning_window {
        let expected = "a positive duration such as `10m`, `1h` or `1h30m`";
        match humantime::parse_duration(window) {
            Ok(d) if !d.is_zero() => {}
            Ok(_) => {
                return Err(FieldError::new(
                    "spec.learningWindow",
                    expected,
                    quoted(window),
                ))
            }
            Err(e) => {
                return Err(FieldError::new(
                    "spec.learningWindow",
                    expected,
                    format!("{} ({e})", quoted(window)),
                ))
            }
        }
    }
    for id in spec.rules.keys() {
        if super::rules::rule(id).is_none() {
            let ids: Vec<String> = super::rules::RULES.iter().map(|r| quoted(r.id)).collect();
            return Err(FieldError::new(
                format!("spec.rules.{id}"),
                format!("a rule id, one of {}", ids.join(", ")),
                format!("unknown rule id {}", quoted(id)),
            ));
        }
    }
    // ServiceAccount and executable globs, and egress CIDRs.
    CompiledPolicy::compile(spec).map(drop)
}
