//! The action's seccomp filter: a deny list of what builds never need and
//! what reaches kernel state shared with the host or widens the kernel's
//! attack surface. Everything else is allowed; a denied call fails with an
//! error, it never kills the process.
//!
//! | denied | returns |
//! |---|---|
//! | `keyctl`, `add_key`, `request_key`: kernel keyrings | EPERM |
//! | `io_uring_setup`, `io_uring_enter`, `io_uring_register` | ENOSYS |
//! | `bpf`, `perf_event_open`, `kexec_load`, `kexec_file_load` | EPERM |
//! | `unshare` and `clone` with `CLONE_NEWUSER` (nested user namespaces) | EPERM |
//! | `clone3` (its flags cannot be inspected; libc falls back to `clone`) | ENOSYS |
//! | `socket(AF_VSOCK, ...)`: vsock is not namespaced | EAFNOSUPPORT |
//! | `prlimit64` setting another process's limits (the sandbox's init) | EPERM |
//!
//! The filter knows this machine's own system call table and, on x86-64,
//! the i386 one (32-bit programs); calls in any other (x32, arm32 on
//! arm64) fail with ENOSYS.

use libc::sock_filter;

// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
fn arg_low(i: u32) -> u32 {
    16 + 8 * i
}
fn arg_high(i: u32) -> u32 {
    20 + 8 * i
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
const AF_VSOCK: u32 = 40;
const CLONE_NEWUSER: u32 = 0x1000_0000;

/// One system call table's numbers for what the filter looks at.
struct Table {
    arch: u32,
    keyrings: [u32; 3],
    io_uring: [u32; 3],
    /// bpf, perf_event_open, kexec_load and (where it exists) kexec_file_load.
    privileged: &'static [u32],
    clone: u32,
    clone3: u32,
    unshare: u32,
    /// `socket`, where sockets have a call of their own.
    socket: Option<u32>,
    prlimit64: u32,
}

#[cfg(target_arch = "x86_64")]
const NATIVE: Table = Table {
    arch: AUDIT_ARCH_X86_64,
    keyrings: [250, 248, 249],
    io_uring: [425, 426, 427],
    privileged: &[321, 298, 246, 320],
    clone: 56,
    clone3: 435,
    unshare: 272,
    socket: Some(41),
    prlimit64: 302,
};

#[cfg(target_arch = "aarch64")]
const NATIVE: Table = Table {
    arch: AUDIT_ARCH_AARCH64,
    keyrings: [219, 217, 218],
    io_uring: [425, 426, 427],
    privileged: &[280, 241, 104, 294],
    clone: 220,
    clone3: 435,
    unshare: 97,
    socket: Some(198),
    prlimit64: 261,
};

/// 32-bit programs on x86-64. Their `socketcall` passes arguments in
/// memory, which a filter cannot read: AF_VSOCK is refused only through
/// `socket` itself there.
#[cfg(target_arch = "x86_64")]
const COMPAT: Option<Table> = Some(Table {
    arch: AUDIT_ARCH_I386,
    keyrings: [288, 286, 287],
    io_uring: [425, 426, 427],
    privileged: &[357, 336, 283],
    clone: 120,
    clone3: 435,
    unshare: 310,
    socket: Some(359),
    prlimit64: 340,
});

#[cfg(not(target_arch = "x86_64"))]
const COMPAT: Option<Table> = None;

fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

fn load(offset: u32) -> sock_filter {
    stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset)
}

fn ret(action: u32) -> sock_filter {
    stmt(libc::BPF_RET | libc::BPF_K, action)
}

fn errno(e: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA)
}

const JEQ: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
const JSET: u32 = libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K;
const JGE: u32 = libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K;

/// Where a conditional jump goes: on to the next instruction, or to a
/// labelled one further down.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum To {
    Next,
    Allow,
    Eperm,
    Enosys,
    Eafnosupport,
    CheckClone,
    CheckSocket,
    CheckPrlimit,
    PrlimitHigh,
}

enum Op {
    Insn(sock_filter),
    Jump(u32, u32, To, To),
    Label(To),
}

