//! The daemon's listeners and shutdown, black-box: the real binary with a config file,
//! real TCP connections and a real Unix socket.
//!
//! - thousands of idle connections to the admin and gRPC ports leave `/healthz` answering
//!   within a second, with the daemon held to 1,024 descriptors;
//! - `agent_monitor_grpc_clients` is the number of connected stream clients;
//! - SIGTERM with 10 stream clients connected exits within `shutdown_timeout_ms`, every
//!   client's stream ends with UNAVAILABLE, and a restart binds the same ports at once;
//! - a plain-text gRPC listener on a non-loopback address is refused by `check-config` and
//!   `run` (that one needs no root).
//!
//! Needs root and BPF for `run` (see `privileged`).

#[path = "support/privileged.rs"]
mod support_privileged;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use support_privileged::privileged;

use agent_monitor::{api::pb, outputs::grpc::connect};

const BIN: &str = env!("CARGO_BIN_EXE_agent-monitor");
/// How long anything that has no bound of its own may take before the test gives up: a
/// broken daemon fails the test instead of hanging it. Nothing asserts speed with it.
const PATIENCE: Duration = Duration::from_secs(60);

/// The running daemon; killed if the test fails half-way.
struct Daemon {
    child: Child,
    grpc: String,
    admin: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `agent-monitor run --config <config>`, waits until it runs, and learns its
    /// gRPC and admin addresses from its log. `nofile`: the child's RLIMIT_NOFILE.
    fn start(config: &Path, nofile: Option<u64>) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and only reads `lim`, a copy owned by
            // the closure.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("start daemon");
        let stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                keep.lock().expect("log").push(line.clone());
                let _ = tx.send(line);
            }
        });
        let mut daemon = Daemon {
            child,
            grpc: String::new(),
            admin: String::new(),
            log,
        };
        let deadline = Instant::now() + PATIENCE;
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("daemon did not start:\n{}", daemon.log_text()));
            if let Some(rest) = line.split("gRPC API on ").nth(1) {
                daemon.grpc = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
            if let Some(rest) = line.split("/readyz on http://").nth(1) {
                daemon.admin = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
            if line.contains("agent-monitor running") {
                return daemon;
            }
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    /// Descriptors the daemon has open now.
    fn open_descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("daemon's fd directory")
            .count()
    }

    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

/// One `GET` on a new connection, `Connection: close`: the whole response.
fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(PATIENCE)).expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    body
}

/// The value of the one sample `series` (name and labels exactly) in `/metrics`.
fn sample(admin: &str, series: &str) -> Option<f64> {
    let metrics = http_get(admin, "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn config(dir: &Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!("output: none\nalerts: {{output: none}}\n{body}"),
    )
    .expect("config");
    path
}

