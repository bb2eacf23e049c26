//! The sandbox's file system, built by init inside the new mount namespace:
//!
//! ```text
//! /                 tmpfs, read-only once built
//! /usr, /lib, ...   the host toolchain paths, bind-mounted read-only
//! /execroot         the action's input root, writable where the spec says;
//!                   input subtrees and input files bound read-only on top
//! /tmp              the action's private temp directory: a tmpfs of the
//!                   spec's size (on disk without one)
//! /dev              null zero full random urandom tty, shm, fd links, and
//!                   the device nodes the spec names (an action's GPUs)
//! /proc             a fresh procfs of the sandbox's pid namespace, its
//!                   host-wide files (keys, kernel addresses, boot id,
//!                   command line) masked by /dev/null
//! ```
//!
//! With `input_root_is_root` (`root-filesystem=input-root`), `/` is the
//! action's input root itself, a whole sysroot, with the same read-only
//! binds over its inputs, and the sandbox's own `/tmp`, `/dev` and `/proc`
//! on the directories the agent made for them; no host path is shown.
//!
//! Everything the action may write is `nosuid,nodev`.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::statvfs::{FsFlags, statvfs};

use crate::spec::{EXEC_ROOT, Spec};

fn fail(what: &str, path: &Path, e: impl std::fmt::Display) -> String {
    format!("{what} {}: {e}", path.display())
}

fn bind(src: &Path, dst: &Path) -> Result<(), String> {
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("binding {} to {}: {e}", src.display(), dst.display()))
}

/// Host-wide files of procfs an action has no business reading: other
/// users' keys, kernel addresses and memory layout, other containers'
/// file locks, the host's boot id and kernel command line. (`kcore` needs
/// CAP_SYS_RAWIO on the host, which no action has.)
const MASKED_PROC_FILES: &[&str] = &[
    "keys",
    "key-users",
    "kpagecount",
    "kpageflags",
    "kpagecgroup",
    "slabinfo",
    "timer_list",
    "sched_debug",
    "vmallocinfo",
    "latency_stats",
    "cmdline",
    "locks",
    "sys/kernel/random/boot_id",
];

/// Remounts one mount read-only, keeping the flags the kernel locks for
/// mounts inherited from a more privileged namespace.
fn remount_read_only(path: &Path) -> Result<(), String> {
    remount(path, MsFlags::MS_RDONLY)
}

/// Remounts one bind mount with `add` on top of its current flags (which
/// include the ones the kernel locks).
fn remount(path: &Path, add: MsFlags) -> Result<(), String> {
    let current = statvfs(path).map_err(|e| fail("statvfs", path, e))?.flags();
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | add;
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(st) {
            flags |= ms;
        }
    }
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
        .map_err(|e| fail("remounting", path, e))
}

/// Mount points at or below any of `paths`, from /proc/self/mountinfo.
fn mounts_under(paths: &[PathBuf]) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| paths.iter().any(|under| p.starts_with(under)))
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && let Ok(v) = u8::from_str_radix(&String::from_utf8_lossy(digits), 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes `p` (absolute, on the host) appear at `new_root/p`; returns the
/// mount point when it bound one (still writable: see `build_root`).
fn host_path(new_root: &Path, p: &Path) -> Result<Option<PathBuf>, String> {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return Ok(None); // Not on this host: nothing to show.
    };
    let rel = p.strip_prefix("/").unwrap_or(p);
    let target = new_root.join(rel);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| fail("creating", parent, e))?;
    }
    if meta.file_type().is_symlink() {
        // Merged /usr: /bin -> usr/bin. Recreate the link; what it points to
        // is shown if it is on the list too.
        let to = std::fs::read_link(p).map_err(|e| fail("reading the link", p, e))?;
        return std::os::unix::fs::symlink(&to, &target)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map(|()| None)
            .map_err(|e| fail("linking", &target, e));
    }
    if meta.is_dir() {
        std::fs::create_dir_all(&target).map_err(|e| fail("creating", &target, e))?;
    } else if std::fs::symlink_metadata(&target).is_err() {
        // A file already there is another host path's (not truncated).
        std::fs::File::create(&target).map_err(|e| fail("creating", &target, e))?;
    }
    bind(p, &target)?;
    Ok(Some(target))
}

/// Mounts a fresh tmpfs on `target`.
fn tmpfs(target: &Path, flags: MsFlags, options: &str) -> Result<(), String> {
    mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(options))
        .map_err(|e| fail("mounting tmpfs on", target, e))
}

