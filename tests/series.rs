//! Creating series in bulk on a real PostgreSQL: one scrape's new series in a few
//! statements, safe when several replicas create the same series at once.

mod common;

use common::TestDb;
use os_credits::config::Settings;
use os_credits::ingest;
use os_credits::store::migrations;
use os_credits::store::series::{self, NewSeries, SeriesCache};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

fn new_series(range: impl Iterator<Item = u32>) -> Vec<NewSeries> {
    range
        .map(|i| {
            let project = format!("p{}", i % 7);
            NewSeries {
                key: format!("project_vcpu_usage{{project_name=\"{project}\",site=\"s{i}\"}}"),
                metric: "project_vcpu_usage".into(),
                project,
            }
        })
        .collect()
}

/// Rows in `table`.
async fn row_count(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

async fn migrated(db: &TestDb) -> tokio_postgres::Client {
    let mut client = db.connect().await;
    migrations::run(&mut client).await.expect("migrations");
    client
}

/// The settings of `db` and the ingest context scraping uses, without target labels.
fn ingest_setup(db: &TestDb) -> (Settings, Arc<ingest::IngestContext>) {
    let settings = Settings::from_vars(db.vars()).expect("settings");
    let ctx = Arc::new(ingest::IngestContext::new(
        &settings.ingest,
        &settings.rules,
        BTreeMap::new(),
    ));
    (settings, ctx)
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
    let count = row_count(&client, "series").await;
    assert_eq!(count, 20_000);
    let projects = row_count(&client, "projects").await;
    assert_eq!(projects, 7, "projects registered with their first series");
}

/// Series stored before (a restart forgot them) are found, not created again, and
/// only the projects of the new ones are added; a project created at the same time (a
/// grant) is no conflict.
#[tokio::test]
async fn series_stored_before_are_found_and_only_the_rest_created() {
    let db = TestDb::create().await;
    let mut client = migrated(&db).await;
    let before = new_series(0..100);
    let tx = client.transaction().await.expect("begin");
    let stored = series::create_or_find(&tx, &before).await.expect("create");
    tx.commit().await.expect("commit");

    let mut asked = new_series(0..150);
    // a project no series had before
    for (i, s) in asked.iter_mut().enumerate().skip(140) {
        s.project = "late".into();
        s.key = format!("project_vcpu_usage{{project_name=\"late\",site=\"s{i}\"}}");
    }
    asked.reverse();
    // A grant creates the project "late" at the same moment, committing while the
    // series are inserted: that is no conflict.
    let mut granting = db.connect().await;
    let grant = granting.transaction().await.expect("begin");
    grant
        .batch_execute("INSERT INTO projects (name, granted_credits) VALUES ('late', 5)")
        .await
        .expect("grant");
    let tx = client.transaction().await.expect("begin");
    let (resolved, ()) = tokio::join!(series::create_or_find(&tx, &asked), async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        grant.commit().await.expect("commit the grant");
    });
    let resolved =
        resolved.expect("neither series stored before nor a project created meanwhile fail it");
    tx.commit().await.expect("commit");
    assert_eq!(resolved.ids.len(), 150);
    assert_eq!(
        resolved.created.len(),
        50,
        "only the new series are created"
    );
    for (key, id) in &stored.ids {
        assert_eq!(resolved.ids.get(key), Some(id), "{key} keeps its id");
    }
    let created: HashSet<i64> = resolved.created.iter().copied().collect();
    for s in &asked[..50] {
        assert!(created.contains(&resolved.ids[&s.key]), "{} created", s.key);
    }
    let rows = client
        .query("SELECT name FROM projects ORDER BY name", &[])
        .await
        .expect("projects");
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(names, ["late", "p0", "p1", "p2", "p3", "p4", "p5", "p6"]);
    let granted: String = client
        .query_one(
            "SELECT granted_credits::text FROM projects WHERE name = 'late'",
            &[],
        )
        .await
        .expect("grant")
        .get(0);
    assert_eq!(granted, "5", "the grant's project row is kept as it was");
    let count = row_count(&client, "series").await;
    assert_eq!(count, 150);
}

/// The series go through a staging table of the connection: a second call in the
/// same transaction, and the next transaction on the same connection, see only their
/// own series, never the ones staged before.
#[tokio::test]
async fn each_call_creates_and_finds_only_the_series_it_was_given() {
    let db = TestDb::create().await;
    let mut client = migrated(&db).await;
    let tx = client.transaction().await.expect("begin");
    let first = series::create_or_find(&tx, &new_series(0..300))
        .await
        .expect("first call");
    let second = series::create_or_find(&tx, &new_series(200..400))
        .await
        .expect("second call in the same transaction");
    tx.commit().await.expect("commit");
    assert_eq!((first.ids.len(), first.created.len()), (300, 300));
    assert_eq!(
        (second.ids.len(), second.created.len()),
        (200, 100),
        "the second call creates 300..399 and finds 200..299, nothing of the first's rest"
    );
    for s in new_series(200..300) {
        assert_eq!(second.ids.get(&s.key), first.ids.get(&s.key), "{}", s.key);
    }
    let tx = client.transaction().await.expect("begin");
    let third = series::create_or_find(&tx, &new_series(390..410))
        .await
        .expect("next transaction");
    tx.commit().await.expect("commit");
    assert_eq!((third.ids.len(), third.created.len()), (20, 10));
    let ids: HashSet<i64> = first
        .ids
        .values()
        .chain(second.ids.values())
        .chain(third.ids.values())
        .copied()
        .collect();
    assert_eq!(ids.len(), 410, "one id per series");
    assert_eq!(row_count(&client, "series").await, 410);
}

