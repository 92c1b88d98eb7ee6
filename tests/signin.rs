//! Signing in at the portal, end to end: a real OpenID provider (`oidc-provider` on
//! Node.js, in the server namespace, reached as a host under no policy), a real browser
//! (headless Chromium in the client namespace) and the real agent and kernel between
//! them.

use std::{os::unix::fs::PermissionsExt, path::Path};

use netlab::{
    oidc::{Provider, ProviderOptions, sign_in_with_browser},
    *,
};

/// The provider listens on the open host (no policy applies to it), port 9000.
const ISSUER: &str = "http://198.19.20.10:9000";
/// Devices reach the portal on the gateway's own address.
const PORTAL_URL: &str = "http://198.18.1.1:8511";
const CLIENT_ID: &str = "sessiongate";
const CLIENT_SECRET: &str = "sg-test-secret-0123456789";

fn portal_config(secret_file: &Path) -> (String, String) {
    let agent = format!(
        "xdp_mode = \"generic\"\nportal_listen = \"[::]:8511\"\nportal_url = \"{PORTAL_URL}\""
    );
    let rest = format!(
        "{APP_POLICY}on_expired = \"redirect\"\n\n[[idp]]\nname = \"corp\"\nissuer = \"{ISSUER}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{}\"\n",
        secret_file.display()
    );
    (agent, rest)
}

fn secret_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("idp-secret");
    std::fs::write(&path, format!("{CLIENT_SECRET}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn provider(lab: &Lab) -> Provider {
    Provider::start(
        &lab.server,
        &ProviderOptions {
            listen: "198.19.20.10:9000",
            issuer: ISSUER,
            redirect_uri: &format!("{PORTAL_URL}/callback"),
            client_id: CLIENT_ID,
            client_secret: CLIENT_SECRET,
            groups: &[("alice", &["payroll", "staff"])],
        },
    )
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
