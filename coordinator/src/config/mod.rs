//! The coordinator's configuration: a YAML file whose every key has a
//! default, documented in `docs/configuration.md`. The binary layers flags
//! and `OUTPOST_*` environment variables on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use outpost_proto::units::{ByteSize, Span};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC services and the HTTP endpoints share.
    pub listen: SocketAddr,
    /// Where the embedded storage keeps blobs and its database.
    pub data_dir: PathBuf,
    /// Upper bound on the bytes of blobs kept; least recently used blobs are
    /// evicted beyond it.
    pub max_cas_size: ByteSize,
    /// Largest total of blob bytes one batch call may carry (advertised to
    /// clients as `max_batch_total_size_bytes`).
    pub max_batch_size: ByteSize,
    /// How long an unfinished resumable upload is kept before it is dropped.
    pub upload_expiry: Span,
    /// On shutdown, how long in-flight requests may take before the
    /// remaining connections are closed.
    pub shutdown_grace: Span,
    /// How often agents send a heartbeat; an agent silent for three of them
    /// counts as disconnected.
    pub heartbeat_interval: Span,
    /// How long a disconnected agent may take to reconnect and resume its
    /// actions before they are run elsewhere.
    pub agent_reconnect_grace: Span,
    /// Attempts of one action whose agent was lost before it fails.
    pub max_attempts: u32,
    /// Agents seen this recently count when deciding whether an action's
    /// platform can be satisfied at all.
    pub fleet_memory: Span,
    /// After start-up, actions no agent can satisfy wait this long for
    /// agents to connect instead of failing at once.
    pub startup_grace: Span,
    /// An operation no client waits on any more (every Execute and
    /// WaitExecution stream closed) is cancelled after this long; a client
    /// that comes back with WaitExecution before then finds it.
    pub abandon_after: Span,
    /// Execute and WaitExecution streams carry the operation at least this
    /// often while nothing changes, so proxies that cut quiet streams (often
    /// after 60s) leave them open during long actions.
    pub stream_keepalive: Span,
    /// How long an action asking for a warm runner or persistent worker
    /// waits for the agent holding one warm before any agent may take it,
    /// when it does not say (`runner-recycling-max-wait`).
    pub runner_recycling_max_wait: Span,
    /// Timeout of actions that set none.
    pub default_action_timeout: Span,
    /// Actions asking for a longer timeout are refused.
    pub max_action_timeout: Span,
    /// Accept input trees with relative symlinks that point above the
    /// input root (refused by default; absolute targets are always
    /// accepted: they name paths in the action's view of its host).
    pub allow_escaping_symlinks: bool,
    /// Log filter, e.g. `info` or `outpost_coordinator=debug,info`.
    pub log: String,
    /// Client tokens, `TOKEN ROLE[,ROLE...]` per line; with neither token
    /// file the coordinator is open.
    pub client_tokens: Option<PathBuf>,
    /// Agent tokens, one per line.
    pub agent_tokens: Option<PathBuf>,
    /// PEM certificate chain to serve TLS with (then clients dial
    /// `grpcs://`); plain TCP when unset.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates; when set, every client and agent must present
    /// a certificate one of them signed (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
    /// Settings per instance name (`instance_name` of REAPI requests);
    /// names not listed behave as the default instance.
    pub instances: std::collections::BTreeMap<String, Instance>,
}

/// What one instance name changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Instance {
    /// Platform properties merged into every action executed on this
    /// instance name; an action's own value of a property wins. For
    /// clients that can choose an instance name but no properties.
    pub default_platform: std::collections::BTreeMap<String, String>,
}

