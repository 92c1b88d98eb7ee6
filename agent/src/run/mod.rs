//! `sessiongate run`: validate everything, bind the listeners (`listeners`), adopt (or
//! load and pin) the datapath and bring its sessions and policy up to date
//! (`startup`), then serve the API and report refusals until SIGINT or SIGTERM. SIGHUP
//! reloads the config. The datapath stays pinned and attached after the agent exits,
//! so a restart or upgrade never opens a gap.

mod listeners;
mod startup;

use std::{path::Path, sync::Arc};

use agent_common::verdict::Verdict;
use anyhow::{Context as _, bail};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::SignalKind,
    sync::watch,
    task::JoinSet,
};

use crate::{
    api,
    clock::Laps,
    config::{Config, StoreConfig},
    control::{Control, missing_interfaces},
    events,
    fleet::Fleet,
    input::file,
    notify::{Notifier, NotifyConfig},
    policy,
    sessions::{SessionMirror, SessionStore},
    signin::{ProviderSettings, SignIn},
};
use listeners::Listeners;

pub async fn run(config_path: &Path, replace: bool) -> anyhow::Result<()> {
    // Everything that can be wrong with the config, and with the files and listeners it
    // names, is found before the kernel is touched.
    let (config, table) = checked_config(config_path)?;
    let api_token = match &config.agent.api_token_file {
        Some(path) if config.agent.api_listen.is_some() => Some(api::auth::read_token(path)?),
        _ => None,
    };
    // The fleet's store client (TLS files read here).
    let fleet = match &config.store {
        StoreConfig::Local => None,
        StoreConfig::Etcd(etcd) => Some(Arc::new(Fleet::new(etcd).await?)),
    };
    let _lock = lock_state_dir(&config.agent.state_dir)?;
    let mut laps = Laps::start();
    // The journal is replayed while the datapath loads; `startup` waits for it before
    // the kernel's sessions are touched.
    let state_dir = config.agent.state_dir.clone();
    let replay = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        SessionStore::open(&state_dir).map(|store| (store, started.elapsed()))
    });
    let signin = sign_in(&config)?;
    let listeners = Listeners::bind(&config.agent, api_token).await?;

    let started = startup::start(&config, &table, replay, replace, &mut laps)?;
    let notifier = config.agent.notify.as_ref().map(|n| {
        Notifier::spawn(NotifyConfig::new(
            n.url.clone(),
            n.interval.0,
            // With providers, the portal's sign-in unless the config names another.
            n.reauth_url
                .clone()
                .or_else(|| config.portal_page("/login")),
        ))
    });
    let pin_dir = config.agent.pin_dir.clone();
    tracing::info!(
        policies = config.policies.len(),
        prefixes = table.dest.len(),
        sessions = started.sessions.read(|store| store.len()),
        journal_replay_ms = started.replay.as_millis() as u64,
        start = %laps,
        api_socket = %config.agent.api_socket.display(),
        api_listen = ?config.agent.api_listen,
        metrics_listen = ?config.agent.metrics_listen,
        portal_listen = ?config.agent.portal_listen,
        pin_dir = %pin_dir.display(),
        "sessiongate running"
    );
    let control = Arc::new(Control::new(
        config_path.to_path_buf(),
        (config, table),
        Arc::clone(&started.sessions),
        (started.datapath, started.drops),
        notifier,
        fleet.clone(),
    ));
    let mut tasks = JoinSet::new();
    tasks.spawn(report_refusals(started.ring, Arc::clone(&control)));
    tasks.spawn(reload_on_sighup(Arc::clone(&control)));
    tasks.spawn(prompt_expiring(Arc::clone(&control)));
    if let Some(fleet) = fleet {
        follow_fleet(&mut tasks, fleet, &started.sessions).await;
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let servers = listeners.serve(&control, signin, stopped);
    // What the start-up's replay and bulk write freed, while the API already answers.
    tokio::task::spawn_blocking(crate::memory::release_free_pages);
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    let result = servers.join().await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    control.close();
    drop(control);
    result?;
    tracing::info!(
        pin_dir = %pin_dir.display(),
        "stopped; enforcement continues with the pinned datapath (`sessiongate detach` removes it)"
    );
    Ok(())
}

