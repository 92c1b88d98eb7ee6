//! A duration as configs write them (`1h30m0s`, `90m`, `1.5h`, `7d`): parsing never
//! panics, and what parses prints as a duration that parses back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessiongate::config::GoDuration;

fuzz_target!(|text: &str| {
    if let Ok(d) = text.parse::<GoDuration>() {
        let shown = d.to_string();
        let again: GoDuration = shown
            .parse()
            .unwrap_or_else(|e| panic!("{text:?} parsed, but its display {shown:?} does not: {e}"));
        assert_eq!(again, d, "{text:?} -> {shown:?}");
    }
});
