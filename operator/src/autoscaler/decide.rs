//! The scaling decision, a pure function: a pool's policy, its replica count,
//! the demand just observed, what the scaler remembers of earlier demand, and
//! the clock → the replica count the pool should have, and why.
//!
//! Scale-up is at once; scale-down goes to the largest count the demand asked
//! for over the last `scale_down_delay` (so a load that comes and goes does not
//! make the pool flap); a pool whose minimum is 0 goes to zero only after no
//! request at all for `scale_to_zero_after`. Never outside [min, max].

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::api::ScalingSpec;
use crate::duration;

/// A pool's scaling policy, with its durations parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    /// Requests (in flight, waiting or held) one worker should carry.
    pub target: u32,
    pub scale_down_delay: Duration,
    pub scale_to_zero_after: Duration,
}

pub const DEFAULT_SCALE_DOWN_DELAY: Duration = Duration::from_secs(300);
pub const DEFAULT_SCALE_TO_ZERO_AFTER: Duration = Duration::from_secs(900);

impl Policy {
    pub fn of(spec: &ScalingSpec) -> Result<Self, String> {
        let parse = |text: &Option<String>, default: Duration| text.as_deref().map_or(Ok(default), duration::parse);
        let count = |n: i32| u32::try_from(n).unwrap_or(0);
        Ok(Self {
            min: count(spec.min_replicas),
            max: count(spec.max_replicas).max(count(spec.min_replicas)),
            target: count(spec.target_requests).max(1),
            scale_down_delay: parse(&spec.scale_down_delay, DEFAULT_SCALE_DOWN_DELAY)?,
            scale_to_zero_after: parse(&spec.scale_to_zero_after, DEFAULT_SCALE_TO_ZERO_AFTER)?,
        })
    }
}

/// Demand seen at one moment, summed over every router and worker of the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// Requests running or waiting at a worker (or being relayed by a router).
    pub in_flight: u32,
    /// Requests a router holds because the pool has no ready worker.
    pub held: u32,
}

impl Demand {
    pub fn total(&self) -> u32 {
        self.in_flight.saturating_add(self.held)
    }
}

/// What the scaler remembers of one pool between decisions.
#[derive(Debug, Default, Clone)]
pub struct History {
    /// The count each recent demand asked for, newest last, covering the scale-down delay.
    wanted: VecDeque<(Instant, u32)>,
    /// When a request was last seen (or when the scaler began watching the pool).
    last_busy: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Up,
    Down,
    ToZero,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub from: u32,
    pub replicas: u32,
    pub change: Change,
    pub demand: Demand,
    pub target: u32,
}

impl Decision {
    /// The event reason for a change.
    pub fn reason(&self) -> &'static str {
        match self.change {
            Change::Up => "ScaledUp",
            Change::Down => "ScaledDown",
            Change::ToZero => "ScaledToZero",
            Change::None => "Steady",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Demand { in_flight, held } = self.demand;
        write!(f, "{}→{}: {in_flight} requests in flight", self.from, self.replicas)?;
        if held > 0 {
            write!(f, " and {held} held")?;
        }
        write!(f, ", target {} per worker", self.target)
    }
}