impl Instance {
    /// `default_platform` as wire properties.
    pub fn default_properties(&self) -> Vec<outpost_proto::reapi::platform::Property> {
        self.default_platform
            .iter()
            .map(|(name, value)| outpost_proto::reapi::platform::Property {
                name: name.clone(),
                value: value.clone(),
            })
            .collect()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8980)),
            data_dir: PathBuf::from("./outpost-data"),
            max_cas_size: ByteSize(50 << 30),
            max_batch_size: ByteSize(4 << 20),
            upload_expiry: Span(Duration::from_secs(600)),
            shutdown_grace: Span(Duration::from_secs(30)),
            heartbeat_interval: Span(Duration::from_secs(5)),
            agent_reconnect_grace: Span(Duration::from_secs(10)),
            max_attempts: 3,
            fleet_memory: Span(Duration::from_secs(600)),
            startup_grace: Span(Duration::from_secs(15)),
            abandon_after: Span(Duration::from_secs(60)),
            stream_keepalive: Span(Duration::from_secs(30)),
            runner_recycling_max_wait: Span(outpost_proto::warm::DEFAULT_MAX_WAIT),
            default_action_timeout: Span(Duration::from_secs(3600)),
            max_action_timeout: Span(Duration::from_secs(6 * 3600)),
            allow_escaping_symlinks: false,
            log: "info".to_owned(),
            client_tokens: None,
            agent_tokens: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            instances: std::collections::BTreeMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The reason is part of the message, not a source, so a report that
    // prints the chain of causes does not say it twice.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a YAML config file. Unknown keys and bad values are errors that
    /// name the line.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|reason| Error::Read {
            path: path.to_owned(),
            reason,
        })?;
        Config::parse(&text).map_err(|message| Error::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses YAML text; an empty document means all defaults.
    pub fn parse(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks relations between values that each parse fine alone.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_batch_size.0 < 64 << 10 {
            return Err(Error::Invalid(format!(
                "max_batch_size {} is below the 64KiB minimum",
                self.max_batch_size
            )));
        }
        if self.max_batch_size.0 > 64 << 20 {
            return Err(Error::Invalid(format!(
                "max_batch_size {} is above the 64MiB maximum",
                self.max_batch_size
            )));
        }
        if self.heartbeat_interval.0 < Duration::from_millis(100) {
            return Err(Error::Invalid(
                "heartbeat_interval must be at least 100ms".to_owned(),
            ));
        }
        if self.stream_keepalive.0 < Duration::from_millis(100) {
            return Err(Error::Invalid(
                "stream_keepalive must be at least 100ms".to_owned(),
            ));
        }
        if self.max_attempts == 0 {
            return Err(Error::Invalid("max_attempts must be at least 1".to_owned()));
        }
        if self.default_action_timeout.0 > self.max_action_timeout.0 {
            return Err(Error::Invalid(format!(
                "default_action_timeout {} is over max_action_timeout {}",
                self.default_action_timeout, self.max_action_timeout
            )));
        }
        if self.max_cas_size.0 < 1 << 20 {
            return Err(Error::Invalid(format!(
                "max_cas_size {} is below the 1MiB minimum",
                self.max_cas_size
            )));
        }
        for (name, instance) in &self.instances {
            outpost_proto::platform::parse(&instance.default_properties())
                .map_err(|e| Error::Invalid(format!("instances.{name}.default_platform: {e}")))?;
        }
        self.tls_files()?;
        Ok(())
    }

    /// The TLS files, when TLS is configured.
    pub fn tls_files(&self) -> Result<Option<crate::tls::TlsFiles>, Error> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            })),
            (None, None) if self.tls_client_ca.is_some() => Err(Error::Invalid(
                "tls_client_ca needs TLS: set tls_cert and tls_key too".to_owned(),
            )),
            (None, None) => Ok(None),
            _ => Err(Error::Invalid(
                "tls_cert and tls_key go together: set both, or neither".to_owned(),
            )),
        }
    }

    /// The effective configuration as YAML, for `--print-config`.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("the config serializes: plain fields only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_roundtrip_through_yaml() {
        let yaml = Config::default().to_yaml();
        assert_eq!(Config::parse(&yaml), Ok(Config::default()));
        assert_eq!(Config::parse(""), Ok(Config::default()));
    }

    #[test]
    fn parses_values() {
        let c = Config::parse("listen: 127.0.0.1:9000\nmax_cas_size: 2GiB\nupload_expiry: 1m\n")
            .expect("valid");
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 9000)));
        assert_eq!(c.max_cas_size, ByteSize(2 << 30));
        assert_eq!(c.upload_expiry.0.as_secs(), 60);
        assert_eq!(c.data_dir, Config::default().data_dir);
    }

    #[test]
    fn unknown_key_names_its_line() {
        let err =
            Config::parse("listen: 127.0.0.1:9000\n\nmax_cas_sise: 2GiB\n").expect_err("typo");
        assert!(err.contains("max_cas_sise"), "{err}");
        assert!(err.contains('3'), "no line number in {err}");
    }

    #[test]
    fn bad_value_is_an_error() {
        let err = Config::parse("max_cas_size: plenty\n").expect_err("bad size");
        assert!(err.contains("plenty"), "{err}");
    }

    #[test]
    fn docs_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/coordinator.yaml");
        let config = Config::load(&path).expect("docs/examples/coordinator.yaml parses");
        config.validate().expect("and is valid");
    }
}
