//! The reaper stub: `outpost __reap -- PROGRAM ARGS...`.
//!
//! It becomes a child subreaper (Linux), starts the program in a process
//! group of its own and waits. When the program exits, or the stub receives
//! SIGTERM/SIGINT (the agent's timeout or cancellation), it kills the whole
//! group and every process that was re-parented to it — daemons that
//! double-forked or called `setsid` included — and exits with the program's
//! status (128 + N when the program died of signal N).
//!
//! The working directory, environment and standard streams are inherited
//! from whoever started the stub, so the agent sets them on the stub itself.

use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::errno::Errno;
use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Exit code when the program could not be started (as a shell does).
pub const EXIT_CANNOT_RUN: i32 = 127;
/// Exit code when the stub itself was told to stop.
pub const EXIT_KILLED: i32 = 128 + 15;

/// Runs the stub; returns the exit code for the process.
pub fn main(argv: &[String]) -> i32 {
    let Some((program, args)) = argv.split_first() else {
        eprintln!("outpost __reap: no program given");
        return EXIT_CANNOT_RUN;
    };
    let mut command = Command::new(program);
    command.args(args);
    supervise(command)
}

/// The stub for a spec (the spawner's `reap` mode): its program,
/// arguments, environment, and working directory (`root/workdir`).
pub fn run_spec(spec: &crate::spec::Spec) -> i32 {
    let Some((program, args)) = spec.argv.split_first() else {
        eprintln!("outpost: the action has no program");
        return EXIT_CANNOT_RUN;
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(spec.env_pairs())
        .current_dir(spec.root.join(&spec.workdir));
    supervise(command)
}

/// Starts `command` in a process group of its own, waits for it, then
/// kills whatever it left behind; returns its exit code.
fn supervise(mut command: Command) -> i32 {
    #[cfg(os_linux)]
    {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            eprintln!("outpost __reap: cannot become a child subreaper: {e}");
        }
        // If the agent dies (kill -9), stop and take the action down too.
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
        if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
            return EXIT_KILLED;
        }
    }
    // Block the signals we wait for before the child exists, so none is
    // missed; the child gets a clean mask from std's spawn.
    let waited = match block_waited_signals() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("outpost __reap: cannot block signals: {e}");
            return EXIT_CANNOT_RUN;
        }
    };
    let child = match command.process_group(0).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost: cannot run {:?}: {e}", command.get_program());
            return EXIT_CANNOT_RUN;
        }
    };
    let main_pid = Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"));
    let code = loop {
        match waited.wait() {
            Ok(Signal::SIGCHLD) => {
                if let Some(code) = reap_children(main_pid) {
                    break code;
                }
            }
            Ok(_) => break EXIT_KILLED,
            Err(e) => {
                eprintln!("outpost __reap: waiting for signals failed: {e}");
                break EXIT_KILLED;
            }
        }
    };
    kill_everything(main_pid);
    code
}

/// Blocks the signals a stub waits for (a child's exit, and being told to
/// stop) so that none is missed; returns them, for `SigSet::wait`.
pub(crate) fn block_waited_signals() -> nix::Result<SigSet> {
    let mut waited = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        waited.add(s);
    }
    signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&waited), None)?;
    Ok(waited)
}

/// A process's exit code as a shell reports it: its own, or 128+N when
/// signal N killed it; `None` for a status that is not an end.
pub(crate) fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Reaps exited children; returns the main program's exit code once it
/// has exited.
fn reap_children(main_pid: Pid) -> Option<i32> {
    let mut main_code = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return main_code,
            Ok(s) if s.pid() == Some(main_pid) => main_code = exit_code(s).or(main_code),
            Ok(_) => {}
        }
    }
}

/// Kills the program's process group and every remaining descendant, until
/// no child is left. Without leftovers this costs one `waitpid`.
fn kill_everything(main_pid: Pid) {
    let _ = signal::killpg(main_pid, Signal::SIGKILL);
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::ECHILD) => return,
            Ok(WaitStatus::StillAlive) => {
                for pid in children() {
                    let _ = signal::killpg(pid, Signal::SIGKILL);
                    let _ = signal::kill(pid, Signal::SIGKILL);
                }
                // Reap one; killed descendants re-parent to us in turn.
                match waitpid(None, None) {
                    Err(Errno::ECHILD) => return,
                    Err(Errno::EINTR) | Ok(_) => {}
                    Err(_) => return,
                }
            }
            Err(Errno::EINTR) | Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// The stub's direct children (re-parented orphans included).
#[cfg(os_linux)]
fn children() -> Vec<Pid> {
    let me = std::process::id() as i32;
    // The stub is single-threaded, so its one task lists all its children.
    if let Ok(list) = std::fs::read_to_string(format!("/proc/self/task/{me}/children")) {
        return list
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .map(Pid::from_raw)
            .collect();
    }
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may contain spaces; fields resume after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(me) {
            out.push(Pid::from_raw(pid));
        }
    }
    out
}

#[cfg(not(os_linux))]
fn children() -> Vec<Pid> {
    Vec::new()
}
