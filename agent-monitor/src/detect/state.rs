//! Bounded state the rules keep between records: process ancestry, recent credential
//! reads (for the exfiltration rule), per-agent baselines and per-(rule, workload) rate
//! limits. Every map has a cap; time is the kernel's CLOCK_BOOTTIME of the records, so a
//! replay of a journal decides exactly as the live daemon did.

use std::collections::{BTreeSet, VecDeque};

// Looked up for every record: foldhash, several times faster than SipHash on these keys.
use foldhash::HashMap;

use crate::identity::credentials::CredentialClass;

/// Most processes whose parent is remembered.
pub const MAX_PARENTS: usize = 65_536;
/// Most processes with recent credential reads remembered.
pub const MAX_READERS: usize = 8_192;
/// Most recent reads remembered per process.
pub const READS_PER_PROCESS: usize = 8;
/// Deepest ancestry walked when looking for the reader of a credential.
pub const MAX_ANCESTRY: usize = 8;
/// Most agents with a baseline.
pub const MAX_BASELINES: usize = 4_096;
/// Most items remembered per baseline set.
pub const MAX_BASELINE_ITEMS: usize = 256;
/// Most workloads with rate-limit windows (each keeps one window per rule it tripped).
pub const MAX_LIMIT_KEYS: usize = 16_384;

/// tgid → (ppid, last seen).
#[derive(Default)]
pub struct Parents {
    map: HashMap<u32, (u32, u64)>,
}

impl Parents {
    pub fn record(&mut self, tgid: u32, ppid: u32, ts: u64) {
        if self.map.len() >= MAX_PARENTS && !self.map.contains_key(&tgid) {
            // Forget the older half: ancestry matters for recent processes.
            let mut seen: Vec<u64> = self.map.values().map(|(_, t)| *t).collect();
            seen.sort_unstable();
            let cut = seen[seen.len() / 2];
            self.map.retain(|_, (_, t)| *t > cut);
        }
        self.map.insert(tgid, (ppid, ts));
    }

