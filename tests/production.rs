//! Running in production: restarts and upgrades with no enforcement gap, atomic reloads
//! under traffic, replacing and detaching the pinned datapath. Real packets through a
//! real gateway, with probes that keep checking verdicts while the agent is killed,
//! restarted or reloaded.

use std::{
    net::{IpAddr, TcpStream, UdpSocket},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use netlab::{
    probes::{Probe, probe, under_traffic},
    *,
};

/// How long a probe waits for an answer that should come, and for one that must not.
const PASS_WAIT: Duration = Duration::from_millis(1000);
const FAIL_WAIT: Duration = Duration::from_millis(200);
/// Threads per "must be refused" probe: each check waits `FAIL_WAIT` for nothing, so
/// several in parallel sample the refusals densely enough to see a short gap.
const REFUSAL_PROBES: usize = 6;

/// A TCP connection that must open and echo.
fn opens(lab: &Lab, src: IpAddr, dst: IpAddr, port: u16) -> bool {
    lab.tcp_connect(src, dst, port, PASS_WAIT)
        .is_ok_and(|mut s| echo_tcp(&mut s, b"new").is_ok())
}

/// A TCP connection whose SYN must go unanswered.
fn refused(lab: &Lab, src: IpAddr, dst: IpAddr, port: u16) -> bool {
    matches!(
        lab.tcp_connect(src, dst, port, FAIL_WAIT),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut
    )
}

/// A new UDP flow that must get no echo.
fn udp_refused(lab: &Lab, src: IpAddr, dst: IpAddr, port: u16) -> bool {
    echo_udp(&lab.udp_socket(src), dst, port, b"new", FAIL_WAIT).is_err()
}

/// The traffic of the restart test: an established TCP stream and a tracked UDP flow
/// that must keep flowing, and new flows that must keep getting the right verdict.
struct RestartTraffic {
    stream: Mutex<TcpStream>,
    flow: Mutex<UdpSocket>,
    fresh: IpAddr,
    expired: IpAddr,
    flow_device: IpAddr,
}

impl RestartTraffic {
    /// Logs in three devices and opens the long-lived flows.
    fn start(lab: &Lab, agent: &Agent) -> Self {
        let (fresh, expired, flow_device) = (device(0), device(1), device(2));
        agent.login(fresh, ALICE, NOW);
        agent.login(expired, BOB, 2 * HOUR);
        agent.login(flow_device, CAROL, NOW);
        let stream = lab
            .tcp_connect(fresh, APP, 22, SHOULD_PASS)
            .expect("an SSH-like stream opens with a fresh session");
        let flow = lab.udp_socket(flow_device);
        assert!(udp_works(&flow, APP, 4433), "the UDP flow is admitted");
        // Carol's session expires (an authentication two hours ago): her tracked flow
        // goes on, new flows of hers are refused. Only the flow table lets it through.
        agent.login(flow_device, CAROL, 2 * HOUR);
        assert!(udp_refused(lab, flow_device, APP, 4433));
        assert!(echo_udp(&flow, APP, 4433, b"tracked", PASS_WAIT).is_ok());
        Self {
            stream: Mutex::new(stream),
            flow: Mutex::new(flow),
            fresh,
            expired,
            flow_device,
        }
    }

    fn probes<'a>(&'a self, lab: &'a Lab) -> Vec<Probe<'a>> {
        vec![
            probe("the established TCP stream echoes", move || {
                echo_tcp(&mut self.stream.lock().unwrap(), b"stream").is_ok()
            }),
            probe(
                "the tracked UDP flow of an expired device echoes",
                move || echo_udp(&self.flow.lock().unwrap(), APP, 4433, b"flow", PASS_WAIT).is_ok(),
            ),
            probe("a fresh device opens new connections", move || {
                opens(lab, self.fresh, APP, 443)
            }),
        ]
        .into_iter()
        .chain((0..REFUSAL_PROBES).flat_map(|_| {
            [
                probe(
                    "an expired device's new connections are refused",
                    move || refused(lab, self.expired, APP, 443),
                ),
                probe("an expired device's new UDP flows are refused", move || {
                    udp_refused(lab, self.flow_device, APP, 443)
                }),
            ]
        }))
        .collect()
    }
}

#[test]
fn kill_9_and_restarts_open_no_gap() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let config = lab.config("", APP_POLICY);
    let mut agent = lab.start_agent(&config);
    let traffic = RestartTraffic::start(&lab, &agent);
    let program_id = xdp_program_id(&lab);

    // A crash: SIGKILL, a moment with no agent at all, then a new agent.
    let mut agent = under_traffic(&traffic.probes(&lab), 3, || {
        thread::sleep(Duration::from_millis(500));
        agent.kill();
        thread::sleep(Duration::from_millis(1500));
        let agent = lab.start_agent(&config);
        thread::sleep(Duration::from_millis(1500));
        agent
    });
    assert!(
        agent.log_text().contains("adopted the pinned datapath"),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        xdp_program_id(&lab),
        program_id,
        "the same program stayed attached"
    );
    assert!(
        !agent.log_text().contains("attached again"),
        "the pinned attachment was kept, not made anew"
    );
    let sessions = agent.cli_ok(&["session", "list"]);
    for user in [ALICE, BOB, CAROL] {
        assert!(sessions.contains(user), "{user} lost: {sessions}");
    }

    // An upgrade: the agent is killed again and a new build of the same layout starts
    // (a copy of the binary, from another path).
    let new_build = lab.dir.path().join("sessiongate-new-build");
    std::fs::copy(env!("CARGO_BIN_EXE_sessiongate"), &new_build).expect("copy the binary");
    let agent = under_traffic(&traffic.probes(&lab), 3, || {
        thread::sleep(Duration::from_millis(300));
        agent.kill();
        let agent = lab.start_agent_from(&new_build, &config, &[]);
        thread::sleep(Duration::from_millis(1500));
        agent
    });
    assert!(agent.log_text().contains("adopted the pinned datapath"));
    let sessions = agent.cli_ok(&["session", "list"]);
    for user in [ALICE, BOB, CAROL] {
        assert!(sessions.contains(user), "{user} lost: {sessions}");
    }
    // The adopted datapath is fully under the new agent's control.
    agent.login(traffic.expired, BOB, NOW);
    assert!(lab.tcp_works(traffic.expired, APP, 443));
}

