//! Config parsing: any text either loads or is refused with an error naming what is wrong; it
//! never panics, and a loaded config can be described (`check-config`).
#![no_main]

use std::path::Path;

use fencegate::config::{Config, Overrides};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text, Path::new("fuzz.toml"), Overrides::default()) {
        Ok(config) => {
            let described = fencegate::cli::check_config::describe(&config);
            assert!(described.contains("routes (the first match wins):"));
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
});
