//! Per-instance-name settings: an instance's default platform reaches
//! every action executed on it, under the action's own properties.

mod common;

use std::time::{Duration, Instant};

use common::{ActionSpec, Agent, Coordinator, tempdir};
use outpost_proto::reapi;
use tonic::Code;

#[tokio::test]
async fn an_instances_default_platform_applies_under_the_actions_own() {
    let dir = tempdir();
    let config = dir.path().join("coordinator.yaml");
    std::fs::write(
        &config,
        "instances:\n  special:\n    default_platform: {Pool: special}\n  \
         elsewhere:\n    default_platform: {Pool: nowhere}\n",
    )
    .expect("write the config");
    let server = Coordinator::start(
        &dir.path().join("data"),
        &[
            "--config",
            config.to_str().expect("utf-8"),
            "--startup-grace",
            "0s",
        ],
    );
    let _agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--isolation", "none", "--pool", "special"],
    );
    let mut client = server.client().await;
    let mut run = async |instance: &str, spec: &ActionSpec| {
        let action = client.upload_action(spec).await;
        let stream = client
            .execution
            .execute(reapi::ExecuteRequest {
                instance_name: instance.to_owned(),
                action_digest: Some(action.to_proto()),
                skip_cache_lookup: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        common::follow(stream).await.map(|(_, r)| r)
    };
    // The agent offers Pool=special; once it is there, `special` runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match run("special", &ActionSpec::shell("echo special")).await {
            Ok(r) if r.status.as_ref().is_none_or(|s| s.code == 0) => break,
            other => {
                assert!(Instant::now() < deadline, "never ran: {other:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // `elsewhere` asks for a pool no agent has: it fails fast, naming it.
    let err = run("elsewhere", &ActionSpec::shell("echo elsewhere"))
        .await
        .expect_err("no agent offers Pool=nowhere");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("Pool=nowhere"), "{}", err.message());
    // An action's own Pool wins over the instance's default.
    let own = ActionSpec::shell("echo own").with_platform("Pool", "special");
    let response = run("elsewhere", &own).await.expect("its own pool");
    assert_eq!(response.result.expect("a result").exit_code, 0);
}
