//! The follower: the one task that applies the store to this host, in revision order.

use std::{collections::HashSet, net::IpAddr, sync::Arc, time::Duration};

use etcd_client::{EventType, KeyValue, WatchOptions};

use super::{Fleet, Layout, entry, lock, members::short, unix_now};
use crate::{
    clock::{ClockPair, Laps},
    sessions::{SessionMirror, SessionRecord, StoreChange, StoreDiff},
};

/// Reconnection backoff: doubles from the first to the last, then stays there.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// After a change this host could not record (its disk is failing), a full snapshot
/// is taken again after this long: not sooner, since a snapshot is not free.
const NOT_APPLIED_RETRY: Duration = Duration::from_secs(30);

/// Why a watch ended.
enum Ended {
    /// etcd could not be reached or dropped the stream.
    Lost(String),
    /// The revision to resume from has been compacted away: take a snapshot again.
    Compacted(i64),
    /// Changes could not be applied here (logged): take a snapshot again later.
    NotApplied(usize),
}

/// Runs the follower. Should it ever stop (a bug: it panicked), this host no longer
/// follows the store: say so in status, metrics and the log, and keep enforcing what
/// it has, as in an outage.
pub async fn supervise(fleet: Arc<Fleet>, mirror: Arc<SessionMirror>) {
    let follower = tokio::spawn(follow(Arc::clone(&fleet), mirror));
    // Stopping the supervisor (at shutdown) stops the follower too.
    let _stop = AbortOnDrop(follower.abort_handle());
    let ended = follower.await;
    let cause = match ended {
        Err(e) if e.is_panic() => "the follower panicked".to_string(),
        Err(e) => format!("the follower stopped: {e}"),
        Ok(()) => "the follower stopped".to_string(),
    };
    tracing::error!(%cause, "no longer following the session store; enforcing the last sessions known until the agent is restarted");
    let mut status = lock(&fleet.status);
    status.connected = false;
    status.since = Some(unix_now());
    status.last_error = Some(format!("{cause}; restart the agent"));
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps this host equal to the store, forever: snapshot, watch, and after any failure
/// the same again from where it stopped.
async fn follow(fleet: Arc<Fleet>, mirror: Arc<SessionMirror>) {
    let mut backoff = BACKOFF_FIRST;
    let mut snapshot_needed = true;
    // Keys under the prefix that are not sessions now (for `bad_entries`).
    let mut bad = HashSet::new();
    loop {
        let ended = follow_once(
            &fleet,
            &mirror,
            &mut snapshot_needed,
            &mut backoff,
            &mut bad,
        )
        .await;
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
            Ended::NotApplied(changes) => {
                tracing::warn!(
                    changes,
                    retry_in = ?NOT_APPLIED_RETRY,
                    "changes from the store could not be applied here; taking a full snapshot again"
                );
                snapshot_needed = true;
                tokio::time::sleep(NOT_APPLIED_RETRY).await;
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
    mirror: &Arc<SessionMirror>,
    snapshot_needed: &mut bool,
    backoff: &mut Duration,
    bad: &mut HashSet<Vec<u8>>,
) -> Ended {
    if *snapshot_needed {
        let not_applied = match apply_snapshot(fleet, mirror, bad).await {
            Ok(not_applied) => not_applied,
            Err(e) => return Ended::Lost(e),
        };
        *snapshot_needed = false;
        if not_applied > 0 {
            return Ended::NotApplied(not_applied);
        }
    }
    let start = *fleet.applied.borrow() + 1;
    // The watch stays on one member; when it fails, the next attempt tries another.
    let (member, mut client) = fleet.members.preferred();
    let endpoint = fleet.members.endpoint(member);
    let lost = |cause: String| {
        fleet.members.avoid(member);
        Ended::Lost(format!("{endpoint}: {cause}"))
    };
    let options = WatchOptions::new().with_prefix().with_start_revision(start);
    let mut stream = match client.watch(fleet.layout.devices(), Some(options)).await {
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
            return lost(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason()
            ));
        }
        if response.created() {
            watching(fleet, endpoint, start);
            *backoff = BACKOFF_FIRST;
        }
        if response.events().is_empty() {
            continue;
        }
        let failed = apply_events(fleet, mirror, response.events(), bad);
        if failed > 0 {
            return Ended::NotApplied(failed);
        }
    }
}

/// Makes this host equal to a full snapshot of the store, read at one revision: each
/// page applied on a blocking thread while the next one is read, then the devices the
/// snapshot does not hold removed. How many devices could not be changed here.
async fn apply_snapshot(
    fleet: &Fleet,
    mirror: &Arc<SessionMirror>,
    bad: &mut HashSet<Vec<u8>>,
) -> Result<usize, String> {
    let mut laps = Laps::start();
    let (layout, clock) = (fleet.layout.clone(), ClockPair::now());
    let boot_id = mirror.boot_id().to_string();
    let applier = Arc::clone(mirror);
    let (revision, pages) = fleet
        .snapshot_pages(move |kvs| {
            let page = decode_page(&layout, &kvs, &clock, &boot_id);
            drop(kvs);
            let devices: Vec<IpAddr> = page.records.iter().map(|r| r.ip).collect();
            let diff = applier.resync_page(page.records);
            (devices, page.bad_keys, diff)
        })
        .await?;
    laps.lap("fetch_and_apply");
    bad.clear();
    let mut wanted = hashbrown::HashSet::with_capacity(pages.iter().map(|p| p.0.len()).sum());
    let mut diff = StoreDiff::default();
    for (devices, bad_keys, page_diff) in pages {
        wanted.extend(devices);
        bad.extend(bad_keys);
        diff += page_diff;
    }
    diff += tokio::task::block_in_place(|| mirror.remove_absent(&wanted));
    laps.lap("remove_absent");
    tracing::info!(
        revision,
        laps = %laps,
        added = diff.added,
        changed = diff.changed,
        removed = diff.removed,
        not_applied = diff.not_applied,
        bad_entries = bad.len(),
        "applied a full snapshot of the session store"
    );
    tokio::task::block_in_place(crate::memory::release_free_pages);
    {
        let mut status = lock(&fleet.status);
        status.resyncs += 1;
        status.bad_entries = bad.len() as u64;
        status.revision = revision;
    }
    fleet.applied.send_replace(revision);
    Ok(diff.not_applied)
}

/// The watch is established: the store counts as connected again.
fn watching(fleet: &Fleet, endpoint: &str, start: i64) {
    let mut status = lock(&fleet.status);
    if !status.connected {
        status.connected = true;
        status.since = Some(unix_now());
        status.last_error = None;
        tracing::info!(member = %endpoint, resume_from = start, "watching the session store");
    }
}

/// Applies one watch response's events here, in revision order; how many could not be.
fn apply_events(
    fleet: &Fleet,
    mirror: &SessionMirror,
    events: &[etcd_client::Event],
    bad: &mut HashSet<Vec<u8>>,
) -> usize {
    let clock = ClockPair::now();
    let boot_id = mirror.boot_id();
    let mut changes = Vec::with_capacity(events.len());
    let mut last = 0;
    for event in events {
        let Some(kv) = event.kv() else { continue };
        last = kv.mod_revision();
        if event.event_type() == EventType::Delete {
            bad.remove(kv.key());
            if let Ok(ip) = fleet.layout.device(kv.key()) {
                changes.push(StoreChange::Delete(ip));
            }
            continue;
        }
        match decoded(&fleet.layout, kv.key(), kv.value(), &clock, boot_id) {
            Decoded::Session(record) => {
                bad.remove(kv.key());
                changes.push(StoreChange::Put(record));
            }
            // A broken entry never leaves a stale session behind.
            Decoded::BadValue(ip) => {
                bad.insert(kv.key().to_vec());
                changes.push(StoreChange::Delete(ip));
            }
            Decoded::BadKey => {
                bad.insert(kv.key().to_vec());
            }
        }
    }
    let applied = changes.len() as u64;
    let failed = tokio::task::block_in_place(|| mirror.apply(changes, last));
    {
        let mut status = lock(&fleet.status);
        status.events += applied;
        status.bad_entries = bad.len() as u64;
        status.revision = last;
    }
    fleet.applied.send_replace(last);
    failed
}

/// A put key and value as the store means them for this host.
enum Decoded {
    Session(SessionRecord),
    /// A device key whose value is not a session (logged).
    BadValue(IpAddr),
    /// A key under the prefix that names no device (logged).
    BadKey,
}

/// A snapshot page as this host means it: its sessions, and the keys under the
/// prefix that are not sessions (logged), which the resync treats as none.
struct Page {
    records: Vec<SessionRecord>,
    bad_keys: Vec<Vec<u8>>,
}

/// Every entry of a snapshot page decoded, in order; a large one in two halves at
/// once (a million entries take over a second on one thread).
fn decode_page(layout: &Layout, kvs: &[KeyValue], clock: &ClockPair, boot_id: &str) -> Page {
    let decoded = in_two_halves(kvs, DECODE_SPLIT_ABOVE, |kv| {
        decoded(layout, kv.key(), kv.value(), clock, boot_id)
    });
    let mut page = Page {
        records: Vec::with_capacity(kvs.len()),
        bad_keys: Vec::new(),
    };
    for (kv, entry) in kvs.iter().zip(decoded) {
        match entry {
            Decoded::Session(record) => page.records.push(record),
            Decoded::BadValue(_) | Decoded::BadKey => page.bad_keys.push(kv.key().to_vec()),
        }
    }
    page
}

/// Snapshots larger than this are decoded on two threads.
const DECODE_SPLIT_ABOVE: usize = 16_384;

/// `f` of every item, in order: on two threads when there are more than `above`.
fn in_two_halves<T: Sync, R: Send>(
    items: &[T],
    above: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let each = |items: &[T]| items.iter().map(&f).collect::<Vec<R>>();
    if items.len() <= above {
        return each(items);
    }
    let (first, second) = items.split_at(items.len() / 2);
    std::thread::scope(|scope| {
        let second = scope.spawn(|| each(second));
        let mut all = each(first);
        all.extend(second.join().expect("a snapshot decoder panicked"));
        all
    })
}

fn decoded(layout: &Layout, key: &[u8], value: &[u8], clock: &ClockPair, boot_id: &str) -> Decoded {
    let ip = match layout.device(key) {
        Ok(ip) => ip,
        Err(reason) => {
            tracing::warn!(
                key = String::from_utf8_lossy(key).as_ref(),
                reason = reason.as_str(),
                "ignoring a key under the devices prefix that names no device"
            );
            return Decoded::BadKey;
        }
    };
    match entry::decode(ip, value, clock, boot_id) {
        Ok(record) => Decoded::Session(record),
        Err(reason) => {
            tracing::error!(
                key = layout.key(ip).as_str(),
                reason = reason.as_str(),
                "the store's entry for this device is not a session; the device is treated as having none"
            );
            Decoded::BadValue(ip)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::in_two_halves;

    #[test]
    fn two_halves_keep_the_order_of_one_pass() {
        let items: Vec<u32> = (0..1001).collect();
        let once = in_two_halves(&items, usize::MAX, |i| i * 3);
        for above in [0, 1, 500, 1000] {
            assert_eq!(in_two_halves(&items, above, |i| i * 3), once);
        }
        assert_eq!(once.len(), 1001);
        assert!(in_two_halves(&[] as &[u32], 0, |i| *i).is_empty());
    }
}
