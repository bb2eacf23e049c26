//! Where an action's command runs: in a persistent worker when it is a
//! worker action (`runner::worker`), otherwise (or when no worker can
//! take it, or the worker fails) started afresh. A worker that fails gets
//! the action run once more as a plain command, with a note in its stderr
//! saying why; the action fails only if that run does.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_proto::digest::Digest;
use outpost_proto::fleet;
use outpost_proto::platform::Parsed;
use tokio_util::sync::CancellationToken;

use super::outputs::OutputSpec;
use super::{Executor, Finished, append_note, run_to_end};
use crate::error::Error;
use crate::runner::recycle::Recycling;
use crate::runner::worker::{self, Outcome, Request};
use crate::runner::{Run, RunOptions, Workspace};

/// The action as the command runner needs it.
pub(super) struct Action<'a> {
    pub lease: &'a fleet::Lease,
    /// Its platform, read through the shared vocabulary.
    pub platform: &'a Parsed,
    /// The input files, under the root, with their digests.
    pub inputs: Vec<(PathBuf, Digest)>,
    pub outputs: &'a OutputSpec,
    pub stderr: &'a Path,
    pub timeout: Duration,
}

/// The action's `recycle-runner=true`, read: its runner key and whether
/// it keeps what earlier actions left (`preserve-workspace`). None without
/// the coordinator's warm key (an older coordinator): never recycled.
pub(super) fn recycling(
    lease: &fleet::Lease,
    parsed: &Parsed,
    options: &RunOptions,
) -> Result<Option<Recycling>, Error> {
    if !outpost_proto::warm::wants_recycling(parsed) || lease.warm_key.is_empty() {
        return Ok(None);
    }
    let options = format!("{options:?}");
    Ok(Some(Recycling {
        key: outpost_proto::warm::fingerprint(["runner", lease.warm_key.as_str(), &options]),
        warm_key: lease.warm_key.clone(),
        preserve: parsed
            .get("preserve-workspace")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true")),
    }))
}

impl Executor {
    /// The action's workspace: a kept one of its runner key, or a new one.
    pub(super) async fn workspace_for(
        &self,
        lease: &fleet::Lease,
        recycling: Option<&Recycling>,
    ) -> Result<Workspace, Error> {
        if let Some(r) = recycling
            && let Some(kept) = self.recycler.take(r).await?
        {
            return Ok(kept);
        }
        Workspace::create(&self.actions_dir, &lease.lease_id, self.cache.clone())
    }

    /// The warm keys this agent holds: idle workers and kept workspaces.
    pub fn warm_keys(&self) -> Vec<String> {
        let mut keys = self.workers.warm_keys();
        keys.extend(self.recycler.warm_keys());
        keys.sort();
        keys.dedup();
        keys
    }

    /// Runs `run`'s command, in a worker where the action asks for one.
    pub(super) async fn run_command(
        &self,
        action: Action<'_>,
        run: Run<'_>,
        cancel: &CancellationToken,
    ) -> Result<Finished, Error> {
        let job = worker::plan(
            action.platform,
            &action.lease.warm_key,
            run.argv,
            &run.env,
            run.workdir,
            &format!("{:?}", run.options),
            run.root,
            &action.inputs,
        )?;
        let mut note = None;
        if let Some(job) = job {
            let request = Request {
                env: run.env.clone(),
                workdir: run.workdir,
                options: run.options.clone(),
                root: run.root,
                outputs: action.outputs.all().map(|(_, p)| p.clone()).collect(),
                timeout: action.timeout,
            };
            match self
                .workers
                .run(&self.runners, job, request, cancel)
                .await?
            {
                Outcome::Answered { exit_code, output } => {
                    // Bazel shows a worker's output as the action's stderr.
                    (&run.stderr)
                        .write_all(output.as_bytes())
                        .map_err(|e| Error::local("writing the worker's output", e))?;
                    return Ok(Finished {
                        exit_code,
                        timed_out: false,
                        message: String::new(),
                    });
                }
                Outcome::Busy => {}
                Outcome::Broken(why) => {
                    tracing::warn!(lease_id = %action.lease.lease_id, reason = %why, "persistent worker failed; running the action as a plain command");
                    note = Some(why);
                }
            }
        }
        let finished =
            run_to_end(&self.runners, run, action.stderr, action.timeout, cancel).await?;
        if let Some(why) = note {
            append_note(
                action.stderr,
                &format!("{why}\noutpost: the action ran again as a plain command"),
            );
        }
        Ok(finished)
    }
}
