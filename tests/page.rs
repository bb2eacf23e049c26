//! The status page in a real browser (headless Chromium from Debian): with
//! two agents and work running, it lists both agents and the recent
//! actions. The screenshot is kept in target/test-artifacts/.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{ActionSpec, Agent, Coordinator, tempdir};

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

#[tokio::test]
async fn the_page_shows_both_agents_and_recent_actions_in_a_browser() {
    let Some(browser) = chromium() else {
        let why = "chromium is not installed (apt-get install chromium; scripts/test.sh does this)";
        assert!(
            std::env::var_os("OUTPOST_REQUIRE_CHROMIUM").is_none(),
            "{why}"
        );
        eprintln!("SKIPPED: {why}");
        return;
    };
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let first = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent-1"),
        &["--slots", "1"],
    );
    let second = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent-2"),
        &["--slots", "1"],
    );
    for a in [&first, &second] {
        a.wait_for("registered with the coordinator", Duration::from_secs(30))
            .await;
    }
    let mut client = server.client().await;
    let mut digests = Vec::new();
    for i in 0..3 {
        let action = client
            .upload_action(&ActionSpec::shell(&format!("echo page-test-{i}")))
            .await;
        client.execute(&action, true).await.expect("execute");
        digests.push(action);
    }
    // One still running while the page is rendered.
    let long = client.upload_action(&ActionSpec::shell("sleep 20")).await;
    let running = client.execute_in_background(long);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let url = format!("http://{}/", server.addr);
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifact dir");
    let screenshot = artifacts.join("status-page.png");
    let browser_args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1300,1000",
    ];
    let dom = Command::new(browser)
        .args(browser_args)
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    let shot = Command::new(browser)
        .args(browser_args)
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(&url)
        .output()
        .expect("run chromium");
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    assert!(
        std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000),
        "no screenshot"
    );
    eprintln!("screenshot: {}", screenshot.display());

    for agent in [&first, &second] {
        assert!(
            dom.contains(&agent.id()),
            "the page does not list agent {}",
            agent.id()
        );
    }
    for d in &digests {
        assert!(
            dom.contains(&d.to_string()),
            "the page does not list action {d}"
        );
    }
    assert!(
        dom.contains("1</b>executing"),
        "the running action is not shown"
    );
    running.abort();
}
