//! Images: which an action may use, pulled once however many actions
//! want them at once (with the credentials for their registry), the pull's
//! failure told as the action's or the agent's, and the images this agent
//! pulled kept within `docker_image_cache_size`.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bollard::auth::DockerCredentials;
use bollard::errors::Error as EngineError;
use bollard::query_parameters::{CreateImageOptionsBuilder, RemoveImageOptionsBuilder};
use tokio_stream::StreamExt as _;

use crate::config::PullPolicy;
use crate::error::Error;

use super::*;

/// Why an image could not be had: the action's fault (the registry does
/// not know the image or refuses it) or the agent's (the engine or the
/// network failed).
#[derive(Clone, Debug)]
pub(super) struct PullFailure {
    pub(super) action_fault: bool,
    pub(super) message: String,
}

impl PullFailure {
    pub(super) fn error(&self) -> Error {
        if self.action_fault {
            Error::BadInput(self.message.clone())
        } else {
            Error::Retryable(self.message.clone())
        }
    }
}

pub(super) type PullCell = Arc<tokio::sync::OnceCell<Result<(), PullFailure>>>;

/// The backend's images: look-ups and pulls (callers of one image share
/// one pull), for actions and for the pulls at start.
pub(super) struct Images {
    pub(super) engine: bollard::Docker,
    pub(super) long: bollard::Docker,
    pub(super) socket: PathBuf,
    pub(super) pull_policy: PullPolicy,
    /// The file of registry credentials, read at every pull (a rotated
    /// secret is used from the next pull on).
    pub(super) registry_auth: Option<PathBuf>,
    /// Pulls in flight, by image: callers of one image share one pull.
    pub(super) pulls: Mutex<HashMap<String, PullCell>>,
    pub(super) metrics: Metrics,
    /// Bound on the total size of the images this agent pulled; 0: none.
    pub(super) cache_size: u64,
    /// The images this agent pulled, and which are in use.
    pub(super) pulled: Mutex<Pulled>,
    /// Where `pulled` is kept across restarts.
    pub(super) record: PathBuf,
    /// One collection at a time.
    pub(super) collecting: tokio::sync::Mutex<()>,
    /// The last collection stayed past the bound (what it would have
    /// removed was in use): the next image given back collects again.
    pub(super) over: AtomicBool,
}

/// The images this agent pulled, by reference, with when an action last
/// used each (Unix milliseconds).
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Pulled {
    pub(super) images: BTreeMap<String, u64>,
    #[serde(skip)]
    pub(super) in_use: HashMap<String, usize>,
}

pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An action's use of its image: while it lasts, the image is not
/// collected.
pub(super) struct ImageUse {
    pub(super) images: Arc<Images>,
    pub(super) image: String,
}

impl Drop for ImageUse {
    fn drop(&mut self) {
        {
            let mut pulled = self.images.pulled();
            if let Some(n) = pulled.in_use.get_mut(&self.image) {
                *n -= 1;
                if *n == 0 {
                    pulled.in_use.remove(&self.image);
                }
            }
            if let Some(used) = pulled.images.get_mut(&self.image) {
                *used = now_ms();
            }
        }
        if self.images.over.load(Ordering::Relaxed)
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(Arc::clone(&self.images).collect());
        }
    }
}

