//! Which blobs must not be evicted right now: those being read and those
//! pinned for queued or running actions. Eviction marks its victims first, so
//! a reader that arrives while a blob is going away sees it as absent.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use outpost_proto::digest::Digest;

#[derive(Default)]
pub struct InUse {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    users: HashMap<Digest, u32>,
    evicting: HashSet<Digest>,
}

/// Holds its digests in use until dropped.
pub struct Guard {
    owner: Arc<InUse>,
    digests: Vec<Digest>,
}

impl InUse {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves only counters behind, which
        // stay consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks one blob as being read; `None` if it is being evicted.
    pub fn try_use(self: &Arc<Self>, digest: Digest) -> Option<Guard> {
        let mut state = self.lock();
        if state.evicting.contains(&digest) {
            return None;
        }
        *state.users.entry(digest).or_default() += 1;
        Some(Guard {
            owner: Arc::clone(self),
            digests: vec![digest],
        })
    }

    /// Pins blobs (present or not yet uploaded) against eviction.
    pub fn pin(self: &Arc<Self>, digests: &[Digest]) -> Guard {
        let mut state = self.lock();
        for d in digests {
            *state.users.entry(*d).or_default() += 1;
        }
        Guard {
            owner: Arc::clone(self),
            digests: digests.to_vec(),
        }
    }

    /// Which of `digests` are being evicted right now (a pin taken now
    /// does not save them).
    pub fn evicting_among(&self, digests: &[Digest]) -> Vec<Digest> {
        let state = self.lock();
        if state.evicting.is_empty() {
            return Vec::new();
        }
        digests
            .iter()
            .filter(|d| state.evicting.contains(d))
            .copied()
            .collect()
    }

    /// Whether a blob is read or pinned right now (a hint: it may change
    /// before [`InUse::claim_for_eviction`] decides).
    pub fn is_used(&self, digest: &Digest) -> bool {
        self.lock().users.contains_key(digest)
    }

    /// Of `candidates`, claims for eviction those nobody uses.
    pub fn claim_for_eviction(&self, candidates: Vec<Digest>) -> Vec<Digest> {
        let mut state = self.lock();
        let claimed: Vec<Digest> = candidates
            .into_iter()
            .filter(|d| !state.users.contains_key(d))
            .collect();
        state.evicting.extend(claimed.iter().copied());
        claimed
    }

    pub fn finish_eviction(&self, digests: &[Digest]) {
        let mut state = self.lock();
        for d in digests {
            state.evicting.remove(d);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut state = self.owner.lock();
        for d in &self.digests {
            if let Some(n) = state.users.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    state.users.remove(d);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::digest::Function;

    #[test]
    fn used_and_pinned_blobs_are_not_claimed() {
        let in_use = Arc::new(InUse::default());
        let a = Function::Sha256.digest_of(b"a");
        let b = Function::Sha256.digest_of(b"b");
        let c = Function::Sha256.digest_of(b"c");
        let read = in_use.try_use(a).expect("not evicting");
        let pin = in_use.pin(&[b, b]);
        assert_eq!(in_use.claim_for_eviction(vec![a, b, c]), vec![c]);
        assert!(in_use.try_use(c).is_none(), "c is being evicted");
        in_use.finish_eviction(&[c]);
        assert!(in_use.try_use(c).is_some());
        drop(read);
        drop(pin);
        assert_eq!(in_use.claim_for_eviction(vec![a, b]), vec![a, b]);
    }
}
