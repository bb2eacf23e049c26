//! Names of the fleet protocol's optional features
//! (`Capabilities.features`). An agent lists the features it understands;
//! the coordinator checks the list before it relies on a field an older
//! agent would ignore. New fields are added without bumping the protocol
//! version, each with a feature here.

/// Leases carry a warm key (`Lease.warm_key`) the agent keeps persistent
/// workers under, and its heartbeats list the keys it holds warm
/// (`Heartbeat.warm_keys`).
pub const WARM_KEYS: &str = "warm-keys";

/// Leases name the GPUs an action may use (`Lease.gpus`), and the agent
/// exposes those and no others; its `Gpu` entries carry index and UUID.
pub const GPU_ASSIGNMENT: &str = "gpu-assignment";

/// The agent sends a running action's stdout and stderr as they are
/// produced (`OutputChunk`) when its lease says `stream_output`.
pub const LIVE_OUTPUT: &str = "live-output";

/// The agent runs an action naming an Xcode (`xcode-version`, or
/// `XCODE_VERSION_OVERRIDE` in its environment) with `DEVELOPER_DIR` and
/// `SDKROOT` of that Xcode; agents without it are never matched by Xcode.
pub const XCODE_SELECTION: &str = "xcode-selection";

/// Every feature this build's agent understands, as it advertises them.
pub const ALL: &[&str] = &[GPU_ASSIGNMENT, LIVE_OUTPUT, WARM_KEYS, XCODE_SELECTION];
