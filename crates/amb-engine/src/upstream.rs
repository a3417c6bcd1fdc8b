//! Dialing the configured upstream of a route. The server never dials anything else.
//!
//! An upstream is `host:port`, or `unix:PATH` for a service on the same host: a Unix socket
//! spares the server ambassador the TCP handshake and teardown of every connection.
//!
//! An IP address is dialed as written. A name is looked up once per [`RESOLVE_EVERY`], and
//! again when none of its addresses answer (at most once per [`RELOOKUP_AFTER_FAILURE`]), so
//! DNS changes are followed without a lookup on every connection: a `getaddrinfo` on a
//! blocking thread, often a DNS query per search domain. Lookups run in their own task while
//! dials go on with the addresses they have; a failed or hung lookup keeps the last good ones.
//! A dial tries a name's addresses after Happy Eyeballs ([`amb_proto::dial`]): one that does
//! not answer within [`ATTEMPT_DELAY`] has the next tried beside it.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amb_proto::dial::{dial_order, race, ATTEMPT_DELAY};
use amb_proto::Refusal;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// How long a name's addresses are dialed before the name is looked up again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(5);

/// The least time between two lookups of a name after a failure: a failed lookup, or
/// addresses none of which answered. A dead upstream or resolver is not asked once per dial.
pub const RELOOKUP_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// A lookup taking longer than this counts as failed (the addresses from before stay in use).
pub const LOOKUP_LIMIT: Duration = Duration::from_secs(5);

/// A route's upstream: `host:port`, or `unix:PATH`.
#[derive(Clone)]
pub struct Upstream(Arc<Target>);

struct Target {
    /// As configured, for logs and messages.
    text: String,
    host: Host,
}

enum Host {
    /// Dialed as written.
    Addr(SocketAddr),
    /// Looked up, with the last lookup kept.
    Name(Arc<Resolver>),
    /// A Unix socket on this host.
    Unix(PathBuf),
}

/// A connected upstream.
#[derive(Debug)]
pub enum UpstreamStream {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
}

/// Why an upstream address is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upstream {0:?} is not HOST:PORT, or unix:PATH with an absolute PATH of at most 107 bytes (e.g. redis:6379, 10.0.0.5:5432 or unix:/run/redis/redis.sock)")]
pub struct UpstreamParseError(String);

impl std::str::FromStr for Upstream {
    type Err = UpstreamParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UpstreamParseError(s.to_owned());
        if let Some(path) = s.strip_prefix("unix:") {
            // Absolute, so a dial does not depend on the working directory; and short enough
            // for a socket address (no NUL, at most 107 bytes), so it fails here, not per dial.
            let fits = std::os::unix::net::SocketAddr::from_pathname(path).is_ok();
            if !path.starts_with('/') || !fits {
                return Err(bad());
            }
            return Ok(Upstream(Arc::new(Target {
                text: s.to_owned(),
                host: Host::Unix(path.into()),
            })));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(bad());
        }
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad()),
        };
        let host = match host.parse() {
            Ok(ip) => Host::Addr(SocketAddr::new(ip, port)),
            Err(_) => Host::Name(Resolver::system(s)),
        };
        Ok(Upstream(Arc::new(Target {
            text: s.to_owned(),
            host,
        })))
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.text)
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Upstream").field(&self.0.text).finish()
    }
}

impl PartialEq for Upstream {
    fn eq(&self, other: &Self) -> bool {
        self.0.text == other.0.text
    }
}

impl Eq for Upstream {}

/// A failed upstream dial: the refusal to answer with, and the detail to log.
#[derive(Debug)]
pub struct DialFailure {
    /// What the client is told.
    pub refusal: Refusal,
    /// What is logged.
    pub detail: String,
}

impl DialFailure {
    fn refused(detail: String) -> Self {
        DialFailure {
            refusal: Refusal::UpstreamRefused,
            detail,
        }
    }
}

