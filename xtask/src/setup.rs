//! `cargo xtask setup`: what building and testing need, installed idempotently.
//! - the nightly toolchain's rust-src and clippy (the eBPF program builds with
//!   `-Z build-std=core` for `bpfel-unknown-none`);
//! - bpf-linker, built against the nightly toolchain's own libLLVM (there is no
//!   Debian package of the LLVM version rustc uses) into `.tools/`, and cargo-fuzz
//!   (`cargo xtask fuzz`) beside it;
//! - the Debian packages the build, the tests, the demo and the benchmark use, each
//!   judged present by the files the project reads from it, not by a command on PATH;
//! - the sign-in tests' npm packages (a real OpenID provider, and playwright-core to
//!   drive Debian's Chromium), from `tests/oidc/package-lock.json` with `npm ci`.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// `cargo xtask fuzz` (and the short fuzz runs of `cargo xtask test`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// A Debian package and the files of it that the build, the tests, the demo or the
/// benchmark read. The package counts as present only when every one of them is
/// there: a `protoc` without its well-known includes fails the build as surely as no
/// `protoc` at all, and an `xdp-filter` without its BPF objects loads nothing.
struct Package {
    name: &'static str,
    files: Vec<String>,
}

/// Everything the project uses from Debian, with the files it reads.
fn packages() -> Vec<Package> {
    // xdp-filter loads its programs (and libxdp its dispatcher) from the multiarch
    // BPF object directory, which belongs to libxdp1, not to xdp-tools.
    let bpf_objects = format!("/usr/lib/{}-linux-gnu/bpf", std::env::consts::ARCH);
    let package = |name, files: &[&str]| Package {
        name,
        files: files.iter().map(|f| f.to_string()).collect(),
    };
    vec![
        // The linker rustc calls, and the C runtime it links in.
        package("gcc", &["/usr/bin/gcc"]),
        package(
            "libc6-dev",
            &[&format!(
                "/usr/lib/{}-linux-gnu/Scrt1.o",
                std::env::consts::ARCH
            )],
        ),
        // Namespaces, veth, addresses, routing rules: the tests, the demo, the agent.
        package("iproute2", &["/bin/ip"]),
        // bpffs mounts of the tests' labs.
        package("mount", &["/bin/mount", "/bin/umount"]),
        // The labs turn on forwarding.
        package("procps", &["/sbin/sysctl"]),
        // HTTP checks of the portal and of etcd in the tests.
        package("curl", &["/usr/bin/curl"]),
        // The benchmark's nftables reference.
        package("nftables", &["/usr/sbin/nft"]),
        // The benchmark's xdp-filter reference: the tool, its programs, the dispatcher.
        package("xdp-tools", &["/usr/sbin/xdp-filter"]),
        Package {
            name: "libxdp1",
            files: ["xdpfilt_alw_all.o", "xdpfilt_dny_all.o", "xdp-dispatcher.o"]
                .iter()
                .map(|o| format!("{bpf_objects}/{o}"))
                .collect(),
        },
        // Pins a loaded program by id (the benchmark, the tests).
        package("bpftool", &["/usr/sbin/bpftool"]),
        // Real etcd members and etcdctl for the fleet tests, the demo and the bench.
        package("etcd-server", &["/usr/bin/etcd"]),
        package("etcd-client", &["/usr/bin/etcdctl"]),
        // The etcd-client crate compiles etcd's protobuf definitions at build time; they
        // import these two well-known types, which Debian ships apart from protoc
        // (libprotobuf-dev is only a Recommends of protobuf-compiler).
        package("protobuf-compiler", &["/usr/bin/protoc"]),
        // libfuzzer-sys compiles libFuzzer's C++ sources for the fuzz targets.
        package("g++", &["/usr/bin/g++"]),
        // The sign-in tests: Node.js runs the OpenID provider and drives the browser.
        package("nodejs", &["/usr/bin/node", "/usr/bin/npm"]),
        package("chromium", &["/usr/bin/chromium"]),
        package(
            "libprotobuf-dev",
            &[
                "/usr/include/google/protobuf/descriptor.proto",
                "/usr/include/google/protobuf/struct.proto",
            ],
        ),
    ]
}

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
    debian_packages(verbose)?;
    bpf_linker(verbose)?;
    cargo_fuzz(verbose)?;
    npm_packages(verbose)?;
    Ok(())
}

