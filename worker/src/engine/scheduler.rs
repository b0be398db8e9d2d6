//! The engine thread's loop: continuous batching over a paged KV cache.
//!
//! Each step builds one batch under a token budget: one decode token for every
//! running sequence first, then prefill chunks of the others in admission
//! order, so a long prompt delays running streams by at most one chunk.
//! Sequences join when their prompt's blocks are available and leave when they
//! finish or their client goes; when a running sequence cannot grow, the
//! youngest is preempted (its blocks freed, its tokens recomputed later).

use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use super::blocks::{block_keys, chain_hash, BlockError, BlockKey, BlockPool, Held, PrefixHash};
use super::sampler::Sampler;
use super::sequence::{Phase, Sequence, SequenceSpec, StepContext, StepOutcome};
use super::{EngineConfig, ForwardPass, Load, Queued};
use crate::metrics::Metrics;
use crate::runtime::{Logits, StepSequence};

/// The other choices of an `n > 1` request: admitted once the first choice has
/// computed the prompt, sharing its full blocks instead of computing them again.
struct Fork {
    request_id: u64,
    specs: Vec<SequenceSpec>,
}

/// Waiting for admission: a new request, or a preempted sequence to recompute.
enum Waiting {
    Request(Box<Queued>),
    Preempted(Box<Sequence>),
}

pub struct Scheduler {
    /// The model and its KV cache, behind the one trait a test can fake.
    pass: Box<dyn ForwardPass>,
    tokenizer: Arc<tokenizers::Tokenizer>,
    /// Tokens that end a sequence.
    stop_ids: Vec<u32>,
    pool: BlockPool,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    load: Arc<Load>,
    rx: Receiver<Queued>,
    waiting: VecDeque<Waiting>,
    /// In admission order.
    running: Vec<Sequence>,
    forks: Vec<Fork>,
    /// The last step's logits (a buffer reused by every step).
    logits: Logits,
    next_request_id: u64,
    next_admission: u64,
}

impl Scheduler {
    pub(super) fn new(
        pass: Box<dyn ForwardPass>,
        tokenizer: Arc<tokenizers::Tokenizer>,
        stop_ids: Vec<u32>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
        load: Arc<Load>,
        rx: Receiver<Queued>,
    ) -> Self {
        let pool = BlockPool::new(config.num_blocks, config.block_size, config.prefix_cache);
        Self {
            pass,
            tokenizer,
            stop_ids,
            pool,
            config,
            metrics,
            load,
            rx,
            waiting: VecDeque::new(),
            running: Vec::new(),
            forks: Vec::new(),
            logits: Logits::default(),
            next_request_id: 0,
            next_admission: 0,
        }
    }

