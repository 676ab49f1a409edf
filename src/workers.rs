//! Supervised background workers: every loop of the service (scraping, billing,
//! grant sync, notification sending, maintenance) runs its step through
//! [`Workers::spawn`], so no panic or error ends it for good.
//!
//! A step runs in a task of its own, so a panic surfaces as that task's `JoinError`
//! instead of unwinding the loop. A failed or panicking step is logged with its
//! cause, counted (`os_credits_worker_failures_total{worker,kind}`), and tried again
//! after a capped exponential backoff; a successful one is followed by the worker's
//! interval. A shared [`Workers`] registry keeps each worker's state, last success,
//! last error and consecutive failures for `/health` and `/metrics`.

use chrono::{DateTime, Utc};
use metrics::{counter, gauge};
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What a worker is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Waiting for its next step after a success (or before its first).
    Idle,
    /// A step is running.
    Running,
    /// Waiting to retry after a failed step.
    Backoff,
    /// Stopped (shutdown).
    Stopped,
}

/// One worker as `/health` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    /// What it is doing now.
    pub state: WorkerState,
    /// When it was started (the reference for "no success yet").
    pub started_at: DateTime<Utc>,
    /// Time between two successful steps.
    pub interval_seconds: f64,
    /// When a step last succeeded.
    pub last_success_at: Option<DateTime<Utc>>,
    /// When a step last failed.
    pub last_failure_at: Option<DateTime<Utc>>,
    /// Why it last failed (kept after a later success, for the record).
    pub last_error: Option<String>,
    /// Failed steps since the last success (0: healthy).
    pub consecutive_failures: u32,
    /// Failed steps since the start.
    pub failures_total: u64,
}

impl WorkerStatus {
    /// When the worker last succeeded, or when it started if it never did: the time
    /// from which "has not completed for …" is measured.
    pub fn last_progress_at(&self) -> DateTime<Utc> {
        self.last_success_at.unwrap_or(self.started_at)
    }
}

/// How long to wait after failures: `initial`, doubling per consecutive failure, at
/// most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure.
    pub initial: Duration,
    /// The cap.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The wait after `failures` consecutive failures (1 = the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        self.initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// The shared registry of workers; cheap to clone (all clones see the same workers).
#[derive(Clone, Default)]
pub struct Workers {
    inner: Arc<Mutex<BTreeMap<String, WorkerStatus>>>,
}

impl Workers {
    /// A registry without workers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every worker's status, by name.
    pub fn snapshot(&self) -> BTreeMap<String, WorkerStatus> {
        self.lock().clone()
    }

    /// One worker's status.
    pub fn get(&self, name: &str) -> Option<WorkerStatus> {
        self.lock().get(name).cloned()
    }

    /// Runs `step` under supervision until `cancel` fires: at once, then `interval`
    /// after each success (measured from the step's start, as a ticker would), or
    /// after `backoff.delay(n)` following the n-th consecutive failure. A panic or an
    /// `Err` of the step is logged with its cause and counted; the loop goes on.
    /// A step in progress when `cancel` fires is finished (steps that should stop
    /// sooner watch the token themselves); aborting the returned handle aborts the
    /// running step too.
    pub fn spawn<F, Fut>(
        &self,
        name: impl Into<String>,
        interval: Duration,
        backoff: Backoff,
        cancel: CancellationToken,
        step: F,
    ) -> JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let name = name.into();
        self.lock().insert(
            name.clone(),
            WorkerStatus {
                state: WorkerState::Idle,
                started_at: Utc::now(),
                interval_seconds: interval.as_secs_f64(),
                last_success_at: None,
                last_failure_at: None,
                last_error: None,
                consecutive_failures: 0,
                failures_total: 0,
            },
        );
        tokio::spawn(
            self.clone()
                .supervise(name, interval, backoff, cancel, step),
        )
    }

    async fn supervise<F, Fut>(
        self,
        name: String,
        interval: Duration,
        backoff: Backoff,
        cancel: CancellationToken,
        mut step: F,
    ) where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            let started = tokio::time::Instant::now();
            self.update(&name, |s| s.state = WorkerState::Running);
            // A task of its own: a panic ends that task, not this loop. The guard
            // aborts it if this loop is aborted (shutdown after the grace period).
            let mut task = AbortOnDrop(tokio::spawn(step()));
            let outcome = match (&mut task.0).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(("error", format!("{e:#}"))),
                Err(e) if e.is_panic() => Err(("panic", panic_message(e.into_panic()))),
                Err(e) => Err(("cancelled", e.to_string())),
            };
            wait = match outcome {
                Ok(()) => {
                    let now = Utc::now();
                    self.update(&name, |s| {
                        s.state = WorkerState::Idle;
                        s.last_success_at = Some(now);
                        s.consecutive_failures = 0;
                    });
                    gauge!("os_credits_worker_last_success_timestamp_seconds", "worker" => name.clone())
                        .set(now.timestamp_millis() as f64 / 1000.0);
                    gauge!("os_credits_worker_consecutive_failures", "worker" => name.clone())
                        .set(0.0);
                    interval.saturating_sub(started.elapsed())
                }
                Err((kind, cause)) => {
                    let mut failures = 0;
                    self.update(&name, |s| {
                        s.state = WorkerState::Backoff;
                        s.last_failure_at = Some(Utc::now());
                        s.last_error = Some(format!("{kind}: {cause}"));
                        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                        s.failures_total = s.failures_total.saturating_add(1);
                        failures = s.consecutive_failures;
                    });
                    let delay = backoff.delay(failures);
                    tracing::error!(worker = %name, kind, error = %cause, consecutive_failures = failures, retry_in = ?delay, "worker step failed; retrying after a backoff");
                    counter!("os_credits_worker_failures_total", "worker" => name.clone(), "kind" => kind)
                        .increment(1);
                    gauge!("os_credits_worker_consecutive_failures", "worker" => name.clone())
                        .set(f64::from(failures));
                    delay
                }
            };
        }
        self.update(&name, |s| s.state = WorkerState::Stopped);
        tracing::info!(worker = %name, "worker stopped");
    }

    fn update(&self, name: &str, change: impl FnOnce(&mut WorkerStatus)) {
        if let Some(status) = self.lock().get_mut(name) {
            change(status);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, WorkerStatus>> {
        // Plain values, updated in one statement each: a panic cannot leave them torn.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The message of a panic payload (`panic!` with a literal or a formatted string).
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-text payload".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let backoff = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
        };
        let delays: Vec<u64> = (1..=6).map(|n| backoff.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_panicking_or_failing_step_is_recorded_and_the_loop_goes_on() {
        let workers = Workers::new();
        let cancel = CancellationToken::new();
        let calls = Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let backoff = Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(5),
        };
        let handle = workers.spawn(
            "test",
            Duration::from_millis(1),
            backoff,
            cancel.clone(),
            move || {
                let call = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    match call {
                        0 => panic!("step {call} overflowed"),
                        1 => anyhow::bail!("step {call} failed"),
                        _ => Ok(()),
                    }
                }
            },
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            let status = workers.get("test").expect("registered");
            if status.last_success_at.is_some() {
                break status;
            }
            assert!(tokio::time::Instant::now() < deadline, "{status:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(status.failures_total, 2, "{status:?}");
        assert_eq!(status.consecutive_failures, 0, "{status:?}");
        assert_eq!(
            status.last_error.as_deref(),
            Some("error: step 1 failed"),
            "{status:?}"
        );
        cancel.cancel();
        handle.await.expect("the supervisor ends");
        assert_eq!(
            workers.get("test").map(|s| s.state),
            Some(WorkerState::Stopped)
        );
    }
}
