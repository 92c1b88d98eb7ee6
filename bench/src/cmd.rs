//! Running the system tools the benchmark drives (ip, nft, bpftool, xdp-filter).

use std::process::Command;

use anyhow::{Context as _, bail};

/// Runs a command that must succeed; returns its standard output.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
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
