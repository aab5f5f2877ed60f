//! One connection to the EPM: requests and their replies, and watch events.

use std::collections::VecDeque;
use std::time::Duration;

use crate::registry::Record;
use ipcbus_proto::epm::{Answer, Entry, HandleCount, Op, Request, Response, Status};
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::ReceiverId;
use ipcbus_proto::record::Role;

use super::link::{LinkReader, LinkWriter};
use super::EpmError;

/// Most watch events buffered while waiting for a reply; past it the client gives up
/// the connection rather than grow without bound.
const MAX_BUFFERED_EVENTS: usize = 65_536;

/// A change of a watched handle.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchEvent {
    /// A receiver registered.
    Added(Record),
    /// A receiver is gone.
    Removed {
        /// The handle.
        handle: Handle,
        /// The receiver.
        receiver: ReceiverId,
    },
    /// A server of calls registered (a watch of servers,
    /// [`EpmClient::watch_servers`]); the record's role is [`Role::Server`].
    ServerAdded(Record),
    /// A server of calls is gone.
    ServerRemoved {
        /// The handle.
        handle: Handle,
        /// The server's id.
        server: ReceiverId,
    },
}

impl WatchEvent {
    /// Whether the event is about a receiver or a server.
    pub fn role(&self) -> Role {
        match self {
            WatchEvent::Added(_) | WatchEvent::Removed { .. } => Role::Receiver,
            WatchEvent::ServerAdded(_) | WatchEvent::ServerRemoved { .. } => Role::Server,
        }
    }
}

/// An open connection to the EPM, made by [`Epm::client`](super::Epm::client).
///
/// Registrations made through it last as long as the connection (and its lease);
/// dropping the client removes them at once.
#[derive(Debug)]
pub struct EpmClient {
    reader: LinkReader,
    writer: LinkWriter,
    next_id: u32,
    events: VecDeque<WatchEvent>,
    timeout: Duration,
    /// Whether the EPM has shown it knows the server requests (it answered one).
    knows_servers: bool,
}

impl EpmClient {
    pub(crate) fn new(reader: LinkReader, writer: LinkWriter, timeout: Duration) -> EpmClient {
        EpmClient {
            reader,
            writer,
            next_id: 1,
            events: VecDeque::new(),
            timeout,
            knows_servers: false,
        }
    }

