//! A scripted child process for the integration tests and benchmarks: it joins a cgroup
//! and then makes exactly the syscalls its arguments name, printing each result, so a test
//! knows what the kernel saw.
//!
//! Usage: `am-testkid [--cgroup DIR] [--cpu N] [--linger-ms N] ACTION...`
//! (`--cpu N` pins the process to CPU N.)
//!
//! Actions:
//! - `open:PATH`               open(2) (the legacy syscall), read-only
//! - `openat:PATH`             openat(AT_FDCWD, PATH)
//! - `openat-dir:DIR:NAME`     open DIR as a directory fd (kept open), then openat(fd, NAME)
//! - `openat2:PATH`            openat2(AT_FDCWD, PATH)
//! - `chdir:DIR`               chdir(2)
//! - `flood:PATH:N`            N × (openat + close)
//! - `time-opens:PATH:N`       N × (openat + close), prints `ns_per_call <f64>`
//! - `paced-opens:PATH:N:GAP_US` N × (openat + close) with GAP_US µs between opens,
//!   prints `ns_per_call <f64>` (the mean latency of one open)
//! - `flood-mixed:PATH:IP:PORT:N:K` N rounds (0: until killed) of K × (openat + close) and
//!   one TCP connect (IPv4) + close; prints `opens <n>`, `connects <n>` and `elapsed_ns <n>`
//! - `time-connects:IP:PORT:N` N × (TCP connect + close), prints `ns_per_call <f64>`
//! - `time-getppid:N`          N × getppid(2), prints `ns_per_call <f64>`
//! - `tcp4:PORT` `tcp6:PORT`   connect to 127.0.0.1 / ::1
//! - `udp4:PORT`               sendto 127.0.0.1
//! - `connect:IP:PORT`         connect to any address (IPv6 in brackets)
//! - `udp:IP:PORT`             sendto any address (IPv6 in brackets)
//! - `opath-reopen:PATH`       open PATH with O_PATH, then open `/proc/self/fd/N` for reading
//! - `uring-openat:PATH`       IORING_OP_OPENAT through io_uring (no open syscall)
//! - `uring-connect:IP:PORT`   IORING_OP_CONNECT of a TCP socket through io_uring
//! - `keep-connect:IP:PORT`    connect a TCP socket and keep it for `send-kept`
//! - `send-kept:N`             write N bytes on the kept socket
//! - `exec:PROG:ARG...`        execv (must be last)
//!
//! Every result is printed as `<action> <return value>` on stdout.

use std::{
    ffi::CString,
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_else(|_| die(&format!("NUL in {s:?}")))
}

fn die(msg: &str) -> ! {
    eprintln!("am-testkid: {msg}");
    std::process::exit(2)
}

/// The syscall's return value, or `-errno`.
fn ret(r: i64) -> i64 {
    if r < 0 {
        -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        r
    }
}

fn close(fd: i64) {
    if fd >= 0 {
        // SAFETY: fd was returned by open and is ours.
        unsafe { libc::close(fd as i32) };
    }
}

/// Pins the calling process to one CPU.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity get a
    // valid set of the size passed.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        die(&format!(
            "pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ));
    }
}

fn openat(dirfd: i32, path: &str, flags: i32) -> i64 {
    let p = cstr(path);
    // SAFETY: p is a valid C string.
    ret(unsafe { libc::openat(dirfd, p.as_ptr(), flags) } as i64)
}

fn connect(addr: SocketAddr) -> i64 {
    // A blocking connect: the syscall returns 0 or the error, not EINPROGRESS.
    match TcpStream::connect(addr) {
        Ok(_) => 0,
        Err(e) => -i64::from(e.raw_os_error().unwrap_or(0)),
    }
}

