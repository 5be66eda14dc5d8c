//! The fan-out from the daemon to streaming clients.
//!
//! Publishing never waits: each item is converted once, then offered to every matching
//! client's bounded queue with `try_send`. A full queue costs that client the item (and
//! only that client); the client is told with a [`Delivery::Gap`] carrying the exact count
//! of items it lost, placed where they were lost: before the next item that fits in its
//! queue, or, if none comes, as soon as the client has drained its queue.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, OnceLock, Weak,
    },
    task::{Context, Poll},
};

use futures::{task::AtomicWaker, Stream};
use tokio::sync::mpsc::{
    self,
    error::{TryRecvError, TrySendError},
};

use super::{filter::Matcher, resume::JournalSource};
use crate::{
    api::{pb, Origin},
    detect::Anomaly,
    events::Record,
    outputs::EventItem,
};

/// What a client's queue carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery<T> {
    /// One event or anomaly (shared between the clients it went to).
    Item(Arc<T>),
    /// This many items were dropped for this client just before this point.
    Gap(u64),
}

/// Per-client state shared between the publisher and the client's stream.
#[derive(Debug, Default)]
struct Shared {
    /// Items dropped since the last gap was queued or delivered. Changed only with
    /// `lock` held: by the publisher when an offer fails or its gap is queued, by the
    /// stream when it flushes a trailing gap, so that "queue empty, take the count" is
    /// atomic with respect to publishing.
    ///
    /// Read without the lock on the common path (nothing lost): only the publisher (one
    /// at a time, under the hub's client list lock) makes it non-zero, so a publisher
    /// that reads 0 may queue its item without the lock, and a stream that reads 0 has no
    /// gap to flush. Locking on every item made the publisher and a client draining its
    /// queue on another CPU wait for each other (a futex sleep and wake per item).
    pending: AtomicU64,
    lock: Mutex<()>,
    /// The client's stream, waiting for items: woken by the publisher once per publish
    /// (a batch of items), not by the channel once per item. A client that drains as fast
    /// as items arrive would otherwise go to sleep and be woken again every few items, a
    /// futex wake and two context switches each, which under load cost more than the
    /// items themselves.
    waker: AtomicWaker,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ()> {
        // A poisoned lock only means a panic elsewhere; the count is still right.
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Subscriber<T> {
    id: u64,
    tx: mpsc::Sender<Delivery<T>>,
    matcher: Matcher,
    shared: Arc<Shared>,
    /// Offered an item (queued or lost) since its stream was last woken: a client whose
    /// filter matched nothing in a publish is not woken for it.
    due: bool,
}

#[derive(Default)]
struct Counters {
    gaps_sent: AtomicU64,
    missed: AtomicU64,
    events_published: AtomicU64,
    anomalies_published: AtomicU64,
}

/// Called with the number of stream clients whenever it changes.
type ClientsObserver = Box<dyn Fn(usize) + Send + Sync>;

struct Inner {
    queue: usize,
    /// Stamped on every item.
    origin: Origin,
    next_id: AtomicU64,
    events: Mutex<Vec<Subscriber<EventItem>>>,
    /// How many event clients `events` holds, updated under its lock whenever it changes:
    /// read without the lock by a publisher that has nothing to do without one.
    event_clients: AtomicUsize,
    anomalies: Mutex<Vec<Subscriber<pb::Anomaly>>>,
    counters: Counters,
    /// Set by [`Hub::shut_down`]: no new clients; the streams of the others end.
    shut_down: AtomicBool,
    /// Told the client count whenever it changes (the `agent_monitor_grpc_clients` gauge).
    observer: OnceLock<ClientsObserver>,
    /// Where resumed streams read what they missed; none without a journal.
    journal: OnceLock<Arc<dyn JournalSource>>,
}

impl Inner {
    fn clients(&self) -> usize {
        lock(&self.events).len() + lock(&self.anomalies).len()
    }

    /// Reports the client count after a change. Called with no list locked.
    fn clients_changed(&self) {
        if let Some(observe) = self.observer.get() {
            observe(self.clients());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fan-out of events and anomalies to streaming clients. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("queue_per_client", &self.inner.queue)
            .field("clients", &self.clients())
            .field("gaps_sent", &self.gaps_sent())
            .field("missed", &self.missed())
            .finish()
    }
}

impl Hub {
    /// A hub whose clients each get a queue of `queue_per_client` items (at least 2: a gap
    /// and the item after it), handing out items of `origin`.
    pub fn new(queue_per_client: usize, origin: Origin) -> Self {
        Self {
            inner: Arc::new(Inner {
                queue: queue_per_client.max(2),
                origin,
                next_id: AtomicU64::new(0),
                events: Mutex::new(Vec::new()),
                event_clients: AtomicUsize::new(0),
                anomalies: Mutex::new(Vec::new()),
                counters: Counters::default(),
                shut_down: AtomicBool::new(false),
                observer: OnceLock::new(),
                journal: OnceLock::new(),
            }),
        }
    }

    /// Calls `observe` with the number of connected stream clients now and whenever it
    /// changes (a client subscribes, disconnects, or is ended by [`Hub::shut_down`]). Only
    /// the first observer set is kept.
    pub fn observe_clients(&self, observe: impl Fn(usize) + Send + Sync + 'static) {
        if self.inner.observer.set(Box::new(observe)).is_ok() {
            self.inner.clients_changed();
        }
    }

    /// Ends every client's stream (after what is already queued for it, and its last gap)
    /// and refuses new clients: the daemon is going away. The service turns the end into
    /// an UNAVAILABLE status for each client.
    pub fn shut_down(&self) {
        self.inner.shut_down.store(true, Ordering::SeqCst);
        // Dropping the senders ends each subscription once its queue is read.
        let events = {
            let mut subs = lock(&self.inner.events);
            self.inner.event_clients.store(0, Ordering::SeqCst);
            std::mem::take(&mut *subs)
        };
        let anomalies = std::mem::take(&mut *lock(&self.inner.anomalies));
        let streams: Vec<Arc<Shared>> = events
            .iter()
            .map(|s| s.shared.clone())
            .chain(anomalies.iter().map(|s| s.shared.clone()))
            .collect();
        drop((events, anomalies));
        // Each stream then finds its channel closed.
        for shared in streams {
            shared.waker.wake();
        }
        self.inner.clients_changed();
    }

    /// Whether [`Hub::shut_down`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.inner.shut_down.load(Ordering::SeqCst)
    }

    /// Offers a record to every event client whose filter matches, converted here (with
    /// the hub's origin) only if one does. Never blocks on a client and never awaits.
    pub fn publish_event(&self, record: &Record) {
        self.publish_event_with(record, || {
            Arc::new(self.inner.origin.event_item(record.clone()))
        });
    }

    /// Offers wire events the pipeline already made (shared, not copied), in order, to
    /// every event client whose filter matches, taking the client list once for all of
    /// them: a client woken by the first finds the others queued.
    pub fn publish_events(&self, events: &[Arc<EventItem>]) {
        self.inner
            .counters
            .events_published
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let mut subs = lock(&self.inner.events);
        for e in events {
            publish(
                &mut subs,
                &self.inner.counters,
                |m| m.event_item(e),
                || e.clone(),
            );
        }
        wake(&mut subs);
        self.inner.event_clients.store(subs.len(), Ordering::SeqCst);
    }

    fn publish_event_with(&self, record: &Record, convert: impl FnOnce() -> Arc<EventItem>) {
        self.inner
            .counters
            .events_published
            .fetch_add(1, Ordering::Relaxed);
        let mut subs = lock(&self.inner.events);
        publish(
            &mut subs,
            &self.inner.counters,
            |m| m.record(record),
            convert,
        );
        wake(&mut subs);
        self.inner.event_clients.store(subs.len(), Ordering::SeqCst);
    }

    /// Offers an anomaly to every anomaly client whose filter matches, converted here
    /// only if one does. Never blocks on a client and never awaits.
    pub fn publish_anomaly(&self, anomaly: &Anomaly) {
        self.publish_anomaly_with(anomaly, || Arc::new(self.inner.origin.anomaly(anomaly)));
    }

    /// Offers wire anomalies the pipeline already made, in order (see
    /// [`Hub::publish_events`]).
    pub fn publish_anomalies(&self, anomalies: &[Arc<pb::Anomaly>]) {
        self.inner
            .counters
            .anomalies_published
            .fetch_add(anomalies.len() as u64, Ordering::Relaxed);
        let mut subs = lock(&self.inner.anomalies);
        for a in anomalies {
            publish(
                &mut subs,
                &self.inner.counters,
                |m| m.pb_anomaly(a),
                || a.clone(),
            );
        }
        wake(&mut subs);
    }

    fn publish_anomaly_with(&self, anomaly: &Anomaly, convert: impl FnOnce() -> Arc<pb::Anomaly>) {
        self.inner
            .counters
            .anomalies_published
            .fetch_add(1, Ordering::Relaxed);
        let mut subs = lock(&self.inner.anomalies);
        publish(
            &mut subs,
            &self.inner.counters,
            |m| m.anomaly(anomaly),
            convert,
        );
        wake(&mut subs);
    }

    /// Lets clients resume from `journal` (the daemon's journal of this run). Only the
    /// first journal set is kept.
    pub fn set_journal(&self, journal: Arc<dyn JournalSource>) {
        let _ = self.inner.journal.set(journal);
    }

    /// The journal resumed streams read, if the daemon keeps one.
    pub fn journal(&self) -> Option<Arc<dyn JournalSource>> {
        self.inner.journal.get().cloned()
    }

    /// The run, node and boot every item is stamped with.
    pub fn origin(&self) -> &Origin {
        &self.inner.origin
    }

    /// A new event client.
    pub fn subscribe_events(&self, matcher: Matcher) -> Subscription<EventItem> {
        self.subscribe(matcher, &self.inner.events, Kind::Events)
    }

    /// A new anomaly client.
    pub fn subscribe_anomalies(&self, matcher: Matcher) -> Subscription<pb::Anomaly> {
        self.subscribe(matcher, &self.inner.anomalies, Kind::Anomalies)
    }

    fn subscribe<T>(
        &self,
        matcher: Matcher,
        list: &Mutex<Vec<Subscriber<T>>>,
        kind: Kind,
    ) -> Subscription<T> {
        let (tx, rx) = mpsc::channel(self.inner.queue);
        let shared = Arc::new(Shared::default());
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut subs = lock(list);
            subs.retain(|s| !s.tx.is_closed());
            // Checked under the lock that `shut_down` takes: a client racing the shutdown
            // is either ended by it or never added (its sender is dropped here).
            if !self.is_shut_down() {
                subs.push(Subscriber {
                    id,
                    tx,
                    matcher,
                    shared: shared.clone(),
                    due: false,
                });
            }
            if kind == Kind::Events {
                self.inner.event_clients.store(subs.len(), Ordering::SeqCst);
            }
        }
        self.inner.clients_changed();
        Subscription {
            id,
            kind,
            rx,
            shared,
            hub: Arc::downgrade(&self.inner),
            flushed: false,
        }
    }

    /// Streaming clients connected now (events and anomalies).
    pub fn clients(&self) -> usize {
        self.inner.clients()
    }

    /// Gap notices queued or delivered to slow clients since start.
    pub fn gaps_sent(&self) -> u64 {
        self.inner.counters.gaps_sent.load(Ordering::Relaxed)
    }

    /// Items dropped for slow clients since start (summed over clients).
    pub fn missed(&self) -> u64 {
        self.inner.counters.missed.load(Ordering::Relaxed)
    }

    /// Whether any event client is subscribed now.
    pub fn has_event_clients(&self) -> bool {
        self.inner.event_clients.load(Ordering::SeqCst) != 0
    }

    /// Counts events published while no event client was subscribed, which were not
    /// handed to the hub (see [`Hub::has_event_clients`]).
    pub fn count_unpublished_events(&self, n: u64) {
        self.inner
            .counters
            .events_published
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Records published since start (whether or not any client wanted them).
    pub fn events_published(&self) -> u64 {
        self.inner.counters.events_published.load(Ordering::Relaxed)
    }

    /// Anomalies published since start (whether or not any client wanted them).
    pub fn anomalies_published(&self) -> u64 {
        self.inner
            .counters
            .anomalies_published
            .load(Ordering::Relaxed)
    }

    /// Per-client queue capacity.
    pub fn queue_per_client(&self) -> usize {
        self.inner.queue
    }
}

/// Wakes the streams of `subs` that were offered an item since they were last woken (see
/// `Shared::waker`), whether it was queued or lost (a trailing gap is then due): called
/// after each publish.
fn wake<T>(subs: &mut [Subscriber<T>]) {
    for sub in subs.iter_mut().filter(|s| s.due) {
        sub.due = false;
        sub.shared.waker.wake();
    }
}

/// Offers one item to every matching subscriber; removes subscribers whose stream is gone.
fn publish<T>(
    subs: &mut Vec<Subscriber<T>>,
    counters: &Counters,
    matches: impl Fn(&Matcher) -> bool,
    convert: impl FnOnce() -> Arc<T>,
) {
    let mut convert = Some(convert);
    let mut item: Option<Arc<T>> = None;
    subs.retain_mut(|sub| {
        if sub.tx.is_closed() {
            return false;
        }
        if !matches(&sub.matcher) {
            return true;
        }
        sub.due = true;
        let item = match &item {
            Some(i) => i.clone(),
            None => {
                let Some(f) = convert.take() else {
                    return true;
                };
                item.insert(f()).clone()
            }
        };
        offer(sub, item, counters)
    });
}

/// Offers one item to one subscriber; false when its stream is gone.
fn offer<T>(sub: &Subscriber<T>, item: Arc<T>, counters: &Counters) -> bool {
    // Nothing lost: the item goes straight in (see `Shared::pending`).
    let item = Delivery::Item(item);
    let item = if sub.shared.pending.load(Ordering::Acquire) == 0 {
        match sub.tx.try_send(item) {
            Ok(()) => return true,
            Err(TrySendError::Closed(_)) => return false,
            Err(TrySendError::Full(item)) => item,
        }
    } else {
        item
    };
    let _guard = sub.shared.lock();
    let pending = sub.shared.pending.load(Ordering::Acquire);
    let sent = if pending == 0 {
        match sub.tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(false),
            Err(TrySendError::Closed(_)) => Err(true),
        }
    } else {
        // The gap goes first, and only together with the item: a gap alone in the last
        // free slot would be followed by more losses it does not count.
        match sub.tx.try_reserve_many(2) {
            Ok(mut permits) => {
                if let (Some(gap), Some(next)) = (permits.next(), permits.next()) {
                    gap.send(Delivery::Gap(pending));
                    next.send(item);
                    counters.gaps_sent.fetch_add(1, Ordering::Relaxed);
                    sub.shared.pending.store(0, Ordering::Release);
                }
                Ok(())
            }
            Err(TrySendError::Full(())) => Err(false),
            Err(TrySendError::Closed(())) => Err(true),
        }
    };
    match sent {
        Ok(()) => true,
        Err(closed) => {
            if !closed {
                sub.shared.pending.store(pending + 1, Ordering::Release);
                counters.missed.fetch_add(1, Ordering::Relaxed);
            }
            !closed
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Events,
    Anomalies,
}

/// One client's stream of deliveries. Dropping it unsubscribes.
pub struct Subscription<T> {
    id: u64,
    kind: Kind,
    rx: mpsc::Receiver<Delivery<T>>,
    shared: Arc<Shared>,
    hub: Weak<Inner>,
    /// The channel ended and the last gap (if any) was delivered.
    flushed: bool,
}

impl<T> Subscription<T> {
    /// Takes the pending loss count if the queue is empty (so the gap lands after every
    /// item published before the losses).
    fn trailing_gap(&mut self) -> Option<u64> {
        // Nothing lost: no lock (see `Shared::pending`).
        if self.shared.pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let _guard = self.shared.lock();
        if self.shared.pending.load(Ordering::Acquire) == 0 || !self.rx.is_empty() {
            return None;
        }
        let missed = self.shared.pending.swap(0, Ordering::AcqRel);
        if let Some(hub) = self.hub.upgrade() {
            hub.counters.gaps_sent.fetch_add(1, Ordering::Relaxed);
        }
        Some(missed)
    }
}

impl<T> Stream for Subscription<T> {
    type Item = Delivery<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.flushed {
            return Poll::Ready(None);
        }
        // The channel is read without registering with it (its sends would wake this
        // stream per item); the publisher wakes it through `Shared::waker` instead. After
        // registering, the queue is looked at once more, so an item sent in between is
        // not left waiting for the next publish.
        let mut registered = false;
        loop {
            match this.rx.try_recv() {
                Ok(d) => return Poll::Ready(Some(d)),
                Err(TryRecvError::Disconnected) => {
                    let gap = this.trailing_gap();
                    this.flushed = gap.is_none();
                    return Poll::Ready(gap.map(Delivery::Gap));
                }
                Err(TryRecvError::Empty) => {
                    if let Some(missed) = this.trailing_gap() {
                        return Poll::Ready(Some(Delivery::Gap(missed)));
                    }
                    if registered {
                        return Poll::Pending;
                    }
                    this.shared.waker.register(cx.waker());
                    registered = true;
                }
            }
        }
    }
}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        let Some(hub) = self.hub.upgrade() else {
            return;
        };
        match self.kind {
            Kind::Events => {
                let mut subs = lock(&hub.events);
                subs.retain(|s| s.id != self.id);
                hub.event_clients.store(subs.len(), Ordering::SeqCst);
            }
            Kind::Anomalies => lock(&hub.anomalies).retain(|s| s.id != self.id),
        }
        hub.clients_changed();
    }
}

