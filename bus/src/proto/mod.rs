//! The I/O-free core of wire protocol v1: frame types, the codec, sealing and
//! compression. Nothing here touches a socket or a clock; the async layer drives it.

pub mod codec;
pub mod compress;
pub mod crypto;
pub mod epm;
pub mod frame;
