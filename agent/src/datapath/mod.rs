//! The kernel side as the agent sees it: loading the XDP program with the configured
//! map sizes, attaching it to interfaces, and the typed maps (`maps`).

mod maps;
pub mod pins;
mod sys;

use std::path::{Path, PathBuf};

use agent_common::{
    hashing::buckets_for,
    maps::{LAYOUT, Settings, WAYS, names},
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, RingBuf},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, LinkError, PinnedLink},
        tc::TcAttachOptions,
        xdp::{XdpLink, XdpMode as AyaXdpMode},
    },
};
use aya_obj::programs::XdpAttachType;
use thiserror::Error;

use crate::config::{Limits, XdpMode};
pub use maps::{Counters, Maps, next_generation, settings};
use pins::LayoutDir;

/// The program object, built by `build.rs`; empty when built with `AYA_BUILD_SKIP`.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sessiongate"));
/// The XDP entry point's name in the object.
const PROGRAM_NAME: &str = "sessiongate";
/// The portal's TC program (`agent-ebpf/src/portal.rs`).
const PORTAL_PROGRAM_NAME: &str = "sessiongate_portal";
/// Entries of the destination caches and of the refusal-event rate limiter: both are
/// direct-mapped, so collisions only cost a slower lookup or an extra event.
const DEST_CACHE_ENTRIES: u32 = 1 << 16;
const EVENT_LIMIT_ENTRIES: u32 = 1 << 16;
/// Entries of the per-device reply limiter, direct-mapped like the event limiter.
const REPLY_LIMIT_ENTRIES: u32 = 1 << 16;

/// Entry counts of the array-backed tables, from the configured limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub session_buckets: u32,
    pub flow_buckets: u32,
    pub dest_cache: u32,
    pub event_slots: u32,
    pub reply_slots: u32,
}

impl Geometry {
    pub fn of(limits: &Limits) -> Self {
        Self {
            session_buckets: buckets_for(limits.max_sessions, WAYS as u32),
            flow_buckets: buckets_for(limits.max_flows, WAYS as u32),
            dest_cache: DEST_CACHE_ENTRIES,
            event_slots: EVENT_LIMIT_ENTRIES,
            reply_slots: REPLY_LIMIT_ENTRIES,
        }
    }

    /// Writes the index masks the program uses.
    pub fn apply(&self, settings: &mut Settings) {
        settings.session_bucket_mask = self.session_buckets - 1;
        settings.flow_bucket_mask = self.flow_buckets - 1;
        settings.dest_cache_mask = self.dest_cache - 1;
        settings.event_slot_mask = self.event_slots - 1;
        settings.reply_slot_mask = self.reply_slots - 1;
    }
}

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error(
        "this sessiongate was built without its XDP program (AYA_BUILD_SKIP); build it with `cargo xtask build`"
    )]
    NotBuilt,
    #[error("the kernel refused the XDP program or its maps: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the XDP program could not be prepared: {0}")]
    Program(#[source] ProgramError),
    #[error("interface {interface:?} does not exist")]
    NoInterface { interface: String },
    #[error("cannot attach to {interface:?} in {mode} mode: {source}")]
    Attach {
        interface: String,
        mode: &'static str,
        source: ProgramError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {map}: batched update failed: {source}")]
    Batch {
        map: &'static str,
        source: std::io::Error,
    },
    #[error("pin directory {dir}: {source}")]
    Pins {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{dir} holds a datapath this sessiongate cannot adopt (map layout {LAYOUT} expected); restart with --replace to swap it for this one in one step, or remove it with `sessiongate detach`"
    )]
    OtherLayout { dir: PathBuf },
    #[error(
        "{dir} was left by an interrupted --replace; run with --replace again to finish it, or remove everything with `sessiongate detach`"
    )]
    UnfinishedReplace { dir: PathBuf },
    #[error(
        "the datapath pinned in {dir} was sized for other [limits] ({map}: {pinned} entries, this config needs {wanted}); restart with --replace to swap in a datapath of the new size (sessions and tracked UDP flows are carried over)"
    )]
    Resized {
        dir: PathBuf,
        map: &'static str,
        pinned: u32,
        wanted: u32,
    },
    #[error(
        "the datapath pinned in {dir} is incomplete ({what}); restart with --replace, or remove it with `sessiongate detach`"
    )]
    Incomplete { dir: PathBuf, what: String },
    #[error("the {family} session map is full ({limit} devices); raise [limits] max_sessions")]
    SessionsFull { family: &'static str, limit: u32 },
}

