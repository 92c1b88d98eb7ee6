//! `sessiongate stats`: the datapath's counters and the session store's state.

use super::{
    Target,
    target::{decode, print_json},
};
use crate::{
    outln,
    wire::{Stats, StoreStatus},
};

/// `sessiongate stats`.
pub(super) async fn execute(target: &Target, json: bool) -> anyhow::Result<()> {
    let client = target.client()?;
    let value = client.get("/v1/stats").await?;
    if json {
        return print_json(&value);
    }
    let stats: Stats = decode(value)?;
    outln!(
        "interfaces: {}",
        stats
            .interfaces
            .iter()
            .map(|(i, m)| format!("{i} ({m})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    outln!(
        "sessions: {}   tracked UDP flows: {}",
        stats.sessions,
        stats.udp_flows
    );
    outln!("store: {}", describe_store(&stats.store));
    for (name, value) in stats
        .verdicts
        .iter()
        .chain(&stats.events)
        .chain(&stats.replies)
    {
        outln!("  {name:<26} {value}");
    }
    for (name, drops) in &stats.policy_drops {
        outln!("  policy {:<30} {drops} refused", format!("{name:?}"));
    }
    Ok(())
}

/// One line on the session store: kind, and for etcd whether it is followed.
fn describe_store(store: &StoreStatus) -> String {
    if store.kind != "etcd" {
        return store.kind.clone();
    }
    let since = store
        .since
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let state = if store.connected {
        format!("connected since {since}")
    } else {
        format!(
            "UNREACHABLE since {since} (enforcing the last sessions known; logins fail while no member answers): {}",
            store.last_error.as_deref().unwrap_or("not connected yet")
        )
    };
    format!(
        "etcd {} {state}; revision {}, {} disconnect(s), {} full resync(s), {} bad entr(ies), {} lost race(s)",
        store.endpoints.join(","),
        store.revision,
        store.disconnects,
        store.resyncs,
        store.bad_entries,
        store.lost_races
    )
}
