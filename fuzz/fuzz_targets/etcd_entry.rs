//! A fleet store's key and value, as an identity provider's hook or an attacker with
//! write access to etcd might write them: decoding never panics, a key names a device
//! only in its canonical form, and a value that decodes is encoded back to one that
//! decodes to the same session.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessiongate::{clock::ClockPair, fleet::entry};

fuzz_target!(|input: (&[u8], &[u8])| {
    let (key, value) = input;
    let layout = entry::Layout::new("/sessiongate");
    if let Ok(ip) = layout.device(key) {
        assert_eq!(
            layout.key(ip).as_bytes(),
            key,
            "a key that is not canonical"
        );
    }
    let ip = "198.18.1.10".parse().unwrap();
    let clock = ClockPair::now();
    if let Ok(record) = entry::decode(ip, value, &clock, "fuzz") {
        let again = entry::decode(ip, &entry::encode(&record), &clock, "fuzz")
            .expect("an encoded session decodes");
        assert_eq!((&again.user, &again.idp), (&record.user, &record.idp));
    }
});
