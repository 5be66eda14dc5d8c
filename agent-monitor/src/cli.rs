//! Command line: `run`, `check-config`, `version`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError};

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
    /// Validate a config file: exit 0 when valid, 64 with a message naming the problem.
    CheckConfig(ConfigArgs),
    /// Connect to a running daemon's gRPC API and print anomalies (or events) as they come.
    Tail(TailArgs),
    /// Print the version.
    Version,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// The daemon's API: `http://127.0.0.1:50051`, `https://host:port` or `unix:/path`.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// Print events instead of anomalies.
    #[arg(long)]
    pub events: bool,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only these namespaces (repeatable).
    #[arg(long = "namespace", value_name = "NS")]
    pub namespaces: Vec<String>,
    /// Only these pods (repeatable).
    #[arg(long = "pod", value_name = "POD")]
    pub pods: Vec<String>,
    /// Only these agents (repeatable).
    #[arg(long = "agent", value_name = "AGENT")]
    pub agents: Vec<String>,
    /// Only these rules (repeatable; anomalies only).
    #[arg(long = "rule", value_name = "RULE")]
    pub rules: Vec<String>,
    /// Only anomalies at least this severe (Emergency .. Debug).
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

/// The policies a config names, or the exit status after printing why they are unusable.
fn load_policies(config: &Config) -> Result<crate::policy::PolicySet, ExitCode> {
    crate::policy::PolicySet::load(&config.detect.policies).map_err(|e| {
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

fn load_run_config(args: &RunArgs) -> Result<Config, ConfigError> {
    let mut config = load_config(&args.config)?;
    if let Some(output) = &args.output {
        config.output = output.clone();
    }
    config.cgroups.extend(args.cgroups.iter().cloned());
    config.kernel_log |= args.kernel_log;
    let source = args
        .config
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("<command line>"));
    config.validate(&source)?;
    Ok(config)
}

fn init_logging(level: &str) {
    let env = env_logger::Env::default().default_filter_or(level);
    env_logger::Builder::from_env(env)
        .format_timestamp_micros()
        .target(env_logger::Target::Stderr)
        .init();
}

/// Parses the command line, runs the command and returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    match cli.command {
        Command::Version => {
            println!("agent-monitor {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Tail(args) => tail(args),
        Command::CheckConfig(args) => match load_config(&args) {
            Ok(config) => {
                let policies = match load_policies(&config) {
                    Ok(p) => p,
                    Err(code) => return code,
                };
                let name = args.config.map_or_else(
                    || "built-in default".to_owned(),
                    |p| p.display().to_string(),
                );
                println!("config {name}: ok ({} policies)", policies.policies().len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("agent-monitor: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run(args) => {
            let config = match load_run_config(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("agent-monitor: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let policies = match load_policies(&config) {
                Ok(p) => p,
                Err(code) => return code,
            };
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(2);
            let runtime = match runtime(builder) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match runtime.block_on(crate::app::run(config, policies)) {
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
    }
}

fn tail(args: TailArgs) -> ExitCode {
    use crate::outputs::grpc::{self, pb};
    let min_priority = match args.min_priority.as_deref() {
        None => None,
        Some(p) => {
            let parsed: Result<crate::policy::Priority, _> =
                serde_json::from_value(serde_json::Value::String(p.to_owned()));
            match parsed {
                Ok(p) => Some(p),
                Err(_) => {
                    eprintln!("agent-monitor: --min-priority: expected one of Emergency, Alert, Critical, Error, Warning, Notice, Informational, Debug, got {p:?}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
    };
    let mut filter = pb::Filter {
        namespaces: args.namespaces,
        pods: args.pods,
        agents: args.agents,
        rules: args.rules,
        ..Default::default()
    };
    if let Some(p) = min_priority {
        filter.min_priority = grpc::priority_to_pb(p) as i32;
    }
    let tls = match (args.ca, &args.cert) {
        (Some(ca), _) => Some(grpc::ClientTls {
            ca,
            cert: args.cert,
            key: args.key,
            domain: None,
        }),
        (None, Some(_)) => {
            eprintln!(
                "agent-monitor: --cert needs --ca (the CA that signed the server's certificate)"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        (None, None) => None,
    };
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(grpc::tail(
        args.endpoint,
        args.events,
        filter,
        args.json,
        tls,
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent-monitor: tail: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
