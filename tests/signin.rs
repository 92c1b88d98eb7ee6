//! Signing in at the portal, end to end: a real OpenID provider (`oidc-provider` on
//! Node.js, in the server namespace, reached as a host under no policy), a real browser
//! (headless Chromium in the client namespace) and the real agent and kernel between
//! them.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use netlab::{
    oidc::{
        self, Provider, ProviderOptions, refresh_with_browser, sign_in_twice_with_browser,
        sign_in_with_browser,
    },
    *,
};

/// The provider listens on the open host (no policy applies to it), port 9000.
const ISSUER: &str = "http://198.19.20.10:9000";
/// Devices reach the portal on the gateway's own address.
const PORTAL_URL: &str = "http://198.18.1.1:8511";
const CLIENT_ID: &str = "sessiongate";
const CLIENT_SECRET: &str = "sg-test-secret-0123456789";

fn portal_config(secret_file: &Path) -> (String, String) {
    portal_config_with(secret_file, "")
}

/// The portal and one `[[idp]]`, with `idp_extra` lines in it.
fn portal_config_with(secret_file: &Path, idp_extra: &str) -> (String, String) {
    let agent = format!(
        "xdp_mode = \"generic\"\nportal_listen = \"[::]:8511\"\nportal_url = \"{PORTAL_URL}\""
    );
    let rest = format!(
        "{APP_POLICY}on_expired = \"redirect\"\n\n[[idp]]\nname = \"corp\"\nissuer = \"{ISSUER}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{}\"\n{idp_extra}\n",
        secret_file.display()
    );
    (agent, rest)
}

