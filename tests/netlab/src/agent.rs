//! The agent under test: `sessiongate run` in the gateway namespace, and its CLI.

use std::{
    fs::File,
    net::IpAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use crate::{COUNTER, Lab};

/// The agent process; stopped (SIGTERM, then SIGKILL) on drop, its log printed if the
/// test is failing.
pub struct Agent {
    child: Child,
    bin: PathBuf,
    /// The config file it runs on.
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Lab {
    /// Starts the agent on `config` and waits until its API answers.
    pub fn start_agent(&self, config: &str) -> Agent {
        let agent = self.spawn_agent(config);
        agent.wait_ready();
        agent
    }

    /// Starts `bin` (another build of the agent) on `config` and waits until it answers.
    pub fn start_agent_from(&self, bin: &std::path::Path, config: &str, args: &[&str]) -> Agent {
        let agent = self.spawn_agent_from(bin, config, args);
        agent.wait_ready();
        agent
    }

    /// Starts the agent with extra `run` arguments (`--replace`, `--log-format json`)
    /// and waits until it answers.
    pub fn start_agent_with(&self, config: &str, args: &[&str]) -> Agent {
        self.start_agent_from(&self.bin.clone(), config, args)
    }

    /// Starts the agent without waiting (for configs it should refuse).
    pub fn spawn_agent(&self, config: &str) -> Agent {
        self.spawn_agent_from(&self.bin.clone(), config, &[])
    }

    /// Starts the agent on `config`, which it must refuse: waits for it to exit with a
    /// failure and returns its log.
    pub fn refused_start(&self, config: &str) -> String {
        let mut agent = self.spawn_agent(config);
        let status = agent.wait_exit(Duration::from_secs(20));
        let log = agent.log_text();
        assert!(
            !status.success(),
            "the agent should have refused to start: {log}"
        );
        log
    }

    /// Starts `bin` with `run --config CONFIG ARGS...` without waiting.
    pub fn spawn_agent_from(&self, bin: &std::path::Path, config: &str, args: &[&str]) -> Agent {
        let path = self.dir.path().join("sessiongate.toml");
        std::fs::write(&path, config).expect("write config");
        let log_path = self.dir.path().join(format!(
            "agent-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let log = File::create(&log_path).expect("log file");
        let child = self
            .gateway
            .command(bin)
            .args(["run", "--config"])
            .arg(&path)
            .args(args)
            .env("SESSIONGATE_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sessiongate");
        Agent {
            child,
            bin: bin.to_path_buf(),
            config: path.clone(),
            socket: self.dir.path().join("api.sock"),
            log: log_path,
        }
    }
}

impl Agent {
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.socket.exists() && self.cli(&["stats", "--json"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after 20 s; log:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `sessiongate ARGS... --socket SOCKET` from the root namespace (the API is
    /// a unix socket in the filesystem).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("run sessiongate CLI")
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "sessiongate {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The sessions as `session list --json` shows them, without their ages, which tick
    /// on between two reads.
    pub fn sessions_without_ages(&self) -> serde_json::Value {
        let mut list: serde_json::Value =
            serde_json::from_str(&self.cli_ok(&["session", "list", "--json"])).unwrap();
        for session in list.as_array_mut().expect("a list") {
            let fields = session.as_object_mut().expect("a session");
            fields.remove("age");
            fields.remove("age_seconds");
        }
        list
    }

    /// Records a login for `user` on `ip` that happened `ago` in the past.
    pub fn login(&self, ip: IpAddr, user: &str, ago: Duration) {
        let at = time_ago(ago);
        self.cli_ok(&[
            "session",
            "login",
            &ip.to_string(),
            "--user",
            user,
            "--at",
            &at,
        ]);
    }

    /// A verdict counter by name (`dropped_expired`, ...).
    pub fn counter(&self, name: &str) -> u64 {
        let stats: serde_json::Value =
            serde_json::from_str(&self.cli_ok(&["stats", "--json"])).expect("stats JSON");
        ["verdicts", "events", "replies"]
            .iter()
            .filter_map(|group| stats[group].as_array())
            .flatten()
            .find(|pair| pair[0] == name)
            .and_then(|pair| pair[1].as_u64())
            .unwrap_or_else(|| panic!("no counter {name} in {stats}"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to 3 s) until the log has a line containing every needle; that line.
    pub fn wait_for_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let log = self.log_text();
            if let Some(line) = log
                .lines()
                .find(|line| needles.iter().all(|n| line.contains(n)))
            {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}; log:\n{log}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the agent to exit by itself (for configs it must refuse).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent still running; log:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the agent and removes its pinned datapath (`sessiongate detach`), so that
    /// nothing of it stays attached.
    pub fn stop_and_detach(mut self) {
        self.stop();
        let out = Command::new(&self.bin)
            .args(["detach", "--config"])
            .arg(&self.config)
            .output()
            .expect("run sessiongate detach");
        assert!(
            out.status.success(),
            "sessiongate detach failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGKILL, as a crash or the OOM killer would, then reaps it.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Sends `signal` (SIGHUP: reload).
    pub fn send(&self, signal: i32) {
        self.signal(signal);
    }

    /// SIGTERM, then waits for the agent to exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(10))
    }

    fn signal(&self, signal: i32) {
        crate::signal(&self.child, signal);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGTERM);
            crate::reap(&mut self.child, Duration::from_secs(5));
        }
        if thread::panicking() {
            eprintln!(
                "--- agent log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// RFC 3339 time `ago` before now.
pub fn time_ago(ago: Duration) -> String {
    let t = time::OffsetDateTime::now_utc() - ago;
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("format time")
}
