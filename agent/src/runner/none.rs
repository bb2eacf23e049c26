//! `none`: the command runs as the agent's user with no isolation, behind
//! the reaper stub (`outpost __reap`), which kills everything it started
//! when it ends, times out or is cancelled. For trusted fleets only.

use super::{Backend, Kind, Process, Run};
use crate::error::Error;

pub struct Unisolated {
    #[cfg(os_linux)]
    spawner: std::sync::Arc<super::spawner::Spawner>,
    /// This binary, whose `__reap` mode is the stub (not Linux).
    #[cfg(not(os_linux))]
    exe: std::path::PathBuf,
}

impl Unisolated {
    #[cfg(os_linux)]
    pub fn new(spawner: std::sync::Arc<super::spawner::Spawner>) -> Unisolated {
        Unisolated { spawner }
    }

    #[cfg(not(os_linux))]
    pub fn new(exe: std::path::PathBuf) -> Unisolated {
        Unisolated { exe }
    }
}

#[tonic::async_trait]
impl Backend for Unisolated {
    fn kind(&self) -> Kind {
        Kind::None
    }

    fn describe(&self) -> String {
        "none: actions run as the agent's user, unisolated".to_owned()
    }

    fn allows_network(&self) -> bool {
        // Nothing takes it away.
        true
    }

    async fn start(&self, run: Run<'_>) -> Result<Box<dyn Process>, Error> {
        #[cfg(os_linux)]
        {
            use outpost_sandbox::linux::spawner::Mode;
            let spec = super::spawned::common_spec(&run);
            let process =
                super::spawned::Spawned::start(&self.spawner, Mode::Reap, &spec, run, None, None)?;
            Ok(Box::new(process))
        }
        #[cfg(not(os_linux))]
        {
            let mut command = std::process::Command::new(&self.exe);
            command
                .arg("__reap")
                .arg("--")
                .args(run.argv)
                .current_dir(run.root.join(run.workdir))
                .env_clear()
                .envs(run.env.iter().map(|e| e.split_once('=').unwrap_or((e, ""))))
                .stdin(std::process::Stdio::null())
                .stdout(run.stdout)
                .stderr(run.stderr);
            let child = tokio::process::Command::from(command)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| Error::local("starting the action", e))?;
            Ok(Box::new(Child(child)))
        }
    }
}

/// The reaper stub as a child process (not Linux).
#[cfg(not(os_linux))]
struct Child(tokio::process::Child);

#[cfg(not(os_linux))]
#[tonic::async_trait]
impl Process for Child {
    async fn wait(&mut self) -> Result<i32, Error> {
        use std::os::unix::process::ExitStatusExt;
        let status = self
            .0
            .wait()
            .await
            .map_err(|e| Error::local("waiting for the action", e))?;
        Ok(status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(-1))
    }

    fn stop(&self) {
        if let Some(pid) = self.0.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    async fn finish(self: Box<Self>) -> Result<Option<String>, Error> {
        Ok(None)
    }
}
