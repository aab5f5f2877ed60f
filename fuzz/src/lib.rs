//! The bodies of the fuzz targets in `fuzz_targets/`, and their seed inputs.
//!
//! Each function takes arbitrary bytes, drives one decoder of ipcbus with them and
//! asserts what must hold for *any* input: no panic, no allocation past the
//! configured maximum, and that whatever decodes re-encodes to the same bytes. The
//! libFuzzer targets call these; so does `tests/tests/fuzz_replay.rs`, which replays
//! the committed corpus and regressions (and a bounded number of mutations of them)
//! under plain `cargo test` on stable.
//!
//! Everything but `epm_config` drives the I/O-free protocol core `ipcbus-proto`
//! directly (no runtime, no hidden feature); only `ipcbus-proto`, `ipcbus-epm` and
//! `bytes` are used, so the tests crate can include this file with `#[path]`.

use std::net::SocketAddr;
use std::path::Path;

use bytes::BytesMut;
use ipcbus_proto::codec::{put_frame, CodecV1};
use ipcbus_proto::compress::{gunzip, gzip};
use ipcbus_proto::crypto::{Key, Sealer, SessionKeys, TAG_LEN};
use ipcbus_proto::epm::{
    decode_body, encode_body, Entry, FrameDecoder, FrameEncoder, Op, Request, Response,
};
use ipcbus_proto::frame::{
    parse_ack, parse_proof, DecodeError, Flags, Hello, HelloParse, Kind, Mode, Reject,
    RejectReason, Welcome, VERSION,
};
use ipcbus_proto::handshake::{
    Client, ClientConfig, HandshakeFailure, Server, ServerConfig, Status,
};
use ipcbus_proto::{Handle, ReceiverId, SenderId};

/// The name of every target, as in `fuzz/Cargo.toml` and the corpus directories.
pub const TARGETS: &[&str] = &[
    "frame_decoder",
    "handshake_messages",
    "handshake_accept",
    "handshake_connect",
    "sealed_open",
    "epm_request",
    "gunzip_cap",
    "salt",
    "epm_config",
    "record",
    "call",
];

/// Runs the target called `name` on `data`. Unknown names do nothing.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "frame_decoder" => frame_decoder(data),
        "handshake_messages" => handshake_messages(data),
        "handshake_accept" => handshake_accept(data),
        "handshake_connect" => handshake_connect(data),
        "sealed_open" => sealed_open(data),
        "epm_request" => epm_request(data),
        "gunzip_cap" => gunzip_cap(data),
        "salt" => salt(data),
        "epm_config" => epm_config(data),
        "record" => record(data),
        "call" => call(data),
        _ => {}
    }
}

const MAXES: [usize; 4] = [16, 64, 4096, 1 << 20];

/// The wire codec: `data[0]` picks the maximum frame length, `data[1]` the size of
/// the pieces the rest arrives in. Every frame decoded must re-encode to exactly the
/// bytes it came from and respect the maximum; the buffer never grows past a small
/// multiple of the maximum however large a length prefix announces.
pub fn frame_decoder(data: &[u8]) {
    let [sel, chunk, rest @ ..] = data else {
        return;
    };
    let max = MAXES[usize::from(*sel) % MAXES.len()];
    let chunk = usize::from(*chunk).max(1);
    let mut codec = CodecV1::new(max);
    let mut src = BytesMut::new();
    let mut consumed = 0usize;
    for piece in rest.chunks(chunk) {
        src.extend_from_slice(piece);
        loop {
            let before = src.len();
            match codec.decode(&mut src) {
                Ok(Some(f)) => {
                    let used = before - src.len();
                    assert!(used <= 4 + codec.max_frame(), "frame over the maximum");
                    let mut again = BytesMut::new();
                    put_frame(&mut again, f.kind, f.flags, f.seq, &f.body);
                    assert_eq!(&again[..], &rest[consumed..consumed + used]);
                    consumed += used;
                }
                Ok(None) => break,
                Err(_) => return,
            }
            assert!(
                src.capacity() <= 4 * (rest.len() + codec.max_frame() + 14) + 4096,
                "buffer grew to {} for a maximum of {}",
                src.capacity(),
                codec.max_frame()
            );
        }
    }
}

