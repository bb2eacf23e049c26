//! `ActionCache`: results per instance name. A result whose outputs are no
//! longer all in the CAS is a miss, so a client never gets a hit it cannot
//! download; a hit refreshes those outputs in the eviction order.

use outpost_proto::digest::{Digest, Function};
use outpost_proto::reapi::{self, action_cache_server::ActionCache};
use prost::Message;
use tonic::{Request, Response, Status};

use super::{Context, function_of, optional_digest, required_digest, storage_status};

pub struct ActionCacheService {
    ctx: Context,
}

impl ActionCacheService {
    pub fn new(ctx: Context) -> Self {
        ActionCacheService { ctx }
    }
}

/// Looks an action up: its result if one is stored and every blob it refers
/// to is still in the CAS (those are then refreshed in the eviction order).
pub async fn lookup(
    ctx: &Context,
    instance_name: &str,
    action: Digest,
) -> Result<Option<reapi::ActionResult>, Status> {
    let found = lookup_inner(ctx, instance_name, action).await?;
    ctx.metrics.action_cache(found.is_some());
    Ok(found)
}

async fn lookup_inner(
    ctx: &Context,
    instance_name: &str,
    action: Digest,
) -> Result<Option<reapi::ActionResult>, Status> {
    let function = action.function;
    let Some(bytes) = ctx
        .action_cache
        .get_action_result(instance_name, action)
        .await
        .map_err(storage_status)?
    else {
        return Ok(None);
    };
    let result = match reapi::ActionResult::decode(bytes) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(action_digest = %action, error = %e, "stored action result does not decode; treating as a miss");
            return Ok(None);
        }
    };
    let Some(blobs) = referenced_blobs(ctx, &result, function).await? else {
        return Ok(None);
    };
    // find_missing also refreshes every present output in the LRU.
    let missing = ctx.cas.find_missing(blobs).await.map_err(storage_status)?;
    if !missing.is_empty() {
        tracing::debug!(action_digest = %action, missing = missing.len(), "action result outputs evicted; miss");
        return Ok(None);
    }
    Ok(Some(result))
}

/// Every blob a result refers to, trees expanded; `None` if a tree is gone
/// already.
async fn referenced_blobs(
    ctx: &Context,
    result: &reapi::ActionResult,
    function: Function,
) -> Result<Option<Vec<Digest>>, Status> {
    let mut blobs = Vec::new();
    for f in &result.output_files {
        blobs.extend(optional_digest(
            f.digest.as_ref(),
            function,
            "output_files.digest",
        )?);
    }
    blobs.extend(optional_digest(
        result.stdout_digest.as_ref(),
        function,
        "stdout_digest",
    )?);
    blobs.extend(optional_digest(
        result.stderr_digest.as_ref(),
        function,
        "stderr_digest",
    )?);
    for dir in &result.output_directories {
        if let Some(root) = optional_digest(
            dir.root_directory_digest.as_ref(),
            function,
            "root_directory_digest",
        )? && !directory_blobs(ctx, root, &mut blobs).await?
        {
            return Ok(None);
        }
        let Some(tree_digest) = optional_digest(dir.tree_digest.as_ref(), function, "tree_digest")?
        else {
            continue;
        };
        blobs.push(tree_digest);
        let Some(bytes) = ctx
            .cas
            .read_all(tree_digest)
            .await
            .map_err(storage_status)?
        else {
            return Ok(None);
        };
        let tree = match reapi::Tree::decode(bytes) {
            Ok(tree) => tree,
            Err(e) => {
                // An entry written before trees were checked on update:
                // a miss, so the action runs again and replaces it.
                tracing::warn!(%tree_digest, error = %e, "an action result names a tree that does not decode; treating it as a miss");
                return Ok(None);
            }
        };
        for directory in tree.root.iter().chain(&tree.children) {
            push_files(directory, function, &mut blobs)?;
        }
    }
    Ok(Some(blobs))
}

/// Adds the digests of a Directory's files to `blobs`.
fn push_files(
    directory: &reapi::Directory,
    function: Function,
    blobs: &mut Vec<Digest>,
) -> Result<(), Status> {
    for file in &directory.files {
        blobs.extend(optional_digest(
            file.digest.as_ref(),
            function,
            "a directory's file digest",
        )?);
    }
    Ok(())
}

