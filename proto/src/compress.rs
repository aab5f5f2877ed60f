//! gzip per frame, with the inflated size capped.

use std::io::{Read, Write};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::{Compress, Crc, Decompress, FlushCompress, FlushDecompress, Status};

use super::frame::DecodeError;

/// Default: bodies of at least this many bytes are compressed.
pub const DEFAULT_THRESHOLD: usize = 512;

/// When a sender gzips the events at or above its threshold. Each event is encoded
/// once for all of the sender's receivers, so the choice is made per event for all of
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Compression {
    /// The default: compress when it can pay. Off while every receiver is reached
    /// through a loopback address (127.0.0.0/8, `::1`), where gzip only burns CPU
    /// (1 KiB events go ~10x slower with it); on as soon as one receiver is reached
    /// at any other address. And while on, skipped for a while when recent events
    /// did not compress: see [`CompressPolicy`]. (Local transports other than TCP,
    /// such as Unix sockets or shared memory, would count as loopback; there are
    /// none yet.)
    #[default]
    Auto,
    /// Every event at or above the threshold (what `compress(true)` asks for).
    Always,
    /// None (what `compress(false)` asks for).
    Never,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Auto => "auto",
            Compression::Always => "always",
            Compression::Never => "never",
        })
    }
}

/// What a sender did with the events at or above its compression threshold that it
/// sent to at least one receiver, since it was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[non_exhaustive]
pub struct CompressionStats {
    /// Events at or above the threshold.
    pub eligible: u64,
    /// Sent compressed.
    pub compressed: u64,
    /// Compressed, but gzip did not make them smaller: sent as they were.
    pub not_smaller: u64,
    /// [`Compression::Auto`]: not compressed because every receiver was on loopback.
    pub skipped_loopback: u64,
    /// [`Compression::Auto`]: not compressed because recent events did not compress.
    pub skipped_poor: u64,
    /// [`Compression::Never`]: not compressed.
    pub off: u64,
}

impl std::fmt::Display for CompressionStats {
    /// e.g. `off: loopback`, `on: 1000 of 1000 compressed`, or `mixed: ...` with
    /// every count that is not zero.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self;
        if s.eligible == 0 {
            return f.write_str("no event at or above the threshold");
        }
        if s.skipped_loopback == s.eligible {
            return f.write_str("off: loopback");
        }
        if s.off == s.eligible {
            return f.write_str("off");
        }
        if s.compressed == s.eligible {
            return write!(f, "on: {} of {} compressed", s.compressed, s.eligible);
        }
        write!(f, "{} of {} compressed", s.compressed, s.eligible)?;
        for (n, what) in [
            (s.not_smaller, "not smaller"),
            (s.skipped_loopback, "skipped: loopback"),
            (s.skipped_poor, "skipped: did not compress"),
            (s.off, "off"),
        ] {
            if n > 0 {
                write!(f, ", {n} {what}")?;
            }
        }
        Ok(())
    }
}

/// Events that save less than this share of their size (in tenths) count as poor.
const POOR_TENTHS: usize = 1;
/// Consecutive poor events after which [`Compression::Auto`] stops trying.
pub const POOR_STREAK: u32 = 4;
/// Events skipped after the first poor streak; doubled after every probe that is
/// poor again, up to [`MAX_SKIP`]; back to this after a good one.
pub const MIN_SKIP: u32 = 32;
/// Most events skipped between two probes.
pub const MAX_SKIP: u32 = 1024;

