//! Session changes and reads as the API makes them. With the local store a change goes
//! to the session mirror; with the fleet's store it is an etcd transaction, which the
//! follower then applies to the mirror here (`fleet`).

use std::net::{IpAddr, SocketAddr};

use thiserror::Error;

use super::{Control, ControlError, views};
use crate::{
    clock::{ClockPair, Laps},
    config::{Protocol, UnknownDevice},
    fleet::Fleet,
    portal::{Backend, Captive, PageFacts},
    sessions::{
        LoginRequest, SessionError, SessionRecord,
        import::{self, LineError},
        plan_import,
    },
    signin::Identity,
    wire::{ImportReport, SessionDetail, SessionView},
};

/// Line errors an import reply lists; the rest are counted.
const IMPORT_ERRORS_SHOWN: usize = 100;

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

impl From<crate::sessions::ChangeError> for ImportError {
    fn from(e: crate::sessions::ChangeError) -> Self {
        Self::Control(e.into())
    }
}

impl Control {
    /// A login: with the fleet's store, an etcd transaction that the follower then
    /// applies here; with the local store, the mirror directly. Called off the async
    /// workers (it may block on etcd or on the journal's sync).
    pub fn login(&self, req: &LoginRequest) -> Result<SessionView, ControlError> {
        let boot_id = self.sessions.boot_id();
        if let Some(fleet) = &self.fleet {
            let record = block_on(fleet.login(req, boot_id))?;
            tracing::info!(device = %record.ip, user = record.user.as_str(), idp = record.idp.as_str(), authenticated_at = %views::rfc3339(record.authenticated_at), "login recorded in the fleet's store");
            return Ok(views::view(&record, &ClockPair::now(), boot_id));
        }
        let clock = ClockPair::now();
        let record = self.sessions.login(req, &clock)?;
        tracing::info!(device = %record.ip, user = record.user.as_str(), idp = record.idp.as_str(), authenticated_at = %views::rfc3339(record.authenticated_at), "login");
        Ok(views::view(&record, &clock, boot_id))
    }

    pub fn logout(&self, ip: IpAddr) -> Result<SessionView, ControlError> {
        let boot_id = self.sessions.boot_id();
        if let Some(fleet) = &self.fleet {
            let record = block_on(fleet.logout(ip, boot_id))?;
            tracing::info!(device = %ip, user = record.user.as_str(), "logout recorded in the fleet's store");
            return Ok(views::view(&record, &ClockPair::now(), boot_id));
        }
        let clock = ClockPair::now();
        let record = self.sessions.logout(ip, &clock)?;
        tracing::info!(device = %ip, user = record.user.as_str(), "logout");
        Ok(views::view(&record, &clock, boot_id))
    }

    /// Imports sessions in bulk from a JSON-lines or CSV file's text (`sessions::import`).
    /// A file with any bad line imports nothing, unless `skip_bad`, which imports the
    /// good lines. The kernel gets one batched write; the journal one append.
    pub fn import(&self, text: &str, skip_bad: bool) -> Result<ImportReport, ImportError> {
        let mut laps = Laps::start();
        let parsed = import::parse(text);
        laps.lap("parse");
        if let Some(fleet) = &self.fleet {
            return self.import_to_fleet(fleet, parsed, skip_bad, laps);
        }
        let clock = ClockPair::now();
        let (imported, (error_count, errors)) =
            self.sessions.import(&clock, &mut laps, |store| {
                let (planned, plan_errors) = store.plan_import(parsed.records, &clock);
                let errors = line_errors(parsed.errors, plan_errors, skip_bad)?;
                Ok::<_, ImportError>((planned, errors))
            })?;
        tracing::info!(
            sessions = imported.sessions,
            reset = imported.reset,
            laps = %laps,
            "imported sessions"
        );
        crate::memory::release_free_pages();
        Ok(ImportReport::new(
            imported.sessions,
            imported.reset,
            error_count,
            errors,
        ))
    }

