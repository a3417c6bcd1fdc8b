//! Which of a name's addresses a dial tries, in what order, and how the attempts overlap, after
//! Happy Eyeballs (RFC 8305). Nothing here does I/O: the caller passes the attempt, a TCP
//! connect for upstreams and TLS tunnels, a whole handshake for QUIC tunnels.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};

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
/// one succeeds the others are dropped (RFC 8305, section 5). When every one fails, the error
/// holds each address with its failure.
pub async fn race<T, E, Fut>(
    addrs: impl IntoIterator<Item = SocketAddr>,
    delay: Duration,
    mut attempt: impl FnMut(SocketAddr) -> Fut,
) -> Result<Won<T, E>, Failures<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut addrs = addrs.into_iter().peekable();
    let mut running = FuturesUnordered::new();
    let mut started = Vec::new();
    let mut failures = Vec::new();
    loop {
        // The first address, the next after a failure, or the next after `delay`.
        if let Some(addr) = addrs.next() {
            started.push(addr);
            let connecting = attempt(addr);
            running.push(async move { (addr, connecting.await) });
        }
        let finished = if addrs.peek().is_some() {
            match tokio::time::timeout(delay, running.next()).await {
                Ok(finished) => finished,
                Err(_) => continue,
            }
        } else {
            running.next().await
        };
        match finished {
            Some((addr, Ok(value))) => {
                let failed = Failures(failures);
                started.retain(|a| *a != addr && !failed.0.iter().any(|(f, _)| f == a));
                return Ok(Won {
                    value,
                    addr,
                    failed,
                    unanswered: started,
                });
            }
            Some((addr, Err(e))) => failures.push((addr, e)),
            None => return Err(Failures(failures)),
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
    /// The attempts that failed before it answered.
    pub failed: Failures<E>,
    /// The attempts still running when it answered, now dropped.
    pub unanswered: Vec<SocketAddr>,
}

impl<T, E: fmt::Display> Won<T, E> {
    /// What went wrong with the addresses tried before the winner, for a log line; `None` when
    /// the winner was the only address tried.
    pub fn passed_over(&self) -> Option<String> {
        if self.failed.is_empty() && self.unanswered.is_empty() {
            return None;
        }
        let failed = self.failed.0.iter().map(|(a, e)| format!("{a}: {e}"));
        let unanswered = self
            .unanswered
            .iter()
            .map(|a| format!("{a}: no answer yet"));
        Some(failed.chain(unanswered).collect::<Vec<_>>().join("; "))
    }
}

/// The addresses a dial tried, each with its error, in the order they failed.
#[derive(Debug)]
pub struct Failures<E>(pub Vec<(SocketAddr, E)>);

impl<E> Failures<E> {
    /// Whether no attempt failed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<E: fmt::Display> fmt::Display for Failures<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no address to try");
        }
        for (i, (addr, e)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{addr}: {e}")?;
        }
        Ok(())
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for Failures<E> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

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
        let result = race(list, ATTEMPT_DELAY, |addr| {
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
        let (result, took, started) = run(&[Outcome::Connects(10), Outcome::Connects(0)]).await;
        let won = result.unwrap();
        assert_eq!((won.value.port(), won.addr.port()), (1, 1));
        assert_eq!(won.passed_over(), None);
        assert_eq!(took, ms(10));
        assert_eq!(started, [1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_starts_the_next_address_at_once() {
        let (result, took, started) = run(&[Outcome::Fails(5), Outcome::Connects(10)]).await;
        let won = result.unwrap();
        assert_eq!(won.addr.port(), 2);
        assert_eq!(won.passed_over().unwrap(), "10.0.0.1:1: refused");
        assert_eq!(took, ms(15));
        assert_eq!(started, [1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_that_hangs_holds_the_dial_up_by_the_attempt_delay() {
        let script = [Outcome::Hangs, Outcome::Hangs, Outcome::Connects(10)];
        let (result, took, started) = run(&script).await;
        let won = result.unwrap();
        assert_eq!(won.addr.port(), 3);
        assert!(
            won.failed.is_empty(),
            "the hung attempts were dropped, not failed"
        );
        assert_eq!(took, ATTEMPT_DELAY * 2 + ms(10));
        assert_eq!(started, [1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_that_answers_first_wins() {
        // The first answers at 300 ms; the second, started at 250 ms, would at 350.
        let (result, took, _) = run(&[Outcome::Connects(300), Outcome::Connects(100)]).await;
        assert_eq!(result.unwrap().addr.port(), 1);
        assert_eq!(took, ms(300));
    }

    #[tokio::test(start_paused = true)]
    async fn every_failure_is_reported_in_the_order_they_came() {
        // The first fails at 400 ms, after the second (started at 250 ms) failed at 260.
        let (result, _, _) = run(&[Outcome::Fails(400), Outcome::Fails(10)]).await;
        let failures = result.unwrap_err();
        assert_eq!(
            failures.to_string(),
            "10.0.0.1:2: refused; 10.0.0.1:1: refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_address_is_a_failure() {
        let (result, took, started) = run(&[]).await;
        let failures = result.unwrap_err();
        assert_eq!(failures.to_string(), "no address to try");
        assert_eq!(took, Duration::ZERO);
        assert!(started.is_empty());
    }
}
