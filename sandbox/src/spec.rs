//! What to run and how to isolate it: a plain value the agent writes to a
//! file in the action's directory and the sandbox stub reads back.
//!
//! The encoding is a list of `key=value` records, each ended by a NUL byte,
//! so any path (newlines included) survives the trip.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// Where the action's input root appears inside the sandbox.
pub const EXEC_ROOT: &str = "/execroot";

/// Where the sandbox mounts its own file systems when the input root is
/// `/`: these directories must be (or are made) in the input root.
pub const INPUT_ROOT_MOUNTS: [&str; 3] = ["proc", "dev", "tmp"];

/// Resource limits for one action; `None` or 0 means unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// CPU time per wall second, in thousandths of a CPU.
    pub cpu_millis: Option<u64>,
}

/// A host user and group an action runs as (on an agent running as root:
/// never the host's root itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

impl User {
    /// `UID:GID`.
    pub fn render(self) -> String {
        format!("{}:{}", self.uid, self.gid)
    }

    pub fn parse(s: &str) -> Option<User> {
        let (uid, gid) = s.split_once(':')?;
        Some(User {
            uid: uid.parse().ok()?,
            gid: gid.parse().ok()?,
        })
    }
}

/// One sandboxed run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    /// The program and its arguments.
    pub argv: Vec<OsString>,
    /// The program's whole environment, as `NAME=VALUE`; `PATH` in it is
    /// where a program name without a slash is looked up.
    pub env: Vec<OsString>,
    /// The action's input root on the host; it appears at [`EXEC_ROOT`].
    pub root: PathBuf,
    /// The working directory, relative to the input root.
    pub workdir: PathBuf,
    /// Paths under the input root the action may write (the working
    /// directory and the parents of its outputs), relative to it.
    pub writable: Vec<PathBuf>,
    /// Paths under the input root that are bound read-only: whole input
    /// subtrees, and input files that sit in writable directories.
    pub read_only: Vec<PathBuf>,
    /// Host paths made visible read-only at the same place: the toolchain.
    pub host_paths: Vec<PathBuf>,
    /// Device nodes under the host's `/dev` bound at the same place in the
    /// sandbox's `/dev` (the GPUs an action was given).
    pub devices: Vec<PathBuf>,
    /// A host directory that becomes the private, writable `/tmp` when
    /// `tmp_size` is unset.
    pub tmp: PathBuf,
    /// Bytes the action's `/tmp` (and, apart, its `/dev/shm`) may hold:
    /// each a tmpfs of that size, so writing past it fails with ENOSPC.
    pub tmp_size: Option<u64>,
    /// An empty host directory the stub builds the new root on.
    pub scratch: PathBuf,
    /// Keep the host's network (otherwise: a private loopback only).
    pub network: bool,
    /// `cgroup.procs` files the stub joins before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// Limits applied as rlimits (used where no cgroup could be).
    pub rlimits: Limits,
    /// The host user the stub becomes (from root) before it creates the
    /// sandbox's namespaces, so the action, its files and its per-user
    /// kernel counters are that user's; `None`: the stub's own.
    pub user: Option<User>,
    /// The input root is `/` (with the sandbox's own `/proc`, `/dev` and
    /// `/tmp`), and no host path is shown; otherwise it is at
    /// [`EXEC_ROOT`] beside the host paths.
    pub input_root_is_root: bool,
}

impl Spec {
    /// Where the input root appears inside the sandbox.
    pub fn exec_root(&self) -> &'static Path {
        Path::new(if self.input_root_is_root {
            "/"
        } else {
            EXEC_ROOT
        })
    }
}

