//! Policy files: parsing and validation, the loaded set and its selection of a workload,
//! egress and glob matching, reloading, and the CRD manifest.
//!
//! A policy file holds one or more YAML documents, each an `AgentPolicy` exactly as it
//! would be applied to the cluster. Every problem is reported with the file, the document
//! (when the file holds several), the field path (`spec.egress.allow[1].cidr`) and what was
//! expected, so that a bad policy never silently weakens detection.

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use kube::CustomResourceExt as _;
use log::{info, warn};
use serde::Deserialize as _;
use serde_yaml::Value;

use super::{
    sources::PolicySources,
    types::{AgentPolicy, AgentPolicySpec, DestinationClass, EgressRule, Selector},
};
use crate::{
    boundedfile::{self, ReadError, TooDeep, MAX_NESTING},
    identity::Workload,
};

/// The `apiVersion` of a policy.
pub const API_VERSION: &str = "agent-monitor.dev/v1alpha1";
/// The `kind` of a policy.
pub const KIND: &str = "AgentPolicy";

/// Largest policy file read: a policy is a few KiB, and a ConfigMap (where a DaemonSet
/// takes its policy files from) holds at most 1 MiB.
pub const MAX_POLICY_FILE_BYTES: u64 = boundedfile::MIB;

/// How often [`spawn_reloader`] looks for changed policy files: a change is loaded after
/// it held for one more poll, so a new policy, or the error about a bad one, comes within
/// two polls.
pub const DEFAULT_POLL: Duration = Duration::from_millis(250);

/// The top-level fields of a policy document.
const TOP_LEVEL_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Where in the policy files a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The policy file.
    pub file: PathBuf,
    /// The YAML document, counting from 1; only when the file holds several.
    pub document: Option<usize>,
    /// Line and column, counting from 1, when known.
    pub position: Option<(usize, usize)>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, ", document {d}")?;
        }
        if let Some((line, column)) = self.position {
            write!(f, ", line {line} column {column}")?;
        }
        Ok(())
    }
}

/// A value that has the right type but is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: expected {expected}, got {got}")]
pub struct FieldError {
    /// The field path, as in the YAML: `spec.egress.allow[1].cidr`.
    pub field: String,
    /// What the field must hold.
    pub expected: String,
    /// What it holds.
    pub got: String,
}

impl FieldError {
    fn new(field: impl Into<String>, expected: impl Into<String>, got: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
}

/// Policies could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A policy file or directory could not be read: missing, unreadable, neither a
    /// regular file nor a directory, or a file larger than [`MAX_POLICY_FILE_BYTES`].
    #[error("policy {path}: {source}", path = path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: ReadError,
    },
    /// A document nests sequences and mappings deeper than [`MAX_NESTING`] levels.
    #[error("policy {path}: {source}", path = path.display())]
    TooDeep {
        /// The policy file.
        path: PathBuf,
        /// The cap and where it was passed.
        #[source]
        source: TooDeep,
    },
    /// The text is not YAML, or a field is unknown, missing or of the wrong type.
    #[error("policy {at}: {}{message}", field_prefix(field.as_deref()))]
    Parse {
        /// Where.
        at: Origin,
        /// The field path (`spec.egress.allow[0].ports`), when the problem is in a field.
        field: Option<String>,
        /// The YAML parser's description.
        message: String,
    },
    /// A document is not an `AgentPolicy` (a mapping).
    #[error("policy {at}: expected an {KIND} (a mapping with apiVersion, kind, metadata and spec), got {got}")]
    NotAPolicy {
        /// Where.
        at: Origin,
        /// What the document is instead.
        got: String,
    },
    /// A value has the right type but is not acceptable.
    #[error("policy {at}: {error}")]
    Invalid {
        /// Where.
        at: Origin,
        /// The field, what it must hold and what it holds (boxed: errors stay small).
        error: Box<FieldError>,
    },
    /// Two policies have the same namespace and name.
    #[error("policy {at}: {KIND} `{name}` is already defined in {first}", first = first.display())]
    Duplicate {
        /// Where the second definition is.
        at: Origin,
        /// `namespace/name`, or `name` without a namespace.
        name: String,
        /// The file of the first definition.
        first: PathBuf,
    },
}

