//! Helpers for the agent's and the coordinator's configuration files.

/// The top-level keys whose values differ between two YAML renderings of
/// one configuration type (as `to_yaml` writes them: each key starts an
/// unindented line, its value follows on that line or indented below).
pub fn changed_keys(old: &str, new: &str) -> Vec<String> {
    let (old, new) = (entries(old), entries(new));
    let mut keys: Vec<String> = Vec::new();
    for (key, value) in &new {
        if old.iter().find(|(k, _)| k == key).map(|(_, v)| v) != Some(value) {
            keys.push(key.clone());
        }
    }
    for (key, _) in &old {
        if !new.iter().any(|(k, _)| k == key) {
            keys.push(key.clone());
        }
    }
    keys
}

/// What a configuration reload did with the settings that changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Changed and now in effect.
    pub applied: Vec<String>,
    /// Changed, but in effect only after a restart.
    pub need_restart: Vec<String>,
}

impl Reloaded {
    /// Sorts the keys that differ between two renderings into the
    /// `reloadable` ones and the rest.
    pub fn between(old: &str, new: &str, reloadable: &[&str]) -> Reloaded {
        let (applied, need_restart) = changed_keys(old, new)
            .into_iter()
            .partition(|k| reloadable.contains(&k.as_str()));
        Reloaded {
            applied,
            need_restart,
        }
    }

    /// Whether `key` changed and is now in effect.
    pub fn applied(&self, key: &str) -> bool {
        self.applied.iter().any(|k| k == key)
    }
}

/// (key, value text) per top-level entry.
fn entries(yaml: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in yaml.lines() {
        let top = !line.starts_with([' ', '\t', '-']) && !line.trim().is_empty();
        match (top, line.split_once(':'), out.last_mut()) {
            (true, Some((key, rest)), _) => {
                out.push((key.trim().to_owned(), rest.trim().to_owned()))
            }
            (_, _, Some((_, value))) => {
                value.push('\n');
                value.push_str(line);
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_found_per_key() {
        let old = "log: info\nlabels:\n- a=1\npool: null\nslots: 2\n";
        let new = "log: debug\nlabels:\n- a=1\n- b=2\npool: null\nslots: 2\n";
        assert_eq!(changed_keys(old, new), ["log", "labels"]);
        assert!(changed_keys(old, old).is_empty());
        assert_eq!(changed_keys("a: 1\nb: 2\n", "a: 1\n"), ["b"]);
        let r = Reloaded::between(old, new, &["log"]);
        assert_eq!(
            (r.applied, r.need_restart),
            (vec!["log".into()], vec!["labels".into()])
        );
    }
}
