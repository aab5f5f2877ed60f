//! Shared by the bus's integration tests: a peer that speaks the wire protocol
//! through the protocol core, without the library's connection code, over TCP or a
//! Unix socket.

#![allow(dead_code)]

use std::time::Duration;

use bytes::BytesMut;
use ipcbus::Endpoint;
use ipcbus_proto::codec::CodecV1;
use ipcbus_proto::crypto::Sealer;
use ipcbus_proto::frame::{Mode, RawFrame};
use ipcbus_proto::handshake::{Client, ClientConfig, Status};
use ipcbus_proto::{Handle, Key, SenderId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

pub const T: Duration = Duration::from_secs(10);

/// A connected byte stream of either transport.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Io for S {}
pub type Stream = Box<dyn Io>;

/// Connects to `endpoint` over its transport.
pub async fn connect(endpoint: impl Into<Endpoint>) -> Stream {
    match endpoint.into() {
        Endpoint::Tcp(a) => Box::new(TcpStream::connect(a).await.unwrap()),
        Endpoint::Unix(p) => Box::new(UnixStream::connect(&*p).await.unwrap()),
    }
}

pub async fn read_frame<S: AsyncRead + Unpin + ?Sized>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Option<RawFrame> {
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

/// Runs the client side of an open-mode or sealed handshake as `sender`, driving the
/// protocol core's state machine; returns the stream and, when keyed, the client's
/// sealer.
pub async fn handshake(
    endpoint: impl Into<Endpoint>,
    handle: &str,
    sender: SenderId,
    key: Option<&Key>,
) -> (Stream, Option<Sealer>) {
    let mut s = connect(endpoint).await;
    let mode = if key.is_some() {
        Mode::Sealed
    } else {
        Mode::Open
    };
    let config = ClientConfig::new(
        Handle::new(handle).unwrap(),
        sender,
        mode,
        key.cloned(),
        [5; 32],
    );
    let mut out = BytesMut::new();
    let mut client = Client::new(config, &mut out);
    let mut buf = BytesMut::new();
    loop {
        s.write_all(&out).await.unwrap();
        out.clear();
        let n = tokio::time::timeout(T, s.read_buf(&mut buf))
            .await
            .expect("handshake in time")
            .unwrap();
        assert!(n > 0, "closed during the handshake");
        if let Status::Established(e) = client.feed(&mut buf, &mut out).expect("handshake") {
            s.write_all(&out).await.unwrap();
            assert!(buf.is_empty(), "nothing after Ready");
            return (s, e.tx);
        }
    }
}
