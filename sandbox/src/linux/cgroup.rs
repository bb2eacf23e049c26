//! Per-action resource limits, from the best source the host offers:
//!
//! - cgroup v2, where the agent's own cgroup is delegated to it and has the
//!   `memory`/`pids`/`cpu` controllers (systemd `Delegate=yes`): the agent
//!   moves itself into a leaf and makes one child cgroup per action;
//! - cgroup v1 `memory`, `pids` and `cpu` hierarchies it can write to
//!   (hybrid hosts, where the controllers live in v1);
//! - rlimits (`RLIMIT_AS`, `RLIMIT_NPROC`) for whatever neither covers.
//!
//! An OOM kill is reported as such from the `oom_kill` count in
//! `memory.events` (v2) or `memory.oom_control` (v1), against the count
//! when the action started.
//!
//! Action cgroups are reused: an action's cgroups, once empty, wait in a
//! pool for the next action instead of being removed. Making and removing
//! a v1 memory cgroup per action contends with the kernel's cleanup of the
//! previous one and put 10+ ms tails on sandboxed actions. Everything here
//! is plain file I/O.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::spec::Limits;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Controller {
    Memory,
    Pids,
    Cpu,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

#[derive(Clone, Debug)]
enum Tree {
    /// The directory action cgroups are made in, and its controllers.
    V2(PathBuf, Vec<Controller>),
    /// Per controller, the directory action cgroups are made in.
    V1(Vec<(Controller, PathBuf)>),
    None,
}

/// Hands out per-action cgroups; removes its own directories when dropped.
#[derive(Debug)]
pub struct Limiter {
    tree: Tree,
    /// Empty action cgroups, waiting for the next action.
    pool: Arc<Mutex<Vec<Idle>>>,
    /// Names new action cgroups.
    made: AtomicU64,
}

/// An empty action cgroup (one directory per v1 controller) and the limits
/// last written to it.
#[derive(Debug)]
struct Idle {
    dirs: Vec<PathBuf>,
    written: Limits,
}

/// One action's cgroups; back to the pool when dropped if empty, otherwise
/// killed and removed.
#[derive(Debug)]
pub struct Group {
    dirs: Vec<PathBuf>,
    memory_dir: Option<PathBuf>,
    v2: bool,
    /// The `oom_kill` count when the action started.
    oom_kills_before: u64,
    /// The limits its files hold (valid only once `create` succeeded).
    written: Limits,
    /// Whether it may go back to the pool when empty.
    reusable: bool,
    pool: Arc<Mutex<Vec<Idle>>>,
    /// What the cgroups could not cover, to apply as rlimits.
    pub rlimits: Limits,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
}

/// This process's cgroup paths: (controllers, path) per line.
fn own_cgroups() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.to_owned();
            let path = parts.next()?.to_owned();
            Some((controllers, path))
        })
        .collect()
}

/// Mount points of cgroup file systems: (fstype, super options, mount point).
fn cgroup_mounts() -> Vec<(String, String, PathBuf)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let _source = r.next()?;
            let options = r.next().unwrap_or("");
            fstype
                .starts_with("cgroup")
                .then(|| (fstype.to_owned(), options.to_owned(), mount_point.into()))
        })
        .collect()
}

/// Whether a directory can hold our cgroups: make and remove a probe.
fn writable(dir: &Path) -> bool {
    let probe = dir.join(format!("outpost-probe-{}", std::process::id()));
    std::fs::create_dir(&probe).is_ok() && std::fs::remove_dir(&probe).is_ok()
}

impl Limiter {
    /// Finds where this process may make cgroups; `name` (the agent's) keeps
    /// agents sharing a cgroup apart. Leftovers from an earlier run under
    /// `name` are removed.
    pub fn detect(name: &str) -> Limiter {
        let tree = detect_v2(name)
            .or_else(|| detect_v1(name))
            .unwrap_or(Tree::None);
        let limiter = Limiter {
            tree,
            pool: Arc::new(Mutex::new(Vec::new())),
            made: AtomicU64::new(0),
        };
        limiter.sweep();
        limiter
    }

    /// For logs and the fleet page: `cgroup v2 (memory, pids, cpu)`, or
    /// `rlimits only (memory not enforced)`.
    pub fn describe(&self) -> String {
        let (version, controllers): (&str, Vec<Controller>) = match &self.tree {
            Tree::V2(_, cs) => ("v2", cs.clone()),
            Tree::V1(dirs) => ("v1", dirs.iter().map(|(c, _)| *c).collect()),
            Tree::None => return "rlimits only (memory not enforced)".to_owned(),
        };
        let names: Vec<&str> = controllers.into_iter().map(Controller::name).collect();
        format!("cgroup {version} ({})", names.join(", "))
    }

