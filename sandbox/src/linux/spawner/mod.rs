//! The spawner: `outpost __spawner`, started once per agent, forks the
//! stub of every action instead of the agent executing the `outpost`
//! binary again for each one.
//!
//! Executing a large binary costs a millisecond or more (mapping it,
//! relocating it, its first page faults); forking this small,
//! single-threaded process costs a tenth of that. The stub that the fork
//! runs is the same code as `outpost __reap` and `outpost __sandbox`, so
//! an action is contained in exactly the same way either path.
//!
//! When it has nothing else to do, the spawner forks the next stub ahead of
//! time, one for each mode it was asked for (except `sandbox-network`);
//! that stub waits on a socket of its own for its action (mode, spec file
//! and descriptors, passed on as they came), so an action's start pays for
//! neither the fork nor the child's first page faults. A warm `sandbox`
//! stub has also entered its namespaces (user, mount, pid, ipc, uts and a
//! network namespace with loopback up), the costliest part of a sandbox.
//!
//! MODE is `reap`, `sandbox` or `sandbox-network` ([`Mode`]), for a
//! sandbox followed by `@UID:GID` when its stub is to become that host user
//! (an agent running as root runs each slot's actions as a user of their
//! own). Warm stubs are kept per mode and user: a warm stub for a user
//! became it before entering its namespaces, and the spawner, still root,
//! moves it into its action's cgroups when the action comes.
//!
//! The agent talks to the spawner over a `SOCK_SEQPACKET` socket on fd 3,
//! one message per datagram, in plain text:
//!
//! ```text
//! agent → spawner  start ID MODE[@UID:GID] SPEC_FILE
//!                                            with stdin, stdout, stderr
//!                                            (and, for `sandbox`, the
//!                                            status pipe) as SCM_RIGHTS
//!                  signal ID SIGNO           to the stub, if still running
//! spawner → agent  exited ID CODE            the stub's exit code (128+N
//!                                            when killed by signal N)
//!                  failed ID MESSAGE         the stub could not be started
//! ```
//!
//! The chain dies together: the spawner dies with the agent's thread that
//! started it (`PR_SET_PDEATHSIG`), each stub with the spawner, and each
//! action with its stub; the spawner also exits when the agent closes its
//! end of the socket. It runs in a process group of its own, so a terminal's
//! Ctrl-C reaches the agent, which decides what happens to running actions.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{self, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

use crate::spec::{Spec, User};

mod client;
pub use client::{Client, Event};

/// The descriptor the spawner finds its socket on.
const SOCKET_FD: RawFd = 3;
/// The largest message: a spec file's path and a few numbers.
const MAX_MESSAGE: usize = 8192;

/// How a started action is contained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `outpost __reap`: the action in its own process group, everything it
    /// leaves behind killed. Descriptors: stdin, stdout, stderr.
    Reap,
    /// `outpost __sandbox` for an action without network. Descriptors:
    /// stdin, stdout, stderr, status pipe. Its warm stubs have entered
    /// their namespaces already.
    Sandbox,
    /// `outpost __sandbox` for an action with the host's network; never
    /// warm. Descriptors as for `Sandbox`.
    SandboxNetwork,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Reap => "reap",
            Mode::Sandbox => "sandbox",
            Mode::SandboxNetwork => "sandbox-network",
        }
    }

    fn parse(s: &str) -> Option<Mode> {
        match s {
            "reap" => Some(Mode::Reap),
            "sandbox" => Some(Mode::Sandbox),
            "sandbox-network" => Some(Mode::SandboxNetwork),
            _ => None,
        }
    }

    fn descriptors(self) -> usize {
        match self {
            Mode::Reap => 3,
            Mode::Sandbox | Mode::SandboxNetwork => 4,
        }
    }
}

/// What a stub is kept warm for: its mode and the user it became.
type Key = (Mode, Option<User>);

/// `MODE` or `MODE@UID:GID`.
fn key_name(mode: Mode, user: Option<User>) -> String {
    match user {
        Some(u) => format!("{}@{}", mode.name(), u.render()),
        None => mode.name().to_owned(),
    }
}