/// The compression decision of one sender, I/O-free: the sender asks
/// [`CompressPolicy::should_compress`] for each event and reports what gzip made of
/// it with [`CompressPolicy::record`].
///
/// [`Compression::Auto`]: no compression while every receiver is on loopback
/// ([`CompressPolicy::set_remote`]). Otherwise each event at or above the threshold is
/// compressed, and its outcome counted: one that saved less than 10 % of its size (or
/// did not get smaller) is *poor*. After [`POOR_STREAK`] poor events in a row the
/// next [`MIN_SKIP`] eligible events go uncompressed; then one is compressed as a
/// probe. A good probe resumes compression as before; a poor one skips twice as
/// many (at most [`MAX_SKIP`]) before the next probe. So an incompressible stream
/// pays gzip for one event in 1025 at most, and a stream that becomes compressible
/// again is compressed again within 1025 events. Counted in events, not time, so
/// it is deterministic.
///
/// [`Compression::Always`] compresses every eligible event, [`Compression::Never`]
/// none.
#[derive(Debug, Clone)]
pub struct CompressPolicy {
    mode: Compression,
    threshold: usize,
    remote: bool,
    /// Poor outcomes in a row.
    poor: u32,
    /// Eligible events still to skip before the next probe.
    skip_left: u32,
    /// How many to skip after the next poor probe (0 while not backing off).
    backoff: u32,
    stats: CompressionStats,
}

impl CompressPolicy {
    /// A policy for events of at least `threshold` bytes; no receiver yet.
    pub fn new(mode: Compression, threshold: usize) -> CompressPolicy {
        CompressPolicy {
            mode,
            threshold,
            remote: false,
            poor: 0,
            skip_left: 0,
            backoff: 0,
            stats: CompressionStats::default(),
        }
    }

    /// The configured mode.
    pub fn mode(&self) -> Compression {
        self.mode
    }

    /// What was done so far.
    pub fn stats(&self) -> CompressionStats {
        self.stats
    }

    /// Whether at least one current receiver is reached at an address that is not
    /// loopback (set when the receivers change).
    pub fn set_remote(&mut self, remote: bool) {
        self.remote = remote;
    }

    /// Whether a receiver at `ip` is reached through loopback: `127.0.0.0/8`, `::1`,
    /// and IPv4-mapped loopback.
    pub fn is_loopback(ip: std::net::IpAddr) -> bool {
        ip.to_canonical().is_loopback()
    }

    /// Whether to compress an event of `len` bytes (sent to at least one receiver).
    /// When it returns true, report the outcome with [`CompressPolicy::record`].
    #[inline]
    pub fn should_compress(&mut self, len: usize) -> bool {
        if len < self.threshold {
            return false;
        }
        self.stats.eligible += 1;
        match self.mode {
            Compression::Always => true,
            Compression::Never => {
                self.stats.off += 1;
                false
            }
            Compression::Auto if !self.remote => {
                self.stats.skipped_loopback += 1;
                false
            }
            Compression::Auto if self.skip_left > 0 => {
                self.skip_left -= 1;
                self.stats.skipped_poor += 1;
                false
            }
            Compression::Auto => true,
        }
    }

    /// The outcome of compressing an event of `len` bytes: its compressed size, or
    /// `None` if gzip did not make it smaller.
    pub fn record(&mut self, len: usize, compressed: Option<usize>) {
        match compressed {
            Some(_) => self.stats.compressed += 1,
            None => self.stats.not_smaller += 1,
        }
        if self.mode != Compression::Auto {
            return;
        }
        let poor = compressed.map_or(true, |z| z * 10 > len * (10 - POOR_TENTHS));
        if !poor {
            self.poor = 0;
            self.backoff = 0;
            return;
        }
        self.poor = self.poor.saturating_add(1);
        if self.backoff > 0 {
            // A probe after a skip, poor again: skip longer.
            self.backoff = (self.backoff * 2).min(MAX_SKIP);
            self.skip_left = self.backoff;
        } else if self.poor >= POOR_STREAK {
            self.backoff = MIN_SKIP;
            self.skip_left = MIN_SKIP;
        }
    }
}

