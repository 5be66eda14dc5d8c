//! Alerts to Falcosidekick: each alert is POSTed as Falco JSON ([`FalcoAlert`]) to
//! Falcosidekick's `POST /`.
//!
//! The pipeline never waits on the network: [`SidekickSink::write`] puts the alert on a
//! bounded queue and returns; a full queue drops the alert, counts it and logs a warning.
//! One task drains the queue in order. A failed POST (connection error, timeout, 5xx,
//! 408 or 429) is retried with exponential backoff until it succeeds, and the alerts
//! behind it wait in the queue. Any other 4xx means Falcosidekick rejects that alert
//! for good: it is counted as rejected, the response body is logged, and the task moves
//! on. When every [`SidekickSink`] clone is dropped, the task keeps delivering what is
//! queued for at most [`SHUTDOWN_GRACE`], logs what it could not deliver, and ends.
//!
//! The HTTP client is hyper-util's client over hyper-rustls (HTTP/1.1; rustls with the
//! ring provider, trusting the webpki roots plus an optional extra CA), the stack kube
//! already uses. It does not go through `HTTPS_PROXY`/`HTTP_PROXY` proxies. A user and
//! password in the URL are sent as HTTP basic authentication.

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    Request, Response, StatusCode, Uri,
};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tokio::{
    sync::{
        mpsc::{self, error::TrySendError},
        oneshot,
    },
    task::JoinHandle,
};
use tracing::{debug, error, info, warn};
use url::Url;

use super::{falco::FalcoAlert, Sink};
use crate::detect::Anomaly;

/// The first wait after a failed POST; it doubles on every further failure, up to
/// [`SidekickSettings::max_backoff`].
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// How long, after the last [`SidekickSink`] is dropped, the task keeps trying to
/// deliver what is still queued.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How much of a response body is logged.
const BODY_EXCERPT: usize = 2048;

/// Minimum time between two "queue full" warnings from one sink.
const DROP_WARN_EVERY: Duration = Duration::from_secs(10);

/// Proxy variables other HTTP clients honour and this one does not (a warning says so).
const PROXY_VARIABLES: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Where and how to send alerts.
#[derive(Debug, Clone)]
pub struct SidekickSettings {
    /// Falcosidekick's address, e.g. `http://127.0.0.1:2801/`; a URL without a path
    /// posts to `/`.
    pub url: String,
    /// Alerts waiting for delivery before new ones are dropped.
    pub queue: usize,
    /// Limit of one POST, connecting included.
    pub timeout: Duration,
    /// Cap of the wait between retries of a failed POST.
    pub max_backoff: Duration,
    /// A PEM file of extra CA certificates trusted for `https` (besides the webpki
    /// roots).
    pub ca: Option<PathBuf>,
}

impl Default for SidekickSettings {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:2801/".to_owned(),
            queue: 10_000,
            timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(30),
            ca: None,
        }
    }
}

/// Why the Falcosidekick output could not start.
#[derive(Debug, thiserror::Error)]
pub enum SidekickError {
    /// The URL does not parse, is not `http`/`https`, or has no host.
    #[error("bad falcosidekick URL: {0}")]
    BadUrl(String),
    /// The CA file cannot be read, or holds no PEM certificate.
    #[error("bad falcosidekick CA file {path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    /// A setting is out of range (a zero queue, timeout or backoff).
    #[error("bad falcosidekick setting {setting}: {reason}")]
    BadSetting {
        setting: &'static str,
        reason: &'static str,
    },
    /// The TLS client configuration could not be built (e.g. the ring provider
    /// refused the protocol versions).
    #[error("cannot build the falcosidekick HTTP client: {0}")]
    Client(#[source] rustls::Error),
    /// [`spawn`] was called outside a tokio runtime.
    #[error("the falcosidekick output must be started inside a tokio runtime")]
    NoRuntime,
}

/// Delivery counters, shared by the sinks and the sender task.
#[derive(Debug, Default)]
pub struct SidekickCounters {
    sent: AtomicU64,
    retries: AtomicU64,
    failed_attempts: AtomicU64,
    rejected: AtomicU64,
    dropped_queue_full: AtomicU64,
    undelivered: AtomicU64,
    queued: AtomicU64,
    in_flight: AtomicU64,
}

/// A copy of [`SidekickCounters`] at one moment (each field read on its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SidekickStats {
    /// Alerts Falcosidekick accepted (2xx).
    pub sent: u64,
    /// POSTs repeated after a failed one.
    pub retries: u64,
    /// POSTs that failed and are retried: connection errors, timeouts, 5xx, 408, 429.
    pub failed_attempts: u64,
    /// Alerts Falcosidekick refused for good (4xx other than 408 and 429).
    pub rejected: u64,
    /// Alerts dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Alerts still undelivered when the shutdown grace period ran out.
    pub undelivered: u64,
    /// Alerts waiting in the queue now.
    pub queued: u64,
    /// Alerts being delivered now (0 or 1), i.e. taken off the queue but not yet sent,
    /// rejected or given up.
    pub in_flight: u64,
}