fn secret_file(dir: &Path) -> PathBuf {
    let path = dir.join("idp-secret");
    std::fs::write(&path, format!("{CLIENT_SECRET}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn provider(lab: &Lab) -> Provider {
    provider_at(lab, ("198.19.20.10:9000", ISSUER), PORTAL_URL, None)
}

/// A provider listening at `listen` as `issuer`, sending users back to `portal`'s
/// callback, over HTTPS with `tls` (a certificate and its key).
fn provider_at(
    lab: &Lab,
    (listen, issuer): (&str, &str),
    portal: &str,
    tls: Option<(&Path, &Path)>,
) -> Provider {
    Provider::start(
        &lab.server,
        &ProviderOptions {
            listen,
            issuer,
            redirect_uri: &format!("{portal}/callback"),
            client_id: CLIENT_ID,
            client_secret: CLIENT_SECRET,
            groups: &[("alice", &["payroll", "staff"])],
            tls,
        },
    )
}

/// A test CA in `dir` and a server certificate of it for `ip`.
fn server_certificate(dir: &Path, ip: &str) -> (tls::TestCa, PathBuf, PathBuf) {
    let ca = tls::TestCa::new(&dir.join("tls"), ip);
    let (cert, key) = ca.leaf("server", vec![ip.into()], ip, vec![tls::Usage::ServerAuth]);
    (ca, cert, key)
}

#[test]
fn an_expired_device_signs_in_at_the_portal_with_a_real_browser() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let _idp = provider(&lab);
    let secrets = tempfile::tempdir().unwrap();
    let (agent_extra, rest) = portal_config(&secret_file(secrets.path()));
    let agent = lab.start_agent(&lab.config(&agent_extra, &rest));
    // The browser's device (the client namespace's first address) has no session.
    let device = device(0);
    assert!(
        !lab.tcp_works(device, APP, 443),
        "refused before signing in"
    );

    let visit = sign_in_with_browser(&lab.client, "http://198.19.10.10/", "alice", test_name!());
    assert!(visit.ok, "the browser got through: {}", visit.describe());
    let refused = visit.page("refused").expect("the portal's page");
    assert_eq!(refused["status"], 511, "{}", visit.describe());
    assert!(
        visit.page("login-form").is_some(),
        "the provider's own login form: {}",
        visit.describe()
    );
    let signed_in = visit.page("signed-in").expect("the portal's answer");
    let text = signed_in["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("Signed in as alice@example.com"),
        "{}",
        visit.describe()
    );
    assert!(
        text.contains("App"),
        "the policies it may now reach: {text}"
    );
    let app = visit.page("app").expect("the application again");
    assert_eq!(app["status"], 200, "{}", visit.describe());
    assert!(
        app["text"]
            .as_str()
            .unwrap_or_default()
            .contains(APP_PAGE.trim()),
        "{}",
        visit.describe()
    );

    // The session is the provider's: its user, the IdP's name, its groups, age ~0.
    let list: serde_json::Value =
        serde_json::from_str(&agent.cli_ok(&["session", "list", "--json"])).unwrap();
    let session = &list[0];
    assert_eq!(session["ip"], device.to_string(), "{list}");
    assert_eq!(session["user"], "alice@example.com", "{list}");
    assert_eq!(session["idp"], "corp", "{list}");
    assert_eq!(
        session["groups"],
        serde_json::json!(["payroll", "staff"]),
        "{list}"
    );
    assert!(session["age_seconds"].as_i64().unwrap() < 60, "{list}");
    assert!(lab.tcp_works(device, APP, 443));
}

/// `curl -i` from device address `src`: the status and the whole answer.
fn curl(lab: &Lab, src: std::net::IpAddr, url: &str) -> (u16, String) {
    curl_with(lab, src, url, &[])
}

/// `curl -i` with `extra` options (0: no HTTP answer at all).
fn curl_with(lab: &Lab, src: std::net::IpAddr, url: &str, extra: &[&str]) -> (u16, String) {
    let out = lab
        .client
        .command("curl")
        .args(["-sS", "-i", "-g", "--max-time", "10", "--interface"])
        .arg(src.to_string())
        .args(extra)
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// The `state` of the sign-in the portal's `/login` starts for `src`, read from the
/// address it sends the browser to.
fn started_state(lab: &Lab, src: std::net::IpAddr) -> String {
    let (status, answer) = curl(lab, src, &format!("{PORTAL_URL}/login"));
    assert_eq!(status, 303, "{answer}");
    let location = answer
        .lines()
        .find_map(|l| {
            l.strip_prefix("location: ")
                .or_else(|| l.strip_prefix("Location: "))
        })
        .unwrap_or_else(|| panic!("no Location in {answer}"));
    location
        .trim()
        .split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("state="))
        .unwrap_or_else(|| panic!("no state in {location}"))
        .to_string()
}

#[test]
fn a_callback_counts_once_from_its_own_device_and_a_foreign_key_or_a_bound_device_records_nothing()
{
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let idp = provider(&lab);
    let secrets = tempfile::tempdir().unwrap();
    let (agent_extra, rest) = portal_config(&secret_file(secrets.path()));
    let agent = lab.start_agent(&lab.config(&agent_extra, &rest));
    let (browser, other) = (device(0), device(1));
    let app = "http://198.19.10.10/";

    // A flow another device started: refused from this one, and left to its owner,
    // whose made-up code the provider then refuses. Nothing is recorded.
    let state = started_state(&lab, other);
    let forged = format!("{PORTAL_URL}/callback?state={state}&code=made-up");
    let (status, page) = curl(&lab, browser, &forged);
    assert_eq!(status, 403, "{page}");
    assert!(page.contains("started by another device"), "{page}");
    let (status, page) = curl(&lab, other, &forged);
    assert_eq!(status, 403, "{page}");
    assert!(page.contains("refused the sign-in"), "{page}");
    assert_eq!(agent.sessions_without_ages(), serde_json::json!([]));

    // A real sign-in, then its callback replayed: refused, the session as it was.
    let visit = sign_in_with_browser(&lab.client, app, "alice", test_name!());
    let callback = visit
        .page("callback")
        .and_then(|p| p["url"].as_str())
        .unwrap_or_else(|| panic!("the provider's redirect: {}", visit.describe()))
        .to_string();
    let recorded = agent.sessions_without_ages();
    assert_eq!(recorded[0]["user"], "alice@example.com", "{recorded}");
    for device in [browser, other] {
        let (status, page) = curl(&lab, device, &callback);
        assert_eq!(status, 403, "{page}");
        assert!(page.contains("already used"), "{page}");
    }
    assert_eq!(agent.sessions_without_ages(), recorded);

    // Another user on the bound device: the provider signs bob in, the agent refuses.
    let refresh = format!("{PORTAL_URL}/refresh-identity");
    let visit = refresh_with_browser(
        &lab.client,
        &refresh,
        app,
        "bob",
        &format!("{}-bob", test_name!()),
    );
    let text = visit
        .page("signed-in")
        .map_or("", |p| p["text"].as_str().unwrap_or_default());
    assert!(text.contains("is bound to user"), "{}", visit.describe());
    assert_eq!(agent.sessions_without_ages(), recorded);

    // The provider's keys change (a new provider at the same address): a token signed
    // by a key the agent did not fetch is refused, and nothing is recorded.
    agent.cli_ok(&["session", "logout", &browser.to_string()]);
    drop(idp);
    let _idp = provider(&lab);
    let visit = sign_in_with_browser(&lab.client, app, "alice", &format!("{}-key", test_name!()));
    let text = visit
        .page("signed-in")
        .map_or("", |p| p["text"].as_str().unwrap_or_default());
    assert!(
        text.contains("could not be verified"),
        "{}",
        visit.describe()
    );
    assert_eq!(agent.sessions_without_ages(), serde_json::json!([]));
    // The agent fetched the new keys meanwhile: the next sign-in goes through.
    let visit = sign_in_with_browser(
        &lab.client,
        app,
        "alice",
        &format!("{}-again", test_name!()),
    );
    assert_eq!(
        visit.page("app").map(|p| p["status"].clone()),
        Some(serde_json::json!(200)),
        "{}",
        visit.describe()
    );
}

/// Signs in twice in one browser (the second time at `/refresh-identity`, a second
/// later): the visit, and the authentication time each sign-in recorded.
fn sign_in_twice(idp_extra: &str, name: &str) -> (oidc::Visit, Vec<String>) {
    let lab = lab!();
    let _idp = provider(&lab);
    let secrets = tempfile::tempdir().unwrap();
    let (agent_extra, rest) = portal_config_with(&secret_file(secrets.path()), idp_extra);
    let agent = lab.start_agent(&lab.config(&agent_extra, &rest));
    let visit = sign_in_twice_with_browser(
        &lab.client,
        "http://198.19.10.10/",
        &format!("{PORTAL_URL}/refresh-identity"),
        "alice",
        name,
    );
    assert!(visit.ok, "{}", visit.describe());
    let times = agent
        .log_text()
        .lines()
        .filter(|l| l.contains("signed in at the portal") || l.contains("sessions: login "))
        .filter_map(|l| l.split("authenticated_at=").nth(1))
        .map(|t| t.split_whitespace().next().unwrap_or_default().to_string())
        .collect();
    (visit, times)
}

#[test]
fn a_second_sign_in_within_the_providers_single_sign_on_keeps_the_authentication_time() {
    if !privileged!() {
        return;
    }
    let (visit, times) = sign_in_twice("", test_name!());
    assert!(
        visit.page("again-no-login-form").is_some(),
        "{}",
        visit.describe()
    );
    // No new authentication happened: the session keeps the first one's time.
    assert_eq!(times.len(), 2, "{times:?}");
    assert_eq!(times[0], times[1], "{times:?}");
}

#[test]
fn forced_interaction_asks_for_the_password_again_and_resets_the_timer() {
    if !privileged!() {
        return;
    }
    let (visit, times) = sign_in_twice("force_interaction = true", test_name!());
    assert!(
        visit.page("again-login-form").is_some(),
        "{}",
        visit.describe()
    );
    assert_eq!(times.len(), 2, "{times:?}");
    assert!(times[1] > times[0], "a fresh authentication: {times:?}");
}

#[test]
fn the_captive_portal_api_tells_each_device_how_it_stands() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let secrets = tempfile::tempdir().unwrap();
    let (agent_extra, rest) = portal_config(&secret_file(secrets.path()));
    let agent = lab.start_agent(&lab.config(&agent_extra, &rest));
    let (fresh, expiring, expired, unknown) = (device(1), device(2), device(3), device(4));
    agent.login(fresh, ALICE, NOW);
    agent.login(expiring, BOB, HOUR - std::time::Duration::from_secs(90));
    agent.login(expired, CAROL, 2 * HOUR);
    let standing = |device| {
        let (status, answer) = curl(&lab, device, &format!("{PORTAL_URL}/captive-portal"));
        assert_eq!(status, 200, "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("content-type: application/captive+json"),
            "{answer}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
    };
    let login_page = format!("{PORTAL_URL}/login");
    let fresh = standing(fresh);
    assert_eq!(fresh["captive"], false, "{fresh}");
    assert_eq!(fresh["user-portal-url"], login_page.as_str(), "{fresh}");
    assert_eq!(fresh["can-extend-session"], true, "{fresh}");
    let left = fresh["seconds-remaining"].as_u64().unwrap();
    assert!((3590..=3600).contains(&left), "{fresh}");
    let expiring = standing(expiring);
    assert_eq!(expiring["captive"], false, "{expiring}");
    let left = expiring["seconds-remaining"].as_u64().unwrap();
    assert!((80..=90).contains(&left), "{expiring}");
    for device in [expired, unknown] {
        let answer = standing(device);
        assert_eq!(answer["captive"], true, "{device}: {answer}");
        assert!(answer.get("seconds-remaining").is_none(), "{answer}");
        assert_eq!(answer["user-portal-url"], login_page.as_str(), "{answer}");
    }
}

#[test]
fn sign_in_failures_each_get_a_page_and_record_nothing() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    // No provider answers at the issuer's address.
    let secrets = tempfile::tempdir().unwrap();
    let (agent_extra, rest) = portal_config(&secret_file(secrets.path()));
    let agent = lab.start_agent(&lab.config(&agent_extra, &rest));
    let (unreachable, enrolled_elsewhere) = (device(1), device(2));

    let (status, page) = curl(&lab, unreachable, &format!("{PORTAL_URL}/login"));
    assert_eq!(status, 502, "{page}");
    assert!(page.contains("Sign-in is not available"), "{page}");
    assert!(page.contains("identity provider corp"), "{page}");

    // A user who cancels at the provider comes back with an error instead of a code.
    let cancelled = format!(
        "{PORTAL_URL}/callback?error=access_denied&error_description=End-User%20aborted%20interaction&state=x"
    );
    let (status, page) = curl(&lab, unreachable, &cancelled);
    assert_eq!(status, 403, "{page}");
    assert!(page.contains("Sign-in cancelled"), "{page}");
    assert!(page.contains("End-User aborted interaction"), "{page}");

    // A device that enrolled through another identity provider resets only through it.
    agent.cli_ok(&[
        "session",
        "login",
        &enrolled_elsewhere.to_string(),
        "--user",
        ALICE,
        "--idp",
        "okta",
    ]);
    let before = agent.sessions_without_ages();
    let (status, page) = curl(&lab, enrolled_elsewhere, &format!("{PORTAL_URL}/login"));
    assert_eq!(status, 403, "{page}");
    assert!(
        page.contains("enrolled through the identity provider okta"),
        "{page}"
    );
    assert_eq!(agent.sessions_without_ages(), before);
    assert!(agent.log_text().contains("sign-in refused"));
}

