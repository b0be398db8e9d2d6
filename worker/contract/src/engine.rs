//! Ranges of the engine settings the CRD passes to `kandle-worker serve` as flags.

use std::ops::RangeInclusive;

/// `--max-batch-size` / `engine.maxBatchSize`: sequences in one forward pass.
pub const MAX_BATCH_SIZE: RangeInclusive<i64> = 1..=256;
/// `--max-context` / `engine.maxContextLength`: tokens per sequence.
pub const MAX_CONTEXT_LENGTH: RangeInclusive<i64> = 16..=1_048_576;
/// `--threads` / `engine.threads`: 0 means every core the process may use.
pub const THREADS: RangeInclusive<i64> = 0..=1024;
