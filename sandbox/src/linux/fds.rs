//! Descriptors an action must not inherit: whatever the agent was started
//! with (an open directory of the host's, a socket), closed before any
//! stub or action runs.

use std::os::fd::RawFd;

/// Closes every descriptor from `first` up; with `on_exec`, marks them
/// close-on-exec instead, so that the caller may still use them until its
/// `exec` (the sandbox's status pipe).
pub fn close_from(first: RawFd, on_exec: bool) {
    close_range(first, RawFd::MAX, on_exec);
}

/// Closes (or marks close-on-exec) the descriptors `first..=last`.
pub fn close_range(first: RawFd, last: RawFd, on_exec: bool) {
    let (Ok(first), Ok(last)) = (u32::try_from(first), u32::try_from(last)) else {
        return;
    };
    if first > last {
        return;
    }
    let flags = if on_exec {
        libc::CLOSE_RANGE_CLOEXEC
    } else {
        0
    };
    // SAFETY: close_range takes integers only; the caller owns every
    // descriptor from `first` up and uses none of them afterwards (or, with
    // `on_exec`, only until exec).
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
    if r == 0 {
        return;
    }
    // Kernels before 5.9 (5.11 for the flag): one descriptor at a time.
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft.min(1 << 16));
    let end = u32::try_from(limit)
        .unwrap_or(1 << 16)
        .min(last.saturating_add(1));
    for fd in first..end {
        let fd = fd as RawFd;
        // SAFETY: as above; a descriptor that is not open gives EBADF.
        unsafe {
            if on_exec {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            } else {
                libc::close(fd);
            }
        }
    }
}
