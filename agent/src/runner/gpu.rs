//! What an action that was given GPUs sees of them, per isolation: the
//! device nodes to bind, the driver's libraries to mount read-only, and
//! the environment. Decided here from a described host ([`Host`]) and the
//! devices the lease names, so the decision is the same on every machine
//! and tested without one; [`Host::discover`] describes this one.
//!
//! - `linux-sandbox` binds exactly the assigned `/dev/nvidiaN` and the
//!   control nodes (`nvidiactl`, `nvidia-uvm`, `nvidia-uvm-tools`,
//!   `nvidia-modeset`, where present), mounts the driver's user-space
//!   libraries read-only, and names the devices in `CUDA_VISIBLE_DEVICES`
//!   by UUID (CUDA numbers the visible devices from 0, so host indices
//!   would name the wrong ones). An action given no GPU gets no
//!   `/dev/nvidia*` at all.
//! - `docker` asks the engine for the assigned devices (a device request
//!   for the `nvidia` driver by UUID); `NVIDIA_VISIBLE_DEVICES` says the
//!   same to the NVIDIA container runtime.
//! - `none` sets the variables only: every GPU stays reachable, nothing
//!   keeps an action to its own.

use std::path::{Path, PathBuf};

use outpost_proto::fleet::GpuDevice;

/// Device nodes every CUDA process needs besides its GPUs': the first is
/// required, the others are bound where the driver made them.
const CONTROL_NODES: &[&str] = &[
    "nvidiactl",
    "nvidia-uvm",
    "nvidia-uvm-tools",
    "nvidia-modeset",
];

/// The driver's user-space libraries, by file name prefix (what the NVIDIA
/// container toolkit mounts for the `compute` and `utility` capabilities).
const LIBRARY_PREFIXES: &[&str] = &[
    "libcuda.so",
    "libcudadebugger.so",
    "libnvidia-ml.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-nvvm.so",
    "libnvidia-gpucomp.so",
    "libnvidia-cfg.so",
    "libnvidia-opencl.so",
    "libnvidia-allocator.so",
];

/// Programs of the driver an action may call (`nvidia-smi -L`).
const PROGRAMS: &[&str] = &["nvidia-smi"];

/// This host's GPU plumbing, as exposure needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    /// The `/dev` entries whose names start with `nvidia`.
    pub nodes: Vec<String>,
    /// The driver's libraries and programs, by absolute path.
    pub files: Vec<PathBuf>,
}

/// What one action gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exposure {
    /// Device nodes to bind at the same path.
    pub devices: Vec<PathBuf>,
    /// Files to bind read-only at the same path.
    pub read_only: Vec<PathBuf>,
    /// `NAME=VALUE`.
    pub env: Vec<String>,
    /// The devices as CUDA and the engine name them ([`visible_devices`]).
    pub visible: Vec<String>,
}

/// Why the assigned GPUs cannot be given; the agent's fault (the
/// coordinator assigned what the agent advertised).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "GPU {index} is assigned to this action but /dev/nvidia{index} does not exist \
         (is the NVIDIA driver loaded? `nvidia-smi -L` lists the GPUs)"
    )]
    MissingDevice { index: u32 },
    #[error(
        "GPUs are assigned to this action but /dev/nvidiactl does not exist \
         (is the NVIDIA driver loaded?)"
    )]
    MissingControl,
}

impl Host {
    /// Describes this host: `/dev/nvidia*` ([`Host::nodes_now`]) and the
    /// driver's files ([`Host::driver_files`]).
    pub fn discover() -> Host {
        Host {
            nodes: Host::nodes_now(),
            files: Host::driver_files(),
        }
    }

