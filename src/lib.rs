//! berth: a git-driven reconciliation agent.
//!
//! People push YAML descriptors to a config repo; berth loads them ([`descriptor`]), compares
//! what they ask for with what runs ([`plan`]), and makes the engines match ([`backend`]).
//!
//! One pass, top-down:
//! 1. [`descriptor::load`]: every descriptor under a folder, or every problem, placed;
//! 2. `Backend::observe`: what the engine runs that this berth instance owns;
//! 3. [`plan::diff`]: a pure comparison of the two, step by step with reasons;
//! 4. `Backend::apply`: the steps, in dependency order, bounded, one failure not stopping the rest;
//! 5. [`status`]: what was seen and done, committed back to the repo by [`source`].
//!
//! `berth apply` runs one pass over a folder. The [`agent`] runs passes for ever: it follows a git
//! repo ([`source`]), wakes on [`triggers`] (cron, [`webhook`]s through the [`server`], file
//! changes, the API), and reports through [`metrics`] and the status it commits.

pub mod agent;
pub mod apply;
pub mod backend;
pub mod build_context;
pub mod config;
pub mod descriptor;
pub mod metrics;
pub mod plan;
pub mod reconcile;
pub mod server;
pub mod source;
pub mod status;
pub mod triggers;
pub mod webhook;
