//! One sequence (one choice of one request): its tokens, how many of them are in
//! the KV cache and in which blocks, and what happens to each token the model
//! yields for it. Sequences never run the model themselves; the scheduler
//! feeds their pending tokens to a batched forward pass.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::blocks::PrefixHash;
use super::detokenizer::Detokenizer;
use super::grammar::Constraint;
use super::output::{OutputShaper, ReasoningMode, Shaped};
use super::sampler::{Sampled, Sampler};
use super::{ChoiceUsage, Delta, Event, FinishReason, Stopping, TokenLogprob};

/// Text the engine inserts to end reasoning that ran out of budget.
const FORCED_THINK_CLOSE: &str = "\n</think>\n\n";

/// Where a sequence is in its life. The scheduler decides by it and moves it
/// only through the methods that change it ([`Sequence::begin`],
/// [`Sequence::advance`], [`Sequence::accept`], [`Sequence::preempt`] and the
/// ends); [`Sequence::consistent`] states what each phase implies of the
/// counters, and the scheduler's tests check it after every round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Several known tokens to compute, in chunks: the prompt, everything
    /// again after a preemption, or tokens a grammar forced.
    Prefill,
    /// One token to compute a step: the last sampled one (or the one prompt
    /// token the prefix cache left).
    Decode,
    /// Its blocks were taken back: it waits to be computed from the start.
    Preempted,
    /// Finished or cut short (a failed sequence is removed at once instead).
    Ended,
}

pub struct Sequence {
    pub request_id: u64,
    pub index: usize,
    /// Order of admission: the youngest sequence is preempted first.
    pub admitted: u64,
    phase: Phase,
    sampler: Sampler,
    detokenizer: Detokenizer,
    shaper: OutputShaper,
    events: mpsc::UnboundedSender<Event>,
    /// The prompt, then every token generated (the last one not yet computed).
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose keys and values are in the cache.
    pub computed: usize,
    /// KV blocks holding `tokens`, in order.
    pub blocks: Vec<u32>,
    /// Leading entries of `blocks` already given back because no layer reads
    /// their positions again (a model whose every layer attends within a
    /// window): they stay in the table as placeholders, never read.
    pub released: usize,
    /// Leading full blocks already offered to the prefix cache.
    pub registered: usize,
    /// The prefix hash of the last of those blocks (`cache_root` before the
    /// first), so each newly filled block chains from it instead of rehashing
    /// the prefix.
    pub prefix_hash: PrefixHash,
    /// Where the sequence's hash chain starts: its request's cache salt.
    pub cache_root: PrefixHash,
    /// Prompt tokens that came from the prefix cache at admission.
    pub cached_tokens: usize,
    /// Tokens the engine appends without sampling (closing a reasoning block).
    forced: VecDeque<u32>,
    /// The output format's matcher: masks the logits of answer tokens
    /// (reasoning is not constrained).
    constraint: Option<Constraint>,
    /// Special tokens written into the output as their text.
    shown: Vec<(u32, String)>,
    /// How long the last token's grammar mask took (for the metrics).
    pub mask_time: Option<Duration>,
    max_tokens: usize,
    stopping: Stopping,
    /// The prompt's scores (`prompt_logprobs` alternatives each), until sent.
    prompt_scores: Option<(usize, Vec<TokenLogprob>)>,
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
    pub constraint: Option<Constraint>,
    pub shown: Vec<(u32, String)>,
    pub stop: Vec<String>,
    pub stopping: Stopping,
    /// Score the prompt's tokens, with this many alternatives each.
    pub prompt_logprobs: Option<usize>,
    pub max_tokens: usize,
    pub events: mpsc::UnboundedSender<Event>,
    pub enqueued: Instant,
    /// The root of the prefix-cache hash chain ([`super::blocks::root_hash`] of the salt).
    pub cache_root: PrefixHash,
}

