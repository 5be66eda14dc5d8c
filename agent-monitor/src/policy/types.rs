//! `AgentPolicy`: the CRD `agentpolicies.agent-monitor.dev` (version `v1alpha1`) and the
//! YAML policy files, one Rust definition for both.

use std::collections::BTreeMap;

use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::identity::credentials::CredentialClass;

/// Falco priorities, most severe first (Falcosidekick rejects any other value).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum Priority {
    Emergency,
    Alert,
    Critical,
    Error,
    Warning,
    Notice,
    Informational,
    Debug,
}

/// Where a connection goes, as far as policy is concerned.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum DestinationClass {
    /// The Kubernetes API server (configured, or the `kubernetes` Service and endpoints).
    ApiServer,
    /// Pod and Service CIDRs of the cluster.
    Cluster,
    /// DNS (port 53).
    Dns,
    /// Cloud instance metadata (169.254.169.254, fd00:ec2::254).
    Metadata,
    /// 127.0.0.0/8 and ::1.
    Loopback,
    /// Anything else.
    External,
}

impl DestinationClass {
    /// Every class, in declaration order.
    pub const ALL: [DestinationClass; 6] = [
        Self::ApiServer,
        Self::Cluster,
        Self::Dns,
        Self::Metadata,
        Self::Loopback,
        Self::External,
    ];

    /// The name policies, JSON and alerts use (the serde name), without building a JSON
    /// value.
    pub fn name(self) -> &'static str {
        match self {
            Self::ApiServer => "api-server",
            Self::Cluster => "cluster",
            Self::Dns => "dns",
            Self::Metadata => "metadata",
            Self::Loopback => "loopback",
            Self::External => "external",
        }
    }
}

/// An agent's tier in the two-tier layout: one tightly scoped `agent-proxy` talking to
/// the API server on behalf of many `agent-worker-N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Proxy,
    Worker,
}

/// Which workloads a policy applies to. Every non-empty part must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    /// Namespaces (exact names). Empty: any namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Labels the pod must carry with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// ServiceAccount names or globs (`agent-worker-*`). Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
}

/// One kind of credential the agent may read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialGrant {
    /// A credential class (`service_account_token`, `secret_volume`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<CredentialClass>,
    /// A path or glob (`/etc/openai/*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Credential reads the agent is expected to make.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialPolicy {
    /// What it may read. Empty: its own ServiceAccount token and its own Secret and
    /// projected volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<CredentialGrant>,
    /// Executables (paths or globs) that may read them. Empty: any executable except
    /// shells and file utilities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub executables: Vec<String>,
}

/// One allowed egress destination: a class, or a CIDR with optional ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<DestinationClass>,
    /// `10.0.0.0/8`, `2001:db8::/32` or a single address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// Destination ports. Empty: any port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// Where the agent may connect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressPolicy {
    /// Allowed destinations. Empty: `dns`, `cluster` and `loopback`, plus `api-server`
    /// for the proxy tier.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<EgressRule>,
}

/// Per-rule tuning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleOverride {
    /// Turn the rule off for these workloads.
    #[serde(default)]
    pub disabled: bool,
    /// Report the rule at this priority instead of its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// What an agent is expected to do with credentials and the network.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "agent-monitor.dev",
    version = "v1alpha1",
    kind = "AgentPolicy",
    plural = "agentpolicies",
    shortname = "agentpol",
    namespaced,
    doc = "What an AI agent is expected to do with its credentials and the network; agent-monitor raises alerts for the rest."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentPolicySpec {
    /// Which workloads this policy applies to.
    #[serde(default)]
    pub selector: Selector,
    /// The agents' tier; overrides the tier label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    #[serde(default)]
    pub credentials: CredentialPolicy,
    #[serde(default)]
    pub egress: EgressPolicy,
    /// How long after an agent is first seen its behaviour is learned as its baseline
    /// (`10m`, `1h`). Unset: no baseline rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_window: Option<String>,
    /// Per-rule overrides, by rule id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<String, RuleOverride>,
}

/// The CustomResourceDefinition of `AgentPolicy`, as YAML, generated from the Rust types.
pub fn crd_yaml() -> String {
    let body = serde_saphyr::to_string(&AgentPolicy::crd())
        .expect("a CustomResourceDefinition always serializes to YAML");
    format!(
        "# Generated from agent-monitor/src/policy/types.rs by policy::crd_yaml(); do not edit.\n\
         # Regenerate: AGENT_MONITOR_UPDATE_CRD=1 cargo test -p agent-monitor --test policy_files\n\
         {body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_class_names_are_the_serde_names() {
        for class in DestinationClass::ALL {
            let json = serde_json::to_value(class).expect("serialize");
            assert_eq!(json.as_str(), Some(class.name()), "{class:?}");
        }
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
