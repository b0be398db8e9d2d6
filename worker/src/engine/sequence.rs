//! One sequence (one choice of one request) and the step that extends it by a token.

use std::collections::VecDeque;
use std::time::Instant;

use tokio::sync::mpsc;

use super::detokenizer::Detokenizer;
use super::output::{OutputShaper, ReasoningMode, Shaped};
use super::sampler::{Sampled, Sampler};
use super::{ChoiceUsage, Delta, Event, FinishReason, TokenLogprob};
use crate::model::Session;

/// Text the engine inserts to end reasoning that ran out of budget.
const FORCED_THINK_CLOSE: &str = "\n</think>\n\n";

pub struct Sequence {
    pub request_id: u64,
    pub index: usize,
    session: Box<dyn Session>,
    sampler: Sampler,
    detokenizer: Detokenizer,
    shaper: OutputShaper,
    events: mpsc::UnboundedSender<Event>,
    /// Tokens to feed on the next forward pass (the prompt, then the last token).
    pending_input: Vec<u32>,
    /// Tokens the engine appends without sampling (closing a reasoning block).
    forced: VecDeque<u32>,
    pub position: usize,
    max_tokens: usize,
    thinking_budget: Option<usize>,
    usage: ChoiceUsage,
    pub enqueued: Instant,
    pub last_token_at: Option<Instant>,
}

/// What a step did, for the scheduler's bookkeeping.
pub enum StepOutcome {
    Running,
    Finished,
}

pub struct SequenceSpec {
    pub request_id: u64,
    pub index: usize,
    pub prompt: Vec<u32>,
    pub sampler: Sampler,
    pub reasoning: ReasoningMode,
    pub stop: Vec<String>,
    pub max_tokens: usize,
    pub events: mpsc::UnboundedSender<Event>,
    pub enqueued: Instant,
}

impl Sequence {
    pub fn new(spec: SequenceSpec, session: Box<dyn Session>) -> Self {
        let thinking_budget = match spec.reasoning {
            ReasoningMode::On { budget } => budget,
            ReasoningMode::Off => None,
        };
        Self {
            request_id: spec.request_id,
            index: spec.index,
            session,
            sampler: spec.sampler,
            detokenizer: Detokenizer::default(),
            shaper: OutputShaper::new(spec.reasoning, spec.stop),
            events: spec.events,
            pending_input: spec.prompt,
            forced: VecDeque::new(),
            position: 0,
            max_tokens: spec.max_tokens,
            thinking_budget,
            usage: ChoiceUsage::default(),
            enqueued: spec.enqueued,
            last_token_at: None,
        }
    }

    /// The client went away: nobody reads this sequence's events any more.
    pub fn abandoned(&self) -> bool {
        self.events.is_closed()
    }

    /// Runs one forward pass and handles the token it yields.
    pub fn step(&mut self, ctx: &StepContext<'_>) -> Result<StepOutcome, String> {
        let input = std::mem::take(&mut self.pending_input);
        let mut logits = self
            .session
            .forward(&input, self.position)
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| format!("forward pass failed: {e}"))?;
        self.position += input.len();

        let sampled = match self.forced.pop_front() {
            Some(token) => Sampled { token, logprob: 0.0, top: Vec::new() },
            None => self.sampler.sample(&mut logits),
        };
        self.usage.completion_tokens += 1;
        let was_reasoning = self.shaper.in_reasoning();
        if was_reasoning {
            self.usage.reasoning_tokens += 1;
        }
        self.pending_input = vec![sampled.token];

        if ctx.stop_ids.contains(&sampled.token) && self.forced.is_empty() {
            // The end-of-sequence token itself is not part of the completion.
            self.usage.completion_tokens -= 1;
            let rest = self.drain(ctx.tokenizer)?;
            return Ok(self.finish(rest, FinishReason::Stop));
        }

        let text = self.detokenizer.push(ctx.tokenizer, sampled.token)?;
        let shaped = self.shaper.push(&text);
        // Reasoning tokens carry no log-probabilities.
        let logprobs = (self.sampler.reports_logprobs() && !was_reasoning).then(|| ctx.describe(&sampled));
        if shaped.stopped {
            return Ok(self.finish(shaped, FinishReason::Stop));
        }
        self.maybe_close_reasoning(ctx.tokenizer)?;
        if self.usage.completion_tokens >= self.max_tokens {
            let mut shaped = shaped;
            let rest = self.drain(ctx.tokenizer)?;
            if rest.stopped {
                self.emit(shaped, logprobs);
                return Ok(self.finish(Shaped { stopped: false, ..rest }, FinishReason::Stop));
            }
            shaped.reasoning.push_str(&rest.reasoning);
            shaped.content.push_str(&rest.content);
            self.emit(shaped, logprobs);
            return Ok(self.finish(Shaped::default(), FinishReason::Length));
        }
        self.emit(shaped, logprobs);
        Ok(StepOutcome::Running)
    }

    /// Everything still held back (undecoded bytes, partial stop strings) at the end.
    fn drain(&mut self, tokenizer: &tokenizers::Tokenizer) -> Result<Shaped, String> {
        let tail = self.detokenizer.flush(tokenizer)?;
        let mut shaped = self.shaper.push(&tail);
        if !shaped.stopped {
            let rest = self.shaper.finish();
            shaped.reasoning.push_str(&rest.reasoning);
            shaped.content.push_str(&rest.content);
        }
        Ok(shaped)
    }

    fn maybe_close_reasoning(&mut self, tokenizer: &tokenizers::Tokenizer) -> Result<(), String> {
        let Some(budget) = self.thinking_budget else { return Ok(()) };
        if self.shaper.in_reasoning() && self.forced.is_empty() && self.usage.reasoning_tokens >= budget {
            let ids = tokenizer.encode(FORCED_THINK_CLOSE, false).map_err(|e| e.to_string())?.get_ids().to_vec();
            self.forced.extend(ids);
            self.thinking_budget = None;
        }
        Ok(())
    }

    fn emit(&self, shaped: Shaped, logprobs: Option<TokenLogprob>) {
        if shaped.content.is_empty() && shaped.reasoning.is_empty() && logprobs.is_none() {
            return;
        }
        // A send fails only when the client left; the scheduler notices and drops us.
        let _ = self.events.send(Event::Delta(Delta {
            index: self.index,
            content: shaped.content,
            reasoning: shaped.reasoning,
            logprobs: logprobs.into_iter().collect(),
        }));
    }

    fn finish(&mut self, last: Shaped, reason: FinishReason) -> StepOutcome {
        self.emit(last, None);
        let _ = self.events.send(Event::Finished { index: self.index, reason, usage: self.usage });
        StepOutcome::Finished
    }

    pub fn fail(&self, message: &str) {
        let _ = self.events.send(Event::Failed { message: message.to_string() });
    }
}

/// Shared, read-only inputs of a step.
pub struct StepContext<'a> {
    pub tokenizer: &'a tokenizers::Tokenizer,
    pub stop_ids: &'a [u32],
}

impl StepContext<'_> {
    fn describe(&self, sampled: &Sampled) -> TokenLogprob {
        let text = |id: u32| self.tokenizer.decode(&[id], false).unwrap_or_default();
        TokenLogprob {
            token: text(sampled.token),
            logprob: sampled.logprob,
            top: sampled.top.iter().map(|&(id, lp)| (text(id), lp)).collect(),
        }
    }
}
