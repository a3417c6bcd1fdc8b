//! The access log: one `info` line per app connection when it ends, under the target
//! `amb::access` (so a log filter can route or silence it): the route, who was on the other end,
//! the upstream, bytes each way, how long it lasted and how it ended. Both sides write it; the
//! binary's `--access-log off` turns it off. A stream its client cancelled before the server
//! answered is counted in the metrics but has no server line (the client's side has one).

use std::fmt::Display;

use amb_metrics::ConnectionEnd;
use tokio::time::Instant;
use tracing::info;

/// One app connection, as its access line tells it.
pub(crate) struct Access<'a> {
    /// The route it asked for.
    pub route: &'a dyn Display,
    /// The app's address (on the client).
    pub app: Option<&'a dyn Display>,
    /// The other ambassador: on the server the verified peer, on the client the server that
    /// carried it (none if it was refused before one was chosen).
    pub peer: Option<&'a dyn Display>,
    /// The upstream dialed (on the server).
    pub upstream: Option<&'a dyn Display>,
    /// Bytes from the app toward the service.
    pub up: u64,
    /// Bytes from the service back to the app.
    pub down: u64,
    /// When the connection arrived.
    pub since: Instant,
    /// How it ended.
    pub end: ConnectionEnd,
    /// Why it was refused or reset, if it was.
    pub reason: Option<&'a dyn Display>,
}

impl Access<'_> {
    /// Writes the line, if the access log is on.
    pub fn log(self, enabled: bool) {
        if !enabled {
            return;
        }
        let Access {
            route,
            app,
            peer,
            upstream,
            up,
            down,
            since,
            end,
            reason,
        } = self;
        info!(
            target: "amb::access",
            %route,
            app = app.map(tracing::field::display),
            peer = peer.map(tracing::field::display),
            upstream = upstream.map(tracing::field::display),
            up,
            down,
            duration = ?since.elapsed(),
            end = %end.as_str(),
            reason = reason.map(tracing::field::display),
            "connection ended"
        );
    }
}
