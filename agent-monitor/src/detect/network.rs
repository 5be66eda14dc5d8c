//! Rules on connects: egress outside the allowlist, cloud metadata, API-server contact,
//! exfiltration (a credential read followed by egress from the same process tree).

use std::net::IpAddr;

use serde_json::json;

use super::{
    fields::*, Engine, Hit, API_SERVER_NOT_ALLOWED, BASELINE_DEVIATION, CLOUD_METADATA,
    EGRESS_OUTSIDE_ALLOWLIST, EXFILTRATION,
};
use crate::{
    events::ConnectRecord,
    identity::Workload,
    policy::{matching::CompiledPolicy, DestinationClass, Tier},
};

impl Engine {
    /// The destination classes allowed when a policy does not list any.
    fn default_allows(tier: Option<Tier>, class: DestinationClass, has_policy: bool) -> bool {
        match class {
            DestinationClass::Dns | DestinationClass::Cluster | DestinationClass::Loopback => true,
            // Without a policy nothing says the workload may not talk to the API server.
            DestinationClass::ApiServer => {
                tier == Some(Tier::Proxy) || (!has_policy && tier != Some(Tier::Worker))
            }
            DestinationClass::Metadata | DestinationClass::External => false,
        }
    }

    fn tier_of(policy: Option<&CompiledPolicy>, w: &Workload) -> Option<Tier> {
        policy
            .and_then(CompiledPolicy::tier)
            .or(match w.tier.as_deref() {
                Some("proxy") => Some(Tier::Proxy),
                Some("worker") => Some(Tier::Worker),
                _ => None,
            })
    }

    fn egress_allowed(
        policy: Option<&CompiledPolicy>,
        w: &Workload,
        class: DestinationClass,
        ip: IpAddr,
        port: u16,
    ) -> bool {
        let tier = Self::tier_of(policy, w);
        match policy.and_then(|p| p.egress_allows(class, ip, port)) {
            Some(allowed) => allowed,
            None => Self::default_allows(tier, class, policy.is_some()),
        }
    }

    pub(super) fn on_connect<'r>(
        &mut self,
        c: &'r ConnectRecord,
        policy: Option<&CompiledPolicy>,
        hits: &mut Vec<Hit<'r>>,
    ) {
        let t = &c.task;
        let w = &t.workload;
        if !c.attempted || w.host {
            return;
        }
        let Ok(ip) = c.dst_addr.parse::<IpAddr>() else {
            return;
        };
        let class = self.config.destinations.classify(ip, c.dst_port);
        let class_name = class.name();
        // Built only for a hit: most connects raise nothing, and the fields are a map of
        // a dozen owned strings.
        let fields = move || {
            let mut fields = task_fields(t);
            fields.insert("fd.sip".into(), json!(c.dst_addr));
            fields.insert("fd.sport".into(), json!(c.dst_port));
            fields.insert("agent.destination.class".into(), json!(class_name));
            fields.insert("evt.type".into(), json!(c.syscall));
            fields
        };
        let dest = move || format!("{}:{} ({class_name})", c.dst_addr, c.dst_port);
        let allowed = Self::egress_allowed(policy, w, class, ip, c.dst_port);

        // Data sent on a socket connected earlier: the connection was judged when it was
        // made; the send matters only for the read-then-send correlation below.
        let new_destination = c.syscall != "send";
        if new_destination && class == DestinationClass::Metadata && !allowed {
            hits.push(Hit {
                priority: None,
                rule: CLOUD_METADATA,
                details: Box::new(move || {
                    (
                        format!("Cloud metadata contact: {} connected to {}", who(t), dest()),
                        fields(),
                    )
                }),
                events: vec![c.seq],
            });
        }
        if new_destination && class == DestinationClass::ApiServer && !allowed {
            let tier = Self::tier_of(policy, w).map_or("-", |t| {
                if t == Tier::Proxy {
                    "proxy"
                } else {
                    "worker"
                }
            });
            hits.push(Hit {
                priority: None,
                rule: API_SERVER_NOT_ALLOWED,
                details: Box::new(move || {
                    (
                        format!(
                            "API server contact not allowed for tier {tier}: {} connected to {}",
                            who(t),
                            dest()
                        ),
                        fields(),
                    )
                }),
                events: vec![c.seq],
            });
        }
        if new_destination
            && policy.is_some()
            && !allowed
            && !matches!(
                class,
                DestinationClass::Metadata | DestinationClass::ApiServer
            )
        {
            hits.push(Hit {
                priority: None,
                rule: EGRESS_OUTSIDE_ALLOWLIST,
                details: Box::new(move || {
                    (
                        format!(
                            "Egress outside the allowlist: {} connected to {}",
                            who(t),
                            dest()
                        ),
                        fields(),
                    )
                }),
                events: vec![c.seq],
            });
        }
        // 3. A credential read shortly before, anywhere up the process tree.
        if !allowed {
            let window = self.config.exfil_window.as_nanos() as u64;
            let ancestry = self.parents.ancestry(t.tgid);
            if let Some(read) = self.reads.recent(&ancestry, t.ts_boot_ns, window).cloned() {
                let events = vec![read.seq, c.seq];
                hits.push(Hit {
                    priority: None,
                    rule: EXFILTRATION,
                    details: Box::new(move || {
                        let ms = (t.ts_boot_ns - read.ts) / 1_000_000;
                        let mut f = fields();
                        f.insert("fd.name".into(), json!(read.path));
                        f.insert("agent.credential.class".into(), json!(read.class));
                        f.insert("agent.reader.pid".into(), json!(read.tgid));
                        f.insert("agent.read_to_connect_ms".into(), json!(ms));
                        let output = format!(
                            "Credential read then egress outside the allowlist: {} connected to {} {ms} ms after pid {} read {}",
                            who(t),
                            dest(),
                            read.tgid,
                            read.path
                        );
                        (output, f)
                    }),
                    events,
                });
            }
        }
        if let Some(window) = policy.and_then(CompiledPolicy::learning_window) {
            if let Some(agent) = w.agent.clone() {
                if self.baselines.observe(
                    &agent,
                    window.as_nanos() as u64,
                    t.ts_boot_ns,
                    "destination class",
                    class_name.to_owned(),
                ) {
                    hits.push(Hit {
                        priority: None,
                        rule: BASELINE_DEVIATION,
                        details: Box::new(move || {
                            (format!("Baseline deviation: {} shows a new destination class {class_name} ({})", who(t), dest()), fields())
                        }),
                        events: vec![c.seq],
                    });
                }
            }
        }
    }
}
