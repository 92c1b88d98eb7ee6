//! Prompts before expiry (`notify_before`): which devices opened flows under which
//! session-checked policies lately, and which of those pairs are due a prompt because
//! the device's session runs out for the policy within `notify_before`.
//!
//! The kernel reports a pair's use at most once a minute
//! (`agent_common::logic::USE_REPORT_INTERVAL_NS`), so a pair counts as in use for
//! `notify_before` plus that minute after its last report. A pair is prompted once per
//! authentication: re-authenticating starts its count again. A session already past
//! the policy's duration gets no prompt here: its refusals prompt (`notify`).

use std::{collections::HashMap, net::IpAddr, time::Duration};

use agent_common::logic::USE_REPORT_INTERVAL_NS;
use time::OffsetDateTime;

/// (device, policy) pairs held at most; a new pair beyond it is not tracked (and
/// counted), so a flood of devices cannot grow the agent without bound.
pub const MAX_PAIRS: usize = 262_144;

/// How a device's session stands against one policy now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Standing {
    /// Until the session stops satisfying the policy; negative once it has.
    pub left_ns: i64,
    /// The authentication it counts from: a new one makes the pair due again.
    pub authenticated_at: OffsetDateTime,
}

/// A pair due a prompt now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    pub device: IpAddr,
    pub policy: String,
    pub standing: Standing,
}

#[derive(Debug)]
struct Use {
    /// Boot-clock time of the pair's latest use report.
    last_used_ns: i64,
    /// The authentication the pair was last prompted for.
    prompted_for: Option<OffsetDateTime>,
}

/// The pairs in use lately; owned by the control layer, fed by the event loop.
#[derive(Debug, Default)]
pub struct RecentUse {
    pairs: HashMap<(IpAddr, String), Use>,
    /// New pairs not tracked because `MAX_PAIRS` were held.
    pub untracked: u64,
    /// Pairs found due, since start.
    pub prompted: u64,
}

/// For `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpiryStats {
    pub pairs: usize,
    pub prompted: u64,
    pub untracked: u64,
}

impl RecentUse {
    /// Records a use report of `device` under `policy` at boot-clock time `at_ns`.
    pub fn used(&mut self, device: IpAddr, policy: String, at_ns: i64) {
        let key = (device, policy);
        if let Some(pair) = self.pairs.get_mut(&key) {
            pair.last_used_ns = pair.last_used_ns.max(at_ns);
            return;
        }
        if self.pairs.len() >= MAX_PAIRS {
            self.untracked += 1;
            return;
        }
        self.pairs.insert(
            key,
            Use {
                last_used_ns: at_ns,
                prompted_for: None,
            },
        );
    }

    /// The pairs to prompt now (boot-clock `now_ns`), each marked so it is not prompted
    /// again for the same authentication. Pairs not used within the window are
    /// forgotten. `standing` answers for a pair, `None` when the device has no session
    /// or the policy no longer checks sessions.
    pub fn due(
        &mut self,
        now_ns: i64,
        before: Duration,
        mut standing: impl FnMut(IpAddr, &str) -> Option<Standing>,
    ) -> Vec<Due> {
        let before_ns = i64::try_from(before.as_nanos()).unwrap_or(i64::MAX);
        let window_ns = before_ns.saturating_add(USE_REPORT_INTERVAL_NS as i64);
        let mut due = Vec::new();
        self.pairs.retain(|(device, policy), pair| {
            if now_ns.saturating_sub(pair.last_used_ns) > window_ns {
                return false;
            }
            let Some(now) = standing(*device, policy) else {
                return false;
            };
            let expiring = now.left_ns > 0 && now.left_ns <= before_ns;
            if expiring && pair.prompted_for != Some(now.authenticated_at) {
                pair.prompted_for = Some(now.authenticated_at);
                due.push(Due {
                    device: *device,
                    policy: policy.clone(),
                    standing: now,
                });
            }
            true
        });
        self.prompted += due.len() as u64;
        due
    }

