//! The token bucket behind every per-minute limit, as pure arithmetic: a bucket
//! holds up to `limit` and refills at `limit` per minute, continuously; a full
//! bucket is one that has not been used for a minute. The Redis store runs the
//! same arithmetic in a script ([`super::redis`]), on the server's clock.

use std::time::Duration;

/// A bucket's level at a moment (seconds on some clock).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub level: f64,
    pub at: f64,
}

impl Bucket {
    pub fn full(limit: u64, now: f64) -> Self {
        Self { level: limit as f64, at: now }
    }

    /// The level at `now`, refilled since the last reading.
    pub fn refilled(self, limit: u64, now: f64) -> Self {
        let rate = limit as f64 / 60.0;
        let level = (self.level + (now - self.at).max(0.0) * rate).min(limit as f64);
        Self { level, at: now.max(self.at) }
    }

    /// Time until the level reaches `wanted` (zero if it is there).
    pub fn time_to(self, wanted: f64, limit: u64) -> Duration {
        let rate = limit as f64 / 60.0;
        Duration::from_secs_f64(((wanted - self.level) / rate).max(0.0))
    }
}

/// One limit's standing after a request was admitted or refused: what the
/// `x-ratelimit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

impl Standing {
    pub fn of(bucket: Bucket, limit: u64) -> Self {
        Self { limit, remaining: bucket.level.max(0.0).floor() as u64, reset: bucket.time_to(limit as f64, limit) }
    }
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `250ms`, `1.5s`, `6m0s`.
pub fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let text = format!("{:.3}", ms as f64 / 1000.0);
        format!("{}s", text.trim_end_matches('0').trim_end_matches('.'))
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_at_the_limit_per_minute_up_to_the_limit() {
        let empty = Bucket { level: 0.0, at: 100.0 };
        assert_eq!(empty.refilled(60, 101.0).level, 1.0);
        assert_eq!(empty.refilled(60, 130.0).level, 30.0);
        assert_eq!(empty.refilled(60, 1000.0).level, 60.0);
        // A clock that steps back refills nothing and never moves the reading back.
        assert_eq!(empty.refilled(60, 99.0), empty);
        let debt = Bucket { level: -30.0, at: 0.0 };
        assert_eq!(debt.time_to(1.0, 60), Duration::from_secs(31));
        assert_eq!(debt.time_to(-40.0, 60), Duration::ZERO);
    }

    #[test]
    fn standing_reports_whole_remaining_and_time_to_full() {
        let s = Standing::of(Bucket { level: 4.5, at: 0.0 }, 10);
        assert_eq!((s.limit, s.remaining), (10, 4));
        assert_eq!(s.reset, Duration::from_secs(33));
        assert_eq!(Standing::of(Bucket { level: -3.0, at: 0.0 }, 10).remaining, 0);
    }

    #[test]
    fn durations_read_like_openais() {
        assert_eq!(openai_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(openai_duration(Duration::from_secs(2)), "2s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_millis(61_500)), "1m1s");
    }
}
