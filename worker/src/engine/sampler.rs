//! Turns logits into the next token: logit bias, penalties, temperature, top-k,
//! top-p, min-p, and seeded sampling; reports log-probabilities when asked.
//!
//! The vocabulary is never sorted whole. Greedy decoding is an argmax; top-k
//! selects the k best candidates and sorts only those; top-p without top-k ranks
//! a growing prefix (64 candidates first, then rounds sized from the mass still
//! missing) until it holds the requested share of the probability; the top
//! log-probabilities are a partial selection too. Candidates rank by weight, equal
//! weights by token id, so the kept set and the walk order are those of a full sort
//! with that rule. One buffer per sampler holds the candidates, packed as integer
//! keys (see [`rank_key`]), and is reused from token to token.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling knobs of one request, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Hugging Face style multiplicative penalty on every token seen; 1 disables it.
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    /// `Some(n)`: report each sampled token's log-probability and the top `n` alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
        }
    }
}

/// A sampled token with its log-probability and, when asked, the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampling state: the parameters, a random generator, and token counts
/// for the penalties.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// How often each token appears in the completion so far (presence/frequency).
    generated_counts: std::collections::HashMap<u32, u32>,
    /// Every token seen, prompt included (repetition penalty).
    seen: std::collections::HashSet<u32>,
    /// Scratch for candidates and log-probabilities as [`rank_key`]s,
    /// vocabulary-sized once used, kept so that each token does not allocate it again.
    pool: Vec<u64>,
}

impl Sampler {
    /// `stream` separates the random streams of several choices of one seeded request.
    pub fn new(params: SamplingParams, prompt: &[u32], stream: u64) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        let seen = if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { Default::default() };
        Self { params, rng, generated_counts: Default::default(), seen, pool: Vec::new() }
    }

    pub fn reports_logprobs(&self) -> bool {
        self.params.logprobs.is_some()
    }

    /// A token taken without sampling (one the engine or the grammar forces):
    /// the only possible token, so its log-probability is 0.
    pub fn forced(&mut self, token: u32) -> Sampled {
        self.record(token);
        let top = match self.params.logprobs {
            Some(n) if n > 0 => vec![(token, 0.0)],
            _ => Vec::new(),
        };
        Sampled { token, logprob: 0.0, top }
    }

    /// The log-probability of `token` under `logits` as the model gives them
    /// (no bias, penalty or temperature), and the `n` likeliest tokens: a
    /// prompt token's log-probability.
    pub fn score(&mut self, logits: &[f32], token: u32, n: usize) -> Sampled {
        let log_sum = log_sum_exp(logits);
        let logprob = logits.get(token as usize).map_or(f32::NEG_INFINITY, |l| l - log_sum);
        Sampled { token, logprob, top: top_n(logits, log_sum, n, &mut self.pool) }
    }

    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        self.adjust(logits);
        let token = if self.params.temperature <= 0.0 { argmax(logits) } else { self.draw(logits) };
        let (logprob, top) = match self.params.logprobs {
            Some(n) => {
                let log_sum = log_sum_exp(logits);
                let logprob = logits.get(token as usize).map_or(f32::NEG_INFINITY, |l| l - log_sum);
                (logprob, top_n(logits, log_sum, n, &mut self.pool))
            }
            None => (0.0, Vec::new()),
        };
        self.record(token);
        Sampled { token, logprob, top }
    }

    /// Logit bias and penalties, in place.
    fn adjust(&self, logits: &mut [f32]) {
        for &(token, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
        let p = self.params.repetition_penalty;
        if p != 1.0 {
            for &token in &self.seen {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l = if *l > 0.0 { *l / p } else { *l * p };
                }
            }
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for (&token, &count) in &self.generated_counts {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -= presence + frequency * count as f32;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        match candidates(&self.params, logits, &mut self.pool) {
            Some(kept) => pick(kept, self.rng.random::<f32>()),
            None => argmax(logits),
        }
    }

    fn record(&mut self, token: u32) {
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.generated_counts.entry(token).or_insert(0) += 1;
        }
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
    }
}

