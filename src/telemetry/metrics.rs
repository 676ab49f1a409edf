//! The service's own metrics, recorded where things happen (one call per event, via
//! the functions below) and rendered in the Prometheus text format at `GET /metrics`.
//!
//! Events of this process (scrapes, billing runs, HTTP requests) go through the
//! `metrics` facade into one `metrics-exporter-prometheus` recorder, installed once
//! per process (tests start many services in one process). State that lives in the
//! database (backlog, lag, series, targets, notifications) is read when `/metrics`
//! is rendered, by [`super::snapshot`], so every replica reports the same truth.

use crate::domain::BillingSummary;
use chrono::{DateTime, Utc};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rust_decimal::Decimal;
use serde::Serialize;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Histogram buckets in seconds, from a fast HTTP answer to a long billing run.
/// Without buckets the exporter would render summaries.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// How often histogram data is folded into the buckets (the exporter leaves that to
/// its user when it runs without its own HTTP listener).
const UPKEEP: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder on first use and returns its handle; later calls (another
/// service in the same test process) get the same handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            // Infallible: it fails only for an empty bucket list, and BUCKETS is not.
            .expect("histogram buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if let Err(e) = metrics::set_global_recorder(recorder) {
            tracing::warn!(error = %e, "another metrics recorder is installed: /metrics shows only the database state");
        }
        describe();
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP);
                upkeep.run_upkeep();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no metrics upkeep thread: histograms fold only when rendered");
        }
        handle
    })
}

/// This process's metrics in the Prometheus text format.
pub fn render() -> String {
    let mut text = install().render();
    let billed = lock(&CREDITS_BILLED).to_string();
    text.push_str(&format!(
        "# HELP os_credits_credits_billed_total Credits charged by billing runs of this process (exact sum).\n\
         # TYPE os_credits_credits_billed_total counter\n\
         os_credits_credits_billed_total {billed}\n"
    ));
    text
}

fn describe() {
    describe_counter!(
        "os_credits_commit_fences_total",
        "Commit fences of writers by outcome: answered (every replica applied the write), timed_out (a listener did not answer within 3 s, so its lease ran out), failed (not sent; the leases were waited out)."
    );
    describe_counter!(
        "os_credits_change_listener_failures_total",
        "Failures of the connection listening for project changes (balances are read from the database until it listens again)."
    );
    describe_counter!(
        "os_credits_scrapes_total",
        "Scrape attempts by target and outcome (success, unreachable, bad_status, too_large, not_utf8, unparseable, store_failed)."
    );
    describe_histogram!(
        "os_credits_scrape_duration_seconds",
        metrics::Unit::Seconds,
        "Time of one scrape (fetch, parse, store) by target."
    );
    describe_counter!(
        "os_credits_samples_stored_total",
        "Samples stored by target."
    );
    describe_counter!(
        "os_credits_samples_dropped_total",
        "Billed samples scraped but not stored, by target and reason (no_project, not_whitelisted, not_finite, too_long, bad_project: blank, over 255 bytes or NUL; nul_label: a NUL in a label value; not_utf8: a pushed label that is not UTF-8)."
    );
    describe_counter!(
        "os_credits_ingest_merged_total",
        "Scrapes and pushes whose direct COPY met a sample or series stored already (a restart, a re-sent batch, another replica) and that were stored again through the slower merging path."
    );
    describe_counter!(
        "os_credits_samples_duplicate_total",
        "Samples not stored because they were stored already, by target."
    );
    describe_counter!(
        "os_credits_billing_runs_total",
        "Billing runs by outcome (success, failure)."
    );
    describe_histogram!(
        "os_credits_billing_run_duration_seconds",
        metrics::Unit::Seconds,
        "Time of one billing run over every project."
    );
    describe_counter!(
        "os_credits_billing_projects_total",
        "Projects handled by billing runs, by outcome (billed, skipped: another replica held it, failed)."
    );
    describe_counter!(
        "os_credits_samples_billed_total",
        "Samples consumed by billing runs."
    );
    describe_counter!(
        "os_credits_ledger_rows_total",
        "Usage ledger rows written by billing runs."
    );
    describe_gauge!(
        "os_credits_billing_last_run_timestamp_seconds",
        metrics::Unit::Seconds,
        "When the last billing run of this process finished (Unix time), by outcome."
    );
    describe_counter!(
        "os_credits_http_requests_total",
        "HTTP requests by method, route template (unmatched for unknown paths) and status."
    );
    describe_histogram!(
        "os_credits_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time to the response head by method and route template."
    );
    describe_gauge!(
        "os_credits_stale_series",
        "Billed series a target returned once and no longer returns (billing for them has stopped), by target."
    );
    describe_counter!(
        "os_credits_charges_held_total",
        "Counter steps the jump guard held for review instead of billing."
    );
    describe_counter!(
        "os_credits_held_charges_decided_total",
        "Held charges decided, by decision (approved, rejected) and by (operator, counter_drop)."
    );
    describe_counter!(
        "os_credits_notification_attempts_total",
        "Delivery attempts of notifications by channel (email, webhook) and outcome."
    );
}

/// One scrape or push was stored again through the merging path.
pub fn ingest_merged() {
    counter!("os_credits_ingest_merged_total").increment(1);
}

