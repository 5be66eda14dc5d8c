//! `am-demo`: the whole product in one command, on this machine, without a cluster.
//!
//! Run as root: `am-demo [--daemon PATH] [--policies PATH]`.
//!
//! It stands up the two-tier layout of namespace `agent-system` with real kernel objects
//! (kubelet-named cgroups, a kubelet root in a temp dir with one tmpfs token volume per
//! pod, a pods file, network namespaces for "the internet" and the API server), runs the
//! real `agent-monitor` daemon on it with the two-tier AgentPolicies, performs benign and
//! hostile actions inside the pods, prints the alerts the daemon wrote (Falco JSON lines)
//! as a table and checks that every expected rule fired for the right pod and that the
//! benign actions raised nothing. The daemon keeps a forensic journal; once it has stopped,
//! `agent-monitor replay` must print the same alerts from the journal alone, and with the
//! AgentPolicies changed to allow the exfiltration step's destination, `replay --diff` must
//! show exactly that step's alerts removed and nothing else. Exit status 0 on success, 1
//! otherwise (2: bad arguments). Everything it creates (daemon, cgroups, mounts, network
//! namespaces, temp dir) is removed on the way out, on failure and Ctrl-C too.
//!
//! No packet leaves the machine: the pods' processes run in a network namespace of their
//! own whose only links go to the demo's namespaces, so the host's network, routes and
//! addresses are never touched.
//!
//! The pods' "agent" executable (`/usr/local/bin/agent` inside each pod's private mount
//! namespace) is this binary, bind-mounted there; run under that name it performs the
//! `read:PATH` and `connect:IP:PORT` actions its arguments name.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use agent_monitor::{
    identity::Workload,
    policy::{PolicySet, Tier},
};
use agent_monitor_tests::{
    sim::{pods_file, SimPod},
    unique, TempTree, TestCgroup,
};
use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

const NS: &str = "agent-system";
const DEFAULT_POLICIES: &str = "deploy/examples/two-tier/agentpolicies.yaml";
const TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The agent's executable inside every pod.
const AGENT_EXE: &str = "/usr/local/bin/agent";
/// Where worker-2's hostPath volume mounts the node's kubelet root.
const HOST_KUBELET: &str = "/run/host/var/lib/kubelet";
/// The API server (`detect.api_servers`), in the API server's namespace.
const API: &str = "10.96.0.1:443";
/// The LLM gateway the worker policy allows (203.0.113.0/24, port 443).
const GATEWAY: &str = "203.0.113.10:443";
/// Somewhere on "the internet" no policy allows.
const INTERNET: &str = "198.51.100.23:443";
/// The cloud instance metadata service.
const METADATA: &str = "169.254.169.254:80";
/// How long to wait for the daemon to report one step's kernel events.
const STEP_WAIT: Duration = Duration::from_secs(10);
/// How long, once they are reported, for the alerts they should raise.
const ALERT_GRACE: Duration = Duration::from_secs(2);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The agent inside a pod
// ---------------------------------------------------------------------------------------

/// `agent read:PATH connect:IP:PORT ...`: what the pods' agent does, one line per action.
fn agent_main(args: &[String]) -> ExitCode {
    let mut ok = true;
    for action in args {
        let (verb, rest) = action.split_once(':').unwrap_or((action, ""));
        let line = match verb {
            "read" => match std::fs::File::open(rest) {
                Ok(mut f) => {
                    let mut buf = [0u8; 4096];
                    match f.read(&mut buf) {
                        Ok(n) => format!("read {rest}: {n} bytes"),
                        Err(e) => {
                            ok = false;
                            format!("read {rest}: error {e}")
                        }
                    }
                }
                Err(e) => {
                    ok = false;
                    format!("read {rest}: error {e}")
                }
            },
            "connect" => match rest.parse::<SocketAddr>() {
                Ok(addr) => match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                    Ok(_) => format!("connect {addr}: connected"),
                    Err(e) => {
                        ok = false;
                        format!("connect {addr}: error {e}")
                    }
                },
                Err(_) => {
                    ok = false;
                    format!("connect {rest}: not IP:PORT")
                }
            },
            _ => {
                ok = false;
                format!("{action}: unknown action")
            }
        };
        println!("{line}");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

// ---------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------

struct Opts {
    daemon: PathBuf,
    policies: PathBuf,
}

const USAGE: &str = "usage: am-demo [--daemon PATH] [--policies PATH]

Runs the agent-monitor daemon on a simulated two-tier agent deployment (namespace
agent-system: agent-proxy and agent-worker-1..3), performs benign and hostile actions in
the pods and checks the alerts. Needs root and BPF. Removes everything it created.

  --daemon PATH     the agent-monitor binary (default: agent-monitor beside am-demo)
  --policies PATH   the AgentPolicies (default: deploy/examples/two-tier/agentpolicies.yaml,
                    from the current directory or the workspace am-demo was built in)";

fn parse_args(args: &[String]) -> Result<Opts> {
    let exe = std::env::current_exe().context("current exe")?;
    let exe_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut daemon = None;
    let mut policies = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f, Some(v.to_owned())),
            None => (a.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| anyhow!("{flag} needs a value\n\n{USAGE}"))
        };
        match flag {
            "--daemon" => daemon = Some(PathBuf::from(value()?)),
            "--policies" => policies = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    let daemon = daemon.unwrap_or_else(|| exe_dir.join("agent-monitor"));
    let policies = match policies {
        Some(p) => p,
        None => {
            // The current directory, else the workspace of target/<profile>/am-demo.
            let here = PathBuf::from(DEFAULT_POLICIES);
            let workspace = exe_dir
                .parent()
                .and_then(Path::parent)
                .map(|w| w.join(DEFAULT_POLICIES));
            match workspace {
                Some(w) if !here.exists() && w.exists() => w,
                _ => here,
            }
        }
    };
    Ok(Opts { daemon, policies })
}

