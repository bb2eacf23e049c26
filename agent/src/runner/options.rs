//! Run options: what an action's platform asks of the runner, read through
//! the same vocabulary the coordinator matched it with.

use outpost_proto::platform::Parsed;

use super::{Kind, Runners};
use crate::error::Error;

/// How one action runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// The backend (`workload-isolation-type`; the agent's default when the
    /// action names none).
    pub kind: Kind,
    /// The host's network (`dockerNetwork=bridge`) rather than a private
    /// loopback.
    pub network: bool,
    /// What a container needs (`docker` only).
    pub container: Option<ContainerOptions>,
    /// The input root is the action's `/` (`root-filesystem=input-root`,
    /// `linux-sandbox` only): no host path is shown.
    pub input_root_is_root: bool,
    /// What it sees of the GPUs its lease names (`runner::gpu`); nothing
    /// when it was given none.
    pub gpus: super::gpu::Exposure,
}

/// The container an action asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerOptions {
    /// `container-image` without its `docker://`; the agent's
    /// `docker_default_image` when the action names none.
    pub image: Option<String>,
    /// `dockerUser`: `UID[:GID]` or a name the image knows.
    pub user: Option<String>,
    /// `dockerRunAsRoot=true`.
    pub run_as_root: bool,
    /// `dockerInit=true`: an init process that reaps orphans.
    pub init: bool,
    /// Bytes of memory (`EstimatedMemory`).
    pub memory: Option<u64>,
    /// Thousandths of a CPU (`EstimatedCPU`).
    pub cpu_millis: Option<u64>,
}

/// A yes/no platform value.
fn flag(name: &str, value: Option<&str>) -> Result<bool, Error> {
    match value.map(str::trim) {
        None => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") || v.is_empty() => Ok(false),
        Some(v) => Err(Error::BadInput(format!(
            "platform property {name}={} is not true or false",
            outpost_proto::quote::quoted(v)
        ))),
    }
}

