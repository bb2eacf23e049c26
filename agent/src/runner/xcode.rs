//! The Xcode an Apple action runs with: an action whose platform names an
//! `xcode-version` (the coordinator puts Bazel's `XCODE_VERSION_OVERRIDE`
//! there) gets `DEVELOPER_DIR` at the matching installed Xcode and, when
//! its environment names an SDK (`APPLE_SDK_PLATFORM`,
//! `APPLE_SDK_VERSION_OVERRIDE`), `SDKROOT` at that SDK of it. The rule is
//! `outpost_proto::xcode`'s; the Xcodes are `crate::host::xcode`'s.

use outpost_proto::reapi::{command::EnvironmentVariable, platform::Property};
use outpost_proto::xcode::{self, XcodeVersion};

use crate::error::Error;
use crate::host::xcode::{Missing, Xcode, environment};

/// `NAME=VALUE` entries to add to the action's environment (after its own,
/// so they win); none when the action names no Xcode.
pub fn action_environment(
    platform: &[Property],
    env: &[EnvironmentVariable],
) -> Result<Vec<String>, Error> {
    let wanted = platform
        .iter()
        .find(|p| p.name == xcode::PROPERTY)
        .map(|p| XcodeVersion::parse(&p.value).map_err(Error::BadInput))
        .transpose()?;
    match wanted {
        None => Ok(Vec::new()),
        Some(wanted) => choose(&crate::host::xcode::installed(), &wanted, env),
    }
}

/// The environment for `wanted` among `installed`.
fn choose(
    installed: &[Xcode],
    wanted: &XcodeVersion,
    env: &[EnvironmentVariable],
) -> Result<Vec<String>, Error> {
    let var = |name: &str| {
        env.iter()
            .rev()
            .find(|e| e.name == name)
            .map(|e| e.value.as_str())
    };
    match environment(
        installed,
        wanted,
        var(xcode::ENV_SDK_PLATFORM),
        var(xcode::ENV_SDK_VERSION),
    ) {
        Ok(pairs) => Ok(pairs.into_iter().map(|(k, v)| format!("{k}={v}")).collect()),
        // The coordinator matched this agent by the Xcodes it advertised:
        // one gone since is this agent's failing, and another may have it.
        Err(Missing::Xcode(why)) => Err(Error::Retryable(why)),
        Err(Missing::Sdk(why)) => Err(Error::BadInput(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::xcode::tests::xcode as installed;

    fn var(name: &str, value: &str) -> EnvironmentVariable {
        EnvironmentVariable {
            name: name.to_owned(),
            value: value.to_owned(),
        }
    }

    #[test]
    fn developer_dir_and_sdkroot_follow_what_the_action_asks() {
        let xcodes = [
            installed("15.2", "15C500b", &[("iPhoneSimulator", "17.2")]),
            installed("14.3.1", "14E300c", &[("iPhoneSimulator", "16.4")]),
        ];
        let wanted = XcodeVersion::parse("14.3.1.14E300c").expect("valid");
        let env = [
            var("PATH", "/usr/bin:/bin"),
            var(xcode::ENV_SDK_PLATFORM, "iPhoneSimulator"),
            var(xcode::ENV_SDK_VERSION, "16.4"),
        ];
        let added = choose(&xcodes, &wanted, &env).expect("installed");
        assert_eq!(
            added,
            [
                "DEVELOPER_DIR=/Applications/Xcode_14.3.1.app/Contents/Developer",
                "SDKROOT=/Applications/Xcode_14.3.1.app/Contents/Developer/Platforms/\
                 iPhoneSimulator.platform/Developer/SDKs/iPhoneSimulator16.4.sdk",
            ]
        );
        let other = XcodeVersion::parse("16.0").expect("valid");
        let err = choose(&xcodes, &other, &env).expect_err("not installed");
        assert!(
            matches!(&err, Error::Retryable(why) if why.contains("15.2.15C500b, 14.3.1.14E300c")),
            "{err:?}"
        );
        let sdk = [var(xcode::ENV_SDK_PLATFORM, "iPhoneOS")];
        let err = choose(&xcodes, &wanted, &sdk).expect_err("no such SDK");
        assert!(
            matches!(&err, Error::BadInput(why) if why.contains("no SDK iPhoneOS")),
            "{err:?}"
        );
    }

    #[test]
    fn an_action_naming_no_xcode_gets_nothing_added() {
        let platform = outpost_proto::platform::from_pairs(&[("OSFamily", "darwin")]);
        assert!(
            action_environment(&platform, &[])
                .expect("nothing asked")
                .is_empty()
        );
        let bad = outpost_proto::platform::from_pairs(&[("xcode-version", "latest")]);
        assert!(matches!(
            action_environment(&bad, &[]),
            Err(Error::BadInput(_))
        ));
    }
}
