//! The built-in rules' ids, priorities and tags, and the detection defaults. They sit
//! below both `policy` (which validates rule ids named in a policy) and `detect` (which
//! fires them); `detect` re-exports them.

use super::Priority;

/// A built-in rule.
#[derive(Debug, Clone, Copy)]
pub struct RuleInfo {
    pub id: &'static str,
    pub priority: Priority,
    pub tags: &'static [&'static str],
    pub description: &'static str,
}

pub const FOREIGN_CREDENTIAL_READ: &str = "foreign-credential-read";
pub const UNEXPECTED_EXECUTABLE: &str = "credential-read-unexpected-executable";
pub const CREDENTIAL_NOT_ALLOWED: &str = "credential-read-not-allowed";
pub const EXFILTRATION: &str = "credential-exfiltration";
pub const EGRESS_OUTSIDE_ALLOWLIST: &str = "egress-outside-allowlist";
pub const CLOUD_METADATA: &str = "cloud-metadata-contact";
pub const API_SERVER_NOT_ALLOWED: &str = "api-server-contact-not-allowed";
pub const NODE_CREDENTIAL_READ: &str = "node-credential-read";
pub const PROC_ENVIRON_READ: &str = "proc-environ-read";
pub const BASELINE_DEVIATION: &str = "baseline-deviation";
pub const EVENTS_LOST: &str = "monitor-events-lost";
pub const KERNEL_SILENT: &str = "monitor-kernel-silent";

/// Every built-in rule. Tags follow Falco's convention (`mitre_*` tactic, `T*` technique).
pub const RULES: &[RuleInfo] = &[
    RuleInfo {
        id: FOREIGN_CREDENTIAL_READ,
        priority: Priority::Critical,
        tags: &["k8s", "credentials", "mitre_credential_access", "T1528", "T1552.001"],
        description: "a process reads a credential owned by another pod",
    },
    RuleInfo {
        id: UNEXPECTED_EXECUTABLE,
        priority: Priority::Warning,
        tags: &["k8s", "credentials", "mitre_credential_access", "T1552.001"],
        description: "a credential is read by a shell, a file utility, or an executable the policy does not name",
    },
    RuleInfo {
        id: CREDENTIAL_NOT_ALLOWED,
        priority: Priority::Warning,
        tags: &["k8s", "credentials", "mitre_credential_access", "T1552.001"],
        description: "a pod reads a credential its policy's credentials.allowed does not grant (class or path)",
    },
    RuleInfo {
        id: EXFILTRATION,
        priority: Priority::Critical,
        tags: &["k8s", "credentials", "network", "mitre_exfiltration", "T1041", "T1528"],
        description: "a credential read followed by egress outside the allowlist from the same process tree",
    },
    RuleInfo {
        id: EGRESS_OUTSIDE_ALLOWLIST,
        priority: Priority::Warning,
        tags: &["k8s", "network", "mitre_command_and_control", "T1071"],
        description: "a connection to a destination the agent's policy does not allow",
    },
    RuleInfo {
        id: CLOUD_METADATA,
        priority: Priority::Error,
        tags: &["k8s", "network", "cloud", "mitre_credential_access", "T1552.005"],
        description: "a pod contacts the cloud instance metadata service",
    },
    RuleInfo {
        id: API_SERVER_NOT_ALLOWED,
        priority: Priority::Warning,
        tags: &["k8s", "network", "mitre_discovery", "T1613"],
        description: "API server contact by a workload whose tier or policy does not allow it",
    },
    RuleInfo {
        id: NODE_CREDENTIAL_READ,
        priority: Priority::Critical,
        tags: &["k8s", "credentials", "node", "mitre_privilege_escalation", "T1552.001", "T1611"],
        description: "a container or a host process (other than the node's own agents) reads a node kubeconfig, node PKI or a cloud credential file",
    },
    RuleInfo {
        id: PROC_ENVIRON_READ,
        priority: Priority::Warning,
        tags: &["k8s", "credentials", "process", "mitre_credential_access", "T1552"],
        description: "a container or a host process reads the environment of another process",
    },
    RuleInfo {
        id: BASELINE_DEVIATION,
        priority: Priority::Notice,
        tags: &["k8s", "baseline", "mitre_defense_evasion"],
        description: "an agent does something it never did during its learning window",
    },
    RuleInfo {
        id: EVENTS_LOST,
        priority: Priority::Critical,
        tags: &["monitor", "health"],
        description: "the kernel dropped credential or network events (a full ring)",
    },
    RuleInfo {
        id: KERNEL_SILENT,
        // A notice, not a failure: a quiet node (or a cgroup filter that matches nothing
        // busy) is healthy. Liveness is judged by the daemon's own loops.
        priority: Priority::Notice,
        tags: &["monitor", "health"],
        description: "no record from the kernel for a while (health.kernel_silence_ms): expected on an idle node or a narrow cgroup filter; on a busy node, check agent_monitor_probes_attached",
    },
];

/// The rule with this id.
pub fn rule(id: &str) -> Option<&'static RuleInfo> {
    RULES.iter().find(|r| r.id == id)
}

/// Readers that have no business with a credential: shells and file utilities, the tools
/// of a prompt-injected `cat token | curl ...`.
pub const DEFAULT_SUSPICIOUS_READERS: &[&str] = &[
    "sh", "bash", "dash", "zsh", "ash", "ksh", "busybox", "cat", "head", "tail", "less", "more",
    "base64", "xxd", "od", "hexdump", "strings", "curl", "wget", "nc", "ncat", "socat", "cp",
    "scp", "dd", "tar", "grep", "awk", "sed", "vi", "vim", "nano",
];

/// The node's own agents, which read node credentials as their job (the kubelet reads its
/// kubeconfig and client certificates all the time): host processes running these are not
/// `node-credential-read` alerts. Matched by executable name, like the suspicious readers.
pub const DEFAULT_NODE_AGENTS: &[&str] = &["kubelet", "k3s", "rke2", "kubeadm"];
