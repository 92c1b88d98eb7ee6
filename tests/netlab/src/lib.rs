//! A throwaway network for sessiongate's real-traffic tests, its demo and its
//! benchmarks: three namespaces (client devices, the gateway running sessiongate, the
//! application server), echo and DNS services on the server, and the agent as a child
//! process. Everything is removed on drop, also when a test fails. Names carry the
//! process id and a counter, so parallel tests and concurrent runs never collide.
//!
//! ```text
//!  client ns                   gateway ns (sessiongate)              server ns
//!  cli0 198.18.1.10-19   <->   gw-cli 198.18.1.1 | gw-srv 198.18.2.1  <->  srv0 198.18.2.2
//!       2001:db8:1::10-19      (XDP attached)      2001:db8:2::1           2001:db8:2::2
//!                                                               lo: 198.19.10.10     app
//!                                                                   198.19.10.53     dns
//!                                                                   198.19.20.10     open
//!                                                                   2001:db8:10::10  app
//!                                                                   2001:db8:20::10  open
//! ```
//! Only 198.18.0.0/15 and 2001:db8::/32 are used, inside namespaces made here.
//!
//! `Etcd` is a real etcd cluster in a namespace of its own, which labs' gateways (or any
//! `Netns`) connect to: see `etcd.rs`.

mod agent;
pub mod dns;
pub mod etcd;
pub mod oidc;
pub mod packets;
pub mod probes;
mod raw;
mod services;
pub mod shaped;
pub mod tls;
mod traffic;
mod webhook;

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    thread::{self, JoinHandle},
    time::Duration,
};

pub use agent::{Agent, time_ago};
pub use etcd::{Etcd, TlsFiles};
pub use raw::RawLink;
pub use services::APP_PAGE;
pub use traffic::{echo_tcp, echo_udp, udp_works};
pub use webhook::Prompts;

use services::Services;

/// The protected application, a DNS server inside its range, and a host under no policy.
pub const APP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 10, 10));
pub const APP_DNS: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 10, 53));
pub const OPEN: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 20, 10));
pub const APP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10));
pub const OPEN6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 0x10));
/// Every address the server answers on.
pub const SERVER_ADDRESSES: [IpAddr; 5] = [APP, APP_DNS, OPEN, APP6, OPEN6];
/// The gateway's interface towards the devices, where the program is attached.
pub const GATEWAY_IFACE: &str = "gw-cli";

/// Echo services on every server address (53 answers DNS instead).
pub const TCP_PORTS: [u16; 5] = [22, 53, 80, 443, 8443];
pub const UDP_PORTS: [u16; 3] = [53, 443, 4433];

/// How long a connection attempt that should succeed may take, and how long to wait
/// before calling one that should fail refused (a dropped SYN is never answered).
pub const SHOULD_PASS: Duration = Duration::from_secs(3);
pub const SHOULD_FAIL: Duration = Duration::from_millis(1500);

/// Session ages and users the tests share.
pub const HOUR: Duration = Duration::from_secs(3600);
pub const NOW: Duration = Duration::ZERO;
pub const ALICE: &str = "alice@example.com";
pub const BOB: &str = "bob@example.com";
pub const CAROL: &str = "carol@example.com";

/// One session-checked application: every protocol and port of its IPv4 and IPv6
/// ranges (`APP`, `APP6`), sessions up to 1h.
pub const APP_POLICY: &str = r#"
[[policy]]
name = "App"
precedence = 10
destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
check_session = { enforce = true, duration = "1h" }
"#;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name no other test of this or a concurrent run uses: `sgt-{pid}-{counter}`.
fn unique_id() -> String {
    format!(
        "sgt-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A `Lab` whose agents run the `sessiongate` binary of the test crate this is expanded
/// in: `CARGO_BIN_EXE_sessiongate` exists only when cargo compiles that crate's tests.
#[macro_export]
macro_rules! lab {
    () => {
        $crate::Lab::new(::core::env!("CARGO_BIN_EXE_sessiongate"))
    };
}

/// Two tests, IPv4 and IPv6, running one body that takes the caller's `Family`: the
/// caller defines the constants `V4` and `V6` it passes.
#[macro_export]
macro_rules! for_each_family {
    ($body:ident: $v4:ident, $v6:ident) => {
        #[test]
        fn $v4() {
            if $crate::privileged(stringify!($v4)) {
                $body(V4);
            }
        }

        #[test]
        fn $v6() {
            if $crate::privileged(stringify!($v6)) {
                $body(V6);
            }
        }
    };
}

/// The n-th device address (n < 10) on the client side.
pub fn device(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10 + n))
}

pub fn device6(n: u8) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        1,
        0,
        0,
        0,
        0,
        0x10 + u16::from(n),
    ))
}

