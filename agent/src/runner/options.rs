//! Run options: what an action's platform asks of the runner, read through
//! the same vocabulary the coordinator matched it with.

use outpost_proto::reapi::platform::Property;

use super::{Kind, Runners};
use crate::error::Error;

/// How one action runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// The backend (`workload-isolation-type`; the agent's default when the
    /// action names none).
    pub kind: Kind,
    /// The host's network (`dockerNetwork=bridge`) rather than a private
    /// loopback.
    pub network: bool,
}

impl RunOptions {
    /// Reads `platform`, checked against what `runners` offer: asking for
    /// a backend or the network this agent does not give is the action's
    /// error, which names what the agent offers.
    pub fn read(platform: &[Property], runners: &Runners) -> Result<RunOptions, Error> {
        let parsed = outpost_proto::platform::parse(platform).map_err(Error::BadInput)?;
        let offered = || {
            runners
                .backends
                .iter()
                .map(|b| b.kind().name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let backend = match parsed.get("workload-isolation-type") {
            None => runners.backends.first().map(AsRef::as_ref),
            Some(v) => Kind::parse(v).and_then(|k| runners.backend(k)),
        }
        .ok_or_else(|| {
            Error::BadInput(format!(
                "workload-isolation-type={} is not offered by this agent (it offers {})",
                parsed.get("workload-isolation-type").unwrap_or_default(),
                offered()
            ))
        })?;
        let network = match parsed.get("dockerNetwork") {
            None | Some("off") => false,
            Some("bridge" | "host") => true,
            Some(other) => {
                return Err(Error::BadInput(format!(
                    "dockerNetwork={other} is not one of off, bridge"
                )));
            }
        };
        if network && !backend.allows_network() {
            return Err(Error::BadInput(
                "dockerNetwork=bridge: this agent does not allow sandboxed actions the network"
                    .into(),
            ));
        }
        Ok(RunOptions {
            kind: backend.kind(),
            network,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::{Backend, Process, Run};

    /// A backend that only says what it is: reading options never starts
    /// anything.
    struct Offered(Kind, bool);

    #[tonic::async_trait]
    impl Backend for Offered {
        fn kind(&self) -> Kind {
            self.0
        }
        fn describe(&self) -> String {
            self.0.name().to_owned()
        }
        fn allows_network(&self) -> bool {
            self.1
        }
        async fn start(&self, _run: Run<'_>) -> Result<Box<dyn Process>, Error> {
            Err(Error::Retryable("not started in this test".into()))
        }
    }

    fn runners(backends: Vec<(Kind, bool)>) -> Runners {
        Runners {
            backends: backends
                .into_iter()
                .map(|(k, n)| Box::new(Offered(k, n)) as Box<dyn Backend>)
                .collect(),
            #[cfg(target_os = "linux")]
            spawner: None,
        }
    }

    use outpost_proto::platform::from_pairs as props;

    #[test]
    fn actions_get_the_default_or_what_they_ask_for() {
        let sandboxed = runners(vec![(Kind::LinuxSandbox, false), (Kind::None, true)]);
        let pick = |p: &[(&str, &str)]| sandboxed.options(&props(p));
        assert_eq!(pick(&[]).expect("default").kind, Kind::LinuxSandbox);
        assert_eq!(
            pick(&[("Workload-Isolation-Type", "none")])
                .expect("none")
                .kind,
            Kind::None
        );
        let err = pick(&[("workload-isolation-type", "docker")]).expect_err("not offered");
        assert!(
            err.to_string().contains("it offers linux-sandbox, none"),
            "{err}"
        );
        let err = pick(&[("dockerNetwork", "bridge")]).expect_err("no network");
        assert!(err.to_string().contains("does not allow"), "{err}");
        assert!(pick(&[("dockerNetwork", "sideways")]).is_err());
        assert!(
            pick(&[
                ("workload-isolation-type", "none"),
                ("dockerNetwork", "bridge")
            ])
            .expect("none has the network")
            .network
        );
        assert_eq!(sandboxed.offers().networks, vec!["off", "bridge"]);
        let open = runners(vec![(Kind::LinuxSandbox, true)]);
        assert!(
            open.options(&props(&[("dockerNetwork", "bridge")]))
                .expect("allowed")
                .network
        );
        let closed = runners(vec![(Kind::LinuxSandbox, false)]);
        assert_eq!(closed.offers().networks, vec!["off"]);
        assert_eq!(closed.offers().kinds, vec!["linux-sandbox"]);
    }
}
