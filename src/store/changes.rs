//! Which projects changed: PostgreSQL `LISTEN` on the channel the `projects` and
//! `ledger` triggers notify at commit, on one dedicated connection per process.
//!
//! [`Listener::sync`] is a read barrier: one empty query on the listening connection,
//! shared by every request waiting when it is sent (several may be on their way).
//! PostgreSQL sends a listening session every notification committed before that
//! query started ahead of the query's answer, and they are handed to the callback in
//! the order they arrive, so when `sync` returns `true` every change committed before
//! the call has been seen. A lost connection reports [`Change::Reset`] (changes may
//! have been missed), reconnects with a backoff and reports `Reset` again once it
//! listens.

use futures::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
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

/// The listening side of one process.
pub struct Listener {
    listening: AtomicBool,
    /// Barrier tickets handed out so far.
    tickets: AtomicU64,
    wanted: Notify,
    /// (session number, highest ticket whose barrier completed in that session).
    done: watch::Sender<(u64, u64)>,
}

impl Listener {
    /// A listener that does not listen yet: [`Listener::run`] does.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            listening: AtomicBool::new(false),
            tickets: AtomicU64::new(0),
            wanted: Notify::new(),
            done: watch::Sender::new((0, 0)),
        })
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
        let session = self.done.borrow().0;
        let ticket = self.tickets.fetch_add(1, Ordering::AcqRel) + 1;
        self.wanted.notify_one();
        let mut done = self.done.subscribe();
        let reached = tokio::time::timeout(
            deadline,
            done.wait_for(|(s, d)| *s != session || *d >= ticket),
        )
        .await;
        matches!(reached, Ok(Ok(seen)) if seen.0 == session)
    }

    /// Listens until `cancel`, reconnecting with a backoff after a failure (each
    /// failure is logged and counted; meanwhile [`Listener::sync`] says `false`).
    pub async fn run(
        self: Arc<Self>,
        config: tokio_postgres::Config,
        on_change: OnChange,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut delay = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            let result = self.session(&config, &on_change, &cancel, &mut delay).await;
            self.listening.store(false, Ordering::Release);
            // Waiters of the ended session give up at once.
            self.done.send_modify(|(session, _)| *session += 1);
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
            // it took its ticket, not for one already on the way to finish first.
            // PostgreSQL hands a listening session its pending notifications before
            // each query's ReadyForQuery, so pipelining keeps the guarantee.
            let mut in_flight = futures::stream::FuturesOrdered::new();
            let mut sent = self.done.borrow().1;
            loop {
                let wanted = self.tickets.load(Ordering::Acquire);
                if wanted > sent && in_flight.len() < MAX_BARRIERS_IN_FLIGHT {
                    sent = wanted;
                    let barrier = tokio::time::timeout(WAIT, client.simple_query(""));
                    in_flight.push_back(async move { (wanted, barrier.await) });
                    continue;
                }
                tokio::select! {
                    Some((covered, answer)) = in_flight.next(), if !in_flight.is_empty() => {
                        answer
                            .context("read barrier timed out")?
                            .context("read barrier")?;
                        self.done.send_modify(|(_, done)| *done = (*done).max(covered));
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