/// The name of the function this is expanded in, without its module path: in a test,
/// the test's own name. Taken from the type name of a function nested in the caller, so
/// it holds on any thread and under any test runner.
#[macro_export]
macro_rules! test_name {
    () => {{
        fn here() {}
        $crate::enclosing_function(::core::any::type_name_of_val(&here))
    }};
}

/// `caller` from `path::to::caller::{{closure}}::here`, the type name `test_name!` gets.
#[doc(hidden)]
pub fn enclosing_function(here: &'static str) -> &'static str {
    let path = here.strip_suffix("::here").unwrap_or(here);
    let path = path.trim_end_matches("::{{closure}}");
    path.rsplit("::").next().unwrap_or(path)
}

/// `privileged` for the test this is expanded in: `if !privileged!() { return; }`.
#[macro_export]
macro_rules! privileged {
    () => {
        $crate::privileged($crate::test_name!())
    };
}

/// Whether this process may load XDP programs and create network namespaces. Without
/// it a test is skipped, loudly; `cargo xtask test` sets SESSIONGATE_REQUIRE_PRIVILEGED=1
/// so that a skip there is a failure instead of a silent pass. Tests call it through
/// `privileged!()`, which passes their own name.
pub fn privileged(test: &str) -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("SESSIONGATE_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
        "{test} needs root (XDP, BPF maps, network namespaces), and SESSIONGATE_REQUIRE_PRIVILEGED=1 forbids skipping it"
    );
    eprintln!("skipping {test}: needs root (XDP, BPF maps, network namespaces)");
    false
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    fn create(name: String) -> Self {
        run_ok("ip", &["netns", "add", &name]);
        Self { name }
    }

    /// A new, empty namespace of its own, `sgt-{pid}-{counter}-{label}`, with only its
    /// loopback up (for instance a stand-in for an agent's gateway in `Etcd`'s tests).
    pub fn new(label: &str) -> Self {
        let ns = Self::create(format!("{}-{label}", unique_id()));
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &str) {
        let mut all = vec!["-n", &self.name];
        all.extend(args.split_whitespace());
        run_ok("ip", &all);
    }

    /// `ip netns exec NAME PROGRAM`, for the caller to complete.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a thread inside this namespace. Sockets it creates stay in the
    /// namespace wherever they are used afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        thread::scope(|s| {
            s.spawn(|| {
                enter(&self.path());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Runs `f` on a new, detached thread inside this namespace.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
        let path = self.path();
        thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

fn enter(path: &Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: a valid namespace fd; affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Sends `signal` to a child of ours by its pid (`ip netns exec` execs into the
/// program, so that is the program itself).
fn signal(child: &std::process::Child, signal: i32) {
    // SAFETY: signalling our own, not yet reaped child by its pid.
    unsafe { libc::kill(child.id() as i32, signal) };
}

/// Waits up to `grace` for `child` to exit, then kills it; reaps it either way.
fn reap(child: &mut std::process::Child, grace: Duration) {
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn run_ok(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bpffs instance of the lab's own, where its agents pin the datapath: no pin of a
/// test is ever seen by another. Unmounting it drops every pin (and the attachments
/// they hold).
pub struct BpfMount {
    pub path: PathBuf,
}

impl BpfMount {
    /// Mounts a new bpffs at `path` (created if missing).
    pub fn new(path: PathBuf) -> Self {
        std::fs::create_dir_all(&path).expect("bpffs mount point");
        run_ok("mount", &["-t", "bpf", "bpf", &path.to_string_lossy()]);
        Self { path }
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Client, gateway and server namespaces with echo and DNS services running.
pub struct Lab {
    // Fields drop in order: services stop before their namespaces go.
    _services: Services,
    pub client: Netns,
    pub gateway: Netns,
    pub server: Netns,
    pub bpf: BpfMount,
    pub dir: tempfile::TempDir,
    /// The `sessiongate` binary agents run.
    bin: PathBuf,
}

impl Lab {
    /// Builds the topology; `bin` is the `sessiongate` binary to run agents with.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        let id = unique_id();
        let client = Netns::create(format!("{id}-cli"));
        let gateway = Netns::create(format!("{id}-gw"));
        let server = Netns::create(format!("{id}-srv"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .expect("temp dir");
        wire(&client, &gateway, &server);
        let services = Services::start(&server);
        let bpf = BpfMount::new(dir.path().join("bpf"));
        Self {
            _services: services,
            client,
            gateway,
            server,
            bpf,
            dir,
            bin: bin.into(),
        }
    }

    /// A complete agent config for this lab: `[agent]` (plus `agent_extra` lines) and
    /// `[limits]` filled in, then `rest` (the caller's sections and policies) verbatim.
    pub fn config(&self, agent_extra: &str, rest: &str) -> String {
        format!(
            "[agent]\ninterfaces = [\"{GATEWAY_IFACE}\"]\napi_socket = \"{}\"\nstate_dir = \"{}\"\npin_dir = \"{}\"\n{agent_extra}\n\n[limits]\nmax_sessions = 4096\nmax_flows = 4096\nmax_policy_cidrs = 1024\nmax_port_rules = 1024\n\n{rest}\n",
            self.dir.path().join("api.sock").display(),
            self.dir.path().join("state").display(),
            self.pin_dir().display(),
        )
    }

    /// Where this lab's agents pin the datapath.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpf.path.join("sessiongate")
    }

    /// Deletes the device-facing veth pair and creates it again: the same names and
    /// addresses, a new interface index (as when an operator recreates an interface).
    pub fn recreate_device_link(&self) {
        self.gateway.ip(&format!("link del {GATEWAY_IFACE}"));
        wire_devices(&self.client, &self.gateway);
    }

    /// Whether an XDP program is attached to the gateway's device-facing interface.
    pub fn xdp_attached(&self) -> bool {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.gateway.name,
                "-d",
                "link",
                "show",
                GATEWAY_IFACE,
            ])
            .output()
            .expect("ip link show");
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    }
}

/// The device-facing veth pair (client `cli0`, gateway `GATEWAY_IFACE`), its addresses
/// and the client's routes.
fn wire_devices(client: &Netns, gateway: &Netns) {
    run_ok(
        "ip",
        &[
            "link",
            "add",
            "cli0",
            "netns",
            &client.name,
            "type",
            "veth",
            "peer",
            "name",
            GATEWAY_IFACE,
            "netns",
            &gateway.name,
        ],
    );
    client.ip("link set cli0 up");
    for n in 0..10 {
        client.ip(&format!("addr add {}/24 dev cli0", device(n)));
        client.ip(&format!("addr add {}/64 dev cli0 nodad", device6(n)));
    }
    client.ip("route add default via 198.18.1.1");
    client.ip("-6 route add default via 2001:db8:1::1");
    gateway.ip(&format!("link set {GATEWAY_IFACE} up"));
    gateway.ip(&format!("addr add 198.18.1.1/24 dev {GATEWAY_IFACE}"));
    gateway.ip(&format!(
        "addr add 2001:db8:1::1/64 dev {GATEWAY_IFACE} nodad"
    ));
}

/// Veth pairs created directly inside the namespaces (no names in the root namespace
/// for parallel labs to fight over), addresses, routes and forwarding.
fn wire(client: &Netns, gateway: &Netns, server: &Netns) {
    run_ok(
        "ip",
        &[
            "link",
            "add",
            "gw-srv",
            "netns",
            &gateway.name,
            "type",
            "veth",
            "peer",
            "name",
            "srv0",
            "netns",
            &server.name,
        ],
    );
    for ns in [client, gateway, server] {
        ns.ip("link set lo up");
    }
    wire_devices(client, gateway);
    gateway.ip("link set gw-srv up");
    gateway.ip("addr add 198.18.2.1/24 dev gw-srv");
    gateway.ip("addr add 2001:db8:2::1/64 dev gw-srv nodad");
    gateway.ip("route add 198.19.0.0/16 via 198.18.2.2");
    gateway.ip("-6 route add 2001:db8:10::/48 via 2001:db8:2::2");
    gateway.ip("-6 route add 2001:db8:20::/48 via 2001:db8:2::2");
    let sysctl = gateway
        .command("sysctl")
        .args([
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ])
        .status()
        .expect("sysctl");
    assert!(sysctl.success(), "enabling forwarding failed");

    server.ip("link set srv0 up");
    server.ip("addr add 198.18.2.2/24 dev srv0");
    server.ip("addr add 2001:db8:2::2/64 dev srv0 nodad");
    for addr in SERVER_ADDRESSES {
        match addr {
            IpAddr::V4(_) => server.ip(&format!("addr add {addr}/32 dev lo")),
            IpAddr::V6(_) => server.ip(&format!("addr add {addr}/128 dev lo nodad")),
        }
    }
    server.ip("route add default via 198.18.2.1");
    server.ip("-6 route add default via 2001:db8:2::1");
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_name_is_the_callers_own() {
        assert_eq!(test_name!(), "test_name_is_the_callers_own");
        let in_closure = || test_name!();
        assert_eq!(in_closure(), "test_name_is_the_callers_own");
        let on_a_thread = std::thread::spawn(|| test_name!()).join().unwrap();
        assert_eq!(on_a_thread, "test_name_is_the_callers_own");
    }
}
