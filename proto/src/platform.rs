//! The platform property vocabulary the coordinator and the agents share,
//! so both read an action's platform alike: which names are known (matched
//! case-insensitively, with their aliases), what role each plays, and how
//! values are normalised.
//!
//! Roles:
//! - **exact** (`OSFamily`, `Arch`, `ISA`, `Pool`, `workload-isolation-type`,
//!   `dockerNetwork`, labels, and any unknown name): an agent must offer
//!   the value;
//! - **per-device GPU** (`gpu-model`, `gpu-memory`,
//!   `cuda-compute-capability`, see [`crate::gpu`]): every GPU the action
//!   gets must meet them;
//! - **capabilities** (`container-image`): never matched by value; an agent
//!   with Docker runs any image, so naming an image requires
//!   `workload-isolation-type=docker`, and implies it when the action names
//!   no isolation;
//! - **consumable minimums** (`gpu-count`, `EstimatedCPU`, `EstimatedMemory`,
//!   `EstimatedFreeDiskBytes`, `resources:<name>`): an agent must have that
//!   much free;
//! - **version minimums** (`macos-version`): an agent offers the versions
//!   it has; an action's value (`13`, or `>=13`) is the least it runs with,
//!   compared as versions ([`crate::version::Version`]: `14.10 > 14.9`);
//! - **configuration** (`dockerUser`, `recycle-runner`,
//!   `persistentWorkerKey`, ...): read by the agent's runner, never matched.

use std::collections::BTreeMap;

use crate::quote::quoted;
use crate::reapi::platform::Property;
use crate::version::Version;

/// Properties the runner reads; never used to choose an agent.
pub const CONFIG_ONLY: &[&str] = &[
    "dockerUser",
    "dockerRunAsRoot",
    "dockerInit",
    "dockerReuse",
    "clean-workspace-inputs",
    "supports-workers",
    "requires-worker-protocol",
    "default-timeout",
    "termination-grace-period",
    "retry",
    "transient-error-exit-codes",
    "runner-crashed-exit-codes",
    "env-overrides",
    "extra-args",
];

/// Routing hints: read by the agent's runner (warm runners, persistent
/// workers) and by the scheduler, which prefers an agent holding the
/// action's warm key (`crate::warm`) warm; never matched against what an
/// agent offers.
pub const ROUTING: &[&str] = &[
    "recycle-runner",
    "runner-recycling-key",
    "runner-recycling-max-wait",
    "preserve-workspace",
    "persistentWorkerKey",
    "persistentWorkerProtocol",
    "persistent-workers",
];

/// Consumable minimums: property name -> the resource an agent advertises.
pub const CONSUMABLE: &[(&str, &str)] = &[
    ("gpu-count", "gpu-count"),
    ("EstimatedCPU", "cpu"),
    ("EstimatedMemory", "memory"),
    ("EstimatedFreeDiskBytes", "disk"),
];

/// Version minimums: `NAME=V` (or `NAME=>=V`) asks for an agent offering
/// a `NAME` whose version is at least `V`.
pub const VERSION_MINIMUM: &[&str] = &["macos-version"];

/// Capabilities: read by the agent, matched by what they need of it rather
/// than by value.
pub const CAPABILITY: &[&str] = &["container-image"];

/// The isolation a `container-image` needs.
pub const CONTAINER_ISOLATION: &str = "docker";

/// Exact-match names with a canonical spelling.
pub const KNOWN_EXACT: &[&str] = &[
    "OSFamily",
    "Arch",
    "ISA",
    "Pool",
    "workload-isolation-type",
    "dockerNetwork",
    "xcode-version",
    ROOT_FILESYSTEM,
];

/// What an action's `/` is (`root-filesystem`): [`HOST_ROOT`], the host's
/// toolchain read-only with the input root at `/execroot` (the default), or
/// [`INPUT_ROOT`], the input root itself (a whole sysroot, as BuildStream
/// sends), which only `linux-sandbox` gives and which it implies.
pub const ROOT_FILESYSTEM: &str = "root-filesystem";
pub const HOST_ROOT: &str = "host";
pub const INPUT_ROOT: &str = "input-root";
/// The isolation that can make the input root `/`.
pub const INPUT_ROOT_ISOLATION: &str = "linux-sandbox";

/// Names users already write for a known property.
const ALIASES: &[(&str, &str)] = &[("gpu", "gpu-count"), ("gpus", "gpu-count")];

