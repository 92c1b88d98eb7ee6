//! Verdicts and counters. Every number here is a stable code: it indexes
//! `SG_COUNTERS`, appears in refusal events and in the agent's output, and is never
//! reused for another meaning. New codes take the next free number.

/// What the program decided for one packet, and why.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not IPv4/IPv6, or an IP protocol other than TCP and UDP.
    PassedOtherProtocol = 0,
    /// Truncated or malformed headers: never judged, never aborted.
    PassedMalformed = 1,
    /// A non-first fragment: it carries no L4 header to judge.
    PassedFragment = 2,
    /// TCP or UDP to a configured DNS port: DNS is never affected.
    PassedDns = 3,
    /// Destination is a configured bypass (identity provider, team domain).
    PassedBypass = 4,
    /// No policy covers the destination, protocol and port.
    PassedNoPolicy = 5,
    /// The first matching policy does not check sessions (unlimited).
    PassedUnlimited = 6,
    /// A packet of a flow admitted earlier: TCP without a bare SYN, or a tracked UDP flow.
    PassedEstablished = 7,
    /// A new flow from a device whose session is valid for the policy.
    AdmittedNewFlow = 8,
    /// A new flow from a device with no session, with `unknown_device = "allow"`.
    AdmittedUnknownDevice = 9,
    /// A new flow refused: the device's session is older than the policy allows.
    DroppedExpired = 10,
    /// A new flow refused: the device has no session (`unknown_device = "enforce"`).
    DroppedUnknownDevice = 11,
    /// A packet whose L4 header cannot be read (a first fragment too short to show it,
    /// an IPv6 header chain longer than the program follows, a truncated or malformed
    /// TCP/UDP header, a TCP fragment that would overwrite its header's flags), to a
    /// destination under a session-checked policy: judged as a new flow against the
    /// strictest such policy, and admitted (a valid session, or an unknown device
    /// with `unknown_device = "allow"`).
    AdmittedUnreadable = 12,
    /// Such a packet refused: the device's session is not valid for that policy.
    DroppedUnreadable = 13,
}

impl Verdict {
    /// Every verdict, in code order.
    pub const ALL: [Self; 14] = [
        Self::PassedOtherProtocol,
        Self::PassedMalformed,
        Self::PassedFragment,
        Self::PassedDns,
        Self::PassedBypass,
        Self::PassedNoPolicy,
        Self::PassedUnlimited,
        Self::PassedEstablished,
        Self::AdmittedNewFlow,
        Self::AdmittedUnknownDevice,
        Self::DroppedExpired,
        Self::DroppedUnknownDevice,
        Self::AdmittedUnreadable,
        Self::DroppedUnreadable,
    ];

    /// The counter slot (and stable code) of this verdict.
    #[inline(always)]
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// Whether the packet is refused.
    #[inline(always)]
    pub const fn is_refusal(self) -> bool {
        matches!(
            self,
            Self::DroppedExpired | Self::DroppedUnknownDevice | Self::DroppedUnreadable
        )
    }

    /// The name used in metrics, stats and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PassedOtherProtocol => "passed_other_protocol",
            Self::PassedMalformed => "passed_malformed",
            Self::PassedFragment => "passed_fragment",
            Self::PassedDns => "passed_dns",
            Self::PassedBypass => "passed_bypass",
            Self::PassedNoPolicy => "passed_no_policy",
            Self::PassedUnlimited => "passed_unlimited",
            Self::PassedEstablished => "passed_established",
            Self::AdmittedNewFlow => "admitted_new_flow",
            Self::AdmittedUnknownDevice => "admitted_unknown_device",
            Self::DroppedExpired => "dropped_expired",
            Self::DroppedUnknownDevice => "dropped_unknown_device",
            Self::AdmittedUnreadable => "admitted_unreadable",
            Self::DroppedUnreadable => "dropped_unreadable",
        }
    }

    /// The verdict with this code, if there is one.
    pub const fn from_code(code: u32) -> Option<Self> {
        if (code as usize) < Self::ALL.len() {
            Some(Self::ALL[code as usize])
        } else {
            None
        }
    }
}

