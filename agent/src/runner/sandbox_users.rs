//! The host users a root agent's sandboxed actions run as: never root, and
//! one user per running action, so that concurrent actions share no
//! per-user kernel counter (inotify instances, processes, user namespaces,
//! keyrings and quotas) with each other or with the host's root.
//!
//! The users are a configured range (`sandbox_uid_base` and
//! `sandbox_uid_count`): group `base`, users `base+1 ..= base+count`. They
//! need no entry in `/etc/passwd`, but no real user may have those ids.
//! A run takes the lowest free user (so the spawner's warm stubs, kept per
//! user, serve the next action) and gives it back once its stub has ended.
//!
//! What the user may reach on the host is exactly what its sandbox is
//! built from: the work dir and the actions directory are `0710` root and
//! the sandbox group (other host users cannot enter them), an action's
//! directory `0710` likewise, and only its writable directories, its `/tmp`
//! and its sandbox root belong to the action's user. Input files stay
//! root's and read-only; outputs the action writes are its user's until
//! the agent, as root, uploads and removes them.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use outpost_sandbox::spec::User;

use crate::error::Error;

/// The configured range, shared by this agent's runs.
pub struct Users {
    gid: u32,
    count: u32,
    free: Mutex<BTreeSet<u32>>,
}

/// One run's user; returned to the range when dropped.
pub struct Lease {
    users: Arc<Users>,
    pub user: User,
}

impl Users {
    /// Users `base+1 ..= base+count` in group `base`.
    pub fn new(base: u32, count: u32) -> anyhow::Result<Arc<Users>> {
        let last = base.checked_add(count).filter(|_| base > 0 && count > 0);
        let Some(last) = last else {
            anyhow::bail!(
                "sandbox_uid_base {base} and sandbox_uid_count {count} name no usable range of \
                 host users (both must be above 0, and base+count below 2^32)"
            );
        };
        Ok(Arc::new(Users {
            gid: base,
            count,
            free: Mutex::new((base + 1..=last).collect()),
        }))
    }

    /// The group every sandbox user is in.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The lowest free user.
    pub fn take(self: &Arc<Users>) -> Result<Lease, Error> {
        let uid = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.pop_first()
        };
        let uid = uid.ok_or_else(|| {
            Error::Retryable(format!(
                "all {} sandbox users of this agent are in use (raise sandbox_uid_count)",
                self.count
            ))
        })?;
        Ok(Lease {
            users: Arc::clone(self),
            user: User { uid, gid: self.gid },
        })
    }

    /// Opens `dir` (a directory actions' directories are under) to the
    /// sandbox group only: root's, `0710`.
    pub fn open_to_group(&self, dir: &Path) -> std::io::Result<()> {
        std::os::unix::fs::lchown(dir, Some(0), Some(self.gid))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))
    }
}

/// Whether ids `first ..= last` all exist in this process's user
/// namespace, by its map (`/proc/self/uid_map` or `gid_map`): an agent that
/// is root only inside a user namespace of its own may have no other ids.
pub fn mapped(map: &str, first: u32, last: u32) -> bool {
    map.lines().any(|line| {
        let mut fields = line.split_whitespace().map(str::parse::<u64>);
        match (fields.next(), fields.next(), fields.next()) {
            (Some(Ok(inside)), Some(Ok(_)), Some(Ok(length))) => {
                inside <= u64::from(first) && u64::from(last) < inside + length
            }
            _ => false,
        }
    })
}

impl Lease {
    /// Gives `lease.user` what its run needs: its directory `dir` opened to
    /// the group, and `owned` (its writable directories, `/tmp`, sandbox
    /// root) made its own.
    pub fn grant(&self, dir: &Path, owned: &[PathBuf]) -> std::io::Result<()> {
        self.users.open_to_group(dir)?;
        for p in owned {
            std::os::unix::fs::lchown(p, Some(self.user.uid), Some(self.user.gid))?;
        }
        Ok(())
    }

    /// For a run whose stub may still be running: the user never goes back
    /// to the range (it could otherwise meet that stub's processes).
    pub fn retire(self) {
        tracing::warn!(
            uid = self.user.uid,
            "a sandbox user is retired: its action was given up before its stub ended"
        );
        std::mem::forget(self);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut free = self.users.free.lock().unwrap_or_else(|e| e.into_inner());
        free.insert(self.user.uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_get_the_lowest_free_user_until_none_is_left() {
        let users = Users::new(990_000, 2).expect("range");
        let a = users.take().expect("first");
        let b = users.take().expect("second");
        assert_eq!((a.user.uid, b.user.uid), (990_001, 990_002));
        assert_eq!(a.user.gid, 990_000);
        let e = users.take().err().expect("none left");
        assert!(e.to_string().contains("sandbox_uid_count"), "{e}");
        drop(a);
        let c = users.take().expect("returned");
        assert_eq!(c.user.uid, 990_001);
        b.retire();
        assert!(users.take().is_err(), "a retired user is not handed out");
    }

    #[test]
    fn a_range_is_usable_only_where_the_namespace_maps_it() {
        let host = "         0          0 4294967295\n";
        assert!(mapped(host, 990_000, 991_000));
        let container = "         0     100000      65536\n";
        assert!(mapped(container, 0, 65_535));
        assert!(!mapped(container, 990_000, 991_000));
        let root_only = "         0          0          1\n";
        assert!(!mapped(root_only, 990_000, 990_001));
        assert!(!mapped("", 1, 2));
    }

    #[test]
    fn empty_or_overflowing_ranges_are_refused() {
        assert!(Users::new(0, 10).is_err());
        assert!(Users::new(10, 0).is_err());
        assert!(Users::new(u32::MAX - 1, 5).is_err());
    }
}