/// `sockaddr_in` / `sockaddr_in6` for `addr`, as raw storage and length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Submits one io_uring entry and returns its completion's result.
fn uring_one(entry: io_uring::squeue::Entry) -> i64 {
    let mut ring = io_uring::IoUring::new(4).unwrap_or_else(|e| die(&format!("io_uring: {e}")));
    // SAFETY: every pointer the entry holds outlives the wait below.
    unsafe { ring.submission().push(&entry) }.unwrap_or_else(|_| die("io_uring queue full"));
    ring.submit_and_wait(1)
        .unwrap_or_else(|e| die(&format!("io_uring submit: {e}")));
    let cqe = ring
        .completion()
        .next()
        .unwrap_or_else(|| die("io_uring: no completion"));
    i64::from(cqe.result())
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut linger = Duration::ZERO;
    loop {
        match args.first().map(String::as_str) {
            Some("--cgroup") if args.len() >= 2 => {
                let procs = std::path::Path::new(&args[1]).join("cgroup.procs");
                // Writing 0 moves the writer itself.
                std::fs::write(&procs, b"0")
                    .unwrap_or_else(|e| die(&format!("joining {}: {e}", procs.display())));
                args.drain(..2);
            }
            Some("--cpu") if args.len() >= 2 => {
                let cpu: usize = args[1].parse().unwrap_or_else(|_| die("bad --cpu"));
                pin_to_cpu(cpu);
                args.drain(..2);
            }
            Some("--linger-ms") if args.len() >= 2 => {
                let ms = args[1].parse().unwrap_or_else(|_| die("bad --linger-ms"));
                linger = Duration::from_millis(ms);
                args.drain(..2);
            }
            _ => break,
        }
    }
    let mut out = std::io::stdout().lock();
    let mut kept: Option<TcpStream> = None;
    for action in &args {
        let (verb, rest) = action.split_once(':').unwrap_or((action, ""));
        let result: i64 = match verb {
            "open" => {
                let p = cstr(rest);
                // SAFETY: p is a valid C string.
                let fd = ret(unsafe { libc::syscall(libc::SYS_open, p.as_ptr(), libc::O_RDONLY) });
                close(fd);
                fd
            }
            "openat" => {
                let fd = openat(libc::AT_FDCWD, rest, libc::O_RDONLY);
                close(fd);
                fd
            }
            "openat-dir" => {
                let (dir, name) = rest
                    .split_once(':')
                    .unwrap_or_else(|| die("openat-dir:DIR:NAME"));
                let dfd = openat(libc::AT_FDCWD, dir, libc::O_RDONLY | libc::O_DIRECTORY);
                if dfd < 0 {
                    die(&format!("opening {dir}: {dfd}"));
                }
                let fd = openat(dfd as i32, name, libc::O_RDONLY);
                close(fd);
                // The directory fd stays open until exit, as a long-lived process keeps it;
                // the daemon resolves dirfd-relative paths through /proc/<pid>/fd.
                fd
            }
            "openat2" => {
                let p = cstr(rest);
                // struct open_how { u64 flags; u64 mode; u64 resolve; }
                let how: [u64; 3] = [libc::O_RDONLY as u64, 0, 0];
                // SAFETY: valid C string and open_how of the size passed.
                let fd = ret(unsafe {
                    libc::syscall(
                        libc::SYS_openat2,
                        libc::AT_FDCWD,
                        p.as_ptr(),
                        how.as_ptr(),
                        24usize,
                    )
                });
                close(fd);
                fd
            }
            "chdir" => {
                let p = cstr(rest);
                // SAFETY: valid C string.
                ret(i64::from(unsafe { libc::chdir(p.as_ptr()) }))
            }
            "flood" | "time-opens" => {
                let (path, n) = rest.rsplit_once(':').unwrap_or_else(|| die("PATH:N"));
                let n: u64 = n.parse().unwrap_or_else(|_| die("bad N"));
                let p = cstr(path);
                let start = Instant::now();
                let mut ok = 0i64;
                for _ in 0..n {
                    // SAFETY: valid C string; the fd is closed at once.
                    let fd = unsafe { libc::openat(libc::AT_FDCWD, p.as_ptr(), libc::O_RDONLY) };
                    if fd >= 0 {
                        ok += 1;
                        // SAFETY: fd is ours.
                        unsafe { libc::close(fd) };
                    }
                }
                if verb == "time-opens" {
                    let ns = start.elapsed().as_nanos() as f64 / n.max(1) as f64;
                    let _ = writeln!(out, "ns_per_call {ns:.1}");
                }
                ok
            }
            "paced-opens" => {
                let mut parts = rest.rsplitn(3, ':');
                let (gap, n, path) = match (parts.next(), parts.next(), parts.next()) {
                    (Some(g), Some(n), Some(p)) => (g, n, p),
                    _ => die("paced-opens:PATH:N:GAP_US"),
                };
                let n: u64 = n.parse().unwrap_or_else(|_| die("bad N"));
                let gap = Duration::from_micros(gap.parse().unwrap_or_else(|_| die("bad GAP_US")));
                let p = cstr(path);
                let mut ok = 0i64;
                let mut in_calls = Duration::ZERO;
                let mut next = Instant::now();
                for _ in 0..n {
                    // Paced against a schedule, not by sleeping a gap after each call, so
                    // a late wakeup does not lower the rate.
                    next += gap;
                    let start = Instant::now();
                    // SAFETY: valid C string; the fd is closed at once.
                    let fd = unsafe { libc::openat(libc::AT_FDCWD, p.as_ptr(), libc::O_RDONLY) };
                    in_calls += start.elapsed();
                    if fd >= 0 {
                        ok += 1;
                        // SAFETY: fd is ours.
                        unsafe { libc::close(fd) };
                    }
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                }
                let ns = in_calls.as_nanos() as f64 / n.max(1) as f64;
                let _ = writeln!(out, "ns_per_call {ns:.1}");
                ok
            }
            "flood-mixed" => {
                let mut parts = rest.rsplitn(4, ':');
                let (k, n, addr, path) =
                    match (parts.next(), parts.next(), parts.next(), parts.next()) {
                        (Some(k), Some(n), Some(a), Some(p)) => (k, n, a, p),
                        _ => die("flood-mixed:PATH:IP:PORT:N:K"),
                    };
                // PATH:IP:PORT: the address is the last colon-separated pair of PATH_IP.
                let (path, addr) = match path.rsplit_once(':') {
                    Some((p, ip)) => (p, format!("{ip}:{addr}")),
                    None => die("flood-mixed:PATH:IP:PORT:N:K"),
                };
                let addr: SocketAddr = addr.parse().unwrap_or_else(|_| die("bad address"));
                let n: u64 = n.parse().unwrap_or_else(|_| die("bad N"));
                let k: u64 = k.parse().unwrap_or_else(|_| die("bad K"));
                let p = cstr(path);
                let start = Instant::now();
                let (mut opens, mut connects) = (0i64, 0i64);
                let mut round = 0u64;
                while n == 0 || round < n {
                    round += 1;
                    for _ in 0..k {
                        // SAFETY: valid C string; the fd is closed at once.
                        let fd =
                            unsafe { libc::openat(libc::AT_FDCWD, p.as_ptr(), libc::O_RDONLY) };
                        if fd >= 0 {
                            opens += 1;
                            // SAFETY: fd is ours.
                            unsafe { libc::close(fd) };
                        }
                    }
                    if connect(addr) == 0 {
                        connects += 1;
                    }
                }
                let _ = writeln!(out, "opens {opens}");
                let _ = writeln!(out, "connects {connects}");
                let _ = writeln!(out, "elapsed_ns {}", start.elapsed().as_nanos());
                opens
            }
            "time-connects" => {
                let (addr, n) = rest
                    .rsplit_once(':')
                    .unwrap_or_else(|| die("time-connects:IP:PORT:N"));
                let addr: SocketAddr = addr.parse().unwrap_or_else(|_| die("bad address"));
                let n: u64 = n.parse().unwrap_or_else(|_| die("bad N"));
                let start = Instant::now();
                let mut ok = 0i64;
                for _ in 0..n {
                    if connect(addr) == 0 {
                        ok += 1;
                    }
                }
                let ns = start.elapsed().as_nanos() as f64 / n.max(1) as f64;
                let _ = writeln!(out, "ns_per_call {ns:.1}");
                ok
            }
            "time-getppid" => {
                let n: u64 = rest.parse().unwrap_or_else(|_| die("bad N"));
                let start = Instant::now();
                let mut sum = 0i64;
                for _ in 0..n {
                    // SAFETY: getppid has no preconditions.
                    sum = sum.wrapping_add(i64::from(unsafe { libc::getppid() }));
                }
                let ns = start.elapsed().as_nanos() as f64 / n.max(1) as f64;
                let _ = writeln!(out, "ns_per_call {ns:.1}");
                i64::from(sum != 0)
            }
            "tcp4" | "tcp6" => {
                let port: u16 = rest.parse().unwrap_or_else(|_| die("bad port"));
                let ip = if verb == "tcp4" {
                    Ipv4Addr::LOCALHOST.into()
                } else {
                    Ipv6Addr::LOCALHOST.into()
                };
                connect(SocketAddr::new(ip, port))
            }
            "connect" => {
                let addr: SocketAddr = rest.parse().unwrap_or_else(|_| die("connect:IP:PORT"));
                connect(addr)
            }
            "udp4" => {
                let port: u16 = rest.parse().unwrap_or_else(|_| die("bad port"));
                let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
                    .unwrap_or_else(|e| die(&format!("udp bind: {e}")));
                match sock.send_to(b"ping", (Ipv4Addr::LOCALHOST, port)) {
                    Ok(n) => n as i64,
                    Err(e) => -i64::from(e.raw_os_error().unwrap_or(0)),
                }
            }
            "udp" => {
                let addr: SocketAddr = rest.parse().unwrap_or_else(|_| die("udp:IP:PORT"));
                let bind: SocketAddr = if addr.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let sock = UdpSocket::bind(bind).unwrap_or_else(|e| die(&format!("udp bind: {e}")));
                match sock.send_to(b"ping", addr) {
                    Ok(n) => n as i64,
                    Err(e) => -i64::from(e.raw_os_error().unwrap_or(0)),
                }
            }
            "opath-reopen" => {
                let fd = openat(libc::AT_FDCWD, rest, libc::O_PATH);
                if fd < 0 {
                    die(&format!("O_PATH open of {rest}: {fd}"));
                }
                let again = openat(
                    libc::AT_FDCWD,
                    &format!("/proc/self/fd/{fd}"),
                    libc::O_RDONLY,
                );
                close(again);
                close(fd);
                again
            }
            "uring-openat" => {
                let p = cstr(rest);
                let entry =
                    io_uring::opcode::OpenAt::new(io_uring::types::Fd(libc::AT_FDCWD), p.as_ptr())
                        .flags(libc::O_RDONLY)
                        .build();
                let fd = uring_one(entry);
                close(fd);
                fd
            }
            "uring-connect" => {
                let addr: SocketAddr = rest
                    .parse()
                    .unwrap_or_else(|_| die("uring-connect:IP:PORT"));
                let family = if addr.is_ipv4() {
                    libc::AF_INET
                } else {
                    libc::AF_INET6
                };
                // SAFETY: plain socket(2).
                let fd = unsafe { libc::socket(family, libc::SOCK_STREAM, 0) };
                if fd < 0 {
                    die("socket");
                }
                let (ss, len) = sockaddr(addr);
                let entry = io_uring::opcode::Connect::new(
                    io_uring::types::Fd(fd),
                    &ss as *const _ as *const libc::sockaddr,
                    len,
                )
                .build();
                let r = uring_one(entry);
                close(i64::from(fd));
                r
            }
            "keep-connect" => {
                let addr: SocketAddr = rest.parse().unwrap_or_else(|_| die("keep-connect:IP:PORT"));
                match TcpStream::connect(addr) {
                    Ok(s) => {
                        kept = Some(s);
                        0
                    }
                    Err(e) => -i64::from(e.raw_os_error().unwrap_or(0)),
                }
            }
            "send-kept" => {
                let n: usize = rest.parse().unwrap_or_else(|_| die("send-kept:N"));
                let sock = kept
                    .as_mut()
                    .unwrap_or_else(|| die("send-kept without keep-connect"));
                match sock.write(&vec![b'x'; n]) {
                    Ok(n) => n as i64,
                    Err(e) => -i64::from(e.raw_os_error().unwrap_or(0)),
                }
            }
            "exec" => {
                let mut parts = rest.split(':');
                let prog = parts.next().unwrap_or_else(|| die("exec:PROG"));
                let argv: Vec<CString> = std::iter::once(prog).chain(parts).map(cstr).collect();
                let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
                ptrs.push(std::ptr::null());
                let _ = out.flush();
                let p = cstr(prog);
                // SAFETY: NUL-terminated argv of valid C strings.
                unsafe { libc::execv(p.as_ptr(), ptrs.as_ptr()) };
                die(&format!("exec {prog}: {}", std::io::Error::last_os_error()))
            }
            other => die(&format!("unknown action {other:?}")),
        };
        let _ = writeln!(out, "{action} {result}");
    }
    let _ = out.flush();
    drop(out);
    std::thread::sleep(linger);
}
