//! Who may call what. Clients and agents send `authorization: Bearer TOKEN`;
//! tokens come from two files (`client_tokens`: `TOKEN ROLE[,ROLE...]` per
//! line, a bare token meaning `cache-read,cache-write,execute`;
//! `agent_tokens`: one token per line) and are kept only as SHA-256 hashes.
//! Every request's path names the role it needs ([`required`]). With no
//! token files the coordinator is open (a trusted network).
//!
//! A reload replaces the tokens; streams opened with a token that is gone
//! are ended (see [`Auth::revoked`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    CacheRead,
    CacheWrite,
    Execute,
    Agent,
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::CacheRead => "cache-read",
            Role::CacheWrite => "cache-write",
            Role::Execute => "execute",
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        [
            Role::CacheRead,
            Role::CacheWrite,
            Role::Execute,
            Role::Agent,
            Role::Admin,
        ]
        .into_iter()
        .find(|r| r.name() == s)
    }
}

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Health checks and the read-only HTTP views: anyone.
    Nothing,
    /// Any valid token (server capabilities).
    AnyToken,
    /// One of these roles.
    AnyOf(&'static [Role]),
}

/// The role a gRPC method or HTTP path needs. Agents read and write the
/// CAS (inputs, outputs) but never the Action Cache or Execute.
pub fn required(path: &str) -> Need {
    use Role::*;
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    match service {
        "grpc.health.v1.Health" => Need::Nothing,
        "build.bazel.remote.execution.v2.Capabilities" => Need::AnyToken,
        "build.bazel.remote.execution.v2.ContentAddressableStorage" => match method {
            "BatchUpdateBlobs" => Need::AnyOf(&[CacheWrite, Agent]),
            _ => Need::AnyOf(&[CacheRead, Agent]),
        },
        "google.bytestream.ByteStream" => match method {
            "Write" | "QueryWriteStatus" => Need::AnyOf(&[CacheWrite, Agent]),
            _ => Need::AnyOf(&[CacheRead, Agent]),
        },
        "build.bazel.remote.execution.v2.ActionCache" => match method {
            "UpdateActionResult" => Need::AnyOf(&[CacheWrite]),
            _ => Need::AnyOf(&[CacheRead]),
        },
        "build.bazel.remote.execution.v2.Execution" | "google.longrunning.Operations" => {
            Need::AnyOf(&[Execute])
        }
        "outpost.fleet.v1.Fleet" => Need::AnyOf(&[Agent]),
        // HTTP: the admin API (fleet, queue, drain) and stored logs need a
        // token; health, metrics and the status page itself do not.
        "api" => Need::AnyOf(&[Admin]),
        "blobs" => Need::AnyOf(&[CacheRead, Admin]),
        // Running actions' output: whoever may read results.
        "live" => Need::AnyOf(&[CacheRead, Admin]),
        _ => Need::Nothing,
    }
}

type Hash = [u8; 32];

fn hash(token: &str) -> Hash {
    Sha256::digest(token.as_bytes()).into()
}

/// The tokens in force.
#[derive(Default, Debug)]
pub struct Tokens {
    grants: HashMap<Hash, Vec<Role>>,
}

/// Who a request came from: the token, or nobody on an open coordinator
/// and for paths that need no token.
#[derive(Clone, Debug)]
pub struct Principal {
    token: Option<Hash>,
}

impl Principal {
    /// Whether a token (which may be revoked) stands behind the request.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Who the client is, for keeping warm state apart per client: its
    /// token's hash in hex, "" with no token.
    pub fn identity(&self) -> String {
        self.token.map(hex::encode).unwrap_or_default()
    }
}

/// Why a request was refused; maps to gRPC UNAUTHENTICATED or
/// PERMISSION_DENIED.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Unauthenticated(String),
    Denied(String),
}

