//! Receiving: Prometheus remote-write 1.0 (`POST /api/v1/write`). A thin source: the
//! decoded samples go through the same filters, series keys and `COPY`/merge as
//! scraped ones (`crate::ingest`), so a batch Prometheus retries is stored once.

pub mod completeness;
pub mod http;
pub mod proto;
pub mod senders;

use crate::billing::rules::Rules;
use crate::ingest::{self, IngestContext, IngestOutcome, IngestSettings, Sample};
use crate::store::series::SeriesCache;
use anyhow::Context;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use senders::RemoteWriteSender;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// What `/health` and `/stats` show of one sender (kept by this replica, since start).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SenderStatus {
    /// Sender name.
    pub name: String,
    /// Whether its last push was stored.
    pub up: bool,
    /// When it last pushed (authenticated).
    pub last_push_at: Option<DateTime<Utc>>,
    /// When a push was last stored.
    pub last_success_at: Option<DateTime<Utc>>,
    /// Why its last push failed (absent after a success).
    pub last_error: Option<String>,
    /// Samples stored by its last successful push.
    pub last_samples: Option<u64>,
    /// Samples stored since start.
    pub samples_stored_total: u64,
    /// Samples already stored (a retried batch) since start.
    pub duplicates_total: u64,
    /// Billed samples dropped by the filters (no project, whitelist, bad labels, NaN).
    pub skipped_total: u64,
    /// Pushes since start.
    pub pushes_total: u64,
    /// Pushes that failed since start.
    pub failures_total: u64,
    /// Billed series pushed within `REMOTE_WRITE_STALE_AFTER` (at the last check).
    pub billed_series: Option<u64>,
    /// Its series recorded as stale (not pushed within `REMOTE_WRITE_STALE_AFTER`).
    pub stale_series: Option<i64>,
    /// Why `/health` is degraded because of this sender (it stopped pushing).
    pub problem: Option<String>,
    /// The last check that found billed series pushed, and how many.
    #[serde(skip)]
    last_nonzero: Option<(DateTime<Utc>, u64)>,
}

/// Why a push was refused. Each maps to the status remote-write senders act on:
/// 4xx are dropped by the sender, 5xx retried.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The body can never be read: not snappy, not a `WriteRequest`.
    #[error("{0}")]
    Invalid(String),
    /// Larger than `REMOTE_WRITE_MAX_BYTES` (compressed or decompressed).
    #[error("body larger than REMOTE_WRITE_MAX_BYTES ({0} bytes)")]
    TooLarge(usize),
    /// The database could not store it; a retry may succeed.
    #[error("storing samples failed: {0}")]
    Unavailable(String),
}

/// Accepts pushes from the configured senders.
pub struct Receiver {
    pool: Pool,
    cache: SeriesCache,
    senders: Vec<Sender>,
    statuses: Mutex<BTreeMap<String, SenderStatus>>,
    max_bytes: usize,
    stale_after: std::time::Duration,
}

/// One configured sender: who it is, the credentials it must send, what its samples
/// get, which billed series it pushed when, and the series it pushed before.
struct Sender {
    config: RemoteWriteSender,
    expected: String,
    ctx: Arc<IngestContext>,
    pushed: completeness::Pushed,
    known: KnownSeries,
}

/// Most series a sender's [`KnownSeries`] holds (about 200 bytes each: some 100 MB).
/// Series beyond it still go through the full path.
pub const MAX_KNOWN_SERIES_PER_SENDER: usize = 500_000;

/// The series one sender pushed and that were stored, by their label fields exactly
/// as the sender encodes them: a series sent again with the same bytes is the same
/// series with the same labels (its sender adds the same labels, and the filters
/// depend on nothing else), so its samples skip decoding the labels, the filters and
/// the series key. Series are never deleted, so an id once found stays right.
#[derive(Default)]
struct KnownSeries(std::sync::RwLock<IdsByLabelBytes>);

