//! Loading a datapath: a fresh one from this build's object (pinned, or private for
//! tests and benchmarks), or an earlier agent's adopted from its pins.

use std::path::{Path, PathBuf};

use agent_common::maps::names;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData},
    programs::{SchedClassifier, Xdp},
};
use aya_obj::programs::XdpAttachType;

use super::{
    Datapath, DatapathError, Geometry, Origin, PORTAL_PROGRAM_NAME, PROGRAM, PROGRAM_NAME, Program,
    SessionMaps,
    attach::{LinkKind, interface_index, parse_link_name},
    maps::Maps,
    pins::{self, LayoutDir},
    sys,
};
use crate::config::Limits;

/// Sizes of the maps whose size depends on the config.
fn map_sizes(limits: &Limits) -> Vec<(&'static str, u32)> {
    let geometry = Geometry::of(limits);
    vec![
        (names::SESSIONS_V4, limits.max_sessions),
        (names::SESSIONS_V6, limits.max_sessions),
        (names::SESSION_TABLE_V4, geometry.session_buckets),
        (names::SESSION_TABLE_V6, geometry.session_buckets),
        (names::FLOWS_V4, geometry.flow_buckets),
        (names::FLOWS_V6, geometry.flow_buckets),
        (names::DEST_V4[0], limits.max_policy_cidrs),
        (names::DEST_V4[1], limits.max_policy_cidrs),
        (names::DEST_V6[0], limits.max_policy_cidrs),
        (names::DEST_V6[1], limits.max_policy_cidrs),
        (names::DEST_CACHE_V4, geometry.dest_cache),
        (names::DEST_CACHE_V6, geometry.dest_cache),
        // Both configuration sets' rules live in this one map.
        (names::PORT_RULES, 2 * limits.max_port_rules),
        (names::EVENT_LIMIT, geometry.event_slots),
        (names::REPLY_LIMIT, geometry.reply_slots),
        (names::IDENTITIES[0], super::identities::slots_for(limits)),
        (names::IDENTITIES[1], super::identities::slots_for(limits)),
        (names::IDENTITY_ANSWERS[0], identity_answers_for(limits)),
        (names::IDENTITY_ANSWERS[1], identity_answers_for(limits)),
    ]
}

/// `SG_IDENTITY_ANSWERS_*` entries: a table has at most one identity answer per
/// protocol default of each prefix and one per port rule.
pub fn identity_answers_for(limits: &Limits) -> u32 {
    limits
        .max_policy_cidrs
        .saturating_mul(4)
        .saturating_add(limits.max_port_rules)
}

/// A map pinned in `dir`.
fn open_pinned(dir: &LayoutDir, name: &'static str) -> Result<MapData, DatapathError> {
    MapData::from_pin(dir.map(name)).map_err(|e| DatapathError::Incomplete {
        dir: dir.root.clone(),
        what: format!("map {name}: {e}"),
    })
}

/// Loads (and verifies) the object with map sizes from `limits`.
fn load_object(limits: &Limits) -> Result<Ebpf, DatapathError> {
    if PROGRAM.is_empty() {
        return Err(DatapathError::NotBuilt);
    }
    let mut loader = EbpfLoader::new();
    for (name, size) in map_sizes(limits) {
        loader.map_max_entries(name, size);
    }
    let mut ebpf = loader
        .load(PROGRAM)
        .map_err(|e| DatapathError::Load(Box::new(e)))?;
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .expect("the object defines the program")
        .try_into()
        .map_err(DatapathError::Program)?;
    program.load().map_err(DatapathError::Program)?;
    let portal: &mut SchedClassifier = ebpf
        .program_mut(PORTAL_PROGRAM_NAME)
        .expect("the object defines the portal program")
        .try_into()
        .map_err(DatapathError::Program)?;
    portal.load().map_err(DatapathError::Program)?;
    Ok(ebpf)
}

