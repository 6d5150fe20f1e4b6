//! Keeps repeated per-change warnings from flooding the log: the first few of each interval
//! are logged as they come, the rest are counted and reported in one summary line.
//!
//! A poison burst (say 50 000 changes refused by a staging validator) would otherwise write
//! 50 000 warning lines; the metrics and the dead-letter queue carry the detail.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to do with one occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` more occurrences were swallowed in the interval that just ended
    /// (0: nothing to summarise).
    Log { suppressed: u64 },
    /// Count it, don't log it.
    Suppress,
}

#[derive(Debug)]
pub struct LogThrottle {
    burst: u32,
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    admitted: u32,
    suppressed: u64,
}

impl LogThrottle {
    /// Lets `burst` occurrences per `interval` through.
    pub fn new(burst: u32, interval: Duration) -> LogThrottle {
        LogThrottle {
            burst,
            interval,
            state: Mutex::new(State {
                window_start: None,
                admitted: 0,
                suppressed: 0,
            }),
        }
    }

    /// Decides about one occurrence at `now`.
    pub fn admit(&self, now: Instant) -> Verdict {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut carried = 0;
        let expired = s
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if expired {
            carried = std::mem::take(&mut s.suppressed);
            s.window_start = Some(now);
            s.admitted = 0;
        }
        if s.admitted < self.burst {
            s.admitted += 1;
            Verdict::Log {
                suppressed: carried,
            }
        } else {
            s.suppressed += 1;
            Verdict::Suppress
        }
    }

    /// Occurrences swallowed since the last summary, if the interval is over (then resets);
    /// for a summary when the burst has ended.
    pub fn take_due_summary(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let due = s
            .window_start
            .is_some_and(|start| now.saturating_duration_since(start) >= self.interval);
        if due && s.suppressed > 0 {
            s.window_start = Some(now);
            s.admitted = 0;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_few_per_interval_then_summarises_the_rest() {
        let t = LogThrottle::new(3, Duration::from_secs(60));
        let start = Instant::now();
        let verdicts: Vec<Verdict> = (0..10).map(|_| t.admit(start)).collect();
        assert_eq!(
            verdicts
                .iter()
                .filter(|v| matches!(v, Verdict::Log { .. }))
                .count(),
            3
        );
        assert_eq!(t.take_due_summary(start + Duration::from_secs(30)), None);
        // The next interval: the first occurrence carries the count of the last one.
        assert_eq!(
            t.admit(start + Duration::from_secs(61)),
            Verdict::Log { suppressed: 7 }
        );
        for _ in 0..5 {
            t.admit(start + Duration::from_secs(62));
        }
        // A burst that ended: the summary comes when asked after the interval.
        assert_eq!(t.take_due_summary(start + Duration::from_secs(100)), None);
        assert_eq!(
            t.take_due_summary(start + Duration::from_secs(122)),
            Some(3)
        );
        assert_eq!(t.take_due_summary(start + Duration::from_secs(200)), None);
    }
}
