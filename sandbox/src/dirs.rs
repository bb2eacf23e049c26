//! Directories the agent makes on the host through paths an action chose
//! (its working directory, its outputs' parents): made one component at a
//! time, each opened without following a symlink, so that an input root
//! holding `l -> /anywhere` never gets the agent to create anything
//! outside it.

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, mkdirat};

/// Why [`make_beneath`] stopped.
#[derive(Debug)]
pub enum Error {
    /// `at` (relative to the root) is a symlink, a file or anything but a
    /// real directory: the action's own doing, nothing was made through it.
    NotADirectory { at: PathBuf },
    /// `rel` is absolute or has `.` or `..` in it.
    NotPlain { rel: PathBuf },
    /// The host refused (permissions, a full disk).
    Io { at: PathBuf, source: Errno },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotADirectory { at } => write!(
                f,
                "{} in the input root is a symlink or a file, not a directory",
                at.display()
            ),
            Error::NotPlain { rel } => write!(
                f,
                "{} must be a plain relative path inside the input root",
                rel.display()
            ),
            Error::Io { at, source } => write!(f, "creating {}: {source}", at.display()),
        }
    }
}

impl std::error::Error for Error {}

fn open_dir(at: impl std::os::fd::AsFd, name: &Path) -> Result<OwnedFd, Errno> {
    openat(
        at,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Makes `root/rel` and the directories above it (as `mkdir -p`), never
/// following a symlink: `root` itself must be a real directory, and every
/// component of `rel` either is one already or is made one. Nothing is
/// created once a component turns out to be anything else.
pub fn make_beneath(root: &Path, rel: &Path) -> Result<(), Error> {
    let mut dir = open_dir(nix::fcntl::AT_FDCWD, root).map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => Error::NotADirectory { at: root.into() },
        source => Error::Io {
            at: root.into(),
            source,
        },
    })?;
    let mut at = PathBuf::new();
    for component in rel.components() {
        let Component::Normal(name) = component else {
            return Err(Error::NotPlain { rel: rel.into() });
        };
        at.push(name);
        let name = Path::new(name);
        match mkdirat(&dir, name, Mode::from_bits_truncate(0o777)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(source) => return Err(Error::Io { at, source }),
        }
        dir = open_dir(&dir, name).map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => Error::NotADirectory { at: at.clone() },
            source => Error::Io {
                at: at.clone(),
                source,
            },
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "outpost-dirs-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("tempdir");
        dir
    }

    #[test]
    fn nothing_is_made_through_a_symlink_or_a_file() {
        let base = tempdir();
        let root = base.join("root");
        let outside = base.join("outside");
        std::fs::create_dir_all(root.join("real")).expect("mkdir");
        std::fs::create_dir(&outside).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("l")).expect("symlink");
        std::os::unix::fs::symlink(&outside, root.join("real/l")).expect("symlink");
        std::fs::write(root.join("file"), "x").expect("write");

        make_beneath(&root, Path::new("real/a/b")).expect("plain directories");
        assert!(root.join("real/a/b").is_dir());
        make_beneath(&root, Path::new("real/a/b")).expect("again: already there");
        make_beneath(&root, Path::new("")).expect("the root itself");

        for (rel, at) in [
            ("l/x/y", "l"),
            ("l", "l"),
            ("real/l/x", "real/l"),
            ("file/x", "file"),
        ] {
            match make_beneath(&root, Path::new(rel)) {
                Err(Error::NotADirectory { at: got }) => assert_eq!(got, Path::new(at), "{rel}"),
                other => panic!("{rel}: {other:?}"),
            }
        }
        for rel in ["../x", "a/../../x", "/abs"] {
            assert!(
                matches!(
                    make_beneath(&root, Path::new(rel)),
                    Err(Error::NotPlain { .. })
                ),
                "{rel}"
            );
        }
        assert_eq!(
            std::fs::read_dir(&outside).expect("list").count(),
            0,
            "something was made outside the root"
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
