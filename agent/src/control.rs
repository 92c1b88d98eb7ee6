//! The running agent's state and the operations the API exposes on it. Session
//! changes go through the store, which keeps the kernel map and the journal equal
//! (`SessionStore::login` and the like); they are answered once durable, the wait for
//! the sync taken without any lock so that concurrent changes share it.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, RwLock},
};

use agent_common::verdict::{Verdict, counter};
use thiserror::Error;
use tokio::sync::broadcast;

use crate::{
    clock::ClockPair,
    config::{Config, Protocol},
    datapath::{Datapath, DatapathError, settings},
    drops::PolicyDrops,
    events::{self, History, RawRefusal, Refusal},
    fleet::{Fleet, FleetError, StoreChange},
    policy::{self, PolicyTable},
    portal::PageFacts,
    sessions::{
        ChangeError, LoginRequest, SessionError, SessionRecord, SessionStore, Syncer, Ticket,
        import::{self, LineError},
    },
    wire::{
        ImportReport, PolicyStanding, ReloadRejected, ReloadStatus, Reloaded, SessionDetail,
        SessionView, Stats, StoreStatus,
    },
};

/// Changes from the fleet's store in one watch response beyond which they are logged
/// as one line (each at debug level).
const BULK_CHANGES: usize = 16;

/// Line errors an import reply lists; the rest are counted.
const IMPORT_ERRORS_SHOWN: usize = 100;

/// Refusals buffered per live event-stream subscriber before it starts missing some.
const EVENT_STREAM_BUFFER: usize = 1024;

#[derive(Debug, Error)]
pub enum ControlError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Store(#[from] FleetError),
}

impl From<ChangeError> for ControlError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Session(e) => Self::Session(e),
            ChangeError::Kernel(e) => Self::Datapath(e),
        }
    }
}

/// The configuration in force and its compiled table.
pub struct Active {
    pub config: Config,
    pub table: PolicyTable,
    /// `SG_GENERATION` it was applied as.
    pub generation: u32,
}

