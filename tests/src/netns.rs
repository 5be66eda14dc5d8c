//! A network namespace joined to the host by a veth pair, with TCP listeners inside it:
//! a real remote host for egress tests that never leaves the machine.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::fd::AsRawFd as _,
    process::Command,
};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip netns add` plus a veth pair: the host side gets `<net>.1/24`, the namespace side
/// `<net>.2/24`. Deleted (with the pair) on drop.
pub struct NetNs {
    pub name: String,
    /// The address inside the namespace.
    pub remote: Ipv4Addr,
}

impl NetNs {
    /// `third_octet` picks the subnet 10.213.<third_octet>.0/24.
    pub fn create(tag: &str, third_octet: u8) -> Self {
        let name = format!("am-{tag}-{}", std::process::id());
        let host_if = format!("amh{}{}", third_octet, std::process::id() % 10_000);
        let ns_if = format!("amn{}{}", third_octet, std::process::id() % 10_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&[
            "addr",
            "add",
            &format!("10.213.{third_octet}.1/24"),
            "dev",
            &host_if,
        ]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("10.213.{third_octet}.2/24"),
            "dev",
            &ns_if,
        ]);
        ip(&["-n", &name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self {
            name,
            remote: Ipv4Addr::new(10, 213, third_octet, 2),
        }
    }

    /// A TCP listener inside the namespace on `port`, accepting (and closing) connections
    /// on a background thread for as long as the test runs.
    pub fn listen(&self, port: u16) -> SocketAddr {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        let addr = SocketAddr::from((self.remote, port));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only; the fd is a valid netns file.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let listener = TcpListener::bind(addr).expect("bind in netns");
            tx.send(()).expect("ready");
            for conn in listener.incoming() {
                drop(conn);
            }
        });
        rx.recv().expect("listener ready");
        addr
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // The veth pair goes with the namespace.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
