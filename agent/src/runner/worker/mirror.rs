//! A worker's copy of one request's input tree.
//!
//! An action's inputs are hard links to the agent's input cache, made
//! read-only per action. A worker outlives its actions and writes where it
//! likes in its own directory, so it never gets those links: each request's
//! tree is **copied** into the worker's root (files read-only, so a stray
//! write fails loudly), and whatever is there from an earlier request and
//! not in this one (its outputs, the worker's own leftovers, inputs no
//! longer named) is removed first. A file copied for an earlier request is
//! kept only while both its source (the same cache entry) and the copy
//! (inode, size, modification time, mode) are as they were when copied;
//! anything else is copied again. The worker can therefore never change a
//! cache entry, and a request never sees another request's files.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The control directory under the worker's root, never mirrored over.
pub const CONTROL: &str = ".outpost-worker";

/// What was copied where, to know what can stay.
#[derive(Default)]
pub struct Mirror {
    copies: HashMap<PathBuf, Copied>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Copied {
    /// The source (a cache entry) when copied.
    from: (u64, u64),
    /// The copy as made.
    to: Stamp,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    mode: u32,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            mode: meta.mode(),
        }
    }
}

enum Want {
    Dir,
    File { from: (u64, u64), exec: bool },
    Symlink(PathBuf),
}

