//! The SBPL profile `sandbox-exec` runs an action under, rendered from the
//! run: its workspace, the other paths it may write, the agent's own files
//! it may not read, and its network.
//!
//! ```text
//! (version 1)
//! (allow default)                      everything not said below
//! network rules                        none: (deny network*); localhost:
//!                                      only loopback addresses; all: none
//! (deny file-write*)                   no writes ...
//! (allow file-write* DEVICES)          ... but /dev/null and the like
//! (allow file-read* file-write* (subpath WRITABLE))   each extra path
//! (deny file-read* file-write* (subpath HIDDEN))      the agent's files
//! (allow file-read* file-write* (subpath WORKSPACE))  the action's own
//! ```
//!
//! Later rules win over earlier ones, so the workspace (inside the agent's
//! work directory) is the action's while every other workspace, the input
//! cache, the configuration and the credentials stay unreadable.
//!
//! The kernel checks real paths: `/tmp`, `/var` and `/etc` are links to
//! `/private/...`, so each path is written in both spellings. A path goes
//! into the profile as an SBPL string (`"` and `\` escaped); a path that
//! cannot be one safely (not UTF-8, a control character such as a
//! newline, not absolute) is refused, never written.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Which network an action has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// No sockets to anywhere.
    None,
    /// Loopback addresses only (the host's own: unlike Linux's private
    /// loopback, services listening on the Mac's localhost are reachable).
    Localhost,
    /// Any network the host has.
    All,
}

/// What one action's profile says.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The action's workspace: read and written whatever else says.
    pub workspace: PathBuf,
    /// Other directories it may write (and read): its temp and cache dirs.
    pub writable: Vec<PathBuf>,
    /// Paths it may neither read nor write: the agent's work directory
    /// (other workspaces, the input cache), credentials.
    pub hidden: Vec<PathBuf>,
    pub network: Network,
}

/// Device files any process writes.
pub const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/dtracehelper",
    "/dev/stdout",
    "/dev/stderr",
];

/// Why a profile could not be written.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the path {path:?} cannot be written into a sandbox-exec profile safely: {why}")]
pub struct Unsafe {
    pub path: PathBuf,
    pub why: &'static str,
}

/// `path` as an SBPL string literal, or why it cannot be one.
pub fn quote(path: &Path) -> Result<String, Unsafe> {
    let refuse = |why| Unsafe {
        path: path.to_owned(),
        why,
    };
    let text = path.to_str().ok_or_else(|| refuse("it is not UTF-8"))?;
    if !path.is_absolute() {
        return Err(refuse("it is not absolute"));
    }
    if text.chars().any(char::is_control) {
        return Err(refuse("it has a control character"));
    }
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

/// The spellings of `path` the kernel may see: itself and, under a
/// top-level link of macOS (`/tmp`, `/var`, `/etc`), the other side.
pub fn spellings(path: &Path) -> Vec<PathBuf> {
    const LINKS: &[(&str, &str)] = &[
        ("/tmp", "/private/tmp"),
        ("/var", "/private/var"),
        ("/etc", "/private/etc"),
    ];
    let mut out = vec![path.to_owned()];
    for (link, real) in LINKS {
        for (from, to) in [(link, real), (real, link)] {
            if let Ok(rest) = path.strip_prefix(from) {
                out.push(if rest.as_os_str().is_empty() {
                    PathBuf::from(to)
                } else {
                    Path::new(to).join(rest)
                });
            }
        }
    }
    out.dedup();
    out
}

/// Renders the profile.
pub fn render(spec: &Spec) -> Result<String, Unsafe> {
    let mut p = String::from("(version 1)\n(allow default)\n");
    match spec.network {
        Network::All => {}
        Network::None => p.push_str("(deny network*)\n"),
        Network::Localhost => p.push_str(
            "(deny network*)\n\
             (allow network* (local ip \"localhost:*\"))\n\
             (allow network* (remote ip \"localhost:*\"))\n",
        ),
    }
    p.push_str("(deny file-write*)\n");
    for device in DEVICES {
        let _ = writeln!(p, "(allow file-write* (literal \"{device}\"))");
    }
    p.push_str("(allow file-write* (regex #\"^/dev/tty[a-z0-9]*$\") (regex #\"^/dev/fd/\"))\n");
    let rule = |p: &mut String, what: &str, path: &Path| -> Result<(), Unsafe> {
        for spelling in spellings(path) {
            let _ = writeln!(p, "({what} (subpath {}))", quote(&spelling)?);
        }
        Ok(())
    };
    for path in &spec.writable {
        rule(&mut p, WRITE, path)?;
    }
    for path in &spec.hidden {
        rule(&mut p, "deny file-read* file-write*", path)?;
    }
    rule(&mut p, WRITE, &spec.workspace)?;
    Ok(p)
}

/// The rule that lets a path be written (and read).
pub const WRITE: &str = "allow file-read* file-write*";

#[cfg(test)]
#[path = "profile_tests.rs"]
mod tests;
