//! The reference XDP filter: xdp-filter from Debian's xdp-tools, loaded with all its
//! features (TCP, UDP, IPv4, IPv6 and Ethernet matching) and a few entries, on a veth
//! in a namespace of its own, then run on the same packets as sessiongate.

use std::process::Command;

use anyhow::Context as _;
use aya::programs::Xdp;
use aya_obj::programs::XdpAttachType;

use crate::cmd::output;

/// xdp-filter loaded on a throwaway interface; removed on drop.
pub struct XdpFilter {
    namespace: String,
    program: Xdp,
}

impl XdpFilter {
    pub fn load() -> anyhow::Result<Self> {
        let namespace = format!("sgb-{}-xdpfilter", std::process::id());
        output(Command::new("ip").args(["netns", "add", &namespace]))?;
        let filter = Self::setup(&namespace);
        if filter.is_err() {
            let _ = Command::new("ip")
                .args(["netns", "del", &namespace])
                .status();
        }
        filter
    }

    fn setup(namespace: &str) -> anyhow::Result<Self> {
        let ip = |args: &str| {
            let mut all = vec!["-n", namespace];
            all.extend(args.split_whitespace());
            output(Command::new("ip").args(all))
        };
        ip("link add xf0 type veth peer name xf1")?;
        ip("link set xf0 up")?;
        ip("link set xf1 up")?;
        // xdp-filter keeps its maps in bpffs; `ip netns exec` gives it a fresh /sys.
        let script = "mount -t bpf bpf /sys/fs/bpf && \
            xdp-filter load --mode skb --features all xf0 && \
            xdp-filter port 22 && xdp-filter port 3389 && \
            xdp-filter ip 198.18.99.1 && xdp-filter ip 2001:db8:99::1 && \
            xdp-filter ether 02:00:00:00:99:01";
        output(Command::new("ip").args(["netns", "exec", namespace, "sh", "-c", script]))
            .context("loading xdp-filter (Debian package xdp-tools)")?;
        let links: serde_json::Value =
            serde_json::from_str(&ip("-j -d link show xf0")?).context("ip -j link")?;
        let id = links[0]["xdp"]["prog"]["id"]
            .as_u64()
            .context("xdp-filter attached no program")?;
        let pin = format!("/sys/fs/bpf/sgb-{}-xdpfilter", std::process::id());
        output(Command::new("bpftool").args(["prog", "pin", "id", &id.to_string(), &pin]))?;
        let program = Xdp::from_pin(&pin, XdpAttachType::Interface);
        let _ = std::fs::remove_file(&pin);
        Ok(Self {
            namespace: namespace.to_string(),
            program: program.context("opening the pinned xdp-filter program")?,
        })
    }

    pub fn program(&self) -> &Xdp {
        &self.program
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth, which detaches the program.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .status();
    }
}
