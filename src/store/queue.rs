//! The queue in front of a backend's writer: the [`Store`] calls become commands on a bounded
//! channel, and a backend's writer (a thread for SQLite, a task for PostgreSQL) takes every
//! command that is waiting, commits the writes among them together (group commit) and answers each
//! caller only after that commit. Both backends share this side, so they answer the same calls
//! the same way.

use tokio::sync::{mpsc, oneshot};

use super::{Advance, AllAdvanced, Durable, LastStop, PrunePlan, Reset, Store, StoreError, Via};
use crate::audit::Rejection;
use crate::route::ResourceKey;
use crate::token::FencingToken;

/// How many commands may wait for the writer before senders are slowed down. It bounds the memory a
/// flood of rejections can take while the database is slow.
pub(crate) const COMMAND_QUEUE: usize = 8192;

/// The most commands one transaction takes. Large enough that a storm of advances or rejections
/// shares commits; small enough that one batch does not hold the write lock for long.
pub(crate) const MAX_BATCH: usize = 1024;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A request to the writer thread.
#[derive(Debug)]
pub(crate) enum Command {
    Load {
        resource: ResourceKey,
        reply: Reply<Durable>,
    },
    Write(Write),
    /// Deletes up to `batch` expired audit rows, in a transaction of its own.
    Prune {
        plan: PrunePlan,
        batch: usize,
        reply: Reply<usize>,
    },
    Ping {
        reply: Reply<()>,
    },
    Close {
        done: oneshot::Sender<()>,
        this_stop: LastStop,
    },
}

/// A command that changes the database; it is answered only after its batch has committed.
#[derive(Debug)]
pub(crate) enum Write {
    Advance {
        resource: ResourceKey,
        token: FencingToken,
        via: Via,
        reply: Reply<Advance>,
    },
    AdvanceAll {
        resources: Vec<ResourceKey>,
        token: FencingToken,
        via: Via,
        reply: Reply<AllAdvanced>,
    },
    Reset {
        resource: ResourceKey,
        token: FencingToken,
        reason: String,
        reply: Reply<Reset>,
    },
    Reject {
        rejection: Box<Rejection>,
        reply: Reply<()>,
    },
}

impl Write {
    /// Answers the caller with `error`: nothing of this write is durable.
    pub(crate) fn fail(self, error: StoreError) {
        match self {
            Write::Advance { reply, .. } => drop(reply.send(Err(error))),
            Write::AdvanceAll { reply, .. } => drop(reply.send(Err(error))),
            Write::Reset { reply, .. } => drop(reply.send(Err(error))),
            Write::Reject { reply, .. } => drop(reply.send(Err(error))),
        }
    }
}

impl Command {
    /// Answers the caller with `error`. A close is answered as done: the writer is going away.
    pub(crate) fn fail(self, error: StoreError) {
        match self {
            Command::Load { reply, .. } => drop(reply.send(Err(error))),
            Command::Write(write) => write.fail(error),
            Command::Prune { reply, .. } => drop(reply.send(Err(error))),
            Command::Ping { reply } => drop(reply.send(Err(error))),
            Command::Close { done, .. } => drop(done.send(())),
        }
    }
}

/// Stops a backend's writer through its queue (see [`super::WriterGuard`]): a close lets it finish
/// every queued command, commit and stop; a drop without a close asks the same, as an unclean
/// stop, without waiting.
pub(crate) struct QueueCloser {
    commands: mpsc::Sender<Command>,
    closed: bool,
}

impl QueueCloser {
    pub(crate) fn new(commands: mpsc::Sender<Command>) -> Self {
        Self {
            commands,
            closed: false,
        }
    }
}

#[async_trait::async_trait]
impl super::CloseWriter for QueueCloser {
    async fn close(mut self: Box<Self>, this_stop: LastStop) {
        self.closed = true;
        let (done, finished) = oneshot::channel();
        let close = Command::Close { done, this_stop };
        if self.commands.send(close).await.is_ok() {
            // An error here means the writer is already gone, which is what we wanted.
            let _ = finished.await;
        }
    }
}

impl Drop for QueueCloser {
    fn drop(&mut self) {
        if !self.closed {
            let (done, _) = oneshot::channel();
            let this_stop = LastStop::Unclean;
            let _ = self.commands.try_send(Command::Close { done, this_stop });
        }
    }
}

/// A cheap, cloneable handle to a backend's writer.
#[derive(Debug, Clone)]
pub(crate) struct QueuedStore {
    commands: mpsc::Sender<Command>,
}

impl QueuedStore {
    /// A handle whose commands go to `commands`, and the receiving end for the writer.
    pub(crate) fn new() -> (Self, mpsc::Sender<Command>, mpsc::Receiver<Command>) {
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        (
            Self {
                commands: commands.clone(),
            },
            commands,
            receiver,
        )
    }

    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

#[async_trait::async_trait]
impl Store for QueuedStore {
    #[tracing::instrument(skip(self), level = "debug")]
    async fn load(&self, resource: &ResourceKey) -> Result<Durable, StoreError> {
        let resource = resource.clone();
        self.call(|reply| Command::Load { resource, reply }).await
    }

    #[tracing::instrument(skip(self), level = "debug")]
    async fn advance(
        &self,
        resource: &ResourceKey,
        token: FencingToken,
        via: Via,
    ) -> Result<Advance, StoreError> {
        let resource = resource.clone();
        self.call(|reply| {
            Command::Write(Write::Advance {
                resource,
                token,
                via,
                reply,
            })
        })
        .await
    }

    #[tracing::instrument(skip(self), level = "debug")]
    async fn reset(
        &self,
        resource: &ResourceKey,
        token: FencingToken,
        reason: String,
    ) -> Result<Reset, StoreError> {
        let resource = resource.clone();
        self.call(|reply| {
            Command::Write(Write::Reset {
                resource,
                token,
                reason,
                reply,
            })
        })
        .await
    }

    #[tracing::instrument(skip(self), level = "debug")]
    async fn advance_all(
        &self,
        resources: Vec<ResourceKey>,
        token: FencingToken,
        via: Via,
    ) -> Result<AllAdvanced, StoreError> {
        self.call(|reply| {
            Command::Write(Write::AdvanceAll {
                resources,
                token,
                via,
                reply,
            })
        })
        .await
    }

    async fn prune(&self, plan: PrunePlan, batch: usize) -> Result<usize, StoreError> {
        self.call(|reply| Command::Prune { plan, batch, reply })
            .await
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn record_rejection(&self, rejection: Rejection) -> Result<(), StoreError> {
        let rejection = Box::new(rejection);
        self.call(|reply| Command::Write(Write::Reject { rejection, reply }))
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call(|reply| Command::Ping { reply }).await
    }
}