/// How the program ended up attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl AttachedMode {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }
}

/// The programs: loaded from this build's object, or adopted from pins.
enum Program {
    Loaded(Box<Ebpf>),
    Pinned {
        xdp: Box<Xdp>,
        portal: Box<SchedClassifier>,
    },
}

/// How `Datapath::open` came by the datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Nothing was pinned: a new datapath, now pinned.
    Loaded,
    /// The pins of an earlier agent of this layout: maps, tracked flows and
    /// attachments carry on.
    Adopted,
    /// `--replace`: a new datapath that takes over the attachments of these pin
    /// directories when attached, which `finish_replace` then removes.
    Replacing(Vec<PathBuf>),
}

/// The program and its maps. A private datapath (`load`) detaches when dropped; a
/// pinned one (`open`) stays attached after the agent exits.
pub struct Datapath {
    program: Program,
    pub maps: Maps,
    events: Option<RingBuf<MapData>>,
    attached: Vec<(String, AttachedMode)>,
    /// Whether the portal's TC program goes wherever the XDP program does.
    portal: bool,
    /// Interfaces the portal's TC program is attached to.
    portal_links: Vec<String>,
    /// Where this datapath is pinned; `None` for a private one.
    pins: Option<LayoutDir>,
    /// Pin directories whose attachments `attach` takes over (`--replace`).
    replacing: Vec<LayoutDir>,
}

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
    ]
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

/// What a pinned link attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkKind {
    /// The XDP program, in this mode.
    Xdp(AttachedMode),
    /// The portal's TC program (ingress).
    Portal,
}

/// A pinned link's file name: the interface and what is attached there (the XDP mode,
/// or `portal`). A colon, because interface names never hold one and bpffs reserves
/// dots.
fn link_name(interface: &str, kind: LinkKind) -> String {
    match kind {
        LinkKind::Xdp(mode) => format!("{interface}:{}", mode.name()),
        LinkKind::Portal => format!("{interface}:portal"),
    }
}

/// Pins an attachment (XDP or TC link) of `interface` in `dir`, so that it outlives
/// the agent.
fn pin_link<L>(
    dir: &LayoutDir,
    interface: &str,
    kind: LinkKind,
    link: L,
) -> Result<(), DatapathError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let pin_error = |source: std::io::Error| DatapathError::Pins {
        dir: dir.root.clone(),
        source,
    };
    let link = FdLink::try_from(link).map_err(|e| pin_error(std::io::Error::other(e)))?;
    // Dropping the returned handle closes our fd; the pin keeps the attachment.
    link.pin(dir.link(&link_name(interface, kind)))
        .map_err(|e| pin_error(std::io::Error::other(e)))?;
    Ok(())
}

