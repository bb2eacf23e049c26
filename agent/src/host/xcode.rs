//! The Xcodes installed on a Mac, several at once as build Macs have them
//! (`/Applications/Xcode.app`, `/Applications/Xcode_15.2.app`, ...), and
//! the SDKs each one ships.
//!
//! Found without Spotlight or `xcode-select`: every `Xcode*.app` in the
//! applications directories is read from its own files, its version and
//! build from `Contents/version.plist` (else `Contents/Info.plist`), its
//! SDKs from `Contents/Developer/Platforms/*.platform/Developer/SDKs`. All
//! of it is plain file reading, tested on any host with such a tree.

use std::path::{Path, PathBuf};

use outpost_proto::xcode::XcodeVersion;

/// Where Xcodes are looked for unless `xcode_dirs` says otherwise.
pub const APPLICATION_DIRS: &[&str] = &["/Applications", "/Applications/Xcodes"];

/// The agent's `xcode_dirs`, set once at start-up.
static SEARCH_DIRS: std::sync::OnceLock<Vec<PathBuf>> = std::sync::OnceLock::new();

/// Makes `dirs` where [`installed`] looks (the agent's `xcode_dirs`; the
/// first call wins).
pub fn search_in(dirs: Vec<PathBuf>) {
    let _ = SEARCH_DIRS.set(dirs);
}

/// One installed Xcode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xcode {
    pub version: XcodeVersion,
    /// `Xcode.app/Contents/Developer`: what `DEVELOPER_DIR` names.
    pub developer_dir: PathBuf,
    pub sdks: Vec<Sdk>,
}

/// One SDK of an Xcode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sdk {
    /// `MacOSX`, `iPhoneOS`, `iPhoneSimulator`, ...
    pub platform: String,
    /// `14.2`, as the SDK's directory names it.
    pub version: String,
    pub path: PathBuf,
}

/// The Xcodes in the agent's `xcode_dirs` (the usual applications
/// directories until it is set).
pub fn installed() -> Vec<Xcode> {
    match SEARCH_DIRS.get() {
        Some(dirs) => find(dirs),
        None => find(
            &APPLICATION_DIRS
                .iter()
                .map(PathBuf::from)
                .collect::<Vec<_>>(),
        ),
    }
}

/// The Xcodes (`Xcode*.app` with a readable version) in `dirs`, newest
/// first; one app found through two paths counts once.
pub fn find(dirs: &[PathBuf]) -> Vec<Xcode> {
    let mut found: Vec<Xcode> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut apps: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("Xcode") && n.ends_with(".app"))
            })
            .collect();
        apps.sort();
        for app in apps {
            let real = std::fs::canonicalize(&app).unwrap_or_else(|_| app.clone());
            if !seen.insert(real) {
                continue;
            }
            match read_app(&app) {
                Ok(x) => found.push(x),
                Err(why) => tracing::debug!(app = %app.display(), %why, "not an Xcode"),
            }
        }
    }
    found.sort_by(|a, b| b.version.version.cmp(&a.version.version));
    found
}

/// Reads one `Xcode*.app`.
pub fn read_app(app: &Path) -> Result<Xcode, String> {
    let contents = app.join("Contents");
    let read = |name: &str| plist::Value::from_file(contents.join(name)).ok();
    let string = |v: &plist::Value, key: &str| {
        v.as_dictionary()
            .and_then(|d| d.get(key))
            .and_then(plist::Value::as_string)
            .map(str::to_owned)
    };
    let version_plist = read("version.plist");
    let info_plist = read("Info.plist");
    let plists: Vec<&plist::Value> = version_plist.iter().chain(info_plist.iter()).collect();
    let short = plists
        .iter()
        .find_map(|p| string(p, "CFBundleShortVersionString"))
        .ok_or("neither Contents/version.plist nor Contents/Info.plist has its version")?;
    let build = plists
        .iter()
        .find_map(|p| string(p, "ProductBuildVersion").or_else(|| string(p, "DTXcodeBuild")));
    let version = XcodeVersion::parse(&short)?;
    let developer_dir = contents.join("Developer");
    Ok(Xcode {
        version: XcodeVersion {
            version: version.version,
            build,
        },
        sdks: sdks(&developer_dir),
        developer_dir,
    })
}