/// The handshake bodies: `data[0]` picks the parser, the rest is the body. Whatever
/// parses must encode back to the same bytes.
pub fn handshake_messages(data: &[u8]) {
    let [sel, body @ ..] = data else {
        return;
    };
    match sel % 5 {
        0 => {
            if let Ok(HelloParse::Hello(h)) = Hello::parse(body) {
                let mut out = BytesMut::new();
                h.encode(&mut out);
                assert_eq!(&out[..], body);
            }
        }
        1 => {
            if let Ok(w) = Welcome::parse(body) {
                let mut out = BytesMut::new();
                w.encode(&mut out);
                assert_eq!(&out[..], body);
            }
        }
        2 => {
            if let Ok(r) = Reject::parse(body) {
                assert!(r.text.len() <= 3 * 1024);
                assert_eq!(r.reason.code(), body[0]);
                assert_eq!(RejectReason::from_code(body[0]), r.reason);
                if std::str::from_utf8(&body[3..]).is_ok() {
                    let mut out = BytesMut::new();
                    r.encode(&mut out);
                    assert_eq!(&out[..], body);
                }
            }
        }
        3 => {
            if let Ok(p) = parse_proof(body) {
                assert_eq!(p.map_or(0, |p| p.len()), body.len());
            }
        }
        _ => {
            if let Ok(n) = parse_ack(body) {
                assert_eq!(&n.to_be_bytes()[..], body);
            }
        }
    }
}

/// The fixed handle the handshake targets serve.
pub const FUZZ_HANDLE: &str = "fuzz";

fn fuzz_key() -> Key {
    Key::from_bytes([0x42; 32])
}

/// `data[0]` bits 0-1: mode (open, authenticated, sealed); bit 2: prepend a valid
/// Hello for that mode, so the input starts one step into the conversation.
fn handshake_setup(sel: u8) -> (Option<Key>, Mode) {
    match sel % 3 {
        0 => (None, Mode::Open),
        1 => (Some(fuzz_key()), Mode::Authenticated),
        _ => (Some(fuzz_key()), Mode::Sealed),
    }
}

/// The frame bytes of a valid Hello for [`FUZZ_HANDLE`] in `mode`.
pub fn hello_frame(mode: Mode) -> Vec<u8> {
    let hello = Hello {
        version: VERSION,
        mode,
        handle: Handle::new(FUZZ_HANDLE).expect("valid handle"),
        sender: SenderId([1; 16]),
        nonce: [2; 32],
    };
    let mut body = BytesMut::new();
    hello.encode(&mut body);
    let mut out = BytesMut::new();
    put_frame(&mut out, Kind::Hello, Flags(0), 0, &body);
    out.to_vec()
}

/// Feeds `input` to one side of the handshake (a fresh state machine from `start`)
/// twice: all at once, then one byte at a time. Neither may panic; both must end the
/// same way (established, the same failure, or waiting for more) having written the
/// same bytes, and whatever the side writes must be whole handshake frames.
fn drive<M>(
    input: &[u8],
    start: impl Fn(&mut BytesMut) -> M,
    feed: impl Fn(&mut M, &mut BytesMut, &mut BytesMut) -> Result<Status, HandshakeFailure>,
) {
    let run = |chunk: usize| {
        let mut out = BytesMut::new();
        let mut side = start(&mut out);
        let mut src = BytesMut::new();
        let mut end = None;
        for piece in input.chunks(chunk) {
            src.extend_from_slice(piece);
            match feed(&mut side, &mut src, &mut out) {
                Ok(Status::NeedMore) => {}
                Ok(Status::Established(e)) => {
                    end = Some(Ok((e.sender, e.receiver, e.tx.is_some())));
                    break;
                }
                Err(e) => {
                    end = Some(Err(e));
                    break;
                }
            }
        }
        (end, out)
    };
    let (end, out) = run(input.len().max(1));
    let (end_bytewise, out_bytewise) = run(1);
    assert_eq!(
        end, end_bytewise,
        "the outcome depends on how the bytes arrive"
    );
    assert_eq!(
        out, out_bytewise,
        "the output depends on how the bytes arrive"
    );
    let mut codec = CodecV1::new(1 << 16);
    let mut out = out;
    while let Some(f) = codec
        .decode(&mut out)
        .expect("the side writes valid frames")
    {
        assert_eq!((f.flags, f.seq), (Flags(0), 0), "handshake frame header");
    }
    assert!(out.is_empty(), "the side writes whole frames");
}

