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
    net::IpAddr,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use etcd_client::{
    Certificate, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue, TlsOptions,
    Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::watch;

use crate::{
    clock::ClockPair,
    config::EtcdConfig,
    sessions::{LoginRequest, SessionError, SessionRecord, plan_login},
};
pub use entry::Layout;
pub use follow::follow;
use members::Members;

/// Every etcd request gives up after this (the watch stream itself is kept alive by
/// keepalive pings instead).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A silent connection is declared dead after `KEEPALIVE` plus `KEEPALIVE_TIMEOUT`.
/// etcd closes connections that ping more often than every 5 s
/// (`--grpc-keepalive-min-time`).
const KEEPALIVE: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a login waits for the follower to apply it here before answering anyway.
const APPLY_WAIT: Duration = Duration::from_secs(5);
/// Compare-and-swap attempts before a login gives up on a device that keeps changing.
const CAS_ATTEMPTS: usize = 5;

/// One change from the store, in revision order.
#[derive(Clone, Debug)]
pub enum StoreChange {
    Put(SessionRecord),
    Delete(IpAddr),
}

#[derive(Debug, Error)]
pub enum FleetError {
    #[error(
        "the session store (etcd) did not answer: {cause}. The change is not confirmed; enforcement goes on with the sessions known at revision {revision}"
    )]
    Unreachable { cause: String, revision: i64 },
    #[error("device {ip}: the store's entry {key} is not a session ({reason}); fix or delete it")]
    BadEntry {
        ip: IpAddr,
        key: String,
        reason: String,
    },
    #[error(
        "device {ip} changed in the store {CAS_ATTEMPTS} times while this change was being made; try again"
    )]
    Contended { ip: IpAddr },
    #[error(transparent)]
    Session(#[from] SessionError),
}

impl FleetError {
    pub const fn code(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "store_unavailable",
            Self::BadEntry { .. } => "store_bad_entry",
            Self::Contended { .. } => "store_contended",
            Self::Session(e) => e.code(),
        }
    }
}

/// How the store stands, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// "local" or "etcd".
    pub kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// The follower is watching the store (always true for "local").
    pub connected: bool,
    /// Unix time of the last change of `connected`.
    #[serde(default)]
    pub since: Option<i64>,
    /// The store revision the kernel reflects.
    #[serde(default)]
    pub revision: i64,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Connections lost, full snapshots taken (the first one included), watch events
    /// applied, and device keys whose value is not a session.
    #[serde(default)]
    pub disconnects: u64,
    #[serde(default)]
    pub resyncs: u64,
    #[serde(default)]
    pub events: u64,
    #[serde(default)]
    pub bad_entries: u64,
}

impl StoreStatus {
    pub fn local() -> Self {
        Self {
            kind: "local".to_string(),
            connected: true,
            ..Self::default()
        }
    }
}