/// The SDKs under `developer_dir`, by the versioned names Xcode gives them
/// (`iPhoneOS17.2.sdk`, a link to `iPhoneOS.sdk`); an unversioned SDK with
/// no versioned name is read from its `SDKSettings.json`.
pub fn sdks(developer_dir: &Path) -> Vec<Sdk> {
    let mut out = Vec::new();
    let Ok(platforms) = std::fs::read_dir(developer_dir.join("Platforms")) else {
        return out;
    };
    let mut platforms: Vec<PathBuf> = platforms.flatten().map(|e| e.path()).collect();
    platforms.sort();
    for platform_dir in platforms {
        let Some(platform) = platform_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".platform"))
        else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(platform_dir.join("Developer/SDKs")) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        names.sort();
        let before = out.len();
        let mut unversioned = None;
        for name in &names {
            let Some(version) = name
                .strip_suffix(".sdk")
                .and_then(|n| n.strip_prefix(platform))
            else {
                continue;
            };
            let path = platform_dir.join("Developer/SDKs").join(name);
            if version.is_empty() {
                unversioned = Some(path);
            } else if outpost_proto::version::Version::parse(version).is_ok() {
                out.push(Sdk {
                    platform: platform.to_owned(),
                    version: version.to_owned(),
                    path,
                });
            }
        }
        if out.len() == before
            && let Some(path) = unversioned
            && let Some(version) = sdk_settings_version(&path)
        {
            out.push(Sdk {
                platform: platform.to_owned(),
                version,
                path,
            });
        }
    }
    out
}

fn sdk_settings_version(sdk: &Path) -> Option<String> {
    let text = std::fs::read_to_string(sdk.join("SDKSettings.json")).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value.get("Version")?.as_str().map(str::to_owned)
}

/// Why an action cannot have the Xcode or SDK it asks for; each names
/// what is installed.
#[derive(Debug, thiserror::Error)]
pub enum Missing {
    /// No installed Xcode matches (another agent may have it).
    #[error("{0}")]
    Xcode(String),
    /// The Xcode is here but not the SDK, or the SDK version is no version.
    #[error("{0}")]
    Sdk(String),
}

