//! The walls a descriptor can declare, and the ones it gets without asking.
//!
//! A Challenge (and each of its sidecars) may say what its processes need beyond the usual:
//! capabilities, a read-only root, a user, tmpfs mounts, ulimits, and, with the agent's consent,
//! a privileged container ([`Security`]). Challenges and Pipelines say whether they may reach out
//! ([`NetworkSpec`]). What nobody wrote is filled in from the agent's [`Defaults`], which are
//! never unlimited: the specs' `settle_limits` do it once, in the loader, so the
//! filled-in values are part of the spec hash and a change of defaults shows in the plan.
//!
//! Pure types and pure functions: the backends map them onto an engine.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use super::values::{MEMORY_LIMIT_FORMAT, Size, text_value};

/// The Linux capabilities a container can be given or denied, as Docker and Kubernetes name
/// them (without `CAP_`). `ALL` stands for every one (useful in `drop`).
pub const CAPABILITIES: &[&str] = &[
    "ALL",
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
];

/// The capability every container berth makes loses unless its descriptor adds it back: raw
/// sockets forge packets and spoof neighbours on a shared bridge.
pub const ALWAYS_DROPPED: &str = "NET_RAW";

/// One Linux capability, by its name without `CAP_` (see [`CAPABILITIES`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Capability(String);

impl Capability {
    /// The name, as Docker and Kubernetes write it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Capability {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let name = text.strip_prefix("CAP_").unwrap_or(text);
        match CAPABILITIES.contains(&name) {
            true => Ok(Capability(name.to_string())),
            false => Err(format!(
                "\"{text}\" is not a Linux capability; expected one of {}",
                CAPABILITIES.join(", ")
            )),
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

text_value!(Capability);

impl JsonSchema for Capability {
    fn schema_name() -> Cow<'static, str> {
        "Capability".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "enum": CAPABILITIES,
            "description": "A Linux capability without CAP_, e.g. SYS_ADMIN; ALL stands for every one."
        })
    }
}

/// The user (and group) a container's processes run as: numeric, `UID` or `UID:GID`, so that it
/// means the same on Docker and Kubernetes whatever the image's `/etc/passwd` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct User {
    /// The user id.
    pub uid: u32,
    /// The group id, when given.
    pub gid: Option<u32>,
}

impl FromStr for User {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || {
            format!("\"{text}\" is not a user; expected a numeric UID or UID:GID, e.g. 1000:1000")
        };
        let number = |part: &str| -> Result<u32, String> {
            match part.bytes().all(|b| b.is_ascii_digit()) && !part.is_empty() {
                true => part.parse().map_err(|_| invalid()),
                false => Err(invalid()),
            }
        };
        match text.split_once(':') {
            Some((uid, gid)) => Ok(User {
                uid: number(uid)?,
                gid: Some(number(gid)?),
            }),
            None => Ok(User {
                uid: number(text)?,
                gid: None,
            }),
        }
    }
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.gid {
            Some(gid) => write!(f, "{}:{gid}", self.uid),
            None => write!(f, "{}", self.uid),
        }
    }
}

text_value!(User);

impl JsonSchema for User {
    fn schema_name() -> Cow<'static, str> {
        "User".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^[0-9]{1,10}(:[0-9]{1,10})?$",
            "description": "A numeric user id, or UID:GID.",
            "examples": ["1000:1000"]
        })
    }
}

/// What a container's processes may do beyond the usual. Every container berth makes also runs
/// with `no-new-privileges` and without `NET_RAW` (unless `capabilities.add` names it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Security {
    /// Capabilities to add to or drop from the engine's default set.
    #[serde(default, skip_serializing_if = "Capabilities::is_empty")]
    pub capabilities: Capabilities,
    /// Mount the image's file system read-only (give writable places with `tmpfs`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only_root_filesystem: bool,
    /// Run as this numeric user, `UID` or `UID:GID`, instead of the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    /// Writable in-memory folders, e.g. `{path: /tmp, size: 64Mi}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tmpfs: Vec<Tmpfs>,
    /// Limits on open files and processes per user (Docker only).
    #[serde(default, skip_serializing_if = "Ulimits::is_empty")]
    pub ulimits: Ulimits,
    /// Run privileged: every capability and every device. Refused unless the agent's config sets
    /// `allowPrivileged: true`, and always shown in the plan.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
}

