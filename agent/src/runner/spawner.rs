//! The agent's side of the spawner (`outpost_sandbox::linux::spawner`):
//! one `outpost __spawner` process per agent forks every action's stub.
//! It is started with the agent and started again on the next action if it
//! ever dies (the actions it was running fail as retryable).

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::signal::Signal;
use outpost_sandbox::linux::spawner::{Client, Event, Mode};
use outpost_sandbox::spec::User;
use tokio::sync::oneshot;

use crate::error::Error;

pub struct Spawner {
    exe: PathBuf,
    live: Mutex<Option<Arc<Live>>>,
    next_id: AtomicU64,
    /// Spawner processes started, the first included (a metric).
    pub starts: prometheus_client::metrics::counter::Counter,
}

/// One running spawner process.
struct Live {
    client: Client,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Result<i32, String>>>>,
    gone: AtomicBool,
}

impl Live {
    /// Gives this spawner up: no new actions go to it, it is told to exit
    /// (taking its stubs along), and whoever waits on it hears so.
    fn end(&self) {
        self.gone.store(true, Ordering::Release);
        self.client.shutdown();
        let waiting = std::mem::take(&mut *lock(&self.waiting));
        for (_, s) in waiting {
            let _ = s.send(Err("the agent's spawner process ended".into()));
        }
    }

    fn finish(&self, id: u64, outcome: Result<i32, String>) {
        let sender = lock(&self.waiting).remove(&id);
        if let Some(s) = sender {
            let _ = s.send(outcome);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Spawner {
    /// Starts the spawner (`exe __spawner`).
    pub fn start(exe: &Path) -> std::io::Result<Spawner> {
        let spawner = Spawner {
            exe: exe.to_owned(),
            live: Mutex::new(None),
            next_id: AtomicU64::new(1),
            starts: Default::default(),
        };
        spawner.live()?;
        Ok(spawner)
    }

    /// The running spawner, started again if it died.
    fn live(&self) -> std::io::Result<Arc<Live>> {
        let mut slot = lock(&self.live);
        if let Some(live) = &*slot
            && !live.gone.load(Ordering::Acquire)
        {
            return Ok(Arc::clone(live));
        }
        let live = launch(&self.exe)?;
        self.starts.inc();
        *slot = Some(Arc::clone(&live));
        Ok(live)
    }

    /// Starts a stub in `mode` for `spec_file`, with `fds` as its stdin,
    /// stdout, stderr (and status pipe).
    pub fn run(
        &self,
        mode: Mode,
        user: Option<User>,
        spec_file: &Path,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Running, Error> {
        // A spawner that died a moment ago is found out by the send: the
        // action then goes to a new one.
        let mut last_error = None;
        for _ in 0..2 {
            let live = self
                .live()
                .map_err(|e| Error::local("starting the spawner process", e))?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            lock(&live.waiting).insert(id, tx);
            match live.client.start_run(id, mode, user, spec_file, fds) {
                Ok(()) => {
                    return Ok(Running {
                        id,
                        live,
                        exited: rx,
                        done: false,
                    });
                }
                Err(e) => {
                    lock(&live.waiting).remove(&id);
                    live.end();
                    last_error = Some(e);
                }
            }
        }
        Err(Error::Retryable(format!(
            "handing the action to the spawner process: {}",
            last_error.map_or_else(String::new, |e| e.to_string())
        )))
    }
}

/// Starts a spawner from a thread of its own, which then reads its events
/// for as long as it lives (the spawner dies with the thread that started
/// it, so that thread must not be a pool's).
fn launch(exe: &Path) -> std::io::Result<Arc<Live>> {
    let exe = exe.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("outpost-spawner".into())
        .spawn(move || {
            let (client, mut child) = match Client::start(&exe) {
                Ok(started) => started,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let live = Arc::new(Live {
                client,
                waiting: Mutex::new(HashMap::new()),
                gone: AtomicBool::new(false),
            });
            let _ = tx.send(Ok(Arc::clone(&live)));
            let ended = loop {
                match live.client.next_event() {
                    Ok(Some(Event::Exited { id, code })) => live.finish(id, Ok(code)),
                    Ok(Some(Event::Failed { id, message })) => live.finish(id, Err(message)),
                    Ok(None) => break "it closed its socket".to_owned(),
                    Err(e) => break e.to_string(),
                }
            };
            live.end();
            // It exits on the end of its socket; a confused one is killed.
            let _ = child.kill();
            let status = child.wait();
            tracing::error!(
                ?status,
                "the spawner process ended ({ended}); its actions fail and are retried, \
                 and the next action starts a new one"
            );
        })?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the spawner thread ended"))?
}

/// A started stub.
pub struct Running {
    id: u64,
    live: Arc<Live>,
    exited: oneshot::Receiver<Result<i32, String>>,
    done: bool,
}

impl Running {
    /// The stub's exit code.
    pub async fn wait(&mut self) -> Result<i32, Error> {
        let outcome = (&mut self.exited).await;
        self.done = true;
        match outcome {
            Ok(Ok(code)) => Ok(code),
            Ok(Err(e)) => Err(Error::Retryable(format!("starting the action: {e}"))),
            Err(_) => Err(Error::Retryable("the agent's spawner process ended".into())),
        }
    }

    /// Whether the stub's end was seen.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Tells the stub to stop the action and everything it started.
    pub fn stop(&self) {
        let _ = self.live.client.signal(self.id, Signal::SIGTERM);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.done {
            self.stop();
            lock(&self.live.waiting).remove(&self.id);
        }
    }
}
