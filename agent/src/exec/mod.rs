//! Runs one lease: fetch the Action, Command and input tree, lay the inputs
//! out in a fresh directory (hard links from the local cache), run the
//! command behind the reaper stub, collect and upload the outputs, and
//! build the ActionResult. Inputs are [`inputs`], outputs [`outputs`].

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use outpost_proto::digest::{Digest, Function};
use outpost_proto::fleet;
use outpost_proto::reapi;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::error::Error;
use crate::remote::Remote;
use crate::runner::{Run, Runners, make_dirs};

mod inputs;
mod outputs;
mod warm;

use inputs::{prefetched, prefetched_tree};
use outputs::{Collected, OutputBounds, OutputSpec, check_output_sizes, collect};
mod stream;
pub use stream::{OutputSink, outbox_sink as live_output_sink};

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
    /// Persistent workers, for the actions that ask for one.
    pub workers: std::sync::Arc<crate::runner::Workers>,
    /// Kept workspaces, for actions with `recycle-runner=true`.
    pub recycler: std::sync::Arc<crate::runner::Recycler>,
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
    /// Where a running action's output chunks go (`stream`); none: the
    /// output is not streamed.
    fn output_sink(&self) -> Option<OutputSink> {
        None
    }
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
        // Read once; everything below goes by this reading.
        let parsed = outpost_proto::platform::parse(platform).map_err(Error::BadInput)?;
        let mut options = self.runners.options(&parsed)?;
        options.gpus = crate::runner::gpu::for_lease(&lease.gpus)?;
        let apple_env =
            crate::runner::xcode::action_environment(platform, &command.environment_variables)?;
        // Removed however the lease ends.
        let recycling = warm::recycling(lease, &parsed, &options)?;
        let mut workspace = self.workspace_for(lease, recycling.as_ref()).await?;
        let dir = workspace.dir().to_owned();
        let root = workspace.root().to_owned();
        let (linked, input_files) =
            unless_cancelled(&cancel, self.materialize(&remote, &root, root_digest, tree)).await?;
        let input_digests: Vec<(PathBuf, Digest)> = input_files
            .iter()
            .cloned()
            .zip(linked.iter().copied())
            .collect();
        workspace.laid_out(linked);
        if recycling.is_some() {
            crate::runner::Recycler::restore(&workspace).await?;
        }
        meta.input_fetch_completed_timestamp = now();

        let workdir_rel = normalize(Path::new(""), &command.working_directory)?;
        let outputs = OutputSpec::of(&command, &workdir_rel)?;
        let output_paths: Vec<PathBuf> = outputs.all().map(|(_, p)| p.clone()).collect();
        let mut writable: Vec<PathBuf> = vec![workdir_rel.clone()];
        writable.extend(
            outputs
                .all()
                .filter_map(|(_, p)| p.parent().map(Path::to_path_buf)),
        );
        // An output directory the input tree already has (BuildStream
        // stages its install root, empty) is written into too.
        writable.extend(
            outputs
                .all()
                .filter(|(_, p)| root.join(p).symlink_metadata().is_ok_and(|m| m.is_dir()))
                .map(|(_, p)| p.to_path_buf()),
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
        // Sends the output as it grows until the lease ends.
        let _streaming = stream::follow(lease, &stdout_path, &stderr_path, events);
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
                .chain(apple_env)
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
        } = self
            .run_command(
                warm::Action {
                    lease,
                    platform: &parsed,
                    inputs: input_digests,
                    outputs: &outputs,
                    stderr: &stderr_path,
                    timeout,
                },
                run,
                &cancel,
            )
            .await?;
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
        match recycling {
            Some(r) => {
                let ok =
                    exit_code == 0 && !timed_out && status.as_ref().is_none_or(|s| s.code == 0);
                self.recycler
                    .give_back(r, workspace, ok, input_files, output_paths)
                    .await;
            }
            None => drop(workspace),
        }
        Ok(Ran {
            result,
            timed_out,
            message,
            status,
        })
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use prost::Message as _;

    use super::inputs::*;
    use super::outputs::*;
    use super::*;
    use crate::remote::Blob;

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