#[test]
fn a_device_without_a_session_chooses_among_several_providers() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let secrets = tempfile::tempdir().unwrap();
    let (agent_extra, rest) = portal_config_with(
        &secret_file(secrets.path()),
        &format!(
            "\n[[idp]]\nname = \"okta\"\nissuer = \"http://198.19.20.10:9001\"\nclient_id = \"sg\"\nclient_secret_file = \"{}\"\n",
            secret_file(secrets.path()).display()
        ),
    );
    let _agent = lab.start_agent(&lab.config(&agent_extra, &rest));
    let (status, page) = curl(&lab, device(1), &format!("{PORTAL_URL}/login"));
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Choose how to sign in"), "{page}");
    for idp in ["corp", "okta"] {
        assert!(
            page.contains(&format!("href=\"/login?idp={idp}\"")),
            "{page}"
        );
    }
}

#[test]
fn a_provider_behind_a_private_ca_is_trusted_only_through_its_ca_file() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let files = tempfile::tempdir().unwrap();
    let (ca, cert, key) = server_certificate(files.path(), "198.19.20.10");
    let issuer = "https://198.19.20.10:9443";
    let _idp = provider_at(
        &lab,
        ("198.19.20.10:9443", issuer),
        PORTAL_URL,
        Some((&cert, &key)),
    );
    let secret = secret_file(files.path());
    let config = |ca_line: &str| {
        let (agent_extra, rest) = portal_config_with(&secret, ca_line);
        lab.config(&agent_extra, &rest.replace(ISSUER, issuer))
    };

    // Without ca_file the agent does not trust the provider: no sign-in starts.
    let agent = lab.start_agent(&config(""));
    let (status, page) = curl(&lab, device(0), &format!("{PORTAL_URL}/login"));
    assert_eq!(status, 502, "{page}");
    assert!(page.contains("Sign-in is not available"), "{page}");
    assert!(page.to_lowercase().contains("certificate"), "{page}");
    drop(agent);

    // With it, the whole sign-in goes through over HTTPS.
    let ca_line = format!("ca_file = \"{}\"", ca.cert.display());
    let _agent = lab.start_agent(&config(&ca_line));
    let visit = sign_in_with_browser(&lab.client, "http://198.19.10.10/", "alice", test_name!());
    assert_eq!(
        visit.page("app").map(|p| p["status"].clone()),
        Some(serde_json::json!(200)),
        "{}",
        visit.describe()
    );
}

