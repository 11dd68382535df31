//! Solvers of per-team instances: a challenge's `healthcheck.solve` run against each team's
//! instance, as against the challenge's own container, so one team's broken jail or missing flag
//! shows as that instance's health (in the API, `berth instances` and the counts in status)
//! where a port check would pass.
//!
//! The leader's background work starts the runs that are due, each in a task of its own, on the
//! instance's engine. A run expects the team's own flag (with `instanced.flag`), else any of the
//! challenge's secrets; a pooled instance whose flag comes with its team waits for its team.
//! The challenge's secrets are masked in what a run says either way. Runs go a few at a time
//! ([`super::manager::SOLVES_AT_ONCE`]), as every instance of a challenge falls due together.
//! What was found is kept in memory, by the instance's container (a replacement starts afresh),
//! as a challenge's solvers are: an agent that starts again solves again before it calls an
//! instance healthy.

use std::collections::HashSet;

use super::manager::Instances;
use super::{Instance, InstanceHealth, InstanceState};
use crate::backend::instances::{InstanceEngines, InstanceTemplate};
use crate::backend::solving::{SolveFlags, flag_values};
use crate::descriptor::model::SolveCheck;
use crate::plan::Health;

/// The solve check of the version `template`, if it has one.
fn solve_check(template: &InstanceTemplate) -> Option<&SolveCheck> {
    template.spec().healthcheck.as_ref()?.solve.as_ref()
}

impl Instances {
    /// Starts the runs that are due: each running instance whose challenge has a solve check,
    /// with no run going on and the last older than the check's interval. The runs go on in
    /// the background.
    pub(super) fn solve_due(&self, engines: &InstanceEngines, instances: &[Instance]) {
        let mut due = Vec::new();
        {
            let mut solves = self.inner.solves.lock().expect("solves");
            let mut seen = HashSet::new();
            for instance in instances {
                if instance.state == InstanceState::Starting {
                    continue;
                }
                // Only by the version it runs: one from before the agent started is not judged
                // by a newer version's check or flag.
                let Some(template) = self.declared_version(instance) else {
                    continue;
                };
                let Some(check) = solve_check(&template) else {
                    continue;
                };
                let team_flag = template.instanced().flag.is_some();
                // Its flag comes with its team: nothing to expect yet.
                if team_flag && instance.team.is_none() {
                    continue;
                }
                seen.insert(instance.container.clone());
                let state = solves.entry(instance.container.clone()).or_default();
                if !state.due(check) {
                    continue;
                }
                state.running = true;
                // Read only for a run: the secrets come from the host, the flag from its key.
                let spec = template.spec();
                let secrets = flag_values(
                    spec.secret_env
                        .values()
                        .chain(spec.secret_files.iter().map(|file| &file.secret)),
                );
                let flags = match &instance.team {
                    Some(team) if team_flag => SolveFlags {
                        expected: self.flag(&template, team).into_iter().collect(),
                        hidden: secrets,
                    },
                    _ => SolveFlags {
                        expected: secrets,
                        hidden: Vec::new(),
                    },
                };
                due.push((instance.objects(), check.clone(), flags, template));
            }
            // Instances gone (removed, replaced) are forgotten, but for runs still going on.
            solves.retain(|container, state| state.running || seen.contains(container));
        }
        for (objects, check, flags, template) in due {
            let (this, engines) = (self.clone(), engines.clone());
            tokio::spawn(async move {
                // A few at a time: every instance of a challenge falls due together.
                let Ok(_turn) = this.inner.solving.acquire().await else {
                    return;
                };
                let found = engines.solve(&template, &objects, &check, flags).await;
                if let Some(Err(why)) = &found {
                    tracing::warn!(instance = %objects.id, challenge = %objects.challenge, %why, "an instance's solver failed");
                }
                let mut solves = this.inner.solves.lock().expect("solves");
                solves
                    .entry(objects.container.clone())
                    .or_default()
                    .ended(found);
            });
        }
    }

    /// The health `instance`'s solver gives it; `None` when its challenge has no solve check.
    pub(super) fn solved_health(&self, instance: &Instance) -> Option<InstanceHealth> {
        let template = self.declared_version(instance)?;
        let check = solve_check(&template)?;
        let solves = self.inner.solves.lock().expect("solves");
        let state = solves.get(&instance.container).cloned().unwrap_or_default();
        Some(match state.judged(check, Health::Healthy, true) {
            None => InstanceHealth {
                state: Health::Healthy,
                detail: None,
            },
            Some((state, why)) => InstanceHealth {
                state,
                detail: Some(why),
            },
        })
    }
}
