//! Command line: `run`, `check-config`, `tail`, `replay`, `version`.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};

use crate::{
    api::pb,
    config::{Config, ConfigError, LogFormat},
    outputs::grpc::{EventKind, Matcher, OutputFormat},
};

/// Exit status for a bad config or bad arguments (EX_USAGE in sysexits.h).
pub const EXIT_CONFIG: u8 = 64;
/// Exit status for a failure at run time (probes could not load, output failed).
pub const EXIT_FAILURE: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "agent-monitor",
    version,
    about = "Watch, from the kernel, what AI agents do with their credentials.",
    long_about = "agent-monitor loads eBPF programs that trace opens of credential files \
(ServiceAccount tokens, Secret volumes, node kubeconfigs and PKI, cloud credential files), \
outbound connections and process lifecycle, and prints every event as one JSON line.\n\n\
It needs root (CAP_BPF, CAP_PERFMON), tracefs and the kernel's BTF \
(/sys/kernel/btf/vmlinux), and reads the mount table it runs in to find pods' volumes."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log level of the daemon's own log on stderr (error, warn, info, debug, trace).
    /// RUST_LOG, when set, takes precedence.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the probes and print every event as a JSON line until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Validate a config as `run` would, short of loading the eBPF programs: the file, the
    /// policies, and what it names on this machine (outputs, cgroups, pods file, TLS files,
    /// Kubernetes client). Exit 0 when valid, 64 with a message naming the problem.
    CheckConfig(ConfigArgs),
    /// Connect to a running daemon's gRPC API and print anomalies (or events) as they come.
    Tail(TailArgs),
    /// Print the alerts of a forensic journal, or run detection again over its events
    /// with other policies and show what they would change.
    #[command(long_about = REPLAY_ABOUT)]
    Replay(ReplayArgs),
    /// Print the version.
    Version,
}

/// The workload filters `tail` and `replay` share.
#[derive(Debug, Args)]
pub struct WorkloadArgs {
    /// Only these namespaces (repeatable).
    #[arg(long = "namespace", value_name = "NS")]
    pub namespaces: Vec<String>,
    /// Only these pods: name, namespace/name or UID (repeatable).
    #[arg(long = "pod", value_name = "POD")]
    pub pods: Vec<String>,
    /// Only these agents (repeatable).
    #[arg(long = "agent", value_name = "AGENT")]
    pub agents: Vec<String>,
}

impl WorkloadArgs {
    /// The API's selector of these workloads.
    fn selector(&self) -> pb::Selector {
        pb::Selector {
            namespaces: self.namespaces.clone(),
            pods: self.pods.clone(),
            agents: self.agents.clone(),
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// The daemon's API: `http://127.0.0.1:50051`, `https://host:port` or `unix:/path`.
    #[arg(long, visible_alias = "addr", default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// Print events instead of anomalies.
    #[arg(long)]
    pub events: bool,
    /// How to print each anomaly or event.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Compact)]
    pub output: OutputFormat,
    /// Same as `--output json`.
    #[arg(long, conflicts_with = "output")]
    pub json: bool,
    /// Only these kinds of events (with --events; comma-separated or repeated). The server
    /// sends no other kind.
    #[arg(
        long = "kind",
        value_name = "KIND",
        value_enum,
        value_delimiter = ',',
        requires = "events"
    )]
    pub kinds: Vec<EventKind>,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Only these rules (repeatable; anomalies only): built-in rule ids such as
    /// `foreign-credential-read`.
    #[arg(long = "rule", value_name = "RULE")]
    pub rules: Vec<String>,
    /// Never these namespaces (repeatable).
    #[arg(long = "exclude-namespace", value_name = "NS")]
    pub exclude_namespaces: Vec<String>,
    /// Never these pods: name, namespace/name or UID (repeatable).
    #[arg(long = "exclude-pod", value_name = "POD")]
    pub exclude_pods: Vec<String>,
    /// Never these agents (repeatable).
    #[arg(long = "exclude-agent", value_name = "AGENT")]
    pub exclude_agents: Vec<String>,
    /// Never these rules (repeatable; anomalies only).
    #[arg(long = "exclude-rule", value_name = "RULE")]
    pub exclude_rules: Vec<String>,
    /// Keep the position (the last item printed) in FILE, and when FILE holds one, start
    /// after it: what the daemon saw meanwhile is served from its journal (even across a
    /// daemon restart), then the live stream, each item once. Needs the daemon's journal.
    #[arg(long, value_name = "FILE")]
    pub resume: Option<PathBuf>,
    /// Only anomalies at least this severe (anomalies only): emergency, alert, critical,
    /// error, warning, notice, informational (info) or debug, in any case.
    #[arg(long, value_name = "PRIORITY")]
    pub min_priority: Option<String>,
    /// CA certificate (PEM) to verify an https endpoint.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
}

