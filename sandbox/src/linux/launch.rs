//! The agent's side of starting the stub: the command line, and a status
//! pipe the stub reports through until the action's `exec` closes it.
//!
//! Status lines are `error: MESSAGE` (the sandbox could not be built: an
//! agent problem, not the action's) and `landlock: STATUS`.

use std::io::{PipeReader, PipeWriter, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// The descriptor the stub finds its status pipe on.
pub const STATUS_FD: i32 = 3;

/// The stub's command for a spec file, and the pipe it reports through.
pub fn command(exe: &Path, spec_file: &Path) -> std::io::Result<(Command, StatusPipe)> {
    let (reader, writer) = std::io::pipe()?;
    let mut command = Command::new(exe);
    command.arg("__sandbox").arg(spec_file);
    let fd = writer.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (dup2, fcntl) on descriptors it owns.
    unsafe {
        command.pre_exec(move || {
            if fd == STATUS_FD {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, STATUS_FD) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok((
        command,
        StatusPipe {
            reader,
            writer: Some(writer),
        },
    ))
}

pub struct StatusPipe {
    reader: PipeReader,
    writer: Option<PipeWriter>,
}

/// What the stub reported.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Why the sandbox could not be built.
    pub error: Option<String>,
    /// What Landlock enforced.
    pub landlock: Option<String>,
}

impl StatusPipe {
    /// Call once the stub is started: closes this side's write end, so
    /// reading ends when the action's `exec` (or the stub's exit) closes
    /// the last one.
    pub fn started(&mut self) {
        self.writer = None;
    }

    /// Reads the report (blocks until the action is running or the stub
    /// gave up).
    pub fn read(mut self) -> Report {
        self.writer = None;
        let mut text = String::new();
        let _ = self.reader.read_to_string(&mut text);
        parse(&text)
    }
}

pub fn parse(text: &str) -> Report {
    let mut report = Report::default();
    for line in text.lines() {
        if let Some(e) = line.strip_prefix("error: ") {
            report.error = Some(match report.error.take() {
                Some(first) => format!("{first}; {e}"),
                None => e.to_owned(),
            });
        } else if let Some(l) = line.strip_prefix("landlock: ") {
            report.landlock = Some(l.to_owned());
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_parsed() {
        assert_eq!(parse(""), Report::default());
        let r = parse("landlock: fully enforced\nerror: mount /usr: EPERM\nerror: second\n");
        assert_eq!(r.landlock.as_deref(), Some("fully enforced"));
        assert_eq!(r.error.as_deref(), Some("mount /usr: EPERM; second"));
    }
}