fn field_prefix(field: Option<&str>) -> String {
    field.map_or_else(String::new, |f| format!("field `{f}`: "))
}

/// Whether the text before the first `: ` of a serde_yaml message is a path
/// (`spec.egress.allow[0]`) rather than part of the message.
fn looks_like_path(s: &str) -> bool {
    !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '`' || c == '"')
}

fn join_path(parent: Option<&str>, child: &str) -> String {
    match parent {
        Some(p) if !p.is_empty() && p != "." => format!("{p}.{child}"),
        _ => child.to_owned(),
    }
}

/// A serde_yaml error as a [`PolicyError::Parse`]: its path becomes the field (extended by
/// the field name for unknown, missing and duplicate fields) and its position the origin's.
fn parse_error(file: &Path, document: Option<usize>, e: &serde_yaml::Error) -> PolicyError {
    let mut text = e.to_string();
    let mut position = None;
    if let Some(loc) = e.location() {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = text.strip_suffix(&suffix) {
            text = stripped.to_owned();
            position = Some((loc.line(), loc.column()));
        }
    }
    let (mut field, message) = match text.split_once(": ") {
        Some((path, message)) if looks_like_path(path) => {
            (Some(path.to_owned()), message.to_owned())
        }
        _ => (None, text.clone()),
    };
    for prefix in ["unknown field `", "missing field `", "duplicate field `"] {
        if let Some(name) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
        {
            field = Some(join_path(field.as_deref(), name));
        }
    }
    PolicyError::Parse {
        at: Origin {
            file: file.to_owned(),
            document,
            position,
        },
        field,
        message,
    }
}

// ---------------------------------------------------------------------------------------
// Globs and CIDRs
// ---------------------------------------------------------------------------------------

/// Matches `text` against a glob: `*` matches any run of characters, `/` included; `?`
/// matches exactly one character; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let next_char = |i: usize| {
        text.get(i..)
            .and_then(|s| s.chars().next())
            .map_or(1, char::len_utf8)
    };
    let (mut pi, mut ti) = (0, 0);
    // The last `*` seen and the text position it currently stands for the end of.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(b'?') => {
                pi += 1;
                ti += next_char(ti);
            }
            Some(&c) if c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character and retry after it.
                Some((sp, st)) => {
                    let st = st + next_char(st);
                    star = Some((sp, st));
                    pi = sp + 1;
                    ti = st;
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Checks a glob: not empty, and no wildcards but `*` and `?`. On error, what was expected.
fn check_glob(pattern: &str) -> Result<(), &'static str> {
    if pattern.is_empty() {
        return Err("a non-empty glob");
    }
    if pattern.contains(['[', ']', '{', '}']) {
        return Err("a glob with only `*` and `?` as wildcards (no `[...]` or `{...}`)");
    }
    Ok(())
}

/// An IP network: `10.0.0.0/8`, `2001:db8::/32`, or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// A CIDR could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The part before `/` is not an IPv4 or IPv6 address.
    #[error("`{0}` is not an IPv4 or IPv6 address")]
    Address(String),
    /// The prefix length is not a number in range for the address family.
    #[error("prefix length `{prefix}` is not a number from 0 to {max}")]
    Prefix {
        /// The text after `/`.
        prefix: String,
        /// 32 for IPv4, 128 for IPv6.
        max: u8,
    },
}

impl CidrError {
    /// What a CIDR field must hold, for messages.
    pub fn expected(&self) -> String {
        match self {
            Self::Address(_) => {
                "an IPv4 or IPv6 address or CIDR (`10.0.0.0/8`, `2001:db8::/32`)".to_owned()
            }
            Self::Prefix { max, .. } => {
                let family = if *max == 32 { "IPv4" } else { "IPv6" };
                format!("a CIDR whose prefix length is a number from 0 to {max} ({family})")
            }
        }
    }
}

