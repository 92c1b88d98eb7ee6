use std::io::Write as _;

use super::*;

fn login(ip: &str, user: &str, idp: Option<&str>) -> LoginRequest {
    LoginRequest {
        ip: ip.parse().unwrap(),
        user: user.into(),
        idp: idp.map(Into::into),
        at: None,
    }
}

fn apply(store: &mut SessionStore, req: &LoginRequest) -> Result<SessionRecord, SessionError> {
    let record = store.plan_login(req, &ClockPair::now())?;
    store.commit_login(record.clone())?;
    Ok(record)
}

#[test]
fn a_login_binds_the_device_and_resets_the_timer_for_the_same_user() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SessionStore::open(dir.path()).unwrap();
    let mut old = login("198.18.1.10", "alice@example.com", Some("okta"));
    old.at = Some(OffsetDateTime::now_utc() - time::Duration::hours(3));
    let first = apply(&mut store, &old).unwrap();
    let again = apply(
        &mut store,
        &login("198.18.1.10", "alice@example.com", Some("okta")),
    )
    .unwrap();
    assert!(again.authenticated_at > first.authenticated_at);
    assert!(
        again.authenticated_at_boot_ns - first.authenticated_at_boot_ns
            >= 3 * 3_600_000_000_000 - 1_000_000_000
    );
    assert_eq!(store.len(), 1);
}

#[test]
fn another_user_or_another_idp_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SessionStore::open(dir.path()).unwrap();
    let alice = apply(
        &mut store,
        &login("198.18.1.10", "alice@example.com", Some("okta")),
    )
    .unwrap();

    let err = apply(
        &mut store,
        &login("198.18.1.10", "bob@example.com", Some("okta")),
    )
    .unwrap_err();
    assert!(matches!(err, SessionError::OtherUser { .. }), "{err}");
    assert!(
        err.to_string().contains("alice@example.com") && err.to_string().contains("logged out")
    );

    let err = apply(
        &mut store,
        &login("198.18.1.10", "alice@example.com", Some("azure")),
    )
    .unwrap_err();
    assert!(matches!(err, SessionError::WrongIdp { .. }), "{err}");
    assert!(err.to_string().contains("\"okta\""), "{err}");

    // No --idp means the default IdP, which is not the one this device enrolled with.
    let err = apply(&mut store, &login("198.18.1.10", "alice@example.com", None)).unwrap_err();
    assert!(matches!(err, SessionError::WrongIdp { .. }), "{err}");

    assert_eq!(store.get(&alice.ip), Some(&alice));
    assert_eq!(store.len(), 1);

    // After a logout the device is free for another user.
    store.commit_logout(&alice.ip).unwrap();
    apply(&mut store, &login("198.18.1.10", "bob@example.com", None)).unwrap();
    assert_eq!(store.get(&alice.ip).unwrap().user, "bob@example.com");
    assert_eq!(store.get(&alice.ip).unwrap().idp, DEFAULT_IDP);
}

#[test]
fn bad_names_future_times_and_unknown_logouts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SessionStore::open(dir.path()).unwrap();
    for user in ["", "two words", "tab\there"] {
        let err = apply(&mut store, &login("198.18.1.10", user, None)).unwrap_err();
        assert!(
            matches!(err, SessionError::InvalidName { field: "user", .. }),
            "{err}"
        );
    }
    let mut future = login("198.18.1.10", "alice@example.com", None);
    future.at = Some(OffsetDateTime::now_utc() + time::Duration::minutes(5));
    assert!(matches!(
        apply(&mut store, &future).unwrap_err(),
        SessionError::InFuture { .. }
    ));
    let ip: IpAddr = "198.18.1.99".parse().unwrap();
    assert!(matches!(
        store.commit_logout(&ip).unwrap_err(),
        SessionError::NotFound { .. }
    ));
    assert!(store.is_empty());
}

#[test]
fn back_dated_logins_convert_to_the_boot_clock() {
    let dir = tempfile::tempdir().unwrap();
    let store = SessionStore::open(dir.path()).unwrap();
    let clock = ClockPair::now();
    let mut req = login("2001:db8::10", "alice@example.com", None);
    req.at = Some(clock.wall - time::Duration::hours(2));
    let record = store.plan_login(&req, &clock).unwrap();
    assert_eq!(
        record.authenticated_at_boot_ns,
        clock.boot_ns - 2 * 3_600_000_000_000
    );
    // Same boot: the recorded boot time is used as is, whatever the wall clock says.
    let later = ClockPair {
        wall: clock.wall + time::Duration::days(30), // a wall-clock step
        boot_ns: clock.boot_ns + 1_000,
    };
    assert_eq!(
        record
            .kernel_value(&later, store.boot_id())
            .authenticated_at_ns,
        record.authenticated_at_boot_ns
    );
    // Another boot: converted from wall-clock time.
    assert_eq!(
        record
            .kernel_value(&later, "another-boot")
            .authenticated_at_ns,
        later.boot_ns_of(record.authenticated_at)
    );
}

#[test]
fn sessions_survive_reopening_and_a_torn_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob);
    {
        let mut store = SessionStore::open(dir.path()).unwrap();
        alice = apply(&mut store, &login("198.18.1.10", "alice@example.com", None)).unwrap();
        bob = apply(
            &mut store,
            &login("2001:db8::20", "bob@example.com", Some("okta")),
        )
        .unwrap();
        apply(&mut store, &login("198.18.1.30", "carol@example.com", None)).unwrap();
        store
            .commit_logout(&"198.18.1.30".parse().unwrap())
            .unwrap();
    }
    let path = dir.path().join("sessions.jsonl");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(b"{\"op\":\"login\",\"ip\":\"198.18")
        .unwrap();
    drop(file);

    let store = SessionStore::open(dir.path()).unwrap();
    assert_eq!(store.len(), 2);
    assert_eq!(store.get(&alice.ip), Some(&alice));
    assert_eq!(store.get(&bob.ip), Some(&bob));
    // Reopening compacted the file: one line per live session.
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
}

#[test]
fn a_corrupt_line_in_the_middle_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sessions.jsonl"),
        "{\"op\":\"logout\",\"ip\":\"198.18.0.1\"}\nnot json\n{\"op\":\"logout\",\"ip\":\"198.18.0.2\"}\n",
    )
    .unwrap();
    let err = SessionStore::open(dir.path())
        .err()
        .expect("corrupt journal");
    assert!(
        matches!(err, SessionError::Corrupt { line: 2, .. }),
        "{err}"
    );
}

#[test]
fn the_journal_is_compacted_when_dead_lines_pile_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SessionStore::open(dir.path()).unwrap();
    for _ in 0..1500 {
        apply(&mut store, &login("198.18.1.10", "alice@example.com", None)).unwrap();
    }
    let lines = std::fs::read_to_string(dir.path().join("sessions.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(lines < 1100, "{lines} lines for one session");
}
