//! Rules on credential opens: foreign reads, unexpected executables, node credentials,
//! `/proc/<pid>/environ`, reads the policy does not allow, first-seen deviations.

use serde_json::{json, Value};

use super::{
    fields::*, state::Read, Engine, Hit, BASELINE_DEVIATION, CREDENTIAL_NOT_ALLOWED,
    FOREIGN_CREDENTIAL_READ, NODE_CREDENTIAL_READ, PROC_ENVIRON_READ, UNEXPECTED_EXECUTABLE,
};
use crate::{
    events::OpenRecord, identity::credentials::CredentialClass, policy::matching::CompiledPolicy,
};

impl Engine {
    pub(super) fn on_open<'r>(
        &mut self,
        o: &'r OpenRecord,
        policy: Option<&CompiledPolicy>,
        hits: &mut Vec<Hit<'r>>,
    ) {
        let t = &o.task;
        let w = &t.workload;
        // A missing file reveals nothing and reads nothing.
        if o.result == -i64::from(libc::ENOENT) || !is_secret(o.class) {
            return;
        }
        // Built only for a hit: most opens raise nothing, and the fields are a map of
        // a dozen owned strings.
        let fields = move || {
            let mut fields = task_fields(t);
            fields.insert("fd.name".into(), json!(o.path));
            fields.insert("agent.path_as_passed".into(), json!(o.raw_path));
            fields.insert("agent.credential.class".into(), json!(o.class));
            fields.insert(
                "agent.owner.pod_uid".into(),
                o.owner.as_ref().map_or(Value::Null, |x| opt(&x.pod_uid)),
            );
            fields.insert(
                "agent.owner.ns".into(),
                o.owner.as_ref().map_or(Value::Null, |x| opt(&x.namespace)),
            );
            fields.insert(
                "agent.owner.pod".into(),
                o.owner.as_ref().map_or(Value::Null, |x| opt(&x.name)),
            );
            fields.insert("evt.res".into(), json!(o.result));
            fields
        };
        let class = o.class.name();
        if o.result >= 0 {
            self.reads.record(Read {
                ts: t.ts_boot_ns,
                seq: o.seq,
                path: o.path.clone(),
                class: o.class,
                tgid: t.tgid,
            });
        }
        let own_uid = w.pod_uid.as_deref();
        let exe = t.exe.as_deref().unwrap_or("");
        let exe_name = if exe.is_empty() {
            t.comm.as_str()
        } else {
            basename(exe)
        };

        // 1. Another pod's credential (the kubelet, a host process, reads every pod's).
        if let Some(owner) = o.owner.as_ref().and_then(|x| x.pod_uid.as_deref()) {
            if !w.host && own_uid.is_some_and(|u| u != owner) {
                let on = o.owner.as_ref();
                hits.push(Hit {
                    priority: None,
                    rule: FOREIGN_CREDENTIAL_READ,
                    details: Box::new(move || {
                        (
                            format!(
                                "Foreign credential read: {} read {class} of pod {}/{} at {}",
                                who(t),
                                on.and_then(|x| x.namespace.as_deref()).unwrap_or("-"),
                                on.and_then(|x| x.name.as_deref()).unwrap_or(owner),
                                o.path
                            ),
                            fields(),
                        )
                    }),
                    events: vec![o.seq],
                });
            }
        }
        // 6. Node credentials; another process's environment. Host processes too: on a
        // node these are how a node compromise shows, and on a dev box they are the rules a
        // newcomer sees fire first. The node's own agents read node credentials as their
        // job and are left out.
        let node_agent = w.host && self.config.node_agents.iter().any(|a| a == exe_name);
        match o.class {
            CredentialClass::NodeKubeconfig
            | CredentialClass::NodePki
            | CredentialClass::CloudCredentials
                if !node_agent =>
            {
                let from = if w.host {
                    "by a host process"
                } else {
                    "from a container"
                };
                hits.push(Hit {
                    priority: None,
                    rule: NODE_CREDENTIAL_READ,
                    details: Box::new(move || {
                        (
                            format!(
                                "Node credential read {from}: {} read {class} at {}",
                                who(t),
                                o.path
                            ),
                            fields(),
                        )
                    }),
                    events: vec![o.seq],
                });
            }
            CredentialClass::ProcEnviron => {
                let target = o.owner.as_ref().and_then(|x| x.pid);
                if target.is_some_and(|pid| pid != t.tgid) {
                    hits.push(Hit {
                        priority: None,
                        rule: PROC_ENVIRON_READ,
                        details: Box::new(move || {
                            (
                                format!(
                                    "Environment of another process read: {} read {}",
                                    who(t),
                                    o.path
                                ),
                                fields(),
                            )
                        }),
                        events: vec![o.seq],
                    });
                }
            }
            _ => {}
        }
        // The other rules judge pods: their readers, their policies, their baselines.
        if w.host {
            return;
        }
        // 2. The reader itself.
        let suspicious = self.config.suspicious_readers.iter().any(|s| s == exe_name);
        let off_policy = policy.is_some_and(|p| !p.allows_executable(exe));
        if suspicious || off_policy {
            let why = if suspicious {
                "a shell or file utility"
            } else {
                "an executable its policy does not name"
            };
            hits.push(Hit {
                priority: None,
                rule: UNEXPECTED_EXECUTABLE,
                details: Box::new(move || {
                    (
                        format!(
                            "Credential read by {why}: {} read {class} at {}",
                            who(t),
                            o.path
                        ),
                        fields(),
                    )
                }),
                events: vec![o.seq],
            });
        }
        // 2b. What was read: the policy's grants, when it lists any. Files that hold
        // nothing secret (`ca.crt`, `namespace`) are not credentials to grant.
        if o.class != CredentialClass::NonSecret
            && policy.and_then(|p| p.allows_credential(o.class, &[&o.path, &o.raw_path]))
                == Some(false)
        {
            hits.push(Hit {
                priority: None,
                rule: CREDENTIAL_NOT_ALLOWED,
                details: Box::new(move || {
                    (
                        format!(
                            "Credential read its policy does not grant: {} read {class} at {}",
                            who(t),
                            o.path
                        ),
                        fields(),
                    )
                }),
                events: vec![o.seq],
            });
        }
        // 7. Baseline: credential classes and the executables reading them.
        if let Some(window) = policy.and_then(CompiledPolicy::learning_window) {
            if let Some(agent) = w.agent.clone() {
                let win = window.as_nanos() as u64;
                for (kind, item) in [
                    ("credential class", class.to_owned()),
                    ("credential reader", exe.to_owned()),
                ] {
                    if self
                        .baselines
                        .observe(&agent, win, t.ts_boot_ns, kind, item.clone())
                    {
                        hits.push(Hit {
                            priority: None,
                            rule: BASELINE_DEVIATION,
                            details: Box::new(move || {
                                (
                                    format!(
                                        "Baseline deviation: {} shows a new {kind} {item}",
                                        who(t)
                                    ),
                                    fields(),
                                )
                            }),
                            events: vec![o.seq],
                        });
                    }
                }
            }
        }
    }
}
