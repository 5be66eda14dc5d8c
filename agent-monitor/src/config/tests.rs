use std::net::IpAddr;

use agent_monitor_common::PATH_CAP;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/am.yaml"))
}

#[test]
fn empty_file_is_the_default() {
    let c = parse("").expect("default config");
    assert_eq!(c.watch.prefixes.len(), DEFAULT_PREFIXES.len());
    assert!(c.watch.prefixes.iter().any(|p| p == "/var/run/secrets/"));
    assert!(c.cgroups.is_empty());
}

#[test]
fn journal_is_off_by_default_with_the_journal_defaults() {
    let c = parse("").expect("default config");
    assert!(c.journal.dir.is_none());
    assert_eq!(c.journal.sync_interval_ms, DEFAULT_JOURNAL_SYNC_INTERVAL_MS);
    let c = parse("journal: {dir: /var/lib/am/j, max_age: none, sync_interval_ms: 250}\n")
        .expect("valid");
    assert_eq!(c.journal.dir.as_deref(), Some(Path::new("/var/lib/am/j")));
    assert_eq!(c.journal.max_age(), None);
    assert_eq!(
        c.journal.sync_interval(),
        std::time::Duration::from_millis(250)
    );
    let c = parse("journal: {max_age: 36h}\n").expect("valid");
    assert_eq!(
        c.journal.max_age(),
        Some(std::time::Duration::from_secs(36 * 3600))
    );
}

#[test]
fn fields_override_defaults() {
    let c = parse("watch:\n  prefixes: [/tmp/x/]\nlanes:\n  credential:\n    ring_bytes: 4096\n")
        .expect("valid");
    assert_eq!(c.watch.prefixes, vec!["/tmp/x/".to_owned()]);
    assert_eq!(c.watch.basenames.len(), DEFAULT_BASENAMES.len());
    assert_eq!(c.lanes.credential.ring_bytes, 4096);
    assert_eq!(c.lanes.network.ring_bytes, 1 << 20);
}

#[test]
fn errors_name_file_field_and_expectation() {
    let cases: &[(&str, &[&str])] = &[
        (
            "watch:\n  prefixes: [relative/]\n",
            &["/etc/am.yaml", "watch.prefixes[0]", "absolute"],
        ),
        (
            "watch:\n  basenames: [a/b]\n",
            &["watch.basenames[0]", "without /"],
        ),
        (
            "lanes:\n  network:\n    ring_bytes: 5000\n",
            &["lanes.network.ring_bytes", "power of two", "5000"],
        ),
        (
            "lanes:\n  network:\n    ring_bytes: 4096\n    budget: {burst: 0}\n",
            &["lanes.network.budget.burst", "at least 1"],
        ),
        (
            "lanes:\n  credential:\n    ring_bytes: 4096\n    budget: {pressure_percent: 100}\n",
            &[
                "lanes.credential.budget.pressure_percent",
                "0 (always) to 99",
                "100",
            ],
        ),
        (
            "lanes:\n  network:\n    ring_bytes: big\n",
            &["/etc/am.yaml", "lanes.network.ring_bytes", "u32"],
        ),
        ("wach: {}\n", &["unknown field `wach`"]),
        ("poll_interval_ms: 0\n", &["poll_interval_ms", "1 to 10000"]),
        (
            "kernel_maps: {watched_filesystems: 0}\n",
            &["kernel_maps.watched_filesystems", "1 to 1048576"],
        ),
        ("cgroups: [kubepods]\n", &["cgroups[0]", "absolute"]),
        ("watch: [\n", &["/etc/am.yaml"]),
        (
            "identity:\n  pods:\n    source: file\n",
            &["identity.pods.file", "source is file"],
        ),
        (
            "identity:\n  pods:\n    source: cluster\n",
            &["identity.pods.source", "unknown variant `cluster`"],
        ),
        (
            "log: {format: logfmt}\n",
            &["log.format", "unknown variant `logfmt`"],
        ),
        ("log: {level: debug}\n", &["log", "unknown field `level`"]),
        (
            "identity:\n  kubelet_root: var/lib/kubelet\n",
            &["identity.kubelet_root", "absolute"],
        ),
        (
            "identity:\n  agent_label: \"\"\n",
            &["identity.agent_label"],
        ),
        (
            "identity:\n  pending: {max_events: 0}\n",
            &["identity.pending"],
        ),
        (
            "detect:\n  dns_servers: [10.96.0.10, kube-dns]\n",
            &[
                "/etc/am.yaml",
                "detect.dns_servers[1]",
                "an IP address",
                "kube-dns",
            ],
        ),
        (
            "detect:\n  dns_servers: [\"10.96.0.10:53\"]\n",
            &["detect.dns_servers[0]", "without a port", "10.96.0.10:53"],
        ),
        (
            "detect:\n  dns_servers: 10.96.0.10\n",
            &["/etc/am.yaml", "detect.dns_servers"],
        ),
        (
            "health: {loop_stall_ms: 500}\n",
            &["health.loop_stall_ms", "at least 2000", "500"],
        ),
        (
            "poll_interval_ms: 5000\nhealth: {loop_stall_ms: 9000}\n",
            &["health.loop_stall_ms", "10000", "9000"],
        ),
        (
            "journal: {dir: var/journal}\n",
            &["journal.dir", "absolute", "var/journal"],
        ),
        (
            "journal: {dir: /j, segment_bytes: 100}\n",
            &["journal.segment_bytes", "4096 to", "100"],
        ),
        (
            "journal: {segment_bytes: 1048576, max_bytes: 65536}\n",
            &["journal.max_bytes", "segment_bytes (1048576)", "65536"],
        ),
        (
            "journal: {max_age: 5s}\n",
            &["journal.max_age", "1m to 10years", "5s"],
        ),
        ("journal: {max_age: soon}\n", &["journal.max_age", "soon"]),
        (
            "journal: {sync_interval_ms: 0}\n",
            &["journal.sync_interval_ms", "10 to 60000", "0"],
        ),
        ("journal: {dirr: /j}\n", &["unknown field `dirr`"]),
    ];
    for (text, needles) in cases {
        let err = parse(text).expect_err(text).to_string();
        for n in *needles {
            assert!(err.contains(n), "{text:?}: {err:?} lacks {n:?}");
        }
    }
}

