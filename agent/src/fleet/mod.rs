//! A fleet of agents sharing sessions through etcd (`[store] kind = "etcd"`).
//!
//! etcd is the truth; each agent's kernel map and local journal are a mirror of it kept
//! by one task (`follow`), which applies the store's changes in revision order: a full
//! snapshot first, then the watch from the revision after it. Logins and logouts
//! through this agent's API are etcd transactions, compare-and-swap on the device key,
//! so the login rules (one user per device, the enrolment IdP) hold across the fleet;
//! the API answers once the follower has applied the change here.
//!
//! When etcd cannot be reached the mirror stays as it was (fail-static): enforcement
//! goes on with the last sessions known, logins are refused, and the follower
//! reconnects with backoff, resuming the watch where it stopped, or taking a full
//! snapshot again when that revision has been compacted away.

pub mod entry;
mod follow;
mod members;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use etcd_client::{
    Certificate, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue, TlsOptions,
    Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use thiserror::Error;
use tokio::sync::watch;

use crate::{
    clock::ClockPair,
    config::EtcdConfig,
    input::file,
    sessions::{LoginRequest, SessionError, SessionRecord, plan_login},
    wire::StoreStatus,
};
pub use entry::Layout;
pub use follow::supervise;
use members::Members;

/// Every etcd request gives up after this (the watch stream itself is kept alive by
/// keepalive pings instead), a snapshot page after `BULK_TIMEOUT`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const BULK_TIMEOUT: Duration = Duration::from_secs(60);
/// A silent connection is declared dead after `KEEPALIVE` plus `KEEPALIVE_TIMEOUT`.
/// etcd closes connections that ping more often than every 5 s
/// (`--grpc-keepalive-min-time`).
const KEEPALIVE: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a login waits for the follower to apply it here before answering anyway.
const APPLY_WAIT: Duration = Duration::from_secs(5);
/// Compare-and-swap attempts before a login gives up on a device that keeps changing.
const CAS_ATTEMPTS: usize = 5;

#[derive(Debug, Error)]
pub enum FleetError {
    #[error(
        "the session store (etcd) could not be used: {cause}. The change is not confirmed; this host goes on enforcing {enforcing}"
    )]
    Unreachable { cause: String, enforcing: String },
    #[error(
        "device {ip} changed in the store while this change was being made (another agent or a hook wrote it); try again"
    )]
    Contended { ip: IpAddr },
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// Why the store's client cannot be set up (nothing needs etcd to be up for it).
#[derive(Debug, Error)]
pub enum SetupError {
    #[error("[store] {field} {}: cannot read it: {cause}", path.display())]
    TlsFile {
        field: &'static str,
        path: std::path::PathBuf,
        cause: file::FileError,
    },
    #[error("[store] endpoints {endpoints}")]
    Endpoints {
        endpoints: String,
        #[source]
        cause: etcd_client::Error,
    },
}

impl FleetError {
    pub const fn code(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "store_unavailable",
            Self::Contended { .. } => "store_contended",
            Self::Session(e) => e.code(),
        }
    }
}

