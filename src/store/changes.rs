//! Which projects changed: PostgreSQL `LISTEN` on the channel the `projects` and
//! `ledger` triggers notify at commit, on dedicated connections (the memo runs one
//! per HTTP worker thread, [`crate::api::memo`]), and the commit fences that let a
//! replica answer from memory without asking the database first.
//!
//! **Leases.** A listening connection registers itself in `change_listeners`
//! (migration 0018) and holds an advisory lock for as long as its session lives.
//! It renews a lease with a read barrier every [`RENEW_EVERY`]: one empty query,
//! whose answer comes after every notification committed before it was sent. While
//! the lease holds ([`LEASE`] after the send of the last barrier that passed, and
//! only while registered and listening), [`Listener::leased`] says so and readers
//! answer from memory at once.
//!
//! **Fences.** A writer, after its commit, calls [`fence`]: it tells every listener
//! (`NOTIFY os_credits_fence`) and reads which ones are registered, in one
//! statement; each listener answers (`os_credits_fence_ack`) once it has applied
//! every notification before the fence (they arrive in commit order). The writer
//! returns when every registered listener has answered, or after [`FENCE_WAIT`]
//! (≥ [`LEASE`] and a margin): by then a listener that did not answer has seen its
//! lease run out, so it asks the database again. A listener whose session ended
//! without unregistering is waited out the same way. So once a write through any
//! replica has returned, every replica answers it. A write made outside the service
//! (psql) without a fence is seen as soon as its notification arrives, and never
//! later than [`LEASE`] after its commit.
//!
//! [`Listener::sync`] is the read barrier a reader waits for when the lease does not
//! hold: shared by every request waiting when it is sent (several may be on their
//! way); its answer wakes only them. A lost connection reports [`Change::Reset`]
//! (changes may have been missed), reconnects with a backoff and reports `Reset`
//! again once it listens.

use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

/// The channel the triggers of migration 0012 notify; the payload is the project.
pub const CHANNEL: &str = "os_credits_project_changed";

/// The channel a writer's fence is sent on; the payload is its token.
pub const FENCE_CHANNEL: &str = "os_credits_fence";

/// The channel listeners answer fences on; the payload is `<token> <key>`.
pub const ACK_CHANNEL: &str = "os_credits_fence_ack";

/// How long after a passed barrier was sent a listener answers from memory without
/// asking the database.
pub const LEASE: Duration = Duration::from_secs(2);

/// How often a listener renews its lease.
pub const RENEW_EVERY: Duration = Duration::from_millis(500);

/// The longest a writer's fence waits for listeners' answers: a lease and a margin,
/// so a listener that did not answer in time no longer answers from memory.
pub const FENCE_WAIT: Duration = Duration::from_secs(3);

/// `application_name` of the listening connection, so operators can tell it apart.
pub const APPLICATION_NAME: &str = "os-credits-listener";

