//! An action's directory and its lifecycle: made fresh and private, inputs
//! laid out under its root, the action run, then removed when the workspace
//! is dropped, however the lease ends (a runner that outlives its action
//! will keep it instead).
//!
//! ```text
//! dir/            0700, the agent's only
//!   root/         the input root: inputs laid out, outputs written
//!   stdout stderr the action's output
//!   run.spec tmp/ sysroot/   what a sandbox needs
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use outpost_proto::digest::Digest;

use crate::cache::Cache;
use crate::error::Error;

pub struct Workspace {
    dir: PathBuf,
    root: PathBuf,
    cache: Cache,
    /// Cache entries hard-linked into the root: checked again when the
    /// workspace goes, since an action may have written through them.
    linked: Vec<Digest>,
}

impl Workspace {
    /// Makes `actions_dir/name`, private to the agent (an existing one is
    /// made private again and reused).
    pub fn create(actions_dir: &Path, name: &str, cache: Cache) -> Result<Workspace, Error> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = actions_dir.join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            }
            other => other,
        }
        .map_err(|e| Error::local("creating the action's directory", e))?;
        Ok(Workspace {
            root: dir.join("root"),
            dir,
            cache,
            linked: Vec::new(),
        })
    }

    /// The workspace's own directory (stdout, stderr, sandbox files).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The input root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The inputs are in place; `linked` are the cache entries they link.
    pub fn laid_out(&mut self, linked: Vec<Digest>) {
        self.linked.extend(linked);
    }

    /// The input links are gone (a recycled workspace before its next
    /// action): their cache entries are checked again now.
    pub fn restamp_linked(&mut self) {
        for d in std::mem::take(&mut self.linked) {
            self.cache.restamp(&d);
        }
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let dir = std::mem::take(&mut self.dir);
        let cache = self.cache.clone();
        let linked = std::mem::take(&mut self.linked);
        let work = move || {
            remove_tree(&dir);
            for d in linked {
                cache.restamp(&d);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(work);
            }
            Err(_) => work(),
        }
    }
}

/// Makes `root/rel` for the action (`what`), never through a symlink or a
/// file of its input tree (see `outpost_sandbox::dirs`): if one is in the
/// way, the action is at fault, and nothing was made on the host through it.
pub fn make_dirs(root: &Path, rel: &Path, what: &str) -> Result<(), Error> {
    use outpost_sandbox::dirs;
    dirs::make_beneath(root, rel).map_err(|e| match e {
        dirs::Error::NotADirectory { .. } | dirs::Error::NotPlain { .. } => {
            Error::BadInput(format!("cannot make {what} {}: {e}", rel.display()))
        }
        dirs::Error::Io { source, .. } => Error::local(
            format!("creating {what} {}", rel.display()),
            std::io::Error::from(source),
        ),
    })
}

/// Deletes a tree even if the action made parts of it read-only.
pub(crate) fn remove_tree(dir: &Path) {
    if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
        return;
    }
    fn unlock(p: &Path) {
        if let Ok(meta) = std::fs::symlink_metadata(p)
            && meta.is_dir()
        {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
            if let Ok(entries) = std::fs::read_dir(p) {
                for e in entries.flatten() {
                    unlock(&e.path());
                }
            }
        }
    }
    unlock(dir);
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an action directory");
    }
}
