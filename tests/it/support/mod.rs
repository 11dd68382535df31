//! The harness every test module shares, kept apart from the tests so they read as a
//! specification:
//!
//! - [`util`]: paths, the `berth` binary, scratch repos, waiting for a condition;
//! - [`net`]: git, a free port and one HTTP request (shared with the benches);
//! - [`engine`]: the real Docker Engine, a berth instance of its own per test;
//! - [`gitserver`]: real git servers on loopback (git daemon, http-backend behind lighttpd, sshd);
//! - [`agent`]: a real `berth agent` process, its API and signed webhooks;
//! - [`cluster`]: the real single-node Kubernetes cluster of `tests/testbed/`;
//! - [`proxy`]: a TCP front that cuts an engine off mid-step.
//!
//! The benches include [`net`] (`benches/support/common.rs`), whose pieces name nothing of this
//! crate; a bench is its own crate and cannot reach into the test binary.

pub mod agent;
pub mod cluster;
pub mod engine;
pub mod gitserver;
pub mod net;
pub mod proxy;
pub mod util;
