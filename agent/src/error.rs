//! Why running an action failed, and whose fault that is: the action's
//! (its inputs, outputs or limits: the client gets the reason, nothing is
//! retried), the agent's (its sandbox or disk: retried elsewhere, counted
//! against this agent) or nobody's (the link to the coordinator broke:
//! retried, nobody blamed).

use outpost_proto::fleet::Fault;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Inputs are not in the CAS; the client re-uploads them.
    #[error("{} input blob(s) are missing from the CAS", .0.len())]
    MissingInput(Vec<outpost_proto::digest::Digest>),
    /// The action itself is malformed (bad tree, bad paths).
    #[error("{0}")]
    BadInput(String),
    /// The action needs more than a bound allows: an output larger than the
    /// CAS takes or than the agent's output limit, an input larger than the
    /// agent's input cache. The text names the blob or path and the bound.
    #[error("{0}")]
    TooLarge(String),
    /// This agent could not run the action (its sandbox, its spawner, its
    /// processes): another agent may do better.
    #[error("{0}")]
    Retryable(String),
    /// Talking to the coordinator failed (a stream broke, the CAS was
    /// unavailable): trying again may work, on any agent.
    #[error("{0}")]
    Transient(String),
    /// The agent's own disk failed it.
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
    /// A failed call to the coordinator.
    pub fn remote(context: &str, status: tonic::Status) -> Error {
        Error::Transient(format!(
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

    /// Whose fault the failure is.
    pub fn fault(&self) -> Fault {
        match self {
            Error::MissingInput(_) | Error::BadInput(_) | Error::TooLarge(_) => Fault::Action,
            Error::Retryable(_) | Error::Local { .. } => Fault::Agent,
            Error::Transient(_) | Error::Protocol(_) | Error::Cancelled => Fault::Transient,
        }
    }

    /// Whether the action may succeed when tried again (what coordinators
    /// that do not read [`Error::fault`] go by).
    pub fn retryable(&self) -> bool {
        self.fault() != Fault::Action
    }

    /// The status code the client sees when the action is not retried.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::MissingInput(_) => tonic::Code::FailedPrecondition,
            Error::BadInput(_) => tonic::Code::InvalidArgument,
            Error::TooLarge(_) => tonic::Code::ResourceExhausted,
            Error::Cancelled => tonic::Code::Cancelled,
            Error::Retryable(_)
            | Error::Transient(_)
            | Error::Local { .. }
            | Error::Protocol(_) => tonic::Code::Unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::digest::Function;

    fn io(kind: std::io::ErrorKind) -> std::io::Error {
        std::io::Error::new(kind, "test")
    }

    #[test]
    fn every_error_says_whose_fault_it_is() {
        let digest = Function::Sha256.digest_of(b"x");
        for (error, fault, code) in [
            (
                Error::MissingInput(vec![digest]),
                Fault::Action,
                tonic::Code::FailedPrecondition,
            ),
            (
                Error::BadInput("bad tree".into()),
                Fault::Action,
                tonic::Code::InvalidArgument,
            ),
            (
                Error::TooLarge("output \"out\" is too large".into()),
                Fault::Action,
                tonic::Code::ResourceExhausted,
            ),
            (
                Error::Retryable("the sandbox could not be set up".into()),
                Fault::Agent,
                tonic::Code::Unavailable,
            ),
            (
                Error::local("writing to the input cache", io(std::io::ErrorKind::Other)),
                Fault::Agent,
                tonic::Code::Unavailable,
            ),
            (
                Error::remote("reading inputs", tonic::Status::unavailable("gone")),
                Fault::Transient,
                tonic::Code::Unavailable,
            ),
            (
                Error::Transient("the coordinator sent wrong bytes".into()),
                Fault::Transient,
                tonic::Code::Unavailable,
            ),
            (
                Error::Protocol("a lease without a digest".into()),
                Fault::Transient,
                tonic::Code::Unavailable,
            ),
        ] {
            assert_eq!(error.fault(), fault, "{error}");
            assert_eq!(error.code(), code, "{error}");
            // Coordinators that do not read the fault retry exactly what
            // is not the action's.
            assert_eq!(error.retryable(), fault != Fault::Action, "{error}");
        }
    }

    #[test]
    fn a_refused_call_to_the_coordinator_is_not_the_agents_fault() {
        for status in [
            tonic::Status::unavailable("connection reset"),
            tonic::Status::deadline_exceeded("slow"),
            tonic::Status::internal("stream error"),
        ] {
            let e = Error::remote("uploading outputs", status);
            assert_eq!(e.fault(), Fault::Transient, "{e}");
            assert!(e.to_string().starts_with("uploading outputs: "), "{e}");
        }
    }
}