impl SidekickCounters {
    /// Reads every counter.
    pub fn snapshot(&self) -> SidekickStats {
        SidekickStats {
            sent: self.sent.load(Relaxed),
            retries: self.retries.load(Relaxed),
            failed_attempts: self.failed_attempts.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            dropped_queue_full: self.dropped_queue_full.load(Relaxed),
            undelivered: self.undelivered.load(Relaxed),
            queued: self.queued.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
        }
    }
}

/// One serialized alert on the queue.
struct Queued {
    body: Vec<u8>,
    seq: u64,
    rule: String,
}

/// The pipeline's end of the queue. Clones share the queue; the sender task starts its
/// shutdown when the last clone is dropped.
#[derive(Clone)]
pub struct SidekickSink {
    tx: mpsc::Sender<Queued>,
    hostname: Arc<str>,
    counters: Arc<SidekickCounters>,
    capacity: usize,
    /// Dropped with the last clone, which tells the sender task to shut down even while
    /// it is waiting to retry.
    _alive: Arc<oneshot::Sender<()>>,
    last_drop_warning: Option<Instant>,
}

impl std::fmt::Debug for SidekickSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidekickSink")
            .field("hostname", &self.hostname)
            .field("capacity", &self.capacity)
            .field("counters", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl Sink<Anomaly> for SidekickSink {
    /// Queues the alert without waiting. A full queue drops it (counted, and logged at
    /// most every 10 s per sink) and still returns `Ok`; only a sender task that has
    /// ended is an error.
    fn write(&mut self, a: &Anomaly) -> std::io::Result<()> {
        let body = serde_json::to_vec(&FalcoAlert::new(a, &self.hostname))
            .map_err(std::io::Error::other)?;
        let item = Queued {
            body,
            seq: a.seq,
            rule: a.rule.clone(),
        };
        // Counted before sending so that the task, which decrements on receipt, never
        // sees the gauge below zero.
        self.counters.queued.fetch_add(1, Relaxed);
        match self.tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(item)) => {
                self.counters.queued.fetch_sub(1, Relaxed);
                let dropped = self.counters.dropped_queue_full.fetch_add(1, Relaxed) + 1;
                let now = Instant::now();
                if self
                    .last_drop_warning
                    .is_none_or(|t| now.duration_since(t) >= DROP_WARN_EVERY)
                {
                    self.last_drop_warning = Some(now);
                    warn!(
                        "falcosidekick queue full ({} alerts): dropped alert {} ({}); {dropped} alerts dropped so far",
                        self.capacity, item.seq, item.rule
                    );
                }
                Ok(())
            }
            Err(TrySendError::Closed(item)) => {
                self.counters.queued.fetch_sub(1, Relaxed);
                Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    format!(
                        "falcosidekick sender task has ended; alert {} ({}) not queued",
                        item.seq, item.rule
                    ),
                ))
            }
        }
    }

    /// Delivery is asynchronous: nothing to do.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts the Falcosidekick output: returns the sink for the pipeline, the sender task
