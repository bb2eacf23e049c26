//! TLS on the coordinator's one port: a certificate and key, and with a
//! client CA, mutual TLS (every connection must present a certificate that
//! CA signed). The files are read again on reload; connections accepted
//! afterwards use the new ones, open connections keep theirs.
//!
//! Handshakes run in their own tasks, bounded by [`HANDSHAKE_TIMEOUT`], so
//! a slow or silent peer never holds up the accept loop.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use outpost_proto::client::{read_certificates, read_private_key};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, crypto};
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

/// A peer that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files TLS is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate
    /// one of them signed.
    pub client_ca: Option<PathBuf>,
}

/// Settings read from files, not yet in force.
pub struct Prepared(Arc<ServerConfig>);

/// The server's TLS settings in force; cheap to clone.
#[derive(Clone)]
pub struct Tls {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl Tls {
    pub fn load(files: &TlsFiles) -> anyhow::Result<Tls> {
        Ok(Tls {
            current: Arc::new(RwLock::new(Arc::new(server_config(files)?))),
        })
    }

    /// Reads the files again, without putting them in force yet.
    pub fn prepare(&self, files: &TlsFiles) -> anyhow::Result<Prepared> {
        Ok(Prepared(Arc::new(server_config(files)?)))
    }

    /// New connections use these settings from now on.
    pub fn put_in_force(&self, prepared: Prepared) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = prepared.0;
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(
            &self.current.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    /// TLS connections from the accepted TCP ones, until `shutdown`.
    pub fn incoming(
        &self,
        mut tcp: TcpIncoming,
        shutdown: CancellationToken,
    ) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    next = tcp.next() => match next {
                        None => return,
                        Some(Ok(stream)) => stream,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "cannot accept a connection");
                            // Such errors (EMFILE, ENOBUFS) last a moment.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let (acceptor, tx) = (tls.acceptor(), tx.clone());
                tokio::spawn(async move {
                    let peer = stream.peer_addr().ok();
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(?peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::info!(?peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

fn server_config(files: &TlsFiles) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(crypto::ring::default_provider());
    let chain = read_certificates(&files.cert)?.certificates;
    let (_, key) = read_private_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates(ca)?.certificates {
                roots
                    .add(cert)
                    .with_context(|| format!("a CA certificate in {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("the client CA {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "the key {} does not go with the certificate {}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    // gRPC needs HTTP/2; HTTP/1.1 serves /healthz and the status page.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