impl Spec {
    /// The records; refuses a value with a NUL byte, which would end its
    /// record early and could add records of its own.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let mut bad = None;
        let mut put = |key: &str, value: &OsStr| {
            if value.as_bytes().contains(&0) {
                bad.get_or_insert_with(|| {
                    format!("the sandbox spec's {key} {value:?} contains NUL")
                });
            }
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
            out.push(0);
        };
        for a in &self.argv {
            put("arg", a);
        }
        for e in &self.env {
            put("env", e);
        }
        put("root", self.root.as_os_str());
        put("workdir", self.workdir.as_os_str());
        for p in &self.writable {
            put("writable", p.as_os_str());
        }
        for p in &self.read_only {
            put("read_only", p.as_os_str());
        }
        for p in &self.host_paths {
            put("host", p.as_os_str());
        }
        for p in &self.devices {
            put("device", p.as_os_str());
        }
        put("tmp", self.tmp.as_os_str());
        if let Some(size) = self.tmp_size {
            put("tmp_size", OsStr::new(&size.to_string()));
        }
        put("scratch", self.scratch.as_os_str());
        if self.network {
            put("network", OsStr::new("1"));
        }
        if self.input_root_is_root {
            put("input_root_is_root", OsStr::new("1"));
        }
        for p in &self.cgroup_procs {
            put("cgroup", p.as_os_str());
        }
        if let Some(user) = self.user {
            put("user", OsStr::new(&user.render()));
        }
        let limits = [
            ("memory", self.rlimits.memory_bytes),
            ("pids", self.rlimits.pids),
            ("cpu", self.rlimits.cpu_millis),
        ];
        for (key, value) in limits {
            if let Some(v) = value {
                put(key, OsStr::new(&v.to_string()));
            }
        }
        match bad {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Spec, String> {
        let mut spec = Spec::default();
        for record in bytes.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            let eq = record
                .iter()
                .position(|b| *b == b'=')
                .ok_or("a sandbox spec record has no '='")?;
            let key = std::str::from_utf8(&record[..eq]).map_err(|_| "a key is not UTF-8")?;
            let value = OsString::from_vec(record[eq + 1..].to_vec());
            let number = |v: &OsString| -> Result<Option<u64>, String> {
                v.to_str()
                    .and_then(|s| s.parse().ok())
                    .map(Some)
                    .ok_or_else(|| format!("sandbox spec {key}={v:?} is not a number"))
            };
            match key {
                "arg" => spec.argv.push(value),
                "env" => spec.env.push(value),
                "root" => spec.root = value.into(),
                "workdir" => spec.workdir = value.into(),
                "writable" => spec.writable.push(value.into()),
                "read_only" => spec.read_only.push(value.into()),
                "host" => spec.host_paths.push(value.into()),
                "device" => spec.devices.push(device(value.into())?),
                "tmp" => spec.tmp = value.into(),
                "tmp_size" => spec.tmp_size = number(&value)?,
                "scratch" => spec.scratch = value.into(),
                "network" => spec.network = true,
                "input_root_is_root" => spec.input_root_is_root = true,
                "cgroup" => spec.cgroup_procs.push(value.into()),
                "user" => {
                    spec.user = Some(
                        value
                            .to_str()
                            .and_then(User::parse)
                            .ok_or_else(|| format!("sandbox spec user={value:?} is not UID:GID"))?,
                    )
                }
                "memory" => spec.rlimits.memory_bytes = number(&value)?,
                "pids" => spec.rlimits.pids = number(&value)?,
                "cpu" => spec.rlimits.cpu_millis = number(&value)?,
                other => return Err(format!("unknown sandbox spec key {other:?}")),
            }
        }
        if spec.argv.is_empty() {
            return Err("the sandbox spec has no program".into());
        }
        if spec
            .env
            .iter()
            .any(|e| e.as_bytes().iter().position(|b| *b == b'=').unwrap_or(0) == 0)
        {
            return Err("a sandbox spec environment entry has no name or no '='".into());
        }
        // Only the sandbox uses tmp and scratch (it checks they are set).
        for (what, p) in [
            ("root", &spec.root),
            ("tmp", &spec.tmp),
            ("scratch", &spec.scratch),
        ] {
            if (what == "root" || !p.as_os_str().is_empty()) && !p.is_absolute() {
                return Err(format!("sandbox spec {what} {p:?} is not absolute"));
            }
        }
        for p in spec
            .writable
            .iter()
            .chain(&spec.read_only)
            .chain([&spec.workdir])
        {
            if !is_plain_relative(p) {
                return Err(format!(
                    "sandbox spec path {p:?} must be relative and stay inside the input root"
                ));
            }
        }
        Ok(spec)
    }
}

