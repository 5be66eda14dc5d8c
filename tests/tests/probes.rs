//! The probe layer against the real kernel: a child in a fresh cgroup2 directory makes
//! syscalls; the monitor must report exactly those, with the right identity and results.
//! Needs root and BPF (see `agent_monitor_tests::privileged`).

use std::{net::TcpListener, path::Path, time::Duration};

use agent_monitor::{
    config::{BudgetConfig, Config, LaneConfig},
    events::{ConnectRecord, OpenRecord, Record},
};
use agent_monitor_tests::{privileged, run_kid, unique, Harness, TempTree, TestCgroup};

const WAIT: Duration = Duration::from_secs(10);

/// A config watching `<tree>/watched/` and the basename `token`, limited to `cgroup`.
fn config_for(tree: &TempTree, cgroup: Option<&TestCgroup>) -> Config {
    let mut c = Config::default();
    c.watch.prefixes = vec![format!("{}/watched/", tree.root.display())];
    c.watch.basenames = vec!["token".to_owned()];
    c.cgroups = cgroup.map(|c| c.path.clone()).into_iter().collect();
    c
}

fn opens_of(records: &[Record], tgid: u32) -> Vec<&OpenRecord> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Open(o) if o.task.tgid == tgid => Some(o),
            _ => None,
        })
        .collect()
}

fn connects_of(records: &[Record], tgid: u32) -> Vec<&ConnectRecord> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Connect(c) if c.task.tgid == tgid => Some(c),
            _ => None,
        })
        .collect()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn opens_by_absolute_cwd_relative_dirfd_relative_and_openat2_path() {
    if !privileged("opens_by_absolute_cwd_relative_dirfd_relative_and_openat2_path") {
        return;
    }
    let tree = TempTree::new("am-opens");
    let watched = tree.file("watched/token");
    let plain_token = tree.file("plain/token");
    let unwatched = tree.file("plain/notes.txt");
    let watched_dir = tree.root.join("watched");
    let plain = tree.root.join("plain");
    let missing = tree.root.join("watched/missing");
    let cg = TestCgroup::create(&unique("am-test-opens"));
    let mut h = Harness::start(&config_for(&tree, Some(&cg)));

    let actions = vec![
        format!("open:{}", s(&watched)),
        format!("openat:{}", s(&unwatched)),
        format!("chdir:{}", s(&watched_dir)),
        "openat:token".to_owned(),
        format!("openat-dir:{}:token", s(&watched_dir)),
        format!("openat2:{}", s(&watched)),
        format!("openat:{}", s(&missing)),
        // A file named like a credential that the kernel says is not watched.
        format!("openat:{}", s(&plain_token)),
        format!("chdir:{}", s(&plain)),
        "openat:notes.txt".to_owned(),
        // A relative path that does not exist: only its name can say it is watched.
        "openat:gone/token".to_owned(),
    ];
    let kid = run_kid(&cg, 500, &actions);
    h.wait_until(WAIT, |r| opens_of(r, kid.pid).len() >= 6);
    h.settle(Duration::from_millis(300));

    let opens = opens_of(&h.records, kid.pid);
    let summary: Vec<_> = opens
        .iter()
        .map(|o| (&*o.syscall, o.path.as_str(), o.result))
        .collect();
    assert_eq!(opens.len(), 6, "exactly the six watched opens: {summary:?}");
    for o in &opens {
        assert_eq!(o.task.pid, kid.pid, "{o:?}");
        assert_eq!(o.task.cgroup_id, cg.id, "{o:?}");
        assert!(Path::new(&o.path).is_absolute(), "{o:?}");
    }
    // Opens that succeeded are decided by the file: every spelling gives the same file,
    // the same host path, and says how it was spelled.
    for (i, (o, raw)) in opens[..4]
        .iter()
        .zip([
            s(&watched),
            "token".to_owned(),
            "token".to_owned(),
            s(&watched),
        ])
        .enumerate()
    {
        assert_eq!(o.path, s(&watched), "open {i}: {o:?}");
        assert_eq!(o.host_path.as_deref(), Some(s(&watched).as_str()), "{o:?}");
        assert_eq!(o.raw_path, raw, "{o:?}");
        assert_eq!(o.matched_by, "inode", "{o:?}");
        assert!(o.inode.is_some() && o.device.is_some(), "{o:?}");
        assert!(o.result >= 0 && o.error.is_none(), "{o:?}");
    }
    assert_eq!(opens[0].syscall, "open");
    assert_eq!(opens[0].result, kid.result(&actions[0]));
    assert_eq!(opens[1].dirfd, libc::AT_FDCWD);
    assert_eq!(opens[1].result, kid.result(&actions[3]));
    assert!(opens[2].dirfd >= 0, "{:?}", opens[2]);
    assert_eq!(opens[2].result, kid.result(&actions[4]));
    assert_eq!(opens[3].syscall, "openat2");
    assert_eq!(opens[3].result, kid.result(&actions[5]));

    let miss = &opens[4];
    assert_eq!(miss.path, s(&missing));
    assert_eq!(miss.matched_by, "prefix");
    assert_eq!(miss.result, -i64::from(libc::ENOENT));
    assert_eq!(miss.error.as_deref(), Some("ENOENT"));
    assert_eq!(kid.result(&actions[6]), -i64::from(libc::ENOENT));
    assert!(miss.host_path.is_none());

    let gone = &opens[5];
    assert_eq!(gone.raw_path, "gone/token");
    assert_eq!(gone.path, s(&plain.join("gone/token")));
    assert_eq!(gone.matched_by, "basename");
    assert_eq!(gone.result, -i64::from(libc::ENOENT));

    assert!(
        !opens
            .iter()
            .any(|o| o.path.ends_with("notes.txt") || o.path == s(&plain_token)),
        "unwatched file reported: {summary:?}"
    );
}

