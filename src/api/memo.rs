//! Answers from memory: project balances, project details (with their held charges,
//! quarantined samples and stale series) and credits-history bodies, dropped per project when the database says it changed
//! ([`crate::store::changes`]).
//!
//! Never stale: memory answers while the thread's listener holds its lease (every
//! writer's fence waits until the listener applied its write, or until the lease ran
//! out, see [`crate::store::changes`]); otherwise a request first passes the
//! listener's read barrier (every change committed before it has been applied here).
//! A value read from the database is kept only if no change of its project arrived
//! while it was read. Without a listening connection every request reads the
//! database.
//!
//! Each HTTP worker thread listens on a connection of its own (up to
//! [`MAX_LISTENERS`]; further threads share one), so a request's barrier, when it
//! needs one, is sent, answered and woken on the thread that serves it, with no
//! hand-over to another thread. Any listener's change is applied to the one memory,
//! and a fence waits for every listener, so one listener's lease covers what every
//! thread reads.
//!
//! Bounded: at most [`MAX_PROJECTS`] balances and details (about 250 bytes per
//! balance; 1–2 KiB per detail, at most ~5 KiB with the 10 held charges, quarantined
//! samples and stale series a held detail may list: under 550 MB for 100,000
//! projects even with every detail held, typically ~25 MB for their balances), and
//! history bodies of at most
//! [`MAX_HISTORY_BODY`] each, [`MAX_HISTORY_BYTES`] together (all are dropped when
//! that is reached).

use super::projects::FullDetail as Detail;
use crate::billing::account::Balance;
use crate::store::changes::{Change, Listener, OnChange};
use crate::workers::{Backoff, Workers};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

/// Most projects whose balance (and detail) are held.
pub const MAX_PROJECTS: usize = 200_000;
/// Largest history body held.
pub const MAX_HISTORY_BODY: usize = 512 * 1024;
/// All history bodies together.
pub const MAX_HISTORY_BYTES: usize = 64 * 1024 * 1024;
/// The longest a request waits for the read barrier before reading the database.
const SYNC_DEADLINE: Duration = Duration::from_millis(500);
/// Change counters, one per stripe of project names.
const STRIPES: usize = 1024;
/// Listening connections of one process at most (one per HTTP worker thread up to
/// this; threads beyond it share them).
pub const MAX_LISTENERS: usize = 8;

/// A history answer as sent: CSV or JSON body, or `None` for "nothing in the range".
#[derive(Debug, Clone)]
pub struct HistoryAnswer {
    /// Whether the body is CSV.
    pub csv: bool,
    /// The body; `None` answers 404.
    pub body: Option<Bytes>,
}

/// A detail and until when its time-dependent part (the burn rate) holds.
#[derive(Debug, Clone)]
struct HeldDetail {
    detail: Arc<Detail>,
    until: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct Held {
    balances: HashMap<String, Balance>,
    details: HashMap<String, HeldDetail>,
    history: HashMap<String, HashMap<String, HistoryAnswer>>,
    history_bytes: usize,
}

/// The process's memory of answers.
pub struct Memo {
    held: RwLock<Held>,
    /// Bumped (under the write lock) when a project of the stripe changes.
    stripes: Vec<AtomicU64>,
    /// Bumped (under the write lock) when everything is dropped.
    epoch: AtomicU64,
    /// How to listen, set at start-up; without it every request reads the database.
    listen: OnceLock<Listen>,
    /// The listeners started so far, and how many threads asked for one.
    listeners: Mutex<Listeners>,
}

#[derive(Default)]
struct Listeners {
    started: Vec<Arc<Listener>>,
    threads: usize,
}

/// What starting a listener needs.
pub struct Listen {
    /// The listening connection's settings.
    pub config: tokio_postgres::Config,
    /// Where its changes go (this memo's [`Memo::on_change`]).
    pub on_change: OnChange,
    /// Ends the listeners.
    pub cancel: tokio_util::sync::CancellationToken,
    /// Where they are supervised, each as `change_listener/<n>`.
    pub workers: Workers,
}

thread_local! {
    /// This thread's listener, per memo (by address: one process may run several
    /// services, as the tests do).
    static HERE: RefCell<Vec<(usize, Arc<Listener>)>> = const { RefCell::new(Vec::new()) };
}

/// A read in progress: whether memory may answer, and the change counters when it
/// started (a value read from the database is kept only if they did not move).
pub struct Read {
    fresh: bool,
    stripe: usize,
    seen: (u64, u64),
}

impl Default for Memo {
    fn default() -> Self {
        Self {
            held: RwLock::default(),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
            listen: OnceLock::new(),
            listeners: Mutex::default(),
        }
    }
}

fn stripe_of(project: &str) -> usize {
    let mut hasher = DefaultHasher::new();
    project.hash(&mut hasher);
    // The remainder is below STRIPES, so it fits a usize.
    (hasher.finish() % STRIPES as u64) as usize
}

impl Memo {
    /// Lets the memo answer: each HTTP worker thread then listens
    /// ([`Memo::listen_here`]).
    pub fn listen(&self, listen: Listen) {
        let _ = self.listen.set(listen);
    }

