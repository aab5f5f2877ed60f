//! Length-prefixed framing of wire protocol v1. The `tokio_util::codec::Decoder`
//! adapter over [`CodecV1::decode`] lives in `ipcbus`, so this core has no I/O error.
//!
//! ```text
//! u32 BE  length of what follows (10 + body), at most the configured maximum
//! u8      kind
//! u8      flags (0x01 compressed, 0x02 sealed)
//! u64 BE  sequence number
//! [u8]    body
//! ```

use bytes::{Buf, BufMut, BytesMut};

use super::frame::{
    DecodeError, Flags, Header, Kind, RawFrame, DEFAULT_MAX_FRAME, HEADER_LEN, LEN_PREFIX,
};

/// Decoder of v1 frames with a hard maximum length, checked before any allocation.
#[derive(Debug, Clone, Copy)]
pub struct CodecV1 {
    max_frame: usize,
}

impl CodecV1 {
    /// A codec accepting frames whose length field is at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        CodecV1 {
            max_frame: max_frame.max(HEADER_LEN),
        }
    }

    /// The maximum length field this codec accepts.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl CodecV1 {
    /// Checks the frame at the front of `src`, complete or not, as far as its bytes
    /// go: the length field against the maximum and the header size, then the kind
    /// and flags bytes as soon as they are there, so garbage is rejected without
    /// waiting for a body that may never come. Returns the length field (bytes after
    /// the prefix) once the prefix is in, `None` before.
    ///
    /// # Errors
    /// [`DecodeError::TooLong`], [`DecodeError::TooShort`],
    /// [`DecodeError::UnknownKind`], [`DecodeError::UnknownFlags`].
    #[inline]
    pub fn check_front(&self, src: &[u8]) -> Result<Option<usize>, DecodeError> {
        let Some(prefix) = src.first_chunk::<LEN_PREFIX>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > self.max_frame {
            return Err(DecodeError::TooLong {
                len,
                max: self.max_frame,
            });
        }
        if len < HEADER_LEN {
            return Err(DecodeError::TooShort { len });
        }
        if let Some(&k) = src.get(LEN_PREFIX) {
            Kind::from_u8(k).ok_or(DecodeError::UnknownKind(k))?;
        }
        if let Some(&f) = src.get(LEN_PREFIX + 1) {
            if f & !Flags::ALL != 0 {
                return Err(DecodeError::UnknownFlags(f));
            }
        }
        Ok(Some(len))
    }
}

impl CodecV1 {
    /// Takes the next whole frame off the front of `src`: `Ok(None)` means "need more
    /// bytes" (room for the announced frame is reserved, the maximum checked first),
    /// `Err` means the bytes are not a v1 frame and the connection should end.
    ///
    /// # Errors
    /// [`DecodeError::TooLong`], [`DecodeError::TooShort`],
    /// [`DecodeError::UnknownKind`], [`DecodeError::UnknownFlags`].
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RawFrame>, DecodeError> {
        let Some(len) = self.check_front(src)? else {
            return Ok(None);
        };
        if src.len() < LEN_PREFIX + len {
            // `len` is bounded by `max_frame`, so this reservation is too.
            src.reserve(LEN_PREFIX + len - src.len());
            return Ok(None);
        }
        src.advance(LEN_PREFIX);
        let mut frame = src.split_to(len);
        let header = frame
            .first_chunk::<HEADER_LEN>()
            .ok_or(DecodeError::TooShort { len })?;
        let Header { kind, flags, seq } = Header::parse(header)?;
        frame.advance(HEADER_LEN);
        Ok(Some(RawFrame {
            kind,
            flags,
            seq,
            body: frame,
        }))
    }
}

impl Default for CodecV1 {
    fn default() -> Self {
        CodecV1::new(DEFAULT_MAX_FRAME)
    }
}

/// Appends the length prefix and header of a frame whose body is `body_len` bytes.
pub fn put_header(dst: &mut BytesMut, kind: Kind, flags: Flags, seq: u64, body_len: usize) {
    dst.put_slice(&Header { kind, flags, seq }.to_bytes(body_len));
}

/// Appends a whole unsealed frame.
pub fn put_frame(dst: &mut BytesMut, kind: Kind, flags: Flags, seq: u64, body: &[u8]) {
    dst.reserve(LEN_PREFIX + HEADER_LEN + body.len());
    put_header(dst, kind, flags, seq, body.len());
    dst.put_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(kind: Kind, flags: u8, seq: u64, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        put_frame(&mut b, kind, Flags(flags), seq, body);
        b
    }

    #[test]
    fn pinned_data_frame_bytes() {
        let b = encode(Kind::Data, 0, 7, b"hi");
        // len 12 | kind 0x10 | flags 0 | seq 7 | "hi"
        assert_eq!(
            hex::encode(&b),
            "0000000c".to_string() + "10" + "00" + "0000000000000007" + "6869"
        );
    }

    #[test]
    fn pinned_ack_frame_bytes() {
        let b = encode(Kind::Ack, 0, 1, &42u64.to_be_bytes());
        assert_eq!(
            hex::encode(&b),
            "0000001211000000000000000001000000000000002a"
        );
    }

    #[test]
    fn round_trip_and_byte_at_a_time() {
        let mut rng_state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state
        };
        let mut all = BytesMut::new();
        let mut expect = Vec::new();
        for _ in 0..200 {
            let len = (next() % 300) as usize;
            let body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let seq = next();
            let flags = (next() % 4) as u8;
            put_frame(&mut all, Kind::Data, Flags(flags), seq, &body);
            expect.push((flags, seq, body));
        }
        // whole buffer at once
        let mut codec = CodecV1::default();
        let mut src = all.clone();
        for (flags, seq, body) in &expect {
            let f = codec.decode(&mut src).unwrap().unwrap();
            assert_eq!(
                (f.kind, f.flags.0, f.seq, &f.body[..]),
                (Kind::Data, *flags, *seq, &body[..])
            );
        }
        assert!(codec.decode(&mut src).unwrap().is_none());
        // one byte at a time
        let mut src = BytesMut::new();
        let mut got = Vec::new();
        for byte in all.iter() {
            src.put_u8(*byte);
            while let Some(f) = codec.decode(&mut src).unwrap() {
                got.push((f.flags.0, f.seq, f.body.to_vec()));
            }
        }
        assert_eq!(got, expect);
    }

    #[test]
    fn rejects_oversized_before_allocating() {
        let mut codec = CodecV1::new(1024);
        let mut src = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            codec.decode(&mut src),
            Err(DecodeError::TooLong {
                len: u32::MAX as usize,
                max: 1024
            })
        );
        assert!(src.capacity() < 1024);
        let mut src = BytesMut::from(&[0, 0, 4, 1][..]);
        assert!(matches!(
            codec.decode(&mut src),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn rejects_short_unknown_kind_and_flags_early() {
        let mut codec = CodecV1::default();
        let mut src = BytesMut::from(&[0, 0, 0, 9][..]);
        assert_eq!(
            codec.decode(&mut src),
            Err(DecodeError::TooShort { len: 9 })
        );
        let mut src = BytesMut::from(&[0, 0, 1, 0, 0x7f][..]);
        assert_eq!(codec.decode(&mut src), Err(DecodeError::UnknownKind(0x7f)));
        let mut src = BytesMut::from(&[0, 0, 1, 0, 0x10, 0x80][..]);
        assert_eq!(codec.decode(&mut src), Err(DecodeError::UnknownFlags(0x80)));
        // "GET / HTTP/1.1" is rejected as soon as its first bytes arrive
        let mut src = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(codec.decode(&mut src).is_err());
    }
}
