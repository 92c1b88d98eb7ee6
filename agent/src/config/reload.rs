//! What a reload may change. Every field of the config is one of three kinds: applied
//! by the reload, refused by it (the reload is rejected), or taking effect at the next
//! restart (the reload goes on, with a warning). The destructuring below names every
//! field, so a new one does not compile until it is given its kind.

use super::{AgentConfig, Config};

/// How a reload from one config to another stands, field by field.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RestartOnly {
    /// Changes a running agent cannot make: the reload is rejected, naming each.
    pub refused: Vec<String>,
    /// Changes that take effect at the next restart: the reload warns about each.
    pub deferred: Vec<String>,
}

/// The changes from `old` to `new` that a reload cannot apply.
pub fn restart_only_changes(old: &Config, new: &Config) -> RestartOnly {
    let Config {
        source: _,
        agent,
        // Applied: the policy tables, DNS ports and bypasses are recompiled.
        dns: _,
        bypass: _,
        limits,
        store,
        policies: _,
        idps,
        // Applied: folded into the policies, which are recompiled.
        access: _,
    } = new;
    let AgentConfig {
        // Applied: interfaces added are attached, removed ones detached.
        interfaces: _,
        xdp_mode,
        // Applied through the datapath's settings.
        unknown_device: _,
        api_socket,
        state_dir,
        udp_idle_timeout: _,
        pin_dir,
        metrics_listen,
        api_listen,
        api_token_file,
        notify,
        // Applied: the kernel's use reports follow the settings, the prompts the config.
        notify_before: _,
        // Applied on the portal's page; the prompts carry it within `notify`.
        reauth_url: _,
        portal_listen,
        portal_url,
        portal_tls,
        replies: _,
    } = agent;
    let a = &old.agent;
    let mut changes = RestartOnly::default();
    let mut refuse = |changed: bool, what: &str| {
        if changed {
            changes.refused.push(what.to_string());
        }
    };
    refuse(
        *portal_listen != a.portal_listen,
        "[agent] portal_listen cannot change while running: the portal's socket and TC program are set up at start; restart the agent",
    );
    refuse(
        *store != old.store,
        "[store] cannot change while running: the agent follows one store from start; restart the agent",
    );
    refuse(
        *limits != old.limits,
        "[limits] cannot change while running: the maps are sized by them; restart with --replace",
    );
    for (field, changed) in [
        ("api_socket", *api_socket != a.api_socket),
        ("state_dir", *state_dir != a.state_dir),
        ("pin_dir", *pin_dir != a.pin_dir),
        ("metrics_listen", *metrics_listen != a.metrics_listen),
        ("api_listen", *api_listen != a.api_listen),
        ("api_token_file", *api_token_file != a.api_token_file),
        ("notify_url", *notify != a.notify),
        ("xdp_mode", *xdp_mode != a.xdp_mode),
        ("portal_url", *portal_url != a.portal_url),
        ("portal_tls_cert", *portal_tls != a.portal_tls),
    ] {
        if changed {
            changes.deferred.push(format!(
                "[agent] {field} changed: it takes effect at the next restart"
            ));
        }
    }
    if *idps != old.idps {
        changes.deferred.push(
            "[[idp]] changed: sign-ins use the new providers from the next restart".to_string(),
        );
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[agent]
interfaces = ["veth0"]
metrics_listen = "127.0.0.1:9464"
api_listen = "127.0.0.1:8443"
api_token_file = "/etc/sessiongate/api-token"
notify_url = "https://hooks.example.com/a"
reauth_url = "https://team.example.com/login"
portal_listen = "[::]:8511"
portal_url = "http://198.18.0.1:8511"

[bypass]
destinations = ["203.0.113.10/32"]

[[policy]]
name = "App"
precedence = 1
destinations = ["198.19.10.0/24"]
check_session = { enforce = true, duration = "1h" }
on_expired = "redirect"
"#;

    fn changed(edit: (&str, &str)) -> RestartOnly {
        let old = Config::parse(BASE, "old").unwrap();
        let text = if edit.0.is_empty() {
            format!("{BASE}{}", edit.1)
        } else {
            assert!(BASE.contains(edit.0), "{} is in the base config", edit.0);
            BASE.replacen(edit.0, edit.1, 1)
        };
        let new = Config::parse(&text, "new").unwrap_or_else(|e| panic!("{text}: {e}"));
        restart_only_changes(&old, &new)
    }

    /// (what is replaced, by what, the expected kind, a word of the message)
    const FIELDS: [(&str, &str, &str, &str); 22] = [
        ("\"veth0\"]", "\"veth0\", \"veth1\"]", "applied", ""),
        (
            "[agent]\n",
            "[agent]\nxdp_mode = \"generic\"\n",
            "deferred",
            "xdp_mode",
        ),
        (
            "[agent]\n",
            "[agent]\nunknown_device = \"allow\"\n",
            "applied",
            "",
        ),
        (
            "[agent]\n",
            "[agent]\napi_socket = \"/run/x.sock\"\n",
            "deferred",
            "api_socket",
        ),
        (
            "[agent]\n",
            "[agent]\nstate_dir = \"/var/lib/x\"\n",
            "deferred",
            "state_dir",
        ),
        (
            "[agent]\n",
            "[agent]\nudp_idle_timeout = \"5m\"\n",
            "applied",
            "",
        ),
        (
            "[agent]\n",
            "[agent]\npin_dir = \"/sys/fs/bpf/x\"\n",
            "deferred",
            "pin_dir",
        ),
        (
            "127.0.0.1:9464",
            "127.0.0.1:9465",
            "deferred",
            "metrics_listen",
        ),
        ("127.0.0.1:8443", "127.0.0.1:8444", "deferred", "api_listen"),
        (
            "/etc/sessiongate/api-token",
            "/etc/x-token",
            "deferred",
            "api_token_file",
        ),
        (
            "hooks.example.com/a",
            "hooks.example.com/b",
            "deferred",
            "notify_url",
        ),
        // The portal's page applies it at once; the prompts, which carry it too, at
        // the next restart.
        (
            "team.example.com/login",
            "team.example.com/other",
            "deferred",
            "notify_url",
        ),
        // The portal's own address moves with it (it must be on the portal's port).
        (
            "[::]:8511\"\nportal_url = \"http://198.18.0.1:8511",
            "[::]:8512\"\nportal_url = \"http://198.18.0.1:8512",
            "refused",
            "portal_listen",
        ),
        (
            "http://198.18.0.1:8511",
            "http://198.18.0.2:8511",
            "deferred",
            "portal_url",
        ),
        (
            "",
            "\n[[idp]]\nname = \"corp\"\nissuer = \"https://idp.example.com\"\nclient_id = \"sg\"\nclient_secret_file = \"/etc/sessiongate/idp-secret\"\n",
            "deferred",
            "[[idp]]",
        ),
        ("[agent]\n", "[agent]\nreply_rate = 9\n", "applied", ""),
        ("203.0.113.10/32", "203.0.113.11/32", "applied", ""),
        ("", "\n[dns]\nports = [53, 5353]\n", "applied", ""),
        ("duration = \"1h\"", "duration = \"2h\"", "applied", ""),
        (
            "",
            "\n[access]\nsession_duration = \"24h\"\n",
            "applied",
            "",
        ),
        (
            "",
            "\n[limits]\nmax_sessions = 4096\n",
            "refused",
            "[limits]",
        ),
        (
            "",
            "\n[store]\nkind = \"etcd\"\nendpoints = [\"http://198.18.250.1:2379\"]\n",
            "refused",
            "[store]",
        ),
    ];

    #[test]
    fn every_field_is_applied_refused_or_deferred() {
        for (from, to, kind, word) in FIELDS {
            let c = changed((from, to));
            let (refused, deferred) = (c.refused.join("; "), c.deferred.join("; "));
            // A refused change rejects the reload whatever else changed with it.
            let got = match (c.refused.len(), c.deferred.len()) {
                (0, 0) => "applied",
                (1, _) => "refused",
                (0, 1) => "deferred",
                _ => panic!("{to}: {refused} | {deferred}"),
            };
            assert_eq!(got, kind, "{to}: {refused} | {deferred}");
            let class = if got == "refused" {
                &refused
            } else {
                &deferred
            };
            assert!(
                word.is_empty() || class.contains(word),
                "{to}: {refused} | {deferred}"
            );
        }
    }

    #[test]
    fn an_unchanged_config_changes_nothing() {
        assert_eq!(changed(("", "")), RestartOnly::default());
    }
}
