//! Re-authentication prompts: an HTTP POST of a JSON body to `notify_url` the first
//! time a device is refused by a policy, then at most once per `interval` for each
//! (device, policy) pair; and, with `notify_before`, once before a device's session
//! runs out for a policy it uses (`expiry` decides when).
//!
//! The caller is the event loop, so [`Notifier::refused`] never blocks or awaits: it
//! decides rate limiting under a short lock and hands the prompt to a bounded queue.
//! When the queue is full the prompt is dropped and counted, and the pair is not marked,
//! so its next refusal tries again. A sender task drains the queue with at most
//! [`CONCURRENCY`] requests in flight, each with a timeout and retried with exponential
//! backoff; a slow or dead receiver only fills the queue.
//!
//! The body of a refusal's prompt:
//!
//! ```json
//! {"kind": "refused", "user": "alice", "device": "10.0.0.5", "policy": "payroll",
//!  "destination": "198.19.10.10:443/tcp", "destination_ip": "198.19.10.10",
//!  "port": 443, "protocol": "tcp", "reason": "session_expired",
//!  "session_age": "8h0m12s", "refused_at": "2025-01-01T12:00:00Z",
//!  "reauth_url": "https://sso.example.com/"}
//! ```
//!
//! `user`, `session_age` and `reauth_url` are `null` when unknown. Before expiry:
//!
//! ```json
//! {"kind": "expiring", "at": "2025-01-01T11:50:00Z", "device": "10.0.0.5",
//!  "user": "alice", "idp": "okta", "policy": "payroll", "session_age": "7h50m0s",
//!  "expires_at": "2025-01-01T12:00:00Z", "seconds_remaining": 600,
//!  "reauth_url": "https://portal.example.com/refresh-identity"}
//! ```
//! The HTTP client honours
//! `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`, does not follow redirects, and trusts the
//! Mozilla roots compiled in (webpki-roots), not the system store.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use reqwest::{StatusCode, Url};
use serde::Serialize;
use thiserror::Error;
use time::OffsetDateTime;
use tokio::sync::{Semaphore, mpsc};

use crate::events::{Expiring, Refusal};

/// Requests in flight at once; more wait in the queue.
pub const CONCURRENCY: usize = 4;
/// Wait before the second attempt; doubled before each further one.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// (device, policy) pairs remembered per interval. Past it a new pair's prompt is
/// dropped rather than sent unlimited, so memory and traffic both stay bounded.
pub const MAX_TRACKED: usize = 65_536;
/// At most one "not delivered" or "queue full" warning per this period.
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifyConfig {
    /// `http://` or `https://`.
    pub url: String,
    /// Minimum time between two prompts for the same (device, policy).
    pub interval: Duration,
    /// Where the user signs in again; passed to the receiver.
    pub reauth_url: Option<String>,
    /// Prompts waiting to be sent; more are dropped.
    pub queue: usize,
    /// Tries per prompt, the first included.
    pub attempts: u32,
    /// Per request, connection included.
    pub timeout: Duration,
}

