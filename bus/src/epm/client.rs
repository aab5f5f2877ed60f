//! One connection to the EPM: requests and their replies, and watch events.

use std::collections::VecDeque;
use std::time::Duration;

use crate::registry::Record;
use ipcbus_proto::epm::{Answer, Entry, HandleCount, Op, Request, Response, Status};
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::ReceiverId;

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
}

impl EpmClient {
    pub(crate) fn new(reader: LinkReader, writer: LinkWriter, timeout: Duration) -> EpmClient {
        EpmClient {
            reader,
            writer,
            next_id: 1,
            events: VecDeque::new(),
            timeout,
        }
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
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        tokio::time::timeout(self.timeout, async {
            self.writer
                .send(&Request { id, op })
                .await
                .map_err(EpmError::Io)?;
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
        })
        .await
        .map_err(|_| EpmError::Timeout)?
    }

    fn buffer(&mut self, r: Response) -> Result<(), EpmError> {
        let ev = match r {
            Response::Added { handle, entry } => WatchEvent::Added(entry.to_record(&handle)),
            Response::Removed { handle, receiver } => WatchEvent::Removed { handle, receiver },
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

    /// Registers `record` for its handle; returns the lease granted. Register again
    /// or [`keep_alive`](Self::keep_alive) before it runs out.
    ///
    /// # Errors
    /// [`EpmError`], e.g. [`EpmError::Refused`] with `LimitReached`.
    pub async fn register(
        &mut self,
        record: &Record,
        lease: Duration,
    ) -> Result<Duration, EpmError> {
        let lease_ms = u32::try_from(lease.as_millis()).unwrap_or(u32::MAX);
        match self
            .request(Op::Register {
                handle: record.handle.clone(),
                entry: Entry::from_record(record).ok_or(EpmError::NoTcpEndpoint)?,
                lease_ms,
            })
            .await?
        {
            Answer::Registered { lease_ms } => Ok(Duration::from_millis(lease_ms.into())),
            _ => Err(EpmError::UnexpectedAnswer),
        }
    }

    /// Removes a registration this connection made.
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
