//! The one retry policy: which failures are worth retrying, and how long to wait between tries.
//!
//! Every retry site in the crate goes through [`retry`] (a request retried as a whole) or a
//! [`Backoff`] (a loop that reopens something, like a change stream reader); [`Backoff::wait`]
//! is the only place that sleeps between attempts. The failure model is the README's "What
//! happens when…": transient errors are retried with capped exponential backoff and jitter —
//! forever while running, up to `sync.startup_timeout` for servers unreachable at start.

use std::future::Future;
use std::time::{Duration, Instant};

use mongodb::error::{Error, ErrorKind as DriverErrorKind, WriteFailure};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::error::ErrorKind;

/// Server error codes that go away by themselves (network, elections, shutdowns, conflicts).
const TRANSIENT_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    24,    // LockTimeout
    43,    // CursorNotFound (a change stream reopens from its token)
    46,    // LockBusy
    50,    // MaxTimeMSExpired
    64,    // WriteConcernFailed (wtimeout)
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    112,   // WriteConflict
    133,   // FailedToSatisfyReadPreference
    189,   // PrimarySteppedDown
    234,   // RetryChangeStream
    251,   // NoSuchTransaction
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11601, // Interrupted
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

/// Codes that mean the change stream cannot resume from the given position.
const HISTORY_LOST_CODES: &[i32] = &[
    136, // CappedPositionLost
    260, // InvalidResumeToken
    280, // ChangeStreamFatalError
    286, // ChangeStreamHistoryLost
];

pub const DUPLICATE_KEY: i32 = 11000;

/// Write concerns staging can never satisfy as configured: `UnknownReplWriteConcern` (a tag
/// the replica set does not define) and `UnsatisfiableWriteConcern` (more nodes than it has).
/// Retrying cannot help: these are fatal and name `sync.write_concern`.
pub const WRITE_CONCERN_UNSATISFIABLE: &[i32] = &[79, 100];

/// How many characters of a server's message an error shows.
pub const DETAIL_CHARS: usize = 240;

/// What a driver error means for us: transient, history lost, or (anything else) a failure a
/// retry cannot fix — poison when it concerns one change.
pub fn classify(err: &Error) -> ErrorKind {
    if err.contains_label("ResumableChangeStreamError")
        || err.contains_label("RetryableWriteError")
        || err.contains_label("TransientTransactionError")
    {
        return ErrorKind::Transient;
    }
    match err.kind.as_ref() {
        DriverErrorKind::Io(_)
        | DriverErrorKind::ConnectionPoolCleared { .. }
        | DriverErrorKind::ServerSelection { .. }
        | DriverErrorKind::DnsResolve { .. }
        | DriverErrorKind::Shutdown => ErrorKind::Transient,
        DriverErrorKind::Command(c) => classify_code(c.code, &c.message),
        DriverErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            classify_code(w.code, &w.message)
        }
        DriverErrorKind::Write(WriteFailure::WriteError(w)) => classify_code(w.code, &w.message),
        DriverErrorKind::MissingResumeToken => ErrorKind::HistoryLost,
        _ => ErrorKind::Poison,
    }
}

pub fn classify_code(code: i32, message: &str) -> ErrorKind {
    if WRITE_CONCERN_UNSATISFIABLE.contains(&code) {
        return ErrorKind::Fatal;
    }
    if HISTORY_LOST_CODES.contains(&code) {
        return ErrorKind::HistoryLost;
    }
    if TRANSIENT_CODES.contains(&code) {
        return ErrorKind::Transient;
    }
    let m = message.to_ascii_lowercase();
    if m.contains("resume")
        && (m.contains("not found") || m.contains("no longer") || m.contains("history"))
    {
        return ErrorKind::HistoryLost;
    }
    ErrorKind::Poison
}

/// The error code of a command or write error, if the server sent one.
pub fn command_code(err: &Error) -> Option<i32> {
    match err.kind.as_ref() {
        DriverErrorKind::Command(c) => Some(c.code),
        DriverErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        DriverErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        _ => None,
    }
}

