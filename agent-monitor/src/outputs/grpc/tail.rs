//! A client: follow the anomaly (or event) stream and print it.

use std::{io::Write, path::PathBuf};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{convert, pb, pb::agent_monitor_client::AgentMonitorClient, GrpcError};
use crate::identity::Workload;

/// Client TLS: the CA that signed the server's certificate, and for mutual TLS the
/// client's certificate and key (PEM files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Name to verify the server certificate against; defaults to the endpoint's host.
    pub domain: Option<String>,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, GrpcError> {
    std::fs::read(path).map_err(|source| GrpcError::TlsFile {
        path: path.clone(),
        source,
    })
}

fn client_tls(tls: &ClientTls) -> Result<ClientTlsConfig, GrpcError> {
    let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => cfg = cfg.identity(Identity::from_pem(read(cert)?, read(key)?)),
        (None, None) => {}
        _ => {
            return Err(GrpcError::Config(
                "a client certificate needs its key and a key its certificate".into(),
            ))
        }
    }
    if let Some(domain) = &tls.domain {
        cfg = cfg.domain_name(domain.clone());
    }
    Ok(cfg)
}

/// A channel to `endpoint`: `http://host:port`, `https://host:port` (needs `tls`), a bare
/// `host:port` (https when `tls` is given), or `unix:/path` (plaintext: the socket's file
/// mode is its access control).
pub async fn channel(endpoint: &str, tls: Option<&ClientTls>) -> Result<Channel, GrpcError> {
    let uri = if endpoint.starts_with("unix:") || endpoint.contains("://") {
        endpoint.to_owned()
    } else if tls.is_some() {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    };
    let bad = |source| GrpcError::Endpoint {
        endpoint: endpoint.to_owned(),
        source,
    };
    let mut ep = Endpoint::from_shared(uri.clone()).map_err(bad)?;
    match (tls, uri.starts_with("https://")) {
        (Some(tls), true) => ep = ep.tls_config(client_tls(tls)?).map_err(GrpcError::Tls)?,
        (None, true) => {
            return Err(GrpcError::Config(format!(
                "{endpoint}: https needs a CA certificate"
            )))
        }
        (Some(_), false) => {
            return Err(GrpcError::Config(format!(
                "{endpoint}: TLS settings need an https:// endpoint"
            )))
        }
        (None, false) => {}
    }
    ep.connect().await.map_err(|source| GrpcError::Connect {
        endpoint: endpoint.to_owned(),
        source,
    })
}

/// A client of the `AgentMonitor` service at `endpoint` (see [`channel`]).
pub async fn connect(
    endpoint: &str,
    tls: Option<&ClientTls>,
) -> Result<AgentMonitorClient<Channel>, GrpcError> {
    Ok(AgentMonitorClient::new(channel(endpoint, tls).await?))
}

/// Follows the anomaly stream (or, with `events`, the event stream) at `endpoint` and
/// prints each item to stdout: a table, or with `json` one JSON object per line (the same
/// objects the daemon's JSON-lines output writes). Gap notices go to stderr. Returns when
/// the server ends the stream.
pub async fn tail(
    endpoint: String,
    events: bool,
    filter: pb::Filter,
    json: bool,
    tls: Option<ClientTls>,
) -> Result<(), GrpcError> {
    let mut client = connect(&endpoint, tls.as_ref()).await?;
    let mut printer = Printer {
        out: std::io::stdout(),
        json,
        header: false,
    };
    let kind = if events { "events" } else { "anomalies" };
    let gap = |missed: u64| {
        eprintln!(
            "agent-monitor: this client read too slowly; the server dropped {missed} {kind} for it"
        );
    };
    if events {
        let mut stream = client.stream_events(filter).await?.into_inner();
        while let Some(msg) = stream.message().await? {
            use pb::stream_events_response::Item;
            match msg.item {
                Some(Item::Event(e)) => printer.event(&e)?,
                Some(Item::Gap(g)) => gap(g.missed),
                None => {}
            }
        }
    } else {
        let mut stream = client.stream_anomalies(filter).await?.into_inner();
        while let Some(msg) = stream.message().await? {
            use pb::stream_anomalies_response::Item;
            match msg.item {
                Some(Item::Anomaly(a)) => printer.anomaly(&a)?,
                Some(Item::Gap(g)) => gap(g.missed),
                None => {}
            }
        }
    }
    Ok(())
}

