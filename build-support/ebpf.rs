// Shared by the build scripts that compile an eBPF crate of this workspace (the
// agent's program and the benchmark's programs): `include!`d, since build scripts
// cannot share a library without one more crate.
//
// Needs the nightly toolchain with rust-src and bpf-linker; `cargo xtask setup`
// installs them, bpf-linker into `.tools/bin`, which is put on PATH here. With
// `AYA_BUILD_SKIP=1` (fast `cargo check`/clippy) an empty object is written instead,
// and loading it fails at run time with a clear error.

/// Builds the eBPF crate `package` (in `dir`, relative to the workspace) and leaves its
/// binary `bin` in `OUT_DIR`.
fn build_ebpf(package: &str, dir: &str, bin: &str) -> anyhow::Result<()> {
    use std::{env, fs, path::PathBuf};

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .ancestors()
        .find(|d| d.join(".cargo/config.toml").is_file())
        .expect("inside the workspace")
        .to_path_buf();
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

    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        fs::write(PathBuf::from(env::var("OUT_DIR")?).join(bin), [])?;
        return Ok(());
    }

    let root_dir = workspace.join(dir);
    let ebpf = aya_build::Package {
        name: package,
        root_dir: root_dir.to_str().expect("UTF-8 path"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