/// Adds the Directory blobs under `root` (itself included) and the files
/// they name to `blobs`; false if a Directory is gone or is not one.
async fn directory_blobs(
    ctx: &Context,
    root: Digest,
    blobs: &mut Vec<Digest>,
) -> Result<bool, Status> {
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root];
    while let Some(digest) = stack.pop() {
        if !seen.insert(digest) {
            continue;
        }
        let Some(bytes) = ctx.cas.read_all(digest).await.map_err(storage_status)? else {
            return Ok(false);
        };
        let Ok(directory) = reapi::Directory::decode(bytes) else {
            tracing::warn!(%digest, "an action result names a directory that does not decode; treating it as a miss");
            return Ok(false);
        };
        blobs.push(digest);
        push_files(&directory, digest.function, blobs)?;
        for child in &directory.directories {
            stack.extend(optional_digest(
                child.digest.as_ref(),
                digest.function,
                "directory digest",
            )?);
        }
    }
    Ok(true)
}

fn validate_result(result: &reapi::ActionResult, function: Function) -> Result<(), Status> {
    let check_path = |path: &str, field: &str| {
        if path.is_empty() || path.starts_with('/') || path.contains('\0') {
            Err(Status::invalid_argument(format!(
                "{field} path {path:?} must be a non-empty relative path"
            )))
        } else {
            Ok(())
        }
    };
    for f in &result.output_files {
        check_path(&f.path, "output_files")?;
        required_digest(f.digest.as_ref(), function, "output_files.digest")?;
    }
    for d in &result.output_directories {
        check_path(&d.path, "output_directories")?;
        // A Tree, the root Directory (DIRECTORY_ONLY), or both.
        let tree = optional_digest(
            d.tree_digest.as_ref(),
            function,
            "output_directories.tree_digest",
        )?;
        let root = optional_digest(
            d.root_directory_digest.as_ref(),
            function,
            "root_directory_digest",
        )?;
        if tree.is_none() && root.is_none() {
            return Err(Status::invalid_argument(format!(
                "output_directories {}: neither tree_digest nor root_directory_digest is set",
                outpost_proto::quote::quoted(&d.path)
            )));
        }
    }
    for s in result
        .output_symlinks
        .iter()
        .chain(&result.output_file_symlinks)
        .chain(&result.output_directory_symlinks)
    {
        check_path(&s.path, "output_symlinks")?;
    }
    optional_digest(result.stdout_digest.as_ref(), function, "stdout_digest")?;
    optional_digest(result.stderr_digest.as_ref(), function, "stderr_digest")?;
    Ok(())
}

/// Every `tree_digest` of a result that is already in the CAS must decode
/// as a `Tree`: an entry naming some other blob would break its action's
/// every lookup. Trees not uploaded yet make a later lookup a miss.
async fn check_trees(
    ctx: &Context,
    result: &reapi::ActionResult,
    function: Function,
) -> Result<(), Status> {
    for dir in &result.output_directories {
        let Some(tree_digest) = optional_digest(dir.tree_digest.as_ref(), function, "tree_digest")?
        else {
            continue;
        };
        let Some(bytes) = ctx
            .cas
            .read_all(tree_digest)
            .await
            .map_err(storage_status)?
        else {
            continue;
        };
        if let Err(e) = reapi::Tree::decode(bytes) {
            return Err(Status::invalid_argument(format!(
                "output_directories {}: tree_digest {tree_digest} is not a Tree message ({e}); \
                 upload the directory's Tree and name its digest",
                outpost_proto::quote::quoted(&dir.path)
            )));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<reapi::GetActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        let req = request.into_inner();
        let function = function_of(req.digest_function)?;
        let action = required_digest(req.action_digest.as_ref(), function, "action_digest")?;
        match lookup(&self.ctx, &req.instance_name, action).await? {
            Some(result) => Ok(Response::new(result)),
            None => Err(Status::not_found(format!("no action result for {action}"))),
        }
    }

    async fn update_action_result(
        &self,
        request: Request<reapi::UpdateActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        let req = request.into_inner();
        let function = function_of(req.digest_function)?;
        let action = required_digest(req.action_digest.as_ref(), function, "action_digest")?;
        let result = req
            .action_result
            .ok_or_else(|| Status::invalid_argument("action_result is missing"))?;
        validate_result(&result, function)?;
        check_trees(&self.ctx, &result, function).await?;
        self.ctx
            .action_cache
            .update_action_result(&req.instance_name, action, result.encode_to_vec().into())
            .await
            .map_err(storage_status)?;
        Ok(Response::new(result))
    }
}