impl Images {
    /// Makes sure the engine has `image`, pulling it as the policy says;
    /// callers asking for one image at once share one pull.
    pub(super) async fn ensure_image(self: &Arc<Self>, image: &str) -> Result<(), Error> {
        // Under `always`, an image the engine had before is this agent's
        // only if it pulled it then.
        let mut had = false;
        if self.pull_policy == PullPolicy::Always {
            had = self.engine.inspect_image(image).await.is_ok();
        } else {
            match self.engine.inspect_image(image).await {
                Ok(_) => {
                    self.count_pull("hit");
                    return Ok(());
                }
                Err(EngineError::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) => {
                    self.count_pull("failed");
                    return Err(engine_down(
                        &self.socket,
                        &format!("looking up image {image}"),
                        e,
                    ));
                }
            }
            if self.pull_policy == PullPolicy::Never {
                self.count_pull("failed");
                return Err(Error::BadInput(format!(
                    "image {image} is not on this agent and its docker_pull_policy is never; \
                     load the image on the agent's host or name one it has"
                )));
            }
        }
        let cell = {
            let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(pulls.entry(image.to_owned()).or_default())
        };
        let mut pulled_here = false;
        let result = cell
            .get_or_init(|| {
                pulled_here = true;
                self.pull(image, !had)
            })
            .await
            .clone();
        if pulled_here {
            // The next action asking for it looks again (and, under
            // `always`, pulls again).
            let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
            if pulls.get(image).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                pulls.remove(image);
            }
        }
        result.map_err(|f| f.error())
    }

    /// Pulls `image`; `ours`: the engine did not have it, so it counts
    /// among the images this agent pulled.
    pub(super) async fn pull(self: &Arc<Self>, image: &str, ours: bool) -> Result<(), PullFailure> {
        let started = Instant::now();
        let credentials = match &self.registry_auth {
            None => None,
            Some(path) => read_registry_auth(path)
                .map_err(|e| PullFailure {
                    action_fault: false,
                    message: format!("cannot pull image {image}: docker_registry_auth: {e}"),
                })?
                .remove(&registry_of(image)),
        };
        tracing::info!(image, credentials = credentials.is_some(), "pulling image");
        let mut stream = self.long.create_image(
            Some(CreateImageOptionsBuilder::new().from_image(image).build()),
            None,
            credentials,
        );
        let mut failure = None;
        let pulling = async {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(info) => {
                        if let Some(e) = info.error_detail.and_then(|d| d.message) {
                            failure = Some(classify_pull(image, &self.socket, None, &e));
                            break;
                        }
                    }
                    Err(EngineError::DockerResponseServerError {
                        status_code,
                        message,
                    }) => {
                        failure = Some(classify_pull(
                            image,
                            &self.socket,
                            Some(status_code),
                            &message,
                        ));
                        break;
                    }
                    Err(EngineError::DockerStreamError { error }) => {
                        failure = Some(classify_pull(image, &self.socket, None, &error));
                        break;
                    }
                    Err(e) => {
                        failure = Some(PullFailure {
                            action_fault: false,
                            message: engine_down(
                                &self.socket,
                                &format!("pulling image {image}"),
                                e,
                            )
                            .to_string(),
                        });
                        break;
                    }
                }
            }
        };
        if tokio::time::timeout(PULL_TIMEOUT, pulling).await.is_err() {
            failure = Some(PullFailure {
                action_fault: false,
                message: format!(
                    "pulling image {image} through the Docker engine at {} did not finish within {} minutes",
                    self.socket.display(),
                    PULL_TIMEOUT.as_secs() / 60
                ),
            });
        }
        self.metrics
            .pull_seconds
            .inc_by(started.elapsed().as_secs_f64());
        match failure {
            Some(f) => {
                tracing::warn!(image, error = %f.message, "pulling an image failed");
                self.count_pull("failed");
                Err(f)
            }
            None => {
                self.count_pull("miss");
                if ours {
                    self.pulled()
                        .images
                        .entry(image.to_owned())
                        .or_insert_with(now_ms);
                }
                if self.cache_size > 0 {
                    // It saves the record too.
                    tokio::spawn(Arc::clone(self).collect());
                } else if ours {
                    self.save_record();
                }
                Ok(())
            }
        }
    }

    pub(super) fn count_pull(&self, outcome: &'static str) {
        self.metrics
            .pulls
            .get_or_create(&PullLabels { outcome })
            .inc();
    }

    pub(super) fn pulled(&self) -> std::sync::MutexGuard<'_, Pulled> {
        self.pulled.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `image` in use by an action until the returned guard goes.
    pub(super) fn hold(self: &Arc<Self>, image: &str) -> ImageUse {
        let mut pulled = self.pulled();
        *pulled.in_use.entry(image.to_owned()).or_default() += 1;
        if let Some(used) = pulled.images.get_mut(image) {
            *used = now_ms();
        }
        ImageUse {
            images: Arc::clone(self),
            image: image.to_owned(),
        }
    }

    /// The images this agent pulled, as a previous run left them.
    pub(super) fn load_record(path: &Path) -> Pulled {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    "{} is not a record of pulled images ({e}); starting a new one",
                    path.display()
                );
                Pulled::default()
            }),
            Err(_) => Pulled::default(),
        }
    }

    pub(super) fn save_record(&self) {
        let text = {
            let pulled = self.pulled();
            serde_json::to_vec(&*pulled).unwrap_or_default()
        };
        let tmp = self.record.with_extension("json.tmp");
        if let Err(e) =
            std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.record))
        {
            tracing::warn!(
                "cannot keep the record of pulled images in {}: {e}",
                self.record.display()
            );
        }
    }

    pub(super) fn forget(&self, image: &str) {
        self.pulled().images.remove(image);
    }

    /// Keeps the images this agent pulled within `docker_image_cache_size`:
    /// past it, removes those no action is using, least recently used
    /// first. The engine refuses to remove an image any container uses.
    pub(super) async fn collect(self: Arc<Self>) {
        if self.cache_size == 0 {
            return;
        }
        let _one = self.collecting.lock().await;
        let known: Vec<(String, u64)> = self
            .pulled()
            .images
            .iter()
            .map(|(i, u)| (i.clone(), *u))
            .collect();
        let mut sized = Vec::new();
        let mut total = 0u64;
        for (image, used) in known {
            match self.engine.inspect_image(&image).await {
                Ok(found) => {
                    let size = u64::try_from(found.size.unwrap_or(0)).unwrap_or(0);
                    total = total.saturating_add(size);
                    sized.push((image, used, size));
                }
                // Removed by someone else.
                Err(EngineError::DockerResponseServerError {
                    status_code: 404, ..
                }) => self.forget(&image),
                Err(e) => {
                    tracing::warn!(
                        "cannot size image {image} to keep docker_image_cache_size: {e}"
                    );
                    return;
                }
            }
        }
        sized.sort_by_key(|(_, used, _)| *used);
        for (image, _, size) in sized {
            if total <= self.cache_size {
                break;
            }
            if self.pulled().in_use.contains_key(&image) {
                continue;
            }
            match self
                .engine
                .remove_image(
                    &image,
                    Some(RemoveImageOptionsBuilder::new().force(false).build()),
                    None,
                )
                .await
            {
                Ok(_) => {
                    total -= size;
                    self.forget(&image);
                    self.metrics.images_removed.inc();
                    tracing::info!(
                        "removed image {image} ({} MiB), the least recently used of the images \
                         this agent pulled, to keep them within docker_image_cache_size ({} MiB)",
                        size >> 20,
                        self.cache_size >> 20
                    );
                }
                Err(EngineError::DockerResponseServerError {
                    status_code: 404, ..
                }) => {
                    total -= size;
                    self.forget(&image);
                }
                // A container (not an action's) uses it.
                Err(EngineError::DockerResponseServerError {
                    status_code: 409,
                    message,
                }) => tracing::debug!("image {image} is in use: {message}"),
                Err(e) => tracing::warn!("cannot remove image {image}: {e}"),
            }
        }
        self.over.store(total > self.cache_size, Ordering::Relaxed);
        self.save_record();
    }

    /// Pulls `images` (each on its own, so one registry that does not
    /// answer holds up no other), saying in the log how each went.
    pub(super) fn pull_at_start(self: &Arc<Self>, images: Vec<String>) {
        for image in images {
            let images = Arc::clone(self);
            tokio::spawn(async move {
                match images.ensure_image(&image).await {
                    Ok(()) => tracing::info!("image {image} from docker_images_at_start is ready"),
                    Err(e) => tracing::warn!(
                        "image {image} from docker_images_at_start could not be pulled: {e}; \
                         actions that need it try again"
                    ),
                }
            });
        }
    }
}