/// Reads [`key_name`]'s form; only a sandbox becomes another user.
fn parse_key(s: &str) -> Option<Key> {
    match s.split_once('@') {
        None => Some((Mode::parse(s)?, None)),
        Some((mode, user)) => {
            let mode = Mode::parse(mode).filter(|m| *m != Mode::Reap)?;
            Some((mode, Some(User::parse(user)?)))
        }
    }
}

/// Runs the spawner; returns the exit code for the process.
pub fn main() -> i32 {
    match serve() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("outpost __spawner: {e}");
            1
        }
    }
}

fn serve() -> Result<(), String> {
    // The socket moves off fd 3, which stubs use for their status pipe.
    // SAFETY: fcntl on an integer descriptor; no memory is involved.
    let moved = unsafe { libc::fcntl(SOCKET_FD, libc::F_DUPFD_CLOEXEC, 10) };
    if moved == -1 {
        return Err(format!(
            "no socket on fd {SOCKET_FD}: run by the agent only"
        ));
    }
    // SAFETY: `moved` was just made by F_DUPFD and nothing else owns it;
    // SOCKET_FD is ours (the agent put it there) and is closed once.
    let socket = unsafe {
        libc::close(SOCKET_FD);
        OwnedFd::from_raw_fd(moved)
    };
    // Nothing but stdio and the socket, however the spawner was started.
    super::fds::close_range(SOCKET_FD, moved - 1, false);
    super::fds::close_from(moved + 1, false);
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid() == Pid::from_raw(1) {
        return Ok(());
    }
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    chld.thread_block()
        .map_err(|e| format!("blocking SIGCHLD: {e}"))?;
    let exits = SignalFd::with_flags(&chld, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("signalfd: {e}"))?;

    let mut spawner = Spawner {
        socket,
        exits,
        running: HashMap::new(),
        warm: Vec::new(),
        warmable: vec![((Mode::Reap, None), Instant::now())],
        cold_until: Vec::new(),
    };
    let ready = |spawner: &Spawner, timeout: PollTimeout| -> Result<(bool, bool), String> {
        let mut fds = [
            PollFd::new(spawner.socket.as_fd(), PollFlags::POLLIN),
            PollFd::new(spawner.exits.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        Ok((fds[0].any().unwrap_or(false), fds[1].any().unwrap_or(false)))
    };
    loop {
        let mut events = ready(&spawner, PollTimeout::ZERO)?;
        if events == (false, false) {
            // With nothing to do, fork the next action's stub ahead of
            // time, one per kind seen, then wait (until the oldest warm
            // stub is due to be replaced).
            spawner.retire_old();
            for (key, _) in spawner.warmable.clone() {
                if !spawner.warm.iter().any(|w| w.key == key) && !spawner.backing_off(key) {
                    spawner.warm_up(key);
                }
            }
            let due = spawner
                .warm
                .iter()
                .map(|w| WARM_FOR.saturating_sub(w.born.elapsed()))
                .min()
                .and_then(|d| PollTimeout::try_from(d + Duration::from_millis(1)).ok())
                .unwrap_or(PollTimeout::NONE);
            events = ready(&spawner, due)?;
        }
        let (socket_ready, exits_ready) = events;
        if exits_ready {
            while let Ok(Some(_)) = spawner.exits.read_signal() {}
            spawner.reap();
        }
        if socket_ready && !spawner.serve_one()? {
            // The agent is gone: the stubs die with this process.
            return Ok(());
        }
    }
}

struct Spawner {
    socket: OwnedFd,
    exits: SignalFd,
    /// Started stubs by request id.
    running: HashMap<u64, Pid>,
    /// Stubs forked ahead of time, waiting for their action.
    warm: Vec<Warm>,
    /// What to keep a warm stub of: `reap`, and each mode and user asked
    /// for, with when it last was (a user's is let go after [`WARM_FOR`]
    /// unasked, so only the users of running slots stay warm).
    warmable: Vec<(Key, Instant)>,
    /// Keys whose warm stub died before its job (a sandbox that cannot be
    /// set up here, say), and until when they are only forked cold, so a
    /// broken warm-up is not retried in a loop.
    cold_until: Vec<(Key, Instant)>,
}

/// How long a warm stub waits before it is replaced: what it prepared (a
/// copy of the host's mounts above all) should not grow old.
const WARM_FOR: Duration = Duration::from_secs(60);
/// How long a mode is forked cold after its warm-up failed.
const COLD_AFTER_FAILURE: Duration = Duration::from_secs(60);

struct Warm {
    pid: Pid,
    key: Key,
    /// Where its action is sent: mode and spec file, with descriptors. The
    /// stub says `ready` (or `failed WHY`) there once prepared; a failed
    /// one gets no job, and one that fails after its job arrived says so
    /// on the job's status pipe.
    jobs: OwnedFd,
    born: Instant,
}

impl Spawner {
    /// Reports every stub that exited.
    fn reap(&mut self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => status,
            };
            let (Some(pid), Some(code)) = (status.pid(), crate::reaper::exit_code(status)) else {
                continue;
            };
            if let Some(i) = self.warm.iter().position(|w| w.pid == pid) {
                let key = self.warm.swap_remove(i).key;
                self.back_off(key, &format!("it ended with status {code}"));
                continue;
            }
            let Some(id) = self
                .running
                .iter()
                .find_map(|(id, p)| (*p == pid).then_some(*id))
            else {
                continue;
            };
            self.running.remove(&id);
            reply(&self.socket, &format!("exited {id} {code}"));
        }
    }

    /// Handles one request; `false` when the agent closed the socket.
    fn serve_one(&mut self) -> Result<bool, String> {
        let mut buf = [0u8; MAX_MESSAGE];
        let Some((n, received)) = receive(&self.socket, &mut buf)? else {
            return Ok(true);
        };
        if n == 0 {
            return Ok(false);
        }
        let text = &buf[..n];
        let mut parts = text.splitn(4, |b| *b == b' ');
        let (kind, id) = (parts.next(), parts.next());
        let id: Option<u64> = id
            .and_then(|i| std::str::from_utf8(i).ok())
            .and_then(|i| i.parse().ok());
        match (kind, id) {
            (Some(b"signal"), Some(id)) => {
                let signo = parts
                    .next()
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<i32>().ok())
                    .and_then(|s| Signal::try_from(s).ok());
                if let (Some(pid), Some(signo)) = (self.running.get(&id), signo) {
                    let _ = signal::kill(*pid, signo);
                }
            }
            (Some(b"start"), Some(id)) => {
                let job = parts.next().zip(parts.next());
                let key = job
                    .and_then(|(k, _)| std::str::from_utf8(k).ok())
                    .and_then(parse_key);
                match (key, job) {
                    (Some(key), Some((_, spec_file))) if received.len() == key.0.descriptors() => {
                        self.asked_for(key);
                        match self.start(key, spec_file, &received) {
                            Ok(pid) => {
                                self.running.insert(id, pid);
                            }
                            Err(e) => reply(&self.socket, &format!("failed {id} fork: {e}")),
                        }
                    }
                    _ => reply(
                        &self.socket,
                        &format!(
                            "failed {id} malformed request ({} descriptors)",
                            received.len()
                        ),
                    ),
                }
            }
            _ => {
                let shown = String::from_utf8_lossy(text);
                eprintln!("outpost __spawner: ignoring the malformed request {shown:?}");
            }
        }
        Ok(true)
    }

    /// Notes that `key` was asked for: it is kept warm from now on (a
    /// sandbox with the host's network never is).
    fn asked_for(&mut self, key: Key) {
        let now = Instant::now();
        match self.warmable.iter_mut().find(|(k, _)| *k == key) {
            Some((_, used)) => *used = now,
            None if key.0 != Mode::SandboxNetwork => self.warmable.push((key, now)),
            None => {}
        }
    }

    fn backing_off(&mut self, key: Key) -> bool {
        let now = Instant::now();
        self.cold_until.retain(|(_, until)| *until > now);
        self.cold_until.iter().any(|(k, _)| *k == key)
    }

    /// Replaces warm stubs older than [`WARM_FOR`] (killed, then reaped and
    /// ignored).
    fn retire_old(&mut self) {
        // A user's slot not used for a while: its stub is not replaced.
        self.warmable
            .retain(|((_, user), used)| user.is_none() || used.elapsed() < WARM_FOR);
        self.warm.retain(|w| {
            let old = w.born.elapsed() >= WARM_FOR;
            if old {
                let _ = signal::kill(w.pid, Signal::SIGKILL);
            }
            !old
        });
    }

    /// The spawner's own descriptors, which a forked child closes.
    fn descriptors(&self) -> Vec<RawFd> {
        let mut fds = vec![self.socket.as_raw_fd(), self.exits.as_raw_fd()];
        fds.extend(self.warm.iter().map(|w| w.jobs.as_raw_fd()));
        fds
    }

    /// The warm stub of `mode`, if it has not said its preparation failed.
    /// One still preparing is taken too: it finishes before reading its
    /// job, sooner than a fresh fork would, and reports a late failure on
    /// the job's status pipe.
    fn take_warm(&mut self, key: Key) -> Option<Warm> {
        let i = self.warm.iter().position(|w| w.key == key)?;
        let warm = self.warm.swap_remove(i);
        let mut buf = [0u8; 512];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let said = recvmsg::<()>(
            warm.jobs.as_raw_fd(),
            &mut iov,
            None,
            MsgFlags::MSG_DONTWAIT,
        )
        .map(|m| m.bytes);
        match said {
            Ok(n) if n > 0 && buf.starts_with(b"ready") => Some(warm),
            // Still preparing.
            Err(Errno::EAGAIN | Errno::EINTR) => Some(warm),
            // `failed ...`, or gone: not used, and the mode backs off.
            _ => {
                let _ = signal::kill(warm.pid, Signal::SIGKILL);
                let why = String::from_utf8_lossy(&buf[..said.unwrap_or(0)]).into_owned();
                self.back_off(key, &why);
                None
            }
        }
    }

    fn back_off(&mut self, key: Key, why: &str) {
        eprintln!(
            "outpost __spawner: a warm {} stub could not be prepared ({why}); that kind \
             starts cold for {}s",
            key_name(key.0, key.1),
            COLD_AFTER_FAILURE.as_secs()
        );
        self.cold_until.retain(|(k, _)| *k != key);
        self.cold_until
            .push((key, Instant::now() + COLD_AFTER_FAILURE));
    }

    /// The warm stub of `key`, ready for the job in `spec_file`. One that
    /// became another user cannot join root's cgroups itself (a cold stub
    /// joins before it changes user), so it is moved into them here; one
    /// that cannot be moved is killed, and the job starts cold.
    fn warm_for(&mut self, key: Key, spec_file: &Path) -> Option<Warm> {
        let warm = self.take_warm(key)?;
        if key.1.is_some()
            && let Err(e) = move_into_cgroups(warm.pid, spec_file)
        {
            eprintln!("outpost __spawner: {e}; starting the action's stub cold");
            let _ = signal::kill(warm.pid, Signal::SIGKILL);
            return None;
        }
        Some(warm)
    }

    /// Starts a stub for the job: the warm one, or a new fork.
    fn start(&mut self, key: Key, spec_file: &[u8], fds: &[OwnedFd]) -> nix::Result<Pid> {
        let path = Path::new(OsStr::from_bytes(spec_file));
        let mode = key.0;
        if let Some(warm) = self.warm_for(key, path) {
            let mut job = mode.name().as_bytes().to_vec();
            job.push(b' ');
            job.extend_from_slice(spec_file);
            let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            let sent = sendmsg::<()>(
                warm.jobs.as_raw_fd(),
                &[IoSlice::new(&job)],
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            );
            if sent.is_ok() {
                return Ok(warm.pid);
            }
            // It died waiting: reaped (and ignored) later; fork afresh.
            let _ = signal::kill(warm.pid, Signal::SIGKILL);
        }
        let closing = self.descriptors();
        let spawner = nix::unistd::getpid();
        // SAFETY: the spawner is single-threaded, so the child may do anything.
        match unsafe { nix::unistd::fork() }? {
            ForkResult::Parent { child } => Ok(child),
            ForkResult::Child => {
                die_with(spawner);
                run_stub(&closing, mode, None, path, fds)
            }
        }
    }

    /// Forks a stub that prepares what it can for a job in `mode` and
    /// waits for it on a socket of its own.
    fn warm_up(&mut self, key: Key) {
        let (mode, user) = key;
        let Ok((ours, theirs)) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        ) else {
            return;
        };
        let mut closing = self.descriptors();
        closing.push(ours.as_raw_fd());
        let spawner = nix::unistd::getpid();
        // SAFETY: the spawner is single-threaded, so the child may do anything.
        match unsafe { nix::unistd::fork() } {
            Ok(ForkResult::Parent { child }) => {
                self.warm.push(Warm {
                    pid: child,
                    key,
                    jobs: ours,
                    born: Instant::now(),
                });
            }
            Ok(ForkResult::Child) => {
                die_with(spawner);
                let prepared = match mode {
                    Mode::Sandbox => user
                        .map_or(Ok(()), |u| {
                            let became = super::restrict::become_user(u);
                            // Changing credentials cleared the death signal.
                            die_with(spawner);
                            became
                        })
                        .and_then(|()| super::stub::warm()),
                    Mode::Reap | Mode::SandboxNetwork => Ok(()),
                };
                // The spawner reads this before it hands over a job; a job
                // sent meanwhile hears of a failure on its status pipe.
                let said = match &prepared {
                    Ok(()) => "ready".to_owned(),
                    Err(e) => format!("failed {e}"),
                };
                let _ = sendmsg::<()>(
                    theirs.as_raw_fd(),
                    &[IoSlice::new(said.as_bytes())],
                    &[],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                );
                let mut buf = [0u8; MAX_MESSAGE];
                let (n, fds) = loop {
                    match receive(&theirs, &mut buf) {
                        Ok(None) => continue, // Interrupted.
                        // The spawner is gone or gave up on this stub,
                        // which nobody waits for.
                        // SAFETY: _exit ends this process without running
                        // anything the parent registered.
                        Ok(Some((0, _))) => unsafe { libc::_exit(0) },
                        Ok(Some(job)) => break job,
                        Err(e) => {
                            eprintln!("outpost __spawner: a warm stub lost its job: {e}");
                            // SAFETY: as above.
                            unsafe { libc::_exit(crate::reaper::EXIT_CANNOT_RUN) }
                        }
                    }
                };
                let mut parts = buf[..n].splitn(2, |b| *b == b' ');
                let asked = parts
                    .next()
                    .and_then(|m| std::str::from_utf8(m).ok())
                    .and_then(Mode::parse)
                    .filter(|m| *m == mode && m.descriptors() == fds.len());
                let (Some(mode), Some(spec_file)) = (asked, parts.next()) else {
                    // SAFETY: as above.
                    unsafe { libc::_exit(crate::reaper::EXIT_CANNOT_RUN) }
                };
                if let Err(e) = prepared {
                    // Only sandbox stubs prepare, and their jobs carry the
                    // status pipe: the agent retries the action elsewhere.
                    if let Some(status) = fds.get(3) {
                        let line = format!("error: preparing the sandbox: {e}\n");
                        let _ = nix::unistd::write(status, line.as_bytes());
                    }
                    // SAFETY: as above.
                    unsafe { libc::_exit(super::stub::EXIT_SETUP_FAILED) }
                }
                let path = Path::new(OsStr::from_bytes(spec_file)).to_owned();
                closing.push(theirs.as_raw_fd());
                run_stub(&closing, mode, Some(user), &path, &fds)
            }
            Err(_) => {}
        }
    }
}

