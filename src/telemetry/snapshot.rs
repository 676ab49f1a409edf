//! What the database says about the service's state, read when `/metrics` or
//! `/stats` is asked: the unbilled backlog and billing lag per metric, series,
//! projects, scrape targets, notification deliveries. Read from the database rather
//! than counted in memory, so every replica reports the same numbers and a restart
//! loses none of them.

use crate::store::col;
use crate::store::targets::{self, TargetStatus};
use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// The unbilled samples of one billed metric.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Backlog {
    /// Series of the metric.
    pub series: i64,
    /// Samples after their series' billing cursor (not after now).
    pub unbilled_samples: i64,
    /// The oldest of them.
    pub oldest_unbilled_at: Option<DateTime<Utc>>,
}

impl Backlog {
    /// Now minus the oldest unbilled sample; zero when nothing waits.
    pub fn lag_seconds(&self, now: DateTime<Utc>) -> f64 {
        self.oldest_unbilled_at
            .map(|oldest| ((now - oldest).num_milliseconds() as f64 / 1000.0).max(0.0))
            .unwrap_or(0.0)
    }
}

/// The database's view of the service at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// When it was read.
    pub read_at: DateTime<Utc>,
    /// Per billed metric (every metric with a rule, even without series).
    pub backlog: BTreeMap<String, Backlog>,
    /// Series per metric, billed or not.
    pub series: BTreeMap<String, i64>,
    /// Projects known.
    pub projects: i64,
    /// The newest `last_billed_at` of any project (any replica's run).
    pub last_billed_at: Option<DateTime<Utc>>,
    /// Status of the configured scrape targets.
    pub targets: Vec<TargetStatus>,
    /// Samples billing quarantined (could not charge, passed), by metric.
    pub quarantined: BTreeMap<String, i64>,
    /// Notification deliveries by channel and status; `None` without the outbox.
    pub notifications: Option<BTreeMap<(String, String), i64>>,
}

impl Snapshot {
    /// Reads the state; `billed` are the metrics with a billing rule, `configured`
    /// the names of the scrape targets in the settings.
    pub async fn read(
        client: &mut tokio_postgres::Client,
        billed: &[&str],
        configured: &[&str],
    ) -> anyhow::Result<Self> {
        let read_at = Utc::now();
        let mut backlog: BTreeMap<String, Backlog> = billed
            .iter()
            .map(|metric| (metric.to_string(), Backlog::default()))
            .collect();
        // One index probe per series (LATERAL), so the cost follows the number of
        // series and unbilled samples, never the size of the sample table. With many
        // series the planner would compile it (JIT), which costs more than it saves.
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL jit = off").await?;
        let rows = tx
            .query(
                "SELECT s.metric, count(*) AS series, coalesce(sum(x.n), 0)::bigint AS unbilled_samples,
                        min(x.oldest) AS oldest_unbilled_at
                 FROM series s
                 LEFT JOIN billing_cursors c ON c.series_id = s.id
                 CROSS JOIN LATERAL (
                     SELECT count(*) AS n, min(u.time) AS oldest FROM usage_samples u
                     WHERE u.series_id = s.id AND u.time > coalesce(c.last_time, '-infinity')
                       AND u.time <= $2
                 ) x
                 WHERE s.metric = ANY($1::text[])
                 GROUP BY s.metric",
                &[&billed, &read_at],
            )
            .await
            .context("reading the unbilled backlog")?;
        tx.commit().await?;
        for row in rows {
            backlog.insert(
                col(&row, "metric")?,
                Backlog {
                    series: col(&row, "series")?,
                    unbilled_samples: col(&row, "unbilled_samples")?,
                    oldest_unbilled_at: col(&row, "oldest_unbilled_at")?,
                },
            );
        }
        let series = client
            .query(
                "SELECT metric, count(*) AS n FROM series GROUP BY metric",
                &[],
            )
            .await
            .context("counting series")?
            .iter()
            .map(|row| Ok((col(row, "metric")?, col(row, "n")?)))
            .collect::<anyhow::Result<_>>()?;
        let quarantined = client
            .query(
                "SELECT s.metric, count(*) AS n FROM quarantined_samples q
                 JOIN series s ON s.id = q.series_id GROUP BY s.metric",
                &[],
            )
            .await
            .context("counting quarantined samples")?
            .iter()
            .map(|row| Ok((col(row, "metric")?, col(row, "n")?)))
            .collect::<anyhow::Result<_>>()?;
        let projects = client
            .query_one(
                "SELECT count(*) AS n, max(last_billed_at) AS last_billed_at FROM projects",
                &[],
            )
            .await
            .context("counting projects")?;
        let targets = targets::statuses(client)
            .await?
            .into_iter()
            .filter(|t| configured.contains(&t.name.as_str()))
            .collect();
        Ok(Self {
            read_at,
            backlog,
            series,
            projects: col(&projects, "n")?,
            last_billed_at: col(&projects, "last_billed_at")?,
            targets,
            quarantined,
            notifications: notifications(client).await?,
        })
    }

