//! A client: follow the anomaly (or event) stream and print it.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::GrpcError;
use crate::{
    api::{self, pb, pb::agent_monitor_client::AgentMonitorClient},
    identity::Workload,
};

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

/// How `tail` prints each item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// One short line per item: time, priority and rule (or event kind), namespace/pod,
    /// process, and what it did.
    #[default]
    Compact,
    /// Wide aligned columns under a header line.
    Table,
    /// One JSON object per line: the proto3 JSON form the daemon's JSON-lines output writes.
    Json,
}

/// Kinds of events, for `--kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EventKind {
    Open,
    Connect,
    Exec,
    Fork,
    Exit,
    Lost,
}

impl EventKind {
    /// The API's name for this kind (for `Filter.kinds`).
    pub fn to_pb(self) -> pb::EventKind {
        match self {
            Self::Open => pb::EventKind::Open,
            Self::Connect => pb::EventKind::Connect,
            Self::Exec => pb::EventKind::Exec,
            Self::Fork => pb::EventKind::Fork,
            Self::Exit => pb::EventKind::Exit,
            Self::Lost => pb::EventKind::Lost,
        }
    }
}

/// A Falco priority as people write it: any case, Falco's names (`emergency` .. `debug`)
/// and the short forms `info`, `warn`, `err`, `crit`, `emerg`.
pub fn parse_priority(s: &str) -> Option<crate::policy::Priority> {
    use crate::policy::Priority;
    Some(match s.trim().to_ascii_lowercase().as_str() {
        "emergency" | "emerg" => Priority::Emergency,
        "alert" => Priority::Alert,
        "critical" | "crit" => Priority::Critical,
        "error" | "err" => Priority::Error,
        "warning" | "warn" => Priority::Warning,
        "notice" => Priority::Notice,
        "informational" | "info" => Priority::Informational,
        "debug" => Priority::Debug,
        _ => return None,
    })
}

/// What to follow and how to print it.
#[derive(Debug, Clone, Default)]
pub struct TailOptions {
    /// See [`channel`].
    pub endpoint: String,
    /// Events instead of anomalies.
    pub events: bool,
    /// The server-side filter.
    pub filter: pb::Filter,
    pub format: OutputFormat,
    pub tls: Option<ClientTls>,
    /// Keep the position (the last item's run id and sequence number) in this file and
    /// resume after the one it holds, if any.
    pub resume: Option<PathBuf>,
}

/// How often, at most, the position file is rewritten while events stream in (anomalies:
/// after each one). A tail killed with SIGKILL prints again at most this much on resume.
const POSITION_SAVE_INTERVAL: Duration = Duration::from_millis(200);

/// The position `tail --resume` keeps: the last item printed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Position {
    /// `events` or `anomalies`: a position of one stream means nothing in the other.
    stream: String,
    run_id: String,
    seq: u64,
}

/// The position file of `tail --resume`.
struct PositionFile {
    path: PathBuf,
    stream: &'static str,
    current: Option<Position>,
    dirty: bool,
    saved_at: Instant,
}

impl PositionFile {
    /// Reads the position in `path`; none when the file does not exist yet.
    fn open(path: &Path, stream: &'static str) -> Result<Self, GrpcError> {
        let bad = |why: String| {
            GrpcError::Config(format!("resume position file {}: {why}", path.display()))
        };
        let current = match std::fs::read(path) {
            Ok(bytes) => {
                let p: Position = serde_json::from_slice(&bytes).map_err(|e| {
                    bad(format!(
                        "not a position this tail wrote ({e}); remove it to start from now"
                    ))
                })?;
                if p.stream != stream {
                    return Err(bad(format!(
                        "holds a position in the {} stream, not the {stream} stream",
                        p.stream
                    )));
                }
                Some(p)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(bad(e.to_string())),
        };
        Ok(Self {
            path: path.to_owned(),
            stream,
            current,
            dirty: false,
            saved_at: Instant::now(),
        })
    }

    fn cursor(&self) -> Option<pb::Cursor> {
        self.current.as_ref().map(|p| pb::Cursor {
            run_id: p.run_id.clone(),
            seq: p.seq,
        })
    }

    fn advance(&mut self, run_id: &str, seq: u64) {
        self.current = Some(Position {
            stream: self.stream.to_owned(),
            run_id: run_id.to_owned(),
            seq,
        });
        self.dirty = true;
    }

    /// Writes the position (to a temporary file renamed over the old one, so a crash
    /// leaves the old or the new position, never half of one).
    fn save(&mut self) -> Result<(), GrpcError> {
        let Some(p) = self.current.as_ref().filter(|_| self.dirty) else {
            return Ok(());
        };
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, serde_json::to_vec(p).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| {
            GrpcError::Config(format!(
                "cannot save the resume position to {}: {e}",
                self.path.display()
            ))
        })?;
        self.dirty = false;
        self.saved_at = Instant::now();
        Ok(())
    }