/// (it ends after every sink clone is dropped and the queue is drained or the shutdown
/// grace period has run out) and the shared counters. Must be called inside a tokio
/// runtime.
pub fn spawn(
    cfg: SidekickSettings,
    hostname: String,
) -> Result<(SidekickSink, JoinHandle<()>, Arc<SidekickCounters>), SidekickError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| SidekickError::NoRuntime)?;
    let url = check(&cfg)?;
    let target = Target::new(&url)?;
    let client = http_client(cfg.ca.as_ref())?;

    let counters = Arc::new(SidekickCounters::default());
    let (tx, rx) = mpsc::channel(cfg.queue);
    let (alive_tx, alive_rx) = oneshot::channel();
    let sender = Sender {
        client,
        target,
        shown_url: redacted(&url),
        counters: Arc::clone(&counters),
        timeout: cfg.timeout,
        max_backoff: cfg.max_backoff,
        alive: Some(alive_rx),
        deadline: None,
    };
    info!(
        "falcosidekick output to {} (queue {}, timeout {:?}, max backoff {:?})",
        sender.shown_url, cfg.queue, cfg.timeout, cfg.max_backoff
    );
    let proxies: Vec<&str> = PROXY_VARIABLES
        .into_iter()
        .filter(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
        .collect();
    if !proxies.is_empty() {
        warn!(
            "falcosidekick output connects to {} directly: the proxy set in {} is not used",
            sender.shown_url,
            proxies.join(", ")
        );
    }
    let task = runtime.spawn(sender.run(rx));
    let sink = SidekickSink {
        tx,
        hostname: hostname.into(),
        counters: Arc::clone(&counters),
        capacity: cfg.queue,
        _alive: Arc::new(alive_tx),
        last_drop_warning: None,
    };
    Ok((sink, task, counters))
}