/// The id of the XDP program attached to the gateway's device-facing interface.
fn xdp_program_id(lab: &Lab) -> u64 {
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            &lab.gateway.name,
            "-d",
            "-j",
            "link",
            "show",
            GATEWAY_IFACE,
        ])
        .output()
        .expect("ip link show");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    links[0]["xdp"]["prog"]["id"]
        .as_u64()
        .or_else(|| links[0]["xdp"]["attached"][0]["prog"]["id"].as_u64())
        .unwrap_or_else(|| panic!("no XDP program attached: {links}"))
}

/// `count` filler policies on single hosts of 198.18.128.0/17 (never used by traffic),
/// then the protected application, then `extra`.
fn policies(count: usize, extra: &str) -> String {
    let mut text = String::new();
    for i in 0..count {
        let host = 128 * 256 + i;
        text.push_str(&format!(
            "[[policy]]\nname = \"filler {i}\"\nprecedence = {}\ndestinations = [\"198.18.{}.{}/32\"]\ncheck_session = {{ enforce = true, duration = \"30m\" }}\n\n",
            100 + i,
            host / 256,
            host % 256
        ));
    }
    format!("{text}{APP_POLICY}\n{extra}")
}

/// The open host under a policy: only in some configs.
const OPEN_POLICY: &str = r#"
[[policy]]
name = "Open host"
precedence = 5
destinations = ["198.19.20.10/32"]
check_session = { enforce = true, duration = "1h" }
"#;

/// Large configs need room: 10,000 policies, one prefix each.
fn sized(config: String) -> String {
    config
        .replace("max_policy_cidrs = 1024", "max_policy_cidrs = 16384")
        .replace("max_port_rules = 1024", "max_port_rules = 16384")
}

