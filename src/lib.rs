//! berth: a git-driven reconciliation agent.
//!
//! People push YAML descriptors to a config repo; berth loads them ([`descriptor`]), compares
//! what they ask for with what runs ([`plan`]), and makes the engines match ([`backend`]).
//!
//! One pass, top-down ([`reconcile`], the same for every driver):
//! 1. load: [`descriptor::load`], every descriptor under a folder (a Staging's manifests or chart
//!    rendered with it), or every problem, placed;
//! 2. observe: [`backend::Engines::observe_available`], what the engines (the Docker Engine, a
//!    Kubernetes cluster) run that this instance owns; an engine that does not answer holds back
//!    only its own kinds (or, for a pull request's plan, the status an agent committed);
//! 3. resolve: [`reconcile::resolve`], references between descriptors (`fromPipeline`);
//! 4. diff: [`plan::diff`], a pure comparison of the two, step by step with reasons;
//! 5. apply: [`apply::execute`] runs the steps through [`backend::Engines::apply`], each as soon as
//!    its dependencies are done, under the instance's lock in the engine;
//! 6. outcome: [`status::after_pass`], what was seen and done, committed back by [`source`].
//!
//! `berth apply` runs one pass over a folder. The [`agent`] runs passes for ever: it follows a git
//! repo ([`source`]), wakes on [`triggers`] (cron, [`webhook`]s through the [`server`], file
//! changes, the API), and reports through [`metrics`], the status it commits, and a web
//! [`console`] on its server. Text from
//! outside is printed through [`printable`], so a terminal never obeys it. Checkouts stream
//! their large files ([`large_files`]) and build contexts stream to the engine
//! ([`build_context`]), so the agent's memory does not follow the size of what it carries.
//! Status commits store their new objects as one [`pack`], written without a delta search.

pub mod agent;
pub mod apply;
pub mod backend;
pub mod build_context;
pub mod client;
pub mod config;
pub mod console;
pub mod database;
pub mod descriptor;
pub mod git_url;
pub mod heap;
pub mod instances;
pub mod large_files;
pub mod leader;
pub mod live;
pub mod metrics;
pub mod pack;
pub mod plan;
pub mod printable;
pub mod queue;
pub mod reconcile;
pub mod run;
pub mod run_http;
pub mod server;
pub mod source;
pub mod status;
pub mod triggers;
pub mod webhook;
pub mod write_deadline;
