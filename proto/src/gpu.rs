//! GPUs in the platform vocabulary: the per-device requirements an action
//! may add to `gpu-count` (`gpu-model`, `gpu-memory`,
//! `cuda-compute-capability`), and the normalised model name both sides
//! compare, so `H100`, `nvidia-h100` and `NVIDIA H100 80GB HBM3` are one
//! model and `100` is none.
//!
//! Each requirement holds for every device an action gets:
//! `gpu-model=a100, gpu-count=2` needs two A100s on one agent.

use crate::platform::parse_amount;
use crate::quote::quoted;
use crate::version::Version;

/// Per-device requirements, by canonical name.
pub const DEVICE_PROPERTIES: &[&str] = &["gpu-model", "gpu-memory", "cuda-compute-capability"];

/// What each assigned device must be; empty when an action names none of
/// [`DEVICE_PROPERTIES`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceNeed {
    /// A normalised model name ([`normalize_model`]), matched exactly.
    pub model: Option<String>,
    /// The least memory of each device, in bytes.
    pub memory_bytes: Option<u64>,
    /// The least CUDA compute capability of each device.
    pub compute_capability: Option<Version>,
}

impl DeviceNeed {
    pub fn is_empty(&self) -> bool {
        self.model.is_none() && self.memory_bytes.is_none() && self.compute_capability.is_none()
    }

    /// Reads one of [`DEVICE_PROPERTIES`] (`name` canonical); returns the
    /// value as the agent gets it. Given twice with different values, it
    /// is an error.
    pub fn set(&mut self, name: &str, value: &str) -> Result<String, String> {
        let twice = |old: &str| {
            format!(
                "platform property {name} is given twice ({} and {})",
                quoted(old),
                quoted(value)
            )
        };
        match name {
            "gpu-model" => {
                let model = normalize_model(value);
                if model.is_empty() {
                    return Err(format!(
                        "platform property gpu-model={} names no model (e.g. h100, a100, l4, rtx-4090)",
                        quoted(value)
                    ));
                }
                if let Some(old) = self.model.replace(model.clone())
                    && old != model
                {
                    return Err(twice(&old));
                }
                Ok(model)
            }
            "gpu-memory" => {
                // parse_amount counts thousandths.
                let bytes = parse_amount(name, value)? / 1000;
                if let Some(old) = self.memory_bytes.replace(bytes)
                    && old != bytes
                {
                    return Err(twice(&old.to_string()));
                }
                Ok(value.trim().to_owned())
            }
            "cuda-compute-capability" => {
                let v = value.trim();
                let minimum = Version::parse(v.strip_prefix(">=").unwrap_or(v)).map_err(|e| {
                    format!("platform property {name}: {e} (it is a minimum: 8.0 or >=8.0)")
                })?;
                if let Some(old) = self.compute_capability.replace(minimum.clone())
                    && old != minimum
                {
                    return Err(twice(&old.to_string()));
                }
                Ok(minimum.to_string())
            }
            other => Err(format!("{other} is not a per-device GPU property")),
        }
    }
}

/// Words in NVIDIA's product names that say who made a device or how it
/// is built, not which model it is.
const NOT_THE_MODEL: &[&str] = &["nvidia", "tesla", "geforce", "quadro", "pcie", "nvl", "oam"];

/// The model in a GPU's product name, as `gpu-model` matches it: lower
/// case, the vendor and product-line words (`NVIDIA`, `Tesla`, `GeForce`,
/// `Quadro`), the form factor (`PCIe`, `SXM4`, `NVL`) and the memory
/// (`80GB`, `HBM3`, `HBM3e`) dropped, the remaining words joined by `-`.
/// `NVIDIA H100 80GB HBM3` and `NVIDIA A100-SXM4-40GB` become `h100` and
/// `a100`, `NVIDIA GeForce RTX 4090` `rtx-4090`, `Tesla T4` `t4`.
pub fn normalize_model(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace() || c == '-' || c == '_')
        .filter(|w| !w.is_empty())
        .filter(|w| !NOT_THE_MODEL.contains(w))
        .filter(|w| !is_form_factor_or_memory(w))
        .collect();
    words.join("-")
}

fn is_form_factor_or_memory(word: &str) -> bool {
    let digits_then = |suffix: &str| {
        word.strip_suffix(suffix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let numbered = |prefix: &str| {
        word.strip_prefix(prefix)
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit() || b == b'e'))
    };
    digits_then("gb") || numbered("hbm") || numbered("sxm") || numbered("gddr")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_names_normalise_to_their_model() {
        for (name, model) in [
            ("NVIDIA H100 80GB HBM3", "h100"),
            ("NVIDIA H100 PCIe", "h100"),
            ("NVIDIA H100 NVL", "h100"),
            ("NVIDIA H200", "h200"),
            ("NVIDIA GH200 480GB", "gh200"),
            ("NVIDIA A100-SXM4-40GB", "a100"),
            ("NVIDIA A100-SXM4-80GB", "a100"),
            ("NVIDIA A100 80GB PCIe", "a100"),
            ("Tesla V100-SXM2-16GB", "v100"),
            ("Tesla T4", "t4"),
            ("NVIDIA A10G", "a10g"),
            ("NVIDIA L4", "l4"),
            ("NVIDIA L40S", "l40s"),
            ("NVIDIA GeForce RTX 4090", "rtx-4090"),
            ("NVIDIA RTX A6000", "rtx-a6000"),
            ("Quadro RTX 8000", "rtx-8000"),
            // What users write.
            ("H100", "h100"),
            ("nvidia-h100", "h100"),
            ("A100", "a100"),
            ("rtx 4090", "rtx-4090"),
        ] {
            assert_eq!(normalize_model(name), model, "{name}");
        }
        // A fragment names no model: it must match neither A100 nor H100.
        assert_eq!(normalize_model("100"), "100");
        assert_ne!(
            normalize_model("100"),
            normalize_model("NVIDIA A100-SXM4-40GB")
        );
        assert_ne!(
            normalize_model("100"),
            normalize_model("NVIDIA H100 80GB HBM3")
        );
    }

    #[test]
    fn device_requirements_are_read_and_checked() {
        let mut need = DeviceNeed::default();
        assert!(need.is_empty());
        assert_eq!(need.set("gpu-model", "NVIDIA A100").as_deref(), Ok("a100"));
        assert_eq!(need.set("gpu-memory", "40GiB").as_deref(), Ok("40GiB"));
        assert_eq!(need.memory_bytes, Some(40 << 30));
        assert_eq!(
            need.set("cuda-compute-capability", ">=8.0").as_deref(),
            Ok("8.0")
        );
        assert_eq!(need.compute_capability, Version::parse("8").ok());
        // The same model twice, however written, is no contradiction.
        assert!(need.set("gpu-model", "a100").is_ok());
        for (name, value, words) in [
            ("gpu-model", "h100", "given twice"),
            ("gpu-model", "NVIDIA", "names no model"),
            ("gpu-memory", "lots", "not an amount"),
            ("cuda-compute-capability", "ampere", "not a version"),
            ("cuda-compute-capability", "9.0", "given twice"),
        ] {
            let err = need.set(name, value).expect_err(value);
            assert!(err.contains(words), "{err}");
        }
    }
}
