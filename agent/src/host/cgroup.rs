//! The limits of the cgroup this process runs in: what a container's
//! `--memory` / `--cpus` or a Kubernetes pod's `resources.limits` leave
//! it. cgroup v2 (`memory.max`, `cpu.max`) and v1
//! (`memory.limit_in_bytes`, `cpu.cfs_quota_us` / `cpu.cfs_period_us`),
//! read for the process's own cgroup (`/proc/self/cgroup`) and each of its
//! ancestors, since a parent's limit bounds its children too.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where the cgroup hierarchies are mounted.
const ROOT: &str = "/sys/fs/cgroup";

/// A v1 memory limit at or above this means "no limit" (the kernel's
/// default is `i64::MAX` rounded down to a page).
const V1_UNLIMITED: u64 = 1 << 62;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// The CPU quota, in whole CPUs rounded up; `None` without a quota.
    pub cpus: Option<u32>,
    /// The memory limit; `None` without one.
    pub memory_bytes: Option<u64>,
}

/// This process's limits, read once (and logged when there are any).
pub fn limits() -> Limits {
    static LIMITS: OnceLock<Limits> = OnceLock::new();
    *LIMITS.get_or_init(|| {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let limits = limits_under(Path::new(ROOT), &own);
        if limits != Limits::default() {
            tracing::info!(
                cpus = ?limits.cpus,
                memory_bytes = ?limits.memory_bytes,
                "cgroup limits apply"
            );
        }
        limits
    })
}

/// The limits found under `root` for the cgroups `proc_self_cgroup` (the
/// text of `/proc/self/cgroup`) names.
pub fn limits_under(root: &Path, proc_self_cgroup: &str) -> Limits {
    let mut limits = Limits::default();
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            // The unified (v2) hierarchy.
            for dir in dirs(root, path) {
                limits.memory_bytes = min(limits.memory_bytes, v2_memory(&dir));
                limits.cpus = min(limits.cpus, v2_cpus(&dir));
            }
            continue;
        }
        let names: Vec<&str> = controllers.split(',').collect();
        let mount = root.join(controllers);
        if names.contains(&"memory") {
            for dir in dirs(&mount, path) {
                limits.memory_bytes = min(limits.memory_bytes, v1_memory(&dir));
            }
        }
        if names.contains(&"cpu") {
            for dir in dirs(&mount, path) {
                limits.cpus = min(limits.cpus, v1_cpus(&dir));
            }
        }
    }
    limits
}

/// The cgroup's directory under `mount` and each ancestor up to `mount`,
/// those that exist. In a container without a cgroup namespace the path
/// names the cgroup as the host sees it while the container has its own
/// cgroup mounted at `mount`: the walk up reaches it.
fn dirs(mount: &Path, path: &str) -> Vec<PathBuf> {
    let mut dir = mount.join(path.trim_start_matches('/'));
    let mut found = Vec::new();
    loop {
        if dir.is_dir() {
            found.push(dir.clone());
        }
        if dir == mount || !dir.pop() || !dir.starts_with(mount) {
            break;
        }
    }
    found
}

fn min<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Whole CPUs for a quota per period, rounded up, at least one.
fn quota_cpus(quota: u64, period: u64) -> Option<u32> {
    if period == 0 {
        return None;
    }
    u32::try_from(quota.div_ceil(period).max(1)).ok()
}

/// `memory.max`: a number, or `max`.
fn v2_memory(dir: &Path) -> Option<u64> {
    read(dir, "memory.max")?.parse().ok()
}

/// `cpu.max`: `QUOTA PERIOD`, QUOTA a number or `max`.
fn v2_cpus(dir: &Path) -> Option<u32> {
    let text = read(dir, "cpu.max")?;
    let mut fields = text.split_whitespace();
    let quota = fields.next()?.parse().ok()?;
    let period = fields.next().map_or(Some(100_000), |p| p.parse().ok())?;
    quota_cpus(quota, period)
}

fn v1_memory(dir: &Path) -> Option<u64> {
    let limit: u64 = read(dir, "memory.limit_in_bytes")?.parse().ok()?;
    (limit < V1_UNLIMITED).then_some(limit)
}

/// `cpu.cfs_quota_us` is -1 without a quota.
fn v1_cpus(dir: &Path) -> Option<u32> {
    let quota: i64 = read(dir, "cpu.cfs_quota_us")?.parse().ok()?;
    let period: u64 = read(dir, "cpu.cfs_period_us")?.parse().ok()?;
    quota_cpus(u64::try_from(quota).ok()?, period)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, file: &str, text: &str) {
        let path = root.join(file);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    #[test]
    fn v2_limits_of_the_cgroup_and_its_ancestors() {
        let root = tempfile::tempdir().expect("tempdir");
        let root = root.path();
        write(root, "kubepods/memory.max", "4294967296\n");
        write(root, "kubepods/cpu.max", "max 100000\n");
        write(root, "kubepods/pod1/memory.max", "max\n");
        write(root, "kubepods/pod1/cpu.max", "150000 100000\n");
        let limits = limits_under(root, "0::/kubepods/pod1\n");
        assert_eq!(
            limits,
            Limits {
                cpus: Some(2),
                memory_bytes: Some(4 << 30),
            }
        );
    }

    #[test]
    fn v2_without_limits_has_none() {
        let root = tempfile::tempdir().expect("tempdir");
        let root = root.path();
        write(root, "user.slice/memory.max", "max\n");
        write(root, "user.slice/cpu.max", "max 100000\n");
        assert_eq!(limits_under(root, "0::/user.slice\n"), Limits::default());
        assert_eq!(limits_under(root, "0::/\n"), Limits::default());
    }

    #[test]
    fn v1_limits_in_a_container_without_a_cgroup_namespace() {
        // The container's own cgroups are mounted at the hierarchies' roots
        // while /proc/self/cgroup names them by their host paths.
        let root = tempfile::tempdir().expect("tempdir");
        let root = root.path();
        write(root, "memory/memory.limit_in_bytes", "2147483648\n");
        write(root, "cpu,cpuacct/cpu.cfs_quota_us", "100000\n");
        write(root, "cpu,cpuacct/cpu.cfs_period_us", "100000\n");
        let own = "12:pids:/docker/0123abcd\n\
                   9:memory:/docker/0123abcd\n\
                   4:cpu,cpuacct:/docker/0123abcd\n\
                   1:name=systemd:/docker/0123abcd\n\
                   0::/system.slice/containerd.service\n";
        assert_eq!(
            limits_under(root, own),
            Limits {
                cpus: Some(1),
                memory_bytes: Some(2 << 30),
            }
        );
    }

    #[test]
    fn v1_without_limits_has_none() {
        let root = tempfile::tempdir().expect("tempdir");
        let root = root.path();
        write(
            root,
            "memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        write(root, "cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
        write(root, "cpu,cpuacct/cpu.cfs_period_us", "100000\n");
        let own = "9:memory:/\n4:cpu,cpuacct:/\n";
        assert_eq!(limits_under(root, own), Limits::default());
    }

    #[test]
    fn fractional_quotas_round_up_and_garbage_is_ignored() {
        assert_eq!(quota_cpus(50_000, 100_000), Some(1));
        assert_eq!(quota_cpus(250_000, 100_000), Some(3));
        assert_eq!(quota_cpus(1, 0), None);
        let root = tempfile::tempdir().expect("tempdir");
        let root = root.path();
        write(root, "memory.max", "lots\n");
        write(root, "cpu.max", "\n");
        assert_eq!(limits_under(root, "0::/\nnot a line\n"), Limits::default());
    }
}