pub struct Fleet {
    members: Members,
    layout: Layout,
    status: Mutex<StoreStatus>,
    /// The revision the follower has applied to this host.
    applied: watch::Sender<i64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Fleet {
    /// Reads the TLS files and sets up the client. Connections are made lazily and
    /// again after failures; nothing here needs etcd to be up.
    pub async fn new(config: &EtcdConfig) -> Result<Self, SetupError> {
        let mut options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE, KEEPALIVE_TIMEOUT)
            // etcd closes connections that ping with no request open.
            .with_keep_alive_while_idle(false)
            // A member cut off from the quorum refuses instead of serving stale data.
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            let read = |path: &std::path::Path, field: &'static str| {
                file::read_bounded(path, file::MAX_SMALL_FILE, file::Accept::RegularFile)
                    .map(|content| content.bytes)
                    .map_err(|cause| SetupError::TlsFile {
                        field,
                        path: path.to_path_buf(),
                        cause,
                    })
            };
            let mut tls_options = TlsOptions::new()
                .ca_certificate(Certificate::from_pem(read(&tls.ca_file, "ca_file")?));
            if let Some((cert, key)) = &tls.client {
                tls_options = tls_options.identity(Identity::from_pem(
                    read(cert, "cert_file")?,
                    read(key, "key_file")?,
                ));
            }
            options = options.with_tls(tls_options);
        }
        let bulk = options.clone().with_timeout(BULK_TIMEOUT);
        let members = Members::new(&config.endpoints, &options, &bulk)
            .await
            .map_err(|cause| SetupError::Endpoints {
                endpoints: config.endpoints.join(", "),
                cause,
            })?;
        Ok(Self {
            members,
            layout: Layout::new(&config.prefix),
            status: Mutex::new(StoreStatus {
                kind: "etcd".to_string(),
                endpoints: config.endpoints.clone(),
                connected: false,
                since: Some(unix_now()),
                ..StoreStatus::default()
            }),
            applied: watch::channel(0).0,
        })
    }

    pub fn status(&self) -> StoreStatus {
        lock(&self.status).clone()
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn unreachable(&self, cause: String) -> FleetError {
        let revision = *self.applied.borrow();
        FleetError::Unreachable {
            cause,
            enforcing: if revision > 0 {
                format!("the sessions known at revision {revision}")
            } else {
                "its local mirror of the sessions".to_string()
            },
        }
    }

    fn lost_race(&self) {
        lock(&self.status).lost_races += 1;
    }

    /// The device key's entry, from whichever member answers.
    async fn read(&self, key: &str) -> Result<Option<KeyValue>, FleetError> {
        self.members
            .call(|mut c| async move { c.get(key, None).await })
            .await
            .map(|mut r| r.take_kvs().pop())
            .map_err(|e| self.unreachable(e))
    }

    /// A transaction, on whichever member answers.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, FleetError> {
        self.members
            .call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
            .map_err(|e| self.unreachable(e))
    }

    /// Waits until the first snapshot is applied; whether it was. Gives up once
    /// `limit` has passed with the store failing (a large snapshot that is coming in
    /// is waited for).
    pub async fn wait_synced(&self, limit: Duration) -> bool {
        let started = std::time::Instant::now();
        let mut rx = self.applied.subscribe();
        loop {
            let synced = tokio::time::timeout(Duration::from_millis(100), rx.wait_for(|&r| r > 0));
            if synced.await.is_ok() {
                return true;
            }
            if started.elapsed() >= limit && lock(&self.status).last_error.is_some() {
                return false;
            }
        }
    }

    /// Waits until the follower has applied `revision` here (bounded: a change that is
    /// recorded in etcd is never reported as failed).
    async fn wait_applied(&self, revision: i64) {
        let mut rx = self.applied.subscribe();
        if tokio::time::timeout(APPLY_WAIT, rx.wait_for(|&r| r >= revision))
            .await
            .is_err()
        {
            tracing::warn!(
                revision,
                "a session change is recorded in etcd but not applied here yet; the follower applies it when it catches up"
            );
        }
    }

    /// The device's session and its key's `mod_revision` (0: no key). An entry that
    /// is not a session counts as none (as the follower treats it); a login replaces it.
    fn current(
        &self,
        ip: IpAddr,
        kv: Option<&KeyValue>,
        clock: &ClockPair,
        boot_id: &str,
    ) -> (Option<SessionRecord>, i64) {
        let Some(kv) = kv else {
            return (None, 0);
        };
        match entry::decode(ip, kv.value(), clock, boot_id) {
            Ok(record) => (Some(record), kv.mod_revision()),
            Err(reason) => {
                tracing::warn!(
                    key = self.layout.key(ip).as_str(),
                    reason = reason.as_str(),
                    "the store's entry for this device is not a session; treating it as none"
                );
                (None, kv.mod_revision())
            }
        }
    }

    /// A login as one compare-and-swap on the device key: the rules are checked
    /// against the entry as read, and the write only happens if the entry is still
    /// that one; otherwise it is read again and the rules checked again. Returns the
    /// record written, once it is applied here.
    pub async fn login(
        &self,
        req: &LoginRequest,
        boot_id: &str,
    ) -> Result<SessionRecord, FleetError> {
        let key = self.layout.key(req.ip);
        let mut found = self.read(&key).await?;
        for _ in 0..CAS_ATTEMPTS {
            let clock = ClockPair::now();
            let (current, revision) = self.current(req.ip, found.as_ref(), &clock, boot_id);
            let record = plan_login(
                current.as_ref().map(SessionRecord::enrolled),
                req,
                &clock,
                boot_id,
            )?;
            let value = entry::encode(&record);
            let put = TxnOp::put(key.as_str(), value.clone(), None);
            let response = self.txn(compare_and_swap(&key, revision, put)).await?;
            if response.succeeded() {
                self.wait_applied(revision_of(&response)).await;
                return Ok(record);
            }
            found = lost_race_value(response);
            // This very write, landed on a first try whose answer was lost.
            if let Some(kv) = found.as_ref().filter(|kv| kv.value() == value.as_slice()) {
                self.wait_applied(kv.mod_revision()).await;
                return Ok(record);
            }
            // Another writer got there first: judge the login against what it wrote.
            self.lost_race();
        }
        Err(FleetError::Contended { ip: req.ip })
    }

    /// A logout: deletes the device key if it is still the session read.
    pub async fn logout(&self, ip: IpAddr, boot_id: &str) -> Result<SessionRecord, FleetError> {
        let key = self.layout.key(ip);
        let mut found = self.read(&key).await?;
        for _ in 0..CAS_ATTEMPTS {
            let clock = ClockPair::now();
            let (Some(record), revision) = self.current(ip, found.as_ref(), &clock, boot_id) else {
                return Err(SessionError::NotFound { ip }.into());
            };
            let delete = TxnOp::delete(key.as_str(), None);
            let response = self.txn(compare_and_swap(&key, revision, delete)).await?;
            if response.succeeded() {
                self.wait_applied(revision_of(&response)).await;
                return Ok(record);
            }
            found = lost_race_value(response);
            if found.is_none() {
                // Gone already: this delete on a first try whose answer was lost, or
                // another logout. Either way the device is logged out.
                return Ok(record);
            }
            self.lost_race();
        }
        Err(FleetError::Contended { ip })
    }

    /// Records many planned sessions in transactions of up to `IMPORT_BATCH` devices,
    /// each one compare-and-swap on every key against the entries the plan was made
    /// from (their revisions). A batch whose devices changed meanwhile fails, naming
    /// one, and stops the import; the batches before it stay recorded. Returns how
    /// many were recorded.
    pub async fn import(
        &self,
        planned: &[(SessionRecord, i64)],
    ) -> Result<usize, (usize, FleetError)> {
        let mut done = 0;
        let mut last = 0;
        for batch in planned.chunks(IMPORT_BATCH) {
            let keys: Vec<String> = batch.iter().map(|(r, _)| self.layout.key(r.ip)).collect();
            let values: Vec<Vec<u8>> = batch.iter().map(|(r, _)| entry::encode(r)).collect();
            let compares: Vec<Compare> = keys
                .iter()
                .zip(batch)
                .map(|(key, (_, rev))| Compare::mod_revision(key.as_str(), CompareOp::Equal, *rev))
                .collect();
            let puts: Vec<TxnOp> = keys
                .iter()
                .zip(&values)
                .map(|(key, v)| TxnOp::put(key.as_str(), v.clone(), None))
                .collect();
            let gets: Vec<TxnOp> = keys
                .iter()
                .map(|key| TxnOp::get(key.as_str(), None))
                .collect();
            let response = self
                .txn(Txn::new().when(compares).and_then(puts).or_else(gets))
                .await
                .map_err(|e| (done, e))?;
            if response.succeeded() {
                last = revision_of(&response);
            } else {
                // Either this batch landed on a first try whose answer was lost (every
                // key holds what it wrote), or a device changed meanwhile.
                let now: Vec<Option<KeyValue>> =
                    response.op_responses().into_iter().map(got).collect();
                let changed =
                    batch.iter().zip(&values).zip(&now).find(|((_, v), kv)| {
                        kv.as_ref().is_none_or(|kv| kv.value() != v.as_slice())
                    });
                if let Some((((record, _), _), _)) = changed {
                    return Err((done, FleetError::Contended { ip: record.ip }));
                }
                last = now
                    .iter()
                    .flatten()
                    .map(KeyValue::mod_revision)
                    .max()
                    .unwrap_or(0);
            }
            done += batch.len();
        }
        self.wait_applied(last).await;
        Ok(done)
    }

    /// Every device key now, read in pages at one revision, each page handed to
    /// `decode` on a blocking thread while the next one is fetched: a large snapshot's
    /// decoding hides behind etcd's reads, and no more than two pages are held raw.
    /// (That revision, `decode` of each page in order.)
    pub(super) async fn snapshot_pages<T, D>(&self, decode: D) -> Result<(i64, Vec<T>), String>
    where
        T: Send + 'static,
        D: Fn(Vec<KeyValue>) -> T + Send + Sync + 'static,
    {
        let decode = Arc::new(decode);
        let end = prefix_end(self.layout.devices());
        let mut start = self.layout.devices().as_bytes().to_vec();
        let mut revision = 0;
        let mut pages = Vec::new();
        let mut decoding: Option<tokio::task::JoinHandle<T>> = None;
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(SNAPSHOT_PAGE)
                .with_revision(revision);
            let mut page = self
                .members
                .call_bulk(|mut kv| {
                    let (start, options) = (start.clone(), options.clone());
                    async move { kv.get(start, Some(options)).await }
                })
                .await?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            let more = page.more();
            let kvs = page.take_kvs();
            if let Some(last) = kvs.last() {
                start = [last.key(), &[0]].concat();
            }
            if let Some(previous) = decoding.take() {
                pages.push(previous.await.expect("a snapshot page decoder panicked"));
            }
            let decode = Arc::clone(&decode);
            let decoded = tokio::task::spawn_blocking(move || decode(kvs));
            if !more {
                pages.push(decoded.await.expect("a snapshot page decoder panicked"));
                return Ok((revision, pages));
            }
            decoding = Some(decoded);
        }
    }

    /// Every device's session now and its key's revision (for planning an import).
    /// Entries that are not sessions count as none, with their revision.
    pub async fn snapshot(
        &self,
        boot_id: &str,
    ) -> Result<HashMap<IpAddr, (Option<SessionRecord>, i64)>, FleetError> {
        let (layout, boot_id, clock) = (self.layout.clone(), boot_id.to_string(), ClockPair::now());
        let decode = move |kvs: Vec<KeyValue>| -> Vec<_> {
            kvs.iter()
                .filter_map(|kv| {
                    let ip = layout.device(kv.key()).ok()?;
                    let record = entry::decode(ip, kv.value(), &clock, &boot_id).ok();
                    Some((ip, (record, kv.mod_revision())))
                })
                .collect()
        };
        let (_, pages) = self
            .snapshot_pages(decode)
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(pages.into_iter().flatten().collect())
    }
}

