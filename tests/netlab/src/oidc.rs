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

/// How long one start of the provider may take. It is ready in 0.3-0.6 s alone; twice
/// in fresh-clone CI runs a node never got from its imports to `new Provider` (no
/// further warning, no "ready", for 20 s and then 60 s) while its sibling providers
/// started at once. Such a start is reported with what its threads were doing, and
/// the provider is started again, up to `STARTS` times.
const READY_WAIT: Duration = Duration::from_secs(20);
const STARTS: usize = 3;

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
        let mut hung = Vec::new();
        for _ in 0..STARTS {
            match Self::start_once(ns, options) {
                Ok(provider) => return provider,
                Err(report) => {
                    // Said at once, so that a start that works the next time is still seen.
                    eprintln!("netlab: the OpenID provider did not start: {report}");
                    hung.push(report);
                }
            }
        }
        panic!(
            "the OpenID provider should start (is tests/oidc/node_modules installed? cargo xtask setup); {STARTS} starts failed:\n{}",
            hung.join("\n")
        );
    }

    /// One start: the provider once it says "ready", or what became of it.
    fn start_once(ns: &Netns, options: &ProviderOptions<'_>) -> Result<Self, String> {
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
        let mut provider = Self {
            child,
            issuer: options.issuer.to_string(),
        };
        match rx.recv_timeout(READY_WAIT) {
            Ok(()) => Ok(provider),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "no \"ready\" within {READY_WAIT:?}; {}",
                threads_of(provider.child.id())
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(format!(
                "node closed its output without \"ready\" ({})",
                provider
                    .child
                    .wait()
                    .map_or_else(|e| e.to_string(), |s| s.to_string())
            )),
        }
    }
}

/// What each thread of process `pid` is doing: its state, CPU time so far and where in
/// the kernel it waits. Tells a process that computes from one that is blocked.
fn threads_of(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("process {pid} is gone");
    };
    let mut lines = vec![format!("threads of node (pid {pid}):")];
    for task in tasks.flatten() {
        let path = task.path();
        let read = |name: &str| std::fs::read_to_string(path.join(name)).unwrap_or_default();
        let stat = read("stat");
        // After the command's closing parenthesis: state, then utime and stime (fields 14
        // and 15 of proc(5)) in clock ticks.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, r)| r.split_whitespace().collect());
        let field = |n: usize| rest.get(n).copied().unwrap_or("?");
        lines.push(format!(
            "  {} {:<16} state {} utime {} stime {} ticks, wchan {}, syscall {}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            field(0),
            field(11),
            field(12),
            read("wchan").trim(),
            // The number of the system call it is in, or "running".
            read("syscall").split_whitespace().next().unwrap_or("?"),
        ));
    }
    lines.join("\n")
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