/// Two replicas ingesting bodies whose new series overlap, at the same time: one
/// replica's `COPY` of new series meets series the other just created, and its
/// retry through the merging path must store its samples anyway. Every sample is
/// stored once, every series exists once, and neither replica reports a failure.
#[tokio::test]
async fn replicas_creating_the_same_new_series_at_once_both_store_every_sample_once() {
    let db = TestDb::create().await;
    let _ = migrated(&db).await;
    let (settings, ctx) = ingest_setup(&db);
    let body = |range: std::ops::Range<u32>, reverse: bool| {
        let mut lines: Vec<String> = range
            .map(|i| {
                format!(
                    "project_vcpu_usage{{project_name=\"p{}\",site=\"s{i}\"}} {i}\n",
                    i % 7
                )
            })
            .collect();
        if reverse {
            lines.reverse();
        }
        lines.concat()
    };
    let (pool_a, pool_b) = (
        os_credits::store::pool(&settings.database).expect("pool"),
        os_credits::store::pool(&settings.database).expect("pool"),
    );
    let (cache_a, cache_b) = (SeriesCache::default(), SeriesCache::default());
    let start: chrono::DateTime<chrono::Utc> = "2026-06-01T00:00:00Z".parse().expect("time");
    let rounds = 4u32;
    for round in 0..rounds {
        let base = round * 10_000;
        let now = start + chrono::Duration::minutes(round.into());
        let (a, b) = tokio::join!(
            ingest::ingest_text(
                &pool_a,
                &cache_a,
                ctx.clone(),
                body(base..base + 2_000, false),
                now
            ),
            ingest::ingest_text(
                &pool_b,
                &cache_b,
                ctx.clone(),
                body(base + 1_000..base + 3_000, true),
                now
            ),
        );
        let a = a.unwrap_or_else(|e| panic!("round {round}, replica a: {e}"));
        let b = b.unwrap_or_else(|e| panic!("round {round}, replica b: {e}"));
        assert_eq!(
            a.stored + b.stored,
            3_000,
            "round {round}: each sample once"
        );
        assert_eq!(a.duplicates + b.duplicates, 1_000, "round {round}");
        assert_eq!(
            (a.series.len(), b.series.len()),
            (2_000, 2_000),
            "round {round}"
        );
    }
    let client = db.connect().await;
    let rows = client
        .query(
            "SELECT series_labels(s.series_key)->>'site' AS site, count(*) AS n, min(u.value) AS value
             FROM series s JOIN usage_samples u ON u.series_id = s.id GROUP BY 1",
            &[],
        )
        .await
        .expect("samples");
    let stored: HashMap<String, (i64, f64)> = rows
        .iter()
        .map(|r| (r.get("site"), (r.get("n"), r.get("value"))))
        .collect();
    assert_eq!(stored.len(), (rounds * 3_000) as usize);
    for round in 0..rounds {
        for i in round * 10_000..round * 10_000 + 3_000 {
            assert_eq!(
                stored.get(&format!("s{i}")),
                Some(&(1, f64::from(i))),
                "s{i}"
            );
        }
    }
    let series = row_count(&client, "series").await;
    assert_eq!(series, i64::from(rounds * 3_000), "every series once");
}

/// A body of several parse chunks (1 MiB each): each chunk's new series get their ids
/// and their samples are written while the next is parsed, the series rows at the
/// end. Every series is created once, also one that comes back in a later chunk, and
/// every sample lands in its own series; the next scrape of the same series creates
/// none.
#[tokio::test]
async fn a_body_of_many_chunks_creates_each_new_series_once() {
    let db = TestDb::create().await;
    let client = migrated(&db).await;
    let (settings, ctx) = ingest_setup(&db);
    let pool = os_credits::store::pool(&settings.database).expect("pool");
    let cache = SeriesCache::default();
    let series = 40_000u32;
    let body = |value: u32| {
        let mut body = String::from(
            "project_vcpu_usage{project_name=\"p0\",site=\"again\"} 1 1780000000000\n",
        );
        for i in 0..series {
            body.push_str(&format!(
                "project_vcpu_usage{{project_name=\"p{}\",site=\"s{i}\",padding=\"{:040}\"}} {}\n",
                i % 7,
                i,
                i + value
            ));
        }
        body.push_str("project_vcpu_usage{project_name=\"p0\",site=\"again\"} 2 1780000030000\n");
        body
    };
    let first = body(0);
    assert!(
        first.len() > 3 << 20,
        "several chunks: {} bytes",
        first.len()
    );
    let start: chrono::DateTime<chrono::Utc> = "2026-06-01T00:00:00Z".parse().expect("time");
    let outcome = ingest::ingest_text(&pool, &cache, ctx.clone(), first, start)
        .await
        .expect("first scrape");
    assert_eq!(
        (outcome.stored, outcome.duplicates),
        (u64::from(series) + 2, 0)
    );
    assert!(
        !outcome.merged,
        "a fresh database: the first try stores it all, no merging retry"
    );
    assert_eq!(row_count(&client, "series").await, i64::from(series) + 1);
    // The first chunk's share of new series tells what the whole body needs: ids are
    // taken about once (an eighth to spare), not in doubling blocks (which took
    // some 1.8 ids a series).
    let taken: i64 = client
        .query_one("SELECT last_value FROM series_id_seq", &[])
        .await
        .expect("sequence")
        .get(0);
    assert!(
        taken <= i64::from(series) * 5 / 4,
        "{taken} ids taken for {series} series"
    );
    let wrong: i64 = client
        .query_one(
            "SELECT count(*) FROM usage_samples u JOIN series s ON s.id = u.series_id
             WHERE series_labels(s.series_key)->>'site' <> 'again'
               AND u.value::bigint <> substr(series_labels(s.series_key)->>'site', 2)::bigint",
            &[],
        )
        .await
        .expect("samples")
        .get(0);
    assert_eq!(wrong, 0, "each sample in its own series");
    let again: Vec<f64> = client
        .query(
            "SELECT u.value FROM usage_samples u JOIN series s ON s.id = u.series_id
             WHERE series_labels(s.series_key)->>'site' = 'again' ORDER BY u.time",
            &[],
        )
        .await
        .expect("samples")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(again, [1.0, 2.0]);
    let next = start + chrono::Duration::seconds(30);
    let outcome = ingest::ingest_text(&pool, &cache, ctx, body(1), next)
        .await
        .expect("second scrape");
    assert_eq!((outcome.stored, outcome.duplicates), (u64::from(series), 2));
    assert!(
        !outcome.merged,
        "the cache knows `again`'s samples are not newer: staged in the first try"
    );
    assert_eq!(row_count(&client, "series").await, i64::from(series) + 1);
}

