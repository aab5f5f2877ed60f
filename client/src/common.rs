//! Options shared by every command, and how they turn into a discovery back end and
//! security settings.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use ipcbus::{Credentials, Discovery, Epm, Etcd, Key, Security};

/// The environment variables the commands read, for the end of each `--help`.
pub const ENV_HELP: &str = "\
Environment:
  IPCBUS_EPM             endpoint manager HOST[:PORT] when --epm is not given; several,
                         comma-separated, are EPMs sharing one view, tried in turn
  IPCBUS_ETCD            etcd endpoints http://HOST:PORT[,http://HOST:PORT] when --etcd
                         is not given (not together with IPCBUS_EPM)
  IPCBUS_ETCD_CA         PEM file of the CA that signed etcd's certificates, for
                         https:// endpoints
  IPCBUS_PASSWORD_FILE   file whose first line is the password (when no --password-file)
  IPCBUS_PASSWORD        the password itself (when neither of the above is set)
  IPCBUS_SALT            the salt (when no --salt)
                         IPCBUS_EPM_PASSWORD_FILE, IPCBUS_EPM_PASSWORD and IPCBUS_EPM_SALT
                         mean the same as the three above
  IPCBUS_RUNTIME_DIR     the local-user registry directory [default:
                         $XDG_RUNTIME_DIR/ipcbus, else /tmp/ipcbus-$UID]
  IPCBUS_TRANSPORTS      what receivers and servers listen on: tcp, unix or tcp,unix
                         [default: tcp,unix with the local registry, tcp with an EPM]
  RUST_LOG               log level on stderr (error, warn, info, debug)
  NO_COLOR               set and not empty: no colours in logs (they are only used on a terminal)

Exit status: 0 success, 1 the work failed (an event not acknowledged, a failed call,
a receiver that cannot bind, an unreachable EPM or etcd), 2 usage or configuration
error.";

/// Options of every command (before or after the command name).
#[derive(Args, Debug, Clone, Default)]
pub struct Common {
    /// Endpoint manager to discover receivers through, HOST[:PORT] (port 4455 when
    /// left out; several comma-separated EPMs sharing one view are tried in turn)
    /// [env: IPCBUS_EPM] [default: the local-user registry]
    #[arg(
        long,
        global = true,
        value_name = "HOST:PORT",
        help_heading = "Global options"
    )]
    pub epm: Option<String>,

    /// etcd cluster to discover receivers through, http://HOST:PORT[,http://HOST:PORT]
    /// (port 2379 when left out; https:// with the CA of IPCBUS_ETCD_CA; records under
    /// /ipcbus/) [env: IPCBUS_ETCD] [default: the local-user registry]
    #[arg(
        long,
        global = true,
        value_name = "URL[,URL]",
        help_heading = "Global options"
    )]
    pub etcd: Option<String>,

    /// File holding the password (its first line) [env: IPCBUS_PASSWORD_FILE, else the
    /// password itself in IPCBUS_PASSWORD]
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        help_heading = "Global options"
    )]
    pub password_file: Option<PathBuf>,

    /// Salt for the password, hex (0a1b2c) or the classic {0x01,0x02,0x03} form [env:
    /// IPCBUS_SALT]
    #[arg(long, global = true, value_name = "SALT", value_parser = parse_salt, help_heading = "Global options")]
    pub salt: Option<Salt>,

    /// Address receivers bind and register (from [`BindOpts`], for the commands that
    /// bind receivers).
    #[arg(skip)]
    pub ip: Option<IpAddr>,

    /// Ports receivers may bind (from [`BindOpts`]).
    #[arg(skip)]
    pub ports: Option<Ports>,

    /// Print JSON instead of text (from [`JsonOpt`], for the commands that have it).
    #[arg(skip)]
    pub json: bool,

    /// The password and salt once read: a password file is read once per process,
    /// so `--password-file <(...)` or a FIFO works.
    #[arg(skip)]
    creds: std::sync::OnceLock<Credentials>,
}

