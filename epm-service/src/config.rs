//! Start parameters: command line, environment and TOML file, merged into one
//! [`Config`].
//!
//! Precedence, highest first: command line (flags and the classic positional form),
//! environment (`IPCBUS_EPM_PASSWORD`, `IPCBUS_EPM_SALT`), the `--config` file,
//! built-in defaults. A password always needs a salt and the other way round; a
//! malformed salt is an error, never a silent fall back to plaintext.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ipcbus::{Credentials, CredentialsError, Key};
use ipcbus_proto::epm::{DEFAULT_EPM_MAX_FRAME, DEFAULT_PORT};
use serde::Deserialize;

/// Largest config or password file read.
const MAX_FILE: u64 = 1 << 20;

/// Command line of `epm-service`.
///
/// The classic form `epm-service [PORT] [PASSWORD SALT]` still works (a salt like
/// `{0x01,0x02,0x03}` or hex `010203`), but a password on the command line shows in
/// `ps`: prefer `--password-file`, `IPCBUS_EPM_PASSWORD` or the config file.
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "epm-service", version, about = "ipcbus endpoint manager", long_about = None)]
pub struct Args {
    /// Classic form: the TCP port (like --port).
    #[arg(value_name = "PORT")]
    pub classic_port: Option<u16>,
    /// Classic form: the password (shows in `ps`; prefer --password-file).
    #[arg(value_name = "PASSWORD", requires = "classic_salt")]
    pub classic_password: Option<String>,
    /// Classic form: the salt, like {0x01,0x02,0x03} or 010203.
    #[arg(value_name = "SALT")]
    pub classic_salt: Option<String>,
    /// TCP port on every default or port-less --bind address [default: 4455].
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Address to listen on, `IP` or `IP:PORT`; repeat for several
    /// [default: `[::]` and `0.0.0.0`].
    #[arg(long = "bind", value_name = "ADDR")]
    pub bind: Vec<String>,
    /// File holding the password (its first line).
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Salt for the password, like {0x01,0x02,0x03} or 010203.
    #[arg(long, value_name = "SALT")]
    pub salt: Option<String>,
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Lease of a registration in milliseconds [default: 10000].
    #[arg(long, value_name = "MS")]
    pub lease_ms: Option<u64>,
    /// Most client connections at once [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Most registrations in all [default: 100000].
    #[arg(long, value_name = "N")]
    pub max_registrations: Option<usize>,
    /// Most registrations one connection may hold [default: 256].
    #[arg(long, value_name = "N")]
    pub max_registrations_per_connection: Option<usize>,
    /// Most handles [default: 65536].
    #[arg(long, value_name = "N")]
    pub max_handles: Option<usize>,
    /// Most receivers of one handle [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_receivers_per_handle: Option<usize>,
    /// Most handles one connection may watch [default: 256].
    #[arg(long, value_name = "N")]
    pub max_watches_per_connection: Option<usize>,
    /// Largest frame accepted, in bytes [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    pub max_frame: Option<usize>,
    /// Time a client has to finish the handshake, in milliseconds [default: 5000].
    #[arg(long, value_name = "MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// Serve /status, /metrics and a status page over HTTP on IP:PORT (a bare PORT
    /// means 127.0.0.1:PORT) [default: off]. With a password set, readers need it
    /// (HTTP Basic, any user name) or the --http-token-file token.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// File whose first line is a token that reads the HTTP endpoint as
    /// `Authorization: Bearer TOKEN`.
    #[arg(long, value_name = "FILE")]
    pub http_token_file: Option<PathBuf>,
    /// Where registrations are kept: `memory` (this EPM alone), or
    /// `etcd://HOST[:PORT][,HOST[:PORT]...]` (or `http://` / `https://` URLs) to share
    /// them with every EPM using that etcd [default: memory].
    #[arg(long, value_name = "STORE")]
    pub store: Option<String>,
    /// Key prefix in etcd, as receivers and senders using etcd directly have it
    /// [default: /ipcbus/].
    #[arg(long, value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,
}

/// Where the registrations are kept (`--store`).
#[derive(Debug, Clone, Default)]
pub enum Store {
    /// In this process only (the default).
    #[default]
    Memory,
    /// In etcd, shared with every EPM using the same cluster and prefix; each EPM
    /// also keeps the whole view in memory and follows etcd's changes.
    Etcd(ipcbus::Etcd),
}