/// A query's `site` column against its second column, one row per site.
async fn by_site<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> HashMap<String, T> {
    client
        .query(sql, params)
        .await
        .expect(sql)
        .iter()
        .map(|r| (r.get("site"), r.get(1)))
        .collect()
}

/// The values stored at `time`, by the `site` label of their series.
async fn values_at(
    client: &tokio_postgres::Client,
    time: chrono::DateTime<chrono::Utc>,
) -> HashMap<String, f64> {
    let sql = "SELECT series_labels(s.series_key)->>'site' AS site, u.value FROM usage_samples u
               JOIN series s ON s.id = u.series_id WHERE u.time = $1";
    by_site(client, sql, &[&time]).await
}

/// A body written as the target's last one is matched line by line against that
/// one's layout: every sample lands in its own series as when each key is built and
/// looked up. A series inserted in the middle, a line spelled differently (same
/// series, labels in another order), a NaN, a series gone: those lines go the long
/// way and still land right; the next body is matched against this one. A context
/// new to the process (a restart) or a replaced cache matches nothing.
#[tokio::test]
async fn a_body_written_as_the_last_one_is_matched_line_by_line_and_lands_the_same() {
    let db = TestDb::create().await;
    let client = migrated(&db).await;
    let (settings, ctx) = ingest_setup(&db);
    let pool = os_credits::store::pool(&settings.database).expect("pool");
    let cache = SeriesCache::default();
    let line = |i: u32, value: f64| {
        format!(
            "project_vcpu_usage{{project_name=\"p{}\",site=\"s{i}\"}} {value}\n",
            i % 7
        )
    };
    // Site i's value at scrape n is n * 10,000 + i: any sample in another series shows.
    let body = |n: u32, sites: &mut dyn Iterator<Item = u32>| {
        sites
            .map(|i| line(i, f64::from(n * 10_000 + i)))
            .collect::<String>()
    };
    let expected = |n: u32, sites: &mut dyn Iterator<Item = u32>| {
        sites
            .map(|i| (format!("s{i}"), f64::from(n * 10_000 + i)))
            .collect::<HashMap<_, _>>()
    };
    let start: chrono::DateTime<chrono::Utc> = "2026-06-01T00:00:00Z".parse().expect("time");
    let at = |n: u32| start + chrono::Duration::seconds(30 * i64::from(n));
    let scrape = |ctx: Arc<ingest::IngestContext>, cache: SeriesCache, n: u32, text: String| {
        let pool = pool.clone();
        async move {
            ingest::ingest_text(&pool, &cache, ctx, text, at(n))
                .await
                .expect("scrape")
        }
    };

    // 1 creates the series, 2 finds them by key and learns the layout, 3 matches.
    for n in 1..=3 {
        let outcome = scrape(ctx.clone(), cache.clone(), n, body(n, &mut (0..2_000))).await;
        assert_eq!(outcome.stored, 2_000, "scrape {n}");
        assert_eq!(
            outcome.matched,
            if n == 3 { 2_000 } else { 0 },
            "scrape {n}"
        );
        assert_eq!(
            values_at(&client, at(n)).await,
            expected(n, &mut (0..2_000))
        );
    }

    // 4: a new series in the middle, site 1500 spelled with its labels swapped, a
    // NaN for site 1600, site 1999 gone.
    let mut text = String::new();
    for i in 0..1_999 {
        match i {
            1_000 => {
                text.push_str(&line(1_000, 41_000.0));
                text.push_str("project_vcpu_usage{project_name=\"p9\",site=\"new\"} 7\n");
            }
            1_500 => text.push_str(&format!(
                "project_vcpu_usage{{site=\"s1500\",project_name=\"p{}\"}} 41500\n",
                1_500 % 7
            )),
            1_600 => text.push_str(&line(1_600, f64::NAN)),
            _ => text.push_str(&line(i, f64::from(40_000 + i))),
        }
    }
    let outcome = scrape(ctx.clone(), cache.clone(), 4, text).await;
    assert_eq!(
        outcome.stored,
        1_999 - 1 + 1,
        "all but the NaN, and the new one"
    );
    assert_eq!(outcome.skipped.not_finite, 1);
    // (a line that differs leaves the place expected next as it was: after the
    // inserted series, s1001 is where it was expected; after the respelled s1500
    // every line differs from that place)
    assert_eq!(outcome.matched, 1_500);
    let mut want = expected(4, &mut (0..1_999).filter(|&i| i != 1_600));
    want.insert("new".into(), 7.0);
    assert_eq!(values_at(&client, at(4)).await, want);
    assert_eq!(row_count(&client, "series").await, 2_001);

    // 5: the same lines as 4 (values of 5, s1600 a number again): all matched but
    // the new series (created by 4, found by key now) and s1600 (not a row last time).
    let mut text = String::new();
    for i in 0..1_999 {
        if i == 1_000 {
            text.push_str(&line(1_000, 51_000.0));
            text.push_str("project_vcpu_usage{project_name=\"p9\",site=\"new\"} 8\n");
        } else if i == 1_500 {
            text.push_str(&format!(
                "project_vcpu_usage{{site=\"s1500\",project_name=\"p{}\"}} 51500\n",
                1_500 % 7
            ));
        } else {
            text.push_str(&line(i, f64::from(50_000 + i)));
        }
    }
    let outcome = scrape(ctx.clone(), cache.clone(), 5, text.clone()).await;
    assert_eq!(outcome.stored, 2_000);
    assert_eq!(outcome.matched, 1_998);
    let mut want = expected(5, &mut (0..1_999));
    want.insert("new".into(), 8.0);
    assert_eq!(values_at(&client, at(5)).await, want);

    // 6: the same again, s10 a NaN: every line matched, the NaN skipped as ever.
    let text = text
        .replace(" 5", " 6")
        .replace("site=\"s10\"} 60010", "site=\"s10\"} NaN");
    let outcome = scrape(ctx.clone(), cache.clone(), 6, text).await;
    assert_eq!((outcome.stored, outcome.matched), (1_999, 2_000));
    assert_eq!(outcome.skipped.not_finite, 1);
    let mut want = expected(6, &mut (0..1_999).filter(|&i| i != 10));
    want.insert("new".into(), 8.0);
    assert_eq!(values_at(&client, at(6)).await, want);

    // A replaced cache (ids it does not know) and a new context (a restart) match
    // nothing, and store the same.
    let fresh = Arc::new(ingest::IngestContext::new(
        &settings.ingest,
        &settings.rules,
        BTreeMap::new(),
    ));
    for (n, ctx, cache) in [
        (7, ctx.clone(), SeriesCache::default()),
        (8, fresh, cache.clone()),
    ] {
        let outcome = scrape(ctx, cache, n, body(n, &mut (0..1_999))).await;
        assert_eq!((outcome.stored, outcome.matched), (1_999, 0), "scrape {n}");
        assert_eq!(
            values_at(&client, at(n)).await,
            expected(n, &mut (0..1_999))
        );
    }
}

