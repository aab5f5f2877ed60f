//! The password and salt, read from flags, files and the environment in one documented
//! order, for every program of the workspace (library defaults, the `ipcbus` command
//! line, the examples, `epm-service`).

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use ipcbus_proto::crypto::{Key, KeyError};
use ipcbus_proto::salt::{parse_salt, SaltError};

/// Largest password file read, in bytes (its first line is the password).
const MAX_PASSWORD_FILE: u64 = 1 << 20;

/// The environment variables naming a password file, in the order they are tried.
pub(crate) const PASSWORD_FILE_VARS: [&str; 2] =
    ["IPCBUS_PASSWORD_FILE", "IPCBUS_EPM_PASSWORD_FILE"];
/// The environment variables holding the password itself.
pub(crate) const PASSWORD_VARS: [&str; 2] = ["IPCBUS_PASSWORD", "IPCBUS_EPM_PASSWORD"];
/// The environment variables holding the salt.
pub(crate) const SALT_VARS: [&str; 2] = ["IPCBUS_SALT", "IPCBUS_EPM_SALT"];

/// A password and a salt (either may be missing), each with where it came from.
///
/// Every program of ipcbus reads them the same way. For each of the two, the first
/// place that has it wins:
///
/// 1. what the program was given explicitly: [`CredentialsBuilder::password_file`]
///    (`--password-file FILE`), [`CredentialsBuilder::password`] (a password in code),
///    [`CredentialsBuilder::salt`] (`--salt SALT`);
/// 2. the environment: `IPCBUS_PASSWORD_FILE` (a file whose first line is the
///    password), then `IPCBUS_PASSWORD` (the password itself), and `IPCBUS_SALT`.
///    The names `IPCBUS_EPM_PASSWORD_FILE`, `IPCBUS_EPM_PASSWORD` and
///    `IPCBUS_EPM_SALT` mean the same; setting both names of a pair to different
///    values is an error rather than a guess. Empty variables count as unset;
/// 3. lower-priority settings merged with [`Credentials::or`] (a config file).
///
/// A password needs a salt and a salt needs a password: [`Credentials::key`] says
/// which one is missing and where the other came from. A salt is hex (`0a1b2c`) or
/// the classic `{0x01,0x02,0x03}`; a malformed one is an error, never ignored.
///
/// ```
/// use ipcbus::Credentials;
///
/// let c = Credentials::builder()
///     .password("correct horse")
///     .salt("{0x01,0x02,0x03}")
///     .env(|_| None) // ignore the process environment in this example
///     .resolve()?;
/// assert!(c.key()?.is_some());
/// assert_eq!(c.salt(), Some(&[1u8, 2, 3][..]));
///
/// // A password alone is an error that says what to set.
/// let half = Credentials::builder().password("pw").env(|_| None).resolve()?;
/// let err = half.key().unwrap_err().to_string();
/// assert!(err.contains("IPCBUS_SALT"), "{err}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Default)]
pub struct Credentials {
    password: Option<(Vec<u8>, String)>,
    salt: Option<(Vec<u8>, String)>,
}

/// Why the password or salt could not be read, or do not make a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    /// The password file could not be read.
    #[error("cannot read the password file {path} (from {from})")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The flag or variable that named it.
        from: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The password file is larger than 1 MiB: not a password file.
    #[error("the password file {path} (from {from}) is larger than 1 MiB")]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// The flag or variable that named it.
        from: String,
    },
    /// The password (or the password file's first line) is empty.
    #[error("the password from {from} is empty")]
    EmptyPassword {
        /// Where it came from.
        from: String,
    },
    /// The salt is malformed.
    #[error("the salt from {from} is malformed")]
    Salt {
        /// Where it came from.
        from: String,
        /// What is wrong.
        #[source]
        source: SaltError,
    },
    /// A password without a salt.
    #[error("a password is set (from {from}) but no salt: set --salt or IPCBUS_SALT to the salt the other side uses")]
    PasswordWithoutSalt {
        /// Where the password came from.
        from: String,
    },
    /// A salt without a password.
    #[error("a salt is set (from {from}) but no password: set --password-file, IPCBUS_PASSWORD_FILE or IPCBUS_PASSWORD to the password the other side uses")]
    SaltWithoutPassword {
        /// Where the salt came from.
        from: String,
    },
    /// Two explicit passwords, or both names of an environment pair with different
    /// values.
    #[error("the {what} is given twice, differently ({first} and {second}): set one")]
    Conflict {
        /// `password` or `salt`.
        what: &'static str,
        /// One source.
        first: String,
        /// The other.
        second: String,
    },
    /// A salt in the environment that is not UTF-8 text.
    #[error(
        "the salt in {from} is not UTF-8 text: write it as hex (010203) or {{0x01,0x02,0x03}}"
    )]
    NotUtf8 {
        /// The variable.
        from: String,
    },
    /// The key could not be derived.
    #[error("cannot derive the key from the password")]
    Key(#[from] KeyError),
}

