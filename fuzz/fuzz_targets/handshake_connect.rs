#![no_main]
//! Fuzz target `handshake_connect`: see `ipcbus_fuzz::handshake_connect`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcbus_fuzz::handshake_connect(data));
