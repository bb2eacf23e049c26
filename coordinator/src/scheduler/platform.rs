//! Typed platform properties: what an action asks for, what an agent
//! offers, and whether one satisfies the other.
//!
//! Every property is an exact match (`dockerNetwork=bridge` finds the agents
//! that allow sandboxed actions the network) unless it is a consumable minimum
//! (`gpu-count`, `EstimatedCPU`, `EstimatedMemory`, `EstimatedFreeDiskBytes`,
//! `resources:<name>`) or on the configuration-only list, which is passed to
//! the agent and never matched. Names of known properties are matched
//! case-insensitively; values of `OSFamily`, `Arch` and `ISA` are normalised
//! (`Linux` = `linux`, `x86_64` = `amd64` for Arch, `amd64` = `x86-64` for ISA).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use outpost_proto::quote::quoted;
use outpost_proto::reapi::platform::Property;

/// Properties the runner reads; never used to choose an agent.
pub const CONFIG_ONLY: &[&str] = &[
    "dockerUser",
    "dockerRunAsRoot",
    "dockerInit",
    "dockerReuse",
    "recycle-runner",
    "runner-recycling-key",
    "runner-recycling-max-wait",
    "preserve-workspace",
    "clean-workspace-inputs",
    "persistentWorkerKey",
    "persistentWorkerProtocol",
    "persistent-workers",
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

/// Consumable minimums: property name -> the resource an agent advertises.
const CONSUMABLE: &[(&str, &str)] = &[
    ("gpu-count", "gpu-count"),
    ("EstimatedCPU", "cpu"),
    ("EstimatedMemory", "memory"),
    ("EstimatedFreeDiskBytes", "disk"),
];

/// Exact-match names with a canonical spelling.
const KNOWN_EXACT: &[&str] = &[
    "OSFamily",
    "Arch",
    "ISA",
    "Pool",
    "container-image",
    "workload-isolation-type",
    "dockerNetwork",
    "gpu-model",
];

/// What an action needs from an agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirements {
    pub exact: BTreeMap<String, String>,
    /// Resource -> minimum amount, in thousandths (so the type is `Eq`).
    pub min: BTreeMap<String, u64>,
}

/// What an agent offers.
#[derive(Clone, Debug, Default)]
pub struct Offer {
    pub exact: BTreeMap<String, BTreeSet<String>>,
    /// Resource -> total amount, in thousandths.
    pub resources: BTreeMap<String, u64>,
    /// The most input bytes one action may need (the agent's input cache
    /// bound); `None` when the agent does not say.
    pub max_input_bytes: Option<u64>,
}

impl fmt::Display for Requirements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (k, v) in &self.exact {
            write!(f, "{}{k}={v}", if first { "" } else { ", " })?;
            first = false;
        }
        for (k, v) in &self.min {
            write!(
                f,
                "{}{k}>={}",
                if first { "" } else { ", " },
                milli_to_string(*v)
            )?;
            first = false;
        }
        if first {
            f.write_str("(no requirements)")?;
        }
        Ok(())
    }
}

fn milli_to_string(v: u64) -> String {
    if v.is_multiple_of(1000) {
        (v / 1000).to_string()
    } else {
        format!("{}", v as f64 / 1000.0)
    }
}

fn canonical_name(name: &str) -> Option<&'static str> {
    KNOWN_EXACT
        .iter()
        .chain(CONFIG_ONLY)
        .chain(CONSUMABLE.iter().map(|(n, _)| n))
        .find(|known| known.eq_ignore_ascii_case(name))
        .copied()
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
        _ => value.to_owned(),
    }
}