    /// This thread's listener: started (supervised, on this thread's runtime) on the
    /// thread's first call, or shared with another thread's once [`MAX_LISTENERS`]
    /// run. `None` before [`Memo::listen`] or outside a Tokio runtime.
    pub fn listen_here(&self) -> Option<Arc<Listener>> {
        let id = self as *const Self as usize;
        if let Some(held) = HERE.with_borrow(|here| {
            here.iter()
                .find(|(memo, _)| *memo == id)
                .map(|(_, listener)| listener.clone())
        }) {
            return Some(held);
        }
        let listen = self.listen.get()?;
        tokio::runtime::Handle::try_current().ok()?;
        let listener = {
            let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            listeners.threads += 1;
            if listeners.started.len() < MAX_LISTENERS {
                let listener = Listener::new();
                listeners.started.push(listener.clone());
                let (config, on_change, cancel) = (
                    listen.config.clone(),
                    listen.on_change.clone(),
                    listen.cancel.clone(),
                );
                let started = listener.clone();
                listen.workers.spawn(
                    format!("change_listener/{}", listeners.started.len()),
                    Duration::ZERO,
                    Backoff::default(),
                    cancel.clone(),
                    move || {
                        started
                            .clone()
                            .run(config.clone(), on_change.clone(), cancel.clone())
                    },
                );
                listener
            } else {
                // Threads beyond the first ones take turns.
                listeners.started[listeners.threads % MAX_LISTENERS].clone()
            }
        };
        HERE.with_borrow_mut(|here| here.push((id, listener.clone())));
        Some(listener)
    }

    /// Applies one change from the listener.
    pub fn on_change(&self, change: Change<'_>) {
        let mut held = self.write();
        match change {
            Change::Project(project) => {
                self.stripes[stripe_of(project)].fetch_add(1, Ordering::AcqRel);
                held.balances.remove(project);
                held.details.remove(project);
                if let Some(bodies) = held.history.remove(project) {
                    let freed: usize = bodies.iter().map(|(k, v)| answer_size(k, v)).sum();
                    held.history_bytes = held.history_bytes.saturating_sub(freed);
                }
            }
            Change::Reset => {
                self.epoch.fetch_add(1, Ordering::AcqRel);
                *held = Held::default();
            }
        }
    }

    /// Starts a read of `project`: at once within the lease, else after a read
    /// barrier.
    pub async fn begin(&self, project: &str) -> Read {
        let stripe = stripe_of(project);
        let seen = self.counters(stripe);
        let fresh = match self.listen_here() {
            // Within the lease memory answers at once; otherwise a barrier first.
            Some(listener) => listener.leased() || listener.sync(SYNC_DEADLINE).await,
            None => false,
        };
        Read {
            fresh,
            stripe,
            seen,
        }
    }

