//! The admin CLI (`outpost fleet`, `queue`, `drain`, `undrain`) and the
//! status page, against a coordinator and an agent.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{ActionSpec, Agent, Coordinator, OUTPOST, tempdir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn admin(args: &[&str], endpoint: &str) -> (bool, String) {
    let out = Command::new(OUTPOST)
        .args(args)
        .args(["--coordinator", endpoint])
        .output()
        .expect("run outpost");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn page(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.expect("read");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    reply
}

#[tokio::test]
async fn the_cli_and_the_page_show_the_fleet_and_drain_works() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--slots", "2"],
    );
    agent
        .wait_for("registered with the coordinator", Duration::from_secs(30))
        .await;
    let endpoint = server.endpoint();
    let id = agent.id();

    let (ok, fleet) = admin(&["fleet"], &endpoint);
    assert!(ok, "{fleet}");
    assert!(
        fleet.contains(&id) && fleet.contains("ready") && fleet.contains("linux/"),
        "{fleet}"
    );

    // Drained: new work waits in the queue.
    let (ok, text) = admin(&["drain", &id], &endpoint);
    assert!(ok, "{text}");
    let mut client = server.client().await;
    let action = client
        .upload_action(&ActionSpec::shell("echo drained-then-ran"))
        .await;
    let waiting = client.execute_in_background(action);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiting.is_finished(), "a drained agent got work");
    let (_, queue) = admin(&["queue"], &endpoint);
    assert!(queue.contains("1 queued"), "{queue}");
    let (_, fleet) = admin(&["fleet"], &endpoint);
    assert!(fleet.contains("draining"), "{fleet}");

    // Undrained: it runs.
    let (ok, text) = admin(&["undrain", &id], &endpoint);
    assert!(ok, "{text}");
    let (_, response) = waiting.await.expect("join").expect("ran after undrain");
    assert_eq!(response.result.expect("result").exit_code, 0);

    // The page lists the agent and the action, with a link to its stdout.
    let html = page(server.addr).await;
    assert!(html.contains(&id), "the page does not list the agent");
    assert!(
        html.contains(&action.to_string()),
        "the page does not list the action"
    );
    assert!(
        html.contains("/blobs/") && html.contains(">stdout<"),
        "no stdout link"
    );

    // Unknown agents are a clear error.
    let (ok, text) = admin(&["drain", "no-such-agent"], &endpoint);
    assert!(!ok && text.contains("no agent \"no-such-agent\""), "{text}");
}
