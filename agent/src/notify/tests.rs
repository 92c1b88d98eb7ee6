use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicUsize, Ordering::SeqCst},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header::CONTENT_TYPE},
    routing::post,
};
use serde_json::{Value, json};
use time::macros::datetime;
use tokio::net::TcpListener;

use super::*;

fn refusal(device: &str, policy: &str) -> Refusal {
    Refusal {
        at: datetime!(2025-01-01 12:00:00 UTC),
        reason: "session_expired".into(),
        device: device.parse().unwrap(),
        user: Some("alice".into()),
        policy: policy.into(),
        destination: "198.19.10.10".parse().unwrap(),
        port: 443,
        protocol: "tcp".into(),
        session_age: Some("8h0m12s".into()),
        action: "drop".into(),
    }
}

fn config(url: &str, interval: Duration) -> NotifyConfig {
    NotifyConfig::new(
        url.into(),
        interval,
        Some("https://sso.example.com/".into()),
    )
}

/// A local receiver answering each POST with the next status of a list (the last one
/// repeats), and keeping every request.
struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
}

struct ReceiverState {
    statuses: Vec<StatusCode>,
    hits: AtomicUsize,
    /// (arrival, content type, body) of every request.
    requests: Mutex<Vec<(Instant, String, Value)>>,
}

