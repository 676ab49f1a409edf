//! Billing rules: how each metric turns into credits.
//!
//! `METRICS_TO_BILL` (`{"project_vcpu_usage": 1.0}`, as in the old service) makes
//! every listed metric a **counter** billed at one price. An optional rules file
//! (TOML or JSON, same shape) adds metrics or replaces them with every option:
//!
//! ```toml
//! [metrics.project_vcpu_usage]
//! kind = "counter"                 # or "gauge"; default "counter"
//! friendly_name = "vCPU hours"
//! description = "Virtual CPUs weighted by flavor, per hour"
//! unit = "vCPU·h"
//! decrease_policy = "rebase"       # counters: "rebase" (default) or "restart"
//! price = "1.0"                    # credits per unit; a string or a number
//! label = "location"               # optional: the label whose value picks a price
//! by_label = { Bielefeld = "0.8", Giessen = "1.2" }
//!
//! [[metrics.project_vcpu_usage.price_changes]]
//! valid_from = "2027-01-01T00:00:00Z"   # RFC 3339, a plain date (midnight UTC) or a TOML date
//! price = "1.5"
//! by_label = { Bielefeld = "1.0" }      # complete for this version: Giessen pays 1.5
//!
//! [metrics.flavor_gpu_count]
//! kind = "gauge"
//! price = 5
//! max_gap_seconds = 900            # gauges: longer steps are not billed (default 900)
//! ```
//!
//! - A rule in the file replaces the `METRICS_TO_BILL` entry of the same metric; its
//!   `price` may be left out, and then the `METRICS_TO_BILL` price is used.
//! - `price`, `label` and `by_label` at the metric level are the version valid since
//!   forever. Each `price_changes` entry is a complete version from `valid_from` on:
//!   its `price` is required, its `by_label` starts empty (nothing is inherited, so a
//!   label price can be dropped), and its `label` defaults to the metric's `label`.
//! - Prices are exact: strings and numbers are read through their decimal text,
//!   never through float arithmetic. Numbers with more than 15 significant digits
//!   should be written as strings (TOML and JSON parsers hold numbers as `f64`).
//! - Unknown fields, unknown kinds or policies, negative prices, unreadable dates,
//!   two versions with the same `valid_from`, `by_label` without `label`,
//!   `max_gap_seconds` on a counter and `decrease_policy` on a gauge are errors that
//!   name the metric.
//!
//! A price applies to usage from its `valid_from` on: a step whose time range spans
//! a change is split there (see [`crate::billing::charge`]).

use crate::billing::guard::JumpGuard;
use crate::domain::{MetricName, Price};
use crate::money::decimal_from_f64;
use chrono::{DateTime, Duration, NaiveDate, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// How a metric's value relates to usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKind {
    /// Cumulative usage: the increase between two samples is billed.
    #[default]
    Counter,
    /// An amount in use now: value × hours is billed.
    Gauge,
}

/// What a counter's decrease means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecreasePolicy {
    /// The exporter recomputed its history: bill nothing for the step, continue from
    /// the lower value.
    #[default]
    Rebase,
    /// The counter restarted from zero: the new value is the step's usage
    /// (Prometheus `increase()`).
    Restart,
}

/// Default largest gauge step that is billed.
pub const DEFAULT_MAX_GAP: Duration = Duration::minutes(15);

/// The prices of a metric from one instant on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceVersion {
    /// First instant this version applies to; `None` means since forever.
    pub valid_from: Option<DateTime<Utc>>,
    /// Price when no label price applies.
    pub default: Price,
    /// Label whose value selects a price from `by_label`.
    pub label: Option<String>,
    /// Price per value of `label`.
    pub by_label: BTreeMap<String, Price>,
}

impl PriceVersion {
    /// One price since forever, regardless of labels.
    pub fn flat(price: Price) -> Self {
        Self {
            valid_from: None,
            default: price,
            label: None,
            by_label: BTreeMap::new(),
        }
    }

    fn price_for(&self, labels: &BTreeMap<String, String>) -> Price {
        self.label
            .as_ref()
            .and_then(|label| labels.get(label))
            .and_then(|value| self.by_label.get(value))
            .copied()
            .unwrap_or(self.default)
    }
}

/// How one metric turns into credits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The billed metric.
    pub metric: MetricName,
    /// Counter or gauge.
    pub kind: MetricKind,
    /// Name shown to people.
    pub friendly_name: Option<String>,
    /// What the metric measures.
    pub description: Option<String>,
    /// Unit of the metric's usage (e.g. `vCPU·h`).
    pub unit: Option<String>,
    /// What a counter's decrease means (ignored for gauges).
    pub decrease_policy: DecreasePolicy,
    /// Longest gauge step that is billed (ignored for counters).
    pub max_gap: Duration,
    /// Which counter steps are held for review instead of billed (ignored for gauges).
    pub guard: JumpGuard,
    /// Invariant: not empty, the first has no `valid_from`, the rest strictly increase.
    prices: Vec<PriceVersion>,
}

