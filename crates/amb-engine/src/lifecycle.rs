//! The server's tunnel connection lifecycle, written once for both transports. After the
//! handshake, one loop takes the streams the peer opens, each read and handled in a task of its
//! own; a drain (the server stopping, or the trusted CAs changing) stops new streams and, after
//! a CA change, closes the connection once `drain-timeout` has passed whatever the client does;
//! a peer past its refusal budget loses the connection; a new configuration is checked against
//! every running stream, and those it no longer admits are cut once `drain-timeout` has passed
//! (the whole connection drained, as for a CA change, when it no longer admits the peer at all);
//! and the connection's end is one line, counting the streams it cut off. Transports implement [`ServerConnection`]: handshakes,
//! stream framing and how a drain is announced (GOAWAY, the QUIC drain notice) stay theirs.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use amb_proto::{
    Close, Closer, DrainCause, IncomingStream, Limits, OpenFailure, OpeningStream, Peer,
    PeerIdentity, Refusal, RefusalBudget, RouteName, ServerConnection, StreamError,
};
use futures_util::future::{AbortHandle, Abortable};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::tally::{DrainWatch, StreamEnd, StreamTally};

/// Who may use which route under the running configuration: asked again of every running
/// stream when the configuration changes.
pub(crate) trait Admission: Send + Sync + 'static {
    /// Whether the configuration admits `peer` at all.
    fn admits_peer(&self, peer: &PeerIdentity) -> bool;
    /// Whether it admits `peer` to `route` (which it still has).
    fn admits(&self, peer: &PeerIdentity, route: &RouteName) -> bool;
}

/// The running streams of one connection, by the route each asked for, so a new configuration
/// can be checked against them.
#[derive(Default)]
struct LiveStreams {
    next_id: u64,
    by_id: HashMap<u64, LiveStream>,
}

struct LiveStream {
    route: RouteName,
    cut: AbortHandle,
    /// A cut is scheduled.
    doomed: bool,
}

/// What the streams of one tunnel connection share with its loop.
pub(crate) struct ConnCtx {
    peer: Arc<Peer>,
    transport: &'static str,
    streams: StreamTally,
    live: Mutex<LiveStreams>,
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
            live: Mutex::default(),
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

    fn live(&self) -> MutexGuard<'_, LiveStreams> {
        // The map stays consistent whatever panicked while holding it.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `stream` (a stream of `route`) until it ends, or until [`recheck`] cuts it: then
    /// `None`, and the stream is dropped where it stands (its relay resets both sides).
    async fn run_revocable<F: Future>(&self, route: RouteName, stream: F) -> Option<F::Output> {
        let (cut, registration) = AbortHandle::new_pair();
        let id = {
            let mut live = self.live();
            let id = live.next_id;
            live.next_id += 1;
            live.by_id.insert(
                id,
                LiveStream {
                    route,
                    cut,
                    doomed: false,
                },
            );
            id
        };
        let ended = Abortable::new(stream, registration).await.ok();
        self.live().by_id.remove(&id);
        ended
    }
}

/// Checks the running streams of a connection against a new configuration: those it no longer
/// admits are cut after `drain_timeout` unless a later configuration admits them again. One
/// line per route when that starts, one when it cuts.
fn recheck<A: Admission>(ctx: &Arc<ConnCtx>, admission: &Arc<A>, drain_timeout: Duration) {
    let identity = &ctx.peer.identity;
    let mut doomed: BTreeMap<RouteName, Vec<u64>> = BTreeMap::new();
    for (id, stream) in ctx.live().by_id.iter_mut() {
        if !stream.doomed && !admission.admits(identity, &stream.route) {
            stream.doomed = true;
            doomed.entry(stream.route.clone()).or_default().push(*id);
        }
    }
    for (route, ids) in doomed {
        info!(peer = %ctx.peer, transport = ctx.transport, %route, streams = ids.len(), drain = ?drain_timeout, "the new configuration no longer admits the peer to this route: its streams end within the drain timeout");
        tokio::spawn(cut_revoked(
            ctx.clone(),
            admission.clone(),
            route,
            ids,
            drain_timeout,
        ));
    }
}

