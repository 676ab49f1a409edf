//! What must hold after any fault (issue 9's after-each checks), read from the
//! database: every ledger chain adds up, project totals equal their ledger sums, no
//! sample is stored twice, no threshold crossing is recorded or delivered twice.
//! `assert_each_once` checks what a peer received (mails, webhook calls).

use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::fmt::Debug;

/// Asserts every invariant on the database `client` is connected to.
pub async fn assert_invariants(client: &tokio_postgres::Client) {
    assert_ledger_chains(client).await;
    assert_totals_match_ledger(client).await;
    assert_no_duplicate_sample(client).await;
    assert_no_notification_twice(client).await;
}

/// Each project's ledger rows, in the order they were booked (the project's row
/// lock serialises them), carry totals = the previous row's totals + their deltas,
/// starting from zero.
pub async fn assert_ledger_chains(client: &tokio_postgres::Client) {
    let rows = client
        .query(
            "SELECT project, id, used_delta, granted_delta, used_after, granted_after
             FROM ledger ORDER BY project, id",
            &[],
        )
        .await
        .expect("read the ledger");
    let mut previous: BTreeMap<String, (Decimal, Decimal)> = BTreeMap::new();
    for row in rows {
        let project: String = row.get(0);
        let id: i64 = row.get(1);
        let (used_delta, granted_delta): (Decimal, Decimal) = (row.get(2), row.get(3));
        let (used_after, granted_after): (Decimal, Decimal) = (row.get(4), row.get(5));
        let (used, granted) = previous.get(&project).copied().unwrap_or_default();
        assert_eq!(
            used_after,
            used + used_delta,
            "ledger row {id} of {project}: used_after {used_after} != previous {used} + delta {used_delta}"
        );
        assert_eq!(
            granted_after,
            granted + granted_delta,
            "ledger row {id} of {project}: granted_after {granted_after} != previous {granted} + delta {granted_delta}"
        );
        previous.insert(project, (used_after, granted_after));
    }
}

/// `projects.used_credits` and `granted_credits` equal the sums of the project's
/// ledger deltas.
pub async fn assert_totals_match_ledger(client: &tokio_postgres::Client) {
    let rows = client
        .query(
            "SELECT p.name, p.used_credits, p.granted_credits,
                    coalesce(sum(l.used_delta), 0), coalesce(sum(l.granted_delta), 0)
             FROM projects p LEFT JOIN ledger l ON l.project = p.name
             GROUP BY p.name, p.used_credits, p.granted_credits ORDER BY p.name",
            &[],
        )
        .await
        .expect("read the project totals");
    for row in rows {
        let project: String = row.get(0);
        let (used, granted): (Decimal, Decimal) = (row.get(1), row.get(2));
        let (used_sum, granted_sum): (Decimal, Decimal) = (row.get(3), row.get(4));
        assert_eq!(
            used, used_sum,
            "{project}: used_credits {used} != ledger sum {used_sum}"
        );
        assert_eq!(
            granted, granted_sum,
            "{project}: granted_credits {granted} != ledger sum {granted_sum}"
        );
    }
}

/// No (series, time) is stored twice, and no series identity exists twice.
pub async fn assert_no_duplicate_sample(client: &tokio_postgres::Client) {
    let duplicates: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT series_id, time FROM usage_samples
                                   GROUP BY 1, 2 HAVING count(*) > 1) d",
            &[],
        )
        .await
        .expect("look for duplicate samples")
        .get(0);
    assert_eq!(duplicates, 0, "samples stored twice");
    let series: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT series_key FROM series GROUP BY 1 HAVING count(*) > 1) d",
            &[],
        )
        .await
        .expect("look for duplicate series")
        .get(0);
    assert_eq!(series, 0, "series stored twice");
}

/// No threshold crossing is recorded twice for one grant, and no delivery of one
/// notification over one channel exists twice.
pub async fn assert_no_notification_twice(client: &tokio_postgres::Client) {
    let crossings: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT project, threshold, granted FROM notifications
                                   GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
            &[],
        )
        .await
        .expect("look for duplicate notifications")
        .get(0);
    assert_eq!(crossings, 0, "a threshold crossing recorded twice");
    let deliveries: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT notification_id, channel FROM notification_deliveries
                                   GROUP BY 1, 2 HAVING count(*) > 1) d",
            &[],
        )
        .await
        .expect("look for duplicate deliveries")
        .get(0);
    assert_eq!(
        deliveries, 0,
        "a notification delivered twice over one channel"
    );
}

/// Each item (a received mail's subject and recipient, a webhook body, …) came once.
pub fn assert_each_once<T: Ord + Debug>(items: impl IntoIterator<Item = T>, what: &str) {
    let mut seen: BTreeMap<T, usize> = BTreeMap::new();
    for item in items {
        *seen.entry(item).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{what} received more than once: {twice:?}"
    );
}
