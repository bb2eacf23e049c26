//! Credentials: client and agent tokens with roles, checked on every call,
//! and revoked by a reload.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{ActionSpec, Agent, Client, Coordinator, OUTPOST, blob, tempdir};
use outpost_proto::reapi;

const BUILDER: &str = "builder-token-0001";
const READER: &str = "reader-token-00001";
const ADMIN: &str = "admin-token-000001";
const AGENT_1: &str = "agent-token-000001";
const AGENT_2: &str = "agent-token-000002";

struct Setup {
    dir: tempfile::TempDir,
    coordinator: Coordinator,
}

impl Setup {
    fn start() -> Setup {
        let dir = tempdir();
        std::fs::write(
            dir.path().join("client-tokens"),
            format!("# builds\n{BUILDER}\n{READER} cache-read\n{ADMIN} admin\n"),
        )
        .expect("write");
        std::fs::write(
            dir.path().join("agent-tokens"),
            format!("{AGENT_1}\n{AGENT_2}\n"),
        )
        .expect("write");
        let coordinator = Coordinator::start(
            &dir.path().join("data"),
            &[
                "--client-tokens",
                &dir.path().join("client-tokens").display().to_string(),
                "--agent-tokens",
                &dir.path().join("agent-tokens").display().to_string(),
            ],
        );
        Setup { dir, coordinator }
    }

    async fn client(&self, token: Option<&str>) -> Client {
        Client::connect_as(&format!("http://{}", self.coordinator.addr), token).await
    }

    fn token_file(&self, name: &str, token: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("{token}\n")).expect("write");
        path.display().to_string()
    }

    fn agent(&self, name: &str, token: &str) -> Agent {
        let file = self.token_file(&format!("{name}.token"), token);
        Agent::start(
            &self.coordinator.endpoint(),
            &self.dir.path().join(name),
            &["--isolation", "none", "--token-file", &file],
        )
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn calls_need_a_token_with_the_right_role_and_refused_writes_store_nothing() {
    let s = Setup::start();
    let (digest, data) = blob(7, 1000);
    let find = |digest: &outpost_proto::digest::Digest| reapi::FindMissingBlobsRequest {
        blob_digests: vec![digest.to_proto()],
        ..Default::default()
    };
    let update = reapi::BatchUpdateBlobsRequest {
        requests: vec![reapi::batch_update_blobs_request::Request {
            digest: Some(digest.to_proto()),
            data: data.clone(),
            ..Default::default()
        }],
        ..Default::default()
    };

    let mut anonymous = s.client(None).await;
    assert_eq!(
        code(anonymous.cas.find_missing_blobs(find(&digest)).await),
        tonic::Code::Unauthenticated
    );
    let mut wrong = s.client(Some("not-a-token-at-all")).await;
    let refused = wrong
        .cas
        .find_missing_blobs(find(&digest))
        .await
        .expect_err("unknown token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(
        refused.message().contains("unknown or revoked"),
        "{refused:?}"
    );

    let mut reader = s.client(Some(READER)).await;
    reader
        .cas
        .find_missing_blobs(find(&digest))
        .await
        .expect("a reader may look");
    let denied = reader
        .cas
        .batch_update_blobs(update.clone())
        .await
        .expect_err("a reader may not write");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(denied.message().contains("cache-write"), "{denied:?}");
    let action = reapi::Digest {
        hash: "ab".repeat(32),
        size_bytes: 10,
    };
    assert_eq!(
        code(
            reader
                .ac
                .update_action_result(reapi::UpdateActionResultRequest {
                    action_digest: Some(action.clone()),
                    action_result: Some(reapi::ActionResult::default()),
                    ..Default::default()
                })
                .await
        ),
        tonic::Code::PermissionDenied
    );
    // Nothing was stored by the refused writes.
    let missing = reader
        .cas
        .find_missing_blobs(find(&digest))
        .await
        .expect("find")
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing.len(), 1);
    assert_eq!(
        code(
            reader
                .ac
                .get_action_result(reapi::GetActionResultRequest {
                    action_digest: Some(action),
                    ..Default::default()
                })
                .await
        ),
        tonic::Code::NotFound
    );

    // Agent tokens serve the CAS but never Execute or the Action Cache.
    let mut as_agent = s.client(Some(AGENT_1)).await;
    as_agent
        .cas
        .batch_update_blobs(update)
        .await
        .expect("agents upload outputs");
    assert_eq!(
        code(
            as_agent
                .execution
                .execute(reapi::ExecuteRequest {
                    action_digest: Some(digest.to_proto()),
                    ..Default::default()
                })
                .await
        ),
        tonic::Code::PermissionDenied
    );

    // Health stays open for load balancers; the admin API does not.
    assert!(
        http_get(s.coordinator.addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        http_get(s.coordinator.addr, "/api/fleet")
            .await
            .starts_with("HTTP/1.1 401")
    );
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.expect("read");
    reply
}

#[tokio::test]
async fn agents_need_an_agent_token_and_a_revoked_one_is_dropped() {
    let s = Setup::start();
    // A client token cannot register as an agent.
    let impostor = s.agent("impostor", BUILDER);
    impostor
        .wait_for("needs the role agent", Duration::from_secs(30))
        .await;
    assert_eq!(impostor.count("registered with the coordinator"), 0);
    drop(impostor);

    let agent = s.agent("agent", AGENT_1);
    agent
        .wait_for("registered with the coordinator", Duration::from_secs(30))
        .await;
    let mut builder = s.client(Some(BUILDER)).await;
    let mut spec = ActionSpec::shell("echo built > out.txt");
    spec.output_paths = vec!["out.txt".into()];
    let action = builder.upload_action(&spec).await;
    let (_, response) = builder.execute(&action, true).await.expect("execute");
    assert_eq!(
        response.result.as_ref().map(|r| r.exit_code),
        Some(0),
        "{response:?}"
    );

    // The admin API needs the admin role.
    let admin = |token: Option<&str>| {
        let mut cmd = Command::new(OUTPOST);
        cmd.args(["fleet", "--coordinator", &s.coordinator.endpoint()]);
        if let Some(t) = token {
            cmd.args(["--token-file", &s.token_file("cli.token", t)]);
        }
        let out = cmd.output().expect("outpost fleet");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, said) = admin(None);
    assert!(!ok && said.contains("needs a token"), "{said}");
    let (ok, said) = admin(Some(BUILDER));
    assert!(!ok && said.contains("admin"), "{said}");
    let (ok, said) = admin(Some(ADMIN));
    assert!(ok && said.contains(&agent.id()), "{said}");

    // Revoking its token (and reloading) drops the live agent.
    std::fs::write(s.dir.path().join("agent-tokens"), format!("{AGENT_2}\n")).expect("write");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.coordinator.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    agent
        .wait_for("token was revoked", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let registrations = agent.count("registered with the coordinator");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        agent.count("registered with the coordinator"),
        registrations,
        "a revoked agent cannot register again"
    );
    assert!(Path::new(&s.dir.path().join("agent-tokens")).exists());
}