    /// The `/dev` entries named `nvidia*` now: the driver makes some on
    /// first use (`nvidia-uvm` when a CUDA program first runs).
    pub fn nodes_now() -> Vec<String> {
        std::fs::read_dir("/dev")
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with("nvidia"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The driver's libraries as the dynamic linker finds them (`ldconfig
    /// -p`), those beside the NVML library this process loaded, and the
    /// driver's programs on `PATH`.
    pub fn driver_files() -> Vec<PathBuf> {
        let linker_cache = std::process::Command::new("ldconfig")
            .arg("-p")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut files = libraries_in_linker_cache(&linker_cache, ldconfig_arch());
        if let Some(dir) = loaded_nvml_dir() {
            files.extend(libraries_in_dir(&dir));
        }
        files.extend(programs_on_path());
        files.sort();
        files.dedup();
        files
    }

    /// What an action given `assigned` gets; nothing when it was given
    /// none.
    pub fn exposure(&self, assigned: &[GpuDevice]) -> Result<Exposure, Error> {
        if assigned.is_empty() {
            return Ok(Exposure::default());
        }
        let has = |name: &str| self.nodes.iter().any(|n| n == name);
        if !has(CONTROL_NODES[0]) {
            return Err(Error::MissingControl);
        }
        let mut devices = Vec::new();
        for gpu in assigned {
            let name = format!("nvidia{}", gpu.index);
            if !has(&name) {
                return Err(Error::MissingDevice { index: gpu.index });
            }
            devices.push(Path::new("/dev").join(name));
        }
        devices.extend(
            CONTROL_NODES
                .iter()
                .filter(|n| has(n))
                .map(|n| Path::new("/dev").join(n)),
        );
        let visible = visible_devices(assigned);
        let list = visible.join(",");
        Ok(Exposure {
            devices,
            read_only: self.files.clone(),
            env: vec![
                format!("CUDA_VISIBLE_DEVICES={list}"),
                format!("NVIDIA_VISIBLE_DEVICES={list}"),
            ],
            visible,
        })
    }
}

/// What an action given `assigned` gets on this host: its device nodes as
/// they are now, the driver's files as found for the first action given a
/// GPU. A device the host lacks is the agent's fault: the action is
/// retried elsewhere.
pub fn for_lease(assigned: &[GpuDevice]) -> Result<Exposure, crate::error::Error> {
    static FILES: std::sync::OnceLock<Vec<PathBuf>> = std::sync::OnceLock::new();
    if assigned.is_empty() {
        return Ok(Exposure::default());
    }
    let host = Host {
        nodes: Host::nodes_now(),
        files: FILES.get_or_init(Host::driver_files).clone(),
    };
    host.exposure(assigned)
        .map_err(|e| crate::error::Error::Retryable(e.to_string()))
}

/// The devices as CUDA and the NVIDIA container runtime name them: UUIDs
/// (indices for devices the agent knows no UUID of).
pub fn visible_devices(assigned: &[GpuDevice]) -> Vec<String> {
    assigned
        .iter()
        .map(|g| {
            if g.uuid.is_empty() {
                g.index.to_string()
            } else {
                g.uuid.clone()
            }
        })
        .collect()
}

fn is_driver_library(file_name: &str) -> bool {
    LIBRARY_PREFIXES.iter().any(|p| file_name.starts_with(p))
}

/// The driver's libraries in `ldconfig -p` output, for this machine's ABI
/// (`libc6,x86-64`: a 32-bit copy is listed as plain `libc6`).
fn libraries_in_linker_cache(text: &str, arch: Option<&str>) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let (left, path) = line.split_once("=>")?;
            let name = left.split_whitespace().next()?;
            let abi = left.split_once('(')?.1.split_once(')')?.0;
            let this_abi = match arch {
                Some(arch) => abi.split(',').any(|a| a.trim() == arch),
                None => true,
            };
            (this_abi && is_driver_library(name)).then(|| PathBuf::from(path.trim()))
        })
        .collect()
}

/// How `ldconfig -p` tags libraries of this machine's ABI.
fn ldconfig_arch() -> Option<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => Some("x86-64"),
        "aarch64" => Some("AArch64"),
        _ => None,
    }
}

/// The directory of the NVML library this process loaded (detection loads
/// it), for drivers installed outside the linker's cache.
fn loaded_nvml_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            Path::new(p)
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvidia-ml.so"))
        })
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
}

