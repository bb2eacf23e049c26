//! The Linux sandbox: user, mount, pid, net, ipc and uts namespaces, a root
//! of read-only bind mounts, Landlock, and per-action cgroups.
//!
//! The agent side writes a [`Spec`](crate::spec::Spec), starts the stub
//! with [`launch::command`] and reads its status pipe; the stub side
//! ([`stub::main`]) builds the sandbox and execs the action. Resource
//! limits live in [`cgroup`], which the agent drives.

pub mod cgroup;
mod fds;
pub mod launch;
mod mounts;
mod restrict;
mod seccomp;
pub mod spawner;
pub mod stub;
