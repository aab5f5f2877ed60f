//! Options shared by every command, and how they turn into a discovery back end and
//! security settings.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use ipcbus::{Discovery, Epm, Key, Security};

/// Options accepted by every command (before or after the command name).
#[derive(Args, Debug, Clone, Default)]
pub struct Common {
    /// Endpoint manager to discover receivers through, HOST:PORT [default: the
    /// local-user registry]
    #[arg(long, global = true, env = "IPCBUS_EPM", value_name = "HOST:PORT")]
    pub epm: Option<String>,

    /// File holding the password (first line); else IPCBUS_PASSWORD_FILE, else the
    /// password itself in IPCBUS_PASSWORD
    #[arg(long, global = true, env = "IPCBUS_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// Salt for the password, hex (0a1b2c) or the classic {0x01,0x02,0x03} form
    #[arg(long, global = true, env = "IPCBUS_SALT", value_name = "SALT", value_parser = parse_salt)]
    pub salt: Option<Salt>,

    /// Address receivers bind and register [default: 127.0.0.1]
    #[arg(long, global = true, value_name = "ADDR")]
    pub ip: Option<IpAddr>,

    /// Ports receivers may bind, a range (9000-9010) or a list (9000,9005) [default:
    /// an ephemeral port]
    #[arg(long, global = true, value_name = "PORTS", value_parser = parse_ports)]
    pub ports: Option<Ports>,

    /// Print JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,
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
    /// The discovery back end: the EPM when `--epm` / `IPCBUS_EPM` is set, else the
    /// local-user registry.
    ///
    /// # Errors
    /// A [`ConfigError`] when the registry cannot be used or the EPM is unavailable.
    pub fn discovery(&self) -> anyhow::Result<Discovery> {
        match self.epm()? {
            Some(epm) => Ok(Discovery::Epm(epm)),
            None => Discovery::local().config("cannot use the local-user registry"),
        }
    }

    /// The EPM of `--epm` / `IPCBUS_EPM`, with the password's key when one is set.
    /// Nothing is contacted yet.
    ///
    /// # Errors
    /// As [`Common::key`].
    pub fn epm(&self) -> anyhow::Result<Option<Epm>> {
        let Some(addr) = self.epm.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let mut b = Epm::builder(addr);
        if let Some(k) = self.key()? {
            b = b.key(k);
        }
        Ok(Some(b.build()))
    }

    /// The key from the password and salt, if a password is configured.
    ///
    /// # Errors
    /// A [`ConfigError`] when the password file cannot be read, the password is empty,
    /// or only one of password and salt is given.
    pub fn key(&self) -> anyhow::Result<Option<Key>> {
        let password = self.password()?;
        match (password, &self.salt) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(config_error(
                "a password is set but no salt: give --salt or IPCBUS_SALT",
            )),
            (None, Some(_)) => Err(config_error(
                "a salt is set but no password: give --password-file, IPCBUS_PASSWORD_FILE or IPCBUS_PASSWORD",
            )),
            (Some(p), Some(s)) => Ok(Some(
                Key::derive(p, &s.0).config("cannot derive the key from the password")?,
            )),
        }
    }

    /// The password and salt, when both are set (to hand on to child processes).
    ///
    /// # Errors
    /// As [`Common::key`].
    pub fn credentials(&self) -> anyhow::Result<Option<(Vec<u8>, Salt)>> {
        self.key()?;
        Ok(self.password()?.zip(self.salt.clone()))
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

    /// The password bytes: from `--password-file` / `IPCBUS_PASSWORD_FILE`, else
    /// `IPCBUS_PASSWORD`.
    fn password(&self) -> anyhow::Result<Option<Vec<u8>>> {
        if let Some(path) = &self.password_file {
            let bytes = std::fs::read(path)
                .config(format!("cannot read password file {}", path.display()))?;
            let pw = first_line(&bytes);
            if pw.is_empty() {
                return Err(config_error(format!(
                    "password file {} is empty",
                    path.display()
                )));
            }
            return Ok(Some(pw.to_vec()));
        }
        match std::env::var_os("IPCBUS_PASSWORD") {
            Some(p) if !p.is_empty() => {
                use std::os::unix::ffi::OsStrExt;
                Ok(Some(p.as_bytes().to_vec()))
            }
            _ => Ok(None),
        }
    }
}

/// The password in a file: its first line, without the line ending.
fn first_line(bytes: &[u8]) -> &[u8] {
    let line = match bytes.iter().position(|&b| b == b'\n') {
        Some(i) => &bytes[..i],
        None => bytes,
    };
    line.strip_suffix(b"\r").unwrap_or(line)
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
    fn password_first_line() {
        assert_eq!(first_line(b"secret\n"), b"secret");
        assert_eq!(first_line(b"secret\r\nmore"), b"secret");
        assert_eq!(first_line(b"secret"), b"secret");
        assert_eq!(first_line(b"\n"), b"");
    }

    #[test]
    fn secs() {
        assert_eq!(parse_secs("1.5").unwrap(), Duration::from_millis(1500));
        for bad in ["0", "-1", "nan", "inf", "x"] {
            assert!(parse_secs(bad).is_err());
        }
    }
}
