//! ipcbus-proto: the I/O-free core of the ipcbus wire protocol v1.
//!
//! Nothing here touches a socket, a file or a clock: functions take bytes (and a time
//! value where one matters) and return bytes and decisions. The async crate `ipcbus`
//! drives this core over real connections, as quinn drives quinn-proto.
//!
//! Modules:
//! - [`frame`]: frame kinds, flags, the decoded [`RawFrame`](frame::RawFrame), the
//!   handshake message bodies and [`DecodeError`].
//! - [`codec`]: the v1 length-prefixed framing ([`CodecV1`](codec::CodecV1)), with its
//!   maximum checked before any allocation; writing headers and frames.
//! - [`crypto`]: the master [`Key`] (Argon2id, cached), the per-connection
//!   [`SessionKeys`](crypto::SessionKeys) (HKDF over the handshake) and the AES-256-GCM
//!   [`Sealer`](crypto::Sealer).
//! - [`compress`]: gzip per frame, inflation capped by the frame maximum.
//! - [`handshake`]: the handshake as two state machines ([`Client`](handshake::Client),
//!   [`Server`](handshake::Server)): frames in, frames to send and "established" with
//!   the session's sealers, or a typed failure, out.
//! - [`session`]: one connection after the handshake: [`Outbound`](session::Outbound)
//!   numbers and seals what is sent, [`Inbound`](session::Inbound) checks kind, order
//!   and seal of what arrives, opens it and inflates it within the maximum.
//! - [`call`]: the bodies of the call frames (`Request`, `Reply`, `Cancel`) and the
//!   codes of remote errors.
//! - [`epm`]: the endpoint manager's messages and their framing.
//! - [`endpoint`]: typed endpoints (`tcp://`, `unix://`) and their one text form.
//! - [`record`]: one receiver's registration, and its JSON form.
//! - [`handle`], [`ids`], [`salt`]: validated handles, sender and receiver ids, the
//!   salt notations.
//!
//! `docs/PROTOCOL.md` describes the wire byte by byte.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod call;
pub mod codec;
pub mod compress;
pub mod crypto;
pub mod endpoint;
pub mod epm;
pub mod frame;
pub mod handle;
pub mod handshake;
pub mod ids;
pub mod record;
pub mod salt;
pub mod session;

pub use crypto::{Key, KeyError};
pub use endpoint::{Endpoint, EndpointError, Transport};
pub use frame::{DecodeError, RejectReason};
pub use handle::{Handle, HandleError};
pub use ids::{ReceiverId, SenderId};
pub use record::{Record, Role};
pub use salt::{parse_salt, SaltError};