#[test]
fn non_loopback_plain_text_grpc_needs_tls_or_an_explicit_allowance() {
    for listen in ["0.0.0.0:50051", "10.0.0.5:50051", "[::]:50051"] {
        let err = parse(&format!("grpc: {{listen: \"{listen}\"}}\n"))
            .expect_err(listen)
            .to_string();
        for needle in [
            "/etc/am.yaml",
            "grpc.listen",
            "grpc.tls",
            "grpc.allow_insecure: true",
            listen,
        ] {
            assert!(err.contains(needle), "{listen}: {err:?} lacks {needle:?}");
        }
        parse(&format!(
            "grpc: {{listen: \"{listen}\", allow_insecure: true}}\n"
        ))
        .expect("explicitly allowed");
        parse(&format!(
            "grpc: {{listen: \"{listen}\", tls: {{cert: /c.pem, key: /k.pem}}}}\n"
        ))
        .expect("with TLS");
    }
    for listen in [
        "127.0.0.1:50051",
        "127.3.4.5:1",
        "[::1]:50051",
        "[::ffff:127.0.0.1]:9",
        "none",
    ] {
        parse(&format!("grpc: {{listen: \"{listen}\"}}\n")).expect(listen);
    }
    // The admin listener carries no credentials: any address.
    parse("admin: {listen: \"0.0.0.0:9880\"}\n").expect("admin anywhere");
}

#[test]
fn listener_limits_and_shutdown_bound() {
    let c = parse("").expect("default");
    assert_eq!(
        c.grpc.queue_per_client,
        crate::outputs::grpc::DEFAULT_QUEUE_PER_CLIENT
    );
    assert_eq!(
        crate::outputs::grpc::GrpcSettings::default().queue_per_client,
        c.grpc.queue_per_client
    );
    assert_eq!(c.shutdown_timeout(), std::time::Duration::from_secs(10));
    let cases: &[(&str, &[&str])] = &[
        (
            "grpc: {max_connections: 0}\n",
            &["grpc.max_connections", "1 to 65536"],
        ),
        ("admin: {max_connections: 0}\n", &["admin.max_connections"]),
        (
            "grpc: {idle_timeout_ms: 40000}\n",
            &["grpc.idle_timeout_ms", "(50000)"],
        ),
        (
            "admin: {handshake_timeout_ms: 5}\n",
            &["admin.handshake_timeout_ms"],
        ),
        (
            "shutdown_timeout_ms: 0\n",
            &["shutdown_timeout_ms", "100 to 600000"],
        ),
    ];
    for (text, needles) in cases {
        let err = parse(text).expect_err(text).to_string();
        for n in *needles {
            assert!(err.contains(n), "{text:?}: {err:?} lacks {n:?}");
        }
    }
}

#[test]
fn cluster_policies_are_off_by_default_and_need_no_kube_pod_source() {
    assert!(!parse("").expect("default").detect.cluster_policies);
    let c = parse("detect:\n  cluster_policies: true\n").expect("valid");
    assert!(c.detect.cluster_policies);
    assert_eq!(c.identity.pods.source, PodSourceKind::None);
}

