//! Shapes a sequence's text as it is generated: reasoning (`<think>` … `</think>`)
//! apart from the answer, then stop strings on the answer.

use super::stop::{StopMatcher, StopOutcome};

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// Whether a request's completion starts in a reasoning block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningMode {
    /// Plain answer.
    Off,
    /// The completion opens with reasoning that `</think>` closes; `budget` caps
    /// its tokens, after which the engine closes it itself.
    On { budget: Option<usize> },
}

/// Text ready to release, split by where it belongs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Shaped {
    pub reasoning: String,
    pub content: String,
    /// A stop string matched: generation ends here.
    pub stopped: bool,
}

pub struct OutputShaper {
    thinking: Option<StopMatcher>,
    answer: StopMatcher,
    /// Leading whitespace after `</think>` is not part of the answer.
    trim_answer_start: bool,
}

impl OutputShaper {
    /// `keep_stop`: a matched stop string stays in the answer.
    pub fn new(reasoning: ReasoningMode, stops: Vec<String>, keep_stop: bool) -> Self {
        let answer = StopMatcher::new(stops);
        Self {
            thinking: matches!(reasoning, ReasoningMode::On { .. })
                .then(|| StopMatcher::new(vec![THINK_CLOSE.to_string()])),
            answer: if keep_stop { answer.keeping_stop() } else { answer },
            trim_answer_start: false,
        }
    }

    pub fn in_reasoning(&self) -> bool {
        self.thinking.is_some()
    }

    pub fn push(&mut self, text: &str) -> Shaped {
        let mut out = Shaped::default();
        let answer_text = match &mut self.thinking {
            Some(thinking) => match thinking.push(text) {
                StopOutcome::Continue(t) => {
                    out.reasoning = strip_open(t);
                    return out;
                }
                StopOutcome::Stopped(t) => {
                    out.reasoning = strip_open(t);
                    let rest = thinking.flush();
                    self.thinking = None;
                    self.trim_answer_start = true;
                    rest
                }
            },
            None => text.to_string(),
        };
        let answer_text = if self.trim_answer_start {
            let trimmed = answer_text.trim_start();
            if !trimmed.is_empty() {
                self.trim_answer_start = false;
            }
            trimmed.to_string()
        } else {
            answer_text
        };
        match self.answer.push(&answer_text) {
            StopOutcome::Continue(t) => out.content = t,
            StopOutcome::Stopped(t) => {
                out.content = t;
                out.stopped = true;
            }
        }
        out
    }

    /// Releases what is held back when generation ends without a stop string.
    pub fn finish(&mut self) -> Shaped {
        match self.thinking.take() {
            Some(mut thinking) => Shaped { reasoning: strip_open(thinking.flush()), ..Shaped::default() },
            None => Shaped { content: self.answer.flush(), ..Shaped::default() },
        }
    }
}

fn strip_open(text: String) -> String {
    match text.strip_prefix(THINK_OPEN) {
        Some(rest) => rest.to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_mode_passes_text_through_stops() {
        let mut s = OutputShaper::new(ReasoningMode::Off, vec!["!".into()], false);
        assert_eq!(s.push("<think>hi"), Shaped { content: "<think>hi".into(), ..Default::default() });
        assert_eq!(s.push(" there! x"), Shaped { content: " there".into(), stopped: true, ..Default::default() });
    }

    #[test]
    fn reasoning_then_answer_split_across_pieces() {
        let mut s = OutputShaper::new(ReasoningMode::On { budget: None }, vec![], false);
        assert_eq!(s.push("<think>"), Shaped::default());
        assert_eq!(s.push("\nLet me see.</th").reasoning, "\nLet me see.");
        assert!(s.in_reasoning());
        let out = s.push("ink>\n\nIt is 4.");
        assert_eq!(out.reasoning, "");
        assert_eq!(out.content, "It is 4.");
        assert!(!s.in_reasoning());
    }

    #[test]
    fn stop_strings_do_not_apply_inside_reasoning() {
        let mut s = OutputShaper::new(ReasoningMode::On { budget: None }, vec!["STOP".into()], false);
        assert_eq!(s.push("a STOP b").reasoning, "a STOP b");
        let out = s.push("</think>ok STOP");
        assert_eq!(out.content, "ok ");
        assert!(out.stopped);
    }

    #[test]
    fn unfinished_reasoning_is_flushed_as_reasoning() {
        let mut s = OutputShaper::new(ReasoningMode::On { budget: None }, vec![], false);
        s.push("thinking </thi");
        assert_eq!(s.finish().reasoning, "</thi");
    }
}
