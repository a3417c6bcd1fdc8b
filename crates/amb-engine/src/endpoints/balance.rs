//! The balancer: which of a source's endpoints a dial tries, in what order, and how the
//! attempts overlap, after Happy Eyeballs (RFC 8305); and what a dial that none answered tells
//! the source. The caller passes the attempt: a connector's connect for upstreams, a whole
//! tunnel handshake for peers.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use super::source::{EndpointSet, Source};
use super::Endpoint;

/// How long an attempt runs alone before the next address is tried beside it (RFC 8305's
/// recommended Connection Attempt Delay). An address that drops packets costs a dial this long,
/// not its whole timeout; one that refuses costs nothing, as the next starts at once.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// The order a dial tries `addrs` in. The leading run of addresses of the first one's family
/// (resolvers sort the preferred family first) take turns going first by `turn`, so dials
/// spread over them; the other addresses alternate with them, so a family that is unreachable
/// as a whole costs one [`ATTEMPT_DELAY`] (RFC 8305, section 4).
pub fn dial_order(addrs: &[Endpoint], turn: usize) -> impl Iterator<Item = Endpoint> + '_ {
    let preferred = addrs.first().map(Endpoint::family);
    let run = addrs
        .iter()
        .take_while(|a| Some(a.family()) == preferred)
        .count();
    let (preferred, others) = addrs.split_at(run);
    let (before, after) = preferred.split_at(turn.checked_rem(run).unwrap_or(0));
    let mut preferred = after.iter().chain(before).cloned();
    let mut others = others.iter().cloned();
    let mut preferred_next = true;
    std::iter::from_fn(move || {
        let next = if preferred_next {
            preferred.next().or_else(|| others.next())
        } else {
            others.next().or_else(|| preferred.next())
        };
        preferred_next = !preferred_next;
        next
    })
}

/// Runs `attempt` on the addresses in order and returns the first success. Each attempt starts
/// when the one before it fails or has run for `delay`, and goes on beside the later ones; once
/// one succeeds the others are dropped (RFC 8305, section 5). When every one fails, or `limit`
/// runs out first, the error holds each address with its failure, or as unanswered.
pub async fn race<A, T, E, Fut>(
    addrs: impl IntoIterator<Item = A>,
    delay: Duration,
    limit: Option<Duration>,
    mut attempt: impl FnMut(A) -> Fut,
) -> Result<Won<A, T, E>, Failures<A, E>>
where
    A: Clone + PartialEq,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = limit.map(|limit| Instant::now() + limit);
    let mut addrs = addrs.into_iter().peekable();
    let mut running = FuturesUnordered::new();
    let mut started = Vec::new();
    let mut failed = Vec::new();
    // The addresses started that neither failed nor won.
    let unanswered = |started: Vec<A>, failed: &[(A, E)], won: Option<&A>| {
        let mut unanswered = started;
        unanswered.retain(|a| Some(a) != won && !failed.iter().any(|(f, _)| f == a));
        unanswered
    };
    loop {
        // The first address, the next after a failure, or the next after `delay`.
        if let Some(addr) = addrs.next() {
            started.push(addr.clone());
            let connecting = attempt(addr.clone());
            running.push(async move { (addr, connecting.await) });
        }
        let next_due = addrs.peek().is_some().then(|| Instant::now() + delay);
        let wake = match (next_due, deadline) {
            (Some(next), Some(deadline)) => Some(next.min(deadline)),
            (next, deadline) => next.or(deadline),
        };
        let finished = match wake {
            Some(at) => match tokio::time::timeout_at(at, running.next()).await {
                Ok(finished) => finished,
                Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
                    let unanswered = unanswered(started, &failed, None);
                    return Err(Failures { failed, unanswered });
                }
                Err(_) => continue,
            },
            None => running.next().await,
        };
        match finished {
            Some((addr, Ok(value))) => {
                let unanswered = unanswered(started, &failed, Some(&addr));
                return Ok(Won {
                    value,
                    addr,
                    passed_over: Failures { failed, unanswered },
                });
            }
            Some((addr, Err(e))) => failed.push((addr, e)),
            None => {
                return Err(Failures {
                    failed,
                    unanswered: Vec::new(),
                })
            }
        }
    }
}

/// A race's winner, and the addresses tried before it that did not win.
#[derive(Debug)]
pub struct Won<A, T, E> {
    /// What the winning attempt gave.
    pub value: T,
    /// The address it was made to.
    pub addr: A,
    /// The attempts that failed before it answered, and those still running then (dropped).
    pub passed_over: Failures<A, E>,
}

/// The addresses a dial tried without success: those that failed, with their errors in the
/// order they came, and those that had not answered when the dial ended.
#[derive(Debug)]
pub struct Failures<A, E> {
    /// Each address that failed, with why.
    pub failed: Vec<(A, E)>,
    /// Each address still without an answer.
    pub unanswered: Vec<A>,
}

impl<A, E> Failures<A, E> {
    /// Whether every address tried answered.
    pub fn is_empty(&self) -> bool {
        self.failed.is_empty() && self.unanswered.is_empty()
    }
}