/// Cuts the streams `ids` of `route` still running `after`, unless the configuration admits
/// the peer to the route again by then.
async fn cut_revoked<A: Admission>(
    ctx: Arc<ConnCtx>,
    admission: Arc<A>,
    route: RouteName,
    ids: Vec<u64>,
    after: Duration,
) {
    tokio::time::sleep(after).await;
    let readmitted = admission.admits(&ctx.peer.identity, &route);
    let mut cut = 0;
    for id in ids {
        if let Some(stream) = ctx.live().by_id.get_mut(&id) {
            stream.doomed = false;
            if !readmitted {
                stream.cut.abort();
                cut += 1;
            }
        }
    }
    if cut > 0 {
        warn!(peer = %ctx.peer, transport = ctx.transport, %route, streams = cut, "streams cut: no longer admitted {after:?} after the configuration changed");
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
pub(crate) async fn serve_connection<C, A, H, F>(
    mut conn: C,
    mut drain: DrainWatch,
    admission: Arc<A>,
    limits: Limits,
    handler: H,
) where
    C: ServerConnection,
    A: Admission,
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
    // Made once, not once per stream: each would register with (and leave) a channel every
    // connection shares.
    let mut reconfigured = Box::pin(next_change(drain.reconfigured.clone()));
    let mut asked = pin!(drain.asked());
    let end = loop {
        let next = tokio::select! {
            next = conn.next() => next,
            cause = &mut asked, if !draining => {
                draining = true;
                begin_drain(&mut conn, &ctx, cause, limits.drain_timeout);
                continue;
            }
            watch = &mut reconfigured => {
                reconfigured = Box::pin(next_change(watch));
                recheck(&ctx, &admission, limits.drain_timeout);
                if !draining && !admission.admits_peer(&peer.identity) {
                    draining = true;
                    begin_drain(&mut conn, &ctx, DrainCause::AccessRevoked, limits.drain_timeout);
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
                    let route = incoming.route().clone();
                    // Boxed, so the task holds the stream's future once rather than once
                    // per wrapper it passes through: it is most of an idle stream's memory.
                    let stream = Box::pin(handler(ctx.clone(), incoming));
                    // A stream cut after a reconfiguration is logged by the cut.
                    if let Some(end) = ctx.run_revocable(route, stream).await {
                        running.ended(end);
                    }
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

/// Resolves with `watch` at its next change (never, once its sender is gone).
async fn next_change(mut watch: watch::Receiver<u64>) -> watch::Receiver<u64> {
    if watch.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    watch
}

/// Tells the peer to open no new streams, and closes the connection once the running ones are
/// done; after a CA change or a revocation, also once `drain_timeout` has passed, whatever the
/// peer does.
fn begin_drain<C: ServerConnection>(
    conn: &mut C,
    ctx: &Arc<ConnCtx>,
    cause: DrainCause,
    drain_timeout: Duration,
) {
    let (peer, transport) = (&ctx.peer, ctx.transport);
    match cause {
        DrainCause::Stopping => {}
        DrainCause::TrustChanged => {
            info!(%peer, transport, "the trusted CAs changed: draining the connection, so that it is made and verified again");
        }
        DrainCause::PeerRemoved => {
            info!(%peer, transport, "the app side is no longer among the peers: draining the connection");
        }
        DrainCause::AccessRevoked => {
            info!(%peer, transport, "the new configuration no longer admits the peer: draining the connection");
        }
    }
    if cause != DrainCause::Stopping {
        tokio::spawn(cut_off_after(ctx.clone(), cause, drain_timeout));
    }
    if let Some(announced) = conn.drain(cause) {
        tokio::spawn(finish_drain(ctx.clone(), announced, cause));
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

/// Closes a connection drained by a change of the trusted CAs or a revocation if it is still
/// open `after`, streams and all: its client may ignore the drain, and was verified or
/// admitted under what no longer holds.
async fn cut_off_after(ctx: Arc<ConnCtx>, cause: DrainCause, after: Duration) {
    tokio::time::sleep(after).await;
    let what = match cause {
        DrainCause::TrustChanged => "the trusted CAs changed",
        DrainCause::PeerRemoved => "the app side was dropped from the peers",
        _ => "a new configuration revoked the peer's access",
    };
    ctx.close(
        Close::DrainTimedOut(cause),
        format_args!("still open {after:?} after {what}"),
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
        fn app(&self) -> Option<amb_proto::AppAddrs> {
            None
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

    /// A configuration the test changes: whether it admits the peer, and the routes it no
    /// longer admits the peer to.
    #[derive(Default)]
    struct FakeAdmission {
        peer_revoked: AtomicBool,
        routes_revoked: Mutex<Vec<RouteName>>,
    }

    impl Admission for FakeAdmission {
        fn admits_peer(&self, _: &PeerIdentity) -> bool {
            !self.peer_revoked.load(Ordering::Relaxed)
        }
        fn admits(&self, peer: &PeerIdentity, route: &RouteName) -> bool {
            self.admits_peer(peer) && !self.routes_revoked.lock().unwrap().contains(route)
        }
    }

    /// Records `cut ROUTE` if a stream's handler is dropped before it ends.
    struct CutWatch(Events, Option<RouteName>);

    impl Drop for CutWatch {
        fn drop(&mut self) {
            if let Some(route) = self.1.take() {
                self.0.lock().unwrap().push(format!("cut {route}"));
            }
        }
    }

    /// A connection served by the lifecycle, with what the test drives it by.
    struct Harness {
        opens: mpsc::UnboundedSender<FakeOpening>,
        events: Events,
        stop: watch::Sender<bool>,
        trust: watch::Sender<u64>,
        reconfigured: watch::Sender<u64>,
        admission: Arc<FakeAdmission>,
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
            let (reconfigured, reconfigured_rx) = watch::channel(0);
            let admission = Arc::new(FakeAdmission::default());
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
                reconfigured: reconfigured_rx,
                removed: None,
            };
            let handler = |_ctx: Arc<ConnCtx>, incoming: FakeIncoming| async move {
                let mut cut = CutWatch(incoming.events.clone(), Some(incoming.route.clone()));
                let _ = incoming.done.await;
                cut.1 = None;
                StreamEnd::Closed
            };
            let served = tokio::spawn(serve_connection(
                conn,
                drain,
                admission.clone(),
                limits,
                handler,
            ));
            Harness {
                opens,
                events,
                stop,
                trust,
                reconfigured,
                admission,
                served,
                peer,
            }
        }

        /// Opens a stream of the default route that runs until the returned sender is dropped.
        fn open(&self) -> oneshot::Sender<()> {
            self.open_route("default")
        }

        /// Opens a stream of `route` that runs until the returned sender is dropped.
        fn open_route(&self, route: &str) -> oneshot::Sender<()> {
            let (done_tx, done) = oneshot::channel();
            let incoming = FakeIncoming {
                route: route.parse().unwrap(),
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
        assert_eq!(h.events()[1..], ["close DrainTimedOut(TrustChanged)"]);
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

    #[tokio::test(start_paused = true)]
    async fn streams_a_new_configuration_no_longer_admits_are_cut_after_the_drain_timeout() {
        let limits = Limits::default();
        let h = Harness::start(limits);
        let _kept = h.open_route("kept");
        let _revoked = h.open_route("revoked");
        settle().await;
        h.admission
            .routes_revoked
            .lock()
            .unwrap()
            .push("revoked".parse().unwrap());
        h.reconfigured.send_modify(|g| *g += 1);
        settle().await;
        tokio::time::sleep(limits.drain_timeout - Duration::from_millis(1)).await;
        settle().await;
        assert!(h.events().is_empty(), "not before the drain timeout");
        tokio::time::sleep(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(
            h.events(),
            ["cut revoked"],
            "the other route's stream and the connection go on"
        );
        let late = h.open_route("kept");
        settle().await;
        drop(late);
        settle().await;
        assert_eq!(h.events().len(), 1, "the connection still takes streams");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_admitted_again_before_the_drain_timeout_goes_on() {
        let limits = Limits::default();
        let h = Harness::start(limits);
        let _running = h.open_route("flaky");
        settle().await;
        let revoked: RouteName = "flaky".parse().unwrap();
        h.admission.routes_revoked.lock().unwrap().push(revoked);
        h.reconfigured.send_modify(|g| *g += 1);
        settle().await;
        h.admission.routes_revoked.lock().unwrap().clear();
        h.reconfigured.send_modify(|g| *g += 1);
        tokio::time::sleep(limits.drain_timeout * 2).await;
        settle().await;
        assert!(h.events().is_empty(), "{:?}", h.events());
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_the_configuration_no_longer_admits_is_drained_then_cut_off() {
        let limits = Limits::default();
        let h = Harness::start(limits);
        let _running = h.open();
        settle().await;
        h.admission.peer_revoked.store(true, Ordering::Relaxed);
        h.reconfigured.send_modify(|g| *g += 1);
        settle().await;
        assert_eq!(h.events(), ["drain AccessRevoked"]);
        tokio::time::sleep(limits.drain_timeout).await;
        settle().await;
        let mut events = h.events()[1..].to_vec();
        events.sort();
        assert_eq!(
            events,
            ["close DrainTimedOut(AccessRevoked)", "cut default"],
            "the stream and the connection are cut at the drain timeout"
        );
        h.served.await.unwrap();
    }
}