impl Store {
    /// Parses `memory`, or `etcd://HOST[:PORT][,HOST[:PORT]...]` (a later item may
    /// repeat `etcd://`; `http://` and `https://` URLs are taken as they are), with
    /// the key `prefix`.
    ///
    /// # Errors
    /// [`ConfigError::BadStore`] naming what is wrong.
    pub fn parse(spec: &str, prefix: Option<&str>) -> Result<Store, ConfigError> {
        let t = spec.trim();
        if t == "memory" {
            return Ok(Store::Memory);
        }
        let bad = |why: String| ConfigError::BadStore {
            spec: spec.to_owned(),
            why,
        };
        let first = t.split(',').next().unwrap_or_default().trim();
        if !["etcd://", "http://", "https://"]
            .iter()
            .any(|s| first.starts_with(s))
        {
            return Err(bad(
                "write memory or etcd://HOST[:PORT][,HOST[:PORT]...]".to_owned()
            ));
        }
        let urls: Vec<String> = t
            .split(',')
            .map(|item| {
                let item = item.trim();
                match item.strip_prefix("etcd://") {
                    Some(rest) => format!("http://{rest}"),
                    None if item.contains("://") || item.is_empty() => item.to_owned(),
                    None => format!("http://{item}"),
                }
            })
            .collect();
        let mut b = ipcbus::Etcd::parse(&urls.join(",")).map_err(|e| bad(e.to_string()))?;
        if let Some(p) = prefix {
            b = b.prefix(p);
        }
        Ok(Store::Etcd(b.build()))
    }
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Memory => f.write_str("memory"),
            Store::Etcd(e) => write!(f, "etcd {} prefix {}", e.endpoints().join(","), e.prefix()),
        }
    }
}

/// The limits that keep the service's memory bounded. Serialized (in `/status`) with
/// the config file's key names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Most client connections at once; more are refused with `Busy`.
    pub max_connections: usize,
    /// Most registrations in all.
    pub max_registrations: usize,
    /// Most registrations one connection may hold.
    pub max_registrations_per_connection: usize,
    /// Most handles (with registrations or watchers).
    pub max_handles: usize,
    /// Most receivers of one handle.
    pub max_receivers_per_handle: usize,
    /// Most handles one connection may watch.
    pub max_watches_per_connection: usize,
    /// Largest frame accepted (length field), and largest inflated body.
    pub max_frame: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_registrations: 100_000,
            max_registrations_per_connection: 256,
            max_handles: 65_536,
            max_receivers_per_handle: 1024,
            max_watches_per_connection: 256,
            max_frame: DEFAULT_EPM_MAX_FRAME,
        }
    }
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to listen on.
    pub binds: Vec<SocketAddr>,
    /// The master key when a password is set: every connection must prove it and
    /// every frame is sealed.
    pub key: Option<Key>,
    /// Lease of a registration (the most a client gets).
    pub lease: Duration,
    /// Limits.
    pub limits: Limits,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// The HTTP monitoring endpoint, when `--http` is given.
    pub http: Option<HttpConfig>,
    /// Where registrations are kept.
    pub store: Store,
    /// Things the operator should hear about (password on the command line, open
    /// network bind without password); logged at start.
    pub warnings: Vec<String>,
}

/// The HTTP monitoring endpoint's settings (`--http`, `--http-token-file`).
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Who may read it: the EPM password, the token.
    pub auth: crate::http::Auth,
}

impl Config {
    /// A configuration for tests and embedding: listen where told, no password,
    /// default lease and limits.
    pub fn new(binds: Vec<SocketAddr>) -> Config {
        Config {
            binds,
            key: None,
            lease: Duration::from_secs(10),
            limits: Limits::default(),
            handshake_timeout: Duration::from_secs(5),
            http: None,
            store: Store::Memory,
            warnings: Vec::new(),
        }
    }

    /// Idle connections (nothing received) are closed after this long: three leases,
    /// at least 10 s. Clients ping four times per lease.
    pub fn idle_timeout(&self) -> Duration {
        (self.lease * 3).max(Duration::from_secs(10))
    }
}

/// The `--config` file. Every key is optional; unknown keys are an error.
///
/// ```toml
/// port = 4455
/// bind = ["0.0.0.0", "[::]:4455"]
/// password_file = "/etc/ipcbus/epm.password"
/// salt = "{0x01,0x02,0x03}"
/// lease_ms = 10000
/// max_connections = 1024
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// As `--port`.
    pub port: Option<u16>,
    /// As `--bind`.
    pub bind: Option<Vec<String>>,
    /// The password itself (keep the file mode 0600), or use `password_file`.
    pub password: Option<String>,
    /// As `--password-file`.
    pub password_file: Option<PathBuf>,
    /// As `--salt`.
    pub salt: Option<String>,
    /// As `--lease-ms`.
    pub lease_ms: Option<u64>,
    /// As `--max-connections`.
    pub max_connections: Option<usize>,
    /// As `--max-registrations`.
    pub max_registrations: Option<usize>,
    /// As `--max-registrations-per-connection`.
    pub max_registrations_per_connection: Option<usize>,
    /// As `--max-handles`.
    pub max_handles: Option<usize>,
    /// As `--max-receivers-per-handle`.
    pub max_receivers_per_handle: Option<usize>,
    /// As `--max-watches-per-connection`.
    pub max_watches_per_connection: Option<usize>,
    /// As `--max-frame`.
    pub max_frame: Option<usize>,
    /// As `--handshake-timeout-ms`.
    pub handshake_timeout_ms: Option<u64>,
    /// As `--http`.
    pub http: Option<String>,
    /// As `--http-token-file`.
    pub http_token_file: Option<PathBuf>,
    /// As `--store`.
    pub store: Option<String>,
    /// As `--etcd-prefix`.
    pub etcd_prefix: Option<String>,
}

