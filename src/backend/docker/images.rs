//! Images: named ones (pulled only when the engine lacks them), and ones built from a folder of the
//! repo, tagged by the folder's digest so that an image the engine has is the one the folder builds.

use std::path::Path;

use bollard::query_parameters::{BuildImageOptions, CreateImageOptions};
use futures_util::StreamExt;

use super::template::ChallengeTemplate;
use super::{Attempt, DockerBackend, Trouble, engine_gone, engine_message, is_status};
use crate::build_context::BuildContext;
use crate::descriptor::ContentDigest;
use crate::descriptor::model::ImageSource;
use crate::descriptor::security::Resources;

/// Puts a build's `RUN` containers behind the same walls as what runs: on `network` (never the
/// default bridge) and within `resources`' memory and CPU (the build API has no process limit).
pub(super) fn confine_build(
    options: &mut BuildImageOptions,
    network: &str,
    resources: Option<&Resources>,
) {
    options.networkmode = Some(network.to_string());
    if let Some(resources) = resources {
        if let Some(memory) = resources.memory {
            // The API takes a 32-bit number of bytes.
            let bytes = i32::try_from(memory.bytes).unwrap_or(i32::MAX);
            options.memory = Some(bytes);
            options.memswap = Some(bytes);
        }
        if let Some(cpus) = resources.cpus {
            const PERIOD: i32 = 100_000;
            options.cpuperiod = Some(PERIOD);
            options.cpuquota = Some(((cpus * f64::from(PERIOD)) as i32).max(1_000));
        }
    }
}

impl DockerBackend {
    /// The image `template` runs: the one it names (a Pipeline's product once resolved), or the
    /// tag its build gets. Pure.
    pub(super) fn image_of(&self, template: &ChallengeTemplate) -> Attempt<String> {
        match (&template.spec.image, &template.spec.build) {
            (Some(ImageSource::Name(name)), _) => Ok(name.clone()),
            (Some(ImageSource::FromPipeline(from)), _) => Err(Trouble::Failed(format!(
                "the image comes from Pipeline/{}, which has not produced one",
                from.from_pipeline
            ))),
            (None, Some(_)) => {
                let digest = template.build_digest.clone().unwrap_or_default();
                let tag = digest.short().map_err(|why| {
                    Trouble::Failed(format!("cannot read the build context: {why}"))
                })?;
                Ok(format!(
                    "berth-{}-{}:{tag}",
                    self.instance(),
                    template.key.name
                ))
            }
            (None, None) => Err(Trouble::Failed("no image and no build".into())),
        }
    }

    /// The image `sidecar` of `template` runs: the one it names, or the tag its build gets.
    /// Pure.
    pub(super) fn sidecar_image(
        &self,
        template: &ChallengeTemplate,
        sidecar: &crate::descriptor::model::Sidecar,
    ) -> Attempt<String> {
        match &sidecar.image {
            Some(ImageSource::Name(name)) => Ok(name.clone()),
            Some(ImageSource::FromPipeline(from)) => Err(Trouble::Failed(format!(
                "the image of sidecar {} comes from Pipeline/{}, which has not produced one",
                sidecar.name, from.from_pipeline
            ))),
            None => {
                // An unreadable context's tag names no image, so its build is what fails.
                let digest = template.sidecar_builds.get(sidecar.name.as_str());
                let tag = digest
                    .map_or(Ok(""), ContentDigest::short)
                    .unwrap_or("unreadable");
                Ok(format!(
                    "berth-{}-{}-{}:{tag}",
                    self.instance(),
                    template.key.name,
                    sidecar.name,
                ))
            }
        }
    }