/// Resolves labels into the forward offsets BPF jumps take (each under
/// 256: a section is short).
fn assemble(ops: &[Op]) -> Vec<sock_filter> {
    let mut at = Vec::new();
    let mut pos = 0usize;
    for op in ops {
        match op {
            Op::Label(l) => at.push((*l, pos)),
            _ => pos += 1,
        }
    }
    let mut out = Vec::with_capacity(pos);
    for op in ops {
        match op {
            Op::Label(_) => {}
            Op::Insn(i) => out.push(*i),
            Op::Jump(code, k, jt, jf) => {
                let here = out.len() + 1;
                let offset = |to: To| match to {
                    To::Next => 0,
                    label => {
                        let (_, target) = at
                            .iter()
                            .find(|(l, _)| *l == label)
                            .expect("every label a section jumps to is in it");
                        let forward = target.checked_sub(here).expect("BPF jumps go forward");
                        u8::try_from(forward).expect("a section is short")
                    }
                };
                out.push(sock_filter {
                    code: *code as u16,
                    jt: offset(*jt),
                    jf: offset(*jf),
                    k: *k,
                });
            }
        }
    }
    out
}

/// The rules for one system call table: the call number is loaded once and
/// compared with each denied call in turn (so a call that is allowed, as
/// almost every call is, runs through one comparison per denied call);
/// calls whose arguments decide jump to a check of their own.
fn section(table: &Table) -> Vec<sock_filter> {
    use Op::{Insn, Jump, Label};
    let mut ops = vec![Insn(load(NR))];
    if table.arch == AUDIT_ARCH_X86_64 {
        // x32 calls carry this bit; none of them is wanted.
        ops.push(Jump(JGE, 0x4000_0000, To::Enosys, To::Next));
    }
    for call in table.keyrings.iter().chain(table.privileged) {
        ops.push(Jump(JEQ, *call, To::Eperm, To::Next));
    }
    for call in table.io_uring.iter().chain([&table.clone3]) {
        ops.push(Jump(JEQ, *call, To::Enosys, To::Next));
    }
    ops.push(Jump(JEQ, table.clone, To::CheckClone, To::Next));
    ops.push(Jump(JEQ, table.unshare, To::CheckClone, To::Next));
    if let Some(socket) = table.socket {
        ops.push(Jump(JEQ, socket, To::CheckSocket, To::Next));
    }
    ops.push(Jump(JEQ, table.prlimit64, To::CheckPrlimit, To::Next));
    ops.extend([
        // Any other call.
        Insn(ret(libc::SECCOMP_RET_ALLOW)),
        // clone(flags, ...) and unshare(flags): no nested user namespace.
        Label(To::CheckClone),
        Insn(load(arg_low(0))),
        Jump(JSET, CLONE_NEWUSER, To::Eperm, To::Allow),
        // socket(family, ...): no vsock.
        Label(To::CheckSocket),
        Insn(load(arg_low(0))),
        Jump(JEQ, AF_VSOCK, To::Eafnosupport, To::Allow),
        // prlimit64(pid, resource, new, old): setting another process's
        // limits (pid not 0, new not NULL) is refused; reading is not.
        Label(To::CheckPrlimit),
        Insn(load(arg_low(0))),
        Jump(JEQ, 0, To::Allow, To::Next),
        Insn(load(arg_low(2))),
        Jump(JEQ, 0, To::PrlimitHigh, To::Eperm),
        Label(To::PrlimitHigh),
        Insn(load(arg_high(2))),
        Jump(JEQ, 0, To::Allow, To::Eperm),
        // Every jump goes forward: the verdicts come last.
        Label(To::Allow),
        Insn(ret(libc::SECCOMP_RET_ALLOW)),
        Label(To::Eperm),
        Insn(ret(errno(libc::EPERM))),
        Label(To::Enosys),
        Insn(ret(errno(libc::ENOSYS))),
        Label(To::Eafnosupport),
        Insn(ret(errno(libc::EAFNOSUPPORT))),
    ]);
    assemble(&ops)
}

/// The whole program: dispatch on the architecture, one section each.
fn program() -> Vec<sock_filter> {
    let mut out = Vec::new();
    for table in std::iter::once(&NATIVE).chain(COMPAT.as_ref()) {
        let body = section(table);
        let skip = u8::try_from(body.len()).expect("a section is shorter than 256 instructions");
        out.push(load(ARCH));
        out.push(jump(JEQ, table.arch, 0, skip));
        out.extend(body);
    }
    out.push(ret(errno(libc::ENOSYS)));
    out
}