    fn counters(&self, stripe: usize) -> (u64, u64) {
        (
            self.epoch.load(Ordering::Acquire),
            self.stripes[stripe].load(Ordering::Acquire),
        )
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Held> {
        // A poisoned lock only means a panic elsewhere mid-update of plain maps.
        self.held.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Held> {
        self.held.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a value read from the database if nothing changed since `read` began.
    fn keep(&self, read: &Read, put: impl FnOnce(&mut Held)) {
        if !read.fresh {
            return;
        }
        let mut held = self.write();
        if self.counters(read.stripe) == read.seen {
            put(&mut held);
        }
    }

    /// The held balance. Nothing is held of a project that does not exist: creating
    /// a project notifies nobody (migration 0015).
    pub fn balance(&self, read: &Read, project: &str) -> Option<Balance> {
        if !read.fresh {
            return None;
        }
        self.read().balances.get(project).cloned()
    }

    /// Holds a balance read from the database.
    pub fn keep_balance(&self, read: &Read, project: &str, balance: &Balance) {
        self.keep(read, |held| {
            if held.balances.len() < MAX_PROJECTS || held.balances.contains_key(project) {
                held.balances.insert(project.to_owned(), balance.clone());
            }
        });
    }

    /// The held detail, if its burn rate still holds at `now`.
    pub fn detail(&self, read: &Read, project: &str, now: DateTime<Utc>) -> Option<Arc<Detail>> {
        if !read.fresh {
            return None;
        }
        let held = self.read();
        let entry = held.details.get(project)?;
        entry
            .until
            .is_none_or(|until| now < until)
            .then(|| entry.detail.clone())
    }

    /// Holds a detail read from the database; its burn rate holds until `until`.
    pub fn keep_detail(
        &self,
        read: &Read,
        project: &str,
        detail: Arc<Detail>,
        until: Option<DateTime<Utc>>,
    ) {
        self.keep(read, |held| {
            if held.details.len() < MAX_PROJECTS || held.details.contains_key(project) {
                held.details
                    .insert(project.to_owned(), HeldDetail { detail, until });
            }
        });
    }

    /// The held history answer for these parameters.
    pub fn history(&self, read: &Read, project: &str, key: &str) -> Option<HistoryAnswer> {
        if !read.fresh {
            return None;
        }
        self.read().history.get(project)?.get(key).cloned()
    }

    /// Holds a history answer (bodies over [`MAX_HISTORY_BODY`] are not held).
    pub fn keep_history(&self, read: &Read, project: &str, key: &str, answer: HistoryAnswer) {
        let size = answer_size(key, &answer);
        if size > MAX_HISTORY_BODY {
            return;
        }
        self.keep(read, |held| {
            if held.history_bytes + size > MAX_HISTORY_BYTES {
                held.history.clear();
                held.history_bytes = 0;
            }
            let bodies = held.history.entry(project.to_owned()).or_default();
            if let Some(old) = bodies.insert(key.to_owned(), answer) {
                held.history_bytes = held.history_bytes.saturating_sub(answer_size(key, &old));
            }
            held.history_bytes += size;
        });
    }
}

/// Bytes an answer holds, with its key and some overhead.
fn answer_size(key: &str, answer: &HistoryAnswer) -> usize {
    answer.body.as_ref().map_or(0, Bytes::len) + key.len() + 64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_listens_on_its_own_up_to_the_limit_and_later_threads_share() {
        let memo = Arc::new(Memo::default());
        let workers = Workers::new();
        let cancel = tokio_util::sync::CancellationToken::new();
        // Nothing listens there: each listener fails and backs off, which is enough.
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(1).user("nobody");
        memo.listen(Listen {
            config,
            on_change: Arc::new(|_| {}),
            cancel: cancel.clone(),
            workers: workers.clone(),
        });
        assert!(memo.listen_here().is_none(), "not inside a runtime");
        let threads = MAX_LISTENERS + 3;
        let got: Vec<(Arc<Listener>, Arc<Listener>)> = (0..threads)
            .map(|_| {
                let memo = memo.clone();
                std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime")
                        .block_on(async {
                            let first = memo.listen_here().expect("a listener");
                            (first, memo.listen_here().expect("the same again"))
                        })
                })
            })
            .map(|thread| thread.join().expect("thread"))
            .collect();
        cancel.cancel();
        for (first, again) in &got {
            assert!(Arc::ptr_eq(first, again), "one listener per thread");
        }
        let own = &got[..MAX_LISTENERS];
        for (i, (a, _)) in own.iter().enumerate() {
            for (b, _) in &own[i + 1..] {
                assert!(!Arc::ptr_eq(a, b), "the first threads listen on their own");
            }
        }
        let shared: Vec<usize> = got[MAX_LISTENERS..]
            .iter()
            .map(|(listener, _)| {
                own.iter()
                    .position(|(o, _)| Arc::ptr_eq(o, listener))
                    .expect("later threads share a started listener")
            })
            .collect();
        assert_eq!(shared, [1, 2, 3], "later threads take turns");
        let names: Vec<String> = workers.snapshot().into_keys().collect();
        let expected: Vec<String> = (1..=MAX_LISTENERS)
            .map(|n| format!("change_listener/{n}"))
            .collect();
        assert_eq!(names, expected, "each started listener is supervised");
    }
}
