//! GPUs scheduled as devices: which device a lease names, when it is free
//! again, and what an action no GPU in the fleet meets is told. Driven as
//! the other scheduler tests are (`super`'s fixture and fake agents).

use super::*;

use outpost_proto::features::GPU_ASSIGNMENT;
use outpost_proto::gpu::normalize_model;
use outpost_proto::platform::from_pairs as props;

fn device(index: u32, name: &str, gib: u64, capability: &str) -> fleet::Gpu {
    fleet::Gpu {
        model: name.to_owned(),
        memory_bytes: gib << 30,
        compute_capability: capability.to_owned(),
        driver: "550.54.15".to_owned(),
        index,
        uuid: format!("GPU-0000000{index}-8f5c-2a3d-0c39-2d2f1e7f7d4b"),
        normalized_model: normalize_model(name),
        cuda_version: "12.4".to_owned(),
        mig_mode: "disabled".to_owned(),
    }
}

fn l4s(n: u32) -> Vec<fleet::Gpu> {
    (0..n).map(|i| device(i, "NVIDIA L4", 24, "8.9")).collect()
}

/// Joins an agent with these GPUs; `assigns`: it has the gpu-assignment
/// feature (agents before it have not).
async fn join_gpus(
    s: &Scheduler,
    id: &str,
    slots: u32,
    gpus: Vec<fleet::Gpu>,
    assigns: bool,
    process_id: &str,
) -> FakeAgent {
    join_with(s, id, slots, vec![], |r| {
        r.process_id = process_id.to_owned();
        let caps = r.capabilities.as_mut().expect("capabilities");
        caps.resources
            .insert("gpu-count".to_owned(), gpus.len() as f64);
        caps.gpus = gpus;
        if assigns {
            caps.features.push(GPU_ASSIGNMENT.to_owned());
        }
    })
    .await
    .expect("join")
}

/// A job asking for `list`.
fn gpu_job(n: u8, list: &[(&str, &str)]) -> Job {
    let (requirements, platform) = platform::requirements(&props(list)).expect("valid");
    Job {
        requirements,
        platform,
        ..job(n, "b", 0)
    }
}

fn indices(lease: &fleet::Lease) -> Vec<u32> {
    lease.gpus.iter().map(|g| g.index).collect()
}

async fn exited(s: &Scheduler, a: &FakeAgent, lease: &fleet::Lease) {
    s.agent_message(
        &a.session,
        FromAgent::ProcessExited(fleet::ProcessExited {
            lease_id: lease.lease_id.clone(),
            exit_code: 0,
        }),
    )
    .await
    .expect("send");
}

#[tokio::test]
async fn one_gpu_runs_one_gpu_action_at_a_time_while_cpu_actions_run_beside() {
    let f = fixture(settings()).await;
    let mut a = join_gpus(&f.scheduler, "a", 3, l4s(1), true, "p1").await;
    let _first = f
        .scheduler
        .submit(gpu_job(1, &[("gpu-count", "1")]))
        .await
        .expect("submit");
    let _second = f
        .scheduler
        .submit(gpu_job(2, &[("gpu", "1")]))
        .await
        .expect("submit");
    let _cpu = f.scheduler.submit(job(3, "b", 0)).await.expect("submit");
    let one = a.next_lease().await;
    let two = a.next_lease().await;
    a.no_lease().await;
    // One GPU action and the CPU action, in whichever order.
    let (gpu, cpu) = if one.gpus.is_empty() {
        (two, one)
    } else {
        (one, two)
    };
    assert_eq!(indices(&gpu), [0]);
    assert_eq!(gpu.gpus[0].uuid, device(0, "", 0, "").uuid);
    assert!(cpu.gpus.is_empty(), "a CPU action was given a GPU");
    // The process exiting frees the device, before its outputs are in.
    exited(&f.scheduler, &a, &gpu).await;
    let next = a.next_lease().await;
    assert_eq!(indices(&next), [0]);
    assert_ne!(digest_of(&next), digest_of(&gpu));
    a.no_lease().await;
}