/// Compresses `data` with gzip at `level` (0-9). Returns `None` if the result is not
/// smaller, so incompressible payloads go uncompressed.
pub fn gzip(data: &[u8], level: u32) -> Option<Vec<u8>> {
    let mut enc = GzEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        flate2::Compression::new(level.min(9)),
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
            state: Compress::new_gzip(flate2::Compression::new(level.min(9)), 15),
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

    /// Runs `n` eligible events of 1000 bytes through `p`, each compressing to
    /// `z` bytes (`None`: not smaller); returns how many were compressed.
    fn feed(p: &mut CompressPolicy, n: u32, z: Option<usize>) -> u32 {
        let mut tried = 0;
        for _ in 0..n {
            if p.should_compress(1000) {
                tried += 1;
                p.record(1000, z);
            }
        }
        tried
    }

    #[test]
    fn policy_forced_modes_ignore_loopback_and_outcomes() {
        let mut always = CompressPolicy::new(Compression::Always, 512);
        assert!(!always.should_compress(511));
        assert_eq!(feed(&mut always, 100, None), 100);
        assert_eq!(always.stats().not_smaller, 100);
        let mut never = CompressPolicy::new(Compression::Never, 512);
        never.set_remote(true);
        assert_eq!(feed(&mut never, 100, Some(10)), 0);
        assert_eq!(never.stats().off, 100);
        assert_eq!(never.stats().to_string(), "off");
    }

    #[test]
    fn policy_auto_is_off_on_loopback_and_on_for_a_remote_receiver() {
        let mut p = CompressPolicy::new(Compression::Auto, 512);
        assert_eq!(feed(&mut p, 10, Some(300)), 0);
        assert!(!p.should_compress(100)); // under the threshold: not even counted
        assert_eq!(p.stats().eligible, 10);
        assert_eq!(p.stats().to_string(), "off: loopback");
        p.set_remote(true);
        assert_eq!(feed(&mut p, 10, Some(300)), 10);
        assert_eq!(p.stats().compressed, 10);
        assert_eq!(
            p.stats().to_string(),
            "10 of 20 compressed, 10 skipped: loopback"
        );
        p.set_remote(false);
        assert_eq!(feed(&mut p, 5, Some(300)), 0);
    }

    #[test]
    fn policy_auto_backs_off_from_events_that_do_not_compress() {
        let mut p = CompressPolicy::new(Compression::Auto, 512);
        p.set_remote(true);
        // 3 poor in a row is not yet a streak; a good one resets the count.
        assert_eq!(feed(&mut p, 3, Some(950)), 3);
        assert_eq!(feed(&mut p, 1, Some(500)), 1);
        assert_eq!(feed(&mut p, 3, None), 3);
        // The 4th poor one in a row starts skipping: MIN_SKIP events, then a probe.
        assert_eq!(feed(&mut p, 1, Some(901)), 1);
        assert_eq!(feed(&mut p, MIN_SKIP, None), 0);
        assert_eq!(feed(&mut p, 1, None), 1); // the probe, poor: skip twice as long
        assert_eq!(feed(&mut p, 2 * MIN_SKIP, None), 0);
        assert_eq!(feed(&mut p, 1, None), 1);
        assert_eq!(p.stats().skipped_poor, u64::from(3 * MIN_SKIP));
        // Bounded: in steady state one probe per MAX_SKIP + 1 events.
        let _ = feed(&mut p, 100_000, None);
        assert_eq!(feed(&mut p, 10 * (MAX_SKIP + 1), None), 10);
        // Exactly 10 % saved is good enough; a good probe resumes compression.
        let _ = feed(&mut p, MAX_SKIP, Some(900));
        assert_eq!(feed(&mut p, 100, Some(900)), 100);
    }

    #[test]
    fn loopback_addresses() {
        use std::net::IpAddr;
        for (ip, lo) in [
            ("127.0.0.1", true),
            ("127.3.2.1", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("10.0.0.1", false),
            ("192.168.1.20", false),
            ("::ffff:10.0.0.1", false),
            ("fe80::1", false),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(CompressPolicy::is_loopback(ip), lo, "{ip}");
        }
    }

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
