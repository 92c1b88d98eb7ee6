//! The `[store]` section: this host's journal, or a fleet's etcd with its TLS files.

use std::path::PathBuf;

use super::{Problems, fields::choice};
use crate::config::{DEFAULT_ETCD_PREFIX, EtcdConfig, EtcdTls, StoreConfig, raw::RawStore};

const PLACE: &str = "[store]";

pub(super) fn section(raw: RawStore, problems: &mut Problems) -> StoreConfig {
    let is_etcd = choice(
        raw.kind.as_deref(),
        &[("local", false), ("etcd", true)],
        false,
        (PLACE, "kind"),
        problems,
    );
    if !is_etcd {
        etcd_fields_unused(&raw, problems);
        return StoreConfig::Local;
    }
    let (endpoints, secure) = endpoints(raw.endpoints.unwrap_or_default(), problems);
    let prefix = prefix(raw.prefix, problems);
    let client = client_identity(raw.cert_file, raw.key_file, problems);
    let tls = tls(secure, raw.ca_file.map(PathBuf::from), client, problems);
    StoreConfig::Etcd(EtcdConfig {
        endpoints,
        prefix,
        tls,
    })
}

/// etcd's fields would go unused by a local store: say so rather than ignore them.
/// After an unknown kind only the kind is reported, as it may be the mistake.
fn etcd_fields_unused(raw: &RawStore, problems: &mut Problems) {
    for (field, given) in [
        ("endpoints", raw.endpoints.is_some()),
        ("prefix", raw.prefix.is_some()),
        ("ca_file", raw.ca_file.is_some()),
        ("cert_file", raw.cert_file.is_some()),
        ("key_file", raw.key_file.is_some()),
    ] {
        if given && matches!(raw.kind.as_deref(), None | Some("local")) {
            problems.add(PLACE, field, "only applies with kind = \"etcd\"");
        }
    }
}

/// The members' client URLs, and whether they are https: all of them or none.
fn endpoints(endpoints: Vec<String>, problems: &mut Problems) -> (Vec<String>, bool) {
    if endpoints.is_empty() {
        problems.add(
            PLACE,
            "endpoints",
            "list the etcd members' client URLs, e.g. [\"https://10.0.0.1:2379\"]",
        );
    }
    let mut https = Vec::new();
    for (i, url) in endpoints.iter().enumerate() {
        match etcd_endpoint(url) {
            Ok(secure) => https.push(secure),
            Err(reason) => problems.add(
                PLACE,
                format!("endpoints[{i}]"),
                format!("{url:?} {reason}"),
            ),
        }
    }
    let secure = https.first().copied().unwrap_or(false);
    if https.iter().any(|&s| s != secure) {
        problems.add(
            PLACE,
            "endpoints",
            "mixes http:// and https:// URLs; use one scheme for every member",
        );
    }
    (endpoints, secure)
}

/// Keys live under `{prefix}/devices/`, so the prefix is one clean absolute key path.
fn prefix(value: Option<String>, problems: &mut Problems) -> String {
    let prefix = value.unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_string());
    if !prefix.starts_with('/')
        || prefix.len() < 2
        || prefix.ends_with('/')
        || prefix.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        problems.add(
            PLACE,
            "prefix",
            format!("{prefix:?} is not a key prefix like \"/sessiongate\" (starts with '/', no trailing '/', no spaces)"),
        );
    }
    prefix
}

/// The agent's client certificate and its key: both or neither.
fn client_identity(
    cert_file: Option<String>,
    key_file: Option<String>,
    problems: &mut Problems,
) -> Option<(PathBuf, PathBuf)> {
    match (cert_file, key_file) {
        (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
        (None, None) => None,
        (Some(_), None) => {
            problems.add(
                PLACE,
                "key_file",
                "cert_file needs the key that goes with it",
            );
            None
        }
        (None, Some(_)) => {
            problems.add(
                PLACE,
                "cert_file",
                "key_file needs the certificate that goes with it",
            );
            None
        }
    }
}

/// https needs the CA to check the members by; over http the TLS files would go unused.
fn tls(
    secure: bool,
    ca_file: Option<PathBuf>,
    client: Option<(PathBuf, PathBuf)>,
    problems: &mut Problems,
) -> Option<EtcdTls> {
    match (secure, ca_file) {
        (true, Some(ca_file)) => Some(EtcdTls { ca_file, client }),
        (true, None) => {
            problems.add(
                PLACE,
                "ca_file",
                "https endpoints need the CA certificate (PEM) that signed the members' certificates",
            );
            None
        }
        (false, ca) => {
            if ca.is_some() || client.is_some() {
                problems.add(
                    PLACE,
                    "endpoints",
                    "ca_file, cert_file and key_file need https:// endpoints",
                );
            }
            None
        }
    }
}

/// Whether an etcd client URL is https (`Ok(true)`) or http; why it is neither.
fn etcd_endpoint(url: &str) -> Result<bool, &'static str> {
    let (secure, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err("must start with http:// or https://");
    };
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or("needs a port, e.g. http://10.0.0.1:2379")?;
    if host.is_empty() || host.contains(['/', ' ', '@']) {
        return Err("needs a host, e.g. http://10.0.0.1:2379");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(secure),
        _ => Err("needs a port from 1 to 65535 and no path"),
    }
}
