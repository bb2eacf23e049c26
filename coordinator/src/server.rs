//! One listening address for everything: the gRPC services, gRPC health and
//! plain HTTP (`/healthz`), with TCP_NODELAY on every connection.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use outpost_proto::bytestream::byte_stream_server::ByteStreamServer;
use outpost_proto::reapi::action_cache_server::ActionCacheServer;
use outpost_proto::reapi::capabilities_server::CapabilitiesServer;
use outpost_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;

use crate::auth::{Auth, Refusal, Tokens};
use crate::config::Config;
use crate::execution::{ExecutionService, OperationsService, Timeouts};
use crate::fleet::FleetService;
use crate::metrics::Metrics;
use crate::scheduler::{Scheduler, Settings};
use crate::service::Context;
use crate::service::action_cache::ActionCacheService;
use crate::service::bytestream::ByteStreamService;
use crate::service::capabilities::CapabilitiesService;
use crate::service::cas::CasService;
use crate::storage::embedded::EmbeddedStore;
use crate::tls::Tls;
use outpost_proto::fleet::fleet_server::FleetServer;
use outpost_proto::longrunning::operations_server::OperationsServer;
use outpost_proto::reapi::execution_server::ExecutionServer;
use std::time::Duration;

/// Room above the batch limit for the rest of a message. Generous, so that
/// a batch somewhat over the limit gets the clear batch-limit error rather
/// than a transport one.
const MESSAGE_OVERHEAD: usize = 4 << 20;

/// A coordinator with its storage open and its socket bound.
pub struct Coordinator {
    config: Config,
    auth: Auth,
    tls: Option<Tls>,
    listener: TcpListener,
    store: EmbeddedStore,
    committer: JoinHandle<()>,
}