impl RunOptions {
    /// Reads `platform`, checked against what `runners` offer: asking for
    /// a backend or the network this agent does not give is the action's
    /// error, which names what the agent offers.
    pub fn read(parsed: &Parsed, runners: &Runners) -> Result<RunOptions, Error> {
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
            Some("host") if backend.kind() == Kind::Docker => {
                return Err(Error::BadInput(
                    "dockerNetwork=host is refused: a container gets the network as \
                     dockerNetwork=bridge at most"
                        .into(),
                ));
            }
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
        let container = (backend.kind() == Kind::Docker)
            .then(|| -> Result<ContainerOptions, Error> {
                Ok(ContainerOptions {
                    image: parsed
                        .get("container-image")
                        .map(|v| {
                            outpost_proto::platform::image_reference(v)
                                .map(str::to_owned)
                                .map_err(Error::BadInput)
                        })
                        .transpose()?,
                    user: parsed
                        .get("dockerUser")
                        .map(str::trim)
                        .filter(|u| !u.is_empty())
                        .map(str::to_owned),
                    run_as_root: flag("dockerRunAsRoot", parsed.get("dockerRunAsRoot"))?,
                    init: flag("dockerInit", parsed.get("dockerInit"))?,
                    memory: parsed.min.get("memory").map(|m| m / 1000),
                    cpu_millis: parsed.min.get("cpu").copied(),
                })
            })
            .transpose()?;
        let input_root_is_root = match parsed.get(outpost_proto::platform::ROOT_FILESYSTEM) {
            Some(outpost_proto::platform::INPUT_ROOT) if backend.kind() == Kind::LinuxSandbox => {
                true
            }
            Some(outpost_proto::platform::INPUT_ROOT) => {
                return Err(Error::BadInput(format!(
                    "root-filesystem=input-root needs linux-sandbox, and this action runs in {}",
                    backend.kind().name()
                )));
            }
            _ => false,
        };
        Ok(RunOptions {
            kind: backend.kind(),
            network,
            container,
            input_root_is_root,
            gpus: Default::default(),
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
            #[cfg(os_linux)]
            spawner: None,
            #[cfg(os_linux)]
            docker: None,
        }
    }

    /// `runners`' options for a platform of pairs, read as the executor
    /// reads it (a platform the vocabulary refuses is the action's error).
    fn read(runners: &Runners, pairs: &[(&str, &str)]) -> Result<RunOptions, Error> {
        let platform = outpost_proto::platform::from_pairs(pairs);
        let parsed = outpost_proto::platform::parse(&platform).map_err(Error::BadInput)?;
        runners.options(&parsed)
    }

    #[test]
    fn actions_get_the_default_or_what_they_ask_for() {
        let sandboxed = runners(vec![(Kind::LinuxSandbox, false), (Kind::None, true)]);
        let pick = |p: &[(&str, &str)]| read(&sandboxed, p);
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
        // The default gives no network: bridge only where asked for none.
        assert_eq!(sandboxed.offers().networks, vec!["off", "none/bridge"]);
        let open = runners(vec![(Kind::LinuxSandbox, true)]);
        assert!(
            read(&open, &[("dockerNetwork", "bridge")])
                .expect("allowed")
                .network
        );
        assert_eq!(
            open.offers().networks,
            vec!["off", "bridge", "linux-sandbox/bridge"]
        );
        let closed = runners(vec![(Kind::LinuxSandbox, false)]);
        assert_eq!(closed.offers().networks, vec!["off"]);
        for kind in Kind::ALL {
            assert_eq!(
                kind.bridge(),
                outpost_proto::platform::network_pair(kind.name(), "bridge")
            );
        }
        assert_eq!(closed.offers().kinds, vec!["linux-sandbox"]);
    }

    #[test]
    fn a_container_image_runs_in_docker_with_what_the_action_asks() {
        let both = runners(vec![(Kind::LinuxSandbox, false), (Kind::Docker, true)]);
        let pick = |p: &[(&str, &str)]| read(&both, p);
        // No isolation named: the image chooses Docker, not the default.
        let options = pick(&[
            ("container-image", "docker://gcc:12"),
            ("dockerUser", "1000:1000"),
            ("dockerInit", "True"),
            ("EstimatedMemory", "512MiB"),
            ("EstimatedCPU", "1.5"),
        ])
        .expect("docker");
        assert_eq!(options.kind, Kind::Docker);
        assert_eq!(
            options.container,
            Some(ContainerOptions {
                image: Some("gcc:12".into()),
                user: Some("1000:1000".into()),
                run_as_root: false,
                init: true,
                memory: Some(512 << 20),
                cpu_millis: Some(1500),
            })
        );
        // Docker named, no image: the agent's default image.
        let options = pick(&[("workload-isolation-type", "docker")]).expect("docker");
        assert_eq!(options.container, Some(ContainerOptions::default()));
        // Other backends get no container.
        assert_eq!(pick(&[]).expect("default").container, None);
        let err = pick(&[
            ("container-image", "docker://gcc:12"),
            ("workload-isolation-type", "linux-sandbox"),
        ])
        .expect_err("an image with another isolation");
        assert!(err.to_string().contains("set it to docker"), "{err}");
        assert!(
            pick(&[("container-image", "gcc"), ("dockerNetwork", "bridge")])
                .expect("bridge allowed")
                .network
        );
        let err = pick(&[("container-image", "gcc"), ("dockerNetwork", "host")])
            .expect_err("host refused");
        assert!(
            err.to_string().contains("dockerNetwork=host is refused"),
            "{err}"
        );
        let err = pick(&[("container-image", "gcc"), ("dockerRunAsRoot", "maybe")])
            .expect_err("not a flag");
        assert!(err.to_string().contains("not true or false"), "{err}");
        // An agent without Docker refuses an image outright.
        let sandboxed = runners(vec![(Kind::LinuxSandbox, false)]);
        let err =
            read(&sandboxed, &[("container-image", "docker://gcc:12")]).expect_err("no docker");
        assert!(
            err.to_string().contains("workload-isolation-type=docker"),
            "{err}"
        );
    }
}
