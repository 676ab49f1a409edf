//! A synthetic usage exporter for development and benchmarks.
//!
//! It serves what de.NBI's `OS_project_usage_exporter` serves: per project the
//! counters `project_vcpu_usage` (weighted vCPU-hours) and `project_mb_usage`
//! (weighted **GiB**-hours of RAM, despite its name), labelled `domain_id`,
//! `domain_name`, `project_id` and `project_name`.
//! - SimpleVM pools: every fourth project (index 3, 7, …) shares the `project_id`
//!   and domain of the project before it under its own `project_name`, as several
//!   SimpleVM projects share one OpenStack project.
//! - Weights: the exporter recomputes everything from scratch with the weights in
//!   force, so editing a weight re-weights the whole history at once. With
//!   `reweight` set, from that instant on every vCPU counter is multiplied by its
//!   factor (the jump guard holds the step; see `crate::billing::guard`).
//!
//! Everything is a pure function of [`DemoConfig`] and the time passed to [`render`]:
//! - Project `i` gets its vCPUs (1..=64), RAM (1..=256 GiB, in MB), name, id, domain
//!   and start (`cfg.start` + 0..30 days) from a splitmix64 stream seeded by
//!   `cfg.seed` and `i`.
//! - Its value is `amount × hours since its start`, so it grows in real time. A
//!   project whose start lies after `now` is listed with value `0`, which keeps the
//!   number of series (2 × `projects`) independent of the clock.
//! - The dropping projects (`floor(projects × drop_fraction)` of them, spread evenly
//!   over the indices) restart their count from 0 at every `drop_period` boundary
//!   counted from `cfg.start`: a Prometheus counter reset, so billing by increase
//!   recovers exactly `amount × hours` across resets.
//! - Values are printed with Rust's shortest round-trip formatting (`{}` of `f64`),
//!   which never uses exponent notation.

use actix_web::{http::header::ContentType, middleware, web, App, HttpResponse, HttpServer};
use chrono::{DateTime, Utc};
use std::fmt::Write as _;
use std::time::Duration;

/// What the demo exporter serves.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Number of projects; each has one `project_vcpu_usage` and one `project_mb_usage` series.
    pub projects: usize,
    /// Seed that makes project names, sizes and start times deterministic.
    pub seed: u64,
    /// Reference time the cumulative usage counts from.
    pub start: DateTime<Utc>,
    /// Fraction (0..=1) of projects whose value drops now and then.
    pub drop_fraction: f64,
    /// How often a dropping series drops.
    pub drop_period: Duration,
    /// From this instant on the vCPU weight is multiplied by this factor, for the
    /// whole history at once (an operator editing the exporter's weights).
    pub reweight: Option<(DateTime<Utc>, f64)>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            projects: 20,
            seed: 42,
            start: DateTime::<Utc>::from_timestamp(1_767_225_600, 0).unwrap_or_default(),
            drop_fraction: 0.0,
            drop_period: Duration::from_secs(3600),
            reweight: None,
        }
    }
}

const MS_PER_HOUR: f64 = 3_600_000.0;
/// Projects start up to this long after `cfg.start`.
const MAX_START_OFFSET_MS: u64 = 30 * 24 * 3_600_000;
/// Rough size of one sample line, to reserve the body once.
const BYTES_PER_LINE: usize = 190;

const TOPICS: [&str; 16] = [
    "genome",
    "metagenome",
    "proteome",
    "rnaseq",
    "singlecell",
    "plant",
    "microbiome",
    "virus",
    "neuro",
    "climate",
    "soil",
    "marine",
    "cancer",
    "phylo",
    "structure",
    "imaging",
];
const KINDS: [&str; 12] = [
    "atlas",
    "assembly",
    "annotation",
    "pipeline",
    "workbench",
    "analysis",
    "cluster",
    "portal",
    "simulation",
    "screening",
    "mapping",
    "lab",
];
/// `(domain_id, domain_name)`; OpenStack's default domain has the id `default`.
const DOMAINS: [(&str, &str); 4] = [
    ("default", "Default"),
    ("3f9c2a7e51d84b06a1e2c7d9b4f08e61", "elixir"),
    ("8b1d4e6f2a9c47e3b5d0a6c8e1f3b2d4", "denbi-bielefeld"),
    ("c47a0e2d9b3f4c18a6e5d1b7f2c9e803", "denbi-heidelberg"),
];

