//! The scheduler driven directly, as the fleet service drives it: agents
//! are message channels, storage is the real embedded store on a tempdir.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outpost_proto::digest::{Digest, Function};
use outpost_proto::fleet::{
    self, agent_message::Kind as FromAgent, coordinator_message::Kind as ToAgent,
};
use outpost_proto::reapi;
use tokio::sync::mpsc;
use tonic::{Code, Status};

use super::super::{Job, Scheduler, Session, Settings, Stage, Waiter, platform};
use crate::storage::Pin;
use crate::storage::embedded::EmbeddedStore;

struct Fixture {
    scheduler: Scheduler,
    _dir: tempfile::TempDir,
    _shutdown: tokio_util::sync::CancellationToken,
}

async fn fixture(settings: Settings) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _committer) = EmbeddedStore::open(dir.path().to_owned(), 1 << 30)
        .await
        .expect("store");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let scheduler = Scheduler::start(
        settings,
        Arc::new(store.clone()),
        Arc::new(store),
        crate::metrics::Metrics::new(),
        shutdown.clone(),
    );
    Fixture {
        scheduler,
        _dir: dir,
        _shutdown: shutdown,
    }
}

fn settings() -> Settings {
    Settings {
        heartbeat_interval: Duration::from_secs(5),
        reconnect_grace: Duration::from_millis(200),
        max_attempts: 3,
        fleet_memory: Duration::from_secs(600),
        startup_grace: Duration::ZERO,
        abandon_after: Duration::from_secs(10),
        keep_finished: Duration::from_secs(60),
    }
}

fn job(n: u8, build: &str, priority: i32) -> Job {
    Job {
        instance_name: String::new(),
        action_digest: Function::Sha256.digest_of(&[n]),
        requirements: platform::Requirements::default(),
        config: Vec::new(),
        priority,
        invocation: build.to_owned(),
        timeout: Duration::from_secs(60),
        cacheable: true,
        pin: Pin::new(()),
        queued_at: SystemTime::now(),
        prefetched: Default::default(),
    }
}

struct FakeAgent {
    session: Session,
    rx: mpsc::Receiver<Result<fleet::CoordinatorMessage, Status>>,
    registered: fleet::Registered,
}

async fn join(
    s: &Scheduler,
    id: &str,
    slots: u32,
    running: Vec<String>,
) -> Result<FakeAgent, Status> {
    let (tx, mut rx) = mpsc::channel(64);
    let register = fleet::Register {
        protocol_version: outpost_proto::FLEET_PROTOCOL_VERSION,
        agent_id: id.to_owned(),
        hostname: "test".into(),
        version: "test".into(),
        capabilities: Some(fleet::Capabilities {
            properties: vec![reapi::platform::Property {
                name: "OSFamily".into(),
                value: "linux".into(),
            }],
            slots,
            ..Default::default()
        }),
        running_leases: running,
    };
    let session = s.join(register, tx).await?;
    let Some(Ok(fleet::CoordinatorMessage {
        kind: Some(ToAgent::Registered(registered)),
    })) = rx.recv().await
    else {
        panic!("Registered did not come first");
    };
    Ok(FakeAgent {
        session: session.0,
        rx,
        registered,
    })
}

impl FakeAgent {
    async fn next_lease(&mut self) -> fleet::Lease {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
                .await
                .expect("a lease within 5s")
                .expect("stream open")
                .expect("no error");
            if let Some(ToAgent::Lease(lease)) = msg.kind {
                return lease;
            }
        }
    }

    async fn no_lease(&mut self) {
        let got = tokio::time::timeout(Duration::from_millis(300), self.rx.recv()).await;
        if let Ok(Some(Ok(fleet::CoordinatorMessage {
            kind: Some(ToAgent::Lease(l)),
        }))) = got
        {
            panic!("unexpected lease {l:?}");
        }
    }

    async fn finish(&self, s: &Scheduler, lease: &fleet::Lease) {
        let result = fleet::LeaseResult {
            lease_id: lease.lease_id.clone(),
            outcome: Some(fleet::lease_result::Outcome::Result(reapi::ActionResult {
                exit_code: 0,
                ..Default::default()
            })),
            retryable: false,
            timed_out: false,
            message: String::new(),
        };
        s.agent_message(&self.session, FromAgent::LeaseResult(result))
            .await
            .expect("send");
    }
}