pub fn decide(policy: &Policy, current: u32, demand: Demand, history: &mut History, now: Instant) -> Decision {
    let total = demand.total();
    if history.last_busy.is_none() || total > 0 {
        // A pool first seen counts as busy now: nothing shrinks before a whole
        // delay has been watched (a new leader knows no earlier demand).
        if history.last_busy.is_none() {
            history.wanted.push_back((now, current));
        }
        history.last_busy = Some(now);
    }
    let wanted = total.div_ceil(policy.target).clamp(policy.min, policy.max);
    history.wanted.push_back((now, wanted));
    while history.wanted.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) > policy.scale_down_delay) {
        history.wanted.pop_front();
    }
    let recent = history.wanted.iter().map(|(_, n)| *n).max().unwrap_or(wanted).clamp(policy.min, policy.max);
    let idle_long = history.last_busy.is_some_and(|t| now.saturating_duration_since(t) >= policy.scale_to_zero_after);

    let replicas = if wanted > current {
        wanted
    } else if current > policy.max {
        policy.max
    } else if recent == 0 && !idle_long {
        // Idle, but not for long enough to go to zero.
        current.min(1)
    } else {
        recent.min(current)
    };
    let change = match replicas.cmp(&current) {
        std::cmp::Ordering::Greater => Change::Up,
        std::cmp::Ordering::Less if replicas == 0 => Change::ToZero,
        std::cmp::Ordering::Less => Change::Down,
        std::cmp::Ordering::Equal => Change::None,
    };
    Decision { from: current, replicas, change, demand, target: policy.target }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(min: u32, max: u32) -> Policy {
        Policy {
            min,
            max,
            target: 4,
            scale_down_delay: Duration::from_secs(300),
            scale_to_zero_after: Duration::from_secs(900),
        }
    }

    fn load(in_flight: u32) -> Demand {
        Demand { in_flight, held: 0 }
    }

    /// Runs `steps` of (seconds since start, demand) from `start` replicas,
    /// applying each decision; returns the replica count after each step.
    fn run(policy: &Policy, start: u32, steps: &[(u64, Demand)]) -> Vec<u32> {
        let t0 = Instant::now();
        let mut history = History::default();
        let mut current = start;
        steps
            .iter()
            .map(|(at, demand)| {
                current = decide(policy, current, *demand, &mut history, t0 + Duration::from_secs(*at)).replicas;
                current
            })
            .collect()
    }

    #[test]
    fn scales_up_at_once_to_demand_over_target() {
        let d = decide(&policy(1, 10), 1, load(14), &mut History::default(), Instant::now());
        assert_eq!((d.replicas, d.change), (4, Change::Up));
        assert_eq!(d.to_string(), "1→4: 14 requests in flight, target 4 per worker");
        assert_eq!(d.reason(), "ScaledUp");
    }

    #[test]
    fn held_requests_bring_a_pool_up_from_zero() {
        let demand = Demand { in_flight: 0, held: 1 };
        let d = decide(&policy(0, 3), 0, demand, &mut History::default(), Instant::now());
        assert_eq!((d.replicas, d.change), (1, Change::Up));
        assert_eq!(d.to_string(), "0→1: 0 requests in flight and 1 held, target 4 per worker");
    }

    #[test]
    fn scales_down_only_after_the_delay() {
        // 12 requests → 3 workers; then 2 requests: still 3 until 300 s after the last high load.
        let steps = [(0, load(12)), (60, load(2)), (200, load(2)), (299, load(2)), (301, load(2)), (400, load(2))];
        assert_eq!(run(&policy(1, 10), 1, &steps), [3, 3, 3, 3, 1, 1]);
    }

    #[test]
    fn goes_to_zero_only_after_the_idle_time() {
        let steps = [
            (0, load(4)),    // 1 worker
            (100, load(1)),  // the last request seen
            (500, load(0)),  // past the scale-down delay, not idle long enough: keeps 1
            (999, load(0)),  // 899 s idle
            (1000, load(0)), // 900 s idle: zero
            (1010, load(0)),
        ];
        assert_eq!(run(&policy(0, 5), 1, &steps), [1, 1, 1, 1, 0, 0]);
        let t0 = Instant::now();
        let mut history = History::default();
        let mut current = 1;
        for (at, demand) in [(0, load(1)), (900, load(0))] {
            let d = decide(&policy(0, 5), current, demand, &mut history, t0 + Duration::from_secs(at));
            current = d.replicas;
            if at == 900 {
                assert_eq!((d.change, d.reason()), (Change::ToZero, "ScaledToZero"));
            }
        }
    }

    #[test]
    fn a_minimum_above_zero_is_kept_however_idle() {
        let steps = [(0, load(0)), (5000, load(0)), (10_000, load(0))];
        assert_eq!(run(&policy(2, 5), 3, &steps), [3, 2, 2]);
    }

    #[test]
    fn never_beyond_the_bounds() {
        assert_eq!(run(&policy(1, 3), 1, &[(0, load(1000))]), [3]);
        // A maximum lowered under the running count applies at once.
        assert_eq!(run(&policy(1, 2), 5, &[(0, load(40))]), [2]);
        // A minimum raised above it too.
        assert_eq!(run(&policy(4, 6), 1, &[(0, load(0))]), [4]);
    }

    #[test]
    fn a_flapping_load_does_not_flap_the_pool() {
        // Bursts of 16 every 2 minutes with quiet in between: 4 workers throughout.
        let steps: Vec<(u64, Demand)> =
            (0..20).map(|i| (i * 60, if i % 2 == 0 { load(16) } else { load(1) })).collect();
        let counts = run(&policy(1, 8), 1, &steps);
        assert!(counts.iter().all(|&n| n == 4), "{counts:?}");
    }

    #[test]
    fn a_new_scaler_waits_a_whole_delay_before_shrinking() {
        // A new leader finds 5 workers and no load: it keeps them for the delay.
        let steps = [(0, load(0)), (299, load(0)), (301, load(0))];
        assert_eq!(run(&policy(1, 8), 5, &steps), [5, 5, 1]);
    }

    #[test]
    fn the_policy_reads_the_spec_with_defaults() {
        let spec: ScalingSpec = serde_json::from_value(serde_json::json!({"maxReplicas": 3})).expect("spec");
        assert_eq!(
            Policy::of(&spec),
            Ok(Policy {
                min: 1,
                max: 3,
                target: 4,
                scale_down_delay: DEFAULT_SCALE_DOWN_DELAY,
                scale_to_zero_after: DEFAULT_SCALE_TO_ZERO_AFTER
            })
        );
        let spec: ScalingSpec = serde_json::from_value(serde_json::json!({
            "minReplicas": 0, "maxReplicas": 2, "targetRequests": 8, "scaleDownDelay": "30s", "scaleToZeroAfter": "2m"
        }))
        .expect("spec");
        let policy = Policy::of(&spec).expect("policy");
        assert_eq!((policy.min, policy.target, policy.scale_to_zero_after), (0, 8, Duration::from_secs(120)));
    }
}
