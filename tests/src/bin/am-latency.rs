//! `am-latency`: the gRPC client of `cargo xtask bench latency`.
//!
//! ```text
//! am-latency --endpoint HOST:PORT --load-path PATH --alert-path PATH
//! ```
//!
//! Subscribes to the daemon's `StreamEvents` and `StreamAnomalies` (no filter, live), prints
//! `subscribed` once both streams are open, and from then on stamps every item it receives
//! with CLOCK_BOOTTIME, the clock the kernel stamps events with (`Process.ts_boot_ns`,
//! `bpf_ktime_get_boot_ns`). When its stdin closes it keeps reading until the streams have
//! been quiet for [`DRAIN_QUIET`] (so late items count with their true latency, not as
//! lost), then prints one JSON object:
//!
//! - events: latency (receipt − kernel timestamp) of every open of `--load-path`;
//! - alerts: latency of every anomaly whose events include an open of `--alert-path`,
//!   measured from that open's kernel timestamp (an anomaly carries the wall-clock time of
//!   its event, not the kernel's; its `event_seqs` name the event, whose `ts_boot_ns`
//!   comes from the events stream);
//! - anomalies not tied to a received open of `--alert-path`, by rule (an `events-lost`
//!   alert, a rate-limit summary, or an alert whose event this client missed): counted,
//!   never given a latency;
//! - what was missed: credential-lane loss records and the slow-client gaps of each stream.
//!
//! Nothing is asserted: `xtask` prints the figures next to the baseline of the same run.

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read as _, Write as _},
    process::ExitCode,
    time::Duration,
};

use agent_monitor::{
    api::pb::{self, event::Kind, stream_anomalies_response::Item as AItem, Lane},
    outputs::grpc::connect,
};
use anyhow::{bail, Context as _, Result};
use futures::{Stream, StreamExt as _};
use serde_json::json;
use tokio::sync::watch;

/// How long both streams must stay silent, after stdin closed, before the figures are
/// final: well above the daemon's poll interval (10 ms) and a busy machine's hiccups.
const DRAIN_QUIET: Duration = Duration::from_millis(1_000);

/// Room reserved up front for load latencies (a 10 s run at 50,000 events/s), so the
/// receiving loop does not reallocate a large vector while it is timed.
const EXPECTED_EVENTS: usize = 500_000;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("am-latency: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Args {
    endpoint: String,
    load_path: String,
    alert_path: String,
}

fn args() -> Result<Args> {
    let mut endpoint = None;
    let mut load_path = None;
    let mut alert_path = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--endpoint" => endpoint = Some(value),
            "--load-path" => load_path = Some(value),
            "--alert-path" => alert_path = Some(value),
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Args {
        endpoint: endpoint.context("--endpoint is required")?,
        load_path: load_path.context("--load-path is required")?,
        alert_path: alert_path.context("--alert-path is required")?,
    })
}

/// CLOCK_BOOTTIME in nanoseconds: the clock of the kernel's event timestamps.
fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every Linux
    // this daemon runs on (2.6.39+), so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the events stream delivered.
#[derive(Default)]
struct EventTally {
    /// Receipt − kernel timestamp of each open of the load path, ns.
    load_latencies: Vec<u64>,
    /// Kernel timestamp of each open of the alert path, by event seq.
    alert_opens: HashMap<u64, u64>,
    /// Records the kernel reported lost in the credential lane, by reason name and, for a
    /// budget, the workload's cgroup.
    lost_credential: BTreeMap<String, u64>,
    /// Items the server left out of this stream for a slow client (gaps).
    gap_missed: u64,
}

/// What the anomalies stream delivered.
#[derive(Default)]
struct AnomalyTally {
    /// Receipt time and event seqs of each anomaly.
    received: Vec<(u64, Vec<u64>, String)>,
    gap_missed: u64,
}

fn run() -> Result<()> {
    let args = args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(measure(args))
}

