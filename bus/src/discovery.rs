//! Which registry receivers announce themselves in and senders look them up in.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use crate::epm::session::{self, EpmRegistration};
use crate::epm::{Epm, EpmError};
use crate::etcd::session::EtcdRegistration;
use crate::etcd::{Etcd, EtcdError};
use crate::registry::{LocalRegistry, Record, Registration, RegistryError};
use crate::security::{Resolved, Security};

/// The discovery back end of a [`Sender`](crate::Sender) or [`Receiver`](crate::Receiver).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Discovery {
    /// The per-user registry directory on this host (the default).
    Local(LocalRegistry),
    /// The endpoint manager service, for system-wide and LAN discovery.
    Epm(Epm),
    /// An etcd cluster: records under leases, watched by senders.
    Etcd(Etcd),
}

/// Why the discovery back end could not be chosen or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The local registry could not be used.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The EPM could not be used, or the `IPCBUS_EPM*` variables are malformed.
    #[error(transparent)]
    Epm(#[from] EpmError),
    /// etcd could not be used, `IPCBUS_ETCD` is malformed, or both `IPCBUS_EPM` and
    /// `IPCBUS_ETCD` are set.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
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

    /// What the builders use when no discovery is set in code: the EPM named by
    /// `IPCBUS_EPM=host:port`, or the etcd cluster named by
    /// `IPCBUS_ETCD=http://host:2379[,...]` (either keyed with the environment's
    /// password and salt, see [`Credentials`](crate::Credentials)) when that variable
    /// is set and not empty, else the local-user registry.
    ///
    /// # Errors
    /// [`DiscoveryError`] for malformed `IPCBUS_EPM*` or `IPCBUS_ETCD` variables,
    /// both of `IPCBUS_EPM` and `IPCBUS_ETCD` set ([`EtcdError::BothConfigured`]),
    /// or an unusable local registry directory.
    pub fn from_env() -> Result<Discovery, DiscoveryError> {
        match (Epm::from_env()?, Etcd::from_env()?) {
            (Some(_), Some(_)) => Err(EtcdError::BothConfigured.into()),
            (Some(epm), None) => Ok(Discovery::Epm(epm)),
            (None, Some(etcd)) => Ok(Discovery::Etcd(etcd)),
            (None, None) => Ok(Discovery::local()?),
        }
    }

    pub(crate) fn local_registry(&self) -> Option<&LocalRegistry> {
        match self {
            Discovery::Local(r) => Some(r),
            Discovery::Epm(_) | Discovery::Etcd(_) => None,
        }
    }

    /// Resolves a builder's security setting for this back end. The default
    /// ([`Security::LocalUser`]) means the per-user secret with the local registry, and
    /// with the EPM its key (every frame sealed) if it has one, else `Open`.
    pub(crate) fn resolve_security(&self, security: &Security) -> Result<Resolved, RegistryError> {
        match (self, security) {
            (Discovery::Epm(epm), Security::LocalUser) => match epm.key() {
                Some(k) => Security::Encrypt(k.clone()).resolve(None),
                None => Security::Open.resolve(None),
            },
            (Discovery::Etcd(etcd), Security::LocalUser) => match etcd.key() {
                Some(k) => Security::Encrypt(k.clone()).resolve(None),
                None => Security::Open.resolve(None),
            },
            _ => security.resolve(self.local_registry()),
        }
    }

    /// The address a receiver binds when given none: loopback with the local
    /// registry, the interface that routes to the EPM with the EPM.
    pub(crate) async fn bind_ip(&self, given: Option<IpAddr>) -> Result<IpAddr, DiscoveryError> {
        match (given, self) {
            (Some(ip), _) => Ok(ip),
            (None, Discovery::Local(_)) => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            (None, Discovery::Epm(epm)) => Ok(epm.route_ip().await?),
            (None, Discovery::Etcd(etcd)) => Ok(etcd.route_ip().await?),
        }
    }

    /// The address a receiver bound to an unspecified address (`0.0.0.0`, `::`)
    /// registers.
    pub(crate) async fn advertise_ip(&self) -> Result<IpAddr, DiscoveryError> {
        match self {
            Discovery::Local(_) => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Discovery::Epm(epm) => Ok(epm.route_ip().await?),
            Discovery::Etcd(etcd) => Ok(etcd.route_ip().await?),
        }
    }

    /// Registers a receiver; the registration lasts until the returned value is
    /// removed or dropped.
    pub(crate) async fn register(&self, record: &Record) -> Result<Announcement, DiscoveryError> {
        match self {
            Discovery::Local(reg) => Ok(Announcement::Local(reg.register(record)?)),
            Discovery::Epm(epm) => Ok(Announcement::Epm(
                session::register(epm.clone(), record.clone()).await?,
            )),
            Discovery::Etcd(etcd) => Ok(Announcement::Etcd(etcd.register(record).await?)),
        }
    }
}

/// Longest a closing receiver waits for etcd to confirm its record is deleted (past
/// it, the record goes when its lease runs out).
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A receiver's registration in whichever back end; removed when dropped.
#[derive(Debug)]
pub(crate) enum Announcement {
    Local(Registration),
    Epm(EpmRegistration),
    Etcd(EtcdRegistration),
}

impl Announcement {
    /// Removes the registration now.
    pub(crate) fn remove(&mut self) {
        match self {
            Announcement::Local(r) => r.remove(),
            Announcement::Epm(r) => r.remove(),
            Announcement::Etcd(r) => r.remove(),
        }
    }

    /// Removes the registration and waits (bounded) until the back end confirms:
    /// with etcd, until the lease is revoked and the record deleted.
    pub(crate) async fn close(mut self) {
        match self {
            Announcement::Etcd(r) => {
                let _ = tokio::time::timeout(CLOSE_WAIT, r.close()).await;
            }
            _ => self.remove(),
        }
    }
}
