#![no_main]
//! Fuzz target `handshake_accept`: see `ipcbus_fuzz::handshake_accept`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcbus_fuzz::handshake_accept(data));
