//! berth: a git-driven reconciliation agent.
//!
//! People push YAML descriptors to a config repo; berth loads them ([`descriptor`]), compares
//! what they ask for with what runs ([`plan`]), and makes the engines match ([`backend`]).
//!
//! One pass, top-down:
//! 1. [`descriptor::load`]: every descriptor under a folder, or every problem, placed;
//! 2. `Backend::observe`: what the engine runs that this berth instance owns;
//! 3. [`plan::diff`]: a pure comparison of the two, step by step with reasons;
//! 4. `Backend::apply`: the steps, in dependency order, bounded, one failure not stopping the rest.

pub mod apply;
pub mod backend;
pub mod build_context;
pub mod descriptor;
pub mod plan;
pub mod reconcile;
