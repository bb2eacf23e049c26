//! Xcode-aware scheduling: an action whose Command's environment names an
//! Xcode (`XCODE_VERSION_OVERRIDE`, as Bazel's Apple rules set it) or whose
//! platform does (`xcode-version`) runs only on an agent that has it, and
//! one no agent has fails at once naming the versions the fleet has.
//! Driven as the other scheduler tests are (`super`'s fixture and agents).

use super::*;

use outpost_proto::platform::from_pairs as props;
use outpost_proto::xcode::{self, XcodeVersion};

/// Joins a Mac agent offering these Xcodes (`VERSION.BUILD`) as it
/// advertises them.
async fn join_mac(s: &Scheduler, id: &str, xcodes: &[&str]) -> FakeAgent {
    join_xcodes(s, id, xcodes, true).await
}

/// `selects`: the agent has the xcode-selection feature (older ones have
/// not, and may still carry xcode-version labels).
async fn join_xcodes(s: &Scheduler, id: &str, xcodes: &[&str], selects: bool) -> FakeAgent {
    join_with(s, id, 1, vec![], |r| {
        let caps = r.capabilities.as_mut().expect("capabilities");
        caps.properties = props(&[("OSFamily", "darwin")]);
        if selects {
            caps.features
                .push(outpost_proto::features::XCODE_SELECTION.to_owned());
        }
        for x in xcodes {
            let installed = XcodeVersion::parse(x).expect("an Xcode");
            for value in xcode::offered_values(&installed) {
                caps.properties.extend(props(&[(xcode::PROPERTY, &value)]));
            }
        }
    })
    .await
    .expect("join")
}

/// An action with this environment and platform, as the execution service
/// makes its job.
fn xcode_job(n: u8, env: &[(&str, &str)], platform: &[(&str, &str)]) -> Result<Job, String> {
    let own = props(platform);
    let merged = xcode::with_environment(&own, env.iter().copied()).unwrap_or(own);
    let (requirements, platform) = platform::requirements(&merged)?;
    let mut job = job(n, "b", 0);
    job.requirements = requirements;
    job.platform = platform;
    Ok(job)
}

#[tokio::test]
async fn an_action_runs_only_where_its_xcode_is() {
    let f = fixture(settings()).await;
    let mut old = join_mac(&f.scheduler, "old", &["14.3.1.14E300c"]).await;
    let mut new = join_mac(&f.scheduler, "new", &["15.2.15C500b", "14.3.1.14E300c"]).await;
    // Bazel's spelling: version, a zero Bazel adds, and the build.
    let job = xcode_job(1, &[(xcode::ENV_VERSION, "15.2.0.15C500b")], &[]).expect("valid");
    assert_eq!(
        job.requirements
            .exact
            .get(xcode::PROPERTY)
            .map(String::as_str),
        Some("15.2.15C500b")
    );
    // The agent is told, as the platform it runs the action by.
    assert!(job.platform.iter().any(|p| p.name == xcode::PROPERTY));
    let _waiter = f.scheduler.submit(job).await.expect("submit");
    let lease = new.next_lease().await;
    assert_eq!(digest_of(&lease), Function::Sha256.digest_of(&[1]));
    old.no_lease().await;
    new.finish(&f.scheduler, &lease).await;
    // The version alone, as a property: any build of it.
    let job = xcode_job(2, &[], &[("xcode-version", "15.2")]).expect("valid");
    let _waiter = f.scheduler.submit(job).await.expect("submit");
    new.next_lease().await;
    old.no_lease().await;
}

#[tokio::test]
async fn an_xcode_no_agent_has_fails_at_once_naming_what_the_fleet_has() {
    let f = fixture(settings()).await;
    let _a = join_mac(&f.scheduler, "a", &["15.2.15C500b"]).await;
    let _b = join_mac(&f.scheduler, "b", &["14.3.1.14E300c"]).await;
    for (env, asked) in [
        ("16.0.0.16A242d", "16.0.16A242d"),
        ("15.2.0.15C999", "15.2.15C999"),
    ] {
        let job = xcode_job(3, &[(xcode::ENV_VERSION, env)], &[]).expect("valid");
        let Err(super::super::Error::Precondition(why)) = f.scheduler.submit(job).await else {
            panic!("Xcode {env} was queued");
        };
        for words in [
            format!("no agent offers xcode-version={asked}"),
            "xcode-version=14.3.1".to_owned(),
            "xcode-version=15.2.15C500b".to_owned(),
            "XCODE_VERSION_OVERRIDE".to_owned(),
        ] {
            assert!(why.contains(&words), "{words}: {why}");
        }
    }
}

#[test]
fn an_environment_and_a_property_naming_different_xcodes_contradict() {
    let err = xcode_job(
        4,
        &[(xcode::ENV_VERSION, "15.2.0.15C500b")],
        &[("xcode-version", "14.3.1")],
    )
    .err()
    .expect("a contradiction");
    assert!(err.contains("given twice"), "{err}");
    // The same Xcode written two ways is one requirement.
    xcode_job(
        5,
        &[(xcode::ENV_VERSION, "15.2.0")],
        &[("xcode-version", "15.2")],
    )
    .expect("the same Xcode");
}

#[tokio::test]
async fn an_agent_that_cannot_select_xcodes_is_never_given_an_xcode_action() {
    let f = fixture(settings()).await;
    // An older agent labelled with the Xcode it has: it would run the
    // action without DEVELOPER_DIR, so its label matches nothing.
    let mut old = join_xcodes(&f.scheduler, "old", &["15.2.15C500b"], false).await;
    let job = xcode_job(6, &[(xcode::ENV_VERSION, "15.2.0.15C500b")], &[]).expect("valid");
    let Err(super::super::Error::Precondition(why)) = f.scheduler.submit(job).await else {
        panic!("leased to an agent that cannot select Xcodes");
    };
    assert!(why.contains("no agent offers xcode-version"), "{why}");
    // Its other work goes on.
    let _waiter = f.scheduler.submit(job_plain(7)).await.expect("submit");
    old.next_lease().await;
}

fn job_plain(n: u8) -> Job {
    xcode_job(n, &[], &[]).expect("valid")
}
