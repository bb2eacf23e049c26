//! NVIDIA GPUs on this host, each as the scheduler assigns it: driver
//! index, UUID, model (and its normalised name), memory, compute
//! capability, driver and CUDA version, MIG mode. Read through NVML when
//! its library loads, else from `nvidia-smi`; none when neither works (no
//! driver, no GPU).

use std::process::Command;

use outpost_proto::fleet;
use outpost_proto::gpu::normalize_model;

/// What `nvidia-smi` is asked, in this order.
const QUERY: &str = "index,uuid,name,memory.total,compute_cap,driver_version,mig.mode.current";

pub fn gpus() -> Vec<fleet::Gpu> {
    let gpus = match from_nvml() {
        Ok(gpus) => gpus,
        Err(why) => {
            tracing::debug!(%why, "NVML unavailable; asking nvidia-smi");
            from_nvidia_smi()
        }
    };
    for g in &gpus {
        tracing::info!(
            index = g.index,
            uuid = %g.uuid,
            model = %g.model,
            gpu_model = %g.normalized_model,
            memory = %outpost_proto::units::ByteSize(g.memory_bytes),
            compute_capability = %g.compute_capability,
            driver = %g.driver,
            cuda = %g.cuda_version,
            mig = %g.mig_mode,
            "GPU found"
        );
    }
    gpus
}

fn from_nvml() -> Result<Vec<fleet::Gpu>, nvml_wrapper::error::NvmlError> {
    let nvml = nvml_wrapper::Nvml::init()?;
    let driver = nvml.sys_driver_version().unwrap_or_default();
    let cuda = nvml
        .sys_cuda_driver_version()
        .map(|v| {
            format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(v),
                nvml_wrapper::cuda_driver_version_minor(v)
            )
        })
        .unwrap_or_default();
    let mut gpus = Vec::new();
    for i in 0..nvml.device_count()? {
        let device = nvml.device_by_index(i)?;
        let model = device.name()?;
        gpus.push(fleet::Gpu {
            normalized_model: normalize_model(&model),
            model,
            memory_bytes: device.memory_info().map(|m| m.total).unwrap_or(0),
            compute_capability: device
                .cuda_compute_capability()
                .map(|c| format!("{}.{}", c.major, c.minor))
                .unwrap_or_default(),
            driver: driver.clone(),
            index: device.index().unwrap_or(i),
            uuid: device.uuid().unwrap_or_default(),
            cuda_version: cuda.clone(),
            // Devices without MIG answer NotSupported: no mode.
            mig_mode: device
                .mig_mode()
                .map(|m| {
                    mig_mode(if m.current == 1 {
                        "Enabled"
                    } else {
                        "Disabled"
                    })
                })
                .unwrap_or_default(),
        });
    }
    Ok(gpus)
}

fn from_nvidia_smi() -> Vec<fleet::Gpu> {
    let Some(csv) = run_nvidia_smi(&[
        &format!("--query-gpu={QUERY}"),
        "--format=csv,noheader,nounits",
    ]) else {
        return Vec::new();
    };
    // The CUDA version is in the summary's header only.
    let cuda = run_nvidia_smi(&[])
        .and_then(|summary| cuda_version(&summary))
        .unwrap_or_default();
    parse_csv(&csv, &cuda)
}

fn run_nvidia_smi(args: &[&str]) -> Option<String> {
    let out = Command::new("nvidia-smi").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads `nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits`:
/// one device a line, fields in [`QUERY`]'s order. Lines that do not
/// parse are skipped.
fn parse_csv(text: &str, cuda: &str) -> Vec<fleet::Gpu> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, uuid, name, memory_mib, compute, driver, mig] = fields[..] else {
                return None;
            };
            Some(fleet::Gpu {
                model: name.to_owned(),
                normalized_model: normalize_model(name),
                memory_bytes: memory_mib.parse::<u64>().map_or(0, |m| m << 20),
                compute_capability: known(compute).to_owned(),
                driver: driver.to_owned(),
                index: index.parse().ok()?,
                uuid: known(uuid).to_owned(),
                cuda_version: cuda.to_owned(),
                mig_mode: mig_mode(mig),
            })
        })
        .collect()
}

