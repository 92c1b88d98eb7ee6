//! Builds the benchmark's XDP programs (`bench/ebpf`: the do-nothing floor and the
//! packet generator) and leaves them in `OUT_DIR/bench`.

include!("../build-support/ebpf.rs");

fn main() -> anyhow::Result<()> {
    build_ebpf("bench-ebpf", "bench/ebpf", "bench")
}