// ---------------------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------------------

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A named network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn add(tag: &str) -> Result<Self> {
        let name = format!("am-demo-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Adds `addr` (with prefix) to `dev`.
    fn addr(&self, addr: &str, dev: &str) -> Result<()> {
        ip(&["-n", &self.name, "addr", "add", addr, "dev", dev])
    }

    /// A veth pair: `dev` here, `peer_dev` in `peer`.
    fn veth(&self, dev: &str, peer: &Netns, peer_dev: &str) -> Result<()> {
        let link = ["link", "add", dev, "type", "veth", "peer", "name", peer_dev];
        ip(&[
            &["-n", self.name.as_str()][..],
            &link,
            &["netns", &peer.name],
        ]
        .concat())
    }

    fn route(&self, to: &str, via: &str) -> Result<()> {
        ip(&["-n", &self.name, "route", "add", to, "via", via])
    }

    /// A TCP listener on `addr` inside the namespace, accepting and closing connections on
    /// a background thread until the demo exits.
    fn listen(&self, addr: SocketAddr) -> Result<()> {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("open netns {}", self.name))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: setns(2) on this thread only, with a valid network namespace fd.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if r != 0 {
                let _ = tx.send(Err(format!("setns: {}", std::io::Error::last_os_error())));
                return;
            }
            let listener = match TcpListener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(format!("bind {addr}: {e}")));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            for conn in listener.incoming() {
                drop(conn);
            }
        });
        rx.recv()
            .map_err(|_| anyhow!("listener thread for {addr} died"))?
            .map_err(|e| anyhow!("listener {addr} in netns {}: {e}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of every veth pair, and so the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The demo's network: the pods' namespace, linked to the API server's namespace and to
/// "the internet" (which also holds the LLM gateway and the metadata service).
struct Network {
    pods: Netns,
    api: Netns,
    internet: Netns,
}

fn sock(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| unreachable!("constant address {s}"))
}

fn host_of(s: &str) -> String {
    sock(s).ip().to_string()
}

impl Network {
    fn create() -> Result<Self> {
        let pods = Netns::add("pods")?;
        let api = Netns::add("apiserver")?;
        let internet = Netns::add("internet")?;
        pods.veth("to-api", &api, "to-pods")?;
        pods.veth("to-internet", &internet, "to-pods")?;
        pods.addr("10.213.1.2/24", "to-api")?;
        pods.addr("10.213.2.2/24", "to-internet")?;
        api.addr("10.213.1.1/24", "to-pods")?;
        internet.addr("10.213.2.1/24", "to-pods")?;
        for (ns, dev) in [
            (&pods, "to-api"),
            (&pods, "to-internet"),
            (&api, "to-pods"),
            (&internet, "to-pods"),
        ] {
            ip(&["-n", &ns.name, "link", "set", dev, "up"])?;
        }
        api.addr(&format!("{}/32", host_of(API)), "lo")?;
        for a in [GATEWAY, INTERNET, METADATA] {
            internet.addr(&format!("{}/32", host_of(a)), "lo")?;
        }
        pods.route(&format!("{}/32", host_of(API)), "10.213.1.1")?;
        pods.route("default", "10.213.2.1")?;
        api.listen(sock(API))?;
        for a in [GATEWAY, INTERNET, METADATA] {
            internet.listen(sock(a))?;
        }
        Ok(Self {
            pods,
            api,
            internet,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Pods
// ---------------------------------------------------------------------------------------

struct Pod {
    sim: SimPod,
    tier: &'static str,
    /// The token volume's directory in the kubelet root.
    volume: PathBuf,
}

impl Pod {
    fn name(&self) -> &str {
        &self.sim.name
    }

    fn json(&self) -> String {
        let p = &self.sim;
        format!(
            r#"{{"apiVersion":"v1","kind":"Pod",
  "metadata":{{"name":"{name}","namespace":"{NS}","uid":"{uid}",
    "labels":{{"app.kubernetes.io/name":"{agent}","agent-monitor.dev/agent":"{agent}","agent-monitor.dev/tier":"{tier}"}}}},
  "spec":{{"serviceAccountName":"{sa}","nodeName":"node-a",
    "containers":[{{"name":"agent","image":"ghcr.io/acme/{agent}:1.0",
      "volumeMounts":[{{"name":"{vol}","mountPath":"/var/run/secrets/kubernetes.io/serviceaccount","readOnly":true}}]}}],
    "volumes":[{{"name":"{vol}","projected":{{"sources":[{{"serviceAccountToken":{{"path":"token","expirationSeconds":3607}}}}]}}}}]}},
  "status":{{"containerStatuses":[{{"name":"agent","containerID":"containerd://{cid}","image":"ghcr.io/acme/{agent}:1.0","imageID":"sha256:0","ready":true,"restartCount":0}}]}}}}"#,
            name = p.name,
            uid = p.uid,
            agent = p.agent,
            tier = self.tier,
            sa = p.sa,
            vol = p.token_volume,
            cid = p.container_id,
        )
    }

    fn workload(&self) -> Workload {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("agent-monitor.dev/agent".to_owned(), self.sim.agent.clone());
        labels.insert("agent-monitor.dev/tier".to_owned(), self.tier.to_owned());
        Workload {
            namespace: Some(NS.to_owned()),
            pod: Some(self.sim.name.clone()),
            pod_uid: Some(self.sim.uid.clone()),
            service_account: Some(self.sim.sa.clone()),
            agent: Some(self.sim.agent.clone()),
            tier: Some(self.tier.to_owned()),
            labels,
            ..Workload::default()
        }
    }
}

/// How a process is started in a pod.
enum Run<'a> {
    /// The pod's agent (`/usr/local/bin/agent`) with these actions.
    Agent(&'a [String]),
    /// A shell command.
    Shell(&'a str),
}

struct Node {
    kroot: PathBuf,
    self_exe: PathBuf,
    netns: String,
}

impl Node {
    /// Runs a process of `pod` as the container runtime would start it: in the pods'
    /// network namespace, in a private mount namespace with the pod's token volume at the
    /// in-container path and the agent at /usr/local/bin/agent (plus, with
    /// `host_kubelet`, a hostPath mount of the node's kubelet root), then in the pod's
    /// container cgroup. Returns what it printed.
    fn run(&self, pod: &Pod, host_kubelet: bool, what: Run<'_>) -> Result<String> {
        let mut script = format!(
            "set -e; mount -t tmpfs -o size=1m tmpfs /run; \
             mkdir -p /run/secrets/kubernetes.io/serviceaccount; \
             mount --bind '{vol}' /run/secrets/kubernetes.io/serviceaccount; \
             mount -t tmpfs -o size=1m,mode=0755 tmpfs /usr/local/bin; \
             touch {AGENT_EXE}; mount --bind '{exe}' {AGENT_EXE}; ",
            vol = pod.volume.display(),
            exe = self.self_exe.display(),
        );
        if host_kubelet {
            script.push_str(&format!(
                "mkdir -p {HOST_KUBELET}; mount --rbind '{}' {HOST_KUBELET}; ",
                self.kroot.display()
            ));
        }
        script.push_str(&format!(
            "echo $$ > '{}/cgroup.procs'; ",
            pod.sim.cgroup.path.display()
        ));
        match what {
            Run::Agent(actions) => {
                script.push_str(&format!("exec {AGENT_EXE} {}", actions.join(" ")))
            }
            Run::Shell(cmd) => script.push_str(cmd),
        }
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .args(["unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .output()
            .context("running nsenter/unshare")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "process in pod {} failed ({}): {} {}",
                pod.name(),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }
}

// ---------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------

/// The running daemon; stopped with SIGTERM (then SIGKILL) on drop.
struct Daemon {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    admin: String,
}

impl Daemon {
    fn start(binary: &Path, config: &Path) -> Result<Self> {
        let mut child = Command::new(binary)
            .args(["run", "--config"])
            .arg(config)
            .env("NODE_NAME", "node-a")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal reaches the demo, which
            // stops the daemon itself after the clean-up it owes.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stderr = child.stderr.take().context("daemon stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut daemon = Self {
            child: Some(child),
            log: log.clone(),
            admin: String::new(),
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = log.lock() {
                    l.push(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut admin, mut running) = (None, false);
        while admin.is_none() || !running {
            check_interrupted()?;
            if let Some(c) = daemon.child.as_mut() {
                if let Some(status) = c.try_wait().context("daemon status")? {
                    bail!(
                        "the daemon exited during start-up ({status}):\n{}",
                        daemon.log_tail(30)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon did not become ready within 60 s:\n{}",
                    daemon.log_tail(30)
                );
            }
            let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            if let Some(rest) = line.split("/readyz on http://").nth(1) {
                admin = rest.split_whitespace().next().map(str::to_owned);
            }
            running |= line.contains("agent-monitor running");
        }
        daemon.admin = admin.unwrap_or_default();
        let ready = http_get(&daemon.admin, "/readyz")?;
        if !ready.starts_with("HTTP/1.1 200") {
            bail!(
                "GET /readyz on {}: {}",
                daemon.admin,
                ready.lines().next().unwrap_or_default()
            );
        }
        Ok(daemon)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        let start = log.len().saturating_sub(n);
        log[start..]
            .iter()
            .map(|l| format!("    | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERM, then up to 15 s for the drain and flush, then SIGKILL. Returns how it
    /// ended.
    fn stop(&mut self) -> Result<String> {
        let Some(mut child) = self.child.take() else {
            return Ok("already stopped".to_owned());
        };
        if let Some(status) = child.try_wait()? {
            return Ok(format!("had already exited ({status})"));
        }
        // SAFETY: kill(2) of our own child, which has not been reaped (no pid reuse).
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(if status.success() {
                    "stopped by SIGTERM, exit status 0".to_owned()
                } else {
                    format!("stopped by SIGTERM, {status}")
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok("did not stop within 15 s of SIGTERM: killed".to_owned());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

// ---------------------------------------------------------------------------------------
// Reading the daemon's outputs
// ---------------------------------------------------------------------------------------

/// Complete JSON lines appended to a file since the last call.
struct Tail {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl Tail {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            offset: 0,
            partial: String::new(),
        }
    }

    fn next_lines(&mut self) -> Vec<Value> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = String::new();
        let Ok(n) = f.read_to_string(&mut buf) else {
            return Vec::new();
        };
        self.offset += n as u64;
        self.partial.push_str(&buf);
        let mut out = Vec::new();
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                out.push(v);
            }
        }
        out
    }
}

/// One alert, as the table shows it.
#[derive(Clone)]
struct Alert {
    time: String,
    priority: String,
    rule: String,
    namespace: String,
    pod: String,
    process: String,
    what: String,
    output: String,
    /// Sequence numbers of the records that fired it (`agent.events`): within a daemon run
    /// they name one event each, so with the rule they identify the alert.
    events: Vec<u64>,
    /// `IP:PORT` of the connect behind it, if any.
    dest: String,
    /// The Falco line as written.
    json: Value,
}

/// (rule, priority, namespace, pod, event sequence numbers).
type AlertKey = (String, String, String, String, Vec<u64>);

fn field<'a>(f: &'a Value, k: &str) -> &'a str {
    f.get(k).and_then(Value::as_str).unwrap_or("")
}

impl Alert {
    fn from_json(v: &Value) -> Self {
        let f = &v["output_fields"];
        let pod = field(f, "k8s.pod.name").to_owned();
        let class = field(f, "agent.credential.class");
        let owner = field(f, "agent.owner.pod");
        let read = if owner.is_empty() || owner == pod {
            format!("read its own {class}")
        } else {
            format!("read {class} of {}/{owner}", field(f, "agent.owner.ns"))
        };
        let dest = format!(
            "{}:{} ({})",
            field(f, "fd.sip"),
            f.get("fd.sport").map(Value::to_string).unwrap_or_default(),
            field(f, "agent.destination.class")
        );
        let what = match (f.get("fd.name").is_some(), f.get("fd.sip").is_some()) {
            (true, true) => format!(
                "read {class}, then connect {dest} {} ms later",
                f.get("agent.read_to_connect_ms")
                    .map(Value::to_string)
                    .unwrap_or_default()
            ),
            (false, true) => format!("connect {dest}"),
            (true, false) => read,
            (false, false) => field(v, "output").to_owned(),
        };
        let exe = field(f, "proc.exepath");
        Self {
            time: field(v, "time").get(11..23).unwrap_or_default().to_owned(),
            priority: field(v, "priority").to_owned(),
            rule: field(v, "rule").to_owned(),
            namespace: field(f, "k8s.ns.name").to_owned(),
            pod,
            process: if exe.is_empty() {
                field(f, "proc.name").to_owned()
            } else {
                exe.to_owned()
            },
            what,
            output: field(v, "output").to_owned(),
            events: f
                .get("agent.events")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default(),
            dest: match (f.get("fd.sip").and_then(Value::as_str), f.get("fd.sport")) {
                (Some(ip), Some(port)) => format!("{ip}:{port}"),
                _ => String::new(),
            },
            json: v.clone(),
        }
    }

    /// What identifies the alert exactly: rule, priority, namespace, pod and triggering
    /// events. Nothing that depends on when or where it is printed.
    fn key(&self) -> AlertKey {
        (
            self.rule.clone(),
            self.priority.clone(),
            self.namespace.clone(),
            self.pod.clone(),
            self.events.clone(),
        )
    }

    /// One line for the demo's output: rule, priority, pod, events, what.
    fn brief(&self) -> String {
        format!(
            "{} ({}) {} events {:?}: {}",
            self.rule,
            self.priority,
            self.pod_label(),
            self.events,
            self.what
        )
    }

    fn pod_label(&self) -> String {
        if self.pod.is_empty() {
            "-".to_owned()
        } else {
            format!("{}/{}", self.namespace, self.pod)
        }
    }
}

fn print_table(alerts: &[Alert]) {
    let rows: Vec<[String; 6]> = alerts
        .iter()
        .map(|a| {
            [
                a.time.clone(),
                a.priority.clone(),
                a.rule.clone(),
                a.pod_label(),
                a.process.clone(),
                a.what.clone(),
            ]
        })
        .collect();
    let head = [
        "TIME",
        "PRIORITY",
        "RULE",
        "NAMESPACE/POD",
        "PROCESS",
        "WHAT",
    ];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut s = String::from("  ");
        for (i, c) in cells.iter().enumerate() {
            if i == 5 {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(head);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]);
    }
}

// ---------------------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------------------

struct Step {
    /// Whether the step must raise alerts (else: none at all).
    hostile: bool,
    pod: usize,
    /// One line: what the pod does.
    says: String,
    /// The agent's actions (`read:PATH`, `connect:IP:PORT`).
    actions: Vec<String>,
    /// A shell command run instead of the agent (its actions then say what it does).
    shell: Option<String>,
    /// Whether the pod has a hostPath mount of the kubelet root.
    host_kubelet: bool,
    expect: &'static [&'static str],
}

impl Step {
    /// The pod's agent does `actions`; the line names every address it connects to.
    fn agent(pod: usize, says: &str, actions: &[String], expect: &'static [&'static str]) -> Self {
        let targets: Vec<&str> = actions
            .iter()
            .filter_map(|a| a.strip_prefix("connect:"))
            .collect();
        let says = if targets.is_empty() {
            format!("{AGENT_EXE} {says}")
        } else {
            format!("{AGENT_EXE} {says} ({})", targets.join(", "))
        };
        Self {
            hostile: !expect.is_empty(),
            pod,
            says,
            actions: actions.to_vec(),
            shell: None,
            host_kubelet: false,
            expect,
        }
    }

    /// Whether it opens a credential / connects: what to wait for in the events.
    fn opens(&self) -> bool {
        self.actions.iter().any(|a| a.starts_with("read:"))
    }

    fn connects(&self) -> bool {
        self.actions.iter().any(|a| a.starts_with("connect:"))
    }
}

/// The benign and hostile actions, in order.
fn scenario(pods: &[Pod]) -> Vec<Step> {
    let (proxy, w1, w2, w3) = (0, 1, 2, 3);
    let read = |p: &str| format!("read:{p}");
    let connect = |a: &str| format!("connect:{a}");
    // Worker-1's token as the node's kubelet root holds it, through worker-2's hostPath.
    let foreign = format!(
        "{HOST_KUBELET}/pods/{}/volumes/kubernetes.io~projected/{}/token",
        pods[w1].sim.uid, pods[w1].sim.token_volume
    );
    let via_host_path =
        format!("reads agent-worker-1's token via a hostPath of the kubelet root ({HOST_KUBELET})");
    vec![
        Step::agent(
            proxy,
            "reads its own token and calls the API server",
            &[read(TOKEN), connect(API)],
            &[],
        ),
        Step::agent(
            w1,
            "reads its own token and calls the LLM gateway",
            &[read(TOKEN), connect(GATEWAY)],
            &[],
        ),
        Step {
            host_kubelet: true,
            ..Step::agent(
                w2,
                &via_host_path,
                &[read(&foreign)],
                &["foreign-credential-read"],
            )
        },
        Step {
            shell: Some(format!("cat {TOKEN} > /dev/null")),
            says: format!("a shell runs `cat {TOKEN}`"),
            ..Step::agent(
                w3,
                "",
                &[read(TOKEN)],
                &["credential-read-unexpected-executable"],
            )
        },
        Step::agent(
            w3,
            "reads its own token, then connects to the internet",
            &[read(TOKEN), connect(INTERNET)],
            &["credential-exfiltration", "egress-outside-allowlist"],
        ),
        Step::agent(
            w1,
            "calls the API server itself",
            &[connect(API)],
            &["api-server-contact-not-allowed"],
        ),
        Step::agent(
            w2,
            "contacts the cloud metadata service",
            &[connect(METADATA)],
            &["cloud-metadata-contact"],
        ),
    ]
}

/// Whether the daemon reported an open and/or a connect of `pod` in `events`.
fn seen(events: &[Value], pod: &str, opens: bool, connects: bool) -> bool {
    let of_pod = |e: &&Value| e["workload"]["pod"].as_str() == Some(pod);
    let open = events
        .iter()
        .filter(of_pod)
        .any(|e| e.get("open").is_some());
    let connect = events
        .iter()
        .filter(of_pod)
        .any(|e| e.get("connect").is_some());
    (open || !opens) && (connect || !connects)
}

fn stamp(t0: Instant) -> String {
    format!("[{:5.1}s]", t0.elapsed().as_secs_f64())
}

/// Everything the demo created. Fields drop in this order: the daemon is stopped first,
/// the temp dir goes last.
struct Scene {
    daemon: Option<Daemon>,
    net: Network,
    pods: Vec<Pod>,
    top: TestCgroup,
    kroot: PathBuf,
    policies: PathBuf,
    config: PathBuf,
    events: PathBuf,
    alerts: PathBuf,
    /// The daemon's forensic journal.
    journal: PathBuf,
    /// The temp dir: replay outputs and the allowing policy go here.
    dir: PathBuf,
    _tree: TempTree,
}

/// The node: cgroups, token volumes, pods file, network, daemon config.
fn set_up(opts: &Opts) -> Result<Scene> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("am-demo needs root (BPF, cgroups, mounts, network namespaces): run it with sudo");
    }
    if !opts.daemon.is_file() {
        bail!(
            "daemon binary {} not found: build it (cargo build -p agent-monitor --bin agent-monitor) or pass --daemon PATH",
            opts.daemon.display()
        );
    }
    let policies = std::fs::canonicalize(&opts.policies).with_context(|| {
        format!(
            "policies {} not found: run from the workspace root or pass --policies PATH",
            opts.policies.display()
        )
    })?;
    let policy_set = PolicySet::load(std::slice::from_ref(&policies))
        .map_err(|e| anyhow!("policies {}: {e}", policies.display()))?;
    agent_monitor::identity::cgroup::cgroup2_mount()
        .context("no cgroup2 mount found in /proc/self/mountinfo")?;

    let tree = TempTree::new("am-demo");
    let kroot = tree.root.join("kubelet");
    let top_name = unique("am-demo");
    let top = TestCgroup::create(&top_name);
    let pid = std::process::id();
    // (Deployment = ServiceAccount = agent label, tier, pod name suffix, volume suffix)
    let specs = [
        ("agent-proxy", "proxy", "7d4b9c6f5-x8k2p", "w5r8t"),
        ("agent-worker-1", "worker", "5c8d7b9f4-q7m3z", "h2k9c"),
        ("agent-worker-2", "worker", "6f9c8d5b7-l4n8v", "p3x7m"),
        ("agent-worker-3", "worker", "8b7d6c9f5-t2w6j", "z9d4q"),
    ];
    let mut pods = Vec::new();
    for (i, (deployment, tier, suffix, vol)) in specs.into_iter().enumerate() {
        let seed = 0xa000_0000 | ((pid & 0xf_ffff) << 4) | i as u32;
        let name = format!("{deployment}-{suffix}");
        let mut sim = SimPod::new(&top_name, seed, &name, deployment);
        sim.sa = deployment.to_owned();
        sim.token_volume = format!("kube-api-access-{vol}");
        let volume = sim.kubelet_volume(&kroot);
        pods.push(Pod { sim, tier, volume });
    }
    let pods_path = tree.root.join("pods.json");
    pods_file(&pods_path, &pods.iter().map(Pod::json).collect::<Vec<_>>());

    // Every pod must be selected by its tier's policy, or the verdicts below mean nothing.
    for p in &pods {
        let Some(policy) = policy_set.for_workload(&p.workload()) else {
            bail!(
                "no policy in {} selects pod {NS}/{} (ServiceAccount {}): the demo needs the two-tier AgentPolicies for namespace {NS}",
                policies.display(),
                p.name(),
                p.sim.sa
            );
        };
        let want = if p.tier == "proxy" {
            Tier::Proxy
        } else {
            Tier::Worker
        };
        if policy.spec.tier.is_some_and(|t| t != want) {
            bail!(
                "policy {:?} in {} gives pod {} another tier than {}",
                policy.metadata.name,
                policies.display(),
                p.name(),
                p.tier
            );
        }
    }

    let net = Network::create()?;
    let events = tree.root.join("events.jsonl");
    let alerts = tree.root.join("alerts.jsonl");
    let journal = tree.root.join("journal");
    let config = tree.root.join("agent-monitor.yaml");
    std::fs::write(
        &config,
        format!(
            "# Written by am-demo.\n\
             output: \"{events}\"\n\
             alerts: {{output: \"{alerts}\"}}\n\
             journal: {{dir: \"{journal}\"}}\n\
             grpc: {{listen: none}}\n\
             admin: {{listen: \"127.0.0.1:0\"}}\n\
             cgroups: [\"{top}\"]\n\
             identity:\n  kubelet_root: \"{kroot}\"\n  pods: {{source: file, file: \"{pods}\"}}\n\
             detect:\n  policies: [\"{policies}\"]\n  api_servers: [\"{API}\"]\n  \
             dns_servers: [\"10.96.0.10\"]\n  cluster_cidrs: [\"10.96.0.0/12\", \"10.244.0.0/16\"]\n",
            events = events.display(),
            alerts = alerts.display(),
            journal = journal.display(),
            top = top.path.display(),
            kroot = kroot.display(),
            pods = pods_path.display(),
            policies = policies.display(),
        ),
    )?;
    Ok(Scene {
        daemon: None,
        net,
        pods,
        top,
        kroot,
        policies,
        config,
        events,
        alerts,
        journal,
        dir: tree.root.clone(),
        _tree: tree,
    })
}

fn describe(scene: &Scene, opts: &Opts) {
    println!("agent-monitor demo: a two-tier agent deployment in namespace {NS}, on this machine");
    for p in &scene.pods {
        println!(
            "  pod      {NS}/{:<31} sa {:<15} tier {:<7} uid {}",
            p.name(),
            p.sim.sa,
            p.tier,
            p.sim.uid
        );
    }
    println!(
        "  cgroups  {}/kubepods.slice/…/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope",
        scene.top.path.display()
    );
    println!(
        "  volumes  {}/pods/<uid>/volumes/kubernetes.io~projected/kube-api-access-…/ (one tmpfs each)",
        scene.kroot.display()
    );
    println!(
        "  network  pods in netns {}; API server {API} in {}; internet {INTERNET}, LLM gateway {GATEWAY}, metadata {METADATA} in {}",
        scene.net.pods.name, scene.net.api.name, scene.net.internet.name
    );
    println!("  policies {}", scene.policies.display());
    println!(
        "  daemon   {} run --config {}",
        opts.daemon.display(),
        scene.config.display()
    );
    println!(
        "  journal  {} (replayed after the daemon stops)",
        scene.journal.display()
    );
}

/// What the live run saw: the daemon's outputs so far.
struct Watch {
    events: Tail,
    alerts: Tail,
    seen: Vec<Alert>,
}

/// Runs one step and waits for the daemon to report it; returns the rules it raised for
/// the step's pod, or why it could not tell.
fn perform(node: &Node, pod: &Pod, step: &Step, watch: &mut Watch) -> Result<Vec<String>> {
    let _ = watch.events.next_lines();
    let before = watch.seen.len();
    match &step.shell {
        Some(cmd) => node.run(pod, false, Run::Shell(cmd))?,
        None => node.run(pod, step.host_kubelet, Run::Agent(&step.actions))?,
    };
    let raised = |seen: &[Alert]| {
        let mut r: Vec<String> = seen[before..]
            .iter()
            .filter(|a| a.pod == pod.name())
            .map(|a| a.rule.clone())
            .collect();
        r.sort_unstable();
        r.dedup();
        r
    };
    // Wait until the daemon has reported the step's open/connect, then for the alerts
    // (written right after, by the same stage) and a little longer for any surplus.
    let mut deadline = Instant::now() + STEP_WAIT;
    let mut got = Vec::new();
    let mut reported = false;
    while Instant::now() < deadline {
        check_interrupted()?;
        got.extend(watch.events.next_lines());
        let new = watch.alerts.next_lines();
        watch.seen.extend(new.iter().map(Alert::from_json));
        if !reported && seen(&got, pod.name(), step.opens(), step.connects()) {
            reported = true;
            deadline = deadline.min(Instant::now() + ALERT_GRACE);
        }
        let now = raised(&watch.seen);
        if reported && step.expect.iter().all(|r| now.iter().any(|n| n == r)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let new = watch.alerts.next_lines();
    watch.seen.extend(new.iter().map(Alert::from_json));
    if !reported {
        bail!(
            "the daemon reported no {} event of the pod within {STEP_WAIT:?}",
            match (step.opens(), step.connects()) {
                (true, true) => "open and connect",
                (true, false) => "open",
                _ => "connect",
            }
        );
    }
    Ok(raised(&watch.seen))
}

/// What is wrong with the final alerts: an expected rule missing for its pod, any alert
/// for the proxy. Prints a note for surplus alerts of the hostile pods.
fn verdict(steps: &[Step], pods: &[Pod], alerts: &[Alert]) -> Vec<String> {
    let mut problems = Vec::new();
    let proxy = pods[0].name();
    for a in alerts.iter().filter(|a| a.pod == proxy) {
        problems.push(format!(
            "the proxy's benign action raised {} ({})",
            a.rule, a.output
        ));
    }
    for (n, step) in steps.iter().enumerate() {
        let pod = pods[step.pod].name();
        for rule in step.expect {
            if alerts
                .iter()
                .any(|a| a.rule == *rule && a.pod == pod && a.namespace == NS)
            {
                continue;
            }
            let elsewhere: Vec<String> = alerts
                .iter()
                .filter(|a| a.rule == *rule)
                .map(Alert::pod_label)
                .collect();
            problems.push(format!(
                "step {} ({pod}: {}): expected {rule} for {NS}/{pod}, none raised{}",
                n + 1,
                step.says,
                if elsewhere.is_empty() {
                    String::new()
                } else {
                    format!(" (raised for {} instead)", elsewhere.join(", "))
                }
            ));
        }
    }
    for a in alerts.iter().filter(|a| a.pod != proxy) {
        let expected = steps
            .iter()
            .any(|s| pods[s.pod].name() == a.pod && s.expect.contains(&a.rule.as_str()));
        if !expected {
            println!(
                "note: also raised: {} for {}: {}",
                a.rule,
                a.pod_label(),
                a.output
            );
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------
// Replaying the journal
// ---------------------------------------------------------------------------------------

/// How long one `agent-monitor replay` may take (it reads a few hundred records).
const REPLAY_WAIT: Duration = Duration::from_secs(60);

/// What one `agent-monitor replay` printed.
struct Replayed {
    /// Stdout, line by line.
    lines: Vec<String>,
    /// Its closing line on stderr (records, runs, damaged stretches, alerts printed).
    summary: String,
    /// Every other stderr line: damage, gaps, alerts left out of a diff.
    notes: Vec<String>,
}

impl Replayed {
    /// The notes that mean the journal did not hold the whole run intact: for a daemon
    /// stopped cleanly, a bug.
    fn damage(&self) -> Vec<String> {
        self.notes
            .iter()
            .filter(|n| {
                ["damaged", "missing", "not compared", "not its start marker"]
                    .iter()
                    .any(|w| n.contains(w))
            })
            .cloned()
            .collect()
    }
}

/// Runs `BINARY replay --journal DIR --format falco ARGS...` (as a user would, from the
/// command line), with its output in files of `dir` named after `tag`.
fn replay(
    binary: &Path,
    journal: &Path,
    args: &[&std::ffi::OsStr],
    dir: &Path,
    tag: &str,
) -> Result<Replayed> {
    let out_path = dir.join(format!("replay-{tag}.out"));
    let err_path = dir.join(format!("replay-{tag}.err"));
    let mut child = Command::new(binary)
        .arg("replay")
        .arg("--journal")
        .arg(journal)
        .args(["--format", "falco"])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("starting {} replay", binary.display()))?;
    let deadline = Instant::now() + REPLAY_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if INTERRUPTED.load(Ordering::SeqCst) || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            check_interrupted()?;
            bail!("agent-monitor replay did not finish within {REPLAY_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&out_path)?;
    let stderr = std::fs::read_to_string(&err_path)?;
    if !status.success() {
        bail!("agent-monitor replay failed ({status}): {}", stderr.trim());
    }
    let (summary, notes): (Vec<&str>, Vec<&str>) = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .partition(|l| l.contains(" records of "));
    Ok(Replayed {
        lines: stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect(),
        summary: summary
            .last()
            .map(|s| s.trim_start_matches("agent-monitor: replay: ").to_owned())
            .unwrap_or_default(),
        notes: notes.into_iter().map(str::to_owned).collect(),
    })
}

/// Counts of each key.
fn key_counts<'a>(alerts: impl IntoIterator<Item = &'a Alert>) -> BTreeMap<AlertKey, usize> {
    let mut m = BTreeMap::new();
    for a in alerts {
        *m.entry(a.key()).or_insert(0) += 1;
    }
    m
}

/// The alerts of `a` that `b` lacks (with multiplicity), briefly.
fn missing_from(a: &[Alert], b: &BTreeMap<AlertKey, usize>) -> Vec<String> {
    let mut left = b.clone();
    let mut out = Vec::new();
    for x in a {
        match left.get_mut(&x.key()) {
            Some(n) if *n > 0 => *n -= 1,
            _ => out.push(x.brief()),
        }
    }
    out
}

/// Parses one Falco JSON line of replay (a diff line without its `- `/`+ `).
fn parse_falco(line: &str) -> Option<Alert> {
    serde_json::from_str::<Value>(line)
        .ok()
        .filter(|v| v.get("rule").is_some())
        .map(|v| Alert::from_json(&v))
}

/// Replay without `--policy` must print the alerts the daemon wrote: the same rule,
/// priority, namespace/pod and triggering events, as many times. It prints the recorded
/// anomalies as recorded (nothing is re-detected), so the whole Falco line should be the
/// same too; a difference there (time, output, fields, hostname) is reported as well,
/// since it would mean the journal does not keep an alert as it was written.
fn check_replay(t0: Instant, recorded: &[Alert], r: &Replayed) -> Vec<String> {
    let mut problems = Vec::new();
    let mut replayed = Vec::new();
    for line in &r.lines {
        match parse_falco(line) {
            Some(a) => replayed.push(a),
            None => problems.push(format!(
                "replay printed a line that is not a Falco alert: {line}"
            )),
        }
    }
    let missing = missing_from(recorded, &key_counts(&replayed));
    let extra = missing_from(&replayed, &key_counts(recorded));
    // Pair by key, in order, to compare whole lines.
    let mut by_key: BTreeMap<AlertKey, Vec<&Alert>> = BTreeMap::new();
    for a in &replayed {
        by_key.entry(a.key()).or_default().push(a);
    }
    let mut differing = Vec::new();
    for a in recorded {
        let Some(b) = by_key
            .get_mut(&a.key())
            .and_then(|v| (!v.is_empty()).then(|| v.remove(0)))
        else {
            continue;
        };
        if a.json != b.json {
            let mut fields: Vec<String> = Vec::new();
            for k in ["time", "priority", "output", "source", "tags", "hostname"] {
                if a.json.get(k) != b.json.get(k) {
                    fields.push(k.to_owned());
                }
            }
            let empty = serde_json::Map::new();
            let fa = a.json["output_fields"].as_object().unwrap_or(&empty);
            let fb = b.json["output_fields"].as_object().unwrap_or(&empty);
            for k in fa.keys().chain(fb.keys().filter(|k| !fa.contains_key(*k))) {
                if fa.get(k) != fb.get(k) {
                    fields.push(format!(
                        "output_fields.{k} ({} vs {})",
                        fa.get(k).unwrap_or(&Value::Null),
                        fb.get(k).unwrap_or(&Value::Null)
                    ));
                }
            }
            differing.push(format!("{}: {}", a.brief(), fields.join(", ")));
        }
    }
    let same = missing.is_empty() && extra.is_empty();
    println!(
        "{} replay --journal (no --policy): {} alerts{}; {}",
        stamp(t0),
        replayed.len(),
        if same {
            format!(
                ", the same {} as the alert file (rule, priority, namespace/pod, triggering events)",
                recorded.len()
            )
        } else {
            format!(", the alert file has {}: MISMATCH", recorded.len())
        },
        match (differing.len(), same) {
            (0, true) => "every Falco line identical".to_owned(),
            (0, false) => "the lines that match are identical".to_owned(),
            (n, _) => format!("{n} matching lines differ in other fields"),
        }
    );
    println!("    ({})", r.summary);
    for m in &missing {
        problems.push(format!(
            "replay without --policy lacks the recorded alert {m}"
        ));
    }
    for e in &extra {
        problems.push(format!(
            "replay without --policy printed an alert the daemon did not write: {e}"
        ));
    }
    for d in &differing {
        problems.push(format!(
            "replay without --policy printed the alert differently: {d}"
        ));
    }
    for n in r.damage() {
        problems.push(format!("replay without --policy: {n}"));
    }
    problems
}

/// Writes to `out` the AgentPolicies of `policies` with one change: the policy that selects
/// `pod` also allows egress to `dest` (its IP as a /32, its port). Returns that policy's
/// name.
fn allowing_policies(policies: &Path, pod: &Pod, dest: SocketAddr, out: &Path) -> Result<String> {
    let old = PolicySet::load(&[policies.to_owned()])
        .map_err(|e| anyhow!("policies {}: {e}", policies.display()))?;
    let policy = old
        .for_workload(&pod.workload())
        .with_context(|| format!("no policy selects {}", pod.name()))?;
    let name = policy.metadata.name.clone().unwrap_or_default();
    let namespace = policy.metadata.namespace.clone();
    let text = std::fs::read_to_string(policies)?;
    // One YAML document per AgentPolicy, separated by `---` lines.
    let mut chunks = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            chunks.push(String::new());
        } else if let Some(last) = chunks.last_mut() {
            last.push_str(line);
            last.push('\n');
        }
    }
    let mut docs = Vec::new();
    let mut changed = 0;
    for chunk in chunks {
        let mut doc: Value = serde_saphyr::from_str(&chunk)
            .map_err(|e| anyhow!("policies {}: {e}", policies.display()))?;
        if doc.is_null() {
            continue;
        }
        let meta = &doc["metadata"];
        let this = doc["kind"].as_str() == Some("AgentPolicy")
            && meta["name"].as_str() == Some(name.as_str())
            && (namespace.is_none() || meta["namespace"].as_str() == namespace.as_deref());
        if this {
            let spec = doc
                .get_mut("spec")
                .and_then(Value::as_object_mut)
                .with_context(|| format!("policy {name} has no spec"))?;
            let egress = spec
                .entry("egress")
                .or_insert_with(|| serde_json::Map::new().into());
            let allow = egress
                .as_object_mut()
                .with_context(|| format!("policy {name}: spec.egress is not a mapping"))?
                .entry("allow")
                .or_insert_with(|| Value::Array(Vec::new()));
            let mut rule = serde_json::Map::new();
            rule.insert("cidr".into(), format!("{}/32", dest.ip()).into());
            rule.insert("ports".into(), Value::Array(vec![dest.port().into()]));
            allow
                .as_array_mut()
                .with_context(|| format!("policy {name}: spec.egress.allow is not a list"))?
                .push(rule.into());
            changed += 1;
        }
        docs.push(serde_saphyr::to_string(&doc).map_err(|e| anyhow!("policy {name}: {e}"))?);
    }
    if changed != 1 {
        bail!(
            "policy {name} found {changed} times in {}",
            policies.display()
        );
    }
    std::fs::write(
        out,
        format!(
            "# Written by am-demo: {}, with {dest} added to the egress allow list of policy {name}.\n{}",
            policies.display(),
            docs.join("---\n")
        ),
    )?;
    // The new file must select the same policy for the pod (and load at all).
    let new = PolicySet::load(&[out.to_owned()])
        .map_err(|e| anyhow!("allowing policies {}: {e}", out.display()))?;
    let picked = new
        .for_workload(&pod.workload())
        .and_then(|p| p.metadata.name.clone());
    if picked.as_deref() != Some(name.as_str()) {
        bail!(
            "allowing policies {}: {} is selected by {picked:?}, not {name}",
            out.display(),
            pod.name()
        );
    }
    Ok(name)
}

/// Replay with the allowing policies and `--diff` must remove exactly the alerts the
/// exfiltration step raised because its destination was not allowed (for `pod`, to
/// `dest`: credential-exfiltration and egress-outside-allowlist), and add nothing.
fn check_diff(
    t0: Instant,
    recorded: &[Alert],
    pod: &str,
    dest: &str,
    policy: &str,
    r: &Replayed,
) -> Vec<String> {
    const JUDGED_BY_ALLOWLIST: [&str; 2] = ["credential-exfiltration", "egress-outside-allowlist"];
    let mut problems = Vec::new();
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    for line in &r.lines {
        let parsed = match line.split_at_checked(2) {
            Some(("- ", rest)) => parse_falco(rest).map(|a| removed.push(a)),
            Some(("+ ", rest)) => parse_falco(rest).map(|a| added.push(a)),
            _ => None,
        };
        if parsed.is_none() {
            problems.push(format!(
                "replay --diff printed a line that is not `- `/`+ ` and a Falco alert: {line}"
            ));
        }
    }
    let expected: Vec<Alert> = recorded
        .iter()
        .filter(|a| {
            a.pod == pod && a.dest == dest && JUDGED_BY_ALLOWLIST.contains(&a.rule.as_str())
        })
        .cloned()
        .collect();
    println!(
        "{} replay --journal --policy <{policy} also allowing {dest}> --diff: {} removed, {} added",
        stamp(t0),
        removed.len(),
        added.len()
    );
    println!("    ({})", r.summary);
    for a in &removed {
        println!("    - {}", a.brief());
    }
    for a in &added {
        println!("    + {}", a.brief());
    }
    if !expected.iter().any(|a| a.rule == "credential-exfiltration") {
        problems.push(format!(
            "the alert file has no credential-exfiltration for {NS}/{pod} to {dest}: the diff has nothing to remove"
        ));
    }
    let unexpected = missing_from(&removed, &key_counts(&expected));
    let kept = missing_from(&expected, &key_counts(&removed));
    // Whatever the diff removes must have been recorded.
    let unrecorded = missing_from(&removed, &key_counts(recorded));
    if unexpected.is_empty() && kept.is_empty() && added.is_empty() && !expected.is_empty() {
        let mut rules: Vec<&str> = removed.iter().map(|a| a.rule.as_str()).collect();
        rules.sort_unstable();
        println!(
            "    = exactly the recorded {} of {NS}/{pod} to {dest} removed (the exfiltration step), nothing else removed, nothing added",
            rules.join(" and ")
        );
    }
    for a in &unexpected {
        problems.push(format!(
            "replay --diff removed an alert the allowing policy should keep: {a}"
        ));
    }
    for a in &kept {
        problems.push(format!("replay --diff did not remove {a}"));
    }
    for a in &unrecorded {
        problems.push(format!(
            "replay --diff removed an alert the daemon never wrote: {a}"
        ));
    }
    for a in &added {
        problems.push(format!("replay --diff added an alert: {}", a.brief()));
    }
    for n in r.damage() {
        problems.push(format!("replay --diff: {n}"));
    }
    problems
}

/// Replays the journal twice: as recorded, then with the policy allowing the exfiltration
/// destination, and checks both against the alert file.
fn check_journal(
    opts: &Opts,
    scene: &Scene,
    steps: &[Step],
    recorded: &[Alert],
    t0: Instant,
) -> Vec<String> {
    let mut problems = Vec::new();
    match replay(&opts.daemon, &scene.journal, &[], &scene.dir, "recorded") {
        Ok(r) => problems.extend(check_replay(t0, recorded, &r)),
        Err(e) => problems.push(format!("replay without --policy: {e:#}")),
    }
    let Some((step, dest)) = steps.iter().find_map(|s| {
        let dest = s.actions.iter().find_map(|a| a.strip_prefix("connect:"))?;
        s.expect
            .contains(&"credential-exfiltration")
            .then(|| (s, dest.to_owned()))
    }) else {
        problems.push("the scenario has no exfiltration step to allow".to_owned());
        return problems;
    };
    let pod = &scene.pods[step.pod];
    let allowing = scene.dir.join("agentpolicies-allowing-exfiltration.yaml");
    let diffed = allowing_policies(&scene.policies, pod, sock(&dest), &allowing).and_then(|name| {
        println!(
            "{} policy {} = {} with {dest} allowed in the egress of policy {name}",
            stamp(t0),
            allowing.display(),
            scene.policies.display()
        );
        // The daemon's config too, for the detection settings (API servers, cluster
        // CIDRs, DNS servers) the recorded alerts were raised with.
        let args = [
            "--policy".as_ref(),
            allowing.as_os_str(),
            "--config".as_ref(),
            scene.config.as_os_str(),
            "--diff".as_ref(),
        ];
        Ok((
            name,
            replay(&opts.daemon, &scene.journal, &args, &scene.dir, "diff")?,
        ))
    });
    match diffed {
        Ok((name, r)) => problems.extend(check_diff(t0, recorded, pod.name(), &dest, &name, &r)),
        Err(e) => problems.push(format!("replay --diff with the allowing policy: {e:#}")),
    }
    problems
}

fn run(opts: &Opts, t0: Instant) -> Result<Vec<String>> {
    let mut scene = set_up(opts)?;
    describe(&scene, opts);
    let node = Node {
        kroot: scene.kroot.clone(),
        self_exe: std::env::current_exe()?,
        netns: scene.net.pods.name.clone(),
    };
    let daemon = scene
        .daemon
        .insert(Daemon::start(&opts.daemon, &scene.config)?);
    println!(
        "{} daemon ready (pid {}, /readyz 200 on {}); alerts to {}",
        stamp(t0),
        daemon.pid(),
        daemon.admin,
        scene.alerts.display()
    );

    let steps = scenario(&scene.pods);
    let mut watch = Watch {
        events: Tail::new(scene.events.clone()),
        alerts: Tail::new(scene.alerts.clone()),
        seen: Vec::new(),
    };
    let mut problems = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        check_interrupted()?;
        let pod = &scene.pods[step.pod];
        print!(
            "{} {} {:<30} {} ",
            stamp(t0),
            if step.hostile { "hostile" } else { "benign " },
            pod.name(),
            step.says
        );
        let _ = std::io::stdout().flush();
        match perform(&node, pod, step, &mut watch) {
            Ok(raised) if raised.is_empty() => println!("-> no alert"),
            Ok(raised) => {
                println!("-> {}", raised.join(", "));
                if !step.hostile {
                    problems.push(format!(
                        "step {} ({}): the benign action raised {}",
                        n + 1,
                        pod.name(),
                        raised.join(", ")
                    ));
                }
            }
            Err(e) => {
                check_interrupted()?;
                println!("-> FAILED");
                problems.push(format!("step {} ({}): {e:#}", n + 1, pod.name()));
            }
        }
    }

    // Stop the daemon (drain and flush), then take its alert file as the record.
    let how = daemon.stop()?;
    println!("{} daemon {how}", stamp(t0));
    let alerts: Vec<Alert> = Tail::new(scene.alerts.clone())
        .next_lines()
        .iter()
        .map(Alert::from_json)
        .collect();
    println!("\nAlerts ({}):", alerts.len());
    print_table(&alerts);
    println!();
    problems.extend(verdict(&steps, &scene.pods, &alerts));
    let log = daemon.log_tail(15);
    problems.extend(check_journal(opts, &scene, &steps, &alerts, t0));
    if !problems.is_empty() {
        println!("daemon log (last lines):\n{log}");
    }
    Ok(problems)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let argv0 = args.first().map(String::as_str).unwrap_or_default();
    if Path::new(argv0).file_name().is_some_and(|n| n == "agent") {
        return agent_main(&args[1..]);
    }
    let opts = match parse_args(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("am-demo: {e:#}");
            return ExitCode::from(2);
        }
    };
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t,
            )
        };
    }
    let t0 = Instant::now();
    let result = std::panic::catch_unwind(|| run(&opts, t0));
    let elapsed = t0.elapsed().as_secs_f64();
    match result {
        Ok(Ok(problems)) if problems.is_empty() => {
            println!("PASS: every expected alert was raised for the right pod, the benign actions raised none, the journal replays to the same alerts and the policy allowing the exfiltration destination removes exactly its alerts ({elapsed:.1} s)");
            ExitCode::SUCCESS
        }
        Ok(Ok(problems)) => {
            println!("FAIL ({elapsed:.1} s):");
            for p in &problems {
                println!("  - {p}");
            }
            ExitCode::from(1)
        }
        Ok(Err(e)) => {
            eprintln!("am-demo: FAIL: {e:#}");
            ExitCode::from(1)
        }
        Err(_) => {
            eprintln!("am-demo: FAIL: set-up panicked (message above)");
            ExitCode::from(1)
        }
    }
}
