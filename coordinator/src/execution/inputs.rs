//! Before an action is queued: its Action, Command and every input are in
//! the CAS (else FAILED_PRECONDITION listing what is missing, which clients
//! upload and retry), the input tree is well formed, and all of it is pinned
//! so it stays until the action ran.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::Bytes;
use outpost_proto::digest::{Digest, Function};
use outpost_proto::{reapi, validate};
use prost::Message;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::service::{Context, required_digest, storage_status};
use crate::storage::Pin;

/// Action and Command messages, and Directory nodes, are small.
const MAX_MESSAGE: u64 = 16 << 20;
/// Directories in one input tree at most.
const MAX_DIRECTORIES: usize = 1_000_000;
/// Files in one input tree at most (counted per directory, so a
/// directory used twice counts once).
const MAX_FILES: usize = 10_000_000;
/// Levels of directories below the root at most (paths stay well under
/// PATH_MAX on the agents).
pub const MAX_DEPTH: usize = 512;

/// What an input tree may contain beyond the REAPI's rules.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Relative symlinks whose target climbs above the input root.
    pub allow_escaping_symlinks: bool,
}

pub struct Checked {
    pub action: reapi::Action,
    pub command: reapi::Command,
    pub pin: Pin,
    /// What the agent would otherwise fetch (see `fleet.Lease`).
    pub prefetched: Prefetched,
    /// Bytes of the distinct input files: what an agent's input cache must
    /// hold at once to lay the action out.
    pub input_bytes: u64,
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

/// Levels below `root` on the longest path (a directory reached along
/// several paths counts at its deepest), without recursion.
fn height(root: Digest, graph: &HashMap<Digest, Vec<Digest>>) -> usize {
    let mut heights: HashMap<Digest, usize> = HashMap::with_capacity(graph.len());
    let mut stack = vec![(root, false)];
    while let Some((d, children_done)) = stack.pop() {
        if heights.contains_key(&d) {
            continue;
        }
        let children = graph.get(&d).map_or(&[][..], Vec::as_slice);
        if children_done {
            let h = children
                .iter()
                .map(|c| heights.get(c).map_or(0, |h| h + 1))
                .max()
                .unwrap_or(0);
            heights.insert(d, h);
        } else {
            stack.push((d, true));
            stack.extend(children.iter().map(|c| (*c, false)));
        }
    }
    heights.get(&root).copied().unwrap_or(0)
}

fn invalid_directory(digest: Digest, e: validate::Invalid) -> Status {
    Status::invalid_argument(format!("directory {digest} in the input tree: {e}"))
}

pub async fn check(
    ctx: &Context,
    action_digest: Digest,
    policy: Policy,
) -> Result<Checked, Status> {
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
            validate::command(&c)
                .map_err(|e| Status::invalid_argument(format!("Command {command_digest}: {e}")))?;
            prefetched.command = bytes;
            Some(c)
        }
        Fetched::Missing => {
            missing.push(command_digest);
            None
        }
    };
    // Breadth first: a directory met again is deeper than where it was
    // checked first, and a symlink that stays inside the root at the
    // shallowest place stays inside deeper too.
    let mut queue = VecDeque::from([(root, 0usize)]);
    let mut seen = HashSet::from([root]);
    let mut files = Vec::new();
    let mut tree_bytes = 0usize;
    let mut graph: HashMap<Digest, Vec<Digest>> = HashMap::new();
    while let Some((dir_digest, depth)) = queue.pop_front() {
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
        validate::directory(&dir).map_err(|e| invalid_directory(dir_digest, e))?;
        if !policy.allow_escaping_symlinks
            && let Some(s) = dir
                .symlinks
                .iter()
                .find(|s| validate::symlink_escapes(depth, &s.target))
        {
            return Err(invalid_directory(
                dir_digest,
                validate::Invalid(format!(
                    "the symlink {:?} -> {:?} points outside the input root \
                     (the coordinator's allow_escaping_symlinks is off)",
                    s.name, s.target
                )),
            ));
        }
        for f in &dir.files {
            files.push(required_digest(
                f.digest.as_ref(),
                function,
                "FileNode.digest",
            )?);
        }
        if files.len() > MAX_FILES {
            return Err(Status::invalid_argument(format!(
                "input tree {root} has more than {MAX_FILES} files"
            )));
        }
        let mut children = Vec::new();
        let mut edges = Vec::with_capacity(dir.directories.len());
        for d in &dir.directories {
            let child = required_digest(d.digest.as_ref(), function, "DirectoryNode.digest")?;
            edges.push(child);
            if seen.insert(child) {
                if seen.len() > MAX_DIRECTORIES {
                    return Err(Status::invalid_argument(format!(
                        "input tree {root} has more than {MAX_DIRECTORIES} directories"
                    )));
                }
                children.push(child);
                queue.push_back((child, depth + 1));
            }
        }
        pins.push(ctx.cas.pin(&children));
        all.extend(children);
        graph.insert(dir_digest, edges);
    }
    if height(root, &graph) > MAX_DEPTH {
        return Err(Status::invalid_argument(format!(
            "input tree {root} is more than {MAX_DEPTH} directories deep"
        )));
    }
    let input_bytes = files
        .iter()
        .collect::<HashSet<_>>()
        .iter()
        .map(|d| d.size)
        .sum();
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
        input_bytes,
    })
}