fn libraries_in_dir(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_str().is_some_and(is_driver_library))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn programs_on_path() -> Vec<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    PROGRAMS
        .iter()
        .filter_map(|p| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(p))
                .find(|candidate| candidate.is_file())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ldconfig -p` on a host with the 550 driver and its 32-bit copy.
    const LDCONFIG: &str = "\
1234 libs found in cache `/etc/ld.so.cache'
\tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1
\tlibnvidia-ml.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ml.so.1
\tlibnvidia-ml.so.1 (libc6) => /lib/i386-linux-gnu/libnvidia-ml.so.1
\tlibnvidia-ptxjitcompiler.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.1
\tlibnvidia-egl-wayland.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-egl-wayland.so.1
\tlibcuda.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libcuda.so.1
\tlibcuda.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libcuda.so
\tlibcudart.so.12 (libc6,x86-64) => /usr/local/cuda/lib64/libcudart.so.12
";

    fn two_gpu_host() -> Host {
        Host {
            nodes: [
                "nvidia0",
                "nvidia1",
                "nvidiactl",
                "nvidia-uvm",
                "nvidia-uvm-tools",
                "nvidia-modeset",
                "nvidia-caps",
            ]
            .map(str::to_owned)
            .to_vec(),
            files: libraries_in_linker_cache(LDCONFIG, Some("x86-64")),
        }
    }

    fn gpu(index: u32) -> GpuDevice {
        GpuDevice {
            index,
            uuid: format!("GPU-{index}a9a6a1e-8f5c-2a3d-0c39-2d2f1e7f7d4b"),
        }
    }

    #[test]
    fn the_assigned_devices_nodes_and_only_those_are_exposed() {
        let host = two_gpu_host();
        let second = host.exposure(&[gpu(1)]).expect("exposed");
        let devices: Vec<&str> = second
            .devices
            .iter()
            .map(|p| p.to_str().expect("utf-8"))
            .collect();
        assert_eq!(
            devices,
            [
                "/dev/nvidia1",
                "/dev/nvidiactl",
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools",
                "/dev/nvidia-modeset"
            ]
        );
        assert!(!devices.contains(&"/dev/nvidia0"), "the other GPU");
        assert_eq!(
            second.env,
            [
                "CUDA_VISIBLE_DEVICES=GPU-1a9a6a1e-8f5c-2a3d-0c39-2d2f1e7f7d4b",
                "NVIDIA_VISIBLE_DEVICES=GPU-1a9a6a1e-8f5c-2a3d-0c39-2d2f1e7f7d4b"
            ]
        );
        assert_eq!(second.visible, [gpu(1).uuid]);
        let first = host.exposure(&[gpu(0)]).expect("exposed");
        assert!(first.devices.contains(&PathBuf::from("/dev/nvidia0")));
        assert!(!first.devices.contains(&PathBuf::from("/dev/nvidia1")));
        let both = host.exposure(&[gpu(0), gpu(1)]).expect("exposed");
        assert_eq!(
            &both.devices[..2],
            [PathBuf::from("/dev/nvidia0"), PathBuf::from("/dev/nvidia1")]
        );
        assert!(both.env[0].contains(&format!("{},{}", gpu(0).uuid, gpu(1).uuid)));
    }

    #[test]
    fn an_action_without_gpus_sees_none() {
        assert_eq!(two_gpu_host().exposure(&[]), Ok(Exposure::default()));
    }

    #[test]
    fn the_drivers_libraries_come_from_the_linker_cache_read_only() {
        let exposure = two_gpu_host().exposure(&[gpu(0)]).expect("exposed");
        let files: Vec<&str> = exposure
            .read_only
            .iter()
            .map(|p| p.to_str().expect("utf-8"))
            .collect();
        assert_eq!(
            files,
            [
                "/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
                "/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.1",
                "/lib/x86_64-linux-gnu/libcuda.so.1",
                "/lib/x86_64-linux-gnu/libcuda.so",
            ]
        );
        // Another ABI's copy, and the toolkit's own runtime, are not the
        // driver's to give.
        assert!(
            !files
                .iter()
                .any(|f| f.contains("i386") || f.contains("cudart"))
        );
    }

    #[test]
    fn a_missing_node_is_an_error_naming_it() {
        let mut host = two_gpu_host();
        assert_eq!(
            host.exposure(&[gpu(2)]),
            Err(Error::MissingDevice { index: 2 })
        );
        host.nodes.retain(|n| n != "nvidiactl");
        let err = host.exposure(&[gpu(0)]).expect_err("no control node");
        assert!(err.to_string().contains("/dev/nvidiactl"), "{err}");
        // Optional control nodes are bound only where present.
        let bare = Host {
            nodes: vec!["nvidia0".to_owned(), "nvidiactl".to_owned()],
            files: Vec::new(),
        };
        assert_eq!(
            bare.exposure(&[gpu(0)]).expect("exposed").devices,
            [
                PathBuf::from("/dev/nvidia0"),
                PathBuf::from("/dev/nvidiactl")
            ]
        );
    }

    #[test]
    fn devices_without_a_uuid_are_named_by_index() {
        let old = GpuDevice {
            index: 3,
            uuid: String::new(),
        };
        assert_eq!(
            visible_devices(&[gpu(0), old]),
            [gpu(0).uuid, "3".to_owned()]
        );
    }

    #[test]
    fn this_host_is_described_without_failing() {
        // No GPU here: whatever is found, an action given none sees none.
        let host = Host::discover();
        assert_eq!(host.exposure(&[]), Ok(Exposure::default()));
    }
}
