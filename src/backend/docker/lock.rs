//! The instance's apply lock and its secret-digest key, kept in the engine so berths on other hosts
//! driving the same engine see them. The lock is a container that never runs (a container name is
//! the one thing the engine creates exclusively); a lock left by a process that died is taken
//! over. The key is a label of a named volume, which `docker container prune` leaves alone, and
//! is read from the engine on every plan, so every berth digests with the one key there is.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions,
};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::template::ChallengeTemplate;
use super::{DockerBackend, EngineError, engine_message, is_status, remove_container, unreachable};
use crate::plan::{DesiredObject, SecretDigest};

/// Label on the lock container naming its holder (`host:pid`).
const LABEL_LOCK_HOLDER: &str = "berth.lock-holder";
/// Label on the lock container identifying its holder's process (see [`process_identity`]).
const LABEL_LOCK_PROCESS: &str = "berth.lock-process";
/// Label on the lock container with when it was taken.
const LABEL_LOCK_SINCE: &str = "berth.lock-since";
/// Label on the key volume (and, before it, the key container) holding the secret-digest key.
const LABEL_DIGEST_KEY: &str = "berth.digest-key";
/// A tiny image (one file, never run) that lock and key containers are made from: a container
/// name is the one thing the engine creates exclusively.
const ANCHOR_IMAGE: &str = "berth-anchor:1";

/// A keyed digest of one secret value: reveals nothing about the value to anyone without the
/// key (a plain hash of a short flag could be brute-forced from the status branch).
pub fn secret_digest(key: &[u8], name: &str, value: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(name.as_bytes());
    mac.update(&[0]);
    mac.update(value.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..12])
}

/// The lock an apply holds in the engine; remove it with [`ApplyLock::release`] (or on drop).
/// It is removed by the id of the container this berth made, never by name: by then the name may
/// belong to another berth's lock.
pub struct ApplyLock {
    docker: Docker,
    id: String,
    released: bool,
}

impl ApplyLock {
    /// Removes the lock from the engine.
    pub async fn release(mut self) {
        self.released = true;
        let _ = remove_container(&self.docker, &self.id).await;
    }
}

impl Drop for ApplyLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (docker, id) = (self.docker.clone(), self.id.clone());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = remove_container(&docker, &id).await;
            });
        }
    }
}

/// `host:pid` of this process, as lock holders are named.
fn this_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

/// When process `pid` of this pid namespace started (clock ticks since boot), if it runs.
fn process_start(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; the fields after it do not.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19).map(str::to_string)
}

/// `boot/pid-namespace/pid/start` of process `pid`: what tells a process apart from every other
/// one, on any machine (a host name does not: `localhost` and `ubuntu` repeat) and in any
/// container (pids repeat across pid namespaces), even once its pid is reused.
fn process_identity(pid: u32) -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let namespace = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let namespace = namespace
        .to_str()?
        .strip_prefix("pid:[")?
        .strip_suffix(']')?;
    let start = process_start(pid)?;
    Some(format!("{}/{namespace}/{pid}/{start}", boot.trim()))
}

/// Whether a lock's holder, by its `process` label ([`process_identity`]), is a process that has
/// died (kill -9 mid-apply). Only a process of this boot and pid namespace can be known dead; a
/// lock without the label (made by someone else) never is.
fn holder_is_dead(process: Option<&str>) -> bool {
    let fields = |identity: &str| -> Option<[String; 4]> {
        let parts: Vec<String> = identity.split('/').map(str::to_string).collect();
        parts.try_into().ok()
    };
    let (Some([boot, namespace, pid, start]), Some([this_boot, this_namespace, ..])) = (
        process.and_then(fields),
        process_identity(std::process::id())
            .as_deref()
            .and_then(fields),
    ) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    boot == this_boot
        && namespace == this_namespace
        && process_start(pid).is_none_or(|now| now != start)
}

