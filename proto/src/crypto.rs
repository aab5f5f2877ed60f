//! Keys, key proofs and frame sealing.
//!
//! * [`Key::derive`] runs Argon2id once per process and per (password, salt) and caches
//!   the 32-byte master key.
//! * Every connection derives its own keys with HKDF-SHA256 from the master key and
//!   both handshake nonces: one AES-256-GCM key per direction and one proof per side.
//! * A sealed frame uses its sequence number as the GCM nonce and its header as
//!   associated data, so a nonce never repeats under a key and a replayed, reordered or
//!   altered frame fails to open.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use bytes::{BufMut, BytesMut};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};

use super::codec::put_header;
use super::frame::{DecodeError, Flags, Kind, RawFrame, HEADER_LEN, NONCE_LEN, PROOF_LEN};
use crate::ids::ReceiverId;

/// Bytes of the AES-GCM tag appended to every sealed body.
pub const TAG_LEN: usize = 16;

/// A 32-byte master key: from a password and salt, a local-user secret, or raw bytes.
///
/// Cheap to clone. `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Arc<[u8; 32]>);

/// Why a key could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The password was empty.
    #[error("password is empty")]
    EmptyPassword,
    /// Argon2 refused the parameters (should not happen with the built-in ones).
    #[error("argon2 key derivation failed: {0}")]
    Argon2(String),
}

/// Argon2id memory cost in KiB (19 MiB, the OWASP recommendation for Argon2id).
pub const ARGON2_M_KIB: u32 = 19 * 1024;
/// Argon2id passes.
pub const ARGON2_T: u32 = 2;
/// Argon2id lanes.
pub const ARGON2_P: u32 = 1;

fn cache() -> &'static Mutex<HashMap<[u8; 32], Key>> {
    static CACHE: OnceLock<Mutex<HashMap<[u8; 32], Key>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

impl Key {
    /// Derives the master key from a password and a salt with Argon2id
    /// (m = 19 MiB, t = 2, p = 1). Salts of any length work, including the
    /// classic three bytes `{0x01,0x02,0x03}`: the salt is first hashed with SHA-256.
    ///
    /// The result is cached per process and per (password, salt), so only the
    /// first call pays the ~50 ms.
    ///
    /// # Errors
    /// [`KeyError::EmptyPassword`] for an empty password.
    pub fn derive(password: impl AsRef<[u8]>, salt: impl AsRef<[u8]>) -> Result<Key, KeyError> {
        let password = password.as_ref();
        let salt = salt.as_ref();
        if password.is_empty() {
            return Err(KeyError::EmptyPassword);
        }
        let mut id = Sha256::new();
        id.update((password.len() as u64).to_be_bytes());
        id.update(password);
        id.update(salt);
        let id: [u8; 32] = id.finalize().into();
        let mut cache = cache().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = cache.get(&id) {
            return Ok(k.clone());
        }
        let argon_salt: [u8; 32] = Sha256::new()
            .chain_update(b"ipcbus/v1 salt")
            .chain_update(salt)
            .finalize()
            .into();
        let params = argon2::Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, Some(32))
            .map_err(|e| KeyError::Argon2(e.to_string()))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 32];
        argon
            .hash_password_into(password, &argon_salt, &mut out)
            .map_err(|e| KeyError::Argon2(e.to_string()))?;
        let key = Key(Arc::new(out));
        cache.insert(id, key.clone());
        Ok(key)
    }

    /// A key from a high-entropy secret (the local-user secret file): HKDF, no Argon2.
    pub fn from_secret(secret: &[u8]) -> Key {
        let (prk, _) = Hkdf::<Sha256>::extract(Some(b"ipcbus/v1 local secret"), secret);
        let mut out = [0u8; 32];
        out.copy_from_slice(&prk);
        Key(Arc::new(out))
    }

    /// A key from 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(Arc::new(bytes))
    }

    /// A short public fingerprint (first 8 bytes of SHA-256 of the key, hex), for logs.
    pub fn fingerprint(&self) -> String {
        let d = Sha256::digest(&self.0[..]);
        hex::encode(&d[..8])
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(fingerprint {})", self.fingerprint())
    }
}