/// Bound of every wait on the listening connection.
const WAIT: Duration = Duration::from_secs(5);
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
    /// Until when (nanoseconds after [`ORIGIN`]) memory may answer without a barrier;
    /// 0 for not at all.
    lease_until: AtomicU64,
    /// This listener's key in `change_listeners` (0 before it first registered).
    key: AtomicI32,
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
            lease_until: AtomicU64::new(0),
            key: AtomicI32::new(0),
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
        self.lease_until.store(0, Ordering::Release);
        drop(self.take_wanted());
    }

    /// Whether the connection listens now.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Whether memory may answer now without a barrier: listening, registered, and
    /// within the lease of the last barrier that passed.
    pub fn leased(&self) -> bool {
        self.is_listening()
            && since_origin(Instant::now()) < self.lease_until.load(Ordering::Acquire)
    }

    /// A barrier sent at `sent` passed: the lease runs until `sent` + [`LEASE`].
    fn renew(&self, sent: Instant) {
        if self.is_listening() {
            self.lease_until
                .fetch_max(since_origin(sent + LEASE), Ordering::AcqRel);
        }
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

    /// One connection: listen and register, then answer barriers and fences and renew
    /// the lease until cancelled or broken.
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
        let (fences, mut fenced) = tokio::sync::mpsc::unbounded_channel::<String>();
        // Notifications are handed over here, before the connection reads further, so
        // they reach the callback before any later query answer reaches its caller,
        // and before a later fence is answered.
        let mut driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                if let AsyncMessage::Notification(n) = message? {
                    match n.channel() {
                        FENCE_CHANNEL => {
                            // The session is gone when nobody receives: the loop ends.
                            let _ = fences.send(n.payload().to_owned());
                        }
                        ACK_CHANNEL => acknowledged(n.payload()),
                        _ => forward(Change::Project(n.payload())),
                    }
                }
            }
            Ok::<(), tokio_postgres::Error>(())
        });
        let result = async {
            tokio::time::timeout(
                WAIT,
                client.batch_execute(&format!(
                    "LISTEN {CHANNEL}; LISTEN {FENCE_CHANNEL}; LISTEN {ACK_CHANNEL}"
                )),
            )
            .await
            .context("LISTEN timed out")?
            .context("LISTEN")?;
            // Registered only once it listens: a fence that finds it registered
            // reaches it. Its previous registration (its lease ended with `stop`) goes.
            let previous = self.key.load(Ordering::Acquire);
            let key: i32 = tokio::time::timeout(
                WAIT,
                client.query_one("SELECT register_change_listener($1)", &[&previous]),
            )
            .await
            .context("registering the listener timed out")?
            .context("registering the listener")?
            .try_get(0)
            .context("registering the listener")?;
            self.key.store(key, Ordering::Release);
            let ack = tokio::time::timeout(
                WAIT,
                client.prepare(&format!(
                    "SELECT pg_notify('{ACK_CHANNEL}', t || ' ' || $2::text) FROM unnest($1::text[]) t"
                )),
            )
            .await
            .context("preparing fence answers timed out")?
            .context("preparing fence answers")?;
            let key_text = key.to_string();
            // Anything remembered before may have missed changes. No lease yet:
            // `stop` ended the last one, and the first barrier starts the next.
            on_change(Change::Reset);
            self.listening.store(true, Ordering::Release);
            *delay = Duration::from_millis(100);
            tracing::info!(channel = CHANNEL, key, "listening for project changes");
            // Barriers are pipelined: a request waits for the first barrier sent after
            // it joined the next one, not for one already on the way to finish first.
            // PostgreSQL hands a listening session its pending notifications before
            // each query's ReadyForQuery, so pipelining keeps the guarantee. Each
            // passed barrier renews the lease from the instant before it was sent.
            let mut in_flight = futures::stream::FuturesOrdered::new();
            let mut renew = tokio::time::interval(RENEW_EVERY);
            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut renewal_due = false;
            // Fence tokens to answer, and the one answer on its way.
            let mut to_answer: Vec<String> = Vec::new();
            let mut answering = futures::stream::FuturesUnordered::new();
            loop {
                if in_flight.len() < MAX_BARRIERS_IN_FLIGHT {
                    let sent = self.take_wanted().or_else(|| {
                        std::mem::take(&mut renewal_due).then(|| Sent(Barrier::new()))
                    });
                    if let Some(sent) = sent {
                        let at = Instant::now();
                        let barrier = tokio::time::timeout(WAIT, client.simple_query(""));
                        in_flight.push_back(async move { (sent, at, barrier.await) });
                        continue;
                    }
                }
                if answering.is_empty() && !to_answer.is_empty() {
                    let tokens = std::mem::take(&mut to_answer);
                    let (ack, key_text) = (&ack, &key_text);
                    let client = &client;
                    answering.push(async move {
                        tokio::time::timeout(WAIT, client.execute(ack, &[&tokens, key_text])).await
                    });
                    continue;
                }
                tokio::select! {
                    Some((sent, at, answer)) = in_flight.next(), if !in_flight.is_empty() => {
                        answer
                            .context("read barrier timed out")?
                            .context("read barrier")?;
                        self.renew(at);
                        sent.0.finish(true);
                    }
                    Some(answered) = answering.next(), if !answering.is_empty() => {
                        answered
                            .context("answering a fence timed out")?
                            .context("answering a fence")?;
                    }
                    Some(token) = fenced.recv() => {
                        to_answer.push(token);
                        while let Ok(token) = fenced.try_recv() {
                            to_answer.push(token);
                        }
                    }
                    _ = renew.tick() => renewal_due = true,
                    _ = self.wanted.notified() => {}
                    _ = cancel.cancelled() => {
                        // No longer answering from memory before the registration
                        // goes, so no fence needs this listener any more.
                        self.stop();
                        let _ = tokio::time::timeout(
                            WAIT,
                            client.execute("SELECT unregister_change_listener($1)", &[&key]),
                        )
                        .await;
                        return Ok(());
                    }
                    ended = &mut driver => {
                        return match ended {
                            Ok(Err(e)) => Err(anyhow::Error::new(e).context("listening connection")),
                            _ => Err(anyhow::anyhow!("the listening connection closed")),
                        };
                    }
                }
            }
        }
        .await;
        driver.abort();
        result
    }
}