impl Rule {
    /// A rule with default options and the given price versions, which need one
    /// version since forever and distinct `valid_from`s (in any order).
    pub fn new(
        metric: MetricName,
        kind: MetricKind,
        prices: Vec<PriceVersion>,
    ) -> Result<Self, String> {
        match sorted_versions(prices) {
            Ok(prices) => Ok(Self::with_sorted_versions(metric, kind, prices)),
            Err(reason) => Err(format!("metric {metric}: {reason}")),
        }
    }

    /// A counter with one price since forever (what `METRICS_TO_BILL` gives).
    pub fn counter(metric: MetricName, price: Price) -> Self {
        Self::with_sorted_versions(metric, MetricKind::Counter, vec![PriceVersion::flat(price)])
    }

    fn with_sorted_versions(
        metric: MetricName,
        kind: MetricKind,
        prices: Vec<PriceVersion>,
    ) -> Self {
        Self {
            metric,
            kind,
            friendly_name: None,
            description: None,
            unit: None,
            decrease_policy: DecreasePolicy::default(),
            max_gap: DEFAULT_MAX_GAP,
            guard: JumpGuard::default(),
            prices,
        }
    }

    /// The price versions, oldest first.
    pub fn prices(&self) -> &[PriceVersion] {
        &self.prices
    }

    /// The price of usage at `time` for a series with these labels: the latest
    /// version valid at `time`, its label price if the label is present and listed,
    /// else its default.
    pub fn price_at(&self, time: DateTime<Utc>, labels: &BTreeMap<String, String>) -> Price {
        // Versions valid at `time` are a prefix (sorted, the first since forever);
        // the last of them applies.
        let valid = self
            .prices
            .partition_point(|version| version.valid_from.is_none_or(|from| from <= time));
        // In bounds: the prefix holds at least the first version, and there is one.
        self.prices[valid.max(1) - 1].price_for(labels)
    }

    /// Instants strictly between `from` and `to` where a new price version starts:
    /// where a step from `from` to `to` must be split. A change exactly at `to`
    /// applies only to usage after `to`, a change at `from` to the whole step, so
    /// neither splits it.
    pub fn price_changes_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Vec<DateTime<Utc>> {
        self.prices
            .iter()
            .filter_map(|version| version.valid_from)
            .filter(|&t| from < t && t < to)
            .collect()
    }
}

/// Sorts versions by `valid_from` and checks there is one since forever and no two
/// share a `valid_from`.
fn sorted_versions(mut prices: Vec<PriceVersion>) -> Result<Vec<PriceVersion>, String> {
    // `None` sorts first.
    prices.sort_by_key(|version| version.valid_from);
    match prices.first() {
        Some(first) if first.valid_from.is_none() => {}
        _ => return Err("needs a price valid since forever".to_owned()),
    }
    if let Some(pair) = prices
        .windows(2)
        .find(|p| p[0].valid_from == p[1].valid_from)
    {
        let when = pair[0].valid_from.map_or_else(
            || "forever".to_owned(),
            |t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        );
        return Err(format!(
            "two prices are valid from {when}; each price change needs its own valid_from"
        ));
    }
    Ok(prices)
}

/// The rules of every billed metric.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    rules: BTreeMap<String, Rule>,
}

impl Rules {
    /// Builds the rules from `METRICS_TO_BILL` and the contents of an optional rules
    /// file; `format_hint` is the file's extension, `toml` or `json`.
    pub fn from_settings(
        metrics_to_bill: &BTreeMap<MetricName, Price>,
        rules_file: Option<&str>,
        format_hint: &str,
    ) -> Result<Rules, String> {
        let mut rules: BTreeMap<String, Rule> = metrics_to_bill
            .iter()
            .map(|(metric, price)| {
                (
                    metric.as_str().to_owned(),
                    Rule::counter(metric.clone(), *price),
                )
            })
            .collect();
        let Some(contents) = rules_file else {
            return Ok(Rules { rules });
        };
        let file_rules = match format_hint.to_ascii_lowercase().as_str() {
            "toml" => toml::from_str::<RulesFile<toml::Value>>(contents)
                .map_err(|e| format!("rules file: {e}"))?
                .rules(|value| value.try_into().map_err(one_line))?,
            "json" => serde_json::from_str::<RulesFile<serde_json::Value>>(contents)
                .map_err(|e| format!("rules file: {e}"))?
                .rules(|value| serde_json::from_value(value).map_err(one_line))?,
            other => {
                return Err(format!(
                    "rules file: unknown format {other:?}; the file name must end in .toml or .json"
                ))
            }
        };
        for (name, file_rule) in file_rules {
            let metric = MetricName::parse(&name).map_err(|e| format!("rules file: {e}"))?;
            let fallback = metrics_to_bill.get(&metric).copied();
            let rule = file_rule
                .into_rule(metric, fallback)
                .map_err(|e| format!("rules file: metric {name}: {e}"))?;
            rules.insert(name, rule);
        }
        Ok(Rules { rules })
    }

