//! One persistent worker process: started through a backend like any
//! action (so it is sandboxed, or in a container, as the action asks),
//! in a workspace of its own that lives as long as it does.
//!
//! Backends give a process no stdin, so the worker's stdin and stdout are
//! two FIFOs in the control directory of its root, which every backend
//! shows the process: a shell started as the command opens them and execs
//! the worker (`sh -c 'exec "$@" <requests >responses'`). Its stderr is a
//! pipe the agent drains into a bounded tail, kept for error messages. A
//! supervising task owns the process: dropping the [`Worker`] stops it and
//! everything it started, then removes its workspace.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_proto::blaze::worker::{WorkRequest, WorkResponse};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::mirror::{CONTROL, Mirror};
use super::protocol::{Broken, Framing};
use crate::error::Error;
use crate::runner::{Run, RunOptions, Runners, Workspace};

/// Bytes of a worker's stderr kept for error messages.
const STDERR_TAIL: usize = 64 << 10;

/// What starts a worker.
pub struct Start<'a> {
    pub argv: &'a [String],
    pub env: Vec<String>,
    pub workdir: &'a Path,
    pub options: RunOptions,
    pub framing: Framing,
}

pub struct Worker {
    pub key: String,
    /// The routing key it is reported under.
    pub warm_key: String,
    pub framing: Framing,
    /// Requests it answered.
    pub served: u64,
    pub last_used: Instant,
    /// The worker's workspace's root (its execroot).
    root: PathBuf,
    mirror: Mirror,
    requests: tokio::net::unix::pipe::Sender,
    responses: tokio::net::unix::pipe::Receiver,
    stderr: Arc<Mutex<Vec<u8>>>,
    exited: watch::Receiver<Option<i32>>,
    _stop: DropGuard,
}

/// How a request ended, short of an answer.
pub enum Failed {
    /// The worker cannot be used (it died, hung, or answered garbage).
    Broken(String),
    Cancelled,
}

impl Worker {
    /// Starts a worker in a fresh workspace `actions_dir/name`.
    pub async fn start(
        runners: &Runners,
        workspace: Workspace,
        start: Start<'_>,
        key: String,
        warm_key: String,
    ) -> Result<Worker, Error> {
        let dir = workspace.dir().to_owned();
        let root = workspace.root().to_owned();
        let control = root.join(CONTROL);
        let local = |what: &str, e: std::io::Error| Error::local(format!("{what} for a worker"), e);
        std::fs::create_dir_all(root.join(start.workdir))
            .map_err(|e| local("creating the working directory", e))?;
        std::fs::create_dir_all(&control)
            .map_err(|e| local("creating the control directory", e))?;
        let (requests_path, responses_path) = (control.join("requests"), control.join("responses"));
        for fifo in [&requests_path, &responses_path] {
            nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o666))
                .map_err(|e| local("making a FIFO", std::io::Error::from(e)))?;
            // Past the umask: a container's user opens them too.
            std::fs::set_permissions(fifo, std::fs::Permissions::from_mode(0o666))
                .map_err(|e| local("opening up a FIFO", e))?;
        }
        let (requests, responses) = open_fifos(&requests_path, &responses_path)
            .map_err(|e| local("opening the FIFOs", e))?;
        // The FIFOs as the shell finds them from the working directory.
        let up = "../".repeat(start.workdir.components().count());
        let script = format!("exec \"$@\" <'{up}{CONTROL}/requests' >'{up}{CONTROL}/responses'");
        let mut argv = vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            script,
            "outpost-worker".to_owned(),
        ];
        argv.extend(start.argv.iter().cloned());
        let (stderr_tx, stderr_rx) =
            tokio::net::unix::pipe::pipe().map_err(|e| local("making a pipe", e))?;
        let stderr_file = std::fs::File::from(
            stderr_tx
                .into_blocking_fd()
                .map_err(|e| local("making a pipe", e))?,
        );
        let stdout =
            std::fs::File::create(dir.join("stdout")).map_err(|e| local("creating stdout", e))?;
        let run = Run {
            argv: &argv,
            env: start.env,
            dir: &dir,
            root: &root,
            workdir: start.workdir,
            // The whole root is the worker's own: nothing in it is a
            // cache entry (see `mirror`).
            writable: vec![PathBuf::new()],
            inputs: &[],
            options: start.options,
            stdout,
            stderr: stderr_file,
        };
        let process = runners.start(run).await?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(drain(stderr_rx, Arc::clone(&stderr)));
        let stop = CancellationToken::new();
        let (exited_tx, exited) = watch::channel(None);
        tokio::spawn(supervise(process, workspace, stop.clone(), exited_tx));
        Ok(Worker {
            key,
            warm_key,
            framing: start.framing,
            served: 0,
            last_used: Instant::now(),
            root,
            mirror: Mirror::default(),
            requests,
            responses,
            stderr,
            exited,
            _stop: stop.drop_guard(),
        })
    }

    /// Whether the process is still running.
    pub fn alive(&self) -> bool {
        self.exited.borrow().is_none()
    }

    /// The last of its stderr, for an error message.
    pub fn stderr_tail(&self, max: usize) -> String {
        let tail = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        let from = tail.len().saturating_sub(max);
        String::from_utf8_lossy(&tail[from..]).into_owned()
    }

    /// Lays out `action_root` in the worker's root, sends `request` and
    /// waits for the answer (at most `max` bytes) for up to `timeout`;
    /// then moves `outputs` (relative to the roots) into the action's root.
    #[allow(clippy::too_many_arguments)]
    pub async fn serve(
        &mut self,
        action_root: &Path,
        request: &WorkRequest,
        outputs: &[PathBuf],
        max: usize,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<WorkResponse, Failed> {
        let broken = |what: String| Failed::Broken(what);
        let mut mirror = std::mem::take(&mut self.mirror);
        let (from, to) = (action_root.to_owned(), self.root.clone());
        let (mirror, synced) = tokio::task::spawn_blocking(move || {
            let r = mirror.sync(&from, &to);
            (mirror, r)
        })
        .await
        .map_err(|_| broken("laying out the inputs failed".into()))?;
        self.mirror = mirror;
        synced.map_err(|e| {
            broken(format!(
                "laying out the inputs in the worker's directory: {e}"
            ))
        })?;
        let bytes = self.framing.encode(request);
        let exchange = async {
            self.requests
                .write_all(&bytes)
                .await
                .map_err(|e| format!("the worker does not read its requests: {e}"))?;
            self.framing
                .read(&mut self.responses, max)
                .await
                .map_err(|e: Broken| e.to_string())
        };
        let mut exited = self.exited.clone();
        let response = tokio::select! {
            r = exchange => r.map_err(broken)?,
            code = exited.wait_for(Option::is_some) => {
                let code = code.ok().and_then(|c| *c).unwrap_or(-1);
                return Err(broken(format!("the worker exited with code {code} before it answered")));
            }
            () = tokio::time::sleep(timeout) => {
                return Err(broken(format!("the worker did not answer within {}s", timeout.as_secs())));
            }
            () = cancel.cancelled() => return Err(Failed::Cancelled),
        };
        self.served += 1;
        self.last_used = Instant::now();
        let (mut mirror, to, from) = (
            std::mem::take(&mut self.mirror),
            self.root.clone(),
            action_root.to_owned(),
        );
        let outputs = outputs.to_vec();
        let (mirror, taken) = tokio::task::spawn_blocking(move || {
            let r = outputs
                .iter()
                .try_for_each(|o| mirror.take_output(&to, &from, o));
            (mirror, r)
        })
        .await
        .map_err(|_| broken("collecting the outputs failed".into()))?;
        self.mirror = mirror;
        taken.map_err(|e| broken(format!("moving the worker's outputs: {e}")))?;
        Ok(response)
    }
}