/// The accepting (receiver) side of the handshake against arbitrary client bytes.
pub fn handshake_accept(data: &[u8]) {
    let [sel, rest @ ..] = data else {
        return;
    };
    let (key, mode) = handshake_setup(*sel);
    let mut input = Vec::new();
    if sel & 4 != 0 {
        input.extend_from_slice(&hello_frame(mode));
    }
    input.extend_from_slice(rest);
    let max = MAXES[usize::from(sel >> 3) % MAXES.len()].max(4096);
    let handle = Handle::new(FUZZ_HANDLE).expect("valid handle");
    let config = ServerConfig {
        max_frame: max,
        ..ServerConfig::new(handle, ReceiverId([7; 16]), mode, key, [8; 32])
    };
    drive(
        &input,
        |_| Server::new(config.clone()),
        |side, src, out| side.feed(src, out),
    );
}

/// The connecting (sender) side of the handshake against arbitrary server bytes.
pub fn handshake_connect(data: &[u8]) {
    let [sel, rest @ ..] = data else {
        return;
    };
    let (key, mode) = handshake_setup(*sel);
    let expect = (sel & 4 != 0).then_some(ReceiverId([7; 16]));
    let max = MAXES[usize::from(sel >> 3) % MAXES.len()].max(4096);
    let handle = Handle::new(FUZZ_HANDLE).expect("valid handle");
    let config = ClientConfig {
        expect,
        max_frame: max,
        ..ClientConfig::new(handle, SenderId([9; 16]), mode, key, [10; 32])
    };
    drive(
        rest,
        |out| Client::new(config.clone(), out),
        |side, src, out| side.feed(src, out),
    );
}

fn session_sealers() -> (Sealer, Sealer) {
    let k = SessionKeys::derive(
        &fuzz_key(),
        b"hello",
        &[1; 32],
        &ReceiverId([2; 16]),
        &[3; 32],
    );
    (Sealer::new(&k.c2s), Sealer::new(&k.c2s))
}

/// Sealed frames: arbitrary frames must not open (or, if they do, only to a body
/// shorter by the tag), and a frame sealed here with one bit flipped anywhere after
/// the length prefix must never open.
///
/// `data[0]`: 0-127 decode and open the rest as frames; 128-255 seal the rest and
/// flip the bit numbered by `data[1..3]`.
pub fn sealed_open(data: &[u8]) {
    let [sel, rest @ ..] = data else {
        return;
    };
    let (tx, rx) = session_sealers();
    let mut codec = CodecV1::new(1 << 16);
    if *sel < 128 {
        let mut src = BytesMut::from(rest);
        while let Ok(Some(mut f)) = codec.decode(&mut src) {
            let n = f.body.len();
            if rx.open(&mut f).is_ok() {
                assert_eq!(f.body.len() + TAG_LEN, n);
            }
        }
        return;
    }
    let [b0, b1, seq, plain @ ..] = rest else {
        return;
    };
    let bit = usize::from(u16::from_be_bytes([*b0, *b1]));
    let mut buf = BytesMut::new();
    let flags = Flags(sel & Flags::COMPRESSED);
    tx.put_sealed(&mut buf, Kind::Data, flags, u64::from(*seq), plain);
    let mut good = codec
        .decode(&mut buf.clone())
        .ok()
        .flatten()
        .expect("own frame");
    rx.open(&mut good).expect("own frame opens");
    assert_eq!(&good.body[..], plain);
    // Flip one bit after the length prefix (the prefix only moves frame bounds).
    let pos = 4 * 8 + bit % ((buf.len() - 4) * 8);
    buf[pos / 8] ^= 1 << (pos % 8);
    if let Ok(Some(mut f)) = codec.decode(&mut buf) {
        assert!(
            rx.open(&mut f).is_err(),
            "bit {pos} flipped and the frame opened"
        );
    }
}