#[test]
fn reloads_swap_10_and_10000_policies_under_traffic() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let small = sized(lab.config("", &policies(9, "")));
    let large = sized(lab.config("", &policies(9_999, OPEN_POLICY)));
    let mut agent = lab.start_agent(&small);
    let (fresh, expired) = (device(0), device(1));
    agent.login(fresh, ALICE, NOW);
    agent.login(expired, BOB, 2 * HOUR);
    assert!(opens(&lab, expired, OPEN, 443), "the open host is open");
    let config_path = lab.dir.path().join("sessiongate.toml");

    let mut probes = vec![probe("a fresh device opens new connections", || {
        opens(&lab, fresh, APP, 443)
    })];
    for _ in 0..REFUSAL_PROBES {
        probes.push(probe("an expired device is refused", || {
            refused(&lab, expired, APP, 443)
        }));
    }
    under_traffic(&probes, 5, || {
        for round in 0..2 {
            std::fs::write(&config_path, &large).unwrap();
            let out = agent.cli_ok(&["reload"]);
            assert!(out.contains("10001 policies"), "{out}");
            // The large config is in force: its extra policy refuses the open host.
            assert!(refused(&lab, expired, OPEN, 443), "round {round}");
            std::fs::write(&config_path, &small).unwrap();
            // SIGHUP does the same as `sessiongate reload`.
            let before = reloads(&agent);
            agent.send(libc::SIGHUP);
            wait_for(|| reloads(&agent) > before, "the SIGHUP reload");
            assert!(opens(&lab, expired, OPEN, 443), "round {round}");
        }
    });
    let stats = agent.cli_ok(&["stats", "--json"]);
    assert!(stats.contains("\"App\""), "{stats}");

    // An invalid config: rejected with every reason, the running policy stays.
    let broken = small
        .replace("duration = \"1h\"", "duration = \"1 hour\"")
        .replace("precedence = 10\n", "precedence = -3\n");
    std::fs::write(&config_path, broken).unwrap();
    let out = agent.cli(&["reload"]);
    assert!(!out.status.success(), "an invalid reload must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"1 hour\"") && stderr.contains("precedence"),
        "every reason is named: {stderr}"
    );
    assert!(stderr.contains("the running policy stays"), "{stderr}");
    assert!(opens(&lab, fresh, APP, 443) && refused(&lab, expired, APP, 443));
    let status: serde_json::Value =
        serde_json::from_str(&agent.cli_ok(&["stats", "--json"])).expect("stats JSON");
    assert!(status.is_object());
    assert!(agent.log_text().contains("reload rejected"));
    agent.stop();
}

/// Successful reloads so far, from the agent's log.
fn reloads(agent: &Agent) -> usize {
    agent.log_text().matches("reloaded the config").count()
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pins_of_another_layout_are_refused_and_replace_swaps_in_one_step() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let config = lab.config("", APP_POLICY);
    let mut agent = lab.start_agent(&config);
    let traffic = RestartTraffic::start(&lab, &agent);
    assert!(agent.stop().success());
    let pins = lab.pin_dir();
    // What an interrupted --replace leaves behind is named as such.
    std::fs::create_dir(pins.join(format!("layout-{}-new", agent_common::maps::LAYOUT)))
        .expect("mkdir on bpffs");
    let log = lab.refused_start(&config);
    assert!(log.contains("interrupted --replace"), "{log}");
    // Running --replace again finishes the job: the leftover is the new datapath's
    // staging area, never something to replace.
    let mut agent = lab.start_agent_with(&config, &["--replace"]);
    assert!(lab.xdp_attached());
    assert!(lab.tcp_blocked(traffic.expired, APP, 443) && opens(&lab, traffic.fresh, APP, 443));
    assert!(
        !pins
            .join(format!("layout-{}-new", agent_common::maps::LAYOUT))
            .exists(),
        "the leftover is gone"
    );
    assert!(agent.stop().success());
    // Make the pins look like an older layout's.
    let current = std::fs::read_dir(&pins)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("layout-")
        })
        .expect("a layout directory");
    std::fs::rename(&current, pins.join("layout-1")).expect("rename on bpffs");
    let old_id = xdp_program_id(&lab);

    let log = lab.refused_start(&config);
    assert!(
        log.contains("layout-1") && log.contains("--replace"),
        "a clear message: {log}"
    );
    assert_eq!(xdp_program_id(&lab), old_id, "a refusal changes nothing");

    // A new datapath starts UDP flow tracking over (the old layout's flow table is not
    // readable by this one): every other verdict holds through the swap.
    let probes: Vec<Probe<'_>> = traffic
        .probes(&lab)
        .into_iter()
        .filter(|p| !p.name.contains("tracked UDP flow"))
        .collect();
    let agent = under_traffic(&probes, 3, || {
        let agent = lab.start_agent_with(&config, &["--replace"]);
        thread::sleep(Duration::from_millis(1000));
        agent
    });
    assert_ne!(xdp_program_id(&lab), old_id, "the new program is attached");
    assert!(!pins.join("layout-1").exists(), "the old pins are gone");
    assert!(agent.log_text().contains("replaced the pinned datapath"));
    let sessions = agent.cli_ok(&["session", "list"]);
    assert!(sessions.contains(ALICE) && sessions.contains(BOB));
}