    pub fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(q) => self.waiting.push_back(Waiting::Request(Box::new(q))),
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(q) => self.waiting.push_back(Waiting::Request(Box::new(q))),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.running.is_empty() && self.waiting.is_empty() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.tick();
        }
    }

    /// One round of the loop once requests are in: drops what clients left,
    /// admits what fits, runs a step.
    fn tick(&mut self) {
        self.drop_abandoned();
        self.admit();
        self.publish_load();
        self.load.step(true);
        self.step();
        self.load.step(false);
        // Again after the step, so the gauges fall to zero before the thread idles.
        self.publish_load();
    }

    fn drop_abandoned(&mut self) {
        let mut gone_requests = 0;
        let mut freed = Vec::new();
        self.waiting.retain(|w| match w {
            Waiting::Request(q) if q.request.events.is_closed() => {
                gone_requests += 1;
                false
            }
            Waiting::Preempted(s) if s.abandoned() => false,
            _ => true,
        });
        self.load.waiting.fetch_sub(gone_requests, Ordering::SeqCst);
        self.running.retain_mut(|s| {
            if s.abandoned() {
                freed.append(&mut s.take_blocks());
                false
            } else {
                true
            }
        });
        self.forks.retain(|f| f.specs.first().is_some_and(|s| !s.events.is_closed()));
        let result = self.pool.release_all(&mut freed);
        self.check(result);
    }

    /// A reference-count error is a bug in this scheduler: logged loudly; the
    /// pool refused it, so no block is handed out twice.
    fn check(&self, result: Result<(), BlockError>) {
        if let Err(e) = result {
            tracing::error!(error = %e, "KV block accounting refused a change (a bug)");
        }
    }

    /// Sequences running plus the forks reserved for them.
    fn occupancy(&self) -> usize {
        self.running.len() + self.forks.iter().map(|f| f.specs.len()).sum::<usize>()
    }

    /// Admits waiting work in order while it fits: slots for all of a request's
    /// choices, and blocks for its prompt. The prefix cache's blocks for it are
    /// taken, not allocated; those of them nobody holds are idle and so counted
    /// in `available` already: they are taken out of it, so no block counts twice.
    fn admit(&mut self) {
        while let Some(front) = self.waiting.front() {
            let (tokens, slots, root, whole) = match front {
                Waiting::Request(q) => {
                    let whole = q.request.prompt_logprobs.is_some();
                    (q.request.prompt.as_slice(), q.request.n.max(1), q.cache_root, whole)
                }
                Waiting::Preempted(s) => (s.tokens.as_slice(), 1, s.cache_root, s.scores_prompt()),
            };
            let fits_slots = self.occupancy() + slots <= self.config.max_batch_size || self.occupancy() == 0;
            // The prompt and the first token it yields (a prompt the service let
            // through always fits the whole pool).
            let needed = (tokens.len() + 1).div_ceil(self.config.block_size).min(self.pool.total());
            let held = if whole { Held::default() } else { self.pool.held(&self.cacheable(root, tokens)) };
            let new_blocks = needed.saturating_sub(held.blocks);
            if !fits_slots || self.pool.available().saturating_sub(held.idle) < new_blocks {
                break;
            }
            match self.waiting.pop_front() {
                Some(Waiting::Request(q)) => self.start_request(*q),
                Some(Waiting::Preempted(mut s)) => {
                    self.attach_cached_prefix(&mut s);
                    s.begin();
                    self.running.push(*s);
                }
                None => break,
            }
        }
    }

    /// The keys of the leading full blocks of `tokens` the prefix cache may
    /// serve: all but the block of the last token, which is always computed
    /// (for its logits). None without a prefix cache.
    fn cacheable<'t>(&self, root: PrefixHash, tokens: &'t [u32]) -> Vec<BlockKey<'t>> {
        if !self.pool.caching() {
            return Vec::new();
        }
        let bs = self.config.block_size;
        let usable = tokens.len().saturating_sub(1) / bs;
        block_keys(root, &tokens[..usable * bs], bs)
    }

    fn start_request(&mut self, q: Queued) {
        self.load.waiting.fetch_sub(1, Ordering::SeqCst);
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let cache_root = q.cache_root;
        let r = q.request;
        let mut specs: Vec<SequenceSpec> = (0..r.n.max(1))
            .map(|index| SequenceSpec {
                request_id,
                index,
                prompt: r.prompt.clone(),
                sampler: Sampler::new(r.sampling.clone(), &r.prompt, index as u64),
                reasoning: r.reasoning,
                constraint: r.constraint.clone(),
                shown: r.shown.clone(),
                stop: r.stop.clone(),
                stopping: r.stopping.clone(),
                // The choices share one prompt: the first scores it.
                prompt_logprobs: r.prompt_logprobs.filter(|_| index == 0),
                max_tokens: r.max_tokens,
                events: r.events.clone(),
                enqueued: q.enqueued,
                cache_root,
            })
            .collect();
        let first = specs.remove(0);
        let mut seq = Sequence::new(first, self.admission());
        self.attach_cached_prefix(&mut seq);
        seq.cached_tokens = seq.computed;
        seq.begin();
        self.running.push(seq);
        if !specs.is_empty() {
            self.forks.push(Fork { request_id, specs });
        }
    }

    fn admission(&mut self) -> u64 {
        self.next_admission += 1;
        self.next_admission
    }

    /// Takes the prefix cache's blocks for the sequence's leading full blocks.
    fn attach_cached_prefix(&mut self, seq: &mut Sequence) {
        let bs = self.config.block_size;
        // A prompt to score is computed whole.
        if self.pool.caching() && !seq.scores_prompt() {
            let keys = self.cacheable(seq.cache_root, &seq.tokens);
            self.metrics.prefix_cache_queries.inc_by((keys.len() * bs) as u64);
            for key in &keys {
                match self.pool.lookup(key) {
                    Some(block) => {
                        seq.blocks.push(block);
                        seq.prefix_hash = key.hash;
                    }
                    None => break,
                }
            }
            self.metrics.prefix_cache_hits.inc_by((seq.blocks.len() * bs) as u64);
        }
        seq.computed = seq.blocks.len() * bs;
        seq.registered = seq.blocks.len();
    }

    /// Starts the other choices of a request whose first choice has computed
    /// its prompt: they share its full prompt blocks and compute only the rest
    /// (the ones it released already stay placeholders in theirs too).
    fn start_forks(&mut self, request_id: u64, parent_blocks: &[u32], released: usize) {
        let Some(at) = self.forks.iter().position(|f| f.request_id == request_id) else { return };
        let fork = self.forks.swap_remove(at);
        let bs = self.config.block_size;
        // Every fork has the parent's prompt: one hash chain serves them all.
        let Some((prompt, root)) = fork.specs.first().map(|s| (s.prompt.clone(), s.cache_root)) else { return };
        let shared = (prompt.len().saturating_sub(1) / bs).min(parent_blocks.len());
        let prefix_hash = block_keys(root, &prompt[..shared * bs], bs).last().map_or(root, |key| key.hash);
        let released = released.min(shared);
        for spec in fork.specs {
            let mut seq = Sequence::new(spec, self.admission());
            seq.blocks.extend_from_slice(&parent_blocks[..released]);
            seq.released = released;
            for &b in &parent_blocks[released..shared] {
                if let Err(e) = self.pool.share(b) {
                    seq.fail(&format!("internal error: {e}"));
                    self.check(Err(e));
                    let result = self.pool.release_all(&mut seq.take_blocks());
                    self.check(result);
                    break;
                }
                seq.blocks.push(b);
            }
            if seq.blocks.len() < shared {
                continue;
            }
            seq.computed = shared * bs;
            seq.registered = shared;
            seq.prefix_hash = prefix_hash;
            seq.cached_tokens = seq.computed;
            seq.begin();
            self.running.push(seq);
        }
    }

    /// Plans, runs and applies one forward pass.
    fn step(&mut self) {
        let mut plan = self.plan();
        if plan.is_empty() {
            return;
        }
        // A sequence the model cannot run fails alone; the rest of the batch runs.
        let mut inputs = Vec::with_capacity(plan.len());
        let mut refused = Vec::new();
        plan.retain(|&(i, n)| {
            let Some(s) = self.running.get(i) else { return false };
            let input = StepSequence {
                tokens: s.tokens[s.computed..s.computed + n].to_vec(),
                start: s.computed,
                blocks: s.blocks.clone(),
                all_logits: s.scores_prompt(),
            };
            match self.pass.check(&input) {
                Ok(()) => {
                    inputs.push(input);
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, request = s.request_id, "sequence cannot run; failing it alone");
                    s.fail(&format!("this sequence cannot run: {e}"));
                    refused.push(i);
                    false
                }
            }
        });
        if plan.is_empty() {
            return self.remove(refused);
        }
        let prefill: usize =
            plan.iter().filter(|&&(i, _)| self.running[i].phase() == Phase::Prefill).map(|&(_, n)| n).sum();
        self.metrics.observe_step(inputs.len(), inputs.iter().map(|s| s.tokens.len()).sum(), prefill);
        let (pass, logits) = (&self.pass, &mut self.logits);
        // Grammar masks of the sequences whose logits this step yields are
        // computed on another thread while the forward pass runs.
        let masked: Vec<usize> = plan
            .iter()
            .filter(|&&(i, n)| self.running.get(i).is_some_and(|s| s.pending() == n && s.masked()))
            .map(|&(i, _)| i)
            .collect();
        let running = &mut self.running;
        // A bug in one step fails that step's sequences, not the engine.
        let result = std::thread::scope(|scope| {
            if !masked.is_empty() {
                // A panic here would end the scope with it: the mask is then
                // computed again (and the panic caught) in `accept`.
                scope.spawn(|| {
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        for (i, seq) in running.iter_mut().enumerate() {
                            if masked.contains(&i) {
                                seq.prepare_mask();
                            }
                        }
                    }));
                });
            }
            std::panic::catch_unwind(AssertUnwindSafe(|| pass.forward(&inputs, logits)))
        });
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return self.fail_step(&plan, &format!("forward pass failed: {e}"), refused),
            Err(_) => return self.fail_step(&plan, "forward pass panicked", refused),
        };
        let mut finished = refused;
        let mut forks = Vec::new();
        let mut rows = 0;
        for (input, &(i, n)) in inputs.iter().zip(&plan) {
            // This sequence's rows of logits: its last token's is the last.
            let first_row = rows;
            rows += input.logit_rows();
            let r = rows - 1;
            let Some(seq) = self.running.get_mut(i) else { continue };
            if input.all_logits {
                let ctx = StepContext { tokenizer: &self.tokenizer, stop_ids: &self.stop_ids };
                for j in 0..n {
                    seq.score_prompt(input.start + j, self.logits.row(first_row + j), &ctx);
                }
            }
            seq.advance(n);
            seq.send_prompt_scores();
            register_full_blocks(&mut self.pool, seq);
            if seq.pending() > 0 {
                continue; // mid-prompt chunk: its logits are not needed
            }
            if seq.index == 0 && seq.tokens.len() == seq.prompt_len {
                forks.push((seq.request_id, seq.blocks.clone(), seq.released));
            }
            let ctx = StepContext { tokenizer: &self.tokenizer, stop_ids: &self.stop_ids };
            let row = self.logits.row_mut(r);
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| seq.accept(row, &ctx)));
            if let Some(took) = seq.mask_time {
                self.metrics.grammar_mask.observe(took.as_secs_f64());
            }
            match outcome {
                Ok(Ok(StepOutcome::Running)) => {}
                Ok(Ok(StepOutcome::Finished)) => finished.push(i),
                Ok(Err(message)) => {
                    tracing::error!(error = %message, "generation failed");
                    seq.fail(&message);
                    finished.push(i);
                }
                Err(_) => {
                    seq.fail("sampling panicked");
                    finished.push(i);
                }
            }
            let now = Instant::now();
            match seq.last_token_at.replace(now) {
                Some(previous) => self.metrics.inter_token_latency.observe((now - previous).as_secs_f64()),
                None => self.metrics.time_to_first_token.observe((now - seq.enqueued).as_secs_f64()),
            }
        }
        // Forks first: they take references to blocks a finished parent releases.
        for (request_id, blocks, released) in forks {
            self.start_forks(request_id, &blocks, released);
        }
        if let Some(window) = self.config.kv_window {
            // After the forks took what they share; not while a sequence's
            // forks still wait for its prompt (they read its window too).
            for &(i, _) in &plan {
                let Some(seq) = self.running.get_mut(i) else { continue };
                if self.forks.iter().all(|f| f.request_id != seq.request_id) {
                    let result = release_behind_window(&mut self.pool, seq, window);
                    self.check(result);
                }
            }
        }
        self.remove(finished);
    }

    /// Which running sequences feed how many tokens: decode tokens first, then
    /// prefill chunks under the token budget. Allocates the blocks they need,
    /// preempting the youngest sequences when the pool runs dry.
    fn plan(&mut self) -> Vec<(usize, usize)> {
        let mut budget = self.config.max_batch_tokens.max(1);
        let mut wanted: Vec<(u64, usize)> = Vec::new();
        for s in self.running.iter().filter(|s| s.phase() == Phase::Decode) {
            wanted.push((s.admitted, 1));
            budget -= 1;
            if budget == 0 {
                break;
            }
        }
        for s in self.running.iter().filter(|s| s.phase() == Phase::Prefill) {
            if budget == 0 {
                break;
            }
            // A scored prompt keeps a row of logits per token: in chunks.
            let cap = if s.scores_prompt() { MAX_SCORED_CHUNK } else { usize::MAX };
            let n = s.pending().min(budget).min(cap);
            wanted.push((s.admitted, n));
            budget -= n;
        }
        let mut plan = Vec::with_capacity(wanted.len());
        for (admitted, n) in wanted {
            while let Some(i) = self.running.iter().position(|s| s.admitted == admitted) {
                if self.grow(i, n) {
                    plan.push((admitted, n));
                    break;
                }
                if !self.preempt_youngest(admitted) {
                    break;
                }
            }
        }
        // Indices last: preemption reorders `running`.
        plan.into_iter()
            .filter_map(|(admitted, n)| Some((self.running.iter().position(|s| s.admitted == admitted)?, n)))
            .collect()
    }

    /// Gives sequence `i` blocks for `n` more tokens; false when the pool is dry.
    fn grow(&mut self, i: usize, n: usize) -> bool {
        let bs = self.config.block_size;
        let seq = &mut self.running[i];
        let needed = (seq.computed + n).div_ceil(bs);
        while seq.blocks.len() < needed {
            match self.pool.allocate() {
                Some(b) => seq.blocks.push(b),
                None => return false,
            }
        }
        true
    }

    /// Frees the youngest running sequence other than ones older than `for_admitted`
    /// needs; requeues it for recomputation. When the one in need is itself the
    /// only candidate and alone, it is ended at `length`. Returns whether it can
    /// try again.
    fn preempt_youngest(&mut self, for_admitted: u64) -> bool {
        let Some(victim) = self.running.iter().enumerate().max_by_key(|(_, s)| s.admitted).map(|(i, _)| i) else {
            return false;
        };
        let mut seq = self.running.remove(victim);
        let result = self.pool.release_all(&mut seq.preempt());
        self.check(result);
        if seq.admitted == for_admitted && self.running.is_empty() {
            // Alone and still out of blocks: the pool cannot hold this sequence.
            if let Err(e) = seq.truncate(&self.tokenizer) {
                seq.fail(&e);
            }
            return false;
        }
        tracing::debug!(request = seq.request_id, tokens = seq.tokens.len(), "preempted; will recompute");
        self.metrics.preemptions.inc();
        let retry = seq.admitted != for_admitted;
        self.waiting.push_front(Waiting::Preempted(Box::new(seq)));
        retry
    }

    /// Fails the step's sequences; removes them with `also` (already failed).
    fn fail_step(&mut self, plan: &[(usize, usize)], message: &str, mut also: Vec<usize>) {
        tracing::error!(error = %message, sequences = plan.len(), "step failed");
        for &(i, _) in plan {
            if let Some(s) = self.running.get(i) {
                s.fail(message);
            }
        }
        also.extend(plan.iter().map(|&(i, _)| i));
        self.remove(also);
    }

    fn remove(&mut self, mut indices: Vec<usize>) {
        indices.sort_unstable();
        indices.dedup();
        for i in indices.into_iter().rev() {
            let mut seq = self.running.remove(i);
            let result = self.pool.release_all(&mut seq.take_blocks());
            self.check(result);
        }
    }

    fn publish_load(&self) {
        let requests: HashSet<u64> = self.running.iter().map(|s| s.request_id).collect();
        let preempted = self.waiting.iter().filter(|w| matches!(w, Waiting::Preempted(_))).count();
        self.metrics.set_load(
            self.load.waiting.load(Ordering::SeqCst) + preempted,
            requests.len(),
            self.running.len(),
            self.pool.used() as f64 / self.pool.total().max(1) as f64,
        );
    }
}

