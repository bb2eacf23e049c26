//! Matching: what an action needs from an agent (`Requirements`), what an
//! agent offers (`Offer`), whether one satisfies the other, and why nothing
//! in the fleet does. The vocabulary (known names, their roles, value
//! normalisation) is `outpost_proto::platform`, shared with the agents.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use outpost_proto::fleet;
use outpost_proto::gpu::DeviceNeed;
use outpost_proto::platform::{self, canonical_name, normalize_value};
use outpost_proto::reapi::platform::Property;
use outpost_proto::version::Version;

use super::gpus;

/// What an action needs from an agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirements {
    /// What each GPU it gets must be (how many: `min["gpu-count"]`).
    pub gpu: DeviceNeed,

    pub exact: BTreeMap<String, String>,
    /// Resource -> minimum amount, in thousandths (so the type is `Eq`).
    pub min: BTreeMap<String, u64>,
    /// Name -> the least version an offered value must have.
    pub at_least: BTreeMap<String, Version>,
}

/// What an agent offers.
#[derive(Clone, Debug, Default)]
pub struct Offer {
    pub exact: BTreeMap<String, BTreeSet<String>>,
    /// Resource -> total amount, in thousandths.
    pub resources: BTreeMap<String, u64>,
    /// The values of version-minimum properties that are versions.
    pub versions: BTreeMap<String, Vec<Version>>,
    /// The most input bytes one action may need (the agent's input cache
    /// bound); `None` when the agent does not say.
    pub max_input_bytes: Option<u64>,
    /// Its GPUs, one by one; empty from agents that list none.
    pub gpus: Vec<gpus::Device>,
    /// It reads the GPUs a lease names (feature `gpu-assignment`).
    pub gpu_assignment: bool,
}