#[test]
fn detach_removes_the_program_pins_and_state() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let config = lab.config("", APP_POLICY);
    let mut agent = lab.start_agent(&config);
    agent.login(device(1), BOB, 2 * HOUR);
    let config_path = lab.dir.path().join("sessiongate.toml");
    let detach = |agent: &Agent| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sessiongate"))
            .args(["detach", "--config"])
            .arg(&config_path)
            .output()
            .map(|out| {
                (
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).into_owned()
                        + &String::from_utf8_lossy(&out.stderr),
                )
            })
            .unwrap_or_else(|e| panic!("detach: {e} (agent {})", agent.pid()))
    };
    let (ok, out) = detach(&agent);
    assert!(!ok && out.contains("stop it first"), "{out}");
    assert!(lab.xdp_attached());

    assert!(agent.stop().success());
    assert!(lab.xdp_attached(), "stopping leaves enforcement running");
    assert!(lab.tcp_blocked(device(1), APP, 443));
    let (ok, out) = detach(&agent);
    assert!(ok, "{out}");
    assert!(!lab.xdp_attached(), "detach removes the program");
    assert!(
        lab.tcp_works(device(1), APP, 443),
        "nothing is enforced any more"
    );
    assert!(
        std::fs::read_dir(lab.bpf.path.clone()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("sessiongate")),
        "no pins left"
    );
    assert!(!lab.dir.path().join("state").join("sessions.jsonl").exists());
}

/// The capabilities `deploy/sessiongate.service` grants, as `setpriv` names them.
fn unit_capabilities() -> String {
    let unit = include_str!("../deploy/sessiongate.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds the agent's capabilities");
    let caps: Vec<String> = line
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    assert!(!caps.is_empty());
    format!("-all,{}", caps.join(","))
}

#[test]
fn the_systemd_units_capabilities_are_enough() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    // The agent (and its CLI) with no capability beyond the unit's bounding set.
    let wrapper = lab.dir.path().join("sessiongate-confined");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --bounding-set {} {} \"$@\"\n",
            unit_capabilities(),
            env!("CARGO_BIN_EXE_sessiongate")
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = lab.config("", APP_POLICY);
    let mut agent = lab.start_agent_from(&wrapper, &config, &[]);
    assert!(
        std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
            .unwrap()
            .contains("CapBnd:\t000000c000001000"),
        "confined to CAP_NET_ADMIN, CAP_PERFMON and CAP_BPF"
    );
    agent.login(device(0), ALICE, NOW);
    agent.login(device(1), BOB, 2 * HOUR);
    assert!(lab.tcp_works(device(0), APP, 443) && lab.tcp_blocked(device(1), APP, 443));
    // Adopting the pins and reloading need nothing more.
    agent.kill();
    let agent = lab.start_agent_from(&wrapper, &config, &[]);
    assert!(agent.log_text().contains("adopted the pinned datapath"));
    agent.cli_ok(&["reload"]);
    assert!(lab.tcp_works(device(0), APP, 443) && lab.tcp_blocked(device(1), APP, 443));
}