#[test]
fn connects_over_ipv4_ipv6_and_udp_sendto() {
    if !privileged("connects_over_ipv4_ipv6_and_udp_sendto") {
        return;
    }
    let tree = TempTree::new("am-net");
    let v4 = TcpListener::bind("127.0.0.1:0").expect("bind v4");
    let v6 = TcpListener::bind("[::1]:0").expect("bind v6");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let (p4, p6, pu) = (
        v4.local_addr().expect("addr").port(),
        v6.local_addr().expect("addr").port(),
        udp.local_addr().expect("addr").port(),
    );
    let cg = TestCgroup::create(&unique("am-test-net"));
    let mut h = Harness::start(&config_for(&tree, Some(&cg)));
    let actions = vec![
        format!("tcp4:{p4}"),
        format!("tcp6:{p6}"),
        format!("udp4:{pu}"),
    ];
    let kid = run_kid(&cg, 0, &actions);
    h.wait_until(WAIT, |r| connects_of(r, kid.pid).len() >= 3);
    h.settle(Duration::from_millis(200));

    let c = connects_of(&h.records, kid.pid);
    let got: Vec<_> = c
        .iter()
        .map(|c| {
            (
                &*c.syscall,
                &*c.family,
                c.dst_addr.as_str(),
                c.dst_port,
                c.result,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            // TCP connects are reported where the socket enters SYN-SENT, once.
            ("tcp_connect", "inet", "127.0.0.1", p4, 0),
            ("tcp_connect", "inet6", "::1", p6, 0),
            ("sendto", "inet", "127.0.0.1", pu, 4),
        ]
    );
    assert!(c.iter().all(|c| c.attempted && c.task.cgroup_id == cg.id));
    for (rec, action) in c.iter().zip(&actions) {
        assert_eq!(rec.result, kid.result(action), "{action}");
    }
    let mut buf = [0u8; 8];
    assert_eq!(
        udp.recv(&mut buf).expect("datagram"),
        4,
        "the datagram really went out"
    );
}

#[test]
fn cat_reading_a_watched_file_is_named_by_its_resolved_executable() {
    if !privileged("cat_reading_a_watched_file_is_named_by_its_resolved_executable") {
        return;
    }
    let tree = TempTree::new("am-cat");
    let watched = tree.file("watched/token");
    let cg = TestCgroup::create(&unique("am-test-cat"));
    let mut h = Harness::start(&config_for(&tree, Some(&cg)));
    let kid = run_kid(&cg, 0, &[format!("exec:/bin/cat:{}", s(&watched))]);
    h.wait_until(WAIT, |r| !opens_of(r, kid.pid).is_empty());
    let opens = opens_of(&h.records, kid.pid);
    let cat = std::fs::canonicalize("/bin/cat").expect("/bin/cat");
    assert_eq!(
        opens[0].task.exe.as_deref(),
        Some(s(&cat).as_str()),
        "{:?}",
        opens[0]
    );
    assert_eq!(opens[0].task.comm, "cat");
    assert_eq!(opens[0].path, s(&watched));
    // cat never prints the file here: the test only proves the open was seen.
    assert!(opens[0].result >= 0);
}

#[test]
fn the_daemons_own_opens_are_not_reported() {
    if !privileged("the_daemons_own_opens_are_not_reported") {
        return;
    }
    let tree = TempTree::new("am-self");
    let watched = tree.file("watched/token");
    // No cgroup filter: the only thing keeping this process out is the own-pid filter.
    let mut h = Harness::start(&config_for(&tree, None));
    for _ in 0..20 {
        drop(std::fs::File::open(&watched).expect("open own"));
    }
    // A control open from another process proves the path is watched and events flow.
    let cg = TestCgroup::create(&unique("am-test-self"));
    let kid = run_kid(&cg, 0, &[format!("openat:{}", s(&watched))]);
    h.wait_until(WAIT, |r| !opens_of(r, kid.pid).is_empty());
    h.settle(Duration::from_millis(200));
    let me = std::process::id();
    let mine = opens_of(&h.records, me);
    assert!(mine.is_empty(), "own opens reported: {mine:?}");
    let all: Vec<_> = h
        .records
        .iter()
        .filter_map(|r| match r {
            Record::Open(o) if o.path == s(&watched) => Some(o.task.tgid),
            _ => None,
        })
        .collect();
    assert_eq!(all, vec![kid.pid]);
}

#[test]
fn a_flood_over_a_tiny_ring_is_counted_exactly() {
    if !privileged("a_flood_over_a_tiny_ring_is_counted_exactly") {
        return;
    }
    const OPENS: u64 = 20_000;
    let tree = TempTree::new("am-flood");
    let watched = tree.file("watched/token");
    let cg = TestCgroup::create(&unique("am-test-flood"));
    let mut config = config_for(&tree, Some(&cg));
    // Ring-full counting alone: with the budget on, part of the flood would be dropped
    // over budget instead (counted apart; tests/tests/flood.rs).
    config.lanes.credential = LaneConfig {
        ring_bytes: 4096,
        budget: BudgetConfig {
            per_second: Some(0),
            ..BudgetConfig::default()
        },
    };
    let mut h = Harness::start(&config);
    let kid = run_kid(&cg, 0, &[format!("flood:{}:{OPENS}", s(&watched))]);
    assert_eq!(
        kid.result(&format!("flood:{}:{OPENS}", s(&watched))),
        OPENS as i64
    );
    h.settle(Duration::from_millis(500));
    h.stop();

    let delivered = opens_of(&h.records, kid.pid).len() as u64;
    let lost: Vec<_> = h
        .records
        .iter()
        .filter_map(|r| match r {
            Record::Lost(l) if l.lane == "credential" => Some((l.count, l.total)),
            _ => None,
        })
        .collect();
    let lost_sum: u64 = lost.iter().map(|(c, _)| c).sum();
    assert!(
        lost_sum > 0,
        "a 4 KiB ring must overflow under {OPENS} opens"
    );
    assert_eq!(
        lost.last().map(|(_, t)| *t),
        Some(lost_sum),
        "totals add up"
    );
    assert_eq!(
        delivered + lost_sum,
        OPENS,
        "delivered {delivered} + lost {lost_sum} must equal the opens made"
    );
}

/// The host path is the file's dentry chain as it is at the open: opening a file again
/// names it the same, and renaming a directory above it between two opens (the file's
/// own dentry untouched) gives the new names, not remembered ones.
#[test]
fn a_directory_renamed_above_a_watched_file_changes_its_host_path() {
    if !privileged("a_directory_renamed_above_a_watched_file_changes_its_host_path") {
        return;
    }
    let tree = TempTree::new("am-rename");
    let before = tree.file("a/watched/token");
    let cg = TestCgroup::create(&unique("am-test-rename"));
    let mut c = Config::default();
    c.watch.prefixes = vec![format!("{}/a/watched/", tree.root.display())];
    c.cgroups = vec![cg.path.clone()];
    let mut h = Harness::start(&c);

    let open_before = format!("open:{}", s(&before));
    let first = run_kid(&cg, 200, &[open_before.clone(), open_before]);
    h.wait_until(WAIT, |r| opens_of(r, first.pid).len() >= 2);
    std::fs::rename(tree.root.join("a"), tree.root.join("b")).expect("rename");
    let after = tree.root.join("b/watched/token");
    let second = run_kid(&cg, 200, &[format!("open:{}", s(&after))]);
    h.wait_until(WAIT, |r| !opens_of(r, second.pid).is_empty());
    h.settle(Duration::from_millis(200));

    let firsts = opens_of(&h.records, first.pid);
    assert_eq!(firsts.len(), 2, "{firsts:?}");
    for o in firsts {
        assert_eq!(o.host_path.as_deref(), Some(s(&before).as_str()), "{o:?}");
        assert_eq!(o.matched_by, "inode", "{o:?}");
    }
    let seconds = opens_of(&h.records, second.pid);
    assert_eq!(seconds.len(), 1, "{seconds:?}");
    assert_eq!(
        seconds[0].host_path.as_deref(),
        Some(s(&after).as_str()),
        "{:?}",
        seconds[0]
    );
    assert_eq!(seconds[0].raw_path, s(&after));
    assert_eq!(seconds[0].matched_by, "inode", "{:?}", seconds[0]);
}
