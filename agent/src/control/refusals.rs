//! Refusals reported by the kernel: resolved to a user and a policy name, logged,
//! handed to the re-authentication prompts, kept for `GET /v1/events`, and streamed
//! to live subscribers.

use std::sync::Mutex;

use tokio::sync::broadcast;

use super::{Control, lock};
use crate::{
    clock::ClockPair,
    events::{self, History, RawRefusal, Refusal},
    notify::{Notifier, NotifyStats},
};

/// Refusals buffered per live event-stream subscriber before it starts missing some.
const EVENT_STREAM_BUFFER: usize = 1024;

/// Where refusals go once resolved.
pub(super) struct Refusals {
    history: Mutex<History>,
    live: broadcast::Sender<Refusal>,
    notifier: Option<Notifier>,
}

impl Refusals {
    pub(super) fn new(notifier: Option<Notifier>) -> Self {
        Self {
            history: Mutex::new(History::default()),
            live: broadcast::channel(EVENT_STREAM_BUFFER).0,
            notifier,
        }
    }
}

impl Control {
    /// Resolves, logs, records and passes on a refusal from the kernel.
    pub fn record_refusal(&self, raw: &RawRefusal) {
        let user = self
            .sessions
            .read(|store| store.get(&raw.device).map(|r| r.user.clone()));
        let policy = lock(&self.drops)
            .name(u32::from(raw.set), raw.policy)
            .map_or_else(|| format!("#{}", raw.policy), str::to_string);
        let refusal = raw.resolve(&ClockPair::now(), user, policy);
        events::log(&refusal);
        let refusals = &self.refusals;
        if let Some(notifier) = &refusals.notifier {
            notifier.refused(&refusal);
        }
        // No subscribers is the usual case, not an error.
        let _ = refusals.live.send(refusal.clone());
        lock(&refusals.history).push(refusal);
    }

    pub fn recent_refusals(&self) -> Vec<Refusal> {
        lock(&self.refusals.history).snapshot()
    }

    /// Live refusals, for `GET /v1/events/stream`.
    pub fn subscribe(&self) -> broadcast::Receiver<Refusal> {
        self.refusals.live.subscribe()
    }

    /// How the re-authentication prompts went; `None` without `[agent.notify]`.
    pub fn notify_stats(&self) -> Option<NotifyStats> {
        self.refusals.notifier.as_ref().map(Notifier::stats)
    }
}