#[test]
fn an_interface_recreated_while_the_agent_is_down_is_attached_again() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let config = lab.config("", APP_POLICY);
    let mut agent = lab.start_agent(&config);
    agent.login(device(1), BOB, 2 * HOUR);
    assert!(agent.stop().success());
    lab.recreate_device_link();
    assert!(!lab.xdp_attached(), "a new interface has no program");
    let agent = lab.start_agent(&config);
    assert!(
        agent
            .log_text()
            .contains("the pinned attachment no longer holds"),
        "{}",
        agent.log_text()
    );
    assert!(lab.xdp_attached());
    assert!(lab.tcp_blocked(device(1), APP, 443), "enforcing again");
}

#[test]
fn replace_after_a_limits_change_keeps_sessions_and_tracked_flows() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let config = lab.config("", APP_POLICY);
    let mut agent = lab.start_agent(&config);
    let traffic = RestartTraffic::start(&lab, &agent);
    assert!(agent.stop().success());
    let old_id = xdp_program_id(&lab);
    let bigger = config.replace("max_flows = 4096", "max_flows = 8192");

    let log = lab.refused_start(&bigger);
    assert!(
        log.contains("sized for other [limits]") && log.contains("--replace"),
        "{log}"
    );

    // Every probe, the tracked UDP flow of the expired device included.
    let agent = under_traffic(&traffic.probes(&lab), 3, || {
        let agent = lab.start_agent_with(&bigger, &["--replace"]);
        thread::sleep(Duration::from_millis(1000));
        agent
    });
    assert_ne!(xdp_program_id(&lab), old_id, "the new program is attached");
    assert!(
        agent.log_text().contains("copied the tracked UDP flows"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn a_second_agent_on_the_same_state_is_refused() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let config = lab.config("", APP_POLICY);
    let agent = lab.start_agent(&config);
    agent.login(device(1), BOB, 2 * HOUR);
    let log = lab.refused_start(&config);
    assert!(
        log.contains("another sessiongate agent") && log.contains(&agent.pid().to_string()),
        "{log}"
    );
    // The first one goes on, untouched.
    assert!(lab.tcp_blocked(device(1), APP, 443));
    agent.cli_ok(&["reload"]);
    agent.login(device(1), BOB, NOW);
    assert!(lab.tcp_works(device(1), APP, 443));
}

#[test]
fn reloads_fit_port_rules_of_both_configurations() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    // 700 explicit ports: more than half of max_port_rules = 1024, and during a reload
    // both configurations' rules are in the kernel.
    let ports: Vec<String> = (10_000..10_700).map(|p| p.to_string()).collect();
    let policy = format!(
        "{APP_POLICY}\n[[policy]]\nname = \"Many ports\"\nprecedence = 5\ndestinations = [\"198.19.20.0/24\"]\nprotocol = \"tcp\"\nports = [{}]\ncheck_session = {{ enforce = true, duration = \"1h\" }}\n",
        ports.join(", ")
    );
    let agent = lab.start_agent(&lab.config("", &policy));
    for _ in 0..3 {
        agent.cli_ok(&["reload"]);
    }
    agent.login(device(1), BOB, 2 * HOUR);
    assert!(lab.tcp_blocked(device(1), APP, 443));
}

/// A pin directory of this test's on the host's /sys/fs/bpf, where the default
/// `pin_dir` lives. Removed on drop, pins and all; and the bpffs there unmounted again
/// if it was not mounted before the test (the agent mounts it when it is missing).
struct HostPinDir {
    dir: std::path::PathBuf,
    was_mounted: bool,
}

impl HostPinDir {
    fn new(lab: &Lab) -> Self {
        let unique = lab.dir.path().file_name().expect("a temp dir name");
        Self {
            dir: std::path::Path::new("/sys/fs/bpf").join(unique),
            was_mounted: is_bpffs("/sys/fs/bpf"),
        }
    }
}

impl Drop for HostPinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if !self.was_mounted && is_bpffs("/sys/fs/bpf") {
            let _ = std::process::Command::new("umount")
                .args(["-l", "/sys/fs/bpf"])
                .status();
        }
    }
}

fn is_bpffs(path: &str) -> bool {
    let path = std::ffi::CString::new(path).expect("no NUL");
    // SAFETY: a zeroed statfs is a valid out-buffer; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type == 0xcafe_4a11
    }
}