impl fmt::Display for Requirements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for need in gpus::describe_need(&self.gpu) {
            write!(f, "{}{need}", if first { "" } else { ", " })?;
            first = false;
        }
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
        for (k, v) in &self.at_least {
            write!(f, "{}{k}>={v}", if first { "" } else { ", " })?;
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

/// Splits an action's properties into requirements and the platform the
/// agent runs the action by (every property, names canonical; the
/// vocabulary is `outpost_proto::platform`).
pub fn requirements(properties: &[Property]) -> Result<(Requirements, Vec<Property>), String> {
    let parsed = platform::parse(properties)?;
    let mut exact = parsed.exact;
    // The network is matched with the isolation that gives it, where the
    // action names one (an image names docker); otherwise the agent's
    // default kind must give it, which plain `bridge` says.
    if let (Some(network), Some(kind)) = (
        exact.get("dockerNetwork"),
        exact.get("workload-isolation-type"),
    ) && network != "off"
    {
        let pair = platform::network_pair(kind, network);
        exact.insert("dockerNetwork".to_owned(), pair);
    }
    let mut req = Requirements {
        gpu: parsed.gpu,
        exact,
        min: parsed.min,
        at_least: parsed.at_least,
    };
    gpus::complete(&mut req)?;
    Ok((req, parsed.properties))
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
        for name in platform::VERSION_MINIMUM {
            let versions: Vec<Version> = offer
                .exact
                .get(*name)
                .into_iter()
                .flatten()
                .filter_map(|v| Version::parse(v).ok())
                .collect();
            if !versions.is_empty() {
                offer.versions.insert((*name).to_owned(), versions);
            }
        }
        for (k, v) in resources {
            offer
                .resources
                .insert(k.clone(), (v.max(0.0) * 1000.0).round() as u64);
        }
        // Agents from before the network was offered per isolation kind
        // (no `kind/network` value) give their networks in every kind.
        let kinds = offer
            .exact
            .get("workload-isolation-type")
            .cloned()
            .unwrap_or_default();
        if let Some(networks) = offer.exact.get_mut("dockerNetwork")
            && !networks.iter().any(|n| n.contains('/'))
        {
            let pairs: Vec<String> = networks
                .iter()
                .filter(|n| *n != "off")
                .flat_map(|n| kinds.iter().map(move |k| platform::network_pair(k, n)))
                .collect();
            networks.extend(pairs);
        }
        offer
    }

    /// What an agent offers by its registration: properties, resources,
    /// input cache bound and GPUs.
    pub fn of(caps: &fleet::Capabilities) -> Offer {
        let mut offer = Offer::new(&caps.properties, &caps.resources).holding(caps.max_input_bytes);
        offer.gpus = caps
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| gpus::Device::of(i, g))
            .collect();
        offer.gpu_assignment = caps
            .features
            .iter()
            .any(|f| f == outpost_proto::features::GPU_ASSIGNMENT);
        // An agent from before Xcode selection would run an action naming
        // an Xcode without its DEVELOPER_DIR: its xcode-version values
        // (labels) match nothing.
        if !caps
            .features
            .iter()
            .any(|f| f == outpost_proto::features::XCODE_SELECTION)
        {
            offer.exact.remove(outpost_proto::xcode::PROPERTY);
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
            && req.at_least.iter().all(|(k, v)| self.has_version(k, v))
            && gpus::could_hold(&self.gpus, req)
    }

    /// Whether this offer has a `name` of version `minimum` or above.
    pub fn has_version(&self, name: &str, minimum: &Version) -> bool {
        self.versions
            .get(name)
            .is_some_and(|vs| vs.iter().any(|v| v.at_least(minimum)))
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
            let mut reason = if offered.is_empty() {
                format!("no agent offers {k} (required {k}={v})")
            } else {
                let list: Vec<String> = offered.iter().map(|o| format!("{k}={o}")).collect();
                format!(
                    "no agent offers {k}={v} (the fleet offers {})",
                    list.join(", ")
                )
            };
            if k == "workload-isolation-type" && v == platform::CONTAINER_ISOLATION {
                reason.push_str(
                    "; an action naming a container-image runs only on agents with Docker \
                     (isolation docker in their configuration)",
                );
            }
            if k == outpost_proto::xcode::PROPERTY {
                reason.push_str(
                    "; the action asks for that Xcode by its xcode-version property or by \
                     XCODE_VERSION_OVERRIDE in its environment (Bazel's --xcode_version)",
                );
            }
            reasons.push(reason);
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
    for (k, v) in &req.at_least {
        if !offers.iter().any(|o| o.has_version(k, v)) {
            let mut offered: Vec<&Version> = offers
                .iter()
                .filter_map(|o| o.versions.get(k))
                .flatten()
                .collect();
            offered.sort();
            offered.dedup();
            let list: Vec<String> = offered.iter().map(ToString::to_string).collect();
            reasons.push(if list.is_empty() {
                format!("no agent offers {k} (required {k}>={v})")
            } else {
                format!(
                    "no agent offers {k}>={v} (the fleet offers {k} {})",
                    list.join(", ")
                )
            });
        }
    }
    reasons.extend(gpus::explain(req, offers));
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

    use outpost_proto::platform::from_pairs as props;

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
        let (req, platform) = requirements(&props(&[
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
        assert!(
            !req.exact.contains_key("dockerUser"),
            "configuration matched"
        );
        // The agent gets every property, by its canonical name.
        let names: Vec<&str> = platform.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "OSFamily",
                "Arch",
                "EstimatedCPU",
                "gpu-count",
                "dockerUser"
            ]
        );
        assert!(linux_offer().satisfies(&req));
        let (isa_only, _) =
            requirements(&props(&[("OSFamily", "linux"), ("ISA", "x86-64")])).expect("valid");
        assert!(linux_offer().satisfies(&isa_only));
        // The network is matched: only agents that allow it offer bridge.
        let (bridge, _) = requirements(&props(&[("dockernetwork", "bridge")])).expect("valid");
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
    fn a_container_image_matches_any_agent_with_docker() {
        let docker = Offer::new(
            &props(&[
                ("OSFamily", "linux"),
                ("workload-isolation-type", "linux-sandbox"),
                ("workload-isolation-type", "docker"),
            ]),
            &HashMap::new(),
        );
        let sandbox_only = linux_offer();
        // Whatever image: the agent does not advertise images.
        for image in [
            "docker://gcc:12",
            "ubuntu:24.04",
            "docker://anything/else:1",
        ] {
            let (req, platform) =
                requirements(&props(&[("container-image", image)])).expect("valid");
            assert!(!req.exact.contains_key("container-image"), "{req}");
            assert!(docker.satisfies(&req), "{image}");
            assert!(!sandbox_only.satisfies(&req), "{image}");
            // The agent still gets the image.
            assert!(
                platform
                    .iter()
                    .any(|p| p.name == "container-image" && p.value == image)
            );
            let why = explain_unsatisfiable(&req, 0, &[&sandbox_only]);
            assert!(
                why.contains("workload-isolation-type=docker")
                    && why.contains("agents with Docker"),
                "{why}"
            );
        }
        let (explicit, _) = requirements(&props(&[
            ("container-image", "docker://gcc:12"),
            ("workload-isolation-type", "docker"),
        ]))
        .expect("valid");
        assert!(docker.satisfies(&explicit));
        let err = requirements(&props(&[
            ("container-image", "docker://gcc:12"),
            ("workload-isolation-type", "none"),
        ]))
        .expect_err("container-image with another isolation");
        assert!(err.contains("workload-isolation-type=none"), "{err}");
    }

    #[test]
    fn the_network_is_matched_with_the_isolation_that_gives_it() {
        // Bridge in Docker only; the default (linux-sandbox) gives none.
        let docker_bridge = Offer::new(
            &props(&[
                ("workload-isolation-type", "linux-sandbox"),
                ("workload-isolation-type", "docker"),
                ("dockerNetwork", "off"),
                ("dockerNetwork", "docker/bridge"),
            ]),
            &HashMap::new(),
        );
        let needs = |list: &[(&str, &str)]| requirements(&props(list)).expect("valid").0;
        assert!(docker_bridge.satisfies(&needs(&[
            ("container-image", "docker://gcc:12"),
            ("dockerNetwork", "bridge"),
        ])));
        assert!(!docker_bridge.satisfies(&needs(&[
            ("workload-isolation-type", "linux-sandbox"),
            ("dockerNetwork", "bridge"),
        ])));
        // No isolation named: the agent's default must give it.
        assert!(!docker_bridge.satisfies(&needs(&[("dockerNetwork", "bridge")])));
        assert!(docker_bridge.satisfies(&needs(&[("dockerNetwork", "off")])));
        // An agent from before pairs: bridge in every kind it offers.
        let old = Offer::new(
            &props(&[
                ("workload-isolation-type", "linux-sandbox"),
                ("workload-isolation-type", "none"),
                ("dockerNetwork", "off"),
                ("dockerNetwork", "bridge"),
            ]),
            &HashMap::new(),
        );
        for list in [
            vec![("dockerNetwork", "bridge")],
            vec![
                ("workload-isolation-type", "none"),
                ("dockerNetwork", "bridge"),
            ],
            vec![
                ("workload-isolation-type", "linux-sandbox"),
                ("dockerNetwork", "bridge"),
            ],
        ] {
            assert!(old.satisfies(&needs(&list)), "{list:?}");
        }
        let why = explain_unsatisfiable(
            &needs(&[
                ("workload-isolation-type", "linux-sandbox"),
                ("dockerNetwork", "bridge"),
            ]),
            0,
            &[&docker_bridge],
        );
        assert!(why.contains("dockerNetwork=linux-sandbox/bridge"), "{why}");
    }

    #[test]
    fn a_version_minimum_is_met_by_any_offered_version_at_least_it() {
        let mac = |versions: &[&str]| {
            let list: Vec<(&str, &str)> = versions.iter().map(|v| ("macos-version", *v)).collect();
            Offer::new(&props(&list), &HashMap::new())
        };
        let needs = |v: &str| {
            requirements(&props(&[("macOS-version", v)]))
                .expect("valid")
                .0
        };
        assert!(mac(&["14.10"]).satisfies(&needs("14.9")));
        assert!(mac(&["14.2.1"]).satisfies(&needs(">=14.2")));
        assert!(mac(&["13"]).satisfies(&needs("13.0")));
        assert!(!mac(&["14.9"]).satisfies(&needs("14.10")));
        assert!(!mac(&[]).satisfies(&needs("12")));
        // A value that is no version never meets a minimum.
        assert!(!mac(&["unknown"]).satisfies(&needs("1")));
        assert_eq!(needs("14.10").to_string(), "macos-version>=14.10");
        let why = explain_unsatisfiable(&needs("15"), 0, &[&mac(&["14.9"]), &mac(&["13.6.1"])]);
        assert!(
            why.contains(
                "no agent offers macos-version>=15 (the fleet offers macos-version 13.6.1, 14.9)"
            ),
            "{why}"
        );
        let why = explain_unsatisfiable(&needs("15"), 0, &[&linux_offer()]);
        assert!(
            why.contains("no agent offers macos-version (required macos-version>=15)"),
            "{why}"
        );
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
