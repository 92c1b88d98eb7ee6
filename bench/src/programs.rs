//! The benchmark's own XDP programs (`bench/ebpf`): the do-nothing floor and the
//! packet generator.

use anyhow::{Context as _, ensure};
use aya::{
    Ebpf, Pod,
    maps::{Array, MapData},
    programs::{
        Xdp,
        xdp::{XdpLinkId, XdpMode},
    },
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench"));

/// Mirrors `GenConfig` in `bench/ebpf/src/main.rs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GenConfig {
    pub src_base: u32,
    pub src_count: u32,
    pub sport_base: u16,
    pub sport_count: u16,
    pub _pad: u32,
}

// SAFETY: `#[repr(C)]` integers with no padding (4 + 4 + 2 + 2 + 4 bytes).
unsafe impl Pod for GenConfig {}

/// The benchmark's programs for the refusal path's parts, and what each is.
const REFUSAL_PARTS: [(&str, &str); 3] = [
    (
        "part_counter",
        "the policy's refusal counter (a per-CPU array increment), on every refusal",
    ),
    (
        "part_limiter",
        "the event limiter finding the pair's event sent within the second, with its rate-limited counter, on every refusal",
    ),
    (
        "part_ring",
        "a refusal event's ring buffer reservation (given back), at most once per device and policy per second",
    ),
];

pub struct BenchPrograms {
    ebpf: Ebpf,
    config: Array<MapData, GenConfig>,
    /// The floor program's attachment, if attached.
    floor_link: Option<XdpLinkId>,
}

impl BenchPrograms {
    pub fn load() -> anyhow::Result<Self> {
        ensure!(
            !OBJECT.is_empty(),
            "the benchmark was built without its XDP programs (AYA_BUILD_SKIP)"
        );
        let mut ebpf = Ebpf::load(OBJECT).context("loading the benchmark's programs")?;
        let parts = REFUSAL_PARTS.iter().map(|(name, _)| *name);
        for name in ["xdp_pass", "xdp_generate"].into_iter().chain(parts) {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            program.load()?;
        }
        let config = Array::try_from(ebpf.take_map("GEN_CONFIG").context("GEN_CONFIG")?)?;
        Ok(Self {
            ebpf,
            config,
            floor_link: None,
        })
    }

    fn program(&self, name: &str) -> &Xdp {
        self.ebpf
            .program(name)
            .expect("loaded above")
            .try_into()
            .expect("an XDP program")
    }

    /// The parts of sessiongate's refusal path, each alone as its own program: the
    /// program, what it is, and when sessiongate runs it.
    pub fn refusal_parts(&self) -> Vec<(&Xdp, &'static str)> {
        REFUSAL_PARTS
            .iter()
            .map(|(name, what)| (self.program(name), *what))
            .collect()
    }

    /// The do-nothing program: the floor of BPF_PROG_TEST_RUN measurements.
    pub fn floor(&self) -> &Xdp {
        self.program("xdp_pass")
    }

    /// Attaches the do-nothing program to `interface` (in the calling thread's network
    /// namespace).
    pub fn attach_floor(&mut self, interface: &str, mode: XdpMode) -> anyhow::Result<()> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut("xdp_pass")
            .expect("loaded")
            .try_into()?;
        self.floor_link = Some(program.attach(interface, mode)?);
        Ok(())
    }

    pub fn detach_floor(&mut self) -> anyhow::Result<()> {
        if let Some(link) = self.floor_link.take() {
            let program: &mut Xdp = self
                .ebpf
                .program_mut("xdp_pass")
                .expect("loaded")
                .try_into()?;
            program.detach(link)?;
        }
        Ok(())
    }

    /// The generator, configured for the next run.
    pub fn generator(&mut self, config: GenConfig) -> anyhow::Result<&Xdp> {
        self.config.set(0, config, 0)?;
        Ok(self.program("xdp_generate"))
    }
}
