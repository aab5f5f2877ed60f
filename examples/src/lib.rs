//! Helpers shared by the ipcbus examples: the options every example takes and how they
//! become a discovery back end and security settings.
//!
//! The examples themselves are in this crate's folder (`sender.rs`, `receiver.rs`,
//! `pub_thr.rs`, `sub_thr.rs`, `ping.rs`, `pong.rs`, `lan.rs`); run one with
//! `cargo run -p ipcbus-examples --example receiver`.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

use anyhow::Context;
use ipcbus::{
    Discovery, Epm, Handle, Key, Receiver, ReceiverBuilder, Security, Sender, SenderBuilder,
};

/// Options every example takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Endpoint manager HOST:PORT [default: the local-user registry]
    #[arg(long, env = "IPCBUS_EPM", value_name = "HOST:PORT")]
    pub epm: Option<String>,

    /// Password: events are encrypted under a key derived from it and the salt
    #[arg(long, env = "IPCBUS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,

    /// Salt for the password, hex or the classic {0x01,0x02,0x03} form
    #[arg(long, env = "IPCBUS_SALT")]
    pub salt: Option<String>,
}

impl Opts {
    /// The key from the password and salt, if a password is given.
    ///
    /// # Errors
    /// A password without a salt (or the other way round), or a malformed salt.
    pub fn key(&self) -> anyhow::Result<Option<Key>> {
        match (&self.password, &self.salt) {
            (None, None) => Ok(None),
            (Some(p), Some(s)) => {
                let salt = ipcbus::parse_salt(s).context("--salt")?;
                Ok(Some(Key::derive(p, salt)?))
            }
            _ => anyhow::bail!("give both --password and --salt, or neither"),
        }
    }

    /// The EPM if `--epm` is given (with the key), else the local-user registry.
    ///
    /// # Errors
    /// As [`Opts::key`], or an unusable local registry.
    pub fn discovery(&self) -> anyhow::Result<Discovery> {
        match self.epm.as_deref().filter(|s| !s.is_empty()) {
            Some(addr) => {
                let mut b = Epm::builder(addr);
                if let Some(k) = self.key()? {
                    b = b.key(k);
                }
                Ok(Discovery::Epm(b.build()))
            }
            None => Ok(Discovery::local()?),
        }
    }

    /// Encrypted under the key when a password is given, else the back end's default
    /// (the per-user secret locally, the EPM's key or none with an EPM).
    ///
    /// # Errors
    /// As [`Opts::key`].
    pub fn security(&self) -> anyhow::Result<Security> {
        Ok(match self.key()? {
            Some(k) => Security::Encrypt(k),
            None => Security::default(),
        })
    }

    /// A receiver builder for `handle` with these options' discovery and security.
    ///
    /// # Errors
    /// As [`Opts::discovery`].
    pub fn receiver(&self, handle: Handle) -> anyhow::Result<ReceiverBuilder> {
        Ok(Receiver::builder(handle)
            .discovery(self.discovery()?)
            .security(self.security()?))
    }

    /// A sender builder for `handle` with these options' discovery and security.
    ///
    /// # Errors
    /// As [`Opts::discovery`].
    pub fn sender(&self, handle: Handle) -> anyhow::Result<SenderBuilder> {
        Ok(Sender::builder(handle)
            .discovery(self.discovery()?)
            .security(self.security()?))
    }

    /// Where events go, for the examples' first line of output.
    pub fn describe(&self) -> String {
        let via = match self.epm.as_deref().filter(|s| !s.is_empty()) {
            Some(a) => format!("the EPM at {a}"),
            None => "the local-user registry".to_string(),
        };
        let sec = if self.password.is_some() {
            "encrypted with the password's key"
        } else {
            "no password"
        };
        format!("{via}, {sec}")
    }
}

/// Logs warnings and errors of the library to stderr (`RUST_LOG` overrides).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
