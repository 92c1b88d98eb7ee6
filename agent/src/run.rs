//! `sessiongate run`: validate everything, fill the maps, attach, then serve the API and
//! report refusals until SIGINT or SIGTERM.

use std::{path::Path, sync::Arc};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::SignalKind,
};

use crate::{
    api,
    clock::ClockPair,
    config::Config,
    control::Control,
    datapath::{Datapath, interface_exists},
    events, policy,
    sessions::SessionStore,
};

pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    // Everything that can be wrong with the config is found before the kernel is touched.
    let config = Config::load(config_path)?;
    let table = policy::compile(&config).with_context(|| format!("config {}", config.source))?;
    for warning in policy::lint(&config, &table) {
        tracing::warn!("{warning}");
    }
    let missing: Vec<&str> = config
        .agent
        .interfaces
        .iter()
        .map(String::as_str)
        .filter(|name| !interface_exists(name))
        .collect();
    if !missing.is_empty() {
        bail!(
            "config {}: [agent] interfaces: {} not found on this host; nothing was attached",
            config.source,
            missing.join(", ")
        );
    }
    let store = SessionStore::open(&config.agent.state_dir)?;

    let mut datapath = Datapath::load(&config.limits)?;
    datapath.maps.write_settings(&config)?;
    datapath.maps.write_policies(&table)?;
    // Sessions are in place before the first packet is judged, so a restart never
    // refuses a device that has a valid session.
    let clock = ClockPair::now();
    let sessions: Vec<_> = store
        .iter()
        .map(|r| (r.ip, r.kernel_value(&clock, store.boot_id())))
        .collect();
    datapath.maps.load_sessions(&sessions)?;
    let mut interfaces = Vec::new();
    for name in &config.agent.interfaces {
        let mode = datapath.attach(name, config.agent.xdp_mode)?;
        tracing::info!(interface = %name, mode = mode.name(), "attached");
        interfaces.push((name.clone(), mode.name().to_string()));
    }
    let ring = datapath.take_events().expect("taken once");
    let listener = api::server::bind(&config.agent.api_socket).with_context(|| {
        format!(
            "cannot listen on the API socket {}",
            config.agent.api_socket.display()
        )
    })?;
    let socket = config.agent.api_socket.clone();
    tracing::info!(
        policies = config.policies.len(),
        prefixes = table.dest.len(),
        sessions = store.len(),
        api_socket = %socket.display(),
        "sessiongate running"
    );
    let control = Arc::new(Control::new(config, table, interfaces, store, datapath));

    let reporter = tokio::spawn(report_refusals(ring, Arc::clone(&control)));
    let served = axum::serve(listener, api::server::router(Arc::clone(&control)))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    reporter.abort();
    let _ = reporter.await;
    let _ = std::fs::remove_file(&socket);
    drop(control);
    served.context("API server")?;
    tracing::info!("stopped; the program is detached");
    Ok(())
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
        while let Some(item) = ring.next() {
            match events::decode(&item) {
                Some(raw) => control.record_refusal(&raw),
                None => tracing::warn!(len = item.len(), "ignoring a malformed refusal event"),
            }
        }
        guard.clear_ready();
    }
}
