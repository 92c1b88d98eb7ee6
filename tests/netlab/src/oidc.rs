//! A real OpenID provider and a real browser for the sign-in tests: the `oidc-provider`
//! package on Node.js (`tests/oidc/provider.mjs`), in a namespace of the test's own, and
//! Debian's Chromium driven by `playwright-core` (`tests/oidc/browse.mjs`) as a device.
//! Both are installed by `cargo xtask setup` (`npm ci` in `tests/oidc`).

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

use crate::Netns;

/// How long the provider may take to start: node took over 20 s once while the whole
/// test suite ran beside it.
const READY_WAIT: Duration = Duration::from_secs(60);

/// `tests/oidc`: the scripts and their node_modules.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("netlab is inside tests/")
        .join("oidc")
}

/// The client a provider knows, and where it sends users back.
pub struct ProviderOptions<'a> {
    /// `HOST:PORT` to listen on, inside the namespace.
    pub listen: &'a str,
    pub issuer: &'a str,
    pub redirect_uri: &'a str,
    pub client_id: &'a str,
    pub client_secret: &'a str,
    /// (account, its groups)
    pub groups: &'a [(&'a str, &'a [&'a str])],
    /// HTTPS with this certificate and key (PEM files), instead of plain HTTP.
    pub tls: Option<(&'a Path, &'a Path)>,
}

/// A running provider, stopped on drop.
pub struct Provider {
    child: Child,
    pub issuer: String,
}

impl Provider {
    /// Starts the provider in `ns` and waits until it listens.
    pub fn start(ns: &Netns, options: &ProviderOptions<'_>) -> Self {
        let mut cmd = ns.command("node");
        cmd.current_dir(dir())
            .arg("provider.mjs")
            .args(["--listen", options.listen])
            .args(["--issuer", options.issuer])
            .args(["--redirect-uri", options.redirect_uri])
            .args(["--client-id", options.client_id])
            .args(["--client-secret", options.client_secret]);
        if let Some((cert, key)) = options.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        for (account, groups) in options.groups {
            cmd.args(["--groups", &format!("{account}={}", groups.join(","))]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node (installed by cargo xtask setup)");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "ready" {
                    let _ = tx.send(());
                }
            }
        });
        let provider = Self {
            child,
            issuer: options.issuer.to_string(),
        };
        rx.recv_timeout(READY_WAIT)
            .expect("the OpenID provider should start (is tests/oidc/node_modules installed? cargo xtask setup)");
        provider
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        // `ip netns exec` execs node itself: this is node's pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the browser saw, page by page (`browse.mjs`), and whether it got to the end.
pub struct Visit {
    pub pages: Vec<Value>,
    pub ok: bool,
    /// Where the screenshots are.
    pub shots: PathBuf,
}

impl Visit {
    /// The page of a step (`refused`, `login-form`, `signed-in`, `app`, ...).
    pub fn page(&self, step: &str) -> Option<&Value> {
        self.pages.iter().find(|p| p["step"] == step)
    }

    /// Every page, for an assertion's message.
    pub fn describe(&self) -> String {
        format!(
            "screenshots in {}:\n{}",
            self.shots.display(),
            self.pages
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

/// Opens `app` in a headless Chromium inside `ns` (as that namespace's first device
/// address), clicks the portal's "Sign in", and signs in at the provider as `login`.
/// Screenshots go under `target/signin-screens/{name}`.
/// The address the provider sent the browser back to is the `url` of step `callback`.
pub fn sign_in_with_browser(ns: &Netns, app: &str, login: &str, name: &str) -> Visit {
    browse(ns, app, [None, None], login, name)
}

/// Signs in as `sign_in_with_browser` does, then again in the same browser at `again`
/// (the portal's `/refresh-identity`): steps `again-login-form` (or
/// `again-no-login-form`, when the provider's single sign-on skipped it) and
/// `again-signed-in`.
pub fn sign_in_twice_with_browser(
    ns: &Netns,
    app: &str,
    again: &str,
    login: &str,
    name: &str,
) -> Visit {
    browse(ns, app, [None, Some(again)], login, name)
}

/// Signs in again at will, starting at `start` (the portal's `/refresh-identity`),
/// then opens `app`.
pub fn refresh_with_browser(ns: &Netns, start: &str, app: &str, login: &str, name: &str) -> Visit {
    browse(ns, app, [Some(start), None], login, name)
}

/// `browse.mjs`, with its optional `--start` and `--again` addresses.
fn browse(
    ns: &Netns,
    app: &str,
    [start, again]: [Option<&str>; 2],
    login: &str,
    name: &str,
) -> Visit {
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/signin-screens")
        .join(name);
    let _ = std::fs::remove_dir_all(&shots);
    let out = ns
        .command("node")
        .current_dir(dir())
        .arg("browse.mjs")
        .args(["--app", app, "--login", login])
        .args(start.map(|s| ["--start", s]).into_iter().flatten())
        .args(again.map(|s| ["--again", s]).into_iter().flatten())
        .arg("--shots")
        .arg(&shots)
        .stderr(Stdio::inherit())
        .output()
        .expect("node (installed by cargo xtask setup)");
    let pages = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Visit {
        pages,
        ok: out.status.success(),
        shots,
    }
}
