//! Where a worker's start-up goes, phase by phase (reading the file's header,
//! the tokenizer, the weights with their repacking, the engine with its KV
//! cache), reported in one log line once it is ready.

use std::fmt;
use std::time::{Duration, Instant};

/// Phases timed one after another from a start.
#[derive(Debug, Clone)]
pub struct Phases {
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Default for Phases {
    fn default() -> Self {
        Self::since(Instant::now())
    }
}

impl Phases {
    pub fn since(start: Instant) -> Self {
        Self { last: start, done: Vec::new() }
    }

    /// Ends phase `name` now; the next one starts.
    pub fn end(&mut self, name: &'static str) {
        let now = Instant::now();
        self.done.push((name, now.saturating_duration_since(self.last)));
        self.last = now;
    }

    /// Appends `other`'s phases after this one's (a nested loader's).
    pub fn extend(&mut self, other: Phases) {
        self.done.extend(other.done);
        self.last = other.last.max(self.last);
    }

    pub fn total(&self) -> Duration {
        self.done.iter().map(|(_, d)| *d).sum()
    }
}

impl fmt::Display for Phases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, took)) in self.done.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{name} {:.3} s", took.as_secs_f64())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_each_other_and_add_up() {
        let start = Instant::now();
        let mut outer = Phases::since(start);
        outer.end("header");
        let mut inner = Phases::default();
        std::thread::sleep(Duration::from_millis(5));
        inner.end("weights");
        outer.extend(inner);
        outer.end("engine");
        let text = outer.to_string();
        assert!(text.starts_with("header ") && text.contains(", weights 0.0") && text.contains(", engine "), "{text}");
        assert!(outer.total() >= Duration::from_millis(5));
        assert!(outer.total() <= start.elapsed());
    }
}
