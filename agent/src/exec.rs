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
use crate::remote::{Blob, Remote};
use crate::runner::{Run, Runners, Workspace, make_dirs};

pub struct Executor {
    pub agent_id: String,
    pub remote: Remote,
    pub cache: Cache,
    pub actions_dir: PathBuf,
    /// How commands are run: the backends.
    pub runners: std::sync::Arc<Runners>,
    /// The most bytes one action's outputs (stdout and stderr included)
    /// may total (`action_output_limit`).
    pub output_limit: u64,
}

/// What the lease produced.
pub struct Ran {
    pub result: reapi::ActionResult,
    pub timed_out: bool,
    /// Why the action ended the way it did, when the agent knows more than
    /// the exit code says (e.g. killed for using too much memory).
    pub message: String,
    /// Not OK when the action ran but its outputs could not all be
    /// collected (an output of the wrong type); the result is then kept
    /// but not cached.
    pub status: Option<tonic_types::pb::Status>,
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
        // The coordinator's reading of the platform; older coordinators
        // send none, and then the Action's (or the Command's) own counts.
        let platform = match (&lease.platform, &action.platform) {
            (Some(p), _) => &p.properties,
            (None, Some(p)) if !p.properties.is_empty() => &p.properties,
            _ => command
                .platform
                .as_ref()
                .map_or(&[][..], |p| &p.properties[..]),
        };
        let options = self.runners.options(platform)?;
        // Removed however the lease ends.
        let mut workspace =
            Workspace::create(&self.actions_dir, &lease.lease_id, self.cache.clone())?;
        let dir = workspace.dir().to_owned();
        let root = workspace.root().to_owned();
        let (linked, input_files) =
            unless_cancelled(&cancel, self.materialize(&remote, &root, root_digest, tree)).await?;
        workspace.laid_out(linked);
        meta.input_fetch_completed_timestamp = now();

