#![no_main]
//! Fuzz target `salt`: see `ipcbus_fuzz::salt`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcbus_fuzz::salt(data));
