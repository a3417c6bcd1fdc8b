//! Dialing the configured upstream of a route. The server never dials anything else.
//!
//! An IP address is dialed as written. A name is looked up once per [`RESOLVE_EVERY`], and
//! again when none of its addresses answer (at most once per [`RELOOKUP_AFTER_FAILURE`]), so
//! DNS changes are followed without a lookup on every connection: a `getaddrinfo` on a
//! blocking thread, often a DNS query per search domain.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amb_proto::Refusal;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

/// How long a name's addresses are dialed before the name is looked up again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(5);

/// The least time between two lookups of a name after a failure: a failed lookup, or
/// addresses none of which answered. A dead upstream or resolver is not asked once per dial.
pub const RELOOKUP_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// A route's upstream: `host:port`.
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
    Name(Resolver),
}

/// Why an upstream address is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upstream {0:?} is not HOST:PORT (e.g. redis:6379 or 10.0.0.5:5432)")]
pub struct UpstreamParseError(String);

impl std::str::FromStr for Upstream {
    type Err = UpstreamParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UpstreamParseError(s.to_owned());
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
            Err(_) => Host::Name(Resolver::default()),
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
    pub async fn dial(&self, timeout: Duration) -> Result<TcpStream, DialFailure> {
        let target = &*self.0;
        let attempt = async {
            match &target.host {
                Host::Addr(addr) => connect_any(&[*addr]).await.map_err(DialFailure::refused),
                Host::Name(resolver) => {
                    let lookup = || tokio::net::lookup_host(target.text.as_str());
                    resolver.connect(&target.text, lookup).await
                }
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(DialFailure {
                    refusal: Refusal::UpstreamTimeout,
                    detail: format!("no answer from {} within {timeout:?}", target.text),
                })
            })
    }
}

/// Connects to the first of `addrs` that answers; the error names the last one tried.
async fn connect_any(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut last = String::from("no address to dial");
    for &addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

/// A name's last lookup, shared by every dial of the route.
struct Resolver {
    /// Held across a lookup, so concurrent dials wait for one lookup instead of each making one.
    last: Mutex<Option<Lookup>>,
    periods: Periods,
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::new(Periods {
            answer: RESOLVE_EVERY,
            failure: RELOOKUP_AFTER_FAILURE,
        })
    }
}

