#![no_main]
//! Fuzz target `handshake_messages`: see `ipcbus_fuzz::handshake_messages`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcbus_fuzz::handshake_messages(data));
