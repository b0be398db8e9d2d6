//! Per-object failure streaks: how long to wait before trying an object again,
//! and whether a failure is news worth a log line (a failure that repeats with
//! the same message is logged once, not on every retry).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::Error;

/// Longest wait between two tries of a failing object.
const MAX_DELAY: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
pub struct Backoff {
    streaks: Mutex<HashMap<String, Streak>>,
}

#[derive(Debug)]
struct Streak {
    failures: u32,
    message: String,
}

/// What to do after a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    pub after: Duration,
    /// The first failure of a streak, or one with a new message.
    pub news: bool,
    pub failures: u32,
}

impl Backoff {
    /// Records a failure of the object `key` and says when to try it again.
    pub fn failed(&self, key: &str, error: &Error) -> Retry {
        let message = error.to_string();
        let mut streaks = self.streaks.lock().unwrap_or_else(|p| p.into_inner());
        let streak = streaks.entry(key.to_string()).or_insert(Streak { failures: 0, message: String::new() });
        streak.failures = streak.failures.saturating_add(1);
        let news = streak.failures == 1 || streak.message != message;
        streak.message = message;
        Retry { after: delay(error.kind(), streak.failures), news, failures: streak.failures }
    }

    /// Ends the object's failure streak.
    pub fn succeeded(&self, key: &str) {
        self.streaks.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// Doubles from a first delay that fits the kind of failure, up to [`MAX_DELAY`]:
/// a conflict clears at once, an unreachable API server in seconds, an object
/// the API server rejects only once someone edits the spec (which triggers a
/// reconcile by itself).
fn delay(kind: &str, failures: u32) -> Duration {
    let first = match kind {
        "conflict" => Duration::from_secs(1),
        "transport" | "api_server" => Duration::from_secs(5),
        "rejected" => Duration::from_secs(30),
        _ => Duration::from_secs(60),
    };
    first.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(message: &str) -> Error {
        Error::ChildRejected { child: "Service", code: 422, message: message.into() }
    }

    #[test]
    fn delays_double_up_to_the_cap_and_reset_on_success() {
        let backoff = Backoff::default();
        let delays: Vec<u64> = (0..7).map(|_| backoff.failed("ml/a", &rejected("bad")).after.as_secs()).collect();
        assert_eq!(delays, [30, 60, 120, 240, 480, 600, 600]);
        backoff.succeeded("ml/a");
        assert_eq!(backoff.failed("ml/a", &rejected("bad")).after, Duration::from_secs(30));
        assert_eq!(delay("conflict", 1), Duration::from_secs(1));
        assert_eq!(delay("transport", 3), Duration::from_secs(20));
        assert_eq!(delay("transport", u32::MAX), MAX_DELAY);
    }

    #[test]
    fn a_repeated_failure_is_news_once() {
        let backoff = Backoff::default();
        let news: Vec<bool> =
            ["a", "a", "a", "b", "b"].iter().map(|m| backoff.failed("ml/x", &rejected(m)).news).collect();
        assert_eq!(news, [true, false, false, true, false]);
        assert!(backoff.failed("ml/other", &rejected("a")).news, "streaks are per object");
    }
}
