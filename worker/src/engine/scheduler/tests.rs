//! The scheduler against a fake model that keeps its "KV cache" as the token
//! and position each slot holds. It flags a slot written twice in one step, a
//! read of a slot that does not hold the position it should, and a read of a
//! slot written in the same step; its next token is a function of every token
//! it read, so a sequence computed from a wrong block answers differently
//! from the same request run alone. After every step each block's reference
//! count must equal the block tables that list it and every sequence's
//! counters must agree with its phase; at the end every block is back in the
//! pool.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use proptest::prelude::*;
use tokio::sync::mpsc;

use super::*;
use crate::engine::blocks::root_hash;
use crate::engine::grammar::tests::byte_tokenizer;
use crate::engine::{Event, FinishReason, GenerateRequest, ReasoningMode, SamplingParams};

const BLOCK: usize = 4;

struct Fake {
    vocab: usize,
    /// Tokens the fake answers with, and (now and then) `end`.
    letters: Vec<u32>,
    end: u32,
    /// Per slot: the token and position written there.
    slots: Mutex<Vec<Option<(u32, usize)>>>,
    /// What went wrong in a step (a test failure, not a step error).
    broken: Arc<Mutex<Vec<String>>>,
    /// Sliding-window attention: the positions a token reads, its own included.
    window: Option<usize>,
}

fn slot(seq: &StepSequence, p: usize) -> usize {
    seq.blocks[p / BLOCK] as usize * BLOCK + p % BLOCK
}

impl ForwardPass for Fake {
    fn check(&self, seq: &StepSequence) -> Result<(), String> {
        let slots = self.slots.lock().map_or(0, |s| s.len());
        let end = seq.start + seq.tokens.len();
        if seq.tokens.is_empty() || seq.blocks.len() * BLOCK < end {
            return Err("does not fit its blocks".into());
        }
        if seq.blocks.iter().any(|b| *b as usize * BLOCK >= slots) {
            return Err("a block outside the cache".into());
        }
        match seq.tokens.iter().find(|t| **t as usize >= self.vocab) {
            Some(t) => Err(format!("token {t} outside the vocabulary")),
            None => Ok(()),
        }
    }

    fn forward(&self, sequences: &[StepSequence], logits: &mut Logits) -> candle_core::Result<()> {
        let mut slots = self.slots.lock().expect("slots");
        let mut broken = self.broken.lock().expect("broken");
        let mut written = HashSet::new();
        for seq in sequences {
            for p in seq.start..seq.start + seq.tokens.len() {
                if !written.insert(slot(seq, p)) {
                    broken.push(format!("slot {} written twice in one step", slot(seq, p)));
                }
            }
        }
        logits.resize(sequences.iter().map(StepSequence::logit_rows).sum(), self.vocab);
        let mut rows = 0;
        for seq in sequences {
            // The step's first token reads the cache from `first` on (within
            // its window): every slot there must hold its position.
            let first = self.window.map_or(0, |w| (seq.start + 1).saturating_sub(w));
            for p in first..seq.start {
                let at = slot(seq, p);
                match slots[at] {
                    _ if written.contains(&at) => broken.push(format!("slot {at} read while written")),
                    Some((_, position)) if position == p => {}
                    other => broken.push(format!("slot {at} holds {other:?}, not position {p}")),
                }
            }
            for (i, &token) in seq.tokens.iter().enumerate() {
                slots[slot(seq, seq.start + i)] = Some((token, seq.start + i));
            }
            // The logits at a position are of what it reads, its window (so
            // an answer does not depend on how its prompt was cut into chunks).
            let last = seq.start + seq.tokens.len() - 1;
            for q in last + 1 - seq.logit_rows()..=last {
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for p in self.window.map_or(0, |w| (q + 1).saturating_sub(w))..=q {
                    if let Some((token, _)) = slots[slot(seq, p)] {
                        h = (h ^ u64::from(token)).wrapping_mul(0x0100_0000_01b3);
                    }
                }
                let next =
                    if h.is_multiple_of(9) { self.end } else { self.letters[(h % self.letters.len() as u64) as usize] };
                let row = logits.row_mut(rows);
                row.fill(0.0);
                row[next as usize] = 10.0;
                rows += 1;
            }
        }
        Ok(())
    }
}