/// Reads an environment variable, as raw bytes; `None` when unset (empty counts as
/// unset).
type EnvFn<'a> = Box<dyn Fn(&str) -> Option<OsString> + 'a>;

/// Collects the explicit settings, then [`resolve`](CredentialsBuilder::resolve)s
/// the rest from the environment.
pub struct CredentialsBuilder<'a> {
    password_file: Option<(PathBuf, String)>,
    password: Option<(Vec<u8>, String)>,
    salt: Option<(String, String)>,
    env: EnvFn<'a>,
}

impl fmt::Debug for CredentialsBuilder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialsBuilder")
            .field("password_file", &self.password_file)
            .field("password", &self.password.as_ref().map(|(_, from)| from))
            .field("salt", &self.salt.as_ref().map(|(_, from)| from))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password itself.
        f.debug_struct("Credentials")
            .field("password_from", &self.password_from())
            .field("salt_from", &self.salt_from())
            .finish()
    }
}

impl<'a> CredentialsBuilder<'a> {
    /// The password is the first line of this file (what `--password-file` sets).
    /// `None` leaves it to the environment.
    pub fn password_file(mut self, path: Option<impl Into<PathBuf>>) -> Self {
        self.password_file = path.map(|p| (p.into(), "--password-file".to_owned()));
        self
    }

    /// The password is the first line of this file, with a name for where the file
    /// was named (used in errors, such as "the config file").
    pub fn password_file_from(mut self, path: impl Into<PathBuf>, from: impl Into<String>) -> Self {
        self.password_file = Some((path.into(), from.into()));
        self
    }

    /// The password itself, given in code.
    pub fn password(self, password: impl AsRef<[u8]>) -> Self {
        self.password_from(password, "the program")
    }

    /// The password itself, with a name for where it came from (used in errors, such
    /// as "the command line").
    pub fn password_from(mut self, password: impl AsRef<[u8]>, from: impl Into<String>) -> Self {
        self.password = Some((password.as_ref().to_vec(), from.into()));
        self
    }

    /// The salt as written (hex or `{0x01,0x02,0x03}`), what `--salt` sets.
    pub fn salt(self, salt: impl Into<String>) -> Self {
        self.salt_from(salt, "--salt")
    }

    /// The salt as written, with a name for where it came from.
    pub fn salt_from(mut self, salt: impl Into<String>, from: impl Into<String>) -> Self {
        self.salt = Some((salt.into(), from.into()));
        self
    }

    /// Reads variables through `env` instead of the process environment (tests,
    /// programs with their own configuration).
    pub fn env(mut self, env: impl Fn(&str) -> Option<String> + 'a) -> Self {
        self.env = Box::new(move |n| env(n).map(OsString::from));
        self
    }

    /// As [`CredentialsBuilder::env`], with values as raw bytes (a password need not
    /// be UTF-8).
    pub fn env_os(mut self, env: impl Fn(&str) -> Option<OsString> + 'a) -> Self {
        self.env = Box::new(env);
        self
    }

