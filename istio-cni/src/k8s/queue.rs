//! The reconcile work queue: keys (pods) waiting to be reconciled, each at most once in
//! the queue, never handed to two workers at once, and retried with per-key
//! exponential backoff when reconciling fails: a transient failure is retried, never
//! dropped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

struct Inner<K> {
    ready: VecDeque<K>,
    queued: HashSet<K>,
    in_flight: HashSet<K>,
    /// Added again while in flight: reconcile once more when done.
    dirty: HashSet<K>,
    failures: HashMap<K, u32>,
}

pub struct WorkQueue<K> {
    inner: Mutex<Inner<K>>,
    notify: Notify,
    first_retry: Duration,
    max_retry: Duration,
}

impl<K: Clone + Eq + Hash + Send + 'static> WorkQueue<K> {
    pub fn new(first_retry: Duration, max_retry: Duration) -> Arc<Self> {
        Arc::new(WorkQueue {
            inner: Mutex::new(Inner {
                ready: VecDeque::new(),
                queued: HashSet::new(),
                in_flight: HashSet::new(),
                dirty: HashSet::new(),
                failures: HashMap::new(),
            }),
            notify: Notify::new(),
            first_retry,
            max_retry,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `key` unless it is queued already.
    pub fn add(&self, key: K) {
        let mut q = self.lock();
        if q.in_flight.contains(&key) {
            q.dirty.insert(key);
        } else if q.queued.insert(key.clone()) {
            q.ready.push_back(key);
            drop(q);
            self.notify.notify_one();
        }
    }

    /// Queues `key` after `delay`.
    pub fn add_after(self: &Arc<Self>, key: K, delay: Duration) {
        let queue = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(q) = queue.upgrade() {
                q.add(key);
            }
        });
    }

    /// The next key to reconcile; the caller must call [`done`](Self::done) with it.
    pub async fn next(&self) -> K {
        loop {
            {
                let mut q = self.lock();
                if let Some(key) = q.ready.pop_front() {
                    q.queued.remove(&key);
                    q.in_flight.insert(key.clone());
                    return key;
                }
            }
            self.notify.notified().await;
        }
    }

    /// Reports how reconciling `key` went. A failure queues it again after a backoff
    /// that doubles with each consecutive failure; a success resets that.
    pub fn done(self: &Arc<Self>, key: K, ok: bool) {
        let mut q = self.lock();
        q.in_flight.remove(&key);
        let again = q.dirty.remove(&key);
        let retry = if ok {
            q.failures.remove(&key);
            None
        } else {
            let n = q.failures.entry(key.clone()).or_insert(0);
            *n += 1;
            let factor = 1u32 << (*n - 1).min(16);
            Some(self.first_retry.saturating_mul(factor).min(self.max_retry))
        };
        drop(q);
        match (again, retry) {
            (true, _) => self.add(key),
            (false, Some(delay)) => self.add_after(key, delay),
            (false, None) => {}
        }
    }

    /// Consecutive failures of `key`.
    pub fn failures(&self, key: &K) -> u32 {
        self.lock().failures.get(key).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> Arc<WorkQueue<&'static str>> {
        WorkQueue::new(Duration::from_millis(20), Duration::from_millis(100))
    }

    async fn next_within(q: &WorkQueue<&'static str>, ms: u64) -> Option<&'static str> {
        tokio::time::timeout(Duration::from_millis(ms), q.next())
            .await
            .ok()
    }

    #[tokio::test]
    async fn a_key_is_queued_once() {
        let q = queue();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(next_within(&q, 50).await, Some("a"));
        assert_eq!(next_within(&q, 50).await, Some("b"));
        assert_eq!(next_within(&q, 50).await, None);
    }

    #[tokio::test]
    async fn a_key_changed_while_in_flight_is_reconciled_again_after() {
        let q = queue();
        q.add("a");
        let k = q.next().await;
        q.add("a");
        assert_eq!(
            next_within(&q, 30).await,
            None,
            "never to two workers at once"
        );
        q.done(k, true);
        assert_eq!(next_within(&q, 50).await, Some("a"));
    }

    #[tokio::test]
    async fn failures_are_retried_with_growing_backoff_and_success_resets() {
        let q = queue();
        q.add("a");
        let k = q.next().await;
        q.done(k, false);
        assert_eq!(q.failures(&"a"), 1);
        assert_eq!(next_within(&q, 5).await, None, "not before the backoff");
        let k = next_within(&q, 200).await.expect("retried");
        q.done(k, false);
        assert_eq!(q.failures(&"a"), 2);
        let k = next_within(&q, 300).await.expect("retried again");
        q.done(k, true);
        assert_eq!(q.failures(&"a"), 0);
        assert_eq!(next_within(&q, 150).await, None);
    }
}
