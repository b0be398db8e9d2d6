//! Ranges of the engine settings the CRD passes to `kandle-worker serve` as flags.

use std::ops::RangeInclusive;

/// `--max-batch-size` / `engine.maxBatchSize`: sequences in one forward pass.
pub const MAX_BATCH_SIZE: RangeInclusive<i64> = 1..=256;
/// `--max-context` / `engine.maxContextLength`: tokens per sequence.
pub const MAX_CONTEXT_LENGTH: RangeInclusive<i64> = 16..=1_048_576;
/// `--threads` / `engine.threads`: 0 means every core the process may use.
pub const THREADS: RangeInclusive<i64> = 0..=1024;
/// `--max-batch-tokens` / `engine.maxBatchTokens`: tokens in one forward pass.
pub const MAX_BATCH_TOKENS: RangeInclusive<i64> = 1..=1_048_576;

/// `--kv-cache-memory` / `engine.kvCacheMemory`: bytes as a Kubernetes quantity
/// (`2Gi`, `512M`, `1073741824`), or a fraction of the container's memory limit
/// written with a decimal point (`0.25`, `1.0`).
pub const KV_CACHE_MEMORY_PATTERN: &str =
    r"^(0?\.[0-9]*[1-9][0-9]*|1\.0*|[0-9]+|[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T))$";

/// The size of the KV block pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCacheMemory {
    Bytes(u64),
    /// Of the container's memory limit (or of the machine's memory without one), in (0, 1].
    Fraction(f64),
}

impl KvCacheMemory {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is neither bytes (2Gi, 512M, 1073741824) nor a fraction in (0, 1] (0.25)");
        let units: [(&str, f64); 8] = [
            ("Ki", 1024.0),
            ("Mi", 1024f64.powi(2)),
            ("Gi", 1024f64.powi(3)),
            ("Ti", 1024f64.powi(4)),
            ("k", 1e3),
            ("M", 1e6),
            ("G", 1e9),
            ("T", 1e12),
        ];
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let decimal = |s: &str| match s.split_once('.') {
            Some((whole, frac)) => digits(whole) && digits(frac),
            None => digits(s),
        };
        if let Some((unit, scale)) = units.iter().find(|(u, _)| text.ends_with(u)) {
            let number = &text[..text.len() - unit.len()];
            return match number.parse::<f64>() {
                Ok(x) if decimal(number) => Ok(Self::Bytes((x * scale) as u64)),
                _ => Err(bad()),
            };
        }
        if digits(text) {
            return text.parse().map(Self::Bytes).map_err(|_| bad());
        }
        let (whole, frac) = text.split_once('.').ok_or_else(bad)?;
        let fraction_form = (whole.is_empty() || digits(whole)) && (frac.is_empty() || digits(frac));
        match text.parse::<f64>() {
            Ok(x) if fraction_form && x > 0.0 && x <= 1.0 => Ok(Self::Fraction(x)),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_memory_forms() {
        assert_eq!(KvCacheMemory::parse("2Gi"), Ok(KvCacheMemory::Bytes(2 << 30)));
        assert_eq!(KvCacheMemory::parse("1.5Gi"), Ok(KvCacheMemory::Bytes(3 << 29)));
        assert_eq!(KvCacheMemory::parse("512M"), Ok(KvCacheMemory::Bytes(512_000_000)));
        assert_eq!(KvCacheMemory::parse("1073741824"), Ok(KvCacheMemory::Bytes(1 << 30)));
        assert_eq!(KvCacheMemory::parse("0.25"), Ok(KvCacheMemory::Fraction(0.25)));
        assert_eq!(KvCacheMemory::parse(".5"), Ok(KvCacheMemory::Fraction(0.5)));
        assert_eq!(KvCacheMemory::parse("1.0"), Ok(KvCacheMemory::Fraction(1.0)));
    }

    /// The schema's pattern and the parser accept exactly the same strings.
    #[test]
    fn kv_cache_memory_pattern_and_parser_agree() {
        let pattern = regex::Regex::new(KV_CACHE_MEMORY_PATTERN).expect("compiles");
        for text in [
            "2Gi",
            "1.5Gi",
            "512M",
            "10k",
            "1073741824",
            "0.25",
            ".5",
            "1.0",
            "1.",
            "1",
            "0",
            "0.0",
            "1.5",
            "2.0",
            "-1",
            "lots",
            "",
            "Gi",
            "1.Gi",
            ".5Gi",
            "2 Gi",
            "0.",
            "1e9",
            "2GiB",
        ] {
            assert_eq!(
                pattern.is_match(text),
                KvCacheMemory::parse(text).is_ok(),
                "{text:?}: {:?}",
                KvCacheMemory::parse(text)
            );
        }
    }
}
