//! `cargo xtask setup`: what building and testing need, installed idempotently.
//! - the nightly toolchain's rust-src and clippy (the eBPF program builds with
//!   `-Z build-std=core` for `bpfel-unknown-none`);
//! - bpf-linker, built against the nightly toolchain's own libLLVM (there is no
//!   Debian package of the LLVM version rustc uses) into `.tools/`;
//! - the Debian packages the tests and the demo run.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// (program, Debian package providing it) needed by the build (protoc), the tests
/// (etcd among them), the demo and the benchmark's references.
const PROGRAMS: [(&str, &str); 9] = [
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    ("curl", "curl"),
    ("nft", "nftables"),
    ("xdp-filter", "xdp-tools"),
    ("bpftool", "bpftool"),
    ("etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
    // The etcd-client crate compiles etcd's protobuf definitions at build time.
    ("protoc", "protobuf-compiler"),
];

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ is inside the workspace")
        .to_path_buf()
}

fn tools() -> PathBuf {
    workspace().join(".tools")
}

/// PATH with `.tools/bin` first.
pub fn path_with_tools() -> OsString {
    let mut dirs = vec![tools().join("bin")];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(dirs).expect("valid PATH")
}

/// Installs whatever is missing. `verbose` also reports what was already there.
pub fn setup(verbose: bool) -> anyhow::Result<()> {
    nightly_components(verbose)?;
    bpf_linker(verbose)?;
    debian_packages(verbose)?;
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_components(verbose: bool) -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: installing the nightly toolchain (the eBPF program needs -Z build-std)");
        crate::run({
            let mut c = Command::new("rustup");
            c.args(["toolchain", "install", "nightly", "--profile", "minimal"]);
            c
        })?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    for component in ["rust-src", "clippy", "rustfmt"] {
        if installed.lines().any(|l| l.starts_with(component)) {
            if verbose {
                println!("setup: nightly {component}: present");
            }
            continue;
        }
        println!("setup: adding {component} to the nightly toolchain");
        crate::run({
            let mut c = Command::new("rustup");
            c.args(["component", "add", component, "--toolchain", "nightly"]);
            c
        })?;
    }
    Ok(())
}

/// The LLVM major version of the nightly rustc, which bpf-linker must share.
fn nightly_llvm_major() -> anyhow::Result<String> {
    let verbose = output(Command::new("rustc").args(["+nightly", "--version", "--verbose"]))?;
    let version = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly does not report its LLVM version")?;
    Ok(version.split('.').next().unwrap_or(version).to_string())
}

fn bpf_linker(verbose: bool) -> anyhow::Result<()> {
    let linker = tools().join("bin/bpf-linker");
    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        });
    if works {
        if verbose {
            println!("setup: bpf-linker {BPF_LINKER_VERSION}: present in .tools/bin");
        }
        return Ok(());
    }
    let major = nightly_llvm_major()?;
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's LLVM {major} (about a minute)"
    );
    // bpf-linker links libLLVM; the nightly toolchain ships one. A prefix with two
    // links to it is all llvm-sys needs.
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let so = fs::read_dir(&lib)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so") || name.starts_with("libLLVM-"))
        .with_context(|| format!("no libLLVM in {}", lib.display()))?;
    let prefix = tools().join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", so.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&so), &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    let mut install = Command::new("cargo");
    install
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .args(["--locked", "--force", "--root"])
        .arg(tools())
        .env("LLVM_PREFIX", &prefix)
        .current_dir(tools());
    crate::run(install)
}

fn debian_packages(verbose: bool) -> anyhow::Result<()> {
    let missing: Vec<&str> = PROGRAMS
        .iter()
        .filter(|(program, _)| which(program).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        if verbose {
            println!(
                "setup: Debian packages: {} present",
                PROGRAMS.map(|p| p.1).join(", ")
            );
        }
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    crate::run({
        let mut c = Command::new("apt-get");
        c.arg("update").arg("-qq");
        c
    })?;
    crate::run({
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    })
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