/// `nvidia-smi` writes `[N/A]` (or `N/A`) where a device has no value.
fn known(field: &str) -> &str {
    if field.trim_matches(|c| c == '[' || c == ']') == "N/A" {
        ""
    } else {
        field
    }
}

/// `enabled`, `disabled`, or empty where the device has no MIG.
fn mig_mode(field: &str) -> String {
    known(field).to_ascii_lowercase()
}

/// The `CUDA Version: 12.4` in `nvidia-smi`'s summary header.
fn cuda_version(summary: &str) -> Option<String> {
    let rest = summary.split("CUDA Version:").nth(1)?;
    let version: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (!version.is_empty()).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nvidia-smi --query-gpu=index,uuid,name,memory.total,compute_cap,
    /// driver_version,mig.mode.current --format=csv,noheader,nounits` on a
    /// host with an H100 and an A100 in MIG mode, and a T4 (no MIG).
    const CSV: &str = "\
0, GPU-5a9a6a1e-8f5c-2a3d-0c39-2d2f1e7f7d4b, NVIDIA H100 80GB HBM3, 81559, 9.0, 550.54.15, Disabled
1, GPU-0d3c4b5e-1f2a-4b6c-8d9e-0a1b2c3d4e5f, NVIDIA A100-SXM4-40GB, 40960, 8.0, 550.54.15, Enabled
2, GPU-11111111-2222-3333-4444-555555555555, Tesla T4, 15360, 7.5, 550.54.15, [N/A]

";

    const SUMMARY: &str = "\
Mon Dec  7 10:00:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
";

    #[test]
    fn nvidia_smi_csv_is_read_per_device() {
        let gpus = parse_csv(CSV, "12.4");
        assert_eq!(gpus.len(), 3);
        let h100 = &gpus[0];
        assert_eq!(h100.index, 0);
        assert_eq!(h100.uuid, "GPU-5a9a6a1e-8f5c-2a3d-0c39-2d2f1e7f7d4b");
        assert_eq!(h100.model, "NVIDIA H100 80GB HBM3");
        assert_eq!(h100.normalized_model, "h100");
        assert_eq!(h100.memory_bytes, 81559 << 20);
        assert_eq!(h100.compute_capability, "9.0");
        assert_eq!(h100.driver, "550.54.15");
        assert_eq!(h100.cuda_version, "12.4");
        assert_eq!(h100.mig_mode, "disabled");
        assert_eq!(gpus[1].normalized_model, "a100");
        assert_eq!(gpus[1].mig_mode, "enabled");
        assert_eq!((gpus[2].index, gpus[2].mig_mode.as_str()), (2, ""));
        assert_eq!(gpus[2].normalized_model, "t4");
    }

    #[test]
    fn what_is_not_a_device_line_is_skipped() {
        // The format of drivers before these fields, and noise.
        assert!(parse_csv("NVIDIA H100 80GB HBM3, 81559, 9.0, 550.54.15", "").is_empty());
        assert!(parse_csv("garbage\n", "").is_empty());
        let unknown = parse_csv("x, [N/A], NVIDIA L4, 23034, 8.9, 550.54.15, [N/A]", "");
        assert!(unknown.is_empty(), "an index that is no number");
        let no_uuid = parse_csv("0, [N/A], NVIDIA L4, 23034, [N/A], 550.54.15, N/A", "");
        assert_eq!(no_uuid[0].uuid, "");
        assert_eq!(no_uuid[0].compute_capability, "");
    }

    #[test]
    fn the_cuda_version_is_read_from_the_summary() {
        assert_eq!(cuda_version(SUMMARY).as_deref(), Some("12.4"));
        assert_eq!(
            cuda_version("| NVIDIA-SMI 580.65.06  Driver Version: 580.65.06  CUDA Version: 13.0 |")
                .as_deref(),
            Some("13.0")
        );
        assert_eq!(cuda_version("no header"), None);
    }
}
