#![no_main]
//! Fuzz target `gunzip_cap`: see `ipcbus_fuzz::gunzip_cap`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcbus_fuzz::gunzip_cap(data));