/// Why the start parameters are not usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is larger than 1 MiB.
    #[error("{0} is larger than 1 MiB; not a config or password file")]
    TooLarge(PathBuf),
    /// The config file is not valid TOML or has unknown keys.
    #[error("config file {path}: {message}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// The password or salt is unusable: an unreadable or empty password file, a
    /// malformed salt, one without the other, two different passwords.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// The classic positional salt and `--salt` differ.
    #[error("salt given twice: SALT (positional) and --salt differ; give one")]
    SaltConflict,
    /// The positional port and `--port` differ.
    #[error("port given twice: {positional} (positional) and {flag} (--port)")]
    PortConflict {
        /// The positional port.
        positional: u16,
        /// The `--port` value.
        flag: u16,
    },
    /// A `--bind` address is not `IP` or `IP:PORT`.
    #[error("bind address {0:?} is not IP or IP:PORT (write IPv6 as [::1]:4455)")]
    BadBind(String),
    /// The `--http` address is not `IP:PORT` or `PORT`.
    #[error("http address {0:?} is not IP:PORT or PORT (write IPv6 as [::1]:8455)")]
    BadHttp(String),
    /// The `--http-token-file` is empty or is given without `--http`.
    #[error("http token file {path}: {why}")]
    HttpToken {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
    /// `--store` (`IPCBUS_EPM_STORE`, `store`) is not `memory` or etcd endpoints.
    #[error("store {spec:?}: {why}")]
    BadStore {
        /// The value given.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// A value is out of range.
    #[error("{name}: {why}")]
    BadValue {
        /// The setting.
        name: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

/// Reads environment variables; a function so tests need not touch the process
/// environment.
pub type EnvFn<'a> = &'a dyn Fn(&str) -> Option<OsString>;

/// The process environment, ignoring empty values.
pub fn process_env(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

impl Config {
    /// Merges the command line, the environment (through `env`) and the config file
    /// named by `--config`.
    ///
    /// # Errors
    /// [`ConfigError`] names the setting and what is wrong with it.
    pub fn load(args: &Args, env: EnvFn<'_>) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(p) => parse_file(p, &read_small(p)?)?,
            None => FileConfig::default(),
        };
        let mut warnings = Vec::new();

        let port = match (args.classic_port, args.port) {
            (Some(a), Some(b)) if a != b => {
                return Err(ConfigError::PortConflict {
                    positional: a,
                    flag: b,
                })
            }
            (a, b) => a.or(b).or(file.port).unwrap_or(DEFAULT_PORT),
        };
        let bind_strs: Vec<String> = if !args.bind.is_empty() {
            args.bind.clone()
        } else {
            file.bind.clone().unwrap_or_default()
        };
        let binds = if bind_strs.is_empty() {
            vec![
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            ]
        } else {
            bind_strs
                .iter()
                .map(|s| parse_bind(s, port))
                .collect::<Result<Vec<_>, _>>()?
        };

        // Password and salt: command line, then environment (read as
        // `ipcbus::Credentials` documents), then file.
        let mut cli = Credentials::builder()
            .password_file(args.password_file.as_ref())
            .env_os(env);
        if let Some(p) = &args.classic_password {
            warnings.push(
                "password given on the command line: other local users can see it \
                 with ps; use --password-file, IPCBUS_EPM_PASSWORD or the config file"
                    .to_owned(),
            );
            cli = cli.password_from(p, "the command line");
        }
        match (&args.classic_salt, &args.salt) {
            (Some(a), Some(b)) if a.trim() != b.trim() => return Err(ConfigError::SaltConflict),
            (Some(s), _) => cli = cli.salt_from(s, "the command line"),
            (None, Some(s)) => cli = cli.salt(s),
            (None, None) => {}
        }
        let cli = cli.resolve()?;
        // The config file fills only what the command line and the environment left
        // unset (its password file is not even read otherwise).
        let mut in_file = Credentials::builder().env(|_| None);
        if cli.password().is_none() {
            // `password` before `password_file`, as documented for the file.
            if let Some(p) = &file.password {
                in_file = in_file.password_from(p, "the config file");
            } else if let Some(f) = &file.password_file {
                in_file = in_file.password_file_from(f, "the config file");
            }
        }
        if cli.salt().is_none() {
            if let Some(s) = &file.salt {
                in_file = in_file.salt_from(s, "the config file");
            }
        }
        let creds = cli.or(in_file.resolve()?);
        let key = creds.key()?;
        if let (Some(p), Some(s)) = (creds.password_from(), creds.salt_from()) {
            let level = |from: &str| {
                if from.starts_with("IPCBUS_") {
                    "environment"
                } else if from == "the config file" {
                    "config"
                } else {
                    "command line"
                }
            };
            if level(p) != level(s) {
                warnings.push(format!(
                    "the password comes from {p} and the salt from {s}: check that they \
                     belong together (a stray IPCBUS_SALT or IPCBUS_PASSWORD in the \
                     environment, say), or every client will fail to authenticate"
                ));
            }
        }
        if key.is_none() {
            for b in &binds {
                if !b.ip().is_loopback() {
                    warnings.push(format!(
                        "listening on {b} without a password: anyone who can reach it can \
                         register and look up receivers; set a password and salt"
                    ));
                }
            }
        }

        let http = http_config(args, &file, creds.password())?;
        if let Some(h) = &http {
            if !h.auth.required() && !h.addr.ip().is_loopback() {
                warnings.push(format!(
                    "the http endpoint at {} has no password: anyone who can reach it can \
                     read the handles and receivers; set a password or --http-token-file, or \
                     use a loopback address",
                    h.addr
                ));
            }
        }

        let lease_ms = args.lease_ms.or(file.lease_ms).unwrap_or(10_000);
        if !(100..=u64::from(u32::MAX)).contains(&lease_ms) {
            return Err(ConfigError::BadValue {
                name: "lease-ms",
                why: "must be between 100 and 4294967295",
            });
        }
        let d = Limits::default();
        let pick = |a: Option<usize>, f: Option<usize>, def: usize, name: &'static str| {
            let v = a.or(f).unwrap_or(def);
            if v == 0 {
                Err(ConfigError::BadValue {
                    name,
                    why: "must be at least 1",
                })
            } else {
                Ok(v)
            }
        };
        let limits = Limits {
            max_connections: pick(
                args.max_connections,
                file.max_connections,
                d.max_connections,
                "max-connections",
            )?,
            max_registrations: pick(
                args.max_registrations,
                file.max_registrations,
                d.max_registrations,
                "max-registrations",
            )?,
            max_registrations_per_connection: pick(
                args.max_registrations_per_connection,
                file.max_registrations_per_connection,
                d.max_registrations_per_connection,
                "max-registrations-per-connection",
            )?,
            max_handles: pick(
                args.max_handles,
                file.max_handles,
                d.max_handles,
                "max-handles",
            )?,
            max_receivers_per_handle: pick(
                args.max_receivers_per_handle,
                file.max_receivers_per_handle,
                d.max_receivers_per_handle,
                "max-receivers-per-handle",
            )?,
            max_watches_per_connection: pick(
                args.max_watches_per_connection,
                file.max_watches_per_connection,
                d.max_watches_per_connection,
                "max-watches-per-connection",
            )?,
            max_frame: pick(args.max_frame, file.max_frame, d.max_frame, "max-frame")?,
        };
        if limits.max_frame < 4096 || limits.max_frame > 64 << 20 {
            return Err(ConfigError::BadValue {
                name: "max-frame",
                why: "must be between 4096 and 67108864",
            });
        }
        let hs = args
            .handshake_timeout_ms
            .or(file.handshake_timeout_ms)
            .unwrap_or(5000);
        if hs == 0 {
            return Err(ConfigError::BadValue {
                name: "handshake-timeout-ms",
                why: "must be at least 1",
            });
        }
        let lease = Duration::from_millis(lease_ms);
        let store = store_config(args, &file, env, lease)?;
        Ok(Config {
            binds,
            key,
            lease,
            limits,
            handshake_timeout: Duration::from_millis(hs),
            http,
            store,
            warnings,
        })
    }
}

/// The `--http` settings: the address (a bare port is on 127.0.0.1), the password
/// and the token file's first line.
fn http_config(
    args: &Args,
    file: &FileConfig,
    password: Option<&[u8]>,
) -> Result<Option<HttpConfig>, ConfigError> {
    let token_file = args
        .http_token_file
        .as_ref()
        .or(file.http_token_file.as_ref());
    let Some(spec) = args.http.as_ref().or(file.http.as_ref()) else {
        return match token_file {
            Some(p) => Err(ConfigError::HttpToken {
                path: p.clone(),
                why: "given without --http",
            }),
            None => Ok(None),
        };
    };
    let t = spec.trim();
    let addr = match t.parse::<u16>() {
        Ok(port) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        Err(_) => t
            .parse::<SocketAddr>()
            .map_err(|_| ConfigError::BadHttp(spec.clone()))?,
    };
    let token = match token_file {
        None => None,
        Some(p) => {
            let bytes = read_small(p)?;
            let text = String::from_utf8_lossy(&bytes);
            let first = text.lines().next().unwrap_or("").trim();
            if first.is_empty() {
                return Err(ConfigError::HttpToken {
                    path: p.clone(),
                    why: "its first line is empty",
                });
            }
            Some(first.as_bytes().to_vec())
        }
    };
    Ok(Some(HttpConfig {
        addr,
        auth: crate::http::Auth {
            password: password.map(<[u8]>::to_vec),
            token,
        },
    }))
}

/// The `--store` settings: command line, then `IPCBUS_EPM_STORE`, then the file. The
/// etcd lease is the registration lease (whole seconds, at least 1 s); an `https://`
/// store trusts the CA certificate in the file named by `IPCBUS_ETCD_CA`.
fn store_config(
    args: &Args,
    file: &FileConfig,
    env: EnvFn<'_>,
    lease: Duration,
) -> Result<Store, ConfigError> {
    let from_env = env("IPCBUS_EPM_STORE").map(|v| v.to_string_lossy().into_owned());
    let prefix = args.etcd_prefix.as_ref().or(file.etcd_prefix.as_ref());
    let Some(spec) = args.store.clone().or(from_env).or(file.store.clone()) else {
        return match prefix {
            Some(_) => Err(ConfigError::BadStore {
                spec: "memory".to_owned(),
                why: "--etcd-prefix needs --store etcd://...".to_owned(),
            }),
            None => Ok(Store::Memory),
        };
    };
    let Store::Etcd(etcd) = Store::parse(&spec, prefix.map(String::as_str))? else {
        return Ok(Store::Memory);
    };
    let mut b = ipcbus::Etcd::builder(etcd.endpoints().to_vec())
        .prefix(etcd.prefix())
        .lease(lease.max(Duration::from_secs(1)));
    if let Some(ca) = env("IPCBUS_ETCD_CA") {
        b = b.tls(read_small(Path::new(&ca))?);
    }
    Ok(Store::Etcd(b.build()))
}

fn read_small(path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::io::Read;
    let err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut buf = Vec::new();
    f.take(MAX_FILE + 1).read_to_end(&mut buf).map_err(err)?;
    if buf.len() as u64 > MAX_FILE {
        return Err(ConfigError::TooLarge(path.to_owned()));
    }
    Ok(buf)
}

/// Parses the TOML text of a config file.
///
/// # Errors
/// [`ConfigError::Toml`] with the line and column of the problem.
pub fn parse_file(path: &Path, bytes: &[u8]) -> Result<FileConfig, ConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ConfigError::Toml {
        path: path.to_owned(),
        message: "not UTF-8".to_owned(),
    })?;
    toml::from_str(text).map_err(|e| ConfigError::Toml {
        path: path.to_owned(),
        message: toml_message(&e),
    })
}

