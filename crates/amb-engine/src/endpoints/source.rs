//! Sources: where a name's endpoints come from. A source publishes its latest [`EndpointSet`]
//! on a watch channel; a dial that finds the set stale, or whose endpoints none answered, asks
//! it to look again ([`Source::look_again`]). Two kinds today: a fixed set (an IP address or a
//! Unix socket, dialed as written) and a DNS name looked up through the system resolver.
//!
//! A name is looked up once per [`RESOLVE_EVERY`], and again when none of its addresses answer
//! (at most once per [`RELOOKUP_AFTER_FAILURE`]), so DNS changes are followed without a lookup
//! on every connection: a `getaddrinfo` on a blocking thread, often a DNS query per search
//! domain. Lookups run in their own task, one at a time, while dials go on with the endpoints
//! they have; a failed or hung lookup keeps the last good ones.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::balance::same_endpoints;
use super::{Endpoint, Resolver};

/// How long a name's addresses are dialed before the name is looked up again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(5);

/// The least time between two lookups of a name after a failure: a failed lookup, or
/// addresses none of which answered. A dead upstream or resolver is not asked once per dial.
pub const RELOOKUP_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// A lookup taking longer than this counts as failed (the addresses from before stay in use).
pub const LOOKUP_LIMIT: Duration = Duration::from_secs(5);

/// How long a source's answers are trusted.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Periods {
    /// A good answer is used this long.
    pub good_for: Duration,
    /// After a failure, the name is not looked up again for this long.
    pub failure: Duration,
    /// A lookup taking longer than this counts as failed.
    pub lookup_limit: Duration,
}

const DNS_PERIODS: Periods = Periods {
    good_for: RESOLVE_EVERY,
    failure: RELOOKUP_AFTER_FAILURE,
    lookup_limit: LOOKUP_LIMIT,
};

/// A fixed set never goes stale.
const FIXED_PERIODS: Periods = Periods {
    good_for: Duration::MAX,
    failure: Duration::MAX,
    lookup_limit: Duration::MAX,
};

/// One answer of a source: its endpoints, or why it has none; and when it came.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointSet {
    /// The endpoints (never empty), or why there are none.
    pub answer: Result<Arc<[Endpoint]>, String>,
    /// When the answer came.
    pub at: Instant,
}

impl EndpointSet {
    /// Whether a dial that started at `now` may use this answer as it is: one made since, or
    /// one recent enough.
    fn is_fresh(&self, now: Instant, periods: Periods) -> bool {
        let valid_for = match self.answer {
            Ok(_) => periods.good_for,
            Err(_) => periods.failure,
        };
        self.at >= now || now.duration_since(self.at) < valid_for
    }

    /// What a lookup at `now` leaves: its answer, or after a failure the endpoints of an
    /// earlier good answer (a resolver outage should not take the route down with it).
    fn after(
        previous: Option<&EndpointSet>,
        answer: Result<Arc<[Endpoint]>, String>,
        now: Instant,
    ) -> EndpointSet {
        let answer = match (answer, previous.map(|p| &p.answer)) {
            (Err(_), Some(Ok(earlier))) => Ok(earlier.clone()),
            (answer, _) => answer,
        };
        EndpointSet { answer, at: now }
    }
}

type LookupFuture = Pin<Box<dyn Future<Output = io::Result<Vec<Endpoint>>> + Send>>;
type Lookup = Box<dyn Fn() -> LookupFuture + Send + Sync>;

/// What a source's endpoints are, for its log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A route's upstream (server side).
    Upstream,
    /// A server the client dials.
    Peer,
}

impl Role {
    /// What a set of them is called.
    pub fn noun(self) -> &'static str {
        match self {
            Role::Upstream => "upstreams",
            Role::Peer => "peers",
        }
    }
}

