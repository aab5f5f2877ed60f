#![no_main]
//! Fuzz target `record`: see `ipcbus_fuzz::record`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcbus_fuzz::record(data));
