//! Helpers the integration tests share: driving a model service's engine
//! directly, and reading its metrics.

use kandle_worker::api::request::ChatRequest;
use kandle_worker::engine::Event;
use kandle_worker::metrics::Metrics;
use kandle_worker::runtime::{KvCache, Logits, Model, StepSequence};
use kandle_worker::service::ModelService;

/// Submits every request at once (so the engine may batch them) and returns
/// each one's completion text.
pub async fn completions(service: &ModelService, requests: &[ChatRequest]) -> Vec<String> {
    let mut receivers = Vec::new();
    for r in requests {
        let prepared = service.prepare(r).expect("prepares");
        service.engine.submit(prepared.request).expect("submits");
        receivers.push(prepared.events);
    }
    let mut texts = Vec::new();
    for mut rx in receivers {
        let mut text = String::new();
        while let Some(event) = rx.recv().await {
            match event {
                Event::Delta(d) => text.push_str(&d.content),
                Event::Finished { .. } => break,
                Event::Failed { message } => panic!("{message}"),
            }
        }
        texts.push(text);
    }
    texts
}

/// The value of an unlabelled series.
pub fn metric(metrics: &Metrics, name: &str) -> f64 {
    let text = metrics.encode().expect("metrics");
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// One forward step; the logits of each sequence.
pub fn forward(model: &Model, steps: &[StepSequence], cache: &KvCache) -> Vec<Vec<f32>> {
    let mut logits = Logits::default();
    model.forward(steps, cache, &mut logits).expect("forward");
    (0..logits.rows()).map(|i| logits.row(i).to_vec()).collect()
}