/// How long lookups are trusted.
#[derive(Clone, Copy, Debug)]
struct Periods {
    /// A good answer is used this long.
    answer: Duration,
    /// After a failure, the name is not looked up again for this long.
    failure: Duration,
}

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
    /// Whether a dial at `now` may use this lookup instead of making its own.
    fn is_fresh(&self, now: Instant, periods: Periods) -> bool {
        let valid_for = match self.answer {
            Ok(_) => periods.answer,
            Err(_) => periods.failure,
        };
        now.saturating_duration_since(self.at) < valid_for
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
    fn new(periods: Periods) -> Self {
        Resolver {
            last: Mutex::new(None),
            periods,
        }
    }

    /// Connects to the name's addresses; if none answers and they came from an earlier lookup,
    /// looks the name up again and tries the new addresses.
    async fn connect<F, I>(
        &self,
        name: &str,
        lookup: impl Fn() -> F,
    ) -> Result<TcpStream, DialFailure>
    where
        F: Future<Output = io::Result<I>>,
        I: Iterator<Item = SocketAddr>,
    {
        let started = Instant::now();
        let periods = self.periods;
        let first = self
            .resolve(name, &lookup, |l| l.is_fresh(started, periods))
            .await?;
        let failed = match connect_any(&first.addrs).await {
            Ok(tcp) => return Ok(tcp),
            Err(detail) => detail,
        };
        let since_lookup = Instant::now().saturating_duration_since(first.at);
        if first.at >= started || since_lookup < periods.failure {
            // Looked up for this very dial, or too recently to ask again.
            return Err(DialFailure::refused(failed));
        }
        // The name may have moved: look again, unless another dial already has.
        let again = self.resolve(name, &lookup, |l| l.at > first.at).await?;
        if again.addrs == first.addrs {
            return Err(DialFailure::refused(failed));
        }
        connect_any(&again.addrs)
            .await
            .map_err(DialFailure::refused)
    }

    /// The last lookup if `usable` accepts it, else a new one.
    async fn resolve<F, I>(
        &self,
        name: &str,
        lookup: impl Fn() -> F,
        usable: impl FnOnce(&Lookup) -> bool,
    ) -> Result<Resolved, DialFailure>
    where
        F: Future<Output = io::Result<I>>,
        I: Iterator<Item = SocketAddr>,
    {
        let mut last = self.last.lock().await;
        if let Some(l) = last.as_ref().filter(|l| usable(l)) {
            return l.resolved();
        }
        let answer = match lookup().await {
            Ok(addrs) => Some(addrs.collect::<Arc<[SocketAddr]>>())
                .filter(|a| !a.is_empty())
                .ok_or_else(|| format!("{name} resolved to no address")),
            Err(e) => Err(format!("resolving {name}: {e}")),
        };
        match (&answer, last.as_ref().map(|l| &l.answer)) {
            (Ok(addrs), Some(Ok(before))) if addrs == before => {}
            (Ok(addrs), _) => info!(upstream = %name, ?addrs, "upstream resolved"),
            (Err(e), Some(Ok(before))) => {
                warn!(upstream = %name, addresses = ?before, "{e}; dialing the addresses it had")
            }
            (Err(_), _) => {}
        }
        let next = Lookup::after(last.as_ref(), answer, Instant::now());
        *last = Some(next.clone());
        next.resolved()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::join_all;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn parses_host_port() {
        for ok in ["redis:6379", "10.0.0.5:5432", "[::1]:6379", "db.internal:1"] {
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
        ] {
            assert!(bad.parse::<Upstream>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_names_are_looked_up() {
        let host = |s: &str| match s.parse::<Upstream>().unwrap().0.host {
            Host::Addr(addr) => Some(addr),
            Host::Name(_) => None,
        };
        assert_eq!(
            host("10.0.0.5:5432"),
            Some("10.0.0.5:5432".parse().unwrap())
        );
        assert_eq!(host("[::1]:6379"), Some("[::1]:6379".parse().unwrap()));
        assert_eq!(host("redis:6379"), None);
        assert_eq!(host("localhost:6379"), None);
    }

    #[test]
    fn a_lookup_is_reused_for_a_while() {
        let at = Instant::now();
        let good = Lookup::after(None, Ok(Arc::from(["10.0.0.1:1".parse().unwrap()])), at);
        let periods = Resolver::default().periods;
        let ms = Duration::from_millis(1);
        assert!(good.is_fresh(at + RESOLVE_EVERY - ms, periods));
        assert!(!good.is_fresh(at + RESOLVE_EVERY, periods));
        let failed = Lookup::after(None, Err("no such host".into()), at);
        assert!(failed.is_fresh(at + RELOOKUP_AFTER_FAILURE - ms, periods));
        assert!(!failed.is_fresh(at + RELOOKUP_AFTER_FAILURE, periods));
    }

    #[test]
    fn a_failed_lookup_keeps_the_addresses_it_had() {
        let at = Instant::now();
        let addrs: Arc<[SocketAddr]> = Arc::from(["10.0.0.1:1".parse().unwrap()]);
        let good = Lookup::after(None, Ok(addrs.clone()), at);
        let later = at + RESOLVE_EVERY;
        let kept = Lookup::after(Some(&good), Err("timed out".into()), later);
        assert_eq!(kept.answer, Ok(addrs));
        assert_eq!(
            kept.at, later,
            "kept for another period, not looked up on every dial"
        );
        let failed = Lookup::after(None, Err("timed out".into()), at);
        let still = Lookup::after(Some(&failed), Err("timed out again".into()), later);
        assert_eq!(still.answer, Err("timed out again".into()));
    }

    /// A stand-in for DNS whose answer the test sets, counting lookups; the dials are real.
    #[derive(Clone)]
    struct Zone {
        answer: Arc<std::sync::Mutex<io::Result<Vec<SocketAddr>>>>,
        lookups: Arc<AtomicUsize>,
    }

    impl Zone {
        fn new(answer: io::Result<Vec<SocketAddr>>) -> Self {
            Zone {
                answer: Arc::new(std::sync::Mutex::new(answer)),
                lookups: Arc::default(),
            }
        }

        fn answer(&self, answer: io::Result<Vec<SocketAddr>>) {
            *self.answer.lock().unwrap() = answer;
        }

        fn lookups(&self) -> usize {
            self.lookups.load(Ordering::SeqCst)
        }

        async fn dial(&self, resolver: &Resolver) -> Result<TcpStream, DialFailure> {
            let lookup = || {
                self.lookups.fetch_add(1, Ordering::SeqCst);
                let answer = match &*self.answer.lock().unwrap() {
                    Ok(addrs) => Ok(addrs.clone().into_iter()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                // Each lookup takes a moment, as a real one does.
                async move {
                    tokio::task::yield_now().await;
                    answer
                }
            };
            resolver.connect("svc.test:1", lookup).await
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
        let zone = Zone::new(Ok(vec![addr]));
        let resolver = Resolver::default();
        let dials = (0..20).map(|_| zone.dial(&resolver));
        for dial in join_all(dials).await {
            assert_eq!(dial.unwrap().peer_addr().unwrap(), addr);
        }
        zone.dial(&resolver).await.unwrap();
        assert_eq!(zone.lookups(), 1);
    }

    #[tokio::test]
    async fn a_moved_name_is_looked_up_again_when_its_addresses_fail() {
        let (old, old_addr) = listener().await;
        let zone = Zone::new(Ok(vec![old_addr]));
        let resolver = Resolver::new(Periods {
            answer: HOUR,
            failure: Duration::ZERO,
        });
        zone.dial(&resolver).await.unwrap();

        drop(old);
        let (_new, new_addr) = listener().await;
        zone.answer(Ok(vec![new_addr]));
        let tcp = zone.dial(&resolver).await.unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), new_addr);
        assert_eq!(zone.lookups(), 2);
        zone.dial(&resolver).await.unwrap();
        assert_eq!(zone.lookups(), 2, "the new answer is kept");
    }

    #[tokio::test]
    async fn a_dead_upstream_is_not_looked_up_on_every_dial() {
        let (l, addr) = listener().await;
        drop(l);
        let zone = Zone::new(Ok(vec![addr]));
        let resolver = Resolver::new(Periods {
            answer: HOUR,
            failure: HOUR,
        });
        let failure = zone.dial(&resolver).await.unwrap_err();
        assert_eq!(failure.refusal, Refusal::UpstreamRefused);
        assert!(
            failure.detail.contains(&addr.to_string()),
            "{}",
            failure.detail
        );
        assert_eq!(
            zone.lookups(),
            1,
            "looked up for this dial: nothing newer to try"
        );
        for _ in 0..3 {
            zone.dial(&resolver).await.unwrap_err();
        }
        assert_eq!(zone.lookups(), 1, "not again within the failure period");
    }

    #[tokio::test]
    async fn a_failed_lookup_is_one_lookup_for_a_burst_of_dials() {
        let zone = Zone::new(Err(io::Error::other("no such host")));
        let resolver = Resolver::new(Periods {
            answer: HOUR,
            failure: HOUR,
        });
        let dials = (0..20).map(|_| zone.dial(&resolver));
        for dial in join_all(dials).await {
            let failure = dial.unwrap_err();
            assert_eq!(failure.detail, "resolving svc.test:1: no such host");
        }
        assert_eq!(zone.lookups(), 1);
    }

    #[tokio::test]
    async fn a_real_name_is_dialed() {
        let (l, addr) = listener().await;
        let upstream: Upstream = format!("localhost:{}", addr.port()).parse().unwrap();
        let (tcp, accepted) = tokio::join!(upstream.dial(Duration::from_secs(5)), l.accept());
        assert_eq!(tcp.unwrap().local_addr().unwrap(), accepted.unwrap().1);
    }
}