/// A short description of a driver error for messages and logs: the kind, and for server errors
/// the code, its name and the server's message — never the driver's hex dump of the whole
/// server reply, which its own `Display` appends. At most [`DETAIL_CHARS`] characters.
pub fn describe(err: &Error) -> String {
    let text = match err.kind.as_ref() {
        DriverErrorKind::Command(c) => {
            format!("error {} ({}): {}", c.code, c.code_name, c.message)
        }
        DriverErrorKind::Write(WriteFailure::WriteConcernError(w)) => format!(
            "write concern error {} ({}): {}",
            w.code, w.code_name, w.message
        ),
        DriverErrorKind::Write(WriteFailure::WriteError(w)) => {
            format!("write error {}: {}", w.code, w.message)
        }
        other => other.to_string(),
    };
    excerpt(&text, DETAIL_CHARS)
}

/// `text` cut to at most `max` characters (an ellipsis marks the cut).
pub fn excerpt(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// How to retry: capped exponential backoff with jitter, optionally giving up after a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first pause.
    pub initial: Duration,
    /// Pauses double up to this.
    pub max_delay: Duration,
    /// Randomise each pause within [delay/2, delay], so many retrying tasks do not march in step.
    pub jitter: bool,
    /// Stop retrying once this much time has passed since the first failure (`None`: never).
    pub give_up_after: Option<Duration>,
}

impl Default for RetryPolicy {
    /// 100 ms doubling to 10 s, with jitter, forever: outages while running (lag grows,
    /// nothing is skipped).
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            jitter: true,
            give_up_after: None,
        }
    }
}

impl RetryPolicy {
    /// The default policy, giving up after `deadline`.
    pub fn until(deadline: Duration) -> RetryPolicy {
        RetryPolicy {
            give_up_after: Some(deadline),
            ..RetryPolicy::default()
        }
    }

    pub fn backoff(&self) -> Backoff {
        Backoff {
            policy: *self,
            attempt: 0,
            since: None,
        }
    }
}

/// The state of one sequence of retries.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    attempt: u32,
    /// When the first failure of this sequence happened.
    since: Option<Instant>,
}

/// What [`Backoff::wait`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The pause is over: try again.
    Retry,
    /// Stopping (SIGINT/SIGTERM) during the pause.
    Stopped,
    /// Past the policy's deadline: give up.
    GaveUp,
}

impl Backoff {
    /// The next pause: the ceiling doubles up to `max_delay`; with jitter, random in
    /// [ceiling/2, ceiling].
    pub fn next_delay(&mut self) -> Duration {
        self.since.get_or_insert_with(Instant::now);
        let ceiling = self
            .policy
            .initial
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.policy.max_delay);
        self.attempt = self.attempt.saturating_add(1);
        if !self.policy.jitter {
            return ceiling;
        }
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Records a failure and pauses before the next attempt, unless stopping or past the
    /// deadline. The only sleep between retries in the crate.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> Wait {
        if self.expired() {
            return Wait::GaveUp;
        }
        let mut delay = self.next_delay();
        if let (Some(limit), Some(since)) = (self.policy.give_up_after, self.since) {
            delay = delay.min(limit.saturating_sub(since.elapsed()));
        }
        tokio::select! {
            _ = shutdown.cancelled() => Wait::Stopped,
            _ = tokio::time::sleep(delay) => Wait::Retry,
        }
    }

    /// True once the deadline (if any) has passed since the first failure.
    pub fn expired(&self) -> bool {
        match (self.policy.give_up_after, self.since) {
            (Some(limit), Some(since)) => since.elapsed() >= limit,
            _ => false,
        }
    }

    /// Failures so far in this sequence.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// How long this sequence of failures has lasted.
    pub fn failing_for(&self) -> Duration {
        self.since.map(|s| s.elapsed()).unwrap_or_default()
    }

    /// After a success: the next failure starts a new sequence.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.since = None;
    }
}

/// How a [`retry`] ended when it did not succeed.
#[derive(Debug)]
pub enum Gave<E> {
    /// Stopping (SIGINT/SIGTERM) while retrying.
    Stopped,
    /// The error was not worth retrying, or the deadline passed: the last error.
    Up(E),
}

