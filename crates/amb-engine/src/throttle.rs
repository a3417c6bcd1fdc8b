//! At most one log line per second for conditions that can repeat thousands of times a second
//! (descriptor exhaustion, connection caps, an upstream refusing, a flood of bad handshakes),
//! saying how many were suppressed: one [`LogThrottle`] per condition, or a [`LogThrottles`]
//! holding one per kind.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};
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

/// One [`LogThrottle`] per kind of failure (a handful: kinds are bounded by the configuration).
#[derive(Debug)]
pub(crate) struct LogThrottles<K>(Mutex<HashMap<K, LogThrottle>>);

impl<K> Default for LogThrottles<K> {
    fn default() -> Self {
        LogThrottles(Mutex::default())
    }
}

impl<K: Hash + Eq> LogThrottles<K> {
    /// [`LogThrottle::allow`] for `kind`.
    pub(crate) fn allow(&self, kind: K) -> Option<u64> {
        let mut kinds = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        kinds.entry(kind).or_default().allow()
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

    #[test]
    fn each_kind_has_its_own_second() {
        let t = LogThrottles::default();
        assert_eq!(t.allow("refused"), Some(0));
        assert_eq!(t.allow("timeout"), Some(0));
        assert_eq!(t.allow("refused"), None);
    }
}
