//! The session mirror keeps its two sides equal: every change that fails, in the kernel
//! or in the journal, leaves both as they were, whether it came from the API (login,
//! logout, import) or from the fleet's store (a change, a full snapshot).

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use agent_common::maps::Session;

use super::{
    testing::{Faults, SharedKernel, faulty, journal, request, sorted},
    *,
};
use crate::clock::Laps;

/// A mirror over a journal that fails on demand and a kernel the test can see.
struct Fixture {
    dir: tempfile::TempDir,
    mirror: SessionMirror<SharedKernel>,
    kernel: SharedKernel,
    faults: Arc<Faults>,
}

/// Everything the two sides hold: the kernel's sessions, the store's, the journal.
#[derive(Debug, PartialEq)]
struct Sides {
    /// The kernel's session times (identity slots change on every write).
    kernel: BTreeMap<IpAddr, i64>,
    store: Vec<SessionRecord>,
    journal: String,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(Faults::default());
        let store = SessionStore::open_with(dir.path(), faulty(&faults)).unwrap();
        let kernel = SharedKernel::default();
        let (mirror, _) = SessionMirror::start(store, kernel.clone(), dir.path(), false).unwrap();
        Self {
            dir,
            mirror,
            kernel,
            faults,
        }
    }

    fn sides(&self) -> Sides {
        Sides {
            kernel: self.kernel.with(|k| {
                k.sessions
                    .iter()
                    .map(|(ip, s)| (*ip, s.authenticated_at_ns))
                    .collect()
            }),
            store: self.mirror.read(sorted),
            journal: journal(self.dir.path()),
        }
    }

    fn login(&self, ip: &str, user: &str) -> Result<SessionRecord, ChangeError> {
        self.mirror.login(&request(ip, user), &ClockPair::now())
    }

    /// A session as the fleet's store would send it.
    fn store_session(&self, ip: &str, user: &str) -> SessionRecord {
        plan_login(
            None,
            &request(ip, user),
            &ClockPair::now(),
            self.mirror.boot_id(),
        )
        .unwrap()
    }

    /// Puts a configuration with one identity condition (group "finance") in force;
    /// the fake kernel checks that the masks go to exactly the slots its sessions
    /// hold. Returns each device's mask.
    fn switch_to_finance(&self) -> BTreeMap<IpAddr, u64> {
        let finance = crate::config::IdentityCondition {
            users: None,
            user_matches: None,
            groups: Some(vec!["finance".into()]),
            idps: None,
        };
        let mut switched = false;
        self.mirror
            .switch_config(
                vec![finance],
                &mut switched,
                |_| Ok::<_, crate::datapath::DatapathError>(1),
                |switched| {
                    *switched = true;
                    Ok(())
                },
            )
            .unwrap();
        assert!(switched);
        self.kernel.with(|k| {
            k.sessions
                .iter()
                .map(|(ip, s)| (*ip, k.prepared[&s.identity]))
                .collect()
        })
    }

    /// Every kind of change, each expected to fail and to leave both sides as they
    /// were.
    fn every_change_fails_and_changes_nothing(&self, alice: &SessionRecord) {
        let before = self.sides();
        let clock = ClockPair::now();
        assert!(self.login("198.18.1.11", "bob@example.com").is_err());
        assert_eq!(self.sides(), before, "a login");
        assert!(self.mirror.logout(alice.ip, &clock).is_err());
        assert_eq!(self.sides(), before, "a logout");
        let carol = self.store_session("198.18.1.12", "carol@example.com");
        let imported = self.mirror.import(&clock, &mut Laps::start(), |_| {
            Ok::<_, ChangeError>((vec![carol.clone()], ()))
        });
        assert!(imported.is_err());
        assert_eq!(self.sides(), before, "an import");
        assert_eq!(self.mirror.apply(vec![StoreChange::Put(carol)], 7), 1);
        assert_eq!(self.sides(), before, "a session from the fleet's store");
        assert_eq!(self.mirror.apply(vec![StoreChange::Delete(alice.ip)], 8), 1);
        assert_eq!(self.sides(), before, "a logout from the fleet's store");
        let diff = self.mirror.resync(Vec::new());
        assert_eq!(diff.not_applied, 1, "{diff:?}");
        assert_eq!(self.sides(), before, "a snapshot of the fleet's store");
    }
}

