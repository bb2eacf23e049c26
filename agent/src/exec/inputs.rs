//! Inputs: the Action, Command and tree the lease carried (checked
//! against their digests), the rest of the tree fetched, laid out as
//! directories and hard links from the input cache, which must hold them
//! all at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use outpost_proto::digest::{Digest, Function};
use outpost_proto::fleet;
use outpost_proto::reapi;
use prost::Message;

use super::{Executor, blocking_err};
use crate::error::Error;
use crate::remote::Remote;

/// A message the coordinator sent with the lease, if it is there and is
/// the blob `digest` names.
pub(super) fn prefetched<M: Message + Default>(bytes: &bytes::Bytes, digest: Digest) -> Option<M> {
    if bytes.is_empty() || digest.function.digest_of(bytes) != digest {
        return None;
    }
    M::decode(bytes.clone()).ok()
}

/// The input tree's directories sent with the lease, keyed by the digests
/// they verify against.
pub(super) fn prefetched_tree(
    blobs: &[fleet::Blob],
    function: Function,
) -> HashMap<Digest, reapi::Directory> {
    blobs
        .iter()
        .filter_map(|b| {
            let d = Digest::from_proto_opt(b.digest.as_ref(), function).ok()?;
            (function.digest_of(&b.data) == d).then_some(())?;
            Some((d, reapi::Directory::decode(b.data.clone()).ok()?))
        })
        .collect()
}

/// GetTree returns directories, not their digests; the agent keys them by
/// re-encoding, which gives another digest when a client encoded a
/// Directory differently. Whatever the tree refers to and the map lacks is
/// fetched by digest.
pub(super) async fn complete_tree(
    remote: &Remote,
    root: Digest,
    tree: &mut HashMap<Digest, reapi::Directory>,
) -> Result<(), Error> {
    loop {
        let mut wanted = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            if !seen.insert(d) {
                continue;
            }
            match tree.get(&d) {
                None => wanted.push(d),
                Some(dir) => {
                    for child in &dir.directories {
                        if let Ok(c) = Digest::from_proto_opt(child.digest.as_ref(), root.function)
                        {
                            stack.push(c);
                        }
                    }
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let fetched = remote.read_batch(&wanted).await?;
        for d in wanted {
            let bytes = fetched
                .get(&d)
                .cloned()
                .ok_or_else(|| Error::MissingInput(vec![d]))?;
            let dir = reapi::Directory::decode(bytes)
                .map_err(|e| Error::BadInput(format!("blob {d} is not a Directory: {e}")))?;
            tree.insert(d, dir);
        }
    }
}

/// Creates directories and symlinks; returns the files to place.
pub(super) fn lay_out_directories(
    root: &Path,
    root_digest: Digest,
    tree: &HashMap<Digest, reapi::Directory>,
) -> Result<Vec<(Digest, PathBuf, bool)>, Error> {
    let function = root_digest.function;
    let mut files = Vec::new();
    let mut stack = vec![(root_digest, root.to_owned())];
    while let Some((digest, path)) = stack.pop() {
        let dir = tree
            .get(&digest)
            .ok_or_else(|| Error::MissingInput(vec![digest]))?;
        // Only the root may already exist; anything else existing means a
        // name given twice in one directory (and never follows a symlink).
        let created = if path == root {
            std::fs::create_dir_all(&path)
        } else {
            std::fs::create_dir(&path)
        };
        created.map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                Error::BadInput(format!("input tree has {} more than once", path.display()))
            }
            _ => Error::local(format!("creating {}", path.display()), e),
        })?;
        outpost_proto::validate::directory(dir)
            .map_err(|e| Error::BadInput(format!("in the input tree, {e}")))?;
        for f in &dir.files {
            let d = Digest::from_proto_opt(f.digest.as_ref(), function)
                .map_err(|e| Error::BadInput(format!("file {}: {e}", f.name)))?;
            files.push((d, path.join(&f.name), f.is_executable));
        }
        for s in &dir.symlinks {
            std::os::unix::fs::symlink(&s.target, path.join(&s.name))
                .map_err(|e| Error::local(format!("creating symlink {}", s.name), e))?;
        }
        for d in &dir.directories {
            let child = Digest::from_proto_opt(d.digest.as_ref(), function)
                .map_err(|e| Error::BadInput(format!("directory {}: {e}", d.name)))?;
            stack.push((child, path.join(&d.name)));
        }
    }
    Ok(files)
}

/// Refuses an action whose inputs cannot all be in the input cache at
/// once (`max` bytes): one larger than the cache, or all of them together.
pub(super) fn inputs_fit<'a>(
    files: impl Iterator<Item = (Digest, &'a Path)>,
    max: u64,
) -> Result<(), Error> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    for (d, path) in files {
        if d.size > max {
            return Err(Error::TooLarge(format!(
                "input {} ({d}, {} bytes) is larger than this agent's input cache of {} ({max} \
                 bytes); raise cache_size on the agents or make the input smaller",
                path.display(),
                d.size,
                outpost_proto::units::ByteSize(max)
            )));
        }
        if seen.insert(d) {
            total = total.saturating_add(d.size);
        }
    }
    if total > max {
        return Err(Error::TooLarge(format!(
            "the action's inputs total {total} bytes, more than this agent's input cache of {} \
             ({max} bytes) holds; raise cache_size on the agents or make the inputs smaller",
            outpost_proto::units::ByteSize(max)
        )));
    }
    Ok(())
}

impl Executor {
    /// Lays out the input tree under `root`; returns the cached digests it
    /// hard-linked and the input files' paths under the root.
    pub(super) async fn materialize(
        &self,
        remote: &Remote,
        root: &Path,
        root_digest: Digest,
        mut tree: HashMap<Digest, reapi::Directory>,
    ) -> Result<(Vec<Digest>, Vec<PathBuf>), Error> {
        complete_tree(remote, root_digest, &mut tree).await?;
        let root_owned = root.to_owned();
        let files = tokio::task::spawn_blocking(move || {
            lay_out_directories(&root_owned, root_digest, &tree)
        })
        .await
        .map_err(|_| blocking_err())??;
        let digests: Vec<Digest> = files.iter().map(|(d, _, _)| *d).collect();
        inputs_fit(
            files
                .iter()
                .map(|(d, p, _)| (*d, p.strip_prefix(root).unwrap_or(p))),
            self.cache.max_bytes(),
        )?;
        let paths: Vec<PathBuf> = files
            .iter()
            .filter_map(|(_, p, _)| p.strip_prefix(root).ok().map(Path::to_path_buf))
            .collect();
        self.cache.ensure(remote, &digests).await?;
        let cache = self.cache.clone();
        let unplaced =
            tokio::task::spawn_blocking(move || -> Result<Vec<(Digest, PathBuf, bool)>, Error> {
                let mut again = Vec::new();
                for (d, path, exec) in files {
                    if !cache.place(&d, &path, exec)? {
                        again.push((d, path, exec));
                    }
                }
                Ok(again)
            })
            .await
            .map_err(|_| blocking_err())??;
        if !unplaced.is_empty() {
            // Evicted or tampered with since `ensure`: fetch once more.
            let again: Vec<Digest> = unplaced.iter().map(|(d, _, _)| *d).collect();
            self.cache.ensure(remote, &again).await?;
            for (d, path, exec) in &unplaced {
                if !self.cache.place(d, path, *exec)? {
                    return Err(Error::Retryable(format!(
                        "input {d} could not be placed from the cache"
                    )));
                }
            }
        }
        Ok((digests, paths))
    }
}
