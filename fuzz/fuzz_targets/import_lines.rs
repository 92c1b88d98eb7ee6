//! An import file (CSV or JSON lines): every line is a record or an error naming a
//! line that exists, and nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessiongate::sessions::import;

fuzz_target!(|text: &str| {
    let parsed = import::parse(text);
    let lines = text.split('\n').count();
    for error in &parsed.errors {
        assert!(
            error.line >= 1 && error.line <= lines,
            "error on line {} of {lines}",
            error.line
        );
    }
});
