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
        platform: Vec::new(),
        priority,
        invocation: build.to_owned(),
        timeout: Duration::from_secs(60),
        cacheable: true,
        pin: Pin::new(()),
        queued_at: SystemTime::now(),
        prefetched: Default::default(),
        input_bytes: 0,
        warm: None,
    }
}

struct FakeAgent {
    session: Session,
    rx: mpsc::Receiver<fleet::CoordinatorMessage>,
    registered: fleet::Registered,
}

async fn join(
    s: &Scheduler,
    id: &str,
    slots: u32,
    running: Vec<String>,
) -> Result<FakeAgent, super::super::Error> {
    join_with(s, id, slots, running, |_| {}).await
}

/// Joins with the registration changed by `adjust` (process id, input
/// cache bound).
async fn join_with(
    s: &Scheduler,
    id: &str,
    slots: u32,
    running: Vec<String>,
    adjust: impl FnOnce(&mut fleet::Register),
) -> Result<FakeAgent, super::super::Error> {
    let (tx, mut rx) = mpsc::channel(64);
    let mut register = fleet::Register {
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
        process_id: "process-1".into(),
    };
    adjust(&mut register);
    let session = s.join(register, tx).await?;
    let Some(fleet::CoordinatorMessage {
        kind: Some(ToAgent::Registered(registered)),
    }) = rx.recv().await
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
                .expect("stream open");
            if let Some(ToAgent::Lease(lease)) = msg.kind {
                return lease;
            }
        }
    }

    async fn no_lease(&mut self) {
        let got = tokio::time::timeout(Duration::from_millis(300), self.rx.recv()).await;
        if let Ok(Some(fleet::CoordinatorMessage {
            kind: Some(ToAgent::Lease(l)),
        })) = got
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
            ..Default::default()
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
    let err = Status::from(f.scheduler.join(register, tx).await.expect_err("refused"));
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
        ..Default::default()
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

/// A result the action is not to blame for, or is, as the agent says.
fn error_result(lease: &fleet::Lease, fault: fleet::Fault, code: Code) -> fleet::LeaseResult {
    fleet::LeaseResult {
        lease_id: lease.lease_id.clone(),
        outcome: Some(fleet::lease_result::Outcome::Error(
            tonic_types::pb::Status {
                code: code as i32,
                message: format!("{fault:?} trouble"),
                details: Vec::new(),
            },
        )),
        retryable: fault != fleet::Fault::Action,
        fault: fault as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn an_agent_restarted_at_once_gets_its_action_again_after_registered() {
    let f = fixture(Settings {
        reconnect_grace: Duration::from_secs(60),
        ..settings()
    })
    .await;
    let a = join(&f.scheduler, "a", 1, vec![]).await.expect("join");
    let mut waiter = f.scheduler.submit(job(50, "b", 0)).await.expect("submit");
    let mut a = a;
    let first = a.next_lease().await;
    // Killed and started again: a new process that runs nothing. `join`
    // asserts Registered comes first on the new stream; the lease follows.
    f.scheduler.agent_gone(&a.session).await;
    let mut again = join_with(&f.scheduler, "a", 1, vec![], |r| {
        r.process_id = "process-2".into();
    })
    .await
    .expect("rejoin");
    let second = again.next_lease().await;
    assert_eq!(digest_of(&second), digest_of(&first));
    assert_eq!(second.attempt, 2, "a restart counts as an attempt");
    // A broken stream of the same process that lost the lease (it had not
    // accepted it yet) costs no attempt.
    f.scheduler.agent_gone(&again.session).await;
    let mut third = join_with(&f.scheduler, "a", 1, vec![], |r| {
        r.process_id = "process-2".into();
    })
    .await
    .expect("rejoin");
    let lease = third.next_lease().await;
    assert_eq!(lease.attempt, 2, "a reconnect cost an attempt");
    third.finish(&f.scheduler, &lease).await;
    let response = finished(&mut waiter).await;
    assert_eq!(response.result.expect("result").exit_code, 0);
}

#[tokio::test]
async fn errors_of_the_action_are_not_retried_and_do_not_blame_the_agent() {
    let f = fixture(settings()).await;
    let mut a = join(&f.scheduler, "a", 1, vec![]).await.expect("join");
    for n in 0..8u8 {
        let mut waiter = f
            .scheduler
            .submit(job(60 + n, "b", 0))
            .await
            .expect("submit");
        let lease = a.next_lease().await;
        assert_eq!(lease.attempt, 1);
        f.scheduler
            .agent_message(
                &a.session,
                FromAgent::LeaseResult(error_result(
                    &lease,
                    fleet::Fault::Action,
                    Code::ResourceExhausted,
                )),
            )
            .await
            .expect("send");
        let status = finished(&mut waiter).await.status.expect("status");
        assert_eq!(status.code, Code::ResourceExhausted as i32);
        assert_eq!(status.message, "Action trouble");
    }
    // Eight action faults in a row: the agent still gets work.
    let _waiter = f.scheduler.submit(job(70, "b", 0)).await.expect("submit");
    a.next_lease().await;
}

/// Fails `QUARANTINE_AFTER` (5) actions in a row for the agent's own reasons.
async fn fail_five(f: &Fixture, a: &mut FakeAgent, base: u8) {
    for n in 0..5u8 {
        let _waiter = f
            .scheduler
            .submit(job(base + n, "b", 0))
            .await
            .expect("submit");
        let lease = a.next_lease().await;
        f.scheduler
            .agent_message(
                &a.session,
                FromAgent::LeaseResult(error_result(
                    &lease,
                    fleet::Fault::Agent,
                    Code::Unavailable,
                )),
            )
            .await
            .expect("send");
    }
}

#[tokio::test]
async fn a_quarantine_holds_across_reconnects_until_a_restart_or_undrain() {
    let f = fixture(Settings {
        max_attempts: 100,
        ..settings()
    })
    .await;
    let mut a = join(&f.scheduler, "a", 1, vec![]).await.expect("join");
    fail_five(&f, &mut a, 80).await;
    a.no_lease().await;
    let snapshot = f.scheduler.snapshot().await.expect("snapshot");
    assert!(snapshot.agents[0].draining, "not taken out of rotation");
    // A reconnect of the same process: still out.
    f.scheduler.agent_gone(&a.session).await;
    let mut a = join(&f.scheduler, "a", 1, vec![]).await.expect("rejoin");
    a.no_lease().await;
    // A new process: back in; it gets the queued work.
    f.scheduler.agent_gone(&a.session).await;
    let mut a = join_with(&f.scheduler, "a", 1, vec![], |r| {
        r.process_id = "process-2".into();
    })
    .await
    .expect("restart");
    // It gets work again (and fails it into quarantine again), then an
    // operator brings it back.
    fail_five(&f, &mut a, 90).await;
    a.no_lease().await;
    f.scheduler.set_draining("a", false).await.expect("undrain");
    a.next_lease().await;
}

#[tokio::test]
async fn a_drain_is_kept_when_the_agent_reconnects() {
    let f = fixture(settings()).await;
    let a = join(&f.scheduler, "a", 1, vec![]).await.expect("join");
    f.scheduler.set_draining("a", true).await.expect("drain");
    f.scheduler.agent_gone(&a.session).await;
    let mut a = join(&f.scheduler, "a", 1, vec![]).await.expect("rejoin");
    let _waiter = f.scheduler.submit(job(100, "b", 0)).await.expect("submit");
    a.no_lease().await;
    f.scheduler.set_draining("a", false).await.expect("undrain");
    a.next_lease().await;
}

fn pool(name: &str) -> platform::Requirements {
    let (req, _) = platform::requirements(&[reapi::platform::Property {
        name: "Pool".into(),
        value: name.into(),
    }])
    .expect("valid");
    req
}

#[tokio::test]
async fn an_action_no_agent_can_run_fails_when_the_start_up_grace_ends() {
    let f = fixture(Settings {
        startup_grace: Duration::from_millis(600),
        ..settings()
    })
    .await;
    let _a = join(&f.scheduler, "a", 1, vec![]).await.expect("join");
    let mut waiter = f
        .scheduler
        .submit(Job {
            requirements: pool("gpu"),
            ..job(110, "b", 0)
        })
        .await
        .expect("queued during the grace");
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        waiter.state.wait_for(|s| s.stage == Stage::Completed),
    )
    .await
    .expect("failed soon after the grace")
    .expect("scheduler alive")
    .clone()
    .response
    .expect("response");
    let status = response.status.as_ref().expect("status");
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    assert!(
        status.message.contains("no agent can run this action") && status.message.contains("Pool"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn queued_actions_fail_when_the_fleet_shrinks_below_them() {
    let f = fixture(Settings {
        reconnect_grace: Duration::from_millis(100),
        fleet_memory: Duration::from_millis(300),
        ..settings()
    })
    .await;
    // A busy agent of the pool: the second action waits in the queue.
    let mut a = join_with(&f.scheduler, "a", 1, vec![], |r| {
        if let Some(caps) = r.capabilities.as_mut() {
            caps.properties.push(reapi::platform::Property {
                name: "Pool".into(),
                value: "gpu".into(),
            });
        }
    })
    .await
    .expect("join");
    let mut first = f
        .scheduler
        .submit(Job {
            requirements: pool("gpu"),
            ..job(120, "b", 0)
        })
        .await
        .expect("submit");
    let mut second = f
        .scheduler
        .submit(Job {
            requirements: pool("gpu"),
            ..job(121, "b", 0)
        })
        .await
        .expect("submit");
    a.next_lease().await;
    // The only such agent goes away for good.
    f.scheduler.agent_gone(&a.session).await;
    for waiter in [&mut first, &mut second] {
        let response = tokio::time::timeout(
            Duration::from_secs(10),
            waiter.state.wait_for(|s| s.stage == Stage::Completed),
        )
        .await
        .expect("failed once the fleet forgot the agent")
        .expect("scheduler alive")
        .clone()
        .response
        .expect("response");
        let code = response.status.as_ref().expect("status").code;
        // The running one is retried until nothing could run it either.
        assert_eq!(code, Code::FailedPrecondition as i32, "{response:?}");
    }
}

#[tokio::test]
async fn inputs_go_only_to_agents_whose_cache_holds_them() {
    let f = fixture(settings()).await;
    let mut small = join_with(&f.scheduler, "small", 1, vec![], |r| {
        if let Some(caps) = r.capabilities.as_mut() {
            caps.max_input_bytes = 1000;
        }
    })
    .await
    .expect("join");
    let big_job = || Job {
        input_bytes: 5000,
        ..job(130, "b", 0)
    };
    let Err(err) = f.scheduler.submit(big_job()).await else {
        panic!("queued though no agent's cache holds it");
    };
    let err = Status::from(err);
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("inputs are 5000 bytes")
            && err.message().contains("holds 1000 bytes"),
        "{}",
        err.message()
    );
    let mut big = join_with(&f.scheduler, "big", 1, vec![], |r| {
        if let Some(caps) = r.capabilities.as_mut() {
            caps.max_input_bytes = 1 << 20;
        }
    })
    .await
    .expect("join");
    let _waiter = f.scheduler.submit(big_job()).await.expect("submit");
    big.next_lease().await;
    small.no_lease().await;
}

#[path = "tests_xcode.rs"]
mod xcode;

#[path = "tests_warm.rs"]
mod warm;

#[path = "tests_gpu.rs"]
mod gpu;

#[path = "tests_live.rs"]
mod live;
