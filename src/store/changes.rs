//! Which projects changed: PostgreSQL `LISTEN` on the channel the `projects` and
//! `ledger` triggers notify at commit, on dedicated connections (the memo runs one
//! per HTTP worker thread, [`crate::api::memo`]).
//!
//! [`Listener::sync`] is a read barrier: one empty query on the listening connection,
//! shared by every request waiting when it is sent (several may be on their way);
//! its answer wakes only them.
//! PostgreSQL sends a listening session every notification committed before that
//! query started ahead of the query's answer, and they are handed to the callback in
//! the order they arrive, so when `sync` returns `true` every change committed before
//! the call has been seen. A lost connection reports [`Change::Reset`] (changes may
//! have been missed), reconnects with a backoff and reports `Reset` again once it
//! listens.

use futures::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

/// The channel the triggers of migration 0012 notify; the payload is the project.
pub const CHANNEL: &str = "os_credits_project_changed";

/// `application_name` of the listening connection, so operators can tell it apart.
pub const APPLICATION_NAME: &str = "os-credits-listener";

/// Bound of every wait on the listening connection.
const WAIT: Duration = Duration::from_secs(5);
/// An idle listening connection is checked this often, so a dead one is noticed.
const IDLE_CHECK: Duration = Duration::from_secs(30);
/// Read barriers on their way at once (pipelined on the listening connection).
const MAX_BARRIERS_IN_FLIGHT: usize = 8;

/// What the callback hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// This project's balance, ledger or billing state changed.
    Project(&'a str),
    /// Changes may have been missed (not listening, or listening again).
    Reset,
}

/// Called for every change, on the listener's task; must not block.
pub type OnChange = Arc<dyn Fn(Change<'_>) + Send + Sync>;

/// One listening connection and its read barriers (the memo runs one per HTTP worker
/// thread).
pub struct Listener {
    listening: AtomicBool,
    /// The barrier requests wait for now; it is sent once it has a waiter, and a new
    /// one takes its place before it is sent.
    next: Mutex<Arc<Barrier>>,
    /// Woken when the next barrier gets its first waiter.
    wanted: Notify,
}

/// One read barrier and everyone waiting for it: completing it wakes only them.
struct Barrier {
    /// [`PENDING`], [`PASSED`] or [`FAILED`].
    state: AtomicU8,
    /// Whether a request waits for it (so it is worth sending).
    waited: AtomicBool,
    finished: Notify,
}

const PENDING: u8 = 0;
const PASSED: u8 = 1;
const FAILED: u8 = 2;

impl Barrier {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: AtomicU8::new(PENDING),
            waited: AtomicBool::new(false),
            finished: Notify::new(),
        })
    }

    /// Passes or fails the barrier (only the first call counts) and wakes its waiters.
    fn finish(&self, passed: bool) {
        let to = if passed { PASSED } else { FAILED };
        if self
            .state
            .compare_exchange(PENDING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.finished.notify_waiters();
        }
    }

    /// Waits until the barrier is passed (`true`) or failed (`false`).
    async fn passed(&self) -> bool {
        let finished = self.finished.notified();
        tokio::pin!(finished);
        // Registered before the state is read, so a finish in between still wakes it.
        finished.as_mut().enable();
        match self.state.load(Ordering::Acquire) {
            PENDING => {
                finished.await;
                self.state.load(Ordering::Acquire) == PASSED
            }
            state => state == PASSED,
        }
    }
}

/// Marks a listener as not listening, and fails its waiting barrier, when its run
/// ends or is dropped.
struct Stopped<'a>(&'a Listener);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A barrier on its way: failed when dropped unfinished (the session ended).
struct Sent(Arc<Barrier>);

impl Drop for Sent {
    fn drop(&mut self) {
        self.0.finish(false);
    }
}