/// Longest platform property name and value accepted: real ones are short,
/// and every one may be quoted back in an error.
pub const MAX_NAME: usize = 256;
pub const MAX_VALUE: usize = 1024;

/// The canonical spelling of a known property name (any case, or an
/// alias); `None` for names this vocabulary does not know.
pub fn canonical_name(name: &str) -> Option<&'static str> {
    KNOWN_EXACT
        .iter()
        .chain(CAPABILITY)
        .chain(CONFIG_ONLY)
        .chain(crate::gpu::DEVICE_PROPERTIES)
        .chain(ROUTING)
        .chain(CONSUMABLE.iter().map(|(n, _)| n))
        .chain(VERSION_MINIMUM)
        .find(|known| known.eq_ignore_ascii_case(name))
        .copied()
        .or_else(|| {
            ALIASES
                .iter()
                .find(|(alias, _)| alias.eq_ignore_ascii_case(name))
                .map(|(_, canonical)| *canonical)
        })
}

/// Normalises a value of a known property.
pub fn normalize_value(name: &str, value: &str) -> String {
    let lower = value.trim().to_ascii_lowercase();
    match name {
        "OSFamily" => match lower.as_str() {
            "macos" | "mac" | "osx" => "darwin".to_owned(),
            _ => lower,
        },
        "Arch" => match lower.as_str() {
            "x86_64" | "x86-64" | "x64" => "amd64".to_owned(),
            "aarch64" => "arm64".to_owned(),
            _ => lower,
        },
        "ISA" => match lower.as_str() {
            "x86_64" | "amd64" | "x64" => "x86-64".to_owned(),
            "arm64" => "aarch64".to_owned(),
            _ => lower,
        },
        "workload-isolation-type" | ROOT_FILESYSTEM => lower,
        "xcode-version" => crate::xcode::normalize(value),
        "dockerNetwork" => match lower.as_str() {
            "" | "none" => "off".to_owned(),
            _ => lower,
        },
        _ => value.to_owned(),
    }
}

/// Parses an amount: `2`, `1.5`, `500m` (milli), `4GB`, `512MiB`, `1e9`;
/// in thousandths, so amounts compare as integers.
pub fn parse_amount(name: &str, value: &str) -> Result<u64, String> {
    let v = value.trim();
    let bad = || {
        format!(
            "platform property {name}={} is not an amount (e.g. 2, 1.5, 500m, 4GB)",
            quoted(value)
        )
    };
    let units: &[(&str, f64)] = &[
        ("KiB", 1024.0),
        ("MiB", 1024.0 * 1024.0),
        ("GiB", 1024.0 * 1024.0 * 1024.0),
        ("TiB", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("KB", 1e3),
        ("MB", 1e6),
        ("GB", 1e9),
        ("TB", 1e12),
        ("m", 0.001),
    ];
    let (number, mult) = units
        .iter()
        .find_map(|(u, m)| v.strip_suffix(u).map(|n| (n, *m)))
        .unwrap_or((v, 1.0));
    let n: f64 = number.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    Ok((n * mult * 1000.0).round() as u64)
}

/// An action's platform read through the vocabulary: names canonical,
/// values normalised, each property in its role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Exact-match properties.
    pub exact: BTreeMap<String, String>,
    /// Resource -> minimum amount, in thousandths.
    pub min: BTreeMap<String, u64>,
    /// Version minimums, by canonical name.
    pub at_least: BTreeMap<String, Version>,
    /// Configuration-only properties, by canonical name.
    pub config: BTreeMap<String, String>,
    /// What each GPU the action gets must be.
    pub gpu: crate::gpu::DeviceNeed,
    /// Capabilities (`container-image`), by canonical name: what they
    /// require is in `exact`.
    pub capability: BTreeMap<String, String>,
    /// Every property as given, with its name canonical and (for exact
    /// ones) its value normalised: what the coordinator sends the agent.
    pub properties: Vec<Property>,
}

impl Parsed {
    /// The value of a property of any role, by canonical name (amounts as
    /// the client wrote them are not kept: use `min`).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.exact
            .get(name)
            .or_else(|| self.config.get(name))
            .or_else(|| self.capability.get(name))
            .map(String::as_str)
    }

    /// The configuration-only properties as wire properties.
    pub fn config_properties(&self) -> Vec<Property> {
        self.config
            .iter()
            .map(|(name, value)| Property {
                name: name.clone(),
                value: value.clone(),
            })
            .collect()
    }
}

