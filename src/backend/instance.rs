//! One per-team instance as every engine speaks of it: what it is made with ([`NewInstance`]),
//! what started ([`Started`]), what an engine holds of it ([`InstanceContainer`],
//! [`InstanceObjects`]), and why a call failed ([`InstanceTrouble`]). The engines' instance code
//! and the face above them ([`super::instances`]) share these words; nothing here acts.

use crate::descriptor::model::Engine;

/// Why an instance call failed: the engine did not answer, or it refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InstanceTrouble {
    /// The engine did not answer; worth another try later.
    #[error("{0}")]
    EngineGone(String),
    /// The engine answered no, or the challenge cannot have instances as it is.
    #[error("{0}")]
    Refused(String),
}

/// One instance's main container (on Kubernetes, its pod) as the engine holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceContainer {
    /// The instance's id.
    pub id: String,
    /// The challenge.
    pub challenge: String,
    /// The container's (or pod's) name.
    pub container: String,
    /// The version it runs.
    pub version: String,
    /// Whether it runs.
    pub running: bool,
}

/// What is left on an engine of an instance: its id and challenge, and the name of its main
/// container (on Kubernetes, of the objects it is made of).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InstanceObjects {
    /// The engine.
    pub engine: Engine,
    /// The instance's id.
    pub id: String,
    /// The challenge.
    pub challenge: String,
    /// Its main container's name.
    pub container: String,
}

/// What a new instance is made with.
#[derive(Debug, Clone, Copy)]
pub struct NewInstance<'a> {
    /// The instance's id.
    pub id: &'a str,
    /// One host port for each of the challenge's `ports`, in their order; on Kubernetes, empty
    /// for a new instance (the cluster gives NodePorts) and its NodePorts for one made again.
    pub host_ports: &'a [u16],
    /// The team's flag, given as the challenge's `instanced.flag` says; none for a pooled one.
    pub flag: Option<&'a str>,
}

/// A started instance: its main container and the host ports it answers on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The main container's (or pod's) name.
    pub container: String,
    /// One host port for each of the challenge's `ports`, in their order.
    pub host_ports: Vec<u16>,
}