impl Listener {
    /// A listener that does not listen yet: [`Listener::run`] does.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            listening: AtomicBool::new(false),
            next: Mutex::new(Barrier::new()),
            wanted: Notify::new(),
        })
    }

    fn next(&self) -> std::sync::MutexGuard<'_, Arc<Barrier>> {
        // A poisoned lock only means a panic elsewhere while swapping an Arc.
        self.next.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next barrier, if a request waits for it; a fresh one takes its place.
    fn take_wanted(&self) -> Option<Sent> {
        let mut next = self.next();
        next.waited
            .load(Ordering::Acquire)
            .then(|| Sent(std::mem::replace(&mut *next, Barrier::new())))
    }

    /// Not listening: waiters of the barrier not sent yet give up at once (those on
    /// the way fail when their session drops them).
    fn stop(&self) {
        self.listening.store(false, Ordering::Release);
        drop(self.take_wanted());
    }

    /// Whether the connection listens now.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Waits until every change committed before this call has reached the callback;
    /// `false` when that cannot be known within `deadline` (not listening, the
    /// connection failed, or it is too slow).
    pub async fn sync(&self, deadline: Duration) -> bool {
        if !self.is_listening() {
            return false;
        }
        // Taken before the barrier is sent: the listener swaps in a fresh barrier
        // under the same lock before it sends this one.
        let barrier = self.next().clone();
        if !barrier.waited.swap(true, Ordering::AcqRel) {
            // The first waiter wakes the listener; later ones ride along.
            self.wanted.notify_one();
        }
        matches!(
            tokio::time::timeout(deadline, barrier.passed()).await,
            Ok(true)
        )
    }

    /// Listens until `cancel`, reconnecting with a backoff after a failure (each
    /// failure is logged and counted; meanwhile [`Listener::sync`] says `false`).
    pub async fn run(
        self: Arc<Self>,
        config: tokio_postgres::Config,
        on_change: OnChange,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        // Dropped mid-session too (its runtime ended): nobody waits on it then.
        let _stopped = Stopped(&self);
        let mut delay = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            let result = self.session(&config, &on_change, &cancel, &mut delay).await;
            self.stop();
            on_change(Change::Reset);
            if let Err(e) = result {
                crate::telemetry::metrics::listener_failed();
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "listening for project changes failed; answering from the database until it listens again");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => {}
                }
                delay = (delay * 2).min(WAIT);
            }
        }
        Ok(())
    }

    /// One connection: listen, then answer barriers until cancelled or broken.
    async fn session(
        &self,
        config: &tokio_postgres::Config,
        on_change: &OnChange,
        cancel: &CancellationToken,
        delay: &mut Duration,
    ) -> anyhow::Result<()> {
        use anyhow::Context;
        let (client, mut connection) =
            tokio::time::timeout(WAIT, config.connect(tokio_postgres::NoTls))
                .await
                .context("connecting to listen: timed out")?
                .context("connecting to listen")?;
        let forward = on_change.clone();
        // Notifications are handed over here, before the connection reads further, so
        // they reach the callback before any later query answer reaches its caller.
        let mut driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                if let AsyncMessage::Notification(n) = message? {
                    forward(Change::Project(n.payload()));
                }
            }
            Ok::<(), tokio_postgres::Error>(())
        });
        let result = async {
            tokio::time::timeout(WAIT, client.batch_execute(&format!("LISTEN {CHANNEL}")))
                .await
                .context("LISTEN timed out")?
                .context("LISTEN")?;
            // Anything remembered before may have missed changes.
            on_change(Change::Reset);
            self.listening.store(true, Ordering::Release);
            *delay = Duration::from_millis(100);
            tracing::info!(channel = CHANNEL, "listening for project changes");
            // Barriers are pipelined: a request waits for the first barrier sent after
            // it joined the next one, not for one already on the way to finish first.
            // PostgreSQL hands a listening session its pending notifications before
            // each query's ReadyForQuery, so pipelining keeps the guarantee.
            let mut in_flight = futures::stream::FuturesOrdered::new();
            loop {
                if in_flight.len() < MAX_BARRIERS_IN_FLIGHT {
                    if let Some(sent) = self.take_wanted() {
                        let barrier = tokio::time::timeout(WAIT, client.simple_query(""));
                        in_flight.push_back(async move { (sent, barrier.await) });
                        continue;
                    }
                }
                tokio::select! {
                    Some((sent, answer)) = in_flight.next(), if !in_flight.is_empty() => {
                        answer
                            .context("read barrier timed out")?
                            .context("read barrier")?;
                        sent.0.finish(true);
                    }
                    _ = self.wanted.notified() => {}
                    _ = cancel.cancelled() => return Ok(()),
                    ended = &mut driver => {
                        return match ended {
                            Ok(Err(e)) => Err(anyhow::Error::new(e).context("listening connection")),
                            _ => Err(anyhow::anyhow!("the listening connection closed")),
                        };
                    }
                    _ = tokio::time::sleep(IDLE_CHECK), if in_flight.is_empty() => {
                        tokio::time::timeout(WAIT, client.simple_query(""))
                            .await
                            .context("idle check timed out")?
                            .context("idle check")?;
                    }
                }
            }
        }
        .await;
        driver.abort();
        result
    }
}