/// Id of each series by its `site` label.
async fn site_ids(client: &tokio_postgres::Client) -> HashMap<String, i64> {
    let sql = "SELECT series_labels(series_key)->>'site' AS site, id FROM series";
    by_site(client, sql, &[]).await
}

/// A replica restarted with an empty cache gets a body of several chunks, half of
/// whose series were stored before the restart: its `COPY` of what it takes for new
/// series meets a stored one, and the retry through the merging path finds the
/// stored series and creates only the rest. Every series exists once, the stored ones
/// keep their ids, every sample lands in its own series once, and the next scrape
/// creates nothing.
#[tokio::test]
async fn after_a_restart_series_stored_before_are_found_and_only_the_rest_created() {
    let db = TestDb::create().await;
    let client = migrated(&db).await;
    let (settings, ctx) = ingest_setup(&db);
    let pool = os_credits::store::pool(&settings.database).expect("pool");
    let series = 40_000u32;
    let stored_before = 20_000u32;
    let body = |range: std::ops::Range<u32>| {
        range
            .map(|i| {
                format!(
                    "project_vcpu_usage{{project_name=\"p{}\",site=\"s{i}\",padding=\"{:040}\"}} {i}\n",
                    i % 7,
                    i
                )
            })
            .collect::<String>()
    };
    let start: chrono::DateTime<chrono::Utc> = "2026-06-01T00:00:00Z".parse().expect("time");
    let before_restart = SeriesCache::default();
    ingest::ingest_text(
        &pool,
        &before_restart,
        ctx.clone(),
        body(stored_before..series),
        start,
    )
    .await
    .expect("scrape before the restart");
    let ids_before = site_ids(&client).await;
    assert_eq!(ids_before.len(), (series - stored_before) as usize);

    let whole = body(0..series);
    assert!(
        whole.len() > 3 << 20,
        "several 1 MiB chunks: {} bytes",
        whole.len()
    );
    let restarted = SeriesCache::default();
    let next = start + chrono::Duration::seconds(30);
    let outcome = ingest::ingest_text(&pool, &restarted, ctx.clone(), whole.clone(), next)
        .await
        .expect("first scrape after the restart");
    assert_eq!((outcome.stored, outcome.duplicates), (u64::from(series), 0));
    assert!(
        outcome.merged,
        "the direct COPY met the series stored before"
    );
    assert_eq!(outcome.series.len(), series as usize);
    let ids_after = site_ids(&client).await;
    assert_eq!(ids_after.len(), series as usize, "every series once");
    for (site, id) in &ids_before {
        assert_eq!(ids_after.get(site), Some(id), "{site} keeps its id");
    }
    let samples: HashMap<String, (i64, f64, f64)> = client
        .query(
            "SELECT series_labels(s.series_key)->>'site' AS site, count(*) AS n,
                    min(u.value) AS low, max(u.value) AS high
             FROM series s JOIN usage_samples u ON u.series_id = s.id GROUP BY 1",
            &[],
        )
        .await
        .expect("samples")
        .iter()
        .map(|r| (r.get("site"), (r.get("n"), r.get("low"), r.get("high"))))
        .collect();
    for i in 0..series {
        let times = if i < stored_before { 1 } else { 2 };
        assert_eq!(
            samples.get(&format!("s{i}")),
            Some(&(times, f64::from(i), f64::from(i))),
            "s{i}"
        );
    }
    let later = next + chrono::Duration::seconds(30);
    let outcome = ingest::ingest_text(&pool, &restarted, ctx, whole, later)
        .await
        .expect("second scrape after the restart");
    assert_eq!((outcome.stored, outcome.duplicates), (u64::from(series), 0));
    assert_eq!(row_count(&client, "series").await, i64::from(series));
}