/// A TOML error on one line: its message, with the line and column where it is
/// (the `toml` crate's own text spans several lines with a caret diagram).
fn toml_message(e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', "; ");
    // The span is in bytes; the line and column come from the first line of the
    // crate's text ("TOML parse error at line L, column C").
    let full = e.to_string();
    match full.lines().next() {
        Some(first) if first.contains("line") => {
            let at = first
                .trim_start_matches("TOML parse error ")
                .trim_end_matches(':');
            format!("{msg} ({at})")
        }
        _ => msg,
    }
}

/// Parses `IP` or `IP:PORT` (`[v6]:PORT`); a bare IP gets `port`.
///
/// # Errors
/// [`ConfigError::BadBind`].
pub fn parse_bind(s: &str, port: u16) -> Result<SocketAddr, ConfigError> {
    let t = s.trim();
    if let Ok(a) = t.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = t
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(t);
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, port))
        .map_err(|_| ConfigError::BadBind(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    fn args(v: &[&str]) -> Args {
        let mut all = vec!["epm-service"];
        all.extend_from_slice(v);
        Args::try_parse_from(all).unwrap()
    }

    fn load(v: &[&str]) -> Result<Config, ConfigError> {
        Config::load(&args(v), &no_env)
    }

    fn tmp(name: &str, body: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("epm-cfg-{}-{name}", std::process::id()));
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn defaults_listen_on_both_families() {
        let c = load(&[]).unwrap();
        assert_eq!(
            c.binds,
            vec![
                "[::]:4455".parse::<SocketAddr>().unwrap(),
                "0.0.0.0:4455".parse().unwrap()
            ]
        );
        assert!(c.key.is_none());
        assert_eq!(c.lease, Duration::from_secs(10));
        assert_eq!(c.limits, Limits::default());
        // open network bind without password: warned
        assert_eq!(c.warnings.len(), 2);
        assert!(c.warnings[0].contains("without a password"));
    }

    #[test]
    fn classic_positional_form() {
        let c = load(&["5000"]).unwrap();
        assert_eq!(c.binds[0].port(), 5000);
        let c = load(&["5000", "secret", "{0x01,0x02,0x03}"]).unwrap();
        assert_eq!(c.key, Some(Key::derive("secret", [1u8, 2, 3]).unwrap()));
        assert!(c.warnings.iter().any(|w| w.contains("command line")));
        assert!(!c.warnings.iter().any(|w| w.contains("without a password")));
        // the same key from hex
        let c = load(&["5000", "secret", "010203"]).unwrap();
        assert_eq!(c.key, Some(Key::derive("secret", [1u8, 2, 3]).unwrap()));
        // a password needs a salt (clap enforces it for the classic form)
        assert!(Args::try_parse_from(["epm-service", "5000", "secret"]).is_err());
        // a port that is not a port
        assert!(Args::try_parse_from(["epm-service", "70000"]).is_err());
    }

    #[test]
    fn malformed_classic_salts_are_errors() {
        for bad in [
            "{0x01,0x02",
            "{0x01,,0x03}",
            "{0x01,0x100}",
            "{}",
            "{0xzz}",
            "0x01,0x02",
            "abc",
            "{1;2}",
        ] {
            let e = load(&["5000", "secret", bad]).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Credentials(CredentialsError::Salt { from, .. }) if from == "the command line"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn flags_env_and_file_precedence() {
        let pwf = tmp("pw", "from-file\n");
        let cfg = tmp(
            "toml",
            &format!(
                "port = 6000\nbind = [\"127.0.0.1\", \"[::1]:6001\"]\npassword_file = {:?}\nsalt = \"0a0b\"\nlease_ms = 2000\nmax_connections = 7\n",
                pwf
            ),
        );
        let c = load(&["--config", cfg.to_str().unwrap()]).unwrap();
        assert_eq!(
            c.binds,
            vec![
                "127.0.0.1:6000".parse::<SocketAddr>().unwrap(),
                "[::1]:6001".parse().unwrap()
            ]
        );
        assert_eq!(c.key, Some(Key::derive("from-file", [10u8, 11]).unwrap()));
        assert_eq!(c.lease, Duration::from_secs(2));
        assert_eq!(c.limits.max_connections, 7);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        // flags beat the file; env beats the file
        let env = |n: &str| match n {
            "IPCBUS_EPM_PASSWORD" => Some("from-env".into()),
            "IPCBUS_EPM_SALT" => Some("{0x05}".into()),
            _ => None,
        };
        let a = args(&[
            "--config",
            cfg.to_str().unwrap(),
            "--lease-ms",
            "500",
            "--bind",
            "127.0.0.2:1",
        ]);
        let c = Config::load(&a, &env).unwrap();
        assert_eq!(c.key, Some(Key::derive("from-env", [5u8]).unwrap()));
        assert_eq!(c.lease, Duration::from_millis(500));
        assert_eq!(c.binds, vec!["127.0.0.2:1".parse::<SocketAddr>().unwrap()]);
        // --password-file and --salt
        let c = load(&[
            "--password-file",
            pwf.to_str().unwrap(),
            "--salt",
            "{0x0a,0x0b}",
        ])
        .unwrap();
        assert_eq!(c.key, Some(Key::derive("from-file", [10u8, 11]).unwrap()));
        let _ = std::fs::remove_file(pwf);
        let _ = std::fs::remove_file(cfg);
    }

    #[test]
    fn password_and_salt_from_different_places_are_warned_about() {
        let cfg = tmp("toml7", "password = \"in-file\"\nsalt = \"05\"\n");
        let env = |n: &str| (n == "IPCBUS_SALT").then(|| OsString::from("06"));
        let a = args(&["--config", cfg.to_str().unwrap(), "--bind", "127.0.0.1"]);
        let c = Config::load(&a, &env).unwrap();
        assert_eq!(c.key, Some(Key::derive("in-file", [6u8]).unwrap()));
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("salt from IPCBUS_SALT")),
            "{:?}",
            c.warnings
        );
        let c = Config::load(&a, &no_env).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let _ = std::fs::remove_file(cfg);
    }

    #[test]
    fn the_file_fills_only_what_is_missing() {
        // The command line's password file wins; the file's (missing) one is not read,
        // and the salt still comes from the file.
        let pwf = tmp("pw6", "on-the-command-line\n");
        let cfg = tmp(
            "toml6",
            "password_file = \"/nonexistent/epm.password\"\nsalt = \"05\"\n",
        );
        let c = load(&[
            "--config",
            cfg.to_str().unwrap(),
            "--password-file",
            pwf.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(
            c.key,
            Some(Key::derive("on-the-command-line", [5u8]).unwrap())
        );
        // Without the flag, the missing file is an error naming the config file.
        let e = load(&["--config", cfg.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("the config file"), "{e}");
        let _ = std::fs::remove_file(pwf);
        let _ = std::fs::remove_file(cfg);
    }

    #[test]
    fn the_generic_names_work_like_the_epm_names() {
        for (pw, salt) in [
            ("IPCBUS_PASSWORD", "IPCBUS_SALT"),
            ("IPCBUS_EPM_PASSWORD", "IPCBUS_EPM_SALT"),
        ] {
            let env = move |n: &str| {
                (n == pw)
                    .then(|| OsString::from("from-env"))
                    .or_else(|| (n == salt).then(|| OsString::from("05")))
            };
            let c = Config::load(&args(&[]), &env).unwrap();
            assert_eq!(c.key, Some(Key::derive("from-env", [5u8]).unwrap()), "{pw}");
        }
        let pwf = tmp("pw5", "in-a-file\n");
        let path = pwf.to_str().unwrap().to_owned();
        let env = move |n: &str| match n {
            "IPCBUS_PASSWORD_FILE" => Some(path.clone().into()),
            "IPCBUS_EPM_SALT" => Some("05".into()),
            _ => None,
        };
        let c = Config::load(&args(&[]), &env).unwrap();
        assert_eq!(c.key, Some(Key::derive("in-a-file", [5u8]).unwrap()));
        let _ = std::fs::remove_file(pwf);
    }

    #[test]
    fn inconsistent_settings_are_errors() {
        let pwf = tmp("pw2", "x");
        assert!(matches!(
            load(&["--password-file", pwf.to_str().unwrap()]),
            Err(ConfigError::Credentials(CredentialsError::PasswordWithoutSalt { from })) if from == "--password-file"
        ));
        assert!(matches!(
            load(&["--salt", "0102"]),
            Err(ConfigError::Credentials(CredentialsError::SaltWithoutPassword { from })) if from == "--salt"
        ));
        assert!(matches!(
            load(&["1", "pw", "0102", "--password-file", pwf.to_str().unwrap()]),
            Err(ConfigError::Credentials(CredentialsError::Conflict { .. }))
        ));
        assert!(matches!(
            load(&["5000", "--port", "5001"]),
            Err(ConfigError::PortConflict { .. })
        ));
        assert!(load(&["5000", "--port", "5000"]).is_ok());
        assert!(matches!(
            load(&["5000", "pw", "01", "--salt", "02"]),
            Err(ConfigError::SaltConflict)
        ));
        assert!(load(&["5000", "pw", "01", "--salt", "01"]).is_ok());
        assert!(matches!(
            load(&["--bind", "localhost:80"]),
            Err(ConfigError::BadBind(_))
        ));
        assert!(matches!(
            load(&["--lease-ms", "5"]),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            load(&["--max-connections", "0"]),
            Err(ConfigError::BadValue { .. })
        ));
        let empty = tmp("pw3", "\n");
        assert!(matches!(
            load(&["--password-file", empty.to_str().unwrap(), "--salt", "01"]),
            Err(ConfigError::Credentials(
                CredentialsError::EmptyPassword { .. }
            ))
        ));
        assert!(matches!(
            load(&["--password-file", "/nonexistent/pw", "--salt", "01"]),
            Err(ConfigError::Credentials(CredentialsError::ReadFile { .. }))
        ));
        let _ = std::fs::remove_file(pwf);
        let _ = std::fs::remove_file(empty);
    }

    #[test]
    fn config_file_errors_name_the_problem() {
        let p = Path::new("x.toml");
        let e = parse_file(p, b"port = \"abc\"").unwrap_err().to_string();
        assert!(e.contains("x.toml"), "{e}");
        let e = parse_file(p, b"prot = 1").unwrap_err().to_string();
        assert!(e.contains("prot"), "{e}");
        assert!(parse_file(p, b"port = 1\n[[[").is_err());
        let e = parse_file(p, b"port = 1\nprot = 2\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(parse_file(p, &[0xff, 0xfe]).is_err());
        assert_eq!(parse_file(p, b"").unwrap().port, None);
    }

    #[test]
    fn the_installer_example_config_is_valid() {
        let text = include_str!("../../installer/epm.toml");
        let f = parse_file(Path::new("installer/epm.toml"), text.as_bytes()).unwrap();
        assert_eq!(f.port, Some(4455));
        assert!(ipcbus::parse_salt(f.salt.as_deref().unwrap()).is_ok());
    }

    #[test]
    fn http_settings() {
        assert!(load(&[]).unwrap().http.is_none());
        let c = load(&["--http", "8455"]).unwrap();
        let h = c.http.unwrap();
        assert_eq!(h.addr, "127.0.0.1:8455".parse::<SocketAddr>().unwrap());
        assert!(!h.auth.required());
        let c = load(&["--bind", "127.0.0.1", "--http", "[::1]:0"]).unwrap();
        assert_eq!(
            c.http.unwrap().addr,
            "[::1]:0".parse::<SocketAddr>().unwrap()
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        // an open network address without a password is allowed, with a warning
        let c = load(&["--bind", "127.0.0.1", "--http", "0.0.0.0:8455"]).unwrap();
        assert!(c
            .warnings
            .iter()
            .any(|w| w.contains("the http endpoint at 0.0.0.0:8455 has no password")));
        // the EPM password protects it; the token file adds a bearer token
        let tok = tmp("tok", "  the-token \nrest\n");
        let c = load(&[
            "--bind",
            "127.0.0.1",
            "5000",
            "secret",
            "01",
            "--http",
            "0.0.0.0:1",
            "--http-token-file",
            tok.to_str().unwrap(),
        ])
        .unwrap();
        let h = c.http.unwrap();
        assert_eq!(h.auth.password.as_deref(), Some(&b"secret"[..]));
        assert_eq!(h.auth.token.as_deref(), Some(&b"the-token"[..]));
        assert!(!c.warnings.iter().any(|w| w.contains("http endpoint")));
        // config file keys
        let cfg = tmp("toml-http", "http = \"127.0.0.1:9\"\n");
        let c = load(&["--config", cfg.to_str().unwrap()]).unwrap();
        assert_eq!(c.http.unwrap().addr.port(), 9);
        // errors
        for bad in ["localhost:1", "1.2.3.4", "70000", ""] {
            assert!(
                matches!(load(&["--http", bad]), Err(ConfigError::BadHttp(_))),
                "{bad}"
            );
        }
        let empty = tmp("tok2", "\n");
        assert!(matches!(
            load(&["--http", "1", "--http-token-file", empty.to_str().unwrap()]),
            Err(ConfigError::HttpToken { .. })
        ));
        assert!(matches!(
            load(&["--http-token-file", tok.to_str().unwrap()]),
            Err(ConfigError::HttpToken { .. })
        ));
        for p in [tok, cfg, empty] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn store_settings() {
        assert!(matches!(load(&[]).unwrap().store, Store::Memory));
        assert!(matches!(
            load(&["--store", "memory"]).unwrap().store,
            Store::Memory
        ));
        let c = load(&[
            "--store",
            "etcd://a:1,b,etcd://[::1]:3",
            "--lease-ms",
            "500",
        ])
        .unwrap();
        let Store::Etcd(e) = &c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(
            e.endpoints(),
            ["http://a:1", "http://b:2379", "http://[::1]:3"]
        );
        assert_eq!(e.prefix(), "/ipcbus/");
        // The etcd lease is whole seconds, at least one.
        assert_eq!(e.lease(), Duration::from_secs(1));
        assert_eq!(
            c.store.to_string(),
            "etcd http://a:1,http://b:2379,http://[::1]:3 prefix /ipcbus/"
        );
        let c = load(&["--store", "http://h:7", "--etcd-prefix", "team"]).unwrap();
        let Store::Etcd(e) = &c.store else { panic!() };
        assert_eq!(
            (e.endpoints()[0].as_str(), e.prefix()),
            ("http://h:7", "/team/")
        );
        // The environment beats the file; the command line beats both.
        let cfg = tmp(
            "toml-store",
            "store = \"etcd://file:1\"\netcd_prefix = \"/f/\"\n",
        );
        let env = |n: &str| (n == "IPCBUS_EPM_STORE").then(|| OsString::from("etcd://env:2"));
        let a = args(&["--config", cfg.to_str().unwrap()]);
        let Store::Etcd(e) = Config::load(&a, &env).unwrap().store else {
            panic!()
        };
        assert_eq!(
            (e.endpoints()[0].as_str(), e.prefix()),
            ("http://env:2", "/f/")
        );
        let Store::Etcd(e) = Config::load(&a, &no_env).unwrap().store else {
            panic!()
        };
        assert_eq!(e.endpoints()[0], "http://file:1");
        let a = args(&["--config", cfg.to_str().unwrap(), "--store", "memory"]);
        assert!(matches!(
            Config::load(&a, &env).unwrap().store,
            Store::Memory
        ));
        for bad in [
            "etcd",
            "redis://x",
            "etcd://",
            "etcd://h:99999",
            "etcd://a,,b",
            "h:2379",
        ] {
            let e = load(&["--store", bad]).unwrap_err();
            assert!(matches!(e, ConfigError::BadStore { .. }), "{bad}: {e}");
        }
        assert!(matches!(
            load(&["--etcd-prefix", "x"]),
            Err(ConfigError::BadStore { .. })
        ));
        let _ = std::fs::remove_file(cfg);
    }

    #[test]
    fn bind_forms() {
        assert_eq!(
            parse_bind("10.1.2.3", 7).unwrap(),
            "10.1.2.3:7".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            parse_bind("::1", 7).unwrap(),
            "[::1]:7".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            parse_bind("[::1]", 7).unwrap(),
            "[::1]:7".parse::<SocketAddr>().unwrap()
        );
        assert!(parse_bind("nope", 7).is_err());
    }
}