#[tokio::test]
async fn two_gpus_run_two_gpu_actions_at_once_on_different_devices() {
    let f = fixture(settings()).await;
    let mut a = join_gpus(&f.scheduler, "a", 4, l4s(2), true, "p1").await;
    let _first = f
        .scheduler
        .submit(gpu_job(10, &[("gpu-count", "1")]))
        .await
        .expect("submit");
    let _second = f
        .scheduler
        .submit(gpu_job(11, &[("gpu-count", "1")]))
        .await
        .expect("submit");
    let _third = f
        .scheduler
        .submit(gpu_job(12, &[("gpu-count", "1")]))
        .await
        .expect("submit");
    let one = a.next_lease().await;
    let two = a.next_lease().await;
    a.no_lease().await;
    let mut given = [indices(&one), indices(&two)];
    given.sort();
    assert_eq!(given, [[0], [1]]);
    assert_ne!(one.gpus[0].uuid, two.gpus[0].uuid);
    // The third gets the device the finished one leaves.
    a.finish(&f.scheduler, &two).await;
    let three = a.next_lease().await;
    assert_eq!(indices(&three), indices(&two));
    // Two devices for one action: only once both are free.
    let _pair = f
        .scheduler
        .submit(gpu_job(13, &[("gpu-count", "2")]))
        .await
        .expect("submit");
    a.no_lease().await;
    a.finish(&f.scheduler, &one).await;
    a.no_lease().await;
    a.finish(&f.scheduler, &three).await;
    assert_eq!(indices(&a.next_lease().await), [0, 1]);
}

#[tokio::test]
async fn a_device_is_free_again_after_its_agent_is_killed_and_the_action_retried() {
    let f = fixture(settings()).await;
    let mut a = join_gpus(&f.scheduler, "a", 2, l4s(1), true, "p1").await;
    let mut waiter = f
        .scheduler
        .submit(gpu_job(20, &[("gpu-count", "1")]))
        .await
        .expect("submit");
    let first = a.next_lease().await;
    assert_eq!(indices(&first), [0]);
    // kill -9: the stream breaks, a new process registers running nothing.
    f.scheduler.agent_gone(&a.session).await;
    let mut a2 = join_gpus(&f.scheduler, "a", 2, l4s(1), true, "p2").await;
    let again = a2.next_lease().await;
    assert_eq!(digest_of(&again), digest_of(&first));
    assert_eq!(again.attempt, 2);
    assert_eq!(indices(&again), [0], "the lost lease still held the device");
    a2.finish(&f.scheduler, &again).await;
    assert_eq!(
        finished(&mut waiter)
            .await
            .result
            .expect("result")
            .exit_code,
        0
    );
    // And free once more for the next.
    let _next = f
        .scheduler
        .submit(gpu_job(21, &[("gpu-count", "1")]))
        .await
        .expect("submit");
    assert_eq!(indices(&a2.next_lease().await), [0]);
}

#[tokio::test]
async fn a_device_is_free_again_after_a_cancel() {
    let f = fixture(settings()).await;
    let mut a = join_gpus(&f.scheduler, "a", 2, l4s(1), true, "p1").await;
    let first = f
        .scheduler
        .submit(gpu_job(30, &[("gpu-count", "1")]))
        .await
        .expect("submit");
    let lease = a.next_lease().await;
    let _second = f
        .scheduler
        .submit(gpu_job(31, &[("gpu-count", "1")]))
        .await
        .expect("submit");
    a.no_lease().await;
    f.scheduler.cancel(&first.name).await.expect("cancel");
    // The agent is told to kill it, and the device goes to the next.
    let mut cancelled = false;
    let next = loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), a.rx.recv())
            .await
            .expect("a message within 5s")
            .expect("stream open");
        match msg.kind {
            Some(ToAgent::Cancel(c)) => {
                assert_eq!(c.lease_id, lease.lease_id);
                cancelled = true;
            }
            Some(ToAgent::Lease(l)) => break l,
            _ => {}
        }
    };
    assert!(cancelled, "the agent was not told to cancel");
    assert_eq!(indices(&next), [0]);
}

#[tokio::test]
async fn per_device_requirements_pick_the_devices_that_meet_them() {
    let f = fixture(settings()).await;
    let gpus = vec![
        device(0, "Tesla T4", 15, "7.5"),
        device(1, "NVIDIA A100-SXM4-80GB", 80, "8.0"),
        device(2, "NVIDIA H100 80GB HBM3", 80, "9.0"),
    ];
    let mut a = join_gpus(&f.scheduler, "a", 4, gpus, true, "p1").await;
    let _h100 = f
        .scheduler
        .submit(gpu_job(40, &[("gpu-model", "H100")]))
        .await
        .expect("submit");
    assert_eq!(indices(&a.next_lease().await), [2]);
    let _big = f
        .scheduler
        .submit(gpu_job(
            41,
            &[("gpu-memory", "40GiB"), ("cuda-compute-capability", "8.0")],
        ))
        .await
        .expect("submit");
    assert_eq!(
        indices(&a.next_lease().await),
        [1],
        "the one left that meets both"
    );
    let _any = f
        .scheduler
        .submit(gpu_job(42, &[("gpu-count", "1")]))
        .await
        .expect("submit");
    assert_eq!(indices(&a.next_lease().await), [0]);
}

