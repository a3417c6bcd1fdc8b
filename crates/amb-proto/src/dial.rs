//! Which of a name's addresses a dial tries, in what order, and how the attempts overlap, after
//! Happy Eyeballs (RFC 8305). Nothing here does I/O: the caller passes the attempt, a TCP
//! connect for upstreams and TLS tunnels, a whole handshake for QUIC tunnels.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

/// How long an attempt runs alone before the next address is tried beside it (RFC 8305's
/// recommended Connection Attempt Delay). An address that drops packets costs a dial this long,
/// not its whole timeout; one that refuses costs nothing, as the next starts at once.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// The order a dial tries `addrs` in. The leading run of addresses of the first one's family
/// (resolvers sort the preferred family first) take turns going first by `turn`, so dials
/// spread over them; the other addresses alternate with them, so a family that is unreachable
/// as a whole costs one [`ATTEMPT_DELAY`] (RFC 8305, section 4).
pub fn dial_order(addrs: &[SocketAddr], turn: usize) -> impl Iterator<Item = SocketAddr> + '_ {
    let preferred_is_v4 = addrs.first().is_some_and(SocketAddr::is_ipv4);
    let run = addrs
        .iter()
        .take_while(|a| a.is_ipv4() == preferred_is_v4)
        .count();
    let (preferred, others) = addrs.split_at(run);
    let (before, after) = preferred.split_at(turn.checked_rem(run).unwrap_or(0));
    let mut preferred = after.iter().chain(before).copied();
    let mut others = others.iter().copied();
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
pub async fn race<T, E, Fut>(
    addrs: impl IntoIterator<Item = SocketAddr>,
    delay: Duration,
    limit: Option<Duration>,
    mut attempt: impl FnMut(SocketAddr) -> Fut,
) -> Result<Won<T, E>, Failures<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = limit.map(|limit| Instant::now() + limit);
    let mut addrs = addrs.into_iter().peekable();
    let mut running = FuturesUnordered::new();
    let mut started = Vec::new();
    let mut failed = Vec::new();
    // The addresses started that neither failed nor won.
    let unanswered =
        |started: Vec<SocketAddr>, failed: &[(SocketAddr, E)], won: Option<SocketAddr>| {
            let mut unanswered = started;
            unanswered.retain(|a| Some(*a) != won && !failed.iter().any(|(f, _)| f == a));
            unanswered
        };
    loop {
        // The first address, the next after a failure, or the next after `delay`.
        if let Some(addr) = addrs.next() {
            started.push(addr);
            let connecting = attempt(addr);
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
                let unanswered = unanswered(started, &failed, Some(addr));
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
pub struct Won<T, E> {
    /// What the winning attempt gave.
    pub value: T,
    /// The address it was made to.
    pub addr: SocketAddr,
    /// The attempts that failed before it answered, and those still running then (dropped).
    pub passed_over: Failures<E>,
}

/// The addresses a dial tried without success: those that failed, with their errors in the
/// order they came, and those that had not answered when the dial ended.
#[derive(Debug)]
pub struct Failures<E> {
    /// Each address that failed, with why.
    pub failed: Vec<(SocketAddr, E)>,
    /// Each address still without an answer.
    pub unanswered: Vec<SocketAddr>,
}

impl<E> Failures<E> {
    /// Whether every address tried answered.
    pub fn is_empty(&self) -> bool {
        self.failed.is_empty() && self.unanswered.is_empty()
    }
}

impl<E: fmt::Display> fmt::Display for Failures<E> {
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

impl<E: fmt::Debug + fmt::Display> std::error::Error for Failures<E> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn order(list: &[SocketAddr], turn: usize) -> Vec<SocketAddr> {
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
        Result<Won<SocketAddr, &'static str>, Failures<&'static str>>,
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