impl Tokens {
    /// Reads the token files; either may be absent. Errors name the file
    /// and line (never the token).
    pub fn load(client: Option<&Path>, agent: Option<&Path>) -> anyhow::Result<Option<Tokens>> {
        if client.is_none() && agent.is_none() {
            return Ok(None);
        }
        let mut tokens = Tokens::default();
        if let Some(path) = client {
            tokens.read(path, false)?;
        }
        if let Some(path) = agent {
            tokens.read(path, true)?;
        }
        Ok(Some(tokens))
    }

    fn read(&mut self, path: &Path, agents: bool) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read the token file {}: {e}", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("{}:{}", path.display(), i + 1);
            let mut parts = line.split_whitespace();
            let token = parts.next().unwrap_or_default();
            if token.len() < 16 {
                anyhow::bail!("{}: a token must be at least 16 characters", at());
            }
            let roles = if agents {
                if parts.next().is_some() {
                    anyhow::bail!("{}: an agent token file holds one token per line", at());
                }
                vec![Role::Agent]
            } else {
                match parts.next() {
                    None => vec![Role::CacheRead, Role::CacheWrite, Role::Execute],
                    Some(list) => {
                        if parts.next().is_some() {
                            anyhow::bail!("{}: expected TOKEN ROLE[,ROLE...]", at());
                        }
                        let mut roles = Vec::new();
                        for name in list.split(',') {
                            match Role::parse(name) {
                                Some(Role::Agent) => anyhow::bail!(
                                    "{}: agent tokens go in the agent token file",
                                    at()
                                ),
                                Some(r) => roles.push(r),
                                None => anyhow::bail!(
                                    "{}: unknown role {name:?} (cache-read, cache-write, \
                                     execute, admin)",
                                    at()
                                ),
                            }
                        }
                        roles
                    }
                }
            };
            if self.grants.insert(hash(token), roles).is_some() {
                anyhow::bail!("{}: this token is listed twice", at());
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.grants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }
}

/// The coordinator's gatekeeper; cheap to clone.
#[derive(Clone)]
pub struct Auth {
    tokens: Arc<RwLock<Option<Tokens>>>,
    /// Bumped at every replacement, so open streams re-check their token.
    generation: watch::Sender<u64>,
}

impl Auth {
    pub fn new(tokens: Option<Tokens>) -> Auth {
        Auth {
            tokens: Arc::new(RwLock::new(tokens)),
            generation: watch::Sender::new(0),
        }
    }