    /// The rule of a metric, if it is billed.
    pub fn get(&self, metric: &str) -> Option<&Rule> {
        self.rules.get(metric)
    }

    /// The billed metrics: those of `METRICS_TO_BILL` and of the rules file. The one
    /// list scraping keeps, billing charges and the API shows.
    pub fn metric_names(&self) -> impl Iterator<Item = &str> {
        self.rules.keys().map(String::as_str)
    }

    /// The rules in metric name order.
    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.values()
    }

    /// How many metrics are billed.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no metric is billed.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

impl<'a> IntoIterator for &'a Rules {
    type Item = &'a Rule;
    type IntoIter = std::collections::btree_map::Values<'a, String, Rule>;

    fn into_iter(self) -> Self::IntoIter {
        self.rules.values()
    }
}

/// The file's outer shape; each metric is parsed on its own so every error names it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile<V> {
    #[serde(default = "BTreeMap::new")]
    metrics: BTreeMap<String, V>,
}

impl<V> RulesFile<V> {
    fn rules(
        self,
        parse: impl Fn(V) -> Result<RuleFile, String>,
    ) -> Result<BTreeMap<String, RuleFile>, String> {
        self.metrics
            .into_iter()
            .map(|(name, value)| match parse(value) {
                Ok(rule) => Ok((name, rule)),
                Err(e) => Err(format!("rules file: metric {name}: {e}")),
            })
            .collect()
    }
}

/// A serde error as one line (`toml` appends ``\nin `field` ``).
fn one_line(error: impl fmt::Display) -> String {
    error.to_string().trim().replace('\n', " ")
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table of rule options such as `price` and `kind`"
)]
struct RuleFile {
    #[serde(default)]
    kind: MetricKind,
    friendly_name: Option<String>,
    description: Option<String>,
    unit: Option<String>,
    decrease_policy: Option<DecreasePolicy>,
    max_gap_seconds: Option<u32>,
    max_rate_per_hour: Option<PriceText>,
    jump_factor: Option<PriceText>,
    jump_floor_per_hour: Option<PriceText>,
    price: Option<PriceText>,
    label: Option<String>,
    #[serde(default)]
    by_label: BTreeMap<String, PriceText>,
    #[serde(default)]
    price_changes: Vec<PriceChangeFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceChangeFile {
    valid_from: DateText,
    price: PriceText,
    label: Option<String>,
    #[serde(default)]
    by_label: BTreeMap<String, PriceText>,
}

impl RuleFile {
    fn into_rule(self, metric: MetricName, fallback: Option<Price>) -> Result<Rule, String> {
        let default = match (self.price, fallback) {
            (Some(text), _) => text.parse("price")?,
            (None, Some(price)) => price,
            (None, None) => {
                return Err("missing field `price` (credits per unit)".to_owned());
            }
        };
        let mut prices = vec![version(None, default, self.label.clone(), self.by_label)?];
        for change in self.price_changes {
            let valid_from = change.valid_from.parse()?;
            let label = change.label.or_else(|| self.label.clone());
            let price = change.price.parse("price")?;
            prices.push(version(Some(valid_from), price, label, change.by_label)?);
        }
        if self.kind == MetricKind::Counter && self.max_gap_seconds.is_some() {
            return Err(
                "max_gap_seconds applies to gauges only; counters bill every gap".to_owned(),
            );
        }
        if self.kind == MetricKind::Gauge && self.decrease_policy.is_some() {
            return Err("decrease_policy applies to counters only".to_owned());
        }
        let guarded = [
            &self.max_rate_per_hour,
            &self.jump_factor,
            &self.jump_floor_per_hour,
        ];
        if self.kind == MetricKind::Gauge && guarded.iter().any(|o| o.is_some()) {
            return Err(
                "max_rate_per_hour, jump_factor and jump_floor_per_hour apply to counters only"
                    .to_owned(),
            );
        }
        let number = |text: &Option<PriceText>, name: &str, default: Decimal| {
            text.as_ref()
                .map_or(Ok(default), |t| t.parse(name).map(Price::value))
        };
        let defaults = JumpGuard::default();
        let guard = JumpGuard {
            max_rate_per_hour: match &self.max_rate_per_hour {
                Some(text) => Some(text.parse("max_rate_per_hour")?.value()),
                None => None,
            },
            jump_factor: number(&self.jump_factor, "jump_factor", defaults.jump_factor)?,
            jump_floor_per_hour: number(
                &self.jump_floor_per_hour,
                "jump_floor_per_hour",
                defaults.jump_floor_per_hour,
            )?,
        };
        let max_gap = match self.max_gap_seconds {
            None => DEFAULT_MAX_GAP,
            Some(0) => return Err("max_gap_seconds must be more than 0".to_owned()),
            Some(seconds) => Duration::seconds(i64::from(seconds)),
        };
        Ok(Rule {
            metric,
            kind: self.kind,
            friendly_name: self.friendly_name,
            description: self.description,
            unit: self.unit,
            decrease_policy: self.decrease_policy.unwrap_or_default(),
            max_gap,
            guard,
            prices: sorted_versions(prices)?,
        })
    }
}

fn version(
    valid_from: Option<DateTime<Utc>>,
    default: Price,
    label: Option<String>,
    by_label: BTreeMap<String, PriceText>,
) -> Result<PriceVersion, String> {
    if let Some(label) = &label {
        check_label_name(label)?;
    } else if !by_label.is_empty() {
        return Err("by_label needs `label`: the label whose value selects the price".to_owned());
    }
    let by_label = by_label
        .into_iter()
        .map(|(value, text)| {
            let price = text.parse(&format!("by_label price of {value:?}"))?;
            Ok((value, price))
        })
        .collect::<Result<_, String>>()?;
    Ok(PriceVersion {
        valid_from,
        default,
        label,
        by_label,
    })
}

fn check_label_name(label: &str) -> Result<(), String> {
    match crate::domain::is_label_name(label) {
        true => Ok(()),
        false => Err(format!("label {label:?} is not a label name (letters, digits and '_', not starting with a digit)")),
    }
}

/// A price as written: the text of a string or of a number.
struct PriceText(String);

impl PriceText {
    fn parse(&self, what: &str) -> Result<Price, String> {
        Price::parse(&self.0).map_err(|e| format!("{what}: {e}"))
    }
}

impl<'de> Deserialize<'de> for PriceText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PriceVisitor;

