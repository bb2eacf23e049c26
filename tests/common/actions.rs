//! Actions for the end-to-end tests: what to run (`ActionSpec`), its
//! upload, Execute and its stream, and what came back (`Ran`).

use super::*;

/// An action to upload and run.
#[derive(Default, Clone)]
pub struct ActionSpec {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub platform: Vec<(String, String)>,
    pub output_paths: Vec<String>,
    pub timeout: Option<Duration>,
    pub do_not_cache: bool,
    /// Files in the input root: (name, contents).
    pub inputs: Vec<(String, Bytes)>,
    /// Symlinks in the input root: (name, target).
    pub symlinks: Vec<(String, String)>,
    /// `Command.working_directory`.
    pub working_directory: String,
    /// `Command.output_directory_format` (0: TREE_ONLY).
    pub output_directory_format: i32,
}

impl ActionSpec {
    pub fn shell(script: &str) -> ActionSpec {
        ActionSpec {
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            ..ActionSpec::default()
        }
    }

    pub fn with_platform(mut self, name: &str, value: &str) -> ActionSpec {
        self.platform.push((name.into(), value.into()));
        self
    }
}

pub fn put_message<M: prost::Message>(m: &M, uploads: &mut Vec<(Digest, Bytes)>) -> Digest {
    let bytes = Bytes::from(m.encode_to_vec());
    let d = Function::Sha256.digest_of(&bytes);
    uploads.push((d, bytes));
    d
}