fn mask_v4(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0)
}

impl Cidr {
    /// Parses `addr/prefix` or a bare address (a /32 or /128). Host bits are ignored:
    /// `10.1.2.3/8` is `10.0.0.0/8`.
    pub fn parse(s: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::Address(addr.to_owned()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|n| p.bytes().all(|b| b.is_ascii_digit()) && *n <= max)
                .ok_or_else(|| CidrError::Prefix {
                    prefix: p.to_owned(),
                    max,
                })?,
        };
        let network = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask_v4(prefix)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask_v6(prefix)).into()),
        };
        Ok(Self { network, prefix })
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the network. An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, as a
    /// dual-stack socket reports an IPv4 peer) is compared as the IPv4 address.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(*ip) & mask_v4(self.prefix) == u32::from(net)
            }
            (IpAddr::V4(net), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|ip| u32::from(ip) & mask_v4(self.prefix) == u32::from(net)),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(*ip) & mask_v6(self.prefix) == u128::from(net)
            }
            (IpAddr::V6(net), IpAddr::V4(ip)) => {
                u128::from(ip.to_ipv6_mapped()) & mask_v6(self.prefix) == u128::from(net)
            }
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

// ---------------------------------------------------------------------------------------
// Egress and learning window
// ---------------------------------------------------------------------------------------

/// One egress rule, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressAllow {
    /// Destinations of this class match.
    pub class: Option<DestinationClass>,
    /// Destinations in this network match.
    pub cidr: Option<Cidr>,
    /// Destination ports; empty: any.
    pub ports: Vec<u16>,
}

impl EgressAllow {
    /// Parses a rule. `None` when its CIDR does not parse (possible only for a policy that
    /// was not validated): such a rule allows nothing.
    pub fn from_rule(rule: &EgressRule) -> Option<Self> {
        let cidr = match &rule.cidr {
            Some(c) => Some(Cidr::parse(c).ok()?),
            None => None,
        };
        Some(Self {
            class: rule.class,
            cidr,
            ports: rule.ports.clone(),
        })
    }

    /// Whether a connection to `ip:port`, of class `class`, matches: the class is the
    /// rule's or the CIDR contains the address; and the port is listed or none are.
    pub fn matches(&self, class: DestinationClass, ip: IpAddr, port: u16) -> bool {
        let destination = self.class == Some(class) || self.cidr.is_some_and(|c| c.contains(&ip));
        destination && (self.ports.is_empty() || self.ports.contains(&port))
    }
}

/// The policy's egress rules, parsed (rules whose CIDR does not parse are left out).
pub fn egress_rules(spec: &AgentPolicySpec) -> Vec<EgressAllow> {
    spec.egress
        .allow
        .iter()
        .filter_map(EgressAllow::from_rule)
        .collect()
}

/// Whether one of the policy's egress rules allows a connection to `ip:port` of class
/// `class`. Literal: an empty `egress.allow` allows nothing here; the defaults an empty
/// list stands for (by tier) are the detector's to apply.
pub fn policy_allows_egress(
    spec: &AgentPolicySpec,
    class: DestinationClass,
    ip: IpAddr,
    port: u16,
) -> bool {
    spec.egress
        .allow
        .iter()
        .filter_map(EgressAllow::from_rule)
        .any(|r| r.matches(class, ip, port))
}

