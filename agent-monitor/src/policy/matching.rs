//! What detection matches against, compiled once per policy when a [`PolicySet`] is built,
//! never per event: path and name globs ([`globset`]), CIDRs ([`ipnet`]), egress rules, and
//! [`CompiledPolicy`], one policy as the detector applies it.
//!
//! [`PolicySet`]: super::PolicySet

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use ipnet::IpNet;

use super::{
    error::{quoted, FieldError},
    types::{AgentPolicySpec, DestinationClass, EgressRule, RuleOverride, Tier},
};
use crate::identity::{
    credentials::{normalize, CredentialClass},
    Workload,
};

// ---------------------------------------------------------------------------------------
// Globs
// ---------------------------------------------------------------------------------------

/// Parses one glob as policies write them: `*` matches any run of characters but `/`, `?`
/// one character but `/` (one byte: globset matches bytes, so `?` does not stand for a
/// multi-byte UTF-8 character); `**` as a whole path segment (`/etc/openai/**`,
/// `**/token`, `/a/**/b`) also matches across `/`, and elsewhere is `*`; everything else,
/// `\` included, matches itself. `[...]` and `{...}` are refused. On error, what was
/// expected.
pub fn glob(pattern: &str) -> Result<Glob, String> {
    if pattern.is_empty() {
        return Err("a non-empty glob".to_owned());
    }
    if pattern.contains(['[', ']', '{', '}']) {
        return Err("a glob with only `*` and `?` as wildcards (no `[...]` or `{...}`)".to_owned());
    }
    GlobBuilder::new(pattern)
        // `/etc/openai/*` must not allow `/etc/openai/a/b`: `*` stays within one segment.
        .literal_separator(true)
        // Policies have no escapes: a `\` is a character of the name.
        .backslash_escape(false)
        .build()
        .map_err(|e| format!("a glob ({})", e.kind()))
}

/// Parses a glob of absolute paths ([`glob`], starting with `/`). On error, what was
/// expected.
pub fn path_glob(pattern: &str) -> Result<Glob, String> {
    let glob = glob(pattern)?;
    if !pattern.starts_with('/') {
        return Err("an absolute path or glob (starting with /)".to_owned());
    }
    Ok(glob)
}

/// A list of globs compiled into one matcher: a text matches when any glob does.
#[derive(Debug, Clone)]
pub struct Globs(GlobSet);

impl Globs {
    /// Compiles `patterns`, each parsed by `parse` ([`glob`] or [`path_glob`]). A bad glob
    /// is an error naming its field, `{field}[{index}]`.
    pub fn new(
        field: &str,
        patterns: &[String],
        parse: impl Fn(&str) -> Result<Glob, String>,
    ) -> Result<Self, FieldError> {
        let mut set = GlobSetBuilder::new();
        for (i, pattern) in patterns.iter().enumerate() {
            let glob = parse(pattern).map_err(|expected| {
                FieldError::new(format!("{field}[{i}]"), expected, quoted(pattern))
            })?;
            set.add(glob);
        }
        let set = set
            .build()
            .map_err(|e| FieldError::new(field, "globs that compile together", e.to_string()))?;
        Ok(Self(set))
    }

    /// Whether one of the globs matches `text`.
    pub fn is_match(&self, text: &str) -> bool {
        self.0.is_match(text)
    }
}

/// [`Globs::new`], or `None` for an empty list (which restricts nothing).
fn optional_globs(
    field: &str,
    patterns: &[String],
    parse: impl Fn(&str) -> Result<Glob, String>,
) -> Result<Option<Globs>, FieldError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    Globs::new(field, patterns, parse).map(Some)
}

// ---------------------------------------------------------------------------------------
// CIDRs
// ---------------------------------------------------------------------------------------

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

