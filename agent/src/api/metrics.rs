//! Prometheus metrics on `metrics_listen` (`GET /metrics`), in the OpenMetrics text
//! format that Prometheus scrapes. Everything is read fresh from the kernel's maps and
//! the agent's state on each scrape: nothing is cached between scrapes.

use std::{fmt::Write as _, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{
    encoding::{EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use crate::{
    control::{Control, MetricsSnapshot},
    expiry::ExpiryStats,
    notify::NotifyStats,
    wire::{ReloadStatus, Stats, StoreStatus},
};

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, LabelValue)>;

/// A label value, escaped as the exposition format asks (`\\`, `\"`, `\n`): a policy
/// name such as `Wiki"} 1` then stays inside its quotes. prometheus-client writes
/// values as they are, so every label goes through this type.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct LabelValue(String);

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

fn label(name: &'static str, value: impl Into<String>) -> Labels {
    vec![(name, LabelValue(value.into()))]
}

pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(control)
}

async fn metrics(State(control): State<Arc<Control>>) -> Response {
    let snapshot = match tokio::task::spawn_blocking(move || control.metrics()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
        }
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    match render(&snapshot) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn counters(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: impl IntoIterator<Item = (String, u64)>,
) {
    let family = Family::<Labels, Counter>::default();
    for (value, n) in values {
        family.get_or_create(&self::label(label, value)).inc_by(n);
    }
    registry.register(name, help, family);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    registry.register(name, help, g);
}

/// The exposition text of a snapshot. Families come out in the order they are
/// registered here.
pub fn render(s: &MetricsSnapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    register_build(&mut registry);
    register_packets(&mut registry, &s.stats);
    register_refusals(&mut registry, &s.stats);
    register_policy_refusals(&mut registry, &s.stats);
    register_occupancy(&mut registry, &s.occupancy);
    register_state(&mut registry, s);
    register_reloads(&mut registry, &s.reloads);
    if let Some(notify) = &s.notify {
        register_notifications(&mut registry, notify);
    }
    register_expiry(&mut registry, &s.expiry);
    register_store(&mut registry, &s.stats.store);
    register_interfaces(&mut registry, &s.stats.interfaces);
    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}

fn register_build(registry: &mut Registry) {
    registry.register(
        "sessiongate_build",
        "Version of the agent and of its pinned map layout",
        Info::new(vec![
            ("version", LabelValue(env!("CARGO_PKG_VERSION").to_string())),
            (
                "map_layout",
                LabelValue(agent_common::maps::LAYOUT.to_string()),
            ),
        ]),
    );
}

fn register_packets(registry: &mut Registry, stats: &Stats) {
    counters(
        registry,
        "sessiongate_packets",
        "Packets judged by the XDP program, by verdict",
        "verdict",
        stats.verdicts.iter().cloned(),
    );
}

/// The kernel's counter names carry a prefix (`events_`, `replies_`) that the metric's
/// name already says.
fn register_refusals(registry: &mut Registry, stats: &Stats) {
    counters(
        registry,
        "sessiongate_refusal_events",
        "Events from the kernel: refusals sent to the agent, rate-limited in the kernel (one per device and policy per second), or lost because the ring buffer was full (use reports too); use reports (use_reports: a device opened a flow under a session-checked policy, at most one per device and policy per minute, only with notify_before)",
        "outcome",
        stats
            .events
            .iter()
            .map(|(e, n)| (e.strip_prefix("events_").unwrap_or(e).to_string(), *n)),
    );
    counters(
        registry,
        "sessiongate_replies",
        "Visible refusals: TCP resets and ICMP errors sent, refusals dropped beyond the per-device reply rate or because no reply could be built, and connections handed to the portal (redirected by XDP, delivered or dropped for want of a listener by TC, later packets kept local)",
        "outcome",
        stats.replies.iter().map(|(name, n)| {
            let name = name.strip_prefix("replies_").unwrap_or(name);
            (name.to_string(), *n)
        }),
    );
}

fn register_policy_refusals(registry: &mut Registry, stats: &Stats) {
    counters(
        registry,
        "sessiongate_policy_refused_flows",
        "New flows refused, by policy, since the agent started",
        "policy",
        stats.policy_drops.iter().cloned(),
    );
}

/// `occupancy` is (table, entries in use, capacity).
fn register_occupancy(registry: &mut Registry, occupancy: &[(&'static str, usize, usize)]) {
    let entries = Family::<Labels, Gauge>::default();
    let capacity = Family::<Labels, Gauge>::default();
    for (table, used, cap) in occupancy {
        entries
            .get_or_create(&label("table", *table))
            .set(*used as i64);
        capacity
            .get_or_create(&label("table", *table))
            .set(*cap as i64);
    }
    registry.register(
        "sessiongate_table_entries",
        "Entries in use in the kernel's tables",
        entries,
    );
    registry.register(
        "sessiongate_table_capacity_entries",
        "Capacity of the kernel's tables ([limits])",
        capacity,
    );
}

/// What the agent holds: sessions, policies, and which configuration they belong to.
fn register_state(registry: &mut Registry, s: &MetricsSnapshot) {
    gauge(
        registry,
        "sessiongate_sessions",
        "Device sessions known to the agent",
        s.stats.sessions as i64,
    );
    gauge(
        registry,
        "sessiongate_policies",
        "Policies in the configuration in force",
        s.policies as i64,
    );
    gauge(
        registry,
        "sessiongate_config_generation",
        "Generation of the configuration in force; it changes on every successful reload",
        i64::from(s.generation),
    );
}

/// The last reload's gauges appear only once a reload has been tried.
fn register_reloads(registry: &mut Registry, reloads: &ReloadStatus) {
    counters(
        registry,
        "sessiongate_reloads",
        "Config reloads (SIGHUP or sessiongate reload), by result",
        "result",
        [
            ("success".to_string(), reloads.succeeded),
            ("failure".to_string(), reloads.failed),
        ],
    );
    if let Some(ok) = reloads.last_ok {
        gauge(
            registry,
            "sessiongate_last_reload_success",
            "1 if the last reload was applied, 0 if it was rejected",
            i64::from(ok),
        );
    }
    if let Some(at) = reloads.last_at {
        gauge(
            registry,
            "sessiongate_last_reload_timestamp_seconds",
            "Unix time of the last reload attempt",
            at,
        );
    }
}

fn register_notifications(registry: &mut Registry, notify: &NotifyStats) {
    counters(
        registry,
        "sessiongate_notifications",
        "Re-authentication prompts to notify_url, by outcome",
        "outcome",
        [
            ("sent".to_string(), notify.sent),
            ("failed".to_string(), notify.failed),
            ("dropped".to_string(), notify.dropped),
            ("suppressed".to_string(), notify.suppressed),
        ],
    );
}

fn register_expiry(registry: &mut Registry, expiry: &ExpiryStats) {
    gauge(
        registry,
        "sessiongate_expiry_tracked_pairs",
        "(device, policy) pairs used lately that the prompts before expiry (notify_before) follow",
        expiry.pairs as i64,
    );
    counters(
        registry,
        "sessiongate_expiry_prompts",
        "Prompts before expiry: made (prompted), or pairs not followed because too many were (untracked)",
        "outcome",
        [
            ("prompted".to_string(), expiry.prompted),
            ("untracked".to_string(), expiry.untracked),
        ],
    );
}

/// Every store says whether it is followed; only etcd has a revision and a follower
/// to count.
fn register_store(registry: &mut Registry, store: &StoreStatus) {
    let connected = Family::<Labels, Gauge>::default();
    connected
        .get_or_create(&label("kind", store.kind.clone()))
        .set(i64::from(store.connected));
    registry.register(
        "sessiongate_store_connected",
        "1 while the session store is followed (always for the local store); 0 while etcd is unreachable and the last sessions known are enforced",
        connected,
    );
    if store.kind == "etcd" {
        gauge(
            registry,
            "sessiongate_store_revision",
            "The etcd revision this host's sessions reflect",
            store.revision,
        );
        gauge(
            registry,
            "sessiongate_store_bad_entries",
            "Device keys in etcd whose value is not a session (treated as no session)",
            store.bad_entries as i64,
        );
        counters(
            registry,
            "sessiongate_store",
            "The follower of the fleet's store: connections lost, full snapshots applied, watch events applied",
            "event",
            [
                ("disconnects".to_string(), store.disconnects),
                ("resyncs".to_string(), store.resyncs),
                ("events".to_string(), store.events),
            ],
        );
    }
}

/// `interfaces` is (interface, attach mode).
fn register_interfaces(registry: &mut Registry, interfaces: &[(String, String)]) {
    let attached = Family::<Labels, Gauge>::default();
    for (interface, mode) in interfaces {
        attached
            .get_or_create(&vec![
                ("interface", LabelValue(interface.clone())),
                ("mode", LabelValue(mode.clone())),
            ])
            .set(1);
    }
    registry.register(
        "sessiongate_interface_attached",
        "Interfaces the XDP program is attached to, and in which mode",
        attached,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ReloadStatus, Stats, StoreStatus};

    fn snapshot(policy: &str) -> MetricsSnapshot {
        MetricsSnapshot {
            stats: Stats {
                verdicts: vec![("admitted_new_flow".into(), 5)],
                events: vec![],
                replies: vec![],
                policy_drops: vec![(policy.into(), 3), ("App".into(), 1)],
                sessions: 2,
                udp_flows: 0,
                interfaces: vec![("eth0".into(), "generic".into())],
                store: StoreStatus::local(),
            },
            occupancy: vec![],
            policies: 2,
            generation: 1,
            reloads: ReloadStatus::default(),
            notify: None,
            expiry: ExpiryStats::default(),
        }
    }

    /// (name, labels, value)
    type Sample = (String, Vec<(String, String)>, f64);

    /// A sample line read as the exposition format says.
    fn sample(line: &str) -> Option<Sample> {
        let (name, mut rest) = match line.split_once('{') {
            Some((name, rest)) => (name, rest),
            None => {
                let (name, value) = line.split_once(' ')?;
                return Some((name.into(), vec![], value.parse().ok()?));
            }
        };
        let mut labels = Vec::new();
        while !rest.starts_with('}') {
            let (key, after) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        _ => return None,
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim_start_matches(',').into(), value));
            rest = &after[end + 1..];
        }
        let value = rest.strip_prefix("} ")?.parse().ok()?;
        Some((name.into(), labels, value))
    }

    #[test]
    fn a_label_value_cannot_forge_a_sample() {
        // Config validation refuses the newline; the escaping holds without it.
        let forged = "Wiki\"} 1\nsessiongate_sessions 99\n# \\";
        let text = render(&snapshot(forged)).unwrap();
        let samples: Vec<_> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| sample(l).unwrap_or_else(|| panic!("not a sample line: {l:?}")))
            .collect();
        let sessions: Vec<_> = samples
            .iter()
            .filter(|(name, ..)| name == "sessiongate_sessions")
            .collect();
        assert_eq!(sessions.len(), 1, "{text}");
        assert_eq!(sessions[0].2, 2.0);
        let mut refused: Vec<_> = samples
            .iter()
            .filter(|(name, ..)| name == "sessiongate_policy_refused_flows_total")
            .map(|(_, labels, value)| (labels[0].1.as_str(), *value))
            .collect();
        refused.sort_by(|a, b| a.0.cmp(b.0));
        assert_eq!(refused, [("App", 1.0), (forged, 3.0)], "{text}");
    }
}