/// `own` with every property of `defaults` it does not name itself (by
/// canonical name): an instance's default platform under an action's own.
pub fn with_defaults(own: &[Property], defaults: &[Property]) -> Vec<Property> {
    let canonical = |p: &Property| {
        canonical_name(&p.name)
            .map(str::to_owned)
            .unwrap_or_else(|| p.name.clone())
    };
    let named: std::collections::HashSet<String> = own.iter().map(canonical).collect();
    own.iter()
        .cloned()
        .chain(
            defaults
                .iter()
                .filter(|d| !named.contains(&canonical(d)))
                .cloned(),
        )
        .collect()
}

/// Properties from `(name, value)` pairs, as tests and tools write them.
pub fn from_pairs(pairs: &[(&str, &str)]) -> Vec<Property> {
    pairs
        .iter()
        .map(|(name, value)| Property {
            name: (*name).to_owned(),
            value: (*value).to_owned(),
        })
        .collect()
}

/// Reads an action's properties; a property given twice with different
/// values, a bad amount or an overlong name or value is an error that says
/// which.
pub fn parse(properties: &[Property]) -> Result<Parsed, String> {
    let mut parsed = Parsed::default();
    for p in properties {
        if p.name.len() > MAX_NAME || p.value.len() > MAX_VALUE {
            return Err(format!(
                "platform property {}={} is too long (names up to {MAX_NAME} bytes, values up to {MAX_VALUE})",
                quoted(&p.name),
                quoted(&p.value)
            ));
        }
        let name = canonical_name(&p.name).unwrap_or(&p.name);
        let mut value = p.value.clone();
        let twice = |old: &str, new: &str| {
            format!(
                "platform property {name} is given twice ({} and {})",
                quoted(old),
                quoted(new)
            )
        };
        if CONFIG_ONLY.contains(&name) || ROUTING.contains(&name) {
            if let Some(old) = parsed.config.insert(name.to_owned(), p.value.clone())
                && old != p.value
            {
                return Err(twice(&old, &p.value));
            }
        } else if crate::gpu::DEVICE_PROPERTIES.contains(&name) {
            value = parsed.gpu.set(name, &p.value)?;
        } else if CAPABILITY.contains(&name) {
            value = p.value.trim().to_owned();
            if value.is_empty() {
                continue;
            }
            if name == "container-image" {
                image_reference(&value)?;
            }
            if let Some(old) = parsed.capability.insert(name.to_owned(), value.clone())
                && old != value
            {
                return Err(twice(&old, &value));
            }
        } else if let Some((_, resource)) = CONSUMABLE.iter().find(|(n, _)| *n == name) {
            let amount = parse_amount(name, &p.value)?;
            if parsed.min.insert((*resource).to_owned(), amount).is_some() {
                return Err(format!("platform property {name} is given twice"));
            }
        } else if VERSION_MINIMUM.contains(&name) {
            let minimum = minimum_version(name, &p.value)?;
            if let Some(old) = parsed.at_least.insert(name.to_owned(), minimum.clone())
                && old != minimum
            {
                return Err(twice(&old.to_string(), &minimum.to_string()));
            }
        } else if let Some(resource) = p.name.strip_prefix("resources:") {
            let amount = parse_amount(&p.name, &p.value)?;
            if parsed.min.insert(resource.to_owned(), amount).is_some() {
                return Err(format!("platform property {} is given twice", p.name));
            }
        } else {
            value = normalize_value(name, &p.value);
            if let Some(old) = parsed.exact.insert(name.to_owned(), value.clone())
                && old != value
            {
                return Err(twice(&old, &value));
            }
        }
        parsed.properties.push(Property {
            name: name.to_owned(),
            value,
        });
    }
    if let Some(image) = parsed.capability.get("container-image") {
        match parsed.exact.get("workload-isolation-type") {
            None => {
                parsed.exact.insert(
                    "workload-isolation-type".to_owned(),
                    CONTAINER_ISOLATION.to_owned(),
                );
            }
            Some(kind) if kind == CONTAINER_ISOLATION => {}
            Some(kind) => {
                return Err(format!(
                    "platform property container-image={} runs the action in a container, \
                     which workload-isolation-type={kind} does not give; drop \
                     workload-isolation-type or set it to {CONTAINER_ISOLATION}",
                    quoted(image)
                ));
            }
        }
    }
    match parsed.exact.get(ROOT_FILESYSTEM).map(String::as_str) {
        None | Some(HOST_ROOT) => {}
        Some(INPUT_ROOT) => match parsed.exact.get("workload-isolation-type") {
            None => {
                parsed.exact.insert(
                    "workload-isolation-type".to_owned(),
                    INPUT_ROOT_ISOLATION.to_owned(),
                );
            }
            Some(kind) if kind == INPUT_ROOT_ISOLATION => {}
            Some(kind) => {
                return Err(format!(
                    "platform property {ROOT_FILESYSTEM}={INPUT_ROOT} needs \
                     workload-isolation-type={INPUT_ROOT_ISOLATION}, not {kind}"
                ));
            }
        },
        Some(other) => {
            return Err(format!(
                "platform property {ROOT_FILESYSTEM}={} is not one of {HOST_ROOT}, {INPUT_ROOT}",
                quoted(other)
            ));
        }
    }
    Ok(parsed)
}