/// A first scrape registers the projects of its new series as its chunks come, each
/// project once, also one that comes back in a later chunk: no series is left
/// without its project, and a project a grant created before keeps its grant.
#[tokio::test]
async fn the_projects_of_new_series_are_registered_once_and_a_grant_is_kept() {
    let db = TestDb::create().await;
    let client = migrated(&db).await;
    client
        .batch_execute("INSERT INTO projects (name, granted_credits) VALUES ('p7', 5)")
        .await
        .expect("grant");
    let (settings, ctx) = ingest_setup(&db);
    let pool = os_credits::store::pool(&settings.database).expect("pool");
    let projects = 3_000u32;
    // Every project in every chunk: 30,000 series, project i % 3,000.
    let body: String = (0..10 * projects)
        .map(|i| {
            format!(
                "project_vcpu_usage{{project_name=\"p{}\",site=\"s{i}\",padding=\"{:040}\"}} {i}\n",
                i % projects,
                i
            )
        })
        .collect();
    assert!(body.len() > 2 << 20, "several chunks: {} bytes", body.len());
    let now: chrono::DateTime<chrono::Utc> = "2026-06-01T00:00:00Z".parse().expect("time");
    let outcome = ingest::ingest_text(&pool, &SeriesCache::default(), ctx, body, now)
        .await
        .expect("first scrape");
    assert_eq!(outcome.stored, u64::from(10 * projects));
    let names: Vec<String> = client
        .query("SELECT name FROM projects ORDER BY name", &[])
        .await
        .expect("projects")
        .iter()
        .map(|r| r.get("name"))
        .collect();
    let mut expected: Vec<String> = (0..projects).map(|i| format!("p{i}")).collect();
    expected.sort();
    assert_eq!(names, expected, "each project once");
    let orphans: i64 = client
        .query_one(
            "SELECT count(*) FROM series s
             WHERE NOT EXISTS (SELECT 1 FROM projects p WHERE p.name = s.project)",
            &[],
        )
        .await
        .expect("orphans")
        .get(0);
    assert_eq!(orphans, 0);
    let granted: String = client
        .query_one(
            "SELECT granted_credits::text FROM projects WHERE name = 'p7'",
            &[],
        )
        .await
        .expect("grant")
        .get(0);
    assert_eq!(granted, "5", "the grant's row is kept");
}

/// Scrapes `body` into a fresh database while a grant's transaction holds the
/// uncommitted project `p3` (5 credits), committed `commit_after_ms` after the
/// scrape began; returns the scrape's outcome, the database (dropped with it) and a
/// client of it.
async fn scraped_while_a_grant_creates_p3(
    body: String,
    commit_after_ms: u64,
) -> (
    Result<ingest::IngestOutcome, ingest::IngestError>,
    TestDb,
    tokio_postgres::Client,
) {
    let db = TestDb::create().await;
    let client = migrated(&db).await;
    let (settings, ctx) = ingest_setup(&db);
    let pool = os_credits::store::pool(&settings.database).expect("pool");
    let mut granting = db.connect().await;
    let grant = granting.transaction().await.expect("begin");
    grant
        .batch_execute("INSERT INTO projects (name, granted_credits) VALUES ('p3', 5)")
        .await
        .expect("grant");
    let now: chrono::DateTime<chrono::Utc> = "2026-06-01T00:00:00Z".parse().expect("time");
    let cache = SeriesCache::default();
    let (outcome, ()) = tokio::join!(ingest::ingest_text(&pool, &cache, ctx, body, now), async {
        tokio::time::sleep(std::time::Duration::from_millis(commit_after_ms)).await;
        grant.commit().await.expect("commit the grant");
    });
    (outcome, db, client)
}