/// The policy's learning window; `None` when unset, unparsable or zero.
pub fn learning_window(spec: &AgentPolicySpec) -> Option<Duration> {
    let text = spec.learning_window.as_deref()?;
    humantime::parse_duration(text)
        .ok()
        .filter(|d| !d.is_zero())
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

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

fn quoted(s: &str) -> String {
    format!("`{s}`")
}

fn check_path_glob(field: String, pattern: &str) -> Result<(), FieldError> {
    check_glob(pattern).map_err(|expected| FieldError::new(&field, expected, quoted(pattern)))?;
    if !pattern.starts_with('/') {
        return Err(FieldError::new(
            field,
            "an absolute path or glob (starting with /)",
            quoted(pattern),
        ));
    }
    Ok(())
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
    for (i, sa) in sel.service_accounts.iter().enumerate() {
        check_glob(sa).map_err(|expected| {
            FieldError::new(
                format!("spec.selector.serviceAccounts[{i}]"),
                format!("a ServiceAccount name or {expected}"),
                quoted(sa),
            )
        })?;
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
            check_path_glob(format!("{field}.path"), path)?;
        }
    }
    for (i, exe) in spec.credentials.executables.iter().enumerate() {
        check_path_glob(format!("spec.credentials.executables[{i}]"), exe)?;
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
            (None, Some(cidr)) => {
                Cidr::parse(cidr).map_err(|e| {
                    FieldError::new(format!("{field}.cidr"), e.expected(), quoted(cidr))
                })?;
            }
            (Some(_), None) => {}
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
        if crate::detect::rule(id).is_none() {
            let ids: Vec<String> = crate::detect::RULES.iter().map(|r| quoted(r.id)).collect();
            return Err(FieldError::new(
                format!("spec.rules.{id}"),
                format!("a rule id, one of {}", ids.join(", ")),
                format!("unknown rule id {}", quoted(id)),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------

/// A short description of a YAML value, for messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".to_owned(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("`{n}`"),
        Value::String(s) => quoted(s),
        Value::Sequence(_) => "a sequence".to_owned(),
        Value::Mapping(_) => "a mapping".to_owned(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// Checks `apiVersion`, `kind` and the top-level fields of one document.
fn check_header(doc: &Value) -> Result<(), Result<FieldError, String>> {
    let Value::Mapping(map) = doc else {
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
    for key in map.keys() {
        let known = key.as_str().is_some_and(|k| TOP_LEVEL_FIELDS.contains(&k));
        if !known {
            let name = key.as_str().map_or_else(|| describe(key), str::to_owned);
            let fields: Vec<String> = TOP_LEVEL_FIELDS.iter().map(|f| quoted(f)).collect();
            return Err(Ok(FieldError::new(
                name.clone(),
                format!("one of {}", fields.join(", ")),
                format!("unknown field {}", quoted(&name)),
            )));
        }
    }
    Ok(())
}

/// Parses and validates the policies in `text`; `file` is only used in messages. The
/// text may hold several YAML documents; empty ones are skipped.
pub fn parse_policies(text: &str, file: &Path) -> Result<Vec<AgentPolicy>, PolicyError> {
    // Before serde_yaml: its parser's time grows with the square of the nesting.
    boundedfile::check_yaml_nesting(text, MAX_NESTING).map_err(|source| PolicyError::TooDeep {
        path: file.to_owned(),
        source,
    })?;
    // First pass: untyped, to count the documents, find the empty ones and check the
    // header (kube's AgentPolicy ignores apiVersion, kind and unknown top-level fields).
    let mut values = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            Value::deserialize(doc).map_err(|e| parse_error(file, (i > 0).then_some(i + 1), &e))?;
        values.push(value);
    }
    let several = values.len() > 1;
    let origin = |i: usize| Origin {
        file: file.to_owned(),
        document: several.then_some(i + 1),
        position: None,
    };
    // Second pass: typed, so that serde_yaml reports field paths and positions.
    let mut policies = Vec::new();
    for (i, (doc, value)) in serde_yaml::Deserializer::from_str(text)
        .zip(&values)
        .enumerate()
    {
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
        let policy = AgentPolicy::deserialize(doc)
            .map_err(|e| parse_error(file, several.then_some(i + 1), &e))?;
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
fn files_in(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
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
fn policy_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PolicyError> {
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

// ---------------------------------------------------------------------------------------
// The loaded set
// ---------------------------------------------------------------------------------------

impl Selector {
    /// Whether the selector picks workload `w`: its namespace is listed, it carries every
    /// label, and its ServiceAccount matches a glob; an empty part matches anything. Host
    /// processes match no selector.
    pub fn matches(&self, w: &Workload) -> bool {
        if w.host {
            return false;
        }
        let namespace = self.namespaces.is_empty()
            || w.namespace
                .as_deref()
                .is_some_and(|ns| self.namespaces.iter().any(|n| n == ns));
        let labels = self
            .match_labels
            .iter()
            .all(|(k, v)| w.labels.get(k) == Some(v));
        let service_account = self.service_accounts.is_empty()
            || w.service_account
                .as_deref()
                .is_some_and(|sa| self.service_accounts.iter().any(|g| glob_match(g, sa)));
        namespace && labels && service_account
    }
}

fn display_name(p: &AgentPolicy) -> String {
    let name = p.metadata.name.as_deref().unwrap_or_default();
    match p.metadata.namespace.as_deref() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

/// The loaded policies, in load order: files in the order given, a directory's files
/// sorted by name, a file's documents in order. The set the detection engine reads is
/// combined by [`PolicySources`]: file policies first, then the cluster's AgentPolicy
/// objects, so that files win when both select a workload.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<AgentPolicy>,
}

/// Same policies in the same order (kube's `AgentPolicy` does not derive `PartialEq`).
impl PartialEq for PolicySet {
    fn eq(&self, other: &Self) -> bool {
        self.policies.len() == other.policies.len()
            && self
                .policies
                .iter()
                .zip(&other.policies)
                .all(|(a, b)| a.metadata == b.metadata && a.spec == b.spec)
    }
}

impl From<Vec<AgentPolicy>> for PolicySet {
    fn from(policies: Vec<AgentPolicy>) -> Self {
        Self { policies }
    }
}

impl PolicySet {
    /// Loads every policy of `paths`: files, or directories of `*.yaml` and `*.yml` files
    /// (sorted by name). Any bad file fails the whole load, as do two policies with the same
    /// namespace and name.
    pub fn load(paths: &[PathBuf]) -> Result<PolicySet, PolicyError> {
        let mut policies = Vec::new();
        let mut seen: Vec<(String, PathBuf)> = Vec::new();
        for file in policy_files(paths)? {
            let loaded = load_file(&file)?;
            for p in loaded {
                let name = display_name(&p);
                if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
                    return Err(PolicyError::Duplicate {
                        at: Origin {
                            file: file.clone(),
                            document: None,
                            position: None,
                        },
                        name,
                        first: first.clone(),
                    });
                }
                seen.push((name, file.clone()));
                policies.push(p);
            }
        }
        Ok(Self { policies })
    }

    /// The policies, in load order.
    pub fn policies(&self) -> &[AgentPolicy] {
        &self.policies
    }

    /// How many policies there are.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The first policy, in load order, whose selector matches `w`.
    pub fn for_workload(&self, w: &Workload) -> Option<&AgentPolicy> {
        if w.host {
            return None;
        }
        self.policies.iter().find(|p| p.spec.selector.matches(w))
    }
}

// ---------------------------------------------------------------------------------------
// Reloading
// ---------------------------------------------------------------------------------------

type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Modification time and size of every configured path and of the policy files in the
/// configured directories: any change, addition or removal changes it.
fn fingerprint(paths: &[PathBuf]) -> Vec<(PathBuf, Stamp)> {
    let mut out = Vec::new();
    for path in paths {
        out.push((path.clone(), stamp(path)));
        if path.is_dir() {
            for file in files_in(path).unwrap_or_default() {
                let s = stamp(&file);
                out.push((file, s));
            }
        }
    }
    out
}

/// Reloads the policies of `paths` into the file part of `sources` whenever one of the
/// files changes (modification time or size, polled every `poll`; files added to or
/// removed from a directory count); the cluster part is left alone, and `sources`
/// recomputes the combined set. A change is loaded once it has held for one more poll, so
/// a file caught half-written (an editor truncating it first) is not taken for an empty
/// policy set. A valid new set replaces the old file policies; an invalid one is logged,
/// once per change, and the old file policies are kept.
///
/// Looking at the files and loading them happen on the blocking pool, off the runtime's
/// workers; both are bounded (regular files only, opened without blocking, size and
/// nesting capped), so one bad file costs one error and the next poll comes on time.
pub fn spawn_reloader(
    paths: Vec<PathBuf>,
    sources: Arc<PolicySources>,
    poll: Duration,
) -> tokio::task::JoinHandle<()> {
    let paths = Arc::new(paths);
    tokio::spawn(async move {
        // The files as the previous poll saw them, and as last loaded.
        let mut previous = None;
        let mut loaded = None;
        let mut tick = tokio::time::interval(poll);
        // A slow poll is followed by the next one, not by a burst of catch-up ticks.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let p = paths.clone();
            let now = match tokio::task::spawn_blocking(move || fingerprint(&p)).await {
                Ok(now) => now,
                Err(e) => {
                    warn!("policy files: looking for changes failed: {e}");
                    continue;
                }
            };
            let settled = previous.as_ref() == Some(&now);
            previous = Some(now.clone());
            if !settled || loaded.as_ref() == Some(&now) {
                continue;
            }
            loaded = Some(now);
            let p = paths.clone();
            match tokio::task::spawn_blocking(move || PolicySet::load(&p)).await {
                Ok(Ok(set)) => {
                    let count = set.len();
                    // The first load usually finds the set the caller loaded: unchanged.
                    if sources.replace_files(set) {
                        info!("policies reloaded: {count} policies from files");
                    }
                }
                Ok(Err(e)) => {
                    let kept = sources.file_count();
                    warn!("{e}; keeping the {kept} policies already loaded from files");
                }
                Err(e) => {
                    let kept = sources.file_count();
                    warn!("policy files: loading failed: {e}; keeping the {kept} policies already loaded from files");
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------
// The CRD
// ---------------------------------------------------------------------------------------

/// The CustomResourceDefinition of `AgentPolicy`, as YAML, generated from the Rust types.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&AgentPolicy::crd())
        .expect("a CustomResourceDefinition always serializes to YAML");
    format!(
        "# Generated from agent-monitor/src/policy/types.rs by policy::crd_yaml(); do not edit.\n\
         # Regenerate: AGENT_MONITOR_UPDATE_CRD=1 cargo test -p agent-monitor --test policy_files\n\
         {body}"
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::policy::types::{EgressPolicy, Tier};

    #[test]
    fn globs() {
        for (p, t) in [
            ("agent-worker-*", "agent-worker-1"),
            ("agent-worker-*", "agent-worker-"),
            ("/usr/bin/python3*", "/usr/bin/python3.12"),
            ("/etc/openai/*", "/etc/openai/sub/key"),
            ("*", ""),
            ("*", "/any/thing"),
            ("a?c", "abc"),
            ("a?c", "aéc"),
            ("*é?", "xxéy"),
            ("*a*b*c", "aXbXcXabc"),
            ("exact", "exact"),
            ("**/token", "/var/run/token"),
        ] {
            assert!(glob_match(p, t), "{p:?} should match {t:?}");
        }
        for (p, t) in [
            ("agent-worker-*", "agent-proxy"),
            ("a?c", "ac"),
            ("a?c", "abbc"),
            ("exact", "exactly"),
            ("exact", "exac"),
            ("/etc/openai/*", "/etc/openai"),
            ("*a*b*c", "aXbX"),
            ("", "x"),
        ] {
            assert!(!glob_match(p, t), "{p:?} should not match {t:?}");
        }
        assert!(glob_match("", ""));
        assert!(check_glob("").is_err());
        assert!(check_glob("/etc/[ab]").is_err());
        assert!(check_glob("/etc/{a,b}").is_err());
        assert!(check_glob("/etc/*/a?").is_ok());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").expect("v4");
        assert!(c.contains(&ip("10.255.1.2")));
        assert!(!c.contains(&ip("11.0.0.1")));
        assert!(c.contains(&ip("::ffff:10.1.2.3")), "v4-mapped");
        assert!(!c.contains(&ip("fd00::1")));
        let host = Cidr::parse("192.168.1.5").expect("bare v4");
        assert_eq!(host.prefix(), 32);
        assert!(host.contains(&ip("192.168.1.5")));
        assert!(!host.contains(&ip("192.168.1.6")));
        let masked = Cidr::parse("10.1.2.3/16").expect("host bits");
        assert_eq!(masked.to_string(), "10.1.0.0/16");
        let all = Cidr::parse("0.0.0.0/0").expect("all v4");
        assert!(all.contains(&ip("8.8.8.8")));
        let v6 = Cidr::parse("2001:db8::/32").expect("v6");
        assert!(v6.contains(&ip("2001:db8:1::1")));
        assert!(!v6.contains(&ip("2001:db9::1")));
        assert!(!v6.contains(&ip("10.0.0.1")));
        assert_eq!(Cidr::parse("fd00::1").expect("bare v6").prefix(), 128);
        assert!(Cidr::parse("::/0").expect("all v6").contains(&ip("::1")));
        assert!(Cidr::parse("::ffff:0:0/96")
            .expect("mapped")
            .contains(&ip("1.2.3.4")));
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "",
            "host.example",
            " 10.0.0.0/8",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?} should not parse");
        }
        assert_eq!(
            Cidr::parse("10.0.0.0/33"),
            Err(CidrError::Prefix {
                prefix: "33".into(),
                max: 32
            })
        );
        assert!("10.0.0.0/8".parse::<Cidr>().is_ok());
    }

    fn workload(ns: &str, sa: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            namespace: Some(ns.into()),
            service_account: Some(sa.into()),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Workload::default()
        }
    }

    fn policy(name: &str, selector: Selector) -> AgentPolicy {
        AgentPolicy::new(
            name,
            AgentPolicySpec {
                selector,
                ..AgentPolicySpec::default()
            },
        )
    }

    #[test]
    fn selectors_pick_the_first_matching_policy() {
        let set = PolicySet::from(vec![
            policy(
                "proxy",
                Selector {
                    namespaces: vec!["agents".into()],
                    service_accounts: vec!["agent-proxy".into()],
                    ..Selector::default()
                },
            ),
            policy(
                "workers",
                Selector {
                    namespaces: vec!["agents".into()],
                    match_labels: BTreeMap::from([("app".into(), "worker".into())]),
                    service_accounts: vec!["agent-worker-*".into()],
                },
            ),
            policy("catch-all", Selector::default()),
        ]);
        let name = |w: &Workload| {
            set.for_workload(w)
                .and_then(|p| p.metadata.name.clone())
                .unwrap_or_default()
        };
        assert_eq!(name(&workload("agents", "agent-proxy", &[])), "proxy");
        assert_eq!(
            name(&workload(
                "agents",
                "agent-worker-7",
                &[("app", "worker"), ("x", "y")]
            )),
            "workers"
        );
        // Wrong label value, missing label, other namespace: fall through to the catch-all.
        assert_eq!(
            name(&workload("agents", "agent-worker-7", &[("app", "proxy")])),
            "catch-all"
        );
        assert_eq!(
            name(&workload("agents", "agent-worker-7", &[])),
            "catch-all"
        );
        assert_eq!(
            name(&workload("other", "agent-proxy", &[("app", "worker")])),
            "catch-all"
        );
        // Unknown namespace or ServiceAccount: only selectors without them match.
        assert_eq!(name(&Workload::default()), "catch-all");
        let host = Workload {
            host: true,
            ..Workload::default()
        };
        assert!(
            set.for_workload(&host).is_none(),
            "host processes match nothing"
        );
        assert!(PolicySet::default()
            .for_workload(&workload("a", "b", &[]))
            .is_none());
        assert!(PolicySet::default().is_empty());
        assert_eq!(set.len(), 3);
    }

    #[test]
    fn egress_rules_match_class_or_cidr_and_port() {
        let rule =
            |class: Option<DestinationClass>, cidr: Option<&str>, ports: &[u16]| EgressRule {
                class,
                cidr: cidr.map(str::to_owned),
                ports: ports.to_vec(),
            };
        let spec = AgentPolicySpec {
            egress: EgressPolicy {
                allow: vec![
                    rule(Some(DestinationClass::Dns), None, &[]),
                    rule(None, Some("203.0.113.0/24"), &[443]),
                    rule(None, Some("2001:db8::10"), &[]),
                    rule(Some(DestinationClass::Cluster), None, &[8080, 9090]),
                    rule(None, Some("not-a-cidr"), &[]),
                ],
            },
            ..AgentPolicySpec::default()
        };
        use DestinationClass::*;
        let allows = |class, addr: &str, port| policy_allows_egress(&spec, class, ip(addr), port);
        assert!(allows(Dns, "10.96.0.10", 53));
        assert!(allows(External, "203.0.113.7", 443));
        assert!(!allows(External, "203.0.113.7", 80), "port not listed");
        assert!(!allows(External, "198.51.100.1", 443), "outside the CIDR");
        assert!(allows(External, "::ffff:203.0.113.7", 443), "v4-mapped");
        assert!(allows(External, "2001:db8::10", 22));
        assert!(!allows(External, "2001:db8::11", 22));
        assert!(allows(Cluster, "10.244.1.1", 9090));
        assert!(!allows(Cluster, "10.244.1.1", 22));
        assert!(!allows(ApiServer, "10.96.0.1", 443));
        assert!(!allows(Metadata, "169.254.169.254", 80));
        assert_eq!(egress_rules(&spec).len(), 4, "the bad CIDR allows nothing");
        assert!(!policy_allows_egress(
            &AgentPolicySpec::default(),
            Dns,
            ip("10.96.0.10"),
            53
        ));
    }

    #[test]
    fn learning_windows() {
        let spec = |w: Option<&str>| AgentPolicySpec {
            learning_window: w.map(str::to_owned),
            ..AgentPolicySpec::default()
        };
        assert_eq!(
            learning_window(&spec(Some("10m"))),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            learning_window(&spec(Some("1h 30m"))),
            Some(Duration::from_secs(5400))
        );
        assert_eq!(learning_window(&spec(Some("0s"))), None);
        assert_eq!(learning_window(&spec(Some("ten minutes"))), None);
        assert_eq!(learning_window(&spec(None)), None);
    }

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
        assert_eq!(
            learning_window(&workers.spec),
            Some(Duration::from_secs(600))
        );
        assert!(workers.spec.rules["proc-environ-read"].disabled);
        assert!(policy_allows_egress(
            &workers.spec,
            DestinationClass::External,
            ip("203.0.113.9"),
            443
        ));
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
    fn deep_nesting_is_refused_before_serde_yaml() {
        // Flow mappings 50,000 deep: serde_yaml alone spends seconds on these (quadratic).
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

    #[test]
    fn crd_is_generated() {
        let crd = crd_yaml();
        assert!(crd.starts_with("# Generated"), "{crd}");
        assert!(
            crd.contains("name: agentpolicies.agent-monitor.dev"),
            "{crd}"
        );
        assert!(crd.contains("scope: Namespaced"), "{crd}");
    }
}