impl Coordinator {
    pub async fn bind(config: Config) -> anyhow::Result<Coordinator> {
        config.validate()?;
        let (store, committer) =
            EmbeddedStore::open(config.data_dir.clone(), config.max_cas_size.0)
                .await
                .with_context(|| {
                    format!(
                        "cannot open the data directory {}",
                        config.data_dir.display()
                    )
                })?;
        let tokens = Tokens::load(
            config.client_tokens.as_deref(),
            config.agent_tokens.as_deref(),
        )?;
        if let Some(t) = &tokens {
            tracing::info!(tokens = t.len(), "requests need a token");
        }
        let tls = match config.tls_files()? {
            Some(files) => Some(Tls::load(&files)?),
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        Ok(Coordinator {
            config,
            auth: Auth::new(tokens),
            tls,
            listener,
            store,
            committer,
        })
    }

    /// The gatekeeper, to put new tokens in force (on reload).
    pub fn auth(&self) -> Auth {
        self.auth.clone()
    }

    /// The TLS settings in force, to read new certificates (on reload);
    /// none when the coordinator serves plain TCP.
    pub fn tls(&self) -> Option<Tls> {
        self.tls.clone()
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` fires, then lets in-flight requests finish
    /// and flushes storage.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let addr = self.local_addr()?;
        if !addr.ip().is_loopback() && self.auth.is_open() {
            tracing::warn!(
                %addr,
                "no credentials are configured: anyone who can reach this address can read and \
                 write the cache and run commands on agents; listen on 127.0.0.1 or keep it on \
                 a trusted network"
            );
        }
        let metrics = Metrics::new();
        let scheduler_stop = CancellationToken::new();
        let ctx = Context {
            cas: Arc::new(self.store.clone()),
            action_cache: Arc::new(self.store.clone()),
            max_batch_size: self.config.max_batch_size.0,
            metrics: Arc::clone(&metrics),
        };
        let scheduler = Scheduler::start(
            Settings {
                heartbeat_interval: self.config.heartbeat_interval.0,
                reconnect_grace: self.config.agent_reconnect_grace.0,
                max_attempts: self.config.max_attempts,
                fleet_memory: self.config.fleet_memory.0,
                startup_grace: self.config.startup_grace.0,
                abandon_after: self.config.abandon_after.0,
                keep_finished: Duration::from_secs(600),
            },
            Arc::clone(&ctx.action_cache),
            Arc::new(self.store.clone()),
            Arc::clone(&metrics),
            // Ended after the server, so in-flight Execute streams keep
            // their operations during the shutdown grace.
            scheduler_stop.clone(),
        );

        let timeouts = Timeouts {
            default: self.config.default_action_timeout.0,
            max: self.config.max_action_timeout.0,
            keepalive: self.config.stream_keepalive.0,
            warm_wait: self.config.runner_recycling_max_wait.0,
        };
        let max_message =
            usize::try_from(self.config.max_batch_size.0).unwrap_or(usize::MAX) + MESSAGE_OVERHEAD;
        let (health, health_service) = tonic_health::server::health_reporter();
        for name in [
            "build.bazel.remote.execution.v2.Capabilities",
            "build.bazel.remote.execution.v2.ContentAddressableStorage",
            "build.bazel.remote.execution.v2.ActionCache",
            "google.bytestream.ByteStream",
            "build.bazel.remote.execution.v2.Execution",
            "google.longrunning.Operations",
            "outpost.fleet.v1.Fleet",
        ] {
            health
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let routes = Routes::new(health_service)
            .add_service(CapabilitiesServer::new(CapabilitiesService::new(
                ctx.clone(),
            )))
            .add_service(
                ContentAddressableStorageServer::new(CasService::new(ctx.clone()))
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            )
            .add_service(
                ActionCacheServer::new(ActionCacheService::new(ctx.clone()))
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            )
            .add_service(
                ByteStreamServer::new(
                    ByteStreamService::new(
                        ctx.clone(),
                        self.config.upload_expiry.0,
                        shutdown.child_token(),
                    )
                    .with_live_output(scheduler.clone()),
                )
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
            );
        let routes = routes
            .add_service(ExecutionServer::new(ExecutionService::new(
                ctx.clone(),
                scheduler.clone(),
                timeouts,
                crate::execution::inputs::Policy {
                    allow_escaping_symlinks: self.config.allow_escaping_symlinks,
                },
                self.config
                    .instances
                    .iter()
                    .map(|(name, i)| (name.clone(), i.default_properties()))
                    .collect(),
            )))
            .add_service(OperationsServer::new(OperationsService::new(
                scheduler.clone(),
            )))
            .add_service(
                FleetServer::new(FleetService::new(scheduler.clone(), self.auth.clone()))
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20),
            );
        let scheduler_for_pages = scheduler.clone();
        let scheduler_for_ready = scheduler.clone();
        let store = self.store.clone();
        let scrape = move || {
            let metrics = Arc::clone(&metrics);
            let store = store.clone();
            async move {
                metrics
                    .cas_bytes
                    .set(i64::try_from(store.total_bytes()).unwrap_or(i64::MAX));
                metrics
                    .cas_evictions
                    .set(i64::try_from(store.evicted_blobs()).unwrap_or(i64::MAX));
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        };
        let ready_scheduler = scheduler_for_ready;
        let ready = move || {
            let scheduler = ready_scheduler.clone();
            async move {
                // Ready once storage is open (it is, by now) and the
                // scheduler answers.
                match scheduler.snapshot().await {
                    Ok(_) => (axum::http::StatusCode::OK, "ready\n"),
                    Err(_) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
                }
            }
        };
        let routes = Routes::from(
            routes
                .into_axum_router()
                .route("/healthz", get(|| async { "ok\n" }))
                .route("/readyz", get(ready))
                .route("/metrics", get(scrape))
                .merge(crate::execution::live::routes(
                    scheduler_for_pages.clone(),
                    Arc::clone(&ctx.cas),
                ))
                .merge(status_routes(scheduler_for_pages, Arc::clone(&ctx.cas)))
                .layer(axum::middleware::from_fn_with_state(
                    self.auth.clone(),
                    authorize,
                )),
        );
        let incoming = TcpIncoming::from(self.listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let tls = self.tls.is_some();
        let client_certificates = self.config.tls_client_ca.is_some();
        tracing::info!(tls, client_certificates, "coordinator listening on {addr}");
        let router = tonic::transport::Server::builder()
            .accept_http1(true)
            // Large windows keep big ByteStream transfers from stalling on
            // flow control; bounded streams per connection keep one client
            // from tying up the server.
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            // Fewer, larger frames for blob uploads (peers may send up to
            // this; the HTTP/2 default is 16 KiB).
            .max_frame_size(Some(1 << 20))
            .max_concurrent_streams(Some(4096))
            // Dead peers (half-open connections) are noticed, so their
            // uploads and agent streams do not hang on forever.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_routes(routes);
        let grace = self.config.shutdown_grace.0;
        // On shutdown the listener closes at once, but connections stay
        // served while clients wait on running actions (agents must still
        // upload their outputs); then every connection is told to go away.
        let stopped = {
            let (shutdown, scheduler) = (shutdown.clone(), scheduler.clone());
            async move {
                shutdown.cancelled().await;
                tracing::info!(
                    ?grace,
                    "shutting down: waiting for clients of running actions"
                );
                let _ = tokio::time::timeout(grace, scheduler.shut_down_when_idle()).await;
            }
        };
        let server: std::pin::Pin<Box<dyn Future<Output = _> + Send>> =
            match &self.tls {
                None => Box::pin(router.serve_with_incoming_shutdown(
                    accept_until(incoming, shutdown.clone()),
                    stopped,
                )),
                Some(tls) => Box::pin(
                    router.serve_with_incoming_shutdown(
                        tls.incoming(incoming, shutdown.clone())
                            .chain(tokio_stream::pending()),
                        stopped,
                    ),
                ),
            };
        tokio::select! {
            served = server => served.context("the gRPC server failed")?,
            () = async {
                shutdown.cancelled().await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "requests still running after the shutdown grace period; closing their connections");
            }
        }
        scheduler_stop.cancel();
        tracing::info!("shutting down: flushing storage");
        drop(ctx);
        drop(self.store);
        self.committer
            .await
            .context("the storage committer failed")?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Accepted connections until `shutdown`, when the listener closes; the
/// stream then stays open without yielding, so the server keeps serving the
/// connections it has until it is told to stop.
fn accept_until(
    mut tcp: TcpIncoming,
    shutdown: CancellationToken,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                next = tcp.next() => match next {
                    Some(conn) => {
                        if tx.send(conn).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).chain(tokio_stream::pending())
}

/// Lets a request through when its token has the role its path needs,
/// with the caller recorded in its extensions; refuses it otherwise, as a
/// gRPC status or an HTTP 401/403.
async fn authorize(
    axum::extract::State(auth): axum::extract::State<Auth>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth.check(request.uri().path(), header) {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(refusal) => {
            let grpc = request
                .headers()
                .get(axum::http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            let (status, code, message) = match refusal {
                Refusal::Unauthenticated(m) => (
                    tonic::Status::unauthenticated(m.clone()),
                    StatusCode::UNAUTHORIZED,
                    m,
                ),
                Refusal::Denied(m) => (
                    tonic::Status::permission_denied(m.clone()),
                    StatusCode::FORBIDDEN,
                    m,
                ),
            };
            if grpc {
                status.into_http::<axum::body::Body>()
            } else {
                (code, format!("{message}\n")).into_response()
            }
        }
    }
}

/// Blobs larger than this are not shown on the status page.
const MAX_LOG_VIEW: u64 = 16 << 20;

/// The status page, the admin views behind `outpost fleet`/`queue`, drain
/// and undrain, and stdout/stderr links.
fn status_routes(scheduler: Scheduler, cas: Arc<dyn crate::storage::Cas>) -> axum::Router {
    async fn snapshot(s: &Scheduler) -> Result<crate::scheduler::Snapshot, Response> {
        s.snapshot()
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response())
    }
    let page = {
        let s = scheduler.clone();
        move || async move {
            snapshot(&s)
                .await
                .map(|snap| Html(crate::status::page(&snap, &s.live().running())))
        }
    };
    let fleet = {
        let s = scheduler.clone();
        move || async move {
            snapshot(&s)
                .await
                .map(|snap| crate::status::fleet_text(&snap))
        }
    };
    let queue = {
        let s = scheduler.clone();
        move || async move {
            snapshot(&s)
                .await
                .map(|snap| crate::status::queue_text(&snap))
        }
    };
    let drain = |draining: bool| {
        let s = scheduler.clone();
        move |Path(id): Path<String>| async move {
            match s.set_draining(&id, draining).await {
                Ok(()) => (
                    StatusCode::OK,
                    format!("{id}: {}\n", if draining { "draining" } else { "ready" }),
                ),
                Err(e) => (StatusCode::NOT_FOUND, format!("{e}\n")),
            }
        }
    };
    let blob = move |Path((hash, size)): Path<(String, String)>| {
        let cas = Arc::clone(&cas);
        async move {
            let digest = outpost_proto::digest::Digest::parse(
                &hash,
                &size,
                outpost_proto::digest::Function::Sha256,
            )
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
            if digest.size > MAX_LOG_VIEW {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("{digest} is too large to show"),
                ));
            }
            match cas.read_all(digest).await {
                Ok(Some(bytes)) => Ok((
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; charset=utf-8",
                    )],
                    bytes,
                )),
                Ok(None) => Err((StatusCode::NOT_FOUND, format!("{digest} is not in the CAS"))),
                Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            }
        }
    };
    axum::Router::new()
        .route("/", get(page))
        .route("/api/fleet", get(fleet))
        .route("/api/queue", get(queue))
        .route("/api/agents/{id}/drain", post(drain(true)))
        .route("/api/agents/{id}/undrain", post(drain(false)))
        .route("/blobs/{hash}/{size}", get(blob))
}