struct Printer<W: Write> {
    out: W,
    json: bool,
    header: bool,
}

impl<W: Write> Printer<W> {
    fn line(&mut self, header: &str, line: &str) -> Result<(), GrpcError> {
        if !self.json && !self.header {
            writeln!(self.out, "{header}")?;
            self.header = true;
        }
        writeln!(self.out, "{line}")?;
        self.out.flush()?;
        Ok(())
    }

    fn anomaly(&mut self, a: &pb::Anomaly) -> Result<(), GrpcError> {
        let line = if self.json {
            anomaly_json(a)?
        } else {
            anomaly_row(a)
        };
        self.line(&anomaly_header(), &line)
    }

    fn event(&mut self, e: &pb::Event) -> Result<(), GrpcError> {
        let line = if self.json {
            event_json(e)?
        } else {
            event_row(e)
        };
        self.line(&event_header(), &line)
    }
}

fn anomaly_json(a: &pb::Anomaly) -> Result<String, GrpcError> {
    let v =
        crate::outputs::protojson::anomaly(a).map_err(|e| GrpcError::Malformed(e.to_string()))?;
    Ok(v.to_string())
}

fn event_json(e: &pb::Event) -> Result<String, GrpcError> {
    let v = crate::outputs::protojson::event(e).map_err(|e| GrpcError::Malformed(e.to_string()))?;
    Ok(v.to_string())
}

/// Millisecond RFC 3339, or `-`.
fn short_time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(|t| std::time::SystemTime::try_from(*t).ok())
        .map(|t| humantime::format_rfc3339_millis(t).to_string())
        .unwrap_or_else(|| "-".into())
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn where_(w: Option<&pb::Workload>) -> String {
    let Some(w) = w else {
        return "-".into();
    };
    let w = Workload::from(w);
    match (&w.namespace, &w.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        (None, Some(pod)) => pod.clone(),
        _ if w.host => "(host)".into(),
        _ => w.pod_uid.clone().unwrap_or_else(|| "-".into()),
    }
}

fn anomaly_header() -> String {
    format!(
        "{:<24} {:<13} {:<37} {:<32} {:<16} OUTPUT",
        "TIME", "PRIORITY", "RULE", "NAMESPACE/POD", "AGENT"
    )
}

fn anomaly_row(a: &pb::Anomaly) -> String {
    let priority = convert::priority_from_pb(a.priority())
        .map(convert::priority_name)
        .unwrap_or("-");
    format!(
        "{:<24} {:<13} {:<37} {:<32} {:<16} {}",
        short_time(a.time.as_ref()),
        priority,
        a.rule,
        where_(a.workload.as_ref()),
        or_dash(a.workload.as_ref().map_or("", |w| w.agent.as_str())),
        a.output
    )
}

fn event_header() -> String {
    format!(
        "{:<24} {:<8} {:<32} {:<16} {:<24} DETAIL",
        "TIME", "TYPE", "NAMESPACE/POD", "AGENT", "PROCESS"
    )
}

