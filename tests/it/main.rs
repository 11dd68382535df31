//! berth's one integration-test binary (one link on a 2-core machine, not one per file).
//!
//! - `validate`: the loader on the fixtures in `tests/fixtures/invalid/` and the sample repo;
//! - `cli`: the `berth` binary's output formats and exit codes;
//! - `docker`: plan and apply against the real Docker Engine;
//! - `kube`: Stagings against a real single-node Kubernetes cluster (`tests/testbed/kube-up.sh`);
//! - `pipeline`: `berth run`, a pipeline run in the foreground on the real Docker Engine;
//! - `agent`: `berth agent` following real git servers (`gitserver`) and applying to the engine;
//! - `runs`: the agent's pipeline runs: webhooks, the queue, `kill -9`, `berth runs` and `berth logs`;
//! - `packaging`: the container image, the Kubernetes manifests and their RBAC, completions and
//!   the man page;
//! - `schema_files`: the committed `schema/` matches the Rust types;
//! - `server_limits`: the agent's HTTP server against floods and clients that stall.
//!
//! - `healing`: the agent's status stays true (rejections, refused pushes, held prunes) and it
//!   heals itself (a damaged clone), rate-limits passes and takes a webhook delivery once.
//! - `instances`: per-team instances through the agent's API, on the real Docker Engine.
//! - `walls`: what a player in a challenge or an outsider's pipeline step can reach and do.
//! - `console`: the web console in a real headless browser (chromium through chromedriver).
//!
//! The harness they share lives in `support`.

mod agent;
mod cli;
mod console;
mod docker;
mod hardening;
mod healing;
mod instances;
mod kube;
mod packaging;
mod pipeline;
mod runs;
mod schema_files;
mod server_limits;
mod support;
mod validate;
mod walls;