/// A grant creating a project at the very moment a first scrape registers the same
/// project: the scrape's plain insert waits for the grant, meets its project, and the
/// scrape is stored through the merging retry instead of failing. Every sample is
/// stored once, every project exists once, and the grant keeps its credits.
#[tokio::test]
async fn a_grant_creating_a_project_while_a_first_scrape_registers_it_is_no_failure() {
    let body: String = (0..700u32)
        .map(|i| {
            format!(
                "project_vcpu_usage{{project_name=\"p{}\",site=\"s{i}\"}} {i}\n",
                i % 7
            )
        })
        .collect();
    // (the scrape waits for the grant's uncommitted project meanwhile)
    let (outcome, _db, client) = scraped_while_a_grant_creates_p3(body, 300).await;
    let outcome = outcome.expect("the scrape is stored, not failed");
    assert_eq!((outcome.stored, outcome.duplicates), (700, 0));
    assert_eq!(row_count(&client, "series").await, 700);
    assert_eq!(row_count(&client, "usage_samples").await, 700);
    let projects: Vec<(String, String)> = client
        .query(
            "SELECT name, granted_credits::text AS granted FROM projects ORDER BY name",
            &[],
        )
        .await
        .expect("projects")
        .iter()
        .map(|r| (r.get("name"), r.get("granted")))
        .collect();
    let expected: Vec<(String, String)> = (0..7)
        .map(|i| (format!("p{i}"), if i == 3 { "5" } else { "0" }.to_owned()))
        .collect();
    assert_eq!(projects, expected);
}

/// A body of `projects` projects, one new series each, as a first scrape sees it.
fn one_series_per_project(projects: u32) -> String {
    (0..projects)
        .map(|i| format!("project_vcpu_usage{{project_name=\"p{i}\",site=\"s{i}\"}} {i}\n"))
        .collect()
}

/// New projects of one body from which they are registered apart (the service's
/// `APART_FROM`).
const PROJECTS: u32 = 5_000;

/// Projects and series rows visible to another session.
async fn projects_and_series(client: &tokio_postgres::Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM projects), (SELECT count(*) FROM series)",
            &[],
        )
        .await
        .expect("counts");
    (row.get(0), row.get(1))
}

/// A first scrape bringing many projects registers them on a second connection,
/// committed while its own transaction writes the series rows: with those held at a
/// gate, the projects are there for everyone and the series not yet; let go,
/// everything is stored once.
#[tokio::test]
async fn the_projects_of_a_first_scrape_are_registered_apart_while_its_series_are_written() {
    const GATE: i64 = 0x05c_5e71;
    let db = TestDb::create().await;
    let client = migrated(&db).await;
    client
        .batch_execute(&format!(
            "CREATE FUNCTION osc_test_series_gate() RETURNS trigger LANGUAGE plpgsql AS $f$
             BEGIN PERFORM pg_advisory_xact_lock({GATE}); RETURN NULL; END $f$;
             CREATE TRIGGER osc_test_series_gate BEFORE INSERT ON series
                 FOR EACH STATEMENT EXECUTE FUNCTION osc_test_series_gate();
             SELECT pg_advisory_lock({GATE});"
        ))
        .await
        .expect("gate");
    let (settings, ctx) = ingest_setup(&db);
    let pool = os_credits::store::pool(&settings.database).expect("pool");
    let now: chrono::DateTime<chrono::Utc> = "2026-06-01T00:00:00Z".parse().expect("time");
    let scrape = tokio::spawn(async move {
        let cache = SeriesCache::default();
        ingest::ingest_text(&pool, &cache, ctx, one_series_per_project(PROJECTS), now).await
    });
    common::until_someone_waits_for_advisory_lock(&client, GATE).await;
    // (the registration apart may still be on its way when the gate is reached)
    let seen = common::eventually(
        std::time::Duration::from_secs(20),
        "the projects committed apart",
        || async {
            let seen = projects_and_series(&client).await;
            (seen.0 == i64::from(PROJECTS)).then_some(seen)
        },
    )
    .await;
    assert_eq!(
        seen,
        (i64::from(PROJECTS), 0),
        "projects committed, series not yet"
    );
    client
        .batch_execute(&format!("SELECT pg_advisory_unlock({GATE})"))
        .await
        .expect("open the gate");
    let outcome = scrape.await.expect("task").expect("the scrape is stored");
    assert_eq!(
        (outcome.stored, outcome.merged),
        (u64::from(PROJECTS), false)
    );
    assert_eq!(
        projects_and_series(&client).await,
        (i64::from(PROJECTS), i64::from(PROJECTS))
    );
}

