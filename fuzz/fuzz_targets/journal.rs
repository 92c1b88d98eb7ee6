//! The session journal as a crash, a full disk, an older version or an editor may leave
//! it: no content stops the agent from starting, every session it keeps meets the rules
//! any session must, and a second start reads the same sessions as the first (which may
//! have rewritten the file).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessiongate::sessions::{SessionStore, check_identity};

fuzz_target!(|journal: &[u8]| {
    let dir = std::env::temp_dir().join(format!("sessiongate-fuzz-journal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    std::fs::write(dir.join("sessions.jsonl"), journal).expect("the journal written");
    let read = |dir: &std::path::Path| {
        let store = SessionStore::open(dir)
            .unwrap_or_else(|e| panic!("a journal stopped the agent from starting: {e}"));
        let mut sessions: Vec<_> = store
            .records()
            .map(|r| (r.ip, r.user, r.idp, r.authenticated_at))
            .collect();
        sessions.sort_unstable_by_key(|s| s.0);
        sessions
    };
    let first = read(&dir);
    for (ip, user, idp, _) in &first {
        check_identity(*ip, user, idp)
            .unwrap_or_else(|e| panic!("replay kept a session the rules refuse: {e}"));
    }
    assert_eq!(read(&dir), first, "a second start read other sessions");
    let _ = std::fs::remove_dir_all(&dir);
});
