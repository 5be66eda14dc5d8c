//! Adapters that let the gRPC hub, the metrics and the status counters sit in the pipeline
//! as ordinary [`Sink`]s, and the daemon's [`StatusSource`] for `GetStatus`.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use super::{
    falcosidekick::SidekickCounters,
    grpc::{Hub, StatusSource},
    metrics::{Health, Metrics},
    AlertItem, EventItem, Sink,
};
use crate::{
    api::{event_lane, pb, priority_name},
    policy::sources::PolicySources,
};

/// Items held by a [`HubSink`] before they are published together.
const HUB_BATCH: usize = 256;

/// Publishes to gRPC subscribers; never blocks (slow clients get gap notices). Events are
/// published in batches, at every flush (the pipeline flushes whenever its queue is
/// empty) or every [`HUB_BATCH`] events: a client is then woken once per batch, not once
/// per event, which under load costs more than the event itself. Anomalies go at once.
pub struct HubSink<P> {
    hub: Hub,
    held: Vec<Arc<P>>,
    /// The batch published before the last one, released at the next publish: by then its
    /// clients have (nearly always) dropped their references, so the last reference, and
    /// with it the message's dozens of allocations, is freed on the pipeline's thread that
    /// made them. Freed on a client's thread, each allocation is a cross-thread free,
    /// which costs more than the rest of the fan-out.
    released: Vec<Arc<P>>,
    /// Events written while no event client was subscribed, counted as published at the
    /// next flush.
    unpublished: u64,
}

impl<P> HubSink<P> {
    pub fn new(hub: Hub) -> Self {
        Self {
            hub,
            held: Vec::with_capacity(HUB_BATCH),
            released: Vec::with_capacity(HUB_BATCH),
            unpublished: 0,
        }
    }

    /// Keeps the batch just published until the next publish (see `released`).
    fn keep_published(&mut self) {
        self.released.clear();
        std::mem::swap(&mut self.released, &mut self.held);
    }
}