/// Where a name's endpoints come from, shared by every dial of the route or peer.
pub struct Source {
    /// As configured, for logs and messages.
    name: String,
    role: Role,
    /// `None` for a fixed set.
    lookup: Option<Lookup>,
    periods: Periods,
    last: watch::Sender<Option<EndpointSet>>,
    /// Whether a lookup task is running.
    lookup_running: AtomicBool,
}

impl Source {
    /// A fixed set of endpoints, dialed as given.
    pub fn fixed(name: &str, role: Role, endpoints: Vec<Endpoint>) -> Arc<Self> {
        let set = EndpointSet {
            answer: Ok(endpoints.into()),
            at: Instant::now(),
        };
        Arc::new(Source {
            name: name.to_owned(),
            role,
            lookup: None,
            periods: FIXED_PERIODS,
            last: watch::Sender::new(Some(set)),
            lookup_running: AtomicBool::new(false),
        })
    }

    /// `host` and `port` (written as `name`), looked up through `resolver`.
    pub fn dns(name: &str, role: Role, host: &str, port: u16, resolver: &Resolver) -> Arc<Self> {
        let (host, resolver) = (Arc::<str>::from(host), resolver.clone());
        let lookup = move || -> LookupFuture {
            let (host, resolver) = (host.clone(), resolver.clone());
            Box::pin(async move {
                let addrs = resolver.lookup_host(&host, port).await?;
                Ok(addrs.into_iter().map(Endpoint::Tcp).collect())
            })
        };
        Source::looked_up(name, role, DNS_PERIODS, lookup)
    }

    /// A source whose sets come from `lookup`, trusted for `periods`.
    pub(crate) fn looked_up(
        name: &str,
        role: Role,
        periods: Periods,
        lookup: impl Fn() -> LookupFuture + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Source {
            name: name.to_owned(),
            role,
            lookup: Some(Box::new(lookup)),
            periods,
            last: watch::Sender::new(None),
            lookup_running: AtomicBool::new(false),
        })
    }

    /// The name, as configured.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The latest set, as it changes (`None` until the first answer).
    pub fn watch(&self) -> watch::Receiver<Option<EndpointSet>> {
        self.last.subscribe()
    }

    /// The set for a dial at `now`: the last answer while fresh; a stale good answer at once,
    /// while a new lookup runs; otherwise the outcome of a new lookup.
    pub async fn current(self: &Arc<Self>, now: Instant) -> EndpointSet {
        let mut last = self.last.subscribe();
        loop {
            let current = last.borrow_and_update().clone();
            match current {
                Some(set) if set.is_fresh(now, self.periods) => return set,
                Some(set @ EndpointSet { answer: Ok(_), .. }) => {
                    self.look_again();
                    return set;
                }
                _ => self.look_again(),
            }
            // The sender lives as long as `self`.
            let _ = last.changed().await;
        }
    }

    /// The outcome of a lookup made after `at`, starting one if none is running.
    pub async fn newer_than(self: &Arc<Self>, at: Instant) -> EndpointSet {
        let mut last = self.last.subscribe();
        loop {
            if let Some(set) = last.borrow_and_update().as_ref().filter(|s| s.at > at) {
                return set.clone();
            }
            self.look_again();
            let _ = last.changed().await;
        }
    }

    /// Whether a dial that started at `started` and found none of a set from `at` answering
    /// should ask for another: not if the set was looked up for this very dial, nor within the
    /// failure period of the last lookup.
    pub fn worth_looking_again(&self, at: Instant, started: Instant) -> bool {
        let since = Instant::now().saturating_duration_since(at);
        self.lookup.is_some() && at < started && since >= self.periods.failure
    }

    /// Feedback from a dial: the set is stale, or none of it answered. Starts a lookup in its
    /// own task unless one is running (a fixed set has nothing to look up).
    pub fn look_again(self: &Arc<Self>) {
        let Some(lookup) = &self.lookup else { return };
        if self.lookup_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let source = Arc::clone(self);
        let lookup = lookup();
        // Clears `lookup_running` however the task ends, even if it is dropped unfinished.
        let running = LookupRunning(Arc::clone(self));
        tokio::spawn(async move {
            let name = &source.name;
            let limit = source.periods.lookup_limit;
            let answer = match tokio::time::timeout(limit, lookup).await {
                Ok(Ok(addrs)) if addrs.is_empty() => Err(format!("{name} resolved to no address")),
                Ok(Ok(addrs)) => Ok(Arc::from(addrs)),
                Ok(Err(e)) => Err(format!("resolving {name}: {e}")),
                Err(_) => Err(format!("looking up {name} took longer than {limit:?}")),
            };
            let previous = source.last.borrow().clone();
            match (&answer, previous.as_ref().map(|s| &s.answer)) {
                (Ok(addrs), Some(Ok(before))) if same_endpoints(addrs, before) => {}
                (Ok(addrs), _) => match source.role {
                    Role::Upstream => info!(upstream = %name, ?addrs, "upstream resolved"),
                    Role::Peer => info!(peer = %name, ?addrs, "peer resolved"),
                },
                (Err(e), Some(Ok(before))) => match source.role {
                    Role::Upstream => {
                        warn!(upstream = %name, addresses = ?before, "{e}; dialing the addresses it had")
                    }
                    Role::Peer => {
                        warn!(peer = %name, addresses = ?before, "{e}; dialing the addresses it had")
                    }
                },
                (Err(_), _) => {}
            }
            let next = EndpointSet::after(previous.as_ref(), answer, Instant::now());
            // Cleared before the new set is sent: a dial that comes between the two may start
            // one more lookup, but none can find a lookup marked running that is not.
            drop(running);
            source.last.send_replace(Some(next));
        });
    }
}