fn event_row(e: &pb::Event) -> String {
    use pb::event::Kind;
    let (kind, detail, time) = match &e.kind {
        Some(Kind::Open(o)) => (
            "open",
            format!(
                "{} {} -> {}{}",
                o.syscall,
                o.path,
                o.result,
                o.error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ),
            None,
        ),
        Some(Kind::Connect(c)) => (
            "connect",
            format!(
                "{} {} {}:{} -> {}{}",
                c.syscall,
                c.family,
                c.dst_addr,
                c.dst_port,
                c.result,
                c.error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ),
            None,
        ),
        Some(Kind::Exec(x)) => ("exec", x.filename.clone(), None),
        Some(Kind::Fork(f)) => ("fork", format!("child {}", f.child_pid), None),
        Some(Kind::Exit(_)) => ("exit", String::new(), None),
        Some(Kind::Lost(l)) => (
            "lost",
            format!("lane {}: {} lost ({} total)", l.lane, l.count, l.total),
            l.time.as_ref(),
        ),
        None => ("?", String::new(), None),
    };
    let process = e
        .process
        .as_ref()
        .map(|p| format!("{}({})", p.comm, p.tgid))
        .unwrap_or_else(|| "-".into());
    let time = time.or(e.process.as_ref().and_then(|p| p.time.as_ref()));
    format!(
        "{:<24} {:<8} {:<32} {:<16} {:<24} {}",
        short_time(time),
        kind,
        where_(e.workload.as_ref()),
        or_dash(e.workload.as_ref().map_or("", |w| w.agent.as_str())),
        process,
        detail
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anomaly() -> pb::Anomaly {
        pb::Anomaly {
            seq: 1,
            time: convert::timestamp("2026-11-23T08:00:01.250Z"),
            rule: "cloud-metadata-contact".into(),
            priority: pb::Priority::Error as i32,
            output: "coder contacted 169.254.169.254:80".into(),
            tags: vec!["k8s".into()],
            workload: Some(pb::Workload {
                namespace: "agents".into(),
                pod: "coder-0".into(),
                agent: "coder".into(),
                ..Default::default()
            }),
            fields: [("fd.sport".to_owned(), "80".to_owned())].into(),
            event_seqs: vec![4],
        }
    }

    #[test]
    fn anomaly_prints_as_row_and_json() {
        let row = anomaly_row(&anomaly());
        assert!(row.starts_with("2026-11-23T08:00:01.250Z "), "{row}");
        for part in [
            " Error ",
            " cloud-metadata-contact ",
            " agents/coder-0 ",
            " coder ",
            "coder contacted 169.254.169.254:80",
        ] {
            assert!(row.contains(part), "{part:?} not in {row:?}");
        }
        let json: serde_json::Value =
            serde_json::from_str(&anomaly_json(&anomaly()).expect("json")).expect("parse");
        // The proto3 JSON form of agent_monitor.v1.Anomaly: enum by name, map values as
        // the strings the proto carries (JSON-encoded field values).
        assert_eq!(json["priority"], "PRIORITY_ERROR");
        assert_eq!(json["rule"], "cloud-metadata-contact");
        assert_eq!(json["fields"]["fd.sport"], "80");
        assert_eq!(json["workload"]["namespace"], "agents");
    }

    #[test]
    fn printer_writes_header_once_for_tables_only() {
        let mut p = Printer {
            out: Vec::new(),
            json: false,
            header: false,
        };
        p.anomaly(&anomaly()).expect("print");
        p.anomaly(&anomaly()).expect("print");
        let text = String::from_utf8(p.out).expect("utf8");
        assert_eq!(text.lines().count(), 3);
        assert!(text.starts_with("TIME"));

        let mut p = Printer {
            out: Vec::new(),
            json: true,
            header: false,
        };
        p.anomaly(&anomaly()).expect("print");
        let text = String::from_utf8(p.out).expect("utf8");
        assert_eq!(text.lines().count(), 1);
        assert!(text.starts_with('{'));
    }

    #[test]
    fn lost_event_row_has_no_process() {
        let e = pb::Event {
            seq: 3,
            process: None,
            workload: None,
            kind: Some(pb::event::Kind::Lost(pb::Lost {
                lane: "network".into(),
                count: 2,
                total: 7,
                time: convert::timestamp("2026-11-23T00:00:00Z"),
            })),
        };
        let row = event_row(&e);
        assert!(row.contains("lost") && row.contains("lane network: 2 lost (7 total)"));
        assert!(row.starts_with("2026-11-23T00:00:00.000Z"), "{row}");
        let json: serde_json::Value =
            serde_json::from_str(&event_json(&e).expect("json")).expect("parse");
        // The proto3 JSON form: the oneof member by name, uint64 as a string.
        assert_eq!(json["lost"]["lane"], "network");
        assert_eq!(json["lost"]["total"], "7");
    }
}
