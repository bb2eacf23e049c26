//! The agent's end of the spawner's socket ([`Client`]) and what it hears
//! back ([`Event`]); the protocol is described in [`super`].

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, recvmsg, sendmsg, socketpair,
};

use super::{MAX_MESSAGE, Mode, SOCKET_FD, key_name};
use crate::spec::User;

/// What the spawner reports about a started action.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Exited { id: u64, code: i32 },
    Failed { id: u64, message: String },
}

/// The agent's end of the socket.
#[derive(Debug)]
pub struct Client {
    socket: OwnedFd,
}

impl Client {
    /// Starts `exe __spawner`. The spawner dies when the calling thread
    /// ends, so call this from a thread that lives as long as it should.
    pub fn start(exe: &Path) -> std::io::Result<(Client, std::process::Child)> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let fd = theirs.as_raw_fd();
        let mut command = std::process::Command::new(exe);
        // A process group of its own from the start: a terminal's Ctrl-C
        // reaches the agent, which decides what happens to actions.
        command
            .arg0("outpost")
            .arg("__spawner")
            .stdin(std::process::Stdio::null())
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and calls
        // only async-signal-safe functions (dup2, fcntl, close_range) on
        // descriptors it owns.
        unsafe {
            command.pre_exec(move || {
                if fd == SOCKET_FD {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, SOCKET_FD) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // Whatever else the agent holds or inherited (an open
                // directory of the host's, say) never reaches the spawner,
                // its stubs or their actions.
                super::super::fds::close_from(SOCKET_FD + 1, true);
                Ok(())
            });
        }
        let child = command.spawn()?;
        drop(theirs);
        Ok((Client { socket: ours }, child))
    }

    /// Asks for `spec_file` to be run in `mode`, with `fds` as its stdin,
    /// stdout, stderr (and status pipe). Its end arrives as an [`Event`].
    /// `user` is the spec's (a sandbox's stub becomes it): warm stubs are
    /// kept per mode and user.
    pub fn start_run(
        &self,
        id: u64,
        mode: Mode,
        user: Option<User>,
        spec_file: &Path,
        fds: &[BorrowedFd<'_>],
    ) -> std::io::Result<()> {
        if fds.len() != mode.descriptors() {
            return Err(std::io::Error::other(format!(
                "{} needs {} descriptors, not {}",
                mode.name(),
                mode.descriptors(),
                fds.len()
            )));
        }
        let mut message = format!("start {id} {} ", key_name(mode, user)).into_bytes();
        message.extend_from_slice(spec_file.as_os_str().as_bytes());
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        self.send(&message, &[ControlMessage::ScmRights(&raw)])
    }

    /// Sends `signal` to a started action's stub (SIGTERM stops it and
    /// everything it started); nothing if it already ended.
    pub fn signal(&self, id: u64, signal: Signal) -> std::io::Result<()> {
        self.send(format!("signal {id} {}", signal as i32).as_bytes(), &[])
    }

    fn send(&self, message: &[u8], cmsgs: &[ControlMessage<'_>]) -> std::io::Result<()> {
        let iov = [IoSlice::new(message)];
        loop {
            match sendmsg::<()>(
                self.socket.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Ends the conversation: the spawner sees the end of its socket and
    /// exits, and its stubs die with it.
    pub fn shutdown(&self) {
        let _ =
            nix::sys::socket::shutdown(self.socket.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }

    /// The next event; `None` once the spawner is gone. Call from one
    /// thread only.
    pub fn next_event(&self) -> std::io::Result<Option<Event>> {
        let mut buf = [0u8; MAX_MESSAGE];
        let n = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(self.socket.as_raw_fd(), &mut iov, None, MsgFlags::empty()) {
                Ok(m) => break m.bytes,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        };
        if n == 0 {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&buf[..n]);
        parse_event(&text)
            .map(Some)
            .ok_or_else(|| std::io::Error::other(format!("unexpected spawner message {text:?}")))
    }
}

fn parse_event(text: &str) -> Option<Event> {
    let mut parts = text.splitn(3, ' ');
    let kind = parts.next()?;
    let id = parts.next()?.parse().ok()?;
    let rest = parts.next()?;
    match kind {
        "exited" => Some(Event::Exited {
            id,
            code: rest.parse().ok()?,
        }),
        "failed" => Some(Event::Failed {
            id,
            message: rest.to_owned(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_parsed() {
        assert_eq!(
            parse_event("exited 7 143"),
            Some(Event::Exited { id: 7, code: 143 })
        );
        assert_eq!(
            parse_event("failed 8 fork: EAGAIN: try again"),
            Some(Event::Failed {
                id: 8,
                message: "fork: EAGAIN: try again".into()
            })
        );
        assert_eq!(parse_event("exited x 1"), None);
        assert_eq!(parse_event("other 1 2"), None);
    }
}
