//! Xcode versions as actions ask for them and agents offer them.
//!
//! Bazel's Apple rules put `XCODE_VERSION_OVERRIDE` (`13.2.1.13C100`: the
//! version, then Xcode's build) and the SDK an action compiles against
//! (`APPLE_SDK_PLATFORM`, `APPLE_SDK_VERSION_OVERRIDE`) in the environment
//! of every Xcode-dependent action. The coordinator reads the first into
//! the action's `xcode-version` requirement; the agent runs the action
//! with `DEVELOPER_DIR` at the matching Xcode and `SDKROOT` at the SDK.
//!
//! The match rule: a request names a version and, optionally, a build.
//! Without a build any installed Xcode of that version matches; with one,
//! only that build does. Versions compare as versions, so `15`, `15.0` and
//! `15.0.0` are one version. Values are written canonically (trailing zero
//! components dropped down to `MAJOR.MINOR`, then `.BUILD` if any), and an
//! agent offers each Xcode twice, with and without its build, so the
//! coordinator matches either request exactly.

use std::fmt;

use crate::quote::quoted;
use crate::reapi::platform::Property;
use crate::version::Version;

/// The platform property naming the Xcode an action needs.
pub const PROPERTY: &str = "xcode-version";
/// The environment variable Bazel sets to the Xcode an action needs.
pub const ENV_VERSION: &str = "XCODE_VERSION_OVERRIDE";
/// The SDK platform (`MacOSX`, `iPhoneOS`, `iPhoneSimulator`, ...).
pub const ENV_SDK_PLATFORM: &str = "APPLE_SDK_PLATFORM";
/// The SDK version (`14.2`).
pub const ENV_SDK_VERSION: &str = "APPLE_SDK_VERSION_OVERRIDE";

/// An Xcode version, with its build when known (`15.2`, `15.2 (15C500b)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XcodeVersion {
    pub version: Version,
    /// Xcode's build (`15C500b`), as Apple writes it.
    pub build: Option<String>,
}

impl XcodeVersion {
    /// Reads `15.2`, `15.2.0.15C500b` or `13.2.1.13C100`: dotted numbers,
    /// then optionally a last component that is a build (it has a letter).
    pub fn parse(text: &str) -> Result<XcodeVersion, String> {
        let t = text.trim();
        let (version, build) = match t.rsplit_once('.') {
            Some((head, last)) if !last.is_empty() && !last.bytes().all(|b| b.is_ascii_digit()) => {
                (head, Some(last))
            }
            _ => (t, None),
        };
        if let Some(b) = build
            && !b.bytes().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(format!(
                "Xcode version {} has a build {} that is not letters and digits",
                quoted(text),
                quoted(b)
            ));
        }
        let version = Version::parse(version).map_err(|e| {
            format!(
                "Xcode version {}: {e} (e.g. 15.2 or 15.2.0.15C500b)",
                quoted(text)
            )
        })?;
        Ok(XcodeVersion {
            version,
            build: build.map(str::to_owned),
        })
    }

    /// The same Xcode without its build: what a request naming only the
    /// version matches.
    pub fn without_build(&self) -> XcodeVersion {
        XcodeVersion {
            version: self.version.clone(),
            build: None,
        }
    }

    /// Whether an installed Xcode `installed` is what this request asks for.
    pub fn matches(&self, installed: &XcodeVersion) -> bool {
        self.version == installed.version
            && self
                .build
                .as_ref()
                .is_none_or(|b| installed.build.as_ref() == Some(b))
    }
}

impl fmt::Display for XcodeVersion {
    /// Canonical: `15.0`, `13.2.1`, `15.0.15A240d`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = self.version.components();
        let end = parts
            .iter()
            .rposition(|&p| p != 0)
            .map_or(0, |i| i + 1)
            .max(2);
        for i in 0..end {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{}", parts.get(i).copied().unwrap_or(0))?;
        }
        if let Some(build) = &self.build {
            write!(f, ".{build}")?;
        }
        Ok(())
    }
}

/// The canonical spelling of an `xcode-version` value; a value that is no
/// Xcode version is kept as written (it then matches no agent, and the
/// scheduler's explanation lists what the fleet has).
pub fn normalize(value: &str) -> String {
    XcodeVersion::parse(value).map_or_else(|_| value.trim().to_owned(), |x| x.to_string())
}

/// The values an agent offers for one installed Xcode: its version, and
/// its version with its build.
pub fn offered_values(installed: &XcodeVersion) -> Vec<String> {
    let mut values = vec![installed.without_build().to_string()];
    if installed.build.is_some() {
        values.push(installed.to_string());
    }
    values
}

/// An action's platform with the Xcode its Command's environment asks for
/// (`XCODE_VERSION_OVERRIDE`) added as `xcode-version`; `None` when the
/// environment names none. A platform that names another Xcode itself is
/// then a contradiction the vocabulary reports.
pub fn with_environment<'a, I>(platform: &[Property], env: I) -> Option<Vec<Property>>
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    let (_, value) = env
        .into_iter()
        .find(|(name, value)| *name == ENV_VERSION && !value.trim().is_empty())?;
    let mut merged = platform.to_vec();
    merged.push(Property {
        name: PROPERTY.to_owned(),
        value: value.to_owned(),
    });
    Some(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(s: &str) -> XcodeVersion {
        XcodeVersion::parse(s).expect(s)
    }

    #[test]
    fn bazel_and_plain_spellings_are_read() {
        assert_eq!(x("13.2.1.13C100").build.as_deref(), Some("13C100"));
        assert_eq!(x("13.2.1.13C100").version.to_string(), "13.2.1");
        assert_eq!(x("15.2").build, None);
        assert_eq!(x("15.0.0.15A240d").to_string(), "15.0.15A240d");
        assert_eq!(x("15").to_string(), "15.0");
        assert_eq!(x("15.0.0").to_string(), "15.0");
        assert_eq!(x(" 14.3.1 ").to_string(), "14.3.1");
        for bad in ["", "fifteen", "15.x.1", "15.2.15C 500", "15..2"] {
            let err = XcodeVersion::parse(bad).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn a_request_without_a_build_matches_every_build_of_its_version() {
        let installed = x("15.2.15C500b");
        assert!(x("15.2").matches(&installed));
        assert!(x("15.2.0").matches(&installed));
        assert!(x("15.2.0.15C500b").matches(&installed));
        assert!(!x("15.2.0.15C500a").matches(&installed));
        assert!(!x("15.1").matches(&installed));
        assert!(!x("15.2.15C500b").matches(&x("15.2")));
        assert_eq!(offered_values(&installed), ["15.2", "15.2.15C500b"]);
        // Canonical forms make the coordinator's exact match the same rule.
        assert!(offered_values(&installed).contains(&normalize("15.2.0.15C500b")));
        assert!(offered_values(&installed).contains(&normalize("15.2.0")));
        assert_eq!(normalize("not a version"), "not a version");
    }

    #[test]
    fn the_environment_adds_the_requirement() {
        let platform = crate::platform::from_pairs(&[("OSFamily", "darwin")]);
        let merged = with_environment(
            &platform,
            [("PATH", "/usr/bin"), (ENV_VERSION, "13.2.1.13C100")],
        )
        .expect("named");
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[1].name, PROPERTY);
        assert!(with_environment(&platform, [(ENV_VERSION, " ")]).is_none());
        assert!(with_environment(&platform, [("PATH", "/usr/bin")]).is_none());
    }
}
