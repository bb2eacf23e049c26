//! Recycled runners (`recycle-runner=true`) on real agents: a workspace is
//! handed to the next action of its key with what the last one left
//! (`preserve-workspace=true`), never after a failure, never to a plain
//! action or another key, within the count and disk caps; and the
//! scheduler sends an action to the agent holding its warm runner, or to
//! any agent once `runner-recycling-max-wait` is over.

mod common;

use std::time::Duration;

use common::{ActionSpec, Agent, Coordinator, tempdir};

fn recycled(key: &str, script: &str) -> ActionSpec {
    ActionSpec::shell(script)
        .with_platform("recycle-runner", "true")
        .with_platform("preserve-workspace", "true")
        .with_platform("runner-recycling-key", key)
}

fn worker_of(ran: &common::Ran) -> String {
    ran.result
        .execution_metadata
        .as_ref()
        .expect("metadata")
        .worker
        .clone()
}

#[tokio::test]
async fn a_kept_workspace_goes_to_the_next_action_of_its_key_only() {
    let scratch = tempdir();
    let server = Coordinator::start(&scratch.path().join("outpost-data"), &[]);
    let agent = Agent::start(
        &server.endpoint(),
        &scratch.path().join("agent"),
        &[
            "--slots",
            "1",
            "--runner-max-count",
            "1",
            "--runner-max-disk",
            "1MiB",
        ],
    );
    let mut client = server.client().await;
    common::wait_for_fleet(&mut client).await;

    let mut first = recycled("k", "echo one > left.txt; echo out > out.txt");
    first.output_paths = vec!["out.txt".into()];
    let ran = client.run(&first).await;
    assert_eq!(ran.result.exit_code, 0, "{}", ran.stderr);
    // The next action of the key sees what the first left, not its output.
    let ran = client
        .run(&recycled(
            "k",
            "cat left.txt; test -e out.txt || echo no-output",
        ))
        .await;
    assert_eq!(ran.stdout, "one\nno-output\n", "{}", ran.stderr);
    let absent = "cat left.txt 2>/dev/null || echo absent";
    // A plain action, and another key, never see it.
    let ran = client.run(&ActionSpec::shell(absent)).await;
    assert_eq!(ran.stdout, "absent\n");
    // (The other key's workspace then evicts k's: one is kept at most.)
    let ran = client.run(&recycled("other", absent)).await;
    assert_eq!(ran.stdout, "absent\n");
    let ran = client.run(&recycled("k", absent)).await;
    assert_eq!(ran.stdout, "absent\n", "evicted by the count cap");

    // A failed action's workspace is not kept.
    let ran = client
        .run(&recycled("f", "echo left > left.txt; exit 3"))
        .await;
    assert_eq!(ran.result.exit_code, 3);
    let ran = client.run(&recycled("f", absent)).await;
    assert_eq!(
        ran.stdout, "absent\n",
        "a failed action's workspace came back"
    );

    // Nor one over the disk cap.
    let ran = client
        .run(&recycled(
            "big",
            "echo left > left.txt; head -c 2097152 /dev/zero > big.bin",
        ))
        .await;
    assert_eq!(ran.result.exit_code, 0, "{}", ran.stderr);
    let ran = client.run(&recycled("big", absent)).await;
    assert_eq!(
        ran.stdout, "absent\n",
        "a workspace over the disk cap was kept"
    );
    drop(agent);
}

#[tokio::test]
async fn the_action_goes_to_the_agent_holding_its_runner_until_its_wait_is_over() {
    let scratch = tempdir();
    let server = Coordinator::start(&scratch.path().join("outpost-data"), &[]);
    let agents = [
        Agent::start(
            &server.endpoint(),
            &scratch.path().join("agent-a"),
            &["--slots", "1"],
        ),
        Agent::start(
            &server.endpoint(),
            &scratch.path().join("agent-b"),
            &["--slots", "1"],
        ),
    ];
    for a in &agents {
        a.wait_for("registered with the coordinator", Duration::from_secs(30))
            .await;
    }
    let mut ids: Vec<String> = agents.iter().map(Agent::id).collect();
    // Between two idle agents the scheduler picks the first id: the warm
    // runner is put on the other one, so only the preference explains
    // getting it back.
    ids.sort();
    let (first, second) = (ids[0].clone(), ids[1].clone());
    let mut busy_client = server.client().await;
    let mut client = server.client().await;
    let long = tokio::spawn(async move {
        busy_client
            .run(&ActionSpec::shell("sleep 2; echo long"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let warm = client.run(&recycled("route", "echo one > left.txt")).await;
    assert_eq!(worker_of(&warm), second, "the first agent is busy");
    let long = long.await.expect("long action");
    assert_eq!(worker_of(&long), first);
    // Both idle: the action goes to the agent holding its runner.
    let again = client.run(&recycled("route", "cat left.txt")).await;
    assert_eq!(worker_of(&again), second);
    assert_eq!(again.stdout, "one\n");
    // The status page shows the warm runner on its agent.
    let (status, page) = common::http_get(server.addr, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("warm: 1 warm key ("), "{page}");

    // The warm agent is busy for longer than the wait: the action goes to
    // the other agent.
    let mut busy_client = server.client().await;
    let hold = tokio::spawn(async move {
        busy_client
            .run(&recycled("route", "sleep 4; echo held"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let waited = client
        .run(
            &recycled("route", "cat left.txt 2>/dev/null || echo absent")
                .with_platform("runner-recycling-max-wait", "1s"),
        )
        .await;
    assert_eq!(worker_of(&waited), first);
    assert_eq!(waited.stdout, "absent\n");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "it waited for the busy agent: {:?}",
        started.elapsed()
    );
    assert_eq!(worker_of(&hold.await.expect("held action")), second);
}

/// With client tokens, one client's kept workspace never reaches another
/// client's action of the same key.
#[tokio::test]
async fn a_kept_workspace_stays_with_its_client() {
    let scratch = tempdir();
    let dir = scratch.path();
    std::fs::write(
        dir.join("client-tokens"),
        "client-a-token-0001\nclient-b-token-0001\n",
    )
    .expect("write");
    std::fs::write(dir.join("agent-tokens"), "agent-token-00000001\n").expect("write");
    std::fs::write(dir.join("agent.token"), "agent-token-00000001\n").expect("write");
    let path = |name: &str| dir.join(name).display().to_string();
    let server = Coordinator::start(
        &dir.join("data"),
        &[
            "--client-tokens",
            &path("client-tokens"),
            "--agent-tokens",
            &path("agent-tokens"),
        ],
    );
    let agent = Agent::start(
        &server.endpoint(),
        &dir.join("agent"),
        &["--slots", "1", "--token-file", &path("agent.token")],
    );
    agent
        .wait_for("registered with the coordinator", Duration::from_secs(30))
        .await;
    let uri = format!("http://{}", server.addr);
    let mut a = common::Client::connect_as(&uri, Some("client-a-token-0001")).await;
    let mut b = common::Client::connect_as(&uri, Some("client-b-token-0001")).await;
    let ran = a.run(&recycled("k", "echo mine > left.txt")).await;
    assert_eq!(ran.result.exit_code, 0, "{}", ran.stderr);
    let absent = "cat left.txt 2>/dev/null || echo absent";
    let ran = b.run(&recycled("k", absent)).await;
    assert_eq!(ran.stdout, "absent\n", "another client's workspace");
    let ran = a.run(&recycled("k", absent)).await;
    assert_eq!(ran.stdout, "mine\n", "its own client's workspace");
}
