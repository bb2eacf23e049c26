//! A path by which a root agent's sandbox users reach its work directory.
//!
//! On an agent running as root, each action's stub becomes an unprivileged
//! user before it builds the sandbox, and binds the action's directories
//! by their host paths; that needs search permission on every directory
//! above the work directory. A work directory under one that others may
//! not enter (`/root`, a 0700 `mktemp -d`) is then out of the stubs'
//! reach. For such a work directory the agent binds it once, at start-up,
//! at `/run/outpost/ID` (`/run` is open to all), and names the actions'
//! directories by that path; the bind is removed when the agent stops, or
//! replaced at its next start after a crash.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Where the binds go, one directory per agent.
const ALIASES: &str = "/run/outpost";

/// The work directory's bind at a reachable path; removed when dropped.
#[derive(Debug)]
pub struct Alias {
    work_dir: PathBuf,
    at: PathBuf,
}

/// Whether a process in group `gid` (and no owner) can search every
/// directory above `dir`.
pub fn reachable(dir: &Path, gid: u32) -> bool {
    dir.ancestors().skip(1).all(|a| {
        std::fs::metadata(a).is_ok_and(|m| {
            let mode = m.permissions().mode();
            mode & 0o001 != 0 || (m.gid() == gid && mode & 0o010 != 0)
        })
    })
}

impl Alias {
    /// `work_dir` itself when group `gid` can reach it, else its bind at
    /// `/run/outpost/ID` (`id`: the agent's, so a restart finds a bind it
    /// left).
    pub fn reach(work_dir: &Path, gid: u32, id: &str) -> Result<Option<Alias>, String> {
        if reachable(work_dir, gid) {
            return Ok(None);
        }
        let at = Path::new(ALIASES).join(id);
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            format!(
                "the sandbox users cannot enter a directory above the work directory {}, \
                 and {what} {} failed: {e}; put the work directory where any user may \
                 pass through (e.g. /var/lib/outpost)",
                work_dir.display(),
                at.display()
            )
        };
        // Left by an agent that was killed: replaced.
        let _ = umount2(&at, MntFlags::MNT_DETACH);
        std::fs::create_dir_all(&at).map_err(|e| fail("creating", &e))?;
        std::fs::set_permissions(Path::new(ALIASES), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| fail("opening the parent of", &e))?;
        mount(
            Some(work_dir),
            &at,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| fail("binding it at", &e))?;
        // Private: nothing mounted under it later travels to other
        // namespaces, and nothing of theirs comes back.
        let _ = mount(
            None::<&str>,
            &at,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        );
        Ok(Some(Alias {
            work_dir: work_dir.to_owned(),
            at,
        }))
    }

    /// `path` (under the work directory) by the reachable path.
    pub fn map(&self, path: &Path) -> PathBuf {
        match path.strip_prefix(&self.work_dir) {
            Ok(rest) => self.at.join(rest),
            Err(_) => path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.at
    }
}

impl Drop for Alias {
    fn drop(&mut self) {
        let _ = umount2(&self.at, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_the_work_dir_are_mapped() {
        let alias = std::mem::ManuallyDrop::new(Alias {
            work_dir: "/root/agent".into(),
            at: "/run/outpost/a1".into(),
        });
        assert_eq!(
            alias.map(Path::new("/root/agent/actions/x/root")),
            Path::new("/run/outpost/a1/actions/x/root")
        );
        assert_eq!(alias.map(Path::new("/elsewhere")), Path::new("/elsewhere"));
    }

    #[test]
    fn a_private_parent_makes_a_directory_unreachable() {
        let dir = std::env::temp_dir().join(format!("outpost-alias-{}", std::process::id()));
        let inner = dir.join("work");
        std::fs::create_dir_all(&inner).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let hidden = reachable(&inner, 990_000);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
        let open = reachable(&inner, 990_000);
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert!(!hidden && open);
    }
}