const REPLAY_ABOUT: &str = "Print the alerts of a forensic journal directory, offline.\n\n\
Without --policy, the alerts the daemon recorded are printed as they were recorded.\n\n\
With --policy, detection runs again over the recorded events with the given AgentPolicy \
files, each event with the identity (pod, ServiceAccount, agent, process) it was recorded \
with: nothing is looked up on this machine. Each daemon run starts with fresh detection \
state (baselines, exfiltration windows, rate limits), as the daemon does at a restart. \
The detection settings (API servers, cluster CIDRs, DNS servers, exfiltration window, \
suspicious readers) come from --config, the daemon's config; without it, the built-in \
defaults, with the DNS servers of this machine's /etc/resolv.conf.\n\n\
With --diff, only the differences are printed: `+ ` before an alert the given policies \
add, `- ` before a recorded alert they remove. Alerts are the same when they have the same \
run, rule and triggering events (event sequence numbers); a changed priority shows as a \
`-`/`+` pair. Alerts that no event triggered (rate-limit summaries, monitor-kernel-silent) \
are not compared.\n\n\
Damaged stretches of the journal are reported on stderr (segment, offset, bytes) and the \
rest is replayed. Needs read access to the journal only: no root, BPF or cluster, so a \
copy of the directory replays anywhere.";

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The journal directory (or a copy of it).
    #[arg(long, value_name = "DIR")]
    pub journal: PathBuf,
    /// Run detection again with these AgentPolicy files or directories (repeatable), instead
    /// of printing the recorded alerts.
    #[arg(long = "policy", value_name = "FILE")]
    pub policies: Vec<PathBuf>,
    /// The daemon's config, for its detection settings (with --policy; its own policies
    /// are not used).
    #[arg(long, short, value_name = "FILE", requires = "policies")]
    pub config: Option<PathBuf>,
    /// Only alerts at or after this time: RFC 3339 (2026-11-23T08:00:00Z) or a duration
    /// before now (30m, 1h, 2days).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only alerts at or before this time (same forms as --since).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// How to print each alert.
    #[arg(long, value_enum, default_value_t = crate::replay::Format::Table)]
    pub format: crate::replay::Format,
    /// Print only the alerts the --policy files add (`+ `) and remove (`- `) compared with
    /// the recorded ones.
    #[arg(long, requires = "policies")]
    pub diff: bool,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// YAML config file. Without it the built-in default is used: the standard in-container
    /// token and secret paths, the kubelet pods directory, node kubeconfigs and PKI, and
    /// root's cloud credential files, on every process of the node.
    #[arg(long, short, env = "AGENT_MONITOR_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Where to write JSON lines: `-` for stdout or a file path (overrides `output`).
    #[arg(long, short)]
    pub output: Option<String>,
    /// Monitor only processes in this cgroup2 directory and below; repeatable (adds to
    /// `cgroups`).
    #[arg(long = "cgroup", value_name = "DIR")]
    pub cgroups: Vec<PathBuf>,
    /// Forward kernel-side diagnostics to the log (overrides `kernel_log`).
    #[arg(long)]
    pub kernel_log: bool,
}

/// Runs every start-up check of `run` short of loading the probes (see [`crate::preflight`])
/// and returns the policies, or the exit status after printing why the config is unusable.
fn preflight(
    runtime: &tokio::runtime::Runtime,
    config: &Config,
    source: &Path,
) -> Result<crate::policy::PolicySet, ExitCode> {
    runtime
        .block_on(crate::preflight::check(config, source))
        .map_err(|e| {
            eprintln!("agent-monitor: {e}");
            ExitCode::from(EXIT_CONFIG)
        })
}

/// A tokio runtime, or the exit status after printing why it could not start.
fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("agent-monitor: starting the runtime: {e}");
        ExitCode::from(EXIT_FAILURE)
    })
}

/// Loads the config named on the command line, or the built-in default.
pub fn load_config(args: &ConfigArgs) -> Result<Config, ConfigError> {
    match &args.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    }
}

/// How a config is named in messages: its file, or what stands for it.
fn config_source(args: &ConfigArgs, default: &str) -> PathBuf {
    args.config
        .clone()
        .unwrap_or_else(|| PathBuf::from(default))
}

fn load_run_config(args: &RunArgs) -> Result<Config, ConfigError> {
    let mut config = load_config(&args.config)?;
    if let Some(output) = &args.output {
        config.output = output.clone();
    }
    config.cgroups.extend(args.cgroups.iter().cloned());
    config.kernel_log |= args.kernel_log;
    config.validate(&config_source(&args.config, "<command line>"))?;
    Ok(config)
}