#[test]
fn a_failing_kernel_write_leaves_both_sides_as_they_were() {
    let f = Fixture::new();
    let alice = f.login("198.18.1.10", "alice@example.com").unwrap();
    f.kernel.with(|k| k.fail = true);
    f.every_change_fails_and_changes_nothing(&alice);
}

#[test]
fn a_failing_journal_write_leaves_both_sides_as_they_were() {
    let f = Fixture::new();
    let alice = f.login("198.18.1.10", "alice@example.com").unwrap();
    f.faults.space(Some(0));
    f.every_change_fails_and_changes_nothing(&alice);

    // Room again: every kind of change goes through on both sides.
    f.faults.space(None);
    let bob = f.login("198.18.1.11", "bob@example.com").unwrap();
    let carol = f.store_session("198.18.1.12", "carol@example.com");
    assert_eq!(f.mirror.apply(vec![StoreChange::Put(carol)], 9), 0);
    f.mirror.logout(alice.ip, &ClockPair::now()).unwrap();
    let sides = f.sides();
    let devices: Vec<IpAddr> = sides.kernel.keys().copied().collect();
    let stored: Vec<IpAddr> = sides.store.iter().map(|r| r.ip).collect();
    assert_eq!(devices, [bob.ip, "198.18.1.12".parse().unwrap()]);
    assert_eq!(stored, devices);
    drop(f.mirror);
    let replayed = SessionStore::open(f.dir.path()).unwrap();
    assert_eq!(sorted(&replayed), sides.store);
}

#[test]
fn a_configuration_s_identity_masks_reach_every_session_after_changes_failed_and_were_undone() {
    let f = Fixture::new();
    let mut alice = request("198.18.1.10", "alice@example.com");
    alice.groups = vec!["finance".into()];
    let alice = f.mirror.login(&alice, &ClockPair::now()).unwrap();
    f.kernel.with(|k| k.fail = true);
    f.every_change_fails_and_changes_nothing(&alice);
    f.kernel.with(|k| k.fail = false);
    f.faults.space(Some(0));
    f.every_change_fails_and_changes_nothing(&alice);
    f.faults.space(None);
    // Logins, an import replacing one session and adding one, and a logout.
    let bob = f.login("198.18.1.11", "bob@example.com").unwrap();
    f.login("198.18.1.11", "bob@example.com").unwrap();
    let mut carol = f.store_session("198.18.1.12", "carol@example.com");
    carol.groups = vec!["finance".into()];
    let mut alice_again = f.store_session("198.18.1.10", "alice@example.com");
    alice_again.groups = vec!["staff".into()];
    f.mirror
        .import(&ClockPair::now(), &mut Laps::start(), |_| {
            Ok::<_, ChangeError>((vec![carol.clone(), alice_again], ()))
        })
        .unwrap();
    let masks = f.switch_to_finance();
    assert_eq!(
        masks,
        BTreeMap::from([(alice.ip, 0), (bob.ip, 0), (carol.ip, 1)])
    );
    f.mirror.logout(carol.ip, &ClockPair::now()).unwrap();
    assert_eq!(
        f.switch_to_finance(),
        BTreeMap::from([(alice.ip, 0), (bob.ip, 0)])
    );
}

