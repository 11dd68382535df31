//! Per-team instances on the Docker Engine: the containers a challenge's `instanced` asks for, one
//! per team, each on host ports of its own.
//!
//! A pass prepares an instanced challenge and makes no container: it makes the network of the
//! challenge's current version (inter-container traffic off, so an instance reaches neither
//! another team's nor another challenge), builds or pulls its image, and stops there. That
//! network, labelled with the version's hash and state, is what the pass observes of the
//! challenge, so a plan says when a version changes and is quiet otherwise. The containers are
//! made, given their flags and removed by [`crate::instances`], through the calls here.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use bollard::models::{ContainerSummary, Network, PortBinding};
use bollard::query_parameters::{ListContainersOptions, ListNetworksOptions};

use super::network::Wall;
use super::observe::{container_name_of, container_state, label};
use super::template::{ChallengeTemplate, FOLDER_VOLUME, INSTANCES_PART};
use super::{Attempt, DockerBackend, LABEL_SLOT, LABEL_SPEC, Trouble, is_status, remove_container};
use crate::backend::instance::{InstanceContainer, InstanceObjects, InstanceTrouble, NewInstance};
use crate::backend::{LABEL_INSTANCE, LABEL_INSTANCE_ID, LABEL_KIND, LABEL_NAME, LABEL_SPEC_HASH};
use crate::descriptor::model::RunState;
use crate::descriptor::{Kind, ObjectRef};
use crate::plan::{Health, ObservedObject, ObservedPart, PartState, Slot};

/// The slot of every instance's main container.
pub const INSTANCE_SLOT: &str = "instance";
/// The slot of an instance's sidecars.
const SIDECAR_SLOT: &str = "instance-sidecar";
/// Label on an instance's sidecar naming its main container, which it lives and goes with.
const LABEL_INSTANCE_MAIN: &str = "berth.instance-main";
/// Where a pooled instance's flag volume is mounted: the flag file is a link into it.
const FLAG_MOUNT: &str = "/run/berth-flag";
/// The flag's file in that volume.
const FLAG_IN_VOLUME: &str = "flag";
/// Label on an instanced challenge's network: whether its version runs (`running`) or is stopped.
const LABEL_STATE: &str = "berth.state";

impl From<Trouble> for InstanceTrouble {
    fn from(trouble: Trouble) -> InstanceTrouble {
        match trouble {
            Trouble::Transient(why) => InstanceTrouble::EngineGone(why),
            Trouble::Failed(why) => InstanceTrouble::Refused(why),
        }
    }
}

/// The network of an instanced challenge's version: its instances reach nobody on it.
pub fn instances_wall(template: &ChallengeTemplate) -> Wall {
    Wall::Instances {
        key: template.key.clone(),
        version: template.main_hash().to_string(),
        egress: template.spec.network.egress,
        containers: super::template::capacity(&template.spec),
    }
}

impl DockerBackend {
    /// A pass's step for an instanced challenge: its version's network and image made, whatever
    /// ran of it as a single challenge removed, networks of older versions that no instance uses
    /// any more removed. A stopped challenge's instances are removed too.
    pub(super) async fn prepare_instances(
        &self,
        template: &ChallengeTemplate,
        repo_root: &Path,
    ) -> Attempt<String> {
        // The image first, built behind the shared challenge wall: the version's network is what
        // a pass observes of it, so it is made only once the version can run.
        let builds_on = self
            .ensure_wall(&Wall::Challenges {
                egress: template.spec.network.egress,
            })
            .await?;
        let image = self.ensure_image(template, repo_root, &builds_on).await?;
        self.ensure_sidecar_images(template, repo_root, &builds_on)
            .await?;
        // Copies of repo folders are read-only, so every instance mounts the same one (an older
        // copy stays while instances of the older version mount it).
        let copies = self
            .ensure_folder_copies(template, &image, repo_root)
            .await?;
        self.remove_old_folder_copies(template, &copies).await?;
        let wall = instances_wall(template);
        let network = self.ensure_instances_network(template, &wall).await?;
        let stopped = template.spec.state == RunState::Stopped;
        let existing = self
            .containers(Some(template.key.name.as_str()))
            .await
            .map_err(|e| self.trouble("cannot list containers", e))?;
        let mut removed = 0;
        for container in &existing {
            // What ran of it before it was instanced, and, once it is stopped, its instances.
            if stopped || label(container, LABEL_INSTANCE_ID).is_none() {
                remove_container(&self.docker, &container_name_of(container))
                    .await
                    .map_err(|e| self.trouble("cannot remove a container", e))?;
                removed += 1;
            }
        }
        self.remove_networks_of(&template.key, Some(&network)).await;
        let mut done = match stopped {
            true => "stopped: no spawns".to_string(),
            false => format!("ready for instances of {image}"),
        };
        if removed > 0 {
            done.push_str(&format!("; {removed} container(s) removed"));
        }
        Ok(done)
    }