impl NotifyConfig {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);

    /// A queue of 1024, 3 attempts and a 5 s timeout.
    pub fn new(url: String, interval: Duration, reauth_url: Option<String>) -> Self {
        NotifyConfig {
            url,
            interval,
            reauth_url,
            queue: 1024,
            attempts: 3,
            timeout: Duration::from_secs(5),
        }
    }

    /// Checks that `url` is an absolute http(s) URL, for configuration validation.
    pub fn validate(&self) -> Result<(), NotifyError> {
        parse_url(&self.url).map(drop)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NotifyError {
    #[error("notify_url {url:?} is not a URL: {reason}; write it as https://host/path")]
    Url { url: String, reason: String },
    #[error("notify_url {url:?} must start with http:// or https://")]
    Scheme { url: String },
}

fn parse_url(url: &str) -> Result<Url, NotifyError> {
    let parsed = Url::parse(url).map_err(|e| NotifyError::Url {
        url: url.into(),
        reason: e.to_string(),
    })?;
    match parsed.scheme() {
        "http" | "https" => Ok(parsed),
        _ => Err(NotifyError::Scheme { url: url.into() }),
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NotifyStats {
    /// Accepted by the receiver (2xx).
    pub sent: u64,
    /// Given up after every attempt, or refused with a 4xx other than 408 and 429.
    pub failed: u64,
    /// Not queued: the queue was full, or `MAX_TRACKED` new pairs in one interval.
    pub dropped: u64,
    /// Not sent: the pair was prompted less than `interval` ago.
    pub suppressed: u64,
}

/// The JSON body, tagged with its `kind`.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Prompt {
    Refused(Refused),
    Expiring(Expiring),
}

impl Prompt {
    fn pair(&self) -> (IpAddr, &str) {
        match self {
            Prompt::Refused(r) => (r.device, &r.policy),
            Prompt::Expiring(e) => (e.device, &e.policy),
        }
    }
}

/// A refusal's prompt.
#[derive(Debug, Serialize)]
struct Refused {
    user: Option<String>,
    device: IpAddr,
    policy: String,
    /// `ip:port/protocol`, IPv6 in brackets, as the refusal log line writes it.
    destination: String,
    destination_ip: IpAddr,
    port: u16,
    protocol: String,
    reason: String,
    session_age: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    refused_at: OffsetDateTime,
    reauth_url: Option<String>,
}

impl Refused {
    fn new(r: &Refusal, reauth_url: Option<String>) -> Self {
        let destination = match r.destination {
            IpAddr::V4(a) => format!("{a}:{}/{}", r.port, r.protocol),
            IpAddr::V6(a) => format!("[{a}]:{}/{}", r.port, r.protocol),
        };
        Refused {
            user: r.user.clone(),
            device: r.device,
            policy: r.policy.clone(),
            destination,
            destination_ip: r.destination,
            port: r.port,
            protocol: r.protocol.clone(),
            reason: r.reason.clone(),
            session_age: r.session_age.clone(),
            refused_at: r.at,
            reauth_url,
        }
    }
}

/// Sends re-authentication prompts; clones share the queue, limits and counters.
#[derive(Clone)]
pub struct Notifier {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Prompt>,
}

struct Shared {
    limiter: Mutex<Limiter>,
    reauth_url: Option<String>,
    counters: Counters,
    warnings: Mutex<Warnings>,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    suppressed: AtomicU64,
}

impl Notifier {
    /// Starts the sender task on the current tokio runtime (panics outside one). An
    /// invalid URL is logged, and every prompt then counts as failed.
    pub fn spawn(config: NotifyConfig) -> Self {
        let (queue, rx) = mpsc::channel(config.queue.max(1));
        let shared = Arc::new(Shared {
            limiter: Mutex::new(Limiter::new(config.interval, MAX_TRACKED, Instant::now())),
            reauth_url: config.reauth_url.clone(),
            counters: Counters::default(),
            warnings: Mutex::new(Warnings::default()),
        });
        let sender = Sender::new(&config, shared.clone());
        tokio::spawn(sender.run(rx));
        Notifier { shared, queue }
    }

    /// Called for every refusal: rate-limits and enqueues without blocking.
    pub fn refused(&self, refusal: &Refusal) {
        let counters = &self.shared.counters;
        let mut limiter = lock(&self.shared.limiter);
        match limiter.admit(refusal.device, &refusal.policy, Instant::now()) {
            Admit::Send => {}
            Admit::Suppress => {
                counters.suppressed.fetch_add(1, Relaxed);
                return;
            }
            Admit::Full => {
                counters.dropped.fetch_add(1, Relaxed);
                drop(limiter);
                self.shared
                    .warn_dropped("too many devices refused in one interval");
                return;
            }
        }
        let prompt = Refused::new(refusal, self.shared.reauth_url.clone());
        if let Err(e) = self.queue.try_send(Prompt::Refused(prompt)) {
            // Not sent, so not rate-limited: the pair's next refusal tries again.
            limiter.forget(refusal.device, &refusal.policy);
            drop(limiter);
            counters.dropped.fetch_add(1, Relaxed);
            self.shared.warn_dropped(not_queued(&e));
        }
    }

    /// Called once per device, policy and authentication (`expiry` limits them):
    /// enqueues without blocking.
    pub fn expiring(&self, expiring: &Expiring) {
        if let Err(e) = self.queue.try_send(Prompt::Expiring(expiring.clone())) {
            self.shared.counters.dropped.fetch_add(1, Relaxed);
            self.shared.warn_dropped(not_queued(&e));
        }
    }

    pub fn stats(&self) -> NotifyStats {
        let c = &self.shared.counters;
        NotifyStats {
            sent: c.sent.load(Relaxed),
            failed: c.failed.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            suppressed: c.suppressed.load(Relaxed),
        }
    }
}

fn not_queued<T>(e: &mpsc::error::TrySendError<T>) -> &'static str {
    match e {
        mpsc::error::TrySendError::Full(_) => "queue full",
        mpsc::error::TrySendError::Closed(_) => "sender stopped",
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn warn_dropped(&self, why: &str) {
        if let Some(skipped) = lock(&self.warnings).dropped.ready(Instant::now()) {
            tracing::warn!(why, skipped, "re-authentication prompt dropped");
        }
    }
}

/// Last time each kind of warning was written, and how many were skipped since.
#[derive(Default)]
struct Warnings {
    dropped: Throttle,
    failed: Throttle,
}

#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    skipped: u64,
}

impl Throttle {
    /// `Some(skipped since the last one)` when a warning may be written now.
    fn ready(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < WARN_EVERY)
        {
            self.skipped += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.skipped))
    }
}

