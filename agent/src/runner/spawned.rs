//! A stub forked by the agent's spawner (Linux): the process handle both
//! `none` and `linux-sandbox` give back. The stub reads its spec from the
//! workspace; a sandbox stub also reports on a status pipe and runs the
//! action in cgroups.

use std::os::fd::AsFd;

use outpost_sandbox::linux::{cgroup, launch, spawner::Mode};
use outpost_sandbox::spec::Spec;

use super::sandbox_users::Lease;
use super::spawner::{Running, Spawner};
use super::{Process, Run};
use crate::error::Error;

pub struct Spawned {
    process: Running,
    /// The sandbox stub's report, read while the action runs.
    report: Option<tokio::task::JoinHandle<launch::Report>>,
    group: Option<cgroup::Group>,
    /// The host user the action runs as (a root agent's sandbox).
    user: Option<Lease>,
}

impl Spawned {
    /// Writes `spec` into the workspace and has the spawner fork a stub of
    /// `mode` for it, with `run`'s output files (and `status`' writer).
    pub fn start(
        spawner: &Spawner,
        mode: Mode,
        spec: &Spec,
        run: Run<'_>,
        status: Option<launch::StatusPipe>,
        group: Option<cgroup::Group>,
    ) -> Result<Spawned, Error> {
        let spec_file = run.dir.join("run.spec");
        let encoded = spec.encode().map_err(Error::BadInput)?;
        std::fs::write(&spec_file, encoded)
            .map_err(|e| Error::local("writing the action's spec", e))?;
        let stdin =
            std::fs::File::open("/dev/null").map_err(|e| Error::local("opening /dev/null", e))?;
        let mut fds = vec![stdin.as_fd(), run.stdout.as_fd(), run.stderr.as_fd()];
        if let Some(s) = &status {
            fds.push(s.writer());
        }
        let process = spawner.run(mode, spec.user, &spec_file, &fds)?;
        drop(fds);
        // The stub's report arrives once the action is running (or could
        // not start); read it while it runs.
        let report = status.map(|s| tokio::task::spawn_blocking(move || s.read()));
        Ok(Spawned {
            process,
            report,
            group,
            user: None,
        })
    }

    /// Keeps `user` until the stub has ended.
    pub fn holding(mut self, user: Option<Lease>) -> Spawned {
        self.user = user;
        self
    }

    /// The sandbox stub's report (the probe reads it itself).
    pub async fn report(&mut self) -> Result<Option<launch::Report>, Error> {
        match self.report.take() {
            None => Ok(None),
            Some(r) => r
                .await
                .map(Some)
                .map_err(|_| Error::Retryable("reading the sandbox's report failed".into())),
        }
    }
}

/// What every stub needs; a backend adds its layout and limits.
pub fn common_spec(run: &Run<'_>) -> Spec {
    Spec {
        argv: run.argv.iter().map(Into::into).collect(),
        env: run.env.iter().map(Into::into).collect(),
        root: run.root.to_owned(),
        workdir: run.workdir.to_owned(),
        ..Spec::default()
    }
}

#[tonic::async_trait]
impl Process for Spawned {
    async fn wait(&mut self) -> Result<i32, Error> {
        self.process.wait().await
    }

    fn stop(&self) {
        self.process.stop();
    }

    async fn finish(mut self: Box<Self>) -> Result<Option<String>, Error> {
        if let Some(report) = self.report().await?
            && let Some(e) = report.error
        {
            return Err(Error::Retryable(format!(
                "the sandbox could not be set up on this agent: {e}"
            )));
        }
        let note = self.group.as_ref().filter(|g| g.oom_killed()).map(|g| {
            format!(
                "the action was killed for running out of memory (its limit is {} MiB; \
                 set action_memory_limit on the agent to change it)",
                g.memory_limit().unwrap_or(0) >> 20
            )
        });
        // Removing the cgroups may wait for the kernel: not on the way of
        // the result.
        if let Some(group) = self.group.take() {
            tokio::task::spawn_blocking(move || drop(group));
        }
        Ok(note)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let ended = self.process.is_done();
        if let Some(user) = self.user.take()
            && !ended
        {
            user.retire();
        }
        // Normally `finish` took the cgroups. An action given up before its
        // end may have a stub still about to join them: never pool those.
        let Some(group) = self.group.take() else {
            return;
        };
        let work = move || {
            if ended {
                drop(group);
            } else {
                group.discard();
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