/// Parses an amount: `2`, `1.5`, `500m` (milli), `4GB`, `512MiB`, `1e9`.
fn parse_amount(name: &str, value: &str) -> Result<u64, String> {
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

/// Longest platform property name and value accepted: real ones are short,
/// and every one may be quoted back in an error.
const MAX_NAME: usize = 256;
const MAX_VALUE: usize = 1024;

/// Splits an action's properties into requirements and configuration-only
/// properties.
pub fn requirements(properties: &[Property]) -> Result<(Requirements, Vec<Property>), String> {
    let mut req = Requirements::default();
    let mut config = Vec::new();
    for p in properties {
        if p.name.len() > MAX_NAME || p.value.len() > MAX_VALUE {
            return Err(format!(
                "platform property {}={} is too long (names up to {MAX_NAME} bytes, values up to {MAX_VALUE})",
                quoted(&p.name),
                quoted(&p.value)
            ));
        }
        let known = canonical_name(&p.name);
        let name = known.unwrap_or(&p.name);
        if CONFIG_ONLY.contains(&name) {
            config.push(Property {
                name: name.to_owned(),
                value: p.value.clone(),
            });
        } else if let Some((_, resource)) = CONSUMABLE.iter().find(|(n, _)| *n == name) {
            let amount = parse_amount(name, &p.value)?;
            if req.min.insert((*resource).to_owned(), amount).is_some() {
                return Err(format!("platform property {name} is given twice"));
            }
        } else if let Some(resource) = p.name.strip_prefix("resources:") {
            let amount = parse_amount(&p.name, &p.value)?;
            if req.min.insert(resource.to_owned(), amount).is_some() {
                return Err(format!("platform property {} is given twice", p.name));
            }
        } else {
            let value = normalize_value(name, &p.value);
            if let Some(old) = req.exact.insert(name.to_owned(), value.clone())
                && old != value
            {
                return Err(format!(
                    "platform property {name} is given twice ({old:?} and {value:?})"
                ));
            }
        }
    }
    Ok((req, config))
}

impl Offer {
    /// Builds an offer from advertised properties and resources.
    pub fn new(
        properties: &[Property],
        resources: &std::collections::HashMap<String, f64>,
    ) -> Offer {
        let mut offer = Offer::default();
        for p in properties {
            let name = canonical_name(&p.name).unwrap_or(&p.name);
            offer
                .exact
                .entry(name.to_owned())
                .or_default()
                .insert(normalize_value(name, &p.value));
        }
        for (k, v) in resources {
            offer
                .resources
                .insert(k.clone(), (v.max(0.0) * 1000.0).round() as u64);
        }
        offer
    }

    /// The same offer, with the agent's input cache bound (0: not said).
    pub fn holding(mut self, max_input_bytes: u64) -> Offer {
        self.max_input_bytes = (max_input_bytes > 0).then_some(max_input_bytes);
        self
    }

    /// Whether an action with this many bytes of inputs fits the agent's
    /// input cache.
    pub fn holds_inputs(&self, input_bytes: u64) -> bool {
        self.max_input_bytes.is_none_or(|max| input_bytes <= max)
    }

    /// Whether this offer could ever run an action with `req` (resources
    /// compared with totals).
    pub fn satisfies(&self, req: &Requirements) -> bool {
        req.exact
            .iter()
            .all(|(k, v)| self.exact.get(k).is_some_and(|vs| vs.contains(v)))
            && req
                .min
                .iter()
                .all(|(k, v)| self.resources.get(k).copied().unwrap_or(0) >= *v)
    }
}

/// Explains why no offer satisfies `req`: each unmet requirement and what
/// the fleet has instead.
pub fn explain_unsatisfiable(req: &Requirements, input_bytes: u64, offers: &[&Offer]) -> String {
    if offers.is_empty() {
        return format!(
            "no agent has connected to this coordinator in the recent past, so nothing can run \
             an action requiring {req}; start an agent with `outpost agent --coordinator ...`"
        );
    }
    let mut reasons = Vec::new();
    for (k, v) in &req.exact {
        if !offers
            .iter()
            .any(|o| o.exact.get(k).is_some_and(|vs| vs.contains(v)))
        {
            let offered: BTreeSet<&String> = offers
                .iter()
                .filter_map(|o| o.exact.get(k))
                .flatten()
                .collect();
            reasons.push(if offered.is_empty() {
                format!("no agent offers {k} (required {k}={v})")
            } else {
                let list: Vec<String> = offered.iter().map(|o| format!("{k}={o}")).collect();
                format!(
                    "no agent offers {k}={v} (the fleet offers {})",
                    list.join(", ")
                )
            });
        }
    }
    for (k, v) in &req.min {
        let most = offers
            .iter()
            .map(|o| o.resources.get(k).copied().unwrap_or(0))
            .max()
            .unwrap_or(0);
        if most < *v {
            reasons.push(format!(
                "no agent has {k} >= {} (the most any agent has is {})",
                milli_to_string(*v),
                milli_to_string(most)
            ));
        }
    }
    let matching: Vec<&&Offer> = offers.iter().filter(|o| o.satisfies(req)).collect();
    if reasons.is_empty() && !matching.is_empty() {
        let most = matching
            .iter()
            .filter_map(|o| o.max_input_bytes)
            .max()
            .unwrap_or(0);
        reasons.push(format!(
            "its inputs are {input_bytes} bytes and the largest input cache of an agent that \
             matches holds {most} bytes (raise the agents' cache_size, or make the inputs smaller)"
        ));
    }
    if reasons.is_empty() {
        reasons.push(format!(
            "no single agent offers all of {req}, though each requirement is met by some agent"
        ));
    }
    format!("no agent can run this action: {}", reasons.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn props(list: &[(&str, &str)]) -> Vec<Property> {
        list.iter()
            .map(|(n, v)| Property {
                name: (*n).to_owned(),
                value: (*v).to_owned(),
            })
            .collect()
    }

    fn linux_offer() -> Offer {
        Offer::new(
            &props(&[
                ("OSFamily", "linux"),
                ("Arch", "amd64"),
                ("ISA", "x86-64"),
                ("workload-isolation-type", "none"),
            ]),
            &HashMap::from([("cpu".to_owned(), 8.0), ("gpu-count".to_owned(), 1.0)]),
        )
    }

    #[test]
    fn exact_minimum_and_config_only() {
        let (req, config) = requirements(&props(&[
            ("osfamily", "Linux"),
            ("Arch", "x86_64"),
            ("EstimatedCPU", "500m"),
            ("gpu-count", "1"),
            ("dockerUser", "root"),
        ]))
        .expect("valid");
        assert_eq!(req.exact.get("OSFamily").map(String::as_str), Some("linux"));
        assert_eq!(req.exact.get("Arch").map(String::as_str), Some("amd64"));
        assert_eq!(req.min.get("cpu"), Some(&500));
        assert_eq!(config.len(), 1);
        assert!(linux_offer().satisfies(&req));
        let (isa_only, _) =
            requirements(&props(&[("OSFamily", "linux"), ("ISA", "x86-64")])).expect("valid");
        assert!(linux_offer().satisfies(&isa_only));
        // The network is matched: only agents that allow it offer bridge.
        let (bridge, config) = requirements(&props(&[("dockernetwork", "bridge")])).expect("valid");
        assert!(config.is_empty());
        assert!(!linux_offer().satisfies(&bridge));
    }

    #[test]
    fn unsatisfiable_is_explained() {
        let offer = linux_offer();
        for (list, words) in [
            (
                vec![("OSFamily", "plan9")],
                "OSFamily=plan9 (the fleet offers OSFamily=linux)",
            ),
            (
                vec![("gpu-count", "4")],
                "gpu-count >= 4 (the most any agent has is 1)",
            ),
            (vec![("Pool", "big")], "no agent offers Pool"),
        ] {
            let (req, _) = requirements(&props(&list)).expect("valid");
            assert!(!offer.satisfies(&req));
            let why = explain_unsatisfiable(&req, 0, &[&offer]);
            assert!(why.contains(words), "{why}");
        }
        let (req, _) = requirements(&props(&[("OSFamily", "linux")])).expect("valid");
        assert!(explain_unsatisfiable(&req, 0, &[]).contains("no agent has connected"));
    }

    #[test]
    fn bad_properties_are_errors() {
        assert!(requirements(&props(&[("EstimatedMemory", "lots")])).is_err());
        assert!(requirements(&props(&[("OSFamily", "linux"), ("OSFamily", "darwin")])).is_err());
        let (req, _) = requirements(&props(&[
            ("EstimatedMemory", "4GB"),
            ("resources:licenses", "2"),
        ]))
        .expect("valid");
        assert_eq!(req.min.get("memory"), Some(&4_000_000_000_000));
        assert_eq!(req.min.get("licenses"), Some(&2000));
    }

    #[test]
    fn a_property_offered_with_several_values_matches_each() {
        let offer = Offer::new(
            &props(&[
                ("gcc-version", "12.2.0-14+deb12u1"),
                ("gcc-version", "12.2.0"),
            ]),
            &HashMap::new(),
        );
        for value in ["12.2.0", "12.2.0-14+deb12u1"] {
            let (req, _) = requirements(&props(&[("gcc-version", value)])).expect("valid");
            assert!(offer.satisfies(&req), "gcc-version={value}");
        }
        let (req, _) = requirements(&props(&[("gcc-version", "13.1.0")])).expect("valid");
        assert!(!offer.satisfies(&req));
    }
}