        impl Visitor<'_> for PriceVisitor {
            type Value = PriceText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a price as a number or a string such as \"0.25\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PriceText, E> {
                Ok(PriceText(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PriceText, E> {
                Ok(PriceText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PriceText, E> {
                Ok(PriceText(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<PriceText, E> {
                decimal_from_f64(v)
                    .map(|d| PriceText(d.to_string()))
                    .ok_or_else(|| E::custom(format!("{v} is not a usable price")))
            }
        }

        deserializer.deserialize_any(PriceVisitor)
    }
}

/// A `valid_from` as written: a string, or a TOML date/time literal.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "valid_from must be a date such as \"2027-01-01T00:00:00Z\" or \"2027-01-01\""
)]
enum DateText {
    Text(String),
    Toml(toml::value::Datetime),
}

impl DateText {
    /// RFC 3339 with an offset, or a plain date meaning midnight UTC.
    fn parse(&self) -> Result<DateTime<Utc>, String> {
        let text = match self {
            DateText::Text(text) => text.clone(),
            DateText::Toml(datetime) => datetime.to_string(),
        };
        if let Ok(time) = DateTime::parse_from_rfc3339(&text) {
            return Ok(time.with_timezone(&Utc));
        }
        NaiveDate::parse_from_str(&text, "%Y-%m-%d")
            .ok()
            .and_then(|date| date.and_hms_opt(0, 0, 0))
            .map(|midnight| midnight.and_utc())
            .ok_or_else(|| {
                format!(
                    "valid_from {text:?} is not a date: expected RFC 3339 with an offset \
                     (2027-01-01T00:00:00Z) or a plain date (2027-01-01, midnight UTC)"
                )
            })
    }
}

/// What the API lists for a rule.
#[derive(Serialize)]
struct RuleView<'a> {
    metric: &'a str,
    kind: MetricKind,
    friendly_name: &'a Option<String>,
    description: &'a Option<String>,
    unit: &'a Option<String>,
    decrease_policy: DecreasePolicy,
    max_gap_seconds: i64,
    jump_guard: Option<&'a JumpGuard>,
    prices: &'a [PriceVersion],
}

impl Serialize for Rule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        RuleView {
            metric: self.metric.as_str(),
            kind: self.kind,
            friendly_name: &self.friendly_name,
            description: &self.description,
            unit: &self.unit,
            decrease_policy: self.decrease_policy,
            max_gap_seconds: self.max_gap.num_seconds(),
            jump_guard: (self.kind == MetricKind::Counter).then_some(&self.guard),
            prices: &self.prices,
        }
        .serialize(serializer)
    }
}

impl Serialize for PriceVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct PriceView<'a> {
            valid_from: Option<DateTime<Utc>>,
            default: String,
            label: &'a Option<String>,
            by_label: BTreeMap<&'a str, String>,
        }
        PriceView {
            valid_from: self.valid_from,
            default: self.default.to_string(),
            label: &self.label,
            by_label: self
                .by_label
                .iter()
                .map(|(value, price)| (value.as_str(), price.to_string()))
                .collect(),
        }
        .serialize(serializer)
    }
}

/// Rules are listed as an array in metric name order.
impl Serialize for Rules {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.rules.values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn price(s: &str) -> Price {
        Price::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn metric(s: &str) -> MetricName {
        MetricName::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 0, 0, 0)
            .single()
            .unwrap_or_else(|| panic!("{y}-{m}-{d}"))
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn metrics_to_bill(pairs: &[(&str, &str)]) -> BTreeMap<MetricName, Price> {
        pairs.iter().map(|(m, p)| (metric(m), price(p))).collect()
    }

