//! Per-key serialisation: at most one task at a time works on a given pod.
//!
//! Every path that changes a pod's enrollment (the Kubernetes watch, CNI ADD and DEL,
//! startup adoption, ztunnel's snapshot answers, background repairs) passes through
//! the pod's gate, so two of them can never interleave their rules, ZDS and annotation
//! steps. A gate is an async mutex held across the whole step on purpose: the step is
//! the critical section. Gates are created on demand and dropped when nobody holds or
//! waits for them, so the map only ever holds pods being worked on.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

pub struct Gates<K> {
    gates: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K> Default for Gates<K> {
    fn default() -> Self {
        Gates {
            gates: Mutex::new(HashMap::new()),
        }
    }
}

/// Holding this is having the key to oneself.
pub struct Guard<'a, K: Eq + Hash + Clone> {
    gates: &'a Gates<K>,
    key: K,
    held: Option<OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone> Gates<K> {
    /// Waits until no one else holds `key`'s gate, then holds it.
    pub async fn enter(&self, key: &K) -> Guard<'_, K> {
        let gate = self
            .gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        Guard {
            gates: self,
            key: key.clone(),
            held: Some(gate.lock_owned().await),
        }
    }

    /// Number of keys currently held or waited for.
    pub fn len(&self) -> usize {
        self.gates.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Eq + Hash + Clone> Drop for Guard<'_, K> {
    fn drop(&mut self) {
        drop(self.held.take());
        let mut gates = self.gates.gates.lock().unwrap_or_else(|p| p.into_inner());
        // Waiters clone the gate under this same lock, so a count of one (the map's own)
        // means no one is waiting.
        if gates
            .get(&self.key)
            .is_some_and(|g| Arc::strong_count(g) == 1)
        {
            gates.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_holder_per_key_others_run_freely_and_the_map_empties() {
        let gates = Arc::new(Gates::<&'static str>::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (gates, inside, max) = (gates.clone(), inside.clone(), max.clone());
                tokio::spawn(async move {
                    let _g = gates.enter(&"pod").await;
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        // Another key is not held up by "pod".
        let other = tokio::time::timeout(Duration::from_millis(500), gates.enter(&"other")).await;
        assert!(other.is_ok());
        drop(other);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(max.load(Ordering::SeqCst), 1, "two holders at once");
        assert!(gates.is_empty(), "gates left behind: {}", gates.len());
    }
}