impl DockerBackend {
    /// The instance's secret-digest key, made once and kept in the engine as a label of the
    /// volume `berth-INSTANCE-key`, so every berth driving this engine for the instance digests
    /// alike. It is read from the engine each time, never kept: a key removed and made again is
    /// the new one for every berth at once, so they never replace containers in turn. Anyone who
    /// can read it can already read the containers' environment, where the secrets are. With
    /// `make` unset (planning), a missing key is `None`: a plan writes nothing. A key can go
    /// missing after containers carry digests made with it (`docker volume rm`); [`seal`] then
    /// marks their digests unknown, so they are replaced once rather than called unchanged.
    ///
    /// [`seal`]: DockerBackend::seal
    pub(crate) async fn digest_key(&self, make: bool) -> Result<Option<Vec<u8>>, EngineError> {
        let name = format!("berth-{}-key", self.instance());
        let read = |labels: Option<&HashMap<String, String>>| {
            labels
                .and_then(|l| l.get(LABEL_DIGEST_KEY))
                .and_then(|k| hex::decode(k).ok())
                .filter(|key| key.len() >= 16)
        };
        loop {
            match self.docker.inspect_volume(&name).await {
                Ok(volume) => {
                    return match read(Some(&volume.labels)) {
                        Some(key) => Ok(Some(key)),
                        None => Err(EngineError::Misconfigured(format!(
                            "the volume {name} is not berth's digest key (no {LABEL_DIGEST_KEY} label); it was not made by berth: remove or rename it"
                        ))),
                    };
                }
                Err(error) if is_status(&error, 404) => {
                    // A key kept the old way (a never-run container) carries over, so an upgrade
                    // replaces nothing.
                    let kept = self
                        .docker
                        .inspect_container(&name, None::<InspectContainerOptions>)
                        .await
                        .ok()
                        .and_then(|c| read(c.config.and_then(|c| c.labels).as_ref()));
                    let key = match (kept, make) {
                        (Some(key), false) => return Ok(Some(key)),
                        (None, false) => return Ok(None),
                        (Some(key), true) => key,
                        (None, true) => crate::backend::random_bytes()
                            .map_err(|e| unreachable(e.to_string()))?
                            .to_vec(),
                    };
                    let mut labels = self.ownership.instance_labels();
                    labels.insert(LABEL_DIGEST_KEY.to_string(), hex::encode(key));
                    // Two berths may race here: the engine keeps the first volume of a name and
                    // answers the second with it, and both then read the one kept.
                    self.docker
                        .create_volume(bollard::models::VolumeCreateRequest {
                            name: Some(name.clone()),
                            labels: Some(labels),
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| unreachable(engine_message(&e)))?;
                }
                Err(error) => return Err(unreachable(engine_message(&error))),
            }
        }
    }

    /// Records on `object`'s parts the keyed digests of their secret values. A secret that cannot
    /// be read leaves the digests unknown; applying then fails with the reason.
    /// `key` is the instance's key as [`DockerBackend::digest_key`] read it for this plan.
    pub fn seal(template: &ChallengeTemplate, object: &mut DesiredObject, key: Option<&[u8]>) {
        for part in &mut object.parts {
            let secrets = template.secrets_of(&part.id);
            if secrets.is_empty() {
                part.secrets = Some(Default::default());
                continue;
            }
            part.secrets = match key {
                // A secret that cannot be read (its file removed, its variable unset) must not
                // pass as unchanged: its digest says why, so the plan shows an update that fails
                // with the reason and leaves the running container as it is.
                Some(key) => Some(
                    secrets
                        .iter()
                        .map(|(name, reference)| {
                            let digest = SecretDigest::sealed(name, reference.resolve(), |value| {
                                secret_digest(key, name, value)
                            });
                            (name.clone(), digest)
                        })
                        .collect(),
                ),
                // The key is gone (its volume removed by hand), so no digest can be checked.
                None => Some(
                    secrets
                        .keys()
                        .map(|name| (name.clone(), SecretDigest::Unsealed))
                        .collect(),
                ),
            };
        }
    }

    /// Makes a container that never runs from the anchor image: the engine creates a container
    /// name exactly once, which makes it a lock or a key holder. Returns the container's id.
    async fn create_anchored(
        &self,
        name: &str,
        labels: HashMap<String, String>,
    ) -> Result<String, DockerError> {
        self.ensure_anchor().await?;
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(ANCHOR_IMAGE.into()),
            cmd: Some(vec!["/berth-anchor".into()]),
            labels: Some(labels),
            network_disabled: Some(true),
            ..Default::default()
        };
        self.docker
            .create_container(Some(options), body)
            .await
            .map(|created| created.id)
    }

