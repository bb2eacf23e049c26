//! Runs one lease: fetch the Action, Command and input tree, lay the inputs
//! out in a fresh directory (hard links from the local cache), run the
//! command behind the reaper stub, collect and upload the outputs, and
//! build the ActionResult.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use outpost_proto::digest::{Digest, Function};
use outpost_proto::fleet;
use outpost_proto::reapi;
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::error::Error;
use crate::isolation::{Isolation, Layout, Prepared};
use crate::remote::{Blob, Remote};

pub struct Executor {
    pub agent_id: String,
    pub remote: Remote,
    pub cache: Cache,
    pub actions_dir: PathBuf,
    /// How commands are started: the reaper or the sandbox stub.
    pub isolation: std::sync::Arc<Isolation>,
}

/// What the lease produced.
pub struct Ran {
    pub result: reapi::ActionResult,
    pub timed_out: bool,
    /// Why the action ended the way it did, when the agent knows more than
    /// the exit code says (e.g. killed for using too much memory).
    pub message: String,
}

/// Reports progress to the coordinator.
pub trait Events: Send + Sync {
    fn stage(&self, stage: fleet::Stage);
    fn exited(&self, exit_code: i32);
}

fn now() -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(SystemTime::now()))
}

fn span_ms(from: &Option<prost_types::Timestamp>, to: &Option<prost_types::Timestamp>) -> f64 {
    let (Some(a), Some(b)) = (from, to) else {
        return 0.0;
    };
    let nanos = (b.seconds - a.seconds) as f64 * 1e9 + f64::from(b.nanos - a.nanos);
    nanos / 1e6
}

/// A message the coordinator sent with the lease, if it is there and is
/// the blob `digest` names.
fn prefetched<M: Message + Default>(bytes: &bytes::Bytes, digest: Digest) -> Option<M> {
    if bytes.is_empty() || digest.function.digest_of(bytes) != digest {
        return None;
    }
    M::decode(bytes.clone()).ok()
}

/// The input tree's directories sent with the lease, keyed by the digests
/// they verify against.
fn prefetched_tree(blobs: &[fleet::Blob], function: Function) -> HashMap<Digest, reapi::Directory> {
    blobs
        .iter()
        .filter_map(|b| {
            let d = Digest::from_proto_opt(b.digest.as_ref(), function).ok()?;
            (function.digest_of(&b.data) == d).then_some(())?;
            Some((d, reapi::Directory::decode(b.data.clone()).ok()?))
        })
        .collect()
}

/// Runs a fetch or upload step, abandoning it when the lease is cancelled
/// (the coordinator already gave the slot away).
async fn unless_cancelled<T>(
    cancel: &CancellationToken,
    step: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::select! {
        result = step => result,
        () = cancel.cancelled() => Err(Error::Cancelled),
    }
}

fn blocking_err() -> Error {
    Error::Retryable("a blocking task failed".into())
}