impl Receiver {
    async fn start(statuses: &[u16]) -> Receiver {
        let state = Arc::new(ReceiverState {
            statuses: statuses
                .iter()
                .map(|s| StatusCode::from_u16(*s).unwrap())
                .collect(),
            hits: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/hook", post(Self::handle))
            .with_state(state.clone());
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, state }
    }

    async fn handle(
        State(state): State<Arc<ReceiverState>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let content_type = headers
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = serde_json::from_slice(&body).expect("the body is JSON");
        lock(&state.requests).push((Instant::now(), content_type, body));
        let n = state.hits.fetch_add(1, SeqCst);
        state.statuses[n.min(state.statuses.len() - 1)]
    }

    fn hits(&self) -> usize {
        self.state.hits.load(SeqCst)
    }

    fn bodies(&self) -> Vec<Value> {
        lock(&self.state.requests)
            .iter()
            .map(|(_, _, body)| body.clone())
            .collect()
    }
}

/// Waits up to 10 s for `done`, then fails with `what`.
async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn first_refusal_is_posted_with_every_field() {
    let receiver = Receiver::start(&[200]).await;
    let notifier = Notifier::spawn(config(&receiver.url, Duration::from_secs(300)));

    notifier.refused(&refusal("10.0.0.5", "payroll"));
    let mut v6 = refusal("2001:db8::5", "dns");
    v6.user = None;
    v6.session_age = None;
    v6.reason = "unknown_device".into();
    v6.destination = "2001:db8::53".parse().unwrap();
    v6.port = 53;
    v6.protocol = "udp".into();
    notifier.refused(&v6);

    wait_for("two prompts", || receiver.hits() == 2).await;
    let requests = lock(&receiver.state.requests);
    let by_policy = |policy: &str| {
        let found = requests.iter().find(|(_, _, b)| b["policy"] == policy);
        found.expect("a prompt for the policy").clone()
    };
    let (_, content_type, body) = by_policy("payroll");
    assert_eq!(content_type, "application/json");
    assert_eq!(
        body,
        json!({
            "kind": "refused",
            "user": "alice",
            "device": "10.0.0.5",
            "policy": "payroll",
            "destination": "198.19.10.10:443/tcp",
            "destination_ip": "198.19.10.10",
            "port": 443,
            "protocol": "tcp",
            "reason": "session_expired",
            "session_age": "8h0m12s",
            "refused_at": "2025-01-01T12:00:00Z",
            "reauth_url": "https://sso.example.com/",
        })
    );
    let (_, _, body) = by_policy("dns");
    assert_eq!(
        body,
        json!({
            "kind": "refused",
            "user": null,
            "device": "2001:db8::5",
            "policy": "dns",
            "destination": "[2001:db8::53]:53/udp",
            "destination_ip": "2001:db8::53",
            "port": 53,
            "protocol": "udp",
            "reason": "unknown_device",
            "session_age": null,
            "refused_at": "2025-01-01T12:00:00Z",
            "reauth_url": "https://sso.example.com/",
        })
    );
    drop(requests);
    assert_eq!(
        notifier.stats(),
        NotifyStats {
            sent: 2,
            ..NotifyStats::default()
        }
    );
}

#[tokio::test]
async fn a_prompt_before_expiry_is_posted_with_every_field() {
    let receiver = Receiver::start(&[200]).await;
    let notifier = Notifier::spawn(config(&receiver.url, Duration::from_secs(300)));
    notifier.expiring(&Expiring {
        at: datetime!(2025-01-01 11:50:00 UTC),
        device: "10.0.0.5".parse().unwrap(),
        user: "alice".into(),
        idp: "okta".into(),
        policy: "payroll".into(),
        session_age: "7h50m0s".into(),
        expires_at: datetime!(2025-01-01 12:00:00 UTC),
        seconds_remaining: 600,
        reauth_url: Some("https://portal.example.com/refresh-identity".into()),
    });
    wait_for("the prompt", || receiver.hits() == 1).await;
    let body = lock(&receiver.state.requests)[0].2.clone();
    assert_eq!(
        body,
        json!({
            "kind": "expiring",
            "at": "2025-01-01T11:50:00Z",
            "device": "10.0.0.5",
            "user": "alice",
            "idp": "okta",
            "policy": "payroll",
            "session_age": "7h50m0s",
            "expires_at": "2025-01-01T12:00:00Z",
            "seconds_remaining": 600,
            "reauth_url": "https://portal.example.com/refresh-identity",
        })
    );
    wait_for("the count", || notifier.stats().sent == 1).await;
}

#[tokio::test]
async fn one_prompt_per_device_and_policy_per_interval() {
    let interval = Duration::from_millis(400);
    let receiver = Receiver::start(&[200]).await;
    let notifier = Notifier::spawn(config(&receiver.url, interval));
    let started = Instant::now();

    for _ in 0..1000 {
        notifier.refused(&refusal("10.0.0.5", "payroll"));
    }
    notifier.refused(&refusal("10.0.0.5", "hr"));
    notifier.refused(&refusal("10.0.0.6", "payroll"));
    // Everything above must fall within one interval for the counts below to hold.
    assert!(started.elapsed() < interval, "the flood took too long");

    wait_for("three prompts", || receiver.hits() == 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(receiver.hits(), 3, "a suppressed prompt was sent");
    assert_eq!(notifier.stats().suppressed, 999);

    tokio::time::sleep_until((started + interval + Duration::from_millis(50)).into()).await;
    notifier.refused(&refusal("10.0.0.5", "payroll"));
    notifier.refused(&refusal("10.0.0.5", "payroll"));
    wait_for("the fourth prompt", || receiver.hits() == 4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut pairs: Vec<(String, String)> = receiver
        .bodies()
        .iter()
        .map(|b| (b["device"].to_string(), b["policy"].to_string()))
        .collect();
    pairs.sort();
    let pair = |d: &str, p: &str| (format!("{d:?}"), format!("{p:?}"));
    assert_eq!(
        pairs,
        [
            pair("10.0.0.5", "hr"),
            pair("10.0.0.5", "payroll"),
            pair("10.0.0.5", "payroll"),
            pair("10.0.0.6", "payroll"),
        ]
    );
    assert_eq!(
        notifier.stats(),
        NotifyStats {
            sent: 4,
            suppressed: 1000,
            ..NotifyStats::default()
        }
    );
}

#[tokio::test]
async fn server_error_is_retried_then_sent() {
    let receiver = Receiver::start(&[500, 200]).await;
    let notifier = Notifier::spawn(config(&receiver.url, Duration::from_secs(300)));

    notifier.refused(&refusal("10.0.0.5", "payroll"));
    wait_for("the retry to succeed", || notifier.stats().sent == 1).await;

    assert_eq!(receiver.hits(), 2);
    assert_eq!(notifier.stats().failed, 0);
    let requests = lock(&receiver.state.requests);
    let gap = requests[1].0 - requests[0].0;
    assert!(
        gap >= FIRST_BACKOFF,
        "retried after {gap:?}, before the backoff"
    );
    assert_eq!(requests[0].2, requests[1].2, "the retry sent another body");
}

#[tokio::test]
async fn gives_up_after_the_last_attempt() {
    let receiver = Receiver::start(&[503]).await;
    let mut config = config(&receiver.url, Duration::from_secs(300));
    config.attempts = 2;
    let notifier = Notifier::spawn(config);

    notifier.refused(&refusal("10.0.0.5", "payroll"));
    wait_for("the prompt to fail", || notifier.stats().failed == 1).await;
    tokio::time::sleep(FIRST_BACKOFF * 3).await;
    assert_eq!(receiver.hits(), 2, "not exactly `attempts` tries");
    assert_eq!(notifier.stats().sent, 0);
}

#[tokio::test]
async fn client_error_is_not_retried() {
    let receiver = Receiver::start(&[400, 200]).await;
    let notifier = Notifier::spawn(config(&receiver.url, Duration::from_secs(300)));

    notifier.refused(&refusal("10.0.0.5", "payroll"));
    wait_for("the prompt to fail", || notifier.stats().failed == 1).await;
    tokio::time::sleep(FIRST_BACKOFF * 2).await;
    assert_eq!(receiver.hits(), 1);
    assert_eq!(notifier.stats().sent, 0);
}

/// The test runtime has one thread, so the sender cannot drain the queue while the
/// test calls `refused`: the count of drops is exact.
#[tokio::test]
async fn dead_receiver_never_blocks_refused() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, SeqCst);
            held.push(stream);
        }
    });
    let mut config = config(&url, Duration::from_secs(300));
    config.queue = 8;
    config.attempts = 1;
    config.timeout = Duration::from_millis(300);
    let notifier = Notifier::spawn(config);

    // The sender takes this one and waits on the receiver.
    notifier.refused(&refusal("10.0.0.1", "payroll"));
    wait_for("the first connection", || accepted.load(SeqCst) == 1).await;

    let started = Instant::now();
    for n in 0..10_000u32 {
        let mut r = refusal("10.0.0.1", "payroll");
        r.device = Ipv4Addr::from(0x0a01_0000 + n).into();
        notifier.refused(&r);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "10,000 refusals took {took:?}"
    );
    assert_eq!(
        notifier.stats(),
        NotifyStats {
            dropped: 10_000 - 8,
            ..NotifyStats::default()
        }
    );

    // Each request times out rather than hanging: the first and the 8 queued fail.
    wait_for("every prompt to time out", || notifier.stats().failed == 9).await;
    assert_eq!(notifier.stats().sent, 0);

    // Dropped pairs were not marked, so one of them is prompted on its next refusal.
    let mut r = refusal("10.0.0.1", "payroll");
    r.device = Ipv4Addr::from(0x0a01_0000 + 9_999).into();
    notifier.refused(&r);
    assert_eq!(notifier.stats().dropped, 10_000 - 8);
    assert_eq!(notifier.stats().suppressed, 0);
}

