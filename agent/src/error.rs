//! Why running an action failed, split the way the coordinator needs it:
//! infrastructure trouble that may succeed elsewhere, and problems with the
//! action itself that go back to the client.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Inputs are not in the CAS; the client re-uploads them.
    #[error("{} input blob(s) are missing from the CAS", .0.len())]
    MissingInput(Vec<outpost_proto::digest::Digest>),
    /// The action itself is malformed (bad tree, bad paths).
    #[error("{0}")]
    BadInput(String),
    /// Talking to the coordinator failed, or the host had trouble: another
    /// agent may do better.
    #[error("{0}")]
    Retryable(String),
    #[error("local i/o error while {context}: {source}")]
    Local {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The coordinator sent something that does not make sense.
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("cancelled")]
    Cancelled,
}

impl Error {
    pub fn remote(context: &str, status: tonic::Status) -> Error {
        Error::Retryable(format!(
            "{context}: {} ({:?})",
            status.message(),
            status.code()
        ))
    }

    pub fn local(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Local {
            context: context.into(),
            source,
        }
    }

    /// Whether the action may succeed when tried again elsewhere.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Error::Retryable(_) | Error::Local { .. } | Error::Protocol(_)
        )
    }
}
