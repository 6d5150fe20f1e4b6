//! Which failures are worth retrying, and how long to wait between tries.
//!
//! The failure model (README, "What happens when…"): a *transient* error (network, elections,
//! write conflicts, timeouts) is retried forever with capped exponential backoff and jitter, so
//! lag grows but nothing is skipped; a *permanent* error of one change sends that change to the
//! dead-letter queue; *history lost* means production no longer has the resume position.

use std::time::Duration;

use mongodb::error::{Error, ErrorKind, WriteFailure};
use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Try again later: the same request may well succeed.
    Transient,
    /// Production's oplog no longer holds the resume position (or the token is unusable).
    HistoryLost,
    /// A retry cannot fix this (bad document, key collision, validation, ...).
    Permanent,
}

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

pub fn classify(err: &Error) -> Failure {
    if err.contains_label("ResumableChangeStreamError")
        || err.contains_label("RetryableWriteError")
        || err.contains_label("TransientTransactionError")
    {
        return Failure::Transient;
    }
    match err.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Shutdown => Failure::Transient,
        ErrorKind::Command(c) => classify_code(c.code, &c.message),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => classify_code(w.code, &w.message),
        ErrorKind::Write(WriteFailure::WriteError(w)) => classify_code(w.code, &w.message),
        ErrorKind::MissingResumeToken => Failure::HistoryLost,
        _ => Failure::Permanent,
    }
}

pub fn classify_code(code: i32, message: &str) -> Failure {
    if HISTORY_LOST_CODES.contains(&code) {
        return Failure::HistoryLost;
    }
    if TRANSIENT_CODES.contains(&code) {
        return Failure::Transient;
    }
    let m = message.to_ascii_lowercase();
    if m.contains("resume")
        && (m.contains("not found") || m.contains("no longer") || m.contains("history"))
    {
        return Failure::HistoryLost;
    }
    Failure::Permanent
}

/// The error code of a command or write error, if the server sent one.
pub fn command_code(err: &Error) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        _ => None,
    }
}

/// An error [`classify`] treats as transient, for conditions found in a reply rather than raised
/// by the driver (e.g. a `writeConcernError` inside an `ok: 1` reply).
pub fn transient_error(message: String) -> Error {
    Error::from(std::io::Error::new(std::io::ErrorKind::TimedOut, message))
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next pause: random in [ceiling/2, ceiling], ceiling doubling up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        assert_eq!(classify_code(112, "WriteConflict"), Failure::Transient);
        assert_eq!(classify_code(10107, "not primary"), Failure::Transient);
        assert_eq!(classify_code(286, ""), Failure::HistoryLost);
        assert_eq!(
            classify_code(2, "resume token was not found"),
            Failure::HistoryLost
        );
        assert_eq!(
            classify_code(DUPLICATE_KEY, "E11000 duplicate key"),
            Failure::Permanent
        );
        assert_eq!(
            classify_code(10334, "BSONObjectTooLarge"),
            Failure::Permanent
        );
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
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
}
