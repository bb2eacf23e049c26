//! Runs one process isolated: a plain spec (argv, environment, working
//! directory, mounts, limits, network) in, a contained process out.
//!
//! Today it provides the [`reaper`]: a small stub the agent starts in front
//! of every action so that killing the action kills everything it started,
//! including processes that left its process group. Namespaces, Landlock and
//! cgroups (Linux) and sandbox-exec profiles (macOS) arrive with the sandbox
//! work.
//!
//! It knows nothing of REAPI, protobuf or tokio, and it is the only crate
//! allowed `unsafe`.

pub mod reaper;
