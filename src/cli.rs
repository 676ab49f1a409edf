//! The command line: `serve` (default), `migrate`, `maintain`, `demo-exporter`, `send-test-email`.

use crate::demo_exporter::DemoConfig;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use std::time::Duration;

/// os-credits: turns Prometheus usage metrics into per-project credit balances.
#[derive(Debug, Parser)]
#[command(name = "os-credits", version, about)]
pub struct Cli {
    /// Address to bind (overrides CREDITS_HOST; demo-exporter: default 127.0.0.1).
    #[arg(long, global = true)]
    pub host: Option<String>,
    /// Port to bind (overrides CREDITS_PORT; demo-exporter: default 9100).
    #[arg(long, global = true)]
    pub port: Option<u16>,
    /// After binding, write the bound port (one line) to this file, so a supervisor
    /// or test that asked for port 0 can read it (serve and demo-exporter).
    #[arg(long, global = true)]
    pub port_file: Option<std::path::PathBuf>,
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: HTTP API, scraper (and later billing and notifications).
    Serve,
    /// Apply database migrations and policies (SAMPLES_RETENTION_DAYS, compression) and exit.
    Migrate {
        /// Convert plain tables to TimescaleDB hypertables (the server must preload it).
        #[arg(long)]
        to_timescaledb: bool,
        /// With --to-timescaledb: print what would be converted and how big it is, change nothing.
        #[arg(long, requires = "to_timescaledb")]
        dry_run: bool,
    },
    /// Run one maintenance round (sample retention, policy check) now and exit.
    Maintain,
    /// Serve synthetic de.NBI-style usage metrics for development and benchmarks.
    DemoExporter(DemoArgs),
    /// Send one test mail with the MAIL_* settings and say what to fix if it fails.
    SendTestEmail {
        /// The address to send to.
        #[arg(long)]
        to: String,
    },
}

/// Options of the demo exporter.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of projects (two series each).
    #[arg(long, default_value_t = 20)]
    pub projects: usize,
    /// Seed for names, sizes and start times.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Fraction (0 to 1) of projects whose usage value drops now and then.
    #[arg(long, default_value_t = 0.0)]
    pub drop_fraction: f64,
    /// Seconds between two drops of a dropping project.
    #[arg(long, default_value_t = 3600)]
    pub drop_period_secs: u64,
    /// Reference start of usage (RFC 3339); default 2026-01-01T00:00:00Z.
    #[arg(long)]
    pub start: Option<DateTime<Utc>>,
    /// From this instant (RFC 3339) the vCPU weight is multiplied by
    /// --reweight-factor, re-weighting the whole history at once as an operator
    /// editing de.NBI's exporter weights does (the jump guard holds that step).
    #[arg(long)]
    pub reweight_at: Option<DateTime<Utc>>,
    /// Factor of --reweight-at.
    #[arg(long, default_value_t = 5.0)]
    pub reweight_factor: f64,
}

impl DemoArgs {
    /// The exporter configuration these options describe.
    pub fn config(&self) -> Result<DemoConfig, String> {
        if !(0.0..=1.0).contains(&self.drop_fraction) {
            return Err(format!(
                "--drop-fraction must be between 0 and 1, got {}",
                self.drop_fraction
            ));
        }
        if !(self.reweight_factor.is_finite() && self.reweight_factor > 0.0) {
            return Err(format!(
                "--reweight-factor must be a number greater than 0, got {}",
                self.reweight_factor
            ));
        }
        if self.drop_period_secs == 0 {
            return Err("--drop-period-secs must be greater than 0".into());
        }
        let defaults = DemoConfig::default();
        Ok(DemoConfig {
            projects: self.projects,
            seed: self.seed,
            start: self.start.unwrap_or(defaults.start),
            drop_fraction: self.drop_fraction,
            drop_period: Duration::from_secs(self.drop_period_secs),
            reweight: self.reweight_at.map(|at| (at, self.reweight_factor)),
        })
    }
}