/// A project another transaction is creating while a first scrape registers its
/// projects apart: the registration apart gives up after a short wait (the other
/// transaction might wait for the scrape's series) and the scrape's own transaction
/// registers them, meets the other's project once it commits, and stores everything
/// through the merging retry. Every project exists once and the grant keeps its
/// credits.
#[tokio::test]
async fn a_project_created_elsewhere_meanwhile_is_no_failure_when_projects_are_registered_apart() {
    // (longer than the registration apart waits, shorter than the lock timeout)
    let (outcome, _db, client) =
        scraped_while_a_grant_creates_p3(one_series_per_project(PROJECTS), 600).await;
    let outcome = outcome.expect("the scrape is stored, not failed");
    assert_eq!(
        (outcome.stored, outcome.duplicates),
        (u64::from(PROJECTS), 0)
    );
    assert_eq!(
        projects_and_series(&client).await,
        (i64::from(PROJECTS), i64::from(PROJECTS))
    );
    let granted: Vec<(String, String)> = client
        .query(
            "SELECT name, granted_credits::text FROM projects WHERE granted_credits <> 0",
            &[],
        )
        .await
        .expect("grants")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(granted, [("p3".to_owned(), "5".to_owned())]);
}

/// What the database refuses on its own (migration 0014), so a bug or a hand-written
/// statement fails loudly: rows naming a series that does not exist, NaN counter
/// decreases, and ledger rows whose columns do not fit their kind. The rows billing
/// writes (a usage row with its price, an approved held charge spanning a price
/// change without one, a grant, an adjustment) are accepted.
#[tokio::test]
async fn the_database_refuses_rows_that_break_what_billing_relies_on() {
    let db = TestDb::create().await;
    let mut client = migrated(&db).await;
    let id = common::seed_series(
        &mut client,
        "project_vcpu_usage",
        &[("project_name", "Alpha")],
        "Alpha",
    )
    .await;
    let missing = id + 1_000;
    let usage = "INSERT INTO ledger (project, time, kind, metric, usage_from, quantity, price,
                                     used_delta, used_after, granted_after, actor)";
    let accepted = [
        format!("INSERT INTO billing_cursors (series_id, last_time, last_value) VALUES ({id}, now(), 1)"),
        format!("INSERT INTO counter_decreases VALUES ({id}, now(), 5, 1, 'rebase')"),
        format!("INSERT INTO unbilled_gaps VALUES ({id}, now() - interval '1 hour', now())"),
        format!("{usage} VALUES ('Alpha', now(), 'usage', 'm', now(), 2, 0.5, 1, 1, 0, NULL)"),
        format!("{usage} VALUES ('Alpha', now(), 'usage', 'm', now(), 2, NULL, 1, 2, 0, 'op')"),
        "INSERT INTO ledger (project, time, kind, granted_delta, used_after, granted_after)
         VALUES ('Alpha', now(), 'grant', 10, 2, 10)"
            .to_owned(),
        "INSERT INTO ledger (project, time, kind, used_delta, used_after, granted_after)
         VALUES ('Alpha', now(), 'adjustment', -1, 1, 10)"
            .to_owned(),
    ];
    for statement in &accepted {
        client
            .batch_execute(statement)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e:?}"));
    }
    let refused = [
        (format!("INSERT INTO billing_cursors (series_id, last_time, last_value) VALUES ({missing}, now(), 1)"), "billing_cursors_series_fk"),
        (format!("INSERT INTO counter_decreases VALUES ({missing}, now(), 5, 1, 'rebase')"), "counter_decreases_series_fk"),
        (format!("INSERT INTO counter_decreases VALUES ({id}, now() + interval '1 s', 'NaN', 1, 'rebase')"), "counter_decreases_values_check"),
        (format!("INSERT INTO unbilled_gaps VALUES ({missing}, now(), now())"), "unbilled_gaps_series_fk"),
        (format!("INSERT INTO quarantined_samples (series_id, time, value, reason) VALUES ({missing}, now(), 1, 'x')"), "quarantined_samples_series_fk"),
        (format!("INSERT INTO series_rates VALUES ({missing}, 1, 60)"), "series_rates_series_fk"),
        (format!("INSERT INTO stale_series VALUES ({missing}, 't', now(), now())"), "stale_series_series_fk"),
        (
            format!("INSERT INTO held_charges (project, series_id, metric, from_time, to_time, from_value, to_value, quantity, credits, reason, held_at)
                     VALUES ('Alpha', {missing}, 'm', now(), now(), 1, 2, 1, 1, 'jump', now())"),
            "held_charges_series_fk",
        ),
        // usage without its price (and no person who approved it), quantity, start, metric
        (format!("{usage} VALUES ('Alpha', now(), 'usage', 'm', now(), 2, NULL, 1, 1, 0, NULL)"), "ledger_kind_columns_check"),
        (format!("{usage} VALUES ('Alpha', now(), 'usage', 'm', now(), NULL, 0.5, 1, 1, 0, NULL)"), "ledger_kind_columns_check"),
        (format!("{usage} VALUES ('Alpha', now(), 'usage', 'm', NULL, 2, 0.5, 1, 1, 0, NULL)"), "ledger_kind_columns_check"),
        (format!("{usage} VALUES ('Alpha', now(), 'usage', NULL, now(), 2, 0.5, 1, 1, 0, NULL)"), "ledger_kind_columns_check"),
        // usage changing the grant
        (
            "INSERT INTO ledger (project, time, kind, metric, usage_from, quantity, price, used_delta, granted_delta, used_after, granted_after)
             VALUES ('Alpha', now(), 'usage', 'm', now(), 2, 0.5, 1, 5, 1, 5)".to_owned(),
            "ledger_kind_columns_check",
        ),
        // a grant changing used credits or naming a metric
        (
            "INSERT INTO ledger (project, time, kind, granted_delta, used_delta, used_after, granted_after)
             VALUES ('Alpha', now(), 'grant', 10, 1, 2, 10)".to_owned(),
            "ledger_kind_columns_check",
        ),
        (
            "INSERT INTO ledger (project, time, kind, metric, granted_delta, used_after, granted_after)
             VALUES ('Alpha', now(), 'grant', 'm', 10, 2, 10)".to_owned(),
            "ledger_kind_columns_check",
        ),
        // an adjustment changing the grant or carrying a quantity
        (
            "INSERT INTO ledger (project, time, kind, used_delta, granted_delta, used_after, granted_after)
             VALUES ('Alpha', now(), 'adjustment', -1, 3, 1, 13)".to_owned(),
            "ledger_kind_columns_check",
        ),
        (
            "INSERT INTO ledger (project, time, kind, used_delta, quantity, used_after, granted_after)
             VALUES ('Alpha', now(), 'adjustment', -1, 3, 1, 10)".to_owned(),
            "ledger_kind_columns_check",
        ),
    ];
    for (statement, constraint) in &refused {
        let error = client
            .batch_execute(statement)
            .await
            .expect_err(&format!("refused: {statement}"));
        let db_error = error.as_db_error().unwrap_or_else(|| panic!("{error:?}"));
        assert_eq!(
            db_error.constraint(),
            Some(*constraint),
            "{statement}: {db_error:?}"
        );
    }
}

