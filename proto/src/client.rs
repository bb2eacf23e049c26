//! Dialing a coordinator, or any REAPI server: the address
//! (`grpc://HOST:PORT` in the clear, `grpcs://HOST:PORT` over TLS), the CA
//! that vouches for the server, an optional client certificate for mutual
//! TLS, and the bearer token sent on every call. The agent, the admin CLI
//! and `outpost bench` all dial through [`Dial`].

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}")]
    Invalid(String),
    /// (`error` is part of the message, not a separate cause, so a chain
    /// of causes does not print it twice.)
    #[error("cannot read {what} {}: {error}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Where to dial and with which credentials.
#[derive(Debug, Clone, Default)]
pub struct Dial {
    /// `grpc://HOST:PORT` or `grpcs://HOST:PORT` (`http://` and `https://`
    /// are taken as the same).
    pub address: String,
    /// PEM certificates to trust for the server instead of the system's
    /// roots.
    pub ca: Option<PathBuf>,
    /// PEM certificate chain and key to present (mutual TLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// File whose first line is the bearer token.
    pub token_file: Option<PathBuf>,
}

/// An address split into whether it uses TLS and the `HOST:PORT` part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub tls: bool,
    pub authority: String,
}

impl Address {
    pub fn parse(address: &str) -> Result<Address, DialError> {
        let (tls, rest) = if let Some(rest) = address
            .strip_prefix("grpcs://")
            .or_else(|| address.strip_prefix("https://"))
        {
            (true, rest)
        } else if let Some(rest) = address
            .strip_prefix("grpc://")
            .or_else(|| address.strip_prefix("http://"))
        {
            (false, rest)
        } else {
            return Err(DialError::Invalid(format!(
                "address {address:?} must look like grpc://HOST:PORT or grpcs://HOST:PORT (TLS)"
            )));
        };
        let authority = rest.trim_end_matches('/');
        let valid = !authority.is_empty()
            && !authority.contains(['/', '?', '#', '@', ' '])
            && authority
                .parse::<tonic::codegen::http::uri::Authority>()
                .is_ok();
        if !valid {
            return Err(DialError::Invalid(format!(
                "address {address:?} must look like grpc://HOST:PORT or grpcs://HOST:PORT (TLS)"
            )));
        }
        Ok(Address {
            tls,
            authority: authority.to_owned(),
        })
    }

    /// The URI tonic dials.
    pub fn uri(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }
}

impl Dial {
    pub fn new(address: impl Into<String>) -> Dial {
        Dial {
            address: address.into(),
            ..Dial::default()
        }
    }

    /// Checks the address, that TLS files are given only with a TLS
    /// address, and that each file holds what it should.
    pub fn validate(&self) -> Result<(), DialError> {
        self.tls(&Address::parse(&self.address)?).map(drop)
    }

    /// An endpoint with TLS set up when the address asks for it; callers
    /// add their own timeouts and window sizes.
    pub fn endpoint(&self) -> Result<Endpoint, DialError> {
        let address = Address::parse(&self.address)?;
        let endpoint = Endpoint::from_shared(address.uri())
            .map_err(|e| DialError::Invalid(format!("address {:?}: {e}", self.address)))?;
        match self.tls(&address)? {
            None => Ok(endpoint),
            Some(tls) => endpoint
                .tls_config(tls)
                .map_err(|e| DialError::Invalid(format!("TLS for {}: {e}", self.address))),
        }
    }

    /// The interceptor that sends this dial's token.
    pub fn bearer(&self) -> Result<Bearer, DialError> {
        let Some(path) = &self.token_file else {
            return Ok(Bearer(None));
        };
        let text = std::fs::read_to_string(path).map_err(|error| DialError::Read {
            what: "the token file",
            path: path.clone(),
            error,
        })?;
        let token = text.lines().next().unwrap_or_default().trim();
        if token.is_empty() {
            return Err(DialError::Invalid(format!(
                "the token file {} must hold a token on its first line",
                path.display()
            )));
        }
        Bearer::new(Some(token)).map_err(|_| {
            DialError::Invalid(format!(
                "the token in {} must be printable ASCII",
                path.display()
            ))
        })
    }

    /// Connects lazily: the first call dials.
    pub fn transport(&self, endpoint: Endpoint) -> Result<Transport, DialError> {
        Ok(Transport::new(endpoint.connect_lazy(), self.bearer()?))
    }

