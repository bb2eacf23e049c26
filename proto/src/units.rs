//! Human-friendly sizes (`50GiB`, `4MiB`, `1000`) and durations (`15s`,
//! `10m`, `250ms`) for configuration values, shared by the coordinator's and
//! the agent's configuration.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes. Parses `123`, `10KB`/`10MB`/`10GB`/`10TB` (powers of
/// 1000) and `10KiB`/`10MiB`/`10GiB`/`10TiB` (powers of 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

const SIZE_UNITS: &[(&str, u64)] = &[
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (number, unit) = SIZE_UNITS
            .iter()
            .find_map(|(name, mult)| s.strip_suffix(name).map(|n| (n.trim(), *mult)))
            .unwrap_or((s, 1));
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{s:?} is not a size; write e.g. 50GiB, 512MiB or 1000000"))?;
        n.checked_mul(unit)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, mult) in SIZE_UNITS.iter().take(4) {
            if self.0 >= *mult && self.0.is_multiple_of(*mult) {
                return write!(f, "{}{name}", self.0 / mult);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A duration written as `250ms`, `15s`, `10m`, `2h` or `1d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

const DURATION_UNITS: &[(&str, u64)] = &[
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

impl FromStr for Span {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || format!("{s:?} is not a duration; write e.g. 250ms, 15s, 10m or 2h");
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (number, unit) = s.split_at(split);
        let n: u64 = number.parse().map_err(|_| bad())?;
        let millis = DURATION_UNITS
            .iter()
            .find(|(name, _)| *name == unit.trim())
            .map(|(_, mult)| n.saturating_mul(*mult))
            .ok_or_else(bad)?;
        Ok(Span(Duration::from_millis(millis)))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        for (name, mult) in DURATION_UNITS.iter().rev() {
            if ms >= *mult && ms.is_multiple_of(*mult) {
                return write!(f, "{}{name}", ms / mult);
            }
        }
        write!(f, "{ms}ms")
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    Number(u64),
                    Text(String),
                }
                match Raw::deserialize(d)? {
                    Raw::Number(n) => n.to_string().parse(),
                    Raw::Text(s) => s.parse(),
                }
                .map_err(serde::de::Error::custom)
            }
        }
    };
}

string_serde!(ByteSize);
string_serde!(Span);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!("50GiB".parse::<ByteSize>(), Ok(ByteSize(50 << 30)));
        assert_eq!("4 MiB".parse::<ByteSize>(), Ok(ByteSize(4 << 20)));
        assert_eq!("10GB".parse::<ByteSize>(), Ok(ByteSize(10_000_000_000)));
        assert_eq!("1000".parse::<ByteSize>(), Ok(ByteSize(1000)));
        assert!("lots".parse::<ByteSize>().is_err());
        assert!("-1GiB".parse::<ByteSize>().is_err());
        assert!("99999999TiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(50 << 30).to_string(), "50GiB");
        assert_eq!(ByteSize(1001).to_string(), "1001");
    }

    #[test]
    fn spans() {
        assert_eq!("15s".parse::<Span>(), Ok(Span(Duration::from_secs(15))));
        assert_eq!(
            "250ms".parse::<Span>(),
            Ok(Span(Duration::from_millis(250)))
        );
        assert_eq!("10m".parse::<Span>(), Ok(Span(Duration::from_secs(600))));
        assert!("15".parse::<Span>().is_err());
        assert!("s".parse::<Span>().is_err());
        assert!("5 fortnights".parse::<Span>().is_err());
        assert_eq!(Span(Duration::from_secs(600)).to_string(), "10m");
        assert_eq!(Span(Duration::from_millis(1500)).to_string(), "1500ms");
    }
}