    /// Unbilled samples of every billed metric.
    pub fn unbilled_samples(&self) -> i64 {
        self.backlog.values().map(|b| b.unbilled_samples).sum()
    }

    /// Appends the snapshot's families in the Prometheus text format.
    pub fn write_prometheus(&self, out: &mut String) {
        let by_metric = |metric: &str, value: f64| (vec![("metric", metric.to_owned())], value);
        let by_target = |t: &TargetStatus, value: f64| (vec![("target", t.name.clone())], value);
        gauge(
            out,
            "os_credits_series",
            "Series known, by metric.",
            self.series.iter().map(|(m, n)| by_metric(m, *n as f64)),
        );
        gauge(
            out,
            "os_credits_unbilled_samples",
            "Samples stored but not billed yet, by billed metric.",
            self.backlog
                .iter()
                .map(|(m, b)| by_metric(m, b.unbilled_samples as f64)),
        );
        gauge(
            out,
            "os_credits_billing_lag_seconds",
            "Now minus the oldest unbilled sample, by billed metric (0 when nothing waits).",
            self.backlog
                .iter()
                .map(|(m, b)| by_metric(m, b.lag_seconds(self.read_at))),
        );
        gauge(
            out,
            "os_credits_projects",
            "Projects known.",
            [(vec![], self.projects as f64)],
        );
        gauge(
            out,
            "os_credits_last_billed_timestamp_seconds",
            "When any replica last billed a project (Unix time).",
            self.last_billed_at.map(|at| (vec![], unix(at))),
        );
        gauge(
            out,
            "os_credits_scrape_target_up",
            "1 when the target's last scrape (by any replica) succeeded.",
            self.targets
                .iter()
                .map(|t| by_target(t, f64::from(u8::from(t.up)))),
        );
        gauge(
            out,
            "os_credits_scrape_target_last_success_timestamp_seconds",
            "When the target was last scraped successfully (Unix time).",
            self.targets
                .iter()
                .filter_map(|t| Some(by_target(t, unix(t.last_success_at?)))),
        );
        gauge(
            out,
            "os_credits_quarantined_samples",
            "Samples billing could not charge and passed, recorded with their reason, by metric.",
            self.quarantined
                .iter()
                .map(|(m, n)| by_metric(m, *n as f64)),
        );
        if let Some(deliveries) = &self.notifications {
            gauge(
                out,
                "os_credits_notification_deliveries",
                "Notification deliveries by channel and status (pending, sending, sent, failed, skipped, unknown).",
                deliveries.iter().map(|((channel, status), n)| {
                    let labels = vec![("channel", channel.clone()), ("status", status.clone())];
                    (labels, *n as f64)
                }),
            );
        }
    }
}

