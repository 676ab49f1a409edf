//! Billing: turning stored samples into exact credit charges per project.
//!
//! The pure core, without I/O: [`rules`] says how each metric is priced, [`charge`]
//! turns one series' new samples into charges, decreases and gaps, and [`money`]
//! converts floats exactly and rounds totals.

pub mod account;
pub mod charge;
pub mod engine;
pub mod guard;
pub mod held;
pub mod history;
pub mod portal;
pub mod quarantine;
pub mod rules;
pub mod worker;
