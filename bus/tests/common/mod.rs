//! Shared by the bus's integration tests: a peer that speaks the wire protocol by
//! hand.

#![allow(dead_code)]

use std::time::Duration;

use bytes::BytesMut;
use ipcbus::proto::codec::{put_frame, CodecV1};
use ipcbus::proto::crypto::{Sealer, SessionKeys};
use ipcbus::proto::frame::{Flags, Hello, Kind, Mode, RawFrame, Welcome, VERSION};
use ipcbus::{Handle, Key, SenderId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const T: Duration = Duration::from_secs(10);

pub async fn read_frame(s: &mut TcpStream, buf: &mut BytesMut) -> Option<RawFrame> {
    let mut codec = CodecV1::default();
    loop {
        if let Ok(Some(f)) = codec.decode(buf) {
            return Some(f);
        }
        if tokio::time::timeout(T, s.read_buf(buf)).await.ok()?.ok()? == 0 {
            return None;
        }
    }
}

/// Runs the client side of an open-mode or keyed handshake by hand as `sender`;
/// returns the stream and, when keyed, the client's sealer.
pub async fn handshake(
    addr: std::net::SocketAddr,
    handle: &str,
    sender: SenderId,
    key: Option<&Key>,
) -> (TcpStream, Option<Sealer>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let hello = Hello {
        version: VERSION,
        mode: if key.is_some() {
            Mode::Sealed
        } else {
            Mode::Open
        },
        handle: Handle::new(handle).unwrap(),
        sender,
        nonce: [5; 32],
    };
    let mut body = BytesMut::new();
    hello.encode(&mut body);
    let mut out = BytesMut::new();
    put_frame(&mut out, Kind::Hello, Flags(0), 0, &body);
    s.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let w = read_frame(&mut s, &mut buf).await.unwrap();
    assert_eq!(w.kind, Kind::Welcome);
    let w = Welcome::parse(&w.body).unwrap();
    let keys = key.map(|k| SessionKeys::derive(k, &body, &hello.nonce, &w.receiver, &w.nonce));
    let mut out = BytesMut::new();
    match &keys {
        Some(k) => put_frame(&mut out, Kind::Proof, Flags(0), 0, &k.proof_c),
        None => put_frame(&mut out, Kind::Proof, Flags(0), 0, &[]),
    }
    s.write_all(&out).await.unwrap();
    let r = read_frame(&mut s, &mut buf).await.unwrap();
    assert_eq!(r.kind, Kind::Ready);
    (s, keys.map(|k| Sealer::new(&k.c2s)))
}
