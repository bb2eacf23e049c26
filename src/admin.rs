//! `outpost fleet`, `outpost queue`, `outpost drain AGENT`,
//! `outpost undrain AGENT`: plain HTTP requests to the coordinator's main
//! address (over HTTP/2, with TLS and a token when given), printing what it answers.

use anyhow::Context as _;
use clap::{Args, Subcommand};
use std::time::Duration;

use crate::credentials::Credentials;
use outpost_proto::client::error_chain;

#[derive(Args, Clone, Debug)]
pub struct Target {
    /// The coordinator, grpc://HOST:PORT or grpcs://HOST:PORT (TLS).
    #[arg(
        long,
        env = "OUTPOST_COORDINATOR",
        default_value = "grpc://127.0.0.1:8980"
    )]
    pub coordinator: String,
    #[command(flatten)]
    pub credentials: Credentials,
}

#[derive(Subcommand, Clone, Debug)]
pub enum Admin {
    /// List the agents: host, platform, slots in use, state, last heartbeat, GPUs.
    Fleet(Target),
    /// Show queued actions per platform.
    Queue(Target),
    /// Give an agent no new work (what it runs finishes).
    Drain {
        agent: String,
        #[command(flatten)]
        target: Target,
    },
    /// Give a drained agent work again.
    Undrain {
        agent: String,
        #[command(flatten)]
        target: Target,
    },
    /// Print an action's output: what it wrote so far while it runs
    /// (`--follow`: as it comes, until it ends), all of it once it ended.
    Logs(crate::logs::LogsArgs),
}

/// Sends a plain HTTP request over the same HTTP/2 connection (and TLS,
/// and token) a gRPC client would use; the body of a 2xx answer, or the
/// coordinator's reason as the error.
pub async fn request(target: &Target, method: &str, path: &str) -> anyhow::Result<String> {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    let dial = target.credentials.dial(&target.coordinator);
    let endpoint = dial.endpoint()?.connect_timeout(Duration::from_secs(10));
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the coordinator at {}: {}",
            target.coordinator,
            error_chain(&e)
        )
    })?;
    let transport = outpost_proto::client::Transport::new(channel, dial.bearer()?);
    let request = tonic::codegen::http::Request::builder()
        .method(method)
        .uri(path)
        .body(tonic::body::Body::empty())
        .context("an HTTP request")?;
    let response = transport.oneshot(request).await.map_err(|e| {
        anyhow::anyhow!(
            "the request to {} failed: {}",
            target.coordinator,
            error_chain(&e)
        )
    })?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the coordinator's answer: {e}"))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    anyhow::ensure!(status.is_success(), "{} ({status})", body.trim());
    Ok(body)
}

pub async fn run(admin: Admin) -> anyhow::Result<()> {
    let body = match &admin {
        Admin::Logs(args) => return crate::logs::run(args.clone()).await,
        Admin::Fleet(t) => request(t, "GET", "/api/fleet").await?,
        Admin::Queue(t) => request(t, "GET", "/api/queue").await?,
        Admin::Drain { agent, target } => {
            request(target, "POST", &format!("/api/agents/{agent}/drain")).await?
        }
        Admin::Undrain { agent, target } => {
            request(target, "POST", &format!("/api/agents/{agent}/undrain")).await?
        }
    };
    print!("{body}");
    Ok(())
}