pub struct Fleet {
    members: Members,
    layout: Layout,
    endpoints: String,
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
    pub async fn new(config: &EtcdConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE, KEEPALIVE_TIMEOUT)
            // A member cut off from the quorum refuses instead of serving stale data.
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            let read = |path: &std::path::Path, what: &str| {
                std::fs::read(path)
                    .with_context(|| format!("[store] {what} {}: cannot read it", path.display()))
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
        let members = Members::new(&config.endpoints, &options)
            .await
            .with_context(|| format!("[store] endpoints {}", config.endpoints.join(", ")))?;
        Ok(Self {
            members,
            layout: Layout::new(&config.prefix),
            endpoints: config.endpoints.join(", "),
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
        FleetError::Unreachable {
            cause,
            revision: *self.applied.borrow(),
        }
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

    /// Waits until the first snapshot is applied, or `limit` passes; whether it was.
    pub async fn wait_synced(&self, limit: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|&r| r > 0))
            .await
            .is_ok()
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

    /// The device's entry and its `mod_revision` (0: no entry).
    fn current(
        &self,
        ip: IpAddr,
        kv: Option<&KeyValue>,
        clock: &ClockPair,
        boot_id: &str,
    ) -> Result<(Option<SessionRecord>, i64), FleetError> {
        let Some(kv) = kv else {
            return Ok((None, 0));
        };
        let record = entry::decode(ip, kv.value(), clock, boot_id).map_err(|reason| {
            FleetError::BadEntry {
                ip,
                key: self.layout.key(ip),
                reason,
            }
        })?;
        Ok((Some(record), kv.mod_revision()))
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
            let (current, revision) = self.current(req.ip, found.as_ref(), &clock, boot_id)?;
            let record = plan_login(current.as_ref(), req, &clock, boot_id)?;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::put(key.as_str(), entry::encode(&record), None)])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let response = self.txn(txn).await?;
            if response.succeeded() {
                let written = response.header().map_or(0, |h| h.revision());
                self.wait_applied(written).await;
                return Ok(record);
            }
            // Another writer got there first: judge the login against what it wrote.
            found = lost_race_value(response.op_responses());
        }
        Err(FleetError::Contended { ip: req.ip })
    }

    /// A logout: deletes the device key if it is still the session read.
    pub async fn logout(&self, ip: IpAddr, boot_id: &str) -> Result<SessionRecord, FleetError> {
        let key = self.layout.key(ip);
        let mut found = self.read(&key).await?;
        for _ in 0..CAS_ATTEMPTS {
            let clock = ClockPair::now();
            let revision = found.as_ref().map_or(0, KeyValue::mod_revision);
            let record = match self.current(ip, found.as_ref(), &clock, boot_id) {
                Ok((Some(record), _)) => Some(record),
                Ok((None, _)) => return Err(SessionError::NotFound { ip }.into()),
                // A bad entry may be logged out: that is how it is cleared.
                Err(FleetError::BadEntry { .. }) => None,
                Err(e) => return Err(e),
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::delete(key.as_str(), None)])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let response = self.txn(txn).await?;
            if response.succeeded() {
                let written = response.header().map_or(0, |h| h.revision());
                self.wait_applied(written).await;
                return record.ok_or_else(|| SessionError::NotFound { ip }.into());
            }
            found = lost_race_value(response.op_responses());
        }
        Err(FleetError::Contended { ip })
    }

    /// Records many planned sessions in transactions of up to `IMPORT_BATCH` devices,
    /// each one compare-and-swap on every key against the entries `plan` was made from
    /// (`revisions`). A batch whose devices changed meanwhile fails and stops the
    /// import; the batches before it stay recorded. Returns how many were recorded.
    pub async fn import(
        &self,
        planned: &[(SessionRecord, i64)],
    ) -> Result<usize, (usize, FleetError)> {
        let mut done = 0;
        let mut last = 0;
        for batch in planned.chunks(IMPORT_BATCH) {
            let compares: Vec<Compare> = batch
                .iter()
                .map(|(r, rev)| {
                    Compare::mod_revision(self.layout.key(r.ip), CompareOp::Equal, *rev)
                })
                .collect();
            let puts: Vec<TxnOp> = batch
                .iter()
                .map(|(r, _)| TxnOp::put(self.layout.key(r.ip), entry::encode(r), None))
                .collect();
            let response = self
                .txn(Txn::new().when(compares).and_then(puts))
                .await
                .map_err(|e| (done, e))?;
            if !response.succeeded() {
                return Err((done, FleetError::Contended { ip: batch[0].0.ip }));
            }
            last = response.header().map_or(0, |h| h.revision());
            done += batch.len();
        }
        self.wait_applied(last).await;
        Ok(done)
    }

    /// Every device entry now (for planning an import): records and their revisions;
    /// bad entries are left out.
    pub async fn snapshot(&self, boot_id: &str) -> Result<Vec<(SessionRecord, i64)>, FleetError> {
        let prefix = self.layout.devices();
        let response = self
            .members
            .call(|mut c| async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await })
            .await
            .map_err(|e| self.unreachable(e))?;
        let clock = ClockPair::now();
        Ok(response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let ip = self.layout.device(kv.key()).ok()?;
                let record = entry::decode(ip, kv.value(), &clock, boot_id).ok()?;
                Some((record, kv.mod_revision()))
            })
            .collect())
    }
}

/// Devices per import transaction (etcd refuses more than 128 operations in one).
const IMPORT_BATCH: usize = 64;

/// The entry an `or_else` get returned after a failed compare.
fn lost_race_value(responses: Vec<TxnOpResponse>) -> Option<KeyValue> {
    responses.into_iter().find_map(|r| match r {
        TxnOpResponse::Get(mut get) => get.take_kvs().pop(),
        _ => None,
    })
}