/// Where [`Listener::lease_until`] counts from.
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds from [`ORIGIN`] to `at` (0 before it).
fn since_origin(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*ORIGIN).as_nanos()).unwrap_or(u64::MAX)
}

/// The fences of this process waiting for answers, by token.
static AWAITED: LazyLock<Mutex<HashMap<String, Arc<Awaited>>>> = LazyLock::new(Mutex::default);

/// The listener keys that answered one fence so far.
#[derive(Default)]
struct Awaited {
    answered: Mutex<HashSet<i32>>,
    arrived: Notify,
}

fn awaited() -> std::sync::MutexGuard<'static, HashMap<String, Arc<Awaited>>> {
    // A poisoned lock only means a panic elsewhere while changing a plain map.
    AWAITED.lock().unwrap_or_else(|p| p.into_inner())
}

/// A listener answered a fence (`<token> <key>`); fences of other processes and
/// malformed payloads are ignored.
fn acknowledged(payload: &str) {
    let Some((token, key)) = payload.split_once(' ') else {
        return;
    };
    let Ok(key) = key.parse::<i32>() else {
        return;
    };
    let Some(fence) = awaited().get(token).cloned() else {
        return;
    };
    fence
        .answered
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key);
    fence.arrived.notify_waiters();
}

/// Removes a fence from [`AWAITED`] when it ends, however it ends.
struct Waiting(String);

impl Drop for Waiting {
    fn drop(&mut self) {
        awaited().remove(&self.0);
    }
}

/// A token no other fence uses: this process's random part and a counter.
fn token() -> String {
    use std::hash::BuildHasher;
    static PROCESS: LazyLock<u64> = LazyLock::new(|| {
        std::collections::hash_map::RandomState::new()
            .hash_one((std::process::id(), Instant::now()))
    });
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{:016x}.{}", *PROCESS, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// How a fence ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fenced {
    /// Every registered listener answered: every replica has applied the write.
    Answered {
        /// How many listeners answered.
        listeners: usize,
    },
    /// Some did not answer within [`FENCE_WAIT`]; their leases have run out.
    TimedOut {
        /// The keys of the listeners that did not answer.
        missing: Vec<i32>,
    },
    /// The fence could not be sent; [`FENCE_WAIT`] was waited out instead.
    Failed,
}

