//! What a Mac offers beyond the common facts: its macOS version, its
//! Apple-silicon performance and efficiency cores, its simulator runtimes
//! and its Xcodes ([`super::xcode`]).
//!
//! Each fact is read from the tool that reports it (`sw_vers`, `sysctl`,
//! `xcrun simctl`), and each parser is plain code over that tool's output,
//! tested on any host with outputs in the tools' real format. The tools run
//! only where the agent runs on macOS.

use outpost_proto::reapi::platform::Property;
use outpost_proto::version::Version;

use super::xcode::{self, Xcode};

/// The macOS version `sw_vers` reports (`ProductVersion`), if it is one.
pub fn parse_sw_vers(text: &str) -> Option<Version> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("ProductVersion:"))
        .and_then(|v| Version::parse(v).ok())
}

/// Apple-silicon cores by kind, from `sysctl hw.perflevel0.physicalcpu
/// hw.perflevel1.physicalcpu` (level 0 is performance, level 1
/// efficiency); `None` where the host has no such levels (Intel Macs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cores {
    pub performance: u32,
    pub efficiency: u32,
}

/// Reads `sysctl` output with names (`hw.perflevel0.physicalcpu: 8`).
pub fn parse_perflevels(text: &str) -> Option<Cores> {
    let value = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().parse::<u32>().ok())?
        })
    };
    Some(Cores {
        performance: value("hw.perflevel0.physicalcpu")?,
        efficiency: value("hw.perflevel1.physicalcpu").unwrap_or(0),
    })
}

/// The available simulator runtimes (`iOS 17.2`) in `xcrun simctl list
/// runtimes -j`; an output that is not that JSON gives none.
pub fn parse_simulator_runtimes(json: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct List {
        runtimes: Vec<Runtime>,
    }
    #[derive(serde::Deserialize)]
    struct Runtime {
        name: String,
        #[serde(rename = "isAvailable", default = "yes")]
        is_available: bool,
    }
    fn yes() -> bool {
        true
    }
    serde_json::from_str::<List>(json)
        .map(|l| {
            l.runtimes
                .into_iter()
                .filter(|r| r.is_available)
                .map(|r| r.name)
                .collect()
        })
        .unwrap_or_default()
}

/// The facts a Mac advertises.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub macos: Option<Version>,
    pub cores: Option<Cores>,
    pub xcodes: Vec<Xcode>,
    pub simulator_runtimes: Vec<String>,
}

impl Facts {
    /// Reads this Mac's facts through its tools (each bounded to 3s).
    pub fn read() -> Facts {
        let out = |program: &str, args: &[&str]| super::output(program, args).unwrap_or_default();
        Facts {
            macos: parse_sw_vers(&out("sw_vers", &[])),
            cores: parse_perflevels(&out(
                "sysctl",
                &["hw.perflevel0.physicalcpu", "hw.perflevel1.physicalcpu"],
            )),
            xcodes: xcode::installed(),
            simulator_runtimes: parse_simulator_runtimes(&out(
                "xcrun",
                &["simctl", "list", "runtimes", "-j"],
            )),
        }
    }

