//! What this host offers: OS family, architecture (as `Arch` and `ISA`),
//! CPUs, memory, disk, OS version, compiler versions, isolation backends,
//! NVIDIA GPUs, and the operator's labels and pool.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_proto::fleet;
use outpost_proto::reapi::platform::Property;

use crate::config::Config;

#[cfg(os_linux)]
mod cgroup;
mod gpu;

pub use gpu::gpus;
pub mod mac;
pub mod xcode;

/// Compilers whose versions are advertised when found on PATH.
const COMPILERS: &[(&str, &[&str])] = &[
    ("gcc", &["--version"]),
    ("clang", &["--version"]),
    ("rustc", &["--version"]),
    ("go", &["version"]),
    ("javac", &["-version"]),
    ("swiftc", &["--version"]),
];

pub fn os_family() -> &'static str {
    match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    }
}

/// (`Arch`, `ISA`) in the spellings users already have.
pub fn arch() -> (&'static str, &'static str) {
    match std::env::consts::ARCH {
        "x86_64" => ("amd64", "x86-64"),
        "aarch64" => ("arm64", "aarch64"),
        other => (other, other),
    }
}

/// CPUs this process may use: the online CPUs (and its affinity mask),
/// at most the CPU quota of its cgroup rounded up (a container started
/// with `--cpus 1`, a pod's `resources.limits.cpu`).
pub fn cpus() -> u32 {
    let online =
        std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1));
    #[cfg(os_linux)]
    if let Some(quota) = cgroup::limits().cpus {
        return online.min(quota).max(1);
    }
    online
}

/// Memory this process may use: the physical memory, at most the memory
/// limit of its cgroup (a container's `--memory`, a pod's
/// `resources.limits.memory`).
pub fn memory_bytes() -> u64 {
    #[cfg(os_linux)]
    {
        let physical = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024);
        match cgroup::limits().memory_bytes {
            Some(limit) if physical == 0 || limit < physical => limit,
            _ => physical,
        }
    }
    #[cfg(not(os_linux))]
    {
        first_line("sysctl", &["-n", "hw.memsize"])
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

// The statvfs field types differ between platforms.
#[allow(clippy::unnecessary_cast)]
fn disk_bytes(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available() as u64 * s.fragment_size() as u64)
        .unwrap_or(0)
}

fn os_version() -> String {
    #[cfg(os_linux)]
    {
        let pretty = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                    .map(|v| v.trim_matches('"').to_owned())
            });
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_owned())
            .unwrap_or_default();
        match pretty {
            Some(p) => format!("{p} (kernel {kernel})"),
            None => format!("Linux {kernel}"),
        }
    }
    #[cfg(not(os_linux))]
    {
        first_line("sw_vers", &["-productVersion"])
            .map_or_else(|| "macOS".to_owned(), |v| format!("macOS {v}"))
    }
}

/// The first line a tool prints (stdout, else stderr), if it runs within 3s.
fn first_line(program: &str, args: &[&str]) -> Option<String> {
    output(program, args)?
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
}

/// What a tool prints (stdout, else stderr), if it succeeds within 3s;
/// its output is read as it comes, so a long one cannot stall it.
pub(crate) fn output(program: &str, args: &[&str]) -> Option<String> {
    let child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).ok()?);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(3)) else {
        // Not reaped yet (the thread still waits on it), so the pid is its.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        return None;
    };
    let out = out.ok()?;
    if !out.status.success() {
        return None;
    }
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    Some(String::from_utf8_lossy(&text).into_owned())
}

/// The version number in a `--version` line (the first token that starts
/// with a digit and contains a dot).
fn version_in(line: &str) -> Option<String> {
    line.split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .map(|t| t.trim_start_matches("go").trim_start_matches('v'))
        .find(|t| t.starts_with(|c: char| c.is_ascii_digit()) && t.contains('.'))
        .map(str::to_owned)
}

/// The upstream part of a distribution's version (`12.2.0` of Debian's
/// `12.2.0-14+deb12u1`), when the two differ.
fn upstream_version(version: &str) -> Option<&str> {
    let end = version
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(version.len());
    let upstream = version[..end].trim_end_matches('.');
    (upstream != version && upstream.contains('.')).then_some(upstream)
}

/// The values a `NAME-version` property is offered with: the full version
/// and, where a distribution added its own suffix, the upstream one too.
fn version_values(version: &str) -> Vec<&str> {
    std::iter::once(version)
        .chain(upstream_version(version))
        .collect()
}

