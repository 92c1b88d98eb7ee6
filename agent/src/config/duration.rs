//! Durations in Go's `time.ParseDuration` format, as Gateway writes them (`1h30m0s`,
//! `90m`, `45s`, `1.5h`, `168h`), plus `d` for days.

use std::{fmt, str::FromStr, time::Duration};

use thiserror::Error;

/// A positive duration written and shown the way Gateway does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration(pub Duration);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("negative durations are not allowed")]
    Negative,
    #[error("a zero duration would expire every session at once")]
    Zero,
    #[error("missing unit after {number:?} (use ns, us, ms, s, m, h or d, as in 1h30m0s)")]
    MissingUnit { number: String },
    #[error("unknown unit {unit:?} (use ns, us, ms, s, m, h or d, as in 1h30m0s)")]
    UnknownUnit { unit: String },
    #[error("expected a number at {rest:?}")]
    ExpectedNumber { rest: String },
    #[error("too long (at most 100 years)")]
    TooLong,
}

const NANOS_PER: [(&str, u128); 9] = [
    ("ns", 1),
    ("us", 1_000),
    ("\u{b5}s", 1_000),
    ("\u{3bc}s", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
    ("d", 86_400 * 1_000_000_000),
];

/// Durations beyond this are refused: they only arise from typos, and the kernel
/// compares ages as signed 64-bit nanoseconds.
const MAX_NANOS: u128 = 100 * 365 * 86_400 * 1_000_000_000;

impl FromStr for GoDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(DurationError::Empty);
        }
        if s.starts_with('-') {
            return Err(DurationError::Negative);
        }
        let mut rest = s.strip_prefix('+').unwrap_or(s);
        if rest == "0" {
            return Err(DurationError::Zero);
        }
        let mut total: u128 = 0;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let (number, after) = rest.split_at(number_len);
            if number.is_empty() || number == "." || number.matches('.').count() > 1 {
                return Err(DurationError::ExpectedNumber {
                    rest: rest.to_string(),
                });
            }
            let unit_len = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, after) = after.split_at(unit_len);
            if unit.is_empty() {
                return Err(DurationError::MissingUnit {
                    number: number.to_string(),
                });
            }
            let scale = NANOS_PER
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, scale)| *scale)
                .ok_or_else(|| DurationError::UnknownUnit {
                    unit: unit.to_string(),
                })?;
            total = total.saturating_add(scaled(number, scale));
            if total > MAX_NANOS {
                return Err(DurationError::TooLong);
            }
            rest = after;
        }
        if total == 0 {
            return Err(DurationError::Zero);
        }
        Ok(Self(Duration::from_nanos(total as u64)))
    }
}

/// `number` (digits with at most one '.') times `scale` nanoseconds, truncating
/// fractions of a nanosecond as Go does.
fn scaled(number: &str, scale: u128) -> u128 {
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().unwrap_or(u128::MAX)
    };
    let mut frac_nanos: u128 = 0;
    let mut divisor: u128 = 1;
    for digit in frac.bytes().take(18) {
        frac_nanos = frac_nanos * 10 + u128::from(digit - b'0');
        divisor *= 10;
    }
    whole
        .saturating_mul(scale)
        .saturating_add(frac_nanos * scale / divisor)
}

impl fmt::Display for GoDuration {
    /// Go's `Duration.String()`: `1h30m0s`, `45s`, `1.5s`, `250ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos < 1_000_000_000 {
            return match nanos {
                0 => f.write_str("0s"),
                n if n < 1_000 => write!(f, "{n}ns"),
                n if n < 1_000_000 => write!(f, "{}\u{b5}s", decimal(n, 1_000)),
                n => write!(f, "{}ms", decimal(n, 1_000_000)),
            };
        }
        let hours = nanos / 3_600_000_000_000;
        let minutes = nanos / 60_000_000_000 % 60;
        let seconds = decimal(nanos % 60_000_000_000, 1_000_000_000);
        if hours > 0 {
            write!(f, "{hours}h{minutes}m{seconds}s")
        } else if minutes > 0 {
            write!(f, "{minutes}m{seconds}s")
        } else {
            write!(f, "{seconds}s")
        }
    }
}

/// `n / unit` with its fraction, trailing zeros trimmed: 1500/1000 -> "1.5".
fn decimal(n: u128, unit: u128) -> String {
    let whole = n / unit;
    let frac = n % unit;
    if frac == 0 {
        return whole.to_string();
    }
    let width = unit.ilog10() as usize;
    let digits = format!("{frac:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

impl GoDuration {
    pub fn as_nanos_u64(self) -> u64 {
        self.0.as_nanos() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Duration, DurationError> {
        s.parse::<GoDuration>().map(|d| d.0)
    }

    #[test]
    fn parses_gateway_and_go_forms() {
        let cases = [
            ("1h30m0s", 90 * 60),
            ("90m", 90 * 60),
            ("45s", 45),
            ("168h", 168 * 3600),
            ("7d", 7 * 86400),
            ("1d12h", 36 * 3600),
            ("1.5h", 90 * 60),
            ("+2m", 120),
            (" 3h ", 3 * 3600),
        ];
        for (text, secs) in cases {
            assert_eq!(parse(text), Ok(Duration::from_secs(secs)), "{text}");
        }
        assert_eq!(parse("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("2us"), Ok(Duration::from_micros(2)));
        assert_eq!(parse("2\u{b5}s"), Ok(Duration::from_micros(2)));
        assert_eq!(parse(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.s"), Ok(Duration::from_secs(1)));
    }

    #[test]
    fn refuses_everything_else_with_a_reason() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert_eq!(parse("-1h"), Err(DurationError::Negative));
        assert_eq!(parse("0"), Err(DurationError::Zero));
        assert_eq!(parse("0s"), Err(DurationError::Zero));
        assert_eq!(
            parse("90"),
            Err(DurationError::MissingUnit {
                number: "90".into()
            })
        );
        assert_eq!(
            parse("90 minutes"),
            Err(DurationError::UnknownUnit {
                unit: " minutes".into()
            })
        );
        assert_eq!(
            parse("1w"),
            Err(DurationError::UnknownUnit { unit: "w".into() })
        );
        assert_eq!(
            parse("h"),
            Err(DurationError::ExpectedNumber { rest: "h".into() })
        );
        assert_eq!(
            parse("1..5h"),
            Err(DurationError::ExpectedNumber {
                rest: "1..5h".into()
            })
        );
        assert_eq!(parse("1000000h"), Err(DurationError::TooLong));
        assert_eq!(
            parse("99999999999999999999999999999d"),
            Err(DurationError::TooLong)
        );
    }

    #[test]
    fn displays_as_go_does() {
        let show = |s: &str| s.parse::<GoDuration>().unwrap().to_string();
        assert_eq!(show("90m"), "1h30m0s");
        assert_eq!(show("45s"), "45s");
        assert_eq!(show("7d"), "168h0m0s");
        assert_eq!(show("61s"), "1m1s");
        assert_eq!(show("1.5s"), "1.5s");
        assert_eq!(show("250ms"), "250ms");
        assert_eq!(show("1h0m0.25s"), "1h0m0.25s");
        assert_eq!(show("3ns"), "3ns");
        // Display then parse is the identity.
        for text in ["1h30m0s", "2m5s", "1.25s", "12ms", "168h0m0s"] {
            assert_eq!(show(text), text);
        }
    }
}
