//! Making one challenge match its template: image and network first (everything that can fail is
//! prepared before a running container is touched), then each slot's container, replaced the way
//! the template allows; an update whose new container does not stay up is rolled back, so a failed
//! update leaves the old version running. And deleting all a challenge has.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, ContainerSummary};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListImagesOptions, RemoveImageOptions,
    StopContainerOptions,
};
use serde_json::json;

use super::lock::secret_digest;
use super::network::Wall;
use super::observe::{container_name_of, container_state, label};
use super::template::{ChallengeTemplate, short_hash};
use super::{
    Attempt, DockerBackend, LABEL_SECRETS, LABEL_SLOT, Trouble, is_status, remove_container, run,
};
use crate::apply::Outcome;
use crate::backend::LABEL_SPEC_HASH;
use crate::descriptor::model::RunState;
use crate::descriptor::{ContentDigest, Kind, ObjectRef};
use crate::plan::{PartState, Slot};

/// Longest wait for a host port a socket outside the engine still holds.
const HOST_PORT_WAIT: Duration = Duration::from_secs(15);
/// Longest wait for a sidecar to be healthy before what starts after it (a database before its
/// web container); past it the step fails, naming the sidecar it waited for.
const SIDECAR_READY_WAIT: Duration = Duration::from_secs(120);

impl DockerBackend {
    /// Makes the challenge match its template: image, network, then each slot's container,
    /// replacing changed ones the way `start_first` allows, and removing what is left over.
    pub async fn converge(&self, template: &ChallengeTemplate, repo_root: &Path) -> Outcome {
        let converged = match template.spec.instanced {
            Some(_) => self.prepare_instances(template, repo_root).await,
            None => self.try_converge(template, repo_root).await,
        };
        match converged {
            Ok(mut done) => {
                // Each change of a build context makes an image: keep the newest few (a quick
                // way back) and the one running, so months of changes do not fill the disk.
                if template.spec.build.is_some()
                    || template.spec.sidecars.iter().any(|s| s.build.is_some())
                {
                    let removed = self
                        .collect_products(&template.key, run::KEEP_PRODUCTS)
                        .await;
                    if removed > 0 {
                        done.push_str(&format!("; {removed} older build(s) removed"));
                    }
                }
                Outcome::Done(done)
            }
            Err(trouble) => trouble.into(),
        }
    }

