//! The agent's configuration: a YAML file (every key optional, documented
//! in `docs/configuration.md`); the binary layers flags and `OUTPOST_*`
//! environment variables on top.

use std::path::{Path, PathBuf};

use outpost_proto::units::{ByteSize, Span};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The coordinator to dial, `grpc://HOST:PORT`, or `grpcs://HOST:PORT`
    /// for TLS.
    pub coordinator: String,
    /// Where the agent keeps its id, its input cache and action directories.
    pub work_dir: PathBuf,
    /// Actions run at once; 0 means one per CPU.
    pub slots: u32,
    /// Extra properties actions can require, `key=value`.
    pub labels: Vec<String>,
    /// The pool this agent serves (the `Pool` property), if any.
    pub pool: Option<String>,
    /// Bound on the local input cache.
    pub cache_size: ByteSize,
    /// Serve /metrics, /healthz and /readyz here; none when unset (the agent
    /// then listens on no port at all).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Isolation backends actions may ask for (`workload-isolation-type`);
    /// the first is used when an action does not say. `linux-sandbox`,
    /// `docker` or `none`.
    pub isolation: Vec<String>,
    /// Let sandboxed actions that ask for it (`dockerNetwork=bridge`) use
    /// the host's network; otherwise they get a private loopback only.
    pub allow_network: bool,
    /// Host paths shown read-only inside the sandbox, besides the defaults
    /// (`/usr`, `/bin`, `/lib*`, `/etc` pieces; see `docs/isolation.md`).
    pub sandbox_mounts: Vec<PathBuf>,
    /// On an agent running as root, sandboxed actions run as host users
    /// `sandbox_uid_base+1 ..= sandbox_uid_base+sandbox_uid_count`, one
    /// per running action, in group `sandbox_uid_base`; no real user may
    /// have those ids.
    pub sandbox_uid_base: u32,
    pub sandbox_uid_count: u32,
    /// Memory one action may use; the host's memory when unset.
    pub action_memory_limit: Option<ByteSize>,
    /// Processes and threads one action may have; 0 for no limit.
    pub action_pids_limit: u64,
    /// CPUs one action may use (e.g. 2 or 0.5); no limit when unset.
    pub action_cpu_limit: Option<f64>,
    /// Bytes one action's outputs may total, stdout and stderr included (a
    /// sparse file counts by its length); checked before anything is
    /// uploaded.
    pub action_output_limit: ByteSize,
    /// What a sandboxed action's `/tmp` (and, apart, its `/dev/shm`) may
    /// hold: each a tmpfs of this size, counted in the action's memory. 0
    /// puts `/tmp` on the agent's disk, unbounded.
    pub action_tmp_size: ByteSize,
    /// The Docker engine's socket (isolation `docker`).
    pub docker_socket: PathBuf,
    /// The image of actions that run in Docker without naming a
    /// `container-image`; such actions are refused when unset.
    pub docker_default_image: Option<String>,
    /// When images are pulled: `missing` (only when not on this host),
    /// `always` (before every action), `never` (only local images run).
    pub docker_pull_policy: PullPolicy,
    /// Images actions may run, as patterns of the whole reference (`*`
    /// matches any run of characters, e.g. `gcc:*`, `registry.example/*`);
    /// empty allows any image.
    pub docker_allowed_images: Vec<String>,
    /// Let containers that ask for it (`dockerNetwork=bridge`) have the
    /// engine's bridge network; otherwise they have no network at all.
    pub docker_network: bool,
    /// Let actions run as root in their container (`dockerRunAsRoot=true`,
    /// or a `dockerUser` of uid 0).
    pub docker_allow_root: bool,
    /// A file of registry credentials in Docker's `config.json` format (its
    /// `auths` map, as `docker login` writes it): pulls from a registry it
    /// names send its credentials.
    pub docker_registry_auth: Option<PathBuf>,
    /// Images pulled when the agent starts (in the background, as
    /// `docker_pull_policy` says), so the first actions wanting them do not
    /// wait.
    pub docker_images_at_start: Vec<String>,
    /// Bound on the total size of the images this agent pulled: past it,
    /// those no action uses are removed, least recently used first. 0:
    /// never removed. Images it did not pull are never removed.
    pub docker_image_cache_size: ByteSize,
    /// Persistent workers (`persistentWorkerKey`) alive at once per worker
    /// key; an action finding them all busy runs as a plain command.
    pub worker_max_per_key: u32,
    /// Requests one persistent worker serves before it is replaced; 0 for
    /// no bound.
    pub worker_max_requests: u64,
    /// How long an idle persistent worker is kept.
    pub worker_idle_timeout: Span,
    /// Idle persistent workers kept in all, least recently used stopped
    /// first.
    pub worker_max_idle: u32,
    /// Bytes of one persistent worker response; a larger one breaks the
    /// worker and the action runs as a plain command.
    pub worker_max_response: ByteSize,
    /// Workspaces of actions with `recycle-runner=true` kept for the next
    /// action of their key, least recently used removed first past it.
    pub runner_max_count: u32,
    /// Bytes the kept workspaces may take on disk in all (one larger is
    /// not kept).
    pub runner_max_disk: ByteSize,
    /// Directories searched for Xcodes (each `Xcode*.app` in them): they
    /// are advertised as `xcode-version` and chosen by the actions that
    /// name one (`DEVELOPER_DIR`).
    pub xcode_dirs: Vec<PathBuf>,
    /// Log filter.
    pub log: String,
    /// File whose first line is this agent's token for the coordinator.
    pub token_file: Option<PathBuf>,
    /// PEM certificates that vouch for the coordinator (`grpcs://`); the
    /// system's roots when unset.
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate and key this agent presents, for coordinators that
    /// require client certificates.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// The isolation backends this build knows.