fn digest_of(lease: &fleet::Lease) -> Digest {
    Digest::from_proto_opt(lease.action_digest.as_ref(), Function::Sha256).expect("digest")
}

/// Gives the scheduler a moment, then checks the operation did not finish.
async fn still_executing(waiter: &Waiter, why: &str) {
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(waiter.state.borrow().stage, Stage::Executing, "{why}");
}

async fn finished(waiter: &mut Waiter) -> reapi::ExecuteResponse {
    let state = tokio::time::timeout(
        Duration::from_secs(5),
        waiter.state.wait_for(|s| s.stage == Stage::Completed),
    )
    .await
    .expect("finished within 5s")
    .expect("scheduler alive")
    .clone();
    state.response.expect("a response").as_ref().clone()
}

#[tokio::test]
async fn a_reconnecting_agent_resumes_its_lease() {
    let f = fixture(settings()).await;
    let mut a = join(&f.scheduler, "a", 1, vec![]).await.expect("join");
    let mut waiter = f.scheduler.submit(job(1, "b", 0)).await.expect("submit");
    let lease = a.next_lease().await;
    f.scheduler.agent_gone(&a.session).await;
    let a2 = join(&f.scheduler, "a", 1, vec![lease.lease_id.clone()])
        .await
        .expect("rejoin");
    assert_eq!(a2.registered.resumed_leases, vec![lease.lease_id.clone()]);
    // The old session can no longer report; the new one can.
    a.finish(&f.scheduler, &lease).await;
    still_executing(&waiter, "a stale session completed the lease").await;
    a2.finish(&f.scheduler, &lease).await;
    let response = finished(&mut waiter).await;
    assert_eq!(response.result.expect("result").exit_code, 0);
}

#[tokio::test]
async fn a_lost_agents_lease_is_fenced_and_retried_elsewhere() {
    let f = fixture(settings()).await;
    let mut a = join(&f.scheduler, "a", 1, vec![]).await.expect("join");
    let mut waiter = f.scheduler.submit(job(2, "b", 0)).await.expect("submit");
    let first = a.next_lease().await;
    f.scheduler.agent_gone(&a.session).await;
    let mut b = join(&f.scheduler, "b", 1, vec![]).await.expect("join");
    let second = b.next_lease().await;
    assert_eq!(second.attempt, 2);
    assert_eq!(digest_of(&second), digest_of(&first));
    // A comes back too late: its lease is no longer its own.
    let a2 = join(&f.scheduler, "a", 1, vec![first.lease_id.clone()])
        .await
        .expect("rejoin");
    assert!(a2.registered.resumed_leases.is_empty());
    a2.finish(&f.scheduler, &first).await;
    still_executing(&waiter, "a fenced result completed the operation").await;
    b.finish(&f.scheduler, &second).await;
    assert_eq!(
        finished(&mut waiter)
            .await
            .result
            .expect("result")
            .exit_code,
        0
    );
}