impl Sequence {
    pub fn new(spec: SequenceSpec, admitted: u64) -> Self {
        let thinking_budget = match spec.reasoning {
            ReasoningMode::On { budget } => budget,
            ReasoningMode::Off => None,
        };
        Self {
            request_id: spec.request_id,
            index: spec.index,
            admitted,
            phase: Phase::Prefill,
            sampler: spec.sampler,
            detokenizer: Detokenizer::new(spec.stopping.skip_special_tokens),
            shaper: OutputShaper::new(spec.reasoning, spec.stop, spec.stopping.include_stop_str_in_output),
            events: spec.events,
            prompt_len: spec.prompt.len(),
            tokens: spec.prompt,
            computed: 0,
            blocks: Vec::new(),
            released: 0,
            registered: 0,
            prefix_hash: spec.cache_root,
            cache_root: spec.cache_root,
            cached_tokens: 0,
            forced: VecDeque::new(),
            constraint: spec.constraint,
            shown: spec.shown,
            mask_time: None,
            max_tokens: spec.max_tokens,
            stopping: spec.stopping,
            prompt_scores: spec.prompt_logprobs.map(|n| (n, Vec::new())),
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

    /// Tokens not yet in the cache: the (rest of the) prompt, or the last token.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// A step computed `n` more of its tokens.
    pub fn advance(&mut self, n: usize) {
        debug_assert!(matches!(self.phase, Phase::Prefill | Phase::Decode), "advance in {:?}", self.phase);
        self.computed += n;
    }

    /// Gives its blocks back to be released and waits to be computed again
    /// from the start (its prefix hash back at the root).
    pub fn preempt(&mut self) -> Vec<u32> {
        self.phase = Phase::Preempted;
        self.computed = 0;
        // Scores not sent yet are computed again with the prompt.
        if let Some((_, scores)) = self.prompt_scores.as_mut() {
            scores.clear();
        }
        self.registered = 0;
        self.prefix_hash = self.cache_root;
        self.take_blocks()
    }

    /// Empties the block table; the blocks it still holds, to be released.
    pub fn take_blocks(&mut self) -> Vec<u32> {
        let mut blocks = std::mem::take(&mut self.blocks);
        blocks.drain(..self.released.min(blocks.len()));
        self.released = 0;
        blocks
    }

    /// The blocks it holds (the table past the released placeholders; the
    /// scheduler's tests count references against them).
    #[cfg(test)]
    pub fn held_blocks(&self) -> &[u32] {
        &self.blocks[self.released.min(self.blocks.len())..]
    }

    /// Admitted (again, after a preemption), with whatever the prefix cache
    /// gave it already counted as computed.
    pub fn begin(&mut self) {
        debug_assert!(matches!(self.phase, Phase::Prefill | Phase::Preempted), "begin in {:?}", self.phase);
        self.phase = self.running_phase();
    }

    fn running_phase(&self) -> Phase {
        if self.pending() > 1 {
            Phase::Prefill
        } else {
            Phase::Decode
        }
    }

    /// Whether the counters say what the phase does (the scheduler's tests ask after every round).
    #[cfg(test)]
    pub fn consistent(&self) -> bool {
        self.computed <= self.tokens.len()
            && self.registered <= self.blocks.len()
            && self.released <= self.registered
            && match self.phase {
                Phase::Prefill => self.pending() >= 1,
                Phase::Decode => self.pending() == 1,
                Phase::Preempted => {
                    self.blocks.is_empty() && self.computed == 0 && self.registered == 0 && self.released == 0
                }
                Phase::Ended => true,
            }
    }

    /// Whether its prompt is to be scored still: computed whole, every
    /// token's logits kept (a preempted sequence that sent its scores
    /// recomputes like any other).
    pub fn scores_prompt(&self) -> bool {
        self.prompt_scores.is_some() && self.computed < self.prompt_len
    }

    /// Scores the prompt token after position `at` with the logits computed there.
    pub fn score_prompt(&mut self, at: usize, logits: &[f32], ctx: &StepContext<'_>) {
        let Some((n, scores)) = self.prompt_scores.as_mut() else { return };
        if let Some(&token) = self.tokens.get(at + 1).filter(|_| at + 1 < self.prompt_len) {
            scores.push(ctx.describe(&self.sampler.score(logits, token, *n)));
        }
    }

    /// Sends the prompt's scores once the whole prompt is computed.
    pub fn send_prompt_scores(&mut self) {
        if self.computed >= self.prompt_len {
            if let Some((_, scores)) = self.prompt_scores.take() {
                let delta = Delta { index: self.index, prompt_logprobs: Some(scores), ..Delta::default() };
                let _ = self.events.send(Event::Delta(delta));
            }
        }
    }

    /// Computes the grammar mask the next [`Sequence::accept`] applies, when
    /// there is one (run while the forward pass computes the logits).
    pub fn prepare_mask(&mut self) {
        if self.masked() {
            if let Some(constraint) = self.constraint.as_mut() {
                constraint.prepare();
            }
        }
    }

    /// Whether the next token is masked by a grammar.
    pub fn masked(&self) -> bool {
        self.forced.is_empty() && !self.shaper.in_reasoning() && self.constraint.as_ref().is_some_and(|c| c.active())
    }

    /// Handles the logits of the last token once every token is in the cache:
    /// samples (or takes a forced token) and emits what it adds to the output.
    /// Tokens the grammar forces after it are appended too; the next step
    /// computes them as one chunk.
    pub fn accept(&mut self, logits: &mut [f32], ctx: &StepContext<'_>) -> Result<StepOutcome, String> {
        if self.max_tokens == 0 {
            // Only the prompt was asked for (its scores).
            return Ok(self.finish(Shaped::default(), FinishReason::Length));
        }
        let forced = self.forced.pop_front();
        let guided = forced.is_none() && !self.shaper.in_reasoning();
        self.mask_time = None;
        let constrained = guided && self.constraint.as_ref().is_some_and(|c| c.active());
        if forced.is_none() && !constrained && self.usage.completion_tokens < self.stopping.min_tokens {
            // Nothing may end the answer yet (a grammar's own end is left to it).
            let model_ends = if self.stopping.ignore_eos { &[][..] } else { ctx.stop_ids };
            for &id in model_ends.iter().chain(&self.stopping.stop_token_ids) {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if let (true, Some(constraint)) = (guided, self.constraint.as_mut().filter(|c| c.active())) {
            self.mask_time = Some(constraint.mask(logits)?);
        }
        let sampled = match forced {
            Some(token) => self.sampler.forced(token),
            None => self.sampler.sample(logits),
        };
        let mut outcome = self.take(sampled, guided, ctx)?;
        if guided {
            let fixed = self.constraint.as_mut().map(Constraint::fast_forward).unwrap_or_default();
            for token in fixed {
                if matches!(outcome, StepOutcome::Finished) {
                    break;
                }
                let sampled = self.sampler.forced(token);
                outcome = self.take(sampled, false, ctx)?;
            }
        }
        if matches!(outcome, StepOutcome::Running) {
            // Tokens a grammar forced after the sampled one are computed together.
            self.phase = self.running_phase();
        }
        Ok(outcome)
    }

    /// Appends one token to the output; `guided`: the constraint (when there
    /// is one) has not seen it yet.
    fn take(&mut self, sampled: Sampled, guided: bool, ctx: &StepContext<'_>) -> Result<StepOutcome, String> {
        self.usage.completion_tokens += 1;
        let was_reasoning = self.shaper.in_reasoning();
        if was_reasoning {
            self.usage.reasoning_tokens += 1;
        }
        self.tokens.push(sampled.token);

        let model_end = !self.stopping.ignore_eos && ctx.stop_ids.contains(&sampled.token);
        if model_end && self.forced.is_empty() {
            // The end-of-sequence token itself is not part of the completion.
            self.usage.completion_tokens -= 1;
            let rest = self.drain(ctx.tokenizer)?;
            return Ok(self.finish(rest, FinishReason::Stop));
        }

        let mut text = self.detokenizer.push(ctx.tokenizer, sampled.token)?;
        if self.stopping.stop_token_ids.contains(&sampled.token) && self.forced.is_empty() {
            // A requested stop token counts and keeps its text (none for a special token).
            let mut shaped = self.shaper.push(&text);
            if !shaped.stopped {
                let rest = self.drain(ctx.tokenizer)?;
                shaped.reasoning.push_str(&rest.reasoning);
                shaped.content.push_str(&rest.content);
            }
            let logprobs = (self.sampler.reports_logprobs() && !was_reasoning).then(|| ctx.describe(&sampled));
            self.emit(Shaped { stopped: false, ..shaped }, logprobs);
            return Ok(self.finish(Shaped::default(), FinishReason::Stop));
        }
        // (Without skipping, the detokenizer wrote the marker already.)
        if let Some((_, shown)) =
            self.shown.iter().find(|(id, _)| *id == sampled.token).filter(|_| self.stopping.skip_special_tokens)
        {
            text.push_str(shown);
        }
        if let (true, Some(constraint)) = (guided, &mut self.constraint) {
            constraint.advance(sampled.token, &text)?;
        }
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
            prompt_logprobs: None,
        }));
    }

    fn finish(&mut self, last: Shaped, reason: FinishReason) -> StepOutcome {
        self.phase = Phase::Ended;
        self.emit(last, None);
        let usage = ChoiceUsage { cached_tokens: self.cached_tokens, ..self.usage };
        let _ = self.events.send(Event::Finished { index: self.index, reason, usage });
        StepOutcome::Finished
    }

    /// Ends the sequence early at `length`: the KV cache cannot hold it any longer.
    pub fn truncate(&mut self, tokenizer: &tokenizers::Tokenizer) -> Result<(), String> {
        let rest = self.drain(tokenizer)?;
        self.finish(Shaped { stopped: false, ..rest }, FinishReason::Length);
        Ok(())
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
        let text = |id: u32| crate::model::tokenizer::token_text(self.tokenizer, id);
        TokenLogprob {
            token: text(sampled.token),
            logprob: sampled.logprob,
            top: sampled.top.iter().map(|&(id, lp)| (text(id), lp)).collect(),
        }
    }
}