/// One metric: its name, help text and which amount of a project it counts.
struct Metric {
    name: &'static str,
    help: &'static str,
    amount: fn(&Project) -> f64,
}

const METRICS: [Metric; 2] = [
    Metric {
        name: "project_vcpu_usage",
        help: "Cumulative weighted vCPU-hours used by the project since its start.",
        amount: |p| f64::from(p.vcpus) * p.vcpu_weight,
    },
    Metric {
        name: "project_mb_usage",
        help: "Cumulative weighted GiB-hours of RAM used by the project since its start.",
        amount: |p| f64::from(p.mb) / 1024.0,
    },
];

/// splitmix64 (Steele, Lea, Flood): tiny, fast and good enough for demo data.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (the modulo bias is irrelevant for demo data).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Everything about one project, derived from the seed and its index; `Copy`, so
/// rendering allocates nothing per line.
#[derive(Debug, Clone, Copy)]
struct Project {
    index: usize,
    topic: &'static str,
    kind: &'static str,
    id: (u64, u64),
    domain: (&'static str, &'static str),
    vcpus: u32,
    mb: u32,
    start_ms: i64,
    drops: bool,
    /// Weight of its vCPUs in force at the time rendered.
    vcpu_weight: f64,
}

impl Project {
    fn new(cfg: &DemoConfig, index: usize) -> Self {
        // Mix the index first so that neighbouring projects get unrelated streams.
        let mut rng = SplitMix64(cfg.seed ^ SplitMix64(index as u64).next());
        let topic = TOPICS[rng.below(TOPICS.len() as u64) as usize];
        let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
        let id = (rng.next(), rng.next());
        let domain = DOMAINS[rng.below(DOMAINS.len() as u64) as usize];
        let vcpus = 1 + rng.below(64) as u32;
        let mb = 1024 * (1 + rng.below(256) as u32);
        let offset_ms = rng.below(MAX_START_OFFSET_MS) as i64;
        Self {
            index,
            topic,
            kind,
            id,
            domain,
            vcpus,
            mb,
            start_ms: cfg.start.timestamp_millis() + offset_ms,
            drops: is_dropping(cfg.drop_fraction, index),
            vcpu_weight: 1.0,
        }
    }

    /// Project `index` at `now_ms`: pool members take their owner's id and domain,
    /// and the weights in force apply.
    fn at(cfg: &DemoConfig, index: usize, now_ms: i64) -> Self {
        let mut p = Self::new(cfg, index);
        if index % 4 == 3 {
            let owner = Self::new(cfg, index - 1);
            p.id = owner.id;
            p.domain = owner.domain;
        }
        if let Some((at, factor)) = cfg.reweight {
            if now_ms >= at.timestamp_millis() {
                p.vcpu_weight = factor;
            }
        }
        p
    }

    /// Hours counted at `now_ms`: since the start, or since the last drop boundary.
    fn hours(&self, cfg: &DemoConfig, now_ms: i64) -> f64 {
        if now_ms <= self.start_ms {
            return 0.0;
        }
        let mut from_ms = self.start_ms;
        let period_ms = i64::try_from(cfg.drop_period.as_millis()).unwrap_or(i64::MAX);
        if self.drops && period_ms > 0 {
            let origin = cfg.start.timestamp_millis();
            let last_boundary = origin + (now_ms - origin).div_euclid(period_ms) * period_ms;
            from_ms = from_ms.max(last_boundary);
        }
        (now_ms - from_ms) as f64 / MS_PER_HOUR
    }
}

