//! Sets `cfg(os_linux)` where the Linux configuration of a crate is built:
//! on Linux, unless the `portable-check` feature asks for the other one.
//!
//! Code written for Linux is gated with `cfg(os_linux)` and code for every
//! other host with `cfg(not(os_linux))`, never with `target_os = "linux"`,
//! so that `cargo clippy --features outpost/portable-check` type-checks the
//! macOS configuration here (no Apple target can be installed on Linux).
//! A feature rather than `--cfg` in RUSTFLAGS: only the workspace's crates
//! build again, not every dependency. Code for macOS alone
//! (`target_os = "macos"`) stays unseen by that check, so it is kept to a
//! few lines. The outpost, agent, coordinator and sandbox crates share this
//! script.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(os_linux)");
    println!("cargo::rerun-if-changed={}", file!());
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let portable = std::env::var_os("CARGO_FEATURE_PORTABLE_CHECK").is_some();
    if linux && !portable {
        println!("cargo::rustc-cfg=os_linux");
    }
}