fn parse_link_name(name: &str) -> Option<(String, LinkKind)> {
    let (interface, kind) = name.rsplit_once(':')?;
    let kind = match kind {
        "native" => LinkKind::Xdp(AttachedMode::Native),
        "generic" => LinkKind::Xdp(AttachedMode::Generic),
        "portal" => LinkKind::Portal,
        _ => return None,
    };
    Some((interface.to_string(), kind))
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
        let (maps, events) = {
            let mut source = take_from(&mut ebpf);
            let maps = Maps::open(&mut source, limits)?;
            (maps, Maps::open_events(&mut source)?)
        };
        Ok(Self {
            program: Program::Loaded(Box::new(ebpf)),
            maps,
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

    /// The loaded program, for `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> &Xdp {
        match &self.program {
            Program::Loaded(ebpf) => ebpf
                .program(PROGRAM_NAME)
                .expect("the object defines the program")
                .try_into()
                .expect("it is an XDP program"),
            Program::Pinned { xdp, .. } => xdp,
        }
    }

    fn program_mut(&mut self) -> &mut Xdp {
        match &mut self.program {
            Program::Loaded(ebpf) => ebpf
                .program_mut(PROGRAM_NAME)
                .expect("the object defines the program")
                .try_into()
                .expect("it is an XDP program"),
            Program::Pinned { xdp, .. } => xdp,
        }
    }

    fn portal_program_mut(&mut self) -> &mut SchedClassifier {
        match &mut self.program {
            Program::Loaded(ebpf) => ebpf
                .program_mut(PORTAL_PROGRAM_NAME)
                .expect("the object defines the portal program")
                .try_into()
                .expect("it is a TC program"),
            Program::Pinned { portal, .. } => portal,
        }
    }

    /// Turns the portal on: its TC program is attached wherever the XDP program is,
    /// and will be. Call it before writing settings that name a portal, so that no
    /// handed-over connection ever finds an interface without it.
    pub fn enable_portal(&mut self) -> Result<(), DatapathError> {
        self.portal = true;
        let interfaces: Vec<String> = self.attached.iter().map(|(i, _)| i.clone()).collect();
        for interface in interfaces {
            self.attach_portal(&interface)?;
        }
        Ok(())
    }

    /// Turns the portal off: removes its TC attachments. Call it once settings without
    /// a portal are in force.
    pub fn disable_portal(&mut self) -> Result<(), DatapathError> {
        self.portal = false;
        if let Some(dir) = self.pins.clone() {
            for name in dir.linked_interfaces() {
                if let Some((interface, LinkKind::Portal)) = parse_link_name(&name) {
                    std::fs::remove_file(dir.link(&name)).map_err(|source| {
                        DatapathError::Pins {
                            dir: dir.root.clone(),
                            source,
                        }
                    })?;
                    tracing::info!(interface, "portal detached: no portal_listen in the config");
                }
            }
        }
        self.portal_links.clear();
        Ok(())
    }

    /// Attaches the portal's TC program (TCX ingress) to `interface`, pinned like the
    /// XDP link so that it outlives the agent: with the agent down it drops handed-over
    /// connections instead of letting them through.
    fn attach_portal(&mut self, interface: &str) -> Result<(), DatapathError> {
        if self.portal_links.iter().any(|i| i == interface) {
            return Ok(());
        }
        let attach_error = |source| DatapathError::Attach {
            interface: interface.to_string(),
            mode: "tc",
            source,
        };
        let program = self.portal_program_mut();
        let id = program
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_error)?;
        if let Some(dir) = self.pins.clone() {
            let link = self
                .portal_program_mut()
                .take_link(id)
                .map_err(attach_error)?;
            pin_link(&dir, interface, LinkKind::Portal, link)?;
        }
        self.portal_links.push(interface.to_string());
        Ok(())
    }

    /// Where the datapath is pinned, if it is.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|d| d.root.as_path())
    }

    /// Attaches to `interface`. `Auto` tries native mode and falls back to generic,
    /// with a warning, when the driver has no XDP support. A pinned datapath that is
    /// already attached there keeps that attachment; one replacing another swaps the
    /// program of the old attachment in one step (`bpf_link_update`).
    pub fn attach(
        &mut self,
        interface: &str,
        mode: XdpMode,
    ) -> Result<AttachedMode, DatapathError> {
        if !interface_exists(interface) {
            return Err(DatapathError::NoInterface {
                interface: interface.to_string(),
            });
        }
        if self.portal {
            self.attach_portal(interface)?;
        }
        if let Some((_, m)) = self.attached.iter().find(|(i, _)| i == interface) {
            return Ok(*m);
        }
        if let Some(m) = self.take_over(interface)? {
            self.attached.push((interface.to_string(), m));
            return Ok(m);
        }
        let attach = |dp: &mut Self, m: AttachedMode| {
            let aya_mode = match m {
                AttachedMode::Native => AyaXdpMode::Driver,
                AttachedMode::Generic => AyaXdpMode::Skb,
            };
            let attach_error = |source| DatapathError::Attach {
                interface: interface.to_string(),
                mode: m.name(),
                source,
            };
            let program = dp.program_mut();
            let id = program.attach(interface, aya_mode).map_err(attach_error)?;
            if let Some(dir) = dp.pins.clone() {
                let link = dp.program_mut().take_link(id).map_err(attach_error)?;
                pin_link(&dir, interface, LinkKind::Xdp(m), link)?;
            }
            Ok(m)
        };
        let attached = match mode {
            XdpMode::Native => attach(self, AttachedMode::Native)?,
            XdpMode::Generic => attach(self, AttachedMode::Generic)?,
            XdpMode::Auto => match attach(self, AttachedMode::Native) {
                Ok(m) => m,
                Err(native) => {
                    tracing::warn!(
                        interface,
                        error = %native,
                        "native XDP is not available; falling back to generic mode, which is slower"
                    );
                    attach(self, AttachedMode::Generic)?
                }
            },
        };
        self.attached.push((interface.to_string(), attached));
        Ok(attached)
    }

    /// Moves an attachment of a datapath being replaced to this program.
    fn take_over(&mut self, interface: &str) -> Result<Option<AttachedMode>, DatapathError> {
        let Some(dir) = self.pins.clone() else {
            return Ok(None);
        };
        let found = self.replacing.iter().find_map(|old| {
            old.linked_interfaces().into_iter().find_map(|name| {
                let (i, kind) = parse_link_name(&name)?;
                match kind {
                    LinkKind::Xdp(m) if i == interface => Some((old.link(&name), m)),
                    _ => None,
                }
            })
        });
        let Some((path, mode)) = found else {
            return Ok(None);
        };
        // A link whose interface was removed or recreated cannot take a new program:
        // drop it and attach anew.
        if sys::link_ifindex(&path).is_ok_and(|index| index != interface_index(interface)) {
            tracing::warn!(
                interface,
                "the replaced attachment no longer holds; attaching anew"
            );
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        let swap_error = |e: String| DatapathError::Attach {
            interface: interface.to_string(),
            mode: mode.name(),
            source: ProgramError::IOError(std::io::Error::other(e)),
        };
        let old = PinnedLink::from_pin(&path).map_err(|e| swap_error(e.to_string()))?;
        let link = XdpLink::try_from(FdLink::from(old)).map_err(|e| swap_error(e.to_string()))?;
        let id = self
            .program_mut()
            .attach_to_link(link)
            .map_err(|e| swap_error(e.to_string()))?;
        let link = self
            .program_mut()
            .take_link(id)
            .map_err(|e| swap_error(e.to_string()))?;
        pin_link(&dir, interface, LinkKind::Xdp(mode), link)?;
        tracing::info!(interface, "swapped the program of the existing attachment");
        Ok(Some(mode))
    }

    /// Detaches from interfaces not in `keep` (a pinned datapath adopted with a config
    /// that no longer lists them).
    pub fn detach_others(&mut self, keep: &[String]) -> Result<(), DatapathError> {
        let Some(dir) = self.pins.clone() else {
            return Ok(());
        };
        for name in dir.linked_interfaces() {
            let Some((interface, _)) = parse_link_name(&name) else {
                continue;
            };
            if !keep.contains(&interface) {
                std::fs::remove_file(dir.link(&name)).map_err(|source| DatapathError::Pins {
                    dir: dir.root.clone(),
                    source,
                })?;
                self.attached.retain(|(i, _)| *i != interface);
                self.portal_links.retain(|i| *i != interface);
                tracing::info!(interface, "detached: no longer in the config");
            }
        }
        Ok(())
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

    /// Interfaces the program is attached to, and how.
    pub fn attached(&self) -> &[(String, AttachedMode)] {
        &self.attached
    }

    /// The refusal-event ring buffer; `None` once taken.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
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

/// The mode to attach `interface` in: as configured, except that `auto` picks generic
/// on a veth when some policy answers refusals (`replies_on_veth`: reject or redirect
/// on a veth, `is_veth`), since in native mode a veth hands the program's replies
/// (XDP_TX) to its peer only if the peer runs XDP too, and `auto` must pick a mode in
/// which every configured action works.
pub fn attach_mode(configured: XdpMode, replies_on_veth: bool, interface: &str) -> XdpMode {
    let mode = choose_mode(configured, replies_on_veth);
    if mode != configured {
        tracing::info!(
            interface,
            "xdp_mode auto: generic mode on this veth, where the replies of reject and redirect policies need it"
        );
    }
    mode
}

const fn choose_mode(configured: XdpMode, replies_on_veth: bool) -> XdpMode {
    match configured {
        XdpMode::Auto if replies_on_veth => XdpMode::Generic,
        other => other,
    }
}

/// Whether `interface` is a veth (by `ip -d link`): frames the program sends back on
/// one (XDP_TX) in native mode reach its peer only when the peer runs XDP as well.
pub fn is_veth(interface: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-d", "-j", "link", "show", "dev", interface])
        .output()
        .ok()
        .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
        .is_some_and(|links| links[0]["linkinfo"]["info_kind"] == "veth")
}

pub fn interface_exists(name: &str) -> bool {
    interface_index(name) != 0
}

/// The interface's index; 0 if there is none of that name.
fn interface_index(name: &str) -> u32 {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: a NUL-terminated string.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_generic_on_a_veth_only_when_policies_answer_refusals() {
        assert_eq!(choose_mode(XdpMode::Auto, true), XdpMode::Generic);
        assert_eq!(choose_mode(XdpMode::Auto, false), XdpMode::Auto);
        // An explicit mode is the operator's: native stays native (with a warning).
        assert_eq!(choose_mode(XdpMode::Native, true), XdpMode::Native);
        assert_eq!(choose_mode(XdpMode::Generic, false), XdpMode::Generic);
    }
}