/// Series ids by the label fields a sender encoded.
type IdsByLabelBytes = HashMap<Box<[u8]>, i64, foldhash::fast::RandomState>;

impl KnownSeries {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, IdsByLabelBytes> {
        // Plain values: a panicking holder cannot leave them half-written.
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Learns the ids of series stored by a push, up to the bound.
    fn learn(&self, found: impl IntoIterator<Item = (Box<[u8]>, i64)>) {
        let mut known = self.0.write().unwrap_or_else(|p| p.into_inner());
        for (raw, id) in found {
            if known.len() >= MAX_KNOWN_SERIES_PER_SENDER {
                break;
            }
            known.insert(raw, id);
        }
    }
}

/// What receiving reads of the settings.
#[derive(Debug, Clone)]
pub struct ReceiveSettings {
    /// `REMOTE_WRITE_SENDERS`: who may push (empty: `POST /api/v1/write` answers 404).
    pub senders: Vec<RemoteWriteSender>,
    /// `REMOTE_WRITE_MAX_BYTES`: a push larger than this (compressed or not) is refused.
    pub max_bytes: usize,
    /// `REMOTE_WRITE_STALE_AFTER`: a billed series a sender has not pushed for this
    /// long is recorded as stale (and a sender that pushes none makes `/health`
    /// degraded).
    pub stale_after: std::time::Duration,
}

impl Receiver {
    /// A receiver for `REMOTE_WRITE_SENDERS`; `None` when none is configured.
    pub fn new(
        settings: &ReceiveSettings,
        ingest: &IngestSettings,
        rules: &Rules,
        pool: Pool,
        cache: SeriesCache,
    ) -> Option<Self> {
        if settings.senders.is_empty() {
            return None;
        }
        let senders = settings
            .senders
            .iter()
            .map(|s| Sender {
                config: s.clone(),
                expected: senders::expected_authorization(&s.auth),
                ctx: Arc::new(IngestContext::new(ingest, rules, s.labels.clone())),
                pushed: completeness::Pushed::default(),
                known: KnownSeries::default(),
            })
            .collect::<Vec<_>>();
        let statuses = senders
            .iter()
            .map(|s| {
                (
                    s.config.name.clone(),
                    SenderStatus {
                        name: s.config.name.clone(),
                        ..SenderStatus::default()
                    },
                )
            })
            .collect();
        Some(Self {
            pool,
            cache,
            senders,
            statuses: Mutex::new(statuses),
            max_bytes: settings.max_bytes,
            stale_after: settings.stale_after,
        })
    }

    /// The largest body accepted, compressed or not.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The sender whose credentials `authorization` carries (compared in constant
    /// time against each).
    pub fn authenticate(&self, authorization: &[u8]) -> Option<usize> {
        let mut found = None;
        for (index, sender) in self.senders.iter().enumerate() {
            if crate::api::constant_time_eq(authorization, sender.expected.as_bytes()) {
                found = Some(index);
            }
        }
        found
    }

    /// The name of the sender at `index`.
    pub fn sender_name(&self, index: usize) -> &str {
        self.senders
            .get(index)
            .map_or("", |s| s.config.name.as_str())
    }

