//! Backends: the parts that observe and change one family of resources.
//!
//! Each backend turns descriptors into [`crate::plan::DesiredObject`]s, reports what it runs as
//! [`crate::plan::ObservedObject`]s, and carries out steps. Today: [`docker`] for Challenges.
//! Pipelines and Stagings are planned as `skip` until their backends land.

pub mod docker;
