//! os-credits: turns Prometheus usage metrics into per-project credit balances.
#![forbid(unsafe_code)]

pub mod api;
pub mod billing;
pub mod cli;
pub mod config;
pub mod demo_exporter;
pub mod domain;
pub mod forecast;
pub mod ingest;
pub mod maintenance;
pub mod money;
pub mod notify;
pub mod outbound;
pub mod receive;
pub mod scrape;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod workers;
