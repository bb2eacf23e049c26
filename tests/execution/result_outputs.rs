//! What an ActionResult carries when outputs are odd: the wrong type, one
//! path twice, over the agent's or the CAS's size bound.

use std::time::{Duration, Instant};

use outpost_proto::reapi;
use tonic::Code;

use crate::common::{self, ActionSpec, Agent, Coordinator, fleet, tempdir, wait_for_fleet};
use crate::raw_action;

/// A Command running `script` with the legacy output lists.
fn legacy_outputs(script: &str, files: &[&str], directories: &[&str]) -> reapi::Command {
    reapi::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        environment_variables: vec![reapi::command::EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        output_files: files.iter().map(|f| (*f).to_owned()).collect(),
        output_directories: directories.iter().map(|d| (*d).to_owned()).collect(),
        ..Default::default()
    }
}

async fn text_of(client: &mut common::Client, digest: Option<&reapi::Digest>) -> String {
    let d = outpost_proto::digest::Digest::from_proto_opt(
        digest,
        outpost_proto::digest::Function::Sha256,
    )
    .expect("a digest");
    String::from_utf8(client.download(&d).await.expect("download")).expect("utf-8")
}

#[tokio::test]
async fn an_output_of_the_wrong_type_fails_the_action_but_keeps_its_result() {
    let (_dir, _server, _agent, mut client) = fleet(&[], "1").await;
    let command = legacy_outputs(
        "mkdir out && echo x > other && echo hello && echo oops >&2",
        &["out", "other"],
        &[],
    );
    let action = raw_action(&mut client, &command, &reapi::Directory::default(), &[]).await;
    let (_, response) = client.execute(&action, true).await.expect("execute");
    let status = response.status.clone().expect("status");
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{status:?}");
    assert!(
        status
            .message
            .contains("output file \"out\" is a directory"),
        "{}",
        status.message
    );
    let result = response.result.expect("the result is kept");
    assert_eq!(result.exit_code, 0);
    assert_eq!(
        text_of(&mut client, result.stdout_digest.as_ref()).await,
        "hello\n"
    );
    assert!(
        text_of(&mut client, result.stderr_digest.as_ref())
            .await
            .starts_with("oops\n")
    );
    let paths: Vec<&str> = result
        .output_files
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(paths, ["other"]);
    // Not a result to serve again.
    let cached = client
        .ac
        .get_action_result(reapi::GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await;
    assert_eq!(
        cached.map(|_| ()).expect_err("not cached").code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn an_output_path_listed_twice_comes_back_once() {
    let (_dir, _server, _agent, mut client) = fleet(&[], "1").await;
    let mut spec = ActionSpec::shell("echo once > a");
    spec.output_paths = vec!["a".into(), "a".into()];
    let action = client.upload_action(&spec).await;
    let (_, response) = client.execute(&action, true).await.expect("execute");
    let result = response.result.expect("result");
    let paths: Vec<&str> = result
        .output_files
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(paths, ["a"]);
}

#[tokio::test]
async fn one_path_as_output_file_and_directory_is_refused_before_it_runs() {
    let dir = tempdir();
    // No agent: a refusal comes from checking the Command, not from a run.
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let mut client = server.client().await;
    let ran = dir.path().join("ran");
    let command = legacy_outputs(
        &format!("touch {}", ran.display()),
        &["out/x"],
        &["out/./x"],
    );
    let action = raw_action(&mut client, &command, &reapi::Directory::default(), &[]).await;
    let started = Instant::now();
    let err = client.execute(&action, true).await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("same path"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!ran.exists());
}

/// Bytes in files under `dir`.
fn bytes_under(dir: &std::path::Path) -> u64 {
    common::files_under(dir)
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

#[tokio::test]
async fn outputs_over_the_agents_limit_are_refused_before_any_upload() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let _agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--isolation", "none", "--action-output-limit", "1GiB"],
    );
    let mut client = server.client().await;
    wait_for_fleet(&mut client).await;
    // 4 GiB by its length, nothing on disk: hashing and uploading it is
    // what must not happen.
    let mut spec = ActionSpec::shell("truncate -s 4G out && echo made");
    spec.output_paths = vec!["out".into()];
    let started = Instant::now();
    refused_as_too_large(
        &mut client,
        &spec,
        &["\"out\"", "4294967296 bytes", "action_output_limit of 1GiB"],
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(bytes_under(&dir.path().join("data")) < 64 << 20);
    // The action's fault, not the agent's: it keeps serving.
    let after = client.upload_action(&ActionSpec::shell("true")).await;
    let (_, response) = client.execute(&after, true).await.expect("execute");
    assert_eq!(response.status.map_or(0, |s| s.code), 0);
}

#[tokio::test]
async fn an_output_larger_than_the_cas_takes_is_refused_with_its_name() {
    let (_dir, _server, _agent, mut client) = fleet(&["--max-cas-size", "1MiB"], "1").await;
    let mut spec = ActionSpec::shell("head -c 2000000 /dev/zero > big");
    spec.output_paths = vec!["big".into()];
    refused_as_too_large(
        &mut client,
        &spec,
        &["\"big\"", "2000000 bytes", "max_cas_size"],
    )
    .await;
}

/// Runs `spec`, which must fail at once (no retry) with RESOURCE_EXHAUSTED
/// saying each of `words`.
async fn refused_as_too_large(client: &mut common::Client, spec: &ActionSpec, words: &[&str]) {
    let action = client.upload_action(spec).await;
    let (_, response) = client.execute(&action, true).await.expect("execute");
    let status = response.status.expect("status");
    assert_eq!(status.code, Code::ResourceExhausted as i32, "{status:?}");
    for words in words {
        assert!(
            status.message.contains(words),
            "{words}: {}",
            status.message
        );
    }
    assert!(
        !status.message.contains("times"),
        "retried: {}",
        status.message
    );
}