/// The least version a version-minimum property asks for: `V` or `>=V`.
pub fn minimum_version(name: &str, value: &str) -> Result<Version, String> {
    let v = value.trim();
    let v = v.strip_prefix(">=").unwrap_or(v);
    Version::parse(v)
        .map_err(|e| format!("platform property {name}: {e} (it is a minimum: 13 or >=13)"))
}

/// How an agent offers a network for one isolation kind, as a
/// `dockerNetwork` value (`docker/bridge`): the network is matched as the
/// pair, since an agent may allow `bridge` in Docker but not in its sandbox.
pub fn network_pair(kind: &str, network: &str) -> String {
    format!("{kind}/{network}")
}

/// The image a `container-image` value names, without its `docker://`
/// scheme: `NAME[:TAG]` or `NAME@sha256:HEX`. Only the shape is checked
/// here; the engine judges the name.
pub fn image_reference(value: &str) -> Result<&str, String> {
    let bad = |why: &str| {
        format!(
            "platform property container-image={} {why} (write docker://NAME[:TAG] or \
             docker://NAME@sha256:DIGEST)",
            quoted(value)
        )
    };
    let image = match value.split_once("://") {
        Some(("docker", rest)) => rest,
        Some((scheme, _)) => {
            return Err(bad(&format!(
                "has scheme {} where docker is known",
                quoted(scheme)
            )));
        }
        None => value,
    };
    if image.is_empty() {
        return Err(bad("names no image"));
    }
    if image
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
    {
        return Err(bad("is not an image name"));
    }
    if let Some((_, digest)) = image.split_once('@')
        && !digest
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(bad("has a digest that is not sha256:<64 hex digits>"));
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::from_pairs as props;

    #[test]
    fn an_input_root_as_root_implies_the_sandbox_that_gives_it() {
        let parsed = parse(&props(&[("Root-Filesystem", "Input-Root")])).expect("parses");
        assert_eq!(parsed.get(ROOT_FILESYSTEM), Some(INPUT_ROOT));
        assert_eq!(parsed.get("workload-isolation-type"), Some("linux-sandbox"));
        let err = parse(&props(&[
            ("root-filesystem", "input-root"),
            ("workload-isolation-type", "docker"),
        ]))
        .expect_err("docker cannot");
        assert!(
            err.contains("needs workload-isolation-type=linux-sandbox"),
            "{err}"
        );
        let err = parse(&props(&[
            ("root-filesystem", "input-root"),
            ("container-image", "docker://gcc:12"),
        ]))
        .expect_err("a container cannot");
        assert!(err.contains("input-root"), "{err}");
        let err = parse(&props(&[("root-filesystem", "chroot")])).expect_err("unknown");
        assert!(err.contains("is not one of host, input-root"), "{err}");
        let host = parse(&props(&[("root-filesystem", "host")])).expect("parses");
        assert_eq!(host.get("workload-isolation-type"), None);
    }

    #[test]
    fn names_are_canonical_whatever_their_case_or_alias() {
        let parsed = parse(&props(&[
            ("osfamily", "Linux"),
            ("WORKLOAD-ISOLATION-TYPE", "Linux-Sandbox"),
            ("dockernetwork", "none"),
            ("GPU", "2"),
            ("dockeruser", "1000:1000"),
            ("Label", "Value"),
        ]))
        .expect("valid");
        assert_eq!(parsed.get("OSFamily"), Some("linux"));
        assert_eq!(parsed.get("workload-isolation-type"), Some("linux-sandbox"));
        assert_eq!(parsed.get("dockerNetwork"), Some("off"));
        assert_eq!(parsed.min.get("gpu-count"), Some(&2000));
        assert_eq!(parsed.get("dockerUser"), Some("1000:1000"));
        // Unknown names are matched exactly as written.
        assert_eq!(parsed.get("Label"), Some("Value"));
    }

    #[test]
    fn a_container_image_is_a_capability_that_needs_docker() {
        let parsed = parse(&props(&[("Container-Image", " docker://gcc:12 ")])).expect("an image");
        assert_eq!(parsed.get("container-image"), Some("docker://gcc:12"));
        // Never matched by value: any agent with Docker runs any image.
        assert!(!parsed.exact.contains_key("container-image"));
        assert_eq!(parsed.get("workload-isolation-type"), Some("docker"));
        let pinned = format!("docker://gcc@sha256:{}", "a".repeat(64));
        let explicit = parse(&props(&[
            ("container-image", &pinned),
            ("workload-isolation-type", "Docker"),
        ]))
        .expect("docker named explicitly");
        assert_eq!(explicit.get("workload-isolation-type"), Some("docker"));
        let err = parse(&props(&[
            ("container-image", "docker://gcc:12"),
            ("workload-isolation-type", "linux-sandbox"),
        ]))
        .expect_err("another isolation");
        assert!(
            err.contains("workload-isolation-type=linux-sandbox")
                && err.contains("set it to docker"),
            "{err}"
        );
        for bad in [
            "oci://gcc",
            "docker://",
            "docker://gcc@sha256:beef",
            "docker://a b",
        ] {
            let err = parse(&props(&[("container-image", bad)])).expect_err(bad);
            assert!(err.contains("docker://NAME"), "{err}");
        }
        assert_eq!(image_reference("gcc:12"), Ok("gcc:12"));
        assert_eq!(image_reference("docker://gcc"), Ok("gcc"));
        // An empty value names no image and asks for nothing.
        let none = parse(&props(&[("container-image", "")])).expect("empty");
        assert_eq!(none.get("workload-isolation-type"), None);
    }

    #[test]
    fn a_version_minimum_is_read_as_a_version() {
        let parsed = parse(&props(&[("MacOS-Version", " >=13.10 ")])).expect("valid");
        assert_eq!(
            parsed.at_least.get("macos-version"),
            Version::parse("13.10").ok().as_ref()
        );
        assert!(!parsed.exact.contains_key("macos-version"));
        // Written twice the same way (8 and 8.0 are one version): no contradiction.
        let same = parse(&props(&[
            ("macos-version", "14"),
            ("macos-version", "14.0"),
        ]));
        assert!(same.is_ok(), "{same:?}");
    }

    #[test]
    fn an_actions_own_values_win_over_defaults() {
        let merged = with_defaults(
            &props(&[("pool", "mine"), ("OSFamily", "linux")]),
            &props(&[
                ("Pool", "default"),
                ("workload-isolation-type", "linux-sandbox"),
            ]),
        );
        let parsed = parse(&merged).expect("no contradiction");
        assert_eq!(parsed.get("Pool"), Some("mine"));
        assert_eq!(parsed.get("workload-isolation-type"), Some("linux-sandbox"));
        assert_eq!(parsed.get("OSFamily"), Some("linux"));
    }

    #[test]
    fn contradictions_and_bad_amounts_are_errors() {
        for list in [
            vec![("OSFamily", "linux"), ("osfamily", "darwin")],
            vec![("EstimatedMemory", "lots")],
            vec![("gpu-count", "1"), ("gpu", "2")],
            vec![("dockerUser", "a"), ("dockerUser", "b")],
        ] {
            assert!(parse(&props(&list)).is_err(), "{list:?}");
        }
        for (list, words) in [
            (
                vec![("macos-version", "fourteen")],
                "\"fourteen\" is not a version",
            ),
            (
                vec![("macos-version", "13"), ("macOS-Version", "14")],
                "given twice",
            ),
        ] {
            let err = parse(&props(&list)).expect_err("a bad minimum");
            assert!(err.contains(words), "{err}");
        }
        let long = "v".repeat(MAX_VALUE + 1);
        let err = parse(&props(&[("Pool", &long)])).expect_err("too long");
        assert!(err.contains("too long") && err.len() < 400, "{err}");
    }
}