/// Keys per page of a snapshot (about 14 MB). etcd 3.4 counts every key left in the
/// range for each page, so small pages cost quadratic time on a large store: 10,000
/// took 22 s for 1M keys.
const SNAPSHOT_PAGE: i64 = 100_000;

/// The end of the key range of everything under `prefix` (which ends in '/').
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    let last = end.last_mut().expect("a prefix is never empty");
    *last += 1;
    end
}

/// Devices per import transaction (etcd refuses more than 128 operations in one).
pub const IMPORT_BATCH: usize = 64;

/// `then` if `key` is still at `revision` (0: absent); otherwise the key as it is now.
fn compare_and_swap(key: &str, revision: i64, then: TxnOp) -> Txn {
    Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
        .and_then([then])
        .or_else([TxnOp::get(key, None)])
}

/// The store revision a transaction was applied at.
fn revision_of(response: &TxnResponse) -> i64 {
    response.header().map_or(0, |h| h.revision())
}

/// The entry an `or_else` get returned after a failed compare.
fn lost_race_value(response: TxnResponse) -> Option<KeyValue> {
    response.op_responses().into_iter().find_map(got)
}

/// The entry one get of a transaction found.
fn got(response: TxnOpResponse) -> Option<KeyValue> {
    match response {
        TxnOpResponse::Get(mut get) => get.take_kvs().pop(),
        _ => None,
    }
}
