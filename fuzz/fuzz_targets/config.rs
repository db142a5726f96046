//! Any text as a config file: loading never panics, and a file that loads
//! loads the same way twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::Config;

fuzz_target!(|text: &str| {
    let env = |name: &str| (name == "SECRET").then(|| "0123456789abcdef".to_string());
    let first = Config::parse(text, "fuzz.toml", &env);
    let second = Config::parse(text, "fuzz.toml", &env);
    assert_eq!(
        first.as_ref().map(|c| c.summary()).map_err(|e| e.to_string()),
        second.as_ref().map(|c| c.summary()).map_err(|e| e.to_string())
    );
});
