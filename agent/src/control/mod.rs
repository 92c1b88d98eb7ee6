//! The running agent's front: what the API, the portal, the metrics endpoint and the
//! refusal reporter call. It holds the configuration in force and the datapath (policy
//! maps and attachments); it changes sessions only through their one owner, the
//! session mirror (`sessions::SessionMirror`), or through the fleet's store.
//!
//! - `reload`: reading, checking and applying a config, shared with `run`'s start.
//! - `sessions`: logins, logouts, imports and what the API shows of sessions.
//! - `stats`: counters and `/metrics`' snapshot.
//! - `reports`: refusals from the kernel, resolved, logged and passed on.
//! - `expiring`: the kernel's use reports, and the prompts before sessions run out.

mod expiring;
mod reload;
mod reports;
mod sessions;
mod stats;
mod views;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, RwLock},
};

use thiserror::Error;

use crate::{
    config::Config,
    datapath::{Datapath, DatapathError},
    drops::PolicyDrops,
    fleet::{Fleet, FleetError},
    notify::Notifier,
    policy::PolicyTable,
    sessions::{ChangeError, SessionError, SessionMirror},
    wire::{ReloadStatus, StoreStatus},
};
pub use reload::{attach_interfaces, missing_interfaces, next_set, policy_names};
use reports::Reports;
pub use sessions::ImportError;
pub use stats::MetricsSnapshot;

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

/// What is in force, published whole by each reload: the configuration, its compiled
/// table, the generation it was applied as, and the attachments it left (read from the
/// datapath, their owner, when published).
pub struct Active {
    pub config: Config,
    pub table: PolicyTable,
    /// `SG_GENERATION` it was applied as.
    pub generation: u32,
    /// (interface, XDP mode) pairs the program is attached to.
    pub interfaces: Vec<(String, String)>,
}

impl Active {
    fn new(config: Config, table: PolicyTable, datapath: &Datapath) -> Self {
        Self {
            config,
            table,
            generation: datapath.maps.generation(),
            interfaces: datapath
                .attached()
                .iter()
                .map(|(name, mode)| (name.clone(), mode.name().to_string()))
                .collect(),
        }
    }
}

pub struct Control {
    active: RwLock<Arc<Active>>,
    /// The config file `reload` reads.
    config_path: PathBuf,
    /// Session state's one owner. Lock order: the mirror, then the datapath, then
    /// `drops`.
    sessions: Arc<SessionMirror>,
    /// The program, its policy maps and attachments.
    datapath: Mutex<Datapath>,
    /// Which policy each configuration set's slots count for, and the totals of sets
    /// since overwritten.
    drops: Mutex<PolicyDrops>,
    reloads: Mutex<ReloadStatus>,
    /// What the kernel reports (refusals, uses) and where it goes.
    reports: Reports,
    /// The fleet's shared store; `None` with the local store.
    fleet: Option<Arc<Fleet>>,
    started: std::time::Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves consistent data in every path here (each
    // write is a single map or store operation), so carry on with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Control {
    /// `datapath` must hold `config` in force already (`PolicyDrops::apply`), and
    /// `sessions` the sessions.
    pub fn new(
        config_path: PathBuf,
        (config, table): (Config, PolicyTable),
        sessions: Arc<SessionMirror>,
        (datapath, drops): (Datapath, PolicyDrops),
        notifier: Option<Notifier>,
        fleet: Option<Arc<Fleet>>,
    ) -> Self {
        Self {
            active: RwLock::new(Arc::new(Active::new(config, table, &datapath))),
            config_path,
            sessions,
            datapath: Mutex::new(datapath),
            drops: Mutex::new(drops),
            reloads: Mutex::new(ReloadStatus::default()),
            reports: Reports::new(notifier),
            fleet,
            started: std::time::Instant::now(),
        }
    }

    /// What is in force.
    pub fn active(&self) -> Arc<Active> {
        self.active
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts what a reload applied in force for readers. Called with the datapath
    /// locked, so that concurrent reloads publish in the order they switched the kernel.
    fn publish(&self, active: Active) {
        *self
            .active
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(active);
    }

    pub fn interfaces(&self) -> Vec<(String, String)> {
        self.active().interfaces.clone()
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// How the session store stands.
    pub fn store_status(&self) -> StoreStatus {
        self.fleet
            .as_ref()
            .map_or_else(StoreStatus::local, |f| f.status())
    }

    /// When the agent stops: leaves the journal readable by earlier versions.
    pub fn close(&self) {
        self.sessions.close();
    }
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