/// A database migrated up to (not including) `version`, as an older service left it.
async fn migrated_before(db: &TestDb, version: i32) -> tokio_postgres::Client {
    let client = db.connect().await;
    client
        .batch_execute(
            "CREATE TABLE os_credits_migrations (
                version integer PRIMARY KEY, name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .expect("bookkeeping");
    for m in migrations::MIGRATIONS
        .iter()
        .filter(|m| m.version < version)
    {
        client.batch_execute(m.sql).await.expect(m.name);
        client
            .execute(
                "INSERT INTO os_credits_migrations (version, name) VALUES ($1, $2)",
                &[&m.version, &m.name],
            )
            .await
            .expect("record");
    }
    client
}

#[tokio::test]
async fn series_labels_move_from_their_column_into_the_key_without_losing_one() {
    // Label sets the old column held, with the keys the service wrote for them.
    let sets: Vec<Vec<(&str, &str)>> = vec![
        vec![("project_name", "p1"), ("domain_id", "default")],
        vec![
            ("project_name", "p2"),
            ("note", "a \"quoted\", {braced} \\ line\nbreak"),
        ],
        vec![
            ("project_name", "p3"),
            ("a=\"1\",b", "2"),
            ("a=", "=\""),
            ("ü", ""),
        ],
        vec![("project_name", "p4"), ("x\\\"\n", "\\n")],
    ];
    let db = TestDb::create().await;
    let mut client = migrated_before(&db, 17).await;
    let mut expected = BTreeMap::new();
    for set in &sets {
        let mut sorted = set.clone();
        sorted.sort();
        let mut key = String::new();
        series::write_series_key(&mut key, "project_vcpu_usage", sorted.iter().copied());
        let labels: BTreeMap<String, String> = sorted
            .iter()
            .map(|&(n, v)| (n.to_owned(), v.to_owned()))
            .collect();
        client
            .execute(
                "INSERT INTO series (metric, labels, series_key, project)
                 VALUES ('project_vcpu_usage', $1, $2, $3)",
                &[
                    &serde_json::to_value(&labels).unwrap(),
                    &key,
                    &labels["project_name"],
                ],
            )
            .await
            .expect("old series");
        expected.insert(key, labels);
    }
    migrations::run(&mut client).await.expect("migration 17");
    let columns: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.columns
             WHERE table_name = 'series' AND column_name = 'labels'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(columns, 0, "the labels column is gone");
    for row in client
        .query(
            "SELECT series_key, series_labels(series_key) AS labels FROM series",
            &[],
        )
        .await
        .unwrap()
    {
        let key: String = row.get("series_key");
        let in_sql: BTreeMap<String, String> =
            serde_json::from_value(row.get("labels")).expect("an object of strings");
        let (_, in_rust) = series::labels_of_key(&key).expect("canonical");
        assert_eq!(in_sql, expected[&key], "series_labels of {key}");
        assert_eq!(in_rust, expected[&key], "labels_of_key of {key}");
    }
}

#[tokio::test]
async fn a_series_whose_key_does_not_give_back_its_labels_keeps_the_column() {
    let db = TestDb::create().await;
    let mut client = migrated_before(&db, 17).await;
    client
        .batch_execute(
            "INSERT INTO series (metric, labels, series_key, project) VALUES
             ('m', '{\"project_name\": \"p\"}', 'm{project_name=\"p\"}', 'p'),
             ('m', '{\"project_name\": \"q\", \"site\": \"x\"}', 'm{project_name=\"q\"}', 'q')",
        )
        .await
        .expect("old series");
    let error = migrations::run(&mut client).await.expect_err("refused");
    assert!(
        format!("{error:#}").contains("1 series have labels their key does not give back"),
        "{error:#}"
    );
    let labels: Vec<serde_json::Value> = client
        .query("SELECT labels FROM series ORDER BY id", &[])
        .await
        .expect("the column is kept")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(labels.len(), 2);
}