    async fn ensure_anchor(&self) -> Result<(), DockerError> {
        match self.docker.inspect_image(ANCHOR_IMAGE).await {
            Ok(_) => return Ok(()),
            Err(error) if !is_status(&error, 404) => return Err(error),
            Err(_) => {}
        }
        let mut tar = tar::Builder::new(Vec::new());
        let text = b"berth: lock and key holder; never run\n";
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "berth-anchor", &text[..])
            .map_err(|source| DockerError::IOError { err: source })?;
        let tar = tar
            .into_inner()
            .map_err(|source| DockerError::IOError { err: source })?;
        let (repo, tag) = ANCHOR_IMAGE.split_once(':').expect("name:tag");
        let options = CreateImageOptions {
            from_src: Some("-".into()),
            repo: Some(repo.into()),
            tag: Some(tag.into()),
            ..Default::default()
        };
        let mut import =
            self.docker
                .create_image(Some(options), Some(bollard::body_full(tar.into())), None);
        while let Some(progress) = import.next().await {
            progress?;
        }
        Ok(())
    }

    /// Takes the instance's apply lock in the engine, waiting up to `wait` for another holder. A
    /// lock left by a dead process of this host (kill -9) is taken over at once.
    pub async fn lock(&self, wait: Duration) -> Result<ApplyLock, EngineError> {
        let name = format!("berth-{}-lock", self.instance());
        let started = Instant::now();
        let holder = this_holder();
        let process = process_identity(std::process::id());
        let mut announced = false;
        loop {
            let mut labels = self.ownership.instance_labels();
            labels.insert(LABEL_LOCK_HOLDER.to_string(), holder.clone());
            if let Some(process) = &process {
                labels.insert(LABEL_LOCK_PROCESS.to_string(), process.clone());
            }
            labels.insert(
                LABEL_LOCK_SINCE.to_string(),
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            );
            match self.create_anchored(&name, labels).await {
                Ok(id) => {
                    return Ok(ApplyLock {
                        docker: self.docker.clone(),
                        id,
                        released: false,
                    });
                }
                Err(error) if is_status(&error, 409) => {}
                Err(error) => return Err(unreachable(engine_message(&error))),
            }
            let found = self
                .docker
                .inspect_container(&name, None::<InspectContainerOptions>)
                .await
                .ok();
            let found_id = found.as_ref().and_then(|c| c.id.clone());
            let labels = found
                .and_then(|c| c.config)
                .and_then(|c| c.labels)
                .unwrap_or_default();
            let other = labels.get(LABEL_LOCK_HOLDER).cloned().unwrap_or_default();
            if let (true, Some(dead)) = (
                holder_is_dead(labels.get(LABEL_LOCK_PROCESS).map(String::as_str)),
                found_id,
            ) {
                tracing::warn!(holder = %other, "taking over the apply lock of a process that died");
                // By id: another berth may have taken the name over since it was read.
                remove_container(&self.docker, &dead)
                    .await
                    .map_err(|e| unreachable(engine_message(&e)))?;
                continue;
            }
            if started.elapsed() >= wait {
                return Err(EngineError::Locked {
                    instance: self.instance().to_string(),
                    holder: other,
                    since: labels.get(LABEL_LOCK_SINCE).cloned().unwrap_or_default(),
                    waited: started.elapsed().as_secs(),
                    lock: name,
                });
            }
            if !announced {
                announced = true;
                tracing::info!(holder = %other, "another berth is applying; waiting for it");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    #[test]
    fn secret_digests_are_keyed_and_name_bound() {
        let a = secret_digest(b"key-one", "FLAG", "flag{x}");
        assert_eq!(a, secret_digest(b"key-one", "FLAG", "flag{x}"));
        assert_ne!(a, secret_digest(b"key-two", "FLAG", "flag{x}"));
        assert_ne!(a, secret_digest(b"key-one", "OTHER", "flag{x}"));
        assert_ne!(a, secret_digest(b"key-one", "FLAG", "flag{y}"));
        let plain = hex::encode(Sha256::digest(b"flag{x}"));
        assert!(!plain.starts_with(&a), "not a plain hash of the value");
    }

    /// Only a holder of this boot and pid namespace whose process is gone (or whose pid now
    /// belongs to a later process) is dead; junk and other machines' holders never are.
    #[test]
    fn lock_holders_are_dead_only_when_known_to_be() {
        let this = process_identity(std::process::id()).expect("linux");
        assert!(!holder_is_dead(Some(&this)));
        let [boot, namespace, _, start]: [&str; 4] =
            this.split('/').collect::<Vec<_>>().try_into().unwrap();
        assert!(holder_is_dead(Some(&format!(
            "{boot}/{namespace}/4194000/1"
        ))));
        let pid = std::process::id();
        assert!(holder_is_dead(Some(&format!(
            "{boot}/{namespace}/{pid}/{start}0"
        ))));
        let other_boot = format!("00000000-0000-4000-8000-000000000000/{namespace}/4194000/1");
        assert!(!holder_is_dead(Some(&other_boot)));
        assert!(!holder_is_dead(Some(&format!("{boot}/1/4194000/1"))));
        for junk in [
            "",
            "x",
            "a/b/c",
            &format!("{boot}/{namespace}/../1/1"),
            "h:1",
        ] {
            assert!(!holder_is_dead(Some(junk)), "{junk}");
        }
        assert!(!holder_is_dead(None));
    }
}