    async fn ensure_instances_network(
        &self,
        template: &ChallengeTemplate,
        wall: &Wall,
    ) -> Attempt<String> {
        let mut labels =
            self.ownership
                .labels_over(&template.labels, &template.key, template.main_hash());
        labels.insert(
            LABEL_STATE.into(),
            match template.spec.state {
                RunState::Running => "running",
                RunState::Stopped => "stopped",
            }
            .into(),
        );
        labels.insert(LABEL_SPEC.into(), template.parts[0].spec.to_string());
        self.ensure_wall_labelled(wall, labels).await
    }

    /// The instanced challenges this berth has prepared: per challenge, the newest version's
    /// network as its one part.
    pub(super) async fn observe_instanced(
        &self,
    ) -> Result<Vec<ObservedObject>, bollard::errors::Error> {
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_string(),
            vec![
                format!("{LABEL_INSTANCE}={}", self.instance()),
                format!("{LABEL_KIND}={}", Kind::Challenge),
                format!("{}={}", super::network::LABEL_WALL, Wall::INSTANCES),
            ],
        );
        let networks = self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters),
            }))
            .await?;
        let mut newest: BTreeMap<String, &Network> = BTreeMap::new();
        for network in &networks {
            let Some(name) = network.labels.as_ref().and_then(|l| l.get(LABEL_NAME)) else {
                continue;
            };
            let newer = newest
                .get(name)
                .is_none_or(|seen| (&seen.created, &seen.id) < (&network.created, &network.id));
            if newer {
                newest.insert(name.clone(), network);
            }
        }
        Ok(newest
            .into_iter()
            .filter_map(|(name, network)| {
                let labels = network.labels.as_ref()?;
                let state = match labels.get(LABEL_STATE).map(String::as_str) {
                    Some("stopped") => PartState::Stopped,
                    _ => PartState::Running,
                };
                Some(ObservedObject {
                    key: ObjectRef {
                        kind: Kind::Challenge,
                        name: name.parse().ok()?,
                    },
                    engine: crate::plan::Engine::Docker,
                    parts: vec![ObservedPart {
                        name: network.name.clone().unwrap_or_default(),
                        id: INSTANCES_PART.into(),
                        hash: labels.get(LABEL_SPEC_HASH)?.clone(),
                        spec: labels
                            .get(LABEL_SPEC)
                            .and_then(|s| serde_json::from_str(s).ok())
                            .unwrap_or_default(),
                        secrets: None,
                        state,
                        health: Health::Healthy,
                        detail: None,
                    }],
                    archived_at: None,
                    expired: None,
                    reach: Vec::new(),
                    produced: None,
                })
            })
            .collect())
    }

    /// The image an instance of `template` runs, as its pass prepared it.
    pub fn instance_image(&self, template: &ChallengeTemplate) -> Result<String, InstanceTrouble> {
        self.image_of(template).map_err(InstanceTrouble::from)
    }

    /// Makes and starts an instance of `template`: on its version's network, its ports published
    /// on `new.host_ports`, with the challenge's secrets and the team's flag. A container that
    /// does not start is removed again.
    pub async fn start_instance(
        &self,
        template: &ChallengeTemplate,
        new: NewInstance<'_>,
    ) -> Result<String, InstanceTrouble> {
        let name = self.instance_container_name(template, new.id);
        match self.try_start_instance(template, new, &name).await {
            Ok(()) => Ok(name),
            Err(trouble) => {
                let _ = self.remove_instance(&name).await;
                Err(trouble.into())
            }
        }
    }

    /// The name of instance `id`'s container at the template's version.
    pub fn instance_container_name(&self, template: &ChallengeTemplate, id: &str) -> String {
        format!(
            "berth-{}-{}-{id}-{}",
            self.instance(),
            template.key.name,
            &template.main_hash()[..8.min(template.main_hash().len())]
        )
    }

    async fn try_start_instance(
        &self,
        template: &ChallengeTemplate,
        new: NewInstance<'_>,
        name: &str,
    ) -> Attempt<()> {
        let image = self.image_of(template)?;
        let spec = &template.spec;
        // With sidecars, the instance has a network of its own, where its containers reach each
        // other by name; alone, it joins its version's network, where it reaches nobody.
        let (network, aliases) = match spec.sidecars.is_empty() {
            true => (instances_wall(template).name(self.instance()), None),
            false => {
                let wall = Wall::Instance {
                    key: template.key.clone(),
                    container: name.to_string(),
                    egress: spec.network.egress,
                    containers: 1 + spec.sidecars.len(),
                };
                let network = self.ensure_wall(&wall).await?;
                let aliases =
                    super::template::network_aliases(&network, template.key.name.as_str());
                (network, Some(aliases))
            }
        };
        let part = &template.parts[0];
        let mut in_place = HashMap::new();
        for sidecar in template.sidecar_order() {
            let slot = Slot::sidecar_id(sidecar.name.as_str());
            let secrets = template.secrets_of(&slot);
            let values = crate::descriptor::values::resolve_all(&secrets)
                .map_err(|e| Trouble::Failed(e.to_string()))?;
            let mut config =
                self.sidecar_config(template, part, sidecar, &network, &values, &BTreeMap::new());
            anonymous_volumes(&mut config);
            let labels = config.labels.get_or_insert_default();
            labels.insert(LABEL_SLOT.into(), SIDECAR_SLOT.into());
            labels.insert(LABEL_INSTANCE_ID.into(), new.id.into());
            labels.insert(LABEL_INSTANCE_MAIN.into(), name.into());
            let sidecar_name = format!("{name}-{}", sidecar.name);
            self.create(&sidecar_name, config).await?;
            // Sidecars first, each once those it depends on are healthy, as the main container
            // may need its database at once.
            self.wait_for_sidecars(template, &slot, &in_place).await?;
            self.start(&sidecar_name).await?;
            in_place.insert(slot, sidecar_name);
        }
        self.wait_for_sidecars(template, INSTANCES_PART, &in_place)
            .await?;
        let secrets = template.secrets_of(INSTANCES_PART);
        let values = crate::descriptor::values::resolve_all(&secrets)
            .map_err(|e| Trouble::Failed(e.to_string()))?;
        let mut config =
            self.main_config(template, part, &image, &network, &values, &BTreeMap::new());
        config.networking_config = aliases;
        anonymous_volumes(&mut config);
        let labels = config.labels.get_or_insert_default();
        labels.insert(LABEL_SLOT.into(), INSTANCE_SLOT.into());
        labels.insert(LABEL_INSTANCE_ID.into(), new.id.into());
        let variable = spec
            .instanced
            .as_ref()
            .and_then(|i| i.flag.as_ref())
            .and_then(|f| f.env.as_ref());
        if let (Some(variable), Some(value)) = (variable, new.flag) {
            config
                .env
                .get_or_insert_default()
                .push(format!("{variable}={value}"));
        }
        let host = config.host_config.get_or_insert_default();
        let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        for (port, host_port) in spec.ports.iter().zip(new.host_ports) {
            bindings.insert(
                format!("{}/{}", port.container, port.protocol.as_str()),
                Some(vec![PortBinding {
                    host_ip: None,
                    host_port: Some(host_port.to_string()),
                }]),
            );
        }
        host.port_bindings = Some(bindings);
        // A pooled instance's flag file is a link into a memory-backed volume of its own, mounted
        // read-only: a claim writes the flag there straight from the engine's host, without a
        // round through the engine's archive API (tens of milliseconds).
        let flag_path = template.flag_file();
        let pooled_flag = match (new.flag, flag_path) {
            (None, Some(_)) => Some(self.make_flag_volume(template, name).await?),
            _ => None,
        };
        if let Some(volume) = &pooled_flag {
            host.mounts
                .get_or_insert_default()
                .push(bollard::models::Mount {
                    target: Some(FLAG_MOUNT.into()),
                    source: Some(volume.clone()),
                    typ: Some(bollard::models::MountType::VOLUME),
                    read_only: Some(true),
                    ..Default::default()
                });
        }
        self.create(name, config).await?;
        if let (Some(_), Some(path)) = (&pooled_flag, flag_path) {
            let link = super::template::link_tar(path, &format!("{FLAG_MOUNT}/{FLAG_IN_VOLUME}"))
                .map_err(|e| Trouble::Failed(e.to_string()))?;
            self.upload_files(name, link, "the flag's link").await?;
        }
        if !spec.secret_files.is_empty() {
            self.write_secret_files(name, template, &values).await?;
        }
        if let Some(value) = new.flag {
            self.write_flag_file(name, template, value).await?;
        }
        self.start(name).await
    }

    /// Gives a pooled instance, as it is claimed, its team's flag (when the challenge takes it as
    /// a file; a flag in the environment is refused for pools by validation).
    pub async fn give_flag(
        &self,
        container: &str,
        template: &ChallengeTemplate,
        flag: &str,
    ) -> Result<(), InstanceTrouble> {
        if let Some(written) = self
            .write_flag_locally(container, template, flag, true)
            .await
        {
            return written.map_err(|e| {
                InstanceTrouble::Refused(format!("cannot write the flag of {container}: {e}"))
            });
        }
        self.write_flag_file(container, template, flag)
            .await
            .map_err(InstanceTrouble::from)
    }

    /// Writes the flag again where a restart of the instance's container emptied its flag
    /// volume (memory-backed, so it starts empty with the container); nothing when the flag is
    /// there or was not given through a volume.
    pub async fn keep_flag(&self, container: &str, template: &ChallengeTemplate, flag: &str) {
        if let Some(Err(error)) = self
            .write_flag_locally(container, template, flag, false)
            .await
        {
            tracing::warn!(%error, %container, "cannot write its flag again");
        }
    }

    /// The flag written into the pooled instance `container`'s flag volume from this host, when
    /// the volume is mounted here (the engine's host); `None` when it is not, and the flag must
    /// go through the engine. With `always` false, only when the file is missing.
    async fn write_flag_locally(
        &self,
        container: &str,
        template: &ChallengeTemplate,
        flag: &str,
        always: bool,
    ) -> Option<std::io::Result<()>> {
        template.flag_file()?;
        let root = self.local_volumes().await?;
        let folder = root.join(flag_volume_name(container)).join("_data");
        let file = folder.join(FLAG_IN_VOLUME);
        // What is there is looked at, never followed: a container that could write its volume
        // (a challenge given SYS_ADMIN may remount it) must not steer a write of the agent's.
        // A flag in place needs no look at the mount table (the agent writes only into mounts).
        let in_place = std::fs::symlink_metadata(&file).is_ok_and(|m| m.file_type().is_file());
        if !always && in_place {
            return Some(Ok(()));
        }
        if !mounted_tmpfs(&folder) {
            return None;
        }
        let (gid, mode) = match template.spec.secret_files_group() {
            Some(gid) => (gid, 0o440),
            None => (0, 0o400),
        };
        Some(write_flag(&file, flag, gid, mode))
    }

    /// Where the engine keeps its volumes, when this process sees that folder.
    async fn local_volumes(&self) -> Option<&std::path::Path> {
        self.local_volumes
            .get_or_init(|| async {
                let info = self.docker.info().await.ok()?;
                // With user namespaces remapped, root and the group here are not theirs in the
                // container: the engine writes the flag instead.
                let remapped = info
                    .security_options
                    .iter()
                    .flatten()
                    .any(|option| option.contains("name=userns"));
                let volumes = std::path::PathBuf::from(info.docker_root_dir?).join("volumes");
                (!remapped && volumes.is_dir()).then_some(volumes)
            })
            .await
            .as_deref()
    }

    /// Makes the memory-backed volume a pooled instance's flag goes into.
    async fn make_flag_volume(
        &self,
        template: &ChallengeTemplate,
        container: &str,
    ) -> Attempt<String> {
        let name = flag_volume_name(container);
        let request = bollard::models::VolumeCreateRequest {
            name: Some(name.clone()),
            driver: Some("local".into()),
            driver_opts: Some(HashMap::from([
                ("type".to_string(), "tmpfs".to_string()),
                ("device".to_string(), "tmpfs".to_string()),
                ("o".to_string(), "size=64k,mode=0755".to_string()),
            ])),
            labels: Some(self.ownership.labels(&template.key, "")),
            ..Default::default()
        };
        self.docker
            .create_volume(request)
            .await
            .map_err(|e| self.trouble("cannot create the flag's volume", e))?;
        Ok(name)
    }

    /// Writes the team's flag into the instance's container when the challenge takes it as a
    /// file: before a start, or into a pooled one as it is claimed. Nothing for a flag in the
    /// environment.
    async fn write_flag_file(
        &self,
        container: &str,
        template: &ChallengeTemplate,
        flag: &str,
    ) -> Attempt<()> {
        match template.flag_file_tar(flag) {
            None => Ok(()),
            Some(tar) => {
                let tar = tar.map_err(|e| Trouble::Failed(e.to_string()))?;
                self.upload_files(container, tar, "the flag").await
            }
        }
    }

    /// Removes an instance's main container, its sidecars and its own network (gone already is
    /// fine).
    pub async fn remove_instance(&self, container: &str) -> Result<(), InstanceTrouble> {
        // Its solver first, which shares its network: one a berth killed mid-run left behind
        // would otherwise outlive it.
        let solver = super::solve::solver_name(container);
        remove_container(&self.docker, &solver).await.map_err(|e| {
            InstanceTrouble::from(self.trouble(&format!("cannot remove {solver}"), e))
        })?;
        let sidecars = self
            .labelled(&format!("{LABEL_INSTANCE_MAIN}={container}"))
            .await?;
        for sidecar in &sidecars {
            let name = container_name_of(sidecar);
            remove_container(&self.docker, &name).await.map_err(|e| {
                InstanceTrouble::from(self.trouble(&format!("cannot remove {name}"), e))
            })?;
        }
        remove_container(&self.docker, container)
            .await
            .map_err(|e| {
                InstanceTrouble::from(self.trouble(&format!("cannot remove {container}"), e))
            })?;
        match self
            .docker
            .remove_volume(
                &flag_volume_name(container),
                None::<bollard::query_parameters::RemoveVolumeOptions>,
            )
            .await
        {
            Err(error) if !is_status(&error, 404) => {
                return Err(self
                    .trouble(
                        &format!("cannot remove the flag volume of {container}"),
                        error,
                    )
                    .into());
            }
            _ => {}
        }
        // Its own network, when it had sidecars (tried either way: an earlier removal may have
        // taken the sidecars and not the network).
        for offline in ["", "-offline"] {
            match self
                .docker
                .remove_network(&format!("{container}{offline}"))
                .await
            {
                Err(error) if !is_status(&error, 404) => {
                    return Err(self
                        .trouble(&format!("cannot remove the network of {container}"), error)
                        .into());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// This berth's containers with the label `selector` (`key=value`).
    async fn labelled(&self, selector: &str) -> Result<Vec<ContainerSummary>, InstanceTrouble> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![
                    format!("{LABEL_INSTANCE}={}", self.instance()),
                    selector.to_string(),
                ],
            )])),
            ..Default::default()
        };
        self.docker
            .list_containers(Some(options))
            .await
            .map_err(|e| InstanceTrouble::from(self.trouble("cannot list containers", e)))
    }

    /// The instances that have sidecars: to find what is left of instances with no record (an
    /// agent killed mid-removal).
    pub async fn sidecar_owners(&self) -> Result<Vec<InstanceObjects>, InstanceTrouble> {
        let sidecars = self
            .labelled(&format!("{LABEL_SLOT}={SIDECAR_SLOT}"))
            .await?;
        let owners: std::collections::BTreeSet<InstanceObjects> = sidecars
            .iter()
            .filter_map(|s| {
                Some(InstanceObjects {
                    engine: crate::plan::Engine::Docker,
                    id: label(s, LABEL_INSTANCE_ID)?.to_string(),
                    challenge: label(s, LABEL_NAME)?.to_string(),
                    container: label(s, LABEL_INSTANCE_MAIN)?.to_string(),
                })
            })
            .collect();
        Ok(owners.into_iter().collect())
    }

    /// Every instance's main container this berth has, of every challenge.
    pub async fn instance_containers(&self) -> Result<Vec<InstanceContainer>, InstanceTrouble> {
        let containers = self
            .labelled(&format!("{LABEL_SLOT}={INSTANCE_SLOT}"))
            .await?;
        Ok(containers.iter().filter_map(instance_container).collect())
    }

    /// Stops a container by name, for a replacement on its ports.
    pub async fn stop_instance(&self, container: &str) -> Result<(), InstanceTrouble> {
        self.stop(container).await.map_err(InstanceTrouble::from)
    }

    /// Starts a container by name again (a replacement that failed).
    pub async fn restart_instance(&self, container: &str) -> Result<(), InstanceTrouble> {
        self.start(container).await.map_err(InstanceTrouble::from)
    }
}

