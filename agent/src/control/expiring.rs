//! Prompts before sessions run out (`notify_before`): the kernel's use reports are
//! recorded by (device, policy name), and a periodic check prompts each pair whose
//! session runs out within `notify_before` (`expiry::RecentUse`), through the webhook,
//! the event stream and the log.

use std::{collections::HashMap, time::Duration};

use super::{Control, lock, views};
use crate::{
    clock::ClockPair,
    config::{Config, Policy},
    events::{self, Event, Expiring, RawEvent},
    expiry::{Due, ExpiryStats, Standing},
};

impl Control {
    /// Records a use report from the kernel (`Verdict::AdmittedNewFlow`).
    pub fn record_use(&self, raw: &RawEvent) {
        if self.active().config.agent.notify_before.is_none() {
            return;
        }
        let Some(policy) = lock(&self.drops)
            .name(u32::from(raw.set), raw.policy)
            .map(str::to_string)
        else {
            return;
        };
        lock(&self.reports.recent).used(raw.device, policy, raw.at_boot_ns);
    }

    /// Prompts every pair now due; called every few seconds. Returns how many.
    pub fn prompt_expiring(&self) -> usize {
        let active = self.active();
        let config = &active.config;
        let Some(before) = config.agent.notify_before else {
            lock(&self.reports.recent).clear();
            return 0;
        };
        if lock(&self.reports.recent).stats().pairs == 0 {
            return 0;
        }
        let policies: HashMap<&str, (&Policy, Duration)> = config
            .policies
            .iter()
            .filter_map(|p| Some((p.name.as_str(), (p, p.duration()?.0))))
            .collect();
        let durations: HashMap<&str, Duration> =
            policies.iter().map(|(name, (_, d))| (*name, *d)).collect();
        let clock = ClockPair::now();
        let boot_id = self.sessions.boot_id();
        let prompts: Vec<Expiring> = self.sessions.read(|store| {
            let due = lock(&self.reports.recent).due(clock.boot_ns, before.0, |device, name| {
                let (policy, limit) = policies.get(name)?;
                let limit = i64::try_from(limit.as_nanos()).ok()?;
                let record = store.get(&device)?;
                // A sign-in since the use may have left the device under other policies
                // (its groups changed): a policy that no longer applies is forgotten.
                if !policy.applies_to(Some(&record.identity())) {
                    return None;
                }
                Some(Standing {
                    left_ns: limit - views::age_ns(&record, &clock, boot_id),
                    authenticated_at: record.authenticated_at,
                })
            });
            due.into_iter()
                .filter_map(|d| {
                    let record = store.get(&d.device)?;
                    let limit = *durations.get(d.policy.as_str())?;
                    Some(expiring(&d, &record, limit, &clock, config))
                })
                .collect()
        });
        for prompt in &prompts {
            events::log_expiring(prompt);
            if let Some(notifier) = &self.reports.notifier {
                notifier.expiring(prompt);
            }
            // No subscribers is the usual case, not an error.
            let _ = self.reports.live.send(Event::Expiring(prompt.clone()));
        }
        prompts.len()
    }

    /// How the prompts before expiry stand.
    pub fn expiry_stats(&self) -> ExpiryStats {
        lock(&self.reports.recent).stats()
    }
}

/// The prompt for a pair due now.
fn expiring(
    due: &Due,
    record: &crate::sessions::SessionRecord,
    limit: Duration,
    clock: &ClockPair,
    config: &Config,
) -> Expiring {
    let left_ns = due.standing.left_ns.max(0);
    Expiring {
        at: clock.wall,
        device: due.device,
        user: record.user.clone(),
        idp: record.idp.clone(),
        policy: due.policy.clone(),
        session_age: events::format_age(limit.as_nanos() as i64 - left_ns),
        expires_at: record.authenticated_at + limit,
        seconds_remaining: (left_ns / 1_000_000_000) as u64,
        reauth_url: config.reauth_page("/refresh-identity"),
    }
}