#[test]
fn an_agent_started_by_ip_netns_exec_pins_where_kill_9_leaves_it_enforcing() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let host = HostPinDir::new(&lab);
    // netlab starts agents with `ip netns exec`, whose private mount namespace has a
    // fresh /sys: a bpffs the agent mounted at /sys/fs/bpf would vanish with it.
    let config = lab.config("", APP_POLICY).replace(
        &lab.pin_dir().display().to_string(),
        &host.dir.display().to_string(),
    );
    let mut agent = lab.start_agent(&config);
    let (fresh, stale) = (device(0), device(1));
    agent.login(fresh, ALICE, NOW);
    agent.login(stale, BOB, 2 * HOUR);
    assert!(refused(&lab, stale, APP, 443));

    agent.kill();
    thread::sleep(Duration::from_millis(300));
    assert!(
        lab.xdp_attached(),
        "the attachment went with the agent: {}",
        agent.log_text()
    );
    assert!(
        refused(&lab, stale, APP, 443),
        "an expired device got through once the agent was killed"
    );
    assert!(opens(&lab, fresh, APP, 443));
    assert!(
        host.dir
            .join(format!("layout-{}", agent_common::maps::LAYOUT))
            .join("program")
            .exists(),
        "the pins are on the host's bpffs"
    );

    // The next agent adopts what the first left.
    let agent = lab.start_agent(&config);
    assert!(
        agent.log_text().contains("adopted the pinned datapath"),
        "{}",
        agent.log_text()
    );
    agent.stop_and_detach();
    assert!(!lab.xdp_attached());
}

#[test]
fn a_start_that_cannot_bind_its_listeners_attaches_nothing_and_pins_nothing() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    // A port already taken in the gateway namespace, where the agent runs.
    let busy = lab
        .gateway
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("a listener in the gateway namespace");
    let busy = busy.local_addr().unwrap();
    let token = lab.dir.path().join("api-token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let portal = "portal_listen = \"[::]:{PORT}\"\nreauth_url = \"https://sso.example.com/\"";
    let cases = [
        (format!("metrics_listen = \"{busy}\""), "metrics_listen"),
        (
            format!(
                "api_listen = \"{busy}\"\napi_token_file = \"{}\"",
                token.display()
            ),
            "api_listen",
        ),
        // An address this host does not have.
        (
            format!(
                "api_listen = \"198.18.77.77:8443\"\napi_token_file = \"{}\"",
                token.display()
            ),
            "api_listen",
        ),
        (
            portal.replace("{PORT}", &busy.port().to_string()),
            "portal_listen",
        ),
    ];
    for (extra, field) in cases {
        let log = lab.refused_start(&lab.config(&extra, APP_POLICY));
        assert!(log.contains(&format!("cannot listen on {field}")), "{log}");
        assert!(
            !lab.xdp_attached(),
            "attached although {field} failed: {log}"
        );
        let pinned: Vec<_> = std::fs::read_dir(lab.pin_dir())
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            pinned.is_empty(),
            "pins left after {field} failed: {pinned:?}"
        );
        assert!(
            !lab.dir.path().join("api.sock").exists(),
            "the API socket file was left behind"
        );
    }
    // Then the same lab starts fine, with nothing in the way.
    let agent = lab.start_agent(&lab.config("", APP_POLICY));
    agent.login(device(1), BOB, 2 * HOUR);
    assert!(lab.tcp_blocked(device(1), APP, 443));
}