fn instance_container(container: &ContainerSummary) -> Option<InstanceContainer> {
    Some(InstanceContainer {
        id: label(container, LABEL_INSTANCE_ID)?.to_string(),
        challenge: label(container, LABEL_NAME)?.to_string(),
        container: container_name_of(container),
        version: label(container, LABEL_SPEC_HASH)?.to_string(),
        running: container_state(container) == PartState::Running,
    })
}

/// An instance's volumes are its own: anonymous, made with its containers and removed with them,
/// never a challenge's named volume that another team's instance would share; but for copies of
/// repo folders, read-only and the same for every team.
fn anonymous_volumes(config: &mut bollard::models::ContainerCreateBody) {
    let mounts = config
        .host_config
        .as_mut()
        .and_then(|host| host.mounts.as_mut())
        .into_iter()
        .flatten();
    let folder_copy = format!("_{FOLDER_VOLUME}");
    for mount in mounts {
        // A repo folder's copy is read-only and shared by every instance.
        if mount.read_only != Some(true)
            || !mount
                .source
                .as_ref()
                .is_some_and(|s| s.contains(&folder_copy))
        {
            mount.source = None;
        }
    }
}

/// The flag volume of a pooled instance's container.
fn flag_volume_name(container: &str) -> String {
    format!("{container}-flag")
}