/// Tokens of a scored prompt (one row of logits each) in one step: its
/// logits stay a bounded buffer whatever the vocabulary and the token budget.
const MAX_SCORED_CHUNK: usize = 256;

/// Offers the sequence's newly completed full blocks to the prefix cache.
fn register_full_blocks(pool: &mut BlockPool, seq: &mut Sequence) {
    let bs = pool.block_size();
    let full = seq.computed / bs;
    if !pool.caching() || full <= seq.registered {
        seq.registered = seq.registered.max(full);
        return;
    }
    for b in seq.registered..full {
        let tokens = &seq.tokens[b * bs..(b + 1) * bs];
        let key = BlockKey { parent: seq.prefix_hash, hash: chain_hash(&seq.prefix_hash, tokens), tokens };
        pool.register(seq.blocks[b], &key);
        seq.prefix_hash = key.hash;
    }
    seq.registered = full;
}

/// Releases the sequence's leading blocks no layer reads again: the next
/// token, at position `computed`, reads `[computed + 1 - window, computed]`,
/// and later ones less. A registered block stays in the prefix cache, idle:
/// its keys and values are those of its prefix whoever computed them.
fn release_behind_window(pool: &mut BlockPool, seq: &mut Sequence, window: usize) -> Result<(), BlockError> {
    let dead = ((seq.computed + 1).saturating_sub(window) / pool.block_size()).min(seq.registered);
    let mut first = Ok(());
    while seq.released < dead {
        let result = pool.release(seq.blocks[seq.released]);
        seq.released += 1;
        if first.is_ok() {
            first = result;
        }
    }
    first
}

#[cfg(test)]
mod tests;
