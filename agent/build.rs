//! Builds the XDP program (`agent-ebpf`) for `bpfel-unknown-none` and leaves it in
//! `OUT_DIR/sessiongate`, where `datapath` embeds it.

include!("../build-support/ebpf.rs");

fn main() -> anyhow::Result<()> {
    build_ebpf("agent-ebpf", "agent-ebpf", "sessiongate")
}