/// What one ingest stored, as plain figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestCounts {
    /// Samples written.
    pub stored: u64,
    /// Samples already stored.
    pub duplicates: u64,
    /// Samples dropped, by reason label.
    pub dropped: [(&'static str, u64); 7],
}

/// One scrape ended: what it stored, or the fixed word naming why it failed.
pub fn scrape_finished(
    target: &str,
    outcome: Result<IngestCounts, &'static str>,
    duration: Duration,
) {
    let target = target.to_owned();
    let result = match outcome {
        Ok(ingested) => {
            counter!("os_credits_samples_stored_total", "target" => target.clone())
                .increment(ingested.stored);
            counter!("os_credits_samples_duplicate_total", "target" => target.clone())
                .increment(ingested.duplicates);
            for (reason, dropped) in ingested.dropped {
                if dropped > 0 {
                    counter!("os_credits_samples_dropped_total", "target" => target.clone(), "reason" => reason)
                        .increment(dropped);
                }
            }
            "success"
        }
        Err(kind) => kind,
    };
    histogram!("os_credits_scrape_duration_seconds", "target" => target.clone())
        .record(duration.as_secs_f64());
    counter!("os_credits_scrapes_total", "target" => target, "outcome" => result).increment(1);
}

/// What `/stats` shows of the last billing run of this process.
#[derive(Debug, Clone, Serialize)]
pub struct LastBillingRun {
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// `success` or `failure`.
    pub outcome: &'static str,
    /// What it did (a successful run).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub summary: Option<BillingSummary>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

static LAST_BILLING_RUN: Mutex<Option<LastBillingRun>> = Mutex::new(None);
static CREDITS_BILLED: Mutex<Decimal> = Mutex::new(Decimal::ZERO);

/// Locks a mutex that holds plain values, which a panicking holder cannot leave
/// half-written.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A billing run ended.
pub fn billing_run_finished(summary: &BillingSummary) {
    counter!("os_credits_billing_runs_total", "outcome" => "success").increment(1);
    histogram!("os_credits_billing_run_duration_seconds")
        .record(Duration::from_millis(summary.duration_ms).as_secs_f64());
    for (outcome, n) in [
        ("billed", summary.projects_billed),
        ("skipped", summary.projects_skipped),
        ("failed", summary.projects_failed),
    ] {
        counter!("os_credits_billing_projects_total", "outcome" => outcome).increment(n);
    }
    counter!("os_credits_samples_billed_total").increment(summary.samples_billed);
    counter!("os_credits_ledger_rows_total").increment(summary.ledger_rows);
    {
        let mut billed = lock(&CREDITS_BILLED);
        *billed = billed.saturating_add(summary.credits_billed);
    }
    remember(LastBillingRun {
        finished_at: Utc::now(),
        outcome: "success",
        summary: Some(summary.clone()),
        error: None,
    });
}

/// A billing run failed before it could bill anything (projects are billed or
/// failed one by one inside a run, see [`billing_run_finished`]).
pub fn billing_run_failed(error: &anyhow::Error) {
    counter!("os_credits_billing_runs_total", "outcome" => "failure").increment(1);
    remember(LastBillingRun {
        finished_at: Utc::now(),
        outcome: "failure",
        summary: None,
        error: Some(format!("{error:#}")),
    });
}

fn remember(run: LastBillingRun) {
    gauge!("os_credits_billing_last_run_timestamp_seconds", "outcome" => run.outcome)
        .set(run.finished_at.timestamp_millis() as f64 / 1000.0);
    *lock(&LAST_BILLING_RUN) = Some(run);
}

/// The last billing run of this process, if any ran since it started.
pub fn last_billing_run() -> Option<LastBillingRun> {
    lock(&LAST_BILLING_RUN).clone()
}

/// One HTTP request was answered. `route` is the matched route template (never the
/// raw path, which would make a series per project name).
pub fn http_request(method: &str, route: Option<String>, status: u16, duration: Duration) {
    let route = route.unwrap_or_else(|| "unmatched".to_owned());
    histogram!("os_credits_http_request_duration_seconds", "method" => method.to_owned(), "route" => route.clone())
        .record(duration.as_secs_f64());
    counter!("os_credits_http_requests_total", "method" => method.to_owned(), "route" => route, "status" => status.to_string())
        .increment(1);
}

/// One attempt to deliver a notification ended: `channel` is `email` or `webhook`,
/// `outcome` one of a few fixed words (`sent`, `retry`, `failed`, …), never an
/// error message. For the notification sender to call; the delivery states in the
/// database are reported at render time anyway.
pub fn notification_attempt(channel: &'static str, outcome: &'static str) {
    counter!("os_credits_notification_attempts_total", "channel" => channel, "outcome" => outcome)
        .increment(1);
}

/// A billing transaction held `held` counter steps and rejected `rejected` held
/// charges because their counters dropped back.
pub fn charges_held(held: u64, rejected: u64) {
    if held > 0 {
        counter!("os_credits_charges_held_total").increment(held);
    }
    if rejected > 0 {
        counter!("os_credits_held_charges_decided_total", "decision" => "rejected", "by" => "counter_drop")
            .increment(rejected);
    }
}

/// An operator approved or rejected a held charge (`decision` is `approved` or `rejected`).
pub fn held_charge_decided(decision: &'static str) {
    counter!("os_credits_held_charges_decided_total", "decision" => decision, "by" => "operator")
        .increment(1);
}

/// The connection listening for project changes failed (answers come from the
/// database until it listens again).
pub fn listener_failed() {
    counter!("os_credits_change_listener_failures_total").increment(1);
}

/// A writer's commit fence ended: `answered` (every replica applied the write),
/// `timed_out` (some listener did not answer; its lease ran out) or `failed` (not
/// sent; the leases were waited out).
pub fn fence(outcome: &'static str) {
    counter!("os_credits_commit_fences_total", "outcome" => outcome).increment(1);
}

/// A target's stale series after its last scrape (see `crate::ingest::completeness`).
pub fn stale_series(target: &str, count: i64) {
    gauge!("os_credits_stale_series", "target" => target.to_owned()).set(count as f64);
}