/// Whether `folder` is a tmpfs mount point in this process's view (`/proc/self/mountinfo`): the
/// engine's mount of a flag volume, not the folder beneath it.
fn mounted_tmpfs(folder: &std::path::Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = folder.to_string_lossy();
    mounts.lines().any(|line| {
        let mut fields = line.split(' ');
        let point = fields.nth(4);
        let kind = line
            .split(" - ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next());
        point == Some(wanted.as_ref()) && kind == Some("tmpfs")
    })
}

/// Writes `flag` to `file`, owned by root and group `gid`, with `mode`.
/// Writes `flag` to `file`, owned by root and group `gid`, with `mode`: into a new file of a
/// random name beside it (created exclusively, so nothing there is followed or reused), then
/// renamed over `file` (which replaces a link or a pipe found there, never writes through it).
fn write_flag(file: &std::path::Path, flag: &str, gid: u32, mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let random = crate::backend::random_bytes()?;
    let temporary = file.with_file_name(format!(".flag-{}", hex::encode(&random[..8])));
    let written = (|| {
        let mut opened = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temporary)?;
        opened.write_all(flag.as_bytes())?;
        std::os::unix::fs::fchown(&opened, Some(0), Some(gid))?;
        opened.set_permissions(std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&temporary, file)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a container may have put at the flag's place (a link to a host file, a pipe) is
    /// replaced, never written through or waited on.
    #[test]
    fn a_flag_is_written_beside_what_is_there_and_renamed_over_it() {
        let folder = tempfile::tempdir().unwrap();
        let target = folder.path().join("host-file");
        std::fs::write(&target, "keep me").unwrap();
        let flag = folder.path().join("flag");
        std::os::unix::fs::symlink(&target, &flag).unwrap();
        // The agent writes flags as root, owned by root: so does this test, or it says why not.
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if !root {
            eprintln!("*** SKIPPED: writing a file owned by root needs root ***");
            return;
        }
        write_flag(&flag, "flag{x}", 0, 0o440).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
        let written = std::fs::symlink_metadata(&flag).unwrap();
        assert!(written.file_type().is_file());
        assert_eq!(std::fs::read_to_string(&flag).unwrap(), "flag{x}");
        {
            use std::os::unix::fs::MetadataExt;
            assert_eq!((written.uid(), written.mode() & 0o777), (0, 0o440));
        }
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(folder.path()).unwrap().count(), 2);
    }
}