#[test]
fn limiter_suppresses_within_the_interval_across_generations() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let a: IpAddr = "10.0.0.1".parse().unwrap();
    let mut limiter = Limiter::new(s(10), 100, t0);

    assert_eq!(limiter.admit(a, "p", t0 + s(9)), Admit::Send);
    assert_eq!(limiter.admit(a, "p", t0 + s(9)), Admit::Suppress);
    assert_eq!(limiter.admit(a, "q", t0 + s(9)), Admit::Send);
    // The generation turns at t0 + 10 s; the pair, marked at 9 s, is still within.
    assert_eq!(limiter.admit(a, "other", t0 + s(10)), Admit::Send);
    assert_eq!(limiter.admit(a, "p", t0 + s(18)), Admit::Suppress);
    assert_eq!(limiter.admit(a, "p", t0 + s(19)), Admit::Send);
    assert_eq!(limiter.admit(a, "p", t0 + s(20)), Admit::Suppress);
}

#[test]
fn limiter_holds_at_most_two_generations_of_cap() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut limiter = Limiter::new(s(10), 2, t0);
    let ip = |n: u32| IpAddr::from(Ipv4Addr::from(n));

    assert_eq!(limiter.admit(ip(1), "p", t0), Admit::Send);
    assert_eq!(limiter.admit(ip(2), "p", t0), Admit::Send);
    assert_eq!(limiter.admit(ip(3), "p", t0), Admit::Full);
    assert_eq!(limiter.admit(ip(1), "p", t0 + s(1)), Admit::Suppress);
    for second in 10..100 {
        let now = t0 + s(second);
        for n in 0..10 {
            limiter.admit(ip(n + 100 * second as u32), "p", now);
        }
        assert!(limiter.held() <= 4, "{} pairs held", limiter.held());
    }
    // Long after, the first pairs are forgotten and prompted again.
    assert_eq!(limiter.admit(ip(1), "p", t0 + s(200)), Admit::Send);
}

#[test]
fn limiter_forget_undoes_admit() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let a: IpAddr = "10.0.0.1".parse().unwrap();
    let mut limiter = Limiter::new(s(10), 100, t0);

    assert_eq!(limiter.admit(a, "p", t0), Admit::Send);
    limiter.forget(a, "p");
    assert_eq!(limiter.admit(a, "p", t0 + s(1)), Admit::Send);
    assert_eq!(limiter.admit(a, "p", t0 + s(5)), Admit::Suppress);
    // Prompted again in the next generation and forgotten: the expired mark in the
    // previous generation does not suppress it.
    assert_eq!(limiter.admit(a, "p", t0 + s(12)), Admit::Send);
    limiter.forget(a, "p");
    assert_eq!(limiter.admit(a, "p", t0 + s(13)), Admit::Send);
    assert_eq!(limiter.admit(a, "p", t0 + s(14)), Admit::Suppress);
}

#[test]
fn validate_names_the_bad_url() {
    let check = |url: &str| config(url, Duration::from_secs(1)).validate();
    assert_eq!(check("https://hooks.example.com/reauth"), Ok(()));
    assert_eq!(check("http://127.0.0.1:8080/"), Ok(()));
    assert_eq!(
        check("ftp://example.com/"),
        Err(NotifyError::Scheme {
            url: "ftp://example.com/".into()
        })
    );
    assert!(matches!(
        check("hooks.example.com"),
        Err(NotifyError::Url { .. })
    ));
}
