//! Runs one process isolated: a plain spec (argv, environment, working
//! directory, mounts, limits, network) in, a contained process out.
//!
//! - [`spec`]: what to run and how to isolate it, written by the agent and
//!   read by the stub.
//! - [`dirs`]: directories made through paths an action chose, never
//!   through a symlink.
//! - [`linux`]: the Linux sandbox (namespaces, read-only bind mounts,
//!   Landlock, cgroups); the agent starts it as `outpost __sandbox`.
//! - [`reaper`]: `outpost __reap`, the stub in front of actions that run
//!   without isolation, so that killing the action kills everything it
//!   started.
//! - [`signals`]: signal dispositions the binary sets at start-up.
//!
//! It knows nothing of REAPI, protobuf or tokio, and it is the only crate
//! allowed `unsafe`.

// Forking, descriptor juggling and prctl/ioctl calls need it; every block
// says why it is sound.
#![allow(unsafe_code)]

pub mod dirs;
#[cfg(os_linux)]
pub mod linux;
pub mod reaper;
pub mod signals;
pub mod spec;