/// The EPM message codec: `data[0]` bit 0 picks bodies or frames, bit 1 sealing for
/// frames, bit 2 Request or Response. A body that decodes must re-encode and decode
/// to the same message; frames go through [`FrameDecoder`] until the first error.
pub fn epm_request(data: &[u8]) {
    let [sel, rest @ ..] = data else {
        return;
    };
    if sel & 1 == 0 {
        if sel & 4 == 0 {
            if let Ok(m) = decode_body::<Request>(rest) {
                assert_eq!(decode_body::<Request>(&encode_body(&m)).as_ref(), Ok(&m));
            }
        } else if let Ok(m) = decode_body::<Response>(rest) {
            assert_eq!(decode_body::<Response>(&encode_body(&m)).as_ref(), Ok(&m));
        }
        return;
    }
    let opener = (sel & 2 != 0).then(|| session_sealers().1);
    let mut dec = FrameDecoder::new(opener, 1 << 16);
    let mut codec = CodecV1::new(1 << 16);
    let mut src = BytesMut::from(rest);
    while let Ok(Some(f)) = codec.decode(&mut src) {
        let ok = if sel & 4 == 0 {
            dec.decode::<Request>(f).is_ok()
        } else {
            dec.decode::<Response>(f).is_ok()
        };
        if !ok {
            break;
        }
    }
}

/// gzip inflation with the cap: `data[0..2]` is the cap (0-65535), the rest the
/// body. What inflates is never over the cap; and the rest, compressed here, inflates
/// back to itself under a cap of its length and fails under one byte less.
pub fn gunzip_cap(data: &[u8]) {
    let [c0, c1, rest @ ..] = data else {
        return;
    };
    let cap = usize::from(u16::from_be_bytes([*c0, *c1]));
    match gunzip(rest, cap) {
        Ok(out) => assert!(out.len() <= cap),
        Err(DecodeError::Inflate | DecodeError::InflateTooLarge { .. }) => {}
        Err(e) => panic!("unexpected error {e:?}"),
    }
    if let Some(z) = gzip(rest, u32::from(*c0 % 10)) {
        assert_eq!(gunzip(&z, rest.len()).as_deref(), Ok(rest));
        if !rest.is_empty() {
            assert_eq!(
                gunzip(&z, rest.len() - 1),
                Err(DecodeError::InflateTooLarge {
                    max: rest.len() - 1
                })
            );
        }
    }
}

/// Salts as people write them: what parses is 1..=1024 bytes, and its hex form
/// parses to the same bytes.
pub fn salt(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(v) = ipcbus_proto::parse_salt(s) {
        assert!(
            !v.is_empty() && v.len() <= 1024,
            "salt of {} bytes",
            v.len()
        );
        let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(ipcbus_proto::parse_salt(&hex).as_ref(), Ok(&v));
        let list: Vec<String> = v.iter().map(|b| format!("0x{b:02x}")).collect();
        assert_eq!(
            ipcbus_proto::parse_salt(&format!("{{{}}}", list.join(","))).as_ref(),
            Ok(&v)
        );
    }
}

/// The epm-service config file (TOML) and `--bind` values.
pub fn epm_config(data: &[u8]) {
    let _ = ipcbus_epm::config::parse_file(Path::new("fuzz.toml"), data);
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(a) = ipcbus_epm::config::parse_bind(s, 4455) {
            let again: SocketAddr = ipcbus_epm::config::parse_bind(&a.to_string(), 1)
                .expect("a printed address parses");
            assert_eq!(again, a);
        }
    }
}

/// Registry records (JSON, as other processes write them) and endpoint texts: what
/// parses prints back to text that parses to the same value, and a record always has
/// at least one endpoint.
pub fn record(data: &[u8]) {
    if let Some(r) = ipcbus_proto::Record::from_json(data) {
        assert!(!r.endpoints.is_empty(), "a record without endpoints");
        assert_eq!(
            ipcbus_proto::Record::from_json(&r.to_json()).as_ref(),
            Some(&r)
        );
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(e) = s.parse::<ipcbus_proto::Endpoint>() {
            let again: ipcbus_proto::Endpoint = e.to_string().parse().expect("printed endpoint");
            assert_eq!(again, e);
        }
    }
}