async fn measure(args: Args) -> Result<()> {
    let mut client = connect(&args.endpoint, None)
        .await
        .with_context(|| format!("connecting to {}", args.endpoint))?;
    // The server subscribes a stream before it answers the call: once both calls have
    // returned, nothing the load does can be missed for want of a subscription.
    let mut events = client
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .context("StreamEvents")?
        .into_inner();
    let mut anomalies = client
        .stream_anomalies(pb::StreamAnomaliesRequest::default())
        .await
        .context("StreamAnomalies")?
        .into_inner();
    let (stop_tx, stop_rx) = watch::channel(false);
    std::thread::spawn(move || {
        // Anything on stdin, or its end, means the load is over.
        let _ = std::io::stdin().read(&mut [0u8; 1]);
        let _ = stop_tx.send(true);
    });
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "subscribed")?;
        out.flush()?;
    }

    let (load_path, alert_path) = (args.load_path.clone(), args.alert_path.clone());
    let stop = stop_rx.clone();
    let events_task = tokio::spawn(async move {
        let mut t = EventTally {
            load_latencies: Vec::with_capacity(EXPECTED_EVENTS),
            ..EventTally::default()
        };
        while let Some((now, msg)) = next(&mut events, &stop).await.context("events stream")? {
            match msg.item {
                Some(pb::stream_events_response::Item::Event(e)) => {
                    let ts = e.process.as_ref().map_or(0, |p| p.ts_boot_ns);
                    match e.kind {
                        Some(Kind::Open(o)) if o.path == load_path || o.raw_path == load_path => {
                            t.load_latencies.push(now.saturating_sub(ts));
                        }
                        Some(Kind::Open(o)) if o.path == alert_path || o.raw_path == alert_path => {
                            t.alert_opens.insert(e.seq, ts);
                        }
                        Some(Kind::Lost(l)) if l.lane == Lane::Credential as i32 => {
                            let reason = pb::LostReason::try_from(l.reason)
                                .map_or("unknown", |r| r.as_str_name());
                            // A budget drop names its workload: the load's, or another
                            // process of the node's.
                            let cgroup = e.workload.as_ref().map_or("", |w| w.cgroup.as_str());
                            *t.lost_credential
                                .entry(format!("{reason} {cgroup}").trim_end().to_owned())
                                .or_default() += l.count;
                        }
                        _ => {}
                    }
                }
                Some(pb::stream_events_response::Item::Gap(g)) => t.gap_missed += g.missed,
                None => {}
            }
        }
        anyhow::Ok(t)
    });
    let stop = stop_rx;
    let anomalies_task = tokio::spawn(async move {
        let mut t = AnomalyTally::default();
        while let Some((now, msg)) = next(&mut anomalies, &stop)
            .await
            .context("anomalies stream")?
        {
            match msg.item {
                Some(AItem::Anomaly(a)) => t.received.push((now, a.event_seqs, a.rule)),
                Some(AItem::Gap(g)) => t.gap_missed += g.missed,
                None => {}
            }
        }
        anyhow::Ok(t)
    });
    let ev = events_task.await.context("events task")??;
    let an = anomalies_task.await.context("anomalies task")??;
    report(ev, an)
}

/// The next item of a stream with its receipt time (CLOCK_BOOTTIME ns); `None` when the
/// stream ended, or when `stop` is set and the stream stayed quiet for [`DRAIN_QUIET`].
async fn next<T, E, S>(stream: &mut S, stop: &watch::Receiver<bool>) -> Result<Option<(u64, T)>, E>
where
    S: Stream<Item = Result<T, E>> + Unpin,
{
    loop {
        // tonic's stream keeps its state in itself: a timed-out `next` loses nothing.
        match tokio::time::timeout(DRAIN_QUIET, stream.next()).await {
            Ok(Some(item)) => return Ok(Some((boottime_ns(), item?))),
            Ok(None) => return Ok(None),
            Err(_) if *stop.borrow() => return Ok(None),
            Err(_) => {}
        }
    }
}

/// Nearest-rank percentile of sorted values (`p` in 0..=100); 0 when empty.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(mut v: Vec<u64>) -> serde_json::Value {
    v.sort_unstable();
    json!({
        "count": v.len(),
        "p50_ns": percentile(&v, 50.0),
        "p99_ns": percentile(&v, 99.0),
        "max_ns": v.last().copied().unwrap_or(0),
    })
}

fn report(ev: EventTally, an: AnomalyTally) -> Result<()> {
    let mut alert_latencies = Vec::new();
    let mut unmatched: BTreeMap<String, u64> = BTreeMap::new();
    for (received, seqs, rule) in &an.received {
        // The latest of its events is the one that fired it.
        match seqs.iter().filter_map(|s| ev.alert_opens.get(s)).max() {
            Some(ts) => alert_latencies.push(received.saturating_sub(*ts)),
            // Not about an open of the alert path this client received: another rule
            // (`events-lost`, a rate-limit summary), or an alert whose event this client
            // missed (a gap), which has no kernel timestamp here.
            None => *unmatched.entry(rule.clone()).or_default() += 1,
        }
    }
    let out = json!({
        "events": summary(ev.load_latencies),
        "alert_opens": ev.alert_opens.len(),
        "alerts": summary(alert_latencies),
        "unmatched_alerts": unmatched,
        "lost_credential": ev.lost_credential,
        "events_gap_missed": ev.gap_missed,
        "anomalies_gap_missed": an.gap_missed,
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{out}")?;
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 99.0), 0);
    }
}
