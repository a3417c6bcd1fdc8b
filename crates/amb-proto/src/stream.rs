//! The contract every transport stream fulfils, so the relay is written once for both.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{watch, Notify};

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

/// How a stream ended, as far as its tunnel connection's log line is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Ended on its own account: cleanly, refused, or reset by either end.
    Closed,
    /// Cut off because its tunnel connection was lost.
    ConnectionLost,
}

/// How long the owner of a lost tunnel connection waits for its streams to settle before it
/// logs the loss ([`StreamTally::cut_off_once_settled`]).
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Counts the streams of one tunnel connection, so that its loss is logged once, saying how many
/// streams it cut off, rather than once per stream.
#[derive(Debug, Default)]
pub struct StreamTally {
    running: AtomicUsize,
    lost: AtomicUsize,
    idle: Notify,
}

impl StreamEnd {
    /// How a stream that failed with `e` ended.
    pub fn of(e: &StreamError) -> Self {
        match e {
            StreamError::ConnectionLost(_) => StreamEnd::ConnectionLost,
            _ => StreamEnd::Closed,
        }
    }
}

impl StreamTally {
    /// Counts a stream as running until the returned guard drops; tell the guard how the
    /// stream ended with [`RunningStream::ended`]. (A guard, not a wrapping future: a future
    /// moved into another is stored twice, and these live as long as their connection.)
    pub fn start(&self) -> RunningStream<'_> {
        self.running.fetch_add(1, Ordering::Relaxed);
        RunningStream {
            tally: self,
            lost: false,
        }
    }

    /// Resolves once no stream runs. After a loss the cut-off streams end at once; callers
    /// bound the wait for one stuck elsewhere.
    pub async fn settled(&self) {
        loop {
            let idle = self.idle.notified();
            if self.running.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Streams the connection's loss ended, plus those still running.
    pub fn cut_off(&self) -> usize {
        self.lost.load(Ordering::Relaxed) + self.running.load(Ordering::Relaxed)
    }

    /// [`cut_off`](Self::cut_off) once the streams settled, or after a second: a stream still
    /// running then is stuck, and cut off too.
    pub async fn cut_off_once_settled(&self) -> usize {
        let _ = tokio::time::timeout(SETTLE_LIMIT, self.settled()).await;
        self.cut_off()
    }
}

/// One running stream of a [`StreamTally`].
#[derive(Debug)]
pub struct RunningStream<'a> {
    tally: &'a StreamTally,
    lost: bool,
}

impl RunningStream<'_> {
    /// The stream ended this way.
    pub fn ended(mut self, end: StreamEnd) {
        self.lost = end == StreamEnd::ConnectionLost;
    }
}

impl Drop for RunningStream<'_> {
    fn drop(&mut self) {
        if self.lost {
            self.tally.lost.fetch_add(1, Ordering::Relaxed);
        }
        if self.tally.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tally.idle.notify_waiters();
        }
    }
}

/// The sending half of a tunnel stream.
pub trait StreamSend: Send + 'static {
    /// Sends `data`, waiting for flow-control credit: this is where backpressure comes from.
    fn send(&mut self, data: Bytes) -> impl Future<Output = Result<(), StreamError>> + Send;
    /// Half-closes: the peer reads a clean end of stream after what was sent.
    fn finish(&mut self) -> Result<(), StreamError>;
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
    /// Opens a stream to `route`. Returns at once, without waiting for the server's answer, so
    /// the app's first bytes travel with the open.
    fn open(
        &self,
        route: &RouteName,
    ) -> impl Future<Output = Result<(Self::Send, Self::Recv), StreamError>> + Send;
    /// Resolves once the connection takes no new streams: it is gone, or the server is
    /// draining it (its live streams run on to their end).
    fn retired(&self) -> impl Future<Output = Retirement> + Send;
    /// Closes the connection, telling the server, so it need not wait for an idle timeout;
    /// first sends (within a bound) what finished streams left queued.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// Makes tunnel connections to one server.
pub trait Dialer: Send + Sync + 'static {
    /// The connection type.
    type Tunnel: Tunnel;
    /// The error a failed dial reports; its message names the peer.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Dials, handshakes and verifies the server.
    fn dial(&self) -> impl Future<Output = Result<Self::Tunnel, Self::Error>> + Send;
}

/// Why a server drains a tunnel connection: no new streams; those running finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainCause {
    /// The server is shutting down.
    Stopping,
    /// The CAs the server trusts changed since it verified the client, which must connect and
    /// be verified again.
    TrustChanged,
}

/// What drains a server's tunnel connection: the server stopping, or the trust generation
/// moving past the one the connection was verified under.
#[derive(Clone, Debug)]
pub struct DrainWatch {
    /// Turns true when the server stops.
    pub stop: watch::Receiver<bool>,
    /// The trust generation: it moves when the trusted CAs change.
    pub trust: watch::Receiver<u64>,
    /// The generation the connection was verified under.
    pub verified_under: u64,
}

impl DrainWatch {
    /// Resolves when the connection should drain, with why.
    pub async fn asked(&mut self) -> DrainCause {
        let verified_under = self.verified_under;
        tokio::select! {
            _ = self.stop.wait_for(|stopping| *stopping) => DrainCause::Stopping,
            Ok(_) = self.trust.wait_for(|generation| *generation != verified_under) => {
                DrainCause::TrustChanged
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn tally_counts_running_streams_and_those_the_loss_ended() {
        let tally = StreamTally::default();
        tally.start().ended(StreamEnd::Closed);
        assert_eq!(tally.cut_off(), 0, "a stream that ended on its own");
        tally.start().ended(StreamEnd::ConnectionLost);
        assert_eq!(tally.cut_off(), 1, "a stream the loss ended");
        assert!(poll_once(pin!(tally.settled())).is_ready(), "nothing runs");

        let running = tally.start();
        assert_eq!(tally.cut_off(), 2, "a running stream counts");
        let mut settled = pin!(tally.settled());
        assert!(poll_once(settled.as_mut()).is_pending(), "a stream runs");
        running.ended(StreamEnd::Closed);
        assert!(
            poll_once(settled.as_mut()).is_ready(),
            "the last stream ended"
        );
        assert_eq!(
            tally.cut_off(),
            1,
            "a running stream that then ends on its own"
        );

        drop(tally.start());
        assert_eq!(
            tally.cut_off(),
            1,
            "a stream dropped unfinished is not a loss"
        );
    }
}
