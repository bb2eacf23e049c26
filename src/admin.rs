//! `outpost fleet`, `outpost queue`, `outpost drain AGENT`,
//! `outpost undrain AGENT`: plain HTTP requests to the coordinator's main
//! address, printing what it answers.

use anyhow::Context as _;
use clap::{Args, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Args, Clone, Debug)]
pub struct Target {
    /// The coordinator, grpc://HOST:PORT or http://HOST:PORT.
    #[arg(
        long,
        env = "OUTPOST_COORDINATOR",
        default_value = "grpc://127.0.0.1:8980"
    )]
    pub coordinator: String,
    /// File whose first line is a token with the admin role.
    #[arg(long, env = "OUTPOST_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
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
}

fn host_port(coordinator: &str) -> anyhow::Result<String> {
    let rest = coordinator
        .strip_prefix("grpc://")
        .or_else(|| coordinator.strip_prefix("http://"))
        .with_context(|| format!("coordinator {coordinator:?} must look like grpc://HOST:PORT"))?;
    Ok(rest.trim_end_matches('/').to_owned())
}

async fn request(target: &Target, method: &str, path: &str) -> anyhow::Result<String> {
    let addr = host_port(&target.coordinator)?;
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .with_context(|| format!("cannot reach the coordinator at {addr}"))?;
    let authorization = match &target.token_file {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the token file {}", file.display()))?;
            let token = text.lines().next().unwrap_or_default().trim();
            anyhow::ensure!(
                !token.is_empty() && token.chars().all(|c| c.is_ascii_graphic()),
                "the token file {} must hold one token on its first line",
                file.display()
            );
            format!("Authorization: Bearer {token}\r\n")
        }
        None => String::new(),
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await?;
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .context("the coordinator sent no HTTP response")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    anyhow::ensure!((200..300).contains(&status), "{}", body.trim());
    Ok(body)
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub async fn run(admin: Admin) -> anyhow::Result<()> {
    let body = match &admin {
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