/// `NAME` means `NAME:latest`, as the engine reads it; pulling a bare name
/// would fetch every tag.
pub(super) fn with_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

/// Whether `text` matches `pattern`, whose `*` stands for any run of
/// characters.
pub(super) fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// The registry an image reference names: its first component when that
/// is a host (it has a `.` or a `:`, or is `localhost`), Docker Hub
/// (`docker.io`) otherwise.
pub(super) fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => {
            registry_key(first)
        }
        _ => "docker.io".to_owned(),
    }
}

/// A registry as `config.json` may name it (`https://index.docker.io/v1/`,
/// `http://host:5000`, `host:5000`), reduced to its host and port.
pub(super) fn registry_key(name: &str) -> String {
    let name = name
        .strip_prefix("https://")
        .or_else(|| name.strip_prefix("http://"))
        .unwrap_or(name);
    let host = name.split('/').next().unwrap_or(name).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        _ => host,
    }
}

/// One registry's entry in Docker's `config.json`: `auth` (base64 of
/// `user:password`), or `username` and `password`, or an `identitytoken`.
#[derive(serde::Deserialize)]
pub(super) struct AuthEntry {
    #[serde(default)]
    pub(super) auth: Option<String>,
    #[serde(default)]
    pub(super) username: Option<String>,
    #[serde(default)]
    pub(super) password: Option<String>,
    #[serde(default)]
    pub(super) identitytoken: Option<String>,
}

