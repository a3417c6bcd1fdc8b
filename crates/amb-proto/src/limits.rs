//! Bounds shared by both transports: how much work a peer can cause, and how long silence lasts.

use std::time::Duration;

/// Per-connection bounds, applied the same way by QUIC and TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent streams one tunnel connection may carry.
    pub max_streams_per_connection: u32,
    /// A TLS or QUIC handshake not done by then is dropped.
    pub handshake_timeout: Duration,
    /// A tunnel connection silent this long (keep-alives included) is declared dead.
    pub idle_timeout: Duration,
    /// A stream whose open header or CONNECT is not complete by then is refused.
    pub open_timeout: Duration,
    /// How long live connections may run on after a shutdown signal; and how long after the
    /// trusted CAs changed a server's tunnel connection still draining is closed, streams and
    /// all, so a client that ignores the drain is not served for good.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_streams_per_connection: 32_768,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            open_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// How often to send keep-alives so a healthy but quiet tunnel never reaches the idle timeout.
    pub fn keep_alive_interval(&self) -> Duration {
        self.idle_timeout / 3
    }
}

/// How many client-caused refusals (bad request, forbidden, unknown route) and streams cancelled
/// by the client before they opened one tunnel connection may cause: a burst, then a steady
/// rate. Past it the connection is closed, so a peer cannot spin the server on refused streams
/// or drive a storm of upstream dials by opening and cancelling streams (rapid reset). Upstream
/// failures do not count: they are not the client's fault.
#[derive(Debug)]
pub struct RefusalBudget {
    state: std::sync::Mutex<(f64, std::time::Instant)>,
    burst: f64,
    per_second: f64,
}

impl RefusalBudget {
    /// Refusals allowed at once.
    pub const BURST: u32 = 64;
    /// Refusals allowed per second after the burst.
    pub const PER_SECOND: u32 = 16;

    /// A full budget.
    pub fn new() -> Self {
        Self::with(Self::BURST, Self::PER_SECOND, std::time::Instant::now())
    }

    fn with(burst: u32, per_second: u32, now: std::time::Instant) -> Self {
        RefusalBudget {
            state: std::sync::Mutex::new((f64::from(burst), now)),
            burst: f64::from(burst),
            per_second: f64::from(per_second),
        }
    }

    /// Spends one refusal; `false` means the budget is exhausted and the connection should go.
    pub fn spend(&self) -> bool {
        self.spend_at(std::time::Instant::now())
    }

    fn spend_at(&self, now: std::time::Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = &mut *state;
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Default for RefusalBudget {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let budget = RefusalBudget::with(4, 2, t0);
        assert!((0..4).all(|_| budget.spend_at(t0)));
        assert!(!budget.spend_at(t0), "burst exhausted");
        assert!(
            budget.spend_at(t0 + Duration::from_millis(500)),
            "one refilled after 0.5 s at 2/s"
        );
        assert!(!budget.spend_at(t0 + Duration::from_millis(500)));
        let later = t0 + Duration::from_secs(100);
        assert!(
            (0..4).all(|_| budget.spend_at(later)),
            "refills up to the burst, no more"
        );
        assert!(!budget.spend_at(later));
    }
}