#[cfg(test)]
mod tests {
    use futures::{FutureExt as _, StreamExt as _};

    use super::*;
    use crate::{
        events::{ExitRecord, Task},
        identity::Workload,
    };

    fn exit(seq: u64, ns: &str) -> Record {
        Record::Exit(ExitRecord {
            seq,
            task: Task {
                time: "2026-11-23T00:00:00Z".into(),
                ts_boot_ns: 0,
                pid: 1,
                tgid: 1,
                ppid: None,
                uid: 0,
                gid: 0,
                comm: "x".into(),
                exe: None,
                cgroup_id: 0,
                start_ns: 0,
                workload: Workload {
                    namespace: Some(ns.into()),
                    pod: Some("p".into()),
                    ..Workload::default()
                }
                .into(),
            },
        })
    }

    fn drain<T>(sub: &mut Subscription<T>) -> Vec<Delivery<T>> {
        let mut out = Vec::new();
        while let Some(Some(d)) = sub.next().now_or_never() {
            out.push(d);
        }
        out
    }

    /// A client that drains its stream as soon as it is woken, as a client on another
    /// CPU does: its waker polls the stream itself, until the stream is empty again.
    struct EagerClient {
        sub: Mutex<Subscription<EventItem>>,
        got: Mutex<Vec<u64>>,
        wakes: AtomicU64,
        ended: AtomicBool,
    }