struct Harness {
    scheduler: Scheduler,
    broken: Arc<Mutex<Vec<String>>>,
    metrics: Arc<Metrics>,
    letters: Vec<u32>,
}

fn harness(num_blocks: usize, max_batch_size: usize) -> Harness {
    harness_with_window(num_blocks, max_batch_size, None)
}

fn harness_with_window(num_blocks: usize, max_batch_size: usize, window: Option<usize>) -> Harness {
    let tokenizer = Arc::new(byte_tokenizer(&[]));
    let end = tokenizer.token_to_id("<end>").expect("end");
    let letters: Vec<u32> = ('a'..='p').map(|c| tokenizer.token_to_id(&c.to_string()).expect("letter")).collect();
    let broken = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake {
        vocab: tokenizer.get_vocab_size(true),
        letters: letters.clone(),
        end,
        slots: Mutex::new(vec![None; num_blocks * BLOCK]),
        broken: broken.clone(),
        window,
    };
    let config = EngineConfig {
        max_batch_size,
        max_batch_tokens: 16,
        max_waiting: 64,
        max_context: num_blocks * BLOCK,
        block_size: BLOCK,
        num_blocks,
        prefix_cache: true,
        kv_window: window,
        step_timeout: std::time::Duration::from_secs(60),
    };
    let metrics = Arc::new(Metrics::default());
    let (_tx, rx) = std::sync::mpsc::channel();
    let load = Arc::new(Load::new());
    let scheduler = Scheduler::new(Box::new(fake), tokenizer, vec![end], config, metrics.clone(), load, rx);
    Harness { scheduler, broken, metrics, letters }
}

/// A request's choices as they ended: text and finish reason, or the failure;
/// and the prompt scores each choice sent.
#[derive(Debug, Clone, PartialEq, Default)]
struct Answer {
    texts: HashMap<usize, String>,
    finished: HashMap<usize, FinishReason>,
    failed: Option<String>,
    prompt_scores: HashMap<usize, Vec<(String, f32)>>,
}

fn collect(rx: &mut mpsc::UnboundedReceiver<Event>, answer: &mut Answer) {
    while let Ok(event) = rx.try_recv() {
        match event {
            Event::Delta(d) => {
                if !d.content.is_empty() {
                    answer.texts.entry(d.index).or_default().push_str(&d.content);
                }
                if let Some(scores) = d.prompt_logprobs {
                    let scores = scores.iter().map(|t| (t.token.clone(), t.logprob));
                    answer.prompt_scores.entry(d.index).or_default().extend(scores);
                }
            }
            Event::Finished { index, reason, .. } => {
                answer.finished.insert(index, reason);
            }
            Event::Failed { message } => answer.failed = Some(message),
        }
    }
}

impl Harness {
    fn submit(&mut self, prompt: Vec<u32>, n: usize, max_tokens: usize) -> mpsc::UnboundedReceiver<Event> {
        self.submit_with(prompt, n, max_tokens, None, None)
    }

    fn submit_with(
        &mut self,
        prompt: Vec<u32>,
        n: usize,
        max_tokens: usize,
        constraint: Option<crate::engine::grammar::Constraint>,
        prompt_logprobs: Option<usize>,
    ) -> mpsc::UnboundedReceiver<Event> {
        let (events, rx) = mpsc::unbounded_channel();
        let request = GenerateRequest {
            prompt,
            sampling: SamplingParams { temperature: 0.0, ..Default::default() },
            max_tokens,
            stop: Vec::new(),
            n,
            reasoning: ReasoningMode::Off,
            constraint,
            shown: Vec::new(),
            cache_salt: None,
            stopping: Default::default(),
            prompt_logprobs,
            events,
        };
        self.scheduler.load.waiting.fetch_add(1, Ordering::SeqCst);
        let queued = Queued { request, enqueued: Instant::now(), cache_root: root_hash(None) };
        self.scheduler.waiting.push_back(Waiting::Request(Box::new(queued)));
        rx
    }