/// Parses `addr/prefix` or a bare address (a /32 or /128).
///
/// Host bits are accepted and cleared: `10.1.2.3/8` is `10.0.0.0/8`. Policy files and
/// `detect.cluster_cidrs` have always been read so; refusing them now would turn files
/// that loaded before into a daemon that exits 64, for a network that is the same either
/// way.
///
/// The address and the prefix are split and parsed here rather than by `IpNet`'s
/// `FromStr`, which takes no bare address and says only "invalid IP address syntax":
/// the error says which part is wrong and what it must be.
pub fn parse_cidr(s: &str) -> Result<IpNet, CidrError> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| CidrError::Address(addr.to_owned()))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_error = || CidrError::Prefix {
        prefix: prefix.unwrap_or_default().to_owned(),
        max,
    };
    let len = match prefix {
        None => max,
        // Digits only: `u8::from_str` also takes `+8`.
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|_| p.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(prefix_error)?,
    };
    // `IpNet::new` refuses a length past the family's 32 or 128.
    IpNet::new(addr, len)
        .map(|net| net.trunc())
        .map_err(|_| prefix_error())
}

/// Whether `net` contains `ip`. An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, as a
/// dual-stack socket reports an IPv4 peer) is compared as the IPv4 address, and an IPv4
/// address as its mapped form against an IPv6 network (`::ffff:0:0/96`); `IpNet::contains`
/// alone says no across families.
pub fn net_contains(net: &IpNet, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpNet::V4(net), IpAddr::V6(ip)) => ip.to_ipv4_mapped().is_some_and(|ip| net.contains(&ip)),
        (IpNet::V6(net), IpAddr::V4(ip)) => net.contains(&ip.to_ipv6_mapped()),
        (net, ip) => net.contains(&ip),
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
    pub cidr: Option<IpNet>,
    /// Destination ports; empty: any.
    pub ports: Vec<u16>,
}

impl EgressAllow {
    /// Parses a rule.
    pub fn from_rule(rule: &EgressRule) -> Result<Self, CidrError> {
        Ok(Self {
            class: rule.class,
            cidr: rule.cidr.as_deref().map(parse_cidr).transpose()?,
            ports: rule.ports.clone(),
        })
    }

    /// Whether a connection to `ip:port`, of class `class`, matches: the class is the
    /// rule's or the CIDR contains the address; and the port is listed or none are.
    pub fn matches(&self, class: DestinationClass, ip: IpAddr, port: u16) -> bool {
        let destination =
            self.class == Some(class) || self.cidr.is_some_and(|c| net_contains(&c, ip));
        destination && (self.ports.is_empty() || self.ports.contains(&port))
    }
}

/// The policy's learning window; `None` when unset, unparsable or zero (validation refuses
/// the last two).
fn learning_window(spec: &AgentPolicySpec) -> Option<Duration> {
    let text = spec.learning_window.as_deref()?;
    humantime::parse_duration(text)
        .ok()
        .filter(|d| !d.is_zero())
}

// ---------------------------------------------------------------------------------------
// One policy, compiled
// ---------------------------------------------------------------------------------------

/// One `spec.credentials.allowed` entry, compiled: a read matches when it is of the class
/// (if given) and its path matches the glob (if given).
#[derive(Debug, Clone)]
struct CredentialGrant {
    class: Option<CredentialClass>,
    path: Option<Globs>,
}

impl CredentialGrant {
    fn matches(&self, class: CredentialClass, paths: &[&str]) -> bool {
        self.class.is_none_or(|c| c == class)
            && self
                .path
                .as_ref()
                .is_none_or(|g| paths.iter().any(|p| g.is_match(&normalize(p))))
    }
}

/// One policy as detection applies it: its selector, executables and egress rules
/// compiled, with its tier, rule overrides and learning window. Built once per policy
/// when a [`PolicySet`](super::PolicySet) is built.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    namespaces: Vec<String>,
    match_labels: BTreeMap<String, String>,
    /// `None`: any ServiceAccount.
    service_accounts: Option<Globs>,
    /// `None`: any executable (shells and file utilities are the detector's to judge).
    executables: Option<Globs>,
    /// `None`: the policy lists no destinations, and the detector's defaults apply.
    egress: Option<Vec<EgressAllow>>,
    /// `None`: the policy grants no credentials by name (its own token and volumes are
    /// the other rules' to judge).
    credentials: Option<Vec<CredentialGrant>>,
    tier: Option<Tier>,
    rules: BTreeMap<String, RuleOverride>,
    learning_window: Option<Duration>,
}

