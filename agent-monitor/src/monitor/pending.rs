//! Records waiting for their pod: the events of a brand-new container arrive before the
//! pod's metadata does (the API server or the pods file is a moment behind the kernel), so
//! they wait a little instead of leaving with no pod.
//!
//! A record waits while its attribution is incomplete, at most `max_wait`; the queue holds
//! at most `capacity` records (the oldest then leaves as it is). One pod's records leave in
//! the order they came: a record of a pod that already has one waiting waits behind it,
//! even when it could be attributed itself. Other pods are not held up.

use std::{
    collections::{BTreeSet, VecDeque},
    time::{Duration, Instant},
};

use crate::events::Record;

/// A record waiting for its pod's metadata.
struct Waiting {
    record: Record,
    deadline: Instant,
}

/// What [`PendingQueue::offer`] decided.
#[derive(Debug, Default)]
pub struct Offer {
    /// To send now: the record offered, when it need not wait.
    pub send: Option<Record>,
    /// The oldest waiting record, pushed out by a full queue: to send as it is.
    pub evicted: Option<Record>,
}

/// The waiting records, in arrival order.
pub struct PendingQueue {
    waiting: VecDeque<Waiting>,
    max_wait: Duration,
    capacity: usize,
}

fn pod_uid(r: &Record) -> Option<&str> {
    r.task().and_then(|t| t.workload.pod_uid.as_deref())
}

impl PendingQueue {
    pub fn new(max_wait: Duration, capacity: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            max_wait,
            capacity,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A freshly attributed record (`complete`: its attribution is final): sent at once,
    /// or parked.
    pub fn offer(&mut self, record: Record, complete: bool, now: Instant) -> Offer {
        let uid = pod_uid(&record);
        let behind_waiting =
            uid.is_some() && self.waiting.iter().any(|w| pod_uid(&w.record) == uid);
        if complete && !behind_waiting {
            return Offer {
                send: Some(record),
                evicted: None,
            };
        }
        let evicted = if self.waiting.len() >= self.capacity.max(1) {
            self.waiting.pop_front().map(|w| w.record)
        } else {
            None
        };
        self.waiting.push_back(Waiting {
            record,
            deadline: now + self.max_wait,
        });
        Offer {
            send: None,
            evicted,
        }
    }

    /// The waiting records that may leave now, in order: those `attribute` (called again on
    /// each, to refresh its attribution) finds complete, and those whose wait is over;
    /// never one behind a record of its pod that stays.
    pub fn release(
        &mut self,
        now: Instant,
        mut attribute: impl FnMut(&mut Record) -> bool,
    ) -> Vec<Record> {
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(self.waiting.len());
        let mut blocked: BTreeSet<String> = BTreeSet::new();
        while let Some(mut w) = self.waiting.pop_front() {
            let complete = attribute(&mut w.record);
            let uid = pod_uid(&w.record).map(str::to_owned);
            let is_blocked = uid.as_ref().is_some_and(|u| blocked.contains(u));
            if (complete || now >= w.deadline) && !is_blocked {
                out.push(w.record);
            } else {
                if let Some(u) = uid {
                    blocked.insert(u);
                }
                keep.push_back(w);
            }
        }
        self.waiting = keep;
        out
    }

    /// Everything still waiting, in order (the consumer is stopping).
    pub fn drain(&mut self) -> Vec<Record> {
        self.waiting.drain(..).map(|w| w.record).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ExitRecord, Task, Workload};

    /// A record of pod `uid` (none: a host process), numbered `n` in `ts_boot_ns`.
    fn record(n: u64, uid: Option<&str>) -> Record {
        Record::Exit(ExitRecord {
            seq: 0,
            task: Task {
                time: String::new(),
                ts_boot_ns: n,
                pid: 1,
                tgid: 1,
                ppid: None,
                uid: 0,
                gid: 0,
                comm: String::new(),
                exe: None,
                cgroup_id: 1,
                start_ns: 0,
                workload: Workload {
                    pod_uid: uid.map(str::to_owned),
                    ..Workload::default()
                }
                .into(),
            },
        })
    }

    fn ns(records: &[Record]) -> Vec<u64> {
        records
            .iter()
            .filter_map(|r| r.task().map(|t| t.ts_boot_ns))
            .collect()
    }

    const WAIT: Duration = Duration::from_millis(500);

    #[test]
    fn a_complete_record_leaves_at_once_and_an_incomplete_one_waits_for_its_pod() {
        let t0 = Instant::now();
        let mut q = PendingQueue::new(WAIT, 8);
        let o = q.offer(record(1, Some("a")), true, t0);
        assert_eq!(ns(&o.send.into_iter().collect::<Vec<_>>()), [1]);
        let o = q.offer(record(2, Some("b")), false, t0);
        assert!(o.send.is_none() && o.evicted.is_none());
        // Still unknown: stays.
        assert!(q.release(t0, |_| false).is_empty());
        // Known now: leaves.
        assert_eq!(ns(&q.release(t0, |_| true)), [2]);
        assert!(q.drain().is_empty());
    }

    #[test]
    fn one_pods_records_keep_their_order_and_other_pods_pass() {
        let t0 = Instant::now();
        let mut q = PendingQueue::new(WAIT, 8);
        assert!(q.offer(record(1, Some("a")), false, t0).send.is_none());
        // Pod a's next record is complete, but waits behind its first.
        assert!(q.offer(record(2, Some("a")), true, t0).send.is_none());
        // Pod b is not held up by pod a.
        assert!(q.offer(record(3, Some("b")), true, t0).send.is_some());
        // Only record 2 could go: it stays behind record 1.
        let only_two = |r: &mut Record| r.task().is_some_and(|t| t.ts_boot_ns == 2);
        assert!(q.release(t0, only_two).is_empty());
        assert_eq!(ns(&q.release(t0, |_| true)), [1, 2]);
    }

    #[test]
    fn a_record_leaves_without_its_pod_when_its_wait_is_over() {
        let t0 = Instant::now();
        let mut q = PendingQueue::new(WAIT, 8);
        q.offer(record(1, Some("a")), false, t0);
        q.offer(record(2, None), false, t0 + WAIT / 2);
        assert!(q.release(t0 + WAIT / 4, |_| false).is_empty());
        assert_eq!(ns(&q.release(t0 + WAIT, |_| false)), [1]);
        assert_eq!(ns(&q.release(t0 + WAIT * 2, |_| false)), [2]);
    }

    #[test]
    fn a_full_queue_pushes_out_its_oldest_record() {
        let t0 = Instant::now();
        let mut q = PendingQueue::new(WAIT, 2);
        assert!(q.offer(record(1, Some("a")), false, t0).evicted.is_none());
        assert!(q.offer(record(2, Some("b")), false, t0).evicted.is_none());
        let o = q.offer(record(3, Some("c")), false, t0);
        assert_eq!(ns(&o.evicted.into_iter().collect::<Vec<_>>()), [1]);
        assert_eq!(ns(&q.drain()), [2, 3]);
    }
}