#[tokio::test]
async fn an_action_that_keeps_losing_agents_fails_clearly() {
    // Submitted before any agent: the start-up grace keeps it queued.
    let f = fixture(Settings {
        max_attempts: 2,
        startup_grace: Duration::from_secs(3600),
        ..settings()
    })
    .await;
    let mut waiter = f.scheduler.submit(job(3, "b", 0)).await.expect("submit");
    for attempt in 1..=2 {
        let mut a = join(&f.scheduler, &format!("agent-{attempt}"), 1, vec![])
            .await
            .expect("join");
        let lease = a.next_lease().await;
        assert_eq!(lease.attempt, attempt);
        f.scheduler.agent_gone(&a.session).await;
    }
    let response = finished(&mut waiter).await;
    let status = response.status.expect("status");
    assert_eq!(status.code, Code::Internal as i32);
    assert!(
        status.message.contains("failed 2 times"),
        "{}",
        status.message
    );
    assert!(
        status.message.contains("agent-1, agent-2"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn an_incompatible_agent_is_refused_with_the_versions() {
    let f = fixture(settings()).await;
    let (tx, _rx) = mpsc::channel(4);
    let register = fleet::Register {
        protocol_version: 99,
        agent_id: "future".into(),
        capabilities: Some(fleet::Capabilities {
            slots: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = f.scheduler.join(register, tx).await.expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("protocol version 99")
            && err.message().contains("accepts version 1"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_small_build_is_not_starved_by_a_large_one_and_priority_orders_within() {
    let f = fixture(Settings {
        startup_grace: Duration::from_secs(3600),
        ..settings()
    })
    .await;
    let mut waiters = Vec::new();
    for n in 10..15 {
        waiters.push(
            f.scheduler
                .submit(job(n, "large", 0))
                .await
                .expect("submit"),
        );
    }
    waiters.push(
        f.scheduler
            .submit(job(20, "small", 0))
            .await
            .expect("submit"),
    );
    // A lower value is more urgent.
    waiters.push(
        f.scheduler
            .submit(job(21, "large", -5))
            .await
            .expect("submit"),
    );
    let mut a = join(&f.scheduler, "a", 2, vec![]).await.expect("join");
    let first = a.next_lease().await;
    let second = a.next_lease().await;
    assert_eq!(
        digest_of(&first),
        Function::Sha256.digest_of(&[21]),
        "priority first"
    );
    assert_eq!(
        digest_of(&second),
        Function::Sha256.digest_of(&[20]),
        "the small build gets the second slot while the large one has an action running"
    );
    a.no_lease().await;
}

#[tokio::test]
async fn identical_actions_merge_and_cancel_waits_for_the_last_client() {
    let f = fixture(settings()).await;
    let mut a = join(&f.scheduler, "a", 2, vec![]).await.expect("join");
    let first = f.scheduler.submit(job(30, "b", 0)).await.expect("submit");
    let mut second = f.scheduler.submit(job(30, "c", 0)).await.expect("submit");
    assert_eq!(first.name, second.name, "identical actions were not merged");
    let lease = a.next_lease().await;
    a.no_lease().await;
    // One client cancels while the other still waits: it keeps running.
    f.scheduler.cancel(&first.name).await.expect("cancel");
    drop(first);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(second.state.borrow().stage, Stage::Executing);
    a.finish(&f.scheduler, &lease).await;
    assert_eq!(
        finished(&mut second)
            .await
            .result
            .expect("result")
            .exit_code,
        0
    );
}

#[tokio::test]
async fn a_retry_avoids_the_agent_that_failed_it() {
    let f = fixture(settings()).await;
    let mut a = join(&f.scheduler, "a", 1, vec![]).await.expect("join");
    let mut b = join(&f.scheduler, "b", 1, vec![]).await.expect("join");
    let mut waiter = f.scheduler.submit(job(40, "x", 0)).await.expect("submit");
    // Whichever agent got it fails it for an infrastructure reason.
    let (failing, mut other, lease) = tokio::select! {
        l = a.next_lease() => (a, b, l),
        l = b.next_lease() => (b, a, l),
    };
    let error = fleet::LeaseResult {
        lease_id: lease.lease_id.clone(),
        outcome: Some(fleet::lease_result::Outcome::Error(
            tonic_types::pb::Status {
                code: Code::Unavailable as i32,
                message: "disk full".into(),
                details: Vec::new(),
            },
        )),
        retryable: true,
        timed_out: false,
        message: String::new(),
    };
    f.scheduler
        .agent_message(&failing.session, FromAgent::LeaseResult(error))
        .await
        .expect("send");
    let retry = other.next_lease().await;
    assert_eq!(retry.attempt, 2);
    other.finish(&f.scheduler, &retry).await;
    assert_eq!(
        finished(&mut waiter)
            .await
            .result
            .expect("result")
            .exit_code,
        0
    );
}