impl Executor {
    pub async fn run(
        &self,
        lease: &fleet::Lease,
        cancel: CancellationToken,
        events: &dyn Events,
    ) -> Result<Ran, Error> {
        let function = Function::from_proto(lease.digest_function)
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let action_digest = Digest::from_proto_opt(lease.action_digest.as_ref(), function)
            .map_err(|e| Error::Protocol(format!("lease action digest: {e}")))?;
        let remote = self.remote.with_instance(&lease.instance_name);
        let mut meta = reapi::ExecutedActionMetadata {
            worker: self.agent_id.clone(),
            queued_timestamp: lease.queued_at,
            worker_start_timestamp: now(),
            ..Default::default()
        };

        events.stage(fleet::Stage::FetchingInputs);
        meta.input_fetch_start_timestamp = now();
        let action: reapi::Action = match prefetched(&lease.action, action_digest) {
            Some(a) => a,
            None => unless_cancelled(&cancel, remote.read_message(action_digest, "Action")).await?,
        };
        let digest_field = |d: Option<&reapi::Digest>, what: &str| {
            Digest::from_proto_opt(d, function).map_err(|e| Error::BadInput(format!("{what}: {e}")))
        };
        let command_digest = digest_field(action.command_digest.as_ref(), "Action.command_digest")?;
        let root_digest = digest_field(
            action.input_root_digest.as_ref(),
            "Action.input_root_digest",
        )?;
        let sent_tree = prefetched_tree(&lease.directories, function);
        let (command, tree) = unless_cancelled(&cancel, async {
            let command = async {
                match prefetched(&lease.command, command_digest) {
                    Some(c) => Ok(c),
                    None => {
                        remote
                            .read_message::<reapi::Command>(command_digest, "Command")
                            .await
                    }
                }
            };
            let tree = async {
                if sent_tree.contains_key(&root_digest) {
                    Ok(sent_tree)
                } else {
                    remote.get_tree(root_digest).await
                }
            };
            let (command, tree) = tokio::join!(command, tree);
            Ok((command?, tree?))
        })
        .await?;
        // The coordinator checked it too; the agent does not rely on that.
        outpost_proto::validate::command(&command).map_err(|e| Error::BadInput(e.to_string()))?;
        let platform = match &action.platform {
            Some(p) if !p.properties.is_empty() => &p.properties,
            _ => command
                .platform
                .as_ref()
                .map_or(&[][..], |p| &p.properties[..]),
        };
        let choice = self.isolation.choose(platform)?;
        let dir = self.actions_dir.join(&lease.lease_id);
        let root = dir.join("root");
        let mut cleanup = Cleanup {
            dir: dir.clone(),
            cache: self.cache.clone(),
            linked: Vec::new(),
        };
        let (linked, input_files) =
            unless_cancelled(&cancel, self.materialize(&remote, &root, root_digest, tree)).await?;
        cleanup.linked = linked;
        meta.input_fetch_completed_timestamp = now();

        let workdir_rel = normalize(Path::new(""), &command.working_directory)?;
        let workdir = root.join(&workdir_rel);
        let outputs = OutputSpec::of(&command, &workdir_rel)?;
        let mut writable: Vec<PathBuf> = vec![workdir_rel.clone()];
        writable.extend(
            outputs
                .all()
                .filter_map(|(_, p)| p.parent().map(Path::to_path_buf)),
        );
        writable.sort();
        writable.dedup();
        let read_only = if choice.kind == crate::isolation::Kind::None {
            Vec::new()
        } else {
            crate::isolation::read_only_paths(input_files.iter().map(PathBuf::as_path), &writable)
        };
        {
            let root = root.clone();
            let workdir = workdir.clone();
            let parents: Vec<PathBuf> = outputs
                .all()
                .filter_map(|(_, p)| p.parent().map(Path::to_path_buf))
                .collect();
            let make = move || -> Result<(), Error> {
                std::fs::create_dir_all(&workdir)
                    .map_err(|e| Error::local("creating the working directory", e))?;
                for p in parents {
                    std::fs::create_dir_all(root.join(p))
                        .map_err(|e| Error::local("creating output directories", e))?;
                }
                Ok(())
            };
            // A few directories take less than a hop to a blocking thread.
            if outputs.all().count() <= 8 {
                make()?;
            } else {
                tokio::task::spawn_blocking(make)
                    .await
                    .map_err(|_| blocking_err())??;
            }
        }

        events.stage(fleet::Stage::Running);
        meta.execution_start_timestamp = now();
        let stdout_path = dir.join("stdout");
        let stderr_path = dir.join("stderr");
        let timeout = lease
            .timeout
            .and_then(|t| Duration::try_from(t).ok())
            .unwrap_or(Duration::from_secs(3600));
        let layout = Layout {
            dir: &dir,
            root: &root,
            workdir: &workdir_rel,
            writable,
            read_only,
        };
        let env = command
            .environment_variables
            .iter()
            .map(|v| format!("{}={}", v.name, v.value))
            .collect();
        let prepared = self
            .isolation
            .prepare(choice, &command.arguments, env, &layout)?;
        let Finished {
            exit_code,
            timed_out,
            message,
        } = spawn_and_wait(
            &self.isolation,
            prepared,
            &stdout_path,
            &stderr_path,
            timeout,
            &cancel,
        )
        .await?;
        meta.execution_completed_timestamp = now();
        events.exited(exit_code);

        events.stage(fleet::Stage::UploadingOutputs);
        meta.output_upload_start_timestamp = now();
        let collected = {
            let root = root.clone();
            tokio::task::spawn_blocking(move || {
                collect(&root, &outputs, function, &stdout_path, &stderr_path)
            })
            .await
            .map_err(|_| blocking_err())??
        };
        let Collected { mut result, blobs } = collected;
        unless_cancelled(&cancel, remote.upload(blobs)).await?;
        tracing::debug!(
            lease_id = %lease.lease_id,
            fetch_ms = span_ms(&meta.input_fetch_start_timestamp, &meta.input_fetch_completed_timestamp),
            run_ms = span_ms(&meta.execution_start_timestamp, &meta.execution_completed_timestamp),
            collect_upload_ms = span_ms(&meta.output_upload_start_timestamp, &now()),
            "action stages"
        );
        meta.output_upload_completed_timestamp = now();
        meta.worker_completed_timestamp = now();
        result.exit_code = exit_code;
        result.execution_metadata = Some(meta);
        drop(cleanup);
        Ok(Ran {
            result,
            timed_out,
            message,
        })
    }