impl Upstream {
    /// Connects, trying each address in turn, all within `timeout`.
    pub async fn dial(&self, timeout: Duration) -> Result<UpstreamStream, DialFailure> {
        let target = &*self.0;
        // Whether the dial was waiting for a lookup when time ran out, for the message.
        let waiting_for_lookup = AtomicBool::new(false);
        // Whether a Unix socket's listen queue was full at the last try, for the message.
        let queue_full = AtomicBool::new(false);
        let attempt = async {
            match &target.host {
                Host::Addr(addr) => connect_any([*addr])
                    .await
                    .map(UpstreamStream::Tcp)
                    .map_err(DialFailure::refused),
                Host::Name(resolver) => resolver
                    .connect(&waiting_for_lookup)
                    .await
                    .map(UpstreamStream::Tcp),
                Host::Unix(path) => connect_unix(path, &queue_full)
                    .await
                    .map(UpstreamStream::Unix)
                    .map_err(DialFailure::refused),
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(dialed) => dialed,
            Err(_) => Err(DialFailure {
                refusal: Refusal::UpstreamTimeout,
                detail: if waiting_for_lookup.load(Ordering::Relaxed) {
                    format!(
                        "looking up {} took longer than {timeout:?}: check the resolver, or give an IP address",
                        target.text
                    )
                } else if queue_full.load(Ordering::Relaxed) {
                    format!(
                        "{} kept its listen queue full for {timeout:?}: the service is not accepting connections as fast as they come",
                        target.text
                    )
                } else {
                    format!(
                        "no answer from {} within {timeout:?}: is it listening, and reachable from here?",
                        target.text
                    )
                },
            }),
        }
    }
}

/// Connects to the first of `addrs` to answer, trying the next address beside a slow one after
/// [`ATTEMPT_DELAY`]; the error names every address tried.
async fn connect_any(addrs: impl IntoIterator<Item = SocketAddr>) -> Result<TcpStream, String> {
    // The dial's own timeout bounds it, and says which step ran out.
    let tcp = race(addrs, ATTEMPT_DELAY, None, TcpStream::connect)
        .await
        .map_err(|failures| failures.to_string())?
        .value;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Longest pause between two tries of a Unix socket whose listen queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(50);

/// Connects to a Unix socket. Its listen queue being full fails a non-blocking connect at once,
/// where a TCP SYN would be retried, so that is tried again (pausing 1 ms, doubling up to
/// [`QUEUE_FULL_PAUSE`]) until the dial's own timeout.
async fn connect_unix(path: &Path, queue_full: &AtomicBool) -> Result<UnixStream, String> {
    let mut pause = Duration::from_millis(1);
    loop {
        match UnixStream::connect(path).await {
            Ok(unix) => return Ok(unix),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                queue_full.store(true, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(QUEUE_FULL_PAUSE);
            }
            Err(e) => {
                return Err(format!(
                    "{e}: is the service listening on that socket, and may amb open it?"
                ))
            }
        }
    }
}

/// Whether two answers hold the same addresses, in whatever order.
fn same_addresses(a: &[SocketAddr], b: &[SocketAddr]) -> bool {
    let sorted = |x: &[SocketAddr]| {
        let mut v = x.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    sorted(a) == sorted(b)
}

type LookupFuture = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

/// A name's last lookup, shared by every dial of the route. Lookups run in their own task,
/// one at a time, so a dial given up by its timeout never leaves the name unlooked-up.
struct Resolver {
    name: String,
    lookup: Box<dyn Fn() -> LookupFuture + Send + Sync>,
    periods: Periods,
    last: watch::Sender<Option<Lookup>>,
    /// Whether a lookup task is running.
    lookup_running: AtomicBool,
    turn: AtomicUsize,
}

/// How long lookups are trusted.
#[derive(Clone, Copy, Debug)]
struct Periods {
    /// A good answer is used this long.
    good_for: Duration,
    /// After a failure, the name is not looked up again for this long.
    failure: Duration,
    /// A lookup taking longer than this counts as failed.
    lookup_limit: Duration,
}

const PERIODS: Periods = Periods {
    good_for: RESOLVE_EVERY,
    failure: RELOOKUP_AFTER_FAILURE,
    lookup_limit: LOOKUP_LIMIT,
};

/// The outcome of one lookup.
#[derive(Clone, Debug, PartialEq)]
struct Lookup {
    answer: Result<Arc<[SocketAddr]>, String>,
    at: Instant,
}

/// Addresses to dial, and when they were looked up.
struct Resolved {
    addrs: Arc<[SocketAddr]>,
    at: Instant,
}

impl Lookup {
    /// Whether a dial that started at `now` may use this lookup as it is: one made since, or
    /// one recent enough.
    fn is_fresh(&self, now: Instant, periods: Periods) -> bool {
        let valid_for = match self.answer {
            Ok(_) => periods.good_for,
            Err(_) => periods.failure,
        };
        self.at >= now || now.duration_since(self.at) < valid_for
    }

    /// What a lookup at `now` leaves: its answer, or after a failure the addresses of an
    /// earlier good answer (a resolver outage should not take the route down with it).
    fn after(
        previous: Option<&Lookup>,
        answer: Result<Arc<[SocketAddr]>, String>,
        now: Instant,
    ) -> Lookup {
        let answer = match (answer, previous.map(|p| &p.answer)) {
            (Err(_), Some(Ok(earlier))) => Ok(earlier.clone()),
            (answer, _) => answer,
        };
        Lookup { answer, at: now }
    }

    fn resolved(&self) -> Result<Resolved, DialFailure> {
        match &self.answer {
            Ok(addrs) => Ok(Resolved {
                addrs: addrs.clone(),
                at: self.at,
            }),
            Err(e) => Err(DialFailure::refused(e.clone())),
        }
    }
}

impl Resolver {
    /// Looks `name` (`host:port`) up through the system resolver.
    fn system(name: &str) -> Arc<Self> {
        let owned = name.to_owned();
        let lookup = move || -> LookupFuture {
            let name = owned.clone();
            Box::pin(async move { Ok(tokio::net::lookup_host(name).await?.collect()) })
        };
        Resolver::new(name, PERIODS, lookup)
    }

    fn new(
        name: &str,
        periods: Periods,
        lookup: impl Fn() -> LookupFuture + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Resolver {
            name: name.to_owned(),
            lookup: Box::new(lookup),
            periods,
            last: watch::Sender::new(None),
            lookup_running: AtomicBool::new(false),
            turn: AtomicUsize::new(0),
        })
    }

    /// Connects to the name's addresses; if none answers and they came from a lookup old
    /// enough, looks the name up again and tries the new addresses.
    async fn connect(
        self: &Arc<Self>,
        waiting_for_lookup: &AtomicBool,
    ) -> Result<TcpStream, DialFailure> {
        let started = Instant::now();
        waiting_for_lookup.store(true, Ordering::Relaxed);
        let first = self.addrs(started).await?;
        waiting_for_lookup.store(false, Ordering::Relaxed);
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let failed = match connect_any(dial_order(&first.addrs, turn)).await {
            Ok(tcp) => return Ok(tcp),
            Err(detail) => detail,
        };
        let since_lookup = Instant::now().saturating_duration_since(first.at);
        if first.at >= started || since_lookup < self.periods.failure {
            // Looked up for this very dial, or too recently to ask again.
            return Err(DialFailure::refused(failed));
        }
        // The name may have moved: look again, or take the lookup another dial started since.
        waiting_for_lookup.store(true, Ordering::Relaxed);
        let again = self.newer_than(first.at).await?;
        waiting_for_lookup.store(false, Ordering::Relaxed);
        if same_addresses(&again.addrs, &first.addrs) {
            return Err(DialFailure::refused(failed));
        }
        connect_any(dial_order(&again.addrs, turn))
            .await
            .map_err(DialFailure::refused)
    }

    /// Addresses for a dial at `now`: the last answer while fresh; a stale good answer at
    /// once, while a new lookup runs; otherwise the outcome of a new lookup.
    async fn addrs(self: &Arc<Self>, now: Instant) -> Result<Resolved, DialFailure> {
        let mut last = self.last.subscribe();
        loop {
            let current = last.borrow_and_update().clone();
            match current {
                Some(l) if l.is_fresh(now, self.periods) => return l.resolved(),
                Some(l @ Lookup { answer: Ok(_), .. }) => {
                    self.look_up();
                    return l.resolved();
                }
                _ => self.look_up(),
            }
            self.changed(&mut last).await?;
        }
    }

    /// The outcome of a lookup made after `at`, starting one if none is running.
    async fn newer_than(self: &Arc<Self>, at: Instant) -> Result<Resolved, DialFailure> {
        let mut last = self.last.subscribe();
        loop {
            if let Some(l) = last.borrow_and_update().as_ref().filter(|l| l.at > at) {
                return l.resolved();
            }
            self.look_up();
            self.changed(&mut last).await?;
        }
    }

    async fn changed(&self, last: &mut watch::Receiver<Option<Lookup>>) -> Result<(), DialFailure> {
        // The sender lives as long as `self`: this cannot fail, but is not worth a panic.
        last.changed()
            .await
            .map_err(|_| DialFailure::refused(format!("looking up {} was abandoned", self.name)))
    }

    /// Starts a lookup in its own task unless one is running.
    fn look_up(self: &Arc<Self>) {
        if self.lookup_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let resolver = Arc::clone(self);
        let lookup = (self.lookup)();
        // Clears `lookup_running` however the task ends, even if it is dropped unfinished.
        let running = LookupRunning(Arc::clone(self));
        tokio::spawn(async move {
            let name = &resolver.name;
            let limit = resolver.periods.lookup_limit;
            let answer = match tokio::time::timeout(limit, lookup).await {
                Ok(Ok(addrs)) if addrs.is_empty() => Err(format!("{name} resolved to no address")),
                Ok(Ok(addrs)) => Ok(Arc::from(addrs)),
                Ok(Err(e)) => Err(format!("resolving {name}: {e}")),
                Err(_) => Err(format!("looking up {name} took longer than {limit:?}")),
            };
            let previous = resolver.last.borrow().clone();
            match (&answer, previous.as_ref().map(|l| &l.answer)) {
                (Ok(addrs), Some(Ok(before))) if same_addresses(addrs, before) => {}
                (Ok(addrs), _) => info!(upstream = %name, ?addrs, "upstream resolved"),
                (Err(e), Some(Ok(before))) => {
                    warn!(upstream = %name, addresses = ?before, "{e}; dialing the addresses it had")
                }
                (Err(_), _) => {}
            }
            let next = Lookup::after(previous.as_ref(), answer, Instant::now());
            // Cleared before the new value is sent: a dial that comes between the two may
            // start one more lookup, but none can find a lookup marked running that is not.
            drop(running);
            resolver.last.send_replace(Some(next));
        });
    }
}

/// Marks a resolver's lookup as running while it lives.
struct LookupRunning(Arc<Resolver>);

impl Drop for LookupRunning {
    fn drop(&mut self) {
        self.0.lookup_running.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::join_all;
    use tokio::net::{TcpListener, TcpSocket};

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn parses_host_port() {
        for ok in [
            "redis:6379",
            "10.0.0.5:5432",
            "[::1]:6379",
            "db.internal:1",
            "unix:/run/redis/redis.sock",
        ] {
            assert!(ok.parse::<Upstream>().is_ok(), "{ok}");
        }
        for bad in [
            "redis",
            ":6379",
            "redis:0",
            "redis:99999",
            "redis:x",
            "a b:1",
            "http://x:1",
            "unix:",
            "unix:/run/a\0b",
            "unix:relative.sock",
            "unix:6379",
        ] {
            assert!(bad.parse::<Upstream>().is_err(), "{bad}");
        }
        // A socket path holds at most 107 bytes.
        let path = |len: usize| format!("unix:/{}", "a".repeat(len - 1));
        assert!(path(107).parse::<Upstream>().is_ok());
        assert!(path(108).parse::<Upstream>().is_err());
    }

    #[test]
    fn only_names_are_looked_up() {
        let host = |s: &str| match s.parse::<Upstream>().unwrap().0.host {
            Host::Addr(addr) => Some(addr),
            Host::Name(_) | Host::Unix(_) => None,
        };
        assert_eq!(
            host("10.0.0.5:5432"),
            Some("10.0.0.5:5432".parse().unwrap())
        );
        assert_eq!(host("[::1]:6379"), Some("[::1]:6379".parse().unwrap()));
        assert_eq!(host("redis:6379"), None);
        assert_eq!(host("localhost:6379"), None);
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_lookup_is_reused_for_a_while() {
        let at = Instant::now();
        let good = Lookup::after(None, Ok(addrs(&["10.0.0.1:1"]).into()), at);
        let ms = Duration::from_millis(1);
        assert!(good.is_fresh(at + RESOLVE_EVERY - ms, PERIODS));
        assert!(!good.is_fresh(at + RESOLVE_EVERY, PERIODS));
        let failed = Lookup::after(None, Err("no such host".into()), at);
        assert!(failed.is_fresh(at + RELOOKUP_AFTER_FAILURE - ms, PERIODS));
        assert!(!failed.is_fresh(at + RELOOKUP_AFTER_FAILURE, PERIODS));
    }

    #[test]
    fn a_failed_lookup_keeps_the_addresses_it_had() {
        let at = Instant::now();
        let good: Arc<[SocketAddr]> = addrs(&["10.0.0.1:1"]).into();
        let before = Lookup::after(None, Ok(good.clone()), at);
        let later = at + RESOLVE_EVERY;
        let kept = Lookup::after(Some(&before), Err("timed out".into()), later);
        assert_eq!(kept.answer, Ok(good));
        assert_eq!(
            kept.at, later,
            "kept for another period, not looked up on every dial"
        );
        let failed = Lookup::after(None, Err("timed out".into()), at);
        let still = Lookup::after(Some(&failed), Err("timed out again".into()), later);
        assert_eq!(still.answer, Err("timed out again".into()));
    }

    #[test]
    fn a_reordered_answer_is_the_same_answer() {
        let a = addrs(&["10.0.0.1:1", "10.0.0.2:1"]);
        let b = addrs(&["10.0.0.2:1", "10.0.0.1:1"]);
        assert!(same_addresses(&a, &b));
        assert!(!same_addresses(&a, &b[..1]));
    }

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

        fn resolver(
            &self,
            good_for: Duration,
            failure: Duration,
            limit: Duration,
        ) -> Arc<Resolver> {
            let zone = self.clone();
            let periods = Periods {
                good_for,
                failure,
                lookup_limit: limit,
            };
            Resolver::new("svc.test:1", periods, move || -> LookupFuture {
                zone.lookups.fetch_add(1, Ordering::SeqCst);
                let answer = zone.answer.lock().unwrap().clone();
                Box::pin(async move {
                    match answer {
                        Answer::Addrs(addrs) => Ok(addrs),
                        Answer::Fail(e) => Err(io::Error::other(e)),
                        Answer::Hang => std::future::pending().await,
                    }
                })
            })
        }
    }

    async fn dial(resolver: &Arc<Resolver>) -> Result<TcpStream, DialFailure> {
        resolver.connect(&AtomicBool::new(false)).await
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
    async fn a_moved_name_is_looked_up_again_when_its_addresses_fail() {
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
        let upstream: Upstream = format!("localhost:{}", addr.port()).parse().unwrap();
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
        let upstream: Upstream = format!("unix:{}", path.display()).parse().unwrap();
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
        let upstream: Upstream = format!("unix:{}", path.display()).parse().unwrap();

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
