//! The server's tunnel connection lifecycle, written once for both transports. After the
//! handshake, one loop takes the streams the peer opens, each read and handled in a task of its
//! own; a drain (the server stopping, or the trusted CAs changing) stops new streams and, after
//! a CA change, closes the connection once `drain-timeout` has passed whatever the client does;
//! a peer past its refusal budget loses the connection; and the connection's end is one line,
//! counting the streams it cut off. Transports implement [`ServerConnection`]: handshakes,
//! stream framing and how a drain is announced (GOAWAY, the QUIC drain notice) stay theirs.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amb_proto::{
    Close, Closer, DrainCause, IncomingStream, Limits, OpenFailure, OpeningStream, Peer, Refusal,
    RefusalBudget, ServerConnection, StreamError,
};
use tracing::{debug, info, warn};

use crate::tally::{DrainWatch, StreamEnd, StreamTally};

/// What the streams of one tunnel connection share with its loop.
pub(crate) struct ConnCtx {
    peer: Arc<Peer>,
    transport: &'static str,
    streams: StreamTally,
    budget: RefusalBudget,
    /// Drained, and the peer has had the notice: new streams are refused.
    refusing: AtomicBool,
    /// Closing or closed: its streams' failures are no longer the peer's.
    closing: AtomicBool,
    /// This side closed it.
    closed_here: AtomicBool,
    closer: Closer,
}

impl ConnCtx {
    fn new(peer: Arc<Peer>, transport: &'static str, closer: Closer) -> Self {
        ConnCtx {
            peer,
            transport,
            streams: StreamTally::default(),
            budget: RefusalBudget::new(),
            refusing: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            closed_here: AtomicBool::new(false),
            closer,
        }
    }

    /// Spends one unit of the peer's [`RefusalBudget`]; a peer past it loses the connection
    /// (logged once, however many streams fail afterwards). Returns whether it stays.
    pub(crate) fn charge(&self, why: impl fmt::Display) -> bool {
        if self.closing.load(Ordering::Relaxed) {
            // Streams failing because the connection closes are not the peer's doing.
            return false;
        }
        if self.budget.spend() {
            return true;
        }
        self.close(
            Close::TooManyRefusals,
            format_args!("too many refused streams (last: {why})"),
        );
        false
    }

    /// Closes the connection, streams and all, with one warning saying why (none if it is
    /// closing already).
    fn close(&self, how: Close, why: fmt::Arguments<'_>) {
        if !self.closing.swap(true, Ordering::Relaxed) {
            warn!(peer = %self.peer, transport = self.transport, "closing tunnel connection: {why}");
            self.close_quietly(how);
        }
    }

    fn close_quietly(&self, how: Close) {
        self.closing.store(true, Ordering::Relaxed);
        if !self.closed_here.swap(true, Ordering::Relaxed) {
            (self.closer)(how);
        }
    }
}

/// Marks a connection as closing when its loop ends.
struct ClosingOnDrop(Arc<ConnCtx>);

impl Drop for ClosingOnDrop {
    fn drop(&mut self) {
        self.0.closing.store(true, Ordering::Relaxed);
    }
}

