//! Durations typed by operators on command lines (`500ms`, `10s`, `2m`, `24h`, `7d`): one
//! parser, so that every Tandem binary reads them alike.

use std::time::Duration;

/// Parses `500ms`, `10s` (or a bare `10`), `2m`, `24h` or `7d`. Zero is refused: every
/// duration Tandem takes from an operator (a timeout, a retention) must be positive.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 10s, 2m, 24h or 7d"))?;
    let seconds = |per: u64| {
        number
            .checked_mul(per)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{text:?} is too long a duration"))
    };
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" | "" => Duration::from_secs(number),
        "m" => seconds(60)?,
        "h" => seconds(3600)?,
        "d" => seconds(24 * 3600)?,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    if duration.is_zero() {
        return Err(format!("{text:?}: the duration must be positive"));
    }
    Ok(duration)
}

/// Parses a retention: a duration as [`parse_duration`] reads it, or `forever` (`None`: keep
/// everything).
pub fn parse_retention(text: &str) -> Result<Option<Duration>, String> {
    if text.trim() == "forever" {
        return Ok(None);
    }
    parse_duration(text).map(Some)
}

/// A duration in whole milliseconds (one too long to count is as good as forever).
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_parses_and_bad_input_is_named() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration(" 7d "), Ok(Duration::from_secs(604_800)));
        for bad in ["", "0s", "ten", "5y", "-1s"] {
            let error = parse_duration(bad).unwrap_err();
            assert!(error.contains(bad.trim()), "{bad:?}: {error}");
        }
        assert_eq!(parse_retention("forever"), Ok(None));
        assert_eq!(parse_retention("1s"), Ok(Some(Duration::from_secs(1))));
        assert!(parse_retention("never").is_err());
    }
}
