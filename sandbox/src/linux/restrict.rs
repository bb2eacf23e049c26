//! What the action's process does to itself before `exec`: rlimits (no
//! core dumps), Landlock (best effort: whatever this kernel's ABI
//! enforces), and an empty capability bounding set, so that even uid 0
//! inside has no power. Also what the stub does once in its namespaces,
//! inherited by init and the action ([`harden`]): a session keyring of its
//! own and the seccomp filter ([`seccomp`](super::seccomp)); and loopback,
//! which the stub brings up in a private network namespace.

use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, path_beneath_rules,
};
use nix::sys::resource::{Resource, setrlimit};

use crate::spec::{Spec, User};

/// The newest Landlock ABI this code knows; older kernels enforce a subset.
const LANDLOCK_ABI: ABI = ABI::V6;

/// Applies every restriction; returns what Landlock enforced.
pub fn apply(spec: &Spec) -> Result<String, String> {
    rlimits(spec)?;
    let landlock = landlock(spec)?;
    drop_capabilities()?;
    Ok(landlock)
}

fn rlimits(spec: &Spec) -> Result<(), String> {
    let set = |resource, value: u64, what: &str| {
        setrlimit(resource, value, value).map_err(|e| format!("setting the {what} limit: {e}"))
    };
    // A crashing tool leaves no core file (of what it had in memory)
    // behind, and cannot raise the limit again.
    set(Resource::RLIMIT_CORE, 0, "core file")?;
    if let Some(bytes) = spec.rlimits.memory_bytes {
        set(Resource::RLIMIT_AS, bytes, "memory")?;
    }
    if let Some(pids) = spec.rlimits.pids {
        // Counted per user in this user namespace.
        set(Resource::RLIMIT_NPROC, pids, "process")?;
    }
    Ok(())
}

/// In a stub running as root, before it creates any namespace: becomes
/// `user` for good (no supplementary groups; real, effective and saved
/// ids all changed, so nothing can switch back). The user namespace it then
/// creates is that user's, so the kernel charges its per-user counters
/// (inotify instances, processes, namespaces) to that user, not root.
///
/// Changing credentials clears the parent-death signal (the caller sets it
/// again) and makes the process non-dumpable, which would leave its own
/// `/proc` files root's: it is made dumpable again until it has written
/// its namespace maps (see `stub::enter`).
pub fn become_user(user: User) -> Result<(), String> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let gid = Gid::from_raw(user.gid);
    let uid = Uid::from_raw(user.uid);
    setgroups(&[]).map_err(|e| format!("dropping supplementary groups: {e}"))?;
    setresgid(gid, gid, gid).map_err(|e| format!("becoming group {gid}: {e}"))?;
    setresuid(uid, uid, uid).map_err(|e| format!("becoming user {uid}: {e}"))?;
    nix::sys::prctl::set_dumpable(true).map_err(|e| format!("PR_SET_DUMPABLE: {e}"))
}

/// In the stub, once it entered its namespaces (for a warm stub: before
/// its action comes, so neither step is on the action's way; loading the
/// filter costs about 0.1 ms): joins a new, empty session keyring, so that
/// the sandbox holds no key of the agent's, then installs the seccomp
/// filter, which keeps it off keyrings altogether. The stub, init and the
/// action all run under the filter.
pub fn harden() -> Result<(), String> {
    own_keyring();
    super::seccomp::apply()
}

fn own_keyring() {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: keyctl with integer arguments and a null name.
    unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        );
    }
}

/// Paths, inside the sandbox, the action may write.
fn writable(spec: &Spec) -> Vec<PathBuf> {
    let exec_root = spec.exec_root();
    let mut out: Vec<PathBuf> = spec.writable.iter().map(|w| exec_root.join(w)).collect();
    out.extend(["/tmp", "/dev"].map(PathBuf::from));
    out
}

fn landlock(spec: &Spec) -> Result<String, String> {
    let abi = LANDLOCK_ABI;
    let err = |e: landlock::RulesetError| format!("Landlock: {e}");
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .scope(Scope::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(writable(spec), AccessFs::from_all(abi)))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced".to_owned(),
        RulesetStatus::PartiallyEnforced => "partially enforced (older kernel ABI)".to_owned(),
        RulesetStatus::NotEnforced => "not enforced (kernel without Landlock)".to_owned(),
    })
}

fn drop_capabilities() -> Result<(), String> {
    for cap in 0..=63 {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r == -1 && nix::errno::Errno::last() != nix::errno::Errno::EINVAL {
            return Err(format!(
                "dropping capability {cap}: {}",
                nix::errno::Errno::last()
            ));
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// Sets `lo` up in this (fresh) network namespace.
pub fn loopback_up() -> std::io::Result<()> {
    // SAFETY: a plain socket, and SIOC[GS]IFFLAGS ioctls on an `ifreq` this
    // function owns and zero-initialises.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if r == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(e);
        }
    }
    Ok(())
}
