//! The config file as TOML gives it: loosely typed where validation should name the
//! problem itself (strings for durations, addresses and choices, wide integers for
//! ports), strict about unknown keys so a typo is never silently ignored.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub agent: RawAgent,
    #[serde(default)]
    pub dns: RawDns,
    #[serde(default)]
    pub bypass: RawBypass,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default, rename = "policy")]
    pub policies: Vec<RawPolicy>,
    #[serde(default, rename = "idp")]
    pub idps: Vec<RawIdp>,
    pub access: Option<RawAccess>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    pub session_duration: Option<String>,
    pub apply_to_all: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    #[serde(default)]
    pub interfaces: Vec<String>,
    pub xdp_mode: Option<String>,
    pub unknown_device: Option<String>,
    pub api_socket: Option<String>,
    pub state_dir: Option<String>,
    pub udp_idle_timeout: Option<String>,
    pub pin_dir: Option<String>,
    pub metrics_listen: Option<String>,
    pub api_listen: Option<String>,
    pub api_token_file: Option<String>,
    pub notify_url: Option<String>,
    pub notify_interval: Option<String>,
    pub notify_before: Option<String>,
    pub reauth_url: Option<String>,
    pub portal_listen: Option<String>,
    pub portal_url: Option<String>,
    pub portal_tls_cert: Option<String>,
    pub portal_tls_key: Option<String>,
    pub reply_rate: Option<i64>,
    pub reply_burst: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub ports: Option<Vec<i64>>,
    #[serde(default)]
    pub resolvers: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBypass {
    #[serde(default)]
    pub destinations: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub kind: Option<String>,
    pub endpoints: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_sessions: Option<i64>,
    pub max_flows: Option<i64>,
    pub max_policy_cidrs: Option<i64>,
    pub max_port_rules: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub name: Option<String>,
    pub precedence: Option<i64>,
    #[serde(default)]
    pub destinations: Vec<String>,
    pub protocol: Option<String>,
    pub ports: Option<Vec<i64>>,
    pub check_session: Option<RawCheckSession>,
    pub on_expired: Option<String>,
    pub redirect_ports: Option<Vec<i64>>,
    pub access: Option<bool>,
    pub identity: Option<RawIdentity>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub users: Option<Vec<String>>,
    pub user_matches: Option<String>,
    pub groups: Option<Vec<String>>,
    pub idps: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheckSession {
    pub enforce: Option<bool>,
    pub duration: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdp {
    pub name: Option<String>,
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_file: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub user_claim: Option<String>,
    pub groups_claim: Option<String>,
    pub force_interaction: Option<bool>,
    pub ca_file: Option<String>,
}
