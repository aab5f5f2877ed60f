//! How a connection is authenticated and whether its frames are encrypted.

use crate::registry::{LocalRegistry, RegistryError};
use ipcbus_proto::crypto::Key;
use ipcbus_proto::frame::Mode;

/// Security settings of a sender or receiver. Both ends of a connection must agree.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum Security {
    /// The default with the local-user registry: the handshake proves knowledge of the
    /// per-user secret file, so other users of the host cannot talk to your receivers;
    /// frames are not encrypted (they never leave the host).
    #[default]
    LocalUser,
    /// No authentication and no encryption: anyone who can reach the port can send.
    Open,
    /// The handshake proves the key; frames are not encrypted.
    Authenticate(Key),
    /// The handshake proves the key and every frame is sealed with AES-256-GCM.
    Encrypt(Key),
}

/// Security resolved to a wire mode and key.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub(crate) mode: Mode,
    pub(crate) key: Option<Key>,
}

impl Security {
    /// What the builders use when no security is set in code:
    /// [`Security::Encrypt`] under the key of the environment's password and salt
    /// ([`Credentials::from_env`](crate::Credentials::from_env): `IPCBUS_PASSWORD_FILE`
    /// or `IPCBUS_PASSWORD`, and `IPCBUS_SALT`; the `IPCBUS_EPM_` names mean the
    /// same) when they are set, else the default ([`Security::LocalUser`]).
    ///
    /// # Errors
    /// [`CredentialsError`](crate::CredentialsError) for an unreadable password file,
    /// a malformed salt, or one without the other.
    pub fn from_env() -> Result<Security, crate::CredentialsError> {
        Ok(match crate::Credentials::from_env()?.key()? {
            Some(k) => Security::Encrypt(k),
            None => Security::LocalUser,
        })
    }

    pub(crate) fn resolve(&self, local: Option<&LocalRegistry>) -> Result<Resolved, RegistryError> {
        Ok(match self {
            Security::LocalUser => match local {
                Some(reg) => Resolved {
                    mode: Mode::Authenticated,
                    key: Some(reg.secret_key()?),
                },
                None => Resolved {
                    mode: Mode::Open,
                    key: None,
                },
            },
            Security::Open => Resolved {
                mode: Mode::Open,
                key: None,
            },
            Security::Authenticate(k) => Resolved {
                mode: Mode::Authenticated,
                key: Some(k.clone()),
            },
            Security::Encrypt(k) => Resolved {
                mode: Mode::Sealed,
                key: Some(k.clone()),
            },
        })
    }
}
