//! Dotted numeric versions compared as versions: `14.10` is above `14.9`,
//! `14.2.1` is a version, and missing trailing components count as zero,
//! so `8` and `8.0` are the same version (a requirement `>= 8` is met by
//! `8.0`, and `13.0` written by one tool equals `13` written by another).
//!
//! The platform vocabulary's version minimums (`macos-version`,
//! `cuda-compute-capability`) are read with it: an agent offers the
//! versions it has, and an action asking for `NAME >= V` runs where one of
//! them is at least `V`.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use crate::quote::quoted;

/// Components in one version at most (real ones have two to four).
pub const MAX_COMPONENTS: usize = 8;

/// A dotted numeric version: one or more components of ASCII digits,
/// each below 2^32, separated by dots. Written as parsed (`8.0` stays
/// `8.0`), compared with trailing zero components ignored.
#[derive(Clone, Debug)]
pub struct Version {
    parts: Vec<u32>,
}

/// Why a text is not a version; it names the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} is not a version ({why}; write dotted numbers, e.g. 14.2 or 8.9)", quoted(.input))]
pub struct ParseError {
    pub input: String,
    why: &'static str,
}

impl Version {
    /// Parses `14`, `14.2`, `14.2.1` (surrounding white space ignored).
    pub fn parse(text: &str) -> Result<Version, ParseError> {
        let bad = |why| ParseError {
            input: text.to_owned(),
            why,
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(bad("it is empty"));
        }
        let mut parts = Vec::new();
        for part in trimmed.split('.') {
            if part.is_empty() {
                return Err(bad("it has an empty component"));
            }
            if !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("a component is not a number"));
            }
            if parts.len() == MAX_COMPONENTS {
                return Err(bad("it has too many components"));
            }
            parts.push(part.parse().map_err(|_| bad("a component is too large"))?);
        }
        Ok(Version { parts })
    }

    /// The components as written.
    pub fn components(&self) -> &[u32] {
        &self.parts
    }

    /// The components that decide comparisons: trailing zeros dropped.
    fn significant(&self) -> &[u32] {
        let end = self
            .parts
            .iter()
            .rposition(|&p| p != 0)
            .map_or(0, |i| i + 1);
        &self.parts[..end]
    }

    /// Whether this version is `minimum` or above.
    pub fn at_least(&self, minimum: &Version) -> bool {
        self >= minimum
    }
}

impl FromStr for Version {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Version, ParseError> {
        Version::parse(s)
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Version) -> bool {
        self.significant() == other.significant()
    }
}

impl Eq for Version {}

impl Hash for Version {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.significant().hash(state);
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Version) -> Ordering {
        // Slices compare component by component, a prefix first: with
        // trailing zeros dropped, that is version order.
        self.significant().cmp(other.significant())
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Version) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{part}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).expect(s)
    }

    #[test]
    fn components_compare_as_numbers() {
        assert!(v("14.10") > v("14.9"));
        assert!(v("12.10") > v("12.9"));
        assert!(v("14.2.1") > v("14.2"));
        assert!(v("14.2.1") < v("14.3"));
        assert!(v("2") < v("10"));
        assert!(v("9.0") > v("8.9"));
        let mut sorted = [v("14.10"), v("13.6.1"), v("14.9"), v("14"), v("8.6")];
        sorted.sort();
        let shown: Vec<String> = sorted.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["8.6", "13.6.1", "14", "14.9", "14.10"]);
    }

    #[test]
    fn trailing_zeros_do_not_change_a_version() {
        assert_eq!(v("8.0"), v("8"));
        assert_eq!(v("14.2.0"), v("14.2"));
        assert_eq!(v("0"), v("0.0.0"));
        assert!(v("8.0").at_least(&v("8")) && v("8").at_least(&v("8.0")));
        let hash = |x: &Version| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            x.hash(&mut h);
            h.finish()
        };
        assert_eq!(hash(&v("13.0")), hash(&v("13")));
        // Shown as written.
        assert_eq!(v("8.0").to_string(), "8.0");
        assert_eq!(v(" 14.2.1 ").to_string(), "14.2.1");
        assert_eq!(v("14.02").to_string(), "14.2");
    }

    #[test]
    fn a_version_is_at_least_the_minimum_or_not() {
        assert!(v("14.2.1").at_least(&v("14.2")));
        assert!(v("15").at_least(&v("14.10")));
        assert!(!v("14.9").at_least(&v("14.10")));
        assert!(!v("7.5").at_least(&v("8")));
    }

    #[test]
    fn errors_name_the_input_and_why() {
        for (text, why) in [
            ("", "empty"),
            ("14.", "empty component"),
            (".1", "empty component"),
            ("14..2", "empty component"),
            ("14.x", "not a number"),
            ("v14", "not a number"),
            ("-1", "not a number"),
            ("14.2b", "not a number"),
            ("1 .2", "not a number"),
            ("99999999999", "too large"),
            ("1.2.3.4.5.6.7.8.9", "too many"),
        ] {
            let err = Version::parse(text).expect_err(text);
            let message = err.to_string();
            assert!(
                message.contains(&format!("{text:?}")) && message.contains(why),
                "{message}"
            );
            assert_eq!(err.input, text);
        }
        assert_eq!("13.2".parse::<Version>(), Ok(v("13.2")));
    }
}