/// Devices with a session in the kernel, wherever the program finds it (the session
/// tables or the hash maps), read from the pinned maps.
fn kernel_sessions(lab: &Lab) -> usize {
    use std::{collections::HashSet, net::IpAddr};

    use agent_common::{
        addr::{Ip4, Ip6},
        maps::{LAYOUT, Session, SessionBucketV4, SessionBucketV6, names},
        tables::{SessionBucket, SessionSlot},
    };
    use aya::maps::{Array, HashMap, Map, MapData};
    let dir = lab.pin_dir().join(format!("layout-{LAYOUT}")).join("maps");
    let open = |name: &str| MapData::from_pin(dir.join(name)).expect(name);
    fn in_table<B: SessionBucket + aya::Pod>(
        table: Array<MapData, B>,
        ip: impl Fn(<B::Slot as SessionSlot>::Addr) -> IpAddr,
        into: &mut HashSet<IpAddr>,
    ) {
        for bucket in table.iter() {
            for slot in bucket.unwrap().slots() {
                if slot.is_valid() {
                    into.insert(ip(*slot.addr()));
                }
            }
        }
    }
    let mut all = HashSet::new();
    in_table::<SessionBucketV4>(
        Array::try_from(Map::Array(open(names::SESSION_TABLE_V4))).unwrap(),
        |a: Ip4| IpAddr::V4(a.into()),
        &mut all,
    );
    in_table::<SessionBucketV6>(
        Array::try_from(Map::Array(open(names::SESSION_TABLE_V6))).unwrap(),
        |a: Ip6| IpAddr::V6(a.into()),
        &mut all,
    );
    let v4: HashMap<_, Ip4, Session> =
        HashMap::try_from(Map::HashMap(open(names::SESSIONS_V4))).unwrap();
    let v6: HashMap<_, Ip6, Session> =
        HashMap::try_from(Map::HashMap(open(names::SESSIONS_V6))).unwrap();
    all.extend(v4.keys().map(|k| IpAddr::V4(k.unwrap().into())));
    all.extend(v6.keys().map(|k| IpAddr::V6(k.unwrap().into())));
    all.len()
}

/// The sessions the agent holds (`stats --json`).
fn agent_sessions(agent: &Agent) -> usize {
    let stats: serde_json::Value =
        serde_json::from_str(&agent.cli_ok(&["stats", "--json"])).expect("stats JSON");
    stats["sessions"].as_u64().expect("sessions") as usize
}

#[test]
fn an_import_killed_mid_way_is_all_or_nothing_and_the_kernel_agrees_after_restart() {
    if !privileged!() {
        return;
    }
    const N: usize = 200_000;
    let lab = lab!();
    let config = lab
        .config("", APP_POLICY)
        .replace("max_sessions = 4096", "max_sessions = 262144");
    let mut agent = lab.start_agent(&config);
    // One acknowledged login before the import: it must survive whatever happens.
    agent.login(device(5), ALICE, NOW);
    let fresh = time_ago(NOW);
    let mut text = String::from("ip,user,idp,authenticated_at\n");
    for n in 0..4 {
        text.push_str(&format!("{},user{n}@example.com,okta,{fresh}\n", device(n)));
    }
    for i in 0..N - 4 {
        text.push_str(&format!(
            "2001:db8:100:{:x}::{:x},user{i}@example.com,okta,{fresh}\n",
            i >> 16,
            i & 0xffff
        ));
    }
    let file = lab.dir.path().join("sessions.csv");
    std::fs::write(&file, &text).unwrap();
    let journal = lab.dir.path().join("state").join("sessions.jsonl");

    // Killed while the import is being written to the journal: the first megabyte of
    // it is there, its end is not. (The kernel holds some or all of it by then: the
    // journal is written while the kernel takes the batch.)
    let mut cut = false;
    for attempt in 0..3 {
        let before = std::fs::metadata(&journal).unwrap().len();
        let import = std::process::Command::new(env!("CARGO_BIN_EXE_sessiongate"))
            .args(["session", "import", file.to_str().unwrap(), "--socket"])
            .arg(&agent.socket)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::fs::metadata(&journal).unwrap().len() < before + (1 << 20) {
            assert!(
                Instant::now() < deadline,
                "the import never reached the journal"
            );
            thread::sleep(Duration::from_micros(200));
        }
        agent.kill();
        let out = import.wait_with_output().unwrap();
        let written = std::fs::read_to_string(&journal).unwrap();
        let tail = &written[written.len().saturating_sub(4096)..];
        cut = !tail.contains(r#""op":"commit""#);
        eprintln!(
            "attempt {attempt}: killed with {} bytes written, the import {}; the CLI said: {}",
            written.len(),
            if cut { "cut short" } else { "already whole" },
            String::from_utf8_lossy(&out.stderr).trim()
        );

        agent = lab.start_agent(&config);
        let sessions = agent_sessions(&agent);
        assert_eq!(
            kernel_sessions(&lab),
            sessions,
            "the kernel holds what the journal holds"
        );
        if cut {
            assert!(
                !out.status.success(),
                "the CLI was never told the import worked"
            );
            assert_eq!(sessions, 1, "nothing of the cut import is left");
            assert!(
                lab.tcp_blocked(device(0), APP, 443),
                "an imported device is refused"
            );
            assert!(
                agent.log_text().contains("not whole"),
                "{}",
                agent.log_text()
            );
            break;
        }
        assert_eq!(sessions, N + 1, "a whole import is kept whole");
        // Too late: start again without it (a restart on an empty journal empties the
        // kernel too).
        agent.kill();
        std::fs::remove_dir_all(lab.dir.path().join("state")).unwrap();
        agent = lab.start_agent(&config);
        assert_eq!(kernel_sessions(&lab), 0);
        agent.login(device(5), ALICE, NOW);
    }
    assert!(cut, "the kill never fell inside the import's journal write");
    assert!(
        lab.tcp_works(device(5), APP, 443),
        "the acknowledged login survived"
    );

    // The same import, not interrupted: all of it, and still after another restart.
    agent.cli_ok(&["session", "import", file.to_str().unwrap()]);
    assert_eq!(agent_sessions(&agent), N + 1);
    agent.kill();
    let agent = lab.start_agent(&config);
    assert_eq!(agent_sessions(&agent), N + 1);
    assert_eq!(kernel_sessions(&lab), N + 1);
    assert!(lab.tcp_works(device(0), APP, 443));
}

/// Refused new flows per policy (`stats --json`), and the `dropped_expired` counter.
fn refusals(agent: &Agent) -> (std::collections::BTreeMap<String, u64>, u64) {
    let stats: serde_json::Value =
        serde_json::from_str(&agent.cli_ok(&["stats", "--json"])).expect("stats JSON");
    let per_policy = stats["policy_drops"]
        .as_array()
        .expect("policy_drops")
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().to_string(),
                pair[1].as_u64().unwrap(),
            )
        })
        .collect();
    (per_policy, agent.counter("dropped_expired"))
}