    /// Whether action limits fall back to rlimits: memory is then bounded
    /// per process (RLIMIT_AS), which neither several processes together
    /// nor files in a tmpfs respect.
    pub fn rlimits_only(&self) -> bool {
        matches!(self.tree, Tree::None)
    }

    /// Advice when joining an action's cgroup may stall for an RCU grace
    /// period (10–20 ms on small VMs, in about one action of fifty): the
    /// kernel's cgroup migration lock is slow to take for writing unless a
    /// cgroup2 hierarchy is mounted with `favordynmods`.
    pub fn advice(&self) -> Option<String> {
        if matches!(self.tree, Tree::None) {
            return None;
        }
        let mounted = cgroup_mounts()
            .iter()
            .any(|(_, options, _)| options.split(',').any(|o| o == "favordynmods"));
        let booted = std::fs::read_to_string("/proc/cmdline").is_ok_and(|line| {
            line.split_whitespace().any(|w| {
                w.strip_prefix("cgroup_favordynmods=")
                    .is_some_and(|v| matches!(v, "1" | "y" | "Y" | "true" | "on" | "yes"))
            })
        });
        let favoured = mounted || booted;
        (!favoured).then(|| {
            "no cgroup2 hierarchy is mounted with favordynmods, so moving each sandboxed \
             action into its cgroup can stall it for an RCU grace period; remount one with \
             favordynmods (see docs/isolation.md) to avoid it"
                .to_owned()
        })
    }

    fn parents(&self) -> Vec<PathBuf> {
        match &self.tree {
            Tree::V2(dir, _) => vec![dir.clone()],
            Tree::V1(dirs) => dirs.iter().map(|(_, d)| d.clone()).collect(),
            Tree::None => Vec::new(),
        }
    }

    /// Removes action cgroups a killed agent left behind: its own, and the
    /// empty directories of other agents that were killed (`rmdir` fails on
    /// any that is in use, so live agents keep theirs).
    fn sweep(&self) {
        for parent in self.parents() {
            if let Ok(entries) = std::fs::read_dir(&parent) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        remove(&[e.path()], self.is_v2());
                    }
                }
            }
            let Some(siblings) = parent.parent().and_then(|p| std::fs::read_dir(p).ok()) else {
                continue;
            };
            for e in siblings.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("outpost-") && name.ends_with("-actions") && e.path() != parent
                {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }

    fn is_v2(&self) -> bool {
        matches!(self.tree, Tree::V2(..))
    }

    /// The cgroups for one action, with its limits set: an idle one from
    /// the pool, or a new one.
    pub fn create(&self, limits: &Limits) -> std::io::Result<Group> {
        let v2 = self.is_v2();
        let idle = lock(&self.pool).pop();
        let (dirs, written) = match idle {
            Some(idle) => (idle.dirs, Some(idle.written)),
            None => (self.make()?, None),
        };
        let controllers: Vec<(Controller, PathBuf)> = match &self.tree {
            Tree::V2(_, cs) => cs.iter().map(|c| (*c, dirs[0].clone())).collect(),
            Tree::V1(cs) => cs
                .iter()
                .map(|(c, _)| *c)
                .zip(dirs.iter().cloned())
                .collect(),
            Tree::None => Vec::new(),
        };
        let mut group = Group {
            dirs,
            memory_dir: None,
            v2,
            oom_kills_before: 0,
            written: Limits::default(),
            reusable: true,
            pool: Arc::clone(&self.pool),
            rlimits: limits.clone(),
        };
        match group.set_limits(&controllers, written.as_ref(), limits) {
            Ok(()) => {
                group.written = limits.clone();
                Ok(group)
            }
            Err(e) => {
                // What it holds now is unknown: removed, not pooled.
                group.reusable = false;
                Err(e)
            }
        }
    }

    /// Makes a new action cgroup: its directory under each parent.
    fn make(&self) -> std::io::Result<Vec<PathBuf>> {
        let name = format!("g{}", self.made.fetch_add(1, Ordering::Relaxed));
        match &self.tree {
            Tree::V2(dir, cs) => {
                if !dir.exists() {
                    // Swept by another agent while idle: set it up again.
                    std::fs::create_dir(dir)?;
                    write(&dir.join("cgroup.subtree_control"), &enable(cs))?;
                }
                let d = dir.join(&name);
                std::fs::create_dir(&d)?;
                Ok(vec![d])
            }
            Tree::V1(dirs) => {
                let mut out = Vec::new();
                for (_, dir) in dirs {
                    let d = dir.join(&name);
                    if let Err(e) = std::fs::create_dir_all(&d) {
                        remove(&out, false);
                        return Err(e);
                    }
                    out.push(d);
                }
                Ok(out)
            }
            Tree::None => Ok(Vec::new()),
        }
    }
}

