//! Turns logits into the next token: logit bias, penalties, temperature, top-k,
//! top-p, min-p, and seeded sampling; reports log-probabilities when asked.

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
}

impl Sampler {
    /// `stream` separates the random streams of several choices of one seeded request.
    pub fn new(params: SamplingParams, prompt: &[u32], stream: u64) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        let seen = if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { Default::default() };
        Self { params, rng, generated_counts: Default::default(), seen }
    }

    pub fn reports_logprobs(&self) -> bool {
        self.params.logprobs.is_some()
    }

    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        self.adjust(logits);
        let log_probs = self.params.logprobs.map(|_| log_softmax(logits));
        let token = if self.params.temperature <= 0.0 { argmax(logits) } else { self.draw(logits) };
        let (logprob, top) = match (&log_probs, self.params.logprobs) {
            (Some(lp), Some(n)) => (lp[token as usize], top_n(lp, n)),
            _ => (0.0, Vec::new()),
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
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
            .filter(|(_, p)| *p > 0.0)
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        let needs_order = self.params.top_k > 0 || self.params.top_p < 1.0;
        if needs_order {
            candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        }
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k);
        }
        if self.params.min_p > 0.0 {
            let peak = candidates.iter().map(|c| c.1).fold(0.0, f32::max);
            let floor = peak * self.params.min_p;
            candidates.retain(|c| c.1 >= floor);
        }
        if self.params.top_p < 1.0 {
            let total: f32 = candidates.iter().map(|c| c.1).sum();
            let mut cumulative = 0.0;
            let mut keep = candidates.len();
            for (i, c) in candidates.iter().enumerate() {
                cumulative += c.1 / total;
                if cumulative >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            candidates.truncate(keep);
        }
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut target = self.rng.random::<f32>() * total;
        for &(token, weight) in &candidates {
            if target < weight {
                return token;
            }
            target -= weight;
        }
        // Rounding left a sliver past the last candidate.
        candidates.last().map(|c| c.0).unwrap_or(0)
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

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|l| l - log_sum).collect()
}

fn top_n(log_probs: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut all: Vec<(u32, f32)> = log_probs.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let n = n.min(all.len());
    all.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
    all.truncate(n);
    all.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    all
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
}
