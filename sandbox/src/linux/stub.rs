//! The sandbox stub: `outpost __sandbox SPEC_FILE`, status pipe on fd 3.
//!
//! Three processes, so that killing one kills all:
//! 1. the stub joins the action's cgroups, unshares the user, mount, pid,
//!    ipc, uts (and net) namespaces, maps its own uid and gid, names the
//!    host and brings up loopback, enters a cgroup namespace rooted at the
//!    action's cgroups, and forks; it then waits, and on SIGTERM
//!    (timeout, cancel) kills the next one. A warm stub (see the spawner)
//!    entered its namespaces before its action came, and joins the
//!    cgroups after;
//! 2. init, pid 1 of the new pid namespace, builds the root
//!    ([`mounts`](super::mounts)), forks the action and
//!    reaps whatever is re-parented to it; when the action exits it exits
//!    with its status, and the kernel kills every process left in the
//!    namespace (daemons included);
//! 3. the action: rlimits, Landlock and an empty capability bounding set
//!    ([`restrict`](super::restrict)), then `exec`.
//!
//! The stub joins a keyring of its own and installs the seccomp filter
//! right after entering its namespaces ([`restrict::harden`]), so init and
//! the action inherit both.
//!
//! Each process dies with its parent (`PR_SET_PDEATHSIG`), so the chain
//! ends when the agent dies too.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

use super::launch::STATUS_FD;
use super::{mounts, restrict};
use crate::spec::{Spec, User};

/// Exit code when the sandbox could not be built (the status pipe says why).
pub const EXIT_SETUP_FAILED: i32 = 125;
/// Exit code when the program could not be started (as a shell does).
pub const EXIT_CANNOT_RUN: i32 = 127;
/// Exit code when the stub itself was told to stop.
pub const EXIT_KILLED: i32 = 128 + 15;

/// Where the stub and its children report setup failures.
pub(super) struct Status(Option<File>);

impl Status {
    pub(super) fn line(&mut self, line: &str) {
        if let Some(f) = &mut self.0 {
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}

fn status_pipe() -> Status {
    // The fd is ours if it is open at all: `launch` put it there. Close it
    // at the action's exec, so the agent reads to the end then.
    // SAFETY: fcntl on an integer descriptor; no memory is involved.
    if unsafe { libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
        return Status(None);
    }
    // SAFETY: STATUS_FD is open (checked above) and nothing else in this
    // process owns it.
    Status(Some(unsafe { File::from_raw_fd(STATUS_FD) }))
}

/// Runs the stub; returns the exit code for the process.
pub fn main(args: &[String]) -> i32 {
    let [spec_file] = args else {
        eprintln!("usage: outpost __sandbox SPEC_FILE");
        return EXIT_SETUP_FAILED;
    };
    main_file(std::path::Path::new(spec_file))
}

/// The stub for a spec file, with the status pipe on fd 3 (when open).
pub fn main_file(spec_file: &std::path::Path) -> i32 {
    let mut status = status_pipe();
    match run(spec_file, &mut status) {
        Ok(code) => code,
        Err(e) => {
            status.line(&format!("error: {e}"));
            EXIT_SETUP_FAILED
        }
    }
}

fn run(spec_file: &std::path::Path, status: &mut Status) -> Result<i32, String> {
    let spec = read_spec(spec_file)?;
    run_spec(&spec, status, Entered::No)
}

fn read_spec(spec_file: &std::path::Path) -> Result<Spec, String> {
    let bytes = std::fs::read(spec_file)
        .map_err(|e| format!("reading the spec {}: {e}", spec_file.display()))?;
    Spec::decode(&bytes)
}

/// Whether this process already entered its namespaces (a warm stub).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Entered {
    No,
    /// With a private network namespace.
    Isolated,
}

/// Enters the sandbox's namespaces ahead of its action, for a stub the
/// spawner keeps warm: the costliest step (a network namespace above all)
/// off the action's path. Such a stub takes only actions without network.
pub fn warm() -> Result<(), String> {
    enter(false)?;
    restrict::harden()
}

/// The stub for a spec file, in a process that [`warm`] prepared after
/// becoming `user` (see [`restrict::become_user`]).
pub fn main_file_warmed(spec_file: &std::path::Path, user: Option<User>) -> i32 {
    let mut status = status_pipe();
    let run = read_spec(spec_file).and_then(|spec| {
        if spec.network {
            return Err("a warm sandbox was handed an action with network".into());
        }
        if spec.user != user {
            return Err("a warm sandbox was handed an action of another user".into());
        }
        run_spec(&spec, &mut status, Entered::Isolated)
    });
    match run {
        Ok(code) => code,
        Err(e) => {
            status.line(&format!("error: {e}"));
            EXIT_SETUP_FAILED
        }
    }
}

/// Unshares the user, mount, pid, ipc and uts namespaces (and the network
/// one unless `network`), maps the caller's own uid and gid, and names the
/// host and brings up loopback in them. The pid namespace is for children.
fn enter(network: bool) -> Result<(), String> {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let mut flags = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if !network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    nix::sched::unshare(flags).map_err(|e| {
        format!(
            "creating namespaces: {e} (unprivileged user namespaces must be allowed: \
             sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0, \
             and on Ubuntu kernel.apparmor_restrict_unprivileged_userns=0)"
        )
    })?;
    // Inside, the action keeps the agent's uid and gid (and gets no
    // capabilities: `restrict` empties the bounding set).
    std::fs::write("/proc/self/setgroups", "deny").map_err(|e| format!("setgroups: {e}"))?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))
        .map_err(|e| format!("writing uid_map: {e}"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))
        .map_err(|e| format!("writing gid_map: {e}"))?;
    // Holding capabilities in the new namespaces now: nothing may attach.
    // (Not earlier: a process that is not dumpable has its /proc files
    // owned by root, and could not write its own maps unprivileged.)
    let _ = nix::sys::prctl::set_dumpable(false);
    let _ = nix::unistd::sethostname("localhost");
    if !network {
        restrict::loopback_up().map_err(|e| format!("bringing up loopback: {e}"))?;
    }
    Ok(())
}

