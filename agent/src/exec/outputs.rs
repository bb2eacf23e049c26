//! Outputs: which paths to collect (`output_paths` or the older lists),
//! their sizes bounded before anything is read, and the ActionResult with
//! its files, directories (as a Tree, Directory blobs or both) and symlinks.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use outpost_proto::digest::{Digest, Function};
use outpost_proto::reapi;
use prost::Message;

use super::{append_note, normalize};
use crate::error::Error;
use crate::remote::Blob;

/// Which outputs to collect, each as (name the client used, path under
/// the input root).
pub(super) struct OutputSpec {
    /// REAPI 2.1+ `output_paths`.
    pub(super) paths: Vec<(String, PathBuf)>,
    pub(super) files: Vec<(String, PathBuf)>,
    pub(super) directories: Vec<(String, PathBuf)>,
    /// How output directories are reported: as a Tree, as Directory blobs,
    /// or both (`Command.output_directory_format`).
    pub(super) format: DirectoryFormat,
}

/// Which forms of an output directory the client wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DirectoryFormat {
    pub(super) tree: bool,
    pub(super) directories: bool,
}

impl DirectoryFormat {
    pub(super) fn of(command: &reapi::Command) -> DirectoryFormat {
        use reapi::command::OutputDirectoryFormat as F;
        match F::try_from(command.output_directory_format).unwrap_or(F::TreeOnly) {
            F::TreeOnly => DirectoryFormat {
                tree: true,
                directories: false,
            },
            F::DirectoryOnly => DirectoryFormat {
                tree: false,
                directories: true,
            },
            F::TreeAndDirectory => DirectoryFormat {
                tree: true,
                directories: true,
            },
        }
    }
}

impl OutputSpec {
    pub(super) fn of(command: &reapi::Command, workdir: &Path) -> Result<OutputSpec, Error> {
        let resolve = |list: &[String]| -> Result<Vec<(String, PathBuf)>, Error> {
            list.iter()
                .map(|p| Ok((p.clone(), normalize(workdir, p)?)))
                .collect()
        };
        if !command.output_paths.is_empty() {
            // A path listed twice is one output, collected once.
            let mut seen = std::collections::HashSet::new();
            let mut paths = resolve(&command.output_paths)?;
            paths.retain(|(_, p)| seen.insert(p.clone()));
            return Ok(OutputSpec {
                paths,
                files: Vec::new(),
                directories: Vec::new(),
                format: DirectoryFormat::of(command),
            });
        }
        Ok(OutputSpec {
            paths: Vec::new(),
            files: resolve(&command.output_files)?,
            directories: resolve(&command.output_directories)?,
            format: DirectoryFormat::of(command),
        })
    }

    pub(super) fn all(&self) -> impl Iterator<Item = &(String, PathBuf)> {
        self.paths
            .iter()
            .chain(&self.files)
            .chain(&self.directories)
    }
}

pub(super) struct Collected {
    pub(super) result: reapi::ActionResult,
    pub(super) blobs: HashMap<Digest, Blob>,
    /// FAILED_PRECONDITION naming the outputs of the wrong type, if any.
    pub(super) status: Option<tonic_types::pb::Status>,
}

/// What one action may upload.
#[derive(Clone, Copy)]
pub(super) struct OutputBounds {
    /// All outputs together, stdout and stderr included.
    pub(super) total: u64,
    /// One blob: the largest the coordinator's CAS accepts, once known.
    pub(super) blob: Option<u64>,
}

/// Adds up the outputs' sizes (a sparse file counts by its length, which
/// is what would be read and uploaded) and refuses them, before anything
/// is hashed or uploaded, when one is over the CAS's bound or all of them
/// over the agent's.
pub(super) fn check_output_sizes(
    root: &Path,
    spec: &OutputSpec,
    stdout: &Path,
    stderr: &Path,
    bounds: OutputBounds,
) -> Result<(), Error> {
    let mut total = 0u64;
    let mut count = |name: &str, size: u64| -> Result<(), Error> {
        if let Some(max) = bounds.blob
            && size > max
        {
            return Err(Error::TooLarge(format!(
                "output {name:?} is {size} bytes, larger than the largest blob the coordinator's \
                 CAS accepts ({} = {max} bytes); make the output smaller or raise max_cas_size \
                 on the coordinator",
                outpost_proto::units::ByteSize(max)
            )));
        }
        total = total.saturating_add(size);
        if total > bounds.total {
            return Err(Error::TooLarge(format!(
                "output {name:?} ({size} bytes) brings the action's outputs to {total} bytes, \
                 over this agent's action_output_limit of {} ({} bytes); make the outputs \
                 smaller or raise action_output_limit on the agents",
                outpost_proto::units::ByteSize(bounds.total),
                bounds.total
            )));
        }
        Ok(())
    };
    for (name, path) in [("stdout", stdout), ("stderr", stderr)] {
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        count(name, size)?;
    }
    for (name, rel) in spec.all() {
        if symlinked_parent(root, rel).is_some() {
            // `collect` refuses it without reading it.
            continue;
        }
        let path = root.join(rel);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_file() {
            count(name, meta.len())?;
            continue;
        }
        if !meta.is_dir() {
            continue;
        }
        let mut stack = vec![path.clone()];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| output_error(&dir, e))?;
            for entry in entries {
                let entry =
                    entry.map_err(|e| Error::local(format!("listing {}", dir.display()), e))?;
                let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                    continue;
                };
                if meta.is_dir() {
                    stack.push(entry.path());
                } else if meta.is_file() {
                    let inside = entry.path();
                    let inside = inside.strip_prefix(&path).unwrap_or(&inside);
                    count(&format!("{name}/{}", inside.display()), meta.len())?;
                }
            }
        }
    }
    Ok(())
}

