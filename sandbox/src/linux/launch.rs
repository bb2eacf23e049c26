//! The status pipe the sandbox stub reports through until the action's
//! `exec` closes it; the stub finds its write end on [`STATUS_FD`].
//!
//! Status lines are `error: MESSAGE` (the sandbox could not be built: an
//! agent problem, not the action's) and `landlock: STATUS`.

use std::io::{PipeReader, PipeWriter, Read};
use std::os::fd::{AsFd, BorrowedFd};

/// The descriptor the stub finds its status pipe on.
pub const STATUS_FD: i32 = 3;

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
    pub fn new() -> std::io::Result<StatusPipe> {
        let (reader, writer) = std::io::pipe()?;
        Ok(StatusPipe {
            reader,
            writer: Some(writer),
        })
    }

    /// The end the stub writes to (handed to it as [`STATUS_FD`]).
    pub fn writer(&self) -> BorrowedFd<'_> {
        self.writer
            .as_ref()
            .expect("the write end is open until read")
            .as_fd()
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