    async fn try_converge(
        &self,
        template: &ChallengeTemplate,
        repo_root: &Path,
    ) -> Attempt<String> {
        // Everything that can fail is prepared before any container is touched.
        let network = self.ensure_wall(&template.wall()).await?;
        let image = self.ensure_image(template, repo_root, &network).await?;
        self.ensure_sidecar_images(template, repo_root, &network)
            .await?;
        let copies = self
            .ensure_folder_copies(template, &image, repo_root)
            .await?;
        self.ensure_volumes(template).await?;
        let key = match template
            .parts
            .iter()
            .any(|p| !template.secrets_of(&p.id).is_empty())
        {
            true => self
                .digest_key(true)
                .await
                .map_err(|e| Trouble::Transient(e.to_string()))?
                .unwrap_or_default(),
            false => Vec::new(),
        };
        let run = template.spec.state == RunState::Running;
        let existing = self
            .containers(Some(template.key.name.as_str()))
            .await
            .map_err(|e| self.trouble("cannot list containers", e))?;
        let mut by_slot: BTreeMap<String, Vec<&ContainerSummary>> = BTreeMap::new();
        for container in &existing {
            let slot = label(container, LABEL_SLOT).unwrap_or_default().to_string();
            by_slot.entry(slot).or_default().push(container);
        }
        let mut done = Vec::new();
        // The container in place in each slot so far, for what starts after it to wait for.
        let mut in_place: HashMap<String, String> = HashMap::new();
        for part in template.start_order() {
            let secrets = template.secrets_of(&part.id);
            let env_values = crate::descriptor::values::resolve_all(&secrets)
                .map_err(|e| Trouble::Failed(e.to_string()))?;
            let digests: BTreeMap<String, String> = env_values
                .iter()
                .map(|(name, value)| (name.clone(), secret_digest(&key, name, value)))
                .collect();
            let present = by_slot.remove(&part.id).unwrap_or_default();
            let wanted_digests = (!digests.is_empty())
                .then(|| serde_json::to_string(&digests).expect("digests serialize"));
            let (current, old): (Vec<&ContainerSummary>, Vec<&ContainerSummary>) =
                present.into_iter().partition(|c| {
                    label(c, LABEL_SPEC_HASH) == Some(part.hash.as_str())
                        && label(c, LABEL_SECRETS) == wanted_digests.as_deref()
                });
            if let Some(container) = current.first() {
                for stale in current[1..].iter().chain(&old) {
                    self.remove(stale).await?;
                }
                let name = container_name_of(container);
                // An exited one-shot is `Completed`, not `Stopped`: it is done, not started again.
                match (run, container_state(container)) {
                    (true, PartState::Stopped) => {
                        self.wait_for_sidecars(template, &part.id, &in_place)
                            .await?;
                        // Written again before a start: a container an interrupted pass made
                        // may lack them (the copy overwrites what is there).
                        if takes_files(template, part) {
                            self.write_secret_files(&name, template, &env_values)
                                .await?;
                        }
                        self.start(&name).await?;
                        done.push(format!("started {}", part.id));
                    }
                    (false, PartState::Running) => {
                        self.stop(&name).await?;
                        done.push(format!("stopped {}", part.id));
                    }
                    _ => {}
                }
                in_place.insert(part.id.clone(), name);
                continue;
            }
            let config = match Slot::of(&part.id) {
                Slot::Main | Slot::Object(_) => {
                    self.main_config(template, part, &image, &network, &env_values, &digests)
                }
                Slot::Sidecar(name) => {
                    let sidecar = template
                        .spec
                        .sidecars
                        .iter()
                        .find(|s| s.name.as_str() == name)
                        .expect("slot from spec");
                    self.sidecar_config(template, part, sidecar, &network, &env_values, &digests)
                }
            };
            let version = match digests.is_empty() {
                true => part.hash.clone(),
                false => short_hash(&json!([part.hash, digests])),
            };
            let name = self.container_name(&template.key, part, &version);
            if run {
                self.wait_for_sidecars(template, &part.id, &in_place)
                    .await?;
            }
            // Created, not started: a create that fails (a value the engine rejects) has touched
            // nothing that runs.
            self.create(&name, config).await?;
            if takes_files(template, part) {
                // A container made without its files must never pass for a finished one.
                if let Err(trouble) = self.write_secret_files(&name, template, &env_values).await {
                    let _ = remove_container(&self.docker, &name).await;
                    return Err(trouble);
                }
            }
            self.replace(&name, &old, run, template.start_first(), part.one_shot)
                .await?;
            done.push(match (old.is_empty(), run) {
                (true, true) => format!("created {}", part.id),
                (true, false) => format!("created {} (stopped)", part.id),
                (false, _) => format!("replaced {}", part.id),
            });
            in_place.insert(part.id.clone(), name);
        }
        for (slot, leftovers) in by_slot {
            for container in leftovers {
                self.remove(container).await?;
            }
            done.push(format!("removed {slot}"));
        }
        // A network of the challenge's own that it has moved off (its walls, its egress or its
        // sidecars changed) is empty now.
        let own = matches!(template.wall(), Wall::Own { .. }).then_some(network.as_str());
        if self.remove_networks_of(&template.key, own).await > 0 {
            done.push("removed its old network".into());
        }
        self.remove_old_folder_copies(template, &copies).await?;
        // Solvers of containers this pass replaced go with them.
        if template
            .spec
            .healthcheck
            .as_ref()
            .is_some_and(|check| check.solve.is_some())
        {
            let current: Vec<String> = in_place.values().cloned().collect();
            self.remove_solvers_of(&template.key, &current)
                .await
                .map_err(|e| Trouble::Transient(format!("cannot remove old solvers: {e}")))?;
        }
        Ok(done.join(", "))
    }

