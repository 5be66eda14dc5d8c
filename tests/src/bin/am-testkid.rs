//! A scripted child process for the integration tests and benchmarks: it joins a cgroup
//! and then makes exactly the syscalls its arguments name, printing each result, so a test
//! knows what the kernel saw.
//!
//! Usage: `am-testkid [--cgroup DIR] [--linger-ms N] ACTION...`
//!
//! Actions:
//! - `open:PATH`               open(2) (the legacy syscall), read-only
//! - `openat:PATH`             openat(AT_FDCWD, PATH)
//! - `openat-dir:DIR:NAME`     open DIR as a directory fd (kept open), then openat(fd, NAME)
//! - `openat2:PATH`            openat2(AT_FDCWD, PATH)
//! - `chdir:DIR`               chdir(2)
//! - `flood:PATH:N`            N × (openat + close)
//! - `time-opens:PATH:N`       N × (openat + close), prints `ns_per_call <f64>`
//! - `tcp4:PORT` `tcp6:PORT`   connect to 127.0.0.1 / ::1
//! - `udp4:PORT`               sendto 127.0.0.1
//! - `connect:IP:PORT`         connect to any address (IPv6 in brackets)
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
            Some("--linger-ms") if args.len() >= 2 => {
                let ms = args[1].parse().unwrap_or_else(|_| die("bad --linger-ms"));
                linger = Duration::from_millis(ms);
                args.drain(..2);
            }
            _ => break,
        }
    }
    let mut out = std::io::stdout().lock();
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
