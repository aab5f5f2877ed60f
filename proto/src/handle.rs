//! Validated topic names.

use std::fmt;
use std::str::FromStr;

/// A topic name that senders and receivers meet on.
///
/// A handle is 1 to 255 bytes of UTF-8 with no control characters, no `/` and no NUL,
/// so it is safe to show, to log and to use inside a file name. A GUID string such as
/// `6f9619ff-8b86-d011-b42d-00c04fc964ff` is a valid handle. A `Handle` can only be
/// built valid: every constructor checks.
///
/// ```
/// use ipcbus_proto::Handle;
/// let h: Handle = "orders.created".parse().unwrap();
/// assert_eq!(h.as_str(), "orders.created");
/// assert!(Handle::new("a/b").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(String);

/// Why a string is not a valid [`Handle`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandleError {
    /// The handle was empty.
    #[error("handle is empty")]
    Empty,
    /// The handle was longer than 255 bytes.
    #[error("handle is {len} bytes long, the maximum is 255")]
    TooLong {
        /// Length in bytes.
        len: usize,
    },
    /// The handle contained a character that is not allowed.
    #[error(
        "handle contains {ch:?} at byte {at}: control characters, '/' and NUL are not allowed"
    )]
    BadChar {
        /// The offending character.
        ch: char,
        /// Its byte offset.
        at: usize,
    },
    /// The handle was not valid UTF-8 (only when decoding from bytes).
    #[error("handle is not valid UTF-8")]
    NotUtf8,
}

impl Handle {
    /// The longest handle, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Validates `name` and wraps it.
    ///
    /// # Errors
    /// [`HandleError`] names what is wrong, and for a bad character, which one and where.
    pub fn new(name: impl Into<String>) -> Result<Self, HandleError> {
        let name = name.into();
        validate(&name)?;
        Ok(Handle(name))
    }

    /// Validates UTF-8 bytes (as found on the wire or on disk).
    ///
    /// # Errors
    /// As [`Handle::new`], plus [`HandleError::NotUtf8`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HandleError> {
        let s = std::str::from_utf8(bytes).map_err(|_| HandleError::NotUtf8)?;
        Handle::new(s)
    }

    /// The handle as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The handle as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

fn validate(name: &str) -> Result<(), HandleError> {
    if name.is_empty() {
        return Err(HandleError::Empty);
    }
    if name.len() > Handle::MAX_LEN {
        return Err(HandleError::TooLong { len: name.len() });
    }
    match name
        .char_indices()
        .find(|&(_, c)| c.is_control() || c == '/')
    {
        Some((at, ch)) => Err(HandleError::BadChar { ch, at }),
        None => Ok(()),
    }
}

impl FromStr for Handle {
    type Err = HandleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Handle::new(s)
    }
}

impl TryFrom<&str> for Handle {
    type Error = HandleError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Handle::new(s)
    }
}

impl TryFrom<String> for Handle {
    type Error = HandleError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Handle::new(s)
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle({:?})", self.0)
    }
}

impl AsRef<str> for Handle {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_and_guid_handles() {
        for ok in [
            "a",
            "orders.created",
            "6f9619ff-8b86-d011-b42d-00c04fc964ff",
            "{6F9619FF-8B86-D011-B42D-00C04FC964FF}",
            "héllo wörld ✓",
            "..",
            &"x".repeat(255),
        ] {
            assert!(Handle::new(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn rejects_bad_handles_naming_the_character() {
        assert_eq!(Handle::new(""), Err(HandleError::Empty));
        assert_eq!(
            Handle::new("x".repeat(256)),
            Err(HandleError::TooLong { len: 256 })
        );
        assert_eq!(
            Handle::new("a/b"),
            Err(HandleError::BadChar { ch: '/', at: 1 })
        );
        assert_eq!(
            Handle::new("ab\0"),
            Err(HandleError::BadChar { ch: '\0', at: 2 })
        );
        assert_eq!(
            Handle::new("é\n"),
            Err(HandleError::BadChar { ch: '\n', at: 2 })
        );
        let msg = Handle::new("a\tb").unwrap_err().to_string();
        assert!(msg.contains("'\\t'"), "{msg}");
        assert_eq!(Handle::from_bytes(&[0xff]), Err(HandleError::NotUtf8));
    }
}