    fn from_toml(file: &str) -> Result<Rules, String> {
        Rules::from_settings(&BTreeMap::new(), Some(file), "toml")
    }

    const EXAMPLE_TOML: &str = r#"
        [metrics.project_vcpu_usage]
        kind = "counter"
        friendly_name = "vCPU hours"
        description = "Virtual CPUs per hour"
        unit = "vCPU·h"
        decrease_policy = "restart"
        price = "1.0"
        label = "location"
        by_label = { Bielefeld = "0.8", Giessen = 1.2 }

        [[metrics.project_vcpu_usage.price_changes]]
        valid_from = "2027-01-01T00:00:00Z"
        price = "1.5"
        by_label = { Bielefeld = "1.0" }

        [[metrics.project_vcpu_usage.price_changes]]
        valid_from = 2028-01-01
        price = 2

        [metrics.flavor_gpu_count]
        kind = "gauge"
        price = 5
        max_gap_seconds = 600
    "#;

    const EXAMPLE_JSON: &str = r#"{"metrics": {
        "project_vcpu_usage": {
            "kind": "counter", "friendly_name": "vCPU hours",
            "description": "Virtual CPUs per hour", "unit": "vCPU·h",
            "decrease_policy": "restart", "price": "1.0", "label": "location",
            "by_label": {"Bielefeld": "0.8", "Giessen": 1.2},
            "price_changes": [
                {"valid_from": "2027-01-01T00:00:00Z", "price": "1.5", "by_label": {"Bielefeld": "1.0"}},
                {"valid_from": "2028-01-01", "price": 2}
            ]
        },
        "flavor_gpu_count": {"kind": "gauge", "price": 5, "max_gap_seconds": 600}
    }}"#;

    #[test]
    fn the_billed_metric_names_come_from_metrics_to_bill_and_the_file() {
        let none = Rules::from_settings(&BTreeMap::new(), None, "toml");
        if let Ok(none) = none {
            assert!(none.is_empty());
            assert_eq!(none.metric_names().count(), 0);
        }
        let rules = Rules::from_settings(
            &metrics_to_bill(&[("project_mb_usage", "0.3")]),
            Some(EXAMPLE_TOML),
            "toml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(!rules.is_empty());
        assert_eq!(
            rules.metric_names().collect::<Vec<_>>(),
            vec!["flavor_gpu_count", "project_mb_usage", "project_vcpu_usage"]
        );
    }

    #[test]
    fn label_names_follow_the_prometheus_syntax() {
        for good in ["flavor", "flavor_name", "_x", "a1_b2"] {
            assert_eq!(check_label_name(good), Ok(()), "{good}");
        }
        for bad in ["", "1flavor", "fla-vor", "flavor name", "flävor"] {
            assert!(check_label_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_price_of_the_wrong_type_says_what_is_expected() {
        let error = from_toml("[metrics.m]\nprice = true")
            .err()
            .unwrap_or_else(|| panic!("a boolean price was accepted"));
        assert!(error.contains("a price as a number or a string"), "{error}");
    }

    #[test]
    fn toml_and_json_files_describe_the_same_rules() {
        let toml = from_toml(EXAMPLE_TOML).unwrap_or_else(|e| panic!("toml: {e}"));
        let json = Rules::from_settings(&BTreeMap::new(), Some(EXAMPLE_JSON), "json")
            .unwrap_or_else(|e| panic!("json: {e}"));
        assert_eq!(toml, json, "both formats have the same shape");
        assert_eq!(toml.len(), 2);

        let vcpu = toml
            .get("project_vcpu_usage")
            .unwrap_or_else(|| panic!("vcpu rule"));
        assert_eq!(vcpu.kind, MetricKind::Counter);
        assert_eq!(vcpu.friendly_name.as_deref(), Some("vCPU hours"));
        assert_eq!(vcpu.description.as_deref(), Some("Virtual CPUs per hour"));
        assert_eq!(vcpu.unit.as_deref(), Some("vCPU·h"));
        assert_eq!(vcpu.decrease_policy, DecreasePolicy::Restart);
        let versions = vcpu.prices();
        assert_eq!(versions.len(), 3);
        assert_eq!(versions[0].valid_from, None);
        assert_eq!(versions[1].valid_from, Some(at(2027, 1, 1)));
        assert_eq!(
            versions[2].valid_from,
            Some(at(2028, 1, 1)),
            "plain dates are midnight UTC"
        );
        assert_eq!(
            versions[1].label.as_deref(),
            Some("location"),
            "label is inherited"
        );
        assert!(versions[2].by_label.is_empty(), "by_label is not inherited");

        let gpu = toml
            .get("flavor_gpu_count")
            .unwrap_or_else(|| panic!("gpu rule"));
        assert_eq!(gpu.kind, MetricKind::Gauge);
        assert_eq!(gpu.max_gap, Duration::minutes(10));
        assert_eq!(gpu.price_at(at(2030, 1, 1), &labels(&[])), price("5"));
        assert_eq!(toml.iter().count(), 2);
        assert_eq!(
            (&toml)
                .into_iter()
                .map(|r| r.metric.as_str())
                .collect::<Vec<_>>(),
            ["flavor_gpu_count", "project_vcpu_usage"],
            "rules iterate in name order"
        );
    }

    #[test]
    fn prices_depend_on_time_and_labels() {
        let rules = from_toml(EXAMPLE_TOML).unwrap_or_else(|e| panic!("{e}"));
        let vcpu = rules
            .get("project_vcpu_usage")
            .unwrap_or_else(|| panic!("vcpu rule"));
        let before = at(2026, 6, 1);
        let just_before = at(2027, 1, 1) - Duration::microseconds(1);
        let cases = [
            (
                "listed label value",
                before,
                &[("location", "Bielefeld")][..],
                "0.8",
            ),
            (
                "number price stays exact",
                before,
                &[("location", "Giessen")][..],
                "1.2",
            ),
            (
                "unlisted label value → default",
                before,
                &[("location", "Berlin")][..],
                "1.0",
            ),
            (
                "label missing → default",
                before,
                &[("site", "Bielefeld")][..],
                "1.0",
            ),
            ("no labels → default", before, &[][..], "1.0"),
            (
                "just before a change",
                just_before,
                &[("location", "Bielefeld")][..],
                "0.8",
            ),
            (
                "exactly at a change",
                at(2027, 1, 1),
                &[("location", "Bielefeld")][..],
                "1.0",
            ),
            (
                "after a change, listed",
                at(2027, 6, 1),
                &[("location", "Bielefeld")][..],
                "1.0",
            ),
            (
                "after a change, not listed any more",
                at(2027, 6, 1),
                &[("location", "Giessen")][..],
                "1.5",
            ),
            (
                "latest version",
                at(2030, 1, 1),
                &[("location", "Bielefeld")][..],
                "2",
            ),
        ];
        for (case, time, series_labels, expected) in cases {
            assert_eq!(
                vcpu.price_at(time, &labels(series_labels)),
                price(expected),
                "{case}"
            );
        }
    }

    #[test]
    fn price_changes_split_only_strictly_inside_a_step() {
        let rules = from_toml(EXAMPLE_TOML).unwrap_or_else(|e| panic!("{e}"));
        let vcpu = rules
            .get("project_vcpu_usage")
            .unwrap_or_else(|| panic!("vcpu rule"));
        let (y27, y28) = (at(2027, 1, 1), at(2028, 1, 1));
        let cases = [
            (
                "before every change",
                at(2026, 1, 1),
                at(2026, 2, 1),
                vec![],
            ),
            ("one inside", at(2026, 12, 1), at(2027, 2, 1), vec![y27]),
            (
                "two inside",
                at(2026, 12, 1),
                at(2028, 2, 1),
                vec![y27, y28],
            ),
            ("change at the end", at(2026, 12, 1), y27, vec![]),
            ("change at the start", y27, at(2027, 2, 1), vec![]),
        ];
        for (case, from, to, expected) in cases {
            assert_eq!(vcpu.price_changes_between(from, to), expected, "{case}");
        }
    }

    #[test]
    fn metrics_to_bill_alone_gives_counters_with_one_price() {
        let rules = Rules::from_settings(
            &metrics_to_bill(&[("project_vcpu_usage", "1.0"), ("project_mb_usage", "0.3")]),
            None,
            "",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rules.len(), 2);
        for (name, expected) in [("project_vcpu_usage", "1"), ("project_mb_usage", "0.3")] {
            let rule = rules.get(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(rule.kind, MetricKind::Counter, "{name}");
            assert_eq!(rule.decrease_policy, DecreasePolicy::Rebase, "{name}");
            assert_eq!(rule.prices().len(), 1, "{name}");
            assert_eq!(
                rule.price_at(at(2030, 1, 1), &labels(&[])),
                price(expected),
                "{name}"
            );
        }
        assert!(rules.get("unknown").is_none());
    }

    #[test]
    fn a_rules_file_adds_and_overrides_metrics_to_bill() {
        let file = r#"
            [metrics.project_mb_usage]
            unit = "MB·h"
            [metrics.project_vcpu_usage]
            price = "2.5"
            [metrics.flavor_gpu_count]
            kind = "gauge"
            price = "5"
        "#;
        let rules = Rules::from_settings(
            &metrics_to_bill(&[("project_vcpu_usage", "1.0"), ("project_mb_usage", "0.3")]),
            Some(file),
            "TOML",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let now = at(2030, 1, 1);
        let none = labels(&[]);
        let get = |name: &str| rules.get(name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(
            get("project_mb_usage").price_at(now, &none),
            price("0.3"),
            "price kept from METRICS_TO_BILL"
        );
        assert_eq!(get("project_mb_usage").unit.as_deref(), Some("MB·h"));
        assert_eq!(
            get("project_vcpu_usage").price_at(now, &none),
            price("2.5"),
            "the file's price wins"
        );
        assert_eq!(
            get("flavor_gpu_count").kind,
            MetricKind::Gauge,
            "added by the file"
        );
        assert_eq!(get("flavor_gpu_count").max_gap, DEFAULT_MAX_GAP);
        assert_eq!(rules.len(), 3);
    }

    #[test]
    fn empty_rules_files_are_fine() {
        for (case, file, format) in [
            ("empty TOML", "", "toml"),
            ("empty metrics table", "[metrics]", "toml"),
            ("empty JSON object", "{}", "json"),
        ] {
            let rules = Rules::from_settings(&metrics_to_bill(&[("m", "1")]), Some(file), format)
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(rules.len(), 1, "{case}");
        }
    }

    #[test]
    fn bad_rules_files_are_refused_with_the_metric_and_the_reason() {
        let cases: &[(&str, &str, &str, &[&str])] = &[
            ("unknown kind", "toml", "[metrics.m]\nkind = \"histogram\"\nprice = 1", &["metric m: unknown variant `histogram`, expected `counter` or `gauge` in `kind`"]),
            ("unknown policy", "toml", "[metrics.m]\ndecrease_policy = \"ignore\"\nprice = 1", &["metric m", "ignore"]),
            ("negative price", "toml", "[metrics.m]\nprice = -1", &["metric m", "negative"]),
            ("negative string price", "json", r#"{"metrics": {"m": {"price": "-0.5"}}}"#, &["metric m", "negative"]),
            ("price not a number", "toml", "[metrics.m]\nprice = \"cheap\"", &["metric m", "price", "cheap"]),
            ("price of a wrong type", "toml", "[metrics.m]\nprice = true", &["metric m", "price"]),
            ("infinite price", "toml", "[metrics.m]\nprice = inf", &["metric m", "inf"]),
            ("negative label price", "toml", "[metrics.m]\nprice = 1\nlabel = \"site\"\nby_label = { a = -2 }", &["metric m", "by_label", "\"a\"", "negative"]),
            ("missing price", "toml", "[metrics.m]\nkind = \"gauge\"", &["metric m", "price"]),
            ("unknown field", "toml", "[metrics.m]\nprice = 1\nprise = 2", &["metric m", "prise"]),
            ("unknown field in JSON", "json", r#"{"metrics": {"m": {"price": 1, "colour": "red"}}}"#, &["metric m", "colour"]),
            ("unknown field in a price change", "toml", "[metrics.m]\nprice = 1\n[[metrics.m.price_changes]]\nvalid_from = \"2027-01-01\"\nprice = 2\nvalid_to = \"2028-01-01\"", &["metric m", "valid_to"]),
            ("unknown top-level key", "toml", "[metric.m]\nprice = 1", &["metric"]),
            ("bad date", "toml", "[metrics.m]\nprice = 1\n[[metrics.m.price_changes]]\nvalid_from = \"next year\"\nprice = 2", &["metric m", "next year"]),
            ("date without offset", "toml", "[metrics.m]\nprice = 1\n[[metrics.m.price_changes]]\nvalid_from = 2027-01-01T00:00:00\nprice = 2", &["metric m", "2027-01-01T00:00:00", "offset"]),
            ("date of a wrong type", "json", r#"{"metrics": {"m": {"price": 1, "price_changes": [{"valid_from": 2027, "price": 2}]}}}"#, &["metric m", "valid_from must be a date"]),
            ("same valid_from twice", "toml", "[metrics.m]\nprice = 1\n[[metrics.m.price_changes]]\nvalid_from = \"2027-01-01\"\nprice = 2\n[[metrics.m.price_changes]]\nvalid_from = \"2027-01-01T00:00:00Z\"\nprice = 3", &["metric m", "2027-01-01T00:00:00Z", "valid_from"]),
            ("price change without price", "toml", "[metrics.m]\nprice = 1\n[[metrics.m.price_changes]]\nvalid_from = \"2027-01-01\"", &["metric m", "price"]),
            ("by_label without label", "toml", "[metrics.m]\nprice = 1\nby_label = { a = 2 }", &["metric m", "label"]),
            ("bad label name", "toml", "[metrics.m]\nprice = 1\nlabel = \"1site\"", &["metric m", "1site"]),
            ("max gap on a counter", "toml", "[metrics.m]\nprice = 1\nmax_gap_seconds = 60", &["metric m", "max_gap_seconds", "gauges"]),
            ("zero max gap", "toml", "[metrics.m]\nkind = \"gauge\"\nprice = 1\nmax_gap_seconds = 0", &["metric m", "max_gap_seconds"]),
            ("negative max gap", "toml", "[metrics.m]\nkind = \"gauge\"\nprice = 1\nmax_gap_seconds = -5", &["metric m", "max_gap_seconds"]),
            ("decrease policy on a gauge", "toml", "[metrics.m]\nkind = \"gauge\"\nprice = 1\ndecrease_policy = \"restart\"", &["metric m", "decrease_policy"]),
            ("bad metric name", "toml", "[metrics.\"a-b\"]\nprice = 1", &["a-b", "metric name"]),
            ("TOML syntax", "toml", "[metrics.m\nprice = 1", &["rules file"]),
            ("JSON syntax", "json", "{\"metrics\": ", &["rules file"]),
            ("metric not a table", "json", r#"{"metrics": {"m": 1}}"#, &["metric m", "table of rule options"]),
            ("unknown format", "yaml", "metrics: {}", &["yaml", ".toml"]),
        ];
        for (case, format, file, needles) in cases {
            match Rules::from_settings(&BTreeMap::new(), Some(file), format) {
                Ok(rules) => panic!("{case}: accepted as {rules:?}"),
                Err(message) => {
                    for needle in *needles {
                        assert!(
                            message.contains(needle),
                            "{case}: {message:?} should mention {needle:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rules_built_in_code_are_checked_too() {
        let m = metric("m");
        let at_2027 = PriceVersion {
            valid_from: Some(at(2027, 1, 1)),
            ..PriceVersion::flat(price("2"))
        };
        let cases = [
            ("no versions", vec![], Some("since forever")),
            (
                "no version since forever",
                vec![at_2027.clone()],
                Some("since forever"),
            ),
            (
                "two versions since forever",
                vec![
                    PriceVersion::flat(price("1")),
                    PriceVersion::flat(price("2")),
                ],
                Some("forever"),
            ),
            (
                "unsorted versions are sorted",
                vec![at_2027.clone(), PriceVersion::flat(price("1"))],
                None,
            ),
        ];
        for (case, versions, error) in cases {
            match (Rule::new(m.clone(), MetricKind::Counter, versions), error) {
                (Ok(rule), None) => {
                    assert_eq!(rule.prices()[0].valid_from, None, "{case}");
                    assert_eq!(
                        rule.price_at(at(2027, 1, 2), &labels(&[])),
                        price("2"),
                        "{case}"
                    );
                }
                (Err(message), Some(needle)) => {
                    assert!(message.contains("metric m"), "{case}: {message}");
                    assert!(message.contains(needle), "{case}: {message}");
                }
                (got, _) => panic!("{case}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn rules_serialize_for_the_api_with_prices_as_strings() {
        let rules = from_toml(EXAMPLE_TOML).unwrap_or_else(|e| panic!("{e}"));
        let json = serde_json::to_value(&rules).unwrap_or_else(|e| panic!("{e}"));
        let expected = serde_json::json!([
            {
                "metric": "flavor_gpu_count", "kind": "gauge", "friendly_name": null,
                "description": null, "unit": null, "decrease_policy": "rebase",
                "max_gap_seconds": 600, "jump_guard": null,
                "prices": [{"valid_from": null, "default": "5", "label": null, "by_label": {}}]
            },
            {
                "metric": "project_vcpu_usage", "kind": "counter", "friendly_name": "vCPU hours",
                "description": "Virtual CPUs per hour", "unit": "vCPU·h",
                "decrease_policy": "restart", "max_gap_seconds": 900,
                "jump_guard": {"max_rate_per_hour": null, "jump_factor": "100", "jump_floor_per_hour": "10"},
                "prices": [
                    {"valid_from": null, "default": "1", "label": "location",
                     "by_label": {"Bielefeld": "0.8", "Giessen": "1.2"}},
                    {"valid_from": "2027-01-01T00:00:00Z", "default": "1.5", "label": "location",
                     "by_label": {"Bielefeld": "1"}},
                    {"valid_from": "2028-01-01T00:00:00Z", "default": "2", "label": "location",
                     "by_label": {}}
                ]
            }
        ]);
        assert_eq!(json, expected);
    }

    #[test]
    fn jump_guard_options_are_read_for_counters_and_refused_for_gauges() {
        let rules = from_toml(
            "[metrics.c]\nprice = 1\nmax_rate_per_hour = 500\njump_factor = \"20\"\njump_floor_per_hour = 0.5\n[metrics.d]\nprice = 1",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let guard = rules.get("c").map(|r| r.guard);
        let expected = JumpGuard {
            max_rate_per_hour: Some(Decimal::from(500)),
            jump_factor: Decimal::from(20),
            jump_floor_per_hour: Decimal::new(5, 1),
        };
        assert_eq!(guard, Some(expected));
        assert_eq!(rules.get("d").map(|r| r.guard), Some(JumpGuard::default()));
        for (case, body) in [
            ("gauge", "kind = \"gauge\"\nprice = 1\njump_factor = 5"),
            ("negative", "price = 1\nmax_rate_per_hour = -1"),
        ] {
            let error = from_toml(&format!("[metrics.g]\n{body}"))
                .err()
                .unwrap_or_else(|| panic!("{case}: accepted"));
            assert!(error.contains("metric g"), "{case}: {error}");
        }
    }
}
