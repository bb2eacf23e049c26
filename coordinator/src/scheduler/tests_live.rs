//! Live output through the scheduler: only agents with the live-output
//! feature are asked to stream, chunks count only from the agent holding
//! the lease, and a lease's bytes go when it ends. Driven as the other
//! scheduler tests are (`super`'s fixture and fake agents).

use super::*;

use outpost_proto::features::LIVE_OUTPUT;

async fn join_live(s: &Scheduler, id: &str, live: bool) -> FakeAgent {
    join_with(s, id, 1, vec![], |r| {
        if live {
            let caps = r.capabilities.as_mut().expect("capabilities");
            caps.features.push(LIVE_OUTPUT.to_owned());
        }
    })
    .await
    .expect("join")
}

fn chunk(lease: &fleet::Lease, data: &str) -> FromAgent {
    FromAgent::OutputChunk(fleet::OutputChunk {
        lease_id: lease.lease_id.clone(),
        stream: fleet::OutputStream::Stdout as i32,
        offset: 0,
        data: bytes::Bytes::copy_from_slice(data.as_bytes()),
    })
}

#[tokio::test]
async fn only_agents_with_the_feature_stream_and_only_their_own_leases() {
    let f = fixture(settings()).await;
    let s = &f.scheduler;
    let mut old = join_live(s, "old", false).await;
    let mut waiter_old = s.submit(job(1, "b", 0)).await.expect("submit");
    let old_lease = old.next_lease().await;
    assert!(!old_lease.stream_output, "an old agent is never asked");
    let mut new = join_live(s, "new", true).await;
    let mut waiter_new = s.submit(job(2, "b", 0)).await.expect("submit");
    let new_lease = new.next_lease().await;
    assert!(new_lease.stream_output);

    // A chunk for a lease another agent holds is dropped.
    s.agent_message(&old.session, chunk(&new_lease, "forged"))
        .await
        .expect("send");
    s.agent_message(&new.session, chunk(&new_lease, "line\n"))
        .await
        .expect("send");
    // The scheduler handles its messages in order: once a snapshot is
    // answered, both chunks were.
    s.snapshot().await.expect("snapshot");
    let live = s.live();
    let (start, bytes) = live
        .held(
            &new_lease.operation_name,
            crate::execution::live::Kind::Stdout,
        )
        .expect("the lease's output");
    assert_eq!((start, &bytes[..]), (0, &b"line\n"[..]));
    assert!(
        live.held(
            &old_lease.operation_name,
            crate::execution::live::Kind::Stdout
        )
        .is_none()
    );

    // The lease ends: its bytes go.
    new.finish(s, &new_lease).await;
    finished(&mut waiter_new).await;
    assert!(live.running().is_empty());
    old.finish(s, &old_lease).await;
    finished(&mut waiter_old).await;
}
