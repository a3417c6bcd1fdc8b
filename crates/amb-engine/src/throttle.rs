//! At most one log line per second for conditions that can repeat thousands of times a second
//! (descriptor exhaustion, connection caps), saying how many were suppressed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Decides whether a repeated warning may be logged now.
#[derive(Debug, Default)]
pub(crate) struct LogThrottle {
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    const EVERY: Duration = Duration::from_secs(1);

    /// `Some(suppressed)` when a line may be written now (with how many were dropped since the
    /// last one), `None` when this occurrence should only be counted.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, suppressed) = &mut *state;
        match last {
            Some(at) if now.saturating_duration_since(*at) < Self::EVERY => {
                *suppressed += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_second_with_a_count() {
        let t = LogThrottle::default();
        let t0 = Instant::now();
        assert_eq!(t.allow_at(t0), Some(0));
        assert_eq!(t.allow_at(t0 + Duration::from_millis(10)), None);
        assert_eq!(t.allow_at(t0 + Duration::from_millis(20)), None);
        assert_eq!(t.allow_at(t0 + Duration::from_millis(1001)), Some(2));
    }
}