pub const ISOLATION_KINDS: &[&str] = &["linux-sandbox", "docker", "sandbox-exec", "none"];

/// When the Docker backend pulls an action's image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Only when the engine does not have it.
    #[default]
    Missing,
    /// Before every action (a moving tag is followed).
    Always,
    /// Never: only images already on the host run.
    Never,
}

impl std::str::FromStr for PullPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<PullPolicy, String> {
        match s {
            "missing" => Ok(PullPolicy::Missing),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            _ => Err(format!(
                "docker pull policy {s:?} is not one of missing, always, never"
            )),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            coordinator: "grpc://127.0.0.1:8980".to_owned(),
            work_dir: PathBuf::from("./outpost-agent"),
            slots: 0,
            labels: Vec::new(),
            pool: None,
            cache_size: ByteSize(10 << 30),
            metrics_listen: None,
            isolation: vec![default_isolation().to_owned()],
            allow_network: false,
            sandbox_mounts: Vec::new(),
            xcode_dirs: crate::host::xcode::APPLICATION_DIRS
                .iter()
                .map(PathBuf::from)
                .collect(),
            sandbox_uid_base: 990_000,
            sandbox_uid_count: 1000,
            action_memory_limit: None,
            action_pids_limit: 8192,
            action_cpu_limit: None,
            action_output_limit: ByteSize(4 << 30),
            action_tmp_size: ByteSize(1 << 30),
            docker_socket: PathBuf::from("/var/run/docker.sock"),
            docker_default_image: None,
            docker_pull_policy: PullPolicy::Missing,
            docker_allowed_images: Vec::new(),
            docker_network: false,
            docker_allow_root: false,
            docker_registry_auth: None,
            docker_images_at_start: Vec::new(),
            docker_image_cache_size: ByteSize(20 << 30),
            worker_max_per_key: 4,
            worker_max_requests: 0,
            worker_idle_timeout: Span(std::time::Duration::from_secs(600)),
            worker_max_idle: 16,
            worker_max_response: ByteSize(16 << 20),
            runner_max_count: 4,
            runner_max_disk: ByteSize(10 << 30),
            log: "info".to_owned(),
            token_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// `linux-sandbox` on Linux; `none` elsewhere (until macOS has its own).
pub fn default_isolation() -> &'static str {
    if cfg!(os_linux) {
        "linux-sandbox"
    } else {
        "none"
    }
}

impl Config {
    /// The persistent worker pool's caps.
    pub fn worker_caps(&self) -> crate::runner::worker::Caps {
        crate::runner::worker::Caps {
            per_key: self.worker_max_per_key.max(1) as usize,
            requests: self.worker_max_requests,
            idle: self.worker_idle_timeout.0,
            idle_total: self.worker_max_idle as usize,
            response: usize::try_from(self.worker_max_response.0).unwrap_or(usize::MAX),
        }
    }