/// What one connection derives from the master key and the handshake.
pub struct SessionKeys {
    /// Key for frames from the connecting side to the accepting side.
    pub c2s: [u8; 32],
    /// Key for frames from the accepting side to the connecting side.
    pub s2c: [u8; 32],
    /// Proof the accepting side puts in `Welcome`.
    pub proof_s: [u8; PROOF_LEN],
    /// Proof the connecting side puts in `Proof`.
    pub proof_c: [u8; PROOF_LEN],
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

impl SessionKeys {
    /// Derives the session keys.
    ///
    /// `hello_body` is the exact `Hello` body as sent; the transcript hash binds the
    /// handle, both ids, both nonces and the mode, so none can be changed in flight.
    pub fn derive(
        master: &Key,
        hello_body: &[u8],
        nonce_c: &[u8; NONCE_LEN],
        receiver: &ReceiverId,
        nonce_s: &[u8; NONCE_LEN],
    ) -> SessionKeys {
        let th: [u8; 32] = Sha256::new()
            .chain_update(hello_body)
            .chain_update(receiver.0)
            .chain_update(nonce_s)
            .finalize()
            .into();
        let mut salt = [0u8; 2 * NONCE_LEN];
        salt[..NONCE_LEN].copy_from_slice(nonce_c);
        salt[NONCE_LEN..].copy_from_slice(nonce_s);
        let hk = Hkdf::<Sha256>::new(Some(&salt), &master.0[..]);
        let expand = |label: &[u8], with_th: bool| {
            let mut out = [0u8; 32];
            let info: &[&[u8]] = if with_th { &[label, &th] } else { &[label] };
            // 32 bytes is far below HKDF-SHA256's limit of 8160, so this cannot fail.
            hk.expand_multi_info(info, &mut out)
                .expect("32 bytes is a valid HKDF-SHA256 length");
            out
        };
        SessionKeys {
            c2s: expand(b"ipcbus/v1 key c2s", true),
            s2c: expand(b"ipcbus/v1 key s2c", true),
            proof_s: expand(b"ipcbus/v1 proof s", true),
            proof_c: expand(b"ipcbus/v1 proof c", true),
        }
    }
}

/// Compares two proofs in constant time.
pub fn proofs_equal(a: &[u8; PROOF_LEN], b: &[u8; PROOF_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One direction's AES-256-GCM cipher.
#[derive(Clone)]
pub struct Sealer(Aes256Gcm);

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer(..)")
    }
}

/// The GCM nonce of a frame: its sequence number, after a 4-byte prefix that is 0 for
/// every kind but `AckRequest`, whose frames are numbered by their own counter on
/// the same connection and direction as the Data frames and so take prefix 1: the
/// two counters can never give the same nonce.
fn gcm_nonce(kind: Kind, seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    if kind == Kind::AckRequest {
        n[3] = 1;
    }
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

fn aad(kind: Kind, flags: Flags, seq: u64) -> [u8; HEADER_LEN] {
    let mut a = [0u8; HEADER_LEN];
    a[0] = kind as u8;
    a[1] = flags.0;
    a[2..].copy_from_slice(&seq.to_be_bytes());
    a
}

impl Sealer {
    /// A cipher for one direction.
    pub fn new(key: &[u8; 32]) -> Sealer {
        Sealer(Aes256Gcm::new(GenericArray::from_slice(key)))
    }

    /// Appends a sealed frame: header (with the sealed flag added), ciphertext, tag.
    /// The caller guarantees `seq` is above every `seq` sealed before with this key.
    pub fn put_sealed(
        &self,
        dst: &mut BytesMut,
        kind: Kind,
        flags: Flags,
        seq: u64,
        plaintext: &[u8],
    ) {
        let flags = Flags(flags.0 | Flags::SEALED);
        dst.reserve(4 + HEADER_LEN + plaintext.len() + TAG_LEN);
        put_header(dst, kind, flags, seq, plaintext.len() + TAG_LEN);
        let start = dst.len();
        dst.put_slice(plaintext);
        let tag = self
            .0
            .encrypt_in_place_detached(
                GenericArray::from_slice(&gcm_nonce(kind, seq)),
                &aad(kind, flags, seq),
                &mut dst[start..],
            )
            // AES-GCM only fails for plaintexts over 64 GiB; frames are capped far below.
            .expect("frame is below the AES-GCM length limit");
        dst.put_slice(&tag);
    }

    /// Opens the body of a sealed frame in place, given its header fields: on success
    /// `body[..n]` is the plaintext, where `n` (returned) is `body.len() - TAG_LEN`.
    /// Used by the receive path, which opens frames inside its read buffer.
    ///
    /// # Errors
    /// As [`Sealer::open`].
    pub fn open_in_place(
        &self,
        kind: Kind,
        flags: Flags,
        seq: u64,
        body: &mut [u8],
    ) -> Result<usize, DecodeError> {
        if !flags.sealed() {
            return Err(DecodeError::SealMismatch);
        }
        let n = body
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(DecodeError::OpenFailed)?;
        let (text, tag) = body.split_at_mut(n);
        self.0
            .decrypt_in_place_detached(
                GenericArray::from_slice(&gcm_nonce(kind, seq)),
                &aad(kind, flags, seq),
                text,
                GenericArray::from_slice(tag),
            )
            .map_err(|_| DecodeError::OpenFailed)?;
        Ok(n)
    }

    /// Opens a sealed frame in place, leaving the plaintext in `frame.body`.
    ///
    /// # Errors
    /// [`DecodeError::OpenFailed`] for a wrong key or altered bytes,
    /// [`DecodeError::SealMismatch`] if the frame is not marked sealed.
    pub fn open(&self, frame: &mut RawFrame) -> Result<(), DecodeError> {
        if !frame.flags.sealed() {
            return Err(DecodeError::SealMismatch);
        }
        if frame.body.len() < TAG_LEN {
            return Err(DecodeError::OpenFailed);
        }
        let split = frame.body.len() - TAG_LEN;
        let tag = frame.body.split_off(split);
        self.0
            .decrypt_in_place_detached(
                GenericArray::from_slice(&gcm_nonce(frame.kind, frame.seq)),
                &aad(frame.kind, frame.flags, frame.seq),
                &mut frame.body,
                GenericArray::from_slice(&tag),
            )
            .map_err(|_| DecodeError::OpenFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::CodecV1;

    #[test]
    fn derive_is_cached_and_accepts_short_salts() {
        let a = Key::derive("pw", [1u8, 2, 3]).unwrap();
        let b = Key::derive("pw", [1u8, 2, 3]).unwrap();
        // Cached: the very same allocation comes back (no timing, so no flakiness
        // on a loaded machine).
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert_eq!(a, b);
        assert_ne!(a, Key::derive("pw", [1u8, 2, 4]).unwrap());
        assert_ne!(a, Key::derive("pX", [1u8, 2, 3]).unwrap());
        assert_eq!(Key::derive("", [1u8]), Err(KeyError::EmptyPassword));
        assert!(!format!("{a:?}").contains(&hex::encode(&a.0[..])));
    }

    #[test]
    fn pinned_argon2_vector() {
        // Pins the derivation so a change of parameters is a visible diff.
        let k = Key::derive("password", [1u8, 2, 3]).unwrap();
        assert_eq!(k.fingerprint(), PINNED_FP);
    }
    const PINNED_FP: &str = "4334d89163500345";

    fn sealed_pair() -> (Sealer, Sealer) {
        let k = Key::from_bytes([7; 32]);
        let s = SessionKeys::derive(&k, b"hello", &[1; 32], &ReceiverId([2; 16]), &[3; 32]);
        (Sealer::new(&s.c2s), Sealer::new(&s.c2s))
    }

    #[test]
    fn ack_requests_never_share_a_nonce_with_data_frames() {
        // Same key, same direction, same sequence number, same body: the keystreams
        // differ, so the two counters cannot collide.
        let (tx, rx) = sealed_pair();
        let (mut data, mut req) = (BytesMut::new(), BytesMut::new());
        tx.put_sealed(&mut data, Kind::Data, Flags(0), 7, &[0u8; 8]);
        tx.put_sealed(&mut req, Kind::AckRequest, Flags(0), 7, &[0u8; 8]);
        let body = crate::frame::LEN_PREFIX + HEADER_LEN;
        assert_ne!(data[body..body + 8], req[body..body + 8]);
        let mut codec = CodecV1::default();
        let mut f = codec.decode(&mut req.clone()).unwrap().unwrap();
        rx.open(&mut f).unwrap();
        assert_eq!(&f.body[..], &[0u8; 8]);
        // Relabelled as Data, it does not open (the kind is in the AAD and the nonce).
        req[crate::frame::LEN_PREFIX] = Kind::Data as u8;
        let mut f = codec.decode(&mut req).unwrap().unwrap();
        assert_eq!(rx.open(&mut f), Err(DecodeError::OpenFailed));
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let (tx, rx) = sealed_pair();
        let mut buf = BytesMut::new();
        tx.put_sealed(&mut buf, Kind::Data, Flags(0), 5, b"secret payload");
        assert!(!buf.windows(6).any(|w| w == b"secret"));
        let mut codec = CodecV1::default();
        let mut f = codec.decode(&mut buf.clone()).unwrap().unwrap();
        rx.open(&mut f).unwrap();
        assert_eq!(&f.body[..], b"secret payload");
        // flip each byte of the frame in turn: every one fails
        for i in 4..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x01;
            if let Ok(Some(mut f)) = codec.decode(&mut b) {
                assert!(rx.open(&mut f).is_err(), "byte {i}");
            }
        }
        // wrong key fails
        let other = Sealer::new(&[9; 32]);
        let mut f = codec.decode(&mut buf.clone()).unwrap().unwrap();
        assert_eq!(other.open(&mut f), Err(DecodeError::OpenFailed));
    }

    #[test]
    fn session_keys_differ_per_nonce_and_direction() {
        let k = Key::from_bytes([7; 32]);
        let a = SessionKeys::derive(&k, b"h", &[1; 32], &ReceiverId([2; 16]), &[3; 32]);
        let b = SessionKeys::derive(&k, b"h", &[1; 32], &ReceiverId([2; 16]), &[4; 32]);
        assert_ne!(a.c2s, a.s2c);
        assert_ne!(a.c2s, b.c2s);
        assert_ne!(a.proof_c, a.proof_s);
        assert!(proofs_equal(&a.proof_c, &a.proof_c));
        assert!(!proofs_equal(&a.proof_c, &b.proof_c));
    }
}
