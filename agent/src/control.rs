//! The running agent's state and the operations the API exposes on it. Every session
//! change keeps the kernel map and the durable store equal: a change the store cannot
//! record is rolled back in the kernel, and a refused request changes neither.

use std::{
    net::IpAddr,
    sync::{Mutex, MutexGuard},
};

use agent_common::verdict::{Verdict, counter};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    clock::ClockPair,
    config::Config,
    datapath::{Datapath, DatapathError},
    events::{self, History, RawRefusal, Refusal},
    policy::PolicyTable,
    sessions::{LoginRequest, SessionError, SessionRecord, SessionStore},
};

#[derive(Debug, Error)]
pub enum ControlError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

pub struct Control {
    pub config: Config,
    pub table: PolicyTable,
    /// (interface, XDP mode) pairs the program is attached to.
    pub interfaces: Vec<(String, String)>,
    // Lock order: sessions, then datapath.
    sessions: Mutex<SessionStore>,
    /// The loaded, attached program and its maps; dropping it detaches the program.
    datapath: Mutex<Datapath>,
    history: Mutex<History>,
}

/// A session as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    pub ip: IpAddr,
    pub user: String,
    pub idp: String,
    pub authenticated_at: String,
    /// Age by the kernel's clock, Go format, to the second.
    pub age: String,
    pub age_seconds: i64,
}

/// `session show`: the session and how it stands against each session-checked policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionDetail {
    #[serde(flatten)]
    pub session: SessionView,
    pub policies: Vec<PolicyStanding>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyStanding {
    pub policy: String,
    pub duration: String,
    pub satisfied: bool,
    /// Time left while satisfied, or time since it expired.
    pub margin: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Verdict counters by name, in code order.
    pub verdicts: Vec<(String, u64)>,
    pub events: Vec<(String, u64)>,
    /// Refused new flows per policy.
    pub policy_drops: Vec<(String, u64)>,
    pub sessions: usize,
    pub udp_flows: usize,
    pub interfaces: Vec<(String, String)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves consistent data in every path here (each
    // write is a single map or store operation), so carry on with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Control {
    pub fn new(
        config: Config,
        table: PolicyTable,
        interfaces: Vec<(String, String)>,
        sessions: SessionStore,
        datapath: Datapath,
    ) -> Self {
        Self {
            config,
            table,
            interfaces,
            sessions: Mutex::new(sessions),
            datapath: Mutex::new(datapath),
            history: Mutex::new(History::default()),
        }
    }

    pub fn login(&self, req: &LoginRequest) -> Result<SessionView, ControlError> {
        let mut store = lock(&self.sessions);
        let clock = ClockPair::now();
        let record = store.plan_login(req, &clock)?;
        let mut datapath = lock(&self.datapath);
        let maps = &mut datapath.maps;
        let previous = maps.session(req.ip)?;
        maps.set_session(req.ip, record.kernel_value(&clock, store.boot_id()))?;
        if let Err(e) = store.commit_login(record.clone()) {
            let restored = match previous {
                Some(s) => maps.set_session(req.ip, s),
                None => maps.remove_session(req.ip),
            };
            if let Err(r) = restored {
                tracing::error!(device = %req.ip, error = %r, "could not roll back the kernel session after a failed write");
            }
            return Err(e.into());
        }
        drop(datapath);
        tracing::info!(device = %record.ip, user = %record.user, idp = %record.idp, authenticated_at = %rfc3339(record.authenticated_at), "login");
        Ok(view(&record, &clock, store.boot_id()))
    }

    pub fn logout(&self, ip: IpAddr) -> Result<SessionView, ControlError> {
        let mut store = lock(&self.sessions);
        let clock = ClockPair::now();
        let record = store.plan_logout(&ip)?.clone();
        let mut datapath = lock(&self.datapath);
        let maps = &mut datapath.maps;
        maps.remove_session(ip)?;
        if let Err(e) = store.commit_logout(&ip) {
            if let Err(r) = maps.set_session(ip, record.kernel_value(&clock, store.boot_id())) {
                tracing::error!(device = %ip, error = %r, "could not roll back the kernel session after a failed write");
            }
            return Err(e.into());
        }
        drop(datapath);
        tracing::info!(device = %ip, user = %record.user, "logout");
        Ok(view(&record, &clock, store.boot_id()))
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
        let policies = self
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

    pub fn stats(&self) -> Result<Stats, ControlError> {
        let sessions = lock(&self.sessions).len();
        let datapath = lock(&self.datapath);
        let maps = &datapath.maps;
        let counters = maps.counters()?;
        let drops = maps.policy_drops(self.config.policies.len())?;
        let (v4, v6) = maps.flow_count(crate::clock::boot_now_ns() as u64);
        drop(datapath);
        Ok(Stats {
            verdicts: Verdict::ALL
                .iter()
                .map(|v| (v.name().to_string(), counters[v.code() as usize]))
                .collect(),
            events: counter::NAMED
                .iter()
                .map(|(slot, name)| (name.to_string(), counters[*slot as usize]))
                .collect(),
            policy_drops: self
                .config
                .policies
                .iter()
                .zip(drops)
                .map(|(p, n)| (p.name.clone(), n))
                .collect(),
            sessions,
            udp_flows: v4 + v6,
            interfaces: self.interfaces.clone(),
        })
    }

    /// Resolves, logs and records a refusal from the kernel.
    pub fn record_refusal(&self, raw: &RawRefusal) {
        let user = lock(&self.sessions)
            .get(&raw.device)
            .map(|r| r.user.clone());
        let policy = self
            .config
            .policies
            .get(raw.policy as usize)
            .map_or_else(|| format!("#{}", raw.policy), |p| p.name.clone());
        let refusal = raw.resolve(&ClockPair::now(), user, policy);
        events::log(&refusal);
        lock(&self.history).push(refusal);
    }

    pub fn recent_refusals(&self) -> Vec<Refusal> {
        lock(&self.history).snapshot()
    }
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
