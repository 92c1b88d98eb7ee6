//! Builds the XDP program (`agent-ebpf`) for `bpfel-unknown-none` and leaves it in
//! `OUT_DIR/sessiongate`, where `datapath::loader` embeds it.
//!
//! Needs the nightly toolchain with rust-src and bpf-linker; `cargo xtask setup`
//! installs them, bpf-linker into `.tools/bin`, which is put on PATH here. With
//! `AYA_BUILD_SKIP=1` (fast `cargo check`/clippy) an empty object is written instead and
//! the agent reports at run time that it was built without its program.

use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .expect("agent/ is inside the workspace");
    let tools = workspace.join(".tools/bin");
    println!(
        "cargo:rerun-if-changed={}",
        tools.join("bpf-linker").display()
    );
    if tools.is_dir() {
        let path = env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![tools];
        dirs.extend(env::split_paths(&path));
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("PATH", env::join_paths(dirs)?) };
    }

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out = PathBuf::from(env::var("OUT_DIR")?).join("sessiongate");
        fs::write(out, [])?;
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }

    let root_dir = workspace.join("agent-ebpf");
    let ebpf = aya_build::Package {
        name: "agent-ebpf",
        root_dir: root_dir.to_str().expect("UTF-8 path"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
