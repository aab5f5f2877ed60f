//! Which registry receivers announce themselves in and senders look them up in.

use std::path::PathBuf;

use crate::registry::{LocalRegistry, RegistryError};

/// The discovery back end of a [`Sender`](crate::Sender) or [`Receiver`](crate::Receiver).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Discovery {
    /// The per-user registry directory on this host (the default).
    Local(LocalRegistry),
}

impl Discovery {
    /// The local-user registry at its default place (see [`LocalRegistry::default_dir`]).
    ///
    /// # Errors
    /// [`RegistryError`] if the directory is unsafe or cannot be created.
    pub fn local() -> Result<Discovery, RegistryError> {
        Ok(Discovery::Local(LocalRegistry::open_default()?))
    }

    /// A local-user registry in `dir` (tests, demos, sandboxes).
    ///
    /// # Errors
    /// [`RegistryError`] if the directory is unsafe or cannot be created.
    pub fn local_at(dir: impl Into<PathBuf>) -> Result<Discovery, RegistryError> {
        Ok(Discovery::Local(LocalRegistry::open(dir)?))
    }

    pub(crate) fn local_registry(&self) -> Option<&LocalRegistry> {
        match self {
            Discovery::Local(r) => Some(r),
        }
    }
}
