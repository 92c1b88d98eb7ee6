//! The kernel side as the agent sees it: loading the XDP program with the configured
//! map sizes, attaching it to interfaces, and the typed maps (`maps`).

mod batch;
mod maps;

use agent_common::{
    hashing::buckets_for,
    maps::{Settings, WAYS, names},
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::{ProgramError, Xdp, xdp::XdpMode as AyaXdpMode},
};
use thiserror::Error;

use crate::config::{Limits, XdpMode};
pub use maps::{Counters, Maps, settings};

/// The program object, built by `build.rs`; empty when built with `AYA_BUILD_SKIP`.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sessiongate"));
/// The XDP entry point's name in the object.
const PROGRAM_NAME: &str = "sessiongate";
/// Entries of the destination caches and of the refusal-event rate limiter: both are
/// direct-mapped, so collisions only cost a slower lookup or an extra event.
const DEST_CACHE_ENTRIES: u32 = 1 << 16;
const EVENT_LIMIT_ENTRIES: u32 = 1 << 16;

/// Entry counts of the array-backed tables, from the configured limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub session_buckets: u32,
    pub flow_buckets: u32,
    pub dest_cache: u32,
    pub event_slots: u32,
}

impl Geometry {
    pub fn of(limits: &Limits) -> Self {
        Self {
            session_buckets: buckets_for(limits.max_sessions, WAYS as u32),
            flow_buckets: buckets_for(limits.max_flows, WAYS as u32),
            dest_cache: DEST_CACHE_ENTRIES,
            event_slots: EVENT_LIMIT_ENTRIES,
        }
    }

    /// Writes the index masks the program uses.
    pub fn apply(&self, settings: &mut Settings) {
        settings.session_bucket_mask = self.session_buckets - 1;
        settings.flow_bucket_mask = self.flow_buckets - 1;
        settings.dest_cache_mask = self.dest_cache - 1;
        settings.event_slot_mask = self.event_slots - 1;
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

/// The loaded program and its maps. Dropping it detaches the program everywhere.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
    events: Option<RingBuf<MapData>>,
    attached: Vec<(String, AttachedMode)>,
}

impl Datapath {
    /// Loads (and verifies) the program with map sizes from `limits`; nothing is
    /// attached yet.
    pub fn load(limits: &Limits) -> Result<Self, DatapathError> {
        if PROGRAM.is_empty() {
            return Err(DatapathError::NotBuilt);
        }
        let geometry = Geometry::of(limits);
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(names::SESSIONS_V4, limits.max_sessions)
            .map_max_entries(names::SESSIONS_V6, limits.max_sessions)
            .map_max_entries(names::SESSION_TABLE_V4, geometry.session_buckets)
            .map_max_entries(names::SESSION_TABLE_V6, geometry.session_buckets)
            .map_max_entries(names::FLOWS_V4, geometry.flow_buckets)
            .map_max_entries(names::FLOWS_V6, geometry.flow_buckets)
            .map_max_entries(names::DEST_V4, limits.max_policy_cidrs)
            .map_max_entries(names::DEST_V6, limits.max_policy_cidrs)
            .map_max_entries(names::DEST_CACHE_V4, geometry.dest_cache)
            .map_max_entries(names::DEST_CACHE_V6, geometry.dest_cache)
            .map_max_entries(names::PORT_RULES, limits.max_port_rules)
            .map_max_entries(names::EVENT_LIMIT, geometry.event_slots);
        let mut ebpf = loader
            .load(PROGRAM)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .expect("the object defines the program")
            .try_into()
            .map_err(DatapathError::Program)?;
        program.load().map_err(DatapathError::Program)?;
        let mut maps = Maps::take(&mut ebpf, limits)?;
        let events = maps.take_events(&mut ebpf)?;
        Ok(Self {
            ebpf,
            maps,
            events: Some(events),
            attached: Vec::new(),
        })
    }

    /// The loaded program, for `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM_NAME)
            .expect("the object defines the program")
            .try_into()
            .expect("it is an XDP program")
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .expect("the object defines the program")
            .try_into()
            .expect("it is an XDP program")
    }

    /// Attaches to `interface`. `Auto` tries native mode and falls back to generic,
    /// with a warning, when the driver has no XDP support.
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
        let attach = |dp: &mut Self, m: AttachedMode| {
            let aya_mode = match m {
                AttachedMode::Native => AyaXdpMode::Driver,
                AttachedMode::Generic => AyaXdpMode::Skb,
            };
            dp.program_mut()
                .attach(interface, aya_mode)
                .map(|_| m)
                .map_err(|source| DatapathError::Attach {
                    interface: interface.to_string(),
                    mode: m.name(),
                    source,
                })
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

    /// Interfaces the program is attached to, and how.
    pub fn attached(&self) -> &[(String, AttachedMode)] {
        &self.attached
    }

    /// The refusal-event ring buffer; `None` once taken.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }
}

pub fn interface_exists(name: &str) -> bool {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a NUL-terminated string.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) != 0 }
}