/// Called by a writer after its commit, on a connection outside any transaction:
/// returns once every replica answers what was committed before (see the module
/// comment). Never fails and never waits longer than [`FENCE_WAIT`] (plus the
/// statement's own bound): a fence that could not be sent waits the leases out.
pub async fn fence(client: &tokio_postgres::Client) -> Fenced {
    let started = Instant::now();
    let token = token();
    let fence = Arc::new(Awaited::default());
    awaited().insert(token.clone(), fence.clone());
    let _waiting = Waiting(token.clone());
    let (live, wait_ms) = match send(client, &token).await {
        Ok(sent) => sent,
        Err(e) => return leases_waited_out(started, &e).await,
    };
    // Listeners gone without unregistering may answer from memory until then.
    let gone_until = Instant::now() + Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0));
    let deadline = started + FENCE_WAIT;
    let outcome = loop {
        let arrived = fence.arrived.notified();
        tokio::pin!(arrived);
        // Registered before the answers are read, so one arriving in between wakes it.
        arrived.as_mut().enable();
        let missing: Vec<i32> = {
            let answered = fence.answered.lock().unwrap_or_else(|p| p.into_inner());
            live.iter()
                .copied()
                .filter(|k| !answered.contains(k))
                .collect()
        };
        if missing.is_empty() {
            break Fenced::Answered {
                listeners: live.len(),
            };
        }
        if tokio::time::timeout_at(deadline.into(), arrived)
            .await
            .is_err()
        {
            tracing::warn!(?missing, waited = ?FENCE_WAIT, "listeners did not answer a commit fence in time; their leases have run out, so their replicas read the database");
            break Fenced::TimedOut { missing };
        }
    };
    // At most FENCE_WAIT after the query, which first saw them gone.
    tokio::time::sleep_until(gone_until.into()).await;
    crate::telemetry::metrics::fence(match outcome {
        Fenced::Answered { .. } => "answered",
        Fenced::TimedOut { .. } => "timed_out",
        Fenced::Failed => "failed",
    });
    outcome
}

/// Sends the fence `token`: the registered listeners' keys and how long (ms) to
/// wait at least for listeners gone without unregistering.
async fn send(client: &tokio_postgres::Client, token: &str) -> anyhow::Result<(Vec<i32>, i64)> {
    use anyhow::Context;
    let hold = i32::try_from(FENCE_WAIT.as_millis()).unwrap_or(i32::MAX);
    let row = tokio::time::timeout(
        WAIT,
        // Typed parameters: one round trip, no statement to prepare first.
        client.query_typed_one(
            "SELECT live, wait_ms FROM change_fence($1, $2)",
            &[
                (&token, tokio_postgres::types::Type::TEXT),
                (&hold, tokio_postgres::types::Type::INT4),
            ],
        ),
    )
    .await
    .context("sending a commit fence timed out")?
    .context("sending a commit fence")?;
    Ok((
        row.try_get("live").context("the fence's live listeners")?,
        row.try_get("wait_ms").context("the fence's wait")?,
    ))
}

/// A fence that could not be sent: waits until [`FENCE_WAIT`] after `started`
/// (after the commit), when every lease that could still hold an older answer has
/// run out.
async fn leases_waited_out(started: Instant, error: &anyhow::Error) -> Fenced {
    crate::telemetry::metrics::fence("failed");
    tracing::warn!(error = %format!("{error:#}"), wait = ?FENCE_WAIT, "a commit fence could not be sent; waiting the replicas' leases out instead");
    tokio::time::sleep_until((started + FENCE_WAIT).into()).await;
    Fenced::Failed
}

/// [`fence`] on a connection of the pool; without a connection within the pool's
/// bound, the replicas' leases are waited out instead.
pub async fn fence_pool(pool: &deadpool_postgres::Pool) -> Fenced {
    let started = Instant::now();
    match pool.get().await {
        Ok(client) => fence(&client).await,
        Err(e) => {
            let error = anyhow::Error::new(e).context("no connection for a commit fence");
            leases_waited_out(started, &error).await
        }
    }
}