/// The environment an action asking for Xcode `wanted` (and, from its
/// environment, an SDK) runs with: `DEVELOPER_DIR` at the newest matching
/// installed Xcode, `SDKROOT` at the SDK.
pub fn environment(
    installed: &[Xcode],
    wanted: &XcodeVersion,
    sdk_platform: Option<&str>,
    sdk_version: Option<&str>,
) -> Result<Vec<(String, String)>, Missing> {
    let Some(xcode) = installed.iter().find(|x| wanted.matches(&x.version)) else {
        let have: Vec<String> = installed.iter().map(|x| x.version.to_string()).collect();
        return Err(Missing::Xcode(format!(
            "Xcode {wanted} is not installed on this agent (it has {})",
            if have.is_empty() {
                "none".to_owned()
            } else {
                have.join(", ")
            }
        )));
    };
    let mut env = vec![(
        "DEVELOPER_DIR".to_owned(),
        xcode.developer_dir.display().to_string(),
    )];
    if let Some(platform) = sdk_platform.map(str::trim).filter(|p| !p.is_empty()) {
        let of_platform: Vec<&Sdk> = xcode
            .sdks
            .iter()
            .filter(|s| s.platform.eq_ignore_ascii_case(platform))
            .collect();
        let wanted_version = sdk_version
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| {
                outpost_proto::version::Version::parse(v).map_err(|e| {
                    Missing::Sdk(format!("{}: {e}", outpost_proto::xcode::ENV_SDK_VERSION))
                })
            })
            .transpose()?;
        let sdk = of_platform.iter().find(|s| {
            wanted_version.as_ref().is_none_or(|w| {
                outpost_proto::version::Version::parse(&s.version).is_ok_and(|v| v == *w)
            })
        });
        let Some(sdk) = sdk else {
            let have: Vec<String> = xcode
                .sdks
                .iter()
                .map(|s| format!("{}{}", s.platform, s.version))
                .collect();
            return Err(Missing::Sdk(format!(
                "Xcode {} has no SDK {platform}{} (it has {})",
                xcode.version,
                sdk_version.unwrap_or_default(),
                have.join(", ")
            )));
        };
        env.push(("SDKROOT".to_owned(), sdk.path.display().to_string()));
    }
    Ok(env)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An Xcode as `find` would read it (for other modules' tests).
    pub(crate) fn xcode(version: &str, build: &str, sdks: &[(&str, &str)]) -> Xcode {
        let dir = PathBuf::from(format!(
            "/Applications/Xcode_{version}.app/Contents/Developer"
        ));
        Xcode {
            version: XcodeVersion {
                version: outpost_proto::version::Version::parse(version).expect("v"),
                build: Some(build.to_owned()),
            },
            sdks: sdks
                .iter()
                .map(|(p, v)| Sdk {
                    platform: (*p).to_owned(),
                    version: (*v).to_owned(),
                    path: dir.join(format!("Platforms/{p}.platform/Developer/SDKs/{p}{v}.sdk")),
                })
                .collect(),
            developer_dir: dir,
        }
    }

    /// Writes an `Xcode*.app` as Xcode ships: version.plist (XML), SDKs
    /// with a versioned link to the unversioned directory.
    fn install(apps: &Path, name: &str, short: &str, build: &str, sdks: &[(&str, &str)]) {
        let contents = apps.join(name).join("Contents");
        std::fs::create_dir_all(&contents).expect("mkdir");
        let mut dict = plist::Dictionary::new();
        dict.insert("CFBundleShortVersionString".into(), short.into());
        dict.insert("ProductBuildVersion".into(), build.into());
        dict.insert("CFBundleVersion".into(), "22618".into());
        plist::Value::Dictionary(dict)
            .to_file_xml(contents.join("version.plist"))
            .expect("plist");
        for (platform, version) in sdks {
            let dir = contents.join(format!(
                "Developer/Platforms/{platform}.platform/Developer/SDKs"
            ));
            std::fs::create_dir_all(dir.join(format!("{platform}.sdk"))).expect("mkdir");
            std::os::unix::fs::symlink(
                format!("{platform}.sdk"),
                dir.join(format!("{platform}{version}.sdk")),
            )
            .expect("link");
        }
    }

    #[test]
    fn every_installed_xcode_is_found_with_its_sdks() {
        let apps = tempfile::tempdir().expect("tempdir");
        install(
            apps.path(),
            "Xcode.app",
            "15.2",
            "15C500b",
            &[("MacOSX", "14.2"), ("iPhoneOS", "17.2")],
        );
        install(
            apps.path(),
            "Xcode_14.3.1.app",
            "14.3.1",
            "14E300c",
            &[("MacOSX", "13.3")],
        );
        install(apps.path(), "Xcode_15.10.app", "15.10", "15Z1", &[]);
        // Not Xcodes: another app, and an Xcode-named app with no version.
        std::fs::create_dir_all(apps.path().join("Safari.app/Contents")).expect("mkdir");
        std::fs::create_dir_all(apps.path().join("Xcode-broken.app/Contents")).expect("mkdir");
        // The same app through a link counts once.
        std::os::unix::fs::symlink(
            apps.path().join("Xcode.app"),
            apps.path().join("Xcode-link.app"),
        )
        .expect("link");
        let found = find(&[apps.path().to_owned(), apps.path().join("missing")]);
        let versions: Vec<String> = found.iter().map(|x| x.version.to_string()).collect();
        // Newest first, 15.10 above 15.2.
        assert_eq!(versions, ["15.10.15Z1", "15.2.15C500b", "14.3.1.14E300c"]);
        let x15 = &found[1];
        assert!(x15.developer_dir.ends_with("Contents/Developer"));
        let sdks: Vec<String> = x15
            .sdks
            .iter()
            .map(|s| format!("{}{}", s.platform, s.version))
            .collect();
        assert_eq!(sdks, ["MacOSX14.2", "iPhoneOS17.2"]);
    }

    #[test]
    fn info_plist_and_sdk_settings_are_read_when_that_is_what_there_is() {
        let apps = tempfile::tempdir().expect("tempdir");
        let contents = apps.path().join("Xcode-beta.app/Contents");
        std::fs::create_dir_all(&contents).expect("mkdir");
        let mut dict = plist::Dictionary::new();
        dict.insert("CFBundleShortVersionString".into(), "16.0".into());
        dict.insert("DTXcodeBuild".into(), "16A5171c".into());
        // Info.plist ships binary.
        plist::Value::Dictionary(dict)
            .to_file_binary(contents.join("Info.plist"))
            .expect("plist");
        let sdk = contents.join("Developer/Platforms/MacOSX.platform/Developer/SDKs/MacOSX.sdk");
        std::fs::create_dir_all(&sdk).expect("mkdir");
        std::fs::write(
            sdk.join("SDKSettings.json"),
            r#"{"CanonicalName":"macosx15.0","Version":"15.0"}"#,
        )
        .expect("write");
        let found = find(&[apps.path().to_owned()]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].version.to_string(), "16.0.16A5171c");
        assert_eq!(found[0].sdks[0].version, "15.0");
        assert_eq!(found[0].sdks[0].path, sdk);
    }

    #[test]
    fn the_matching_xcode_and_sdk_are_chosen() {
        let installed = [
            xcode(
                "15.2",
                "15C500b",
                &[("MacOSX", "14.2"), ("iPhoneSimulator", "17.2")],
            ),
            xcode("14.3.1", "14E300c", &[("MacOSX", "13.3")]),
        ];
        let wanted = |s: &str| XcodeVersion::parse(s).expect(s);
        let env = environment(
            &installed,
            &wanted("14.3.1.14E300c"),
            Some("MacOSX"),
            Some("13.3"),
        )
        .expect("installed");
        assert_eq!(
            env[0],
            (
                "DEVELOPER_DIR".to_owned(),
                "/Applications/Xcode_14.3.1.app/Contents/Developer".to_owned()
            )
        );
        assert_eq!(
            env[1].1,
            "/Applications/Xcode_14.3.1.app/Contents/Developer/Platforms/MacOSX.platform/Developer/SDKs/MacOSX13.3.sdk"
        );
        // The version alone picks that Xcode; no SDK asked: no SDKROOT.
        let env = environment(&installed, &wanted("15.2"), None, None).expect("installed");
        assert_eq!(env.len(), 1);
        assert!(env[0].1.contains("Xcode_15.2.app"));
        // The platform alone: its SDK in that Xcode.
        let env = environment(
            &installed,
            &wanted("15.2.0"),
            Some("iphonesimulator"),
            Some(""),
        )
        .expect("installed");
        assert!(env[1].1.ends_with("iPhoneSimulator17.2.sdk"), "{env:?}");
        let err = environment(&installed, &wanted("15.2.15C999"), None, None)
            .expect_err("other build")
            .to_string();
        assert!(
            err.contains("Xcode 15.2.15C999 is not installed")
                && err.contains("15.2.15C500b, 14.3.1.14E300c"),
            "{err}"
        );
        let err = environment(&installed, &wanted("15.2"), Some("iPhoneOS"), Some("17.2"))
            .expect_err("no SDK")
            .to_string();
        assert!(
            err.contains("has no SDK iPhoneOS17.2") && err.contains("MacOSX14.2"),
            "{err}"
        );
        let err = environment(&[], &wanted("15.2"), None, None)
            .expect_err("none")
            .to_string();
        assert!(err.contains("(it has none)"), "{err}");
    }
}
