//! Dialing the configured upstream of a route. The server never dials anything else.
//!
//! An upstream is `host:port`, or `unix:PATH` for a service on the same host: a Unix socket
//! spares the server ambassador the TCP handshake and teardown of every connection. Its
//! endpoints come from a [`Source`] (the address as written, or a name looked up every
//! [`RESOLVE_EVERY`](crate::endpoints::RESOLVE_EVERY)); a [`Balancer`] orders each dial's
//! attempts after Happy Eyeballs, and a [`Connector`] makes them.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use amb_proto::Refusal;
use amb_spec::UpstreamSpec;

use crate::endpoints::{
    upstream_source, Balancer, Connector, DialProgress, Resolver, Source, UpstreamStream,
};

/// A route's upstream, built from its spec; clones share its endpoints.
#[derive(Clone)]
pub struct Upstream(Arc<Inner>);

struct Inner {
    spec: UpstreamSpec,
    balancer: Balancer,
    connector: Connector,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.spec.fmt(f)
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Upstream")
            .field(&self.0.spec.to_string())
            .finish()
    }
}

/// A failed upstream dial: the refusal to answer with, and the detail to log.
#[derive(Debug)]
pub struct DialFailure {
    /// The reason metrics and the access log give, when not the refusal's own: the upstream
    /// refused the credentials the route sends (`upstream_auth`), or its TLS handshake failed
    /// (`upstream_tls`).
    pub reason: Option<&'static str>,
    /// What the client is told.
    pub refusal: Refusal,
    /// What is logged.
    pub detail: String,
}

impl DialFailure {
    /// Its reason, as metrics and the access log name it.
    pub fn reason(&self) -> &'static str {
        self.reason.unwrap_or(self.refusal.name())
    }
}

impl Upstream {
    /// The upstream `spec` describes; a name is looked up (by `resolver`) on the first dial.
    pub fn new(spec: &UpstreamSpec, resolver: &Resolver) -> Self {
        Upstream::with_source(spec.clone(), upstream_source(spec, resolver))
    }

    /// What it was built from.
    pub fn spec(&self) -> &UpstreamSpec {
        &self.0.spec
    }

    fn with_source(spec: UpstreamSpec, source: Arc<Source>) -> Self {
        Upstream(Arc::new(Inner {
            spec,
            balancer: Balancer::new(source),
            connector: Connector,
        }))
    }

