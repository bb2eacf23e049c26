//! Output directories in the forms clients ask for
//! (`Command.output_directory_format`), read back the way each client
//! reads them: a Tree (Bazel), or Directory blobs from
//! `root_directory_digest` (BuildStream's buildbox-casd), also through the
//! Action Cache.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::{ActionSpec, Coordinator, tempdir};
use outpost_proto::digest::{Digest, Function};
use outpost_proto::reapi::{self, command::OutputDirectoryFormat as Format};
use prost::Message as _;

/// Every file under the Directory `root`, by path: Directories from
/// `known` when there, otherwise read from the CAS as blobs of their own.
async fn files_under(
    client: &mut common::Client,
    root: Digest,
    known: &HashMap<Digest, reapi::Directory>,
) -> BTreeMap<String, Vec<u8>> {
    let digest =
        |d: Option<&reapi::Digest>| Digest::from_proto_opt(d, Function::Sha256).expect("a digest");
    let mut files = BTreeMap::new();
    let mut stack = vec![(String::new(), root)];
    while let Some((prefix, d)) = stack.pop() {
        let dir = match known.get(&d) {
            Some(dir) => dir.clone(),
            None => {
                let bytes = client
                    .download(&d)
                    .await
                    .expect("every Directory is in the CAS");
                reapi::Directory::decode(bytes.as_slice()).expect("a Directory")
            }
        };
        for f in &dir.files {
            let data = client
                .download(&digest(f.digest.as_ref()))
                .await
                .expect("every file is in the CAS");
            files.insert(format!("{prefix}{}", f.name), data);
        }
        for sub in &dir.directories {
            stack.push((
                format!("{prefix}{}/", sub.name),
                digest(sub.digest.as_ref()),
            ));
        }
    }
    files
}

/// Every file under the directory of the Directory blob `root`.
async fn files_from_directories(
    client: &mut common::Client,
    root: &reapi::Digest,
) -> BTreeMap<String, Vec<u8>> {
    let root = Digest::from_proto_opt(Some(root), Function::Sha256).expect("digest");
    files_under(client, root, &HashMap::new()).await
}

/// Every file under the directory of the Tree blob `tree`.
async fn files_from_tree(
    client: &mut common::Client,
    tree: &reapi::Digest,
) -> BTreeMap<String, Vec<u8>> {
    let d = Digest::from_proto_opt(Some(tree), Function::Sha256).expect("digest");
    let bytes = client.download(&d).await.expect("the Tree is in the CAS");
    let tree = reapi::Tree::decode(bytes.as_slice()).expect("a Tree");
    let root = tree.root.expect("a root");
    let root_digest = Function::Sha256.digest_of(&root.encode_to_vec());
    let known: HashMap<Digest, reapi::Directory> = tree
        .children
        .into_iter()
        .chain([root])
        .map(|c| (Function::Sha256.digest_of(&c.encode_to_vec()), c))
        .collect();
    files_under(client, root_digest, &known).await
}

#[tokio::test]
async fn output_directories_come_back_whole_in_every_format() {
    let (_dir, _server, _agent, mut client) = common::fleet(&[], "2").await;
    let want: BTreeMap<String, Vec<u8>> =
        [("a/b/leaf", "leaf\n"), ("a/mid", "mid\n"), ("top", "top\n")]
            .into_iter()
            .map(|(p, c)| (p.to_owned(), c.as_bytes().to_vec()))
            .collect();
    for format in [
        Format::TreeOnly,
        Format::DirectoryOnly,
        Format::TreeAndDirectory,
    ] {
        let mut spec = ActionSpec::shell(&format!(
            "mkdir -p out/a/b && echo leaf > out/a/b/leaf && echo mid > out/a/mid && \
             echo top > out/top && echo {}",
            format as i32
        ));
        spec.output_paths = vec!["out".into()];
        spec.output_directory_format = format as i32;
        let action = client.upload_action(&spec).await;
        let (_, response) = client.execute(&action, true).await.expect("execute");
        assert!(
            response.status.as_ref().is_none_or(|st| st.code == 0),
            "{format:?}: {response:?}"
        );
        let result = response.result.expect("a result");
        let out = &result.output_directories[0];
        assert_eq!(
            out.tree_digest.is_some(),
            format != Format::DirectoryOnly,
            "{format:?}"
        );
        assert_eq!(
            out.root_directory_digest.is_some(),
            format != Format::TreeOnly,
            "{format:?}"
        );
        if let Some(tree) = &out.tree_digest {
            assert_eq!(files_from_tree(&mut client, tree).await, want, "{format:?}");
        }
        if let Some(root) = &out.root_directory_digest {
            assert_eq!(
                files_from_directories(&mut client, root).await,
                want,
                "{format:?}"
            );
        }
        // The Action Cache serves the same result, complete.
        let cached = client
            .ac
            .get_action_result(reapi::GetActionResultRequest {
                action_digest: Some(action.to_proto()),
                ..Default::default()
            })
            .await
            .expect("cached")
            .into_inner();
        assert_eq!(cached.output_directories, result.output_directories);
    }
}

#[tokio::test]
async fn a_directory_only_result_is_accepted_and_a_missing_directory_is_a_miss() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let mut client = server.client().await;
    // Not empty: the empty blob is always present.
    let leaf = reapi::Directory {
        symlinks: vec![reapi::SymlinkNode {
            name: "link".into(),
            target: "elsewhere".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let leaf_bytes = leaf.encode_to_vec();
    let leaf_digest = Function::Sha256.digest_of(&leaf_bytes);
    let root = reapi::Directory {
        directories: vec![reapi::DirectoryNode {
            name: "sub".into(),
            digest: Some(leaf_digest.to_proto()),
        }],
        ..Default::default()
    };
    let root_bytes = root.encode_to_vec();
    let root_digest = Function::Sha256.digest_of(&root_bytes);
    client.upload(&root_digest, root_bytes.into()).await;
    let update = |action: Digest| reapi::UpdateActionResultRequest {
        action_digest: Some(action.to_proto()),
        action_result: Some(reapi::ActionResult {
            output_directories: vec![reapi::OutputDirectory {
                path: "out".into(),
                root_directory_digest: Some(root_digest.to_proto()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let get = |action: Digest| reapi::GetActionResultRequest {
        action_digest: Some(action.to_proto()),
        ..Default::default()
    };
    let action = Function::Sha256.digest_of(b"directory-only action");
    client
        .ac
        .update_action_result(update(action))
        .await
        .expect("a DIRECTORY_ONLY result is accepted");
    // Its child Directory is not in the CAS: a hit would send the client
    // looking for a blob that is not there.
    let err = client
        .ac
        .get_action_result(get(action))
        .await
        .expect_err("a miss");
    assert_eq!(err.code(), tonic::Code::NotFound);
    client.upload(&leaf_digest, leaf_bytes.into()).await;
    client
        .ac
        .get_action_result(get(action))
        .await
        .expect("a hit");
}
