#![no_main]
//! Fuzz target `frame_decoder`: see `ipcbus_fuzz::frame_decoder`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcbus_fuzz::frame_decoder(data));