/// The agent's ends of the worker's stdin and stdout. Opened read-write
/// (Linux), so neither open waits for the shell, and a worker that has
/// not opened its end yet still gets what was written.
#[cfg(os_linux)]
fn open_fifos(
    requests: &Path,
    responses: &Path,
) -> std::io::Result<(
    tokio::net::unix::pipe::Sender,
    tokio::net::unix::pipe::Receiver,
)> {
    let mut options = tokio::net::unix::pipe::OpenOptions::new();
    options.read_write(true);
    Ok((
        options.open_sender(requests)?,
        options.open_receiver(responses)?,
    ))
}

#[cfg(not(os_linux))]
fn open_fifos(
    _requests: &Path,
    _responses: &Path,
) -> std::io::Result<(
    tokio::net::unix::pipe::Sender,
    tokio::net::unix::pipe::Receiver,
)> {
    Err(std::io::Error::other("persistent workers need Linux"))
}

/// Keeps the last [`STDERR_TAIL`] bytes of the worker's stderr.
async fn drain(mut from: tokio::net::unix::pipe::Receiver, into: Arc<Mutex<Vec<u8>>>) {
    let mut chunk = vec![0u8; 8192];
    loop {
        match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut tail = into.lock().unwrap_or_else(|e| e.into_inner());
                tail.extend_from_slice(&chunk[..n]);
                let excess = tail.len().saturating_sub(STDERR_TAIL);
                tail.drain(..excess);
            }
        }
    }
}

/// Owns the process: reports its exit, stops it when told, and removes the
/// workspace once it is gone.
async fn supervise(
    mut process: Box<dyn crate::runner::Process>,
    workspace: Workspace,
    stop: CancellationToken,
    exited: watch::Sender<Option<i32>>,
) {
    let code = tokio::select! {
        code = process.wait() => code,
        () = stop.cancelled() => {
            process.stop();
            process.wait().await
        }
    };
    let _ = exited.send(Some(code.unwrap_or(-1)));
    if let Err(e) = process.finish().await {
        tracing::debug!(error = %e, "a worker's backend reported on its end");
    }
    drop(workspace);
}