impl<A: fmt::Display, E: fmt::Display> fmt::Display for Failures<A, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no address to try");
        }
        let failed = self.failed.iter().map(|(addr, e)| format!("{addr}: {e}"));
        let unanswered = self
            .unanswered
            .iter()
            .map(|addr| format!("{addr}: no answer"));
        f.write_str(&failed.chain(unanswered).collect::<Vec<_>>().join("; "))
    }
}

impl<A: fmt::Debug + fmt::Display, E: fmt::Debug + fmt::Display> std::error::Error
    for Failures<A, E>
{
}

/// Why a dial over a source's endpoints failed.
#[derive(Debug)]
pub enum DialError<E> {
    /// The source has no endpoints to offer: its lookup failed, with why.
    NoEndpoints(String),
    /// Every endpoint tried failed or did not answer.
    Failed(Failures<Endpoint, E>),
}

impl<E: fmt::Display> fmt::Display for DialError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::NoEndpoints(why) => f.write_str(why),
            DialError::Failed(failures) => failures.fmt(f),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for DialError<E> {}

/// Picks the endpoints of a [`Source`] for each new connection: dials take turns over the set
/// ([`dial_order`]) and race slow endpoints ([`race`]); a dial that none answered asks the
/// source to look again (at most once per its failure period) and tries the new set.
pub struct Balancer {
    source: Arc<Source>,
    turn: AtomicUsize,
}

impl Balancer {
    /// A balancer over `source`'s endpoints.
    pub fn new(source: Arc<Source>) -> Self {
        Balancer {
            source,
            turn: AtomicUsize::new(0),
        }
    }

    /// Where the endpoints come from.
    pub fn source(&self) -> &Arc<Source> {
        &self.source
    }

    /// Runs `attempt` over the endpoints, in this dial's turn, and returns the first success.
    /// Each race is bounded by `limit`, if given. `waiting_for_source` is true while the dial
    /// waits for the source, so a caller's timeout can say which step ran out.
    pub async fn dial<T, E, Fut>(
        &self,
        limit: Option<Duration>,
        waiting_for_source: &AtomicBool,
        mut attempt: impl FnMut(Endpoint) -> Fut,
    ) -> Result<Won<Endpoint, T, E>, DialError<E>>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let source = &self.source;
        let started = Instant::now();
        waiting_for_source.store(true, Ordering::Relaxed);
        let first = source.current(started).await;
        waiting_for_source.store(false, Ordering::Relaxed);
        let (first_at, first) = endpoints(first)?;
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let order = |set: &[Endpoint]| dial_order(set, turn).collect::<Vec<_>>();
        let failed = match race(order(&first), ATTEMPT_DELAY, limit, &mut attempt).await {
            Ok(won) => return Ok(won),
            Err(failures) => failures,
        };
        if !source.worth_looking_again(first_at, started) {
            // Looked up for this very dial, or too recently to ask again.
            return Err(DialError::Failed(failed));
        }
        // The name may have moved: look again, or take the lookup another dial started since.
        waiting_for_source.store(true, Ordering::Relaxed);
        let again = source.newer_than(first_at).await;
        waiting_for_source.store(false, Ordering::Relaxed);
        let (_, again) = endpoints(again)?;
        if same_endpoints(&again, &first) {
            return Err(DialError::Failed(failed));
        }
        race(order(&again), ATTEMPT_DELAY, limit, &mut attempt)
            .await
            .map_err(DialError::Failed)
    }
}

/// A set's endpoints and when they came, or why there are none.
fn endpoints<E>(set: EndpointSet) -> Result<(Instant, Arc<[Endpoint]>), DialError<E>> {
    match set.answer {
        Ok(endpoints) => Ok((set.at, endpoints)),
        Err(why) => Err(DialError::NoEndpoints(why)),
    }
}

