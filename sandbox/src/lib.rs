//! Runs one process isolated: a plain spec (argv, environment, working
//! directory, mounts, limits, network) in, a contained process out — Linux
//! namespaces, Landlock and cgroups; sandbox-exec profiles on macOS.
//!
//! It knows nothing of REAPI, protobuf or tokio, and it is the only crate
//! allowed `unsafe`. The isolation backends arrive with the sandbox work;
//! the crate exists now so that the workspace has its final shape.