#[test]
fn the_portal_serves_its_own_pages_over_https_and_redirected_pages_over_http() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let files = tempfile::tempdir().unwrap();
    let (ca, cert, key) = server_certificate(files.path(), "198.18.1.1");
    let portal = "https://198.18.1.1:8511";
    let _idp = provider_at(&lab, ("198.19.20.10:9000", ISSUER), portal, None);
    let (_, rest) = portal_config(&secret_file(files.path()));
    let agent_extra = format!(
        "xdp_mode = \"generic\"\nportal_listen = \"[::]:8511\"\nportal_url = \"{portal}\"\nportal_tls_cert = \"{}\"\nportal_tls_key = \"{}\"",
        cert.display(),
        key.display()
    );
    let _agent = lab.start_agent(&lab.config(&agent_extra, &rest));
    let ca_file = ca.cert.display().to_string();

    // The portal's own pages: HTTPS with its certificate, and nothing in plain HTTP.
    let (status, answer) = curl_with(
        &lab,
        device(1),
        &format!("{portal}/captive-portal"),
        &["--cacert", &ca_file],
    );
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.contains(&format!("\"user-portal-url\":\"{portal}/login\"")),
        "{answer}"
    );
    let (status, answer) = curl(&lab, device(1), "http://198.18.1.1:8511/captive-portal");
    assert_eq!(
        status, 0,
        "no plain HTTP on the portal's own port: {answer}"
    );
    // A redirected application connection stays plain HTTP, and links the HTTPS sign-in.
    let (status, page) = curl(&lab, device(1), "http://198.19.10.10/");
    assert_eq!(status, 511, "{page}");
    assert!(page.contains(&format!("href=\"{portal}/login\"")), "{page}");

    let visit = sign_in_with_browser(&lab.client, "http://198.19.10.10/", "alice", test_name!());
    assert_eq!(
        visit.page("app").map(|p| p["status"].clone()),
        Some(serde_json::json!(200)),
        "{}",
        visit.describe()
    );
    assert!(
        visit
            .page("signed-in")
            .and_then(|p| p["url"].as_str())
            .is_some_and(|u| u.starts_with(&format!("{portal}/callback"))),
        "{}",
        visit.describe()
    );
}