    /// Every sender's status, by name.
    pub fn statuses(&self) -> Vec<SenderStatus> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SenderStatus>> {
        // A poisoned lock only means a thread panicked mid-update of a counter.
        self.statuses.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decodes and stores one push of the sender at `index`, and records the outcome.
    pub async fn receive(&self, index: usize, body: &[u8]) -> Result<IngestOutcome, ReceiveError> {
        let at = Utc::now();
        let result = self.decode_and_store(index, body, at).await;
        let name = self.sender_name(index).to_owned();
        {
            let mut statuses = self.lock();
            let status = statuses.entry(name.clone()).or_default();
            status.name = name.clone();
            status.pushes_total += 1;
            status.last_push_at = Some(at);
            match &result {
                Ok(outcome) => {
                    status.up = true;
                    status.last_success_at = Some(at);
                    status.last_error = None;
                    status.last_samples = Some(outcome.stored);
                    status.samples_stored_total += outcome.stored;
                    status.duplicates_total += outcome.duplicates;
                    status.skipped_total += outcome
                        .skipped
                        .by_reason()
                        .iter()
                        .map(|(_, n)| n)
                        .sum::<u64>();
                }
                Err(e) => {
                    status.up = false;
                    status.failures_total += 1;
                    status.last_error = Some(e.to_string());
                }
            }
        }
        record_metrics(&name, &result);
        result
    }

    async fn decode_and_store(
        &self,
        index: usize,
        body: &[u8],
        at: DateTime<Utc>,
    ) -> Result<IngestOutcome, ReceiveError> {
        let Some(sender) = self.senders.get(index) else {
            return Err(ReceiveError::Invalid("unknown sender".into()));
        };
        let raw = decompress(body, self.max_bytes)?;
        // Series of this push not known by their label bytes, with their series key.
        let mut learning: Vec<(&[u8], String)> = Vec::new();
        let prepared = self.cache.read(|state| {
            let known = sender.known.read();
            let mut sorter = ingest::Sorter::new(&sender.ctx, state, at);
            let mut labels = Vec::new();
            proto::for_each_lazy_series(&raw, |series| {
                let raw_labels = series.labels_raw;
                if let Some(&id) = raw_labels.and_then(|r| known.get(r)) {
                    for &(value, timestamp) in &series.samples {
                        sorter.add_known(id, value, timestamp);
                    }
                    return Ok(());
                }
                labels.clear();
                if !series.labels_into(&mut labels)? {
                    let name = labels.iter().find(|(n, _)| *n == "__name__");
                    sorter.skip_not_utf8(name.map_or("", |(_, v)| *v), series.samples.len());
                    return Ok(());
                }
                if add_series(&mut sorter, &labels, &series.samples) {
                    if let Some(r) = raw_labels {
                        learning.push((r, sorter.key().to_owned()));
                    }
                }
                Ok(())
            })
            .map(|()| sorter.finish())
            .map_err(|e| {
                ReceiveError::Invalid(format!("body is not a remote-write WriteRequest: {e}"))
            })
        })?;
        let outcome = ingest::store_prepared(&self.pool, &self.cache, prepared)
            .await
            .map_err(|e| ReceiveError::Unavailable(e.to_string()))?;
        if !learning.is_empty() {
            let found: Vec<(Box<[u8]>, i64)> = self.cache.read(|state| {
                learning
                    .iter()
                    .filter_map(|(r, key)| state.id(key).map(|id| (Box::from(*r), id)))
                    .collect()
            });
            sender.known.learn(found);
        }
        sender.pushed.observe(at, &outcome.series);
        Ok(outcome)
    }

    /// How often [`Receiver::check_completeness`] should run: a quarter of
    /// `REMOTE_WRITE_STALE_AFTER`, at least every 250 ms.
    pub fn check_interval(&self) -> std::time::Duration {
        (self.stale_after / 4).max(std::time::Duration::from_millis(250))
    }

    /// One completeness check of every sender (see [`completeness`]): series not
    /// pushed within `REMOTE_WRITE_STALE_AFTER` are recorded as stale, series that
    /// came back are cleared, and a sender that stopped pushing billed series gets a
    /// `problem` in `/health`.
    pub async fn check_completeness(&self) -> anyhow::Result<()> {
        let now = Utc::now();
        let client = self.pool.get().await.context("checking pushed series")?;
        let window = chrono::Duration::from_std(self.stale_after).unwrap_or(chrono::Duration::MAX);
        for sender in &self.senders {
            let name = &sender.config.name;
            let target = completeness::target_of(name);
            let check = sender.pushed.check(now, self.stale_after);
            let stale = completeness::record(&client, &target, now, &check).await?;
            sender.pushed.forget(&check.gone);
            crate::telemetry::metrics::stale_series(&target, stale);
            let current = check.current.len() as u64;
            let mut statuses = self.lock();
            let status = statuses.entry(name.clone()).or_default();
            status.billed_series = Some(current);
            status.stale_series = Some(stale);
            if current > 0 {
                status.last_nonzero = Some((now, current));
            }
            let silent = status.last_push_at.is_some_and(|at| now - at > window);
            status.problem = match (current, status.last_nonzero, silent) {
                (0, Some((at, before)), _) => Some(format!(
                    "pushed no billed series for {} s, {before} until {}: is the site's Prometheus or its exporter down? Their usage is not billed until they return",
                    self.stale_after.as_secs(),
                    at.to_rfc3339()
                )),
                (_, _, true) => Some(format!(
                    "no push for {} s (REMOTE_WRITE_STALE_AFTER): is the site's Prometheus down?",
                    self.stale_after.as_secs()
                )),
                _ => None,
            };
        }
        Ok(())
    }
}

/// Snappy-decompresses a body (block format, as remote write sends), refusing more
/// than `max_bytes` decompressed.
pub fn decompress(body: &[u8], max_bytes: usize) -> Result<Vec<u8>, ReceiveError> {
    let len = snap::raw::decompress_len(body)
        .map_err(|e| ReceiveError::Invalid(format!("body is not snappy-compressed: {e}")))?;
    if len > max_bytes {
        return Err(ReceiveError::TooLarge(max_bytes));
    }
    snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| ReceiveError::Invalid(format!("body is not snappy-compressed: {e}")))
}

/// One decoded series as the ingest path takes its samples: the metric name from
/// `__name__`, the other labels (internal `__` labels dropped, borrowed from the
/// body), each sample with its own time. Series of metrics not billed cost nothing
/// more. `true` when a sample became a row (the sorter's key is then the series').
fn add_series<'a>(
    sorter: &mut ingest::Sorter<'_>,
    labels: &[(&'a str, &'a str)],
    samples: &[(f64, i64)],
) -> bool {
    let name = labels
        .iter()
        .find(|(n, _)| *n == "__name__")
        .map_or("", |(_, v)| *v);
    if !sorter.wants(name) {
        return false;
    }
    let labels: Vec<(&str, Cow<'a, str>)> = labels
        .iter()
        .filter(|(n, _)| !n.starts_with("__"))
        .map(|&(n, v)| (n, Cow::Borrowed(v)))
        .collect();
    let mut kept = false;
    for &(value, timestamp) in samples {
        kept |= sorter.add(Sample {
            series: "",
            name,
            labels: labels.clone(),
            value,
            timestamp_ms: Some(timestamp),
        });
    }
    kept
}

fn record_metrics(sender: &str, result: &Result<IngestOutcome, ReceiveError>) {
    let sender = sender.to_owned();
    match result {
        Ok(outcome) => {
            metrics::counter!("os_credits_remote_write_pushes_total", "sender" => sender.clone(), "result" => "success").increment(1);
            metrics::counter!("os_credits_remote_write_samples_total", "sender" => sender.clone(), "outcome" => "stored").increment(outcome.stored);
            metrics::counter!("os_credits_remote_write_samples_total", "sender" => sender.clone(), "outcome" => "duplicate").increment(outcome.duplicates);
            for (reason, count) in outcome.skipped.by_reason() {
                if count > 0 {
                    metrics::counter!("os_credits_remote_write_samples_total", "sender" => sender.clone(), "outcome" => reason).increment(count);
                }
            }
            metrics::gauge!("os_credits_remote_write_last_success_timestamp_seconds", "sender" => sender)
                .set(Utc::now().timestamp() as f64);
        }
        Err(e) => {
            let kind = match e {
                ReceiveError::Invalid(_) => "invalid",
                ReceiveError::TooLarge(_) => "too_large",
                ReceiveError::Unavailable(_) => "unavailable",
            };
            metrics::counter!("os_credits_remote_write_pushes_total", "sender" => sender, "result" => kind).increment(1);
        }
    }
}
