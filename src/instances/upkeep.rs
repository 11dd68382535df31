//! The instance manager's background work, done by the leader only: expired instances reaped
//! every second (in a task of their own, several at once, so a refill never makes them late); and
//! after each pass and claim, the engine brought in line with the records, warm pools refilled
//! and live instances of older versions replaced.
//!
//! Every removal checks that the record is still as it was seen (still expired, still pooled), so
//! a renewal or a claim that comes in between wins.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::manager::{InstanceError, Instances, engine, new_id, now_ms};
use super::store::{Pooled, Still};
use super::{Instance, InstanceState};
use crate::backend::instances::{
    InstanceEngines, InstanceObjects, InstanceTemplate, InstanceTrouble, NewInstance,
};
use crate::descriptor::model::{OnUpdate, RunState};
use crate::triggers::Trigger;

/// How often expiries are looked for: an instance goes within about this of its time.
const REAP_EVERY: Duration = Duration::from_secs(1);
/// How often the engine is brought in line with the records without a pass or a claim.
const TEND_EVERY: Duration = Duration::from_secs(5);
/// Most pooled instances made, or live ones replaced, per challenge in one round, so a new
/// revision's work comes in turns.
const BATCH: usize = 4;
/// The least time between two status pushes the counts ask for.
const COUNTS_PUSH_SPACING: Duration = Duration::from_secs(10);
/// Most containers removed at once when many expire together.
const REMOVALS_AT_ONCE: usize = 8;

impl Instances {
    /// The background work, for as long as the agent runs; it idles while the agent stands by.
    pub async fn run(self) {
        tokio::spawn(self.clone().reap_for_ever());
        let mut first = true;
        loop {
            tokio::select! {
                () = tokio::time::sleep(TEND_EVERY) => {}
                () = self.inner.work.notified() => {}
            }
            if !self.inner.leading.load(Ordering::SeqCst) {
                continue;
            }
            let (Ok(engines), Some(templates)) = (self.engines(), self.templates()) else {
                continue;
            };
            if let Err(error) = self.sync(&engines, &templates, first).await {
                tracing::warn!(%error, "cannot bring instances in line with their records");
                continue;
            }
            first = false;
            if let Ok(instances) = self.inner.store.list(None, None) {
                self.solve_due(&engines, &instances);
            }
            let mut more = false;
            for template in templates.values() {
                more |= self.fill_pool(&engines, template).await;
                more |= self.roll(&engines, template).await;
            }
            if more {
                self.inner.work.notify_one();
            }
            self.count();
        }
    }

    /// Counts the instances for the metrics, and asks for a status push when the counts
    /// changed since they last asked, at most once per [`COUNTS_PUSH_SPACING`]: a change within
    /// it is asked for by a later round.
    fn count(&self) {
        let Ok(counts) = self.counts() else { return };
        self.inner.metrics.instances(&counts);
        let Some(triggers) = self.inner.status_pushes.read().expect("lock").clone() else {
            return;
        };
        let mut counted = self.inner.counted.lock().expect("lock");
        let mut pushed = self.inner.counts_pushed.lock().expect("lock");
        let spaced = pushed.is_none_or(|at| at.elapsed() >= COUNTS_PUSH_SPACING);
        if counted.as_ref() != Some(&counts) && spaced {
            *counted = Some(counts);
            *pushed = Some(Instant::now());
            triggers.send(Trigger::PushStatus);
        }
    }

    async fn reap_for_ever(self) {
        loop {
            tokio::time::sleep(REAP_EVERY).await;
            if self.inner.leading.load(Ordering::SeqCst) && self.engines().is_ok() {
                self.reap().await;
            }
        }
    }