/// Makes room for `n` descriptors in this test process.
fn allow_descriptors(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < n {
            lim.rlim_cur = n.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    assert!(
        lim.rlim_cur >= n,
        "the test needs {n} descriptors; its hard limit is {}",
        lim.rlim_max
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn thousands_of_idle_connections_leave_healthz_answering_within_a_second() {
    if !privileged("thousands_of_idle_connections_leave_healthz_answering_within_a_second") {
        return;
    }
    const IDLE: usize = 5_000;
    // The daemon gets 1,024 descriptors (a common default soft limit), far fewer than the
    // connections made to it: only its limits keep it within them.
    const DAEMON_NOFILE: u64 = 1024;
    allow_descriptors(2 * IDLE as u64 + 512);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        dir.path(),
        "grpc: {listen: \"127.0.0.1:0\"}\nadmin: {listen: \"127.0.0.1:0\"}\n",
    );
    let daemon = Daemon::start(&cfg, Some(DAEMON_NOFILE));

    // Connections that never send a byte, to both ports.
    let mut idle = Vec::with_capacity(2 * IDLE);
    for addr in [&daemon.admin, &daemon.grpc] {
        for _ in 0..IDLE {
            idle.push(TcpStream::connect(addr.as_str()).expect("idle connection"));
        }
    }

    // With all of them still open on this side: a probe on a new connection, timed from
    // connect to the last byte of the response.
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let start = Instant::now();
        let response = http_get(&daemon.admin, "/healthz");
        let took = start.elapsed();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "{response}\n{}",
            daemon.log_text()
        );
        slowest = slowest.max(took);
    }
    assert!(
        slowest < Duration::from_secs(1),
        "/healthz took {slowest:?} with {IDLE} idle connections on each port"
    );
    // The gRPC API serves a real client too.
    let rt = runtime();
    let status = rt.block_on(async {
        let mut client = connect(&daemon.grpc, None).await.expect("gRPC connect");
        client
            .get_status(pb::GetStatusRequest::default())
            .await
            .expect("GetStatus")
            .into_inner()
    });
    assert!(!status.probes_attached.is_empty());

    let fds = daemon.open_descriptors();
    assert!(fds < DAEMON_NOFILE as usize, "{fds} descriptors open");
    let admin_open = sample(
        &daemon.admin,
        "agent_monitor_connections{listener=\"admin\"}",
    )
    .expect("admin connections gauge");
    let grpc_open = sample(
        &daemon.admin,
        "agent_monitor_connections{listener=\"grpc_tcp\"}",
    )
    .expect("gRPC connections gauge");
    assert!(admin_open <= 64.0, "{admin_open}");
    assert!(grpc_open <= 256.0, "{grpc_open}");
    let closed = |listener: &str| {
        sample(
            &daemon.admin,
            &format!(
                "agent_monitor_connections_closed_total{{listener=\"{listener}\",reason=\"evicted\"}}"
            ),
        )
        .expect("evicted counter")
    };
    // Every idle connection beyond a listener's cap was closed to make room.
    assert!(closed("admin") >= (IDLE - 64) as f64, "{}", closed("admin"));
    assert!(
        closed("grpc_tcp") >= (IDLE - 256) as f64,
        "{}",
        closed("grpc_tcp")
    );
    eprintln!(
        "{IDLE} idle connections on each port: slowest /healthz {slowest:?}; daemon: {fds} descriptors, {} KiB resident; admitted: admin {admin_open}, gRPC {grpc_open}",
        daemon.rss_kib()
    );
    drop(idle);
}

