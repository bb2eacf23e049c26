//! GPUs matched per device: what an agent's devices are ([`Device`]), which
//! of them meet an action's per-device requirements, and why no agent's
//! do. `gpu-count` stays a consumable total as well (the agent's
//! `gpu-count` resource), so agents that list no devices are counted as
//! before; the devices decide which ones an action gets.

use outpost_proto::fleet;
use outpost_proto::gpu::{DeviceNeed, normalize_model};
use outpost_proto::units::ByteSize;
use outpost_proto::version::Version;

use super::platform::{Offer, Requirements};

/// The resource `gpu-count` is counted in.
pub const COUNT: &str = "gpu-count";

/// One GPU as an agent advertises it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// The index the agent's driver gives it (its position in the list,
    /// for agents that do not say).
    pub index: u32,
    /// `GPU-…`; empty from agents that do not say.
    pub uuid: String,
    /// Normalised ([`normalize_model`]).
    pub model: String,
    pub memory_bytes: u64,
    pub compute_capability: Option<Version>,
    /// In MIG mode the whole device cannot be handed to one action (its
    /// instances are the CUDA devices), so it is never assigned.
    pub mig: bool,
}

impl Device {
    pub fn of(position: usize, gpu: &fleet::Gpu) -> Device {
        let model = if gpu.normalized_model.is_empty() {
            normalize_model(&gpu.model)
        } else {
            gpu.normalized_model.clone()
        };
        Device {
            index: if gpu.uuid.is_empty() {
                u32::try_from(position).unwrap_or(u32::MAX)
            } else {
                gpu.index
            },
            uuid: gpu.uuid.clone(),
            model,
            memory_bytes: gpu.memory_bytes,
            compute_capability: Version::parse(&gpu.compute_capability).ok(),
            mig: gpu.mig_mode == "enabled",
        }
    }

    /// Whether an action needing `need` of each device may get this one.
    pub fn meets(&self, need: &DeviceNeed) -> bool {
        !self.mig
            && need.model.as_ref().is_none_or(|m| *m == self.model)
            && need.memory_bytes.is_none_or(|m| self.memory_bytes >= m)
            && need
                .compute_capability
                .as_ref()
                .is_none_or(|c| self.compute_capability.as_ref().is_some_and(|d| d >= c))
    }

    /// For people: `h100 (80GiB, compute capability 9.0)`.
    pub fn describe(&self) -> String {
        let mut facts = vec![gib(self.memory_bytes)];
        if let Some(c) = &self.compute_capability {
            facts.push(format!("compute capability {c}"));
        }
        if self.mig {
            facts.push("MIG mode, not assigned".to_owned());
        }
        format!("{} ({})", self.model, facts.join(", "))
    }

    pub fn to_proto(&self) -> fleet::GpuDevice {
        fleet::GpuDevice {
            index: self.index,
            uuid: self.uuid.clone(),
        }
    }
}

/// Memory as people read a GPU's: whole GiB when it is near one.
fn gib(bytes: u64) -> String {
    let rounded = (bytes + (1 << 29)) >> 30;
    if rounded > 0 {
        format!("{rounded}GiB")
    } else {
        ByteSize(bytes).to_string()
    }
}

/// Devices an action asks for (whole devices; `gpu-count` in thousandths
/// is checked to be whole when the requirements are read).
pub fn count(req: &Requirements) -> usize {
    req.min.get(COUNT).map_or(0, |milli| {
        usize::try_from(milli.div_ceil(1000)).unwrap_or(usize::MAX)
    })
}

/// Reads the GPU part of an action's requirements: `gpu-count` must be a
/// whole number of devices, and per-device requirements without
/// `gpu-count` ask for one device.
pub fn complete(req: &mut Requirements) -> Result<(), String> {
    if let Some(milli) = req.min.get(COUNT)
        && !milli.is_multiple_of(1000)
    {
        return Err(format!(
            "platform property gpu-count={} is not a whole number: GPUs are given whole \
             (write gpu-count=1)",
            *milli as f64 / 1000.0
        ));
    }
    if !req.gpu.is_empty() && req.min.get(COUNT).is_none_or(|n| *n == 0) {
        req.min.insert(COUNT.to_owned(), 1000);
    }
    Ok(())
}

