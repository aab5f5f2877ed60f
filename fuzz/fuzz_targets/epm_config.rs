#![no_main]
//! Fuzz target `epm_config`: see `ipcbus_fuzz::epm_config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcbus_fuzz::epm_config(data));
