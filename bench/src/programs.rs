//! The benchmark's own XDP programs (`bench/ebpf`): the do-nothing floor, the
//! packet generator and its relay.

use anyhow::{Context as _, ensure};
use aya::{
    Ebpf, Pod,
    maps::{Array, DevMap, MapData},
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
    relay_to: DevMap<MapData>,
    /// The program attached with `attach`, and its attachment.
    attached: Option<(&'static str, XdpLinkId)>,
    /// The relay's attachment, if attached.
    relay_link: Option<XdpLinkId>,
}

impl BenchPrograms {
    pub fn load() -> anyhow::Result<Self> {
        ensure!(
            !OBJECT.is_empty(),
            "the benchmark was built without its XDP programs (AYA_BUILD_SKIP)"
        );
        let mut ebpf = Ebpf::load(OBJECT).context("loading the benchmark's programs")?;
        let parts = REFUSAL_PARTS.iter().map(|(name, _)| *name);
        for name in ["xdp_pass", "xdp_drop", "xdp_generate", "xdp_relay"]
            .into_iter()
            .chain(parts)
        {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            program.load()?;
        }
        let config = Array::try_from(ebpf.take_map("GEN_CONFIG").context("GEN_CONFIG")?)?;
        let relay_to = DevMap::try_from(ebpf.take_map("RELAY_TO").context("RELAY_TO")?)?;
        Ok(Self {
            ebpf,
            config,
            relay_to,
            attached: None,
            relay_link: None,
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

    /// Attaches `program` (`xdp_pass` or `xdp_drop`) to `interface` (in the calling
    /// thread's network namespace).
    pub fn attach(
        &mut self,
        program: &'static str,
        interface: &str,
        mode: XdpMode,
    ) -> anyhow::Result<()> {
        ensure!(self.attached.is_none(), "a program is attached already");
        self.attached = Some((program, self.attach_program(program, interface, mode)?));
        Ok(())
    }

    /// Detaches what `attach` attached.
    pub fn detach_attached(&mut self) -> anyhow::Result<()> {
        match self.attached.take() {
            Some((program, link)) => self.detach(program, Some(link)),
            None => Ok(()),
        }
    }

    /// Attaches the relay to `interface` (in the calling thread's network namespace):
    /// each frame it receives is rewritten as the generator's last configuration says
    /// (`generator`) and sent out of the interface `target`, as an XDP frame.
    pub fn attach_relay(&mut self, interface: &str, target: u32) -> anyhow::Result<()> {
        for index in 0..self.relay_to.len() {
            self.relay_to.set(index, target, None, 0)?;
        }
        self.relay_link = Some(self.attach_program("xdp_relay", interface, XdpMode::Driver)?);
        Ok(())
    }

    /// Frames the relay sends per frame it receives (`RELAY_TO`'s size).
    pub fn relay_fanout(&self) -> u32 {
        self.relay_to.len()
    }

    pub fn detach_relay(&mut self) -> anyhow::Result<()> {
        let link = self.relay_link.take();
        self.detach("xdp_relay", link)
    }

    fn attach_program(
        &mut self,
        name: &str,
        interface: &str,
        mode: XdpMode,
    ) -> anyhow::Result<XdpLinkId> {
        Ok(self.program_mut(name)?.attach(interface, mode)?)
    }

    fn detach(&mut self, name: &str, link: Option<XdpLinkId>) -> anyhow::Result<()> {
        if let Some(link) = link {
            self.program_mut(name)?.detach(link)?;
        }
        Ok(())
    }

    fn program_mut(&mut self, name: &str) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?)
    }

    /// The generator, configured for the next run (of it or of the relay).
    pub fn generator(&mut self, config: GenConfig) -> anyhow::Result<&Xdp> {
        self.config.set(0, config, 0)?;
        Ok(self.program("xdp_generate"))
    }
}
