//! `/metrics`, `/healthz` and `/readyz` on the coordinator's main address:
//! the metrics parse as Prometheus text and move when actions run.

mod common;

use std::collections::HashMap;

use common::{ActionSpec, Agent, Coordinator, tempdir};

use common::http_get as get;

/// Parses Prometheus/OpenMetrics text into `series -> value`, failing on
/// any line that is not a comment, a sample or the EOF marker. Chunked
/// transfer framing, if any, is skipped.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with('#') || line.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels in {line:?}");
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.insert(series.to_owned(), value);
    }
    samples
}

fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_parse_and_move_when_actions_run() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let mut client = server.client().await;
    assert_eq!(get(server.addr, "/healthz").await.0, 200);
    assert_eq!(get(server.addr, "/readyz").await.0, 200);
    let (status, before) = get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    let before = parse(&before);

    let _agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--slots", "2"],
    );
    let ok = client.upload_action(&ActionSpec::shell("echo fine")).await;
    client.execute(&ok, false).await.expect("execute");
    client.execute(&ok, false).await.expect("cached");
    let failing = client.upload_action(&ActionSpec::shell("exit 3")).await;
    client.execute(&failing, false).await.expect("execute");

    let (_, after) = get(server.addr, "/metrics").await;
    let after = parse(&after);
    for (series, at_least) in [
        ("outpost_actions_total{outcome=\"success\"}", 1.0),
        ("outpost_actions_total{outcome=\"failed\"}", 1.0),
        ("outpost_actions_total{outcome=\"cached\"}", 1.0),
        ("outpost_action_cache_lookups_total{result=\"hit\"}", 1.0),
        ("outpost_action_cache_lookups_total{result=\"miss\"}", 2.0),
        (
            "outpost_action_stage_seconds_count{stage=\"execution\"}",
            2.0,
        ),
        (
            "outpost_action_stage_seconds_count{stage=\"input_fetch\"}",
            2.0,
        ),
        ("outpost_action_stage_seconds_count{stage=\"upload\"}", 2.0),
        ("outpost_action_stage_seconds_count{stage=\"queued\"}", 2.0),
    ] {
        let moved = value(&after, series) - value(&before, series);
        assert!(
            moved >= at_least,
            "{series} moved by {moved}, expected at least {at_least}"
        );
    }
    assert!(value(&after, "outpost_cas_bytes") > 0.0);
    assert_eq!(value(&after, "outpost_agents_connected"), 1.0);
    assert!(
        after.keys().any(|k| k.starts_with("outpost_queue_length")),
        "no queue length series"
    );
}

#[tokio::test]
async fn the_agent_serves_metrics_only_when_asked() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--slots", "1", "--metrics-listen", &listen],
    );
    agent
        .wait_for(
            "registered with the coordinator",
            std::time::Duration::from_secs(30),
        )
        .await;
    let addr: std::net::SocketAddr = listen.parse().expect("addr");
    assert_eq!(get(addr, "/readyz").await.0, 200);
    let mut client = server.client().await;
    let ok = client.upload_action(&ActionSpec::shell("true")).await;
    client.execute(&ok, true).await.expect("execute");
    // The lease's task finishes a moment after the result went out.
    let mut samples = HashMap::new();
    for _ in 0..100 {
        let (status, text) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        samples = parse(&text);
        if value(&samples, "outpost_agent_running") == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        value(&samples, "outpost_agent_actions_total{outcome=\"success\"}"),
        1.0
    );
    assert_eq!(value(&samples, "outpost_agent_connected"), 1.0);
    #[cfg(target_os = "linux")]
    assert_eq!(value(&samples, "outpost_agent_spawner_starts_total"), 1.0);
    assert_eq!(value(&samples, "outpost_agent_running"), 0.0);
}
