//! Where records leave the process.

pub mod falco;
pub mod falcosidekick;
pub mod fanout;
pub mod grpc;
pub mod journal;
pub mod jsonl;
pub mod listen;
pub mod metrics;

use std::sync::Arc;

use crate::{
    api::{pb, Origin},
    detect::Anomaly,
    events::{Record, Workload},
};

/// An item together with its API form, converted once (by the pipeline) and shared by
/// every sink: the JSON output prints it, the journal stores it, the hub hands it to its
/// clients.
#[derive(Debug, Clone)]
pub struct Converted<T, P> {
    /// The daemon's own form, for the sinks that read it (metrics, Falco, filters).
    pub item: T,
    /// The wire form, stamped with the run's [`Origin`].
    pub api: Arc<P>,
}

/// A record as its `agent_monitor.v1.Event`, converted once (by the pipeline, after
/// detection read the record) and shared by every event sink: the record's strings are
/// moved into it, not copied, so the record itself is gone.
#[derive(Debug, Clone, PartialEq)]
pub struct EventItem {
    /// The wire form, stamped with the run's [`Origin`]; without its workload when the
    /// event has a shared one (`workload`), whose wire form [`EventItem::wire`] fills in.
    pub api: Arc<pb::Event>,
    /// The shared workload of a kernel event (`None` for a loss report, whose workload is
    /// in `api`). It is never changed once built (identity builds a new one when a pod
    /// changes), so a sink may keep what it derives from a workload by this pointer, as
    /// long as it keeps the pointer alive with it.
    pub workload: Option<Arc<Workload>>,
}

impl EventItem {
    /// A wire event of its own (not shared), as it is: its workload in it.
    pub fn of_wire(e: pb::Event) -> Self {
        Self {
            api: Arc::new(e),
            workload: None,
        }
    }

    /// The whole wire event, its workload filled in: a copy, for a sink that sends or
    /// stores the message itself (a gRPC client's stream, the journal).
    pub fn wire(&self) -> pb::Event {
        let mut e = pb::Event::clone(&self.api);
        crate::api::put_workload(&mut e, self.workload.as_deref());
        e
    }
}
/// An anomaly and its `agent_monitor.v1.Anomaly`.
pub type AlertItem = Converted<Anomaly, pb::Anomaly>;

impl Origin {
    /// `r` as the wire event of this run.
    pub fn event_item(&self, r: Record) -> EventItem {
        let (api, workload) = self.event_parts(r);
        EventItem {
            api: Arc::new(api),
            workload,
        }
    }

    /// `a` with its wire anomaly of this run.
    pub fn alert_item(&self, a: Anomaly) -> AlertItem {
        Converted {
            api: Arc::new(self.anomaly(&a)),
            item: a,
        }
    }
}

/// A destination for records or alerts. Implementations may buffer; `flush` pushes
/// buffered items out.
pub trait Sink<T> {
    /// Writes one item.
    fn write(&mut self, item: &T) -> std::io::Result<()>;
    /// Pushes out whatever is buffered.
    fn flush(&mut self) -> std::io::Result<()>;
    /// Opens the destination again (SIGHUP, after a log rotation moved the file away):
    /// what was written so far is flushed to the old file, what follows goes to a new one
    /// at the configured path. Sinks that write no file have nothing to do.
    fn reopen(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A sink of the daemon's own form (Falco lines, Falcosidekick) fed with converted items:
/// it reads the item and leaves the wire form to the others.
pub struct Plain<S>(pub S);

impl<T, P, S: Sink<T>> Sink<Converted<T, P>> for Plain<S> {
    fn write(&mut self, c: &Converted<T, P>) -> std::io::Result<()> {
        self.0.write(&c.item)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn reopen(&mut self) -> std::io::Result<()> {
        self.0.reopen()
    }
}