/// Whether an agent with these devices could ever give an action its GPUs.
/// An agent that lists no devices is judged by its `gpu-count` total
/// alone, which only an action without per-device requirements can use.
pub fn could_hold(devices: &[Device], req: &Requirements) -> bool {
    let n = count(req);
    if n == 0 {
        return true;
    }
    if devices.is_empty() {
        return req.gpu.is_empty();
    }
    devices.iter().filter(|d| d.meets(&req.gpu)).count() >= n
}

/// Positions of `count(req)` devices the action may have among those not
/// `held`, lowest index first; `None` when too few are free. Empty when
/// the action asks for no GPU or the agent lists no devices.
pub fn pick(devices: &[Device], held: &[bool], req: &Requirements) -> Option<Vec<usize>> {
    let n = count(req);
    if n == 0 || devices.is_empty() {
        return Some(Vec::new());
    }
    let mut free: Vec<usize> = (0..devices.len())
        .filter(|&i| !held.get(i).copied().unwrap_or(false) && devices[i].meets(&req.gpu))
        .collect();
    free.sort_by_key(|&i| devices[i].index);
    (free.len() >= n).then(|| free.into_iter().take(n).collect())
}

/// Per-device requirements as an action writes them.
pub fn describe_need(need: &DeviceNeed) -> Vec<String> {
    let mut wanted = Vec::new();
    if let Some(m) = &need.model {
        wanted.push(format!("gpu-model={m}"));
    }
    if let Some(m) = need.memory_bytes {
        wanted.push(format!("gpu-memory>={}", ByteSize(m)));
    }
    if let Some(c) = &need.compute_capability {
        wanted.push(format!("cuda-compute-capability>={c}"));
    }
    wanted
}