fn reply(socket: &OwnedFd, text: &str) {
    let iov = [IoSlice::new(text.as_bytes())];
    while let Err(Errno::EINTR) =
        sendmsg::<()>(socket.as_raw_fd(), &iov, &[], MsgFlags::MSG_NOSIGNAL, None)
    {}
}

/// In a freshly forked stub: dies with the spawner from now on, and at
/// once if it already died (the child would have been re-parented).
fn die_with(spawner: Pid) {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid() != spawner {
        // SAFETY: _exit ends this process without running anything the
        // parent registered.
        unsafe { libc::_exit(crate::reaper::EXIT_KILLED) }
    }
}

/// Receives one message and the descriptors sent with it; `None` when
/// interrupted (try again), `Some((0, _))` at the end of the stream.
fn receive(socket: &OwnedFd, buf: &mut [u8]) -> Result<Option<(usize, Vec<OwnedFd>)>, String> {
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let message = match recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    ) {
        Ok(m) => m,
        Err(Errno::EINTR | Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(format!("reading a request: {e}")),
    };
    let mut received: Vec<OwnedFd> = Vec::new();
    let cmsgs = match message.cmsgs() {
        Ok(c) => c,
        Err(e) => {
            // Too many descriptors for the buffer (the kernel closed the
            // rest): the request is answered as malformed, not fatal.
            eprintln!("outpost __spawner: a request's descriptors were cut short: {e}");
            return Ok(Some((message.bytes, received)));
        }
    };
    for cmsg in cmsgs {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this
            // process for this message; nothing else owns them.
            received.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(Some((message.bytes, received)))
}

/// The cgroups `spec_file` names, joined by `pid` on its behalf.
fn move_into_cgroups(pid: Pid, spec_file: &Path) -> Result<(), String> {
    let spec = std::fs::read(spec_file)
        .map_err(|e| format!("reading the spec {}: {e}", spec_file.display()))
        .and_then(|bytes| Spec::decode(&bytes))?;
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, pid.to_string())
            .map_err(|e| format!("moving a warm stub into {}: {e}", procs.display()))?;
    }
    Ok(())
}

