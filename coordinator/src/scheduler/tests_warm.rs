//! Routing to warm agents: an action with a warm key goes to the agent
//! holding it, waits for it up to its `runner-recycling-max-wait`, then
//! goes to any agent; older agents never get a warm key. Driven as the
//! other scheduler tests are (`super`'s fixture and fake agents).

use super::*;

use outpost_proto::features::WARM_KEYS;

use super::super::super::Warm;

/// Joins an agent with the warm-keys feature (`warm`) or without.
async fn join_warm(s: &Scheduler, id: &str, slots: u32, warm: bool) -> FakeAgent {
    join_with(s, id, slots, vec![], |r| {
        if warm {
            let caps = r.capabilities.as_mut().expect("capabilities");
            caps.features.push(WARM_KEYS.to_owned());
        }
    })
    .await
    .expect("join")
}

fn warm_job(n: u8, key: &str, wait: Duration) -> Job {
    Job {
        warm: Some(Warm {
            key: key.to_owned(),
            max_wait: wait,
        }),
        ..job(n, "b", 0)
    }
}

async fn heartbeat(s: &Scheduler, a: &FakeAgent, keys: &[&str]) {
    s.agent_message(
        &a.session,
        FromAgent::Heartbeat(fleet::Heartbeat {
            busy_slots: 0,
            warm_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        }),
    )
    .await
    .expect("send");
}

#[tokio::test]
async fn a_warm_action_waits_for_the_agent_holding_its_key_then_goes_anywhere() {
    let f = fixture(settings()).await;
    let mut warm = join_warm(&f.scheduler, "warm", 1, true).await;
    let mut cold = join_warm(&f.scheduler, "cold", 1, true).await;
    heartbeat(&f.scheduler, &warm, &["k1"]).await;

    // The warm agent is free: it gets the action, with the key.
    let _w1 = f
        .scheduler
        .submit(warm_job(1, "k1", Duration::from_secs(30)))
        .await
        .expect("submit");
    let lease = warm.next_lease().await;
    assert_eq!(lease.warm_key, "k1");
    cold.no_lease().await;

    // The warm agent is busy: a second action with its key waits for it
    // (the cold agent stays idle), and gets it once the first is done.
    let _w2 = f
        .scheduler
        .submit(warm_job(2, "k1", Duration::from_secs(30)))
        .await
        .expect("submit");
    cold.no_lease().await;
    warm.finish(&f.scheduler, &lease).await;
    let second = warm.next_lease().await;
    assert_eq!(digest_of(&second), Function::Sha256.digest_of(&[2]));

    // With a short wait, the action goes to the cold agent once it is over.
    let _w3 = f
        .scheduler
        .submit(warm_job(3, "k1", Duration::from_millis(300)))
        .await
        .expect("submit");
    let started = std::time::Instant::now();
    let third = cold.next_lease().await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(digest_of(&third), Function::Sha256.digest_of(&[3]));

    // Actions with other keys, or none, are not held back.
    let _w4 = f
        .scheduler
        .submit(warm_job(4, "k2", Duration::from_secs(30)))
        .await
        .expect("submit");
    cold.finish(&f.scheduler, &third).await;
    let fourth = cold.next_lease().await;
    assert_eq!(digest_of(&fourth), Function::Sha256.digest_of(&[4]));
}

#[tokio::test]
async fn a_finished_warm_lease_marks_its_agent_and_heartbeats_correct_it() {
    let f = fixture(settings()).await;
    let mut a = join_warm(&f.scheduler, "a", 1, true).await;
    let _w1 = f
        .scheduler
        .submit(warm_job(1, "k1", Duration::from_secs(30)))
        .await
        .expect("submit");
    let lease = a.next_lease().await;
    a.finish(&f.scheduler, &lease).await;
    // The agent that ran it now holds the key: a second agent stays idle
    // while the action waits for `a`'s free slot (it has one at once).
    let mut b = join_warm(&f.scheduler, "b", 1, true).await;
    let _w2 = f
        .scheduler
        .submit(warm_job(2, "k1", Duration::from_secs(30)))
        .await
        .expect("submit");
    let second = a.next_lease().await;
    b.no_lease().await;
    a.finish(&f.scheduler, &second).await;
    // The agent says it no longer holds it: nothing is held for it.
    heartbeat(&f.scheduler, &a, &[]).await;
    let mut busy = job(9, "other", 0);
    busy.warm = None;
    let _busy = f.scheduler.submit(busy).await.expect("submit");
    // One of the two took the plain action; the warm one goes to the other
    // at once, without waiting.
    let _w3 = f
        .scheduler
        .submit(warm_job(3, "k1", Duration::from_secs(30)))
        .await
        .expect("submit");
    let (la, lb) = tokio::join!(a.next_lease(), b.next_lease());
    let mut got = vec![digest_of(&la), digest_of(&lb)];
    got.sort();
    let mut want = vec![
        Function::Sha256.digest_of(&[9]),
        Function::Sha256.digest_of(&[3]),
    ];
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn older_agents_get_no_warm_key_and_are_never_waited_for() {
    let f = fixture(settings()).await;
    let mut old = join_warm(&f.scheduler, "old", 1, false).await;
    // An old agent's heartbeat carries no keys; even one that did is not
    // believed without the feature.
    heartbeat(&f.scheduler, &old, &["k1"]).await;
    let _w = f
        .scheduler
        .submit(warm_job(1, "k1", Duration::from_secs(30)))
        .await
        .expect("submit");
    let lease = old.next_lease().await;
    assert_eq!(lease.warm_key, "");
}