/// A failure to read what the action left: an output it made unreadable is
/// the action's fault, anything else the agent's disk.
pub(super) fn output_error(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        return Error::BadInput(format!(
            "the action left its output {name:?} unreadable ({e}); outputs must stay readable"
        ));
    }
    Error::local(format!("reading {}", path.display()), e)
}

pub(super) fn hash_file(path: &Path, function: Function) -> Result<Digest, Error> {
    let mut file = std::fs::File::open(path).map_err(|e| output_error(path, e))?;
    let mut hasher = function.hasher();
    // Sized to the file (most outputs, stdout and stderr are small): a
    // 1 MiB buffer for each would cost more to map and zero than to hash.
    let size = file.metadata().map_or(0, |m| m.len());
    let mut buf = vec![
        0u8;
        usize::try_from(size)
            .unwrap_or(usize::MAX)
            .clamp(4 << 10, 1 << 20)
    ];
    let mut n = 0u64;
    loop {
        let read = file
            .read(&mut buf)
            .map_err(|e| Error::local(format!("reading {}", path.display()), e))?;
        if read == 0 {
            return Ok(hasher.finish_with_size(n));
        }
        hasher.update(&buf[..read]);
        n += read as u64;
    }
}

pub(super) fn is_executable(meta: &std::fs::Metadata) -> bool {
    meta.permissions().mode() & 0o111 != 0
}

pub(super) fn utf8_name(name: &std::ffi::OsStr, dir: &Path) -> Result<String, Error> {
    name.to_str().map(str::to_owned).ok_or_else(|| {
        Error::BadInput(format!(
            "an output under {} has a name that is not UTF-8",
            dir.display()
        ))
    })
}

/// Builds the Directory for `dir` and, recursively, its children.
pub(super) fn directory(
    dir: &Path,
    function: Function,
    blobs: &mut HashMap<Digest, Blob>,
    children: &mut HashMap<Digest, reapi::Directory>,
) -> Result<(reapi::Directory, Digest), Error> {
    let mut entries: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| output_error(dir, e))?
        .map(|e| {
            let e = e.map_err(|err| Error::local(format!("listing {}", dir.display()), err))?;
            Ok((utf8_name(&e.file_name(), dir)?, e.path()))
        })
        .collect::<Result<_, Error>>()?;
    entries.sort();
    let mut out = reapi::Directory::default();
    for (name, path) in entries {
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| Error::local(format!("reading {}", path.display()), e))?;
        if meta.file_type().is_symlink() {
            let target =
                std::fs::read_link(&path).map_err(|e| Error::local("reading a symlink", e))?;
            out.symlinks.push(reapi::SymlinkNode {
                name,
                target: target.to_string_lossy().into_owned(),
                node_properties: None,
            });
        } else if meta.is_dir() {
            let (child, digest) = directory(&path, function, blobs, children)?;
            children.insert(digest, child);
            out.directories.push(reapi::DirectoryNode {
                name,
                digest: Some(digest.to_proto()),
            });
        } else if meta.is_file() {
            let digest = hash_file(&path, function)?;
            blobs.insert(digest, Blob::File(path));
            out.files.push(reapi::FileNode {
                name,
                digest: Some(digest.to_proto()),
                is_executable: is_executable(&meta),
                node_properties: None,
            });
        }
    }
    let digest = function.digest_of(&out.encode_to_vec());
    Ok((out, digest))
}