/// Serves one authenticated connection until it ends: each stream the peer opens is read
/// within `limits.open_timeout` and given to `handler` in a task of its own.
pub(crate) async fn serve_connection<C, H, F>(
    mut conn: C,
    mut drain: DrainWatch,
    limits: Limits,
    handler: H,
) where
    C: ServerConnection,
    H: Fn(Arc<ConnCtx>, <C::Opening as OpeningStream>::Incoming) -> F
        + Clone
        + Send
        + Sync
        + 'static,
    F: Future<Output = StreamEnd> + Send + 'static,
{
    let transport = C::TRANSPORT;
    let peer = conn.peer().clone();
    let ctx = Arc::new(ConnCtx::new(peer.clone(), transport, conn.closer()));
    // However the loop ends, streams still pending must not charge the budget.
    let _closing = ClosingOnDrop(ctx.clone());
    debug!(%peer, transport, "tunnel connection up");
    let mut draining = false;
    let end = loop {
        let next = tokio::select! {
            next = conn.next() => next,
            cause = drain.asked(), if !draining => {
                draining = true;
                if cause == DrainCause::TrustChanged {
                    info!(%peer, transport, "the trusted CAs changed: draining the connection, so the client connects and is verified again");
                    tokio::spawn(cut_off_after(ctx.clone(), limits.drain_timeout));
                }
                if let Some(announced) = conn.drain(cause) {
                    tokio::spawn(finish_drain(ctx.clone(), announced, cause));
                }
                continue;
            }
        };
        let opening = match next {
            Ok(opening) => opening,
            Err(end) => break end,
        };
        let (handler, ctx) = (handler.clone(), ctx.clone());
        tokio::spawn(async move {
            let peer = &ctx.peer;
            match tokio::time::timeout(limits.open_timeout, opening.open()).await {
                Ok(Ok(incoming)) if ctx.refusing.load(Ordering::Relaxed) => {
                    warn!(%peer, transport, route = %incoming.route(), "stream refused: {} (opened after the drain notice)", Refusal::Unavailable);
                    incoming.refuse(Refusal::Unavailable).await;
                }
                Ok(Ok(incoming)) => {
                    let running = ctx.streams.start();
                    running.ended(handler(ctx.clone(), incoming).await);
                }
                // The connection's end is logged once, not once per pending stream.
                Ok(Err(OpenFailure {
                    error: StreamError::ConnectionLost(e),
                    ..
                })) => {
                    debug!(%peer, transport, "stream dropped before its header: connection lost: {e}")
                }
                Ok(Err(OpenFailure {
                    error,
                    client_fault,
                })) => {
                    warn!(%peer, transport, "bad stream open: {error}");
                    if client_fault {
                        ctx.charge(error);
                    }
                }
                Err(_) => {
                    warn!(%peer, transport, "stream open not received within {:?}", limits.open_timeout)
                }
            }
        });
    };
    let closed = ctx.closed_here.load(Ordering::Relaxed);
    if end.peer_broke_protocol && !closed {
        return warn!(%peer, transport, "closing tunnel connection: {}", end.why);
    }
    // One line for the connection, however many streams it cut off.
    match ctx.streams.cut_off_once_settled().await {
        cut_off if cut_off > 0 && !closed && !end.closed_here => {
            warn!(%peer, transport, streams_cut_off = cut_off, "tunnel connection lost: {}", end.why)
        }
        _ => debug!(%peer, transport, "tunnel connection ended: {}", end.why),
    }
}

/// After the peer had the drain notice: refuses new streams, and closes once those it opened
/// before are done.
async fn finish_drain(ctx: Arc<ConnCtx>, announced: impl Future<Output = ()>, cause: DrainCause) {
    announced.await;
    ctx.refusing.store(true, Ordering::Relaxed);
    ctx.streams.settled().await;
    ctx.close_quietly(Close::Drained(cause));
}