impl Sink<EventItem> for HubSink<EventItem> {
    fn write(&mut self, e: &EventItem) -> std::io::Result<()> {
        // With no event client (the usual case on a node nobody is tailing) an event is
        // only counted: nothing would take it.
        if !self.hub.has_event_clients() {
            self.unpublished += 1;
            return Ok(());
        }
        self.held.push(Arc::new(e.clone()));
        if self.held.len() >= HUB_BATCH {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.unpublished > 0 {
            self.hub.count_unpublished_events(self.unpublished);
            self.unpublished = 0;
        }
        self.hub.publish_events(&self.held);
        self.keep_published();
        Ok(())
    }
}

impl Sink<AlertItem> for HubSink<pb::Anomaly> {
    /// Published at once: anomalies are few, and one must not wait behind a busy queue
    /// (the pipeline flushes only when its queue runs empty) to reach a client.
    fn write(&mut self, a: &AlertItem) -> std::io::Result<()> {
        self.held.push(a.api.clone());
        self.flush()
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.hub.publish_anomalies(&self.held);
        self.held.clear();
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

/// Events an [`Observer`] counts before it hands the counts on.
const OBSERVE_BATCH: usize = 256;

/// Feeds [`Metrics`], [`Health`] and the status [`Counters`] from the pipeline.
///
/// Events are counted here and handed on together, at every flush (the pipeline flushes
/// whenever its queue runs empty) and every [`OBSERVE_BATCH`] events: one lock of the
/// status counters, one metric update per lane and one read of the clock per batch
/// instead of per event. The pipeline latency of each event in a batch is its age when
/// the batch is handed on, which is when its outputs have written it. Losses are counted
/// at once.
pub struct Observer {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    counters: Arc<Mutex<Counters>>,
    /// Events per lane not yet handed on.
    events: Vec<(&'static str, u64)>,
    /// How many events that is.
    pending: usize,
    /// Kernel time stamps (CLOCK_BOOTTIME ns) of the events not yet handed on.
    stamps: Vec<u64>,
}

impl Observer {
    pub fn new(metrics: Arc<Metrics>, health: Arc<Health>, counters: Arc<Mutex<Counters>>) -> Self {
        Self {
            metrics,
            health,
            counters,
            events: Vec::new(),
            pending: 0,
            stamps: Vec::with_capacity(OBSERVE_BATCH),
        }
    }

    /// Hands the events counted so far to the health, the status counters and the
    /// metrics.
    fn hand_on(&mut self) {
        if self.events.is_empty() {
            return;
        }
        self.health.mark_kernel_activity();
        if let Ok(mut c) = self.counters.lock() {
            for &(lane, n) in &self.events {
                bump(&mut c.events, lane, n);
            }
        }
        for (lane, n) in self.events.drain(..) {
            self.metrics.record_events(lane, n);
        }
        self.pending = 0;
        let now = crate::events::clock_ns(libc::CLOCK_BOOTTIME);
        for ts in self.stamps.drain(..) {
            let age = now - i128::from(ts);
            if age >= 0 {
                self.metrics
                    .observe_latency(Duration::from_nanos(age as u64));
            }
        }
    }
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str, by: u64) {
    // The key is owned only the first time it is seen, not allocated for every record.
    match map.get_mut(key) {
        Some(n) => *n += by,
        None => {
            map.insert(key.to_owned(), by);
        }
    }
}

impl Sink<EventItem> for Observer {
    fn write(&mut self, e: &EventItem) -> std::io::Result<()> {
        let e = &*e.api;
        let lane = event_lane(e);
        if let Some(pb::event::Kind::Lost(l)) = &e.kind {
            self.health.mark_kernel_activity();
            if let Ok(mut c) = self.counters.lock() {
                bump(&mut c.drops, lane, l.count);
            }
            match (l.reason(), &e.workload) {
                (pb::LostReason::Budget, Some(w)) => {
                    self.metrics
                        .record_budget_drop(lane, &w.namespace, &w.pod, l.count)
                }
                _ => self.metrics.record_lost(lane, l.count),
            }
        } else {
            match self.events.iter_mut().find(|(l, _)| *l == lane) {
                Some((_, n)) => *n += 1,
                None => self.events.push((lane, 1)),
            }
            self.pending += 1;
            if let Some(p) = &e.process {
                self.stamps.push(p.ts_boot_ns);
            }
        }
        if self.pending >= OBSERVE_BATCH {
            self.hand_on();
        }
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.hand_on();
        Ok(())
    }
}

impl Sink<AlertItem> for Observer {
    fn write(&mut self, a: &AlertItem) -> std::io::Result<()> {
        let a = &a.item;
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
    /// The policies in force and the cluster objects rejected.
    pub policies: Arc<PolicySources>,
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
            policy_files: self.policies.file_count() as u64,
            cluster_policies: self.policies.cluster_count() as u64,
            cluster_policy_rejections: self
                .policies
                .cluster_rejections()
                .into_iter()
                .map(|(k, reason)| (k.to_string(), reason))
                .collect(),
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

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    use super::*;
    use crate::{
        api::Origin,
        detect::Anomaly,
        events::{LostReason, LostRecord, Record},
        outputs::grpc::{Delivery, Matcher},
    };

    fn lost(seq: u64) -> Record {
        Record::Lost(LostRecord {
            seq,
            time: "2026-11-23T07:00:00.000000001Z".into(),
            lane: "network".into(),
            count: 1,
            total: seq,
            reason: LostReason::RingFull,
            workload: None,
        })
    }

    #[tokio::test]
    async fn events_reach_clients_at_a_flush_or_a_full_batch_and_anomalies_at_once() {
        let hub = Hub::new(2 * HUB_BATCH, Origin::default());
        let mut sub = hub.subscribe_events(Matcher::new(None).expect("no filter"));
        let mut events = HubSink::<EventItem>::new(hub.clone());
        let origin = Origin::default();
        events.write(&origin.event_item(lost(1))).expect("write");
        assert_eq!(hub.events_published(), 0, "held until the flush");
        events.flush().expect("flush");
        assert_eq!(hub.events_published(), 1);
        match sub.next().await {
            Some(Delivery::Item(e)) => assert_eq!(e.api.seq, 1),
            other => panic!("expected the event, got {other:?}"),
        }
        // A busy pipeline that never runs empty still publishes every batch.
        for seq in 2..2 + HUB_BATCH as u64 {
            events.write(&origin.event_item(lost(seq))).expect("write");
        }
        assert_eq!(hub.events_published(), 1 + HUB_BATCH as u64);
        for want in 2..2 + HUB_BATCH as u64 {
            match sub.next().await {
                Some(Delivery::Item(e)) => assert_eq!(e.api.seq, want),
                other => panic!("expected event {want}, got {other:?}"),
            }
        }
        let mut alerts = HubSink::<pb::Anomaly>::new(hub.clone());
        let anomaly = Anomaly {
            seq: 9,
            time: "2026-11-23T07:00:00.000000001Z".into(),
            rule: "events-lost".into(),
            priority: crate::policy::Priority::Error,
            output: "lost".into(),
            tags: Vec::new(),
            workload: Default::default(),
            fields: Default::default(),
            events: vec![1],
        };
        alerts.write(&origin.alert_item(anomaly)).expect("write");
        assert_eq!(hub.anomalies_published(), 1, "an anomaly is not held");
    }

    /// Without an event client the sink holds nothing and only counts what it was given;
    /// a client that subscribes gets every event written from then on, and once it is
    /// gone the sink holds nothing again.
    #[tokio::test]
    async fn events_are_held_for_the_hub_only_while_a_client_is_subscribed() {
        let hub = Hub::new(2 * HUB_BATCH, Origin::default());
        let mut events = HubSink::<EventItem>::new(hub.clone());
        let origin = Origin::default();
        assert!(!hub.has_event_clients());
        for seq in 1..=3 {
            events.write(&origin.event_item(lost(seq))).expect("write");
        }
        assert!(events.held.is_empty(), "nobody to hold them for");
        events.flush().expect("flush");
        assert_eq!(hub.events_published(), 3, "counted all the same");

        let mut sub = hub.subscribe_events(Matcher::new(None).expect("no filter"));
        assert!(hub.has_event_clients());
        events.write(&origin.event_item(lost(4))).expect("write");
        events.flush().expect("flush");
        assert_eq!(hub.events_published(), 4);
        match sub.next().await {
            Some(Delivery::Item(e)) => assert_eq!(e.api.seq, 4),
            other => panic!("expected event 4, got {other:?}"),
        }
        drop(sub);
        assert!(!hub.has_event_clients(), "the client left");
        events.write(&origin.event_item(lost(5))).expect("write");
        assert!(events.held.is_empty());
        // An anomaly client is no event client.
        let _anomalies = hub.subscribe_anomalies(Matcher::new(None).expect("no filter"));
        assert!(!hub.has_event_clients());
        events.flush().expect("flush");
        assert_eq!(hub.events_published(), 5);
    }

    /// The observer hands on what it counted at every flush and, under load that never
    /// lets the pipeline's queue run empty, every batch: the status counters, the event
    /// metric and the latency histogram each end with exactly the events written.
    #[test]
    fn the_observer_hands_on_exact_counts_at_a_flush_and_every_batch() {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new(Duration::from_secs(10)));
        let counters = Arc::new(Mutex::new(Counters::default()));
        let mut observer = Observer::new(metrics.clone(), health.clone(), counters.clone());
        let origin = Origin::default();
        let open = |seq: u64| {
            let mut item = origin.event_item(lost(seq));
            let e = Arc::make_mut(&mut item.api);
            e.kind = Some(pb::event::Kind::Open(pb::CredentialAccess::default()));
            e.process = Some(pb::Process {
                ts_boot_ns: 1,
                ..Default::default()
            });
            item
        };
        let events = |c: &Arc<Mutex<Counters>>| c.lock().expect("lock").events.clone();
        let line = |name: &str| {
            metrics
                .render()
                .lines()
                .find(|l| l.starts_with(name))
                .map(str::to_owned)
        };

        observer.write(&open(1)).expect("write");
        observer.write(&open(2)).expect("write");
        assert!(
            health.since_kernel_activity().is_none(),
            "counted, not yet handed on"
        );
        Sink::<EventItem>::flush(&mut observer).expect("flush");
        assert_eq!(events(&counters).get("credential"), Some(&2));
        assert_eq!(
            line("agent_monitor_events_total{lane=\"credential\"}").as_deref(),
            Some("agent_monitor_events_total{lane=\"credential\"} 2")
        );
        assert_eq!(
            line("agent_monitor_pipeline_latency_seconds_count").as_deref(),
            Some("agent_monitor_pipeline_latency_seconds_count 2")
        );
        assert!(health.since_kernel_activity().is_some());

        // No flush: a full batch is handed on by itself.
        for seq in 0..OBSERVE_BATCH as u64 {
            observer.write(&open(3 + seq)).expect("write");
        }
        assert_eq!(
            events(&counters).get("credential"),
            Some(&(2 + OBSERVE_BATCH as u64))
        );
        // A loss is counted at once.
        observer.write(&origin.event_item(lost(9))).expect("write");
        assert_eq!(
            counters.lock().expect("lock").drops.get("network"),
            Some(&1)
        );
    }
}