/// `--json`, for the commands that can print JSON.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct JsonOpt {
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// Where receivers bind, for the commands that start receivers.
#[derive(Args, Debug, Clone, Default)]
pub struct BindOpts {
    /// Address receivers bind and register [default: 127.0.0.1, or with an EPM the
    /// address that routes to it]
    #[arg(long, value_name = "ADDR")]
    pub ip: Option<IpAddr>,

    /// Ports receivers may bind, a range (9000-9010) or a list (9000,9005) [default:
    /// an ephemeral port]
    #[arg(long, value_name = "PORTS", value_parser = parse_ports)]
    pub ports: Option<Ports>,
}

impl Common {
    /// These global options with a command's own `--json`.
    pub fn with_json(mut self, o: JsonOpt) -> Common {
        self.json = o.json;
        self
    }

    /// These global options with a command's own `--ip` and `--ports`.
    pub fn with_bind(mut self, b: BindOpts) -> Common {
        self.ip = b.ip;
        self.ports = b.ports;
        self
    }

    /// The EPM address: `--epm`, else `IPCBUS_EPM` (an empty or blank variable
    /// counts as unset; an empty `--epm` is an error). `None` when etcd is chosen
    /// instead (see [`Common::backend`]).
    ///
    /// # Errors
    /// A [`ConfigError`] for `--epm ""`, or as [`Common::backend`].
    pub fn epm_addr(&self) -> anyhow::Result<Option<String>> {
        Ok(match self.backend()? {
            Backend::Epm(a) => Some(a),
            _ => None,
        })
    }

    /// The etcd endpoints: `--etcd`, else `IPCBUS_ETCD`, as given. `None` when the
    /// EPM or the local registry is chosen (see [`Common::backend`]).
    ///
    /// # Errors
    /// As [`Common::backend`].
    pub fn etcd_urls(&self) -> anyhow::Result<Option<String>> {
        Ok(match self.backend()? {
            Backend::Etcd(u) => Some(u),
            _ => None,
        })
    }

    /// Which discovery back end the options and environment choose. A flag beats
    /// the environment; `--epm` with `--etcd`, or `IPCBUS_EPM` with `IPCBUS_ETCD`
    /// (and no flag), is an error rather than a guess.
    ///
    /// # Errors
    /// A [`ConfigError`] for an empty `--epm` or `--etcd`, or both back ends.
    pub fn backend(&self) -> anyhow::Result<Backend> {
        let flag = |v: &Option<String>, name: &str, form: &str| match v {
            Some(e) if e.trim().is_empty() => Err(config_error(format!(
                "{name} is empty: give {form}, or leave it out for the local-user registry"
            ))),
            Some(e) => Ok(Some(e.trim().to_owned())),
            None => Ok(None),
        };
        let env = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        match (
            flag(&self.epm, "--epm", "HOST[:PORT]")?,
            flag(&self.etcd, "--etcd", "http://HOST:PORT[,...]")?,
        ) {
            (Some(_), Some(_)) => Err(config_error(
                "--epm and --etcd are both given: discovery uses one of them",
            )),
            (Some(a), None) => Ok(Backend::Epm(a)),
            (None, Some(u)) => Ok(Backend::Etcd(u)),
            (None, None) => match (env("IPCBUS_EPM"), env("IPCBUS_ETCD")) {
                (Some(_), Some(_)) => Err(config_error(
                    "IPCBUS_EPM and IPCBUS_ETCD are both set: unset one of them, or choose \
                     with --epm or --etcd",
                )),
                (Some(a), None) => Ok(Backend::Epm(a)),
                (None, Some(u)) => Ok(Backend::Etcd(u)),
                (None, None) => Ok(Backend::Local),
            },
        }
    }
}

/// The discovery back end chosen by `--epm` / `--etcd` and the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The local-user registry.
    Local,
    /// The EPM at this address, as given.
    Epm(String),
    /// etcd at these endpoints, as given.
    Etcd(String),
}

