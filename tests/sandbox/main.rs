//! The Linux sandbox against hostile actions. Every test runs a real
//! coordinator and a real agent with the default isolation
//! (`linux-sandbox`), twice: with the agent as root, and as an unprivileged
//! user (`setpriv`, uid 65534) in a cgroup delegated to it, as a systemd
//! unit with `Delegate=yes` would start it.
//!
//! Each hostile attempt runs as `t NAME COMMAND`, which prints
//! `NAME: refused` or `NAME: ESCAPED`; the tests also look at the host to
//! see that nothing happened there.

#![cfg(target_os = "linux")]

#[path = "../common/mod.rs"]
mod common;
mod fleet;
mod hostile;
mod input_root;
mod users;