/// A token and a value packed so that ascending `u64` order is rank order: higher
/// value first (in [`f32::total_cmp`] order, so NaN and infinities have a place),
/// equal values by ascending token id. Selecting and sorting plain integers is about
/// twice as fast as comparing `(u32, f32)` pairs.
fn rank_key(token: u32, value: f32) -> u64 {
    let bits = value.to_bits();
    // The transformation `total_cmp` makes, then the sign bit flipped: unsigned
    // order of `ordered` is the total order of the values.
    let ordered = bits ^ ((((bits as i32) >> 31) as u32) >> 1) ^ 0x8000_0000;
    (u64::from(!ordered) << 32) | u64::from(token)
}

/// The token of a [`rank_key`].
fn key_token(key: u64) -> u32 {
    key as u32
}

/// The value of a [`rank_key`], bit for bit.
fn key_value(key: u64) -> f32 {
    let ordered = !((key >> 32) as u32) ^ 0x8000_0000;
    f32::from_bits(ordered ^ ((((ordered as i32) >> 31) as u32) >> 1))
}

/// How many candidates top-p ranks in its first round without top-k.
const NUCLEUS_FIRST_ROUND: usize = 64;

/// The tokens the knobs leave to draw from, as [`rank_key`]s of their unnormalised
/// weights `exp((logit - max) / temperature)`, in the order the draw walks them:
/// ranked when top-k or top-p applies, in token order otherwise. `None` when no
/// token has a positive weight (every logit NaN or infinite, or a temperature so
/// small that the division overflows). `pool` is the scratch buffer.
fn candidates<'a>(params: &SamplingParams, logits: &[f32], pool: &'a mut Vec<u64>) -> Option<&'a [u64]> {
    let inv_t = 1.0 / params.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    pool.clear();
    for (i, &l) in logits.iter().enumerate() {
        let weight = ((l - max) * inv_t).exp();
        // Also drops NaN weights.
        if weight > 0.0 {
            pool.push(rank_key(i as u32, weight));
        }
    }
    if pool.is_empty() {
        return None;
    }
    // The survivors of min-p are a ranked prefix, and the peak is among the top k,
    // so filtering before top-k keeps the same set as filtering after it.
    if params.min_p > 0.0 {
        // The smallest key holds the largest weight (tracking it in the loop above
        // would slow every draw).
        let peak = pool.iter().min().map_or(0.0, |&c| key_value(c));
        let floor = peak * params.min_p;
        // `weight >= floor` for every token, as one integer comparison.
        let last = rank_key(u32::MAX, floor);
        pool.retain(|&c| c <= last);
    }
    let keep = if params.top_k > 0 {
        let k = params.top_k.min(pool.len());
        rank_range(pool, 0, k);
        pool.truncate(k);
        if params.top_p < 1.0 {
            // Summed in rank order, over the top k only.
            let total: f32 = pool.iter().map(|&c| key_value(c)).sum();
            nucleus(pool, k, total, params.top_p)
        } else {
            k
        }
    } else if params.top_p < 1.0 {
        // The whole normaliser, summed in token order: a rank-order sum would need
        // the full sort this avoids.
        let total: f32 = pool.iter().map(|&c| key_value(c)).sum();
        nucleus(pool, 0, total, params.top_p)
    } else {
        pool.len()
    };
    pool.truncate(keep);
    Some(pool)
}

/// The length of the shortest ranked prefix of `pool` whose share of `total` reaches
/// `top_p` (all of `pool` when none does). `pool[..ranked]` is already ranked; the
/// rest is ranked in rounds, only as far as the walk needs.
fn nucleus(pool: &mut [u64], mut ranked: usize, total: f32, top_p: f32) -> usize {
    let mut cumulative = 0.0f32;
    for i in 0..pool.len() {
        if i == ranked {
            let more = match i.checked_sub(1) {
                None => NUCLEUS_FIRST_ROUND,
                Some(last) => {
                    // No unranked token weighs more than the last one ranked, so at
                    // least `missing` more are needed. Twice that, and at least
                    // doubling the ranked prefix, keeps the rounds few; their size
                    // never changes the result.
                    let missing = (top_p - cumulative) * total / key_value(pool[last]);
                    (2.0 * missing.ceil()).max(0.0) as usize
                }
            };
            let to = ranked.saturating_add(more.max(ranked)).min(pool.len());
            rank_range(pool, ranked, to);
            ranked = to;
        }
        cumulative += key_value(pool[i]) / total;
        if cumulative >= top_p {
            return i + 1;
        }
    }
    pool.len()
}

