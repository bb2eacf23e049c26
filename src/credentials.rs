//! The flags every client command shares to reach a coordinator over TLS
//! and with a token (`outpost fleet`, `outpost bench`, ...).

use std::path::PathBuf;

use clap::Args;
use outpost_proto::client::Dial;

#[derive(Args, Clone, Debug, Default)]
pub struct Credentials {
    /// File whose first line is the token to send (Authorization: Bearer).
    #[arg(long, env = "OUTPOST_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificates that vouch for a grpcs:// server [default: the system's roots].
    #[arg(long, visible_alias = "ca", env = "OUTPOST_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate to present to a server that requires one (mutual TLS).
    #[arg(long, env = "OUTPOST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "OUTPOST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl Credentials {
    pub fn dial(&self, address: &str) -> Dial {
        Dial {
            address: address.to_owned(),
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            token_file: self.token_file.clone(),
        }
    }
}