/// Whether project `index` drops: exactly `floor(n × fraction)` of the first `n`
/// projects do, spread evenly.
fn is_dropping(fraction: f64, index: usize) -> bool {
    let f = if fraction.is_nan() {
        0.0
    } else {
        fraction.clamp(0.0, 1.0)
    };
    ((index + 1) as f64 * f).floor() > (index as f64 * f).floor()
}

/// Appends the exposition text for `now` to `out`.
pub fn render(cfg: &DemoConfig, now: DateTime<Utc>, out: &mut String) {
    out.reserve(METRICS.len() * (cfg.projects * BYTES_PER_LINE + 200));
    let now_ms = now.timestamp_millis();
    // Writing into a String cannot fail, so the fmt::Results below are ignored.
    for metric in &METRICS {
        let _ = writeln!(out, "# HELP {} {}", metric.name, metric.help);
        let _ = writeln!(out, "# TYPE {} counter", metric.name);
        for index in 0..cfg.projects {
            let p = Project::at(cfg, index, now_ms);
            let value = (metric.amount)(&p) * p.hours(cfg, now_ms);
            let _ = writeln!(
                out,
                "{}{{domain_id=\"{}\",domain_name=\"{}\",project_id=\"{:016x}{:016x}\",\
                 project_name=\"{}-{}-{:04}\"}} {}",
                metric.name,
                p.domain.0,
                p.domain.1,
                p.id.0,
                p.id.1,
                p.topic,
                p.kind,
                p.index,
                value,
            );
        }
    }
}

const INDEX_TEXT: &str = "os-credits demo exporter\n\n\
GET /metrics serves synthetic de.NBI usage counters (project_vcpu_usage in weighted\n\
vCPU-hours, project_mb_usage in weighted GiB-hours) for deterministic demo projects\n\
(every fourth one a SimpleVM pool member sharing a project_id), growing in real time.\n";

async fn metrics(cfg: web::Data<DemoConfig>) -> HttpResponse {
    let mut body = String::new();
    render(&cfg, Utc::now(), &mut body);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}

async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType::plaintext())
        .body(INDEX_TEXT)
}