impl Group {
    /// Writes `limits` where they differ from `written` (what the cgroup
    /// last had; `None` for a new one, which starts unlimited), and records
    /// the OOM count to compare against.
    fn set_limits(
        &mut self,
        controllers: &[(Controller, PathBuf)],
        written: Option<&Limits>,
        limits: &Limits,
    ) -> std::io::Result<()> {
        let v2 = self.v2;
        let changed = |f: fn(&Limits) -> Option<u64>| {
            written.map_or(f(limits).is_some(), |w| f(w) != f(limits))
        };
        for (c, dir) in controllers {
            match c {
                Controller::Memory => {
                    self.memory_dir = Some(dir.clone());
                    if changed(|l| l.memory_bytes) {
                        let bytes = limits.memory_bytes.map(|b| b.to_string());
                        if v2 {
                            write(&dir.join("memory.max"), bytes.as_deref().unwrap_or("max"))?;
                            // Without swap accounting there is no file.
                            let swap = if bytes.is_some() { "0" } else { "max" };
                            let _ = write(&dir.join("memory.swap.max"), swap);
                        } else {
                            let bytes = bytes.as_deref().unwrap_or("-1");
                            // The combined limit may not go below the
                            // memory limit: raise it first, lower it last.
                            // Without swap accounting there is no file.
                            let memsw = dir.join("memory.memsw.limit_in_bytes");
                            let has_memsw = memsw.exists();
                            if has_memsw {
                                write(&memsw, "-1")?;
                            }
                            write(&dir.join("memory.limit_in_bytes"), bytes)?;
                            if has_memsw {
                                write(&memsw, bytes)?;
                            }
                        }
                    }
                    self.oom_kills_before = oom_kills(dir, v2);
                    self.rlimits.memory_bytes = None;
                }
                Controller::Pids => {
                    if changed(|l| l.pids) {
                        let n = limits.pids.map_or("max".to_owned(), |n| n.to_string());
                        write(&dir.join("pids.max"), &n)?;
                    }
                    self.rlimits.pids = None;
                }
                Controller::Cpu => {
                    if changed(|l| l.cpu_millis) {
                        let period = 100_000u64;
                        let quota = limits
                            .cpu_millis
                            .map(|milli| (milli * period / 1000).max(1000));
                        if v2 {
                            let quota = quota.map_or("max".to_owned(), |q| q.to_string());
                            write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
                        } else {
                            write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                            let quota = quota.map_or("-1".to_owned(), |q| q.to_string());
                            write(&dir.join("cpu.cfs_quota_us"), &quota)?;
                        }
                    }
                    self.rlimits.cpu_millis = None;
                }
            }
        }
        Ok(())
    }

    /// Not to be handed to another action: killed and removed when dropped
    /// (for an action whose stub may still be joining it).
    pub fn discard(mut self) {
        self.reusable = false;
    }
}

/// The `oom_kill` count of a memory cgroup.
fn oom_kills(dir: &Path, v2: bool) -> u64 {
    let file = if v2 {
        "memory.events"
    } else {
        "memory.oom_control"
    };
    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("oom_kill "))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

