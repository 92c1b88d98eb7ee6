//! The kernel side as the agent sees it: loading (or adopting from pins) the XDP
//! program with the configured map sizes (`load`), attaching it to interfaces
//! (`attach`), and the typed maps: the configuration sets, counters and flows
//! (`maps`), and the session maps (`sessions`), which have an owner of their own.

mod attach;
mod identities;
mod load;
mod maps;
pub mod pins;
mod sessions;
mod sys;

use std::path::{Path, PathBuf};

use agent_common::{
    hashing::buckets_for,
    maps::{LAYOUT, Settings, WAYS},
};
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
    programs::{ProgramError, SchedClassifier, Xdp},
};
use thiserror::Error;

use crate::config::Limits;
pub use attach::{attach_mode, interface_exists, is_veth};
pub use identities::{Identities, SetConditions};
pub use load::remove_pins;
pub use maps::{Counters, Maps, next_generation};
use pins::LayoutDir;
pub use sessions::SessionMaps;

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
    #[error("all {limit} identity slots are taken; raise [limits] max_sessions")]
    IdentitySlotsFull { limit: u32 },
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
    /// The session maps, until their owner takes them (`take_sessions`).
    sessions: Option<SessionMaps>,
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

impl Datapath {
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

    /// Where the datapath is pinned, if it is.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|d| d.root.as_path())
    }

    /// Interfaces the program is attached to, and how.
    pub fn attached(&self) -> &[(String, AttachedMode)] {
        &self.attached
    }

    /// The session maps, for their one owner (the agent's session mirror, or a test);
    /// `None` once taken.
    pub fn take_sessions(&mut self) -> Option<SessionMaps> {
        self.sessions.take()
    }

    /// The refusal-event ring buffer; `None` once taken.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }
}