/// The Directory for the inputs under `prefix` (paths with `/` make
/// subdirectories; ELF files are executable); every blob goes to
/// `uploads`.
fn input_tree(
    files: &[(String, Bytes)],
    symlinks: &[(String, String)],
    prefix: &str,
    uploads: &mut Vec<(Digest, Bytes)>,
) -> reapi::Directory {
    let mut dir = reapi::Directory::default();
    let mut subdirs = std::collections::BTreeSet::new();
    for (path, data) in files {
        let Some(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        match rest.split_once('/') {
            Some((sub, _)) => {
                subdirs.insert(sub.to_owned());
            }
            None => {
                let d = Function::Sha256.digest_of(data);
                uploads.push((d, data.clone()));
                dir.files.push(reapi::FileNode {
                    name: rest.to_owned(),
                    digest: Some(d.to_proto()),
                    // Programs (ELF files) are inputs the action runs.
                    is_executable: data.starts_with(b"\x7fELF"),
                    ..Default::default()
                });
            }
        }
    }
    for (path, target) in symlinks {
        if let Some(name) = path.strip_prefix(prefix).filter(|n| !n.contains('/')) {
            dir.symlinks.push(reapi::SymlinkNode {
                name: name.to_owned(),
                target: target.clone(),
                ..Default::default()
            });
        }
    }
    for sub in subdirs {
        let child = input_tree(files, symlinks, &format!("{prefix}{sub}/"), uploads);
        let d = put_message(&child, uploads);
        dir.directories.push(reapi::DirectoryNode {
            name: sub,
            digest: Some(d.to_proto()),
        });
    }
    dir.files.sort_by(|a, b| a.name.cmp(&b.name));
    dir.symlinks.sort_by(|a, b| a.name.cmp(&b.name));
    dir
}

impl Client {
    /// Uploads the action, its command and inputs; returns the action digest.
    pub async fn upload_action(&mut self, spec: &ActionSpec) -> Digest {
        let mut uploads = Vec::new();
        let platform = reapi::Platform {
            properties: spec
                .platform
                .iter()
                .map(|(n, v)| reapi::platform::Property {
                    name: n.clone(),
                    value: v.clone(),
                })
                .collect(),
        };
        let command = reapi::Command {
            arguments: spec.args.clone(),
            environment_variables: spec
                .env
                .iter()
                .map(|(n, v)| reapi::command::EnvironmentVariable {
                    name: n.clone(),
                    value: v.clone(),
                })
                .collect(),
            output_paths: spec.output_paths.clone(),
            working_directory: spec.working_directory.clone(),
            output_directory_format: spec.output_directory_format,
            ..Default::default()
        };
        let root = input_tree(&spec.inputs, &spec.symlinks, "", &mut uploads);
        let command_digest = put_message(&command, &mut uploads);
        let root_digest = put_message(&root, &mut uploads);
        let action = reapi::Action {
            command_digest: Some(command_digest.to_proto()),
            input_root_digest: Some(root_digest.to_proto()),
            timeout: spec
                .timeout
                .map(|t| prost_types::Duration::try_from(t).expect("duration")),
            do_not_cache: spec.do_not_cache,
            platform: Some(platform),
            ..Default::default()
        };
        let action_digest = put_message(&action, &mut uploads);
        for (d, data) in uploads {
            self.upload(&d, data).await;
        }
        action_digest
    }

    /// Executes and follows the operation to its end; returns its name and
    /// the response.
    pub async fn execute(
        &mut self,
        action: &Digest,
        skip_cache_lookup: bool,
    ) -> Result<(String, reapi::ExecuteResponse), tonic::Status> {
        let stream = self
            .execution
            .execute(reapi::ExecuteRequest {
                action_digest: Some(action.to_proto()),
                skip_cache_lookup,
                ..Default::default()
            })
            .await?
            .into_inner();
        follow(stream).await
    }

    /// Executes `action` (no cache lookup) on a clone of this client, in
    /// the background; the handle gives what [`Client::execute`] returns.
    pub fn execute_in_background(
        &self,
        action: Digest,
    ) -> tokio::task::JoinHandle<Result<(String, reapi::ExecuteResponse), tonic::Status>> {
        let mut client = self.clone();
        tokio::spawn(async move { client.execute(&action, true).await })
    }
}

impl Client {
    /// Starts executing (no cache lookup) and returns the stream with its
    /// first operation message already read.
    pub async fn start_execute(
        &mut self,
        action: &Digest,
    ) -> (
        tonic::Streaming<outpost_proto::longrunning::Operation>,
        outpost_proto::longrunning::Operation,
    ) {
        let mut stream = self
            .execution
            .execute(reapi::ExecuteRequest {
                action_digest: Some(action.to_proto()),
                skip_cache_lookup: true,
                ..Default::default()
            })
            .await
            .expect("execute")
            .into_inner();
        let first = stream
            .message()
            .await
            .expect("stream")
            .expect("an operation");
        (stream, first)
    }
}

/// An action run to its end, with its stdout and stderr as text.
pub struct Ran {
    pub response: reapi::ExecuteResponse,
    pub result: reapi::ActionResult,
    pub stdout: String,
    pub stderr: String,
}

impl Client {
    /// Uploads and runs `spec` (no cache lookup); fetches its output.
    pub async fn run(&mut self, spec: &ActionSpec) -> Ran {
        let action = self.upload_action(spec).await;
        let (_, response) = self.execute(&action, true).await.expect("execute");
        let result = response.result.clone().unwrap_or_default();
        let stdout = self.text(result.stdout_digest.as_ref()).await;
        let stderr = self.text(result.stderr_digest.as_ref()).await;
        Ran {
            response,
            result,
            stdout,
            stderr,
        }
    }

    /// A blob as text; empty when there is none.
    pub async fn text(&mut self, digest: Option<&reapi::Digest>) -> String {
        let Some(d) = digest else {
            return String::new();
        };
        let d = Digest::from_proto(d, Function::Sha256).expect("digest");
        String::from_utf8_lossy(&self.download(&d).await.expect("download")).into_owned()
    }
}

/// Reads an operation stream to its end.
pub async fn follow(
    stream: tonic::Streaming<outpost_proto::longrunning::Operation>,
) -> Result<(String, reapi::ExecuteResponse), tonic::Status> {
    follow_timed(stream, std::time::Instant::now(), &mut Vec::new()).await
}

/// Reads an operation stream to its end, noting when each message came
/// (seconds since `since`) in `arrivals`.
pub async fn follow_timed(
    mut stream: tonic::Streaming<outpost_proto::longrunning::Operation>,
    since: std::time::Instant,
    arrivals: &mut Vec<f64>,
) -> Result<(String, reapi::ExecuteResponse), tonic::Status> {
    while let Some(op) = stream.message().await? {
        arrivals.push(since.elapsed().as_secs_f64());
        if op.done {
            let response = match op.result {
                Some(outpost_proto::longrunning::operation::Result::Response(any)) => {
                    <reapi::ExecuteResponse as prost::Message>::decode(any.value.as_slice())
                        .expect("ExecuteResponse")
                }
                other => panic!("operation done without a response: {other:?}"),
            };
            return Ok((op.name, response));
        }
    }
    Err(tonic::Status::unknown(
        "the operation stream ended before the operation was done",
    ))
}
