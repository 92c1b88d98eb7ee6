//! Bringing the kernel side up: the pinned datapath adopted (or loaded), its
//! sessions handed to their owner, the policy put in force, the interfaces attached.
//! On any error the start is undone, leaving an adopted datapath enforcing as it was.

use std::sync::Arc;

use agent_common::maps::config_set;
use aya::maps::{MapData, RingBuf};

use crate::{
    clock::Laps,
    config::Config,
    control::{attach_interfaces, next_set, policy_names},
    datapath::{AttachedMode, Datapath, Origin, SessionMaps, SetConditions, is_veth},
    drops::PolicyDrops,
    policy, portal,
    sessions::{SessionMirror, SessionStore},
};

/// The journal's replay, under way on its own thread: the store and how long it took.
pub(super) type Replay = std::thread::JoinHandle<
    Result<(SessionStore, std::time::Duration), crate::sessions::SessionError>,
>;

/// What a start brought up.
pub(super) struct Started {
    pub datapath: Datapath,
    pub drops: PolicyDrops,
    pub sessions: Arc<SessionMirror>,
    /// The kernel's refusal events.
    pub ring: RingBuf<MapData>,
    /// How long the journal's replay took (beside the datapath's load).
    pub replay: std::time::Duration,
}

/// Opens the datapath pinned under the config's `pin_dir` and brings it up to date with
/// `config`, its sessions from `store`.
pub(super) fn start(
    config: &Config,
    table: &policy::PolicyTable,
    replay: Replay,
    replace: bool,
    laps: &mut Laps,
) -> anyhow::Result<Started> {
    let (mut datapath, origin) = Datapath::open(&config.agent.pin_dir, &config.limits, replace)?;
    laps.lap("datapath");
    let replayed = replay
        .join()
        .map_err(|_| anyhow::anyhow!("the journal replay panicked"))
        .and_then(|replayed| Ok(replayed?));
    let (store, replay) = match replayed {
        Ok(replayed) => replayed,
        Err(e) => {
            datapath.abandon(&origin);
            return Err(e);
        }
    };
    laps.lap("replay_after_datapath");
    let mut session_maps = datapath.take_sessions().expect("taken once");
    // Identity masks are computed from this config's conditions, except in the set an
    // adopted datapath has in force: its conditions are the earlier agent's, so a
    // device's mask there is carried over from its previous slot until the flip.
    let conditions = policy::identity_conditions(config, table);
    let mut sets: SetConditions = [Some(conditions.clone()), Some(conditions)];
    if matches!(origin, Origin::Adopted) {
        sets[config_set(datapath.maps.generation()) as usize] = None;
    }
    session_maps.identities.set_conditions(sets);
    let up = start_sessions(store, session_maps, config, &origin, &datapath).and_then(|mirror| {
        laps.lap("sessions");
        Ok((
            bring_up(&mut datapath, &origin, config, table, &mirror)?,
            mirror,
        ))
    });
    laps.lap("policy_and_attach");
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
    Ok(Started {
        datapath,
        drops,
        sessions,
        ring,
        replay,
    })
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
    sessions: &SessionMirror,
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
    sessions.switch_config(
        policy::identity_conditions(config, table),
        datapath,
        |datapath| Ok::<_, crate::datapath::DatapathError>(next_set(&datapath.maps)),
        |datapath| {
            drops.apply(
                &mut datapath.maps,
                policy::settings(config),
                table,
                policy_names(config),
            )
        },
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