/// Marks a source's lookup as running while it lives.
struct LookupRunning(Arc<Source>);

impl Drop for LookupRunning {
    fn drop(&mut self) {
        self.0.lookup_running.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(list: &[&str]) -> Arc<[Endpoint]> {
        list.iter()
            .map(|a| Endpoint::Tcp(a.parse().unwrap()))
            .collect()
    }

    #[test]
    fn a_lookup_is_reused_for_a_while() {
        let at = Instant::now();
        let good = EndpointSet::after(None, Ok(set(&["10.0.0.1:1"])), at);
        let ms = Duration::from_millis(1);
        assert!(good.is_fresh(at + RESOLVE_EVERY - ms, DNS_PERIODS));
        assert!(!good.is_fresh(at + RESOLVE_EVERY, DNS_PERIODS));
        let failed = EndpointSet::after(None, Err("no such host".into()), at);
        assert!(failed.is_fresh(at + RELOOKUP_AFTER_FAILURE - ms, DNS_PERIODS));
        assert!(!failed.is_fresh(at + RELOOKUP_AFTER_FAILURE, DNS_PERIODS));
        assert!(good.is_fresh(at + Duration::from_secs(86400 * 365), FIXED_PERIODS));
    }

    #[test]
    fn a_failed_lookup_keeps_the_addresses_it_had() {
        let at = Instant::now();
        let good = set(&["10.0.0.1:1"]);
        let before = EndpointSet::after(None, Ok(good.clone()), at);
        let later = at + RESOLVE_EVERY;
        let kept = EndpointSet::after(Some(&before), Err("timed out".into()), later);
        assert_eq!(kept.answer, Ok(good));
        assert_eq!(
            kept.at, later,
            "kept for another period, not looked up on every dial"
        );
        let failed = EndpointSet::after(None, Err("timed out".into()), at);
        let still = EndpointSet::after(Some(&failed), Err("timed out again".into()), later);
        assert_eq!(still.answer, Err("timed out again".into()));
    }

    #[test]
    fn a_reordered_answer_is_the_same_answer() {
        let a = set(&["10.0.0.1:1", "10.0.0.2:1"]);
        let b = set(&["10.0.0.2:1", "10.0.0.1:1"]);
        assert!(same_endpoints(&a, &b));
        assert!(!same_endpoints(&a, &b[..1]));
    }
}
