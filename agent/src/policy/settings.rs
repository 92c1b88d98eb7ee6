//! The config's `SG_SETTINGS`: everything the programs read apart from policies and
//! sessions. The table geometry (index masks) is the loaded datapath's own, which
//! `Maps` fills in when it writes them.

use std::net::IpAddr;

use agent_common::{
    addr::{Ip4, Ip6},
    logic::reply_tolerance,
    maps::{Settings, UNKNOWN_DEVICE_ALLOW, UNKNOWN_DEVICE_ENFORCE, add_port},
};
use bytemuck::Zeroable;

use crate::config::{Config, OnExpired, UnknownDevice};

/// `SG_SETTINGS` for a config.
pub fn settings(config: &Config) -> Settings {
    let mut settings = Settings::zeroed();
    settings.udp_idle_ns = config.agent.udp_idle_timeout.as_nanos_u64();
    settings.unknown_device = match config.agent.unknown_device {
        UnknownDevice::Enforce => UNKNOWN_DEVICE_ENFORCE,
        UnknownDevice::Allow => UNKNOWN_DEVICE_ALLOW,
    };
    for &port in &config.dns.ports {
        settings.set_dns_port(port);
    }
    // Use reports cost the kernel a slot check per admitted new flow: only when wanted.
    let checks_sessions = config.policies.iter().any(|p| p.duration().is_some());
    settings.report_use = u16::from(config.agent.notify_before.is_some() && checks_sessions);
    let replies = config.agent.replies;
    settings.reply_interval_ns = 1_000_000_000 / u64::from(replies.rate.max(1));
    settings.reply_tolerance_ns = reply_tolerance(settings.reply_interval_ns, replies.burst);
    if let Some(portal) = config.agent.portal_listen {
        settings.portal_port = portal.port();
        // The TC program looks the listener up by this address; a `[::]` listener
        // takes IPv4 too.
        match portal.ip() {
            IpAddr::V4(v4) => settings.portal_v4 = Ip4::from_octets(v4.octets()),
            IpAddr::V6(v6) => {
                settings.portal_v6 = Ip6::from_octets(v6.octets());
                if let Some(v4) = v6.to_ipv4_mapped() {
                    settings.portal_v4 = Ip4::from_octets(v4.octets());
                }
            }
        }
        let redirecting = config
            .policies
            .iter()
            .filter(|p| p.on_expired == OnExpired::Redirect);
        for port in redirecting.flat_map(|p| &p.redirect_ports) {
            add_port(&mut settings.redirect_ports, *port);
        }
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(agent: &str, policies: &str) -> Config {
        let text = format!("[agent]\ninterfaces = [\"t0\"]\n{agent}\n{policies}");
        Config::parse(&text, "test").unwrap()
    }

    #[test]
    fn the_config_reaches_the_kernel_settings() {
        let s = settings(&config(
            "unknown_device = \"allow\"\nudp_idle_timeout = \"30s\"",
            "",
        ));
        assert_eq!(s.unknown_device, UNKNOWN_DEVICE_ALLOW);
        assert_eq!(s.udp_idle_ns, 30_000_000_000);
        assert!(
            s.is_dns_port(53),
            "DNS is never affected, by default on port 53"
        );
        assert!(!s.is_dns_port(80));
        assert_eq!(s.portal_port, 0, "no portal: redirect policies reject");
        assert_eq!(s.session_bucket_mask, 0, "the geometry is the datapath's");
        assert_eq!(s.report_use, 0, "no notify_before: no use reports");
    }

    #[test]
    fn use_reports_only_with_notify_before_and_a_session_checked_policy() {
        let policy = "[[policy]]\nname = \"App\"\nprecedence = 1\ndestinations = [\"198.19.0.0/16\"]\ncheck_session = { enforce = true, duration = \"1h\" }";
        let unlimited =
            "[[policy]]\nname = \"App\"\nprecedence = 1\ndestinations = [\"198.19.0.0/16\"]";
        assert_eq!(
            settings(&config("notify_before = \"10m\"", policy)).report_use,
            1
        );
        assert_eq!(settings(&config("", policy)).report_use, 0);
        assert_eq!(
            settings(&config("notify_before = \"10m\"", unlimited)).report_use,
            0
        );
    }

    #[test]
    fn a_dual_stack_portal_is_found_from_both_families_on_its_redirect_ports() {
        let s = settings(&config(
            "portal_listen = \"[::ffff:198.18.0.1]:8511\"\nreauth_url = \"https://idp.example/\"",
            "[[policy]]\nname = \"web\"\nprecedence = 1\ndestinations = [\"198.18.5.0/24\"]\ncheck_session = { enforce = true, duration = \"1h\" }\non_expired = \"redirect\"\nredirect_ports = [80, 8080]",
        ));
        assert_eq!(s.portal_port, 8511);
        assert_eq!(s.portal_v4, Ip4::from_octets([198, 18, 0, 1]));
        assert!(s.is_redirect_port(80) && s.is_redirect_port(8080));
        assert!(!s.is_redirect_port(443));
        assert_eq!(
            settings(&config("", "")).unknown_device,
            UNKNOWN_DEVICE_ENFORCE
        );
    }
}
