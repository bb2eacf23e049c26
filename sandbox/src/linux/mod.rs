//! The Linux sandbox: user, mount, pid, net, ipc and uts namespaces, a root
//! of read-only bind mounts, Landlock, and per-action cgroups.
//!
//! The agent side writes a [`Spec`](crate::spec::Spec), starts the stub
//! with [`launch::command`] and reads its status pipe; the stub side
//! ([`stub::main`]) builds the sandbox and execs the action. Resource
//! limits live in [`cgroup`], which the agent drives.

pub mod alias;
pub mod cgroup;
mod fds;
pub mod launch;
mod mounts;
mod restrict;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod seccomp;
/// No filter is written for other architectures: the sandbox refuses to
/// start there rather than run actions without one.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod seccomp {
    pub fn apply() -> Result<(), String> {
        Err("linux-sandbox has a seccomp filter for x86-64 and arm64 only".into())
    }
}
pub mod spawner;
pub mod stub;