    pub fn stats(&self) -> ExpiryStats {
        ExpiryStats {
            pairs: self.pairs.len(),
            prompted: self.prompted,
            untracked: self.untracked,
        }
    }

    pub fn clear(&mut self) {
        self.pairs.clear();
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;
    const MINUTE: i64 = 60 * S;

    fn device(n: u8) -> IpAddr {
        IpAddr::from([198, 18, 1, n])
    }

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + seconds).unwrap()
    }

    fn due_names(d: &[Due]) -> Vec<(IpAddr, &str)> {
        d.iter().map(|d| (d.device, d.policy.as_str())).collect()
    }

    #[test]
    fn a_used_pair_is_prompted_once_within_notify_before() {
        let mut recent = RecentUse::default();
        let before = Duration::from_secs(600);
        recent.used(device(1), "App".into(), 0);
        let standing = |left_ns| {
            move |_: IpAddr, _: &str| {
                Some(Standing {
                    left_ns,
                    authenticated_at: at(0),
                })
            }
        };
        // Eleven minutes left: not yet.
        assert!(recent.due(S, before, standing(11 * MINUTE)).is_empty());
        // Ten minutes left: prompted, then never again for the same authentication.
        let due = recent.due(2 * S, before, standing(10 * MINUTE));
        assert_eq!(due_names(&due), [(device(1), "App")]);
        assert_eq!(due[0].standing.left_ns, 10 * MINUTE);
        assert!(recent.due(3 * S, before, standing(9 * MINUTE)).is_empty());
        // Past its duration: the refusals prompt, not this.
        assert!(recent.due(4 * S, before, standing(-S)).is_empty());
        assert_eq!(recent.len(), 1);
    }

    #[test]
    fn re_authenticating_makes_the_pair_due_again() {
        let mut recent = RecentUse::default();
        let before = Duration::from_secs(600);
        recent.used(device(1), "App".into(), 0);
        let standing = |authenticated_at| {
            move |_: IpAddr, _: &str| {
                Some(Standing {
                    left_ns: 5 * MINUTE,
                    authenticated_at,
                })
            }
        };
        assert_eq!(recent.due(S, before, standing(at(0))).len(), 1);
        assert_eq!(recent.due(2 * S, before, standing(at(0))).len(), 0);
        assert_eq!(recent.due(3 * S, before, standing(at(3600))).len(), 1);
    }

    #[test]
    fn pairs_not_used_lately_or_without_a_session_are_forgotten() {
        let mut recent = RecentUse::default();
        let before = Duration::from_secs(600);
        recent.used(device(1), "App".into(), 0);
        recent.used(device(2), "App".into(), 0);
        // Later reports keep devices 2's and 3's pairs in use.
        recent.used(device(2), "App".into(), 9 * MINUTE);
        recent.used(device(3), "Gone".into(), 9 * MINUTE);
        let mut asked = Vec::new();
        let due = recent.due(11 * MINUTE + S, before, |device, policy| {
            asked.push(device);
            (policy != "Gone").then_some(Standing {
                left_ns: 20 * MINUTE,
                authenticated_at: at(0),
            })
        });
        assert!(due.is_empty());
        // Device 1 was last used 11 minutes ago (the window is 10 + 1): not asked.
        asked.sort();
        assert_eq!(asked, [device(2), device(3)]);
        assert_eq!(recent.len(), 1, "device 3's policy checks sessions no more");
    }

    #[test]
    fn the_number_of_pairs_is_bounded() {
        let mut recent = RecentUse::default();
        for i in 0..MAX_PAIRS as u32 + 5 {
            recent.used(IpAddr::from(i.to_be_bytes()), "App".into(), 0);
        }
        assert_eq!(recent.len(), MAX_PAIRS);
        assert_eq!(recent.untracked, 5);
        // A pair already held is still refreshed.
        recent.used(IpAddr::from(0u32.to_be_bytes()), "App".into(), 7);
        assert_eq!(recent.untracked, 5);
        recent.clear();
        assert!(recent.is_empty());
    }
}