#[test]
fn the_fleet_store_s_changes_reach_both_sides_and_a_known_session_is_left_alone() {
    let f = Fixture::new();
    let bob = f.store_session("198.18.1.11", "bob@example.com");
    assert_eq!(f.mirror.apply(vec![StoreChange::Put(bob.clone())], 3), 0);
    let after_put = f.sides();
    assert_eq!(after_put.store, std::slice::from_ref(&bob));
    assert!(after_put.kernel.contains_key(&bob.ip));

    // The same session again (a snapshot after a reconnect) writes nothing.
    let mut again = bob.clone();
    again.authenticated_at_boot_ns += 1;
    assert_eq!(f.mirror.apply(vec![StoreChange::Put(again)], 4), 0);
    assert_eq!(f.sides(), after_put);

    assert_eq!(f.mirror.apply(vec![StoreChange::Delete(bob.ip)], 5), 0);
    let sides = f.sides();
    assert!(
        sides.kernel.is_empty() && sides.store.is_empty(),
        "{sides:?}"
    );
}

#[test]
fn a_snapshot_removes_adds_and_falls_back_to_one_device_at_a_time() {
    let f = Fixture::new();
    let alice = f.login("198.18.1.10", "alice@example.com").unwrap();
    let bob = f.login("198.18.1.11", "bob@example.com").unwrap();
    let carol = f.store_session("198.18.1.12", "carol@example.com");
    // A kernel that refuses batches (a full map): each device goes on its own.
    f.kernel.with(|k| k.fail_batches = true);
    let diff = f
        .mirror
        .resync(vec![vec![bob.clone()], vec![carol.clone()]]);
    assert_eq!(
        diff,
        StoreDiff {
            added: 1,
            changed: 0,
            removed: 1,
            not_applied: 0
        }
    );
    let sides = f.sides();
    assert!(!sides.kernel.contains_key(&alice.ip));
    assert_eq!(sides.store, [bob, carol]);
    assert_eq!(
        sides.kernel.keys().collect::<Vec<_>>(),
        sides.store.iter().map(|r| &r.ip).collect::<Vec<_>>()
    );
}

/// The journal and kernel an agent left after logging in one device for each
/// `(address, user)` and stopping, with the records it wrote.
fn left_by_logins(
    logins: [(&str, &str); 2],
) -> (tempfile::TempDir, SharedKernel, [SessionRecord; 2]) {
    let dir = tempfile::tempdir().unwrap();
    let store = SessionStore::open(dir.path()).unwrap();
    let kernel = SharedKernel::default();
    let (mirror, _) = SessionMirror::start(store, kernel.clone(), dir.path(), false).unwrap();
    let records =
        logins.map(|(ip, user)| mirror.login(&request(ip, user), &ClockPair::now()).unwrap());
    mirror.close();
    (dir, kernel, records)
}

#[test]
fn an_adopted_kernel_is_made_equal_to_the_journal() {
    let (dir, kernel, [alice, bob]) = left_by_logins([
        ("198.18.1.10", "alice@example.com"),
        ("198.18.1.11", "bob@example.com"),
    ]);
    let held = |ip: &IpAddr| kernel.with(|k| k.sessions[ip]);
    let (bob_before, alice_before) = (held(&bob.ip), held(&alice.ip));

    // An earlier agent's maps: a change its journal never recorded, and a stale time.
    let stray: IpAddr = "198.18.1.99".parse().unwrap();
    kernel.with(|k| {
        k.sessions.insert(
            stray,
            Session {
                authenticated_at_ns: 1,
                ..Session::default()
            },
        );
        k.sessions.get_mut(&alice.ip).unwrap().authenticated_at_ns = 2;
    });
    let store = SessionStore::open(dir.path()).unwrap();
    let (mirror, removed) = SessionMirror::start(store, kernel.clone(), dir.path(), true).unwrap();
    assert_eq!(removed, 1);
    let clock = ClockPair::now();
    let expected = alice.kernel_value(&clock, mirror.boot_id());
    let sessions = kernel.with(|k| k.sessions.clone());
    assert_eq!(sessions.keys().collect::<Vec<_>>(), [&alice.ip, &bob.ip]);
    assert_eq!(
        sessions[&alice.ip].authenticated_at_ns,
        expected.authenticated_at_ns
    );
    assert_ne!(
        sessions[&alice.ip].identity, alice_before.identity,
        "rewritten"
    );
    assert_eq!(
        sessions[&bob.ip], bob_before,
        "already the journal's: left as it is"
    );
    // The mirror knows the slot bob's kernel copy holds: a logout frees it, a
    // configuration's masks go to it (the fake checks both).
    let masks = mirror.read(|store| store.table().masks(&[]));
    assert!(masks.0.contains(&bob_before.identity), "{masks:?}");
    mirror.logout(bob.ip, &ClockPair::now()).unwrap();
    assert!(kernel.with(|k| !k.sessions.contains_key(&bob.ip)));
}

