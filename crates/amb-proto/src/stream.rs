//! The contract every transport stream fulfils, so the relay is written once for both.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use crate::header::AppAddrs;
use crate::identity::Peer;
use crate::route::RouteName;
use crate::status::{Refusal, ResetCode};

/// Why a tunnel stream stopped other than by a clean end of stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The server refused to open the stream.
    #[error("refused by server: {0}")]
    Refused(Refusal),
    /// The peer reset the stream, or asked us to stop sending.
    #[error("reset by peer: {0}")]
    Reset(ResetCode),
    /// The tunnel connection carrying the stream is gone.
    #[error("tunnel connection lost: {0}")]
    ConnectionLost(String),
    /// The peer broke the protocol on this stream.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Why a tunnel connection takes no new streams.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Retirement {
    /// The connection is gone.
    #[error("tunnel connection lost: {0}")]
    Lost(String),
    /// The server is shutting down: it finishes the streams it carries and takes no new ones.
    #[error("the server is draining the tunnel connection")]
    Draining,
}

/// The sending half of a tunnel stream.
pub trait StreamSend: Send + 'static {
    /// Sends `data`, waiting for flow-control credit: this is where backpressure comes from.
    fn send(&mut self, data: Bytes) -> impl Future<Output = Result<(), StreamError>> + Send;
    /// Half-closes: the peer reads a clean end of stream after what was sent.
    fn finish(&mut self) -> impl Future<Output = Result<(), StreamError>> + Send;
    /// Aborts: the peer sees a reset carrying `code`; unsent bytes are dropped.
    fn reset(&mut self, code: ResetCode);
    /// After [`finish`](Self::finish): resolves once the peer has acknowledged everything sent
    /// (or the stream or connection is gone), so a shutdown never cuts off delivered data.
    fn delivered(&mut self) -> impl Future<Output = ()> + Send;
}

/// The receiving half of a tunnel stream.
pub trait StreamRecv: Send + 'static {
    /// The next chunk of bytes, or `Ok(None)` at the peer's clean end of stream.
    ///
    /// On a client stream the first call also surfaces the server's answer to the open:
    /// [`StreamError::Refused`] if it refused.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Bytes>, StreamError>> + Send;
    /// Waits for at least one chunk, then appends to `batch` every chunk already received, up
    /// to `max` in all, so the caller can hand them to one vectored write. `Ok(false)` at the
    /// peer's clean end of stream, with nothing appended.
    fn recv_batch(
        &mut self,
        batch: &mut Vec<Bytes>,
        max: usize,
    ) -> impl Future<Output = Result<bool, StreamError>> + Send {
        let _ = max;
        async move {
            match self.recv().await? {
                Some(chunk) => {
                    batch.push(chunk);
                    Ok(true)
                }
                None => Ok(false),
            }
        }
    }
    /// Tells the peer to stop sending: nothing more will be read.
    fn stop(&mut self, code: ResetCode);
}

/// A stream a server accepted from a verified peer, waiting for the engine's decision.
pub trait IncomingStream: Send + 'static {
    /// Sending half once accepted.
    type Send: StreamSend;
    /// Receiving half once accepted.
    type Recv: StreamRecv;
    /// The route the peer asked for.
    fn route(&self) -> &RouteName;
    /// The app's connection, as the peer told it (a client of before version 2 does not).
    fn app(&self) -> Option<AppAddrs>;
    /// Who opened the stream.
    fn peer(&self) -> &Arc<Peer>;
    /// Answers "open": the relay may start.
    fn accept(self) -> impl Future<Output = Result<(Self::Send, Self::Recv), StreamError>> + Send;
    /// Answers with a refusal; the client resets its app socket.
    fn refuse(self, why: Refusal) -> impl Future<Output = ()> + Send;
}

/// One warm tunnel connection, as the client sees it.
pub trait Tunnel: Send + Sync + 'static {
    /// Sending half of an opened stream.
    type Send: StreamSend;
    /// Receiving half of an opened stream; its first `recv` yields the server's answer.
    type Recv: StreamRecv;
    /// Opens a stream to `route` for the app connection `app`. Returns at once, without
    /// waiting for the server's answer, so the app's first bytes travel with the open.
    fn open(
        &self,
        route: &RouteName,
        app: AppAddrs,
    ) -> impl Future<Output = Result<(Self::Send, Self::Recv), StreamError>> + Send;
    /// Resolves once the connection takes no new streams: it is gone, or the server is
    /// draining it (its live streams run on to their end).
    fn retired(&self) -> impl Future<Output = Retirement> + Send;
    /// Closes the connection, telling the server, so it need not wait for an idle timeout;
    /// first sends (within a bound) what finished streams left queued.
    fn close(&self) -> impl Future<Output = ()> + Send;
    /// How many packets the connection has received so far. A stream opened after this count
    /// was taken, whose connection was then lost unanswered with the count unchanged, most
    /// likely reached no live server (one killed, or gone before the stream arrived) and is
    /// sent again elsewhere; a server that received it and then lost every packet back (a
    /// partition beginning in that round trip, or a kill between its upstream write and its
    /// first packet) makes it arrive twice. `None` (the default): the transport cannot tell,
    /// and a stream is never sent again.
    fn heard(&self) -> Option<u64> {
        None
    }
}

/// A tunnel connection this side dialed and serves: the peer (the app side of a reverse
/// tunnel) opens the streams.
pub trait Serving: Send + 'static {
    /// The connection, as the lifecycle drives it.
    type Connection: crate::ServerConnection;
    /// Runs `serve` over the connection to its end, then lets the close reach the peer.
    fn serve<F>(
        self,
        serve: impl FnOnce(Self::Connection) -> F + Send,
    ) -> impl Future<Output = ()> + Send
    where
        F: Future<Output = ()> + Send;
}

/// Makes tunnel connections to one peer, at the address the caller picked: transports never
/// resolve names. What it makes is a [`Tunnel`] (this side opens the streams) or a
/// [`Serving`] (the service side of a reverse tunnel).
pub trait Dialer: Send + Sync + 'static {
    /// The connection type.
    type Tunnel: Send + 'static;
    /// The error a failed dial reports; the caller names the peer and address.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Dials `addr`, handshakes and verifies the server.
    fn dial(
        &self,
        addr: std::net::SocketAddr,
    ) -> impl Future<Output = Result<Self::Tunnel, Self::Error>> + Send;
    /// The kind of handshake failure `error` is; `None` if no handshake took place (the
    /// address took no connection, say).
    fn handshake_failure(error: &Self::Error) -> Option<crate::HandshakeFailure>;
}
