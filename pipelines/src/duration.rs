//! GitLab duration strings (`timeout: 1h 30m`, `3 hours 30 minutes`,
//! `90 minutes`, `3600`), as GitLab's ChronicDuration accepts them.

use std::time::Duration;

/// Parses a GitLab duration. A bare number is seconds. Returns `None` for
/// anything it does not understand, and for a zero duration.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let s = text.trim().to_ascii_lowercase();
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s.as_str();
    let mut any = false;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
        if let Some(r) = rest.strip_prefix("and ") {
            rest = r;
            continue;
        }
        if rest.is_empty() {
            break;
        }
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = rest[num_len..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let factor = match unit {
            "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86_400.0,
            "w" | "wk" | "wks" | "week" | "weeks" => 604_800.0,
            "mo" | "mos" | "month" | "months" => 2_592_000.0,
            "y" | "yr" | "yrs" | "year" | "years" => 31_536_000.0,
            _ => return None,
        };
        total += n * factor;
        any = true;
    }
    if !any || !total.is_finite() || total <= 0.0 || total > 1e12 {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitlab_forms() {
        let m = |x: u64| Some(Duration::from_secs(x * 60));
        assert_eq!(parse_duration("1h 30m"), m(90));
        assert_eq!(parse_duration("1h30m"), m(90));
        assert_eq!(parse_duration("10 minutes"), m(10));
        assert_eq!(parse_duration("3 hours 30 minutes"), m(210));
        assert_eq!(parse_duration("2h and 5 min"), m(125));
        assert_eq!(parse_duration("1 day"), m(1440));
        assert_eq!(parse_duration("3600"), m(60));
        assert_eq!(parse_duration("1.5h"), m(90));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("10 parsecs"), None);
        assert_eq!(parse_duration("0"), None);
        assert_eq!(parse_duration("-5m"), None);
    }
}