/// Parses and checks the URL (`http`/`https`, a host). A URL without a path gets `/`.
fn parse_url(raw: &str) -> Result<Url, SidekickError> {
    let url = Url::parse(raw.trim()).map_err(|e| SidekickError::BadUrl(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(SidekickError::BadUrl(format!(
            "scheme {:?} is not http or https",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(SidekickError::BadUrl(format!(
            "{} has no host",
            redacted(&url)
        )));
    }
    // The url crate already gives "http://host:port" the path "/".
    Ok(url)
}

/// The URL without its password, for logs.
fn redacted(url: &Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        // Only fails for URLs that cannot have credentials, which have no password.
        let _ = u.set_password(Some("REDACTED"));
    }
    u.to_string()
}

/// Checks `cfg` as [`spawn`] does, without starting anything, and returns the parsed URL:
/// `check-config` and the daemon's start-up call it, so a bad URL or CA file is refused
/// with the same message before anything runs.
pub fn check(cfg: &SidekickSettings) -> Result<Url, SidekickError> {
    let url = parse_url(&cfg.url)?;
    if cfg.queue == 0 {
        return Err(SidekickError::BadSetting {
            setting: "queue",
            reason: "must be at least 1",
        });
    }
    if cfg.timeout.is_zero() {
        return Err(SidekickError::BadSetting {
            setting: "timeout",
            reason: "must be more than zero",
        });
    }
    if cfg.max_backoff.is_zero() {
        return Err(SidekickError::BadSetting {
            setting: "max_backoff",
            reason: "must be more than zero",
        });
    }
    Target::new(&url)?;
    if let Some(path) = &cfg.ca {
        roots(Some(path))?;
    }
    Ok(url)
}

/// The trusted roots: the webpki roots plus the certificates of the PEM file `ca`.
fn roots(ca: Option<&PathBuf>) -> Result<rustls::RootCertStore, SidekickError> {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};

    let mut store = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let Some(path) = ca else {
        return Ok(store);
    };
    let bad = |reason: String| SidekickError::BadCa {
        path: path.clone(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".to_owned()));
    }
    for cert in certs {
        store.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    Ok(store)
}

/// The HTTP client: HTTP/1.1 over plain TCP for `http` URLs and over rustls (ring
/// provider, [`roots`]) for `https` URLs.
fn http_client(ca: Option<&PathBuf>) -> Result<HttpClient, SidekickError> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(SidekickError::Client)?
    .with_root_certificates(roots(ca)?)
    .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Where each POST goes: the URL without user and password, and the basic
/// authentication made of them (as reqwest, which this client replaced, did).
struct Target {
    uri: Uri,
    authorization: Option<HeaderValue>,
}

impl Target {
    fn new(url: &Url) -> Result<Self, SidekickError> {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|e| SidekickError::BadUrl(format!("user or password: {e}")))
        };
        let authorization = if url.username().is_empty() && url.password().is_none() {
            None
        } else {
            let user = decode(url.username())?;
            let password = url.password().map(decode).transpose()?;
            let credentials = match password {
                Some(p) => format!("{user}:{p}"),
                None => format!("{user}:"),
            };
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
                .map_err(|e| SidekickError::BadUrl(e.to_string()))?;
            value.set_sensitive(true);
            Some(value)
        };
        let mut bare = url.clone();
        // Both only fail for URLs that cannot have credentials, which have none.
        let _ = bare.set_username("");
        let _ = bare.set_password(None);
        bare.set_fragment(None);
        let uri = bare
            .as_str()
            .parse::<Uri>()
            .map_err(|e| SidekickError::BadUrl(format!("{}: {e}", redacted(url))))?;
        Ok(Self { uri, authorization })
    }
}

/// What became of one POST.
enum Attempt {
    Delivered,
    /// A 4xx other than 408/429: retrying would not help.
    Rejected {
        status: StatusCode,
        body: String,
    },
    /// Worth retrying; `retry_after` from a 429/503 response.
    Failed {
        reason: String,
        retry_after: Option<Duration>,
    },
}

/// What became of one alert.
enum Delivery {
    Done,
    /// The shutdown grace period ran out first.
    GaveUp,
}

/// The task draining the queue.
struct Sender {
    client: HttpClient,
    target: Target,
    shown_url: String,
    counters: Arc<SidekickCounters>,
    timeout: Duration,
    max_backoff: Duration,
    /// Resolves (with an error) when the last sink is dropped; `None` once seen.
    alive: Option<oneshot::Receiver<()>>,
    /// Set when shutdown begins: no attempt after it.
    deadline: Option<Instant>,
}

impl Sender {
    async fn run(mut self, mut rx: mpsc::Receiver<Queued>) {
        while let Some(item) = rx.recv().await {
            self.counters.in_flight.store(1, Relaxed);
            self.counters.queued.fetch_sub(1, Relaxed);
            self.check_alive();
            let delivery = self.deliver(&item).await;
            self.counters.in_flight.store(0, Relaxed);
            if let Delivery::GaveUp = delivery {
                self.give_up(item, &mut rx);
                break;
            }
        }
        let s = self.counters.snapshot();
        info!(
            "falcosidekick output stopped: {} sent, {} rejected, {} dropped (queue full), {} undelivered, {} retries",
            s.sent, s.rejected, s.dropped_queue_full, s.undelivered, s.retries
        );
    }

    /// Counts and logs the alert that could not be delivered and everything behind it.
    /// Only called after shutdown began, so no sink can add more.
    fn give_up(&self, first: Queued, rx: &mut mpsc::Receiver<Queued>) {
        let mut count = 1u64;
        let mut last = first.seq;
        let mut rules = std::collections::BTreeMap::<String, u64>::new();
        *rules.entry(first.rule).or_default() += 1;
        while let Ok(item) = rx.try_recv() {
            self.counters.queued.fetch_sub(1, Relaxed);
            count += 1;
            last = item.seq;
            *rules.entry(item.rule).or_default() += 1;
        }
        self.counters.undelivered.fetch_add(count, Relaxed);
        let mut by_rule = String::new();
        for (rule, n) in &rules {
            let _ = write!(
                by_rule,
                "{}{rule}: {n}",
                if by_rule.is_empty() { "" } else { ", " }
            );
        }
        error!(
            "falcosidekick: {count} alerts (seq {} to {last}) not delivered to {} within {:?} of shutdown ({by_rule})",
            first.seq, self.shown_url, SHUTDOWN_GRACE
        );
    }

    /// Starts the shutdown clock if the last sink is gone (without waiting).
    fn check_alive(&mut self) {
        if let Some(rx) = &mut self.alive {
            if matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed)) {
                self.begin_shutdown();
            }
        }
    }

    fn begin_shutdown(&mut self) {
        self.alive = None;
        if self.deadline.is_none() {
            self.deadline = Some(Instant::now() + SHUTDOWN_GRACE);
            debug!("falcosidekick: shutting down, draining the queue");
        }
    }

    /// Time left before the shutdown deadline (`None`: no deadline); zero means none left.
    fn left(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Sleeps for `wait`, starting the shutdown clock if the last sink goes meanwhile,
    /// and never past the shutdown deadline.
    async fn pause(&mut self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        if let Some(alive) = &mut self.alive {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return,
                _ = alive => self.begin_shutdown(),
            }
        }
        let until = match self.left() {
            Some(left) => until.min(tokio::time::Instant::now() + left),
            None => until,
        };
        tokio::time::sleep_until(until).await;
    }

    /// POSTs one alert until it is accepted or rejected, or the shutdown deadline passes.
    async fn deliver(&mut self, item: &Queued) -> Delivery {
        let mut backoff = INITIAL_BACKOFF.min(self.max_backoff);
        let mut failures = 0u64;
        loop {
            let timeout = match self.left() {
                Some(left) if left.is_zero() => return Delivery::GaveUp,
                Some(left) => self.timeout.min(left),
                None => self.timeout,
            };
            match self.post(item, timeout).await {
                Attempt::Delivered => {
                    self.counters.sent.fetch_add(1, Relaxed);
                    if failures > 0 {
                        info!(
                            "falcosidekick: alert {} delivered to {} after {failures} failed attempts",
                            item.seq, self.shown_url
                        );
                    }
                    return Delivery::Done;
                }
                Attempt::Rejected { status, body } => {
                    self.counters.rejected.fetch_add(1, Relaxed);
                    // Per alert: a Falcosidekick that rejects one alert usually rejects
                    // them all.
                    crate::warn_limited!(
                        "sidekick-rejected",
                        "falcosidekick at {} rejected alert {} ({}) with {status}: {body}",
                        self.shown_url,
                        item.seq,
                        item.rule
                    );
                    return Delivery::Done;
                }
                Attempt::Failed {
                    reason,
                    retry_after,
                } => {
                    self.counters.failed_attempts.fetch_add(1, Relaxed);
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(20) {
                        warn!(
                            "falcosidekick: POST of alert {} ({}) to {} failed ({failures} attempts so far, {} alerts waiting behind it; retrying with backoff up to {:?}): {reason}",
                            item.seq,
                            item.rule,
                            self.shown_url,
                            self.counters.queued.load(Relaxed),
                            self.max_backoff
                        );
                    } else {
                        debug!(
                            "falcosidekick: POST of alert {} failed (attempt {failures}): {reason}",
                            item.seq
                        );
                    }
                    let wait =
                        retry_after.map_or(backoff, |r| r.min(self.max_backoff).max(backoff));
                    self.pause(wait).await;
                    if self.left().is_some_and(|l| l.is_zero()) {
                        return Delivery::GaveUp;
                    }
                    self.counters.retries.fetch_add(1, Relaxed);
                    backoff = backoff.saturating_mul(2).min(self.max_backoff);
                }
            }
        }
    }

    /// One POST, the response body included, within `timeout`.
    async fn post(&self, item: &Queued, timeout: Duration) -> Attempt {
        match tokio::time::timeout(timeout, self.try_post(item)).await {
            Ok(attempt) => attempt,
            Err(_) => Attempt::Failed {
                reason: format!("POST to {} timed out after {timeout:?}", self.shown_url),
                retry_after: None,
            },
        }
    }

    async fn try_post(&self, item: &Queued) -> Attempt {
        let mut req = Request::post(self.target.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "*/*")
            .header(
                header::USER_AGENT,
                concat!("agent-monitor/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(auth) = &self.target.authorization {
            req = req.header(header::AUTHORIZATION, auth.clone());
        }
        let req = match req.body(Full::new(Bytes::from(item.body.clone()))) {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Failed {
                    reason: crate::errors::error_chain(&e),
                    retry_after: None,
                }
            }
        };
        let resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Failed {
                    reason: format!(
                        "error sending request to {}: {}",
                        self.shown_url,
                        crate::errors::error_chain(&e)
                    ),
                    retry_after: None,
                }
            }
        };
        let status = resp.status();
        if status.is_success() {
            // Read the body so that the connection can be reused; the alert is
            // delivered whatever happens to it.
            let _ = resp.into_body().collect().await;
            return Attempt::Delivered;
        }
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = body_excerpt(resp).await;
        if status.is_client_error()
            && status != StatusCode::REQUEST_TIMEOUT
            && status != StatusCode::TOO_MANY_REQUESTS
        {
            Attempt::Rejected { status, body }
        } else {
            Attempt::Failed {
                reason: format!("HTTP {status}: {body}"),
                retry_after,
            }
        }
    }
}

