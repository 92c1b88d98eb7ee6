//! The agent's configuration: a TOML file whose policy section mirrors Gateway's rule
//! settings. `Config::load` either returns a fully valid config or every problem in it
//! at once, each naming the file, the section or policy, and the field.

mod duration;
pub mod identity;
mod raw;
mod reload;
mod validate;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use thiserror::Error;

use crate::input::file::{self, FileError};

pub use duration::{DurationError, GoDuration};
pub use identity::{Identity, IdentityCondition};
pub use reload::{RestartOnly, restart_only_changes};

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where it was read from, for messages.
    pub source: String,
    pub agent: AgentConfig,
    pub dns: DnsConfig,
    /// Destinations that always pass: the identity provider, the team domain.
    pub bypass: Vec<IpNet>,
    pub limits: Limits,
    /// Where sessions are kept: this host only, or shared by a fleet through etcd.
    pub store: StoreConfig,
    /// In file order; a policy's index here is its index in the kernel's policy map.
    pub policies: Vec<Policy>,
    /// The identity providers users sign in with at the portal (`[[idp]]`).
    pub idps: Vec<IdpConfig>,
    /// Access-style device sessions (`[access]`), already folded into the policies
    /// they apply to (`Policy::access`).
    pub access: Option<AccessConfig>,
}

/// One device-session duration for applications that accept the device's session as
/// their login (Gateway's "Access" sessions): for policies with `access = true`, or,
/// with `apply_to_all`, for every policy without its own `check_session` that does not
/// say `access = false`. A policy's own `check_session` always wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessConfig {
    pub session_duration: GoDuration,
    pub apply_to_all: bool,
}

/// An OpenID provider users sign in with at the portal (`[[idp]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdpConfig {
    /// The IdP name sessions record (as `session login --idp` does).
    pub name: String,
    /// Discovered through `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    /// Read at start; readable by its owner only, like `api_token_file`.
    pub client_secret_file: PathBuf,
    /// Always holds `openid`.
    pub scopes: Vec<String>,
    /// The claim that names the user, and the one that lists their groups.
    pub user_claim: String,
    pub groups_claim: String,
    /// Ask for the password every time, and refuse a silent single sign-on.
    pub force_interaction: bool,
    /// Certificates to trust for the provider, besides the system's.
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub unknown_device: UnknownDevice,
    pub api_socket: PathBuf,
    pub state_dir: PathBuf,
    pub udp_idle_timeout: GoDuration,
    /// The bpffs directory the datapath is pinned under.
    pub pin_dir: PathBuf,
    /// Where Prometheus metrics are served; off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// The TCP control API; off when `None`. Always with a token file.
    pub api_listen: Option<SocketAddr>,
    pub api_token_file: Option<PathBuf>,
    /// Re-authentication prompts; off when `None`.
    pub notify: Option<NotifySettings>,
    /// Prompt this long before a device's session runs out for a policy it uses
    /// (webhook, event stream and log); off when `None`.
    pub notify_before: Option<GoDuration>,
    /// Where users re-authenticate: in prompts and on the portal's page.
    pub reauth_url: Option<String>,
    /// The re-authentication portal that `redirect` policies steer HTTP to; off when
    /// `None`.
    pub portal_listen: Option<SocketAddr>,
    /// Where devices reach the portal itself, for sign-in (`{portal_url}/login`) and
    /// the providers' redirect (`{portal_url}/callback`); no trailing slash.
    pub portal_url: Option<String>,
    /// The certificate chain and key (PEM) the portal's own pages are served with,
    /// over HTTPS; redirected application connections stay plain HTTP.
    pub portal_tls: Option<(PathBuf, PathBuf)>,
    /// Visible refusals (RSTs, ICMP errors, portal redirects) per device.
    pub replies: ReplyLimit,
}

/// At most `rate` visible refusals per device per second, in bursts of up to `burst`;
/// beyond that refusals are dropped (and counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyLimit {
    pub rate: u32,
    pub burst: u32,
}

impl Default for ReplyLimit {
    fn default() -> Self {
        Self { rate: 5, burst: 10 }
    }
}

/// Where and how often re-authentication prompts are sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifySettings {
    pub url: String,
    /// At most one prompt per device and policy per interval.
    pub interval: GoDuration,
    /// Where users re-authenticate; passed on in each prompt.
    pub reauth_url: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// TCP and UDP destination ports that are never session-checked.
    pub ports: Vec<u16>,
    /// The resolvers devices use; only for `check`'s warnings.
    pub resolvers: Vec<IpAddr>,
}

/// Where sessions live.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreConfig {
    /// This host only: a journal in `state_dir`.
    #[default]
    Local,
    /// Shared by every agent watching the same etcd prefix.
    Etcd(EtcdConfig),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs, `http://host:port` or (all of them) `https://host:port`.
    pub endpoints: Vec<String>,
    /// Keys live under `{prefix}/devices/`; no trailing '/'.
    pub prefix: String,
    /// With https endpoints: the CA that signed the members' certificates, and the
    /// agent's client certificate and key when the members ask for one.
    pub tls: Option<EtcdTls>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    pub client: Option<(PathBuf, PathBuf)>,
}

/// `[store] prefix` when none is given.
pub const DEFAULT_ETCD_PREFIX: &str = "/sessiongate";