    /// Puts the created container `new` in place of `old`. Start-first starts the new one, then
    /// removes the old. Stop-first (host ports) stops the old first. Either way, when there is an
    /// old version, the new one must start and stay up for a moment ([`Self::stays_up`]) before
    /// the old one is removed; if it does not, it is removed and the old one keeps (or is started
    /// again to keep) running, so a failed update leaves the old version running.
    async fn replace(
        &self,
        new: &str,
        old: &[&ContainerSummary],
        run: bool,
        start_first: bool,
        one_shot: bool,
    ) -> Attempt<()> {
        if !run {
            for stale in old {
                self.remove(stale).await?;
            }
            return Ok(());
        }
        let was_running: Vec<String> = old
            .iter()
            .filter(|c| container_state(c) == PartState::Running)
            .map(|c| container_name_of(c))
            .collect();
        let mut stopped: Vec<&String> = Vec::new();
        if !start_first {
            for name in &was_running {
                if let Err(trouble) = self.stop(name).await {
                    // Put back what this update stopped before it could not go on.
                    self.roll_back(new, &stopped).await;
                    return Err(trouble);
                }
                stopped.push(name);
            }
        }
        let started = match self.start(new).await {
            // A one-shot is meant to exit; there is nothing to watch.
            Ok(()) if old.is_empty() || one_shot => Ok(()),
            Ok(()) => self.stays_up(new).await,
            Err(trouble) => Err(trouble),
        };
        match started {
            Ok(()) => {
                for stale in old {
                    self.remove(stale).await?;
                }
                Ok(())
            }
            Err(trouble) => {
                let restarted = self.roll_back(new, &stopped).await;
                let why = match trouble {
                    Trouble::Failed(why) | Trouble::Transient(why) => why,
                };
                let note = match (old.is_empty(), restarted) {
                    (true, _) => "",
                    (false, true) => "; the old container keeps running",
                    (false, false) => "; the old container could not be restarted",
                };
                Err(Trouble::Failed(format!("{why}{note}")))
            }
        }
    }

