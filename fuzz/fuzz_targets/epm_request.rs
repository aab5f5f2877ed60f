#![no_main]
//! Fuzz target `epm_request`: see `ipcbus_fuzz::epm_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcbus_fuzz::epm_request(data));