    /// Lays out the input tree under `root`; returns the cached digests it
    /// hard-linked and the input files' paths under the root.
    async fn materialize(
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

/// How a command ended.
struct Finished {
    exit_code: i32,
    timed_out: bool,
    message: String,
}

/// Starts a prepared action with its output files, and waits for it, its
/// timeout or its cancellation.
async fn spawn_and_wait(
    isolation: &Isolation,
    prepared: Prepared,
    stdout: &Path,
    stderr: &Path,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Finished, Error> {
    let out =
        std::fs::File::create(stdout).map_err(|e| Error::local("creating the stdout file", e))?;
    let err =
        std::fs::File::create(stderr).map_err(|e| Error::local("creating the stderr file", e))?;
    let mut started = isolation.start(prepared, out, err)?;
    let (exit_code, timed_out) = tokio::select! {
        code = started.wait() => (code?, false),
        () = tokio::time::sleep(timeout) => {
            started.stop();
            (started.wait().await?, true)
        }
        () = cancel.cancelled() => {
            started.stop();
            let _ = started.wait().await;
            return Err(Error::Cancelled);
        }
    };
    let message = started.finish().await?.unwrap_or_default();
    if !message.is_empty() {
        append_note(stderr, &message);
    }
    Ok(Finished {
        exit_code,
        timed_out,
        message,
    })
}

/// Adds the agent's own note to the end of the action's stderr.
fn append_note(stderr: &Path, note: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(stderr) {
        let _ = writeln!(f, "outpost: {note}");
    }
}

/// Removes an action's directory when the lease ends, however it ends, and
/// re-checks the cache entries it linked.
struct Cleanup {
    dir: PathBuf,
    cache: Cache,
    linked: Vec<Digest>,
}

impl Drop for Cleanup {
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

/// Deletes a tree even if the action made parts of it read-only.
fn remove_tree(dir: &Path) {
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

/// GetTree returns directories, not their digests; the agent keys them by
/// re-encoding, which gives another digest when a client encoded a
/// Directory differently. Whatever the tree refers to and the map lacks is
/// fetched by digest.
async fn complete_tree(
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
fn lay_out_directories(
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

/// Joins `rel` onto `base` lexically; `..` may climb but never above the
/// input root (the rules of `validate::resolve`, which the coordinator
/// applied to the Command already).
fn normalize(base: &Path, rel: &str) -> Result<PathBuf, Error> {
    let base: Vec<String> = base
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    outpost_proto::validate::resolve(&base, rel, "the path")
        .map(|segments| segments.iter().collect())
        .map_err(|e| Error::BadInput(e.to_string()))
}

/// Which outputs to collect, each as (name the client used, path under
/// the input root).
struct OutputSpec {
    /// REAPI 2.1+ `output_paths`.
    paths: Vec<(String, PathBuf)>,
    files: Vec<(String, PathBuf)>,
    directories: Vec<(String, PathBuf)>,
}

impl OutputSpec {
    fn of(command: &reapi::Command, workdir: &Path) -> Result<OutputSpec, Error> {
        let resolve = |list: &[String]| -> Result<Vec<(String, PathBuf)>, Error> {
            list.iter()
                .map(|p| Ok((p.clone(), normalize(workdir, p)?)))
                .collect()
        };
        if !command.output_paths.is_empty() {
            return Ok(OutputSpec {
                paths: resolve(&command.output_paths)?,
                files: Vec::new(),
                directories: Vec::new(),
            });
        }
        Ok(OutputSpec {
            paths: Vec::new(),
            files: resolve(&command.output_files)?,
            directories: resolve(&command.output_directories)?,
        })
    }

    fn all(&self) -> impl Iterator<Item = &(String, PathBuf)> {
        self.paths
            .iter()
            .chain(&self.files)
            .chain(&self.directories)
    }
}

struct Collected {
    result: reapi::ActionResult,
    blobs: HashMap<Digest, Blob>,
}

fn hash_file(path: &Path, function: Function) -> Result<Digest, Error> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| Error::local(format!("reading {}", path.display()), e))?;
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

fn is_executable(meta: &std::fs::Metadata) -> bool {
    meta.permissions().mode() & 0o111 != 0
}

fn utf8_name(name: &std::ffi::OsStr, dir: &Path) -> Result<String, Error> {
    name.to_str().map(str::to_owned).ok_or_else(|| {
        Error::BadInput(format!(
            "an output under {} has a name that is not UTF-8",
            dir.display()
        ))
    })
}

/// Builds the Directory for `dir` and, recursively, its children.
fn directory(
    dir: &Path,
    function: Function,
    blobs: &mut HashMap<Digest, Blob>,
    children: &mut HashMap<Digest, reapi::Directory>,
) -> Result<(reapi::Directory, Digest), Error> {
    let mut entries: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| Error::local(format!("listing {}", dir.display()), e))?
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

enum Kind {
    Path,
    File,
    Directory,
}

/// The first directory above `rel` (inside `root`) that is a symlink, if
/// any: following it could read files from anywhere on the host.
fn symlinked_parent(root: &Path, rel: &Path) -> Option<PathBuf> {
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

fn collect(
    root: &Path,
    spec: &OutputSpec,
    function: Function,
    stdout: &Path,
    stderr: &Path,
) -> Result<Collected, Error> {
    let mut result = reapi::ActionResult::default();
    let mut blobs = HashMap::new();
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
                    return Err(Error::BadInput(format!(
                        "output file {name:?} is a directory"
                    )));
                }
                let mut children = HashMap::new();
                let (root_dir, root_digest) =
                    directory(&path, function, &mut blobs, &mut children)?;
                let tree = reapi::Tree {
                    root: Some(root_dir),
                    children: children.into_values().collect(),
                };
                let bytes = bytes::Bytes::from(tree.encode_to_vec());
                let tree_digest = function.digest_of(&bytes);
                blobs.insert(tree_digest, Blob::Bytes(bytes));
                result.output_directories.push(reapi::OutputDirectory {
                    path: name.clone(),
                    tree_digest: Some(tree_digest.to_proto()),
                    is_topologically_sorted: false,
                    root_directory_digest: Some(root_digest.to_proto()),
                });
            } else if meta.is_file() {
                if matches!(kind, Kind::Directory) {
                    return Err(Error::BadInput(format!(
                        "output directory {name:?} is a file"
                    )));
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
    let stdout_digest = hash_file(stdout, function)?;
    let stderr_digest = hash_file(stderr, function)?;
    blobs.insert(stdout_digest, Blob::File(stdout.to_owned()));
    blobs.insert(stderr_digest, Blob::File(stderr.to_owned()));
    result.stdout_digest = Some(stdout_digest.to_proto());
    result.stderr_digest = Some(stderr_digest.to_proto());
    Ok(Collected { result, blobs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_paths_may_climb_but_stay_inside() {
        let wd = Path::new("a/b");
        assert_eq!(
            normalize(wd, "out.txt").expect("ok"),
            PathBuf::from("a/b/out.txt")
        );
        assert_eq!(
            normalize(wd, "../../install").expect("ok"),
            PathBuf::from("install")
        );
        assert_eq!(normalize(wd, ".").expect("ok"), PathBuf::from("a/b"));
        assert!(normalize(wd, "../../../etc").is_err());
        assert!(normalize(wd, "/etc/passwd").is_err());
    }
}
