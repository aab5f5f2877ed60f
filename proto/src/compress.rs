//! gzip per frame, with the inflated size capped.

use std::io::{Read, Write};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::{Compress, Compression, Crc, Decompress, FlushCompress, FlushDecompress, Status};

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

/// A reusable gzip compressor: the deflate state (hundreds of KiB) is set up once,
/// not per frame, which is most of the cost of compressing a small frame.
pub struct Gzipper {
    state: Compress,
}

impl std::fmt::Debug for Gzipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gzipper(..)")
    }
}

impl Gzipper {
    /// A compressor at `level` (0-9).
    pub fn new(level: u32) -> Gzipper {
        Gzipper {
            state: Compress::new_gzip(Compression::new(level.min(9)), 15),
        }
    }

    /// Compresses `data` into one gzip member, as [`gzip`] does. Returns `None` if the
    /// result is not smaller.
    pub fn gzip(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        self.state.reset();
        // Anything that does not fit in fewer bytes than the input is of no use.
        let mut out = Vec::with_capacity(data.len().saturating_sub(1));
        match self
            .state
            .compress_vec(data, &mut out, FlushCompress::Finish)
        {
            Ok(Status::StreamEnd) if out.len() < data.len() => Some(out),
            _ => None,
        }
    }
}

/// A reusable gzip decompressor, with the inflated size capped; see [`gunzip`].
pub struct Gunzipper {
    state: Decompress,
}

impl std::fmt::Debug for Gunzipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gunzipper(..)")
    }
}

impl Default for Gunzipper {
    fn default() -> Self {
        Gunzipper {
            // Raw deflate: the gzip header and trailer are handled here, since a reset
            // would not keep zlib's gzip mode.
            state: Decompress::new(false),
        }
    }
}

/// Length of the gzip member header at the front of `d` (RFC 1952 §2.3), optional
/// fields included.
fn gzip_header_len(d: &[u8]) -> Result<usize, DecodeError> {
    const FHCRC: u8 = 0x02;
    const FEXTRA: u8 = 0x04;
    const FNAME: u8 = 0x08;
    const FCOMMENT: u8 = 0x10;
    let bad = DecodeError::Inflate;
    let fixed = d.get(..10).ok_or(bad.clone())?;
    if fixed[0] != 0x1f || fixed[1] != 0x8b || fixed[2] != 8 || fixed[3] & 0xe0 != 0 {
        return Err(bad);
    }
    let flags = fixed[3];
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let xlen = d.get(at..at + 2).ok_or(bad.clone())?;
        at += 2 + usize::from(u16::from_le_bytes([xlen[0], xlen[1]]));
    }
    for bit in [FNAME, FCOMMENT] {
        if flags & bit != 0 {
            let rest = d.get(at..).ok_or(bad.clone())?;
            at += 1 + rest.iter().position(|&b| b == 0).ok_or(bad.clone())?;
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    if at > d.len() {
        return Err(bad);
    }
    Ok(at)
}

impl Gunzipper {
    /// Inflates one gzip member (header and CRC-32 checked), failing once the output
    /// would exceed `max` bytes.
    ///
    /// # Errors
    /// As [`gunzip`].
    pub fn gunzip(&mut self, data: &[u8], max: usize) -> Result<Vec<u8>, DecodeError> {
        let start = gzip_header_len(data)?;
        let body = &data[start..];
        self.state.reset(false);
        let mut out = Vec::with_capacity((body.len() * 4).clamp(64, max.max(64)));
        loop {
            let before = (self.state.total_in(), self.state.total_out());
            let input = body.get(before.0 as usize..).unwrap_or(&[]);
            let status = self
                .state
                .decompress_vec(input, &mut out, FlushDecompress::None)
                .map_err(|_| DecodeError::Inflate)?;
            if out.len() > max {
                return Err(DecodeError::InflateTooLarge { max });
            }
            if status == Status::StreamEnd {
                break;
            }
            if out.len() == out.capacity() {
                // Full: grow, but by at most one byte past the cap.
                let room = out.len().min(max.saturating_sub(out.len())).max(1);
                out.reserve_exact(room);
            } else if (self.state.total_in(), self.state.total_out()) == before {
                // No progress with room to spare: the input ended early.
                return Err(DecodeError::Inflate);
            }
        }
        let trailer_at = self.state.total_in() as usize;
        let trailer = body
            .get(trailer_at..trailer_at + 8)
            .ok_or(DecodeError::Inflate)?;
        let mut crc = Crc::new();
        crc.update(&out);
        let want_crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
        let want_len = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
        if crc.sum() != want_crc || out.len() as u32 != want_len {
            return Err(DecodeError::Inflate);
        }
        Ok(out)
    }
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
    fn reusable_state_round_trips_and_matches_the_one_shot_functions() {
        let mut z = Gzipper::new(1);
        let mut u = Gunzipper::default();
        for n in [0usize, 1, 64, 700, 5000, 200_000] {
            let data: Vec<u8> = b"abcabcabd".iter().copied().cycle().take(n).collect();
            match z.gzip(&data) {
                Some(c) => {
                    assert_eq!(gunzip(&c, n).unwrap(), data);
                    assert_eq!(u.gunzip(&c, n).unwrap(), data);
                }
                None => assert!(!matches!(gzip(&data, 1), Some(c) if c.len() < n)),
            }
            if let Some(c) = gzip(&data, 6) {
                assert_eq!(u.gunzip(&c, n).unwrap(), data);
            }
        }
        let noise: Vec<u8> = (0..64).map(|i| (i * 97 % 251) as u8).collect();
        assert!(z.gzip(&noise).is_none());
    }

    #[test]
    fn reusable_decompressor_caps_and_rejects_like_gunzip() {
        let mut u = Gunzipper::default();
        let bomb = gzip(&vec![0u8; 10 << 20], 9).unwrap();
        assert_eq!(
            u.gunzip(&bomb, 1 << 20),
            Err(DecodeError::InflateTooLarge { max: 1 << 20 })
        );
        let exact = gzip(&vec![7u8; 4096], 6).unwrap();
        assert_eq!(u.gunzip(&exact, 4096).unwrap().len(), 4096);
        assert_eq!(
            u.gunzip(&exact, 4095),
            Err(DecodeError::InflateTooLarge { max: 4095 })
        );
        assert_eq!(u.gunzip(b"not gzip at all", 100), Err(DecodeError::Inflate));
        let mut cut = gzip(&b"abc".repeat(100), 6).unwrap();
        let n = cut.len();
        cut.truncate(n - 5);
        assert_eq!(u.gunzip(&cut, 1000), Err(DecodeError::Inflate));
        let mut flipped = gzip(&b"abc".repeat(100), 6).unwrap();
        let n = flipped.len();
        flipped[n - 6] ^= 1; // the CRC
        assert_eq!(u.gunzip(&flipped, 1000), Err(DecodeError::Inflate));
        // still usable after errors
        assert_eq!(u.gunzip(&exact, 4096).unwrap().len(), 4096);
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