    fn next_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Sends one request and waits (at most the client's request timeout) for its
    /// reply; watch events that arrive meanwhile are kept for
    /// [`next_event`](Self::next_event). An `Answer::Error` is returned as
    /// [`EpmError::Refused`].
    ///
    /// # Errors
    /// [`EpmError`].
    ///
    /// # Cancel safety
    /// Not cancel safe: a cancelled request may have been sent; drop the client.
    pub async fn request(&mut self, op: Op) -> Result<Answer, EpmError> {
        let id = self.next_id();
        tokio::time::timeout(self.timeout, async {
            self.writer
                .send(&Request { id, op })
                .await
                .map_err(EpmError::Io)?;
            self.reply(id).await
        })
        .await
        .map_err(|_| EpmError::Timeout)?
    }

    /// Sends a server request (`RegisterServer`, `WatchServers`, ...). The first on
    /// a connection goes out right behind a `Status` request, in the same write: an
    /// EPM older than server requests answers the `Status`, then closes the
    /// connection on the request it cannot decode. A reply to the `Status` followed
    /// by the connection closing is therefore
    /// [`EpmError::ServersUnsupported`], not a lost connection to reconnect.
    async fn server_request(&mut self, op: Op) -> Result<Answer, EpmError> {
        if self.knows_servers {
            return self.request(op).await;
        }
        let probe = self.next_id();
        let id = self.next_id();
        tokio::time::timeout(self.timeout, async {
            self.writer.queue(&Request {
                id: probe,
                op: Op::Status,
            });
            self.writer.queue(&Request { id, op });
            self.writer.flush().await.map_err(EpmError::Io)?;
            self.reply(probe).await?;
            match self.reply(id).await {
                Err(EpmError::Closed | EpmError::Io(_)) => Err(EpmError::ServersUnsupported),
                r => {
                    self.knows_servers = true;
                    r
                }
            }
        })
        .await
        .map_err(|_| EpmError::Timeout)?
    }

    /// Reads until the reply to request `id`, buffering watch events.
    async fn reply(&mut self, id: u32) -> Result<Answer, EpmError> {
        loop {
            match self.reader.recv::<Response>().await? {
                None => return Err(EpmError::Closed),
                Some(Response::Reply { id: got, answer }) if got == id => {
                    return match answer {
                        Answer::Error { code, text } => Err(EpmError::Refused { code, text }),
                        a => Ok(a),
                    };
                }
                Some(Response::Reply { .. }) => return Err(EpmError::UnexpectedAnswer),
                Some(other) => self.buffer(other)?,
            }
        }
    }

    fn buffer(&mut self, r: Response) -> Result<(), EpmError> {
        let ev = match r {
            Response::Added { handle, entry } => WatchEvent::Added(entry.to_record(&handle)),
            Response::Removed { handle, receiver } => WatchEvent::Removed { handle, receiver },
            Response::ServerAdded { handle, entry } => {
                WatchEvent::ServerAdded(entry.to_record(&handle).with_role(Role::Server))
            }
            Response::ServerRemoved { handle, receiver } => WatchEvent::ServerRemoved {
                handle,
                server: receiver,
            },
            _ => return Err(EpmError::UnexpectedAnswer),
        };
        if self.events.len() >= MAX_BUFFERED_EVENTS {
            return Err(EpmError::TooManyEvents);
        }
        self.events.push_back(ev);
        Ok(())
    }

    /// The next watch event.
    ///
    /// # Errors
    /// [`EpmError::Closed`] when the EPM closed the connection, or another
    /// [`EpmError`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn next_event(&mut self) -> Result<WatchEvent, EpmError> {
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Ok(ev);
            }
            match self.reader.recv::<Response>().await? {
                None => return Err(EpmError::Closed),
                Some(Response::Reply { .. }) => return Err(EpmError::UnexpectedAnswer),
                Some(other) => self.buffer(other)?,
            }
        }
    }

    /// Registers `record` for its handle, as a receiver or a server of calls after
    /// its [`role`](Record::role); returns the lease granted. Register again or
    /// [`keep_alive`](Self::keep_alive) before it runs out.
    ///
    /// # Errors
    /// [`EpmError`], e.g. [`EpmError::Refused`] with `LimitReached`;
    /// [`EpmError::ServersUnsupported`] for a server when the EPM predates servers.
    pub async fn register(
        &mut self,
        record: &Record,
        lease: Duration,
    ) -> Result<Duration, EpmError> {
        let lease_ms = u32::try_from(lease.as_millis()).unwrap_or(u32::MAX);
        let handle = record.handle.clone();
        let entry = Entry::from_record(record).ok_or(EpmError::NoTcpEndpoint)?;
        let answer = match record.role {
            Role::Receiver => {
                self.request(Op::Register {
                    handle,
                    entry,
                    lease_ms,
                })
                .await?
            }
            Role::Server => {
                self.server_request(Op::RegisterServer {
                    handle,
                    entry,
                    lease_ms,
                })
                .await?
            }
        };
        match answer {
            Answer::Registered { lease_ms } => Ok(Duration::from_millis(lease_ms.into())),
            _ => Err(EpmError::UnexpectedAnswer),
        }
    }

    /// Removes a registration this connection made (a receiver's or a server's).
    ///
    /// # Errors
    /// [`EpmError`]; `Refused` with `NotFound` if there is none.
    pub async fn unregister(
        &mut self,
        handle: &Handle,
        receiver: ReceiverId,
    ) -> Result<(), EpmError> {
        self.done(Op::Unregister {
            handle: handle.clone(),
            receiver,
        })
        .await
    }

    /// Renews every registration of this connection.
    ///
    /// # Errors
    /// [`EpmError`].
    pub async fn keep_alive(&mut self) -> Result<(), EpmError> {
        self.done(Op::KeepAlive).await
    }

    /// The receivers registered for `handle` now.
    ///
    /// # Errors
    /// [`EpmError`].
    pub async fn lookup(&mut self, handle: &Handle) -> Result<Vec<Record>, EpmError> {
        self.records(
            handle,
            Op::Lookup {
                handle: handle.clone(),
            },
        )
        .await
    }

    /// The receivers registered for `handle` now; from then on every change comes as
    /// a [`WatchEvent`] from [`next_event`](Self::next_event).
    ///
    /// # Errors
    /// [`EpmError`].
    pub async fn watch(&mut self, handle: &Handle) -> Result<Vec<Record>, EpmError> {
        self.records(
            handle,
            Op::Watch {
                handle: handle.clone(),
            },
        )
        .await
    }

    /// The servers of calls registered for `handle` now (records with the role
    /// [`Role::Server`]).
    ///
    /// # Errors
    /// [`EpmError`]; [`EpmError::ServersUnsupported`] when the EPM predates servers.
    pub async fn lookup_servers(&mut self, handle: &Handle) -> Result<Vec<Record>, EpmError> {
        let a = self
            .server_request(Op::LookupServers {
                handle: handle.clone(),
            })
            .await?;
        servers(handle, a)
    }

    /// The servers of calls registered for `handle` now; from then on every change
    /// comes as [`WatchEvent::ServerAdded`] or [`WatchEvent::ServerRemoved`] from
    /// [`next_event`](Self::next_event).
    ///
    /// # Errors
    /// [`EpmError`]; [`EpmError::ServersUnsupported`] when the EPM predates servers.
    pub async fn watch_servers(&mut self, handle: &Handle) -> Result<Vec<Record>, EpmError> {
        let a = self
            .server_request(Op::WatchServers {
                handle: handle.clone(),
            })
            .await?;
        servers(handle, a)
    }

    /// Stops watching the servers of `handle`.
    ///
    /// # Errors
    /// [`EpmError`].
    pub async fn unwatch_servers(&mut self, handle: &Handle) -> Result<(), EpmError> {
        match self
            .server_request(Op::UnwatchServers {
                handle: handle.clone(),
            })
            .await?
        {
            Answer::Done => Ok(()),
            _ => Err(EpmError::UnexpectedAnswer),
        }
    }

    /// The records of `role` registered for `handle` now, then their changes as
    /// events: [`watch`](Self::watch) or [`watch_servers`](Self::watch_servers).
    ///
    /// # Errors
    /// As those.
    pub async fn watch_role(
        &mut self,
        role: Role,
        handle: &Handle,
    ) -> Result<Vec<Record>, EpmError> {
        match role {
            Role::Receiver => self.watch(handle).await,
            Role::Server => self.watch_servers(handle).await,
        }
    }

    /// Every handle with its number of servers of calls (in
    /// [`HandleCount::receivers`]), and the total number of such handles.
    ///
    /// # Errors
    /// [`EpmError`]; [`EpmError::ServersUnsupported`] when the EPM predates servers.
    pub async fn list_servers(&mut self) -> Result<(Vec<HandleCount>, u32), EpmError> {
        match self.server_request(Op::ListServers).await? {
            Answer::Handles { handles, total } => Ok((handles, total)),
            _ => Err(EpmError::UnexpectedAnswer),
        }
    }

    /// Every handle with its receiver count, and the total number of handles (the EPM
    /// cuts long lists).
    ///
    /// # Errors
    /// [`EpmError`].
    pub async fn list(&mut self) -> Result<(Vec<HandleCount>, u32), EpmError> {
        match self.request(Op::List).await? {
            Answer::Handles { handles, total } => Ok((handles, total)),
            _ => Err(EpmError::UnexpectedAnswer),
        }
    }

    /// The EPM's figures.
    ///
    /// # Errors
    /// [`EpmError`].
    pub async fn status(&mut self) -> Result<Status, EpmError> {
        match self.request(Op::Status).await? {
            Answer::Status(s) => Ok(s),
            _ => Err(EpmError::UnexpectedAnswer),
        }
    }

    async fn done(&mut self, op: Op) -> Result<(), EpmError> {
        match self.request(op).await? {
            Answer::Done => Ok(()),
            _ => Err(EpmError::UnexpectedAnswer),
        }
    }

    async fn records(&mut self, handle: &Handle, op: Op) -> Result<Vec<Record>, EpmError> {
        match self.request(op).await? {
            Answer::Records(entries) => Ok(entries.iter().map(|e| e.to_record(handle)).collect()),
            _ => Err(EpmError::UnexpectedAnswer),
        }
    }

    /// Closes the connection (the EPM drops this connection's registrations at once).
    pub async fn close(mut self) {
        self.writer.shutdown().await;
    }
}

/// The records of a server answer (`Records`), with the role `Server`.
fn servers(handle: &Handle, a: Answer) -> Result<Vec<Record>, EpmError> {
    match a {
        Answer::Records(entries) => Ok(entries
            .iter()
            .map(|e| e.to_record(handle).with_role(Role::Server))
            .collect()),
        _ => Err(EpmError::UnexpectedAnswer),
    }
}