fn take_from(ebpf: &mut Ebpf) -> impl FnMut(&'static str) -> Result<Map, DatapathError> + '_ {
    |name| {
        Ok(ebpf
            .take_map(name)
            .unwrap_or_else(|| panic!("the program object defines map {name}")))
    }
}

impl Datapath {
    /// Loads (and verifies) a private datapath with map sizes from `limits`; nothing
    /// is attached or pinned. Dropping it unloads it (tests, benchmarks).
    pub fn load(limits: &Limits) -> Result<Self, DatapathError> {
        Self::from_object(load_object(limits)?, limits, None)
    }

    /// Takes the maps out of a loaded object, pinning it first into `pins` if given.
    fn from_object(
        mut ebpf: Ebpf,
        limits: &Limits,
        pins: Option<&LayoutDir>,
    ) -> Result<Self, DatapathError> {
        if let Some(dir) = pins {
            let pin_error = |e: String| DatapathError::Pins {
                dir: dir.root.clone(),
                source: std::io::Error::other(e),
            };
            dir.create().map_err(|e| pin_error(e.to_string()))?;
            for (name, map) in ebpf.maps() {
                if names::ALL.contains(&name) {
                    map.pin(dir.map(name))
                        .map_err(|e| pin_error(format!("map {name}: {e}")))?;
                }
            }
            let program: &mut Xdp = ebpf
                .program_mut(PROGRAM_NAME)
                .expect("the object defines the program")
                .try_into()
                .map_err(DatapathError::Program)?;
            program
                .pin(dir.program())
                .map_err(|e| pin_error(format!("program: {e}")))?;
            let portal: &mut SchedClassifier = ebpf
                .program_mut(PORTAL_PROGRAM_NAME)
                .expect("the object defines the portal program")
                .try_into()
                .map_err(DatapathError::Program)?;
            portal
                .pin(dir.portal_program())
                .map_err(|e| pin_error(format!("portal program: {e}")))?;
        }
        let (maps, sessions, events) = {
            let mut source = take_from(&mut ebpf);
            let maps = Maps::open(&mut source, limits)?;
            let sessions = SessionMaps::open(&mut source, limits, maps.generation() == 0)?;
            (maps, sessions, Maps::open_events(&mut source)?)
        };
        Ok(Self {
            program: Program::Loaded(Box::new(ebpf)),
            maps,
            sessions: Some(sessions),
            events: Some(events),
            attached: Vec::new(),
            portal: false,
            portal_links: Vec::new(),
            pins: pins.cloned(),
            replacing: Vec::new(),
        })
    }

    /// The datapath pinned under `pin_dir`: adopted if this layout's pins are there
    /// and sized for `limits`, else loaded and pinned. Pins of another layout or size
    /// are refused unless `replace`, in which case a new datapath is loaded beside
    /// them and takes over their attachments in `attach`.
    pub fn open(
        pin_dir: &Path,
        limits: &Limits,
        replace: bool,
    ) -> Result<(Self, Origin), DatapathError> {
        let pin_error = |source: std::io::Error| DatapathError::Pins {
            dir: pin_dir.to_path_buf(),
            source,
        };
        let pin_dir = &pins::ensure_bpffs(pin_dir).map_err(pin_error)?;
        let current = LayoutDir::current(pin_dir);
        let others = pins::other_layouts(pin_dir);
        if !replace && let Some(other) = others.first() {
            let dir = other.root.clone();
            return Err(if dir == LayoutDir::staging(pin_dir).root {
                DatapathError::UnfinishedReplace { dir }
            } else {
                DatapathError::OtherLayout { dir }
            });
        }
        let mut replacing = others;
        if current.exists() {
            match Self::adopt(&current, limits) {
                Ok(datapath) if replacing.is_empty() => return Ok((datapath, Origin::Adopted)),
                Ok(_) => replacing.push(current.clone()),
                Err(e) if !replace => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot adopt the pinned datapath; --replace swaps it for a new one");
                    replacing.push(current.clone());
                }
            }
        }
        let same_layout = replacing.iter().find(|d| d.root == current.root).cloned();
        let target = if same_layout.is_some() {
            LayoutDir::staging(pin_dir)
        } else {
            current
        };
        // An interrupted --replace left the staging directory: it is where the new
        // datapath goes, never one of the datapaths it replaces.
        replacing.retain(|d| d.root != target.root);
        target.remove().map_err(pin_error)?;
        let mut datapath = Self::from_object(load_object(limits)?, limits, Some(&target))?;
        datapath.replacing = replacing;
        // Pins of this layout (other [limits]) hold flows this build can read: carry
        // them over, so tracked UDP flows survive the swap.
        if let Some(old) = same_layout {
            match datapath.copy_flows(&old) {
                Ok(n) => tracing::info!(
                    flows = n,
                    "copied the tracked UDP flows of the replaced datapath"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot copy the replaced datapath's tracked UDP flows; they start over")
                }
            }
        }
        let origin = if datapath.replacing.is_empty() {
            Origin::Loaded
        } else {
            Origin::Replacing(datapath.replacing.iter().map(|d| d.root.clone()).collect())
        };
        Ok((datapath, origin))
    }

    fn adopt(dir: &LayoutDir, limits: &Limits) -> Result<Self, DatapathError> {
        let incomplete = |what: String| DatapathError::Incomplete {
            dir: dir.root.clone(),
            what,
        };
        // The sized maps are opened first, to check their sizes, then handed on.
        let mut opened = std::collections::HashMap::new();
        for (name, wanted) in map_sizes(limits) {
            let data = open_pinned(dir, name)?;
            let pinned = data
                .info()
                .map_err(|e| incomplete(format!("map {name}: {e}")))?
                .max_entries();
            if pinned != wanted {
                return Err(DatapathError::Resized {
                    dir: dir.root.clone(),
                    map: name,
                    pinned,
                    wanted,
                });
            }
            opened.insert(name, data);
        }
        let mut source = |name: &'static str| {
            let data = match opened.remove(name) {
                Some(data) => data,
                None => open_pinned(dir, name)?,
            };
            Map::from_map_data(data).map_err(|e| incomplete(format!("map {name}: {e}")))
        };
        let maps = Maps::open(&mut source, limits)?;
        let sessions = SessionMaps::open(&mut source, limits, maps.generation() == 0)?;
        let events = Maps::open_events(&mut source)?;
        let program = Xdp::from_pin(dir.program(), XdpAttachType::Interface)
            .map_err(|e| incomplete(format!("program: {e}")))?;
        let portal = SchedClassifier::from_pin(dir.portal_program())
            .map_err(|e| incomplete(format!("portal program: {e}")))?;
        let mut attached = Vec::new();
        let mut portal_links = Vec::new();
        for name in dir.linked_interfaces() {
            let Some((interface, kind)) = parse_link_name(&name) else {
                continue;
            };
            // An interface deleted (or recreated) since leaves a link attached to
            // nothing: drop it, so that `attach` attaches to the interface anew.
            // A link whose state cannot be read is kept: dropping a live one would
            // open a gap.
            let live = sys::link_ifindex(&dir.link(&name)).map_or(true, |index| {
                index != 0 && index == interface_index(&interface)
            });
            if !live {
                tracing::warn!(
                    interface,
                    "the pinned attachment no longer holds (the interface was removed or recreated); it is attached again"
                );
                let _ = std::fs::remove_file(dir.link(&name));
                continue;
            }
            match kind {
                LinkKind::Xdp(mode) => attached.push((interface, mode)),
                LinkKind::Portal => portal_links.push(interface),
            }
        }
        Ok(Self {
            program: Program::Pinned {
                xdp: Box::new(program),
                portal: Box::new(portal),
            },
            maps,
            sessions: Some(sessions),
            events: Some(events),
            attached,
            portal: false,
            portal_links,
            pins: Some(dir.clone()),
            replacing: Vec::new(),
        })
    }

    /// Copies the tracked UDP flows of pinned datapath `old` (same layout) into ours.
    fn copy_flows(&mut self, old: &LayoutDir) -> Result<usize, DatapathError> {
        fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(
            old: &LayoutDir,
            name: &'static str,
        ) -> Result<T, DatapathError> {
            Map::from_map_data(open_pinned(old, name)?)
                .and_then(T::try_from)
                .map_err(|source| DatapathError::Map { map: name, source })
        }
        let v4 = open(old, names::FLOWS_V4)?;
        let v6 = open(old, names::FLOWS_V6)?;
        self.maps.copy_flows_from(&v4, &v6)
    }

    /// Ends a `--replace`: removes the replaced pins (attachments they still hold on
    /// interfaces this datapath did not take over go with them) and moves this
    /// datapath's pins to the layout's directory.
    pub fn finish_replace(&mut self, pin_dir: &Path) -> Result<(), DatapathError> {
        let pin_dir = &pins::locate(pin_dir);
        let pin_error = |source: std::io::Error| DatapathError::Pins {
            dir: pin_dir.to_path_buf(),
            source,
        };
        for old in std::mem::take(&mut self.replacing) {
            old.remove().map_err(pin_error)?;
            tracing::info!(dir = %old.root.display(), "removed the replaced datapath");
        }
        let current = LayoutDir::current(pin_dir);
        if let Some(dir) = &self.pins
            && dir.root != current.root
        {
            std::fs::rename(&dir.root, &current.root).map_err(pin_error)?;
            self.pins = Some(current);
        }
        Ok(())
    }

    /// Undoes a start that failed before it was done: a datapath loaded by this start
    /// (`Origin::Loaded`, or the new one of `--replace`) has its pins removed, which
    /// ends its attachments; an adopted one is left as it was found, enforcing.
    pub fn abandon(self, origin: &Origin) {
        if matches!(origin, Origin::Adopted) {
            return;
        }
        if let Some(dir) = &self.pins
            && let Err(e) = dir.remove()
        {
            tracing::error!(dir = %dir.root.display(), error = %e, "cannot remove the pins of the failed start");
        }
    }
}

/// Removes every pinned datapath under `pin_dir`: their attachments end with their
/// link pins. Returns the directories removed.
pub fn remove_pins(pin_dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let pin_dir = &pins::locate(pin_dir);
    let pin_error = |source: std::io::Error| DatapathError::Pins {
        dir: pin_dir.to_path_buf(),
        source,
    };
    let mut removed = Vec::new();
    let mut dirs = pins::other_layouts(pin_dir);
    dirs.push(LayoutDir::current(pin_dir));
    for dir in dirs {
        if dir.root.exists() {
            dir.remove().map_err(pin_error)?;
            removed.push(dir.root);
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Something else lives there too: leave the directory.
        Err(_) => {}
    }
    Ok(removed)
}
