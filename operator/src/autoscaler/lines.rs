//! The scaling decision as a line filter, to try a policy outside a cluster:
//! each input line is one pool's observation (JSON), each output line the
//! decision for it, made by the same [`decide`] the autoscaler runs.
//! `kandle-operator decide` runs it on stdin and stdout; `scripts/fleet_sim.py`
//! starts and stops local workers with it.
//!
//! In: `{"pool": "chat", "scaling": {"minReplicas": 0, "maxReplicas": 3},
//! "replicas": 1, "inFlight": 5, "held": 0}` (`scaling` as in a
//! ModelDeployment's `spec.scaling`). Out: `{"pool": "chat", "replicas": 2,
//! "reason": "ScaledUp", "message": "1→2: 5 requests in flight, target 4 per
//! worker"}`, or `{"error": "..."}` for a line that cannot be read; the filter
//! goes on with the next. The clock is the filter's own: what it remembers of
//! a pool (recent demand, last request) ages in real time.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::decide::{decide, Demand, History, Policy};
use crate::api::ScalingSpec;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Observation {
    pool: String,
    scaling: ScalingSpec,
    replicas: u32,
    #[serde(default)]
    in_flight: u32,
    #[serde(default)]
    held: u32,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Answer {
    Decision { pool: String, replicas: u32, reason: &'static str, message: String },
    Error { error: String },
}

/// Answers every line of `input` on `output` (flushed per line) until `input` ends.
pub fn run(input: impl BufRead, mut output: impl Write, mut now: impl FnMut() -> Instant) -> io::Result<()> {
    let mut histories: HashMap<String, History> = HashMap::new();
    for line in input.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Observation>(&line) {
            Err(e) => Answer::Error { error: format!("cannot read the observation: {e}") },
            Ok(seen) => match Policy::of(&seen.scaling) {
                Err(e) => Answer::Error { error: format!("pool {}: {e}", seen.pool) },
                Ok(policy) => {
                    let history = histories.entry(seen.pool.clone()).or_default();
                    let demand = Demand { in_flight: seen.in_flight, held: seen.held };
                    let decision = decide(&policy, seen.replicas, demand, history, now());
                    Answer::Decision {
                        pool: seen.pool,
                        replicas: decision.replicas,
                        reason: decision.reason(),
                        message: decision.to_string(),
                    }
                }
            },
        };
        serde_json::to_writer(&mut output, &answer)?;
        output.write_all(b"\n")?;
        output.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn answers(input: &str, clock: &[u64]) -> Vec<serde_json::Value> {
        let start = Instant::now();
        let mut ticks = clock.iter().map(|s| start + Duration::from_secs(*s));
        let mut out = Vec::new();
        run(input.as_bytes(), &mut out, || ticks.next().unwrap_or(start)).expect("in-memory output");
        String::from_utf8(out)
            .expect("JSON is UTF-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("every answer is one JSON line"))
            .collect()
    }

    #[test]
    fn remembers_each_pool_between_lines_and_reports_bad_lines() {
        let policy = r#""scaling": {"minReplicas": 0, "maxReplicas": 3, "targetRequests": 2, "scaleDownDelay": "10s", "scaleToZeroAfter": "30s"}"#;
        let input = [
            format!(r#"{{"pool": "a", {policy}, "replicas": 0, "held": 3}}"#),
            format!(r#"{{"pool": "b", {policy}, "replicas": 1}}"#),
            "not json".to_owned(),
            format!(r#"{{"pool": "a", {policy}, "replicas": 2}}"#),
            format!(r#"{{"pool": "a", {policy}, "replicas": 2}}"#),
            format!(r#"{{"pool": "a", {policy}, "replicas": 1}}"#),
            r#"{"pool": "c", "scaling": {"maxReplicas": 1, "scaleDownDelay": "soon"}, "replicas": 1}"#.to_owned(),
        ]
        .join("\n");
        // The clock is read once per decision; the bad lines take no reading.
        let got = answers(&input, &[0, 0, 5, 20, 40]);
        assert_eq!(got[0]["replicas"], 2, "{:?}", got[0]);
        assert_eq!(got[0]["reason"], "ScaledUp");
        assert_eq!(got[0]["message"], "0→2: 0 requests in flight and 3 held, target 2 per worker");
        // Pool b is first seen now: it keeps its worker for a whole delay.
        assert_eq!(got[1]["replicas"], 1, "{:?}", got[1]);
        assert!(got[2]["error"].as_str().is_some_and(|e| e.starts_with("cannot read")), "{:?}", got[2]);
        // Pool a is idle from t=0: within the delay it keeps 2, past it 1, past scaleToZeroAfter 0.
        assert_eq!(got[3]["replicas"], 2, "{:?}", got[3]);
        assert_eq!(got[4]["replicas"], 1, "{:?}", got[4]);
        assert_eq!(got[5]["replicas"], 0, "{:?}", got[5]);
        assert_eq!(got[5]["reason"], "ScaledToZero");
        assert!(got[6]["error"].as_str().is_some_and(|e| e.starts_with("pool c:")), "{:?}", got[6]);
        assert_eq!(got.len(), 7);
    }
}