    /// An import with the fleet's store: planned against a snapshot of etcd, written in
    /// compare-and-swap batches (`Fleet::import`).
    fn import_to_fleet(
        &self,
        fleet: &Fleet,
        parsed: import::ParsedImport,
        skip_bad: bool,
        mut laps: Laps,
    ) -> Result<ImportReport, ImportError> {
        let boot_id = self.sessions.boot_id();
        let current =
            block_on(fleet.snapshot(boot_id)).map_err(|e| ImportError::Control(e.into()))?;
        laps.lap("snapshot");
        let clock = ClockPair::now();
        let (planned, plan_errors) = plan_import(
            |ip| {
                current
                    .get(ip)
                    .and_then(|(r, _)| r.as_ref().map(SessionRecord::enrolled))
            },
            parsed.records,
            &clock,
            boot_id,
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
        laps.lap("plan");
        let imported = block_on(fleet.import(&with_revisions)).map_err(|(done, e)| {
            tracing::error!(recorded = done, error = %e, "import stopped part-way; the batches before it are recorded");
            ImportError::Partial {
                recorded: done,
                error: Box::new(e.into()),
            }
        })?;
        laps.lap("store");
        tracing::info!(
            sessions = imported,
            reset,
            laps = %laps,
            "imported sessions into the fleet's store"
        );
        crate::memory::release_free_pages();
        Ok(ImportReport::new(imported, reset, error_count, errors))
    }

    pub fn session_count(&self) -> usize {
        self.sessions.read(|store| store.len())
    }

    pub fn sessions(&self) -> Vec<SessionView> {
        let clock = ClockPair::now();
        let boot_id = self.sessions.boot_id();
        self.sessions.read(|store| {
            let mut views: Vec<SessionView> = store
                .records()
                .map(|r| views::view(&r, &clock, boot_id))
                .collect();
            // By device address, as the list is read.
            views.sort_unstable_by_key(|v| v.ip);
            views
        })
    }

    /// A session and how it stands against each session-checked policy in force.
    pub fn session(&self, ip: IpAddr) -> Result<SessionDetail, ControlError> {
        let record = self
            .sessions
            .read(|store| store.get(&ip))
            .ok_or(SessionError::NotFound { ip })?;
        let active = self.active();
        Ok(views::detail(
            &record,
            &ClockPair::now(),
            self.sessions.boot_id(),
            &active.config,
        ))
    }

    /// What the portal's page tells `device`, which dialled `destination`: its user and
    /// session age, and the policy (by the config in force) that refused it.
    pub fn portal_facts(&self, device: IpAddr, destination: SocketAddr) -> PageFacts {
        let active = self.active();
        let config = &active.config;
        let record = self.sessions.read(|store| store.get(&device));
        let who = record.as_ref().map(SessionRecord::identity);
        let policy = config
            .first_match(
                destination.ip(),
                Protocol::Tcp,
                destination.port(),
                who.as_ref(),
            )
            .map(|i| &config.policies[i]);
        let clock = ClockPair::now();
        let boot_id = self.sessions.boot_id();
        PageFacts {
            device,
            destination,
            user: record.as_ref().map(|r| r.user.clone()),
            policy: policy.map(|p| p.name.clone()),
            session_age: record.as_ref().map(|r| {
                std::time::Duration::from_nanos(views::age_ns(r, &clock, boot_id).max(0) as u64)
            }),
            max_age: policy.and_then(|p| p.duration()).map(|d| d.0),
            reauth_url: config.agent.reauth_url.clone(),
            sign_in_url: config.portal_page("/login"),
        }
    }

    /// Where users sign in again: the portal's own sign-in, else `reauth_url`.
    pub fn user_portal_url(&self) -> Option<String> {
        let active = self.active();
        active.config.reauth_page("/login")
    }
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

/// Runs a future to completion from a blocking thread (API calls run on those).
fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(future)
}

/// The portal's questions, answered from the sessions and the config in force.
impl Backend for Control {
    fn facts(&self, device: IpAddr, destination: SocketAddr) -> PageFacts {
        self.portal_facts(device, destination)
    }

    fn enrolled_idp(&self, device: IpAddr) -> Option<String> {
        self.sessions
            .read(|store| store.get(&device).map(|r| r.idp.clone()))
    }

    fn captive(&self, device: IpAddr) -> Captive {
        let active = self.active();
        let config = &active.config;
        let boot_id = self.sessions.boot_id();
        let clock = ClockPair::now();
        // The session's age, and the durations of the policies that apply to its user.
        let (age, limits) = self.sessions.read(|store| {
            let record = store.get(&device);
            let who = record.as_ref().map(SessionRecord::identity);
            let limits: Vec<i64> = config
                .policies
                .iter()
                .filter(|p| p.applies_to(who.as_ref()))
                .filter_map(|p| p.duration())
                .map(|d| d.as_nanos_u64() as i64)
                .collect();
            (
                record.as_ref().map(|r| views::age_ns(r, &clock, boot_id)),
                limits,
            )
        });
        let Some(age) = age else {
            // No session: refused wherever sessions are checked, unless unknown
            // devices are let through.
            let captive =
                !limits.is_empty() && config.agent.unknown_device == UnknownDevice::Enforce;
            return Captive {
                captive,
                seconds_remaining: None,
            };
        };
        let left = limits.iter().map(|limit| limit - age).min();
        Captive {
            captive: left.is_some_and(|l| l < 0),
            seconds_remaining: left.filter(|l| *l >= 0).map(|l| l as u64 / 1_000_000_000),
        }
    }

    fn signed_in(
        &self,
        device: IpAddr,
        idp: &str,
        identity: &Identity,
    ) -> Result<Vec<(String, String)>, String> {
        let request = LoginRequest {
            ip: device,
            user: identity.user.clone(),
            idp: Some(idp.to_string()),
            at: Some(identity.authenticated_at),
            groups: identity.groups.clone(),
        };
        self.login(&request).map_err(|e| e.to_string())?;
        let detail = self.session(device).map_err(|e| e.to_string())?;
        // The session's end for each policy, counted from the authentication.
        let started = identity.authenticated_at;
        let active = self.active();
        let durations: std::collections::HashMap<&str, std::time::Duration> = active
            .config
            .policies
            .iter()
            .filter_map(|p| Some((p.name.as_str(), p.duration()?.0)))
            .collect();
        Ok(detail
            .policies
            .into_iter()
            .filter(|p| p.applies)
            .map(|p| {
                let until = durations
                    .get(p.policy.as_str())
                    .map(|d| views::rfc3339(started + *d))
                    .unwrap_or_default();
                let left = if p.satisfied {
                    format!("for {}, until {until}", p.margin)
                } else {
                    format!("not now: the sign-in was {} too long ago", p.margin)
                };
                (p.policy, left)
            })
            .collect())
    }
}
