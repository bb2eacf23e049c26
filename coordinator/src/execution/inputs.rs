//! Before an action is queued: its Action, Command and every input are in
//! the CAS (else FAILED_PRECONDITION listing what is missing, which clients
//! upload and retry), the input tree is well formed, and all of it is pinned
//! so it stays until the action ran.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;
use outpost_proto::digest::{Digest, Function};
use outpost_proto::reapi;
use prost::Message;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::service::{Context, required_digest, storage_status};
use crate::storage::Pin;

/// Action and Command messages, and Directory nodes, are small.
const MAX_MESSAGE: u64 = 16 << 20;
/// Directories in one input tree at most.
const MAX_DIRECTORIES: usize = 1_000_000;

pub struct Checked {
    pub action: reapi::Action,
    pub command: reapi::Command,
    pub pin: Pin,
    /// What the agent would otherwise fetch (see `fleet.Lease`).
    pub prefetched: Prefetched,
}

/// The Action, Command and a small input tree as read from the CAS.
#[derive(Clone, Default)]
pub struct Prefetched {
    pub action: Bytes,
    pub command: Bytes,
    pub directories: Vec<(Digest, Bytes)>,
}

/// Input trees up to this many bytes of Directory messages travel with the
/// lease.
const PREFETCH_TREE_BYTES: usize = 64 << 10;

enum Fetched<M> {
    Found(M, Bytes),
    Missing,
}

async fn fetch<M: Message + Default>(
    ctx: &Context,
    digest: Digest,
    what: &str,
) -> Result<Fetched<M>, Status> {
    if digest.size > MAX_MESSAGE {
        return Err(Status::invalid_argument(format!(
            "{what} {digest} is larger than {MAX_MESSAGE} bytes"
        )));
    }
    match ctx.cas.read_all(digest).await.map_err(storage_status)? {
        None => Ok(Fetched::Missing),
        Some(bytes) => decode(bytes.clone(), digest, what).map(|m| Fetched::Found(m, bytes)),
    }
}

fn decode<M: Message + Default>(bytes: Bytes, digest: Digest, what: &str) -> Result<M, Status> {
    M::decode(bytes)
        .map_err(|e| Status::invalid_argument(format!("blob {digest} is not a valid {what}: {e}")))
}

fn check_name(name: &str, parent: Digest) -> Result<(), Status> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "directory {parent} has an entry named {name:?}; names must be plain (no '/', '.' or '..')"
        )));
    }
    Ok(())
}

/// A name may appear once per directory, across files, directories and
/// symlinks (two entries for one path would let a symlink stand in for a
/// directory the agent writes into).
fn check_unique_names(dir: &reapi::Directory, digest: Digest) -> Result<(), Status> {
    let mut names: Vec<&str> = dir
        .files
        .iter()
        .map(|f| f.name.as_str())
        .chain(dir.directories.iter().map(|d| d.name.as_str()))
        .chain(dir.symlinks.iter().map(|s| s.name.as_str()))
        .collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Status::invalid_argument(format!(
            "directory {digest} has the name {:?} more than once",
            pair[0]
        )));
    }
    Ok(())
}

fn missing_error(missing: &[Digest]) -> Status {
    let mut details = ErrorDetails::new();
    for d in missing {
        details.add_precondition_failure_violation(
            "MISSING",
            format!("blobs/{d}"),
            "not in the CAS",
        );
    }
    let shown: Vec<String> = missing.iter().take(5).map(|d| d.to_string()).collect();
    Status::with_error_details(
        Code::FailedPrecondition,
        format!(
            "{} input blob(s) are not in the CAS: {}{}; upload them and execute again",
            missing.len(),
            shown.join(", "),
            if missing.len() > 5 { ", ..." } else { "" }
        ),
        details,
    )
}

pub async fn check(ctx: &Context, action_digest: Digest) -> Result<Checked, Status> {
    let function: Function = action_digest.function;
    let mut prefetched = Prefetched::default();
    let action: reapi::Action = match fetch(ctx, action_digest, "Action").await? {
        Fetched::Found(a, bytes) => {
            prefetched.action = bytes;
            a
        }
        Fetched::Missing => return Err(missing_error(&[action_digest])),
    };
    let command_digest = required_digest(
        action.command_digest.as_ref(),
        function,
        "Action.command_digest",
    )?;
    let root = required_digest(
        action.input_root_digest.as_ref(),
        function,
        "Action.input_root_digest",
    )?;
    let mut all = vec![action_digest, command_digest, root];
    // Pinned before anything is checked, so nothing found present can be
    // evicted before the action ran.
    let mut pins = vec![ctx.cas.pin(&all)];
    let mut missing = Vec::new();
    let command = match fetch::<reapi::Command>(ctx, command_digest, "Command").await? {
        Fetched::Found(c, bytes) => {
            prefetched.command = bytes;
            Some(c)
        }
        Fetched::Missing => {
            missing.push(command_digest);
            None
        }
    };
    let mut queue = VecDeque::from([root]);
    let mut seen = HashSet::from([root]);
    let mut files = Vec::new();
    let mut tree_bytes = 0usize;
    while let Some(dir_digest) = queue.pop_front() {
        let dir: reapi::Directory = match fetch(ctx, dir_digest, "Directory").await? {
            Fetched::Found(d, bytes) => {
                tree_bytes += bytes.len();
                prefetched.directories.push((dir_digest, bytes));
                d
            }
            Fetched::Missing => {
                missing.push(dir_digest);
                continue;
            }
        };
        check_unique_names(&dir, dir_digest)?;
        for f in &dir.files {
            check_name(&f.name, dir_digest)?;
            files.push(required_digest(
                f.digest.as_ref(),
                function,
                "FileNode.digest",
            )?);
        }
        for s in &dir.symlinks {
            check_name(&s.name, dir_digest)?;
        }
        let mut children = Vec::new();
        for d in &dir.directories {
            check_name(&d.name, dir_digest)?;
            let child = required_digest(d.digest.as_ref(), function, "DirectoryNode.digest")?;
            if seen.insert(child) {
                if seen.len() > MAX_DIRECTORIES {
                    return Err(Status::invalid_argument(format!(
                        "input tree {root} has more than {MAX_DIRECTORIES} directories"
                    )));
                }
                children.push(child);
                queue.push_back(child);
            }
        }
        pins.push(ctx.cas.pin(&children));
        all.extend(children);
    }
    pins.push(ctx.cas.pin(&files));
    missing.extend(ctx.cas.find_missing(files).await.map_err(storage_status)?);
    if !missing.is_empty() {
        return Err(missing_error(&missing));
    }
    if tree_bytes > PREFETCH_TREE_BYTES {
        // Large trees: the agent asks GetTree instead.
        prefetched.directories.clear();
    }
    Ok(Checked {
        action,
        command: command.expect("present when nothing is missing"),
        pin: Pin::new(pins),
        prefetched,
    })
}