/// `tests/oidc/node_modules` as its lock file says: `npm ls` finds every package at
/// its locked version, or `npm ci` installs them again.
fn npm_packages(verbose: bool) -> anyhow::Result<()> {
    let dir = workspace().join("tests/oidc");
    let complete = Command::new("npm")
        .args(["ls", "--all", "--silent"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if complete {
        if verbose {
            println!("setup: npm packages of tests/oidc present");
        }
        return Ok(());
    }
    println!("setup: installing the npm packages of tests/oidc (npm ci)");
    crate::run({
        let mut c = Command::new("npm");
        c.args(["ci", "--no-audit", "--no-fund"]).current_dir(&dir);
        c
    })
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
    // rust-src is what `-Z build-std=core` reads: judged by its files, since a listed
    // component whose sources are gone fails the eBPF build all the same.
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let core_src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core/src/lib.rs");
    for component in ["rust-src", "clippy", "rustfmt"] {
        let listed = installed.lines().any(|l| l.starts_with(component));
        if listed && (component != "rust-src" || core_src.is_file()) {
            if verbose {
                println!("setup: nightly {component}: present");
            }
            continue;
        }
        println!("setup: adding {component} to the nightly toolchain");
        if listed {
            // Listed but incomplete: rustup only re-adds what it does not list.
            crate::run({
                let mut c = Command::new("rustup");
                c.args(["component", "remove", component, "--toolchain", "nightly"]);
                c
            })?;
        }
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

/// Whether `.tools/bin/{name}` runs and reports `version` (a tool that exists but does
/// not run, say after its libLLVM went away, is missing).
fn tool_present(name: &str, version: &str, verbose: bool) -> bool {
    let works = Command::new(tools().join("bin").join(name))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(version));
    if works && verbose {
        println!("setup: {name} {version}: present in .tools/bin");
    }
    works
}

fn bpf_linker(verbose: bool) -> anyhow::Result<()> {
    if tool_present("bpf-linker", BPF_LINKER_VERSION, verbose) {
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

/// The files of `package` that are not on this machine.
fn missing_files(package: &Package) -> Vec<&str> {
    package
        .files
        .iter()
        .filter(|f| !Path::new(f).is_file())
        .map(String::as_str)
        .collect()
}

/// Whether dpkg has `package` installed (its files may still have been removed).
fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).ends_with(" installed"))
}

/// cargo-fuzz, into `.tools/bin`: it builds the fuzz targets with libFuzzer (whose C++
/// sources libfuzzer-sys compiles with g++) on the nightly toolchain.
fn cargo_fuzz(verbose: bool) -> anyhow::Result<()> {
    if tool_present("cargo-fuzz", CARGO_FUZZ_VERSION, verbose) {
        return Ok(());
    }
    println!("setup: building cargo-fuzz {CARGO_FUZZ_VERSION} into .tools (about a minute)");
    let mut install = Command::new("cargo");
    install
        .args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION])
        .args(["--locked", "--force", "--root"])
        .arg(tools());
    crate::run(install)
}

fn debian_packages(verbose: bool) -> anyhow::Result<()> {
    let packages = packages();
    let incomplete: Vec<&Package> = packages
        .iter()
        .filter(|p| !missing_files(p).is_empty())
        .collect();
    if incomplete.is_empty() {
        if verbose {
            let names: Vec<&str> = packages.iter().map(|p| p.name).collect();
            println!("setup: Debian packages: {} present", names.join(", "));
        }
        return Ok(());
    }
    // A package dpkg calls installed but whose files are gone is reinstalled; the
    // others are installed.
    let (broken, absent): (Vec<&str>, Vec<&str>) = incomplete
        .iter()
        .map(|p| p.name)
        .partition(|name| dpkg_installed(name));
    println!(
        "setup: installing Debian packages: {}",
        absent
            .iter()
            .chain(&broken)
            .copied()
            .collect::<Vec<_>>()
            .join(" ")
    );
    crate::run({
        let mut c = Command::new("apt-get");
        c.arg("update").arg("-qq");
        c
    })?;
    for (names, reinstall) in [(&absent, false), (&broken, true)] {
        if names.is_empty() {
            continue;
        }
        crate::run({
            let mut c = Command::new("apt-get");
            c.args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(reinstall.then_some("--reinstall"))
                .args(names.iter())
                .env("DEBIAN_FRONTEND", "noninteractive");
            c
        })?;
    }
    let still: Vec<String> = packages
        .iter()
        .flat_map(|p| {
            missing_files(p)
                .into_iter()
                .map(|f| format!("{f} ({})", p.name))
        })
        .collect();
    if !still.is_empty() {
        bail!(
            "after installing, these files are still missing: {}",
            still.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files setup checks are the files those packages ship: a path that no
    /// package owns would send setup into a reinstall it cannot satisfy.
    #[test]
    fn every_checked_file_is_shipped_by_its_package() {
        for package in packages() {
            if !dpkg_installed(package.name) {
                eprintln!("skipping {}: not installed here", package.name);
                continue;
            }
            let shipped = output(Command::new("dpkg").args(["-L", package.name]))
                .unwrap_or_else(|e| panic!("{e:#}"));
            for file in &package.files {
                assert!(
                    shipped.lines().any(|l| l == file),
                    "{} does not ship {file}",
                    package.name
                );
            }
        }
    }
}
