//! The database's view for `/metrics`, read at most once per
//! `METRICS_REFRESH_INTERVAL` and shared by every scrape in between: concurrent
//! scrapers wait for one read instead of each starting their own, so the database
//! work of `/metrics` does not grow with how often it is called.

use super::snapshot::Snapshot;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The last read and when it was made.
type Slot = Option<(Instant, Result<Arc<Snapshot>, String>)>;

/// One shared, periodically refreshed snapshot.
pub struct SharedSnapshot {
    refresh: Duration,
    slot: Mutex<Slot>,
}

impl SharedSnapshot {
    /// Reads again when the last read is `refresh` old (0: at every call, but calls
    /// that arrive while a read runs share it).
    pub fn new(refresh: Duration) -> Self {
        Self {
            refresh,
            slot: Mutex::new(None),
        }
    }

    /// The current snapshot (or why it could not be read), reading it with `read`
    /// only when the last one is too old.
    pub async fn get<F, Fut>(&self, read: F) -> Result<Arc<Snapshot>, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Snapshot, String>>,
    {
        let arrived = Instant::now();
        // Held during the read: others wait for it and take its result.
        let mut slot = self.slot.lock().await;
        if let Some((at, result)) = slot.as_ref() {
            if *at >= arrived || at.elapsed() < self.refresh {
                return result.clone();
            }
        }
        let result = read().await.map(Arc::new);
        *slot = Some((Instant::now(), result.clone()));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn concurrent_and_repeated_calls_share_one_read_per_interval() {
        let shared = Arc::new(SharedSnapshot::new(Duration::from_secs(3600)));
        let reads = Arc::new(AtomicU32::new(0));
        let calls = (0..64).map(|_| {
            let (shared, reads) = (shared.clone(), reads.clone());
            tokio::spawn(async move {
                shared
                    .get(|| async move {
                        reads.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        Ok(Snapshot::default())
                    })
                    .await
            })
        });
        for call in futures::future::join_all(calls).await {
            assert!(call.expect("joined").is_ok());
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_zero_interval_reads_again_for_a_later_call() {
        let shared = SharedSnapshot::new(Duration::ZERO);
        let reads = AtomicU32::new(0);
        for _ in 0..3 {
            let read = || async {
                reads.fetch_add(1, Ordering::SeqCst);
                Ok(Snapshot::default())
            };
            shared.get(read).await.expect("read");
        }
        assert_eq!(reads.load(Ordering::SeqCst), 3);
    }
}