/// Capabilities added to and dropped from the engine's default set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Capabilities {
    /// Capabilities to add, e.g. `[SYS_ADMIN]` for nsjail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<Capability>,
    /// Capabilities to drop, e.g. `[ALL]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop: Vec<Capability>,
}

impl Capabilities {
    fn is_empty(&self) -> bool {
        self.add.is_empty() && self.drop.is_empty()
    }

    /// What the engine is asked to drop: the declared ones and [`ALWAYS_DROPPED`], unless it is
    /// added back on purpose.
    pub fn dropped(&self) -> Vec<String> {
        let mut dropped: Vec<String> = self.drop.iter().map(|c| c.0.clone()).collect();
        let readded = self
            .add
            .iter()
            .any(|c| c.0 == ALWAYS_DROPPED || c.0 == "ALL");
        if !readded && !dropped.iter().any(|c| c == ALWAYS_DROPPED || c == "ALL") {
            dropped.push(ALWAYS_DROPPED.to_string());
        }
        dropped
    }

    /// What the engine is asked to add.
    pub fn added(&self) -> Vec<String> {
        self.add.iter().map(|c| c.0.clone()).collect()
    }
}

/// A writable in-memory folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Tmpfs {
    /// Where it is mounted: an absolute path.
    #[schemars(regex(pattern = r"^/[^\x00-\x1f,:]*$"), length(max = 4096))]
    pub path: String,
    /// Largest size; 64Mi by default.
    #[serde(default = "sixty_four_mebibytes")]
    pub size: Size,
}

fn sixty_four_mebibytes() -> Size {
    Size { bytes: 64 << 20 }
}

/// Per-user limits inside the container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Ulimits {
    /// Most open files per process (soft and hard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 1_048_576))]
    pub nofile: Option<u32>,
    /// Most processes of the container's user (soft and hard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4_194_304))]
    pub nproc: Option<u32>,
}

impl Ulimits {
    fn is_empty(&self) -> bool {
        self.nofile.is_none() && self.nproc.is_none()
    }
}

/// Where a Challenge's or a Pipeline's containers may connect to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkSpec {
    /// Whether they may open connections out (to the internet); `true` by default. With `false`
    /// they have no route out at all. Either way they can never reach other challenges, other
    /// runs, or the agent.
    #[serde(default = "yes")]
    pub egress: bool,
    /// Other challenges this one may connect to on purpose, as `Challenge/NAME` (Kubernetes: a
    /// NetworkPolicy path to their pods). On Docker, put containers that talk in one challenge,
    /// as sidecars.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_connect_to: Vec<super::values::ObjectRef>,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        NetworkSpec {
            egress: true,
            allow_connect_to: Vec::new(),
        }
    }
}

impl NetworkSpec {
    /// Whether it is the default (and so left unwritten).
    pub fn is_default(&self) -> bool {
        *self == NetworkSpec::default()
    }
}

fn yes() -> bool {
    true
}

/// Limits for one container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resources {
    /// CPU cores, e.g. 0.5: from 0.01 (Docker's smallest share) to 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 1024))]
    pub cpus: Option<f64>,
    /// Memory limit, e.g. 256Mi: at least 6Mi, Docker's smallest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = MEMORY_LIMIT_FORMAT))]
    pub memory: Option<Size>,
    /// Most processes the container may run: 1 to 4194304 (Linux's largest pid_max). Leave it out
    /// for the engine's default; 0 and -1 are refused because engines disagree on whether they mean
    /// "unlimited" or "keep the current limit".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4_194_304))]
    pub pids: Option<i64>,
}

impl Resources {
    /// No limit written.
    pub fn empty() -> Resources {
        Resources {
            cpus: None,
            memory: None,
            pids: None,
        }
    }
}

