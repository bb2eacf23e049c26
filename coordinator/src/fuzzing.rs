//! What the fuzz targets in `fuzz/` run, one function per target, each
//! taking arbitrary bytes the way untrusted input arrives. Besides "no
//! panic", each checks a property of what it accepted (a name that parses
//! renders back to itself, a tree that validates has no escaping entry).
//! The seed corpus under `fuzz/corpus/` is replayed through these same
//! functions by `tests/fuzz_corpus.rs` on stable Rust.

use std::collections::HashMap;

use outpost_proto::digest::{Digest, Function};
use outpost_proto::{fleet, reapi, resource, validate};
use prost::Message;

use crate::scheduler::platform::{Offer, requirements};

/// A target: arbitrary bytes in, a panic when something is wrong.
pub type Target = fn(&[u8]);

/// The targets, by the name `cargo fuzz` knows them by.
pub const TARGETS: &[(&str, Target)] = &[
    ("resource_name", resource_name),
    ("digest", digest),
    ("directory", directory),
    ("command", command),
    ("fleet_message", fleet_message),
];

/// ByteStream resource names: what parses renders back to the same parse.
pub fn resource_name(data: &[u8]) {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = resource::parse_read(name) {
        let again = resource::read_name(&r.instance_name, &r.digest, r.compressor);
        assert_eq!(resource::parse_read(&again).as_ref(), Ok(&r), "{again}");
    }
    if let Ok(w) = resource::parse_write(name) {
        let again = resource::write_name(&w.instance_name, &w.upload_id, &w.digest, w.compressor);
        assert_eq!(resource::parse_write(&again).as_ref(), Ok(&w), "{again}");
    }
}

/// Digests as text (`HASH/SIZE`) and on the wire.
pub fn digest(data: &[u8]) {
    let function = if data.first().is_some_and(|b| b & 1 == 1) {
        Function::Blake3
    } else {
        Function::Sha256
    };
    if let Ok(text) = std::str::from_utf8(data.get(1..).unwrap_or_default())
        && let Ok(d) = Digest::parse_pair(text, function)
    {
        assert_eq!(Digest::from_proto(&d.to_proto(), function), Ok(d));
        assert_eq!(
            Digest::parse(&d.hash_hex(), &d.size.to_string(), function),
            Ok(d)
        );
    }
    if let Ok(wire) = reapi::Digest::decode(data)
        && let Ok(d) = Digest::from_proto(&wire, function)
    {
        assert_eq!(d.to_proto().size_bytes, wire.size_bytes);
        assert_eq!(d.hash_hex(), wire.hash.to_ascii_lowercase());
    }
}

/// Directory nodes: a Directory that validates has plain, unique names,
/// and its symlink verdicts agree with resolving the target by hand.
pub fn directory(data: &[u8]) {
    let (depth, bytes) = match data.split_first() {
        Some((d, rest)) => (usize::from(*d % 8), rest),
        None => (0, data),
    };
    let Ok(dir) = reapi::Directory::decode(bytes) else {
        return;
    };
    if validate::directory(&dir).is_ok() {
        let mut names: Vec<&str> = validate::entry_names(&dir).collect();
        for n in &names {
            assert!(!n.is_empty() && !n.contains('/') && *n != "." && *n != "..");
        }
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "a repeated name was accepted");
    }
    for s in &dir.symlinks {
        let escapes = validate::symlink_escapes(depth, &s.target);
        // NUL is refused by `validate::directory`, not by this verdict.
        if !s.target.starts_with('/') && !s.target.contains('\0') {
            let base: Vec<String> = (0..depth).map(|i| format!("d{i}")).collect();
            let inside = validate::resolve(&base, &s.target, "target").is_ok();
            assert_eq!(escapes, !inside, "{:?} at depth {depth}", s.target);
        }
    }
}

/// Commands: one that validates keeps every output inside the root.
pub fn command(data: &[u8]) {
    let Ok(cmd) = reapi::Command::decode(data) else {
        return;
    };
    if validate::command(&cmd).is_ok() {
        let workdir = validate::resolve(&[], &cmd.working_directory, "workdir")
            .expect("a valid Command's working directory resolves");
        for p in cmd
            .output_paths
            .iter()
            .chain(&cmd.output_files)
            .chain(&cmd.output_directories)
        {
            let resolved = validate::resolve(&workdir, p, "output")
                .expect("a valid Command's outputs resolve");
            assert!(!resolved.is_empty(), "{p:?} is the root");
            assert!(
                resolved
                    .iter()
                    .all(|s| s != ".." && s != "." && !s.is_empty())
            );
        }
    }
}

