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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_streams_per_connection: 4096,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            open_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// How often to send keep-alives so a healthy but quiet tunnel never reaches the idle timeout.
    pub fn keep_alive_interval(&self) -> Duration {
        self.idle_timeout / 3
    }
}
