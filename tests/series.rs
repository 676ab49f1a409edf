//! Creating series in bulk on a real PostgreSQL: one scrape's new series in a few
//! statements, safe when several replicas create the same series at once.

mod common;

use common::TestDb;
use os_credits::store::migrations;
use os_credits::store::series::{self, NewSeries};
use std::collections::{BTreeMap, HashSet};

fn new_series(range: impl Iterator<Item = u32>) -> Vec<NewSeries> {
    range
        .map(|i| {
            let project = format!("p{}", i % 7);
            let labels: BTreeMap<String, String> = [
                ("project_name".to_owned(), project.clone()),
                ("site".to_owned(), format!("s{i}")),
            ]
            .into();
            NewSeries {
                key: format!("project_vcpu_usage{{project_name=\"{project}\",site=\"s{i}\"}}"),
                metric: "project_vcpu_usage".into(),
                labels,
                project,
            }
        })
        .collect()
}

async fn migrated(db: &TestDb) -> tokio_postgres::Client {
    let mut client = db.connect().await;
    migrations::run(&mut client).await.expect("migrations");
    client
}

#[tokio::test]
async fn two_writers_creating_overlapping_series_at_once_get_one_id_each_and_never_deadlock() {
    let db = TestDb::create().await;
    let _ = migrated(&db).await;
    for round in 0..5u32 {
        let base = round * 10_000;
        // The same 3,000 series, asked for in opposite orders, plus 500 of each own.
        let mut forward = new_series(base..base + 3_500);
        let mut backward = new_series(base + 500..base + 4_000);
        backward.reverse();
        let (mut a, mut b) = (db.connect().await, db.connect().await);
        let (left, right) = tokio::join!(
            async {
                let tx = a.transaction().await.expect("begin");
                let resolved = series::create_or_find(&tx, &forward).await;
                tx.commit().await.expect("commit");
                resolved
            },
            async {
                let tx = b.transaction().await.expect("begin");
                let resolved = series::create_or_find(&tx, &backward).await;
                tx.commit().await.expect("commit");
                resolved
            }
        );
        let (left, right) = (
            left.unwrap_or_else(|e| panic!("round {round}, first writer: {e:#}")),
            right.unwrap_or_else(|e| panic!("round {round}, second writer: {e:#}")),
        );
        assert_eq!(left.ids.len(), 3_500, "round {round}");
        assert_eq!(right.ids.len(), 3_500, "round {round}");
        for (key, id) in &left.ids {
            if let Some(other) = right.ids.get(key) {
                assert_eq!(id, other, "round {round}: one id per series");
            }
        }
        let created: HashSet<i64> = left.created.iter().chain(&right.created).copied().collect();
        assert_eq!(
            created.len(),
            left.created.len() + right.created.len(),
            "round {round}: each series created by one writer only"
        );
        assert_eq!(
            created.len(),
            4_000,
            "round {round}: every series created once"
        );
        forward.clear();
    }
    let client = db.connect().await;
    let count: i64 = client
        .query_one("SELECT count(*) FROM series", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 20_000);
    let projects: i64 = client
        .query_one("SELECT count(*) FROM projects", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(projects, 7, "projects registered with their first series");
}