/// Runs `attempt` until it succeeds, pausing per `policy` after each failure that `retryable`
/// accepts. `observe` sees every failure (for logging once, counting retries) with the backoff
/// state. Returns the value and how many failures preceded it.
pub async fn retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    shutdown: &CancellationToken,
    mut attempt: F,
    retryable: impl Fn(&E) -> bool,
    mut observe: impl FnMut(&E, &Backoff),
) -> Result<(T, u32), Gave<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = policy.backoff();
    loop {
        match attempt().await {
            Ok(v) => return Ok((v, backoff.attempts())),
            Err(e) => {
                if !retryable(&e) {
                    return Err(Gave::Up(e));
                }
                observe(&e, &backoff);
                match backoff.wait(shutdown).await {
                    Wait::Retry => {}
                    Wait::Stopped => return Err(Gave::Stopped),
                    Wait::GaveUp => return Err(Gave::Up(e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        assert_eq!(classify_code(112, "WriteConflict"), ErrorKind::Transient);
        assert_eq!(classify_code(10107, "not primary"), ErrorKind::Transient);
        assert_eq!(classify_code(286, ""), ErrorKind::HistoryLost);
        assert_eq!(
            classify_code(2, "resume token was not found"),
            ErrorKind::HistoryLost
        );
        assert_eq!(
            classify_code(DUPLICATE_KEY, "E11000 duplicate key"),
            ErrorKind::Poison
        );
        assert_eq!(
            classify_code(10334, "BSONObjectTooLarge"),
            ErrorKind::Poison
        );
        assert_eq!(
            classify_code(79, "No write concern mode named 'bogus'"),
            ErrorKind::Fatal
        );
        assert_eq!(
            classify_code(100, "Not enough data-bearing nodes"),
            ErrorKind::Fatal
        );
    }

    #[test]
    fn excerpts_are_bounded() {
        assert_eq!(excerpt("short", 10), "short");
        let long = "x".repeat(1000);
        let cut = excerpt(&long, 20);
        assert_eq!(cut.chars().count(), 20);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        let mut b = policy.backoff();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1), "{d:?}");
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_millis(500), "{late:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn without_jitter_the_delays_are_exact() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            jitter: false,
            give_up_after: None,
        };
        let mut b = policy.backoff();
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [10, 20, 40, 40, 40]);
    }

    #[tokio::test]
    async fn retry_gives_up_at_the_deadline_with_the_last_error() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            jitter: false,
            give_up_after: Some(Duration::from_millis(50)),
        };
        let mut calls = 0;
        let started = Instant::now();
        let result: Result<((), u32), Gave<u32>> = retry(
            &policy,
            &CancellationToken::new(),
            || {
                calls += 1;
                let n = calls;
                async move { Err(n) }
            },
            |_| true,
            |_, _| {},
        )
        .await;
        match result {
            Err(Gave::Up(last)) => assert_eq!(last, calls),
            other => panic!("expected to give up, got {other:?}"),
        }
        assert!(calls > 3, "retried only {calls} times");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn retry_stops_on_shutdown_and_skips_unretryable_errors() {
        let stop = CancellationToken::new();
        stop.cancel();
        let r: Result<((), u32), Gave<&str>> = retry(
            &RetryPolicy::default(),
            &stop,
            || async { Err("down") },
            |_| true,
            |_, _| {},
        )
        .await;
        assert!(matches!(r, Err(Gave::Stopped)));
        let r: Result<((), u32), Gave<&str>> = retry(
            &RetryPolicy::default(),
            &CancellationToken::new(),
            || async { Err("bad document") },
            |_| false,
            |_, _| {},
        )
        .await;
        assert!(matches!(r, Err(Gave::Up("bad document"))));
        let mut failures = 0;
        let r = retry(
            &RetryPolicy {
                initial: Duration::from_millis(1),
                ..RetryPolicy::default()
            },
            &CancellationToken::new(),
            || {
                failures += 1;
                let n = failures;
                async move {
                    if n < 3 {
                        Err("flaky")
                    } else {
                        Ok(n)
                    }
                }
            },
            |_| true,
            |_, _| {},
        )
        .await;
        assert_eq!(r.unwrap(), (3, 2));
    }
}