    /// Connects, trying each endpoint in turn, all within `timeout`.
    pub async fn dial(&self, timeout: Duration) -> Result<UpstreamStream, DialFailure> {
        let Inner {
            spec,
            balancer,
            connector,
        } = &*self.0;
        let progress = DialProgress::default();
        let dial = balancer.dial(None, &progress.waiting_for_source, |endpoint| {
            let progress = &progress;
            async move { connector.connect(&endpoint, progress).await }
        });
        match tokio::time::timeout(timeout, dial).await {
            Ok(Ok(won)) => Ok(won.value),
            Ok(Err(e)) => Err(DialFailure {
                reason: None,
                refusal: Refusal::UpstreamRefused,
                detail: e.to_string(),
            }),
            Err(_) => Err(DialFailure {
                reason: None,
                refusal: Refusal::UpstreamTimeout,
                detail: if progress.waiting_for_source.load(Ordering::Relaxed) {
                    format!(
                        "looking up {spec} took longer than {timeout:?}: check the resolver, or give an IP address"
                    )
                } else if progress.queue_full.load(Ordering::Relaxed) {
                    format!(
                        "{spec} kept its listen queue full for {timeout:?}: the service is not accepting connections as fast as they come"
                    )
                } else {
                    format!(
                        "no answer from {spec} within {timeout:?}: is it listening, and reachable from here?"
                    )
                },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::{Endpoint, Periods, Role, RELOOKUP_AFTER_FAILURE, RESOLVE_EVERY};
    use futures_util::future::join_all;
    use std::io;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::{TcpListener, TcpSocket, TcpStream};

    const HOUR: Duration = Duration::from_secs(3600);

    /// What the test's stand-in for DNS answers.
    #[derive(Clone)]
    enum Answer {
        Addrs(Vec<SocketAddr>),
        Fail(&'static str),
        Hang,
    }

    /// A stand-in for DNS whose answer the test sets, counting lookups; the dials are real.
    #[derive(Clone)]
    struct Zone {
        answer: Arc<std::sync::Mutex<Answer>>,
        lookups: Arc<AtomicUsize>,
    }

    impl Zone {
        fn new(answer: Answer) -> Self {
            Zone {
                answer: Arc::new(std::sync::Mutex::new(answer)),
                lookups: Arc::default(),
            }
        }

        fn answer(&self, answer: Answer) {
            *self.answer.lock().unwrap() = answer;
        }

        fn lookups(&self) -> usize {
            self.lookups.load(Ordering::SeqCst)
        }

        /// An upstream whose source is this zone, over real sockets.
        fn resolver(&self, good_for: Duration, failure: Duration, limit: Duration) -> Upstream {
            let zone = self.clone();
            let periods = Periods {
                good_for,
                failure,
                lookup_limit: limit,
            };
            let source = Source::looked_up("svc.test:1", Role::Upstream, periods, move || {
                zone.lookups.fetch_add(1, Ordering::SeqCst);
                let answer = zone.answer.lock().unwrap().clone();
                Box::pin(async move {
                    match answer {
                        Answer::Addrs(addrs) => Ok(addrs.into_iter().map(Endpoint::Tcp).collect()),
                        Answer::Fail(e) => Err(io::Error::other(e)),
                        Answer::Hang => std::future::pending().await,
                    }
                })
            });
            Upstream::with_source("svc.test:1".parse().unwrap(), source)
        }
    }

    async fn dial(upstream: &Upstream) -> Result<TcpStream, DialFailure> {
        match upstream.dial(HOUR).await? {
            UpstreamStream::Tcp(tcp) => Ok(tcp),
            other => panic!("a TCP dial: {other:?}"),
        }
    }

    async fn listener() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    #[tokio::test]
    async fn concurrent_dials_share_one_lookup() {
        let (_l, addr) = listener().await;
        let zone = Zone::new(Answer::Addrs(vec![addr]));
        let resolver = zone.resolver(RESOLVE_EVERY, RELOOKUP_AFTER_FAILURE, HOUR);
        for dialed in join_all((0..20).map(|_| dial(&resolver))).await {
            assert_eq!(dialed.unwrap().peer_addr().unwrap(), addr);
        }
        dial(&resolver).await.unwrap();
        assert_eq!(zone.lookups(), 1);
    }

    #[tokio::test]
    async fn a_source_that_moves_under_the_balancer_is_looked_up_again_when_none_answer() {
        let (old, old_addr) = listener().await;
        let (_new, new_addr) = listener().await;
        let zone = Zone::new(Answer::Addrs(vec![old_addr]));
        let resolver = zone.resolver(HOUR, Duration::ZERO, HOUR);
        dial(&resolver).await.unwrap();

        drop(old);
        zone.answer(Answer::Addrs(vec![new_addr]));
        for dialed in join_all((0..10).map(|_| dial(&resolver))).await {
            assert_eq!(dialed.unwrap().peer_addr().unwrap(), new_addr);
        }
        assert_eq!(zone.lookups(), 2, "the ten failed dials shared one lookup");
        dial(&resolver).await.unwrap();
        assert_eq!(zone.lookups(), 2, "the new answer is kept");
    }

    #[tokio::test]
    async fn a_name_looked_up_for_the_dial_is_not_looked_up_again_when_it_fails() {
        let (l, addr) = listener().await;
        drop(l);
        let zone = Zone::new(Answer::Addrs(vec![addr]));
        let resolver = zone.resolver(HOUR, Duration::ZERO, HOUR);
        let failure = dial(&resolver).await.unwrap_err();
        assert_eq!(failure.refusal, Refusal::UpstreamRefused);
        assert!(
            failure.detail.starts_with(&format!("{addr}: ")),
            "{}",
            failure.detail
        );
        assert_eq!(zone.lookups(), 1);
    }

    #[tokio::test]
    async fn a_dead_upstream_is_not_looked_up_on_every_dial() {
        let (l, addr) = listener().await;
        drop(l);
        let zone = Zone::new(Answer::Addrs(vec![addr]));
        let resolver = zone.resolver(HOUR, HOUR, HOUR);
        for _ in 0..4 {
            dial(&resolver).await.unwrap_err();
        }
        assert_eq!(zone.lookups(), 1, "not again within the failure period");
    }

    #[tokio::test]
    async fn a_failed_lookup_is_one_lookup_for_a_burst_of_dials() {
        let zone = Zone::new(Answer::Fail("no such host"));
        let resolver = zone.resolver(HOUR, HOUR, HOUR);
        for dialed in join_all((0..20).map(|_| dial(&resolver))).await {
            let failure = dialed.unwrap_err();
            assert_eq!(failure.detail, "resolving svc.test:1: no such host");
        }
        assert_eq!(zone.lookups(), 1);
    }

    #[tokio::test]
    async fn a_stale_answer_is_dialed_while_the_next_lookup_hangs() {
        let (_l, addr) = listener().await;
        let zone = Zone::new(Answer::Addrs(vec![addr]));
        // Every answer is stale at once, and a lookup may hang for an hour.
        let resolver = zone.resolver(Duration::ZERO, HOUR, HOUR);
        dial(&resolver).await.unwrap();
        zone.answer(Answer::Hang);
        for _ in 0..3 {
            assert_eq!(dial(&resolver).await.unwrap().peer_addr().unwrap(), addr);
        }
        assert_eq!(zone.lookups(), 2, "one lookup runs at a time");
    }

    #[tokio::test]
    async fn a_hung_lookup_fails_after_its_limit() {
        let zone = Zone::new(Answer::Hang);
        let resolver = zone.resolver(HOUR, HOUR, Duration::from_millis(50));
        for _ in 0..2 {
            let failure = dial(&resolver).await.unwrap_err();
            assert_eq!(
                failure.detail,
                "looking up svc.test:1 took longer than 50ms"
            );
        }
        assert_eq!(zone.lookups(), 1);
    }

    /// A listener that never completes a handshake: its accept queue of one is full, so the
    /// kernel drops further SYNs, as a host behind a dropping firewall does. Keep all three.
    async fn black_hole() -> (TcpListener, TcpStream, SocketAddr) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let hole = socket.listen(0).unwrap();
        let addr = hole.local_addr().unwrap();
        let queued = TcpStream::connect(addr).await.unwrap();
        (hole, queued, addr)
    }

    #[tokio::test]
    async fn an_address_that_drops_connections_does_not_hold_dials_up() {
        let (_hole, _queued, dead) = black_hole().await;
        let (_l, live) = listener().await;
        let zone = Zone::new(Answer::Addrs(vec![dead, live]));
        let resolver = zone.resolver(HOUR, HOUR, HOUR);
        // Every other dial tries the dead address first; without a bound the test would fail
        // only after the kernel gives up on it, minutes later.
        for _ in 0..4 {
            let dialed = tokio::time::timeout(Duration::from_secs(20), dial(&resolver)).await;
            let tcp = dialed.expect("the live address is tried beside the dead one");
            assert_eq!(tcp.unwrap().peer_addr().unwrap(), live);
        }
    }

    #[tokio::test]
    async fn a_real_name_is_dialed() {
        let (l, addr) = listener().await;
        let upstream = Upstream::new(
            &format!("localhost:{}", addr.port()).parse().unwrap(),
            &Resolver::system(),
        );
        let (dialed, accepted) = tokio::join!(upstream.dial(Duration::from_secs(5)), l.accept());
        let Ok(UpstreamStream::Tcp(tcp)) = dialed else {
            panic!("a TCP dial: {dialed:?}");
        };
        assert_eq!(tcp.local_addr().unwrap(), accepted.unwrap().1);
    }

    #[tokio::test]
    async fn a_unix_socket_is_dialed_and_a_missing_one_is_named() {
        let path = std::env::temp_dir().join(format!("amb-upstream-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let upstream = Upstream::new(
            &format!("unix:{}", path.display()).parse().unwrap(),
            &Resolver::system(),
        );
        assert_eq!(upstream.to_string(), format!("unix:{}", path.display()));

        let failure = upstream.dial(Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(failure.refusal, Refusal::UpstreamRefused);
        assert!(
            failure.detail.contains("listening on that socket"),
            "{}",
            failure.detail
        );

        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (dialed, accepted) =
            tokio::join!(upstream.dial(Duration::from_secs(5)), listener.accept());
        assert!(matches!(dialed, Ok(UpstreamStream::Unix(_))), "{dialed:?}");
        accepted.unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn a_full_listen_queue_is_waited_out_within_the_timeout() {
        use socket2::{Domain, SockAddr, Socket, Type};
        let path = std::env::temp_dir().join(format!("amb-queue-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let addr = SockAddr::unix(&path).unwrap();
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&addr).unwrap();
        listener.listen(0).unwrap();
        // Fill the queue: the next non-blocking connect fails at once.
        let mut queued = Vec::new();
        loop {
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
            socket.set_nonblocking(true).unwrap();
            match socket.connect(&addr) {
                Ok(()) => queued.push(socket),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the queue: {e}"),
            }
            assert!(queued.len() < 64, "the listen queue never filled");
        }
        let upstream = Upstream::new(
            &format!("unix:{}", path.display()).parse().unwrap(),
            &Resolver::system(),
        );

        let failure = upstream.dial(Duration::from_millis(300)).await.unwrap_err();
        assert_eq!(
            failure.refusal,
            Refusal::UpstreamTimeout,
            "{}",
            failure.detail
        );
        assert!(
            failure.detail.contains("listen queue full"),
            "{}",
            failure.detail
        );

        // Once the service takes a connection off the queue, a waiting dial gets through.
        let dial = tokio::spawn(async move { upstream.dial(Duration::from_secs(20)).await });
        let (_listener, taken) = tokio::task::spawn_blocking(move || {
            let taken = listener.accept();
            (listener, taken)
        })
        .await
        .unwrap();
        taken.unwrap();
        let dialed = dial.await.unwrap();
        assert!(matches!(dialed, Ok(UpstreamStream::Unix(_))), "{dialed:?}");
        std::fs::remove_file(&path).unwrap();
    }
}
