#![no_main]
//! Fuzz target `call`: see `ipcbus_fuzz::call`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcbus_fuzz::call(data));
