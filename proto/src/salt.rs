//! Parsing salts as people write them: hex (`010203`) or the classic byte-array
//! literal `{0x01,0x02,0x03}`.

/// Why a salt string is not a salt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SaltError {
    /// The string is empty, or the braces hold no bytes.
    #[error("salt is empty")]
    Empty,
    /// Hex form with an odd number of digits or a non-hex character.
    #[error("salt {0:?} is not hex (like 010203) nor a byte list (like {{0x01,0x02,0x03}})")]
    NotHex(String),
    /// Byte-list form with an item that is not a byte (`0x00`..`0xff` or `0`..`255`).
    #[error("salt item {item:?} (number {index}) is not a byte: write 0x00..0xff or 0..255")]
    BadByte {
        /// The offending item as written.
        item: String,
        /// Its position, from 1.
        index: usize,
    },
    /// Byte-list form without its closing brace (or with text after it).
    #[error("salt {0:?} opens a byte list with '{{' but does not end with '}}'")]
    Unbalanced(String),
    /// More than 1024 bytes.
    #[error("salt is {0} bytes long, the maximum is 1024")]
    TooLong(usize),
}

/// Longest salt accepted, in bytes.
pub(crate) const MAX_SALT: usize = 1024;

/// Parses a salt written as hex (`010203`, `0x010203`) or as the classic byte list
/// `{0x01,0x02,0x03}` (items may also be decimal, spaces are allowed). Anything else is
/// an error; there is never a silent fall back.
///
/// ```
/// assert_eq!(ipcbus_proto::parse_salt("{0x01,0x02,0x03}").unwrap(), vec![1, 2, 3]);
/// assert_eq!(ipcbus_proto::parse_salt("010203").unwrap(), vec![1, 2, 3]);
/// assert!(ipcbus_proto::parse_salt("{0x01,0x02").is_err());
/// ```
///
/// # Errors
/// [`SaltError`] says what is wrong and where.
pub fn parse_salt(s: &str) -> Result<Vec<u8>, SaltError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(SaltError::Empty);
    }
    let out = if let Some(inner) = t.strip_prefix('{') {
        let inner = inner
            .strip_suffix('}')
            .ok_or_else(|| SaltError::Unbalanced(s.to_owned()))?;
        if inner.trim().is_empty() {
            return Err(SaltError::Empty);
        }
        let mut out = Vec::new();
        for (i, item) in inner.split(',').enumerate() {
            let it = item.trim();
            let bad = || SaltError::BadByte {
                item: it.to_owned(),
                index: i + 1,
            };
            let v = match it.strip_prefix("0x").or_else(|| it.strip_prefix("0X")) {
                Some(h) if !h.is_empty() && h.len() <= 2 => {
                    u8::from_str_radix(h, 16).map_err(|_| bad())?
                }
                Some(_) => return Err(bad()),
                None if !it.is_empty()
                    && it.len() <= 3
                    && it.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    it.parse::<u8>().map_err(|_| bad())?
                }
                None => return Err(bad()),
            };
            out.push(v);
            if out.len() > MAX_SALT {
                return Err(SaltError::TooLong(out.len()));
            }
        }
        out
    } else {
        let h = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .unwrap_or(t);
        if h.is_empty() {
            return Err(SaltError::Empty);
        }
        if h.len() > 2 * MAX_SALT {
            return Err(SaltError::TooLong(h.len() / 2));
        }
        hex::decode(h).map_err(|_| SaltError::NotHex(s.to_owned()))?
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_both_forms() {
        assert_eq!(parse_salt("{0x01,0x02,0x03}").unwrap(), [1, 2, 3]);
        assert_eq!(
            parse_salt(" { 0x01, 0XfF ,7 , 255 } ").unwrap(),
            [1, 255, 7, 255]
        );
        assert_eq!(parse_salt("{0x1}").unwrap(), [1]);
        assert_eq!(parse_salt("010203").unwrap(), [1, 2, 3]);
        assert_eq!(parse_salt("0xA0b1").unwrap(), [0xa0, 0xb1]);
    }

    #[test]
    fn rejects_malformed_salts() {
        assert_eq!(parse_salt(""), Err(SaltError::Empty));
        assert_eq!(parse_salt("   "), Err(SaltError::Empty));
        assert_eq!(parse_salt("{}"), Err(SaltError::Empty));
        assert_eq!(parse_salt("0x"), Err(SaltError::Empty));
        assert!(matches!(
            parse_salt("{0x01,0x02"),
            Err(SaltError::Unbalanced(_))
        ));
        assert!(matches!(
            parse_salt("{0x01}x"),
            Err(SaltError::Unbalanced(_))
        ));
        assert_eq!(
            parse_salt("{0x01,0x100}"),
            Err(SaltError::BadByte {
                item: "0x100".into(),
                index: 2
            })
        );
        assert!(matches!(
            parse_salt("{0x01,,0x02}"),
            Err(SaltError::BadByte { index: 2, .. })
        ));
        assert!(matches!(
            parse_salt("{0x01,256}"),
            Err(SaltError::BadByte { .. })
        ));
        assert!(matches!(
            parse_salt("{0xg1}"),
            Err(SaltError::BadByte { .. })
        ));
        assert!(matches!(
            parse_salt("{0x01;0x02}"),
            Err(SaltError::BadByte { .. })
        ));
        assert!(matches!(parse_salt("{-1}"), Err(SaltError::BadByte { .. })));
        assert!(matches!(parse_salt("0x}"), Err(SaltError::NotHex(_))));
        assert!(matches!(parse_salt("123"), Err(SaltError::NotHex(_))));
        assert!(matches!(parse_salt("zz"), Err(SaltError::NotHex(_))));
        assert!(matches!(parse_salt("0x01,0x02"), Err(SaltError::NotHex(_))));
        assert!(matches!(
            parse_salt(&"00".repeat(1025)),
            Err(SaltError::TooLong(_))
        ));
    }
}