#[test]
fn quiet_stream_clients_are_kept_alive_and_silent_connections_are_closed() {
    if !privileged("quiet_stream_clients_are_kept_alive_and_silent_connections_are_closed") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // Short timeouts, so that the test sees several keepalive rounds and idle windows.
    let sock = dir.path().join("am.sock");
    let cfg = config(
        dir.path(),
        &format!(
            "grpc: {{listen: \"127.0.0.1:0\", unix_socket: \"{}\", handshake_timeout_ms: 500, \
             idle_timeout_ms: 2500, keepalive_interval_ms: 1000, keepalive_timeout_ms: 1000}}\n\
             admin: {{listen: \"127.0.0.1:0\", handshake_timeout_ms: 500}}\n",
            sock.display()
        ),
    );
    let daemon = Daemon::start(&cfg, None);
    let rt = runtime();
    // Streams that receive nothing (anomalies of a namespace that does not exist), over
    // TCP and the Unix socket. Their clients send nothing either, except answers to the
    // server's keepalive pings.
    let streams: Vec<_> = [daemon.grpc.clone(), format!("unix:{}", sock.display())]
        .into_iter()
        .map(|endpoint| {
            let (client, mut s) = rt.block_on(async {
                let mut client = connect(&endpoint, None).await.expect("connect");
                let s = client
                    .stream_anomalies(pb::StreamAnomaliesRequest {
                        filter: Some(pb::Filter {
                            allow: Some(pb::Selector {
                                namespaces: vec!["no-such-namespace".into()],
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        resume_after: None,
                    })
                    .await
                    .expect("StreamAnomalies")
                    .into_inner();
                (client, s)
            });
            let stream = rt.spawn(async move {
                let _client = client;
                s.message().await
            });
            (endpoint, stream)
        })
        .collect();
    // Connections that never send a byte, to both ports: closed by the daemon.
    for addr in [&daemon.grpc, &daemon.admin] {
        let mut silent = TcpStream::connect(addr.as_str()).expect("connect");
        silent.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut buf = [0u8; 256];
        loop {
            // The gRPC server writes its HTTP/2 SETTINGS first; then the close comes.
            match silent.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{addr}: {e}"),
            }
        }
    }
    // Several idle windows later the quiet stream is still open.
    std::thread::sleep(Duration::from_millis(3 * 2500));
    for (endpoint, stream) in streams {
        assert!(
            !stream.is_finished(),
            "{endpoint}: {:?}",
            rt.block_on(stream)
        );
    }
    assert_eq!(
        sample(&daemon.admin, "agent_monitor_grpc_clients"),
        Some(2.0)
    );
    for (listener, reason, at_least) in [
        ("grpc_tcp", "handshake_timeout", 1.0),
        ("admin", "handshake_timeout", 1.0),
    ] {
        let series = format!(
            "agent_monitor_connections_closed_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
        );
        let n = sample(&daemon.admin, &series).expect("counter");
        assert!(n >= at_least, "{series} {n}");
    }
    assert_eq!(
        sample(
            &daemon.admin,
            "agent_monitor_connections_closed_total{listener=\"grpc_tcp\",reason=\"idle_timeout\"}"
        ),
        Some(0.0)
    );
}

#[test]
fn grpc_clients_metric_counts_connected_stream_clients() {
    if !privileged("grpc_clients_metric_counts_connected_stream_clients") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        dir.path(),
        "grpc: {listen: \"127.0.0.1:0\"}\nadmin: {listen: \"127.0.0.1:0\"}\n",
    );
    let daemon = Daemon::start(&cfg, None);
    let clients = || sample(&daemon.admin, "agent_monitor_grpc_clients");
    assert_eq!(clients(), Some(0.0));
    let rt = runtime();
    let streams = rt.block_on(async {
        let mut streams = Vec::new();
        for _ in 0..3 {
            let mut client = connect(&daemon.grpc, None).await.expect("connect");
            let stream = client
                .stream_events(pb::StreamEventsRequest::default())
                .await
                .expect("StreamEvents")
                .into_inner();
            streams.push((client, stream));
        }
        streams
    });
    // The call returned: its subscription exists, and the gauge is set as it is made.
    assert_eq!(clients(), Some(3.0));
    drop(streams);
    // The daemon learns of the disconnects from the HTTP/2 resets.
    let deadline = Instant::now() + PATIENCE;
    while clients() != Some(0.0) {
        assert!(Instant::now() < deadline, "still {:?} clients", clients());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_with_ten_stream_clients_exits_within_the_bound_and_a_restart_binds_at_once() {
    if !privileged(
        "sigterm_with_ten_stream_clients_exits_within_the_bound_and_a_restart_binds_at_once",
    ) {
        return;
    }
    const BOUND_MS: u64 = 10_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("am.sock");
    let cfg = config(
        dir.path(),
        &format!(
            "grpc: {{listen: \"127.0.0.1:0\", unix_socket: \"{}\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\nshutdown_timeout_ms: {BOUND_MS}\n",
            sock.display()
        ),
    );
    let mut daemon = Daemon::start(&cfg, None);
    let rt = runtime();
    // Ten stream clients: events and anomalies, over TCP and the Unix socket.
    let unix = format!("unix:{}", sock.display());
    let endings = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..10 {
            let endpoint = if i % 2 == 0 {
                daemon.grpc.clone()
            } else {
                unix.clone()
            };
            let mut client = connect(&endpoint, None).await.expect("connect");
            let task = if i < 5 {
                let mut s = client
                    .stream_events(pb::StreamEventsRequest::default())
                    .await
                    .expect("StreamEvents")
                    .into_inner();
                tokio::spawn(async move {
                    loop {
                        match s.message().await {
                            Ok(Some(_)) => {}
                            Ok(None) => return None,
                            Err(status) => return Some(status),
                        }
                    }
                })
            } else {
                let mut s = client
                    .stream_anomalies(pb::StreamAnomaliesRequest::default())
                    .await
                    .expect("StreamAnomalies")
                    .into_inner();
                tokio::spawn(async move {
                    loop {
                        match s.message().await {
                            Ok(Some(_)) => {}
                            Ok(None) => return None,
                            Err(status) => return Some(status),
                        }
                    }
                })
            };
            tasks.push(task);
        }
        tasks
    });
    assert_eq!(
        sample(&daemon.admin, "agent_monitor_grpc_clients"),
        Some(10.0)
    );

    let start = Instant::now();
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    assert_eq!(unsafe { libc::kill(daemon.pid(), libc::SIGTERM) }, 0);
    let status = loop {
        if let Some(status) = daemon.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_millis(BOUND_MS) + PATIENCE,
            "still running"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = start.elapsed();
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
    assert!(
        took < Duration::from_millis(BOUND_MS),
        "SIGTERM took {took:?} with 10 stream clients (bound {BOUND_MS} ms)\n{}",
        daemon.log_text()
    );
    rt.block_on(async {
        for (i, task) in endings.into_iter().enumerate() {
            let ended = tokio::time::timeout(PATIENCE, task)
                .await
                .expect("stream ended")
                .expect("client task");
            let status = ended.unwrap_or_else(|| panic!("client {i}: stream ended with OK"));
            assert_eq!(
                status.code(),
                tonic::Code::Unavailable,
                "client {i}: {status:?}"
            );
            assert_eq!(
                status.message(),
                "agent-monitor is shutting down",
                "client {i}"
            );
        }
    });
    eprintln!("SIGTERM with 10 stream clients: exited in {took:?}");

    // At once, on the same ports and socket path.
    let (grpc, admin) = (daemon.grpc.clone(), daemon.admin.clone());
    let again = config(
        dir.path(),
        &format!(
            "grpc: {{listen: \"{grpc}\", unix_socket: \"{}\"}}\nadmin: {{listen: \"{admin}\"}}\n",
            sock.display()
        ),
    );
    let restarted = Daemon::start(&again, None);
    assert_eq!(
        (restarted.grpc.as_str(), restarted.admin.as_str()),
        (grpc.as_str(), admin.as_str())
    );
    assert!(http_get(&admin, "/readyz").starts_with("HTTP/1.1 200"));
    let status = rt.block_on(async {
        connect(&unix, None)
            .await
            .expect("connect over the new socket")
            .get_status(pb::GetStatusRequest::default())
            .await
    });
    assert!(status.is_ok(), "{status:?}");
}

#[test]
fn a_client_that_never_reads_is_abandoned_at_the_bound_and_the_daemon_exits() {
    if !privileged("a_client_that_never_reads_is_abandoned_at_the_bound_and_the_daemon_exits") {
        return;
    }
    // Above the time detaching the probes takes (each tracepoint waits out an RCU grace
    // period: about 1.3 s for all of them here), which is part of every exit.
    const BOUND_MS: u64 = 5_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        dir.path(),
        &format!(
            "grpc: {{listen: \"127.0.0.1:0\", queue_per_client: 256}}\n\
             admin: {{listen: \"127.0.0.1:0\"}}\nshutdown_timeout_ms: {BOUND_MS}\n"
        ),
    );
    let mut daemon = Daemon::start(&cfg, None);
    let rt = runtime();
    // Subscribed to every event, and never reading: its HTTP/2 windows (64 KiB) fill, so
    // the end of its stream can never be delivered. Its connection still answers pings.
    let (_stuck_client, _stuck_stream, mut status_client) = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", daemon.grpc))
            .expect("endpoint")
            .initial_stream_window_size(Some(65_535))
            .initial_connection_window_size(Some(65_535))
            .connect()
            .await
            .expect("connect");
        let mut client = pb::agent_monitor_client::AgentMonitorClient::new(channel);
        let stream = client
            .stream_events(pb::StreamEventsRequest::default())
            .await
            .expect("StreamEvents")
            .into_inner();
        let other = connect(&daemon.grpc, None).await.expect("connect");
        (client, stream, other)
    });
    // Processes come and go (fork, exec, exit events) until the client's queue overflows,
    // and for well over its window's worth of events (each several hundred bytes).
    let deadline = Instant::now() + PATIENCE;
    let mut spawned = 0;
    loop {
        for _ in 0..100 {
            Command::new("true").status().expect("true");
        }
        spawned += 100;
        let missed = rt.block_on(async {
            status_client
                .get_status(pb::GetStatusRequest::default())
                .await
                .expect("GetStatus")
                .into_inner()
                .items_missed
        });
        if missed > 0 && spawned >= 500 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the client's queue never overflowed"
        );
    }
    drop(status_client);
    let start = Instant::now();
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    assert_eq!(unsafe { libc::kill(daemon.pid(), libc::SIGTERM) }, 0);
    let status = loop {
        if let Some(status) = daemon.child.try_wait().expect("wait") {
            break status;
        }
        assert!(start.elapsed() < PATIENCE, "still running");
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(BOUND_MS),
        "SIGTERM took {took:?} (bound {BOUND_MS} ms)"
    );
    // The log reader has the last lines once the pipe closed.
    let deadline = Instant::now() + PATIENCE;
    while !daemon.log_text().contains("abandoned") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = daemon.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "shutdown did not finish within {BOUND_MS} ms; abandoned: gRPC connections still open (1 stream clients were told to go away)"
        )),
        "{log}"
    );
    eprintln!("SIGTERM with a client that never reads: exited in {took:?}");
}

