//! Refusals reported by the kernel: resolved to a user and a policy name, logged,
//! handed to the re-authentication prompts, kept for `GET /v1/events`, and streamed
//! to live subscribers (with the prompts before expiry, `expiring`).

use std::sync::Mutex;

use tokio::sync::broadcast;

use super::{Control, lock};
use crate::{
    clock::ClockPair,
    events::{self, Event, History, RawEvent, Refusal},
    expiry::RecentUse,
    notify::{Notifier, NotifyStats},
};

/// Events buffered per live event-stream subscriber before it starts missing some.
const EVENT_STREAM_BUFFER: usize = 1024;

/// Where refusals and prompts go once resolved, and the pairs in use lately.
pub(super) struct Reports {
    history: Mutex<History>,
    pub(super) live: broadcast::Sender<Event>,
    pub(super) notifier: Option<Notifier>,
    /// Lock order: after the session mirror.
    pub(super) recent: Mutex<RecentUse>,
}

impl Reports {
    pub(super) fn new(notifier: Option<Notifier>) -> Self {
        Self {
            history: Mutex::new(History::default()),
            live: broadcast::channel(EVENT_STREAM_BUFFER).0,
            notifier,
            recent: Mutex::new(RecentUse::default()),
        }
    }
}

impl Control {
    /// Resolves, logs, records and passes on a refusal from the kernel.
    pub fn record_refusal(&self, raw: &RawEvent) {
        let user = self
            .sessions
            .read(|store| store.get(&raw.device).map(|r| r.user.clone()));
        let policy = lock(&self.drops)
            .name(u32::from(raw.set), raw.policy)
            .map_or_else(|| format!("#{}", raw.policy), str::to_string);
        let refusal = raw.resolve(&ClockPair::now(), user, policy);
        events::log(&refusal);
        let reports = &self.reports;
        if let Some(notifier) = &reports.notifier {
            notifier.refused(&refusal);
        }
        // No subscribers is the usual case, not an error.
        let _ = reports.live.send(Event::Refused(refusal.clone()));
        lock(&reports.history).push(refusal);
    }

    pub fn recent_refusals(&self) -> Vec<Refusal> {
        lock(&self.reports.history).snapshot()
    }

    /// Live refusals and prompts before expiry, for `GET /v1/events/stream`.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.reports.live.subscribe()
    }

    /// How the re-authentication prompts went; `None` without `[agent.notify]`.
    pub fn notify_stats(&self) -> Option<NotifyStats> {
        self.reports.notifier.as_ref().map(Notifier::stats)
    }
}
