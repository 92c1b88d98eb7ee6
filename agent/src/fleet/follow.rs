//! The follower: the one task that applies the store to this host, in revision order.

use std::{sync::Arc, time::Duration};

use etcd_client::{EventType, GetOptions, WatchOptions};

use super::{Fleet, StoreChange, entry, lock, members::short, unix_now};
use crate::{clock::ClockPair, control::Control};

/// Reconnection backoff: doubles from the first to the last, then stays there.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why a watch ended.
enum Ended {
    /// etcd could not be reached or dropped the stream.
    Lost(String),
    /// The revision to resume from has been compacted away: take a snapshot again.
    Compacted(i64),
}

/// Keeps this host equal to the store, forever: snapshot, watch, and after any failure
/// the same again from where it stopped.
pub async fn follow(fleet: Arc<Fleet>, control: Arc<Control>) {
    let mut backoff = BACKOFF_FIRST;
    let mut snapshot_needed = true;
    loop {
        let ended = follow_once(&fleet, &control, &mut snapshot_needed, &mut backoff).await;
        let cause = match ended {
            Ended::Compacted(compacted) => {
                tracing::warn!(
                    resume_from = *fleet.applied.borrow() + 1,
                    compacted,
                    "the store was compacted past the revision this host has; taking a full snapshot"
                );
                snapshot_needed = true;
                continue;
            }
            Ended::Lost(cause) => cause,
        };
        let was_connected = {
            let mut status = lock(&fleet.status);
            let was = status.connected;
            if was {
                status.connected = false;
                status.since = Some(unix_now());
                status.disconnects += 1;
            }
            status.last_error = Some(cause.clone());
            was
        };
        if was_connected {
            tracing::error!(
                endpoints = %fleet.endpoints,
                error = %cause,
                revision = *fleet.applied.borrow(),
                "lost the session store; enforcing the last sessions known (fail-static) and reconnecting"
            );
        } else {
            tracing::debug!(error = %cause, "session store still unreachable");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn follow_once(
    fleet: &Fleet,
    control: &Arc<Control>,
    snapshot_needed: &mut bool,
    backoff: &mut Duration,
) -> Ended {
    let prefix = fleet.layout.devices();
    if *snapshot_needed {
        let response = match fleet
            .members
            .call(|mut c| async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await })
            .await
        {
            Ok(r) => r,
            Err(e) => return Ended::Lost(e),
        };
        let revision = response.header().map_or(0, |h| h.revision());
        let clock = ClockPair::now();
        let boot_id = control.boot_id();
        let mut records = Vec::with_capacity(response.kvs().len());
        let mut bad = 0;
        for kv in response.kvs() {
            match decoded(fleet, kv.key(), kv.value(), &clock, &boot_id) {
                Ok(StoreChange::Put(record)) => records.push(record),
                // Left out of the snapshot, so the resync removes it.
                Ok(StoreChange::Delete(_)) | Err(()) => bad += 1,
            }
        }
        let control = Arc::clone(control);
        let diff = tokio::task::spawn_blocking(move || control.resync_store(records))
            .await
            .expect("resync does not panic");
        tracing::info!(
            revision,
            added = diff.added,
            changed = diff.changed,
            removed = diff.removed,
            bad_entries = bad,
            "applied a full snapshot of the session store"
        );
        {
            let mut status = lock(&fleet.status);
            status.resyncs += 1;
            status.bad_entries = bad;
            status.revision = revision;
        }
        fleet.applied.send_replace(revision);
        *snapshot_needed = false;
    }
    let start = *fleet.applied.borrow() + 1;
    // The watch stays on one member; when it fails, the next attempt tries another.
    let (member, mut client) = fleet.members.preferred();
    let endpoint = fleet.members.endpoint(member);
    let lost = |cause: String| {
        fleet.members.avoid(member);
        Ended::Lost(format!("{endpoint}: {cause}"))
    };
    let mut stream = match client
        .watch(
            prefix,
            Some(WatchOptions::new().with_prefix().with_start_revision(start)),
        )
        .await
    {
        Ok(s) => s,
        Err(e) => return lost(short(&e)),
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return lost("etcd closed the watch".to_string()),
            Err(e) => return lost(short(&e)),
        };
        if response.compact_revision() > 0 {
            return Ended::Compacted(response.compact_revision());
        }
        if response.canceled() {
            return Ended::Lost(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason()
            ));
        }
        if response.created() {
            let mut status = lock(&fleet.status);
            if !status.connected {
                status.connected = true;
                status.since = Some(unix_now());
                status.last_error = None;
                tracing::info!(member = %endpoint, resume_from = start, "watching the session store");
            }
            *backoff = BACKOFF_FIRST;
        }
        if response.events().is_empty() {
            continue;
        }
        let clock = ClockPair::now();
        let boot_id = control.boot_id();
        let mut changes = Vec::with_capacity(response.events().len());
        let mut last = 0;
        let mut bad = 0;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            last = kv.mod_revision();
            match event.event_type() {
                EventType::Put => match decoded(fleet, kv.key(), kv.value(), &clock, &boot_id) {
                    Ok(change) => {
                        bad += u64::from(matches!(change, StoreChange::Delete(_)));
                        changes.push(change);
                    }
                    Err(()) => bad += 1,
                },
                EventType::Delete => {
                    if let Ok(ip) = fleet.layout.device(kv.key()) {
                        changes.push(StoreChange::Delete(ip));
                    }
                }
            }
        }
        let applied = changes.len() as u64;
        let control = Arc::clone(control);
        tokio::task::spawn_blocking(move || control.apply_store(changes, last))
            .await
            .expect("applying changes does not panic");
        {
            let mut status = lock(&fleet.status);
            status.events += applied;
            status.bad_entries += bad;
            status.revision = last;
        }
        fleet.applied.send_replace(last);
    }
}

/// A put as this host's change: the session, or, for a value that is not a session
/// (logged), a removal, so that a broken entry never leaves a stale session behind.
/// `Err` for keys that name no device (logged).
fn decoded(
    fleet: &Fleet,
    key: &[u8],
    value: &[u8],
    clock: &ClockPair,
    boot_id: &str,
) -> Result<StoreChange, ()> {
    let ip = fleet.layout.device(key).map_err(|reason| {
        tracing::warn!(key = %String::from_utf8_lossy(key), %reason, "ignoring a key under the devices prefix that names no device");
    })?;
    match entry::decode(ip, value, clock, boot_id) {
        Ok(record) => Ok(StoreChange::Put(record)),
        Err(reason) => {
            tracing::error!(key = %fleet.layout.key(ip), %reason, "the store's entry for this device is not a session; the device is treated as having none");
            Ok(StoreChange::Delete(ip))
        }
    }
}