#[test]
fn an_adopted_device_listed_twice_is_rewritten_once() {
    let (dir, kernel, [dave, erin]) = left_by_logins([
        ("198.18.1.30", "dave@example.com"),
        ("198.18.1.31", "erin@example.com"),
    ]);
    // An agent killed mid-renewal left dave two entries, both with the journal's time.
    let held = |ip: IpAddr| kernel.with(|k| k.sessions[&ip]);
    let (dave_before, erin_before) = (held(dave.ip), held(erin.ip));
    kernel.with(|k| k.duplicates.insert(dave.ip, dave_before));
    let store = SessionStore::open(dir.path()).unwrap();
    let (_mirror, removed) = SessionMirror::start(store, kernel.clone(), dir.path(), true).unwrap();
    assert_eq!(removed, 0);
    let dave_after = held(dave.ip);
    assert_eq!(
        dave_after.authenticated_at_ns,
        dave_before.authenticated_at_ns
    );
    assert_ne!(dave_after.identity, dave_before.identity, "rewritten");
    assert!(
        kernel.with(|k| k.duplicates.is_empty()),
        "the rewrite cleared the second entry"
    );
    assert_eq!(held(erin.ip), erin_before, "listed once: left as it is");
}

#[test]
fn an_adopted_session_of_an_earlier_boot_is_kept_within_the_conversion_slack() {
    let dir = tempfile::tempdir().unwrap();
    let store = SessionStore::open(dir.path()).unwrap();
    let kernel = SharedKernel::default();
    let (mirror, _) = SessionMirror::start(store, kernel.clone(), dir.path(), false).unwrap();
    // Two sessions that began before this boot (from the fleet's store, or from a
    // journal written before a reboot): their kernel time is converted from wall-clock
    // time.
    let earlier = |ip: &str| {
        let mut record = plan_login(
            None,
            &request(ip, "carol@example.com"),
            &ClockPair::now(),
            mirror.boot_id(),
        )
        .unwrap();
        record.boot_id = "an-earlier-boot".into();
        record
    };
    let (near, far) = (earlier("198.18.1.20"), earlier("198.18.1.21"));
    let changes = vec![
        StoreChange::Put(near.clone()),
        StoreChange::Put(far.clone()),
    ];
    assert_eq!(mirror.apply(changes, 1), 0);
    mirror.close();
    drop(mirror);
    // The kernel's times as another agent's clock readings converted them.
    kernel.with(|k| {
        k.sessions.get_mut(&near.ip).unwrap().authenticated_at_ns += 300_000;
        k.sessions.get_mut(&far.ip).unwrap().authenticated_at_ns += 5_000_000;
    });
    let held = |ip: IpAddr| kernel.with(|k| k.sessions[&ip]);
    let (near_before, far_before) = (held(near.ip), held(far.ip));
    let store = SessionStore::open(dir.path()).unwrap();
    let (_mirror, removed) = SessionMirror::start(store, kernel.clone(), dir.path(), true).unwrap();
    assert_eq!(removed, 0);
    assert_eq!(
        held(near.ip),
        near_before,
        "within the slack: left as it is"
    );
    let far_after = held(far.ip);
    assert_ne!(
        far_after.identity, far_before.identity,
        "beyond it: rewritten"
    );
    let converted = far_before.authenticated_at_ns - 5_000_000;
    assert!(
        far_after.authenticated_at_ns.abs_diff(converted) < 1_000_000,
        "{} against {converted}",
        far_after.authenticated_at_ns
    );
}