    fn save_soon(&mut self) -> Result<(), GrpcError> {
        if self.saved_at.elapsed() >= POSITION_SAVE_INTERVAL {
            self.save()?;
        }
        Ok(())
    }
}

/// Follows the anomaly stream (or, with `events`, the event stream) and prints each item
/// to stdout in `format`. Gap notices go to stderr. Returns when the server ends the
/// stream, or quietly when stdout is closed (`tail | head`).
pub async fn tail(opts: TailOptions) -> Result<(), GrpcError> {
    match follow(opts).await {
        // The reader went away: what it wanted has been printed.
        Err(GrpcError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// What a gap notice says.
fn gap_text(g: &pb::Gap, kind: &str) -> String {
    let n = if g.at_least {
        format!("at least {}", g.missed)
    } else {
        g.missed.to_string()
    };
    match g.reason() {
        pb::GapReason::Expired => format!(
            "{n} {kind} after the resume point are no longer in the daemon's journal (retention deleted them)"
        ),
        pb::GapReason::NotJournaled => {
            format!("{n} {kind} never reached the daemon's journal (its queue was full, or a damaged stretch)")
        }
        pb::GapReason::SlowClient | pb::GapReason::Unspecified => {
            format!("this client read too slowly; the server dropped {n} {kind} for it")
        }
    }
}

async fn follow(opts: TailOptions) -> Result<(), GrpcError> {
    let kind = if opts.events { "events" } else { "anomalies" };
    let mut position = opts
        .resume
        .as_deref()
        .map(|p| PositionFile::open(p, kind))
        .transpose()?;
    let resume_after = position.as_ref().and_then(PositionFile::cursor);
    let mut client = connect(&opts.endpoint, opts.tls.as_ref()).await?;
    let mut printer = Printer {
        out: std::io::stdout(),
        format: opts.format,
        header: false,
    };
    let filter = Some(opts.filter);
    // Ctrl-C or SIGTERM end the tail after saving the position.
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| GrpcError::Config(format!("SIGTERM handler: {e}")))?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<(), GrpcError>(())
    };
    let run = async {
        if opts.events {
            let request = pb::StreamEventsRequest {
                filter,
                resume_after,
            };
            let mut stream = client.stream_events(request).await?.into_inner();
            while let Some(msg) = stream.message().await? {
                use pb::stream_events_response::Item;
                match msg.item {
                    Some(Item::Event(e)) => {
                        printer.event(&e)?;
                        if let Some(p) = position.as_mut() {
                            p.advance(&e.run_id, e.seq);
                            p.save_soon()?;
                        }
                    }
                    Some(Item::Gap(g)) => eprintln!("agent-monitor: {}", gap_text(&g, kind)),
                    None => {}
                }
            }
        } else {
            let request = pb::StreamAnomaliesRequest {
                filter,
                resume_after,
            };
            let mut stream = client.stream_anomalies(request).await?.into_inner();
            while let Some(msg) = stream.message().await? {
                use pb::stream_anomalies_response::Item;
                match msg.item {
                    Some(Item::Anomaly(a)) => {
                        printer.anomaly(&a)?;
                        if let Some(p) = position.as_mut() {
                            p.advance(&a.run_id, a.seq);
                            p.save()?;
                        }
                    }
                    Some(Item::Gap(g)) => eprintln!("agent-monitor: {}", gap_text(&g, kind)),
                    None => {}
                }
            }
        }
        Ok::<(), GrpcError>(())
    };
    let result = tokio::select! {
        r = run => r,
        r = stop => r,
    };
    // Whatever ended the tail, the last item printed is the position.
    if let Some(p) = position.as_mut() {
        p.save()?;
    }
    result
}

struct Printer<W: Write> {
    out: W,
    format: OutputFormat,
    header: bool,
}

impl<W: Write> Printer<W> {
    fn line(&mut self, header: &str, line: &str) -> Result<(), GrpcError> {
        if self.format == OutputFormat::Table && !self.header {
            writeln!(self.out, "{header}")?;
            self.header = true;
        }
        writeln!(self.out, "{line}")?;
        self.out.flush()?;
        Ok(())
    }

    fn anomaly(&mut self, a: &pb::Anomaly) -> Result<(), GrpcError> {
        let line = match self.format {
            OutputFormat::Json => anomaly_json(a)?,
            OutputFormat::Table => anomaly_row(a),
            OutputFormat::Compact => anomaly_compact(a),
        };
        self.line(&anomaly_header(), &line)
    }

    fn event(&mut self, e: &pb::Event) -> Result<(), GrpcError> {
        let line = match self.format {
            OutputFormat::Json => event_json(e)?,
            OutputFormat::Table => event_row(e),
            OutputFormat::Compact => event_compact(e),
        };
        self.line(&event_header(), &line)
    }
}

fn anomaly_json(a: &pb::Anomaly) -> Result<String, GrpcError> {
    let v = api::json::anomaly(a).map_err(|e| GrpcError::Malformed(e.to_string()))?;
    Ok(v.to_string())
}

fn event_json(e: &pb::Event) -> Result<String, GrpcError> {
    let v = api::json::event(e).map_err(|e| GrpcError::Malformed(e.to_string()))?;
    Ok(v.to_string())
}

/// Millisecond RFC 3339, or `-`.
fn short_time(ts: Option<&agent_monitor_api::wkt::Timestamp>) -> String {
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
    let priority = api::priority_from_pb(a.priority())
        .map(api::priority_name)
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
    let (kind, detail) = match &e.kind {
        Some(Kind::Open(o)) => (
            "open",
            format!(
                "{} {} -> {}{}",
                api::syscall_name(o.syscall()),
                o.path,
                o.result,
                failure(o.error.as_ref())
            ),
        ),
        Some(Kind::Connect(c)) => (
            "connect",
            format!(
                "{} {} {}:{} -> {}{}",
                api::syscall_name(c.syscall()),
                api::family_name(c.family()),
                c.dst_addr,
                c.dst_port,
                c.result,
                failure(c.error.as_ref())
            ),
        ),
        Some(Kind::Exec(x)) => ("exec", x.filename.clone()),
        Some(Kind::Fork(f)) => ("fork", format!("child {}", f.child_pid)),
        Some(Kind::Exit(_)) => ("exit", String::new()),
        Some(Kind::Lost(l)) => (
            "lost",
            format!(
                "lane {}: {} lost ({} total)",
                api::lane_name(l.lane()),
                l.count,
                l.total
            ),
        ),
        None => ("?", String::new()),
    };
    let process = process_label(e);
    let time = e.time.as_ref();
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

/// `HH:MM:SS.mmmZ`: the time of day in UTC (a live stream needs no date).
fn clock_time(ts: Option<&agent_monitor_api::wkt::Timestamp>) -> String {
    let full = short_time(ts);
    match full.split_once('T') {
        Some((_, time)) => time.to_owned(),
        None => full,
    }
}

/// A Falco output field of an anomaly as text; none for a missing or null field.
fn field(a: &pb::Anomaly, key: &str) -> Option<String> {
    use agent_monitor_api::wkt::value::Kind;
    match a.fields.as_ref()?.fields.get(key)?.kind.as_ref()? {
        Kind::NullValue(_) => None,
        Kind::StringValue(s) => Some(s.clone()),
        Kind::BoolValue(b) => Some(b.to_string()),
        Kind::NumberValue(n) => Some(
            // Whole numbers (pids, ports) without a fraction.
            if n.fract() == 0.0 && n.abs() < 1e15 {
                format!("{n:.0}")
            } else {
                n.to_string()
            },
        ),
        Kind::ListValue(_) | Kind::StructValue(_) => {
            Some(api::value_from_pb(a.fields.as_ref()?.fields.get(key)?).to_string())
        }
    }
}

/// `addr:port`, with brackets around an IPv6 address.
fn host_port(addr: &str, port: impl std::fmt::Display) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// One short line: `time priority rule ns/pod process what`, where `what` is the file
/// and/or destination the alert is about, or its output text when it names neither.
fn anomaly_compact(a: &pb::Anomaly) -> String {
    compact(a, clock_time(a.time.as_ref()))
}

/// The compact line of an anomaly with its full date (`replay` prints the past, where the
/// time of day alone is ambiguous).
pub fn anomaly_line(a: &pb::Anomaly) -> String {
    compact(a, short_time(a.time.as_ref()))
}

/// `time priority rule ns/pod process what`.
fn compact(a: &pb::Anomaly, time: String) -> String {
    let priority = api::priority_from_pb(a.priority())
        .map(api::priority_name)
        .unwrap_or("-");
    let process = match (field(a, "proc.name"), field(a, "proc.pid")) {
        (Some(name), Some(pid)) => format!("{name}({pid})"),
        (Some(name), None) => name,
        _ => "-".to_owned(),
    };
    let mut what = Vec::new();
    if let Some(path) = field(a, "fd.name") {
        what.push(path);
    }
    if let Some(ip) = field(a, "fd.sip") {
        what.push(host_port(
            &ip,
            field(a, "fd.sport").unwrap_or_else(|| "?".into()),
        ));
    }
    let what = if what.is_empty() {
        a.output.clone()
    } else {
        what.join(" -> ")
    };
    format!(
        "{} {:<8} {} {} {} {}",
        time,
        priority,
        a.rule,
        where_(a.workload.as_ref()),
        process,
        what
    )
}

/// `comm(pid)` of the event's process, or `-` (a loss report has none).
fn process_label(e: &pb::Event) -> String {
    e.process
        .as_ref()
        .map(|p| format!("{}({})", p.comm, p.tgid))
        .unwrap_or_else(|| "-".into())
}

/// ` (ENOENT)` for a failed call, nothing for a successful one.
fn failure(error: Option<&String>) -> String {
    error.map(|e| format!(" ({e})")).unwrap_or_default()
}

/// One short line: `time kind ns/pod process what`.
fn event_compact(e: &pb::Event) -> String {
    use pb::event::Kind;
    let (kind, what) = match &e.kind {
        Some(Kind::Open(o)) => ("open", format!("{}{}", o.path, failure(o.error.as_ref()))),
        Some(Kind::Connect(c)) => (
            "connect",
            format!(
                "{}{}",
                host_port(&c.dst_addr, c.dst_port),
                failure(c.error.as_ref())
            ),
        ),
        Some(Kind::Exec(x)) => ("exec", x.filename.clone()),
        Some(Kind::Fork(f)) => ("fork", format!("child {}", f.child_pid)),
        Some(Kind::Exit(_)) => ("exit", String::new()),
        Some(Kind::Lost(l)) => (
            "lost",
            format!(
                "{} {} records ({} in all)",
                l.count,
                api::lane_name(l.lane()),
                l.total
            ),
        ),
        None => ("?", String::new()),
    };
    let process = process_label(e);
    let time = e.time.as_ref();
    let line = format!(
        "{} {:<7} {} {} {}",
        clock_time(time),
        kind,
        where_(e.workload.as_ref()),
        process,
        what
    );
    line.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(pairs: &[(&str, serde_json::Value)]) -> Option<agent_monitor_api::wkt::Struct> {
        Some(api::fields_to_pb(
            &pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        ))
    }

    fn anomaly() -> pb::Anomaly {
        pb::Anomaly {
            seq: 1,
            time: api::timestamp("2026-11-23T08:00:01.250Z"),
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
            fields: fields(&[("fd.sport", json!(80))]),
            event_seqs: vec![4],
            run_id: "run-1".into(),
            node: "node-a".into(),
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
        // Fields are a google.protobuf.Struct: a plain JSON object with typed values.
        assert_eq!(json["fields"]["fd.sport"], 80.0);
        assert_eq!(json["run_id"], "run-1");
        assert_eq!(json["workload"]["namespace"], "agents");
    }

    #[test]
    fn printer_writes_header_once_for_tables_only() {
        let mut p = Printer {
            out: Vec::new(),
            format: OutputFormat::Table,
            header: false,
        };
        p.anomaly(&anomaly()).expect("print");
        p.anomaly(&anomaly()).expect("print");
        let text = String::from_utf8(p.out).expect("utf8");
        assert_eq!(text.lines().count(), 3);
        assert!(text.starts_with("TIME"));

        let mut p = Printer {
            out: Vec::new(),
            format: OutputFormat::Json,
            header: false,
        };
        p.anomaly(&anomaly()).expect("print");
        let text = String::from_utf8(p.out).expect("utf8");
        assert_eq!(text.lines().count(), 1);
        assert!(text.starts_with('{'));
    }

    #[test]
    fn lost_event_row_has_no_process() {
        let e = lost();
        let row = event_row(&e);
        assert!(row.contains("lost") && row.contains("lane network: 2 lost (7 total)"));
        assert!(row.starts_with("2026-11-23T00:00:00.000Z"), "{row}");
        let json: serde_json::Value =
            serde_json::from_str(&event_json(&e).expect("json")).expect("parse");
        // The proto3 JSON form: the oneof member by name, uint64 as a string.
        assert_eq!(json["lost"]["lane"], "LANE_NETWORK");
        assert_eq!(json["lost"]["total"], "7");
    }

    fn lost() -> pb::Event {
        pb::Event {
            seq: 3,
            time: api::timestamp("2026-11-23T00:00:00Z"),
            kind: Some(pb::event::Kind::Lost(pb::Lost {
                lane: pb::Lane::Network as i32,
                count: 2,
                total: 7,
                reason: pb::LostReason::RingFull as i32,
            })),
            ..Default::default()
        }
    }

    fn process(comm: &str, tgid: u32) -> Option<pb::Process> {
        Some(pb::Process {
            pid: tgid,
            tgid,
            comm: comm.into(),
            ..Default::default()
        })
    }

    #[test]
    fn compact_anomaly_is_one_short_line() {
        let mut a = anomaly();
        a.fields = fields(&[
            ("proc.name", json!("curl")),
            ("proc.pid", json!(4242)),
            ("fd.sip", json!("169.254.169.254")),
            ("fd.sport", json!(80)),
        ]);
        assert_eq!(
            anomaly_compact(&a),
            "08:00:01.250Z Error    cloud-metadata-contact agents/coder-0 curl(4242) 169.254.169.254:80"
        );

        // Read then egress: the file and the destination.
        a.rule = "credential-exfiltration".into();
        a.priority = pb::Priority::Critical as i32;
        a.fields = fields(&[
            ("proc.name", json!("curl")),
            ("proc.pid", json!(4242)),
            ("fd.name", json!("/var/run/secrets/token")),
            ("fd.sip", json!("fd00::1")),
            ("fd.sport", json!(443)),
        ]);
        assert_eq!(
            anomaly_compact(&a),
            "08:00:01.250Z Critical credential-exfiltration agents/coder-0 curl(4242) /var/run/secrets/token -> [fd00::1]:443"
        );

        // No process, file or destination (a loss or rate-limit notice): the output text.
        let notice = pb::Anomaly {
            rule: "monitor-events-lost".into(),
            priority: pb::Priority::Critical as i32,
            output: "Events lost: 12 in lane network".into(),
            workload: None,
            fields: None,
            ..anomaly()
        };
        assert_eq!(
            anomaly_compact(&notice),
            "08:00:01.250Z Critical monitor-events-lost - - Events lost: 12 in lane network"
        );
    }

    #[test]
    fn compact_events_are_one_short_line_each() {
        let workload = Some(pb::Workload {
            namespace: "agents".into(),
            pod: "coder-0".into(),
            ..Default::default()
        });
        let event = |kind| pb::Event {
            seq: 1,
            process: process("cat", 77),
            workload: workload.clone(),
            time: api::timestamp("2026-11-23T08:00:02.5Z"),
            kind: Some(kind),
            ..Default::default()
        };
        let cases = [
            (
                pb::event::Kind::Open(pb::CredentialAccess {
                    path: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
                    result: 3,
                    ..Default::default()
                }),
                "08:00:02.500Z open    agents/coder-0 cat(77) /var/run/secrets/kubernetes.io/serviceaccount/token",
            ),
            (
                pb::event::Kind::Open(pb::CredentialAccess {
                    path: "/root/.aws/credentials".into(),
                    result: -2,
                    error: Some("ENOENT".into()),
                    ..Default::default()
                }),
                "08:00:02.500Z open    agents/coder-0 cat(77) /root/.aws/credentials (ENOENT)",
            ),
            (
                pb::event::Kind::Connect(pb::Connect {
                    dst_addr: "10.0.0.1".into(),
                    dst_port: 443,
                    ..Default::default()
                }),
                "08:00:02.500Z connect agents/coder-0 cat(77) 10.0.0.1:443",
            ),
            (
                pb::event::Kind::Exec(pb::Exec {
                    filename: "/usr/bin/cat".into(),
                    old_pid: 77,
                }),
                "08:00:02.500Z exec    agents/coder-0 cat(77) /usr/bin/cat",
            ),
            (
                pb::event::Kind::Fork(pb::Fork { child_pid: 78 }),
                "08:00:02.500Z fork    agents/coder-0 cat(77) child 78",
            ),
            (
                pb::event::Kind::Exit(pb::Exit {}),
                "08:00:02.500Z exit    agents/coder-0 cat(77)",
            ),
        ];
        for (kind, want) in cases {
            assert_eq!(event_compact(&event(kind)), want);
        }
        assert_eq!(
            event_compact(&lost()),
            "00:00:00.000Z lost    - - 2 network records (7 in all)"
        );
    }

    #[test]
    fn compact_is_the_default_and_has_no_header() {
        assert_eq!(OutputFormat::default(), OutputFormat::Compact);
        let mut p = Printer {
            out: Vec::new(),
            format: OutputFormat::default(),
            header: false,
        };
        p.anomaly(&anomaly()).expect("print");
        p.anomaly(&anomaly()).expect("print");
        let text = String::from_utf8(p.out).expect("utf8");
        let want = format!("{}\n", anomaly_compact(&anomaly()));
        assert_eq!(text, want.repeat(2));
    }

    #[test]
    fn priorities_parse_as_falco_users_write_them() {
        use crate::policy::Priority;
        for (text, want) in [
            ("warning", Priority::Warning),
            ("Warning", Priority::Warning),
            ("WARNING", Priority::Warning),
            ("warn", Priority::Warning),
            ("emergency", Priority::Emergency),
            ("alert", Priority::Alert),
            ("critical", Priority::Critical),
            ("error", Priority::Error),
            ("notice", Priority::Notice),
            ("informational", Priority::Informational),
            ("info", Priority::Informational),
            ("Debug", Priority::Debug),
        ] {
            assert_eq!(parse_priority(text), Some(want), "{text}");
        }
        for bad in ["", "warnings", "high", "5"] {
            assert_eq!(parse_priority(bad), None, "{bad}");
        }
    }

    #[test]
    fn position_files_round_trip_and_refuse_the_other_stream() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("pos");
        let mut p = PositionFile::open(&path, "anomalies").expect("new");
        assert_eq!(p.cursor(), None);
        p.save().expect("nothing to save");
        assert!(!path.exists(), "no position yet: no file");
        p.advance("run-1", 7);
        p.save().expect("save");
        let again = PositionFile::open(&path, "anomalies").expect("reopen");
        assert_eq!(
            again.cursor(),
            Some(pb::Cursor {
                run_id: "run-1".into(),
                seq: 7
            })
        );
        let err = PositionFile::open(&path, "events")
            .err()
            .expect("other stream");
        assert!(err.to_string().contains("anomalies stream"), "{err}");
        std::fs::write(&path, "garbage").expect("write");
        let err = PositionFile::open(&path, "anomalies")
            .err()
            .expect("garbage");
        assert!(err.to_string().contains("remove it"), "{err}");
    }
}
