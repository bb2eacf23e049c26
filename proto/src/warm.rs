//! Warm keys: what an action may share a warm runner or a persistent
//! worker with, computed alike by the coordinator (to route the action to
//! an agent holding one) and the agent (to find it).
//!
//! An action wants warm execution when its platform names a
//! `persistentWorkerKey`, `persistent-workers=true` or
//! `recycle-runner=true` (routing hints, see [`crate::platform::ROUTING`]).
//! Its warm key covers the instance name, the whole platform as the
//! vocabulary reads it (so also the worker key and `runner-recycling-key`)
//! and the client's identity where the coordinator has one (its token), so
//! one client's files and worker state never reach another's actions.

use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::platform::Parsed;
use crate::units::Span;

/// How long the scheduler holds an action for the agent holding its warm
/// key when the action does not say (`runner-recycling-max-wait`).
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(3);

/// A yes/no routing hint.
fn yes(parsed: &Parsed, name: &str) -> bool {
    parsed
        .get(name)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Whether the action asks for a persistent worker.
pub fn wants_worker(parsed: &Parsed) -> bool {
    parsed
        .get("persistentWorkerKey")
        .is_some_and(|k| !k.trim().is_empty())
        || yes(parsed, "persistent-workers")
}

/// Whether the action asks for a recycled runner.
pub fn wants_recycling(parsed: &Parsed) -> bool {
    yes(parsed, "recycle-runner")
}

/// The action's warm key, when it wants warm execution; `client` is the
/// caller's identity ("" when the coordinator has no tokens).
pub fn warm_key(instance: &str, parsed: &Parsed, client: &str) -> Option<String> {
    if !wants_worker(parsed) && !wants_recycling(parsed) {
        return None;
    }
    let mut properties: Vec<(&str, &str)> = parsed
        .properties
        .iter()
        // How long to wait for a warm agent is no part of what it holds.
        .filter(|p| p.name != "runner-recycling-max-wait")
        .map(|p| (p.name.as_str(), p.value.as_str()))
        .collect();
    properties.sort_unstable();
    let fields = ["outpost-warm-key-v1", instance, client]
        .into_iter()
        .chain(properties.into_iter().flat_map(|(n, v)| [n, v]));
    Some(fingerprint(fields))
}

/// A short hash (32 hex digits) of `fields`, each length-prefixed so no
/// two different lists of fields hash alike by running together.
pub fn fingerprint<'a>(fields: impl IntoIterator<Item = &'a str>) -> String {
    let mut hash = Sha256::new();
    for field in fields {
        hash.update((field.len() as u64).to_le_bytes());
        hash.update(field.as_bytes());
    }
    hex::encode(&hash.finalize()[..16])
}

/// How long the action may wait for the agent holding its warm key
/// (`runner-recycling-max-wait`, e.g. `5s` or `250ms`); `default` when it
/// does not say, and an error naming the value when it cannot be read.
pub fn max_wait(parsed: &Parsed, default: Duration) -> Result<Duration, String> {
    match parsed.get("runner-recycling-max-wait").map(str::trim) {
        None | Some("") => Ok(default),
        Some(v) => v
            .parse::<Span>()
            .map(|s| s.0)
            .map_err(|e| format!("platform property runner-recycling-max-wait: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::{from_pairs, parse};

    fn key(instance: &str, pairs: &[(&str, &str)], client: &str) -> Option<String> {
        warm_key(
            instance,
            &parse(&from_pairs(pairs)).expect("parses"),
            client,
        )
    }

    #[test]
    fn only_warm_actions_have_a_key_and_it_covers_what_it_must() {
        assert_eq!(key("", &[("OSFamily", "linux")], ""), None);
        assert_eq!(key("", &[("persistent-workers", "false")], ""), None);
        let worker = &[("persistentWorkerKey", "javac"), ("OSFamily", "Linux")][..];
        let base = key("", worker, "").expect("a worker action");
        assert_eq!(base.len(), 32);
        // Names and values as the vocabulary reads them; order does not count.
        assert_eq!(
            key(
                "",
                &[("osfamily", "linux"), ("persistentWorkerKey", "javac")],
                ""
            ),
            Some(base.clone())
        );
        let waiting = [worker, &[("runner-recycling-max-wait", "9s")]].concat();
        assert_eq!(key("", &waiting, ""), Some(base.clone()));
        for other in [
            key("other", worker, ""),
            key("", worker, "client-b"),
            key(
                "",
                &[("persistentWorkerKey", "scalac"), ("OSFamily", "linux")],
                "",
            ),
            key(
                "",
                &[("persistentWorkerKey", "javac"), ("OSFamily", "darwin")],
                "",
            ),
        ] {
            assert_ne!(other.expect("warm"), base);
        }
        assert!(key("", &[("recycle-runner", "True")], "").is_some());
        assert!(key("", &[("persistent-workers", "true")], "").is_some());
    }

    #[test]
    fn the_wait_is_read_or_defaulted() {
        let wait = |pairs: &[(&str, &str)]| {
            max_wait(
                &parse(&from_pairs(pairs)).expect("parses"),
                DEFAULT_MAX_WAIT,
            )
        };
        assert_eq!(wait(&[]), Ok(DEFAULT_MAX_WAIT));
        assert_eq!(
            wait(&[("runner-recycling-max-wait", "250ms")]),
            Ok(Duration::from_millis(250))
        );
        let err = wait(&[("runner-recycling-max-wait", "soon")]).expect_err("bad");
        assert!(err.contains("runner-recycling-max-wait"), "{err}");
    }
}