    impl EagerClient {
        fn drain(this: &Arc<Self>) {
            let waker = futures::task::waker(this.clone());
            let mut cx = Context::from_waker(&waker);
            let Ok(mut sub) = this.sub.try_lock() else {
                return;
            };
            loop {
                match Pin::new(&mut *sub).poll_next(&mut cx) {
                    Poll::Ready(Some(Delivery::Item(e))) => lock(&this.got).push(e.api.seq),
                    Poll::Ready(Some(Delivery::Gap(_))) => {}
                    Poll::Ready(None) => {
                        this.ended.store(true, Ordering::SeqCst);
                        return;
                    }
                    Poll::Pending => return,
                }
            }
        }
    }

    impl futures::task::ArcWake for EagerClient {
        fn wake_by_ref(this: &Arc<Self>) {
            this.wakes.fetch_add(1, Ordering::SeqCst);
            Self::drain(this);
        }
    }

    /// A client that drains as fast as items come is woken once for a published batch,
    /// not once per item (a wake per item is what a channel's own waker gives it), gets
    /// the whole batch in order, and is woken to find its stream's end at shutdown; a
    /// client whose filter matches nothing in a batch is not woken for it.
    #[test]
    fn an_eager_client_is_woken_once_per_batch_and_at_shutdown() {
        let hub = Hub::new(1024, Origin::default());
        let client = Arc::new(EagerClient {
            sub: Mutex::new(hub.subscribe_events(Matcher::default())),
            got: Mutex::new(Vec::new()),
            wakes: AtomicU64::new(0),
            ended: AtomicBool::new(false),
        });
        EagerClient::drain(&client);
        let origin = Origin::default();
        for round in 0..3u64 {
            let batch: Vec<_> = (1..=100)
                .map(|i| Arc::new(origin.event_item(exit(round * 100 + i, "a"))))
                .collect();
            hub.publish_events(&batch);
            assert_eq!(
                client.wakes.load(Ordering::SeqCst),
                round + 1,
                "one wake per batch"
            );
        }
        assert_eq!(*lock(&client.got), (1..=300).collect::<Vec<_>>());
        // A client whose filter matches none of a batch is not woken for it.
        let elsewhere = Arc::new(EagerClient {
            sub: Mutex::new(
                hub.subscribe_events(
                    Matcher::new(Some(&pb::Filter {
                        allow: Some(pb::Selector {
                            namespaces: vec!["b".into()],
                            ..Default::default()
                        }),
                        ..Default::default()
                    }))
                    .expect("filter"),
                ),
            ),
            got: Mutex::new(Vec::new()),
            wakes: AtomicU64::new(0),
            ended: AtomicBool::new(false),
        });
        EagerClient::drain(&elsewhere);
        let batch: Vec<_> = (301..=310)
            .map(|i| Arc::new(origin.event_item(exit(i, "a"))))
            .collect();
        hub.publish_events(&batch);
        assert_eq!(elsewhere.wakes.load(Ordering::SeqCst), 0, "nothing for it");
        assert_eq!(client.wakes.load(Ordering::SeqCst), 4);
        hub.shut_down();
        assert_eq!(client.wakes.load(Ordering::SeqCst), 5);
        assert!(client.ended.load(Ordering::SeqCst), "the stream ended");
        assert_eq!(
            elsewhere.wakes.load(Ordering::SeqCst),
            1,
            "woken at shutdown"
        );
        assert!(elsewhere.ended.load(Ordering::SeqCst));
    }