    /// Reads the password file and the environment for what was not given.
    ///
    /// # Errors
    /// [`CredentialsError`]: an unreadable or empty password file, a malformed salt,
    /// two different values for one setting.
    pub fn resolve(self) -> Result<Credentials, CredentialsError> {
        let env = |n: &str| (self.env)(n).filter(|v| !v.is_empty());
        let password = match (self.password_file, self.password) {
            (Some((path, from)), Some((_, other))) => {
                return Err(CredentialsError::Conflict {
                    what: "password",
                    first: format!("{from} {}", path.display()),
                    second: other,
                })
            }
            (Some((path, from)), None) => Some(read_password_file(&path, &from)?),
            (None, Some((pw, from))) => Some(checked(pw, from)?),
            (None, None) => match pair(&env, PASSWORD_FILE_VARS, "password")? {
                Some((path, var)) => Some(read_password_file(Path::new(&path), &var)?),
                None => match pair(&env, PASSWORD_VARS, "password")? {
                    Some((pw, var)) => Some(checked(pw.into_vec(), var)?),
                    None => None,
                },
            },
        };
        let salt = match self.salt {
            Some((s, from)) => Some((s, from)),
            None => match pair(&env, SALT_VARS, "salt")? {
                Some((s, from)) => match s.into_string() {
                    Ok(s) => Some((s, from)),
                    Err(_) => return Err(CredentialsError::NotUtf8 { from }),
                },
                None => None,
            },
        };
        let salt = match salt {
            Some((s, from)) => match parse_salt(&s) {
                Ok(bytes) => Some((bytes, from)),
                Err(source) => return Err(CredentialsError::Salt { from, source }),
            },
            None => None,
        };
        Ok(Credentials { password, salt })
    }
}

impl Credentials {
    /// Starts collecting explicit settings; [`CredentialsBuilder::resolve`] reads the
    /// environment for the rest.
    pub fn builder() -> CredentialsBuilder<'static> {
        CredentialsBuilder {
            password_file: None,
            password: None,
            salt: None,
            env: Box::new(|n| std::env::var_os(n)),
        }
    }

    /// The password and salt of the environment alone (see the type's documentation
    /// for the variables).
    ///
    /// # Errors
    /// As [`CredentialsBuilder::resolve`].
    pub fn from_env() -> Result<Credentials, CredentialsError> {
        Credentials::builder().resolve()
    }

    /// A password and salt given in code (both raw bytes).
    pub fn new(password: impl AsRef<[u8]>, salt: impl AsRef<[u8]>) -> Credentials {
        Credentials {
            password: Some((password.as_ref().to_vec(), "the program".to_owned())),
            salt: Some((salt.as_ref().to_vec(), "the program".to_owned())),
        }
    }

    /// Fills what this lacks from `lower` (each of password and salt on its own): for
    /// settings below the environment in precedence, such as a config file.
    pub fn or(self, lower: Credentials) -> Credentials {
        Credentials {
            password: self.password.or(lower.password),
            salt: self.salt.or(lower.salt),
        }
    }

    /// Whether a password or a salt is set.
    pub fn is_set(&self) -> bool {
        self.password.is_some() || self.salt.is_some()
    }

    /// The password bytes, if set (to hand on to a child process; never log them).
    pub fn password(&self) -> Option<&[u8]> {
        self.password.as_ref().map(|(p, _)| &p[..])
    }

    /// The salt bytes, if set.
    pub fn salt(&self) -> Option<&[u8]> {
        self.salt.as_ref().map(|(s, _)| &s[..])
    }

    /// Where the password came from (`--password-file`, `IPCBUS_PASSWORD`, ...).
    pub fn password_from(&self) -> Option<&str> {
        self.password.as_ref().map(|(_, f)| f.as_str())
    }

    /// Where the salt came from.
    pub fn salt_from(&self) -> Option<&str> {
        self.salt.as_ref().map(|(_, f)| f.as_str())
    }

    /// The key (Argon2id of the password and salt, cached per process), `None` when
    /// neither is set.
    ///
    /// # Errors
    /// [`CredentialsError::PasswordWithoutSalt`] / [`CredentialsError::SaltWithoutPassword`]
    /// when only one is set.
    pub fn key(&self) -> Result<Option<Key>, CredentialsError> {
        match (&self.password, &self.salt) {
            (None, None) => Ok(None),
            (Some((p, _)), Some((s, _))) => Ok(Some(Key::derive(p, s)?)),
            (Some((_, from)), None) => {
                Err(CredentialsError::PasswordWithoutSalt { from: from.clone() })
            }
            (None, Some((_, from))) => {
                Err(CredentialsError::SaltWithoutPassword { from: from.clone() })
            }
        }
    }
}