/// An output directory in the forms the client asked for: a Tree blob,
/// every Directory as a blob of its own, or both. A digest is reported
/// only for what is uploaded.
pub(super) fn output_directory(
    name: &str,
    (root, root_digest): (reapi::Directory, Digest),
    children: HashMap<Digest, reapi::Directory>,
    format: DirectoryFormat,
    blobs: &mut HashMap<Digest, Blob>,
) -> reapi::OutputDirectory {
    let mut out = reapi::OutputDirectory {
        path: name.to_owned(),
        ..Default::default()
    };
    if format.directories {
        for (digest, dir) in
            std::iter::once((root_digest, &root)).chain(children.iter().map(|(d, c)| (*d, c)))
        {
            blobs.insert(digest, Blob::Bytes(dir.encode_to_vec().into()));
        }
        out.root_directory_digest = Some(root_digest.to_proto());
    }
    if format.tree {
        let tree = reapi::Tree {
            root: Some(root),
            children: children.into_values().collect(),
        };
        let bytes = bytes::Bytes::from(tree.encode_to_vec());
        let tree_digest = root_digest.function.digest_of(&bytes);
        blobs.insert(tree_digest, Blob::Bytes(bytes));
        out.tree_digest = Some(tree_digest.to_proto());
    }
    out
}

pub(super) enum Kind {
    Path,
    File,
    Directory,
}

/// The first directory above `rel` (inside `root`) that is a symlink, if
/// any: following it could read files from anywhere on the host.
pub(super) fn symlinked_parent(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut at = root.to_path_buf();
    let parent = rel.parent()?;
    for component in parent.components() {
        at.push(component);
        if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Some(at);
        }
    }
    None
}

pub(super) fn collect(
    root: &Path,
    spec: &OutputSpec,
    function: Function,
    stdout: &Path,
    stderr: &Path,
) -> Result<Collected, Error> {
    let mut result = reapi::ActionResult::default();
    let mut blobs = HashMap::new();
    // Outputs of the wrong type: the action ran, so its exit code, stdout,
    // stderr and other outputs are kept, and the client is told.
    let mut wrong_type = Vec::new();
    let lists = [
        (Kind::Path, &spec.paths),
        (Kind::File, &spec.files),
        (Kind::Directory, &spec.directories),
    ];
    for (kind, list) in lists {
        for (name, rel) in list {
            if let Some(link) = symlinked_parent(root, rel) {
                return Err(Error::BadInput(format!(
                    "output {name:?} lies under {}, which the action made a symlink; outputs are \
                     collected only from inside the input root",
                    link.display()
                )));
            }
            let path = root.join(rel);
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                let target =
                    std::fs::read_link(&path).map_err(|e| Error::local("reading a symlink", e))?;
                let symlink = reapi::OutputSymlink {
                    path: name.clone(),
                    target: target.to_string_lossy().into_owned(),
                    node_properties: None,
                };
                match kind {
                    Kind::Path => result.output_symlinks.push(symlink),
                    Kind::File => result.output_file_symlinks.push(symlink),
                    Kind::Directory => result.output_directory_symlinks.push(symlink),
                }
            } else if meta.is_dir() {
                if matches!(kind, Kind::File) {
                    wrong_type.push(format!(
                        "output file {name:?} is a directory; declare it as an output directory"
                    ));
                    continue;
                }
                let mut children = HashMap::new();
                let (root_dir, root_digest) =
                    directory(&path, function, &mut blobs, &mut children)?;
                result.output_directories.push(output_directory(
                    name,
                    (root_dir, root_digest),
                    children,
                    spec.format,
                    &mut blobs,
                ));
            } else if meta.is_file() {
                if matches!(kind, Kind::Directory) {
                    wrong_type.push(format!(
                        "output directory {name:?} is a file; declare it as an output file"
                    ));
                    continue;
                }
                let digest = hash_file(&path, function)?;
                blobs.insert(digest, Blob::File(path.clone()));
                result.output_files.push(reapi::OutputFile {
                    path: name.clone(),
                    digest: Some(digest.to_proto()),
                    is_executable: is_executable(&meta),
                    contents: bytes::Bytes::new(),
                    node_properties: None,
                });
            }
        }
    }
    for problem in &wrong_type {
        append_note(stderr, problem);
    }
    let stdout_digest = hash_file(stdout, function)?;
    let stderr_digest = hash_file(stderr, function)?;
    blobs.insert(stdout_digest, Blob::File(stdout.to_owned()));
    blobs.insert(stderr_digest, Blob::File(stderr.to_owned()));
    result.stdout_digest = Some(stdout_digest.to_proto());
    result.stderr_digest = Some(stderr_digest.to_proto());
    let status = (!wrong_type.is_empty()).then(|| tonic_types::pb::Status {
        code: tonic::Code::FailedPrecondition as i32,
        message: wrong_type.join("; "),
        details: Vec::new(),
    });
    Ok(Collected {
        result,
        blobs,
        status,
    })
}