pub struct Control {
    active: RwLock<Arc<Active>>,
    /// The config file `reload` reads.
    config_path: PathBuf,
    /// (interface, XDP mode) pairs the program is attached to.
    interfaces: RwLock<Vec<(String, String)>>,
    // Lock order: sessions, then datapath.
    sessions: Mutex<SessionStore>,
    /// Acknowledges the store's changes once durable; waited on without any lock.
    syncer: Arc<Syncer>,
    /// The program and its maps.
    datapath: Mutex<Datapath>,
    history: Mutex<History>,
    /// Which policy each configuration set's slots count for, and the totals of sets
    /// since overwritten. Lock order: datapath, then drops.
    drops: Mutex<PolicyDrops>,
    reloads: Mutex<ReloadStatus>,
    live_events: broadcast::Sender<Refusal>,
    notifier: Option<crate::notify::Notifier>,
    /// The fleet's shared store; `None` with the local store.
    fleet: Option<Arc<Fleet>>,
    started: std::time::Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves consistent data in every path here (each
    // write is a single map or store operation), so carry on with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Control {
    /// `datapath` must hold `config` in force already (`PolicyDrops::apply`).
    #[expect(
        clippy::too_many_arguments,
        reason = "each is a separate part of the agent, set up by `run` in order"
    )]
    pub fn new(
        config_path: PathBuf,
        config: Config,
        table: PolicyTable,
        interfaces: Vec<(String, String)>,
        sessions: SessionStore,
        datapath: Datapath,
        drops: PolicyDrops,
        notifier: Option<crate::notify::Notifier>,
        fleet: Option<Arc<Fleet>>,
    ) -> Self {
        let generation = datapath.maps.generation();
        Self {
            active: RwLock::new(Arc::new(Active {
                config,
                table,
                generation,
            })),
            config_path,
            interfaces: RwLock::new(interfaces),
            syncer: sessions.syncer(),
            sessions: Mutex::new(sessions),
            datapath: Mutex::new(datapath),
            history: Mutex::new(History::default()),
            drops: Mutex::new(drops),
            reloads: Mutex::new(ReloadStatus::default()),
            live_events: broadcast::channel(EVENT_STREAM_BUFFER).0,
            notifier,
            fleet,
            started: std::time::Instant::now(),
        }
    }

    /// The configuration in force.
    pub fn active(&self) -> Arc<Active> {
        read(&self.active)
    }

    pub fn interfaces(&self) -> Vec<(String, String)> {
        read(&self.interfaces)
    }

    pub fn reload_status(&self) -> ReloadStatus {
        lock(&self.reloads).clone()
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    pub fn notify_stats(&self) -> Option<crate::notify::NotifyStats> {
        self.notifier.as_ref().map(crate::notify::Notifier::stats)
    }

    /// Live refusals, for `GET /v1/events/stream`.
    pub fn subscribe(&self) -> broadcast::Receiver<Refusal> {
        self.live_events.subscribe()
    }

    /// Reads the config file again and puts it in force atomically. A config with any
    /// problem changes nothing and is rejected with every reason.
    pub fn reload(&self) -> Result<Reloaded, ReloadRejected> {
        let result = self.try_reload();
        let mut status = lock(&self.reloads);
        status.last_at = Some(unix_now());
        match &result {
            Ok(done) => {
                status.succeeded += 1;
                status.last_ok = Some(true);
                status.last_problems.clear();
                tracing::info!(
                    generation = done.generation,
                    policies = done.policies,
                    prefixes = done.prefixes,
                    "reloaded the config"
                );
                for warning in &done.warnings {
                    tracing::warn!("{warning}");
                }
            }
            Err(rejected) => {
                status.failed += 1;
                status.last_ok = Some(false);
                status.last_problems = rejected.problems.clone();
                tracing::error!(
                    problems = %rejected.problems.join("; "),
                    "reload rejected; the running policy stays"
                );
            }
        }
        result
    }

    fn try_reload(&self) -> Result<Reloaded, ReloadRejected> {
        let reject = |problems: Vec<String>| ReloadRejected { problems };
        let config = Config::load(&self.config_path).map_err(|e| {
            reject(match e {
                crate::config::ConfigError::Invalid { problems, .. } => {
                    problems.iter().map(ToString::to_string).collect()
                }
                other => vec![other.to_string()],
            })
        })?;
        let table = policy::compile(&config).map_err(|e| reject(vec![e.to_string()]))?;
        let old = self.active();
        let restart_only = crate::config::restart_only_changes(&old.config, &config);
        let mut problems = restart_only.refused;
        let missing: Vec<&str> = config
            .agent
            .interfaces
            .iter()
            .map(String::as_str)
            .filter(|name| !crate::datapath::interface_exists(name))
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "[agent] interfaces: {} not found on this host",
                missing.join(", ")
            ));
        }
        if !problems.is_empty() {
            return Err(reject(problems));
        }
        let mut warnings: Vec<String> = policy::lint(&config, &table)
            .iter()
            .map(ToString::to_string)
            .collect();
        warnings.extend(restart_only.deferred);

        let mut datapath = lock(&self.datapath);
        lock(&self.drops)
            .apply(
                &mut datapath.maps,
                settings(&config),
                &table,
                policy_names(&config),
            )
            .map_err(|e| reject(vec![format!("writing the policy maps failed: {e}")]))?;
        let generation = datapath.maps.generation();
        // Interfaces added are attached, interfaces removed detached.
        let mut interfaces = Vec::new();
        let replies = config.answers_refusals();
        for name in &config.agent.interfaces {
            let replies_on_veth = replies && crate::datapath::is_veth(name);
            let mode =
                crate::datapath::attach_mode(old.config.agent.xdp_mode, replies_on_veth, name);
            match datapath.attach(name, mode) {
                Ok(mode) => interfaces.push((name.clone(), mode.name().to_string())),
                Err(e) => warnings.push(format!("interface {name}: {e}")),
            }
        }
        if let Err(e) = datapath.detach_others(&config.agent.interfaces) {
            warnings.push(format!("detaching removed interfaces: {e}"));
        }
        let done = Reloaded {
            generation,
            policies: config.policies.len(),
            prefixes: table.dest.len(),
            warnings,
        };
        // Published before the datapath is unlocked, so that concurrent reloads publish
        // in the order they switched the kernel.
        *self
            .interfaces
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = interfaces;
        *self
            .active
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(Active {
            config,
            table,
            generation,
        });
        drop(datapath);
        Ok(done)
    }

    /// How the session store stands.
    pub fn store_status(&self) -> StoreStatus {
        self.fleet
            .as_ref()
            .map_or_else(StoreStatus::local, |f| f.status())
    }

    pub fn boot_id(&self) -> String {
        lock(&self.sessions).boot_id().to_string()
    }

    /// A login: with the fleet's store, an etcd transaction that the follower then
    /// applies here; with the local store, the kernel and the journal directly.
    /// Called off the async workers (it may block on etcd).
    pub fn login(&self, req: &LoginRequest) -> Result<SessionView, ControlError> {
        if let Some(fleet) = &self.fleet {
            let boot_id = self.boot_id();
            let record = block_on(fleet.login(req, &boot_id))?;
            tracing::info!(device = %record.ip, user = record.user.as_str(), idp = record.idp.as_str(), authenticated_at = %rfc3339(record.authenticated_at), "login recorded in the fleet's store");
            return Ok(view(&record, &ClockPair::now(), &boot_id));
        }
        let clock = ClockPair::now();
        let (record, ticket, boot_id) = {
            let mut store = lock(&self.sessions);
            let mut datapath = lock(&self.datapath);
            let (record, ticket) = store.login(req, &clock, &mut datapath.maps)?;
            (record, ticket, store.boot_id().to_string())
        };
        self.durable(ticket)?;
        tracing::info!(device = %record.ip, user = record.user.as_str(), idp = record.idp.as_str(), authenticated_at = %rfc3339(record.authenticated_at), "login");
        Ok(view(&record, &clock, &boot_id))
    }

    pub fn logout(&self, ip: IpAddr) -> Result<SessionView, ControlError> {
        if let Some(fleet) = &self.fleet {
            let boot_id = self.boot_id();
            let record = block_on(fleet.logout(ip, &boot_id))?;
            tracing::info!(device = %ip, user = record.user.as_str(), "logout recorded in the fleet's store");
            return Ok(view(&record, &ClockPair::now(), &boot_id));
        }
        let clock = ClockPair::now();
        let (record, ticket, boot_id) = {
            let mut store = lock(&self.sessions);
            let mut datapath = lock(&self.datapath);
            let (record, ticket) = store.logout(&ip, &clock, &mut datapath.maps)?;
            (record, ticket, store.boot_id().to_string())
        };
        self.durable(ticket)?;
        tracing::info!(device = %ip, user = record.user.as_str(), "logout");
        Ok(view(&record, &clock, &boot_id))
    }

    /// Waits until a change of the local store is durable (sharing the sync with
    /// concurrent changes). If the sync fails, every change not yet durable is undone
    /// and its caller gets an error.
    fn durable(&self, ticket: Ticket) -> Result<(), SessionError> {
        self.syncer
            .wait(ticket, |error| {
                let mut store = lock(&self.sessions);
                let mut datapath = lock(&self.datapath);
                store.recover(&mut datapath.maps, &ClockPair::now(), error);
            })
            .map_err(|failed| SessionError::NotDurable {
                dir: self.active().config.agent.state_dir.clone(),
                reason: failed.reason,
            })
    }

    /// Imports sessions in bulk from a JSON-lines or CSV file's text (`sessions::import`).
    /// A file with any bad line imports nothing, unless `skip_bad`, which imports the
    /// good lines. The kernel gets one batched write; the journal one append.
    pub fn import(&self, text: &str, skip_bad: bool) -> Result<ImportReport, ImportError> {
        let parsed = import::parse(text);
        if let Some(fleet) = &self.fleet {
            return self.import_to_fleet(fleet, parsed, skip_bad);
        }
        let clock = ClockPair::now();
        let (imported, reset, error_count, errors, ticket) = {
            let mut store = lock(&self.sessions);
            let (planned, plan_errors) = store.plan_import(&parsed.records, &clock);
            let (error_count, errors) = line_errors(parsed.errors, plan_errors, skip_bad)?;
            let imported = planned.len();
            let mut datapath = lock(&self.datapath);
            let (reset, ticket) = store
                .import(planned, &clock, &mut datapath.maps)
                .map_err(|e| ImportError::Control(e.into()))?;
            (imported, reset, error_count, errors, ticket)
        };
        self.durable(ticket)
            .map_err(|e| ImportError::Control(e.into()))?;
        Ok(ImportReport::new(imported, reset, error_count, errors))
    }

    /// An import with the fleet's store: planned against a snapshot of etcd, written in
    /// compare-and-swap batches (`Fleet::import`).
    fn import_to_fleet(
        &self,
        fleet: &Fleet,
        parsed: import::ParsedImport,
        skip_bad: bool,
    ) -> Result<ImportReport, ImportError> {
        let boot_id = self.boot_id();
        let current =
            block_on(fleet.snapshot(&boot_id)).map_err(|e| ImportError::Control(e.into()))?;
        let clock = ClockPair::now();
        let (planned, plan_errors) = crate::sessions::plan_import(
            |ip| current.get(ip).and_then(|(r, _)| r.as_ref()),
            &parsed.records,
            &clock,
            &boot_id,
        );
        let (error_count, errors) = line_errors(parsed.errors, plan_errors, skip_bad)?;
        let reset = planned
            .iter()
            .filter(|r| current.get(&r.ip).is_some_and(|(r, _)| r.is_some()))
            .count();
        let with_revisions: Vec<(SessionRecord, i64)> = planned
            .into_iter()
            .map(|r| {
                let revision = current.get(&r.ip).map_or(0, |(_, rev)| *rev);
                (r, revision)
            })
            .collect();
        let imported = block_on(fleet.import(&with_revisions)).map_err(|(done, e)| {
            tracing::error!(recorded = done, error = %e, "import stopped part-way; the batches before it are recorded");
            ImportError::Partial {
                recorded: done,
                error: Box::new(e.into()),
            }
        })?;
        Ok(ImportReport::new(imported, reset, error_count, errors))
    }

    /// Makes the kernel and the local mirror equal to a full snapshot of the fleet's
    /// store (the follower's first step, and again after compaction). New and changed
    /// sessions go in as one batch (one kernel batch, one journal write); should the
    /// batch fail (a full map), each goes on its own so that all that fit are in.
    pub fn resync_store(&self, snapshot: Vec<SessionRecord>) -> StoreDiff {
        let mut store = lock(&self.sessions);
        let mut datapath = lock(&self.datapath);
        let clock = ClockPair::now();
        let wanted: std::collections::HashSet<IpAddr> = snapshot.iter().map(|r| r.ip).collect();
        let gone: Vec<IpAddr> = store
            .iter()
            .map(|r| r.ip)
            .filter(|ip| !wanted.contains(ip))
            .collect();
        let mut diff = StoreDiff::default();
        for ip in gone {
            if apply_change(
                &mut store,
                &mut datapath.maps,
                StoreChange::Delete(ip),
                &clock,
            ) {
                diff.removed += 1;
            }
        }
        let changed: Vec<SessionRecord> = snapshot
            .into_iter()
            .filter(|r| !store.get(&r.ip).is_some_and(|old| same_session(old, r)))
            .collect();
        diff.changed = changed
            .iter()
            .filter(|r| store.get(&r.ip).is_some())
            .count();
        diff.added = changed.len() - diff.changed;
        let boot_id = store.boot_id().to_string();
        let values: Vec<_> = changed
            .iter()
            .map(|r| (r.ip, r.kernel_value(&clock, &boot_id)))
            .collect();
        match datapath.maps.load_sessions(&values) {
            Ok(()) => {
                if let Err(e) = store.commit_import(changed) {
                    tracing::error!(error = %e, "could not record the store's snapshot in the local mirror");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "could not write the store's snapshot to the kernel in one batch; writing it device by device");
                let (mut added, mut updated) = (0, 0);
                for record in changed {
                    let known = store.get(&record.ip).is_some();
                    if apply_change(
                        &mut store,
                        &mut datapath.maps,
                        StoreChange::Put(record),
                        &clock,
                    ) {
                        if known {
                            updated += 1;
                        } else {
                            added += 1;
                        }
                    }
                }
                (diff.added, diff.changed) = (added, updated);
            }
        }
        diff
    }

    /// Applies the fleet store's changes, in revision order, up to `revision`.
    pub fn apply_store(&self, changes: Vec<StoreChange>, revision: i64) {
        let mut store = lock(&self.sessions);
        let mut datapath = lock(&self.datapath);
        let clock = ClockPair::now();
        // Each change is logged, at info level unless it came in bulk (an import); its
        // description is only written when it will be logged.
        let bulk = changes.len() > BULK_CHANGES;
        let described = !bulk || tracing::enabled!(tracing::Level::DEBUG);
        let mut applied = 0;
        for change in changes {
            let what = match &change {
                _ if !described => String::new(),
                StoreChange::Put(r) => format!("session of {} for {} via {}", r.ip, r.user, r.idp),
                StoreChange::Delete(ip) => format!("logout of {ip}"),
            };
            if apply_change(&mut store, &mut datapath.maps, change, &clock) {
                applied += 1;
                if bulk {
                    tracing::debug!(revision, "applied from the fleet's store: {what}");
                } else {
                    tracing::info!(revision, "applied from the fleet's store: {what}");
                }
            }
        }
        if bulk {
            tracing::info!(
                revision,
                applied,
                "applied a batch of changes from the fleet's store"
            );
        }
    }

    /// When the agent stops: leaves the journal readable by earlier versions.
    pub fn close(&self) {
        lock(&self.sessions).close();
    }

    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    pub fn sessions(&self) -> Vec<SessionView> {
        let clock = ClockPair::now();
        let store = lock(&self.sessions);
        store
            .iter()
            .map(|r| view(r, &clock, store.boot_id()))
            .collect()
    }

    pub fn session(&self, ip: IpAddr) -> Result<SessionDetail, ControlError> {
        let store = lock(&self.sessions);
        let record = store.get(&ip).ok_or(SessionError::NotFound { ip })?;
        let clock = ClockPair::now();
        let session = view(record, &clock, store.boot_id());
        let age_ns = age_ns(record, &clock, store.boot_id());
        let active = self.active();
        let policies = active
            .config
            .policies
            .iter()
            .filter_map(|p| {
                let duration = p.duration()?;
                let limit = duration.as_nanos_u64() as i64;
                let satisfied = age_ns <= limit;
                Some(PolicyStanding {
                    policy: p.name.clone(),
                    duration: duration.to_string(),
                    satisfied,
                    margin: events::format_age((limit - age_ns).abs()),
                })
            })
            .collect();
        Ok(SessionDetail { session, policies })
    }

    /// What the portal's page tells `device`, which dialled `destination`: its user and
    /// session age, and the policy (by the config in force) that refused it.
    pub fn portal_facts(&self, device: IpAddr, destination: SocketAddr) -> PageFacts {
        let active = self.active();
        let config = &active.config;
        let policy = config
            .first_match(destination.ip(), Protocol::Tcp, destination.port())
            .map(|i| &config.policies[i]);
        let clock = ClockPair::now();
        let store = lock(&self.sessions);
        let record = store.get(&device);
        PageFacts {
            device,
            destination,
            user: record.map(|r| r.user.clone()),
            policy: policy.map(|p| p.name.clone()),
            session_age: record.map(|r| {
                std::time::Duration::from_nanos(age_ns(r, &clock, store.boot_id()).max(0) as u64)
            }),
            max_age: policy.and_then(|p| p.duration()).map(|d| d.0),
            reauth_url: config.agent.reauth_url.clone(),
        }
    }

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
        let stats = Stats {
            verdicts: Verdict::ALL
                .iter()
                .map(|v| (v.name().to_string(), counters[v.code() as usize]))
                .collect(),
            events: counter::EVENTS
                .iter()
                .map(|(slot, name)| (name.to_string(), counters[*slot as usize]))
                .collect(),
            replies: counter::REPLIES
                .iter()
                .map(|(slot, name)| (name.to_string(), counters[*slot as usize]))
                .collect(),
            policy_drops: drops,
            sessions,
            udp_flows: flows.0 + flows.1,
            interfaces: self.interfaces(),
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
    fn policy_drops_of(
        &self,
        maps: &crate::datapath::Maps,
    ) -> Result<Vec<(String, u64)>, ControlError> {
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
        let sessions_v4 = lock(&self.sessions)
            .iter()
            .filter(|r| r.ip.is_ipv4())
            .count();
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
        })
    }

    /// Resolves, logs, records and passes on a refusal from the kernel.
    pub fn record_refusal(&self, raw: &RawRefusal) {
        let user = lock(&self.sessions)
            .get(&raw.device)
            .map(|r| r.user.clone());
        let policy = lock(&self.drops)
            .name(u32::from(raw.set), raw.policy)
            .map_or_else(|| format!("#{}", raw.policy), str::to_string);
        let refusal = raw.resolve(&ClockPair::now(), user, policy);
        events::log(&refusal);
        if let Some(notifier) = &self.notifier {
            notifier.refused(&refusal);
        }
        // No subscribers is the usual case, not an error.
        let _ = self.live_events.send(refusal.clone());
        lock(&self.history).push(refusal);
    }

    pub fn recent_refusals(&self) -> Vec<Refusal> {
        lock(&self.history).snapshot()
    }
}

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("{error_count} bad line(s); nothing was imported (--skip-bad imports the good lines)")]
    Rejected {
        error_count: usize,
        errors: Vec<LineError>,
    },
    #[error(
        "import stopped after {recorded} device(s) were recorded in the fleet's store: {error}"
    )]
    Partial {
        recorded: usize,
        error: Box<ControlError>,
    },
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// An import's bad lines, parsing's and planning's, in line order: how many, and the
/// first `IMPORT_ERRORS_SHOWN`. Any at all refuse the import unless `skip_bad`.
fn line_errors(
    mut errors: Vec<LineError>,
    plan_errors: Vec<LineError>,
    skip_bad: bool,
) -> Result<(usize, Vec<LineError>), ImportError> {
    errors.extend(plan_errors);
    errors.sort_by_key(|e| e.line);
    let error_count = errors.len();
    errors.truncate(IMPORT_ERRORS_SHOWN);
    if error_count > 0 && !skip_bad {
        return Err(ImportError::Rejected {
            error_count,
            errors,
        });
    }
    Ok((error_count, errors))
}

