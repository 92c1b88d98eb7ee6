//! A config file: parsed, and when valid, compiled and linted as `check` and `run` do.
//! Nothing may panic; a valid config always compiles within its own limits or says why.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessiongate::{config::Config, policy};

fuzz_target!(|text: &str| {
    if let Ok(config) = Config::parse(text, "fuzz.toml")
        && let Ok(table) = policy::compile(&config)
    {
        let _ = policy::lint(&config, &table);
        let _ = policy::describe(&config, &table);
    }
});