/// The `[<time> <LEVEL> <target>] <message>` lines the daemon has always written (the
/// layout of env_logger, which it used before tracing), with any structured fields of the
/// event after the message as ` key=value`.
struct TextLines;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for TextLines
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing_log::NormalizeEvent as _;
        // A record bridged from the `log` crate names its own target and level.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        write!(
            writer,
            "[{} {:<5} {}] ",
            humantime::format_rfc3339_micros(std::time::SystemTime::now()),
            meta.level(),
            meta.target()
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// One JSON object per line for log collectors: `timestamp` (RFC 3339, UTC), `level`,
/// `target`, `message`, then the event's structured fields, if any.
struct JsonLines;

/// An event's fields as JSON members; the message apart.
#[derive(Default)]
struct JsonFields {
    message: String,
    fields: Vec<(&'static str, serde_json::Value)>,
}

impl JsonFields {
    fn add(&mut self, field: &tracing::field::Field, value: serde_json::Value) {
        match field.name() {
            "message" => {
                self.message = match value {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                }
            }
            // The bridge's own fields: the target is the line's, the rest is noise.
            name if name.starts_with("log.") => {}
            name => self.fields.push((name, value)),
        }
    }
}

impl tracing::field::Visit for JsonFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.add(field, format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.add(field, value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.add(field, value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.add(field, value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.add(field, value.into());
    }
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing_log::NormalizeEvent as _;
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let json = |v: &str| serde_json::Value::from(v).to_string();
        write!(
            writer,
            "{{\"timestamp\":\"{}\",\"level\":\"{}\",\"target\":{},\"message\":{}",
            humantime::format_rfc3339_micros(std::time::SystemTime::now()),
            meta.level(),
            json(meta.target()),
            json(&fields.message)
        )?;
        for (name, value) in &fields.fields {
            write!(writer, ",{}:{value}", json(name))?;
        }
        writeln!(writer, "}}")
    }
}

/// Installs the daemon's log: events at `level` and above (RUST_LOG, when set, instead) on
/// stderr in `format`, with the records of the `log` crate (aya, the eBPF programs' log
/// through aya-log, other dependencies) bridged in.
fn init_logging(level: &str, format: LogFormat) {
    use tracing_log::AsLog as _;
    use tracing_subscriber::{layer::SubscriberExt as _, EnvFilter};
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| level.to_owned());
    let filter = EnvFilter::builder().parse_lossy(directives);
    // `log` records above the most verbose level any directive enables are never built.
    let max = filter
        .max_level_hint()
        .unwrap_or(tracing_subscriber::filter::LevelFilter::TRACE);
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .event_format(TextLines)
            .with_writer(std::io::stderr)
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .event_format(JsonLines)
            .with_writer(std::io::stderr)
    });
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json);
    if let Err(e) = tracing::subscriber::set_global_default(subscriber) {
        eprintln!("agent-monitor: installing the log: {e}");
    }
    if let Err(e) = tracing_log::LogTracer::builder()
        .with_max_level(max.as_log())
        .init()
    {
        eprintln!("agent-monitor: bridging `log` records: {e}");
    }
}