    /// The kept workspaces' caps.
    pub fn runner_caps(&self) -> crate::runner::recycle::Caps {
        crate::runner::recycle::Caps {
            count: self.runner_max_count as usize,
            disk: self.runner_max_disk.0,
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_saphyr::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.dial()
            .validate()
            .map_err(|e| anyhow::anyhow!("coordinator: {e}"))?;
        if self.isolation.is_empty() {
            anyhow::bail!(
                "isolation is empty; list at least one of {}",
                ISOLATION_KINDS.join(", ")
            );
        }
        for kind in &self.isolation {
            if !ISOLATION_KINDS.contains(&kind.as_str()) {
                anyhow::bail!(
                    "isolation {kind:?} is not one of {}",
                    ISOLATION_KINDS.join(", ")
                );
            }
            if (kind == "linux-sandbox" || kind == "docker") && !cfg!(os_linux) {
                anyhow::bail!("isolation {kind} needs Linux; use none on this host");
            }
            if kind == "sandbox-exec" && !cfg!(target_os = "macos") {
                anyhow::bail!("isolation sandbox-exec needs macOS; use linux-sandbox or none here");
            }
        }
        if let Some(cpus) = self.action_cpu_limit
            && !(cpus.is_finite() && cpus > 0.0)
        {
            anyhow::bail!("action_cpu_limit {cpus} must be a positive number of CPUs");
        }
        if let Some(p) = self.xcode_dirs.iter().find(|p| !p.is_absolute()) {
            anyhow::bail!("xcode_dirs entry {} must be an absolute path", p.display());
        }
        for p in &self.sandbox_mounts {
            if !p.is_absolute() {
                anyhow::bail!(
                    "sandbox_mounts entry {} must be an absolute path",
                    p.display()
                );
            }
        }
        if let Some(image) = &self.docker_default_image {
            outpost_proto::platform::image_reference(image)
                .map_err(|e| anyhow::anyhow!("docker_default_image: {e}"))?;
        }
        for image in &self.docker_images_at_start {
            outpost_proto::platform::image_reference(image)
                .map_err(|e| anyhow::anyhow!("docker_images_at_start: {e}"))?;
        }
        if !self.docker_images_at_start.is_empty() && self.docker_pull_policy == PullPolicy::Never {
            anyhow::bail!(
                "docker_images_at_start names images but docker_pull_policy is never; pull \
                 them on the host yourself, or set docker_pull_policy to missing"
            );
        }
        if !self.docker_socket.is_absolute() {
            anyhow::bail!(
                "docker_socket {} must be an absolute path",
                self.docker_socket.display()
            );
        }
        for label in &self.labels {
            match label.split_once('=') {
                Some((k, _)) if !k.trim().is_empty() => {}
                _ => anyhow::bail!("label {label:?} must look like key=value"),
            }
        }
        Ok(())
    }

    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("the config serializes: plain fields only")
    }

    /// How to reach the coordinator.
    pub fn dial(&self) -> outpost_proto::client::Dial {
        outpost_proto::client::Dial {
            address: self.coordinator.clone(),
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            token_file: self.token_file.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_roundtrip_and_docs_example_parses() {
        let yaml = Config::default().to_yaml();
        assert_eq!(
            serde_saphyr::from_str::<Config>(&yaml).expect("parse"),
            Config::default()
        );
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/agent.yaml");
        Config::load(&path)
            .expect("docs/examples/agent.yaml parses")
            .validate()
            .expect("valid");
    }

    #[test]
    fn bad_values_are_refused() {
        let c = Config {
            coordinator: "localhost:8980".into(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            labels: vec!["nokey".into()],
            ..Config::default()
        };
        assert!(c.validate().is_err());
        for isolation in [vec![], vec!["podman".to_owned()]] {
            let c = Config {
                isolation,
                ..Config::default()
            };
            assert!(c.validate().is_err());
        }
        let c = Config {
            sandbox_mounts: vec!["opt".into()],
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            xcode_dirs: vec!["Applications".into()],
            ..Config::default()
        };
        assert!(c.validate().is_err());
        // sandbox-exec is macOS's own.
        let c = Config {
            isolation: vec!["sandbox-exec".into()],
            ..Config::default()
        };
        assert_eq!(c.validate().is_ok(), cfg!(target_os = "macos"));
        let c = Config {
            docker_default_image: Some("oci://gcc".into()),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            isolation: vec!["docker".into()],
            docker_default_image: Some("docker://gcc:12".into()),
            docker_pull_policy: "never".parse().expect("a policy"),
            ..Config::default()
        };
        c.validate().expect("docker is known");
        let c = Config {
            docker_images_at_start: vec!["gcc:12".into()],
            docker_pull_policy: PullPolicy::Never,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            docker_images_at_start: vec!["oci://gcc".into()],
            ..Config::default()
        };
        assert!(c.validate().is_err());
        assert!("sometimes".parse::<PullPolicy>().is_err());
    }
}
