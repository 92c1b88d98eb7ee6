//! A real etcd cluster (1 to 3 members) in a network namespace of its own, for the
//! tests of agents that share sessions through it. Any number of namespaces (a `Lab`'s
//! gateway, typically) can be linked to it, and each link cut and restored on its own;
//! members can be stopped and restarted on their data.
//!
//! ```text
//!  {id}-etcd namespace                                   a connected namespace (k-th)
//!  lo: 198.18.250.1  m0  :2379 clients, :2380 peers
//!      198.18.250.2  m1         lab{k} 198.18.(240+k).1  <->  gw-etcd 198.18.(240+k).2
//!      198.18.250.3  m2                                       route 198.18.250.0/24
//! ```
//! Everything goes on drop: the members (SIGTERM, then SIGKILL), the namespace with its
//! links (the far ends vanish with them), the data, logs and certificates.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    sync::{Mutex, MutexGuard, PoisonError},
    thread,
    time::{Duration, Instant},
};

use crate::{
    Netns, reap, run_ok, signal,
    tls::{TestCa, Usage},
    unique_id,
};

/// The members' network: member i answers on 198.18.250.(i+1).
const MEMBER_NET: &str = "198.18.250.0/24";
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
/// The third octet of the first link's /24; link k uses 240 + k (up to 249).
const LINK_NET_BASE: usize = 240;
const MAX_LINKS: usize = 10;
/// How long a cluster or a restarted member may take to become healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeouts of every etcdctl run: short, so that an unreachable cluster fails fast.
const DIAL_TIMEOUT: &str = "--dial-timeout=2s";
const COMMAND_TIMEOUT: &str = "--command-timeout=5s";

/// The PEM files of a TLS cluster: its CA and the client's certificate and key (the
/// members require a client certificate signed by that CA).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// An etcd cluster of 1 to 3 members inside its own network namespace.
pub struct Etcd {
    id: String,
    /// How many members the cluster has.
    size: usize,
    /// One slot per member: its process while it runs.
    members: Mutex<Vec<Option<Child>>>,
    /// The namespaces connected so far, by link number k.
    links: Mutex<Vec<String>>,
    tls: Option<TlsFiles>,
    // Fields drop in order: the members are stopped (in `drop`) before the namespace
    // goes, and the namespace before the directory with their data.
    pub ns: Netns,
    pub dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts `members` (1 to 3) plain-HTTP members in a new namespace `{id}-etcd` and
    /// waits until the cluster is healthy. Member i listens on 198.18.250.(i+1), port
    /// 2379 for clients and 2380 for its peers; its data and log are in `dir`.
    pub fn start(members: usize) -> Self {
        Self::launch(members, false)
    }

    /// Like `start`, but clients must speak TLS and present a certificate (mutual TLS):
    /// a CA, one server certificate per member (for its IP) and a client certificate are
    /// generated into `dir`; `tls()` has the client's files. Peers talk plain HTTP.
    pub fn start_tls(members: usize) -> Self {
        Self::launch(members, true)
    }