/// Messages agents send: they survive a round trip, and the platform an
/// agent advertises is matched the way the scheduler matches it: an agent
/// advertising exactly what an action requires can run it.
pub fn fleet_message(data: &[u8]) {
    let Ok(message) = fleet::AgentMessage::decode(data) else {
        return;
    };
    let again = fleet::AgentMessage::decode(message.encode_to_vec().as_slice())
        .expect("what was decoded encodes and decodes");
    // A NaN resource is the one value not equal to itself.
    #[allow(clippy::eq_op)]
    let comparable = message == message;
    if comparable {
        assert_eq!(again, message);
    }
    let Some(fleet::agent_message::Kind::Register(register)) = message.kind else {
        return;
    };
    let Some(caps) = register.capabilities else {
        return;
    };
    let offer = Offer::new(&caps.properties, &caps.resources);
    // An agent offering what it advertises satisfies it; capabilities
    // (`container-image`, which requires Docker) and the network (matched
    // with the isolation that gives it) say more than their own value.
    let plain: Vec<_> = caps
        .properties
        .iter()
        .filter(|p| {
            !matches!(
                outpost_proto::platform::canonical_name(&p.name),
                Some("container-image" | "dockerNetwork")
            )
        })
        .cloned()
        .collect();
    if let Ok((req, _)) = requirements(&plain)
        && req.min.values().all(|v| *v < 1 << 50)
    {
        let resources: HashMap<String, f64> = req
            .min
            .iter()
            .map(|(k, v)| (k.clone(), *v as f64 / 1000.0))
            .collect();
        assert!(Offer::new(&plain, &resources).satisfies(&req), "{req:?}");
        let _ = offer.satisfies(&req);
    }
}

/// Seed inputs per target: the shapes real clients and agents send, and
/// the hostile ones the tests refuse.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let empty = Function::Sha256.empty();
    let some = Function::Sha256.digest_of(b"outpost");
    match target {
        "resource_name" => [
            resource::read_name("", &some, resource::Compressor::Identity),
            resource::read_name("main/ci", &some, resource::Compressor::Zstd),
            resource::write_name(
                "",
                "3f1c5a2e-7d3b-4e8a-9c1d-0a2b3c4d5e6f",
                &some,
                resource::Compressor::Identity,
            ),
            resource::write_name("x", "id", &empty, resource::Compressor::Zstd) + "/metadata",
            "blobs/blake3/".to_owned() + &"ab".repeat(32) + "/5",
            "uploads/../blobs/x/1".to_owned(),
            "a//blobs/".to_owned() + &some.hash_hex() + "/-1",
        ]
        .into_iter()
        .map(String::into_bytes)
        .collect(),
        "digest" => vec![
            format!("\0{}/{}", some.hash_hex(), some.size).into_bytes(),
            format!("\u{1}{}/0", "af".repeat(32)).into_bytes(),
            format!("\0{}/99999999999999999999", some.hash_hex()).into_bytes(),
            some.to_proto().encode_to_vec(),
            reapi::Digest {
                hash: some.hash_hex().to_uppercase(),
                size_bytes: -1,
            }
            .encode_to_vec(),
        ],
        "directory" => {
            let file = |name: &str| reapi::FileNode {
                name: name.to_owned(),
                digest: Some(some.to_proto()),
                is_executable: true,
                ..Default::default()
            };
            let link = |name: &str, target: &str| reapi::SymlinkNode {
                name: name.to_owned(),
                target: target.to_owned(),
                ..Default::default()
            };
            let dirs = [
                reapi::Directory {
                    files: vec![file("a.c"), file("b.h")],
                    directories: vec![reapi::DirectoryNode {
                        name: "sub".into(),
                        digest: Some(empty.to_proto()),
                    }],
                    symlinks: vec![link("cc", "/usr/bin/cc"), link("up", "sub/../a.c")],
                    ..Default::default()
                },
                reapi::Directory {
                    files: vec![file("b"), file("a"), file("a")],
                    ..Default::default()
                },
                reapi::Directory {
                    symlinks: vec![link("esc", "../../../etc/shadow"), link("..", "x")],
                    ..Default::default()
                },
            ];
            dirs.iter()
                .enumerate()
                .map(|(i, d)| {
                    let mut v = vec![i as u8];
                    v.extend(d.encode_to_vec());
                    v
                })
                .collect()
        }
        "command" => [
            reapi::Command {
                arguments: vec!["/bin/sh".into(), "-c".into(), "echo hi > out".into()],
                environment_variables: vec![reapi::command::EnvironmentVariable {
                    name: "PATH".into(),
                    value: "/bin:/usr/bin".into(),
                }],
                output_paths: vec!["out".into(), "../pkg/gen".into()],
                working_directory: "pkg".into(),
                ..Default::default()
            },
            reapi::Command {
                arguments: vec!["true".into()],
                output_files: vec!["/etc/passwd".into()],
                output_directories: vec!["../..".into()],
                ..Default::default()
            },
            reapi::Command::default(),
        ]
        .iter()
        .map(Message::encode_to_vec)
        .collect(),
        "fleet_message" => [
            fleet::AgentMessage {
                kind: Some(fleet::agent_message::Kind::Register(fleet::Register {
                    protocol_version: outpost_proto::FLEET_PROTOCOL_VERSION,
                    agent_id: "vm-1".into(),
                    hostname: "builder".into(),
                    version: "0.1.0".into(),
                    capabilities: Some(fleet::Capabilities {
                        properties: vec![
                            reapi::platform::Property {
                                name: "OSFamily".into(),
                                value: "linux".into(),
                            },
                            reapi::platform::Property {
                                name: "cores".into(),
                                value: "4".into(),
                            },
                        ],
                        resources: HashMap::from([("memory".to_owned(), 8e9)]),
                        slots: 4,
                        ..Default::default()
                    }),
                    running_leases: vec!["lease-1".into()],
                    process_id: "5f0c".into(),
                })),
            },
            fleet::AgentMessage::default(),
        ]
        .iter()
        .map(Message::encode_to_vec)
        .collect(),
        _ => Vec::new(),
    }
}
