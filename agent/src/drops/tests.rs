use super::*;

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

fn totals(drops: &PolicyDrops, live: [&[u64]; 2]) -> Vec<(String, u64)> {
    drops.totals(live)
}

fn pairs(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(n, c)| (n.to_string(), *c)).collect()
}

#[test]
fn a_policy_kept_across_reloads_keeps_its_count_whatever_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut drops = PolicyDrops::open(dir.path(), 7, 0);
    // The first configuration goes into set 1 (generation 1).
    drops.switching(1, &[], names(&["Wiki", "Mail"]));
    assert_eq!(drops.name(1, 0), Some("Wiki"));
    assert_eq!(
        totals(&drops, [&[], &[5, 2]]),
        pairs(&[("Mail", 2), ("Wiki", 5)])
    );
    // A reload into set 0: Wiki moves to index 1, Mail goes. Set 1 keeps counting
    // stragglers until the next reload overwrites it.
    drops.switching(2, &[0, 0], names(&["Chat", "Wiki"]));
    assert_eq!(
        totals(&drops, [&[1, 3], &[6, 2]]),
        pairs(&[("Chat", 1), ("Mail", 2), ("Wiki", 9)])
    );
    // The next reload overwrites set 1: its counts are folded in by name.
    drops.switching(3, &[6, 2], names(&["Wiki"]));
    assert_eq!(
        totals(&drops, [&[1, 3], &[0]]),
        pairs(&[("Chat", 1), ("Mail", 2), ("Wiki", 9)])
    );
}

#[test]
fn a_restart_on_the_same_datapath_keeps_every_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut drops = PolicyDrops::open(dir.path(), 7, 0);
    drops.switching(1, &[], names(&["Wiki"]));
    drops.switching(2, &[], names(&["Wiki", "Chat"]));
    drops.switching(3, &[4], names(&["Chat"]));
    // Kernel: generation 3 (set 1) holds [Chat], set 0 holds [Wiki, Chat].
    let live: [&[u64]; 2] = [&[2, 1], &[5]];
    let before = totals(&drops, live);
    assert_eq!(before, pairs(&[("Chat", 6), ("Wiki", 6)]));

    let again = PolicyDrops::open(dir.path(), 7, 3);
    assert_eq!(totals(&again, live), before);
    assert_eq!(again.name(0, 1), Some("Chat"));
}

#[test]
fn another_datapath_starts_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut drops = PolicyDrops::open(dir.path(), 7, 0);
    drops.switching(1, &[], names(&["Wiki"]));
    drops.switching(2, &[9], names(&["Wiki"]));
    let other = PolicyDrops::open(dir.path(), 8, 0);
    assert_eq!(totals(&other, [&[], &[]]), []);
    assert_eq!(other.name(1, 0), None);
}

#[test]
fn a_crash_around_a_switch_neither_loses_nor_counts_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut drops = PolicyDrops::open(dir.path(), 7, 0);
    drops.switching(1, &[], names(&["Wiki"]));
    drops.switching(2, &[], names(&["Wiki"]));
    // Generation 2 in force (set 0: 3 refusals), set 1 counted 4 before it.
    // Recorded, then the agent died before the kernel switched to generation 3: set 1
    // is half-written, its 4 already in the totals.
    drops.switching(3, &[4], names(&["Wiki", "New"]));
    let crashed = PolicyDrops::open(dir.path(), 7, 2);
    assert_eq!(
        totals(&crashed, [&[3], &[4, 0]]),
        pairs(&[("Wiki", 7)]),
        "set 1's slots are left out: their counts are in the totals"
    );
    assert_eq!(crashed.name(1, 1), None);

    // The other way round: the kernel switched to generation 4 but the record stayed at 3.
    let behind = PolicyDrops::open(dir.path(), 7, 4);
    assert_eq!(behind.name(0, 0), None, "what set 0 holds now is not known");
    assert_eq!(behind.name(1, 0), Some("Wiki"));
    assert_eq!(
        totals(&behind, [&[8], &[3, 1]]),
        pairs(&[("New", 1), ("Wiki", 7)])
    );
}

#[test]
fn a_failed_switch_leaves_the_set_it_was_to_write_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let mut drops = PolicyDrops::open(dir.path(), 7, 0);
    drops.switching(1, &[], names(&["Wiki"]));
    drops.switching(2, &[5], names(&["Wiki"]));
    drops.not_switched(1);
    assert_eq!(drops.name(0, 0), None);
    assert_eq!(totals(&drops, [&[0], &[2]]), pairs(&[("Wiki", 2)]));
    // And so it is recorded.
    let again = PolicyDrops::open(dir.path(), 7, 1);
    assert_eq!(totals(&again, [&[0], &[2]]), pairs(&[("Wiki", 2)]));
}

#[test]
fn an_unreadable_record_starts_from_zero_and_never_stops_a_start() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(FILE_NAME), "{not json").unwrap();
    let drops = PolicyDrops::open(dir.path(), 7, 3);
    assert_eq!(totals(&drops, [&[1], &[1]]), []);
}
