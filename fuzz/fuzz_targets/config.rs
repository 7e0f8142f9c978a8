//! Any text as a config file: validation never panics and every error names the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let env = |k: &str| (k == "HOME").then(|| "/nonexistent".to_string());
    if let Err(e) = tokenrelay::Config::from_toml(text, "fuzz.toml", &env) {
        assert!(e.to_string().starts_with("fuzz.toml"));
    }
});