    fn tls(&self, address: &Address) -> Result<Option<ClientTlsConfig>, DialError> {
        if !address.tls {
            for (key, set) in [
                ("a CA file", self.ca.is_some()),
                ("a client certificate", self.cert.is_some()),
                ("a client key", self.key.is_some()),
            ] {
                if set {
                    return Err(DialError::Invalid(format!(
                        "{key} is set but {} is not a TLS address; use grpcs://{}",
                        self.address, address.authority
                    )));
                }
            }
            return Ok(None);
        }
        let mut tls = ClientTlsConfig::new().assume_http2(true);
        tls = match &self.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read_certificates(ca)?.pem)),
            None => tls.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read_certificates(cert)?.pem,
                    read_private_key(key)?.0,
                ));
            }
            _ => {
                return Err(DialError::Invalid(
                    "a client certificate needs its key, and a key its certificate".into(),
                ));
            }
        }
        Ok(Some(tls))
    }
}

/// PEM certificates as read from a file: the text (what tonic takes) and
/// the certificates in it (what rustls takes); at least one.
pub struct PemCertificates {
    pub pem: Vec<u8>,
    pub certificates: Vec<CertificateDer<'static>>,
}

/// Reads a PEM file that must hold at least one certificate.
pub fn read_certificates(path: &Path) -> Result<PemCertificates, DialError> {
    let pem = read(path, "the certificate file")?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, "certificate", e))?;
    if certificates.is_empty() {
        return Err(pem_error(
            path,
            "certificate",
            rustls_pki_types::pem::Error::NoItemsFound,
        ));
    }
    Ok(PemCertificates { pem, certificates })
}

/// Reads a PEM file that must hold a private key (PKCS#8, PKCS#1 or
/// SEC1); returns the text and the key.
pub fn read_private_key(path: &Path) -> Result<(Vec<u8>, PrivateKeyDer<'static>), DialError> {
    let pem = read(path, "the key file")?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| pem_error(path, "private key", e))?;
    Ok((pem, key))
}

fn pem_error(path: &Path, what: &str, e: rustls_pki_types::pem::Error) -> DialError {
    use rustls_pki_types::pem::Error;
    let path = path.display();
    DialError::Invalid(match e {
        Error::NoItemsFound if what == "certificate" => {
            format!("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        }
        Error::NoItemsFound => format!("{path} holds no PEM {what}"),
        Error::MissingSectionEnd { end_marker } => format!(
            "{path} is not a valid PEM {what}: the line -----END {}----- is missing",
            String::from_utf8_lossy(&end_marker)
        ),
        e => format!("{path} is not a valid PEM {what}: {e}"),
    })
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, DialError> {
    std::fs::read(path).map_err(|error| DialError::Read {
        what,
        path: path.to_owned(),
        error,
    })
}

/// An error with its causes, which say what went wrong (a refused
/// connection, an untrusted certificate): `a: b: c`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // Layers often repeat their cause's text; say it once.
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Adds a bearer token, when there is one, to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl Bearer {
    /// Sends `authorization: Bearer TOKEN`, or nothing without a token.
    pub fn new(token: Option<&str>) -> Result<Bearer, DialError> {
        let Some(token) = token else {
            return Ok(Bearer(None));
        };
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| DialError::Invalid("a token must be printable ASCII".into()))?;
        Ok(Bearer(Some(value)))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the dial's token.
pub type Transport =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_strictly() {
        let a = Address::parse("grpcs://build.example:443").expect("valid");
        assert!(a.tls);
        assert_eq!(a.uri(), "https://build.example:443");
        let a = Address::parse("grpc://127.0.0.1:8980/").expect("valid");
        assert!(!a.tls);
        assert_eq!(a.uri(), "http://127.0.0.1:8980");
        for bad in [
            "localhost:8980",
            "grpc://",
            "grpc://host:80/path",
            "grpc://user@host:80",
            "tcp://host:80",
            "grpc://ho st:80",
        ] {
            let e = Address::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("grpcs://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn tls_files_need_a_tls_address_and_real_pem() {
        let dir = std::env::temp_dir().join(format!("outpost-dial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").expect("write");
        let dial = Dial {
            ca: Some(junk.clone()),
            ..Dial::new("grpc://host:1")
        };
        let e = dial.validate().expect_err("plain address").to_string();
        assert!(e.contains("use grpcs://host:1"), "{e}");
        let dial = Dial {
            ca: Some(junk.clone()),
            ..Dial::new("grpcs://host:1")
        };
        let e = dial.validate().expect_err("junk").to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let dial = Dial {
            ca: Some(dir.join("absent.pem")),
            ..Dial::new("grpcs://host:1")
        };
        let e = dial.validate().expect_err("absent").to_string();
        assert!(e.contains("cannot read the certificate file"), "{e}");
        let dial = Dial {
            key: Some(junk),
            ..Dial::new("grpcs://host:1")
        };
        assert!(dial.validate().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