/// Sign-in with the config's identity providers (their client secrets read now), or
/// `None` without any.
fn sign_in(config: &Config) -> anyhow::Result<Option<Arc<SignIn>>> {
    let Some(portal_url) = config.agent.portal_url.as_deref() else {
        return Ok(None);
    };
    if config.idps.is_empty() {
        return Ok(None);
    }
    let providers = config
        .idps
        .iter()
        .map(|idp| {
            let place = format!("[[idp]] {:?}", idp.name);
            let secret = read_private(&idp.client_secret_file, &place, "client_secret_file")?;
            let ca_pem = match &idp.ca_file {
                Some(path) => Some(
                    file::read_bounded(path, file::MAX_SMALL_FILE, file::Accept::RegularFile)
                        .with_context(|| format!("{place} ca_file {}", path.display()))?
                        .bytes,
                ),
                None => None,
            };
            Ok(ProviderSettings {
                name: idp.name.clone(),
                issuer: idp.issuer.clone(),
                client_id: idp.client_id.clone(),
                client_secret: secret,
                scopes: idp.scopes.clone(),
                user_claim: idp.user_claim.clone(),
                groups_claim: idp.groups_claim.clone(),
                force_interaction: idp.force_interaction,
                ca_pem,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let signin = SignIn::new(providers, &format!("{portal_url}/callback"))?;
    Ok(Some(Arc::new(signin)))
}

/// A secret's text from a file only its owner may read.
fn read_private(path: &Path, place: &str, field: &str) -> anyhow::Result<String> {
    let secret = match file::read_secret(path, file::MAX_SMALL_FILE) {
        Ok(secret) => secret,
        Err(file::SecretError::Exposed { mode }) => bail!(
            "{place} {field} {} is readable by group or others (mode {mode:o}); chmod 600 it",
            path.display()
        ),
        Err(e) => bail!("{place} {field} {}: {e}", path.display()),
    };
    if secret.is_empty() {
        bail!("{place} {field} {} is empty", path.display());
    }
    Ok(secret)
}

/// The config at `path`, valid, compiled, its warnings logged, every interface present.
fn checked_config(path: &Path) -> anyhow::Result<(Config, policy::PolicyTable)> {
    let config = Config::load(path)?;
    let table = policy::compile(&config).with_context(|| format!("config {}", config.source))?;
    for warning in policy::lint(&config, &table) {
        tracing::warn!("{warning}");
    }
    let missing = missing_interfaces(&config);
    if !missing.is_empty() {
        bail!(
            "config {}: [agent] interfaces: {} not found on this host; nothing was attached",
            config.source,
            missing.join(", ")
        );
    }
    Ok((config, table))
}

/// Starts following the fleet's store, and waits until this host matches it, unless
/// etcd is down: then the local mirror of the last state known is served
/// (fail-static) while the follower retries.
async fn follow_fleet(tasks: &mut JoinSet<()>, fleet: Arc<Fleet>, sessions: &Arc<SessionMirror>) {
    tasks.spawn(crate::fleet::supervise(
        Arc::clone(&fleet),
        Arc::clone(sessions),
    ));
    if fleet.wait_synced(FIRST_SYNC_WAIT).await {
        tracing::info!(
            revision = fleet.status().revision,
            "in step with the fleet's session store"
        );
    } else {
        tracing::warn!(
            sessions = sessions.read(|store| store.len()),
            "the fleet's session store is not reachable yet; enforcing the sessions of the local mirror until it is"
        );
    }
}

/// How long start-up waits for the first snapshot of the fleet's store while etcd
/// fails (a snapshot that is coming in is waited for).
const FIRST_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// One agent per state directory (and so per pin directory and journal): a second
/// one would fight the first over the kernel's configuration sets. The lock lasts as
/// long as the returned file is open, which is until the process ends, however it ends.
fn lock_state_dir(state_dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::{io::Write as _, os::fd::AsRawFd as _};
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create state_dir {}", state_dir.display()))?;
    let path = state_dir.join(crate::sessions::LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "another sessiongate agent (pid {}) is running with state_dir {}; stop it first",
            holder.trim(),
            state_dir.display()
        );
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).expect("SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "stopping");
}

async fn reload_on_sighup(control: Arc<Control>) {
    let mut hup = tokio::signal::unix::signal(SignalKind::hangup()).expect("SIGHUP handler");
    while hup.recv().await.is_some() {
        tracing::info!(signal = "SIGHUP", "reloading the config");
        let control = Arc::clone(&control);
        // The outcome is logged and kept for the API and metrics.
        let _ = tokio::task::spawn_blocking(move || control.reload()).await;
    }
}

/// How often the prompts before expiry look for pairs due: a prompt is at most this
/// late.
const EXPIRING_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Prompts pairs whose sessions run out within `notify_before`, every `EXPIRING_CHECK`.
async fn prompt_expiring(control: Arc<Control>) {
    let mut ticks = tokio::time::interval(EXPIRING_CHECK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        // Reads the sessions, which an import holds for seconds.
        let control = Arc::clone(&control);
        let _ = tokio::task::spawn_blocking(move || control.prompt_expiring()).await;
    }
}

/// Drains the kernel's refusal events and use reports as they arrive.
async fn report_refusals(ring: RingBuf<MapData>, control: Arc<Control>) {
    // SAFETY: the ring buffer owns its fd and keeps it open for as long as it lives
    // inside the AsyncFd.
    let registered = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) };
    let mut ring = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the refusal event ring buffer; refusals will not be logged");
            return;
        }
    };
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(guard) => guard,
            Err(e) => {
                tracing::error!(error = %e, "refusal event ring buffer failed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        // Recording takes the session lock, which an import holds for seconds: let the
        // runtime move other tasks off this worker meanwhile.
        tokio::task::block_in_place(|| {
            while let Some(item) = ring.next() {
                match events::decode(&item) {
                    Some(raw) if raw.verdict == Verdict::AdmittedNewFlow => {
                        control.record_use(&raw)
                    }
                    Some(raw) => control.record_refusal(&raw),
                    None => tracing::warn!(len = item.len(), "ignoring a malformed kernel event"),
                }
            }
        });
        guard.clear_ready();
    }
}