impl Spec {
    /// The environment as (name, value) pairs.
    pub fn env_pairs(&self) -> impl Iterator<Item = (&OsStr, &OsStr)> {
        self.env.iter().map(|e| {
            let bytes = e.as_bytes();
            let eq = bytes.iter().position(|b| *b == b'=').unwrap_or(bytes.len());
            (
                OsStr::from_bytes(&bytes[..eq]),
                OsStr::from_bytes(bytes.get(eq + 1..).unwrap_or_default()),
            )
        })
    }
}

/// A device node the spec may bind: `/dev/NAME`, one plain name.
fn device(p: PathBuf) -> Result<PathBuf, String> {
    match p.strip_prefix("/dev") {
        Ok(name) if name.components().count() == 1 && is_plain_relative(name) => Ok(p),
        _ => Err(format!("sandbox spec device {p:?} is not /dev/NAME")),
    }
}

/// A relative path without `..`, `.` or a root: it cannot leave its base.
pub fn is_plain_relative(p: &Path) -> bool {
    p.components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_survives_encoding_with_odd_paths() {
        let spec = Spec {
            argv: vec!["sh".into(), "-c".into(), "echo 'a=b'\n".into()],
            env: vec![
                "PATH=/usr/bin:/bin".into(),
                "EMPTY=".into(),
                "EQ=a=b".into(),
            ],
            root: "/w/actions/1/root".into(),
            workdir: "".into(),
            writable: vec!["".into(), "out/dir with\nnewline".into()],
            read_only: vec!["src".into()],
            host_paths: vec!["/usr".into(), "/etc/ssl".into()],
            devices: vec!["/dev/nvidia1".into(), "/dev/nvidiactl".into()],
            tmp: "/w/actions/1/tmp".into(),
            tmp_size: Some(64 << 20),
            scratch: "/w/actions/1/sysroot".into(),
            network: true,
            cgroup_procs: vec!["/sys/fs/cgroup/x/cgroup.procs".into()],
            rlimits: Limits {
                memory_bytes: Some(1 << 30),
                pids: Some(100),
                cpu_millis: None,
            },
            user: Some(User {
                uid: 990_001,
                gid: 990_000,
            }),
            input_root_is_root: true,
        };
        assert_eq!(Spec::decode(&spec.encode().expect("encodes")), Ok(spec));
    }

    #[test]
    fn only_device_nodes_directly_under_dev_may_be_bound() {
        for bad in [
            "/dev/../etc/shadow",
            "/dev",
            "/dev/dri/card0",
            "/etc/passwd",
            "nvidia0",
        ] {
            let spec = Spec {
                argv: vec!["true".into()],
                root: "/r".into(),
                devices: vec![bad.into()],
                ..Spec::default()
            };
            let bytes = spec.encode().expect("encodes");
            let err = Spec::decode(&bytes).expect_err(bad);
            assert!(err.contains("is not /dev/NAME"), "{err}");
        }
    }

    #[test]
    fn escaping_paths_and_junk_are_refused() {
        let base = Spec {
            argv: vec!["true".into()],
            root: "/r".into(),
            tmp: "/t".into(),
            scratch: "/s".into(),
            ..Spec::default()
        };
        assert!(Spec::decode(&base.encode().expect("encodes")).is_ok());
        for bad in ["../up", "/abs", "a/../../b"] {
            let spec = Spec {
                writable: vec![bad.into()],
                ..base.clone()
            };
            assert!(
                Spec::decode(&spec.encode().expect("encodes")).is_err(),
                "{bad}"
            );
        }
        let smuggled = Spec {
            env: vec!["A=x\0host=/".into()],
            ..base.clone()
        };
        assert!(smuggled.encode().is_err(), "a NUL could add a record");
        assert!(Spec::decode(b"nokey\0").is_err());
        assert!(Spec::decode(b"bogus=1\0arg=true\0").is_err());
        assert!(Spec::decode(b"user=0\0arg=true\0").is_err());
        assert!(Spec::decode(b"root=/r\0").is_err(), "no program");
    }
}