    fn idle(&self) -> bool {
        let s = &self.scheduler;
        s.running.is_empty() && s.waiting.is_empty() && s.forks.is_empty()
    }

    /// One round, then the accounting every round must leave.
    fn tick(&mut self) {
        self.scheduler.tick();
        let s = &self.scheduler;
        let mut listed: HashMap<u32, u32> = HashMap::new();
        for seq in &s.running {
            for &b in seq.held_blocks() {
                *listed.entry(b).or_default() += 1;
            }
        }
        for b in 0..s.pool.total() as u32 {
            assert_eq!(s.pool.references(b), listed.get(&b).copied().unwrap_or(0), "block {b}'s count");
        }
        // Every sequence is where its container says, and its counters agree with its phase.
        for seq in &s.running {
            assert!(matches!(seq.phase(), Phase::Prefill | Phase::Decode) && seq.consistent(), "{:?}", seq.phase());
            // It holds every block its next token reads.
            let reads_from = s.config.kv_window.map_or(0, |w| (seq.computed + 1).saturating_sub(w));
            assert!(seq.released * BLOCK <= reads_from, "released {} blocks, reads from {reads_from}", seq.released);
        }
        for waiting in &s.waiting {
            if let Waiting::Preempted(seq) = waiting {
                assert!(seq.phase() == Phase::Preempted && seq.consistent());
            }
        }
        let broken = self.broken.lock().expect("broken");
        assert!(broken.is_empty(), "{broken:?}");
    }

    fn run_until_idle(&mut self) {
        for _ in 0..10_000 {
            if self.idle() {
                return;
            }
            self.tick();
        }
        panic!("the scheduler never went idle");
    }
}

fn metric(metrics: &Metrics, name: &str) -> f64 {
    let text = metrics.encode().expect("metrics");
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no {name}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number")
}

/// Each request alone in a roomy pool: what it should answer.
fn alone(prompt: &[u32], n: usize, max_tokens: usize) -> Answer {
    alone_with_window(prompt, n, max_tokens, None)
}

fn alone_with_window(prompt: &[u32], n: usize, max_tokens: usize, window: Option<usize>) -> Answer {
    alone_scored(prompt, n, max_tokens, window, None)
}

fn alone_scored(
    prompt: &[u32],
    n: usize,
    max_tokens: usize,
    window: Option<usize>,
    prompt_logprobs: Option<usize>,
) -> Answer {
    let mut h = harness_with_window(64, 4, window);
    let mut rx = h.submit_with(prompt.to_vec(), n, max_tokens, None, prompt_logprobs);
    h.run_until_idle();
    let mut answer = Answer::default();
    collect(&mut rx, &mut answer);
    answer
}

#[derive(Debug, Clone)]
struct Plan {
    /// Which of the shared openings the prompt starts with, and how many more tokens.
    opening: usize,
    tail: Vec<u8>,
    n: usize,
    max_tokens: usize,
    /// Rounds after which its client leaves, if it does.
    leaves_after: Option<usize>,
    /// Rounds after the start when it arrives.
    arrives: usize,
    /// Its prompt is scored (computed whole, every token's logits kept).
    scored: bool,
}