impl Mirror {
    /// Makes `to` (the worker's root) hold exactly what `from` (the
    /// action's root) holds, besides the control directory.
    pub fn sync(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
        let mut wanted: HashMap<PathBuf, Want> = HashMap::new();
        walk(from, Path::new(""), &mut wanted)?;
        self.prune(to, Path::new(""), &wanted)?;
        let mut paths: Vec<&PathBuf> = wanted.keys().collect();
        // Parents before children.
        paths.sort();
        for rel in paths {
            let dest = to.join(rel);
            match &wanted[rel] {
                Want::Dir => match std::fs::create_dir(&dest) {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                    // Writable by whichever user the backend runs the
                    // worker as; the worker's directory itself is private.
                    Ok(()) => {
                        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o777))?
                    }
                },
                Want::Symlink(target) => {
                    if std::fs::read_link(&dest).is_err() {
                        std::os::unix::fs::symlink(target, &dest)?;
                    }
                }
                Want::File { from: src, exec } => {
                    if self.copies.contains_key(rel) {
                        continue;
                    }
                    std::fs::copy(from.join(rel), &dest)?;
                    let mode = if *exec { 0o555 } else { 0o444 };
                    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
                    let meta = std::fs::symlink_metadata(&dest)?;
                    self.copies.insert(
                        rel.clone(),
                        Copied {
                            from: *src,
                            to: Stamp::of(&meta),
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Removes under `to/rel` whatever this request does not have as it
    /// is; forgets the copies it removes.
    fn prune(
        &mut self,
        to: &Path,
        rel: &Path,
        wanted: &HashMap<PathBuf, Want>,
    ) -> std::io::Result<()> {
        for entry in std::fs::read_dir(to.join(rel))? {
            let entry = entry?;
            let child = rel.join(entry.file_name());
            if rel.as_os_str().is_empty() && entry.file_name() == CONTROL {
                continue;
            }
            let meta = entry.metadata()?;
            let keep = match wanted.get(&child) {
                Some(Want::Dir) if meta.is_dir() => {
                    // The worker may have made it read-only.
                    if meta.mode() & 0o777 != 0o777 {
                        std::fs::set_permissions(
                            entry.path(),
                            std::fs::Permissions::from_mode(0o777),
                        )?;
                    }
                    self.prune(to, &child, wanted)?;
                    true
                }
                Some(Want::File { from, .. }) if meta.is_file() => self
                    .copies
                    .get(&child)
                    .is_some_and(|c| c.from == *from && c.to == Stamp::of(&meta)),
                Some(Want::Symlink(target)) if meta.is_symlink() => {
                    std::fs::read_link(entry.path()).is_ok_and(|t| t == *target)
                }
                _ => false,
            };
            if !keep {
                self.copies.remove(&child);
                if meta.is_dir() {
                    self.copies.retain(|p, _| !p.starts_with(&child));
                    crate::runner::workspace::remove_tree(&entry.path());
                } else {
                    std::fs::remove_file(entry.path())?;
                }
            }
        }
        Ok(())
    }

    /// Moves `rel` (an output) from the worker's root `to` into the
    /// action's root `from`, if the worker made it.
    pub fn take_output(&mut self, to: &Path, from: &Path, rel: &Path) -> std::io::Result<()> {
        let src = to.join(rel);
        if std::fs::symlink_metadata(&src).is_err() {
            return Ok(());
        }
        let dest = from.join(rel);
        if let Ok(meta) = std::fs::symlink_metadata(&dest) {
            if meta.is_dir() {
                crate::runner::workspace::remove_tree(&dest);
            } else {
                std::fs::remove_file(&dest)?;
            }
        }
        self.copies.retain(|p, _| !p.starts_with(rel));
        std::fs::rename(src, dest)
    }
}

/// Everything under `root/rel`, as this request wants it.
fn walk(root: &Path, rel: &Path, wanted: &mut HashMap<PathBuf, Want>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let child = rel.join(entry.file_name());
        if rel.as_os_str().is_empty() && entry.file_name() == CONTROL {
            continue;
        }
        let meta = entry.metadata()?;
        if meta.is_symlink() {
            wanted.insert(child, Want::Symlink(std::fs::read_link(entry.path())?));
        } else if meta.is_dir() {
            wanted.insert(child.clone(), Want::Dir);
            walk(root, &child, wanted)?;
        } else if meta.is_file() {
            wanted.insert(
                child,
                Want::File {
                    from: (meta.dev(), meta.ino()),
                    exec: meta.mode() & 0o111 != 0,
                },
            );
        }
    }
    Ok(())
}

/// What is under the root, as paths (for tests).
#[cfg(test)]
fn listing(root: &Path) -> std::collections::HashSet<String> {
    let mut wanted = HashMap::new();
    walk(root, Path::new(""), &mut wanted).expect("walk");
    wanted
        .into_keys()
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_sees_its_own_tree_and_no_cache_file_is_shared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, w) = (dir.path().join("action"), dir.path().join("worker"));
        std::fs::create_dir_all(a.join("src")).expect("mkdir");
        std::fs::create_dir_all(w.join(CONTROL)).expect("mkdir");
        std::fs::write(a.join("src/one"), "1").expect("write");
        std::fs::write(a.join("tool"), "#!/bin/sh").expect("write");
        std::fs::set_permissions(a.join("tool"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::os::unix::fs::symlink("src/one", a.join("link")).expect("symlink");
        let mut mirror = Mirror::default();
        mirror.sync(&a, &w).expect("sync");
        assert_eq!(
            listing(&w),
            ["src", "src/one", "tool", "link"].map(String::from).into()
        );
        let copy = std::fs::metadata(w.join("src/one")).expect("stat");
        assert_ne!(
            copy.ino(),
            std::fs::metadata(a.join("src/one")).expect("stat").ino()
        );
        assert!(copy.permissions().readonly());
        assert_eq!(
            std::fs::metadata(w.join("tool")).expect("stat").mode() & 0o111,
            0o111
        );
        let kept_ino = std::fs::metadata(w.join("tool")).expect("stat").ino();

        // The worker leaves an output and a stray file, and changes an
        // input behind the agent's back.
        std::fs::write(w.join("out"), "o").expect("write");
        std::fs::write(w.join("src/stray"), "s").expect("write");
        std::fs::set_permissions(w.join("src/one"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        std::fs::write(w.join("src/one"), "tampered").expect("write");
        std::fs::create_dir(a.join("out-dir")).expect("mkdir");
        mirror.take_output(&w, &a, Path::new("out")).expect("take");
        assert_eq!(std::fs::read_to_string(a.join("out")).expect("read"), "o");
        std::fs::remove_file(a.join("out")).expect("rm");
        std::fs::remove_file(a.join("link")).expect("rm");

        mirror.sync(&a, &w).expect("sync again");
        assert_eq!(
            listing(&w),
            ["src", "src/one", "tool", "out-dir"]
                .map(String::from)
                .into()
        );
        assert_eq!(
            std::fs::read_to_string(w.join("src/one")).expect("read"),
            "1"
        );
        assert_eq!(
            std::fs::read_to_string(a.join("src/one")).expect("read"),
            "1"
        );
        // An untouched copy is not copied again.
        assert_eq!(
            std::fs::metadata(w.join("tool")).expect("stat").ino(),
            kept_ino
        );
        assert!(w.join(CONTROL).is_dir());
    }
}