#[test]
fn per_policy_refusals_survive_restarts_and_reloads() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let small = lab.config("", APP_POLICY);
    // "Open host" comes first: "App" moves to another index of the other set.
    let large = lab.config("", &format!("{OPEN_POLICY}\n{APP_POLICY}"));
    let config_path = lab.dir.path().join("sessiongate.toml");
    let mut agent = lab.start_agent(&small);
    let expired = device(1);
    agent.login(expired, BOB, 2 * HOUR);
    // Every refusal here is an expired device's: the per-policy counts add up to
    // `dropped_expired`, whatever happens to the agent.
    let check = |agent: &Agent, what: &str| {
        let (per_policy, dropped) = refusals(agent);
        let total: u64 = per_policy.values().sum();
        assert_eq!(
            total, dropped,
            "{what}: {per_policy:?} against dropped_expired {dropped}"
        );
        per_policy
    };
    let refuse = |dst| assert!(lab.tcp_blocked(expired, dst, 443));

    refuse(APP);
    let first = check(&agent, "at first");
    assert!(first["App"] > 0, "{first:?}");

    agent.kill();
    let mut agent = lab.start_agent(&small);
    assert_eq!(check(&agent, "after kill -9 and a restart"), first);

    std::fs::write(&config_path, &large).unwrap();
    agent.cli_ok(&["reload"]);
    assert_eq!(check(&agent, "after a reload"), {
        let mut kept = first.clone();
        kept.insert("Open host".into(), 0);
        kept
    });
    refuse(APP);
    refuse(OPEN);
    let counted = check(&agent, "refusals after the reload");
    assert!(
        counted["App"] > first["App"] && counted["Open host"] > 0,
        "{counted:?}"
    );

    assert!(agent.stop().success());
    let agent = lab.start_agent(&large);
    assert_eq!(check(&agent, "after a restart"), counted);
    // Two more reloads overwrite both sets the counts were made in.
    for config in [&small, &large] {
        std::fs::write(&config_path, config).unwrap();
        agent.cli_ok(&["reload"]);
        assert_eq!(check(&agent, "after reloads"), counted);
    }
    let text = agent.cli_ok(&["stats"]);
    assert!(
        text.contains(&format!("{} refused", counted["App"])),
        "`sessiongate stats` shows it too: {text}"
    );
}
