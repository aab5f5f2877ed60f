//! Byte streams the protocol runs over: TCP and Unix domain sockets. Everything above
//! this module (handshake, sessions, the sender's and receiver's loops) sees one
//! [`ByteStream`] type, split into owned halves, whatever the transport.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{tcp, unix, TcpListener, TcpStream, UnixListener, UnixStream};

pub use ipcbus_proto::endpoint::{Endpoint, EndpointError, Transport};

/// Longest Unix socket path Linux accepts: `sun_path` is 108 bytes with the NUL.
pub const MAX_UNIX_PATH: usize = 107;

/// A connected byte stream of either transport.
#[derive(Debug)]
pub enum ByteStream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix-socket connection.
    Unix(UnixStream),
}

/// The reading half of a [`ByteStream`].
#[derive(Debug)]
pub(crate) enum ReadHalf {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
}

/// The writing half of a [`ByteStream`].
#[derive(Debug)]
pub(crate) enum WriteHalf {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
}

/// Who connected to a listener, for logs.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A TCP peer's address.
    Tcp(SocketAddr),
    /// A Unix-socket peer: its uid and pid from `SO_PEERCRED`, when known.
    Unix {
        /// Its user id.
        uid: Option<u32>,
        /// Its process id.
        pid: Option<i32>,
    },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "tcp://{a}"),
            Peer::Unix { uid, pid } => {
                f.write_str("unix peer")?;
                if let Some(u) = uid {
                    write!(f, " uid {u}")?;
                }
                if let Some(p) = pid {
                    write!(f, " pid {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl ByteStream {
    /// Connects to `endpoint`. TCP connections get `TCP_NODELAY`, and on loopback a
    /// congestion control that does not pace (see [`unpaced`]).
    pub(crate) async fn connect(endpoint: &Endpoint) -> io::Result<ByteStream> {
        match endpoint {
            Endpoint::Tcp(addr) => {
                let sock = TcpStream::connect(addr).await?;
                let _ = sock.set_nodelay(true);
                if addr.ip().is_loopback() {
                    unpaced(&sock);
                }
                Ok(ByteStream::Tcp(sock))
            }
            Endpoint::Unix(path) => Ok(ByteStream::Unix(UnixStream::connect(path).await?)),
        }
    }

    pub(crate) fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            ByteStream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            ByteStream::Unix(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Unix(r), WriteHalf::Unix(w))
            }
        }
    }
}

impl WriteHalf {
    /// Writes what the socket takes now, without waiting (`WouldBlock` when none).
    pub(crate) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            WriteHalf::Tcp(s) => s.try_write(buf),
            WriteHalf::Unix(s) => s.try_write(buf),
        }
    }

    /// Resolves when the socket may take more bytes.
    pub(crate) async fn writable(&self) -> io::Result<()> {
        match self {
            WriteHalf::Tcp(s) => s.writable().await,
            WriteHalf::Unix(s) => s.writable().await,
        }
    }
}

/// A connection on this host gets a congestion control that does not pace (`cubic`;
/// best effort, the system's default stays if it cannot be set). With `bbr`, a common
/// default, the kernel paces the sender's bursts of 128 KiB with a timer even on
/// loopback, where there is no queue to protect: measured at 1 KiB events, 1 -> 1, 2.3-2.7
/// M/s paced against 4.1 M/s not. LAN connections keep the system's choice.
pub(crate) fn unpaced(sock: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(sock).set_tcp_congestion(b"cubic") {
        tracing::debug!(error = %e, "cannot set cubic congestion control; keeping the default");
    }
}

macro_rules! delegate_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
                }
            }
            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    Self::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                }
            }
            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Tcp(s) => s.is_write_vectored(),
                    Self::Unix(s) => s.is_write_vectored(),
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_flush(cx),
                    Self::Unix(s) => Pin::new(s).poll_flush(cx),
                }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_read!(ByteStream);
delegate_read!(ReadHalf);
delegate_write!(ByteStream);
delegate_write!(WriteHalf);

/// A listening socket of either transport. A Unix listener owns its socket file (and
/// removes it when dropped) until [`take_socket_file`](Listener::take_socket_file).
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix-socket listener.
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Its path.
        path: PathBuf,
        /// Its file, removed when dropped (until taken).
        file: Option<SocketFile>,
    },
}

impl Listener {
    /// Accepts one connection. On a Unix socket, a peer of another uid than this
    /// process's is refused here, before any byte of the handshake
    /// ([`Accepted::WrongUser`]).
    pub async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Accepted::Ok(ByteStream::Tcp(s), Peer::Tcp(peer)))
            }
            Listener::Unix { listener, .. } => {
                let (s, _) = listener.accept().await?;
                let cred = s.peer_cred().ok();
                let peer = Peer::Unix {
                    uid: cred.map(|c| c.uid()),
                    pid: cred.and_then(|c| c.pid()),
                };
                match cred {
                    Some(c) if c.uid() == euid() => Ok(Accepted::Ok(ByteStream::Unix(s), peer)),
                    _ => Ok(Accepted::WrongUser(peer)),
                }
            }
        }
    }

    /// Where it listens.
    pub(crate) fn endpoint(&self) -> io::Result<Endpoint> {
        match self {
            Listener::Tcp(l) => Ok(Endpoint::Tcp(l.local_addr()?)),
            Listener::Unix { path, .. } => Ok(Endpoint::unix(path)),
        }
    }

    /// Hands over the socket file (a Unix listener's), so its owner decides when it
    /// goes rather than the accept task.
    pub(crate) fn take_socket_file(&mut self) -> Option<SocketFile> {
        match self {
            Listener::Tcp(_) => None,
            Listener::Unix { file, .. } => file.take(),
        }
    }
}