/// Whether two answers hold the same endpoints, in whatever order.
pub(crate) fn same_endpoints(a: &[Endpoint], b: &[Endpoint]) -> bool {
    let sorted = |x: &[Endpoint]| {
        let mut v = x.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    sorted(a) == sorted(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Mutex;

    fn addrs(list: &[&str]) -> Vec<Endpoint> {
        list.iter()
            .map(|a| Endpoint::Tcp(a.parse().unwrap()))
            .collect()
    }

    fn order(list: &[Endpoint], turn: usize) -> Vec<Endpoint> {
        dial_order(list, turn).collect()
    }

    #[test]
    fn dials_take_turns_over_the_preferred_family() {
        let v4 = addrs(&["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]);
        assert_eq!(order(&v4, 0), v4);
        assert_eq!(
            order(&v4, 1),
            addrs(&["10.0.0.2:1", "10.0.0.3:1", "10.0.0.1:1"])
        );
        assert_eq!(order(&v4, 3), v4);
        assert!(order(&[], 3).is_empty());
    }

    #[test]
    fn the_families_alternate() {
        let mixed = addrs(&[
            "[fd00::1]:1",
            "[fd00::2]:1",
            "10.0.0.1:1",
            "10.0.0.2:1",
            "10.0.0.3:1",
        ]);
        assert_eq!(
            order(&mixed, 1),
            addrs(&[
                "[fd00::2]:1",
                "10.0.0.1:1",
                "[fd00::1]:1",
                "10.0.0.2:1",
                "10.0.0.3:1"
            ])
        );
        let one_v6 = addrs(&["[fd00::1]:1", "10.0.0.1:1", "10.0.0.2:1"]);
        assert_eq!(
            order(&one_v6, 1),
            one_v6,
            "one preferred address: always first"
        );
    }

    /// How a scripted attempt ends, and after how long.
    #[derive(Clone, Copy)]
    enum Outcome {
        Connects(u64),
        Fails(u64),
        Hangs,
    }

    /// Races `script` (an address per outcome, in order) and returns the result with the
    /// time it took and the addresses attempted, in the order they started.
    async fn run(
        script: &[Outcome],
        limit: Option<Duration>,
    ) -> (
        Result<Won<SocketAddr, SocketAddr, &'static str>, Failures<SocketAddr, &'static str>>,
        Duration,
        Vec<u16>,
    ) {
        let list: Vec<SocketAddr> = (1..=script.len())
            .map(|port| SocketAddr::from(([10, 0, 0, 1], port as u16)))
            .collect();
        let started = Arc::new(Mutex::new(Vec::new()));
        let begin = Instant::now();
        let result = race(list, ATTEMPT_DELAY, limit, |addr| {
            started.lock().unwrap().push(addr.port());
            let outcome = script[usize::from(addr.port()) - 1];
            async move {
                match outcome {
                    Outcome::Connects(ms) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok(addr)
                    }
                    Outcome::Fails(ms) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Err("refused")
                    }
                    Outcome::Hangs => std::future::pending().await,
                }
            }
        })
        .await;
        let started = started.lock().unwrap().clone();
        (result, begin.elapsed(), started)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_that_answers_is_the_only_one_tried() {
        let (result, took, started) =
            run(&[Outcome::Connects(10), Outcome::Connects(0)], None).await;
        let won = result.unwrap();
        assert_eq!((won.value.port(), won.addr.port()), (1, 1));
        assert!(won.passed_over.is_empty());
        assert_eq!(took, ms(10));
        assert_eq!(started, [1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_starts_the_next_address_at_once() {
        let (result, took, started) = run(&[Outcome::Fails(5), Outcome::Connects(10)], None).await;
        let won = result.unwrap();
        assert_eq!(won.addr.port(), 2);
        assert_eq!(won.passed_over.to_string(), "10.0.0.1:1: refused");
        assert_eq!(took, ms(15));
        assert_eq!(started, [1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_that_hangs_holds_the_dial_up_by_the_attempt_delay() {
        let script = [Outcome::Hangs, Outcome::Hangs, Outcome::Connects(10)];
        let (result, took, started) = run(&script, None).await;
        let won = result.unwrap();
        assert_eq!(won.addr.port(), 3);
        assert_eq!(
            won.passed_over.to_string(),
            "10.0.0.1:1: no answer; 10.0.0.1:2: no answer"
        );
        assert_eq!(took, ATTEMPT_DELAY * 2 + ms(10));
        assert_eq!(started, [1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_that_answers_first_wins() {
        // The first answers at 300 ms; the second, started at 250 ms, would at 350.
        let (result, took, _) = run(&[Outcome::Connects(300), Outcome::Connects(100)], None).await;
        assert_eq!(result.unwrap().addr.port(), 1);
        assert_eq!(took, ms(300));
    }

    #[tokio::test(start_paused = true)]
    async fn every_failure_is_reported_in_the_order_they_came() {
        // The first fails at 400 ms, after the second (started at 250 ms) failed at 260.
        let (result, _, _) = run(&[Outcome::Fails(400), Outcome::Fails(10)], None).await;
        let failures = result.unwrap_err();
        assert_eq!(
            failures.to_string(),
            "10.0.0.1:2: refused; 10.0.0.1:1: refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_reports_what_failed_and_what_did_not_answer() {
        // The second fails at 260 ms; the first never answers.
        let script = [Outcome::Hangs, Outcome::Fails(10)];
        let (result, took, _) = run(&script, Some(Duration::from_secs(10))).await;
        let failures = result.unwrap_err();
        assert_eq!(
            failures.to_string(),
            "10.0.0.1:2: refused; 10.0.0.1:1: no answer"
        );
        assert_eq!(took, Duration::from_secs(10));
        // Within the limit, no different from no limit at all.
        let (result, took, _) = run(&[Outcome::Hangs, Outcome::Connects(10)], Some(ms(300))).await;
        assert_eq!(result.unwrap().addr.port(), 2);
        assert_eq!(took, ATTEMPT_DELAY + ms(10));
    }

    #[tokio::test(start_paused = true)]
    async fn no_address_is_a_failure() {
        let (result, took, started) = run(&[], None).await;
        let failures = result.unwrap_err();
        assert_eq!(failures.to_string(), "no address to try");
        assert_eq!(took, Duration::ZERO);
        assert!(started.is_empty());
    }
}