    fn launch(members: usize, tls: bool) -> Self {
        assert!(
            (1..=3).contains(&members),
            "an Etcd has 1 to 3 members, not {members}"
        );
        let id = unique_id();
        let ns = Netns::create(format!("{id}-etcd"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("{id}-etcd-"))
            .tempdir()
            .expect("temp dir");
        ns.ip("link set lo up");
        for i in 0..members {
            ns.ip(&format!("addr add {}/32 dev lo", member_ip(i)));
        }
        let tls = tls.then(|| write_certificates(dir.path(), &id, members));
        let etcd = Self {
            id,
            size: members,
            members: Mutex::new((0..members).map(|_| None).collect()),
            links: Mutex::new(Vec::new()),
            tls,
            ns,
            dir,
        };
        {
            let mut running = etcd.lock_members();
            for (i, slot) in running.iter_mut().enumerate() {
                *slot = Some(etcd.spawn(i));
            }
        }
        etcd.wait_healthy(&(0..members).collect::<Vec<_>>());
        etcd
    }

    /// The client certificate, its key and the CA, for a TLS cluster.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// How many members the cluster has (running or not).
    pub fn members(&self) -> usize {
        self.size
    }

    /// An agent config's `[store]` section for this cluster: every member, `prefix`,
    /// and the client's TLS files for a TLS cluster.
    pub fn store_section(&self, prefix: &str) -> String {
        let endpoints = self
            .endpoints()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let tls = self.tls().map_or(String::new(), |t| {
            format!(
                "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
                t.ca.display().to_string(),
                t.cert.display().to_string(),
                t.key.display().to_string()
            )
        });
        format!("[store]\nkind = \"etcd\"\nendpoints = [{endpoints}]\nprefix = {prefix:?}\n{tls}\n")
    }

    /// The client URL of every member, running or not (`http://198.18.250.1:2379`, or
    /// `https://` for a TLS cluster).
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.size).map(|i| self.endpoint(i)).collect()
    }

    /// The client URL of member i.
    pub fn endpoint(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{CLIENT_PORT}", member_ip(i))
    }

    /// Member i's process id while it runs (`ip netns exec` execs into etcd, so this
    /// is etcd itself).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.lock_members()[i].as_ref().map(Child::id)
    }

    /// Member i's log (etcd's stderr, zap JSON lines).
    pub fn log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}.log"))
    }

    /// Links `ns` (a `Lab`'s gateway namespace, say) to the cluster: a veth pair, end
    /// `gw-etcd` in `ns` with 198.18.(240+k).2/24 and end `lab{k}` in the etcd
    /// namespace with .1, k being the number of namespaces connected before, and in
    /// `ns` a route to the members (198.18.250.0/24). The link goes when either
    /// namespace does. A namespace can be connected once; up to 10 can be.
    pub fn connect(&self, ns: &Netns) {
        let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        let k = links.len();
        assert!(k < MAX_LINKS, "at most {MAX_LINKS} namespaces per Etcd");
        assert!(
            !links.contains(&ns.name),
            "{} is already connected to etcd",
            ns.name
        );
        let link = format!("lab{k}");
        let net = LINK_NET_BASE + k;
        run_ok(
            "ip",
            &[
                "link",
                "add",
                "gw-etcd",
                "netns",
                &ns.name,
                "type",
                "veth",
                "peer",
                "name",
                &link,
                "netns",
                &self.ns.name,
            ],
        );
        self.ns
            .ip(&format!("addr add 198.18.{net}.1/24 dev {link}"));
        self.ns.ip(&format!("link set {link} up"));
        ns.ip(&format!("addr add 198.18.{net}.2/24 dev gw-etcd"));
        ns.ip("link set gw-etcd up");
        ns.ip(&format!("route add {MEMBER_NET} via 198.18.{net}.1"));
        links.push(ns.name.clone());
    }

    /// Takes the link to `ns` down (its etcd end; `ns` keeps its interface and route,
    /// with no carrier): packets between them are lost, as in a network partition,
    /// while the agent in `ns` goes on running.
    pub fn cut(&self, ns: &Netns) {
        let link = self.link(ns);
        self.ns.ip(&format!("link set {link} down"));
    }

    /// Brings the link to `ns` back after `cut`.
    pub fn restore(&self, ns: &Netns) {
        let link = self.link(ns);
        self.ns.ip(&format!("link set {link} up"));
    }

    fn link(&self, ns: &Netns) -> String {
        let links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        let k = links
            .iter()
            .position(|name| *name == ns.name)
            .unwrap_or_else(|| panic!("{} is not connected to etcd", ns.name));
        format!("lab{k}")
    }

    /// Stops member i: SIGTERM, then SIGKILL if it is still running after 5 s. Its
    /// data stays for `start_member`.
    pub fn stop(&self, i: usize) {
        let child = self.lock_members()[i].take();
        let mut child = child.unwrap_or_else(|| panic!("etcd member {i} is not running"));
        signal(&child, libc::SIGTERM);
        reap(&mut child, Duration::from_secs(5));
    }

    /// Starts member i again on its data (it rejoins the cluster as the member it was)
    /// and waits until it answers.
    pub fn start_member(&self, i: usize) {
        {
            let mut members = self.lock_members();
            assert!(members[i].is_none(), "etcd member {i} is already running");
            members[i] = Some(self.spawn(i));
        }
        self.wait_healthy(&[i]);
    }

    /// Runs `etcdctl ARGS...` (API v3, with the client certificate on a TLS cluster)
    /// inside the etcd namespace against the running members; panics with its stderr if
    /// it fails. Its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl_output(args);
        assert!(
            out.status.success(),
            "etcdctl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn etcdctl_output(&self, args: &[&str]) -> Output {
        let running = self.running();
        assert!(!running.is_empty(), "no etcd member is running");
        let endpoints: Vec<String> = running.iter().map(|&i| self.endpoint(i)).collect();
        self.etcdctl_with(&self.ns, &endpoints, args)
    }

    /// Runs `etcdctl ARGS...` inside `ns` (a connected namespace) against every member's
    /// endpoint, with the client certificate on a TLS cluster, for the caller to judge:
    /// what an agent there would see. Dial and command timeouts are 2 s and 5 s (flags
    /// in `args` override them: `--command-timeout=1s`).
    pub fn etcdctl_from(&self, ns: &Netns, args: &[&str]) -> Output {
        self.etcdctl_with(ns, &self.endpoints(), args)
    }

    fn etcdctl_with(&self, ns: &Netns, endpoints: &[String], args: &[&str]) -> Output {
        let mut cmd = ns.command("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args([DIAL_TIMEOUT, COMMAND_TIMEOUT]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.cert)
                .arg("--key")
                .arg(&tls.key);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run etcdctl")
    }

    /// The member the running ones agree is the leader, once they do (after a stop, an
    /// election takes about a second); panics if they have not within 30 s.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let out = self.etcdctl_output(&["endpoint", "status", "-w", "json"]);
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(leader) = self.agreed_leader(&text) {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no etcd leader after {READY_TIMEOUT:?}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// From `endpoint status -w json`: the member whose id every running member
    /// names as leader, if that is one of them.
    fn agreed_leader(&self, status: &str) -> Option<usize> {
        let status: serde_json::Value = serde_json::from_str(status).ok()?;
        let entries = status.as_array()?;
        let running = self.running();
        if entries.len() != running.len() {
            return None;
        }
        let leader_id = entries[0]["Status"]["leader"].as_u64()?;
        if entries
            .iter()
            .any(|e| e["Status"]["leader"].as_u64() != Some(leader_id))
        {
            return None;
        }
        let entry = entries
            .iter()
            .find(|e| e["Status"]["header"]["member_id"].as_u64() == Some(leader_id))?;
        let endpoint = entry["Endpoint"].as_str()?;
        running.into_iter().find(|&i| self.endpoint(i) == endpoint)
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl(&["get", "sessiongate-netlab-revision-probe", "-w", "json"]);
        let json: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("etcdctl get -w json: {e}: {out}"));
        json["header"]["revision"]
            .as_i64()
            .unwrap_or_else(|| panic!("no header.revision in {out}"))
    }

    /// Compacts the store at its current revision (physically: the old revisions are
    /// gone when it returns); that revision. Compacting again at the same revision is
    /// not an error.
    pub fn compact(&self) -> i64 {
        let revision = self.revision();
        let out = self.etcdctl_output(&["compact", &revision.to_string(), "--physical"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || stderr.contains("required revision has been compacted"),
            "etcdctl compact {revision} failed: {stderr}"
        );
        revision
    }

    fn lock_members(&self) -> MutexGuard<'_, Vec<Option<Child>>> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn running(&self) -> Vec<usize> {
        self.lock_members()
            .iter()
            .enumerate()
            .filter(|(_, child)| child.is_some())
            .map(|(i, _)| i)
            .collect()
    }

    /// `etcd` for member i in the namespace, its output appended to its log.
    fn spawn(&self, i: usize) -> Child {
        let ip = member_ip(i);
        let peer_url = format!("http://{ip}:{PEER_PORT}");
        let client_url = self.endpoint(i);
        let cluster: Vec<String> = (0..self.size)
            .map(|m| format!("m{m}=http://{}:{PEER_PORT}", member_ip(m)))
            .collect();
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log(i))
            .expect("etcd log file");
        let mut cmd = self.ns.command("etcd");
        cmd.arg(format!("--name=m{i}"))
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("m{i}")))
            .args([
                format!("--listen-client-urls={client_url}"),
                format!("--advertise-client-urls={client_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster={}", cluster.join(",")),
                // Ignored once the data dir exists: a restarted member rejoins as itself.
                "--initial-cluster-state=new".into(),
                format!("--initial-cluster-token={}", self.id),
                "--heartbeat-interval=50".into(),
                "--election-timeout=500".into(),
                "--auto-compaction-retention=0".into(),
                "--enable-v2=false".into(),
                "--logger=zap".into(),
                "--log-outputs=stderr".into(),
            ]);
        if let Some(tls) = &self.tls {
            let dir = tls.ca.parent().expect("certificates directory");
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--cert-file")
                .arg(dir.join(format!("m{i}.pem")))
                .arg("--key-file")
                .arg(dir.join(format!("m{i}-key.pem")));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd (is etcd-server installed? cargo xtask setup)")
    }

    /// Waits until every member in `which` answers `endpoint health` (a quorum read);
    /// panics with the logs if one exits or the time is up.
    fn wait_healthy(&self, which: &[usize]) {
        let endpoints: Vec<String> = which.iter().map(|&i| self.endpoint(i)).collect();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let out = self.etcdctl_with(&self.ns, &endpoints, &["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            for &i in which {
                let exited = self.lock_members()[i]
                    .as_mut()
                    .map(|child| child.try_wait().ok().flatten());
                if let Some(Some(status)) = exited {
                    panic!(
                        "etcd member m{i} exited ({status}); log:\n{}",
                        log_tail(&self.log(i), 60)
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy after {READY_TIMEOUT:?}: {}{}",
                String::from_utf8_lossy(&out.stderr),
                (0..self.size)
                    .map(|i| format!("\n--- m{i} ---\n{}", log_tail(&self.log(i), 30)))
                    .collect::<String>()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let mut members = self.lock_members();
        // Every member told at once: a leader stepping down waits for no one.
        for child in members.iter().flatten() {
            signal(child, libc::SIGTERM);
        }
        for child in members.iter_mut().flatten() {
            reap(child, Duration::from_secs(5));
        }
        drop(members);
        if thread::panicking() {
            for i in 0..self.size {
                eprintln!(
                    "--- etcd m{i} log, last lines ({}) ---\n{}",
                    self.log(i).display(),
                    log_tail(&self.log(i), 40)
                );
            }
        }
    }
}

fn member_ip(i: usize) -> String {
    format!("198.18.250.{}", i + 1)
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A CA, a certificate per member (server and client use: etcd's gateway dials the
/// member with it) for its IP, and a client certificate, in `dir/tls/`.
fn write_certificates(dir: &Path, id: &str, members: usize) -> TlsFiles {
    let ca = TestCa::new(&dir.join("tls"), id);
    for i in 0..members {
        ca.leaf(
            &format!("m{i}"),
            vec![member_ip(i)],
            &format!("m{i}"),
            vec![Usage::ServerAuth, Usage::ClientAuth],
        );
    }
    let (cert, key) = ca.leaf("client", Vec::new(), "sessiongate", vec![Usage::ClientAuth]);
    TlsFiles {
        ca: ca.cert.clone(),
        cert,
        key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(out: &Output) -> String {
        assert!(
            out.status.success(),
            "etcdctl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Retries `etcdctl_from` for a few seconds until it succeeds (a link just restored
    /// or a member just restarted).
    fn eventually(etcd: &Etcd, ns: &Netns, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = etcd.etcdctl_from(ns, args);
            if out.status.success() || Instant::now() > deadline {
                return ok(&out);
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    fn is_etcd(pid: u32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "etcd")
    }

    #[test]
    fn plain_member_reachable_from_a_connected_namespace_until_cut() {
        if !crate::privileged!() {
            return;
        }
        let etcd = Etcd::start(1);
        assert_eq!(etcd.endpoints(), ["http://198.18.250.1:2379"]);
        assert!(etcd.tls().is_none());
        let pid = etcd.pid(0).expect("m0 runs");
        assert!(is_etcd(pid), "pid {pid} is not etcd itself");

        let gw = Netns::new("gw");
        let other = Netns::new("gw2");
        etcd.connect(&gw);
        etcd.connect(&other);
        ok(&etcd.etcdctl_from(&gw, &["put", "k", "from-gw"]));
        let got = ok(&etcd.etcdctl_from(&other, &["get", "k", "--print-value-only"]));
        assert_eq!(got.trim(), "from-gw");
        assert_eq!(
            etcd.etcdctl(&["get", "k", "--print-value-only"]).trim(),
            "from-gw"
        );

        etcd.cut(&gw);
        let started = Instant::now();
        // A later flag wins: no need to wait out the usual 5 s.
        let out = etcd.etcdctl_from(&gw, &["--command-timeout=1s", "get", "k"]);
        assert!(
            !out.status.success(),
            "etcd still reachable over a cut link"
        );
        eprintln!(
            "cut link: etcdctl failed after {:?}: {}",
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        // The other namespace's link is its own.
        ok(&etcd.etcdctl_from(&other, &["put", "k", "while-cut"]));

        etcd.restore(&gw);
        let got = eventually(&etcd, &gw, &["get", "k", "--print-value-only"]);
        assert_eq!(got.trim(), "while-cut");

        let before = etcd.revision();
        etcd.etcdctl(&["put", "k", "again"]);
        assert_eq!(etcd.revision(), before + 1);
    }

    #[test]
    fn tls_cluster_survives_a_stopped_member_and_compacts() {
        if !crate::privileged!() {
            return;
        }
        let etcd = Etcd::start_tls(3);
        assert_eq!(
            etcd.endpoints(),
            [
                "https://198.18.250.1:2379",
                "https://198.18.250.2:2379",
                "https://198.18.250.3:2379"
            ]
        );
        let tls = etcd.tls().expect("TLS files").clone();
        for path in [&tls.ca, &tls.cert, &tls.key] {
            assert!(path.is_file(), "{} missing", path.display());
        }
        let gw = Netns::new("gw");
        etcd.connect(&gw);
        ok(&etcd.etcdctl_from(&gw, &["put", "k", "v1"]));

        // Without a client certificate the members refuse.
        let out = gw
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", etcd.endpoint(0)))
            .args([DIAL_TIMEOUT, "--command-timeout=1s", "--cacert"])
            .arg(&tls.ca)
            .args(["get", "k"])
            .output()
            .expect("etcdctl");
        assert!(
            !out.status.success(),
            "accepted a client without certificate"
        );

        let first = etcd.revision();
        let leader = etcd.leader();
        etcd.stop(leader);
        assert!(etcd.pid(leader).is_none());
        // Straight away: the client waits out the election.
        etcd.etcdctl(&["put", "k", "v2"]);
        let new_leader = etcd.leader();
        assert_ne!(new_leader, leader);
        // Every endpoint, the stopped one among them: the client goes to the others.
        let got = eventually(&etcd, &gw, &["get", "k", "--print-value-only"]);
        assert_eq!(got.trim(), "v2");

        etcd.start_member(leader);
        assert!(is_etcd(etcd.pid(leader).expect("restarted")));
        let status = etcd.etcdctl(&["endpoint", "status", "-w", "table"]);
        assert_eq!(status.matches("198.18.250.").count(), 3, "{status}");
        etcd.etcdctl(&["put", "k", "v3"]);
        let now = etcd.revision();
        assert!(
            now >= first + 2,
            "revision {now} after {first} and two puts"
        );

        let compacted = etcd.compact();
        assert_eq!(compacted, now);
        assert_eq!(etcd.compact(), now, "compacting twice is harmless");
        let out = etcd.etcdctl_output(&["get", "k", &format!("--rev={}", now - 1)]);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("compacted"),
            "revision {} still readable after compaction: {}",
            now - 1,
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(
            etcd.etcdctl(&["get", "k", "--print-value-only"]).trim(),
            "v3"
        );
    }
}