/// Why no offer could give an action its GPUs, naming the fleet's GPUs;
/// `None` when one could (or the action asks for none).
pub fn explain(req: &Requirements, offers: &[&Offer]) -> Option<String> {
    let n = count(req);
    if n == 0 || offers.iter().any(|o| could_hold(&o.gpus, req)) {
        return None;
    }
    // Counts alone are explained with the other totals.
    if req.gpu.is_empty() && offers.iter().all(|o| o.gpus.is_empty()) {
        return None;
    }
    let wanted = describe_need(&req.gpu);
    let each = if wanted.is_empty() {
        String::new()
    } else {
        format!(" with {}", wanted.join(", "))
    };
    let fleet: Vec<String> = offers
        .iter()
        .filter(|o| !o.gpus.is_empty())
        .map(|o| {
            let list: Vec<String> = o.gpus.iter().map(Device::describe).collect();
            format!("[{}]", list.join(", "))
        })
        .collect();
    let offered = if fleet.is_empty() {
        "no agent has a GPU".to_owned()
    } else {
        format!("the fleet's GPUs, per agent: {}", fleet.join("; "))
    };
    Some(format!(
        "no agent has {n} GPU{}{each} ({offered})",
        if n == 1 { "" } else { "s" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    use outpost_proto::platform::from_pairs as props;

    use super::super::platform::requirements;

    fn gpu(index: u32, name: &str, gib: u64, cc: &str) -> fleet::Gpu {
        fleet::Gpu {
            model: name.to_owned(),
            memory_bytes: gib << 30,
            compute_capability: cc.to_owned(),
            driver: "550.54.15".to_owned(),
            index,
            uuid: format!("GPU-{index:08}"),
            normalized_model: normalize_model(name),
            cuda_version: "12.4".to_owned(),
            mig_mode: "disabled".to_owned(),
        }
    }

    fn devices(gpus: &[fleet::Gpu]) -> Vec<Device> {
        gpus.iter()
            .enumerate()
            .map(|(i, g)| Device::of(i, g))
            .collect()
    }

    fn needs(list: &[(&str, &str)]) -> Requirements {
        requirements(&props(list)).expect("valid").0
    }

    #[test]
    fn each_device_must_meet_every_requirement() {
        let mixed = devices(&[
            gpu(0, "NVIDIA A100-SXM4-40GB", 40, "8.0"),
            gpu(1, "NVIDIA H100 80GB HBM3", 80, "9.0"),
        ]);
        let fits = |list: &[(&str, &str)]| could_hold(&mixed, &needs(list));
        assert!(fits(&[("gpu-count", "2")]));
        assert!(fits(&[("gpu-model", "A100")]));
        assert!(fits(&[("gpu-model", "h100"), ("gpu-count", "1")]));
        // Two of one model: this agent has one of each.
        assert!(!fits(&[("gpu-model", "a100"), ("gpu-count", "2")]));
        assert!(!fits(&[("gpu-model", "100")]));
        assert!(fits(&[("gpu-memory", "40GiB"), ("gpu-count", "2")]));
        assert!(!fits(&[("gpu-memory", "41GiB"), ("gpu-count", "2")]));
        assert!(fits(&[("gpu-memory", "80GiB")]));
        assert!(fits(&[("cuda-compute-capability", "8.0"), ("gpu", "2")]));
        assert!(!fits(&[("cuda-compute-capability", "8.9"), ("gpus", "2")]));
        assert!(fits(&[("cuda-compute-capability", ">=9")]));
        assert!(!fits(&[("cuda-compute-capability", "9.10")]));
        assert!(!fits(&[("gpu-count", "3")]));
        // Versions compare as versions: 12.10 is above 12.9.
        let new = devices(&[gpu(0, "NVIDIA B300", 288, "12.10")]);
        assert!(could_hold(
            &new,
            &needs(&[("cuda-compute-capability", "12.9")])
        ));
    }

    #[test]
    fn free_devices_are_picked_lowest_index_first() {
        let two = devices(&[
            gpu(0, "NVIDIA L4", 24, "8.9"),
            gpu(1, "NVIDIA L4", 24, "8.9"),
        ]);
        let one = needs(&[("gpu-count", "1")]);
        assert_eq!(pick(&two, &[false, false], &one), Some(vec![0]));
        assert_eq!(pick(&two, &[true, false], &one), Some(vec![1]));
        assert_eq!(pick(&two, &[true, true], &one), None);
        assert_eq!(
            pick(&two, &[false, false], &needs(&[("gpu-count", "2")])),
            Some(vec![0, 1])
        );
        assert_eq!(pick(&two, &[true, true], &needs(&[])), Some(vec![]));
        // A device in MIG mode is shown but never given.
        let mut mig = gpu(0, "NVIDIA A100-SXM4-40GB", 40, "8.0");
        mig.mig_mode = "enabled".to_owned();
        let mig = devices(&[mig]);
        assert_eq!(pick(&mig, &[false], &one), None);
        assert!(mig[0].describe().contains("MIG mode"));
    }

    #[test]
    fn gpu_counts_are_whole_and_device_requirements_imply_one() {
        let err = requirements(&props(&[("gpu-count", "0.5")])).expect_err("a fraction");
        assert!(err.contains("not a whole number"), "{err}");
        assert_eq!(count(&needs(&[("gpu-model", "t4")])), 1);
        assert_eq!(count(&needs(&[("gpu-model", "t4"), ("gpu-count", "3")])), 3);
        assert_eq!(count(&needs(&[])), 0);
    }

    #[test]
    fn agents_that_list_no_devices_count_by_their_total() {
        let old = fleet::Gpu {
            model: "Tesla T4".to_owned(),
            memory_bytes: 15 << 30,
            compute_capability: "7.5".to_owned(),
            ..Default::default()
        };
        let listed = devices(&[old.clone(), old]);
        // An agent from before device indices: positions stand in.
        assert_eq!((listed[0].index, listed[1].index), (0, 1));
        assert_eq!(listed[0].model, "t4");
        assert!(could_hold(&[], &needs(&[("gpu-count", "1")])));
        assert!(!could_hold(&[], &needs(&[("gpu-model", "t4")])));
    }
}