/// The stub for a decoded spec.
fn run_spec(spec: &Spec, status: &mut Status, entered: Entered) -> Result<i32, String> {
    if spec.tmp.as_os_str().is_empty() || spec.scratch.as_os_str().is_empty() {
        return Err("the sandbox spec names no tmp or scratch directory".into());
    }
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let parent = nix::unistd::getppid();
    if parent == Pid::from_raw(1) {
        return Ok(EXIT_KILLED);
    }
    // Init and the action are born in the cgroups (a warm stub entered
    // its namespaces before it knew them; the file checks are the same).
    // A warm stub that became another user was moved in by the spawner.
    if entered == Entered::No || spec.user.is_none() {
        for procs in &spec.cgroup_procs {
            std::fs::write(procs, std::process::id().to_string())
                .map_err(|e| format!("joining the cgroup {}: {e}", procs.display()))?;
        }
    }
    if entered == Entered::No {
        if let Some(user) = spec.user {
            restrict::become_user(user)?;
            // Changing credentials cleared the death signal.
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
            if nix::unistd::getppid() != parent {
                return Ok(EXIT_KILLED);
            }
        }
        enter(spec.network)?;
        restrict::harden()?;
    }
    // A cgroup namespace rooted at the action's cgroups: `/proc/self/cgroup`
    // shows `/`, not the agent's cgroup path and id. (A kernel without
    // cgroup namespaces says EINVAL: only that is left out there.)
    match nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP) {
        Ok(()) | Err(Errno::EINVAL) => {}
        Err(e) => return Err(format!("creating the cgroup namespace: {e}")),
    }

    let waited = block_signals()?;
    // Init reads the end of this pipe if the stub is gone (see `init`).
    let (alive_read, alive_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the stub is single-threaded (it runs before any runtime).
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(alive_write);
            let code = init(spec, status, &File::from(alive_read));
            std::process::exit(code)
        }
        ForkResult::Parent { child } => {
            drop(alive_read);
            *status = Status(None);
            let code = wait_for_init(child, &waited);
            drop(alive_write);
            Ok(code)
        }
    }
}

fn block_signals() -> Result<SigSet, String> {
    crate::reaper::block_waited_signals().map_err(|e| format!("blocking signals: {e}"))
}