/// What a full resync changed here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreDiff {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
}

/// Whether a session from the store is the one this host has (its boot-clock time,
/// set when it was first applied here, stays).
fn same_session(old: &SessionRecord, new: &SessionRecord) -> bool {
    old.user == new.user && old.idp == new.idp && old.authenticated_at == new.authenticated_at
}

/// One change from the fleet's store into the kernel and the local mirror; whether it
/// changed anything. The store is the truth: a change that cannot be written here is
/// logged (the device keeps its previous state) and counted by the kernel's errors.
fn apply_change(
    store: &mut SessionStore,
    maps: &mut crate::datapath::Maps,
    change: StoreChange,
    clock: &ClockPair,
) -> bool {
    match change {
        StoreChange::Put(record) => {
            if store
                .get(&record.ip)
                .is_some_and(|old| same_session(old, &record))
            {
                return false;
            }
            let ip = record.ip;
            if let Err(e) = maps.set_session(ip, record.kernel_value(clock, store.boot_id())) {
                tracing::error!(device = %ip, error = %e, "could not write a session from the fleet's store to the kernel");
                return false;
            }
            if let Err(e) = store.commit_login(record) {
                tracing::error!(device = %ip, error = %e, "could not record a session from the fleet's store in the local mirror");
            }
            true
        }
        StoreChange::Delete(ip) => {
            if store.get(&ip).is_none() {
                return false;
            }
            if let Err(e) = maps.remove_session(ip) {
                tracing::error!(device = %ip, error = %e, "could not remove a session from the kernel after a logout in the fleet's store");
                return false;
            }
            if let Err(e) = store.commit_logout(&ip) {
                tracing::error!(device = %ip, error = %e, "could not record a logout from the fleet's store in the local mirror");
            }
            true
        }
    }
}

/// Runs a future to completion from a blocking thread (API calls run on those).
fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(future)
}

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
    pub notify: Option<crate::notify::NotifyStats>,
}

pub fn policy_names(config: &Config) -> Vec<String> {
    config.policies.iter().map(|p| p.name.clone()).collect()
}

/// A session's age by the kernel's clock.
fn age_ns(record: &SessionRecord, clock: &ClockPair, boot_id: &str) -> i64 {
    clock
        .boot_ns
        .saturating_sub(record.kernel_value(clock, boot_id).authenticated_at_ns)
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn view(record: &SessionRecord, clock: &ClockPair, boot_id: &str) -> SessionView {
    let age_ns = age_ns(record, clock, boot_id);
    SessionView {
        ip: record.ip,
        user: record.user.clone(),
        idp: record.idp.clone(),
        authenticated_at: rfc3339(record.authenticated_at),
        age: events::format_age(age_ns),
        age_seconds: age_ns / 1_000_000_000,
    }
}
