//! Destination classes: where a connection goes, as policy sees it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::policy::{matching::net_contains, DestinationClass};

/// AWS, GCP and Azure serve instance metadata (and credentials) here.
pub const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// AWS's IPv6 instance metadata address.
pub const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// DNS.
pub const DNS_PORT: u16 = 53;
/// DNS over TLS (RFC 7858), which node-local caches and some resolvers serve.
pub const DNS_TLS_PORT: u16 = 853;

/// An API server endpoint: an address, with a port or any port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl Endpoint {
    /// Parses `10.96.0.1`, `10.96.0.1:443`, `[fd00::1]:443` or `fd00::1`.
    pub fn parse(s: &str) -> Option<Self> {
        if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
            return Some(Self {
                ip: sa.ip(),
                port: Some(sa.port()),
            });
        }
        let ip = s
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()?;
        Some(Self { ip, port: None })
    }

    fn matches(&self, ip: IpAddr, port: u16) -> bool {
        self.ip == ip && self.port.is_none_or(|p| p == port)
    }
}

/// What the classifier knows of the cluster.
#[derive(Debug, Clone, Default)]
pub struct Destinations {
    pub api_servers: Vec<Endpoint>,
    /// The cluster's DNS servers: the `dns` class is these on port 53 or 853, nothing else,
    /// so that port 53 to an outside address cannot pass for DNS.
    pub dns_servers: Vec<IpAddr>,
    pub cluster: Vec<IpNet>,
}

/// An IPv4-mapped IPv6 address as IPv4, so `::ffff:169.254.169.254` is metadata too.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Destinations {
    /// The class of `ip:port`, most specific first: loopback, metadata, API server, DNS
    /// (a configured DNS server on a DNS port), cluster, external.
    pub fn classify(&self, ip: IpAddr, port: u16) -> DestinationClass {
        let ip = canonical(ip);
        if ip.is_loopback() {
            return DestinationClass::Loopback;
        }
        if ip == IpAddr::V4(METADATA_V4) || ip == IpAddr::V6(METADATA_V6) {
            return DestinationClass::Metadata;
        }
        if self.api_servers.iter().any(|e| e.matches(ip, port)) {
            return DestinationClass::ApiServer;
        }
        if (port == DNS_PORT || port == DNS_TLS_PORT) && self.is_dns_server(ip) {
            return DestinationClass::Dns;
        }
        if self.cluster.iter().any(|c| net_contains(c, ip)) {
            return DestinationClass::Cluster;
        }
        DestinationClass::External
    }

    /// Whether canonical `ip` is a DNS server; servers are compared canonically too, so a
    /// `::ffff:10.96.0.10` entry matches a connect to `10.96.0.10`.
    fn is_dns_server(&self, ip: IpAddr) -> bool {
        self.dns_servers.iter().any(|s| canonical(*s) == ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::matching::parse_cidr;

    fn dest() -> Destinations {
        Destinations {
            api_servers: vec![
                Endpoint::parse("10.96.0.1:443").expect("endpoint"),
                Endpoint::parse("192.168.10.5").expect("endpoint"),
            ],
            dns_servers: vec![
                "10.96.0.10".parse().expect("ip"),
                "::ffff:169.254.20.10".parse().expect("ip"),
                "fd10::a".parse().expect("ip"),
            ],
            cluster: vec![
                parse_cidr("10.96.0.0/12").expect("cidr"),
                parse_cidr("10.244.0.0/16").expect("cidr"),
                parse_cidr("fd10::/64").expect("cidr"),
            ],
        }
    }

    #[test]
    fn classes() {
        use DestinationClass::*;
        let d = dest();
        let cases: &[(&str, u16, DestinationClass)] = &[
            ("127.0.0.1", 8080, Loopback),
            ("::1", 443, Loopback),
            ("169.254.169.254", 80, Metadata),
            ("::ffff:169.254.169.254", 80, Metadata),
            ("fd00:ec2::254", 80, Metadata),
            ("10.96.0.1", 443, ApiServer),
            ("10.96.0.1", 80, Cluster),
            ("192.168.10.5", 6443, ApiServer),
            ("10.96.0.10", 53, Dns),
            ("10.96.0.10", 853, Dns),
            ("::ffff:10.96.0.10", 53, Dns),
            ("169.254.20.10", 53, Dns),
            ("fd10::a", 53, Dns),
            // A DNS server on another port is ordinary traffic.
            ("10.96.0.10", 80, Cluster),
            ("fd10::a", 443, Cluster),
            ("169.254.20.10", 80, External),
            // Port 53 elsewhere is not DNS: inside the cluster it is cluster traffic,
            // outside it is external (DNS tunnelling to an outside resolver).
            ("8.8.8.8", 53, External),
            ("2001:4860:4860::8888", 853, External),
            ("10.96.0.11", 53, Cluster),
            ("10.244.3.7", 53, Cluster),
            ("10.244.3.7", 8080, Cluster),
            ("fd10::7", 8080, Cluster),
            ("10.200.1.2", 443, External),
            ("2001:db8::1", 443, External),
        ];
        for (ip, port, want) in cases {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(d.classify(ip, *port), *want, "{ip}:{port}");
        }
    }

    #[test]
    fn no_dns_servers_no_dns_class() {
        let d = Destinations {
            dns_servers: Vec::new(),
            ..dest()
        };
        let ip: IpAddr = "10.96.0.10".parse().expect("ip");
        assert_eq!(d.classify(ip, DNS_PORT), DestinationClass::Cluster);
        let ip: IpAddr = "8.8.8.8".parse().expect("ip");
        assert_eq!(d.classify(ip, DNS_PORT), DestinationClass::External);
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Endpoint::parse("[fd00::1]:443").map(|e| e.port),
            Some(Some(443))
        );
        assert_eq!(Endpoint::parse("fd00::1").map(|e| e.port), Some(None));
        assert!(Endpoint::parse("kubernetes.default").is_none());
    }
}