    /// `tgid`, its parent, grandparent, ... up to [`MAX_ANCESTRY`] processes.
    pub fn ancestry(&self, tgid: u32) -> Vec<u32> {
        let mut out = vec![tgid];
        let mut cur = tgid;
        while out.len() < MAX_ANCESTRY {
            match self.map.get(&cur) {
                Some(&(ppid, _)) if ppid > 1 && !out.contains(&ppid) => {
                    out.push(ppid);
                    cur = ppid;
                }
                _ => break,
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A credential read remembered for correlation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub ts: u64,
    pub seq: u64,
    pub path: String,
    pub class: CredentialClass,
    pub tgid: u32,
}

/// Recent credential reads by process.
#[derive(Default)]
pub struct Reads {
    map: HashMap<u32, VecDeque<Read>>,
}

impl Reads {
    pub fn record(&mut self, read: Read) {
        if self.map.len() >= MAX_READERS && !self.map.contains_key(&read.tgid) {
            // Drop the process whose last read is oldest.
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, q)| q.back().map_or(0, |r| r.ts))
                .map(|(k, _)| *k)
            {
                self.map.remove(&oldest);
            }
        }
        let q = self.map.entry(read.tgid).or_default();
        if q.len() >= READS_PER_PROCESS {
            q.pop_front();
        }
        q.push_back(read);
    }

    /// The latest read by any of `processes` at most `window_ns` before `ts`.
    pub fn recent(&self, processes: &[u32], ts: u64, window_ns: u64) -> Option<&Read> {
        processes
            .iter()
            .filter_map(|p| self.map.get(p))
            .flat_map(|q| q.iter())
            .filter(|r| r.ts <= ts && ts - r.ts <= window_ns)
            .max_by_key(|r| r.ts)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// What one agent did during its learning window.
pub struct Baseline {
    pub first_seen: u64,
    pub window_ns: u64,
    pub items: BTreeSet<(&'static str, String)>,
}

/// Per-agent baselines.
#[derive(Default)]
pub struct Baselines {
    map: HashMap<String, Baseline>,
}

impl Baselines {
    /// Notes that `agent` did `(kind, item)` at `ts`. Returns true when this is a first-seen
    /// deviation (after the window, never seen before). Learned either way.
    pub fn observe(
        &mut self,
        agent: &str,
        window_ns: u64,
        ts: u64,
        kind: &'static str,
        item: String,
    ) -> bool {
        if !self.map.contains_key(agent) && self.map.len() >= MAX_BASELINES {
            return false;
        }
        let b = self
            .map
            .entry(agent.to_owned())
            .or_insert_with(|| Baseline {
                first_seen: ts,
                window_ns,
                items: BTreeSet::new(),
            });
        b.window_ns = window_ns;
        let key = (kind, item);
        if b.items.contains(&key) {
            return false;
        }
        let learning = ts < b.first_seen.saturating_add(b.window_ns);
        if b.items.len() < MAX_BASELINE_ITEMS {
            b.items.insert(key);
        }
        !learning
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Outcome of asking the rate limiter.
#[derive(Debug, PartialEq, Eq)]
pub enum Limit {
    /// Emit; `suppressed_before` alerts of this key were suppressed in the window that
    /// just ended and have not been reported yet.
    Pass { suppressed_before: u64 },
    /// Do not emit; counted.
    Suppressed,
}

struct Window {
    start: u64,
    count: u32,
    suppressed: u64,
}

/// At most `per_window` alerts per (rule, workload) per window; the excess is counted and
/// reported, never dropped silently. Checked for every hit, most of which it suppresses
/// under a flood: a check allocates nothing once the workload is known.
pub struct RateLimiter {
    per_window: u32,
    window_ns: u64,
    /// By workload key, each rule's window (a workload trips a handful of rules).
    map: HashMap<String, Vec<(&'static str, Window)>>,
}

impl RateLimiter {
    pub fn new(per_window: u32, window_ns: u64) -> Self {
        Self {
            per_window,
            window_ns,
            map: HashMap::default(),
        }
    }

    pub fn check(&mut self, rule: &'static str, key: &str, ts: u64) -> Limit {
        let (per_window, window_ns) = (self.per_window, self.window_ns);
        if let Some(windows) = self.map.get_mut(key) {
            return Self::count(windows, rule, ts, per_window, window_ns);
        }
        if self.map.len() >= MAX_LIMIT_KEYS {
            // Windows that ended with nothing suppressed carry no information.
            self.map.retain(|_, windows| {
                windows.retain(|(_, w)| w.suppressed > 0 || ts.saturating_sub(w.start) < window_ns);
                !windows.is_empty()
            });
        }
        let windows = self.map.entry(key.to_owned()).or_default();
        Self::count(windows, rule, ts, per_window, window_ns)
    }

    /// Counts a hit of `rule` at `ts` in a workload's `windows`.
    fn count(
        windows: &mut Vec<(&'static str, Window)>,
        rule: &'static str,
        ts: u64,
        per_window: u32,
        window_ns: u64,
    ) -> Limit {
        let i = match windows.iter().position(|(r, _)| *r == rule) {
            Some(i) => i,
            None => {
                windows.push((
                    rule,
                    Window {
                        start: ts,
                        count: 0,
                        suppressed: 0,
                    },
                ));
                windows.len() - 1
            }
        };
        let w = &mut windows[i].1;
        let mut suppressed_before = 0;
        if ts.saturating_sub(w.start) >= window_ns {
            suppressed_before = w.suppressed;
            *w = Window {
                start: ts,
                count: 0,
                suppressed: 0,
            };
        }
        if w.count < per_window {
            w.count += 1;
            Limit::Pass { suppressed_before }
        } else {
            w.suppressed += 1;
            Limit::Suppressed
        }
    }

    /// Windows that ended by `ts` with alerts suppressed: (rule, key, count). They are
    /// reset, so each suppression is reported once.
    pub fn expired(&mut self, ts: u64) -> Vec<(String, String, u64)> {
        let mut out = Vec::new();
        for (key, windows) in self.map.iter_mut() {
            for (rule, w) in windows.iter_mut() {
                if w.suppressed > 0 && ts.saturating_sub(w.start) >= self.window_ns {
                    out.push(((*rule).to_owned(), key.clone(), w.suppressed));
                    w.suppressed = 0;
                }
            }
        }
        out.sort();
        out
    }

    /// (rule, workload) pairs with a window.
    pub fn len(&self) -> usize {
        self.map.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn ancestry_walks_parents_and_stops() {
        let mut p = Parents::default();
        p.record(30, 20, 1);
        p.record(20, 10, 1);
        p.record(10, 1, 1);
        assert_eq!(p.ancestry(30), vec![30, 20, 10]);
        // A cycle (pid reuse) cannot loop.
        p.record(10, 30, 2);
        assert_eq!(p.ancestry(30), vec![30, 20, 10]);
    }

    #[test]
    fn parents_are_bounded() {
        let mut p = Parents::default();
        for pid in 0..(MAX_PARENTS as u32 + 10) {
            p.record(pid + 2, 1, u64::from(pid));
        }
        assert!(p.len() <= MAX_PARENTS);
        // The newest survive.
        assert_eq!(p.ancestry(MAX_PARENTS as u32 + 11).len(), 1);
        assert!(p.map.contains_key(&(MAX_PARENTS as u32 + 11)));
    }

    fn read(tgid: u32, ts: u64, seq: u64) -> Read {
        Read {
            ts,
            seq,
            path: "/t".into(),
            class: CredentialClass::ServiceAccountToken,
            tgid,
        }
    }

    #[test]
    fn reads_within_the_window_only() {
        let mut r = Reads::default();
        r.record(read(7, 10 * S, 1));
        r.record(read(7, 20 * S, 2));
        assert_eq!(r.recent(&[7], 25 * S, 30 * S).map(|x| x.seq), Some(2));
        assert_eq!(r.recent(&[7], 49 * S, 30 * S).map(|x| x.seq), Some(2));
        assert_eq!(r.recent(&[7], 51 * S, 30 * S), None);
        assert_eq!(r.recent(&[8], 25 * S, 30 * S), None);
        // A read after the connect does not explain it.
        assert_eq!(r.recent(&[7], 5 * S, 30 * S), None);
    }

    #[test]
    fn reads_are_bounded() {
        let mut r = Reads::default();
        for i in 0..20 {
            r.record(read(7, i, i));
        }
        assert_eq!(r.map[&7].len(), READS_PER_PROCESS);
        for pid in 0..(MAX_READERS as u32 + 5) {
            r.record(read(pid + 100, 1000 + u64::from(pid), 0));
        }
        assert!(r.len() <= MAX_READERS);
    }

    #[test]
    fn baseline_learns_then_flags_first_seen() {
        let mut b = Baselines::default();
        assert!(!b.observe("a", 60 * S, 0, "dest", "api-server".into()));
        assert!(!b.observe("a", 60 * S, 30 * S, "dest", "dns".into()));
        assert!(b.observe("a", 60 * S, 61 * S, "dest", "external".into()));
        // Reported once.
        assert!(!b.observe("a", 60 * S, 62 * S, "dest", "external".into()));
        assert!(!b.observe("a", 60 * S, 63 * S, "dest", "dns".into()));
    }

    #[test]
    fn rate_limit_counts_and_reports_suppressed() {
        let mut l = RateLimiter::new(2, 60 * S);
        assert_eq!(
            l.check("r", "k", 0),
            Limit::Pass {
                suppressed_before: 0
            }
        );
        assert_eq!(
            l.check("r", "k", S),
            Limit::Pass {
                suppressed_before: 0
            }
        );
        assert_eq!(l.check("r", "k", 2 * S), Limit::Suppressed);
        assert_eq!(l.check("r", "k", 3 * S), Limit::Suppressed);
        assert_eq!(
            l.check("r", "other", 3 * S),
            Limit::Pass {
                suppressed_before: 0
            }
        );
        assert!(l.expired(59 * S).is_empty());
        assert_eq!(l.expired(61 * S), vec![("r".into(), "k".into(), 2)]);
        assert!(l.expired(62 * S).is_empty(), "reported once");
    }

    #[test]
    fn a_new_window_carries_what_was_suppressed() {
        let mut l = RateLimiter::new(1, 60 * S);
        assert_eq!(
            l.check("r", "k", 0),
            Limit::Pass {
                suppressed_before: 0
            }
        );
        assert_eq!(l.check("r", "k", S), Limit::Suppressed);
        assert_eq!(
            l.check("r", "k", 70 * S),
            Limit::Pass {
                suppressed_before: 1
            }
        );
    }
}