#[test]
fn log_format_is_text_by_default_and_json_on_request() {
    assert_eq!(parse("").expect("default").log.format, LogFormat::Text);
    let c = parse("log:\n  format: json\n").expect("valid");
    assert_eq!(c.log.format, LogFormat::Json);
}

#[test]
fn kubelet_paths_are_always_watched() {
    let c =
        parse("identity:\n  kubelet_root: /tmp/k/\nwatch:\n  prefixes: [/x/]\n").expect("valid");
    assert_eq!(
        c.effective_prefixes(),
        vec!["/x/", "/tmp/k/pods/", "/tmp/k/pki/", "/tmp/k/kubeconfig"]
    );
}

#[test]
fn dns_servers_configured_empty_or_absent() {
    let c = parse("detect:\n  dns_servers: [10.96.0.10, \"fd00::a\"]\n").expect("valid");
    let want: Vec<IpAddr> = vec![
        "10.96.0.10".parse().expect("ip"),
        "fd00::a".parse().expect("ip"),
    ];
    assert_eq!(c.detect.effective_dns_servers(), want);
    // `[]` is "no DNS servers", not "use the default".
    let c = parse("detect:\n  dns_servers: []\n").expect("valid");
    assert_eq!(c.detect.dns_servers, Some(Vec::new()));
    assert!(c.detect.effective_dns_servers().is_empty());
    assert_eq!(parse("").expect("valid").detect.dns_servers, None);
}

#[test]
fn resolv_conf_nameservers() {
    let text = "# Generated by NetworkManager\n\
                search cluster.local svc.cluster.local\n\
                nameserver 10.96.0.10\n\
                \tnameserver   fd00::a  # trailing comment\n\
                ;nameserver 10.0.0.1\n\
                #nameserver 10.0.0.2\n\
                nameserver fe80::1%eth0\n\
                nameserver kube-dns.kube-system\n\
                nameserver\n\
                nameservers 10.0.0.3\n\
                nameserver 10.96.0.10\n\
                options ndots:5\n\
                nameserver 169.254.20.10;comment\r\n";
    let want: Vec<IpAddr> = ["10.96.0.10", "fd00::a", "fe80::1", "169.254.20.10"]
        .iter()
        .map(|s| s.parse().expect("ip"))
        .collect();
    assert_eq!(parse_resolv_conf(text), want);
    assert!(parse_resolv_conf("").is_empty());
    assert!(parse_resolv_conf("\u{0}\u{ff}garbage\nnameserver 999.1.1.1\n").is_empty());
}

#[test]
fn resolv_conf_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("resolv.conf");
    assert!(read_resolv_conf(&path).is_empty(), "missing file");
    std::fs::write(&path, "nameserver 10.96.0.10\n").expect("write");
    assert_eq!(
        read_resolv_conf(&path),
        vec!["10.96.0.10".parse::<IpAddr>().expect("ip")]
    );
    // A directory cannot be read as a file.
    assert!(read_resolv_conf(dir.path()).is_empty(), "unreadable");
}

#[test]
fn deep_nesting_is_refused_early() {
    let deep = format!("watch: {}1{}\n", "[".repeat(70), "]".repeat(70));
    let err = parse(&deep).expect_err("too deep").to_string();
    assert_eq!(
        err,
        "config /etc/am.yaml: nested deeper than 64 levels at line 1 column 71"
    );
}

#[test]
fn load_reads_only_bounded_regular_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.yaml");
    let f = std::fs::File::create(&big).expect("create");
    f.set_len(MAX_CONFIG_BYTES + 1).expect("grow");
    let err = Config::load(&big).expect_err("too big").to_string();
    assert_eq!(
        err,
        format!(
            "config {}: larger than 1 MiB: {} bytes",
            big.display(),
            MAX_CONFIG_BYTES + 1
        )
    );
    let err = Config::load(dir.path())
        .expect_err("a directory")
        .to_string();
    assert!(err.ends_with(": not a regular file (a directory)"), "{err}");
    let ok = dir.path().join("ok.yaml");
    std::fs::write(&ok, "poll_interval_ms: 20\n").expect("write");
    assert_eq!(Config::load(&ok).expect("valid").poll_interval_ms, 20);
}

#[test]
fn overlong_prefix_is_rejected() {
    let long = format!("/{}", "a".repeat(PATH_CAP));
    let err = parse(&format!("watch:\n  prefixes: [{long}]\n")).expect_err("too long");
    assert!(err.to_string().contains("at most 255 bytes"), "{err}");
}