/// Map capacities; each applies per address family where the map is per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_sessions: u32,
    pub max_flows: u32,
    pub max_policy_cidrs: u32,
    pub max_port_rules: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 1 << 20,
            max_flows: 1 << 20,
            max_policy_cidrs: 1 << 16,
            max_port_rules: 1 << 16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Native, falling back to generic with a warning.
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownDevice {
    Enforce,
    Allow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn ip_proto(self) -> u8 {
        match self {
            Self::Tcp => agent_common::maps::IPPROTO_TCP,
            Self::Udp => agent_common::maps::IPPROTO_UDP,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// What a refused new flow gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExpired {
    /// Silence: the client times out.
    Drop,
    /// A TCP RST or an ICMP administratively-prohibited error, at once.
    Reject,
    /// HTTP (`Policy::redirect_ports`) to the portal; everything else rejected.
    Redirect,
}

impl OnExpired {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::Reject => "reject",
            Self::Redirect => "redirect",
        }
    }
}

/// `redirect_ports` when a redirect policy names none.
pub const DEFAULT_REDIRECT_PORTS: [u16; 1] = [80];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    /// Lower is evaluated first, as in Gateway. Unique.
    pub precedence: i64,
    pub destinations: Vec<IpNet>,
    /// `None`: both TCP and UDP.
    pub protocol: Option<Protocol>,
    /// `None`: every port.
    pub ports: Option<Vec<u16>>,
    pub check_session: CheckSession,
    pub on_expired: OnExpired,
    /// With `Redirect`: the TCP ports steered to the portal; empty otherwise.
    pub redirect_ports: Vec<u16>,
    /// Its session check is `[access] session_duration` (it has none of its own).
    pub access: bool,
    /// Applies only to devices whose session's identity matches; `None`: to all.
    pub identity: Option<IdentityCondition>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckSession {
    /// No `check_session`, `enforce = false`, or no duration: unlimited sessions.
    Unlimited { enforce_without_duration: bool },
    /// New flows need a session no older than this.
    Enforce(GoDuration),
}

impl Policy {
    pub fn matches_protocol(&self, proto: Protocol) -> bool {
        self.protocol.is_none_or(|p| p == proto)
    }

    /// Whether the policy applies to a device with this identity (`None`: no session,
    /// which matches no identity condition).
    pub fn applies_to(&self, who: Option<&Identity<'_>>) -> bool {
        match (&self.identity, who) {
            (None, _) => true,
            (Some(condition), Some(who)) => condition.matches(who),
            (Some(_), None) => false,
        }
    }

    /// Whether a packet to `dst`, `proto`, `port` is under this policy (whoever sends
    /// it).
    pub fn matches_packet(&self, dst: IpAddr, proto: Protocol, port: u16) -> bool {
        self.destinations.iter().any(|net| net.contains(&dst))
            && self.matches_protocol(proto)
            && self.matches_port(port)
    }

    pub fn matches_port(&self, port: u16) -> bool {
        self.ports
            .as_ref()
            .is_none_or(|ports| ports.contains(&port))
    }

    pub fn duration(&self) -> Option<GoDuration> {
        match self.check_session {
            CheckSession::Enforce(d) => Some(d),
            CheckSession::Unlimited { .. } => None,
        }
    }
}

/// One thing wrong with a config, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `[agent]`, `[dns]`, `policy "Company Wiki" (#2)`, ...
    pub place: String,
    /// The field, as written in the file: `check_session.duration`, `ports[1]`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, {}: {}", self.place, self.field, self.message)
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: FileError },
    #[error("config {path} is not valid TOML for sessiongate: {message}")]
    Syntax { path: String, message: String },
    #[error("config {path} has {} problem(s); nothing was loaded:\n{}", problems.len(), list(problems))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// A page of the portal's sign-in (`/login`, `/refresh-identity`), when identity
    /// providers are configured.
    pub fn portal_page(&self, path: &str) -> Option<String> {
        let url = self.agent.portal_url.as_ref()?;
        (!self.idps.is_empty()).then(|| format!("{url}{path}"))
    }

    /// Where users re-authenticate: that page of the portal's sign-in, else
    /// `reauth_url`.
    pub fn reauth_page(&self, path: &str) -> Option<String> {
        self.portal_page(path)
            .or_else(|| self.agent.reauth_url.clone())
    }

    /// Reads and validates a config file: a regular file of at most 64 MiB.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let source = path.display().to_string();
        let text = file::read_text(path, file::MAX_CONFIG_FILE, file::Accept::RegularFile)
            .map_err(|e| ConfigError::Read {
                path: source.clone(),
                source: e,
            })?;
        Self::parse(&text, &source)
    }

    /// Validates config text; `source` names it in messages.
    pub fn parse(text: &str, source: &str) -> Result<Self, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: source.to_string(),
            message: e.to_string(),
        })?;
        validate::validate(raw, source).map_err(|problems| ConfigError::Invalid {
            path: source.to_string(),
            problems,
        })
    }

    /// Whether some policy answers its refusals (reject or redirect) rather than
    /// dropping them: replies leave through the interface, which decides its XDP mode.
    pub fn answers_refusals(&self) -> bool {
        self.policies
            .iter()
            .any(|p| p.on_expired != OnExpired::Drop)
    }

    /// The policy a packet to `dst` meets, by the reference semantics the compiled
    /// tables implement: bypass destinations first (`None`), then the first matching
    /// policy by precedence. For explanations (the portal), not for the datapath.
    pub fn first_match(
        &self,
        dst: IpAddr,
        proto: Protocol,
        port: u16,
        who: Option<&Identity<'_>>,
    ) -> Option<usize> {
        if self.bypass.iter().any(|net| net.contains(&dst)) {
            return None;
        }
        self.policies
            .iter()
            .enumerate()
            .filter(|(_, p)| p.matches_packet(dst, proto, port) && p.applies_to(who))
            .min_by_key(|(_, p)| p.precedence)
            .map(|(i, _)| i)
    }
}