/// Installs the filter on this process and everything it starts.
pub fn apply() -> Result<(), String> {
    let program = program();
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).expect("the filter is short"),
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: prctl and seccomp take integers and a pointer to `prog`,
    // which points into `program`; both outlive the calls, and the kernel
    // copies the filter.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(format!(
                "setting no_new_privs: {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &raw const prog,
        ) != 0
        {
            return Err(format!(
                "installing the seccomp filter: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        let program = program();
        for (i, insn) in program.iter().enumerate() {
            if u32::from(insn.code) & 0x07 == libc::BPF_JMP {
                for off in [insn.jt, insn.jf] {
                    assert!(i + 1 + usize::from(off) < program.len(), "at {i}");
                }
            }
        }
        let last = program.last().expect("not empty");
        assert_eq!(u32::from(last.code), libc::BPF_RET | libc::BPF_K);
    }

    /// Runs the filter on a call the way the kernel would.
    fn verdict(arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let program = program();
        let mut data = [0u32; 16];
        data[0] = nr;
        data[1] = arch;
        for (i, a) in args.iter().enumerate() {
            data[4 + 2 * i] = *a as u32;
            data[5 + 2 * i] = (*a >> 32) as u32;
        }
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let insn = program[pc];
            let code = u32::from(insn.code);
            match code & 0x07 {
                c if c == libc::BPF_LD => acc = data[insn.k as usize / 4],
                c if c == libc::BPF_RET => return insn.k,
                c if c == libc::BPF_JMP => {
                    let taken = match code & 0xf0 {
                        op if op == libc::BPF_JEQ => acc == insn.k,
                        op if op == libc::BPF_JSET => acc & insn.k != 0,
                        op if op == libc::BPF_JGE => acc >= insn.k,
                        _ => panic!("unknown jump {code:#x}"),
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
                _ => panic!("unknown instruction {code:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn the_filter_denies_what_it_says_and_allows_the_rest() {
        let t = &NATIVE;
        let allow = libc::SECCOMP_RET_ALLOW;
        let eperm = errno(libc::EPERM);
        let v = |nr, args| verdict(t.arch, nr, args);
        assert_eq!(v(t.keyrings[0], [0; 6]), eperm);
        assert_eq!(v(t.io_uring[0], [0; 6]), errno(libc::ENOSYS));
        assert_eq!(
            v(t.unshare, [u64::from(CLONE_NEWUSER), 0, 0, 0, 0, 0]),
            eperm
        );
        assert_eq!(v(t.unshare, [0x0002_0000, 0, 0, 0, 0, 0]), allow);
        assert_eq!(v(t.clone, [0x11, 0, 0, 0, 0, 0]), allow, "fork");
        assert_eq!(
            v(t.clone, [u64::from(CLONE_NEWUSER) | 0x11, 0, 0, 0, 0, 0]),
            eperm
        );
        let socket = t.socket.expect("a socket call");
        assert_eq!(
            v(socket, [u64::from(AF_VSOCK), 1, 0, 0, 0, 0]),
            errno(libc::EAFNOSUPPORT)
        );
        assert_eq!(v(socket, [2, 1, 0, 0, 0, 0]), allow);
        assert_eq!(v(t.prlimit64, [0, 7, 0x7fff_0000_1000, 0, 0, 0]), allow);
        assert_eq!(v(t.prlimit64, [1, 7, 0, 0x1000, 0, 0]), allow, "reading");
        assert_eq!(v(t.prlimit64, [1, 7, 0x7fff_0000_0000, 0, 0, 0]), eperm);
        assert_eq!(v(t.prlimit64, [1, 7, 0x1000, 0, 0, 0]), eperm);
        assert_eq!(v(0, [0; 6]), allow, "read");
        assert_eq!(verdict(0x1234, 0, [0; 6]), errno(libc::ENOSYS));
        if let Some(compat) = &COMPAT {
            assert_eq!(verdict(compat.arch, compat.keyrings[1], [0; 6]), eperm);
            assert_eq!(verdict(compat.arch, 3, [0; 6]), allow, "read");
        }
    }
}