/// The start of a response body, as text.
async fn body_excerpt(resp: Response<Incoming>) -> String {
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    while buf.len() < BODY_EXCERPT {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(chunk) = frame.into_data() {
                    buf.extend_from_slice(&chunk);
                }
            }
            None => break,
            Some(Err(e)) => {
                buf.extend_from_slice(
                    format!(" [body unreadable: {}]", crate::errors::error_chain(&e)).as_bytes(),
                );
                break;
            }
        }
    }
    let truncated = buf.len() > BODY_EXCERPT;
    buf.truncate(BODY_EXCERPT);
    let mut text = String::from_utf8_lossy(&buf).trim().to_owned();
    if truncated {
        text.push_str(" [truncated]");
    }
    if text.is_empty() {
        text.push_str("(empty body)");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_gets_a_path_and_must_be_http() {
        let u = parse_url("http://127.0.0.1:2801").expect("url");
        assert_eq!(u.path(), "/");
        assert_eq!(u.as_str(), "http://127.0.0.1:2801/");
        let u = parse_url("https://sidekick.falco.svc:2801/custom").expect("url");
        assert_eq!(u.path(), "/custom");
        assert!(matches!(
            parse_url("ftp://x/"),
            Err(SidekickError::BadUrl(_))
        ));
        assert!(matches!(
            parse_url("not a url"),
            Err(SidekickError::BadUrl(_))
        ));
    }

    #[test]
    fn password_is_not_logged() {
        let u = parse_url("http://user:hunter2@host:2801/").expect("url");
        let shown = redacted(&u);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("user"), "{shown}");
    }

    #[test]
    fn url_credentials_become_basic_auth() {
        let t = Target::new(&parse_url("http://user:p%40ss@host:2801/x#frag").expect("url"))
            .expect("target");
        assert_eq!(t.uri.to_string(), "http://host:2801/x");
        let auth = t.authorization.expect("authorization");
        // base64("user:p@ss")
        assert_eq!(auth.to_str().expect("ascii"), "Basic dXNlcjpwQHNz");
        assert!(auth.is_sensitive());
        let t = Target::new(&parse_url("https://host/").expect("url")).expect("target");
        assert_eq!(t.uri.to_string(), "https://host/");
        assert!(t.authorization.is_none());
    }

    #[tokio::test]
    async fn bad_settings_are_refused() {
        let bad_ca = SidekickSettings {
            ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert!(matches!(
            spawn(bad_ca, "n".into()),
            Err(SidekickError::BadCa { .. })
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, b"not a certificate\n").expect("write");
        let no_cert = SidekickSettings {
            ca: Some(empty),
            ..Default::default()
        };
        assert!(matches!(
            spawn(no_cert, "n".into()),
            Err(SidekickError::BadCa { .. })
        ));
        let zero = SidekickSettings {
            queue: 0,
            ..Default::default()
        };
        assert!(matches!(
            spawn(zero, "n".into()),
            Err(SidekickError::BadSetting {
                setting: "queue",
                ..
            })
        ));
    }

    #[test]
    fn spawn_needs_a_runtime() {
        assert!(matches!(
            spawn(SidekickSettings::default(), "n".into()),
            Err(SidekickError::NoRuntime)
        ));
    }
}