    /// Makes sure the engine has every sidecar's image: pulled when named and missing, built
    /// from its folder (behind `network`, within the sidecar's limits) when it builds.
    pub(super) async fn ensure_sidecar_images(
        &self,
        template: &ChallengeTemplate,
        repo_root: &Path,
        network: &str,
    ) -> Attempt<()> {
        for sidecar in &template.spec.sidecars {
            let tag = self.sidecar_image(template, sidecar)?;
            match &sidecar.build {
                None => {
                    self.named_image(&tag).await?;
                }
                Some(build) => {
                    let labels = self.ownership.labels(&template.key, template.main_hash());
                    let context = repo_root.join(&build.context);
                    let confined = (network, sidecar.resources.as_ref());
                    self.build_unless_present(tag, build, labels, confined, || {
                        BuildContext::read(&context, &build.dockerfile)
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }

    pub(super) async fn ensure_image(
        &self,
        template: &ChallengeTemplate,
        repo_root: &Path,
        network: &str,
    ) -> Attempt<String> {
        let tag = self.image_of(template)?;
        match (&template.spec.image, &template.spec.build) {
            (Some(ImageSource::Name(name)), _) => self.named_image(name).await,
            (None, Some(build)) => {
                let labels = self.ownership.labels(&template.key, template.main_hash());
                let context = repo_root.join(&build.context);
                let confined = (network, template.spec.resources.as_ref());
                self.build_unless_present(tag, build, labels, confined, || {
                    BuildContext::read(&context, &build.dockerfile)
                })
                .await
            }
            _ => Ok(tag),
        }
    }

    /// The image `tag`, built from a folder of the repo (`build`, whose context `read` lists) when
    /// the engine does not have it yet: the tag names the context's digest, so an image the
    /// engine has is the one this context builds.
    pub(super) async fn build_unless_present(
        &self,
        tag: String,
        build: &crate::descriptor::model::BuildSpec,
        labels: std::collections::HashMap<String, String>,
        (network, resources): (&str, Option<&Resources>),
        read: impl FnOnce() -> Result<BuildContext, crate::build_context::ContextError>,
    ) -> Attempt<String> {
        match self.docker.inspect_image(&tag).await {
            Ok(_) => return Ok(tag),
            Err(error) if is_status(&error, 404) => {}
            Err(error) => {
                return Err(self.trouble(&format!("cannot inspect image {tag}"), error));
            }
        }
        let context = read().map_err(|e| {
            Trouble::Failed(format!("cannot read build context {}: {e}", build.context))
        })?;
        let mut options = BuildImageOptions {
            dockerfile: build.dockerfile.clone(),
            t: Some(tag.clone()),
            buildargs: Some(build.args.clone().into_iter().collect()),
            labels: Some(labels),
            rm: true,
            forcerm: true,
            ..Default::default()
        };
        confine_build(&mut options, network, resources);
        self.build(options, context.into_stream(()), &build.context)
            .await?;
        Ok(tag)
    }

    /// The image `name`, pulled only when the engine says it lacks it: any other failure to
    /// inspect is reported, never papered over with a registry pull.
    pub(super) async fn named_image(&self, name: &str) -> Attempt<String> {
        match self.docker.inspect_image(name).await {
            Ok(_) => return Ok(name.to_string()),
            Err(error) if is_status(&error, 404) => {}
            Err(error) => {
                return Err(self.trouble(&format!("cannot inspect image {name}"), error));
            }
        }
        let options = CreateImageOptions {
            from_image: Some(name.to_string()),
            ..Default::default()
        };
        let mut pull = self.docker.create_image(Some(options), None, None);
        while let Some(progress) = pull.next().await {
            progress.map_err(|e| {
                self.trouble(
                    &format!("cannot pull image {name} (it is not on the engine)"),
                    e,
                )
            })?;
        }
        Ok(name.to_string())
    }

    /// Builds an image from the context `tar`, streamed as it comes (named `context` in errors,
    /// with the build's last lines).
    pub(super) async fn build(
        &self,
        options: BuildImageOptions,
        tar: impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
        context: &str,
    ) -> Attempt<()> {
        let tar = bollard::body_try_stream(tar);
        let mut output = self.docker.build_image(options, None, Some(tar));
        let mut log: Vec<String> = Vec::new();
        while let Some(item) = output.next().await {
            let info = match item {
                Ok(info) => info,
                Err(error) if engine_gone(&error) => {
                    return Err(self.trouble("build interrupted", error));
                }
                Err(error) => {
                    return Err(Trouble::Failed(build_failed(
                        context,
                        &engine_message(&error),
                        &log,
                    )));
                }
            };
            if let Some(detail) = info.error_detail {
                return Err(Trouble::Failed(build_failed(
                    context,
                    &detail.message.unwrap_or_default(),
                    &log,
                )));
            }
            if let Some(line) = info.stream {
                log.push(line);
            }
        }
        Ok(())
    }
}

fn build_failed(context: &str, reason: &str, log: &[String]) -> String {
    let tail: Vec<&str> = log
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    format!(
        "build of {context} failed: {reason}{}",
        if tail.is_empty() {
            String::new()
        } else {
            format!(" (after: {})", tail.join(" | "))
        }
    )
}
