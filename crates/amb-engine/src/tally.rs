//! Counting a tunnel connection's streams, so its loss is logged once; and what drains a
//! server's connection.

use std::sync::atomic::{AtomicUsize, Ordering};

use amb_proto::{DrainCause, StreamError};
use tokio::sync::{watch, Notify};

/// How a stream ended, as far as its tunnel connection's log line is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Ended on its own account: cleanly, refused, or reset by either end.
    Closed,
    /// Cut off because its tunnel connection was lost.
    ConnectionLost,
}

/// How long the owner of a lost tunnel connection waits for its streams to settle before it
/// logs the loss ([`StreamTally::cut_off_once_settled`]).
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Counts the streams of one tunnel connection, so that its loss is logged once, saying how many
/// streams it cut off, rather than once per stream.
#[derive(Debug, Default)]
pub struct StreamTally {
    running: AtomicUsize,
    lost: AtomicUsize,
    idle: Notify,
}

impl StreamEnd {
    /// How a stream that failed with `e` ended.
    pub fn of(e: &StreamError) -> Self {
        match e {
            StreamError::ConnectionLost(_) => StreamEnd::ConnectionLost,
            _ => StreamEnd::Closed,
        }
    }
}

impl StreamTally {
    /// Counts a stream as running until the returned guard drops; tell the guard how the
    /// stream ended with [`RunningStream::ended`]. (A guard, not a wrapping future: a future
    /// moved into another is stored twice, and these live as long as their connection.)
    pub fn start(&self) -> RunningStream<'_> {
        self.running.fetch_add(1, Ordering::Relaxed);
        RunningStream {
            tally: self,
            lost: false,
        }
    }

    /// Resolves once no stream runs. After a loss the cut-off streams end at once; callers
    /// bound the wait for one stuck elsewhere.
    pub async fn settled(&self) {
        loop {
            let idle = self.idle.notified();
            if self.running.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Streams running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Streams the connection's loss ended, plus those still running.
    pub fn cut_off(&self) -> usize {
        self.lost.load(Ordering::Relaxed) + self.running.load(Ordering::Relaxed)
    }

    /// [`cut_off`](Self::cut_off) once the streams settled, or after a second: a stream still
    /// running then is stuck, and cut off too.
    pub async fn cut_off_once_settled(&self) -> usize {
        let _ = tokio::time::timeout(SETTLE_LIMIT, self.settled()).await;
        self.cut_off()
    }
}

/// One running stream of a [`StreamTally`].
#[derive(Debug)]
pub struct RunningStream<'a> {
    tally: &'a StreamTally,
    lost: bool,
}

impl RunningStream<'_> {
    /// The stream ended this way.
    pub fn ended(mut self, end: StreamEnd) {
        self.lost = end == StreamEnd::ConnectionLost;
    }
}

impl Drop for RunningStream<'_> {
    fn drop(&mut self) {
        if self.lost {
            self.tally.lost.fetch_add(1, Ordering::Relaxed);
        }
        if self.tally.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tally.idle.notify_waiters();
        }
    }
}

/// What drains a server's tunnel connection: the server stopping, or the trust generation
/// moving past the one the connection was verified under.
#[derive(Clone, Debug)]
pub struct DrainWatch {
    /// Turns true when the server stops.
    pub stop: watch::Receiver<bool>,
    /// The trust generation: it moves when the trusted CAs change.
    pub trust: watch::Receiver<u64>,
    /// The generation the connection was verified under.
    pub verified_under: u64,
    /// Moves when a new configuration is in place: live streams are checked against it.
    pub reconfigured: watch::Receiver<u64>,
    /// A dialed connection's: turns true when its peer is dropped from the configuration.
    pub removed: Option<watch::Receiver<bool>>,
}

impl DrainWatch {
    /// Resolves when the connection should drain, with why.
    pub async fn asked(&mut self) -> DrainCause {
        let verified_under = self.verified_under;
        let removed = async {
            match &mut self.removed {
                Some(removed) => drop(removed.wait_for(|removed| *removed).await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.stop.wait_for(|stopping| *stopping) => DrainCause::Stopping,
            Ok(_) = self.trust.wait_for(|generation| *generation != verified_under) => {
                DrainCause::TrustChanged
            }
            () = removed => DrainCause::PeerRemoved,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn tally_counts_running_streams_and_those_the_loss_ended() {
        let tally = StreamTally::default();
        tally.start().ended(StreamEnd::Closed);
        assert_eq!(tally.cut_off(), 0, "a stream that ended on its own");
        tally.start().ended(StreamEnd::ConnectionLost);
        assert_eq!(tally.cut_off(), 1, "a stream the loss ended");
        assert!(poll_once(pin!(tally.settled())).is_ready(), "nothing runs");

        let running = tally.start();
        assert_eq!(tally.cut_off(), 2, "a running stream counts");
        let mut settled = pin!(tally.settled());
        assert!(poll_once(settled.as_mut()).is_pending(), "a stream runs");
        running.ended(StreamEnd::Closed);
        assert!(
            poll_once(settled.as_mut()).is_ready(),
            "the last stream ended"
        );
        assert_eq!(
            tally.cut_off(),
            1,
            "a running stream that then ends on its own"
        );

        drop(tally.start());
        assert_eq!(
            tally.cut_off(),
            1,
            "a stream dropped unfinished is not a loss"
        );
    }
}
