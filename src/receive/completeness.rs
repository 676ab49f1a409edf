//! Completeness of pushed series: the checks scrape targets get
//! (`crate::ingest::completeness`), for remote-write senders.
//!
//! A sender never pushes all its series in one request (Prometheus splits them over
//! shards and batches), so series are followed by time instead of by request: each
//! billed series a sender pushed is remembered with when it last came. A check every
//! quarter of `REMOTE_WRITE_STALE_AFTER` records a series not pushed for that long in
//! `stale_series` (target `remote_write:<sender>`, listed per project, counted in
//! `os_credits_stale_series`) and clears the ones that came back; a sender that pushed
//! billed series and now pushes none (or nothing at all) makes `/health` `degraded`.
//!
//! Each replica follows the pushes it receives. Behind a load balancer that spreads
//! one sender over several replicas a series may be reported missing by one replica
//! while another receives it; the replica that receives it clears the record at its
//! next check.

use anyhow::Context;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The `target` a sender's stale series are recorded under.
pub fn target_of(sender: &str) -> String {
    format!("remote_write:{sender}")
}

/// When each billed series of one sender was last pushed.
#[derive(Debug, Default)]
pub struct Pushed {
    last: Mutex<HashMap<i64, DateTime<Utc>, foldhash::fast::RandomState>>,
}

/// What a check found for one sender.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Check {
    /// Series not pushed within the window, with when they last came.
    pub gone: Vec<(i64, DateTime<Utc>)>,
    /// Series pushed within the window.
    pub current: Vec<i64>,
}

impl Pushed {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<i64, DateTime<Utc>, foldhash::fast::RandomState>> {
        // Plain values: a panicking holder cannot leave them half-written.
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers the series of a stored push.
    pub fn observe(&self, at: DateTime<Utc>, series: &[i64]) {
        let mut last = self.lock();
        for &id in series {
            last.insert(id, at);
        }
    }

    /// Which series came within `window` before `now` and which did not.
    pub fn check(&self, now: DateTime<Utc>, window: Duration) -> Check {
        let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
        let mut check = Check::default();
        for (&id, &at) in self.lock().iter() {
            match now - at > window {
                true => check.gone.push((id, at)),
                false => check.current.push(id),
            }
        }
        check.gone.sort_unstable();
        check.current.sort_unstable();
        check
    }

    /// Forgets series recorded as gone (unless they came again meanwhile), so each is
    /// recorded once; a push brings it back.
    pub fn forget(&self, gone: &[(i64, DateTime<Utc>)]) {
        let mut last = self.lock();
        for (id, at) in gone {
            if last.get(id) == Some(at) {
                last.remove(id);
            }
        }
    }

    /// Series followed (the memory this costs: one entry per active series).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no series is followed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Records a check of the sender `target`: gone series into `stale_series`, series
/// that came back out of it. Returns the sender's stale series now.
pub async fn record(
    client: &tokio_postgres::Client,
    target: &str,
    now: DateTime<Utc>,
    check: &Check,
) -> anyhow::Result<i64> {
    // Rows written here change project details answered from memory.
    let mut changed = 0;
    if !check.gone.is_empty() {
        let (ids, seen): (Vec<i64>, Vec<DateTime<Utc>>) = check.gone.iter().copied().unzip();
        changed += client
            .execute(
                "INSERT INTO stale_series (series_id, target, last_seen_at, missing_since)
                 SELECT id, $3, seen, $4 FROM unnest($1::bigint[], $2::timestamptz[]) AS g(id, seen)
                 ON CONFLICT (series_id) DO NOTHING",
                &[&ids, &seen, &target, &now],
            )
            .await
            .context("recording pushed series gone missing")?;
        tracing::warn!(
            %target,
            series = ids.len(),
            "billed series stopped being pushed: billing for them has stopped"
        );
    }
    if !check.current.is_empty() {
        changed += client
            .execute(
                "DELETE FROM stale_series WHERE series_id = ANY($1::bigint[])",
                &[&check.current],
            )
            .await
            .context("clearing pushed series that are back")?;
    }
    if changed > 0 {
        crate::store::changes::fence(client).await;
    }
    let row = client
        .query_one(
            "SELECT count(*) AS stale FROM stale_series WHERE target = $1",
            &[&target],
        )
        .await
        .context("counting stale pushed series")?;
    crate::store::col(&row, "stale")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_not_pushed_within_the_window_are_gone_once() {
        let pushed = Pushed::default();
        let t0 = DateTime::<Utc>::UNIX_EPOCH;
        let window = Duration::from_secs(60);
        pushed.observe(t0, &[3, 1]);
        pushed.observe(t0 + chrono::Duration::seconds(50), &[2, 1]);
        let check = pushed.check(t0 + chrono::Duration::seconds(61), window);
        assert_eq!(check.gone, vec![(3, t0)]);
        assert_eq!(check.current, vec![1, 2]);
        pushed.forget(&check.gone);
        let again = pushed.check(t0 + chrono::Duration::seconds(62), window);
        assert!(again.gone.is_empty(), "recorded once");
        assert_eq!(pushed.len(), 2);
        pushed.observe(t0 + chrono::Duration::seconds(70), &[3]);
        let back = pushed.check(t0 + chrono::Duration::seconds(71), window);
        assert_eq!(back.current, vec![1, 2, 3], "a push brings it back");
    }

    #[test]
    fn a_series_pushed_again_before_forget_is_kept() {
        let pushed = Pushed::default();
        let t0 = DateTime::<Utc>::UNIX_EPOCH;
        pushed.observe(t0, &[7]);
        let check = pushed.check(t0 + chrono::Duration::seconds(10), Duration::from_secs(5));
        pushed.observe(t0 + chrono::Duration::seconds(11), &[7]);
        pushed.forget(&check.gone);
        assert_eq!(pushed.len(), 1);
    }
}