#[tokio::test]
async fn gpu_requirements_no_agent_meets_fail_fast_naming_the_fleets_gpus() {
    let f = fixture(settings()).await;
    let _a = join_gpus(
        &f.scheduler,
        "a",
        2,
        vec![device(0, "NVIDIA A100-SXM4-40GB", 40, "8.0")],
        true,
        "p1",
    )
    .await;
    let _b = join_gpus(&f.scheduler, "b", 2, l4s(2), true, "p1").await;
    for (n, list, wanted) in [
        (
            50,
            vec![("gpu-memory", "48GiB")],
            "1 GPU with gpu-memory>=48GiB",
        ),
        (
            51,
            vec![("cuda-compute-capability", "9.0")],
            "1 GPU with cuda-compute-capability>=9.0",
        ),
        (52, vec![("gpu-model", "h100")], "1 GPU with gpu-model=h100"),
        // A fragment is no model: it matches neither A100 nor anything.
        (53, vec![("gpu-model", "100")], "1 GPU with gpu-model=100"),
        (
            54,
            vec![("gpu-model", "a100"), ("gpu-count", "2")],
            "2 GPUs with gpu-model=a100",
        ),
        (
            55,
            vec![("gpus", "3")],
            "gpu-count >= 3 (the most any agent has is 2)",
        ),
    ] {
        let Err(err) = f.scheduler.submit(gpu_job(n, &list)).await else {
            panic!("{list:?} was queued though no GPU in the fleet meets it");
        };
        let err = Status::from(err);
        assert_eq!(err.code(), Code::FailedPrecondition);
        let message = err.message();
        assert!(message.contains(wanted), "{message}");
        assert!(
            message.contains("a100 (40GiB, compute capability 8.0)")
                && message.contains("l4 (24GiB, compute capability 8.9)"),
            "the fleet's GPUs are not named: {message}"
        );
    }
    // What some agent meets is queued.
    f.scheduler
        .submit(gpu_job(56, &[("gpu-model", "l4"), ("gpu-count", "2")]))
        .await
        .expect("two L4s on one agent");
}

#[tokio::test]
async fn an_agent_without_gpu_assignment_has_its_gpus_counted_but_named_none() {
    let f = fixture(settings()).await;
    let old = fleet::Gpu {
        model: "Tesla T4".to_owned(),
        memory_bytes: 15 << 30,
        compute_capability: "7.5".to_owned(),
        driver: "550.54.15".to_owned(),
        ..Default::default()
    };
    let mut a = join_gpus(&f.scheduler, "old", 2, vec![old], false, "p1").await;
    let _first = f
        .scheduler
        .submit(gpu_job(60, &[("gpu-count", "1")]))
        .await
        .expect("submit");
    let _second = f
        .scheduler
        .submit(gpu_job(61, &[("gpu-model", "t4")]))
        .await
        .expect("submit");
    let lease = a.next_lease().await;
    // It could not read a list, so it is sent none...
    assert!(lease.gpus.is_empty(), "{:?}", lease.gpus);
    // ...and runs no more GPU actions at once than it has GPUs.
    a.no_lease().await;
    a.finish(&f.scheduler, &lease).await;
    assert!(a.next_lease().await.gpus.is_empty());
}

#[tokio::test]
async fn the_fleet_view_shows_each_gpu_and_whether_it_is_in_use() {
    let f = fixture(settings()).await;
    let mut a = join_gpus(&f.scheduler, "a", 2, l4s(2), true, "p1").await;
    let _job = f
        .scheduler
        .submit(gpu_job(70, &[("gpu-count", "1")]))
        .await
        .expect("submit");
    a.next_lease().await;
    let snapshot = f.scheduler.snapshot().await.expect("snapshot");
    let agent = snapshot
        .agents
        .iter()
        .find(|x| x.id == "a")
        .expect("agent a");
    assert_eq!(
        agent.gpus,
        [
            "#0 l4 (24GiB, compute capability 8.9), in use",
            "#1 l4 (24GiB, compute capability 8.9)"
        ]
    );
}