    async fn reap(&self) {
        let now = now_ms();
        let expired = match self.inner.store.expired(now) {
            Ok(expired) => expired,
            Err(error) => {
                tracing::error!(%error, "cannot read expiries");
                return;
            }
        };
        if expired.is_empty() {
            return;
        }
        futures_util::stream::iter(&expired)
            .for_each_concurrent(REMOVALS_AT_ONCE, |instance| {
                self.remove(instance, Still::Expired(now), "expired")
            })
            .await;
        self.count();
    }

    /// The engine in line with the records:
    /// - a container without a record is removed;
    /// - a record whose container is gone is started again on its ports (with its flag) when its
    ///   challenge still takes instances, else dropped;
    /// - a container that does not run is started (made but not started when the agent was
    ///   killed, or a replacement that failed);
    /// - a stopped challenge keeps nothing; a removed one keeps its teams' instances until they
    ///   expire, and no pool.
    ///
    /// At the agent's start, spawns and claims its stop interrupted are finished or dropped.
    async fn sync(
        &self,
        engines: &InstanceEngines,
        templates: &BTreeMap<String, Arc<InstanceTemplate>>,
        at_start: bool,
    ) -> Result<(), InstanceError> {
        // Containers first: a spawn's record is written before its container is made.
        let (listed, containers) = engines.containers().await.map_err(engine)?;
        let records = self.inner.store.list(None, None)?;
        let recorded: HashMap<&str, &Instance> =
            records.iter().map(|r| (r.id.as_str(), r)).collect();
        let mut by_id = HashMap::new();
        for (engine, found) in &containers {
            match recorded.get(found.id.as_str()) {
                // What an instance ran before its replacement and was not removed then goes now.
                Some(record)
                    if record.state != InstanceState::Starting
                        && record.engine == *engine
                        && record.container != found.container =>
                {
                    tracing::warn!(instance = %record.id, container = %found.container, "an instance's container from before its replacement; removing it");
                    let _ = engines.retire(*engine, &found.container).await;
                }
                _ => {
                    by_id.insert(found.id.as_str(), (*engine, found));
                }
            }
        }
        for record in &records {
            // An engine this agent could not list says nothing of its instances.
            if !listed.contains(&record.engine) {
                by_id.remove(record.id.as_str());
                continue;
            }
            let container = by_id.remove(record.id.as_str());
            let current = templates.get(&record.challenge);
            let stopped = current.is_some_and(|t| t.spec().state == RunState::Stopped);
            let interrupted = record.state == InstanceState::Starting
                && record.created_at < self.inner.started_ms;
            if stopped {
                self.remove(record, Still::Any, "removed").await;
                continue;
            }
            match (container, current, record.state) {
                // A spawn in progress in this process.
                (_, _, InstanceState::Starting) if !interrupted => {}
                (Some(_), None, InstanceState::Pooled) => {
                    self.remove(record, Still::Pooled, "removed").await;
                }
                (Some((_, found)), _, state) => {
                    let template = self.version_of(record);
                    if !found.running {
                        tracing::warn!(instance = %record.id, "an instance's container is not running; starting it");
                        if let Err(error) = engines.restart(record.engine, &found.container).await {
                            tracing::warn!(%error, instance = %record.id, "cannot start it; it is removed");
                            self.remove(record, Still::Any, "failed").await;
                            continue;
                        }
                    }
                    // Only a claimed pooled instance got its flag while it ran; a spawned one has
                    // it in its own layer from before its start.
                    if record.from_pool()
                        && let (Some(template), Some(team)) = (&template, &record.team)
                        && let Some(flag) = self.flag(template, team)
                    {
                        if at_start {
                            // A claim the stop interrupted may have left it without its flag.
                            if let Err(error) =
                                engines.give_flag(template, &found.container, &flag).await
                            {
                                tracing::warn!(%error, instance = %record.id, "cannot write its flag again");
                            }
                        } else {
                            // A restart empties a pooled one's flag volume.
                            engines.keep_flag(template, &found.container, &flag).await;
                        }
                    }
                    if state == InstanceState::Starting {
                        // A pod's NodePorts are recorded once its Service has them: one the stop
                        // interrupted before that is not known to answer anywhere.
                        let unknown = record.host_ports.is_empty()
                            && template
                                .as_ref()
                                .is_some_and(|t| !t.spec().ports.is_empty());
                        if unknown {
                            self.remove(record, Still::Any, "failed").await;
                        } else {
                            self.inner
                                .store
                                .mark_started(&record.id, &record.host_ports, None)?;
                        }
                    }
                }
                (None, Some(template), InstanceState::Live)
                    if template.engine() == record.engine =>
                {
                    tracing::warn!(instance = %record.id, challenge = %record.challenge, "an instance's container is gone; respawning it");
                    self.respawn(engines, template, record).await;
                }
                (None, _, _) => {
                    tracing::warn!(instance = %record.id, challenge = %record.challenge, "an instance's container is gone, and it is not started again; its record is dropped");
                    self.remove(record, Still::Any, "removed").await;
                }
            }
        }
        // Sidecars first, then the records: a sidecar's record is written before it is made, so
        // one seen here without a record is left from a removal, not a spawn in progress.
        match engines.leftovers().await {
            Ok(leftovers) => {
                let recorded: std::collections::HashSet<String> = self
                    .inner
                    .store
                    .list(None, None)?
                    .into_iter()
                    .map(|r| r.id)
                    .collect();
                for leftover in leftovers {
                    if !recorded.contains(&leftover.id) {
                        tracing::warn!(container = %leftover.container, "what is left of an instance without a record; removing it");
                        let _ = engines.remove(&leftover).await;
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot look for what removed instances left"),
        }
        for (engine, stray) in by_id.values() {
            tracing::warn!(container = %stray.container, "an instance container without a record; removing it");
            let objects = InstanceObjects {
                engine: *engine,
                id: stray.id.clone(),
                challenge: stray.challenge.clone(),
                container: stray.container.clone(),
            };
            if let Err(error) = engines.remove(&objects).await {
                tracing::warn!(%error, container = %stray.container, "cannot remove it");
            }
        }
        Ok(())
    }

    async fn respawn(
        &self,
        engines: &InstanceEngines,
        template: &InstanceTemplate,
        record: &Instance,
    ) {
        let flag = record
            .team
            .as_ref()
            .and_then(|team| self.flag(template, team));
        let new = NewInstance {
            id: &record.id,
            host_ports: &record.host_ports,
            flag: flag.as_deref(),
        };
        match engines.start(template, new).await {
            Ok(started) => {
                if let Err(error) =
                    self.inner
                        .store
                        .replaced(&record.id, template.version(), &started)
                {
                    tracing::error!(%error, "cannot record a respawn");
                }
            }
            // Tried again next round: an engine away for a moment loses no team its instance.
            Err(error @ InstanceTrouble::EngineGone(_)) => {
                tracing::warn!(%error, instance = %record.id, "cannot respawn it now; trying again later");
            }
            Err(error) => {
                tracing::warn!(%error, instance = %record.id, "cannot respawn it; its record is dropped");
                self.remove(record, Still::Any, "failed").await;
            }
        }
    }

    /// Pooled instances of older versions removed, and the pool topped up (a few at a time);
    /// whether more is left to do.
    async fn fill_pool(&self, engines: &InstanceEngines, template: &InstanceTemplate) -> bool {
        let settings = template.instanced();
        let challenge = template.key().name.as_str();
        let Ok(records) = self.inner.store.list(Some(challenge), None) else {
            return false;
        };
        let running = template.spec().state == RunState::Running;
        let mut current = 0;
        // A pool's instance has no team: pooled, or still starting.
        for instance in records.iter().filter(|i| i.team.is_none()) {
            if running && instance.version == template.version() {
                current += 1;
            } else {
                self.remove(instance, Still::Pooled, "removed").await;
            }
        }
        let wanted = if running { settings.pool as usize } else { 0 };
        let missing = wanted.saturating_sub(current);
        for _ in 0..missing.min(BATCH) {
            let Ok(id) = new_id() else { return false };
            let Ok(container) = engines.container_name(template, &id) else {
                return false;
            };
            let pooled = Pooled {
                id: &id,
                challenge,
                version: template.version(),
                container: &container,
                engine: template.engine(),
                ports: template.host_ports_held(),
            };
            let record = match self
                .inner
                .store
                .add_pooled(&pooled, &self.inner.range, now_ms())
            {
                Ok(Some(record)) => record,
                Ok(None) => {
                    tracing::warn!(%challenge, "no free host ports left for its pool");
                    return false;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot record a pooled instance");
                    return false;
                }
            };
            let new = NewInstance {
                id: &record.id,
                host_ports: &record.host_ports,
                flag: None,
            };
            match engines.start(template, new).await {
                Ok(started) => {
                    match self
                        .inner
                        .store
                        .mark_started(&record.id, &started.host_ports, None)
                    {
                        Ok(true) => {}
                        // Removed while it started (its challenge was stopped): it goes too.
                        _ => {
                            let _ = engines.remove(&record.objects()).await;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, %challenge, "cannot start a pooled instance");
                    let _ = self.inner.store.remove(&record.id);
                    return false;
                }
            }
        }
        missing > BATCH
    }

    /// With `onUpdate: replace`, live instances of older versions replaced by the current one
    /// (a few at a time), keeping their id, team, ports, flag and expiry; a replacement that does
    /// not start leaves the old container running. Whether more is left to do.
    async fn roll(&self, engines: &InstanceEngines, template: &InstanceTemplate) -> bool {
        if template.instanced().on_update != OnUpdate::Replace
            || template.spec().state != RunState::Running
        {
            return false;
        }
        let version = template.version();
        let Ok(records) = self
            .inner
            .store
            .list(Some(template.key().name.as_str()), None)
        else {
            return false;
        };
        let stale: Vec<&Instance> = {
            let failed = self.inner.failed_rolls.lock().expect("lock");
            records
                .iter()
                .filter(|i| i.state == InstanceState::Live && i.version != version)
                .filter(|i| i.engine == template.engine())
                .filter(|i| !failed.contains(&(i.id.clone(), version.to_string())))
                .collect()
        };
        for instance in stale.iter().take(BATCH) {
            // On Docker the new container takes the old one's host ports: the old one stops
            // first. On Kubernetes the instance's Service moves to the new pod once it is ready.
            let stopped = match engines.make_way(instance.engine, &instance.container).await {
                Ok(stopped) => stopped,
                Err(error) => {
                    tracing::warn!(%error, instance = %instance.id, "cannot stop it for its replacement");
                    continue;
                }
            };
            let flag = instance
                .team
                .as_ref()
                .and_then(|team| self.flag(template, team));
            let new = NewInstance {
                id: &instance.id,
                host_ports: &instance.host_ports,
                flag: flag.as_deref(),
            };
            match engines.start(template, new).await {
                Ok(started) => {
                    if let Err(error) = self.inner.store.replaced(&instance.id, version, &started) {
                        tracing::error!(%error, "cannot record a replacement");
                    }
                    let _ = engines.retire(instance.engine, &instance.container).await;
                    tracing::info!(instance = %instance.id, %version, "instance replaced by the new version");
                }
                Err(error) => {
                    tracing::warn!(%error, instance = %instance.id, "its replacement did not start; the old version keeps running");
                    if stopped
                        && let Err(error) =
                            engines.restart(instance.engine, &instance.container).await
                    {
                        // Found not running by the next round, and started or removed then.
                        tracing::warn!(%error, instance = %instance.id, "cannot start the old version again");
                    }
                    self.inner
                        .failed_rolls
                        .lock()
                        .expect("lock")
                        .insert((instance.id.clone(), version.to_string()));
                }
            }
        }
        stale.len() > BATCH
    }
}