/// The stub's wait: init's status, or kill it when told to stop.
fn wait_for_init(init: Pid, waited: &SigSet) -> i32 {
    loop {
        match waited.wait() {
            Ok(Signal::SIGCHLD) => loop {
                match waitpid(init, Some(WaitPidFlag::WNOHANG)) {
                    Ok(s) => match crate::reaper::exit_code(s) {
                        Some(code) => return code,
                        None => break,
                    },
                    Err(Errno::EINTR) => {}
                    Err(_) => return EXIT_KILLED,
                }
            },
            _ => {
                // Init's death takes every process in the namespace along.
                let _ = signal::kill(init, Signal::SIGKILL);
                let _ = waitpid(init, None);
                return EXIT_KILLED;
            }
        }
    }
}

/// Whether the stub holding the other end of `pipe` has exited.
fn stub_is_gone(pipe: &File) -> bool {
    use std::io::Read;
    let mut byte = [0u8; 1];
    // Nothing is ever written: end of file means no writer is left,
    // `WouldBlock` that the stub still holds its end.
    matches!((&*pipe).read(&mut byte), Ok(0))
}

/// Pid 1 of the sandbox.
fn init(spec: &Spec, status: &mut Status, stub_alive: &File) -> i32 {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // The stub may have died before that took effect; its end of the pipe
    // is then closed, and reading sees the end at once. (`getppid` cannot
    // tell: it is 0 for pid 1.)
    if stub_is_gone(stub_alive) {
        return EXIT_KILLED;
    }
    // Init holds capabilities in the namespace: nothing may attach to it.
    let _ = nix::sys::prctl::set_dumpable(false);
    // A session and process group of the sandbox's own: `kill(0, ...)` from
    // the action reaches only the sandbox, never the stub, the spawner or
    // other actions (whatever Landlock's scoping covers on this kernel),
    // and the action has no controlling terminal.
    let _ = nix::unistd::setsid();
    if let Err(e) = mounts::build_root(spec) {
        status.line(&format!("error: {e}"));
        return EXIT_SETUP_FAILED;
    }
    let waited = match block_signals() {
        Ok(w) => w,
        Err(e) => {
            status.line(&format!("error: {e}"));
            return EXIT_SETUP_FAILED;
        }
    };
    // SAFETY: init is single-threaded.
    let action = match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Child) => std::process::exit(action(spec, status)),
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            status.line(&format!("error: fork: {e}"));
            return EXIT_SETUP_FAILED;
        }
    };
    *status = Status(None);
    loop {
        if !matches!(waited.wait(), Ok(Signal::SIGCHLD)) {
            continue;
        }
        // Reap everything that exited: the action, and orphans
        // re-parented to init.
        while let Ok(s) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if s == WaitStatus::StillAlive {
                break;
            }
            if s.pid() == Some(action)
                && let Some(code) = crate::reaper::exit_code(s)
            {
                // Returning ends the namespace: leftovers die.
                return code;
            }
        }
    }
}

/// The action's process: restrict, then exec.
fn action(spec: &Spec, status: &mut Status) -> i32 {
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let workdir = spec.exec_root().join(&spec.workdir);
    if let Err(e) = nix::unistd::chdir(&workdir) {
        status.line(&format!(
            "error: entering the working directory {}: {e}",
            workdir.display()
        ));
        return EXIT_SETUP_FAILED;
    }
    match restrict::apply(spec) {
        Ok(landlock) => status.line(&format!("landlock: {landlock}")),
        Err(e) => {
            status.line(&format!("error: {e}"));
            return EXIT_SETUP_FAILED;
        }
    }
    let argv: Vec<CString> = match spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect()
    {
        Ok(v) => v,
        Err(_) => {
            eprintln!("outpost: an argument contains a NUL byte");
            return EXIT_CANNOT_RUN;
        }
    };
    // The action's environment replaces the stub's, so that execvp looks
    // the program up on the action's PATH.
    // SAFETY: this process is single-threaded (forked from init, which is),
    // so nothing reads the environment while it changes.
    unsafe {
        libc::clearenv();
        for (name, value) in spec.env_pairs() {
            std::env::set_var(name, value);
        }
    }
    // The action gets stdio and nothing else (the status pipe, on fd 3,
    // stays open until the exec).
    super::fds::close_from(3, true);
    // The Rust runtime ignores SIGPIPE; the action gets the default back
    // (`yes | head` must end `yes` by SIGPIPE, as in a shell).
    // SAFETY: resetting a disposition to the default installs no handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let e = nix::unistd::execvp(&argv[0], &argv).unwrap_err();
    eprintln!("outpost: cannot run {:?}: {e}", spec.argv[0]);
    EXIT_CANNOT_RUN
}