/// Builds the HTTP server (`GET /metrics`) on an already bound listener.
///
/// The caller owns shutdown: actix's signal handling is disabled. Responses are
/// gzip-compressed when the client asks for it, like real exporters.
pub fn server(
    cfg: DemoConfig,
    listener: std::net::TcpListener,
) -> std::io::Result<actix_web::dev::Server> {
    let cfg = web::Data::new(cfg);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(cfg.clone())
            .wrap(middleware::Compress::default())
            .route("/metrics", web::get().to(metrics))
            .route("/", web::get().to(index))
    })
    .listen(listener)?
    .workers(1)
    .disable_signals()
    .run();
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn at(cfg: &DemoConfig, secs_after_start: i64) -> DateTime<Utc> {
        cfg.start + chrono::Duration::seconds(secs_after_start)
    }

    fn rendered(cfg: &DemoConfig, now: DateTime<Utc>) -> String {
        let mut out = String::new();
        render(cfg, now, &mut out);
        out
    }

    /// Sample lines as `series (name and labels) → value`, by plain string splitting.
    fn samples(text: &str) -> HashMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("sample line has a value");
                let value = value.parse().unwrap_or_else(|e| panic!("{l}: {e}"));
                (series.to_owned(), value)
            })
            .collect()
    }

    /// `project_name` of a series key.
    fn project_name(series: &str) -> &str {
        let rest = series
            .split("project_name=\"")
            .nth(1)
            .expect("project_name");
        &rest[..rest.find('"').expect("closing quote")]
    }

    const AFTER_ALL_STARTS: i64 = 31 * 86_400;

    #[test]
    fn same_seed_and_time_give_identical_text_and_another_seed_differs() {
        let cfg = DemoConfig::default();
        let now = at(&cfg, AFTER_ALL_STARTS);
        assert_eq!(rendered(&cfg, now), rendered(&cfg, now));
        let other = DemoConfig {
            seed: 43,
            ..cfg.clone()
        };
        assert_ne!(rendered(&cfg, now), rendered(&other, now));
    }

    #[test]
    fn n_projects_give_headers_and_two_samples_each() {
        let cfg = DemoConfig {
            projects: 37,
            ..DemoConfig::default()
        };
        let text = rendered(&cfg, at(&cfg, AFTER_ALL_STARTS));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2 * 37 + 4);
        for name in ["project_vcpu_usage", "project_mb_usage"] {
            assert!(
                text.contains(&format!("# TYPE {name} counter\n")),
                "{name} TYPE"
            );
            assert!(text.contains(&format!("# HELP {name} ")), "{name} HELP");
            let count = lines
                .iter()
                .filter(|l| l.starts_with(&format!("{name}{{")))
                .count();
            assert_eq!(count, 37, "{name} samples");
        }
        assert_eq!(samples(&text).len(), 2 * 37, "every series is distinct");
    }

    #[test]
    fn labels_are_present_in_alphabetical_order() {
        let cfg = DemoConfig::default();
        let text = rendered(&cfg, at(&cfg, AFTER_ALL_STARTS));
        for series in samples(&text).keys() {
            let labels = &series[series.find('{').expect("{")..];
            let keys: Vec<&str> = labels
                .trim_matches(|c| c == '{' || c == '}')
                .split(',')
                .map(|kv| kv.split_once("=\"").expect("key=\"value\"").0)
                .collect();
            assert_eq!(
                keys,
                ["domain_id", "domain_name", "project_id", "project_name"],
                "{series}"
            );
            let id = series.split("project_id=\"").nth(1).expect("id");
            assert!(id[..32].bytes().all(|b| b.is_ascii_hexdigit()), "{series}");
            assert_eq!(&id[32..33], "\"", "{series}");
        }
    }

    #[test]
    fn amounts_and_start_offsets_stay_in_range() {
        let cfg = DemoConfig {
            projects: 500,
            ..DemoConfig::default()
        };
        for i in 0..cfg.projects {
            let p = Project::new(&cfg, i);
            assert!((1..=64).contains(&p.vcpus), "{p:?}");
            assert!((1024..=262_144).contains(&p.mb), "{p:?}");
            let offset = p.start_ms - cfg.start.timestamp_millis();
            assert!((0..MAX_START_OFFSET_MS as i64).contains(&offset), "{p:?}");
        }
    }

    #[test]
    fn projects_not_started_yet_are_listed_with_zero() {
        let cfg = DemoConfig::default();
        let before = samples(&rendered(&cfg, at(&cfg, -1)));
        assert_eq!(before.len(), 2 * cfg.projects);
        assert!(before.values().all(|&v| v == 0.0), "{before:?}");
    }

    #[test]
    fn non_dropping_values_never_decrease() {
        let cfg = DemoConfig {
            projects: 50,
            ..DemoConfig::default()
        };
        let times = [
            -3600,
            0,
            1,
            86_400,
            86_401,
            15 * 86_400,
            AFTER_ALL_STARTS,
            400 * 86_400,
        ];
        let mut previous = samples(&rendered(&cfg, at(&cfg, times[0])));
        for &t in &times[1..] {
            let current = samples(&rendered(&cfg, at(&cfg, t)));
            for (series, value) in &current {
                assert!(*value >= 0.0, "{series} negative at {t}");
                assert!(*value >= previous[series], "{series} decreased at {t}");
            }
            previous = current;
        }
        let last: f64 = previous.values().sum();
        assert!(last > 0.0, "values grow over time");
    }

    #[test]
    fn dropping_projects_restart_at_a_period_boundary_and_others_do_not() {
        let cfg = DemoConfig {
            projects: 40,
            drop_fraction: 0.25,
            drop_period: Duration::from_secs(3600),
            ..DemoConfig::default()
        };
        let boundary = AFTER_ALL_STARTS + 3600 - AFTER_ALL_STARTS % 3600;
        let before = samples(&rendered(&cfg, at(&cfg, boundary - 1)));
        let on = samples(&rendered(&cfg, at(&cfg, boundary)));
        let after = samples(&rendered(&cfg, at(&cfg, boundary + 60)));
        let mut dropped_projects = std::collections::HashSet::new();
        for (series, value) in &on {
            if *value < before[series] {
                assert_eq!(*value, 0.0, "{series} restarts from 0");
                dropped_projects.insert(project_name(series).to_owned());
            }
            assert!(
                after[series] > *value,
                "{series} keeps growing after the boundary"
            );
        }
        assert_eq!(dropped_projects.len(), 10, "a quarter of 40 projects drop");
    }

    #[test]
    fn drop_fraction_selects_exactly_its_share() {
        let count = |f: f64| (0..100).filter(|&i| is_dropping(f, i)).count();
        assert_eq!(count(0.0), 0);
        assert_eq!(count(0.1), 10);
        assert_eq!(count(1.0), 100);
        assert_eq!(count(f64::NAN), 0);
        assert_eq!(count(7.0), 100);
    }

    #[actix_web::test]
    async fn server_serves_metrics_and_an_explanation() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = server(DemoConfig::default(), listener).expect("server");
        let handle = server.handle();
        let running = actix_web::rt::spawn(server);

        let client = reqwest::Client::new();
        let response = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().expect("ascii");
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        let body = response.text().await.expect("body");
        assert_eq!(samples(&body).len(), 40);

        let index = client
            .get(format!("http://{addr}/"))
            .send()
            .await
            .expect("GET /");
        assert_eq!(index.status(), 200);
        assert!(index.text().await.expect("body").contains("/metrics"));

        handle.stop(true).await;
        running.await.expect("join").expect("server result");
    }

    #[test]
    fn ram_is_in_gib_hours_pools_share_ids_and_a_reweighting_moves_the_whole_history() {
        let cfg = DemoConfig {
            projects: 8,
            start: DateTime::<Utc>::UNIX_EPOCH,
            ..DemoConfig::default()
        };
        let now = at(&cfg, AFTER_ALL_STARTS);
        let now_ms = now.timestamp_millis();
        let text = rendered(&cfg, now);
        let values = samples(&text);
        let p = Project::at(&cfg, 0, now_ms);
        let hours = p.hours(&cfg, now_ms);
        let name = format!("{}-{}-0000", p.topic, p.kind);
        let gib = values
            .iter()
            .find(|(s, _)| s.starts_with("project_mb_usage") && project_name(s) == name)
            .map(|(_, v)| *v)
            .expect("project 0's RAM");
        assert_eq!(
            gib,
            f64::from(p.mb / 1024) * hours,
            "GiB-hours, not MB-hours"
        );
        let id = |index: usize| Project::at(&cfg, index, now_ms).id;
        assert_eq!(id(3), id(2), "a pool member shares its owner's project_id");
        assert_ne!(id(2), id(1));

        let edit = now - chrono::Duration::minutes(5);
        let reweighted = DemoConfig {
            reweight: Some((edit, 5.0)),
            ..cfg.clone()
        };
        let before = samples(&rendered(&reweighted, edit - chrono::Duration::seconds(5)));
        let after = samples(&rendered(&reweighted, edit));
        for (series, value) in &after {
            if series.starts_with("project_vcpu_usage") && before[series] > 0.0 {
                assert!(
                    *value > 4.9 * before[series],
                    "{series}: {} → {value}",
                    before[series]
                );
            }
        }
    }
}