/// In a forked child: closes the spawner's descriptors, puts the action's
/// on 0, 1, 2 (and 3), runs the stub and exits with its code. `warmed`:
/// the child prepared for `mode` before its job came, as the user given.
fn run_stub(
    closing: &[RawFd],
    mode: Mode,
    warmed: Option<Option<User>>,
    spec_file: &Path,
    fds: &[OwnedFd],
) -> ! {
    // SAFETY: the child owns its copies of every descriptor. Each received
    // one is first copied above 63, so that moving the copies onto 0..4
    // cannot clobber one not yet moved.
    unsafe {
        for fd in closing {
            libc::close(*fd);
        }
        let mut high = Vec::with_capacity(fds.len());
        for fd in fds {
            let h = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 64);
            if h == -1 {
                libc::_exit(crate::reaper::EXIT_CANNOT_RUN);
            }
            libc::close(fd.as_raw_fd());
            high.push(h);
        }
        for (target, h) in high.into_iter().enumerate() {
            if libc::dup2(h, target as RawFd) == -1 {
                libc::_exit(crate::reaper::EXIT_CANNOT_RUN);
            }
            libc::close(h);
        }
    }
    // The stub starts with its job's descriptors and nothing else.
    super::fds::close_from(fds.len() as RawFd, false);
    let _ = SigSet::all().thread_unblock();
    let code = match (mode, warmed) {
        (Mode::Reap, _) => reap_stub(spec_file),
        (Mode::Sandbox, Some(user)) => super::stub::main_file_warmed(spec_file, user),
        (Mode::Sandbox | Mode::SandboxNetwork, _) => super::stub::main_file(spec_file),
    };
    std::process::exit(code)
}

fn reap_stub(spec_file: &Path) -> i32 {
    let spec = std::fs::read(spec_file)
        .map_err(|e| e.to_string())
        .and_then(|bytes| Spec::decode(&bytes));
    match spec {
        Ok(spec) => crate::reaper::run_spec(&spec),
        Err(e) => {
            eprintln!("outpost: reading the spec {}: {e}", spec_file.display());
            crate::reaper::EXIT_CANNOT_RUN
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_mode_and_user() {
        let user = User {
            uid: 990_001,
            gid: 990_000,
        };
        for key in [
            (Mode::Reap, None),
            (Mode::Sandbox, None),
            (Mode::Sandbox, Some(user)),
            (Mode::SandboxNetwork, Some(user)),
        ] {
            assert_eq!(parse_key(&key_name(key.0, key.1)), Some(key));
        }
        assert_eq!(key_name(Mode::Sandbox, Some(user)), "sandbox@990001:990000");
        assert_eq!(parse_key("reap@1:1"), None, "only a sandbox changes user");
        assert_eq!(parse_key("sandbox@1"), None);
        assert_eq!(parse_key("other"), None);
    }
}
