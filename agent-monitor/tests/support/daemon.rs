//! The real daemon for black-box tests: started with a config, its log followed, stopped
//! with a signal; and a cgroup2 directory to run test processes in, so a daemon filtered on
//! it sees only them. Needs root (the callers check).

#![allow(dead_code, reason = "each test uses the part it needs")]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_agent-monitor");
/// Longest any one expected thing may take (BPF load, a log line).
const WAIT: Duration = Duration::from_secs(60);

/// A cgroup2 directory for one test (`<cgroup2>/<top>/<rest>`, parents included), emptied
/// and removed on drop. `top` is what a daemon's cgroup filter names.
pub struct Cgroup {
    pub path: PathBuf,
    pub top: PathBuf,
}

impl Cgroup {
    pub fn create(name: &str) -> Self {
        Self::nested(name, "")
    }

    /// `<cgroup2>/<top>/<rest>` (`rest` may be empty or several levels).
    pub fn nested(top: &str, rest: &str) -> Self {
        let root = agent_monitor::identity::cgroup::cgroup2_mount().expect("cgroup2");
        let top = root.join(top);
        let path = if rest.is_empty() {
            top.clone()
        } else {
            top.join(rest)
        };
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { path, top }
    }

    /// Starts `script` with `sh` inside this cgroup, without waiting.
    pub fn spawn(&self, script: &str) -> Child {
        let sh = format!(
            "echo $$ > {}/cgroup.procs && exec sh -c '{script}'",
            self.path.display()
        );
        Command::new("sh")
            .args(["-c", &sh])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh")
    }

    /// Runs `script` with `sh` inside this cgroup and waits for it to succeed.
    pub fn run(&self, script: &str) {
        let sh = format!("echo $$ > {}/cgroup.procs && {script}", self.path.display());
        let out = Command::new("sh").args(["-c", &sh]).output().expect("sh");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn kill_all(&self) {
        kill_all(&self.path);
    }
}

fn kill_all(dir: &Path) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
            // SAFETY: plain kill(2) of a test child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let mut dir = self.path.clone();
        loop {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(&dir).is_err() && dir.exists() && Instant::now() < deadline {
                kill_all(&dir);
                std::thread::sleep(Duration::from_millis(20));
            }
            if dir == self.top {
                break;
            }
            match dir.parent() {
                Some(p) => dir = p.to_owned(),
                None => break,
            }
        }
    }
}

/// The daemon and its log (stderr) as it comes. Killed on drop.
pub struct Daemon {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
    pub admin: String,
}

impl Daemon {
    /// Starts `agent-monitor run --config config` and waits until it runs.
    pub fn start(config: &Path) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"]).arg(config);
        Self::spawn(cmd)
    }

    /// As [`Daemon::start`], under umask 000 (files the daemon creates must still be
    /// owner-only).
    pub fn start_under_open_umask(config: &Path) -> Self {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("umask 000 && exec \"$0\" run --config \"$1\"")
            .arg(BIN)
            .arg(config);
        Self::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start daemon");
        let stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut d = Self {
            child,
            lines,
            log: Vec::new(),
            admin: String::new(),
        };
        let line = d.wait_log(&["/readyz on http://"]);
        d.admin = line
            .split("/readyz on http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .expect("admin address")
            .to_owned();
        d.wait_log(&["agent-monitor running"]);
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line holding every needle (seen before or arriving) and returns it.
    pub fn wait_log(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        let found = |l: &String| needles.iter().all(|n| l.contains(n));
        if let Some(l) = self.log.iter().find(|l| found(l)) {
            return l.clone();
        }
        loop {
            let line = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| {
                    panic!("no log line with {needles:?}:\n{}", self.log.join("\n"))
                });
            self.log.push(line.clone());
            if found(&line) {
                return line;
            }
        }
    }

    /// The run id the daemon logged when it opened the journal.
    pub fn run_id(&mut self, dir: &Path) -> String {
        let line = self.wait_log(&[&format!("journal {}: run ", dir.display())]);
        line.split(": run ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no run id in {line}"))
            .to_owned()
    }

    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: plain kill(2) of our child.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {sig}");
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        self.child.wait().expect("wait");
    }

    /// SIGTERM, then the whole log once it has exited successfully.
    pub fn stop(mut self) -> Vec<String> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + WAIT;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.log.push(line);
        }
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "{status}:\n{}", self.log.join("\n"));
        std::mem::take(&mut self.log)
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics")
    }

    /// The whole HTTP response (head and body) to `GET path` on the admin listener.
    pub fn get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(&self.admin).expect("connect admin");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin
        )
        .expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("response");
        body
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
