//! Counters: `sessiongate stats` and `/metrics`, read in one go under the datapath
//! lock so that they belong to one configuration.

use std::sync::Arc;

use agent_common::verdict::{Verdict, counter};

use super::{Active, Control, ControlError, lock};
use crate::{
    datapath::Maps,
    expiry::ExpiryStats,
    notify::NotifyStats,
    wire::{ReloadStatus, Stats},
};

/// Counters read together (`Control::snapshot`).
struct Snapshot {
    stats: Stats,
    active: Arc<Active>,
    /// Tracked UDP flows (IPv4, IPv6).
    flows: (usize, usize),
}

/// `/metrics`' data; rendered by `api::metrics`.
#[derive(Clone, Debug)]
pub struct MetricsSnapshot {
    /// What `sessiongate stats` shows.
    pub stats: Stats,
    /// (table, entries in use, capacity).
    pub occupancy: Vec<(&'static str, usize, usize)>,
    pub policies: usize,
    pub generation: u32,
    pub reloads: ReloadStatus,
    pub notify: Option<NotifyStats>,
    pub expiry: ExpiryStats,
}

impl Control {
    pub fn stats(&self) -> Result<Stats, ControlError> {
        Ok(self.snapshot()?.stats)
    }

    /// The counters under one datapath lock, with the configuration they belong to and
    /// the tracked flows per family.
    fn snapshot(&self) -> Result<Snapshot, ControlError> {
        let sessions = self.session_count();
        let datapath = lock(&self.datapath);
        // Read under the datapath lock: a reload publishes it before unlocking.
        let active = self.active();
        let maps = &datapath.maps;
        let counters = maps.counters()?;
        let drops = self.policy_drops_of(maps)?;
        let flows = maps.flow_count(crate::clock::boot_now_ns() as u64);
        drop(datapath);
        let named = |slots: &[(u32, &str)]| {
            slots
                .iter()
                .map(|(slot, name)| (name.to_string(), counters[*slot as usize]))
                .collect()
        };
        let stats = Stats {
            verdicts: Verdict::ALL
                .iter()
                .map(|v| (v.name().to_string(), counters[v.code() as usize]))
                .collect(),
            events: named(&counter::EVENTS),
            replies: named(&counter::REPLIES),
            policy_drops: drops,
            sessions,
            udp_flows: flows.0 + flows.1,
            interfaces: active.interfaces.clone(),
            store: self.store_status(),
        };
        Ok(Snapshot {
            stats,
            active,
            flows,
        })
    }

    /// Refused new flows per policy name since the datapath was loaded: the counts of
    /// both configuration sets plus those of sets since overwritten (`PolicyDrops`).
    fn policy_drops_of(&self, maps: &Maps) -> Result<Vec<(String, u64)>, ControlError> {
        let drops = lock(&self.drops);
        let live = [
            maps.set_policy_drops(0, drops.known(0))?,
            maps.set_policy_drops(1, drops.known(1))?,
        ];
        Ok(drops.totals([&live[0], &live[1]]))
    }

    /// Everything `/metrics` shows, read in one go.
    pub fn metrics(&self) -> Result<MetricsSnapshot, ControlError> {
        let Snapshot {
            stats,
            active,
            flows,
        } = self.snapshot()?;
        let sessions_v4 = self.sessions.read(|store| store.table().count_v4());
        let sessions = (sessions_v4, stats.sessions.saturating_sub(sessions_v4));
        let occupancy = lock(&self.datapath)
            .maps
            .occupancy(flows, sessions, &active.table);
        Ok(MetricsSnapshot {
            stats,
            occupancy,
            policies: active.config.policies.len(),
            generation: active.generation,
            reloads: self.reload_status(),
            notify: self.notify_stats(),
            expiry: self.expiry_stats(),
        })
    }
}