    /// The properties these facts are offered as: `macos-version` (a
    /// version minimum actions may ask for), `xcode-version` (each Xcode,
    /// with and without its build), `apple-sdk` (`iPhoneOS17.2`, each SDK
    /// of any Xcode), `simulator-runtime`, and `performance-cores` /
    /// `efficiency-cores` on Apple silicon.
    pub fn properties(&self) -> Vec<Property> {
        let prop = |name: &str, value: String| Property {
            name: name.to_owned(),
            value,
        };
        let mut out = Vec::new();
        if let Some(v) = &self.macos {
            out.push(prop("macos-version", v.to_string()));
        }
        let mut sdks = std::collections::BTreeSet::new();
        for x in &self.xcodes {
            for value in outpost_proto::xcode::offered_values(&x.version) {
                out.push(prop(outpost_proto::xcode::PROPERTY, value));
            }
            sdks.extend(
                x.sdks
                    .iter()
                    .map(|s| format!("{}{}", s.platform, s.version)),
            );
        }
        out.extend(sdks.into_iter().map(|s| prop("apple-sdk", s)));
        for runtime in &self.simulator_runtimes {
            out.push(prop("simulator-runtime", runtime.clone()));
        }
        if let Some(c) = self.cores {
            out.push(prop("performance-cores", c.performance.to_string()));
            out.push(prop("efficiency-cores", c.efficiency.to_string()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sw_vers_is_read() {
        let sonoma = "ProductName:\t\tmacOS\nProductVersion:\t\t14.2.1\nBuildVersion:\t\t23C71\n";
        assert_eq!(
            parse_sw_vers(sonoma).map(|v| v.to_string()).as_deref(),
            Some("14.2.1")
        );
        let rapid = "ProductName:\tmacOS\nProductVersion:\t13.4.1\nProductVersionExtra:\t(c)\nBuildVersion:\t22F770820d\n";
        assert_eq!(
            parse_sw_vers(rapid).map(|v| v.to_string()).as_deref(),
            Some("13.4.1")
        );
        let catalina = "ProductName:\tMac OS X\nProductVersion:\t10.15.7\nBuildVersion:\t19H2\n";
        assert!(parse_sw_vers(catalina).expect("a version") < Version::parse("11").expect("v"));
        assert_eq!(parse_sw_vers("sw_vers: command not found"), None);
    }

    #[test]
    fn performance_levels_are_read() {
        let m2_pro = "hw.perflevel0.physicalcpu: 8\nhw.perflevel1.physicalcpu: 4\n";
        assert_eq!(
            parse_perflevels(m2_pro),
            Some(Cores {
                performance: 8,
                efficiency: 4
            })
        );
        // Intel Macs have no levels: sysctl names the unknown oid.
        let intel = "sysctl: unknown oid 'hw.perflevel0.physicalcpu'\n";
        assert_eq!(parse_perflevels(intel), None);
    }

    #[test]
    fn simulator_runtimes_are_read() {
        let json = r#"{
  "runtimes" : [
    {
      "bundlePath" : "\/Library\/Developer\/CoreSimulator\/Volumes\/iOS_21C62\/Library\/Developer\/CoreSimulator\/Profiles\/Runtimes\/iOS 17.2.simruntime",
      "buildversion" : "21C62",
      "platform" : "iOS",
      "runtimeRoot" : "\/Library\/Developer\/CoreSimulator\/Volumes\/iOS_21C62\/Library\/Developer\/CoreSimulator\/Profiles\/Runtimes\/iOS 17.2.simruntime\/Contents\/Resources\/RuntimeRoot",
      "identifier" : "com.apple.CoreSimulator.SimRuntime.iOS-17-2",
      "version" : "17.2",
      "isInternal" : false,
      "isAvailable" : true,
      "name" : "iOS 17.2",
      "supportedDeviceTypes" : [
        {
          "bundlePath" : "\/Applications\/Xcode.app\/Contents\/Developer\/Platforms\/iPhoneOS.platform\/Library\/Developer\/CoreSimulator\/Profiles\/DeviceTypes\/iPhone Xs.simdevicetype",
          "name" : "iPhone Xs",
          "identifier" : "com.apple.CoreSimulator.SimDeviceType.iPhone-XS",
          "productFamily" : "iPhone"
        }
      ]
    },
    {
      "buildversion" : "21S364",
      "platform" : "watchOS",
      "identifier" : "com.apple.CoreSimulator.SimRuntime.watchOS-10-2",
      "version" : "10.2",
      "isInternal" : false,
      "isAvailable" : false,
      "availabilityError" : "The runtime's disk image is missing",
      "name" : "watchOS 10.2",
      "supportedDeviceTypes" : []
    }
  ]
}"#;
        assert_eq!(parse_simulator_runtimes(json), ["iOS 17.2"]);
        assert!(parse_simulator_runtimes("xcrun: error: unable to find utility").is_empty());
    }

    #[test]
    fn facts_are_offered_as_properties() {
        let facts = Facts {
            macos: Version::parse("14.2.1").ok(),
            cores: Some(Cores {
                performance: 8,
                efficiency: 4,
            }),
            xcodes: vec![
                xcode::tests::xcode(
                    "15.2",
                    "15C500b",
                    &[("iPhoneOS", "17.2"), ("MacOSX", "14.2")],
                ),
                xcode::tests::xcode("14.3.1", "14E300c", &[("MacOSX", "13.3")]),
            ],
            simulator_runtimes: vec!["iOS 17.2".to_owned()],
        };
        let values = |name: &str| -> Vec<String> {
            facts
                .properties()
                .into_iter()
                .filter(|p| p.name == name)
                .map(|p| p.value)
                .collect()
        };
        assert_eq!(values("macos-version"), ["14.2.1"]);
        assert_eq!(
            values("xcode-version"),
            ["15.2", "15.2.15C500b", "14.3.1", "14.3.1.14E300c"]
        );
        assert_eq!(
            values("apple-sdk"),
            ["MacOSX13.3", "MacOSX14.2", "iPhoneOS17.2"]
        );
        assert_eq!(values("simulator-runtime"), ["iOS 17.2"]);
        assert_eq!(values("performance-cores"), ["8"]);
        assert_eq!(values("efficiency-cores"), ["4"]);
        // What the coordinator's vocabulary reads back: a version minimum.
        let parsed = outpost_proto::platform::parse(&facts.properties()[..1]).expect("valid");
        assert!(parsed.at_least.contains_key("macos-version"));
    }
}