        let workdir_rel = normalize(Path::new(""), &command.working_directory)?;
        let outputs = OutputSpec::of(&command, &workdir_rel)?;
        let mut writable: Vec<PathBuf> = vec![workdir_rel.clone()];
        writable.extend(
            outputs
                .all()
                .filter_map(|(_, p)| p.parent().map(Path::to_path_buf)),
        );
        writable.sort();
        writable.dedup();
        {
            let root = root.clone();
            let workdir = workdir_rel.clone();
            let parents: Vec<PathBuf> = outputs
                .all()
                .filter_map(|(_, p)| p.parent().map(Path::to_path_buf))
                .collect();
            // Never through a symlink of the input tree: that would make
            // directories wherever it points, on the host.
            let make = move || -> Result<(), Error> {
                make_dirs(&root, &workdir, "the working directory")?;
                for p in parents {
                    make_dirs(&root, &p, "an output's directory")?;
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
        let run = Run {
            argv: &command.arguments,
            env: command
                .environment_variables
                .iter()
                .map(|v| format!("{}={}", v.name, v.value))
                .collect(),
            dir: &dir,
            root: &root,
            workdir: &workdir_rel,
            writable,
            inputs: &input_files,
            options,
            stdout: std::fs::File::create(&stdout_path)
                .map_err(|e| Error::local("creating the stdout file", e))?,
            stderr: std::fs::File::create(&stderr_path)
                .map_err(|e| Error::local("creating the stderr file", e))?,
        };
        let Finished {
            exit_code,
            timed_out,
            message,
        } = run_to_end(&self.runners, run, &stderr_path, timeout, &cancel).await?;
        workspace.ran();
        meta.execution_completed_timestamp = now();
        events.exited(exit_code);

        events.stage(fleet::Stage::UploadingOutputs);
        meta.output_upload_start_timestamp = now();
        let bounds = OutputBounds {
            total: self.output_limit,
            blob: self.remote.max_blob_size(),
        };
        let collected = {
            let root = root.clone();
            tokio::task::spawn_blocking(move || {
                check_output_sizes(&root, &outputs, &stdout_path, &stderr_path, bounds)?;
                collect(&root, &outputs, function, &stdout_path, &stderr_path)
            })
            .await
            .map_err(|_| blocking_err())??
        };
        let Collected {
            mut result,
            blobs,
            status,
        } = collected;
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
        drop(workspace);
        Ok(Ran {
            result,
            timed_out,
            message,
            status,
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

/// How a command ended.
struct Finished {
    exit_code: i32,
    timed_out: bool,
    message: String,
}

/// Starts `run` and waits for it, its timeout or its cancellation.
async fn run_to_end(
    runners: &Runners,
    run: Run<'_>,
    stderr: &Path,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Finished, Error> {
    // Starting may take a while (Docker pulls the image first): a
    // cancellation stops it too.
    let mut started = tokio::select! {
        started = runners.start(run) => started?,
        () = cancel.cancelled() => return Err(Error::Cancelled),
    };
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
    /// How output directories are reported: as a Tree, as Directory blobs,
    /// or both (`Command.output_directory_format`).
    format: DirectoryFormat,
}

/// Which forms of an output directory the client wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DirectoryFormat {
    tree: bool,
    directories: bool,
}

impl DirectoryFormat {
    fn of(command: &reapi::Command) -> DirectoryFormat {
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
    fn of(command: &reapi::Command, workdir: &Path) -> Result<OutputSpec, Error> {
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
    /// FAILED_PRECONDITION naming the outputs of the wrong type, if any.
    status: Option<tonic_types::pb::Status>,
}

/// Refuses an action whose inputs cannot all be in the input cache at
/// once (`max` bytes): one larger than the cache, or all of them together.
fn inputs_fit<'a>(files: impl Iterator<Item = (Digest, &'a Path)>, max: u64) -> Result<(), Error> {
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

/// What one action may upload.
#[derive(Clone, Copy)]
struct OutputBounds {
    /// All outputs together, stdout and stderr included.
    total: u64,
    /// One blob: the largest the coordinator's CAS accepts, once known.
    blob: Option<u64>,
}

/// Adds up the outputs' sizes (a sparse file counts by its length, which
/// is what would be read and uploaded) and refuses them, before anything
/// is hashed or uploaded, when one is over the CAS's bound or all of them
/// over the agent's.
fn check_output_sizes(
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
fn output_error(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        return Error::BadInput(format!(
            "the action left its output {name:?} unreadable ({e}); outputs must stay readable"
        ));
    }
    Error::local(format!("reading {}", path.display()), e)
}

fn hash_file(path: &Path, function: Function) -> Result<Digest, Error> {
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
fn output_directory(
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

    /// An action directory: `root/` with what `make` leaves there, and
    /// empty stdout and stderr files beside it.
    fn ran(make: impl FnOnce(&Path)) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("mkdir");
        make(&root);
        let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
        std::fs::write(&stdout, "out\n").expect("write");
        std::fs::write(&stderr, "").expect("write");
        (dir, root, stdout, stderr)
    }

    fn spec(paths: &[&str], files: &[&str], directories: &[&str]) -> OutputSpec {
        let command = reapi::Command {
            output_paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            output_files: files.iter().map(|p| (*p).to_owned()).collect(),
            output_directories: directories.iter().map(|p| (*p).to_owned()).collect(),
            ..Default::default()
        };
        OutputSpec::of(&command, Path::new("")).expect("valid")
    }

    /// The Directory blob `digest` names among `blobs`.
    fn directory_blob(blobs: &HashMap<Digest, Blob>, digest: &reapi::Digest) -> reapi::Directory {
        let d = Digest::from_proto_opt(Some(digest), Function::Sha256).expect("digest");
        let Some(Blob::Bytes(bytes)) = blobs.get(&d) else {
            panic!("directory {d} is not uploaded");
        };
        assert_eq!(Function::Sha256.digest_of(bytes), d);
        reapi::Directory::decode(bytes.clone()).expect("a Directory")
    }

    #[test]
    fn output_directories_come_in_the_forms_asked_for() {
        use reapi::command::OutputDirectoryFormat as F;
        let (_dir, root, stdout, stderr) = ran(|root| {
            std::fs::create_dir_all(root.join("out/a/b")).expect("mkdir");
            std::fs::write(root.join("out/a/b/leaf"), "leaf").expect("write");
            std::fs::write(root.join("out/top"), "top").expect("write");
        });
        for format in [F::TreeOnly, F::DirectoryOnly, F::TreeAndDirectory] {
            let command = reapi::Command {
                output_paths: vec!["out".into()],
                output_directory_format: format as i32,
                ..Default::default()
            };
            let outputs = OutputSpec::of(&command, Path::new("")).expect("valid");
            let collected =
                collect(&root, &outputs, Function::Sha256, &stdout, &stderr).expect("collected");
            let out = &collected.result.output_directories[0];
            assert_eq!(
                out.tree_digest.is_some(),
                format != F::DirectoryOnly,
                "{format:?}"
            );
            assert_eq!(
                out.root_directory_digest.is_some(),
                format != F::TreeOnly,
                "{format:?}"
            );
            if let Some(root_digest) = &out.root_directory_digest {
                // Every Directory of the tree is a blob of its own.
                let top = directory_blob(&collected.blobs, root_digest);
                assert_eq!(top.files[0].name, "top");
                let a = directory_blob(
                    &collected.blobs,
                    top.directories[0].digest.as_ref().expect("a"),
                );
                let b = directory_blob(
                    &collected.blobs,
                    a.directories[0].digest.as_ref().expect("b"),
                );
                assert_eq!(b.files[0].name, "leaf");
            }
        }
    }

    #[test]
    fn an_output_of_the_wrong_type_keeps_the_rest_of_the_result() {
        let (_dir, root, stdout, stderr) = ran(|root| {
            std::fs::create_dir(root.join("file-but-dir")).expect("mkdir");
            std::fs::write(root.join("dir-but-file"), "x").expect("write");
            std::fs::write(root.join("fine"), "y").expect("write");
        });
        let outputs = spec(&[], &["file-but-dir", "fine"], &["dir-but-file"]);
        let collected =
            collect(&root, &outputs, Function::Sha256, &stdout, &stderr).expect("collected");
        let status = collected.status.expect("a status");
        assert_eq!(status.code, tonic::Code::FailedPrecondition as i32);
        assert!(
            status
                .message
                .contains("output file \"file-but-dir\" is a directory"),
            "{}",
            status.message
        );
        assert!(
            status
                .message
                .contains("output directory \"dir-but-file\" is a file"),
            "{}",
            status.message
        );
        let result = collected.result;
        let files: Vec<&str> = result
            .output_files
            .iter()
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(files, ["fine"]);
        assert!(result.stdout_digest.is_some() && result.stderr_digest.is_some());
        let note = std::fs::read_to_string(&stderr).expect("read");
        assert!(note.contains("outpost: output file"), "{note}");
    }

    #[test]
    fn an_output_path_given_twice_is_collected_once() {
        let outputs = spec(&["a", "./a", "b"], &[], &[]);
        let names: Vec<&str> = outputs.all().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    fn bounds(total: u64, blob: Option<u64>) -> OutputBounds {
        OutputBounds { total, blob }
    }

    #[test]
    fn outputs_are_measured_by_length_before_anything_is_read() {
        let (_dir, root, stdout, stderr) = ran(|root| {
            // Sparse: 4 GiB long, nothing on disk.
            let f = std::fs::File::create(root.join("sparse")).expect("create");
            f.set_len(4 << 30).expect("truncate");
            std::fs::create_dir_all(root.join("tree/sub")).expect("mkdir");
            std::fs::write(root.join("tree/sub/leaf"), vec![0u8; 3000]).expect("write");
        });
        let sparse = spec(&["sparse"], &[], &[]);
        let err = check_output_sizes(&root, &sparse, &stdout, &stderr, bounds(1 << 30, None))
            .expect_err("over the agent's bound");
        assert_eq!(err.fault(), outpost_proto::fleet::Fault::Action);
        let text = err.to_string();
        for words in [
            "\"sparse\"",
            "4294967296 bytes",
            "action_output_limit of 1GiB",
        ] {
            assert!(text.contains(words), "{words}: {text}");
        }
        let err = check_output_sizes(
            &root,
            &sparse,
            &stdout,
            &stderr,
            bounds(u64::MAX, Some(1 << 20)),
        )
        .expect_err("over the CAS's bound");
        let text = err.to_string();
        for words in ["\"sparse\"", "4294967296 bytes", "1MiB", "max_cas_size"] {
            assert!(text.contains(words), "{words}: {text}");
        }
        // Files inside an output directory count, named by their path.
        let tree = spec(&["tree"], &[], &[]);
        let err = check_output_sizes(&root, &tree, &stdout, &stderr, bounds(2000, None))
            .expect_err("over");
        assert!(err.to_string().contains("\"tree/sub/leaf\""), "{err}");
        check_output_sizes(&root, &tree, &stdout, &stderr, bounds(4000, Some(3000)))
            .expect("within both bounds");
        // stdout counts too.
        let none = spec(&[], &[], &[]);
        assert!(check_output_sizes(&root, &none, &stdout, &stderr, bounds(2, None)).is_err());
    }

    #[test]
    fn inputs_must_fit_the_input_cache() {
        let small = Function::Sha256.digest_of(&[1u8; 600]);
        let other = Function::Sha256.digest_of(&[2u8; 600]);
        let big = Function::Sha256.digest_of(&[3u8; 2000]);
        let at = |d: Digest, p: &'static str| (d, Path::new(p));
        inputs_fit([at(small, "a"), at(small, "copy-of-a")].into_iter(), 1000)
            .expect("one blob counted once");
        let err = inputs_fit([at(small, "a"), at(big, "pkg/big")].into_iter(), 1000)
            .expect_err("one input too large");
        assert_eq!(err.fault(), outpost_proto::fleet::Fault::Action);
        let text = err.to_string();
        for words in ["pkg/big", "2000 bytes", "1000 bytes", "cache_size"] {
            assert!(text.contains(words), "{words}: {text}");
        }
        let err = inputs_fit([at(small, "a"), at(other, "b")].into_iter(), 1000)
            .expect_err("together too large");
        assert!(err.to_string().contains("total 1200 bytes"), "{err}");
    }
}