/// Parses the command line, runs the command and returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` installs the log once its config (which chooses the format) is read.
    if !matches!(cli.command, Command::Run(_)) {
        init_logging(&cli.log_level, LogFormat::Text);
    }
    match cli.command {
        Command::Version => {
            println!("agent-monitor {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Tail(args) => tail(args),
        Command::Replay(args) => replay(&args),
        Command::CheckConfig(args) => check_config(&args),
        Command::Run(args) => run(&args, &cli.log_level),
    }
}

fn check_config(args: &ConfigArgs) -> ExitCode {
    let config = match load_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agent-monitor: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let source = config_source(args, "<built-in default>");
    let policies = match preflight(&runtime, &config, &source) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let name = args.config.as_ref().map_or_else(
        || "built-in default".to_owned(),
        |p| p.display().to_string(),
    );
    println!("config {name}: ok ({} policies)", policies.policies().len());
    ExitCode::SUCCESS
}

fn run(args: &RunArgs, log_level: &str) -> ExitCode {
    let config = match load_run_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agent-monitor: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(log_level, config.log.format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2);
    let runtime = match runtime(builder) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // The same checks as check-config, so both refuse a config with the same message.
    let source = config_source(&args.config, "<command line>");
    let policies = match preflight(&runtime, &config, &source) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let result = runtime.block_on(crate::app::run(config, policies));
    // Dropping a runtime waits for every blocking task without limit; the shutdown bound
    // was spent in `run`, so whatever is still running (a read stuck on a FIFO, a
    // connection task) is left to the process exit.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent-monitor: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The filter and print options of `tail`, or the message saying which argument is wrong.
fn tail_options(args: TailArgs) -> Result<crate::outputs::grpc::TailOptions, String> {
    use crate::{api, outputs::grpc};
    if args.events {
        // Events carry no rule or priority: the server would ignore these filters.
        if !args.rules.is_empty() || !args.exclude_rules.is_empty() {
            return Err(
                "--rule selects anomalies; events have no rule (filter events with \
                        --kind, --namespace, --pod or --agent)"
                    .to_owned(),
            );
        }
        if args.min_priority.is_some() {
            return Err("--min-priority selects anomalies; events have no priority".to_owned());
        }
    }
    let known: Vec<&str> = crate::detect::RULES.iter().map(|r| r.id).collect();
    if let Some(unknown) = args
        .rules
        .iter()
        .chain(&args.exclude_rules)
        .find(|r| !known.contains(&r.as_str()))
    {
        return Err(format!(
            "--rule {unknown:?}: no such rule; the rules are {}",
            known.join(", ")
        ));
    }
    let mut filter = pb::Filter {
        allow: Some(pb::Selector {
            rules: args.rules,
            ..args.workload.selector()
        }),
        deny: Some(pb::Selector {
            namespaces: args.exclude_namespaces,
            pods: args.exclude_pods,
            agents: args.exclude_agents,
            rules: args.exclude_rules,
        }),
        kinds: args.kinds.iter().map(|k| k.to_pb() as i32).collect(),
        ..Default::default()
    };
    if let Some(p) = args.min_priority.as_deref() {
        let parsed = grpc::parse_priority(p).ok_or_else(|| {
            format!(
                "--min-priority: expected one of emergency, alert, critical, error, warning, \
                 notice, informational (or info), debug, in any case; got {p:?}"
            )
        })?;
        filter.min_priority = api::priority_to_pb(parsed) as i32;
    }
    let tls = match (args.ca, &args.cert) {
        (Some(ca), _) => Some(grpc::ClientTls {
            ca,
            cert: args.cert,
            key: args.key,
            domain: None,
        }),
        (None, Some(_)) => {
            return Err(
                "--cert needs --ca (the CA that signed the server's certificate)".to_owned(),
            )
        }
        (None, None) => None,
    };
    Ok(grpc::TailOptions {
        endpoint: args.endpoint,
        events: args.events,
        filter,
        format: if args.json {
            OutputFormat::Json
        } else {
            args.output
        },
        tls,
        resume: args.resume,
    })
}

fn tail(args: TailArgs) -> ExitCode {
    use crate::outputs::grpc::GrpcError;
    let options = match tail_options(args) {
        Ok(o) => o,
        Err(message) => {
            eprintln!("agent-monitor: tail: {message}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(crate::outputs::grpc::tail(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ GrpcError::Connect { .. }) => {
            eprintln!("agent-monitor: tail: {e} (is agent-monitor running? is --endpoint right?)");
            ExitCode::from(EXIT_FAILURE)
        }
        Err(e) => {
            eprintln!("agent-monitor: tail: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The replay options of the command line, or the message saying which argument is wrong.
fn replay_options(args: &ReplayArgs) -> Result<crate::replay::Options, String> {
    use crate::replay;
    let now = std::time::SystemTime::now();
    let time = |flag: &str, value: &Option<String>| {
        value
            .as_deref()
            .map(|v| replay::parse_time(v, now).map_err(|e| format!("{flag} {e}")))
            .transpose()
    };
    let workloads = Matcher::new(Some(&pb::Filter {
        allow: Some(args.workload.selector()),
        ..Default::default()
    }))?;
    let filter = replay::Filter {
        since: time("--since", &args.since)?,
        until: time("--until", &args.until)?,
        workloads,
    };
    let policies = if args.policies.is_empty() {
        None
    } else {
        Some(crate::policy::PolicySet::load(&args.policies).map_err(|e| e.to_string())?)
    };
    let config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    Ok(replay::Options {
        journal: args.journal.clone(),
        policies,
        detect: crate::app::settings::detect(&config),
        filter,
        format: args.format,
        diff: args.diff,
    })
}

fn replay(args: &ReplayArgs) -> ExitCode {
    use crate::replay::ReplayError;
    let options = match replay_options(args) {
        Ok(o) => o,
        Err(message) => {
            eprintln!("agent-monitor: replay: {message}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let out = std::io::BufWriter::new(std::io::stdout().lock());
    match crate::replay::replay(&options, out, std::io::stderr()) {
        Ok(s) => {
            eprintln!(
                "agent-monitor: replay: {} records of {} runs, {} damaged stretches, {} alerts \
                 printed",
                s.records, s.runs, s.damaged, s.printed
            );
            ExitCode::SUCCESS
        }
        // The reader went away (`replay | head`): what it wanted has been printed.
        Err(ReplayError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e @ ReplayError::DiffWithoutPolicies) => {
            eprintln!("agent-monitor: replay: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("agent-monitor: replay: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