impl CompiledPolicy {
    /// Compiles a policy's spec. The first glob or CIDR that does not compile is the
    /// error, naming its field (`spec.credentials.executables[1]`).
    pub fn compile(spec: &AgentPolicySpec) -> Result<Self, FieldError> {
        let sel = &spec.selector;
        let service_accounts = optional_globs(
            "spec.selector.serviceAccounts",
            &sel.service_accounts,
            |p| glob(p).map_err(|expected| format!("a ServiceAccount name or {expected}")),
        )?;
        let executables = optional_globs(
            "spec.credentials.executables",
            &spec.credentials.executables,
            path_glob,
        )?;
        let egress = if spec.egress.allow.is_empty() {
            None
        } else {
            let mut rules = Vec::with_capacity(spec.egress.allow.len());
            for (i, rule) in spec.egress.allow.iter().enumerate() {
                let allow = EgressAllow::from_rule(rule).map_err(|e| {
                    FieldError::new(
                        format!("spec.egress.allow[{i}].cidr"),
                        e.expected(),
                        quoted(rule.cidr.as_deref().unwrap_or_default()),
                    )
                })?;
                rules.push(allow);
            }
            Some(rules)
        };
        let credentials = if spec.credentials.allowed.is_empty() {
            None
        } else {
            let mut grants = Vec::with_capacity(spec.credentials.allowed.len());
            for (i, grant) in spec.credentials.allowed.iter().enumerate() {
                // Paths are compared normalized (`/var/run` is `/run`; the kubelet's
                // `..data` directories dropped), so the glob is too.
                let path = grant
                    .path
                    .as_deref()
                    .map(|p| {
                        Globs::new(
                            &format!("spec.credentials.allowed[{i}].path"),
                            &[normalize(p)],
                            path_glob,
                        )
                    })
                    .transpose()?;
                grants.push(CredentialGrant {
                    class: grant.class,
                    path,
                });
            }
            Some(grants)
        };
        Ok(Self {
            namespaces: sel.namespaces.clone(),
            match_labels: sel.match_labels.clone(),
            service_accounts,
            executables,
            egress,
            credentials,
            tier: spec.tier,
            rules: spec.rules.clone(),
            learning_window: learning_window(spec),
        })
    }

    /// Whether the selector picks workload `w`: its namespace is listed, it carries every
    /// label, and its ServiceAccount matches a glob; an empty part matches anything. Host
    /// processes match no selector.
    pub fn selects(&self, w: &Workload) -> bool {
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
        let service_account = self.service_accounts.as_ref().is_none_or(|globs| {
            w.service_account
                .as_deref()
                .is_some_and(|sa| globs.is_match(sa))
        });
        namespace && labels && service_account
    }

    /// Whether executable `exe` may read credentials as far as the policy says: it lists
    /// no executables, or one of its globs matches.
    pub fn allows_executable(&self, exe: &str) -> bool {
        self.executables
            .as_ref()
            .is_none_or(|globs| globs.is_match(exe))
    }

    /// Whether the policy's `credentials.allowed` grants a read of class `class` at any of
    /// `paths` (the host path and the path as the process passed it); `None` when the
    /// policy lists no grants.
    pub fn allows_credential(&self, class: CredentialClass, paths: &[&str]) -> Option<bool> {
        self.credentials
            .as_ref()
            .map(|grants| grants.iter().any(|g| g.matches(class, paths)))
    }