/// The decision for one refusal.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Send; the pair is marked now.
    Send,
    Suppress,
    /// `cap` new pairs already this interval.
    Full,
}

/// When each (device, policy) pair was last prompted, in two generations so that memory
/// stays bounded without scanning: every `interval` the current map becomes the previous
/// one and the older previous one is forgotten. Its entries were all made more than
/// `interval` ago, so forgetting them changes no decision. At most `cap` pairs are added
/// per generation, so at most `2 * cap` are held. Every mark in the current map is
/// younger than `interval`, so a pair found there is always suppressed.
struct Limiter {
    interval: Duration,
    cap: usize,
    current: HashMap<(IpAddr, String), Instant>,
    previous: HashMap<(IpAddr, String), Instant>,
    rotated: Instant,
}

impl Limiter {
    fn new(interval: Duration, cap: usize, now: Instant) -> Self {
        Limiter {
            interval,
            cap,
            current: HashMap::new(),
            previous: HashMap::new(),
            rotated: now,
        }
    }

    fn admit(&mut self, device: IpAddr, policy: &str, now: Instant) -> Admit {
        if now.duration_since(self.rotated) >= self.interval {
            self.previous = std::mem::take(&mut self.current);
            self.rotated = now;
        }
        let key = (device, policy.to_owned());
        let last = self.current.get(&key).or_else(|| self.previous.get(&key));
        if last.is_some_and(|last| now.duration_since(*last) < self.interval) {
            return Admit::Suppress;
        }
        if self.current.len() >= self.cap {
            return Admit::Full;
        }
        self.current.insert(key, now);
        Admit::Send
    }

    /// Undoes `admit` of a pair whose prompt could not be queued. Its older mark, if
    /// any, is in the previous map and had expired.
    fn forget(&mut self, device: IpAddr, policy: &str) {
        self.current.remove(&(device, policy.to_owned()));
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// The task that drains the queue.
#[derive(Clone)]
struct Sender {
    client: Option<reqwest::Client>,
    url: Arc<str>,
    attempts: u32,
    shared: Arc<Shared>,
}

impl Sender {
    fn new(config: &NotifyConfig, shared: Arc<Shared>) -> Self {
        let client = parse_url(&config.url)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                reqwest::Client::builder()
                    .timeout(config.timeout)
                    .connect_timeout(config.timeout)
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent(concat!("sessiongate/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| format!("cannot build the HTTP client: {}", chain(&e)))
            });
        let client = client
            .inspect_err(|error| {
                tracing::warn!(error = %error, "re-authentication prompts disabled");
            })
            .ok();
        Sender {
            client,
            url: config.url.as_str().into(),
            attempts: config.attempts.max(1),
            shared,
        }
    }

    async fn run(self, mut rx: mpsc::Receiver<Prompt>) {
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        // Take a slot first, so that a busy sender leaves prompts in the bounded queue.
        while let Ok(slot) = slots.clone().acquire_owned().await {
            let Some(prompt) = rx.recv().await else { break };
            let sender = self.clone();
            tokio::spawn(async move {
                sender.deliver(&prompt).await;
                drop(slot);
            });
        }
    }

    async fn deliver(&self, prompt: &Prompt) {
        let counters = &self.shared.counters;
        let Some(client) = &self.client else {
            counters.failed.fetch_add(1, Relaxed);
            return;
        };
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        let error = loop {
            let (error, retry) = match client.post(&*self.url).json(prompt).send().await {
                Ok(r) if r.status().is_success() => {
                    counters.sent.fetch_add(1, Relaxed);
                    return;
                }
                Ok(r) => (format!("HTTP {}", r.status()), retryable(r.status())),
                Err(e) => (chain(&e), true),
            };
            if !retry || attempt >= self.attempts {
                break error;
            }
            tracing::debug!(attempt, error = %error, "re-authentication prompt: retrying");
            tokio::time::sleep(backoff).await;
            backoff *= 2;
            attempt += 1;
        };
        counters.failed.fetch_add(1, Relaxed);
        if let Some(skipped) = lock(&self.shared.warnings).failed.ready(Instant::now()) {
            let (device, policy) = prompt.pair();
            tracing::warn!(
                url = %self.url,
                device = %device,
                policy = %policy,
                attempts = attempt,
                error = %error,
                skipped,
                "re-authentication prompt not delivered"
            );
        }
    }
}

/// Server errors, timeouts and rate limiting may pass; other refusals will not.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// An error and its causes on one line ("error sending request: connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests;
