//! A started action's container: waited for, killed, inspected for an
//! OOM kill, removed however it ends, and its files given back to the
//! agent's user when another user made them.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Instant;

use bollard::container::LogOutput;
use bollard::errors::Error as EngineError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, Mount};
use bollard::query_parameters::{KillContainerOptionsBuilder, WaitContainerOptionsBuilder};
use tokio_stream::{Stream, StreamExt as _};

use crate::error::Error;
use crate::runner::Process;

use super::*;

pub(super) type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, EngineError>> + Send>>;

/// Copies the container's output into the action's stdout and stderr.
pub(super) async fn copy_output(
    mut output: Output,
    mut stdout: std::fs::File,
    mut stderr: std::fs::File,
) -> Result<(), String> {
    use std::io::Write;
    while let Some(item) = output.next().await {
        let written = match item.map_err(|e| e.to_string())? {
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                stdout.write_all(&message)
            }
            LogOutput::StdErr { message } => stderr.write_all(&message),
            LogOutput::StdIn { .. } => Ok(()),
        };
        written.map_err(|e| format!("writing the action's output: {e}"))?;
    }
    Ok(())
}

/// A started action's container; removed when it is finished or dropped.
pub(super) struct Container {
    pub(super) engine: bollard::Docker,
    pub(super) long: bollard::Docker,
    pub(super) socket: PathBuf,
    pub(super) id: String,
    pub(super) handle: tokio::runtime::Handle,
    pub(super) copying: Option<tokio::task::JoinHandle<Result<(), String>>>,
    pub(super) oom_killed: bool,
    pub(super) memory_limit: Option<u64>,
    pub(super) removed: bool,
    /// Its image's use, given back once the container is gone.
    pub(super) image_use: Option<ImageUse>,
    /// An action of another user on a non-root agent: its files go back to
    /// the agent's user.
    pub(super) give_back: Option<GiveBack>,
}

/// What giving an action's files back to the agent's user needs.
pub(super) struct GiveBack {
    pub(super) image: String,
    /// The action's mounts: the inputs stay read-only (and unchanged).
    pub(super) mounts: Vec<Mount>,
    pub(super) root: PathBuf,
    /// The agent's `uid:gid`.
    pub(super) owner: String,
}

#[tonic::async_trait]
impl Process for Container {
    async fn wait(&mut self) -> Result<i32, Error> {
        let began = Instant::now();
        let mut waiting = self.long.wait_container(
            &self.id,
            Some(
                WaitContainerOptionsBuilder::new()
                    .condition("not-running")
                    .build(),
            ),
        );
        let code = match waiting.next().await {
            Some(Ok(r)) => r.status_code,
            // bollard reports a non-zero exit as an error carrying it.
            Some(Err(EngineError::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => {
                return Err(engine_down(
                    &self.socket,
                    "waiting for the action's container",
                    e,
                ));
            }
            None => -1,
        };
        if let Some(copying) = self.copying.take() {
            match tokio::time::timeout(OUTPUT_DRAIN, copying).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::warn!(container = %self.id, error = %e, "reading a container's output failed")
                }
                Ok(Err(_)) | Err(_) => {
                    tracing::warn!(container = %self.id, "a container's output did not end with it")
                }
            }
        }
        tracing::debug!(
            container = %self.id,
            wait_ms = began.elapsed().as_secs_f64() * 1000.0,
            "container exited"
        );
        // Killed (128+SIGKILL), or no code said: the engine knows whether
        // it was for memory. Other exits need no more calls.
        if code == 137 || code < 0 {
            let state = self
                .engine
                .inspect_container(&self.id, None)
                .await
                .map_err(|e| engine_down(&self.socket, "inspecting the action's container", e))?
                .state
                .unwrap_or_default();
            self.oom_killed = state.oom_killed.unwrap_or(false);
            return Ok(i32::try_from(state.exit_code.unwrap_or(code)).unwrap_or(-1));
        }
        Ok(i32::try_from(code).unwrap_or(-1))
    }

    fn stop(&self) {
        let (engine, id) = (self.engine.clone(), self.id.clone());
        self.handle.spawn(async move {
            if let Err(e) = engine
                .kill_container(
                    &id,
                    Some(KillContainerOptionsBuilder::new().signal("KILL").build()),
                )
                .await
            {
                tracing::debug!(container = %id, error = %e, "killing a container");
            }
        });
    }

    async fn finish(mut self: Box<Self>) -> Result<Option<String>, Error> {
        let note = self.oom_killed.then(|| {
            format!(
                "the action was killed for running out of memory (its container's limit is {}; \
                 raise EstimatedMemory in the action's platform or action_memory_limit on the \
                 agent)",
                self.memory_limit.map_or_else(
                    || "the host's memory".to_owned(),
                    |m| format!("{} MiB", m >> 20)
                )
            )
        });
        // Files of another user go back to the agent before it collects
        // them; otherwise the container is removed (on drop) off the way of
        // the result.
        if let Some(g) = self.give_back.take() {
            remove(&self.engine, &self.id)
                .await
                .map_err(|e| engine_down(&self.socket, "removing the action's container", e))?;
            self.removed = true;
            g.run(&self.engine, &self.long).await;
        }
        Ok(note)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(copying) = self.copying.take() {
            copying.abort();
        }
        if self.removed {
            return;
        }
        // Finished, or given up before its end (cancelled): the container
        // goes either way.
        let (engine, id) = (self.engine.clone(), self.id.clone());
        let give_back = self.give_back.take();
        let long = self.long.clone();
        let image_use = self.image_use.take();
        self.handle.spawn(async move {
            if let Err(e) = remove(&engine, &id).await {
                tracing::warn!(container = %id, error = %e, "cannot remove an action's container");
            }
            if let Some(g) = give_back {
                g.run(&engine, &long).await;
            }
            drop(image_use);
        });
    }
}

/// Gives the files an action of another user (root, or its `dockerUser`)
/// left in its input root back to the agent's user, so the agent can
/// collect and remove them: a short container of the same image running
/// `chown -R`, with only the capabilities that needs.
impl GiveBack {
    pub(super) async fn run(self, engine: &bollard::Docker, long: &bollard::Docker) {
        let GiveBack {
            image,
            mounts,
            root,
            owner,
        } = self;
        let root_text = root.to_string_lossy().into_owned();
        let body = ContainerCreateBody {
            image: Some(image),
            entrypoint: Some(Vec::new()),
            cmd: Some(vec![
                "chown".into(),
                "-R".into(),
                "-h".into(),
                owner,
                root_text,
            ]),
            user: Some("0:0".into()),
            network_disabled: Some(true),
            labels: None,
            host_config: Some(HostConfig {
                mounts: Some(mounts),
                network_mode: Some("none".into()),
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: Some(vec!["CHOWN".into(), "DAC_OVERRIDE".into(), "FOWNER".into()]),
                security_opt: Some(vec!["no-new-privileges".into()]),
                log_config: Some(HostConfigLogConfig {
                    typ: Some("none".into()),
                    config: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let result = async {
            let id = engine.create_container(None, body).await?.id;
            let ran = async {
                engine.start_container(&id, None).await?;
                let mut waiting = long
                    .wait_container(&id, None::<bollard::query_parameters::WaitContainerOptions>);
                while let Some(r) = waiting.next().await {
                    match r {
                        // Inputs are read-only: chown says so, and that is fine.
                        Ok(_) | Err(EngineError::DockerContainerWaitError { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok::<_, EngineError>(())
            }
            .await;
            remove(engine, &id).await?;
            ran
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(root = %root.display(), error = %e, "cannot give an action's files back to the agent");
        }
    }
}