/// Closes a connection drained by a change of the trusted CAs if it is still open `after`,
/// streams and all: its client may ignore the drain, and was verified under the old CAs.
async fn cut_off_after(ctx: Arc<ConnCtx>, after: Duration) {
    tokio::time::sleep(after).await;
    ctx.close(
        Close::TrustChanged,
        format_args!("still open {after:?} after the trusted CAs changed"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use amb_proto::{ConnectionEnd, PeerIdentity, RouteName};
    use std::sync::Mutex;
    use tokio::sync::{mpsc, oneshot, watch};

    /// What the fake transport was told, in order.
    type Events = Arc<Mutex<Vec<String>>>;

    /// A transport whose streams the test opens, recording drains, closes and refusals.
    struct FakeConn {
        peer: Arc<Peer>,
        opens: mpsc::UnboundedReceiver<FakeOpening>,
        events: Events,
        closed: Arc<tokio::sync::Notify>,
    }

    struct FakeOpening(Result<FakeIncoming, OpenFailure>);

    /// A stream that runs, in the test's handler, until its `done` sender is dropped.
    struct FakeIncoming {
        route: RouteName,
        peer: Arc<Peer>,
        events: Events,
        done: oneshot::Receiver<()>,
    }

    impl ServerConnection for FakeConn {
        type Opening = FakeOpening;
        const TRANSPORT: &'static str = "fake";

        fn peer(&self) -> &Arc<Peer> {
            &self.peer
        }

        async fn next(&mut self) -> Result<FakeOpening, ConnectionEnd> {
            tokio::select! {
                Some(opening) = self.opens.recv() => return Ok(opening),
                () = self.closed.notified() => {}
            }
            Err(ConnectionEnd {
                why: "closed".into(),
                peer_broke_protocol: false,
                closed_here: true,
            })
        }

        fn drain(
            &mut self,
            cause: DrainCause,
        ) -> Option<impl Future<Output = ()> + Send + 'static> {
            self.events.lock().unwrap().push(format!("drain {cause:?}"));
            Some(std::future::ready(()))
        }

        fn closer(&self) -> Closer {
            let (events, closed) = (self.events.clone(), self.closed.clone());
            Arc::new(move |why| {
                events.lock().unwrap().push(format!("close {why:?}"));
                closed.notify_one();
            })
        }
    }

    impl OpeningStream for FakeOpening {
        type Incoming = FakeIncoming;
        async fn open(self) -> Result<FakeIncoming, OpenFailure> {
            self.0
        }
    }

    impl IncomingStream for FakeIncoming {
        type Send = amb_quic::QuicSend;
        type Recv = amb_quic::QuicRecv;
        fn route(&self) -> &RouteName {
            &self.route
        }
        fn peer(&self) -> &Arc<Peer> {
            &self.peer
        }
        async fn accept(self) -> Result<(Self::Send, Self::Recv), StreamError> {
            Err(StreamError::Protocol("the fake never accepts".into()))
        }
        async fn refuse(self, why: Refusal) {
            self.events.lock().unwrap().push(format!("refuse {why:?}"));
        }
    }

    /// A connection served by the lifecycle, with what the test drives it by.
    struct Harness {
        opens: mpsc::UnboundedSender<FakeOpening>,
        events: Events,
        stop: watch::Sender<bool>,
        trust: watch::Sender<u64>,
        served: tokio::task::JoinHandle<()>,
        peer: Arc<Peer>,
    }

    impl Harness {
        fn start(limits: Limits) -> Self {
            let peer = Arc::new(Peer {
                identity: PeerIdentity::default(),
                addr: "127.0.0.1:1".parse().unwrap(),
            });
            let events = Events::default();
            let (opens, rx) = mpsc::unbounded_channel();
            let (stop, stop_rx) = watch::channel(false);
            let (trust, trust_rx) = watch::channel(0);
            let conn = FakeConn {
                peer: peer.clone(),
                opens: rx,
                events: events.clone(),
                closed: Arc::default(),
            };
            let drain = DrainWatch {
                stop: stop_rx,
                trust: trust_rx,
                verified_under: 0,
            };
            let handler = |_ctx: Arc<ConnCtx>, incoming: FakeIncoming| async move {
                let _ = incoming.done.await;
                StreamEnd::Closed
            };
            let served = tokio::spawn(serve_connection(conn, drain, limits, handler));
            Harness {
                opens,
                events,
                stop,
                trust,
                served,
                peer,
            }
        }

        /// Opens a stream that runs until the returned sender is dropped.
        fn open(&self) -> oneshot::Sender<()> {
            let (done_tx, done) = oneshot::channel();
            let incoming = FakeIncoming {
                route: RouteName::default_route(),
                peer: self.peer.clone(),
                events: self.events.clone(),
                done,
            };
            self.opens.send(FakeOpening(Ok(incoming))).unwrap();
            done_tx
        }

        fn events(&self) -> Vec<String> {
            self.events.lock().unwrap().clone()
        }
    }

    /// Lets every task run as far as it can.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_refuses_later_streams_and_closes_once_the_running_ones_end() {
        let h = Harness::start(Limits::default());
        let running = h.open();
        settle().await;
        h.stop.send_replace(true);
        settle().await;
        let late = h.open();
        settle().await;
        assert_eq!(
            h.events(),
            ["drain Stopping", "refuse Unavailable"],
            "a stream opened after the notice is refused; the running one goes on"
        );
        drop(running);
        settle().await;
        assert_eq!(h.events()[2..], ["close Drained(Stopping)"]);
        h.served.await.unwrap();
        drop(late);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_drained_by_a_ca_change_is_cut_off_after_the_drain_timeout() {
        let limits = Limits::default();
        let h = Harness::start(limits);
        let _running = h.open();
        settle().await;
        h.trust.send_replace(1);
        settle().await;
        assert_eq!(h.events(), ["drain TrustChanged"]);
        tokio::time::sleep(limits.drain_timeout - Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(h.events().len(), 1, "not before the drain timeout");
        tokio::time::sleep(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(h.events()[1..], ["close TrustChanged"]);
        h.served.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_past_its_refusal_budget_loses_the_connection() {
        let h = Harness::start(Limits::default());
        let bad = || OpenFailure {
            error: StreamError::Protocol("bad header".into()),
            client_fault: true,
        };
        for _ in 0..RefusalBudget::BURST {
            h.opens.send(FakeOpening(Err(bad()))).unwrap();
        }
        settle().await;
        assert!(h.events().is_empty(), "within the budget");
        h.opens.send(FakeOpening(Err(bad()))).unwrap();
        settle().await;
        assert_eq!(h.events(), ["close TooManyRefusals"]);
        h.served.await.unwrap();
    }
}
