//! Adapters that let the gRPC hub, the metrics and the status counters sit in the pipeline
//! as ordinary [`Sink`]s, and the daemon's [`StatusSource`] for `GetStatus`.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use super::{
    falcosidekick::SidekickCounters,
    grpc::{pb, Hub, StatusSource},
    metrics::{Health, Metrics},
    Sink,
};
use crate::{
    detect::Anomaly,
    events::{LostReason, Record},
    outputs::grpc::priority_name,
};

/// The lane a record came through.
pub fn lane_of(record: &Record) -> &str {
    match record {
        Record::Open(_) => "credential",
        Record::Connect(_) => "network",
        Record::Exec(_) | Record::Fork(_) | Record::Exit(_) => "process",
        Record::Lost(l) => l.lane.as_str(),
    }
}

/// Publishes to gRPC subscribers; never blocks (slow clients get gap notices).
pub struct HubSink(pub Hub);

impl Sink<Record> for HubSink {
    fn write(&mut self, r: &Record) -> std::io::Result<()> {
        self.0.publish_event(r);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink<Anomaly> for HubSink {
    fn write(&mut self, a: &Anomaly) -> std::io::Result<()> {
        self.0.publish_anomaly(a);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Counts for metrics, health and `GetStatus`.
#[derive(Default)]
pub struct Counters {
    events: BTreeMap<String, u64>,
    drops: BTreeMap<String, u64>,
    alerts: BTreeMap<String, u64>,
}

/// Feeds [`Metrics`], [`Health`] and the status [`Counters`] from the pipeline.
pub struct Observer {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub counters: Arc<Mutex<Counters>>,
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str, by: u64) {
    *map.entry(key.to_owned()).or_default() += by;
}

impl Sink<Record> for Observer {
    fn write(&mut self, r: &Record) -> std::io::Result<()> {
        let lane = lane_of(r);
        self.health.mark_kernel_activity();
        if let Ok(mut c) = self.counters.lock() {
            match r {
                Record::Lost(l) => bump(&mut c.drops, lane, l.count),
                _ => bump(&mut c.events, lane, 1),
            }
        }
        match r {
            Record::Lost(l) => match (&l.reason, &l.workload) {
                (LostReason::Budget, Some(w)) => self.metrics.record_budget_drop(
                    lane,
                    w.namespace.as_deref().unwrap_or(""),
                    w.pod.as_deref().unwrap_or(""),
                    l.count,
                ),
                _ => self.metrics.record_lost(lane, l.count),
            },
            _ => self.metrics.record_event(lane),
        }
        if let Some(t) = r.task() {
            let now = crate::events::clock_ns(libc::CLOCK_BOOTTIME);
            let age = now - i128::from(t.ts_boot_ns);
            if age >= 0 {
                self.metrics
                    .observe_latency(Duration::from_nanos(age as u64));
            }
        }
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink<Anomaly> for Observer {
    fn write(&mut self, a: &Anomaly) -> std::io::Result<()> {
        self.metrics
            .record_alert(&a.rule, priority_name(a.priority));
        if let Ok(mut c) = self.counters.lock() {
            bump(&mut c.alerts, &a.rule, 1);
        }
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What `GetStatus` reports.
pub struct DaemonStatus {
    pub probes: Vec<String>,
    pub counters: Arc<Mutex<Counters>>,
    pub sidekick: Option<Arc<SidekickCounters>>,
    /// Records waiting between the lane consumer and the outputs.
    pub queue_depth: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Entries in the identity caches.
    pub identity_cache: Arc<std::sync::atomic::AtomicU64>,
    /// What the kernel watches by file identity.
    pub watch: Arc<crate::identity::watched::WatchStatus>,
}

impl StatusSource for DaemonStatus {
    fn status(&self) -> pb::GetStatusResponse {
        let mut s = pb::GetStatusResponse {
            probes_attached: self.probes.clone(),
            identity_cache_size: self.identity_cache.load(Ordering::Relaxed),
            watched_filesystems: self.watch.volumes.load(Ordering::Relaxed),
            watched_inventory: self.watch.inventory.load(Ordering::Relaxed),
            kernel_map_refusals: self.watch.map_full.load(Ordering::Relaxed),
            kernel_map_pending: self.watch.pending.load(Ordering::Relaxed),
            ..Default::default()
        };
        if let Ok(c) = self.counters.lock() {
            s.events_per_lane = c.events.clone().into_iter().collect();
            s.drops_per_lane = c.drops.clone().into_iter().collect();
            s.alerts_per_rule = c.alerts.clone().into_iter().collect();
        }
        s.queue_depths
            .insert("pipeline".into(), (self.queue_depth)());
        if let Some(k) = &self.sidekick {
            let snap = k.snapshot();
            s.queue_depths.insert("falcosidekick".into(), snap.queued);
            s.sink_states
                .insert("falcosidekick".into(), format!("{snap:?}"));
        }
        s
    }
}
