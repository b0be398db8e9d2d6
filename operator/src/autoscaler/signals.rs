//! The load signal, read from `/metrics` in the Prometheus text format: each
//! router's requests in flight and held per model, each worker's requests
//! running and waiting. The scaler sums them per pool.

use std::collections::HashMap;

use super::decide::Demand;

/// Series a router reports per model (its `model` label is the pool's served name).
pub const ROUTER_IN_FLIGHT: &str = "kandle_router_in_flight";
pub const ROUTER_HELD: &str = "kandle_router_held";
/// Series every worker reports (the names Gateway API inference pickers read).
pub const WORKER_RUNNING: &str = "vllm:num_requests_running";
pub const WORKER_WAITING: &str = "vllm:num_requests_waiting";

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// The samples of an exposition; comments and lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(sample).collect()
}

fn sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=')?;
            let key = rest[..eq].trim().to_string();
            rest = rest[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            rest = &rest[end + 1..];
            labels.push((key, value));
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample { name, labels, value })
}

/// What one router reports, per served model.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RouterLoad {
    pub in_flight: u32,
    pub held: u32,
}

/// Adds a router's report to `by_model`.
pub fn add_router(samples: &[Sample], by_model: &mut HashMap<String, RouterLoad>) {
    for s in samples {
        let Some(model) = s.label("model") else { continue };
        let load = by_model.entry(model.to_string()).or_default();
        let n = count(s.value);
        match s.name.as_str() {
            ROUTER_IN_FLIGHT => load.in_flight = load.in_flight.saturating_add(n),
            ROUTER_HELD => load.held = load.held.saturating_add(n),
            _ => {}
        }
    }
}

/// Requests running and waiting at one worker.
pub fn worker_load(samples: &[Sample]) -> u32 {
    samples
        .iter()
        .filter(|s| s.name == WORKER_RUNNING || s.name == WORKER_WAITING)
        .map(|s| count(s.value))
        .fold(0, u32::saturating_add)
}

fn count(value: f64) -> u32 {
    if value.is_finite() && value > 0.0 {
        value.min(u32::MAX as f64) as u32
    } else {
        0
    }
}

/// A pool's demand: what the routers hold, plus what runs, as the larger of
/// the routers' and the workers' counts (a request relayed by a router is also
/// running at a worker; one sent to the Service directly only the worker sees).
pub fn demand(routers: RouterLoad, workers: u32) -> Demand {
    Demand { in_flight: routers.in_flight.max(workers), held: routers.held }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTER: &str = r#"# HELP kandle_router_in_flight Requests being proxied, by model.
# TYPE kandle_router_in_flight gauge
kandle_router_in_flight{model="smollm2"} 3
kandle_router_in_flight{model="other"} 0
# TYPE kandle_router_held gauge
kandle_router_held{model="smollm2"} 2
kandle_router_held{model="we\"ird"} 1
kandle_router_requests_total{model="smollm2",status="200"} 17
"#;

    #[test]
    fn parses_names_labels_and_values() {
        let samples = parse(ROUTER);
        assert_eq!(samples.len(), 5);
        assert_eq!(samples[0].name, "kandle_router_in_flight");
        assert_eq!(samples[0].label("model"), Some("smollm2"));
        assert_eq!(samples[0].value, 3.0);
        assert_eq!(samples[3].label("model"), Some("we\"ird"));
        assert_eq!(samples[4].label("status"), Some("200"));
        assert!(parse("garbage{\nname 1\nx{a=\"b\"} nope\n").iter().all(|s| s.name == "name"));
    }

    #[test]
    fn router_reports_add_up_per_model() {
        let mut by_model = HashMap::new();
        add_router(&parse(ROUTER), &mut by_model);
        add_router(&parse(ROUTER), &mut by_model);
        assert_eq!(by_model["smollm2"], RouterLoad { in_flight: 6, held: 4 });
        assert_eq!(by_model["other"], RouterLoad::default());
    }

    #[test]
    fn a_worker_reports_running_and_waiting() {
        let text = "vllm:num_requests_running{model_name=\"m\"} 2\nvllm:num_requests_waiting{model_name=\"m\"} 5\nvllm:kv_cache_usage_perc 0.5\n";
        assert_eq!(worker_load(&parse(text)), 7);
    }

    #[test]
    fn demand_counts_a_relayed_request_once() {
        let routers = RouterLoad { in_flight: 4, held: 1 };
        assert_eq!(demand(routers, 3), Demand { in_flight: 4, held: 1 });
        assert_eq!(demand(routers, 9), Demand { in_flight: 9, held: 1 });
    }
}