    /// Waits until each sidecar `slot` waits for is healthy (or, without a healthcheck, running),
    /// as a database must be before its web container starts. Bounded by
    /// [`SIDECAR_READY_WAIT`]; a sidecar that stops or fails its checks fails the wait at once,
    /// with its reason.
    pub(super) async fn wait_for_sidecars(
        &self,
        template: &ChallengeTemplate,
        slot: &str,
        in_place: &HashMap<String, String>,
    ) -> Attempt<()> {
        use bollard::models::HealthStatusEnum;
        for wanted in template.waits_for(slot) {
            let Some(name) = in_place.get(&wanted) else {
                continue;
            };
            // A check that may take longer than the usual bound to pass (a long start period)
            // is given its time.
            let limit = template
                .spec
                .sidecars
                .iter()
                .find(|s| Slot::of(&wanted) == Slot::Sidecar(s.name.as_str()))
                .and_then(|s| s.healthcheck.as_ref())
                .map_or(SIDECAR_READY_WAIT, |check| {
                    let period = check.start_period.unwrap_or(check.interval).0;
                    let checks = (check.interval.0 + check.timeout.0) * (check.retries + 1);
                    SIDECAR_READY_WAIT.max(period + checks)
                });
            let started = Instant::now();
            loop {
                let inspected = self
                    .docker
                    .inspect_container(name, None::<InspectContainerOptions>)
                    .await
                    .map_err(|e| self.trouble(&format!("cannot inspect {name}"), e))?;
                let state = inspected.state.unwrap_or_default();
                let health = state.health.as_ref().and_then(|h| h.status);
                let failed = match (state.running.unwrap_or(false), health) {
                    (true, Some(HealthStatusEnum::HEALTHY))
                    | (true, None | Some(HealthStatusEnum::NONE | HealthStatusEnum::EMPTY)) => {
                        break;
                    }
                    (true, Some(HealthStatusEnum::UNHEALTHY)) => Some("fails its health check"),
                    (false, _) if state.restarting != Some(true) => Some("is not running"),
                    _ => None,
                };
                if let Some(failed) = failed {
                    let why = self
                        .explain(name)
                        .await
                        .map(|(detail, _)| format!(": {detail}"))
                        .unwrap_or_default();
                    return Err(Trouble::Failed(format!(
                        "{wanted} {failed}{why}; {slot} starts only once it is healthy"
                    )));
                }
                if started.elapsed() > limit {
                    return Err(Trouble::Failed(format!(
                        "{wanted} was not healthy within {}s; {slot} starts only once it is",
                        limit.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Ok(())
    }

    /// Removes the new container of a failed update and starts the old ones it stopped; whether
    /// they all started.
    async fn roll_back(&self, new: &str, stopped: &[&String]) -> bool {
        let _ = remove_container(&self.docker, new).await;
        let mut all = true;
        for name in stopped {
            all &= self.start(name).await.is_ok();
        }
        all
    }

    /// Whether a replacement that has just started keeps running for a few seconds: one that
    /// exits at once (a bad command, a missing file, a crash on start) must not take the old
    /// version's place. Bounded, so it never holds a pass for long.
    async fn stays_up(&self, name: &str) -> Attempt<()> {
        const WATCH: Duration = Duration::from_secs(3);
        let started = Instant::now();
        while started.elapsed() < WATCH {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let inspected = self
                .docker
                .inspect_container(name, None::<InspectContainerOptions>)
                .await
                .map_err(|e| self.trouble(&format!("cannot inspect {name}"), e))?;
            let restarts = inspected.restart_count.unwrap_or(0);
            let running = inspected
                .state
                .as_ref()
                .and_then(|s| s.running)
                .unwrap_or(false);
            if !running || restarts > 0 {
                let why = self
                    .explain(name)
                    .await
                    .map_or_else(|| "it stopped".to_string(), |(detail, _)| detail);
                return Err(Trouble::Failed(format!(
                    "the new container {name} did not stay up: {why}"
                )));
            }
        }
        Ok(())
    }

    /// Removes everything this instance made for the challenge: containers, network, built images.
    pub async fn delete(&self, key: &ObjectRef) -> Outcome {
        match self.try_delete(key).await {
            Ok(done) => Outcome::Done(done),
            Err(trouble) => trouble.into(),
        }
    }

    async fn try_delete(&self, key: &ObjectRef) -> Attempt<String> {
        let existing = self
            .containers(Some(key.name.as_str()))
            .await
            .map_err(|e| self.trouble("cannot list containers", e))?;
        for container in &existing {
            self.remove(container).await?;
        }
        self.remove_solvers_of(key, &[])
            .await
            .map_err(|e| Trouble::Transient(format!("cannot remove its solvers: {e}")))?;
        self.remove_volumes_of(key).await?;
        for network in self.networks_of(key).await? {
            let id = network.id.unwrap_or_default();
            match self.docker.remove_network(&id).await {
                Err(error) if !is_status(&error, 404) => {
                    return Err(self.trouble(
                        &format!("cannot remove network {}", network.name.unwrap_or_default()),
                        error,
                    ));
                }
                _ => {}
            }
        }
        let filters = HashMap::from([(
            "label".to_string(),
            self.ownership
                .selector(Kind::Challenge, Some(key.name.as_str())),
        )]);
        let images = self
            .docker
            .list_images(Some(ListImagesOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| self.trouble("cannot list images", e))?;
        for image in images {
            let options = RemoveImageOptions {
                force: true,
                ..Default::default()
            };
            let _ = self
                .docker
                .remove_image(&image.id, Some(options), None)
                .await;
        }
        Ok(format!("removed {} container(s)", existing.len()))
    }

    /// Makes the copies of the repo folders the challenge's volumes mount that are missing: the
    /// volumes it needs, with their marks.
    pub(super) async fn ensure_folder_copies(
        &self,
        template: &ChallengeTemplate,
        image: &str,
        repo_root: &Path,
    ) -> Attempt<std::collections::BTreeSet<String>> {
        let folders: std::collections::BTreeSet<&str> = template
            .spec
            .volumes
            .iter()
            .chain(template.spec.sidecars.iter().flat_map(|s| &s.volumes))
            .filter_map(|v| v.from.as_deref())
            .collect();
        let mut wanted = std::collections::BTreeSet::new();
        for folder in folders {
            let volume = self
                .ensure_folder_copy(template, folder, image, repo_root)
                .await?;
            wanted.insert(format!("{volume}.done"));
            wanted.insert(volume);
        }
        Ok(wanted)
    }

    /// Removes the challenge's copies of repo folders (and their marks) other than `wanted`,
    /// once its containers have moved off them; one still mounted stays for a later pass.
    pub(super) async fn remove_old_folder_copies(
        &self,
        template: &ChallengeTemplate,
        wanted: &std::collections::BTreeSet<String>,
    ) -> Attempt<()> {
        let prefix = self.folder_volume_name(&template.key, "");
        let (marks, copies): (Vec<String>, Vec<String>) = self
            .volumes_of(&template.key)
            .await?
            .into_iter()
            .filter(|name| name.starts_with(&prefix) && !wanted.contains(name))
            .partition(|name| name.ends_with(".done"));
        // Each copy before its mark; a copy still in use keeps its mark, and both go later.
        let mut kept = std::collections::HashSet::new();
        for copy in copies {
            if self.remove_volume(&copy).await.is_err() {
                kept.insert(format!("{copy}.done"));
            }
        }
        for mark in marks.iter().filter(|mark| !kept.contains(*mark)) {
            let _ = self.remove_volume(mark).await;
        }
        Ok(())
    }

    /// Removes the volume `name`; one gone already is fine. One in use is refused.
    async fn remove_volume(&self, name: &str) -> Attempt<()> {
        match self
            .docker
            .remove_volume(name, None::<bollard::query_parameters::RemoveVolumeOptions>)
            .await
        {
            Err(error) if !is_status(&error, 404) => {
                Err(self.trouble(&format!("cannot remove volume {name}"), error))
            }
            _ => Ok(()),
        }
    }

    /// Makes the challenge's named volumes that are missing, labelled as its own.
    async fn ensure_volumes(&self, template: &ChallengeTemplate) -> Attempt<()> {
        let names: std::collections::BTreeSet<&str> = template
            .spec
            .volumes
            .iter()
            .chain(template.spec.sidecars.iter().flat_map(|s| &s.volumes))
            .filter_map(|v| v.named())
            .map(|name| name.as_str())
            .collect();
        for name in names {
            let request = bollard::models::VolumeCreateRequest {
                name: Some(self.volume_name(&template.key, name)),
                labels: Some(self.ownership.labels(&template.key, "")),
                ..Default::default()
            };
            // Creating a volume that exists leaves it (and what is in it) as it is.
            self.docker
                .create_volume(request)
                .await
                .map_err(|e| self.trouble(&format!("cannot create volume {name}"), e))?;
        }
        Ok(())
    }

    /// Makes the volume holding a copy of the repo folder `folder`, unless a finished one is
    /// there. It is filled through a container made (never started, with no network) from
    /// `image`, the challenge's own, with the volume mounted; then an empty second volume marks it
    /// finished, so a copy cut short (the agent killed mid-way) is never taken for a whole one,
    /// and is made again. The copy is named by its content: a change is a new volume.
    async fn ensure_folder_copy(
        &self,
        template: &ChallengeTemplate,
        folder: &str,
        image: &str,
        repo_root: &Path,
    ) -> Attempt<String> {
        let digest = template
            .folders
            .get(folder)
            .map_or("", ContentDigest::hashed);
        let volume = self.folder_volume_name(&template.key, digest);
        let finished = format!("{volume}.done");
        let exists = |name: String| async move {
            match self.docker.inspect_volume(&name).await {
                Ok(_) => Ok(true),
                Err(error) if is_status(&error, 404) => Ok(false),
                Err(error) => Err(self.trouble(&format!("cannot inspect volume {name}"), error)),
            }
        };
        if exists(finished.clone()).await? {
            if exists(volume.clone()).await? {
                return Ok(volume);
            }
            // A mark whose copy is gone (removed by hand, or a cleanup cut short) marks nothing.
            let _ = self.remove_volume(&finished).await;
        }
        let labels = self.ownership.labels(&template.key, "");
        let filler = format!("{volume}-fill");
        let _ = remove_container(&self.docker, &filler).await;
        // What an interrupted copy left goes first.
        self.remove_volume(&volume).await?;
        let create_volume = |name: &str| bollard::models::VolumeCreateRequest {
            name: Some(name.to_string()),
            labels: Some(labels.clone()),
            ..Default::default()
        };
        self.docker
            .create_volume(create_volume(&volume))
            .await
            .map_err(|e| self.trouble(&format!("cannot create volume {volume}"), e))?;
        let mut filler_labels = labels.clone();
        filler_labels.insert(LABEL_SLOT.into(), "fill".into());
        let config = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: Some(vec!["/berth-fill".into()]),
            entrypoint: Some(Vec::new()),
            network_disabled: Some(true),
            labels: Some(filler_labels),
            host_config: Some(bollard::models::HostConfig {
                network_mode: Some("none".into()),
                mounts: Some(vec![bollard::models::Mount {
                    target: Some("/berth-fill".into()),
                    source: Some(volume.clone()),
                    typ: Some(bollard::models::MountType::VOLUME),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.create(&filler, config).await?;
        let copied = match crate::build_context::BuildContext::read(&repo_root.join(folder), "") {
            Ok(context) => self
                .docker
                .upload_to_container(
                    &filler,
                    Some(bollard::query_parameters::UploadToContainerOptions {
                        path: "/berth-fill".into(),
                        ..Default::default()
                    }),
                    bollard::body_try_stream(context.into_stream(())),
                )
                .await
                .map_err(|e| self.trouble(&format!("cannot copy {folder} into {volume}"), e)),
            Err(why) => Err(Trouble::Failed(format!(
                "cannot read the folder {folder}: {why}"
            ))),
        };
        let _ = remove_container(&self.docker, &filler).await;
        copied?;
        self.docker
            .create_volume(create_volume(&finished))
            .await
            .map_err(|e| self.trouble(&format!("cannot create volume {finished}"), e))?;
        Ok(volume)
    }

    /// The names of the challenge `key`'s volumes: named ones, and copies of folders.
    async fn volumes_of(&self, key: &ObjectRef) -> Attempt<Vec<String>> {
        let filters = HashMap::from([(
            "label".to_string(),
            self.ownership
                .selector(Kind::Challenge, Some(key.name.as_str())),
        )]);
        let volumes = self
            .docker
            .list_volumes(Some(bollard::query_parameters::ListVolumesOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(|e| self.trouble("cannot list volumes", e))?;
        Ok(volumes
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name)
            .collect())
    }

    /// Removes the challenge's volumes (once its containers are gone).
    async fn remove_volumes_of(&self, key: &ObjectRef) -> Attempt<()> {
        for volume in self.volumes_of(key).await? {
            self.remove_volume(&volume).await?;
        }
        Ok(())
    }

    /// Copies the challenge's secret files into the container `name`, made and not yet started:
    /// into its own layer, never an image's.
    pub(super) async fn write_secret_files(
        &self,
        name: &str,
        template: &ChallengeTemplate,
        values: &BTreeMap<String, String>,
    ) -> Attempt<()> {
        let tar = template
            .secret_files_tar(values)
            .map_err(|e| Trouble::Failed(e.to_string()))?;
        self.upload_files(name, tar, "the secret files").await
    }

    /// Copies the files of `tar` (paths from the root) into the container `name`; `what` names
    /// them in an error.
    pub(super) async fn upload_files(&self, name: &str, tar: Vec<u8>, what: &str) -> Attempt<()> {
        self.docker
            .upload_to_container(
                name,
                Some(bollard::query_parameters::UploadToContainerOptions {
                    path: "/".into(),
                    // A path that names a folder of the image is refused, never emptied.
                    no_overwrite_dir_non_dir: Some("true".into()),
                    ..Default::default()
                }),
                bollard::body_full(tar.into()),
            )
            .await
            .map_err(|e| self.trouble(&format!("cannot write {what} into {name}"), e))
    }

    pub(super) async fn create(&self, name: &str, config: ContainerCreateBody) -> Attempt<()> {
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        match self.docker.create_container(Some(options), config).await {
            Ok(_) => Ok(()),
            // Made by an interrupted pass, with these very labels (the name holds the hash).
            Err(error) if is_status(&error, 409) => Ok(()),
            Err(error) => Err(self.trouble(&format!("cannot create {name}"), error)),
        }
    }

    /// Starts `name`. A host port still held by a socket outside the engine (kube-proxy frees a
    /// NodePort's only on its next sync after the Service went, when a challenge moves back from
    /// the cluster) is waited for, for a few seconds, before the start fails.
    pub(super) async fn start(&self, name: &str) -> Attempt<()> {
        let started = Instant::now();
        loop {
            match self
                .docker
                .start_container(
                    name,
                    None::<bollard::query_parameters::StartContainerOptions>,
                )
                .await
            {
                Ok(()) => return Ok(()),
                Err(error)
                    if error.to_string().contains("address already in use")
                        && started.elapsed() < HOST_PORT_WAIT =>
                {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(error) => return Err(self.trouble(&format!("cannot start {name}"), error)),
            }
        }
    }

    pub(super) async fn stop(&self, name: &str) -> Attempt<()> {
        // The container's own stop timeout (the challenge's `stopTimeout`, set when it was made).
        let options = StopContainerOptions {
            t: None,
            ..Default::default()
        };
        match self.docker.stop_container(name, Some(options)).await {
            // 304: already stopped.
            Err(error) if !is_status(&error, 304) => {
                Err(self.trouble(&format!("cannot stop {name}"), error))
            }
            _ => Ok(()),
        }
    }

    async fn remove(&self, container: &ContainerSummary) -> Attempt<()> {
        let name = container_name_of(container);
        remove_container(&self.docker, &name)
            .await
            .map_err(|e| self.trouble(&format!("cannot remove {name}"), e))
    }
}

/// Whether the part's container takes the challenge's secret files (the main one does).
fn takes_files(template: &ChallengeTemplate, part: &crate::plan::Part) -> bool {
    Slot::of(&part.id) == Slot::Main && !template.spec.secret_files.is_empty()
}