/// Moves the keys ranked `from..to` into `pool[from..to]`, in order, given that
/// `pool[..from]` already holds those ranked before them.
fn rank_range(pool: &mut [u64], from: usize, to: usize) {
    let rest = &mut pool[from..];
    let n = to - from;
    if n == 0 {
        return;
    }
    if n < rest.len() {
        rest.select_nth_unstable(n - 1);
    }
    rest[..n].sort_unstable();
}

/// Walks the candidates to where `unit` (in `[0, 1)`) of their total weight falls.
fn pick(candidates: &[u64], unit: f32) -> u32 {
    let total: f32 = candidates.iter().map(|&c| key_value(c)).sum();
    let mut target = unit * total;
    for &c in candidates {
        let weight = key_value(c);
        if target < weight {
            return key_token(c);
        }
        target -= weight;
    }
    // Rounding left a sliver past the last candidate.
    candidates.last().map(|&c| key_token(c)).unwrap_or(0)
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `ln Σ exp(logit)`, shifted by the maximum so that nothing overflows: a token's
/// log-probability is its logit minus this.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    max + sum.ln()
}

#[cfg(test)]
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let log_sum = log_sum_exp(logits);
    logits.iter().map(|l| l - log_sum).collect()
}

/// The `n` most likely tokens with their log-probabilities, best first (ties by
/// token id), found by partial selection in `pool`.
fn top_n(logits: &[f32], log_sum: f32, n: usize, pool: &mut Vec<u64>) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    pool.clear();
    pool.extend(logits.iter().enumerate().map(|(i, &l)| rank_key(i as u32, l - log_sum)));
    let n = n.min(pool.len());
    rank_range(pool, 0, n);
    pool[..n].iter().map(|&c| (key_token(c), key_value(c))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams { seed: Some(7), ..SamplingParams::default() }
    }

    fn draws(p: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p, &[], 0);
        (0..n).map(|_| s.sample(&mut logits.to_vec()).token).collect()
    }

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.0, 0.5, 2.9];

    #[test]
    fn temperature_zero_is_greedy() {
        let p = SamplingParams { temperature: 0.0, ..params() };
        assert_eq!(draws(p, &LOGITS, 20), vec![1; 20]);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let a = draws(params(), &LOGITS, 64);
        assert_eq!(a, draws(params(), &LOGITS, 64));
        let other = SamplingParams { seed: Some(8), ..params() };
        assert_ne!(a, draws(other, &LOGITS, 64));
    }

    #[test]
    fn streams_of_one_seed_differ() {
        let mut a = Sampler::new(params(), &[], 0);
        let mut b = Sampler::new(params(), &[], 1);
        let xs: Vec<u32> = (0..64).map(|_| a.sample(&mut LOGITS.to_vec()).token).collect();
        let ys: Vec<u32> = (0..64).map(|_| b.sample(&mut LOGITS.to_vec()).token).collect();
        assert_ne!(xs, ys);
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let p = SamplingParams { top_k: 2, ..params() };
        let got = draws(p, &LOGITS, 200);
        assert!(got.iter().all(|t| *t == 1 || *t == 4));
        assert!(got.contains(&1) && got.contains(&4));
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // Probabilities ~ [0.05, 0.37, 0.14, 0.03, 0.34]: 0.5 keeps tokens 1 and 4.
        let p = SamplingParams { top_p: 0.5, ..params() };
        let got = draws(p, &LOGITS, 200);
        assert!(got.iter().all(|t| *t == 1 || *t == 4), "{got:?}");
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // Token 2 has ~0.37x the peak probability, token 0 ~0.14x.
        let p = SamplingParams { min_p: 0.3, ..params() };
        let got = draws(p, &LOGITS, 300);
        assert!(got.iter().all(|t| [1, 2, 4].contains(t)), "{got:?}");
        assert!(got.contains(&2));
    }

    #[test]
    fn high_temperature_flattens_low_sharpens() {
        let count = |t: f32| {
            let p = SamplingParams { temperature: t, ..params() };
            draws(p, &LOGITS, 500).iter().filter(|x| **x == 3).count()
        };
        assert!(count(2.0) > count(0.2));
        assert_eq!(count(0.05), 0);
    }

    #[test]
    fn logit_bias_forces_and_bans() {
        let p = SamplingParams { temperature: 0.0, logit_bias: vec![(3, 100.0)], ..params() };
        assert_eq!(draws(p, &LOGITS, 3), vec![3, 3, 3]);
        let p = SamplingParams { logit_bias: vec![(1, -100.0), (4, -100.0)], ..params() };
        assert!(draws(p, &LOGITS, 200).iter().all(|t| *t != 1 && *t != 4));
    }

    #[test]
    fn frequency_and_presence_penalties_move_away_from_repeats() {
        let greedy = SamplingParams { temperature: 0.0, ..params() };
        let p = SamplingParams { frequency_penalty: 2.0, ..greedy.clone() };
        // Token 1 leads by 0.1 over token 4; once used, it is penalised.
        assert_eq!(draws(p, &LOGITS, 2), vec![1, 4]);
        let p = SamplingParams { presence_penalty: 1.5, ..greedy };
        assert_eq!(draws(p, &LOGITS, 3), vec![1, 4, 2]);
    }

    #[test]
    fn repetition_penalty_counts_the_prompt() {
        let p = SamplingParams { temperature: 0.0, repetition_penalty: 1.5, ..params() };
        let mut s = Sampler::new(p, &[1], 0);
        assert_eq!(s.sample(&mut LOGITS.to_vec()).token, 4);
    }

    #[test]
    fn logprobs_are_normalised_and_ranked() {
        let p = SamplingParams { temperature: 0.0, logprobs: Some(3), ..params() };
        let mut s = Sampler::new(p, &[], 0);
        let out = s.sample(&mut LOGITS.to_vec());
        assert_eq!(out.token, 1);
        let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 4, 2]);
        assert!((out.logprob - out.top[0].1).abs() < 1e-6);
        let total: f32 = log_softmax(&LOGITS).iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }

    /// The full-sort method the fast path must reproduce: weigh every token, rank them
    /// all, then cut by top-k, min-p and top-p in turn. It fixes two things the
    /// unstable sort it replaced left open, as the fast path does: equal weights rank
    /// by token id, and top-p without top-k divides by the total summed in token order.
    fn reference_candidates(p: &SamplingParams, logits: &[f32]) -> Option<Vec<(u32, f32)>> {
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
            .filter(|(_, p)| *p > 0.0)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let needs_order = p.top_k > 0 || p.top_p < 1.0;
        if needs_order {
            candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        }
        if p.top_k > 0 {
            candidates.truncate(p.top_k);
        }
        if p.min_p > 0.0 {
            let peak = candidates.iter().map(|c| c.1).fold(0.0, f32::max);
            let floor = peak * p.min_p;
            candidates.retain(|c| c.1 >= floor);
        }
        if p.top_p < 1.0 {
            let total: f32 = if p.top_k > 0 {
                candidates.iter().map(|c| c.1).sum()
            } else {
                let mut by_token = candidates.clone();
                by_token.sort_by_key(|c| c.0);
                by_token.iter().map(|c| c.1).sum()
            };
            let mut cumulative = 0.0;
            let mut keep = candidates.len();
            for (i, c) in candidates.iter().enumerate() {
                cumulative += c.1 / total;
                if cumulative >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            candidates.truncate(keep);
        }
        Some(candidates)
    }

    /// The draw as it was written before the fast path: argmax when nothing has a
    /// positive weight, else a walk through the candidates.
    fn reference_draw(p: &SamplingParams, logits: &[f32], rng: &mut ChaCha8Rng) -> u32 {
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let Some(candidates) = reference_candidates(p, logits) else { return argmax(logits) };
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut target = rng.random::<f32>() * total;
        for &(token, weight) in &candidates {
            if target < weight {
                return token;
            }
            target -= weight;
        }
        candidates.last().map(|c| c.0).unwrap_or(0)
    }

    /// The top `n` log-probabilities by a full sort, ties by token id.
    fn reference_top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
        let mut all: Vec<(u32, f32)> =
            log_softmax(logits).into_iter().enumerate().map(|(i, l)| (i as u32, l)).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// SplitMix64: a small deterministic generator for the test inputs.
    struct Prng(u64);

    impl Prng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32
        }

        fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
            xs[self.below(xs.len())]
        }
    }

    /// Logits of several shapes: spread out, heavily tied, peaked with an underflowing
    /// tail, flat, and sprinkled with NaN and infinities.
    fn random_logits(rng: &mut Prng) -> Vec<f32> {
        let len = rng.pick(&[1, 2, 5, 17, 63, 64, 65, 130, 300, 1000, 3000]);
        let shape = rng.below(6);
        (0..len)
            .map(|_| match shape {
                0 => rng.unit() * 20.0 - 10.0,
                1 => rng.below(5) as f32 - 2.0,
                2 => {
                    if rng.below(20) == 0 {
                        rng.unit() * 4.0
                    } else {
                        -200.0 - rng.unit()
                    }
                }
                3 => 1.5,
                4 => rng.unit() * 0.01,
                _ => match rng.below(40) {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 if rng.below(10) == 0 => f32::INFINITY,
                    _ => (rng.below(8) as f32) * 0.5,
                },
            })
            .collect()
    }

    fn random_params(rng: &mut Prng) -> SamplingParams {
        SamplingParams {
            temperature: rng.pick(&[0.05, 0.5, 1.0, 2.0, 100.0, 1e-30]),
            top_k: rng.pick(&[0, 0, 0, 1, 2, 5, 40, 64, 65, 100, 1000, 5000]),
            top_p: rng.pick(&[1.0, 1.0, 0.999, 0.99, 0.9, 0.5, 0.1, 0.0]),
            min_p: rng.pick(&[0.0, 0.0, 0.01, 0.05, 0.5, 1.0]),
            ..params()
        }
    }

    fn bits(candidates: Option<&[u64]>) -> Option<Vec<(u32, u32)>> {
        candidates.map(|c| c.iter().map(|&k| (key_token(k), key_value(k).to_bits())).collect())
    }

    fn pair_bits(candidates: Option<&[(u32, f32)]>) -> Option<Vec<(u32, u32)>> {
        candidates.map(|c| c.iter().map(|&(t, w)| (t, w.to_bits())).collect())
    }

    #[test]
    fn candidates_match_the_full_sort() {
        let mut rng = Prng(1);
        let mut pool = Vec::new();
        for _ in 0..300 {
            let logits = random_logits(&mut rng);
            for _ in 0..30 {
                let p = random_params(&mut rng);
                let fast = bits(candidates(&p, &logits, &mut pool));
                let reference = reference_candidates(&p, &logits);
                assert_eq!(fast, pair_bits(reference.as_deref()), "{p:?} over {} logits", logits.len());
            }
        }
    }

    #[test]
    fn seeded_draws_match_the_full_sort() {
        let mut rng = Prng(2);
        for seed in 0..150 {
            let mut p = random_params(&mut rng);
            p.seed = Some(seed);
            p.logprobs = rng.pick(&[None, Some(0), Some(1), Some(5)]);
            if seed % 10 == 0 {
                p.temperature = 0.0;
            }
            let mut sampler = Sampler::new(p.clone(), &[], 3);
            let mut reference = ChaCha8Rng::seed_from_u64(seed);
            reference.set_stream(3);
            for _ in 0..12 {
                let logits = random_logits(&mut rng);
                let out = sampler.sample(&mut logits.clone());
                assert_eq!(out.token, reference_draw(&p, &logits, &mut reference), "{p:?}");
                if let Some(n) = p.logprobs {
                    let want = reference_top_n(&logits, n);
                    let lp = log_softmax(&logits)[out.token as usize];
                    if log_sum_exp(&logits).is_nan() {
                        // Every log-probability is NaN; which sign each NaN gets is up
                        // to the compiler, and so is their order.
                        assert_eq!(out.top.len(), want.len());
                        assert!(out.top.iter().all(|t| t.1.is_nan()) && out.logprob.is_nan());
                    } else {
                        let top: Vec<(u32, u32)> = out.top.iter().map(|&(t, l)| (t, l.to_bits())).collect();
                        let want: Vec<(u32, u32)> = want.iter().map(|&(t, l)| (t, l.to_bits())).collect();
                        assert_eq!(top, want);
                        assert_eq!(out.logprob.to_bits(), lp.to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn ties_rank_by_token_id() {
        let logits = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0];
        let p = SamplingParams { top_k: 2, ..params() };
        let kept: Vec<u32> = candidates(&p, &logits, &mut Vec::new()).unwrap().iter().map(|&c| key_token(c)).collect();
        assert_eq!(kept, vec![1, 3]);
        let p = SamplingParams { temperature: 0.0, logprobs: Some(4), ..params() };
        let ids: Vec<u32> = Sampler::new(p, &[], 0).sample(&mut logits.to_vec()).top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 4, 0]);
    }

    #[test]
    fn top_p_over_a_large_vocabulary_keeps_the_nucleus() {
        // One dominant token in a 50k vocabulary: the first round of ranking finds it.
        let mut logits = vec![0.0f32; 50_000];
        logits[31_337] = 30.0;
        let p = SamplingParams { top_p: 0.9, ..params() };
        let mut pool = Vec::new();
        let kept: Vec<u32> = candidates(&p, &logits, &mut pool).unwrap().iter().map(|&c| key_token(c)).collect();
        assert_eq!(kept, vec![31_337]);
        // The buffer stays allocated for the next token.
        assert!(pool.capacity() >= 50_000);
        let mut s = Sampler::new(p, &[], 0);
        assert_eq!(s.sample(&mut logits.clone()).token, 31_337);
    }

    #[test]
    fn rank_keys_order_like_total_cmp_then_token_and_round_trip() {
        let values = [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.0, -1.0, 1e-45, -3.5, 0.25];
        let mut pairs: Vec<(u32, f32)> = Vec::new();
        for (i, &v) in values.iter().enumerate() {
            pairs.push((i as u32, v));
            pairs.push((100 - i as u32, v));
        }
        let mut keys: Vec<u64> = pairs.iter().map(|&(t, v)| rank_key(t, v)).collect();
        keys.sort_unstable();
        pairs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let decoded: Vec<(u32, u32)> = keys.iter().map(|&k| (key_token(k), key_value(k).to_bits())).collect();
        let want: Vec<(u32, u32)> = pairs.iter().map(|&(t, v)| (t, v.to_bits())).collect();
        assert_eq!(decoded, want);
    }

    #[test]
    fn nan_logits_do_not_panic() {
        let logits = [f32::NAN, 1.0, f32::NAN, 2.0];
        for top_k in [0, 1, 3] {
            for top_p in [1.0, 0.5] {
                let p = SamplingParams { top_k, top_p, logprobs: Some(2), ..params() };
                let out = Sampler::new(p, &[], 0).sample(&mut logits.to_vec());
                assert!(out.token == 1 || out.token == 3);
            }
        }
        let p = SamplingParams { top_p: 0.5, logprobs: Some(2), ..params() };
        Sampler::new(p, &[], 0).sample(&mut [f32::NAN; 8]);
    }
}