#[derive(serde::Deserialize)]
pub(super) struct AuthFile {
    #[serde(default)]
    pub(super) auths: HashMap<String, AuthEntry>,
}

/// Reads a credentials file in Docker's `config.json` format: the
/// credentials of each registry its `auths` names, by registry.
pub(super) fn read_registry_auth(
    path: &Path,
) -> Result<HashMap<String, DockerCredentials>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_registry_auth(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub(super) fn parse_registry_auth(
    text: &str,
) -> Result<HashMap<String, DockerCredentials>, String> {
    use base64::Engine as _;
    let file: AuthFile = serde_json::from_str(text).map_err(|e| {
        format!(
            "not a Docker config.json ({{\"auths\": {{\"REGISTRY\": {{\"auth\": ...}}}}}}): {e}"
        )
    })?;
    let mut out = HashMap::new();
    for (name, entry) in file.auths {
        let registry = registry_key(&name);
        let (username, password) = match (entry.auth, entry.username, entry.password) {
            (Some(auth), _, _) if !auth.is_empty() => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| format!("the auth of {name} is not base64 of USER:PASSWORD"))?;
                let (user, password) = decoded
                    .split_once(':')
                    .ok_or_else(|| format!("the auth of {name} is not base64 of USER:PASSWORD"))?;
                (Some(user.to_owned()), Some(password.to_owned()))
            }
            (_, user, password) => (user, password),
        };
        if username.is_none() && entry.identitytoken.is_none() {
            return Err(format!(
                "{name} has no credentials (auth, username and password, or identitytoken); \
                 credential helpers (credsStore, credHelpers) are not read"
            ));
        }
        out.insert(
            registry.clone(),
            DockerCredentials {
                username,
                password,
                identitytoken: entry.identitytoken,
                serveraddress: Some(registry),
                ..Default::default()
            },
        );
    }
    Ok(out)
}

/// Whose fault a failed pull is, from what the engine said.
pub(super) fn classify_pull(
    image: &str,
    socket: &Path,
    status: Option<u16>,
    said: &str,
) -> PullFailure {
    let lower = said.to_ascii_lowercase();
    let about_the_image = [
        "not found",
        "manifest unknown",
        "unauthorized",
        "denied",
        "does not exist",
        "invalid reference",
        "no such host",
        "repository name must",
        "authentication required",
        "no basic auth credentials",
    ]
    .iter()
    .any(|w| lower.contains(w));
    let action_fault = about_the_image || status.is_some_and(|s| (400..500).contains(&s));
    let unauthorized = [
        "unauthorized",
        "authentication required",
        "no basic auth credentials",
    ]
    .iter()
    .any(|w| lower.contains(w))
        || status == Some(401);
    let message = if unauthorized {
        format!(
            "cannot pull image {image}: unauthorized: the registry wants credentials this agent \
             does not have or refuses the ones it sent (docker_registry_auth): {}",
            said.trim()
        )
    } else if action_fault {
        format!("cannot pull image {image}: {}", said.trim())
    } else {
        format!(
            "cannot pull image {image} through the Docker engine at {}: {}",
            socket.display(),
            said.trim()
        )
    };
    PullFailure {
        action_fault,
        message,
    }
}
