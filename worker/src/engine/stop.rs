//! Stop strings: text is released only once it cannot be the start of a stop
//! string, so a stop split across tokens is caught and never emitted.

#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text decoded but not yet released.
    pending: String,
    /// Release the stop string with the text before it (vLLM's
    /// `include_stop_str_in_output`).
    keep_stop: bool,
}

/// What one piece of new text leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text safe to release now (possibly empty), generation goes on.
    Continue(String),
    /// A stop string matched: release this text (what came before it) and finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new(), keep_stop: false }
    }

    /// Also releases the matched stop string itself.
    pub fn keeping_stop(self) -> Self {
        Self { keep_stop: true, ..self }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return StopOutcome::Continue(std::mem::take(&mut self.pending));
        }
        let first_match = self.stops.iter().filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s.len()))).min();
        if let Some((at, len)) = first_match {
            // What follows the stop string stays pending, for callers that go on.
            let after = self.pending.split_off(at + len);
            let mut released = std::mem::replace(&mut self.pending, after);
            released.truncate(if self.keep_stop { at + len } else { at });
            return StopOutcome::Stopped(released);
        }
        let hold = self.longest_partial_suffix();
        let cut = self.pending.len() - hold;
        let rest = self.pending.split_off(cut);
        StopOutcome::Continue(std::mem::replace(&mut self.pending, rest))
    }

    /// Releases held-back text (after a stop, the text that followed it).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length in bytes of the longest suffix of `pending` that begins some stop string.
    fn longest_partial_suffix(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            let max = stop.len().saturating_sub(1).min(self.pending.len());
            for len in (best + 1..=max).rev() {
                let start = self.pending.len() - len;
                if self.pending.is_char_boundary(start) && stop.starts_with(&self.pending[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StopOutcome::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn without_stops_everything_passes() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("hello"), Continue("hello".into()));
    }

    #[test]
    fn stop_inside_one_piece_is_cut() {
        let mut m = matcher(&["END"]);
        assert_eq!(m.push("abcENDdef"), Stopped("abc".into()));
    }

    /// `include_stop_str_in_output`: the stop string is released with what
    /// came before it, also when it arrived split.
    #[test]
    fn a_kept_stop_string_is_released_with_its_text() {
        let mut m = matcher(&["END"]).keeping_stop();
        assert_eq!(m.push("abcENDdef"), Stopped("abcEND".into()));
        let mut m = matcher(&["END"]).keeping_stop();
        assert_eq!(m.push("abE"), Continue("ab".into()));
        assert_eq!(m.push("ND!"), Stopped("END".into()));
    }

    #[test]
    fn stop_split_across_tokens_is_held_then_cut() {
        let mut m = matcher(&["\n\nUser:"]);
        assert_eq!(m.push("Sure.\n"), Continue("Sure.".into()));
        assert_eq!(m.push("\nUs"), Continue(String::new()));
        assert_eq!(m.push("er: hi"), Stopped(String::new()));
    }

    #[test]
    fn false_alarm_is_released() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("ST"), Continue(String::new()));
        assert_eq!(m.push("ART"), Continue("START".into()));
    }

    #[test]
    fn text_after_the_stop_stays_pending() {
        let mut m = matcher(&["</think>"]);
        assert_eq!(m.push("hmm</think>\n\nAnswer"), Stopped("hmm".into()));
        assert_eq!(m.flush(), "\n\nAnswer");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = matcher(&["world", "lo"]);
        assert_eq!(m.push("hello world"), Stopped("hel".into()));
    }

    #[test]
    fn flush_releases_the_held_tail() {
        let mut m = matcher(&["###"]);
        assert_eq!(m.push("a#"), Continue("a".into()));
        assert_eq!(m.flush(), "#");
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        let mut m = matcher(&["é!"]);
        assert_eq!(m.push("caféé"), Continue("café".into()));
        assert_eq!(m.push("!"), Stopped(String::new()));
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let mut m = matcher(&[""]);
        assert_eq!(m.push("x"), Continue("x".into()));
    }
}
