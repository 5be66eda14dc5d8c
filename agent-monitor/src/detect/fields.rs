//! The words and Falco fields every rule uses to say who did it.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::{
    events::Task,
    identity::{credentials::CredentialClass, Workload},
};

/// Credential classes that hold secrets.
pub(super) fn is_secret(class: CredentialClass) -> bool {
    !matches!(class, CredentialClass::NonSecret | CredentialClass::Other)
}

pub(super) fn opt(s: &Option<String>) -> Value {
    s.as_ref().map_or(Value::Null, |v| Value::String(v.clone()))
}

pub(super) fn or_dash(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("-")
}

/// Who, in words: `agent researcher (pod agents/agent-a, sa sa-agent-a, exe /usr/bin/cat)`.
pub(super) fn who(task: &Task) -> String {
    let w = &task.workload;
    if w.host {
        return format!(
            "host process {} (pid {}, exe {})",
            task.comm,
            task.tgid,
            or_dash(&task.exe)
        );
    }
    format!(
        "agent {} (pod {}/{}, sa {}, exe {}, pid {})",
        or_dash(&w.agent),
        or_dash(&w.namespace),
        w.pod.as_deref().or(w.pod_uid.as_deref()).unwrap_or("-"),
        or_dash(&w.service_account),
        or_dash(&task.exe),
        task.tgid
    )
}

/// Falco output fields of a task.
pub(super) fn task_fields(task: &Task) -> BTreeMap<String, Value> {
    let mut f = workload_fields(&task.workload);
    f.insert("proc.pid".into(), json!(task.tgid));
    f.insert("proc.tid".into(), json!(task.pid));
    f.insert("proc.ppid".into(), json!(task.ppid));
    f.insert("proc.name".into(), json!(task.comm));
    f.insert("proc.exepath".into(), opt(&task.exe));
    f.insert("user.uid".into(), json!(task.uid));
    f
}

/// Falco output fields of a workload.
pub(super) fn workload_fields(w: &Workload) -> BTreeMap<String, Value> {
    let mut f = BTreeMap::new();
    f.insert("k8s.ns.name".into(), opt(&w.namespace));
    f.insert("k8s.pod.name".into(), opt(&w.pod));
    f.insert("k8s.pod.uid".into(), opt(&w.pod_uid));
    f.insert("k8s.sa.name".into(), opt(&w.service_account));
    f.insert("container.id".into(), opt(&w.container_id));
    f.insert("container.name".into(), opt(&w.container));
    f.insert("agent.name".into(), opt(&w.agent));
    f.insert("agent.tier".into(), opt(&w.tier));
    f.insert("agent.host".into(), json!(w.host));
    f
}

pub(super) fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}