    /// Whether one of the policy's egress rules allows a connection to `ip:port` of class
    /// `class`; `None` when the policy lists no destinations (the defaults an empty list
    /// stands for, by tier, are the detector's to apply).
    pub fn egress_allows(&self, class: DestinationClass, ip: IpAddr, port: u16) -> Option<bool> {
        self.egress
            .as_ref()
            .map(|rules| rules.iter().any(|r| r.matches(class, ip, port)))
    }

    /// The agents' tier, as the policy sets it.
    pub fn tier(&self) -> Option<Tier> {
        self.tier
    }

    /// The policy's override of rule `id`, if any.
    pub fn rule_override(&self, id: &str) -> Option<&RuleOverride> {
        self.rules.get(id)
    }

    /// How long after an agent is first seen its behaviour is learned; `None`: no
    /// baseline rule.
    pub fn learning_window(&self) -> Option<Duration> {
        self.learning_window
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::types::{EgressPolicy, Selector};

    fn globs(patterns: &[&str]) -> Globs {
        let patterns: Vec<String> = patterns.iter().map(|p| (*p).to_owned()).collect();
        Globs::new("test", &patterns, glob).expect("globs compile")
    }

    #[test]
    fn globs_keep_star_within_one_path_segment() {
        for (p, t) in [
            ("agent-worker-*", "agent-worker-1"),
            ("agent-worker-*", "agent-worker-"),
            ("/usr/bin/python3*", "/usr/bin/python3.12"),
            ("/etc/openai/*", "/etc/openai/key"),
            ("/etc/openai/**", "/etc/openai/key"),
            ("/etc/openai/**", "/etc/openai/a/b"),
            ("/etc/**/key", "/etc/key"),
            ("/etc/**/key", "/etc/openai/a/key"),
            ("**/token", "/var/run/token"),
            ("*", ""),
            ("*", "agent-proxy"),
            ("a?c", "abc"),
            ("*é?", "xxéy"),
            ("*a*b*c", "aXbXcXabc"),
            ("exact", "exact"),
            (r"a\b", r"a\b"),
        ] {
            assert!(globs(&[p]).is_match(t), "{p:?} should match {t:?}");
        }
        for (p, t) in [
            ("agent-worker-*", "agent-proxy"),
            ("a?c", "ac"),
            ("a?c", "abbc"),
            ("exact", "exactly"),
            ("exact", "exac"),
            ("/etc/openai/*", "/etc/openai"),
            ("/etc/openai/*", "/etc/openai/a/b"),
            ("/etc/openai/*", "/etc/openai/..data/key"),
            ("/etc/openai/**", "/etc/openai"),
            ("/etc/openai/**", "/etc/openaix/key"),
            ("*", "/any/thing"),
            ("/usr/bin/*", "/usr/bin/sub/python3"),
            ("/usr/bin/?", "/usr/bin//"),
            ("*a*b*c", "aXbX"),
            // `?` is one byte, and `é` two.
            ("a?c", "aéc"),
        ] {
            assert!(!globs(&[p]).is_match(t), "{p:?} should not match {t:?}");
        }
        let both = globs(&["/usr/local/bin/agent", "/usr/bin/python3*"]);
        assert!(both.is_match("/usr/local/bin/agent") && both.is_match("/usr/bin/python3"));
        assert!(!both.is_match("/usr/bin/perl"));
    }

    #[test]
    fn globs_refuse_what_policies_do_not_allow() {
        assert_eq!(glob("").err().as_deref(), Some("a non-empty glob"));
        for bad in ["/etc/[ab]", "/etc/{a,b}", "/etc/a]", "x}"] {
            let err = glob(bad).expect_err(bad);
            assert!(
                err.contains("only `*` and `?` as wildcards"),
                "{bad}: {err}"
            );
        }
        assert!(glob("/etc/*/a?").is_ok());
        assert!(glob(r"trailing\").is_ok(), "no escapes");
        assert_eq!(
            path_glob("etc/openai/*").err().as_deref(),
            Some("an absolute path or glob (starting with /)")
        );
        let patterns = vec!["/ok".to_owned(), "/etc/{a,b}".to_owned()];
        let err = Globs::new("spec.credentials.executables", &patterns, path_glob)
            .expect_err("a bad glob");
        assert_eq!(err.field, "spec.credentials.executables[1]");
        assert_eq!(err.got, "`/etc/{a,b}`");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn cidrs() {
        let c = parse_cidr("10.0.0.0/8").expect("v4");
        assert!(net_contains(&c, ip("10.255.1.2")));
        assert!(!net_contains(&c, ip("11.0.0.1")));
        assert!(net_contains(&c, ip("::ffff:10.1.2.3")), "v4-mapped");
        assert!(!net_contains(&c, ip("fd00::1")));
        let host = parse_cidr("192.168.1.5").expect("bare v4");
        assert_eq!(host.prefix_len(), 32);
        assert!(net_contains(&host, ip("192.168.1.5")));
        assert!(!net_contains(&host, ip("192.168.1.6")));
        // Host bits are accepted and cleared (see `parse_cidr`).
        let masked = parse_cidr("10.1.2.3/16").expect("host bits");
        assert_eq!(masked.to_string(), "10.1.0.0/16");
        assert!(net_contains(&masked, ip("10.1.200.1")));
        let all = parse_cidr("0.0.0.0/0").expect("all v4");
        assert!(net_contains(&all, ip("8.8.8.8")));
        let v6 = parse_cidr("2001:db8::/32").expect("v6");
        assert!(net_contains(&v6, ip("2001:db8:1::1")));
        assert!(!net_contains(&v6, ip("2001:db9::1")));
        assert!(!net_contains(&v6, ip("10.0.0.1")));
        assert_eq!(parse_cidr("fd00::1").expect("bare v6").prefix_len(), 128);
        assert!(net_contains(
            &parse_cidr("::/0").expect("all v6"),
            ip("::1")
        ));
        assert!(net_contains(
            &parse_cidr("::ffff:0:0/96").expect("mapped"),
            ip("1.2.3.4")
        ));
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/300",
            "",
            "host.example",
            " 10.0.0.0/8",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad:?} should not parse");
        }
        assert_eq!(
            parse_cidr("10.0.0.0/33"),
            Err(CidrError::Prefix {
                prefix: "33".into(),
                max: 32
            })
        );
        assert_eq!(
            parse_cidr("fd00::/129").map_err(|e| e.expected()),
            Err("a CIDR whose prefix length is a number from 0 to 128 (IPv6)".to_owned())
        );
        assert_eq!(
            parse_cidr("llm.example/32"),
            Err(CidrError::Address("llm.example".into()))
        );
    }

    fn rule(class: Option<DestinationClass>, cidr: Option<&str>, ports: &[u16]) -> EgressRule {
        EgressRule {
            class,
            cidr: cidr.map(str::to_owned),
            ports: ports.to_vec(),
        }
    }

    fn egress(rules: Vec<EgressRule>) -> AgentPolicySpec {
        AgentPolicySpec {
            egress: EgressPolicy { allow: rules },
            ..AgentPolicySpec::default()
        }
    }

    #[test]
    fn egress_rules_match_class_or_cidr_and_port() {
        use DestinationClass::*;
        let spec = egress(vec![
            rule(Some(Dns), None, &[]),
            rule(None, Some("203.0.113.0/24"), &[443]),
            rule(None, Some("2001:db8::10"), &[]),
            rule(Some(Cluster), None, &[8080, 9090]),
        ]);
        let policy = CompiledPolicy::compile(&spec).expect("compiles");
        let allows = |class, addr: &str, port| policy.egress_allows(class, ip(addr), port);
        assert_eq!(allows(Dns, "10.96.0.10", 53), Some(true));
        assert_eq!(allows(External, "203.0.113.7", 443), Some(true));
        assert_eq!(
            allows(External, "203.0.113.7", 80),
            Some(false),
            "port not listed"
        );
        assert_eq!(
            allows(External, "198.51.100.1", 443),
            Some(false),
            "outside the CIDR"
        );
        assert_eq!(
            allows(External, "::ffff:203.0.113.7", 443),
            Some(true),
            "v4-mapped"
        );
        assert_eq!(allows(External, "2001:db8::10", 22), Some(true));
        assert_eq!(allows(External, "2001:db8::11", 22), Some(false));
        assert_eq!(allows(Cluster, "10.244.1.1", 9090), Some(true));
        assert_eq!(allows(Cluster, "10.244.1.1", 22), Some(false));
        assert_eq!(allows(ApiServer, "10.96.0.1", 443), Some(false));
        assert_eq!(allows(Metadata, "169.254.169.254", 80), Some(false));
        // No rules: the detector's defaults, not "nothing allowed".
        let none = CompiledPolicy::compile(&AgentPolicySpec::default()).expect("compiles");
        assert_eq!(none.egress_allows(Dns, ip("10.96.0.10"), 53), None);
        // A CIDR that does not parse names its field.
        let bad = egress(vec![
            rule(Some(Dns), None, &[]),
            rule(None, Some("not-a-cidr"), &[]),
        ]);
        let err = CompiledPolicy::compile(&bad).expect_err("bad CIDR");
        assert_eq!(err.field, "spec.egress.allow[1].cidr");
        assert!(
            err.expected.contains("an IPv4 or IPv6 address or CIDR"),
            "{err}"
        );
        assert_eq!(err.got, "`not-a-cidr`");
    }

    #[test]
    fn executables_and_service_accounts() {
        let spec = AgentPolicySpec {
            selector: Selector {
                service_accounts: vec!["agent-worker-*".into()],
                ..Selector::default()
            },
            credentials: crate::policy::types::CredentialPolicy {
                executables: vec!["/opt/agent/bin/*".into(), "/usr/lib/agent/**".into()],
                ..Default::default()
            },
            ..AgentPolicySpec::default()
        };
        let policy = CompiledPolicy::compile(&spec).expect("compiles");
        assert!(policy.allows_executable("/opt/agent/bin/agent"));
        assert!(!policy.allows_executable("/opt/agent/bin/plugins/agent"));
        assert!(policy.allows_executable("/usr/lib/agent/libexec/helper"));
        assert!(!policy.allows_executable("/usr/bin/python3"));
        let open = CompiledPolicy::compile(&AgentPolicySpec::default()).expect("compiles");
        assert!(
            open.allows_executable("/anything"),
            "no list: any executable"
        );

        let sa = |name: &str| Workload {
            service_account: Some(name.into()),
            ..Workload::default()
        };
        assert!(policy.selects(&sa("agent-worker-7")));
        assert!(!policy.selects(&sa("agent-proxy")));
        assert!(
            !policy.selects(&Workload::default()),
            "unknown ServiceAccount"
        );
        assert!(open.selects(&Workload::default()));

        let bad = AgentPolicySpec {
            selector: Selector {
                service_accounts: vec!["agent-{a,b}".into()],
                ..Selector::default()
            },
            ..AgentPolicySpec::default()
        };
        let err = CompiledPolicy::compile(&bad).expect_err("bad glob");
        assert_eq!(err.field, "spec.selector.serviceAccounts[0]");
        assert!(
            err.expected.starts_with("a ServiceAccount name or a glob"),
            "{err}"
        );
    }

    #[test]
    fn learning_windows() {
        let window = |w: Option<&str>| {
            learning_window(&AgentPolicySpec {
                learning_window: w.map(str::to_owned),
                ..AgentPolicySpec::default()
            })
        };
        assert_eq!(window(Some("10m")), Some(Duration::from_secs(600)));
        assert_eq!(window(Some("1h 30m")), Some(Duration::from_secs(5400)));
        assert_eq!(window(Some("0s")), None);
        assert_eq!(window(Some("ten minutes")), None);
        assert_eq!(window(None), None);
    }
}