fn plans() -> impl Strategy<Value = Vec<Plan>> {
    let plan = (
        0..3usize,
        proptest::collection::vec(0u8..16, 0..9),
        1..3usize,
        1..10usize,
        proptest::option::of(0..12usize),
        0..6usize,
        proptest::bool::weighted(0.25),
    )
        .prop_map(|(opening, tail, n, max_tokens, leaves_after, arrives, scored)| Plan {
            opening,
            tail,
            n,
            max_tokens,
            leaves_after,
            arrives,
            scored,
        });
    proptest::collection::vec(plan, 1..7)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Requests arriving and leaving over a pool too small for all of them
    /// (prefix sharing, forks, preemption and recompute), with full attention
    /// or a sliding window (blocks behind it released as sequences go): no
    /// slot shared in a step, none read that does not hold its position,
    /// every count right after every round, every block back at the end, and
    /// every request that stayed answers as it does alone.
    #[test]
    fn every_block_comes_back_and_every_answer_is_its_own(
        plans in plans(),
        window in proptest::option::of(1..10usize),
    ) {
        let mut h = harness_with_window(12, 3, window);
        let openings: [Vec<u32>; 3] = [
            h.letters[..9].to_vec(),
            h.letters[3..12].to_vec(),
            h.letters[..9].iter().rev().copied().collect(),
        ];
        let prompts: Vec<Vec<u32>> = plans
            .iter()
            .map(|p| openings[p.opening].iter().copied().chain(p.tail.iter().map(|&t| h.letters[t as usize])).collect())
            .collect();
        let mut receivers: Vec<Option<mpsc::UnboundedReceiver<Event>>> = plans.iter().map(|_| None).collect();
        let mut answers = vec![Answer::default(); plans.len()];
        let mut left = vec![false; plans.len()];
        for round in 0..10_000 {
            for (i, plan) in plans.iter().enumerate() {
                if plan.arrives == round {
                    let scored = plan.scored.then_some(1);
                    receivers[i] = Some(h.submit_with(prompts[i].clone(), plan.n, plan.max_tokens, None, scored));
                }
                if plan.leaves_after.is_some_and(|after| round == plan.arrives + after) {
                    receivers[i] = None;
                    left[i] = true;
                }
                if let Some(rx) = receivers[i].as_mut() {
                    collect(rx, &mut answers[i]);
                }
            }
            if round > 6 && h.idle() {
                break;
            }
            h.tick();
        }
        prop_assert!(h.idle());
        prop_assert_eq!(h.scheduler.pool.available(), h.scheduler.pool.total());
        for (i, plan) in plans.iter().enumerate() {
            if let Some(rx) = receivers[i].as_mut() {
                collect(rx, &mut answers[i]);
            }
            if left[i] {
                continue;
            }
            let want = alone_scored(&prompts[i], plan.n, plan.max_tokens, window, plan.scored.then_some(1));
            prop_assert_eq!(&answers[i], &want, "request {} {:?}", i, plan);
            prop_assert_eq!(answers[i].finished.len(), plan.n);
        }
    }
}

/// A prompt whose leading blocks sit idle in the prefix cache while another
/// sequence holds every free block: admission counts those idle blocks once,
/// so the prompt waits instead of being admitted, preempted and readmitted
/// round after round.
#[test]
fn idle_cached_blocks_are_not_counted_twice_at_admission() {
    let mut h = harness(6, 4);
    let prompt: Vec<u32> = h.letters[..13].to_vec();
    let mut first = h.submit(prompt.clone(), 1, 1);
    h.run_until_idle();
    // Three full blocks of the prompt are cached and idle; three are free.
    assert_eq!(h.scheduler.pool.available(), 6);
    let other: Vec<u32> = h.letters[4..13].iter().rev().copied().collect();
    let mut long = h.submit(other.clone(), 1, 3);
    h.tick();
    let mut again = h.submit(prompt.clone(), 1, 1);
    h.run_until_idle();
    assert_eq!(metric(&h.metrics, "kandle_preemptions_total"), 0.0);
    let mut answers = [Answer::default(), Answer::default(), Answer::default()];
    for (rx, answer) in [&mut first, &mut long, &mut again].into_iter().zip(&mut answers) {
        collect(rx, answer);
    }
    assert_eq!(answers[0], answers[2]);
    assert_eq!(answers[1], alone(&other, 1, 3));
    assert!(metric(&h.metrics, "vllm:prefix_cache_hits_total") >= 12.0, "the second run hit the cache");
}

