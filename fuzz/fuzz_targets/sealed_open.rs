#![no_main]
//! Fuzz target `sealed_open`: see `ipcbus_fuzz::sealed_open`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcbus_fuzz::sealed_open(data));
