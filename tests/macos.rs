//! Mac scheduling end to end: a coordinator and an agent as separate
//! processes. The agent runs on Linux here, so it is given the properties a
//! Mac advertises as labels (a Mac reads them from `sw_vers` and its
//! Xcodes); what is checked is the coordinator's side: an Xcode named in
//! the Command's environment (`XCODE_VERSION_OVERRIDE`, as Bazel's Apple
//! rules set it) is a requirement, a missing one fails at once naming the
//! fleet's, and `macos-version` is a minimum compared as versions.

mod common;

use std::path::Path;

use common::{ActionSpec, Agent, Client, Coordinator, tempdir, wait_for_fleet};
use tonic::Code;

/// A coordinator (no start-up grace, so requirements fail at once) and an
/// unisolated agent with `agent_args` in `dir`, connected.
async fn mac_fleet(dir: &Path, agent_args: &[&str]) -> (Coordinator, Agent, Client) {
    let server = Coordinator::start(&dir.join("data"), &["--startup-grace", "0s"]);
    let args: Vec<&str> = ["--isolation", "none"]
        .into_iter()
        .chain(agent_args.iter().copied())
        .collect();
    let agent = Agent::start(&server.endpoint(), &dir.join("agent"), &args);
    let mut client = server.client().await;
    wait_for_fleet(&mut client).await;
    (server, agent, client)
}

#[tokio::test]
async fn xcode_and_macos_versions_are_matched_as_a_mac_advertises_them() {
    let dir = tempdir();
    let (_server, _agent, mut client) = mac_fleet(
        dir.path(),
        &[
            "--label",
            "xcode-version=15.2.0.15C500b,macos-version=14.10",
        ],
    )
    .await;

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

/// Writes `Xcode_VERSION.app` as Xcode ships it: `Contents/version.plist`
/// and an SDK under a versioned name.
fn install_xcode(apps: &Path, version: &str, build: &str, sdk: (&str, &str)) {
    let contents = apps.join(format!("Xcode_{version}.app/Contents"));
    let (platform, sdk_version) = sdk;
    let sdks = contents.join(format!(
        "Developer/Platforms/{platform}.platform/Developer/SDKs"
    ));
    std::fs::create_dir_all(sdks.join(format!("{platform}{sdk_version}.sdk"))).expect("mkdir");
    std::fs::write(
        contents.join("version.plist"),
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>BuildVersion</key>
	<string>4</string>
	<key>CFBundleShortVersionString</key>
	<string>{version}</string>
	<key>CFBundleVersion</key>
	<string>22618</string>
	<key>ProductBuildVersion</key>
	<string>{build}</string>
	<key>ProjectName</key>
	<string>IDEApplication</string>
</dict>
</plist>
"#
        ),
    )
    .expect("version.plist");
}

#[tokio::test]
async fn an_action_runs_with_the_developer_dir_and_sdk_of_the_xcode_it_names() {
    let dir = tempdir();
    let apps = dir.path().join("Applications");
    install_xcode(&apps, "15.2", "15C500b", ("iPhoneSimulator", "17.2"));
    install_xcode(&apps, "14.3.1", "14E300c", ("iPhoneSimulator", "16.4"));
    let (_server, _agent, mut client) =
        mac_fleet(dir.path(), &["--xcode-dir", apps.to_str().expect("utf-8")]).await;
    let mut spec = ActionSpec::shell("echo \"$DEVELOPER_DIR\"; echo \"$SDKROOT\"");
    for (name, value) in [
        ("XCODE_VERSION_OVERRIDE", "14.3.1.14E300c"),
        ("APPLE_SDK_PLATFORM", "iPhoneSimulator"),
        ("APPLE_SDK_VERSION_OVERRIDE", "16.4"),
    ] {
        spec.env.push((name.into(), value.into()));
    }
    let ran = client.run(&spec).await;
    assert_eq!(ran.result.exit_code, 0, "{}", ran.stderr);
    let developer = apps.join("Xcode_14.3.1.app/Contents/Developer");
    let sdk =
        developer.join("Platforms/iPhoneSimulator.platform/Developer/SDKs/iPhoneSimulator16.4.sdk");
    assert_eq!(
        ran.stdout,
        format!("{}\n{}\n", developer.display(), sdk.display())
    );
    // The Xcode as a property, version only: the one installed build.
    let spec = ActionSpec::shell("echo \"$DEVELOPER_DIR\"").with_platform("xcode-version", "15.2");
    let ran = client.run(&spec).await;
    assert_eq!(
        ran.stdout,
        format!(
            "{}\n",
            apps.join("Xcode_15.2.app/Contents/Developer").display()
        )
    );
    // An SDK that Xcode lacks: the action's error, naming what it has.
    let mut spec = ActionSpec::shell("true").with_platform("xcode-version", "15.2");
    spec.env
        .push(("APPLE_SDK_PLATFORM".into(), "iPhoneOS".into()));
    let action = client.upload_action(&spec).await;
    let (_, response) = client.execute(&action, true).await.expect("execute");
    let status = response.status.unwrap_or_default();
    assert!(
        status.message.contains("has no SDK iPhoneOS")
            && status.message.contains("iPhoneSimulator17.2"),
        "{status:?}"
    );
}
