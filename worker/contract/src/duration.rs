//! Go-style durations (`500ms`, `90s`, `5m`, `1h30m`), as Kubernetes objects and
//! the operator's and the worker's flags write them.

use std::time::Duration;

/// What [`parse`] accepts, as the JSON-schema pattern of the CRD's duration
/// fields (minus the bare number, which only flags accept).
pub const PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// Parses a sum of `<digits><unit>` terms (units `ms`, `s`, `m`, `h`); a bare
/// number is seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration (for example 90s, 5m, 1h30m)");
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let term = match &rest[..unit_len] {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.saturating_mul(60)),
            "h" => Duration::from_secs(value.saturating_mul(3600)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(term);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_terms_add_up() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("1m500ms"), Ok(Duration::from_millis(60_500)));
        assert_eq!(parse("600"), Ok(Duration::from_secs(600)));
    }

    #[test]
    fn anything_else_is_refused() {
        for text in ["", "m", "5d", "-5s", "5 m", "1.5h", "s5", "5mm"] {
            assert!(parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn the_crd_pattern_admits_exactly_what_parses() {
        let pattern = regex_lite(PATTERN);
        for text in ["90s", "5m", "1h30m", "1m500ms", "0s"] {
            assert!(pattern(text) && parse(text).is_ok(), "{text}");
        }
        for text in ["", "m", "5d", "-5s", "1.5h"] {
            assert!(!pattern(text) && parse(text).is_err(), "{text}");
        }
    }

    /// The CRD pattern checked the way the API server would (it is anchored).
    fn regex_lite(pattern: &str) -> impl Fn(&str) -> bool {
        let regex = regex::Regex::new(pattern).expect("pattern compiles");
        move |text: &str| regex.is_match(text)
    }
}