/// The limits a container gets for what its descriptor leaves out: never unlimited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Defaults {
    /// For each container of a Challenge (and each sidecar): 1 CPU, 512Mi, 512 processes unless
    /// set here.
    #[serde(default = "challenge_defaults")]
    pub challenge: Resources,
    /// For a Pipeline's step container: 2 CPUs, 2Gi, 1024 processes unless set here.
    #[serde(default = "step_defaults")]
    pub step: Resources,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            challenge: challenge_defaults(),
            step: step_defaults(),
        }
    }
}

fn challenge_defaults() -> Resources {
    Resources {
        cpus: Some(1.0),
        memory: Some(Size { bytes: 512 << 20 }),
        pids: Some(512),
    }
}

fn step_defaults() -> Resources {
    Resources {
        cpus: Some(2.0),
        memory: Some(Size { bytes: 2 << 30 }),
        pids: Some(1024),
    }
}

impl Defaults {
    /// The defaults with every field the operator left out taken from the built-in ones, so a
    /// partial `defaults:` never means unlimited.
    pub fn completed(mut self) -> Defaults {
        let built_in = Defaults::default();
        self.challenge.fill_from(&built_in.challenge, true);
        self.step.fill_from(&built_in.step, true);
        self
    }
}

/// The agent's rules for walls that descriptors cannot set alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Walls {
    /// Limits for what descriptors leave out.
    pub defaults: Defaults,
    /// Whether `security.privileged: true` is accepted.
    pub allow_privileged: bool,
}

impl Resources {
    /// Fills the fields left out from `defaults` (`pids` only where the engine can limit it).
    pub fn fill_from(&mut self, defaults: &Resources, with_pids: bool) {
        self.cpus = self.cpus.or(defaults.cpus);
        self.memory = self.memory.or(defaults.memory);
        if with_pids {
            self.pids = self.pids.or(defaults.pids);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_checked_by_name_with_or_without_cap() {
        assert_eq!(
            "SYS_ADMIN".parse::<Capability>().unwrap().as_str(),
            "SYS_ADMIN"
        );
        assert_eq!("CAP_CHOWN".parse::<Capability>().unwrap().as_str(), "CHOWN");
        assert!("sys_admin".parse::<Capability>().is_err());
        assert!("SYS_ADMIN\n".parse::<Capability>().is_err());
    }

    /// NET_RAW is always dropped, unless added back on purpose.
    #[test]
    fn net_raw_is_dropped_unless_added_back() {
        let none = Capabilities::default();
        assert_eq!(none.dropped(), vec!["NET_RAW"]);
        let readded = Capabilities {
            add: vec!["NET_RAW".parse().unwrap()],
            drop: vec![],
        };
        assert!(readded.dropped().is_empty());
        let all = Capabilities {
            add: vec![],
            drop: vec!["ALL".parse().unwrap()],
        };
        assert_eq!(all.dropped(), vec!["ALL"]);
    }

    #[test]
    fn users_are_numeric() {
        assert_eq!(
            "1000:1000".parse::<User>().unwrap(),
            User {
                uid: 1000,
                gid: Some(1000)
            }
        );
        assert_eq!("0".parse::<User>().unwrap().gid, None);
        for bad in [
            "root",
            "1000:",
            ":1000",
            "1000:1000:1",
            "-1",
            "99999999999",
            "",
        ] {
            assert!(bad.parse::<User>().is_err(), "{bad}");
        }
    }

    /// Defaults never leave a limit unlimited, even when the operator sets only part of them.
    #[test]
    fn partial_defaults_are_completed_from_the_built_in_ones() {
        let partial = Defaults {
            challenge: Resources {
                cpus: Some(0.5),
                memory: None,
                pids: None,
            },
            step: Resources::empty(),
        }
        .completed();
        assert_eq!(partial.challenge.cpus, Some(0.5));
        assert_eq!(
            partial.challenge.memory,
            Defaults::default().challenge.memory
        );
        assert_eq!(partial.step, Defaults::default().step);
    }
}
