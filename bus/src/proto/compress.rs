//! gzip per frame, with the inflated size capped.

use std::io::{Read, Write};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

use super::frame::DecodeError;

/// Default: bodies of at least this many bytes are compressed.
pub const DEFAULT_THRESHOLD: usize = 512;

/// Compresses `data` with gzip at `level` (0-9). Returns `None` if the result is not
/// smaller, so incompressible payloads go uncompressed.
pub fn gzip(data: &[u8], level: u32) -> Option<Vec<u8>> {
    let mut enc = GzEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        Compression::new(level.min(9)),
    );
    // Writing into a Vec cannot fail.
    enc.write_all(data).ok()?;
    let out = enc.finish().ok()?;
    (out.len() < data.len()).then_some(out)
}

/// Inflates a gzip body, failing once the output would exceed `max` bytes: a gzip
/// bomb is an error, not an allocation.
///
/// # Errors
/// [`DecodeError::Inflate`] for corrupt data, [`DecodeError::InflateTooLarge`] past `max`.
pub fn gunzip(data: &[u8], max: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity((data.len() * 4).min(max));
    let mut dec = GzDecoder::new(data).take(max as u64 + 1);
    dec.read_to_end(&mut out)
        .map_err(|_| DecodeError::Inflate)?;
    if out.len() > max {
        return Err(DecodeError::InflateTooLarge { max });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let data = b"hello hello hello hello hello hello hello hello".repeat(20);
        let z = gzip(&data, 6).unwrap();
        assert!(z.len() < data.len());
        assert_eq!(gunzip(&z, data.len()).unwrap(), data);
    }

    #[test]
    fn incompressible_is_left_alone() {
        let data: Vec<u8> = (0..64).map(|i| (i * 97 % 251) as u8).collect();
        assert!(gzip(&data, 6).is_none());
    }

    #[test]
    fn bomb_is_an_error() {
        let data = vec![0u8; 10 << 20];
        let z = gzip(&data, 9).unwrap();
        assert!(z.len() < 64 << 10);
        assert_eq!(
            gunzip(&z, 1 << 20),
            Err(DecodeError::InflateTooLarge { max: 1 << 20 })
        );
    }

    #[test]
    fn corrupt_is_an_error() {
        assert_eq!(gunzip(b"not gzip at all", 100), Err(DecodeError::Inflate));
        let mut z = gzip(&b"abc".repeat(100), 6).unwrap();
        let n = z.len();
        z.truncate(n - 5);
        assert_eq!(gunzip(&z, 1000), Err(DecodeError::Inflate));
    }
}
