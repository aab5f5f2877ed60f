//! Helpers shared by the ipcbus examples: the options every example takes and how they
//! become a discovery back end and security settings.
//!
//! The examples themselves are in this crate's folder (`sender.rs`, `receiver.rs`,
//! `pub_thr.rs`, `sub_thr.rs`, `ping.rs`, `pong.rs`, `lan.rs`, `calc_server.rs`,
//! `calc_client.rs`; the contract of the last two is [`calc`]); run one with
//! `cargo run -p ipcbus-examples --example receiver`.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

use anyhow::Context;
use ipcbus::{
    Client, ClientBuilder, Credentials, Discovery, Epm, Handle, Key, Receiver, ReceiverBuilder,
    Security, Sender, SenderBuilder, Server, ServerBuilder,
};

pub mod calc;

/// Options every example takes. The password and salt are read as
/// [`ipcbus::Credentials`] documents: `--password-file` and `--salt` first, then
/// `IPCBUS_PASSWORD_FILE`, `IPCBUS_PASSWORD` and `IPCBUS_SALT` (or the same names
/// with `EPM_`), exactly as the `ipcbus` command line and `epm-service` read them.
#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Endpoint manager HOST[:PORT] [env: IPCBUS_EPM] [default: the local-user
    /// registry]
    #[arg(long, value_name = "HOST:PORT")]
    pub epm: Option<String>,

    /// File holding the password (its first line): events are encrypted under a key
    /// derived from it and the salt [env: IPCBUS_PASSWORD_FILE, else the password
    /// itself in IPCBUS_PASSWORD]
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<std::path::PathBuf>,

    /// The password itself. Other local users can read it with `ps`: prefer
    /// --password-file or IPCBUS_PASSWORD
    #[arg(long, value_name = "PASSWORD", conflicts_with = "password_file")]
    pub password: Option<String>,

    /// Salt for the password, hex (010203) or the classic {0x01,0x02,0x03} form [env:
    /// IPCBUS_SALT]
    #[arg(long, value_name = "SALT")]
    pub salt: Option<String>,

    /// The password and salt once read (a password file is read once).
    #[arg(skip)]
    creds: std::sync::OnceLock<Credentials>,
}

impl Opts {
    /// The EPM address: `--epm`, else `IPCBUS_EPM`.
    pub fn epm_addr(&self) -> Option<String> {
        self.epm
            .clone()
            .or_else(|| std::env::var("IPCBUS_EPM").ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    /// The password and salt of the options and the environment.
    ///
    /// # Errors
    /// An unreadable password file or a malformed salt.
    pub fn credentials(&self) -> anyhow::Result<Credentials> {
        if let Some(c) = self.creds.get() {
            return Ok(c.clone());
        }
        let mut b = Credentials::builder().password_file(self.password_file.as_ref());
        if let Some(p) = &self.password {
            b = b.password_from(p, "--password");
        }
        if let Some(s) = &self.salt {
            b = b.salt(s);
        }
        let c = b.resolve()?;
        Ok(self.creds.get_or_init(|| c).clone())
    }

    /// The key from the password and salt, if a password is given.
    ///
    /// # Errors
    /// As [`Opts::credentials`], or a password without a salt (or the other way round).
    pub fn key(&self) -> anyhow::Result<Option<Key>> {
        Ok(self.credentials()?.key()?)
    }

    /// The EPM if `--epm` or `IPCBUS_EPM` is given (with the key), else the
    /// local-user registry.
    ///
    /// # Errors
    /// As [`Opts::key`], a malformed EPM address, or an unusable local registry.
    pub fn discovery(&self) -> anyhow::Result<Discovery> {
        match self.epm_addr() {
            Some(addr) => {
                let from = if self.epm.is_some() {
                    "--epm"
                } else {
                    "IPCBUS_EPM"
                };
                let mut b = Epm::parse(&addr).context(from)?;
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

    /// A call server builder for `handle` with these options' discovery and security.
    ///
    /// # Errors
    /// As [`Opts::discovery`].
    pub fn server(&self, handle: Handle) -> anyhow::Result<ServerBuilder> {
        Ok(Server::builder(handle)
            .discovery(self.discovery()?)
            .security(self.security()?))
    }

    /// A call client builder for `handle` with these options' discovery and security.
    ///
    /// # Errors
    /// As [`Opts::discovery`].
    pub fn client(&self, handle: Handle) -> anyhow::Result<ClientBuilder> {
        Ok(Client::builder(handle)
            .discovery(self.discovery()?)
            .security(self.security()?))
    }

    /// Where events go, for the examples' first line of output.
    pub fn describe(&self) -> String {
        let via = match self.epm_addr() {
            Some(a) => format!("the EPM at {a}"),
            None => "the local-user registry".to_string(),
        };
        let sec = if self.credentials().is_ok_and(|c| c.password().is_some()) {
            "encrypted with the password's key"
        } else {
            "no password"
        };
        format!("{via}, {sec}")
    }
}

/// `1 event`, `2 events`: a count and its noun, in the right number.
///
/// ```
/// assert_eq!(ipcbus_examples::plural(1, "receiver"), "1 receiver");
/// assert_eq!(ipcbus_examples::plural(0, "event"), "0 events");
/// ```
pub fn plural(n: u64, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// Logs warnings and errors of the library to stderr (`RUST_LOG` overrides), in
/// colour only on a terminal and without `NO_COLOR` set.
pub fn init_tracing() {
    use std::io::IsTerminal;
    let colours = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").map_or(true, |v| v.is_empty());
    tracing_subscriber::fmt()
        .with_ansi(colours)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