fn dev(
    new_root: &Path,
    shm_size: Option<u64>,
    made: bool,
    devices: &[PathBuf],
) -> Result<(), String> {
    let dev = new_root.join("dev");
    if !made {
        std::fs::create_dir_all(&dev).map_err(|e| fail("creating", &dev, e))?;
    }
    tmpfs(
        &dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755,size=64k",
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let host = Path::new("/dev").join(name);
        if !host.exists() {
            continue;
        }
        let target = dev.join(name);
        std::fs::File::create(&target).map_err(|e| fail("creating", &target, e))?;
        bind(&host, &target)?;
    }
    // Each is /dev/NAME (the spec checked).
    for host in devices {
        let target = dev.join(host.strip_prefix("/dev").unwrap_or(host));
        std::fs::File::create(&target).map_err(|e| fail("creating", &target, e))?;
        bind(host, &target)?;
    }
    let shm = dev.join("shm");
    std::fs::create_dir(&shm).map_err(|e| fail("creating", &shm, e))?;
    tmpfs(
        &shm,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &sized("mode=1777", shm_size),
    )?;
    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, dev.join(name)).map_err(|e| fail("linking", &dev, e))?;
    }
    Ok(())
}

/// tmpfs options with a size, when there is one.
fn sized(options: &str, size: Option<u64>) -> String {
    match size {
        Some(bytes) => format!("{options},size={bytes}"),
        None => options.to_owned(),
    }
}

/// Binds /dev/null over the host-wide files of the procfs at `proc`: the
/// ones this kernel has and the sandbox's user could read (on an
/// unprivileged agent the root-only ones are out of reach already, and
/// each mount costs about 10 µs).
fn mask_proc(proc: &Path) -> Result<(), String> {
    use nix::unistd::{AccessFlags, access};
    for name in MASKED_PROC_FILES {
        let target = proc.join(name);
        if access(&target, AccessFlags::R_OK).is_err() {
            continue;
        }
        mount(
            Some("/dev/null"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| fail("masking", &target, e))?;
    }
    Ok(())
}

/// Builds the root described in the module docs and pivots into it.
pub fn build_root(spec: &Spec) -> Result<(), String> {
    // Nothing done here may reach the host's mount table.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making mounts private: {e}"))?;
    let new_root = spec.scratch.as_path();
    let exec_root = if spec.input_root_is_root {
        bind(&spec.root, new_root)?;
        new_root.to_owned()
    } else {
        tmpfs(
            new_root,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=0755,size=1m",
        )?;
        let mut bound = Vec::new();
        for p in &spec.host_paths {
            bound.extend(host_path(new_root, p)?);
        }
        // Read-only, submounts included (one read of the mount table for all).
        for m in mounts_under(&bound) {
            remount_read_only(&m)?;
        }
        let exec_root = new_root.join(EXEC_ROOT.trim_start_matches('/'));
        std::fs::create_dir_all(&exec_root).map_err(|e| fail("creating", &exec_root, e))?;
        bind(&spec.root, &exec_root)?;
        exec_root
    };
    // The input bindings below inherit these flags.
    remount(&exec_root, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
    for rel in &spec.read_only {
        let p = exec_root.join(rel);
        bind(&p, &p)?;
        remount_read_only(&p)?;
    }

    // In an input root the agent made it (never through a link).
    let tmp = new_root.join("tmp");
    if !spec.input_root_is_root {
        std::fs::create_dir_all(&tmp).map_err(|e| fail("creating", &tmp, e))?;
    }
    match spec.tmp_size {
        Some(size) => tmpfs(
            &tmp,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            &sized("mode=1777", Some(size)),
        )?,
        None => {
            bind(&spec.tmp, &tmp)?;
            remount(&tmp, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
        }
    }

    dev(
        new_root,
        spec.tmp_size,
        spec.input_root_is_root,
        &spec.devices,
    )?;

    let proc = new_root.join("proc");
    if !spec.input_root_is_root {
        std::fs::create_dir_all(&proc).map_err(|e| fail("creating", &proc, e))?;
    }
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| fail("mounting proc on", &proc, e))?;
    mask_proc(&proc)?;

    // Swap roots without a spare directory: stack the old root under the
    // new one at ".", then detach it.
    nix::unistd::chdir(new_root).map_err(|e| fail("entering", new_root, e))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detaching the old root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("entering the new root: {e}"))?;
    if spec.input_root_is_root {
        // `/` is the input root: writable where the spec says (Landlock
        // and the read-only binds keep the rest), like `/execroot`.
        return Ok(());
    }
    remount_read_only(Path::new("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\04"), "/end\\04");
    }
}