/// A configuration error: bad option values, unreadable password file, unusable
/// registry. The command exits with status 2.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Builds a [`ConfigError`] as an `anyhow::Error`.
pub fn config_error(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(ConfigError(msg.into()))
}

/// Marks an error as a configuration error, with a message in front of its cause.
pub trait ConfigContext<T> {
    /// Wraps the error in a [`ConfigError`] carrying `msg`.
    fn config(self, msg: impl fmt::Display) -> anyhow::Result<T>;
}

impl<T, E> ConfigContext<T> for Result<T, E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn config(self, msg: impl fmt::Display) -> anyhow::Result<T> {
        self.map_err(|e| config_error(format!("{msg}: {e}")))
    }
}

impl Common {
    /// The discovery back end: the EPM when `--epm` / `IPCBUS_EPM` is set, etcd when
    /// `--etcd` / `IPCBUS_ETCD` is, else the local-user registry.
    ///
    /// # Errors
    /// A [`ConfigError`] when the registry cannot be used, an address is malformed or
    /// both back ends are given.
    pub fn discovery(&self) -> anyhow::Result<Discovery> {
        if let Some(epm) = self.epm()? {
            return Ok(Discovery::Epm(epm));
        }
        if let Some(etcd) = self.etcd()? {
            return Ok(Discovery::Etcd(etcd));
        }
        Discovery::local().config("cannot use the local-user registry")
    }

    /// The etcd cluster of `--etcd` / `IPCBUS_ETCD`, with the password's key (for
    /// the data connections) when one is set. Nothing is contacted yet.
    ///
    /// # Errors
    /// A [`ConfigError`] for a malformed endpoint (naming it and the bad part), or as
    /// [`Common::key`].
    pub fn etcd(&self) -> anyhow::Result<Option<Etcd>> {
        let Some(urls) = self.etcd_urls()? else {
            return Ok(None);
        };
        let from = if self.etcd.is_some() {
            "--etcd"
        } else {
            "IPCBUS_ETCD"
        };
        let mut b = Etcd::parse(&urls)
            .config(from)?
            .ca_from_env()
            .map_err(|e| config_error(ipcbus::error_chain(&e)))?;
        if let Some(k) = self.key()? {
            b = b.key(k);
        }
        Ok(Some(b.build()))
    }

    /// The EPM of `--epm` / `IPCBUS_EPM`, with the password's key when one is set.
    /// Nothing is contacted yet.
    ///
    /// # Errors
    /// A [`ConfigError`] for a malformed address (naming the bad part), or as
    /// [`Common::key`].
    pub fn epm(&self) -> anyhow::Result<Option<Epm>> {
        let Some(addr) = self.epm_addr()? else {
            return Ok(None);
        };
        let from = if self.epm.is_some() {
            "--epm"
        } else {
            "IPCBUS_EPM"
        };
        let mut b = Epm::parse(&addr).config(from)?;
        if let Some(k) = self.key()? {
            b = b.key(k);
        }
        Ok(Some(b.build()))
    }

    /// The password and salt of `--password-file` / `--salt` and the environment,
    /// read as [`Credentials`] documents.
    ///
    /// # Errors
    /// A [`ConfigError`] when the password file cannot be read or is empty, or a
    /// salt is malformed.
    pub fn creds(&self) -> anyhow::Result<Credentials> {
        if let Some(c) = self.creds.get() {
            return Ok(c.clone());
        }
        let mut b = Credentials::builder().password_file(self.password_file.as_ref());
        if let Some(s) = &self.salt {
            b = b.salt(s.to_hex());
        }
        let c = b
            .resolve()
            .map_err(|e| config_error(ipcbus::error_chain(&e)))?;
        Ok(self.creds.get_or_init(|| c).clone())
    }

    /// The key from the password and salt, if a password is configured.
    ///
    /// # Errors
    /// A [`ConfigError`] as [`Common::creds`], or when only one of password and salt
    /// is given.
    pub fn key(&self) -> anyhow::Result<Option<Key>> {
        self.creds()?
            .key()
            .map_err(|e| config_error(ipcbus::error_chain(&e)))
    }