    #[test]
    fn slow_client_gets_exact_gap_before_next_item() {
        let hub = Hub::new(4, Origin::default());
        let mut sub = hub.subscribe_events(Matcher::default());
        for seq in 0..10 {
            hub.publish_event(&exit(seq, "a"));
        }
        assert_eq!(hub.missed(), 6);
        // Read two, publish one more: room for gap + item.
        let first: Vec<_> = (0..2).map(|_| sub.rx.try_recv().expect("queued")).collect();
        assert!(matches!(&first[0], Delivery::Item(e) if e.api.seq == 0));
        hub.publish_event(&exit(10, "a"));
        let rest = drain(&mut sub);
        let kinds: Vec<String> = rest
            .iter()
            .map(|d| match d {
                Delivery::Item(e) => format!("e{}", e.api.seq),
                Delivery::Gap(n) => format!("g{n}"),
            })
            .collect();
        assert_eq!(kinds, ["e2", "e3", "g6", "e10"]);
        assert_eq!(hub.gaps_sent(), 1);
    }

    #[test]
    fn trailing_gap_is_delivered_once_queue_drains() {
        let hub = Hub::new(2, Origin::default());
        let mut sub = hub.subscribe_events(Matcher::default());
        for seq in 0..5 {
            hub.publish_event(&exit(seq, "a"));
        }
        let got = drain(&mut sub);
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], Delivery::Gap(3));
        assert_eq!(hub.clients(), 1);
        drop(sub);
        assert_eq!(hub.clients(), 0);
    }

    #[test]
    fn client_count_is_observed_and_shutdown_ends_streams_after_their_queue() {
        let hub = Hub::new(8, Origin::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        hub.observe_clients(move |n| lock(&log).push(n));
        let mut a = hub.subscribe_events(Matcher::default());
        let b = hub.subscribe_anomalies(Matcher::default());
        let c = hub.subscribe_events(Matcher::default());
        drop(c);
        hub.publish_event(&exit(1, "a"));
        hub.shut_down();
        assert_eq!(*lock(&seen), [0, 1, 2, 3, 2, 0]);
        assert_eq!(hub.clients(), 0);
        // What was queued is still delivered, then the stream ends.
        let got = drain(&mut a);
        assert!(
            matches!(&got[..], [Delivery::Item(e)] if e.api.seq == 1),
            "{got:?}"
        );
        assert!(matches!(a.next().now_or_never(), Some(None)));
        // Late clients get an ended stream and are never counted.
        let mut late = hub.subscribe_events(Matcher::default());
        assert!(matches!(late.next().now_or_never(), Some(None)));
        assert_eq!(hub.clients(), 0);
        drop((b, late));
        assert_eq!(*lock(&seen).last().expect("counts"), 0);
    }

    #[test]
    fn filters_select_by_workload_and_items_carry_the_origin() {
        let origin = Origin {
            run_id: "run-1".into(),
            node: "node-a".into(),
            boot_id: "boot-1".into(),
        };
        let hub = Hub::new(16, origin);
        let filter = |allow: pb::Selector| {
            Matcher::new(Some(&pb::Filter {
                allow: Some(allow),
                ..Default::default()
            }))
            .expect("filter")
        };
        let mut a = hub.subscribe_events(filter(pb::Selector {
            namespaces: vec!["a".into()],
            ..Default::default()
        }));
        let mut pods = hub.subscribe_events(filter(pb::Selector {
            pods: vec!["b/p".into()],
            ..Default::default()
        }));
        hub.publish_event(&exit(1, "a"));
        hub.publish_event(&exit(2, "b"));
        let seqs = |v: Vec<Delivery<EventItem>>| {
            v.into_iter()
                .map(|d| match d {
                    Delivery::Item(e) => e.api.seq,
                    Delivery::Gap(_) => u64::MAX,
                })
                .collect::<Vec<_>>()
        };
        let got = drain(&mut pods);
        if let Some(Delivery::Item(e)) = got.first() {
            assert_eq!(
                (e.api.run_id.as_str(), e.api.node.as_str()),
                ("run-1", "node-a")
            );
            let key = e.api.process.as_ref().and_then(|p| p.key.as_ref());
            assert_eq!(key.map(|k| k.boot_id.as_str()), Some("boot-1"));
        }
        assert_eq!(seqs(drain(&mut a)), [1]);
        assert_eq!(seqs(got), [2]);
    }
}