/// `+memory +pids`: what `cgroup.subtree_control` takes.
fn enable(controllers: &[Controller]) -> String {
    controllers
        .iter()
        .map(|c| format!("+{}", c.name()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn detect_v2(name: &str) -> Option<Tree> {
    let own = own_cgroups();
    let (_, path) = own.iter().find(|(c, _)| c.is_empty())?;
    let (_, _, mount) = cgroup_mounts()
        .into_iter()
        .find(|(fstype, _, _)| fstype == "cgroup2")?;
    let base = mount.join(path.trim_start_matches('/'));
    let available = std::fs::read_to_string(base.join("cgroup.controllers")).ok()?;
    let controllers: Vec<Controller> = Controller::ALL
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == c.name()))
        .collect();
    if !controllers.contains(&Controller::Memory) || !writable(&base) {
        return None;
    }
    // No processes may sit in a cgroup whose children have controllers:
    // move the agent into a leaf of its own first.
    let leaf = base.join(format!("{name}-agent"));
    let _ = std::fs::create_dir(&leaf);
    write(&leaf.join("cgroup.procs"), &std::process::id().to_string()).ok()?;
    write(&base.join("cgroup.subtree_control"), &enable(&controllers)).ok()?;
    let actions = base.join(format!("{name}-actions"));
    let _ = std::fs::create_dir(&actions);
    write(
        &actions.join("cgroup.subtree_control"),
        &enable(&controllers),
    )
    .ok()?;
    Some(Tree::V2(actions, controllers))
}

fn detect_v1(name: &str) -> Option<Tree> {
    let own = own_cgroups();
    let mounts = cgroup_mounts();
    let mut dirs = Vec::new();
    for c in Controller::ALL {
        let Some((_, path)) = own
            .iter()
            .find(|(cs, _)| cs.split(',').any(|x| x == c.name()))
        else {
            continue;
        };
        let Some((_, _, mount)) = mounts.iter().find(|(fstype, options, _)| {
            fstype == "cgroup" && options.split(',').any(|o| o == c.name())
        }) else {
            continue;
        };
        let base = mount.join(path.trim_start_matches('/'));
        let dir = base.join(format!("{name}-actions"));
        if std::fs::create_dir(&dir).is_err() && !dir.is_dir() {
            continue;
        }
        if writable(&dir) {
            dirs.push((c, dir));
        }
    }
    dirs.iter()
        .any(|(c, _)| *c == Controller::Memory)
        .then_some(Tree::V1(dirs))
}

impl Group {
    /// The `cgroup.procs` files the stub joins.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The memory limit this action runs under.
    pub fn memory_limit(&self) -> Option<u64> {
        self.written.memory_bytes
    }

    /// Whether the kernel's OOM killer killed a process of this action.
    pub fn oom_killed(&self) -> bool {
        self.memory_dir
            .as_ref()
            .is_some_and(|dir| oom_kills(dir, self.v2) > self.oom_kills_before)
    }

    /// Whether no process is left in the cgroups.
    fn is_empty(&self) -> bool {
        self.dirs.iter().all(|d| {
            std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty())
        })
    }
}

/// Kills every process in the cgroups and removes them.
fn remove(dirs: &[PathBuf], v2: bool) {
    for _ in 0..250 {
        let mut busy = false;
        for d in dirs {
            if v2 && write(&d.join("cgroup.kill"), "1").is_ok() {
                // Killed; rmdir below waits for them to go.
            } else if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if d.exists() && std::fs::remove_dir(d).is_err() {
                busy = true;
            }
        }
        if !busy {
            return;
        }
        // The kernel frees an emptied cgroup a moment after its last task.
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        self.sweep();
        for p in self.parents() {
            let _ = std::fs::remove_dir(p);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.dirs.is_empty() {
            return;
        }
        if self.reusable && self.is_empty() {
            lock(&self.pool).push(Idle {
                dirs: std::mem::take(&mut self.dirs),
                written: std::mem::take(&mut self.written),
            });
        } else {
            remove(&self.dirs, self.v2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_hosts_cgroups_are_described() {
        // Whatever the host offers, detection must not fail or panic.
        let l = Limiter::detect(&format!("outpost-unit-{}", std::process::id()));
        let d = l.describe();
        assert!(
            d.starts_with("cgroup v") || d.starts_with("rlimits only"),
            "{d}"
        );
        let limits = Limits {
            memory_bytes: Some(256 << 20),
            pids: Some(100),
            cpu_millis: Some(1500),
        };
        let g = l.create(&limits).expect("an action cgroup");
        assert!(!g.oom_killed());
        let dirs = g.dirs.clone();
        drop(g);
        // Empty, it is handed to the next action, with other limits.
        let g = l.create(&Limits::default()).expect("a reused cgroup");
        assert_eq!(g.dirs, dirs);
        if let Some(memory) = &g.memory_dir {
            let file = if g.v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            let set = std::fs::read_to_string(memory.join(file)).expect("limit");
            assert_ne!(
                set.trim(),
                (256u64 << 20).to_string(),
                "the old limit is gone"
            );
        }
        drop(g);
        let parents = l.parents();
        drop(l);
        assert!(
            parents.iter().all(|p| !p.exists()),
            "{parents:?} left behind"
        );
    }
}