/// A sequence the model cannot run fails alone; its batch runs on.
#[test]
fn a_sequence_that_cannot_run_fails_alone() {
    let mut h = harness(16, 4);
    let good: Vec<u32> = h.letters[..5].to_vec();
    let bad = vec![h.letters[0], 100_000];
    let mut ok = h.submit(good.clone(), 1, 4);
    let mut refused = h.submit(bad, 1, 4);
    h.run_until_idle();
    let (mut a, mut b) = (Answer::default(), Answer::default());
    collect(&mut ok, &mut a);
    collect(&mut refused, &mut b);
    assert_eq!(a, alone(&good, 1, 4));
    let failure = b.failed.expect("failed");
    assert!(failure.contains("outside the vocabulary"), "{failure}");
    assert_eq!(h.scheduler.pool.available(), h.scheduler.pool.total());
}

/// A grammar that forces three tokens after every second sampled letter: the
/// sequence goes from Decode back to Prefill (the forced tokens computed as
/// one chunk) and answers as it does alone.
#[test]
fn tokens_a_grammar_forces_are_one_prefill_chunk() {
    use crate::engine::grammar::{Grammars, OutputFormat};
    let grammar = || {
        let tokenizer = Arc::new(byte_tokenizer(&[]));
        let end = tokenizer.token_to_id("<end>").expect("end");
        let grammars = Grammars::new(tokenizer, end).expect("grammars");
        grammars.constraint(&OutputFormat::Lark(r#"start: (/[a-p]/ /[a-p]/ "xyz")+"#.into())).expect("constraint")
    };
    let mut h = harness(16, 2);
    let prompt: Vec<u32> = h.letters[..6].to_vec();
    let mut rx = h.submit_with(prompt.clone(), 1, 9, Some(grammar()), None);
    let mut phases = Vec::new();
    while !h.idle() {
        h.tick();
        phases.extend(h.scheduler.running.iter().map(|s| s.phase()));
    }
    let mut got = Answer::default();
    collect(&mut rx, &mut got);
    assert!(got.texts[&0].starts_with(|c: char| c.is_ascii_lowercase()) && got.texts[&0].contains("xyz"), "{got:?}");
    let back = phases.windows(2).any(|w| w == [Phase::Decode, Phase::Prefill]);
    assert!(back, "never went back to Prefill: {phases:?}");

    let mut alone = harness(64, 4);
    let mut rx = alone.submit_with(prompt, 1, 9, Some(grammar()), None);
    alone.run_until_idle();
    let mut want = Answer::default();
    collect(&mut rx, &mut want);
    assert_eq!(got, want);
}

/// A sliding window: a long sequence holds the blocks of its window and the
/// one it writes, not its whole length (the KV gauge says so), answers as it
/// does with every block kept, and its released prompt blocks stay in the
/// prefix cache for the next request with that prompt.
#[test]
fn blocks_behind_a_sliding_window_are_released() {
    const WINDOW: usize = 6;
    let mut h = harness_with_window(64, 4, Some(WINDOW));
    let prompt: Vec<u32> = h.letters[..13].to_vec();
    let mut rx = h.submit(prompt.clone(), 1, 40);
    let (mut most_held, mut most_gauge) = (0, 0f64);
    while !h.idle() {
        h.tick();
        most_held = most_held.max(h.scheduler.running.iter().map(|s| s.held_blocks().len()).sum::<usize>());
        most_gauge = most_gauge.max(metric(&h.metrics, "vllm:kv_cache_usage_perc"));
    }
    let mut got = Answer::default();
    collect(&mut rx, &mut got);
    assert_eq!(got, alone_with_window(&prompt, 1, 40, Some(WINDOW)));
    // 13 prompt tokens and 18 answered (the fake ends there) fill 8 blocks;
    // the prompt, one chunk, holds 4; then the window's blocks and the one
    // being written.
    assert_eq!(got.texts[&0].len(), 18, "{got:?}");
    assert!(most_held <= 4, "held {most_held} blocks at once");
    assert!(most_gauge <= 4.0 / 64.0 + 1e-9, "gauge reached {most_gauge}");
    let mut again = h.submit(prompt.clone(), 1, 1);
    h.run_until_idle();
    let mut second = Answer::default();
    collect(&mut again, &mut second);
    assert_eq!(second, alone_with_window(&prompt, 1, 1, Some(WINDOW)));
    assert!(metric(&h.metrics, "vllm:prefix_cache_hits_total") >= 12.0, "the prompt's blocks were cached");
}

/// The other choices of an `n = 2` request start from its first choice's
/// prompt blocks; when that prompt is computed in chunks (here 15 tokens
/// beside another sequence's decode token, then 1), the first choice keeps
/// the blocks behind its window that they still read until they have
/// started.
#[test]
fn forks_read_the_window_their_first_choice_computed() {
    const WINDOW: usize = 4;
    let mut h = harness_with_window(64, 4, Some(WINDOW));
    let other: Vec<u32> = h.letters[8..11].to_vec();
    let mut first = h.submit(other.clone(), 1, 30);
    h.tick();
    h.tick();
    let prompt: Vec<u32> = h.letters.iter().rev().copied().collect();
    assert_eq!(prompt.len(), 16);
    let mut forked = h.submit(prompt.clone(), 2, 6);
    h.run_until_idle();
    let (mut a, mut b) = (Answer::default(), Answer::default());
    collect(&mut first, &mut a);
    collect(&mut forked, &mut b);
    assert_eq!(b, alone_with_window(&prompt, 2, 6, Some(WINDOW)));
    assert_eq!(a, alone_with_window(&other, 1, 30, Some(WINDOW)));
}

/// A scored prompt (legacy `echo` with `logprobs`): its first choice sends
/// the score of every prompt token after the first, once, even when a cached
/// prefix could have served it or a preemption makes it compute again; the
/// other choices send none (they share its prompt); `max_tokens` 0 scores
/// the prompt and generates nothing.
#[test]
fn a_scored_prompt_is_computed_whole_and_scored_once() {
    let mut h = harness(64, 4);
    let prompt: Vec<u32> = h.letters[..11].to_vec();
    let mut warm = h.submit(prompt.clone(), 1, 2);
    h.run_until_idle();
    collect(&mut warm, &mut Answer::default());
    let mut rx = h.submit_with(prompt.clone(), 2, 3, None, Some(2));
    h.run_until_idle();
    let mut got = Answer::default();
    collect(&mut rx, &mut got);
    assert_eq!(got.prompt_scores.len(), 1, "{got:?}");
    let scores = &got.prompt_scores[&0];
    assert_eq!(scores.len(), prompt.len() - 1);
    assert_eq!(got.texts, alone(&prompt, 2, 3).texts, "the answers are unchanged");
    // The same scores as the same request alone, where nothing was cached.
    assert_eq!(got.prompt_scores, alone_scored(&prompt, 2, 3, None, Some(2)).prompt_scores);

    let mut rx = h.submit_with(prompt.clone(), 1, 0, None, Some(0));
    h.run_until_idle();
    let mut nothing = Answer::default();
    collect(&mut rx, &mut nothing);
    assert_eq!(nothing.prompt_scores[&0].len(), prompt.len() - 1);
    assert_eq!((nothing.texts.get(&0), nothing.finished.get(&0)), (None, Some(&FinishReason::Length)));
}
