//! `sessiongate run`: validate everything, adopt (or load and pin) the datapath, bring
//! its sessions and policy up to date, then serve the API and report refusals until
//! SIGINT or SIGTERM. SIGHUP reloads the config. The datapath stays pinned and attached
//! after the agent exits, so a restart or upgrade never opens a gap.

use std::{path::Path, sync::Arc};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::SignalKind,
    sync::watch,
};

use crate::{
    api,
    config::{Config, StoreConfig},
    control::{Control, attach_interfaces, missing_interfaces, policy_names},
    datapath::{AttachedMode, Datapath, Origin, SessionMaps, is_veth},
    drops::PolicyDrops,
    events,
    fleet::Fleet,
    listen::{self, Limits},
    notify::{Notifier, NotifyConfig},
    policy, portal,
    sessions::{SessionMirror, SessionStore},
};

pub async fn run(config_path: &Path, replace: bool) -> anyhow::Result<()> {
    // Everything that can be wrong with the config is found before the kernel is touched.
    let config = Config::load(config_path)?;
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
    let api_token = match &config.agent.api_token_file {
        Some(path) if config.agent.api_listen.is_some() => Some(api::auth::read_token(path)?),
        _ => None,
    };
    // The fleet's store client (TLS files read here), before the kernel is touched.
    let fleet = match &config.store {
        StoreConfig::Local => None,
        StoreConfig::Etcd(etcd) => Some(Arc::new(Fleet::new(etcd).await?)),
    };
    let _lock = lock_state_dir(&config.agent.state_dir)?;
    let store = SessionStore::open(&config.agent.state_dir)?;

    // Every listener is bound before the kernel is touched: a busy port, an address
    // that is not local or a socket path that cannot be bound stops the start with
    // nothing attached and nothing pinned.
    raise_open_files_limit();
    let listener = api::server::bind(&config.agent.api_socket).with_context(|| {
        format!(
            "cannot listen on the API socket {}",
            config.agent.api_socket.display()
        )
    })?;
    let _socket_file = SocketFile(config.agent.api_socket.clone());
    let listener = listen::limited(listener, API_SOCKET_LIMITS);
    let tcp_listener = bind_tcp(config.agent.api_listen, "api_listen")
        .await?
        .map(|l| listen::limited(l, API_LISTEN_LIMITS));
    let metrics_listener = bind_tcp(config.agent.metrics_listen, "metrics_listen")
        .await?
        .map(|l| listen::limited(l, METRICS_LIMITS));
    let portal_listener = match config.agent.portal_listen {
        Some(addr) => {
            let listener = portal::bind_transparent(addr)
                .with_context(|| format!("cannot listen on portal_listen {addr}"))?;
            let listener = tokio::net::TcpListener::from_std(listener).context("portal_listen")?;
            Some(listen::limited(listener, PORTAL_LIMITS))
        }
        None => None,
    };

    let pin_dir = config.agent.pin_dir.clone();
    let (mut datapath, origin) = Datapath::open(&pin_dir, &config.limits, replace)?;
    let session_maps = datapath.take_sessions().expect("taken once");
    let up = start_sessions(store, session_maps, &config, &origin, &datapath)
        .and_then(|mirror| Ok((bring_up(&mut datapath, &origin, &config, &table)?, mirror)));
    let (drops, sessions) = match up {
        Ok(up) => up,
        Err(e) => {
            if !matches!(origin, Origin::Adopted) && config.agent.portal_listen.is_some() {
                portal::routing::remove();
            }
            datapath.abandon(&origin);
            return Err(e);
        }
    };
    let ring = datapath.take_events().expect("taken once");

    let notifier = config.agent.notify.as_ref().map(|n| {
        Notifier::spawn(NotifyConfig::new(
            n.url.clone(),
            n.interval.0,
            n.reauth_url.clone(),
        ))
    });
    let socket = config.agent.api_socket.clone();
    tracing::info!(
        policies = config.policies.len(),
        prefixes = table.dest.len(),
        sessions = sessions.read(|store| store.len()),
        api_socket = %socket.display(),
        api_listen = ?config.agent.api_listen,
        metrics_listen = ?config.agent.metrics_listen,
        portal_listen = ?config.agent.portal_listen,
        pin_dir = %pin_dir.display(),
        "sessiongate running"
    );
    let control = Arc::new(Control::new(
        config_path.to_path_buf(),
        (config, table),
        Arc::clone(&sessions),
        (datapath, drops),
        notifier,
        fleet.clone(),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(report_refusals(ring, Arc::clone(&control)));
    tasks.spawn(reload_on_sighup(Arc::clone(&control)));
    if let Some(fleet) = fleet {
        tasks.spawn(crate::fleet::supervise(
            Arc::clone(&fleet),
            Arc::clone(&sessions),
        ));
        // Serve once this host matches the store, unless etcd is down: then serve the
        // local mirror of the last state known (fail-static) while the follower retries.
        if fleet.wait_synced(FIRST_SYNC_WAIT).await {
            tracing::info!(
                revision = fleet.status().revision,
                "in step with the fleet's session store"
            );
        } else {
            tracing::warn!(
                sessions = control.session_count(),
                "the fleet's session store is not reachable yet; enforcing the sessions of the local mirror until it is"
            );
        }
    }
    let unix = axum::serve(
        listener,
        api::server::router(Arc::clone(&control))
            .into_make_service_with_connect_info::<api::server::Caller>(),
    )
    .with_graceful_shutdown(stopped());
    let mut servers = vec![tokio::spawn(
        async move { unix.await.context("API server") },
    )];
    if let (Some(listener), Some(token)) = (tcp_listener, api_token) {
        let router = api::auth::require_token(api::server::router(Arc::clone(&control)), token);
        let tcp = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<api::server::Caller>(),
        )
        .with_graceful_shutdown(stopped());
        servers.push(tokio::spawn(
            async move { tcp.await.context("TCP API server") },
        ));
    }
    if let Some(listener) = portal_listener {
        let facts_from = Arc::clone(&control);
        let facts = Arc::new(move |peer: std::net::SocketAddr, local| {
            facts_from.portal_facts(peer.ip(), local)
        });
        let portal = portal::serve(listener, facts, stopped());
        servers.push(tokio::spawn(async move { portal.await.context("portal") }));
    }
    if let Some(listener) = metrics_listener {
        let metrics = axum::serve(listener, api::metrics::router(Arc::clone(&control)))
            .with_graceful_shutdown(stopped());
        servers.push(tokio::spawn(async move {
            metrics.await.context("metrics server")
        }));
    }

    shutdown_signal().await;
    let _ = stop_tx.send(true);
    let mut result = Ok(());
    for server in servers {
        match server.await {
            Ok(Err(e)) if result.is_ok() => result = Err(e),
            _ => {}
        }
    }
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

/// Hands the store and the kernel's session maps to their one owner, which puts the
/// sessions in place before the new policy is, and before a new datapath is attached,
/// so no device with a valid session is ever refused.
fn start_sessions(
    store: SessionStore,
    maps: SessionMaps,
    config: &Config,
    origin: &Origin,
    datapath: &Datapath,
) -> anyhow::Result<Arc<SessionMirror>> {
    let adopted = matches!(origin, Origin::Adopted);
    let sessions = store.len();
    let (mirror, removed) = SessionMirror::start(store, maps, &config.agent.state_dir, adopted)?;
    if adopted {
        tracing::info!(
            dir = %config.agent.pin_dir.display(),
            generation = datapath.maps.generation(),
            sessions,
            removed,
            "adopted the pinned datapath"
        );
    }
    Ok(Arc::new(mirror))
}

/// Brings an opened datapath (its sessions in place) up to date with `config` and
/// attaches it; returns the per-policy refusal totals. On error the caller abandons
/// what was started.
fn bring_up(
    datapath: &mut Datapath,
    origin: &Origin,
    config: &Config,
    table: &policy::PolicyTable,
) -> anyhow::Result<PolicyDrops> {
    // The portal is ready (listening, routed, its TC program attached) before any
    // settings that name it are in force: a handed-over connection always finds it.
    if config.agent.portal_listen.is_some() {
        portal::routing::install()?;
        datapath.enable_portal()?;
    }
    // Atomic: an adopted datapath keeps its previous policy until this one value flips.
    // The refusal counts it carries are kept, by policy name.
    let mut drops = PolicyDrops::open(
        &config.agent.state_dir,
        datapath.maps.policy_drops_map_id()?,
        datapath.maps.generation(),
    );
    drops.apply(
        &mut datapath.maps,
        policy::settings(config),
        table,
        policy_names(config),
    )?;
    if config.agent.portal_listen.is_none() {
        datapath.disable_portal()?;
    }
    let replies = config.answers_refusals();
    for (name, attached) in attach_interfaces(datapath, config, config.agent.xdp_mode) {
        let mode = attached?;
        tracing::info!(interface = %name, mode = mode.name(), "attached");
        if replies && mode == AttachedMode::Native && is_veth(&name) {
            tracing::warn!(
                interface = %name,
                "this veth is in native XDP mode: the RSTs and ICMP errors of reject and redirect policies reach its peer only if the peer runs an XDP program too; otherwise set xdp_mode = \"generic\""
            );
        }
    }
    datapath.detach_others(&config.agent.interfaces)?;
    if let Origin::Replacing(old) = origin {
        datapath.finish_replace(&config.agent.pin_dir)?;
        tracing::info!(replaced = ?old, "replaced the pinned datapath in one step");
    }
    Ok(drops)
}

/// The API socket's file, removed when the agent stops or fails to start.
struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Connection limits of the listeners (`listen`). The portal is open to every device,
/// so one device may hold only a few connections, and none for long; the others are
/// for operators and monitoring. Together they stay far below the open-files limit the
/// agent raises itself to, so a flood of one never starves another.
const PORTAL_LIMITS: Limits = Limits {
    name: "portal_listen",
    total: 4096,
    per_client: 16,
    idle: Some(std::time::Duration::from_secs(10)),
};
const API_SOCKET_LIMITS: Limits = Limits {
    name: "api_socket",
    total: 256,
    per_client: 0,
    // Root's own socket: event streams stay open as long as their reader.
    idle: None,
};
const API_LISTEN_LIMITS: Limits = Limits {
    name: "api_listen",
    total: 256,
    per_client: 64,
    // Event streams send a keep-alive every 30 s.
    idle: Some(std::time::Duration::from_secs(120)),
};
const METRICS_LIMITS: Limits = Limits {
    name: "metrics_listen",
    total: 64,
    per_client: 16,
    idle: Some(std::time::Duration::from_secs(30)),
};
/// Descriptors the listeners may hold at once, and room for everything else.
const LISTENER_FDS: u64 = (PORTAL_LIMITS.total
    + API_SOCKET_LIMITS.total
    + API_LISTEN_LIMITS.total
    + METRICS_LIMITS.total) as u64;
const OTHER_FDS: u64 = 1024;

/// Raises the soft open-files limit to the hard one, and warns when even that leaves
/// the listeners' limits no room.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    if limit.rlim_cur < LISTENER_FDS + OTHER_FDS {
        tracing::warn!(
            open_files = limit.rlim_cur,
            needed = LISTENER_FDS + OTHER_FDS,
            "the open-files limit is low for the listeners' connection limits: a flood of the portal could starve the API; raise it (LimitNOFILE=)"
        );
    }
}

/// How long start-up waits for the first snapshot of the fleet's store while etcd
/// fails (a snapshot that is coming in is waited for).
const FIRST_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The optional TCP listener configured as `field`.
async fn bind_tcp(
    addr: Option<std::net::SocketAddr>,
    field: &str,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {field} {addr}"))?;
    Ok(Some(listener))
}

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

/// Drains the kernel's refusal events as they arrive.
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
                    Some(raw) => control.record_refusal(&raw),
                    None => tracing::warn!(len = item.len(), "ignoring a malformed refusal event"),
                }
            }
        });
        guard.clear_ready();
    }
}
