//! The engine thread's loop: admits waiting requests into the batch, advances every
//! running sequence by one token per round, drops sequences whose client left.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use super::sampler::Sampler;
use super::sequence::{Sequence, SequenceSpec, StepContext, StepOutcome};
use super::{EngineConfig, EngineModel, Load, Queued};
use crate::metrics::Metrics;

pub struct Scheduler {
    model: EngineModel,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    load: Arc<Load>,
    rx: Receiver<Queued>,
    waiting: VecDeque<Queued>,
    running: Vec<Sequence>,
    next_request_id: u64,
}

impl Scheduler {
    pub(super) fn new(
        model: EngineModel,
        config: EngineConfig,
        metrics: Arc<Metrics>,
        load: Arc<Load>,
        rx: Receiver<Queued>,
    ) -> Self {
        Self { model, config, metrics, load, rx, waiting: VecDeque::new(), running: Vec::new(), next_request_id: 0 }
    }

    pub fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(q) => self.waiting.push_back(q),
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(q) => self.waiting.push_back(q),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.running.is_empty() && self.waiting.is_empty() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.drop_abandoned();
            self.admit();
            self.publish_load();
            self.step_all();
            // Again after the step, so the gauges fall to zero before the thread idles.
            self.publish_load();
        }
    }

    fn drop_abandoned(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|q| !q.request.events.is_closed());
        self.load.waiting.fetch_sub(before - self.waiting.len(), Ordering::SeqCst);
        self.running.retain(|s| !s.abandoned());
    }

    /// Moves whole requests (all their choices) into the batch while they fit.
    fn admit(&mut self) {
        while let Some(front) = self.waiting.front() {
            let n = front.request.n.max(1);
            let fits = self.running.len() + n <= self.config.max_batch_size || self.running.is_empty();
            if !fits {
                break;
            }
            let Some(q) = self.waiting.pop_front() else { break };
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            let request_id = self.next_request_id;
            self.next_request_id += 1;
            let r = q.request;
            for index in 0..n {
                let spec = SequenceSpec {
                    request_id,
                    index,
                    prompt: r.prompt.clone(),
                    sampler: Sampler::new(r.sampling.clone(), &r.prompt, index as u64),
                    reasoning: r.reasoning,
                    stop: r.stop.clone(),
                    max_tokens: r.max_tokens,
                    events: r.events.clone(),
                    enqueued: q.enqueued,
                };
                self.running.push(Sequence::new(spec, self.model.weights.session()));
            }
        }
    }

    fn step_all(&mut self) {
        let ctx = StepContext { tokenizer: &self.model.tokenizer, stop_ids: &self.model.special.stop_ids };
        let mut finished = Vec::new();
        for (i, seq) in self.running.iter_mut().enumerate() {
            match seq.step(&ctx) {
                Ok(StepOutcome::Running) => {}
                Ok(StepOutcome::Finished) => finished.push(i),
                Err(message) => {
                    tracing::error!(error = %message, "generation failed");
                    seq.fail(&message);
                    finished.push(i);
                }
            }
            let now = Instant::now();
            match seq.last_token_at.replace(now) {
                Some(previous) => self.metrics.inter_token_latency.observe((now - previous).as_secs_f64()),
                None => self.metrics.time_to_first_token.observe((now - seq.enqueued).as_secs_f64()),
            }
        }
        for i in finished.into_iter().rev() {
            self.running.swap_remove(i);
        }
    }

    fn publish_load(&self) {
        let requests: HashSet<u64> = self.running.iter().map(|s| s.request_id).collect();
        let used: usize = self.running.iter().map(|s| s.position).sum();
        let capacity = (self.config.max_batch_size * self.config.max_context).max(1);
        self.metrics.set_load(
            self.load.waiting.load(Ordering::SeqCst),
            requests.len(),
            self.running.len(),
            used as f64 / capacity as f64,
        );
    }
}