    /// The password and salt, when both are set (to hand on to child processes).
    ///
    /// # Errors
    /// As [`Common::key`].
    pub fn credentials(&self) -> anyhow::Result<Option<(Vec<u8>, Salt)>> {
        let c = self.creds()?;
        c.key().map_err(|e| config_error(ipcbus::error_chain(&e)))?;
        Ok(c.password()
            .map(<[u8]>::to_vec)
            .zip(c.salt().map(|s| Salt(s.to_vec()))))
    }

    /// Security for senders and receivers: encrypted under the password's key when one
    /// is set, else the back end's default.
    ///
    /// # Errors
    /// As [`Common::key`].
    pub fn security(&self) -> anyhow::Result<Security> {
        Ok(match self.key()? {
            Some(k) => Security::Encrypt(k),
            None => Security::default(),
        })
    }
}

/// Salt bytes as given on the command line.
#[derive(Clone, PartialEq, Eq)]
pub struct Salt(pub Vec<u8>);

impl fmt::Debug for Salt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Salt({} bytes)", self.0.len())
    }
}

impl Salt {
    /// The salt as lowercase hex (how it is handed to child processes).
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
}

/// Parses a salt with the library's parser (so the CLI and `epm-service` agree): hex
/// (`0a1b2c`, optional `0x`) or the classic `{0x01,0x02,0x03}` list of bytes.
///
/// # Errors
/// A message naming what is wrong; a malformed salt is never ignored.
pub fn parse_salt(s: &str) -> Result<Salt, String> {
    ipcbus::parse_salt(s).map(Salt).map_err(|e| e.to_string())
}

/// Ports a receiver may bind, in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports(pub Vec<u16>);

/// Parses `9000-9010`, `9000,9005` or a mix such as `9000-9002,9005`.
///
/// # Errors
/// A message naming the bad part.
pub fn parse_ports(s: &str) -> Result<Ports, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let port = |p: &str| -> Result<u16, String> {
            match p.trim().parse::<u16>() {
                Ok(0) => Err(
                    "port 0 is not allowed in --ports (leave --ports out for an ephemeral port)"
                        .into(),
                ),
                Ok(v) => Ok(v),
                Err(_) => Err(format!("{p:?} is not a port (1-65535)")),
            }
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    return Err(format!("port range {part} is backwards"));
                }
                out.extend(a..=b);
            }
            None => out.push(port(part)?),
        }
    }
    if out.is_empty() {
        return Err("no ports given".into());
    }
    Ok(Ports(out))
}

/// Parses a duration in seconds (`5`, `0.5`).
///
/// # Errors
/// A message when it is not a positive number of seconds.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salts() {
        assert_eq!(parse_salt("{0x01,0x02,0x03}").unwrap().0, vec![1, 2, 3]);
        assert_eq!(parse_salt("{ 0x01, 2 ,0XfF }").unwrap().0, vec![1, 2, 255]);
        assert_eq!(parse_salt("0a0b").unwrap().0, vec![10, 11]);
        assert_eq!(parse_salt("0x0a0b").unwrap().0, vec![10, 11]);
        for bad in ["", "{}", "{0x100}", "{0x01", "abc", "zz", "{0xg1}"] {
            assert!(parse_salt(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(parse_ports("9000-9002").unwrap().0, vec![9000, 9001, 9002]);
        assert_eq!(parse_ports("9000,9005").unwrap().0, vec![9000, 9005]);
        assert_eq!(parse_ports("1-2, 7").unwrap().0, vec![1, 2, 7]);
        for bad in ["", "0", "9010-9000", "x", "70000", "1-", "-1"] {
            assert!(parse_ports(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn secs() {
        assert_eq!(parse_secs("1.5").unwrap(), Duration::from_millis(1500));
        for bad in ["0", "-1", "nan", "inf", "x"] {
            assert!(parse_secs(bad).is_err());
        }
    }
}