/// The outcome of [`Listener::accept`].
#[derive(Debug)]
pub enum Accepted {
    /// A connection, and who it is.
    Ok(ByteStream, Peer),
    /// A Unix-socket peer running as another user (or whose credentials could not be
    /// read); the connection is dropped.
    WrongUser(Peer),
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why a Unix socket could not be bound.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnixBindError {
    /// The path is longer than the platform's limit for socket addresses.
    #[error("unix socket path {} is {len} bytes; the limit is {MAX_UNIX_PATH}: use a shorter IPCBUS_RUNTIME_DIR or path", path.display())]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// Another process listens at that path.
    #[error("unix socket {} is in use by another listener", .0.display())]
    InUse(PathBuf),
    /// Binding failed for another reason (directory missing, permission).
    #[error("cannot bind unix socket {}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// Binds a Unix listener at `path`, mode 0600. A socket file left there by a listener
/// that is gone (nothing accepts) is removed first; a live one is [`UnixBindError::InUse`].
pub(crate) fn bind_unix(path: &Path) -> Result<Listener, UnixBindError> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let len = path.as_os_str().as_bytes().len();
    if len > MAX_UNIX_PATH {
        return Err(UnixBindError::PathTooLong {
            path: path.to_owned(),
            len,
        });
    }
    let io = |source| UnixBindError::Io {
        path: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
        if listening_at(path).map_err(io)? {
            return Err(UnixBindError::InUse(path.to_owned()));
        }
        tracing::info!(path = %path.display(), "removing stale unix socket: nothing listens there");
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    let file = SocketFile(path.to_owned());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(Listener::Unix {
        listener,
        path: path.to_owned(),
        file: Some(file),
    })
}

/// Whether a listener is at the socket `path`. The connect does not block, so a
/// listener that does not accept, its queue full, counts as listening (`EAGAIN`)
/// instead of blocking the caller until it accepts.
fn listening_at(path: &Path) -> io::Result<bool> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    probe.set_nonblocking(true)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(_) => Ok(false),
    }
}

/// A socket file, removed when dropped.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => tracing::debug!(path = %self.0.display(), "removed unix socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.0.display(), error = %e, "could not remove unix socket")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ipcbus-transport-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn unix_listener_accepts_own_user_and_removes_its_file() {
        let dir = tmpdir("own");
        let path = dir.join("x.sock");
        let l = bind_unix(&path).unwrap();
        assert_eq!(l.endpoint().unwrap(), Endpoint::unix(&path));
        let ep = l.endpoint().unwrap();
        let client = tokio::spawn(async move {
            let mut s = ByteStream::connect(&ep).await.unwrap();
            s.write_all(b"hi").await.unwrap();
        });
        let Accepted::Ok(s, peer) = l.accept().await.unwrap() else {
            panic!("own user refused")
        };
        assert!(
            peer.to_string().contains(&format!("uid {}", euid())),
            "{peer}"
        );
        let (mut r, _w) = s.into_split();
        let mut buf = [0u8; 2];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        client.await.unwrap();
        drop(l);
        assert!(!path.exists(), "socket file left behind");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_is_in_use() {
        let dir = tmpdir("stale");
        let path = dir.join("x.sock");
        // A socket file with no listener: bound with std, then the listener dropped
        // without removing the file.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = bind_unix(&path).unwrap();
        assert!(matches!(bind_unix(&path), Err(UnixBindError::InUse(_))));
        drop(live);
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(bind_unix(&path), Err(UnixBindError::Io { .. })));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn loopback_connections_are_not_paced() {
        let available =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                .unwrap_or_default();
        if !available.split_whitespace().any(|c| c == "cubic") {
            eprintln!("cubic is not available here ({available:?}); nothing to check");
            return;
        }
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = Endpoint::Tcp(l.local_addr().unwrap());
        let ByteStream::Tcp(s) = ByteStream::connect(&ep).await.unwrap() else {
            panic!("not tcp")
        };
        let cc = socket2::SockRef::from(&s).tcp_congestion().unwrap();
        assert_eq!(cc.split(|&b| b == 0).next().unwrap(), b"cubic");
        assert!(s.nodelay().unwrap());
    }

    #[test]
    fn long_paths_are_named() {
        let path = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        match bind_unix(&path) {
            Err(e @ UnixBindError::PathTooLong { len: 125, .. }) => {
                assert!(e.to_string().contains("limit is 107"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
}