#[test]
fn plain_text_grpc_on_a_non_loopback_address_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        dir.path(),
        "grpc: {listen: \"0.0.0.0:0\"}\nadmin: {listen: none}\n",
    );
    for command in ["check-config", "run"] {
        let out = Command::new(BIN)
            .args([command, "--config"])
            .arg(&cfg)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{command}: {stderr}");
        for needle in [
            "grpc.listen",
            "0.0.0.0:0",
            "grpc.tls",
            "grpc.allow_insecure: true",
        ] {
            assert!(
                stderr.contains(needle),
                "{command}: {stderr:?} lacks {needle:?}"
            );
        }
    }
    // Explicitly allowed, it passes.
    let allowed = config(
        dir.path(),
        "grpc: {listen: \"0.0.0.0:0\", allow_insecure: true}\nadmin: {listen: none}\n",
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&allowed)
        .output()
        .expect("check-config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_output_nobody_reads_stalls_only_the_outputs() {
    if !privileged("an_output_nobody_reads_stalls_only_the_outputs") {
        return;
    }
    const BOUND_MS: u64 = 5_000;
    let dir = tempfile::tempdir().expect("tempdir");
    // The event output is a FIFO with a reader that never reads: the daemon's open
    // succeeds, then its writes block once the pipe's 64 KiB are full.
    let fifo = dir.path().join("events.fifo");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo reads a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let (opened_tx, opened_rx) = mpsc::channel();
    let reader_path = fifo.clone();
    std::thread::spawn(move || {
        // Opened for reading and held, never read from: keeps the writer's open from
        // failing and its writes from getting EPIPE.
        let f = std::fs::File::open(reader_path).expect("open fifo for reading");
        let _ = opened_tx.send(());
        std::thread::sleep(PATIENCE);
        drop(f);
    });
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "output: {}\nalerts: {{output: none}}\n\
             grpc: {{listen: \"127.0.0.1:0\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
             health: {{loop_stall_ms: 2000}}\nshutdown_timeout_ms: {BOUND_MS}\n",
            fifo.display()
        ),
    )
    .expect("config");
    let mut daemon = Daemon::start(&path, None);
    opened_rx.recv_timeout(PATIENCE).expect("fifo reader");
    // Process events until the pipe is full and the pipeline stops in its write.
    let deadline = Instant::now() + PATIENCE;
    let reason = loop {
        for _ in 0..50 {
            Command::new("true").status().expect("true");
        }
        let health = http_get(&daemon.admin, "/healthz");
        if health.starts_with("HTTP/1.1 503") {
            break health;
        }
        assert!(
            Instant::now() < deadline,
            "the pipeline never stalled: {health}\n{}",
            daemon.log_text()
        );
    };
    // The runtime still answers, and says which loop stopped.
    assert!(reason.contains("pipeline loop stalled"), "{reason}");
    assert!(sample(&daemon.admin, "agent_monitor_probes_attached").is_some());
    let start = Instant::now();
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    assert_eq!(unsafe { libc::kill(daemon.pid(), libc::SIGTERM) }, 0);
    let status = loop {
        if let Some(status) = daemon.child.try_wait().expect("wait") {
            break status;
        }
        assert!(start.elapsed() < PATIENCE, "still running");
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(BOUND_MS),
        "SIGTERM took {took:?} (bound {BOUND_MS} ms)"
    );
    let deadline = Instant::now() + PATIENCE;
    while !daemon.log_text().contains("abandoned") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = daemon.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("abandoned: the outputs"), "{log}");
    eprintln!("SIGTERM with a blocked output: exited in {took:?}");
}