/// The value of the first set variable of an equivalent pair; both set and different
/// is a conflict.
fn pair(
    env: &dyn Fn(&str) -> Option<OsString>,
    names: [&'static str; 2],
    what: &'static str,
) -> Result<Option<(OsString, String)>, CredentialsError> {
    match (env(names[0]), env(names[1])) {
        (Some(a), Some(b)) if a != b => Err(CredentialsError::Conflict {
            what,
            first: names[0].to_owned(),
            second: names[1].to_owned(),
        }),
        (Some(a), _) => Ok(Some((a, names[0].to_owned()))),
        (None, Some(b)) => Ok(Some((b, names[1].to_owned()))),
        (None, None) => Ok(None),
    }
}

fn checked(pw: Vec<u8>, from: impl Into<String>) -> Result<(Vec<u8>, String), CredentialsError> {
    let from = from.into();
    if pw.is_empty() {
        return Err(CredentialsError::EmptyPassword { from });
    }
    Ok((pw, from))
}

/// The first line of a password file (without `\n` or `\r\n`), read with a size cap.
fn read_password_file(path: &Path, from: &str) -> Result<(Vec<u8>, String), CredentialsError> {
    use std::io::Read;
    let err = |source| CredentialsError::ReadFile {
        path: path.to_owned(),
        from: from.to_owned(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut buf = Vec::new();
    f.take(MAX_PASSWORD_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(err)?;
    if buf.len() as u64 > MAX_PASSWORD_FILE {
        return Err(CredentialsError::FileTooLarge {
            path: path.to_owned(),
            from: from.to_owned(),
        });
    }
    let line = first_line(&buf).to_vec();
    checked(line, from)
}

/// A file's first line, without the line ending.
fn first_line(bytes: &[u8]) -> &[u8] {
    let line = match bytes.iter().position(|&b| b == b'\n') {
        Some(i) => &bytes[..i],
        None => bytes,
    };
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + 'static {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |n| m.get(n).cloned()
    }

    fn resolve(
        b: CredentialsBuilder<'static>,
        vars: &[(&str, &str)],
    ) -> Result<Credentials, CredentialsError> {
        b.env(env(vars)).resolve()
    }

    #[test]
    fn both_names_are_accepted() {
        for (pw, salt) in [
            ("IPCBUS_PASSWORD", "IPCBUS_SALT"),
            ("IPCBUS_EPM_PASSWORD", "IPCBUS_EPM_SALT"),
            ("IPCBUS_PASSWORD", "IPCBUS_EPM_SALT"),
        ] {
            let c = resolve(Credentials::builder(), &[(pw, "secret"), (salt, "010203")]).unwrap();
            assert_eq!(c.password(), Some(&b"secret"[..]));
            assert_eq!(c.salt(), Some(&[1u8, 2, 3][..]));
            assert_eq!(c.password_from(), Some(pw));
            assert_eq!(c.salt_from(), Some(salt));
            assert!(c.key().unwrap().is_some());
        }
    }

    #[test]
    fn same_value_under_both_names_is_fine_different_is_an_error() {
        let vars = [("IPCBUS_PASSWORD", "a"), ("IPCBUS_EPM_PASSWORD", "a")];
        assert!(resolve(Credentials::builder(), &vars).is_ok());
        let vars = [("IPCBUS_SALT", "01"), ("IPCBUS_EPM_SALT", "02")];
        let e = resolve(Credentials::builder(), &vars)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("IPCBUS_SALT") && e.contains("IPCBUS_EPM_SALT"),
            "{e}"
        );
    }

    #[test]
    fn flags_win_over_the_environment_and_files_over_values() {
        let dir = tempdir();
        let f = dir.join("pw");
        std::fs::write(&f, "from-file\r\nsecond line\n").unwrap();
        let vars = [("IPCBUS_PASSWORD", "from-env"), ("IPCBUS_SALT", "ff")];
        let c = resolve(
            Credentials::builder().password_file(Some(&f)).salt("01"),
            &vars,
        )
        .unwrap();
        assert_eq!(c.password(), Some(&b"from-file"[..]));
        assert_eq!(c.salt(), Some(&[1u8][..]));
        assert_eq!(c.password_from(), Some("--password-file"));

        let f2 = f.to_str().unwrap().to_owned();
        let vars = [
            ("IPCBUS_PASSWORD", "from-env"),
            ("IPCBUS_EPM_PASSWORD_FILE", &f2),
        ];
        let c = resolve(Credentials::builder(), &vars).unwrap();
        assert_eq!(c.password(), Some(&b"from-file"[..]));
        assert_eq!(c.password_from(), Some("IPCBUS_EPM_PASSWORD_FILE"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn half_set_names_what_is_missing() {
        let c = resolve(Credentials::builder(), &[("IPCBUS_EPM_PASSWORD", "x")]).unwrap();
        let e = c.key().unwrap_err().to_string();
        assert!(
            e.contains("from IPCBUS_EPM_PASSWORD") && e.contains("IPCBUS_SALT"),
            "{e}"
        );
        let c = resolve(Credentials::builder().salt("01"), &[]).unwrap();
        let e = c.key().unwrap_err().to_string();
        assert!(e.contains("--salt") && e.contains("IPCBUS_PASSWORD"), "{e}");
        assert!(resolve(Credentials::builder(), &[])
            .unwrap()
            .key()
            .unwrap()
            .is_none());
    }

    #[test]
    fn passwords_are_bytes_and_salts_text() {
        use std::os::unix::ffi::OsStrExt;
        let raw = |n: &str| match n {
            "IPCBUS_PASSWORD" => Some(std::ffi::OsStr::from_bytes(b"p\xffw").to_owned()),
            "IPCBUS_SALT" => Some(OsString::from("01")),
            _ => None,
        };
        let c = Credentials::builder().env_os(raw).resolve().unwrap();
        assert_eq!(c.password(), Some(&b"p\xffw"[..]));
        assert!(c.key().unwrap().is_some());
        let bad_salt = |n: &str| match n {
            "IPCBUS_PASSWORD" => Some(OsString::from("pw")),
            "IPCBUS_EPM_SALT" => Some(std::ffi::OsStr::from_bytes(b"\xff").to_owned()),
            _ => None,
        };
        let e = Credentials::builder()
            .env_os(bad_salt)
            .resolve()
            .unwrap_err();
        assert!(
            matches!(&e, CredentialsError::NotUtf8 { from } if from == "IPCBUS_EPM_SALT"),
            "{e}"
        );
    }

    #[test]
    fn bad_input_is_named() {
        let e = resolve(Credentials::builder(), &[("IPCBUS_SALT", "{0x01")]).unwrap_err();
        assert!(matches!(&e, CredentialsError::Salt { from, .. } if from == "IPCBUS_SALT"));
        let e = resolve(
            Credentials::builder().password_file(Some("/nonexistent/ipcbus-pw")),
            &[],
        )
        .unwrap_err();
        assert!(matches!(e, CredentialsError::ReadFile { .. }));
        // The message does not repeat its cause; the cause is the source.
        assert!(!e.to_string().contains("os error"), "{e}");
        let dir = tempdir();
        let f = dir.join("empty");
        std::fs::write(&f, "\n").unwrap();
        let e = resolve(Credentials::builder().password_file(Some(&f)), &[]).unwrap_err();
        assert!(matches!(e, CredentialsError::EmptyPassword { .. }), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn lower_settings_fill_gaps_only() {
        let hi = resolve(Credentials::builder().salt("01"), &[]).unwrap();
        let lo = Credentials::new("pw", [9u8]);
        let c = hi.or(lo);
        assert_eq!(c.password(), Some(&b"pw"[..]));
        assert_eq!(c.salt(), Some(&[1u8][..]));
        assert!(!format!("{c:?}").contains("pw\""));
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ipcbus-cred-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
