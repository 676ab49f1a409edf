//! The jump guard end to end: a federation-shaped exporter on loopback (explicit
//! millisecond timestamps), real scrapes, billing runs and the held-charge API on a
//! real PostgreSQL, with totals computed by hand.

mod common;

use chrono::{DateTime, Duration, DurationRound, Utc};
use common::exporter::{Answer, FixtureExporter};
use common::{spawn_app, TestApp};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::str::FromStr;

const KEY: &str = "held-test-key";

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// A project's series as the de.NBI exporter names it, through a federating Prometheus.
struct Site {
    app: TestApp,
    exporter: FixtureExporter,
    /// Sample times are offsets from here (two hours ago, whole seconds).
    start: DateTime<Utc>,
}

impl Site {
    async fn start() -> Self {
        let exporter = FixtureExporter::start(Answer::ok("")).await;
        let app = spawn_app(&[("SCRAPE_TARGETS", &exporter.url), ("API_KEY", KEY)]).await;
        let start = (Utc::now() - Duration::hours(2))
            .duration_trunc(Duration::seconds(1))
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            app,
            exporter,
            start,
        }
    }

    /// The exporter serves `value` at `seconds` after the start; one scrape, one billing run.
    async fn observe(&self, seconds: i64, value: &str) -> Value {
        let ms = (self.start + Duration::seconds(seconds)).timestamp_millis();
        self.exporter.set(Answer::ok(format!(
            "# TYPE project_vcpu_usage untyped\n\
             project_vcpu_usage{{project_id=\"p1\",project_name=\"alpha\"}} {value} {ms}\n"
        )));
        let scraped = self.app.scrape().await;
        assert!(
            scraped.iter().all(|(_, a)| a.result.is_ok()),
            "scrape at {seconds}: {scraped:?}"
        );
        let run = self.post("/api/billing/run", Value::Null).await;
        assert_eq!(run.0, 200, "billing run: {}", run.1);
        run.1
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let mut request = self
            .app
            .http
            .post(format!("{}{path}", self.app.address))
            .header("X-API-KEY", KEY);
        if !body.is_null() {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{e}"));
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn json(&self, path: &str) -> Value {
        let response = self.app.get(path).await;
        assert_eq!(response.status(), 200, "{path}");
        response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    async fn used(&self) -> Decimal {
        self.app
            .db
            .connect()
            .await
            .query_one(
                "SELECT used_credits FROM projects WHERE name = 'alpha'",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .get(0)
    }

    async fn held(&self) -> Vec<Value> {
        self.json("/api/projects/alpha/held")
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// 4 vCPU-hours per hour for half an hour: 199.35 → 201.35, 2 credits billed.
    async fn steady_half_hour(&self) {
        for (seconds, value) in [(0, "199.35"), (900, "200.35"), (1800, "201.35")] {
            self.observe(seconds, value).await;
        }
        assert_eq!(self.used().await, dec("2"), "half an hour at 4/h");
    }
}

#[tokio::test]
async fn a_re_weighting_reverted_is_held_then_rejected_automatically_and_bills_nothing() {
    let site = Site::start().await;
    site.steady_half_hour().await;
    // Weight 1 → 5: the whole history re-weighted within one 5 s update.
    site.observe(1805, "1006.79").await;
    assert_eq!(site.used().await, dec("2"), "the jump is not billed");
    let held = site.held().await;
    assert_eq!(held.len(), 1, "{held:?}");
    let h = &held[0];
    assert_eq!(h["status"], "held");
    assert_eq!(h["quantity"], "805.44");
    assert_eq!(h["credits"], "805.44");
    assert_eq!(h["series"]["project_name"], "alpha");
    assert_eq!(h["from_value"], "201.35");
    assert_eq!(h["to_value"], "1006.79");
    let detail = site.json("/api/projects/alpha").await;
    assert_eq!(detail["held_credits"], "805.44", "{detail}");
    assert_eq!(detail["used_credits"], "2.00");
    assert_eq!(detail["held_charges"][0]["id"], h["id"]);
    // Three minutes at the new weights (20/h, plausible) are billed from the new value.
    site.observe(1985, "1007.79").await;
    assert_eq!(site.used().await, dec("3"));
    // The weights are reverted: the counter drops back.
    site.observe(1990, "201.58").await;
    let held = site.held().await;
    assert_eq!(held[0]["status"], "rejected", "{held:?}");
    assert_eq!(held[0]["decided_by"], "os-credits");
    assert!(
        held[0]["decision_reason"]
            .as_str()
            .is_some_and(|r| r.contains("dropped back from 1007.79 to 201.58")),
        "{held:?}"
    );
    // Usage goes on from the lower value at 4/h.
    site.observe(2890, "202.58").await;
    assert_eq!(
        site.used().await,
        dec("4"),
        "2 + 1 + 1, the jump never billed"
    );
    let detail = site.json("/api/projects/alpha").await;
    assert_eq!(detail["held_credits"], "0.00");
    // A rejected charge cannot be approved any more.
    let id = held[0]["id"].as_i64().unwrap_or_default();
    let late = site
        .post(
            &format!("/api/held/{id}/approve"),
            json!({"reason": "too late"}),
        )
        .await;
    assert_eq!(late.0, 409, "{late:?}");
    assert_eq!(site.used().await, dec("4"));
}

#[tokio::test]
async fn an_approved_re_weighting_is_billed_once_with_the_actor() {
    let site = Site::start().await;
    site.steady_half_hour().await;
    site.observe(1805, "1006.79").await;
    let id = site.held().await[0]["id"].as_i64().unwrap_or_default();

    let bad = [
        (json!({}), 400, "no reason"),
        (json!({"reason": "  "}), 400, "blank reason"),
        (json!({"reason": "x", "extra": 1}), 400, "unknown field"),
    ];
    for (body, status, case) in bad {
        let answer = site.post(&format!("/api/held/{id}/approve"), body).await;
        assert_eq!(answer.0, status, "{case}: {answer:?}");
        assert!(answer.1["error"].is_string(), "{case}: a JSON error");
    }
    let unknown = site
        .post("/api/held/999999/approve", json!({"reason": "x"}))
        .await;
    assert_eq!(unknown.0, 404);
    let no_key = site
        .app
        .http
        .post(format!("{}/api/held/{id}/approve", site.app.address))
        .json(&json!({"reason": "x"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(no_key.status(), 401);

    let (status, approved) = site
        .post(
            &format!("/api/held/{id}/approve"),
            json!({"reason": "the new weights are agreed", "actor": "alice"}),
        )
        .await;
    assert_eq!(status, 200, "{approved}");
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["decided_by"], "alice");
    assert_eq!(site.used().await, dec("807.44"), "2 + 805.44");
    let again = site
        .post(
            &format!("/api/held/{id}/approve"),
            json!({"reason": "twice"}),
        )
        .await;
    assert_eq!(again.0, 409, "approved once only");

    let client = site.app.db.connect().await;
    let row = client
        .query_one(
            "SELECT kind, metric, quantity, used_delta, used_after, actor, reason, id FROM ledger
             WHERE project = 'alpha' AND actor IS NOT NULL",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("one ledger row names the actor: {e}"));
    assert_eq!(row.get::<_, String>(0), "usage");
    assert_eq!(row.get::<_, String>(1), "project_vcpu_usage");
    assert_eq!(row.get::<_, Decimal>(2), dec("805.44"));
    assert_eq!(row.get::<_, Decimal>(3), dec("805.44"));
    assert_eq!(row.get::<_, Decimal>(4), dec("807.44"));
    assert_eq!(row.get::<_, String>(5), "alice");
    assert!(row
        .get::<_, String>(6)
        .contains("the new weights are agreed"));
    assert_eq!(approved["ledger_id"], json!(row.get::<_, i64>(7)));

    // Billing goes on from the re-weighted value, and never bills the jump again.
    site.observe(2705, "1011.79").await;
    assert_eq!(
        site.used().await,
        dec("812.44"),
        "807.44 + 5 (20/h for 15 minutes)"
    );
    let held = site.held().await;
    assert_eq!(held.len(), 1);
    assert_eq!(
        held[0]["status"], "approved",
        "a later drop does not undo it"
    );
}

#[tokio::test]
async fn a_project_growing_from_4_to_88_vcpu_hours_per_hour_in_one_step_is_billed() {
    let site = Site::start().await;
    site.steady_half_hour().await;
    site.observe(2700, "223.35").await; // 88/h for 15 minutes
    site.observe(3600, "245.35").await;
    assert!(site.held().await.is_empty(), "nothing held");
    assert_eq!(site.used().await, dec("46"), "2 + 22 + 22");
}

#[tokio::test]
async fn rejecting_a_held_charge_keeps_the_balance_and_records_why() {
    let site = Site::start().await;
    site.steady_half_hour().await;
    site.observe(1805, "1006.79").await;
    let id = site.held().await[0]["id"].as_i64().unwrap_or_default();
    let (status, rejected) = site
        .post(
            &format!("/api/held/{id}/reject"),
            json!({"reason": "weights edited by mistake"}),
        )
        .await;
    assert_eq!(status, 200, "{rejected}");
    assert_eq!(rejected["status"], "rejected");
    assert_eq!(rejected["decided_by"], "api");
    assert_eq!(rejected["decision_reason"], "weights edited by mistake");
    assert_eq!(site.used().await, dec("2"));
    let none = site
        .app
        .db
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM ledger WHERE project = 'alpha' AND actor IS NOT NULL",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .get::<_, i64>(0);
    assert_eq!(none, 0, "a rejection books nothing");
    let missing = site.app.get("/api/projects/nobody/held").await;
    assert_eq!(missing.status(), 404);
}
