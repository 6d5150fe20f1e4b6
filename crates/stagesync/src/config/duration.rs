//! Durations in the config: humantime text (`"500ms"`, `"30s"`, `"1h"`, `"2m 30s"`) or a bare
//! number in the key's own unit (seconds, or milliseconds for the `_ms` keys).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Unexpected, Visitor};

/// What a duration key in seconds accepts, for error messages.
const SECONDS_FORMS: &str =
    "a duration such as \"500ms\", \"30s\", \"1h\" or \"2m 30s\", or a number of seconds";
/// What a duration key in milliseconds accepts, for error messages.
const MILLIS_FORMS: &str =
    "a number of milliseconds, or a duration such as \"100ms\", \"2s\" or \"1m 30s\"";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Seconds,
    Millis,
}

/// A positive duration: humantime text such as "1s", "500ms", "1h" or "2m 30s", or a bare number
/// of seconds ("2", "0.5"). Zero is `None`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    parse(text, Unit::Seconds).filter(|d| !d.is_zero())
}

/// Any duration, zero included; a bare number is in `unit`.
fn parse(text: &str, unit: Unit) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if text.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && text.chars().all(|c| c.is_ascii_digit() || c == '.')
    {
        let n: f64 = text.parse().ok()?;
        return from_number(n, unit);
    }
    humantime::parse_duration(text).ok()
}

fn from_number(n: f64, unit: Unit) -> Option<Duration> {
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit {
        Unit::Seconds => n,
        Unit::Millis => n / 1000.0,
    };
    Duration::try_from_secs_f64(secs).ok()
}

struct DurationVisitor(Unit);

impl<'de> Visitor<'de> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Unit::Seconds => SECONDS_FORMS,
            Unit::Millis => MILLIS_FORMS,
        })
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Ok(match self.0 {
            Unit::Seconds => Duration::from_secs(v),
            Unit::Millis => Duration::from_millis(v),
        })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        match self.0 {
            Unit::Seconds => {
                from_number(v, self.0).ok_or_else(|| E::invalid_value(Unexpected::Float(v), &self))
            }
            Unit::Millis => Err(E::invalid_type(Unexpected::Float(v), &self)),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v, self.0).ok_or_else(|| E::invalid_value(Unexpected::Str(v), &self))
    }
}

/// A duration key in seconds (see [`parse_duration`]); zero passes here, `validate` refuses it
/// where it makes no sense.
pub(super) fn de_duration<'de, D: de::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor(Unit::Seconds))
}

/// A `_ms` key: an integer number of milliseconds, or a humantime string.
pub(super) fn de_millis<'de, D: de::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let duration = d.deserialize_any(DurationVisitor(Unit::Millis))?;
    Ok(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humantime_forms_and_bare_numbers() {
        assert_eq!(parse("1h", Unit::Seconds), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse("2m 30s", Unit::Seconds),
            Some(Duration::from_secs(150))
        );
        assert_eq!(parse("0s", Unit::Seconds), Some(Duration::ZERO));
        assert_eq!(
            parse("0.5", Unit::Seconds),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse("250", Unit::Millis), Some(Duration::from_millis(250)));
        assert_eq!(parse("1s", Unit::Millis), Some(Duration::from_secs(1)));
        for bad in ["", "soon", "-1", "1.2.3", "5 parsecs", "ms"] {
            assert_eq!(parse(bad, Unit::Seconds), None, "{bad:?}");
        }
    }
}