/// Deliveries by channel and status; `None` while the outbox table does not exist.
async fn notifications(
    client: &tokio_postgres::Client,
) -> anyhow::Result<Option<BTreeMap<(String, String), i64>>> {
    let exists: bool = col(
        &client
            .query_one(
                "SELECT to_regclass('notification_deliveries') IS NOT NULL AS present",
                &[],
            )
            .await
            .context("looking for the notification outbox")?,
        "present",
    )?;
    if !exists {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT channel, status, count(*) AS n FROM notification_deliveries GROUP BY 1, 2",
            &[],
        )
        .await
        .context("counting notification deliveries")?;
    rows.iter()
        .map(|row| Ok(((col(row, "channel")?, col(row, "status")?), col(row, "n")?)))
        .collect::<anyhow::Result<_>>()
        .map(Some)
}

fn unix(at: DateTime<Utc>) -> f64 {
    at.timestamp_millis() as f64 / 1000.0
}

/// Label names and values of one sample.
pub type Labels = Vec<(&'static str, String)>;

/// Writes a gauge family: its `HELP` and `TYPE` lines and its samples.
pub fn gauge(
    out: &mut String,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, f64)>,
) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, value) in samples {
        sample(out, name, &labels, value);
    }
}

/// Writes one sample line, label values escaped as the text format requires.
fn sample(out: &mut String, name: &str, labels: &[(&str, String)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(key);
            out.push_str("=\"");
            crate::store::series::push_escaped_label_value(out, value);
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn label_values_are_escaped_as_the_text_format_requires() {
        let cases = [
            ("plain", "m{l=\"plain\"} 1\n"),
            ("a\"quote", "m{l=\"a\\\"quote\"} 1\n"),
            ("back\\slash", "m{l=\"back\\\\slash\"} 1\n"),
            ("new\nline", "m{l=\"new\\nline\"} 1\n"),
        ];
        for (value, expected) in cases {
            let mut out = String::new();
            sample(&mut out, "m", &[("l", value.to_owned())], 1.0);
            assert_eq!(out, expected, "{value:?}");
        }
    }

    #[test]
    fn the_lag_is_the_age_of_the_oldest_unbilled_sample_and_zero_without_one() {
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
        let waiting = Backlog {
            series: 1,
            unbilled_samples: 3,
            oldest_unbilled_at: Some(now - chrono::Duration::seconds(90)),
        };
        assert_eq!(waiting.lag_seconds(now), 90.0);
        assert_eq!(Backlog::default().lag_seconds(now), 0.0);
    }

    #[test]
    fn a_snapshot_renders_every_family_once_with_its_samples() {
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
        let snapshot = Snapshot {
            read_at: now,
            backlog: [(
                "project_vcpu_usage".to_owned(),
                Backlog {
                    series: 2,
                    unbilled_samples: 5,
                    oldest_unbilled_at: Some(now - chrono::Duration::seconds(30)),
                },
            )]
            .into(),
            series: [("project_vcpu_usage".to_owned(), 2)].into(),
            projects: 2,
            notifications: Some([(("email".to_owned(), "sent".to_owned()), 4)].into()),
            ..Snapshot::default()
        };
        let mut out = String::new();
        snapshot.write_prometheus(&mut out);
        for line in [
            "os_credits_unbilled_samples{metric=\"project_vcpu_usage\"} 5",
            "os_credits_billing_lag_seconds{metric=\"project_vcpu_usage\"} 30",
            "os_credits_series{metric=\"project_vcpu_usage\"} 2",
            "os_credits_projects 2",
            "os_credits_notification_deliveries{channel=\"email\",status=\"sent\"} 4",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
        }
        let types: Vec<&str> = out.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let unique: std::collections::BTreeSet<&str> = types.iter().copied().collect();
        assert_eq!(
            types.len(),
            unique.len(),
            "a family is declared twice:\n{out}"
        );
    }
}
