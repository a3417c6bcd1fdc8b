//! The contract a transport's server connection fulfils, so the engine drives one connection
//! lifecycle for both: take the streams the peer opens, drain, close, and say how it ended.

use std::future::Future;
use std::sync::Arc;

use crate::identity::Peer;
use crate::stream::{IncomingStream, StreamError};

/// Why a server drains a tunnel connection: no new streams; those running finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainCause {
    /// The server is shutting down.
    Stopping,
    /// The CAs the server trusts changed since it verified the client, which must connect and
    /// be verified again.
    TrustChanged,
    /// A new configuration no longer admits the client.
    AccessRevoked,
    /// The service side of a reverse tunnel no longer dials this app side (its configuration
    /// dropped it).
    PeerRemoved,
}

impl DrainCause {
    /// Why, in a few words: the reason a closing connection carries.
    pub fn reason(self) -> &'static str {
        match self {
            DrainCause::Stopping => "server shutting down",
            DrainCause::TrustChanged => "trusted CAs changed",
            DrainCause::AccessRevoked => "access revoked",
            DrainCause::PeerRemoved => "app side no longer dialed",
        }
    }
}

/// Why the server closes a tunnel connection, streams and all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// The peer spent its refusal budget.
    TooManyRefusals,
    /// Still open `drain-timeout` after a drain the peer cannot be left to finish: the trusted
    /// CAs changed, or its access was revoked.
    DrainTimedOut(DrainCause),
    /// Drained: the peer had the notice and every stream it opened before is done.
    Drained(DrainCause),
}

/// How a tunnel connection ended, as its transport saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionEnd {
    /// What ended it, for the log.
    pub why: String,
    /// This side's protocol layer ended it because the peer broke the protocol or its limits.
    pub peer_broke_protocol: bool,
    /// This side closed it.
    pub closed_here: bool,
}

/// A stream whose open could not be read; the transport has answered it already.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenFailure {
    /// Why.
    pub error: StreamError,
    /// The peer's doing (a malformed open, a stream cancelled before its open): it counts
    /// against the peer's refusal budget.
    pub client_fault: bool,
}

/// A stream the peer opened whose open (the route it asks for) is not read yet.
pub trait OpeningStream: Send + 'static {
    /// The stream once its open is read.
    type Incoming: IncomingStream;
    /// Reads the open; the caller bounds the time.
    fn open(self) -> impl Future<Output = Result<Self::Incoming, OpenFailure>> + Send;
}

/// Closes a tunnel connection at once, streams and all, from any task.
pub type Closer = Arc<dyn Fn(Close) + Send + Sync>;

/// One authenticated tunnel connection on the server, as the engine's lifecycle drives it.
/// Only its loop calls these methods.
pub trait ServerConnection: Send + 'static {
    /// Streams as the peer opens them.
    type Opening: OpeningStream;
    /// The transport's name in logs.
    const TRANSPORT: &'static str;
    /// Who the peer is.
    fn peer(&self) -> &Arc<Peer>;
    /// The next stream the peer opens, or how the connection ended.
    fn next(&mut self) -> impl Future<Output = Result<Self::Opening, ConnectionEnd>> + Send;
    /// Tells the peer to open no new streams. `None` when the transport also refuses later
    /// streams and closes once the running ones end (HTTP/2's GOAWAY); otherwise a future that
    /// resolves once the peer has had the notice, after which the engine refuses new streams
    /// and closes with [`Close::Drained`] once the running ones are done.
    fn drain(&mut self, cause: DrainCause) -> Option<impl Future<Output = ()> + Send + 'static>;
    /// What closes the connection at once, streams and all, from any task: a peer past its
    /// refusal budget is cut off without waiting for the loop.
    fn closer(&self) -> Closer;
}