/// The bodies of call frames (docs/PROTOCOL.md §8): `data[0] % 4` picks `Request`,
/// `Reply`, `Cancel` or the contract-mismatch detail, the rest is the body. Whatever
/// parses re-encodes to exactly the same bytes.
pub fn call(data: &[u8]) {
    use ipcbus_proto::call::{encode_cancel, parse_cancel, ContractDetail, Reply, Request};
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let bytes = bytes::Bytes::copy_from_slice(body);
    let mut out = BytesMut::new();
    match pick % 4 {
        0 => {
            if let Ok(r) = Request::parse(bytes) {
                assert_ne!(r.id, 0);
                r.encode(&mut out);
                assert_eq!(&out[..], body);
            }
        }
        1 => {
            if let Ok(r) = Reply::parse(bytes) {
                assert_ne!(r.id, 0);
                r.encode(&mut out);
                assert_eq!(&out[..], body);
            }
        }
        2 => {
            if let Ok(id) = parse_cancel(body) {
                encode_cancel(&mut out, id);
                assert_eq!(&out[..], body);
            }
        }
        _ => {
            if let Ok(d) = ContractDetail::parse(body) {
                assert_eq!(&d.to_bytes()[..], body);
            }
        }
    }
}

/// A small seed corpus: for each target, inputs that reach past the first checks.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let frame = |kind, flags, seq, body: &[u8]| {
        let mut b = BytesMut::new();
        put_frame(&mut b, kind, Flags(flags), seq, body);
        b.to_vec()
    };
    let cat = |parts: &[&[u8]]| parts.concat();

    // frame_decoder: a data frame, an ack, a bye, two frames back to back, garbage.
    let data = frame(Kind::Data, 0, 7, b"hi");
    let ack = frame(Kind::Ack, 0, 1, &42u64.to_be_bytes());
    out.push(("frame_decoder", cat(&[&[2, 255], &data])));
    out.push(("frame_decoder", cat(&[&[2, 1], &data, &ack])));
    out.push((
        "frame_decoder",
        cat(&[&[3, 3], &frame(Kind::Bye, 0, 2, b"")]),
    ));
    out.push((
        "frame_decoder",
        cat(&[&[0, 7], &[0xff, 0xff, 0xff, 0xff, 0x10]]),
    ));

    // handshake_messages
    let hello = hello_frame(Mode::Sealed);
    out.push(("handshake_messages", cat(&[&[0], &hello[14..]])));
    let mut w = BytesMut::new();
    Welcome {
        receiver: ReceiverId([7; 16]),
        nonce: [3; 32],
        proof: Some([4; 32]),
    }
    .encode(&mut w);
    out.push(("handshake_messages", cat(&[&[1], &w])));
    let mut r = BytesMut::new();
    Reject {
        reason: RejectReason::WrongHandle,
        text: "this receiver serves \"x\"".into(),
    }
    .encode(&mut r);
    out.push(("handshake_messages", cat(&[&[2], &r])));
    out.push(("handshake_messages", cat(&[&[3], &[5; 32]])));
    out.push(("handshake_messages", cat(&[&[4], &9u64.to_be_bytes()])));

    // handshake_accept: open mode, a whole client conversation; keyed, a hello then
    // a proof; a future version; garbage.
    out.push((
        "handshake_accept",
        cat(&[&[4], &frame(Kind::Proof, 0, 0, b"")]),
    ));
    out.push((
        "handshake_accept",
        cat(&[&[5], &frame(Kind::Proof, 0, 0, &[0; 32])]),
    ));
    out.push((
        "handshake_accept",
        cat(&[&[2], &frame(Kind::Hello, 0, 0, b"IPCB\x00\x02")]),
    ));
    out.push(("handshake_accept", cat(&[&[0], b"GET / HTTP/1.1\r\n\r\n"])));

    // handshake_connect: welcome (with and without proof), then ready; reject.
    let mut w_open = BytesMut::new();
    Welcome {
        receiver: ReceiverId([7; 16]),
        nonce: [3; 32],
        proof: None,
    }
    .encode(&mut w_open);
    out.push((
        "handshake_connect",
        cat(&[
            &[4],
            &frame(Kind::Welcome, 0, 0, &w_open),
            &frame(Kind::Ready, 0, 0, b""),
        ]),
    ));
    out.push((
        "handshake_connect",
        cat(&[&[1], &frame(Kind::Welcome, 0, 0, &w)]),
    ));
    out.push((
        "handshake_connect",
        cat(&[&[0], &frame(Kind::Reject, 0, 0, &r)]),
    ));

    // sealed_open: a properly sealed frame; a seal-and-flip input.
    let (tx, _) = session_sealers();
    let mut sealed = BytesMut::new();
    tx.put_sealed(&mut sealed, Kind::Data, Flags(0), 5, b"secret payload");
    out.push(("sealed_open", cat(&[&[0], &sealed])));
    out.push((
        "sealed_open",
        cat(&[&[200, 0, 77, 9], b"plaintext to seal"]),
    ));

    // epm_request: bodies from docs/PROTOCOL.md, and whole frames (plain, sealed,
    // compressed).
    let lookup = Request {
        id: 1,
        op: Op::Lookup {
            handle: Handle::new("ab").expect("valid handle"),
        },
    };
    let register = Request {
        id: 7,
        op: Op::Register {
            handle: Handle::new("h").expect("valid handle"),
            entry: Entry {
                endpoint: SocketAddr::from(([10, 0, 0, 2], 4455)),
                receiver: ReceiverId([0xab; 16]),
                pid: Some(300),
                version: 1,
                since_ms: 1,
            },
            lease_ms: 10_000,
        },
    };
    out.push(("epm_request", cat(&[&[0], &encode_body(&lookup)])));
    out.push(("epm_request", cat(&[&[0], &encode_body(&register)])));
    out.push((
        "epm_request",
        cat(&[
            &[4],
            &encode_body(&Response::Removed {
                handle: Handle::new("h").expect("valid handle"),
                receiver: ReceiverId([1; 16]),
            }),
        ]),
    ));
    let mut plain = BytesMut::new();
    let mut enc = FrameEncoder::new(None).with_threshold(16);
    enc.encode(&lookup, &mut plain);
    enc.encode(&register, &mut plain);
    out.push(("epm_request", cat(&[&[1], &plain])));
    let mut sealed = BytesMut::new();
    let mut enc = FrameEncoder::new(Some(session_sealers().0)).with_threshold(16);
    enc.encode(&register, &mut sealed);
    enc.encode(
        &Request {
            id: 2,
            op: Op::Status,
        },
        &mut sealed,
    );
    out.push(("epm_request", cat(&[&[3], &sealed])));

    // gunzip_cap: a small member, a bomb under a small cap, junk.
    let z = gzip(&b"hello hello hello hello ".repeat(40), 6).expect("compressible");
    out.push(("gunzip_cap", cat(&[&[0x10, 0x00], &z])));
    let bomb = gzip(&vec![0u8; 1 << 20], 9).expect("compressible");
    out.push(("gunzip_cap", cat(&[&[0x01, 0x00], &bomb])));
    out.push(("gunzip_cap", cat(&[&[0x00, 0x40], b"\x1f\x8b\x08\x00junk"])));

    // salt
    for s in [
        "{0x01,0x02,0x03}",
        "010203",
        "0x0a0b",
        "{ 1, 2 ,255 }",
        "{0x01,",
    ] {
        out.push(("salt", s.as_bytes().to_vec()));
    }

    // epm_config
    let toml = "port = 4455\nbind = [\"0.0.0.0\", \"[::]:4455\"]\n\
                password_file = \"/etc/ipcbus/epm.password\"\nsalt = \"{0x01,0x02,0x03}\"\n\
                lease_ms = 10000\nmax_connections = 1024\n";
    out.push(("epm_config", toml.as_bytes().to_vec()));
    out.push(("epm_config", b"[::1]:4455".to_vec()));
    out.push(("epm_config", b"max_frame = 1048576\nunknown = 1\n".to_vec()));

    // record: both record forms, endpoint texts.
    for s in [
        r#"{"version":1,"handle":"a.b","endpoint":"127.0.0.1:4000","receiver":"03030303030303030303030303030303","pid":7,"since_ms":5}"#,
        r#"{"version":1,"handle":"a.b","endpoint":"127.0.0.1:4000","endpoints":["tcp://127.0.0.1:4000","unix:///run/x/sockets/1.sock"],"receiver":"03030303030303030303030303030303","pid":null,"since_ms":5}"#,
        "tcp://[::1]:4000",
        "unix:///run/user/1000/ipcbus/sockets/x.sock",
        "10.0.0.2:9",
    ] {
        out.push(("record", s.as_bytes().to_vec()));
    }

    // call: a request, a success and an error reply, a cancel, a detail (the pinned
    // bytes of proto/src/call.rs).
    for h in [
        "000000000000000001000003e8000443616c630002036164640204",
        "010000000000000001000c",
        "01000000000000000201000300026e6f01430001",
        "020000000000000102",
        "0301430001",
    ] {
        out.push(("call", unhex(h)));
    }
    out
}

fn unhex(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok())
        .collect()
}
