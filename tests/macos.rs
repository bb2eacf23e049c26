//! Mac scheduling end to end: a coordinator and an agent as separate
//! processes. The agent runs on Linux here, so it is given the properties a
//! Mac advertises as labels (a Mac reads them from `sw_vers` and its
//! Xcodes); what is checked is the coordinator's side: an Xcode named in
//! the Command's environment (`XCODE_VERSION_OVERRIDE`, as Bazel's Apple
//! rules set it) is a requirement, a missing one fails at once naming the
//! fleet's, and `macos-version` is a minimum compared as versions.

mod common;

use common::{ActionSpec, Agent, Coordinator, tempdir, wait_for_fleet};
use tonic::Code;

#[tokio::test]
async fn xcode_and_macos_versions_are_matched_as_a_mac_advertises_them() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &["--startup-grace", "0s"]);
    let _agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &[
            "--isolation",
            "none",
            "--label",
            "xcode-version=15.2.0.15C500b,macos-version=14.10",
        ],
    );
    let mut client = server.client().await;
    wait_for_fleet(&mut client).await;

    // An Xcode no agent has, named only in the environment: refused at
    // once, with the versions the fleet has.
    let mut spec = ActionSpec::shell("true");
    spec.env
        .push(("XCODE_VERSION_OVERRIDE".into(), "16.0.0.16A242d".into()));
    let action = client.upload_action(&spec).await;
    let err = client
        .execute(&action, true)
        .await
        .expect_err("no agent has Xcode 16");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    for words in [
        "no agent offers xcode-version=16.0.16A242d",
        "the fleet offers xcode-version=15.2.15C500b",
        "XCODE_VERSION_OVERRIDE",
    ] {
        assert!(err.message().contains(words), "{words}: {}", err.message());
    }

    // macOS versions compare as versions: 14.10 meets 14.9 ...
    let spec = ActionSpec::shell("echo ran").with_platform("macos-version", "14.9");
    let ran = client.run(&spec).await;
    assert_eq!(ran.result.exit_code, 0, "{}", ran.stderr);
    assert_eq!(ran.stdout, "ran\n");
    // ... and not 14.11.
    let spec = ActionSpec::shell("true").with_platform("macos-version", ">=14.11");
    let action = client.upload_action(&spec).await;
    let err = client
        .execute(&action, true)
        .await
        .expect_err("no agent has macOS 14.11");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(
            "no agent offers macos-version>=14.11 (the fleet offers macos-version 14.10)"
        ),
        "{}",
        err.message()
    );
}