/// Counter slots after the verdicts, for the event path. Stable like the verdict codes.
pub mod counter {
    /// Refusal events written to the ring buffer.
    pub const EVENTS_SENT: u32 = 16;
    /// Refusals not reported because the same device and policy had an event less than
    /// a second ago.
    pub const EVENTS_RATE_LIMITED: u32 = 17;
    /// Events (refusals and use reports) lost because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 18;

    /// TCP RSTs sent for refused SYNs (`on_expired = "reject"`).
    pub const REPLIES_TCP_RESET: u32 = 19;
    /// ICMP / ICMPv6 administratively-prohibited errors sent for refused UDP.
    pub const REPLIES_ICMP: u32 = 20;
    /// Refusals that would have been answered (or redirected) but were dropped: the
    /// device had used up its reply rate.
    pub const REPLIES_RATE_LIMITED: u32 = 21;
    /// Refusals that could not be answered (the packet could not be reshaped) and
    /// were dropped.
    pub const REPLIES_FAILED: u32 = 22;
    /// Refused SYNs handed to the portal (XDP).
    pub const PORTAL_REDIRECTED: u32 = 23;
    /// Redirected SYNs the TC program delivered to the portal's listener.
    pub const PORTAL_DELIVERED: u32 = 24;
    /// Redirected SYNs dropped because no portal listener was there (agent down).
    pub const PORTAL_UNAVAILABLE: u32 = 25;
    /// Later packets of portal connections the TC program kept on the local host.
    pub const PORTAL_FOLLOWED: u32 = 26;

    /// Use reports written to the ring buffer (`Settings::report_use`).
    pub const USE_REPORTS: u32 = 27;

    /// Size of `SG_COUNTERS`: verdicts, event counters, and room to grow.
    pub const SLOTS: u32 = 32;

    /// Names of the event counters, for stats output.
    pub const EVENTS: [(u32, &str); 4] = [
        (EVENTS_SENT, "events_sent"),
        (EVENTS_RATE_LIMITED, "events_rate_limited"),
        (EVENTS_LOST, "events_lost"),
        (USE_REPORTS, "events_use_reports"),
    ];

    /// Names of the visible-refusal counters (replies and the portal).
    pub const REPLIES: [(u32, &str); 8] = [
        (REPLIES_TCP_RESET, "replies_tcp_reset"),
        (REPLIES_ICMP, "replies_icmp"),
        (REPLIES_RATE_LIMITED, "replies_rate_limited"),
        (REPLIES_FAILED, "replies_failed"),
        (PORTAL_REDIRECTED, "portal_redirected"),
        (PORTAL_DELIVERED, "portal_delivered"),
        (PORTAL_UNAVAILABLE, "portal_unavailable"),
        (PORTAL_FOLLOWED, "portal_followed"),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_dense_stable_and_round_trip() {
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(v.code() as usize, i, "{v:?} out of order");
            assert_eq!(Verdict::from_code(v.code()), Some(*v));
        }
        assert_eq!(Verdict::from_code(Verdict::ALL.len() as u32), None);
        assert_eq!(Verdict::DroppedExpired.code(), 10, "codes are stable");
        assert_eq!(Verdict::DroppedUnreadable.code(), 13, "codes are stable");
        for &(slot, _) in counter::EVENTS.iter().chain(&counter::REPLIES) {
            assert!(slot as usize >= Verdict::ALL.len() && slot < counter::SLOTS);
        }
    }

    #[test]
    fn only_drops_are_refusals() {
        let refusals: Vec<_> = Verdict::ALL.iter().filter(|v| v.is_refusal()).collect();
        assert_eq!(
            refusals,
            [
                &Verdict::DroppedExpired,
                &Verdict::DroppedUnknownDevice,
                &Verdict::DroppedUnreadable
            ]
        );
    }
}