    /// Whether any token is required at all.
    pub fn is_open(&self) -> bool {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    /// Puts new tokens in force; streams whose token is gone end.
    pub fn replace(&self, tokens: Option<Tokens>) {
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = tokens;
        self.generation.send_modify(|g| *g += 1);
    }

    /// Checks the `authorization` header against what `path` needs.
    pub fn check(&self, path: &str, authorization: Option<&str>) -> Result<Principal, Refusal> {
        let need = required(path);
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        let Some(tokens) = tokens.as_ref().filter(|_| need != Need::Nothing) else {
            return Ok(Principal { token: None });
        };
        let Some(header) = authorization else {
            return Err(Refusal::Unauthenticated(
                "this coordinator needs a token: send `authorization: Bearer TOKEN` \
                 (Bazel: --remote_header=authorization=Bearer...)"
                    .to_owned(),
            ));
        };
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Refusal::Unauthenticated(
                    "the authorization header must be `Bearer TOKEN`".to_owned(),
                )
            })?;
        let h = hash(token);
        let roles = tokens
            .grants
            .get(&h)
            .ok_or_else(|| Refusal::Unauthenticated("unknown or revoked token".to_owned()))?;
        if let Need::AnyOf(wanted) = need
            && !wanted.iter().any(|w| roles.contains(w))
        {
            let wanted: Vec<&str> = wanted.iter().map(|r| r.name()).collect();
            let held: Vec<&str> = roles.iter().map(|r| r.name()).collect();
            return Err(Refusal::Denied(format!(
                "{path} needs the role {} and this token has {}",
                wanted.join(" or "),
                held.join(",")
            )));
        }
        Ok(Principal { token: Some(h) })
    }

    /// Resolves once `principal`'s token is no longer in force (never for
    /// one without a token).
    pub async fn revoked(&self, principal: &Principal) {
        let Some(token) = principal.token else {
            return std::future::pending().await;
        };
        let mut generation = self.generation.subscribe();
        loop {
            let valid = self
                .tokens
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_none_or(|t| t.grants.contains_key(&token));
            if !valid {
                return;
            }
            if generation.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(client: &str, agent: &str) -> anyhow::Result<Option<Tokens>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, a) = (dir.path().join("c"), dir.path().join("a"));
        std::fs::write(&c, client).expect("write");
        std::fs::write(&a, agent).expect("write");
        Tokens::load(Some(&c), Some(&a))
    }

    const CAS_WRITE: &str =
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs";
    const AC_WRITE: &str = "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult";
    const EXECUTE: &str = "/build.bazel.remote.execution.v2.Execution/Execute";
    const JOIN: &str = "/outpost.fleet.v1.Fleet/Join";

    #[test]
    fn roles_decide() {
        let auth = Auth::new(
            tokens(
                "# builders\nbuilder-token-0001\nreader-token-00001 cache-read\nadmin-token-000001 admin\n",
                "agent-token-000001\n",
            )
            .expect("parse"),
        );
        let ok = |path, token: &str| auth.check(path, Some(&format!("Bearer {token}"))).is_ok();
        assert!(ok(EXECUTE, "builder-token-0001"));
        assert!(ok(AC_WRITE, "builder-token-0001"));
        assert!(
            !ok(JOIN, "builder-token-0001"),
            "a client token cannot join as an agent"
        );
        assert!(!ok(AC_WRITE, "reader-token-00001"));
        assert!(!ok(CAS_WRITE, "reader-token-00001"));
        assert!(ok(CAS_WRITE, "agent-token-000001"));
        assert!(ok(JOIN, "agent-token-000001"));
        assert!(
            !ok(EXECUTE, "agent-token-000001"),
            "an agent token cannot execute"
        );
        assert!(!ok(AC_WRITE, "agent-token-000001"));
        assert!(ok("/api/agents/x/drain", "admin-token-000001"));
        assert!(!ok("/api/agents/x/drain", "builder-token-0001"));
        assert!(matches!(
            auth.check(EXECUTE, None),
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(matches!(
            auth.check(EXECUTE, Some("Bearer nope-nope-nope-nope")),
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(auth.check("/grpc.health.v1.Health/Check", None).is_ok());
        assert!(auth.check("/healthz", None).is_ok());
    }

    #[test]
    fn bad_token_files_name_the_line() {
        let e = tokens("short\n", "").expect_err("short");
        assert!(
            e.to_string()
                .ends_with(":1: a token must be at least 16 characters"),
            "{e}"
        );
        let e = tokens("\nsome-token-000001 builder\n", "").expect_err("role");
        assert!(
            e.to_string().contains(":2: unknown role \"builder\""),
            "{e}"
        );
        let e = tokens("some-token-000001 agent\n", "").expect_err("agent");
        assert!(e.to_string().contains("agent token file"), "{e}");
        let e = tokens("", "agent-token-000001 admin\n").expect_err("extra");
        assert!(e.to_string().contains("one token per line"), "{e}");
    }

    #[tokio::test]
    async fn replacing_tokens_revokes_streams() {
        let auth =
            Auth::new(tokens("", "agent-token-000001\nagent-token-000002\n").expect("parse"));
        let p = auth
            .check(JOIN, Some("Bearer agent-token-000001"))
            .expect("valid");
        let watcher = {
            let auth = auth.clone();
            tokio::spawn(async move { auth.revoked(&p).await })
        };
        auth.replace(tokens("", "agent-token-000001\n").expect("parse"));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!watcher.is_finished(), "its token is still there");
        auth.replace(tokens("", "agent-token-000002\n").expect("parse"));
        tokio::time::timeout(std::time::Duration::from_secs(5), watcher)
            .await
            .expect("revoked")
            .expect("join");
    }
}