fn compilers() -> HashMap<String, String> {
    COMPILERS
        .iter()
        .filter_map(|(name, args)| {
            let line = first_line(name, args)?;
            Some(((*name).to_owned(), version_in(&line)?))
        })
        .collect()
}

fn prop(name: &str, value: &str) -> Property {
    Property {
        name: name.to_owned(),
        value: value.to_owned(),
    }
}

/// Everything the agent advertises at registration.
pub fn capabilities(
    config: &Config,
    slots: u32,
    work_dir: &Path,
    runners: &crate::runner::Offers,
) -> fleet::Capabilities {
    let (arch, isa) = arch();
    let gpus = gpus();
    let toolchains = compilers();
    let mut properties = vec![
        prop("OSFamily", os_family()),
        prop("Arch", arch),
        prop("ISA", isa),
    ];
    for kind in &runners.kinds {
        properties.push(prop("workload-isolation-type", kind));
    }
    for value in &runners.networks {
        properties.push(prop("dockerNetwork", value));
    }
    for value in &runners.root_filesystems {
        properties.push(prop(outpost_proto::platform::ROOT_FILESYSTEM, value));
    }
    if let Some(pool) = &config.pool {
        properties.push(prop("Pool", pool));
    }
    for label in &config.labels {
        if let Some((k, v)) = label.split_once('=') {
            properties.push(prop(k.trim(), v.trim()));
        }
    }
    // The tools a Mac has are missing elsewhere, and then say nothing;
    // Xcodes are looked for wherever `xcode_dirs` says.
    properties.extend(mac::Facts::read().properties());
    for (name, version) in &toolchains {
        for value in version_values(version) {
            properties.push(prop(&format!("{name}-version"), value));
        }
    }
    // For coordinators that match gpu-model against properties; newer
    // ones match each device.
    for gpu in &gpus {
        properties.push(prop("gpu-model", &gpu.model));
        properties.push(prop("gpu-model", &gpu.normalized_model));
    }
    let cpus = cpus();
    let memory = memory_bytes();
    let disk = disk_bytes(work_dir);
    let resources = HashMap::from([
        ("cpu".to_owned(), f64::from(cpus)),
        ("memory".to_owned(), memory as f64),
        ("disk".to_owned(), disk as f64),
        ("gpu-count".to_owned(), gpus.len() as f64),
    ]);
    fleet::Capabilities {
        properties,
        resources,
        slots,
        cpus,
        memory_bytes: memory,
        disk_bytes: disk,
        os_version: os_version(),
        gpus,
        isolation: runners.kinds.clone(),
        toolchains,
        isolation_detail: runners.detail.clone(),
        max_input_bytes: config.cache_size.0,
        features: outpost_proto::features::ALL
            .iter()
            .map(|f| (*f).to_owned())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_found_in_tool_output() {
        assert_eq!(
            version_in("gcc (Debian 12.2.0-14) 12.2.0").as_deref(),
            Some("12.2.0-14")
        );
        assert_eq!(
            version_in("rustc 1.95.0 (59807616e 2026-04-14)").as_deref(),
            Some("1.95.0")
        );
        assert_eq!(
            version_in("go version go1.22.1 linux/amd64").as_deref(),
            Some("1.22.1")
        );
        assert_eq!(version_in("no version here"), None);
    }

    #[test]
    fn distribution_versions_are_offered_with_their_upstream_version() {
        let line = "gcc (Debian 12.2.0-14+deb12u1) 12.2.0";
        let full = version_in(line).expect("a version");
        assert_eq!(full, "12.2.0-14+deb12u1");
        assert_eq!(version_values(&full), ["12.2.0-14+deb12u1", "12.2.0"]);
        assert_eq!(
            version_values("14.0.0-1ubuntu1.1"),
            ["14.0.0-1ubuntu1.1", "14.0.0"]
        );
        assert_eq!(version_values("1.95.0"), ["1.95.0"]);
        assert_eq!(version_values("21.0.2+13"), ["21.0.2+13", "21.0.2"]);
        assert_eq!(version_values("12-ea"), ["12-ea"]);
    }

    #[test]
    fn this_host_is_described() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config::default();
        let offers = crate::runner::Offers {
            kinds: vec!["none".to_owned()],
            networks: vec!["off", "bridge"],
            root_filesystems: vec!["host"],
            detail: "none".to_owned(),
        };
        let caps = capabilities(&config, 2, dir.path(), &offers);
        let has = |k: &str| caps.properties.iter().any(|p| p.name == k);
        assert!(has("OSFamily") && has("Arch") && has("ISA"));
        assert!(caps.cpus >= 1 && caps.memory_bytes > 0 && caps.disk_bytes > 0);
    }
}
