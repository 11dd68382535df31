//! Checks a JSON Schema cannot express: fields that exclude each other, paths that must stay inside the repo, and rules across descriptors
//! (duplicates, missing references, dependency cycles, host ports claimed twice).
//!
//! Every check returns problems placed by JSON pointer; the loader turns pointers into positions.
//! Only path checks touch the file system, and only to resolve paths under the repo's root.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use super::model::{
    ChallengeSpec, Engine, ImageSource, Instanced, PortPlace, RestartPolicy, StagingSpec, StepImage,
};
use super::schema::Violation;
use super::{Descriptor, Kind, ObjectRef, Spec};

fn violation(pointer: impl Into<String>, message: impl Into<String>) -> Violation {
    Violation {
        pointer: pointer.into(),
        at_key: false,
        message: message.into(),
    }
}

/// Checks one typed descriptor against the rules between its own fields and the repo's files.
pub(super) fn check_descriptor(
    root: &Path,
    descriptor: &Descriptor,
    options: &super::LoadOptions,
) -> Vec<Violation> {
    let mut found = Vec::new();
    match &descriptor.spec {
        Spec::Challenge(spec) => {
            check_challenge(root, spec, &mut found);
            check_walls(spec, &options.walls, &mut found);
            if spec.target != Some(Engine::Kubernetes) {
                for at in spec.all_ports() {
                    if let Some(host) = at.port.host
                        && options.instance_ports.contains(&host.0)
                    {
                        found.push(violation(
                            format!("{}/host", at.pointer()),
                            format!(
                                "{}.host: {} is in the range per-team instances take (the agent's instances.hostPorts, {}-{}); pick another port, or move the range",
                                at.dotted(),
                                host.0,
                                options.instance_ports.start(),
                                options.instance_ports.end()
                            ),
                        ));
                    }
                }
            }
            if spec.target == Some(Engine::Kubernetes) {
                check_on_kubernetes(spec, &options.node_ports, &mut found);
                if !spec.all_ports().is_empty()
                    && descriptor
                        .metadata
                        .name
                        .as_str()
                        .starts_with(|c: char| c.is_ascii_digit())
                {
                    found.push(violation(
                        "/metadata/name",
                        "metadata.name: on kubernetes a challenge with ports gets a Service of its name, and a Service's name must start with a letter; rename it",
                    ));
                }
            }
        }
        Spec::Pipeline(spec) => {
            repeated_names(
                spec.steps.iter().map(|step| step.name.as_str()),
                "steps",
                "; logs and status tell steps apart by name",
                &mut found,
            );
            if let StepImage::Name(image) = &spec.image
                && let Err(why) = image_within_limits(image)
            {
                found.push(violation("/spec/image", format!("spec.image: {why}")));
            }
            if let Some(source) = &spec.source
                && let Err(why) = clone_url(&source.url)
            {
                found.push(violation(
                    "/spec/source/url",
                    format!("spec.source.url: {why}"),
                ));
            }
            if let Some(produces) = &spec.produces
                && let Err(message) = image_reference(&produces.replace("{commit}", "0"))
            {
                found.push(violation(
                    "/spec/produces",
                    format!("spec.produces: \"{produces}\" {message}"),
                ));
            }
            if spec.source.is_none()
                && let Err(message) = repo_folder(root, &spec.context)
            {
                found.push(violation(
                    "/spec/context",
                    format!("spec.context: {message} (without spec.source, the steps run in a folder of this repo)"),
                ));
            }
            if !spec.network.allow_connect_to.is_empty() {
                found.push(violation(
                    "/spec/network/allowConnectTo",
                    "spec.network.allowConnectTo: a pipeline's steps reach no challenge; test against a copy started in the steps instead",
                ));
            }
            if spec.source.is_none() && spec.triggers.push.is_some() {
                found.push(violation(
                    "/spec/triggers/push",
                    "spec.triggers.push: a push trigger watches spec.source, and this pipeline has none (it builds a folder of this repo); use onChange: true to run it when that folder changes".to_string(),
                ));
            }
            if let StepImage::Build(image) = &spec.image {
                check_build(
                    root,
                    "/spec/image/build",
                    &image.build.context,
                    &image.build.dockerfile,
                    &mut found,
                );
            }
        }
        Spec::Staging(spec) => check_staging(root, spec, &mut found),
    }
    // berth's own labels (ownership, slot, spec, secret digests) are set by berth alone: a
    // descriptor's value was either overwritten silently or, where berth sets none, taken as
    // berth's (a forged `berth.secret-digests` made every converge replace the container).
    for key in descriptor.metadata.labels.keys() {
        if key.starts_with("berth.") {
            found.push(Violation {
                pointer: format!("/metadata/labels/{}", super::yaml::escaped(key)),
                at_key: true,
                message: format!(
                    "metadata.labels.{key}: labels starting with \"berth.\" are berth's own; choose another key"
                ),
            });
        }
    }
    found
}

/// The walls a descriptor cannot open alone: privileged needs the agent's consent; and what an
/// engine cannot give as asked is refused here rather than half applied.
fn check_walls(spec: &ChallengeSpec, walls: &super::security::Walls, found: &mut Vec<Violation>) {
    let containers = std::iter::once((
        "/spec/security".to_string(),
        "spec.security".to_string(),
        &spec.security,
    ))
    .chain(spec.sidecars.iter().enumerate().map(|(index, sidecar)| {
        (
            format!("/spec/sidecars/{index}/security"),
            format!("spec.sidecars[{index}].security"),
            &sidecar.security,
        )
    }));
    let on_kubernetes = spec.target == Some(Engine::Kubernetes);
    for (pointer, path, security) in containers {
        if security.privileged && !walls.allow_privileged {
            found.push(violation(
                format!("{pointer}/privileged"),
                format!("{path}.privileged: a privileged container can take over the host, so it needs the agent's consent: set allowPrivileged: true in the agent's config (--allow-privileged for the CLI), or add only the capabilities it needs with capabilities.add"),
            ));
        }
        if on_kubernetes && (security.ulimits.nofile.is_some() || security.ulimits.nproc.is_some())
        {
            found.push(violation(
                format!("{pointer}/ulimits"),
                format!("{path}.ulimits: a pod cannot set ulimits (the node's container runtime does); remove them, or keep this challenge on docker"),
            ));
        }
    }
    for (index, target) in spec.network.allow_connect_to.iter().enumerate() {
        let pointer = format!("/spec/network/allowConnectTo/{index}");
        if target.kind != Kind::Challenge {
            found.push(violation(
                pointer,
                format!("spec.network.allowConnectTo[{index}]: {target} is not a Challenge; only challenges can be connected to"),
            ));
        } else if !on_kubernetes {
            found.push(violation(
                pointer,
                format!("spec.network.allowConnectTo[{index}]: on docker, challenges never reach each other; put the containers that must talk in one challenge, as sidecars, or run both with target: kubernetes"),
            ));
        }
    }
    if !spec.network.egress
        && !on_kubernetes
        && let Some(at) = spec
            .all_ports()
            .into_iter()
            .find(|at| at.port.host.is_some())
    {
        found.push(violation(
            format!("{}/host", at.pointer()),
            format!("{}.host: on docker, a challenge with network.egress: false is on an internal network, whose ports the engine does not publish; drop the host port, keep egress, or run it with target: kubernetes, where egress is closed by a NetworkPolicy", at.dotted()),
        ));
    }
}

/// An instanced challenge: one copy per team, each published on ports of its own (host ports of
/// the agent's range on Docker, NodePorts on Kubernetes).
fn check_instanced(spec: &ChallengeSpec, instanced: &Instanced, found: &mut Vec<Violation>) {
    let on_kubernetes = spec.target == Some(Engine::Kubernetes);
    if spec.replicas > 1 {
        found.push(instanced_problem("", format!("spec.instanced: each instance is one container, and {} replicas would be one per team each; set replicas: 1", spec.replicas)));
    }
    if spec.ports.is_empty() {
        found.push(instanced_problem(
            "",
            "spec.instanced: a team reaches its instance through its ports; add one to spec.ports"
                .into(),
        ));
    }
    if let Some(at) = spec
        .all_ports()
        .into_iter()
        .find(|at| at.place.sidecar.is_some())
    {
        found.push(violation(
            at.pointer(),
            format!("{}: an instance publishes its main container's ports only; serve the sidecar's through the main container, or drop the instancing", at.dotted()),
        ));
    }
    if let Some(index) = spec.ports.iter().position(|p| p.host.is_some()) {
        found.push(violation(
            format!("/spec/ports/{index}/host"),
            format!("spec.ports[{index}].host: each instance gets ports of its own (from the agent's instances.hostPorts on docker, NodePorts on kubernetes); remove the host port"),
        ));
    }
    if !spec.network.egress && !on_kubernetes {
        found.push(violation(
            "/spec/network/egress",
            "spec.network.egress: instances are published on host ports, which the engine does not do from an internal network; keep egress".to_string(),
        ));
    }
    if instanced.max_lifetime() < instanced.ttl.0 {
        found.push(instanced_problem(
            "/maxLifetime",
            "spec.instanced.maxLifetime: shorter than ttl, so no instance would live its ttl; make it at least ttl".into(),
        ));
    }
    if let Some(flag) = &instanced.flag {
        if flag.env.is_some() == flag.file.is_some() {
            found.push(instanced_problem(
                "/flag",
                "spec.instanced.flag: set exactly one of env and file".into(),
            ));
        }
        if flag.format.matches("%s").count() != 1 {
            found.push(instanced_problem(
                "/flag/format",
                format!("spec.instanced.flag.format: \"{}\" needs exactly one %s, where the team's part goes", flag.format),
            ));
        }
        if let Some(file) = &flag.file {
            let path = Path::new(file);
            let normal: std::path::PathBuf = path.components().collect();
            if let Err(why) = plain_path(file, PathOf::File) {
                found.push(instanced_problem(
                    "/flag/file",
                    format!("spec.instanced.flag.file: {why}"),
                ));
            } else if let Some(mount) = spec
                .security
                .tmpfs
                .iter()
                .find(|mount| normal.starts_with(Path::new(&mount.path)))
            {
                found.push(instanced_problem(
                    "/flag/file",
                    format!("spec.instanced.flag.file: {file} is under the tmpfs at {}, which would hide it; put it elsewhere", mount.path),
                ));
            } else if spec.secret_files.iter().any(|s| {
                Path::new(&s.path)
                    .components()
                    .collect::<std::path::PathBuf>()
                    == normal
            }) {
                found.push(instanced_problem(
                    "/flag/file",
                    format!("spec.instanced.flag.file: {file} is also a secret file; use one or the other"),
                ));
            }
        }
        // On Kubernetes the flag is a Secret mounted at its file, which a read-only root takes.
        if flag.file.is_some() && spec.security.read_only_root_filesystem && !on_kubernetes {
            found.push(instanced_problem(
                "/flag/file",
                "spec.instanced.flag.file: the flag is copied into the container, which a read-only root file system refuses; drop readOnlyRootFilesystem, or give the flag as env".into(),
            ));
        }
        if on_kubernetes && instanced.pool > 0 {
            found.push(instanced_problem(
                "/pool",
                "spec.instanced.pool: on kubernetes a pod's flag is fixed when it starts, and a pooled one starts before a team claims it; drop pool, or the flag".into(),
            ));
        } else if flag.env.is_some() && instanced.pool > 0 {
            found.push(instanced_problem(
                "/pool",
                "spec.instanced.pool: a pooled instance is started before a team claims it, and a started container's environment cannot change; give the flag as a file (flag: {file: /flag.txt}), or drop pool".into(),
            ));
        }
    }
}

/// A problem at `at` under `/spec/instanced`.
fn instanced_problem(at: &str, message: String) -> Violation {
    violation(format!("/spec/instanced{at}"), message)
}

/// The paths of the files berth writes into the main container: secret files and a flag file.
fn secret_paths(spec: &ChallengeSpec) -> Vec<&str> {
    let flag = spec
        .instanced
        .as_ref()
        .and_then(|i| i.flag.as_ref())
        .and_then(|f| f.file.as_deref());
    spec.secret_files
        .iter()
        .map(|s| s.path.as_str())
        .chain(flag)
        .collect()
}

/// What a plain absolute path names, for the message when it is not one.
#[derive(Clone, Copy)]
enum PathOf {
    /// A file, such as `/flag.txt`.
    File,
    /// A folder, such as `/data`.
    Folder,
}

/// Why `path` is not a plain absolute path of `what`, if it is not.
fn plain_path(path: &str, what: PathOf) -> Result<(), String> {
    let parsed = Path::new(path);
    let plain = parsed.is_absolute()
        && path.len() <= 4096
        && !path.ends_with('/')
        && parsed.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir
                    | std::path::Component::CurDir
                    | std::path::Component::Normal(_)
            )
        });
    let normal: std::path::PathBuf = parsed.components().collect();
    let (noun, example) = match what {
        PathOf::File => ("file", "/flag.txt"),
        PathOf::Folder => ("folder", "/data"),
    };
    match plain && normal != Path::new("/") {
        true => Ok(()),
        false => Err(format!(
            "\"{path}\" is not a {noun}'s absolute path; write one such as {example}"
        )),
    }
}

/// A challenge's volumes: plain absolute paths, one volume per path in each container, not
/// under a tmpfs or on a secret file.
fn check_volumes(root: &Path, spec: &ChallengeSpec, found: &mut Vec<Violation>) {
    // A pooled instance's flag is put in a volume at /run/berth-flag.
    let pooled_flag = spec
        .instanced
        .as_ref()
        .is_some_and(|i| i.pool > 0 && i.flag.as_ref().is_some_and(|f| f.file.is_some()));
    if spec.instanced.is_some() {
        // An instance's volumes are its own, one per container: a name two containers mount
        // would be two volumes, not one.
        let mut mounted_by_main: std::collections::BTreeSet<&str> = spec
            .volumes
            .iter()
            .filter_map(|v| v.named())
            .map(|name| name.as_str())
            .collect();
        for (index, sidecar) in spec.sidecars.iter().enumerate() {
            for (at, volume) in sidecar.volumes.iter().enumerate() {
                let Some(name) = volume.named() else {
                    continue;
                };
                if !mounted_by_main.insert(name.as_str()) {
                    found.push(violation(
                        format!("/spec/sidecars/{index}/volumes/{at}/name"),
                        format!("spec.sidecars[{index}].volumes[{at}].name: an instance's volumes are its containers' own, so {} cannot be shared; give each container its own", name.as_str()),
                    ));
                }
            }
        }
    }
    let containers = std::iter::once((
        "/spec/volumes".to_string(),
        "spec.volumes".to_string(),
        &spec.volumes,
        &spec.security,
    ))
    .chain(spec.sidecars.iter().enumerate().map(|(index, sidecar)| {
        (
            format!("/spec/sidecars/{index}/volumes"),
            format!("spec.sidecars[{index}].volumes"),
            &sidecar.volumes,
            &sidecar.security,
        )
    }));
    for (pointer, shown, volumes, security) in containers {
        let mut seen: Vec<std::path::PathBuf> = Vec::new();
        for (index, volume) in volumes.iter().enumerate() {
            match (&volume.name, &volume.from) {
                (Some(_), Some(_)) | (None, None) => found.push(violation(
                    format!("{pointer}/{index}"),
                    format!("{shown}[{index}]: set exactly one of name (a named volume of the challenge's) and from (a folder of this repo, copied in read-only)"),
                )),
                (None, Some(folder)) => {
                    let why = match repo_folder(root, folder) {
                        Err(message) => Some(message.to_string()),
                        Ok(path) => folder_copy_problem(&path, spec),
                    };
                    if let Some(why) = why {
                        found.push(violation(
                            format!("{pointer}/{index}/from"),
                            format!("{shown}[{index}].from: {why}"),
                        ));
                    }
                }
                (Some(_), None) => {}
            }
            let at = format!("{pointer}/{index}/path");
            let said = |why: String| violation(at.clone(), format!("{shown}[{index}].path: {why}"));
            let normal: std::path::PathBuf = Path::new(&volume.path).components().collect();
            if let Err(why) = plain_path(&volume.path, PathOf::Folder) {
                found.push(said(why));
            } else if let Some(other) = seen
                .iter()
                .find(|other| normal.starts_with(other) || other.starts_with(&normal))
            {
                found.push(said(format!(
                    "{} and {} are the same folder, or one is inside the other",
                    volume.path,
                    other.display()
                )));
            } else if let Some(mount) = security.tmpfs.iter().find(|m| {
                normal.starts_with(Path::new(&m.path)) || Path::new(&m.path).starts_with(&normal)
            }) {
                found.push(said(format!(
                    "{} and the tmpfs at {} would hide one another",
                    volume.path, mount.path
                )));
            } else if pooled_flag
                && (normal.starts_with("/run/berth-flag")
                    || Path::new("/run/berth-flag").starts_with(&normal))
            {
                found.push(said(format!(
                    "{} holds /run/berth-flag, where berth puts a pooled instance's flag; put it elsewhere",
                    volume.path
                )));
            } else if let Some(secret) = pointer
                .eq("/spec/volumes")
                .then(|| {
                    secret_paths(spec).into_iter().find(|file| {
                        Path::new(file)
                            .components()
                            .collect::<std::path::PathBuf>()
                            .starts_with(&normal)
                    })
                })
                .flatten()
            {
                found.push(said(format!(
                    "{secret} is inside it: a secret written there would outlive its container, and the volume would hide the image's copy; put the volume elsewhere"
                )));
            } else {
                seen.push(normal);
            }
        }
    }
}

fn check_challenge(root: &Path, spec: &ChallengeSpec, found: &mut Vec<Violation>) {
    if let Some(instanced) = &spec.instanced {
        check_instanced(spec, instanced, found);
    }
    check_volumes(root, spec, found);
    // Paths as the file system takes them (`//flag` and `/./flag` are `/flag`): each once, none
    // inside another, none under a tmpfs (mounted over the file at the start, on Docker).
    let mut seen: Vec<std::path::PathBuf> = Vec::new();
    for (index, file) in spec.secret_files.iter().enumerate() {
        let normal: std::path::PathBuf = Path::new(&file.path).components().collect();
        let at = format!("/spec/secretFiles/{index}/path");
        let said =
            |why: String| violation(at.clone(), format!("spec.secretFiles[{index}].path: {why}"));
        if let Err(why) = plain_path(&file.path, PathOf::File) {
            found.push(said(why));
        } else if let Some(other) = seen
            .iter()
            .find(|other| normal.starts_with(other) || other.starts_with(&normal))
        {
            found.push(said(format!(
                "{} and {} are the same file, or one is inside the other",
                file.path,
                other.display()
            )));
        } else if let Some(mount) = spec
            .security
            .tmpfs
            .iter()
            .find(|mount| normal.starts_with(Path::new(&mount.path)))
        {
            found.push(said(format!(
                "{} is under the tmpfs at {}, which would hide it; put it elsewhere",
                file.path, mount.path
            )));
        } else {
            seen.push(normal);
        }
    }
    if !spec.secret_files.is_empty()
        && spec.security.read_only_root_filesystem
        && spec.target != Some(super::model::Engine::Kubernetes)
    {
        found.push(violation(
            "/spec/secretFiles",
            "spec.secretFiles: on Docker a secret file is copied into the container before it starts, which a read-only root file system refuses; drop readOnlyRootFilesystem, or run the challenge with target: kubernetes (a Secret volume)",
        ));
    }
    // A stop waits this long through the engine's API, whose own requests end at 120s; and a
    // part of a second would round down to no wait at all.
    if let Some(timeout) = spec.stop_timeout
        && !(1..=100).contains(&timeout.0.as_secs())
    {
        found.push(violation(
            "/spec/stopTimeout",
            format!(
                "spec.stopTimeout: {}s is out of range; write 1s to 100s",
                timeout.0.as_secs_f64()
            ),
        ));
    }
    if let Some(ImageSource::Name(image)) = &spec.image
        && let Err(why) = image_within_limits(image)
    {
        found.push(violation("/spec/image", format!("spec.image: {why}")));
    }
    for (index, sidecar) in spec.sidecars.iter().enumerate() {
        match (&sidecar.image, &sidecar.build) {
            (Some(ImageSource::FromPipeline(_)), None) => {}
            (Some(ImageSource::Name(image)), None) => {
                if let Err(why) = image_within_limits(image) {
                    found.push(violation(
                        format!("/spec/sidecars/{index}/image"),
                        format!("spec.sidecars[{index}].image: {why}"),
                    ));
                }
            }
            (None, Some(build)) => check_build(
                root,
                &format!("/spec/sidecars/{index}/build"),
                &build.context,
                &build.dockerfile,
                found,
            ),
            _ => found.push(violation(
                format!("/spec/sidecars/{index}"),
                format!("spec.sidecars[{index}]: set exactly one of image and build"),
            )),
        }
    }
    match (&spec.image, &spec.build) {
        (None, None) => found.push(violation(
            "/spec",
            "spec: needs an image or a build; set spec.image or spec.build",
        )),
        (Some(_), Some(_)) => found.push(violation(
            "/spec/build",
            "spec.build: set either spec.image or spec.build, not both",
        )),
        (None, Some(build)) => check_build(
            root,
            "/spec/build",
            &build.context,
            &build.dockerfile,
            found,
        ),
        (Some(_), None) => {}
    }
    if let Some(check) = &spec.healthcheck {
        let kinds = [
            check.tcp.is_some(),
            check.http.is_some(),
            check.solve.is_some(),
        ];
        if kinds.iter().filter(|set| **set).count() != 1 {
            found.push(violation(
                "/spec/healthcheck",
                "spec.healthcheck: set exactly one of tcp, http and solve",
            ));
        }
        if let Some(solve) = &check.solve {
            let team_flag = spec.instanced.as_ref().is_some_and(|i| i.flag.is_some());
            let why = if spec.ports.is_empty() {
                Some("the solver reaches the challenge on its first port, and it has none")
            } else if solve.expect_flag
                && spec.secret_env.is_empty()
                && spec.secret_files.is_empty()
                && !team_flag
            {
                Some(
                    "expectFlag needs the flag among secretEnv or secretFiles (or a team's, instanced.flag), and there is none",
                )
            } else {
                None
            };
            if let Some(why) = why {
                found.push(violation(
                    "/spec/healthcheck/solve",
                    format!("spec.healthcheck.solve: {why}"),
                ));
            }
            if let Err(why) = image_within_limits(&solve.image) {
                found.push(violation(
                    "/spec/healthcheck/solve/image",
                    format!("spec.healthcheck.solve.image: {why}"),
                ));
            }
        }
    }
    if spec.replicas > 1
        && spec.target != Some(Engine::Kubernetes)
        && let Some(index) = spec.ports.iter().position(|p| p.host.is_some())
    {
        found.push(violation(
            format!("/spec/ports/{index}/host"),
            format!(
                "spec.ports[{index}].host: {} replicas cannot share one host port; remove the host port or set replicas: 1",
                spec.replicas
            ),
        ));
    }
    for name in spec.secret_env.keys() {
        if spec.env.contains_key(name) {
            found.push(violation(
                format!("/spec/secretEnv/{}", super::yaml::escaped(name)),
                format!("spec.secretEnv.{name}: also set in spec.env; keep it in one of them"),
            ));
        }
    }
    repeated_names(
        spec.sidecars.iter().map(|sidecar| sidecar.name.as_str()),
        "sidecars",
        "",
        found,
    );
    sidecar_order(spec, found);
}

/// Why the repo folder at `path` cannot be copied into the containers of `spec` as it is: a
/// symbolic link in it (its copy would point out of the folder, or nowhere); on kubernetes, more
/// than a ConfigMap holds; for per-team instances that may remount it (SYS_ADMIN, privileged),
/// a copy every team shares. Bounded: it stops at the first problem, or past 10,000 entries.
fn folder_copy_problem(path: &Path, spec: &ChallengeSpec) -> Option<String> {
    use super::model::{KUBE_FOLDER_FILES, KUBE_FOLDER_LIMIT};
    let remounts = |security: &super::security::Security| {
        security.privileged
            || security
                .capabilities
                .added()
                .iter()
                .any(|c| c == "SYS_ADMIN")
    };
    if spec.instanced.is_some()
        && (remounts(&spec.security) || spec.sidecars.iter().any(|s| remounts(&s.security)))
    {
        return Some("every team's instance mounts the one copy, and a container with SYS_ADMIN or privileged could remount it writable for all; put the files in the image instead".into());
    }
    let (mut bytes, mut files, mut entries) = (0u64, 0usize, 0usize);
    let mut folders = vec![path.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let listed = std::fs::read_dir(&folder).ok()?;
        for entry in listed.flatten() {
            entries += 1;
            if entries > 10_000 {
                return Some("holds more than 10,000 entries; copy in what the container needs, or put it in the image".into());
            }
            let Ok(metadata) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            let shown = entry.path();
            let shown = shown.strip_prefix(path).unwrap_or(&shown).display();
            if metadata.file_type().is_symlink() {
                return Some(format!(
                    "holds a symbolic link, {shown}, whose copy would point out of the folder or nowhere; put the file itself there"
                ));
            }
            if metadata.is_dir() {
                folders.push(entry.path());
            } else {
                bytes += metadata.len();
                files += 1;
            }
        }
    }
    if spec.target != Some(Engine::Kubernetes) {
        return None;
    }
    if bytes > KUBE_FOLDER_LIMIT {
        return Some(format!(
            "holds {bytes} bytes; on kubernetes a folder goes in a ConfigMap, which holds at most {KUBE_FOLDER_LIMIT}: copy in less, or put it in the image"
        ));
    }
    (files > KUBE_FOLDER_FILES).then(|| {
        format!("holds {files} files; on kubernetes a folder copied in holds at most {KUBE_FOLDER_FILES}")
    })
}

/// Each sidecar's `dependsOn` names another sidecar of the challenge, and no chain of them comes
/// back to where it began (nothing in a circle could ever start).
fn sidecar_order(spec: &ChallengeSpec, found: &mut Vec<Violation>) {
    let names: Vec<&str> = spec.sidecars.iter().map(|s| s.name.as_str()).collect();
    for (index, sidecar) in spec.sidecars.iter().enumerate() {
        if let Some(check) = &sidecar.healthcheck
            && (check.tcp.is_some() == check.http.is_some() || check.solve.is_some())
        {
            found.push(violation(
                format!("/spec/sidecars/{index}/healthcheck"),
                format!("spec.sidecars[{index}].healthcheck: set exactly one of tcp and http"),
            ));
        }
        for (at, wanted) in sidecar.depends_on.iter().enumerate() {
            let why = if wanted == &sidecar.name {
                "a sidecar cannot wait for itself".to_string()
            } else if !names.contains(&wanted.as_str()) {
                format!(
                    "names no sidecar of this challenge (its sidecars: {})",
                    names.join(", ")
                )
            } else {
                continue;
            };
            found.push(violation(
                format!("/spec/sidecars/{index}/dependsOn/{at}"),
                format!("spec.sidecars[{index}].dependsOn[{at}]: \"{wanted}\" {why}"),
            ));
        }
    }
    // A walk along dependsOn from each sidecar: a circle is told once, at its first sidecar.
    let mut told: Vec<&str> = Vec::new();
    let mut cleared = HashSet::new();
    for (index, sidecar) in spec.sidecars.iter().enumerate() {
        let mut path = vec![sidecar.name.as_str()];
        if let Some(circle) = circle_from(spec, &mut path, &mut cleared)
            && !circle.iter().any(|name| told.contains(name))
        {
            told.extend(circle.iter().copied());
            found.push(violation(
                format!("/spec/sidecars/{index}/dependsOn"),
                format!(
                    "spec.sidecars[{index}].dependsOn: {} is a circle; none of them could start",
                    circle.join(" → ")
                ),
            ));
        }
    }
}

/// The circle of `dependsOn` reached from the end of `path`, as the names around it (the first
/// again at the end), if there is one. `cleared` holds the sidecars known to reach none, so each
/// is walked from once.
fn circle_from<'a>(
    spec: &'a ChallengeSpec,
    path: &mut Vec<&'a str>,
    cleared: &mut HashSet<&'a str>,
) -> Option<Vec<&'a str>> {
    let last = *path.last()?;
    let sidecar = spec.sidecars.iter().find(|s| s.name.as_str() == last)?;
    for next in sidecar.depends_on.iter().map(|n| n.as_str()) {
        if next == last || cleared.contains(next) {
            continue;
        }
        if let Some(start) = path.iter().position(|name| *name == next) {
            let mut circle = path[start..].to_vec();
            circle.push(next);
            return Some(circle);
        }
        path.push(next);
        if let Some(circle) = circle_from(spec, path, cleared) {
            return Some(circle);
        }
        path.pop();
    }
    cleared.insert(last);
    None
}

/// A name given twice in the list `spec.FIELD` is a problem at the second, saying where the first
/// is, then `why` it matters.
fn repeated_names<'a>(
    names: impl Iterator<Item = &'a str>,
    field: &str,
    why: &str,
    found: &mut Vec<Violation>,
) {
    let mut seen = HashMap::new();
    for (index, name) in names.enumerate() {
        if let Some(first) = seen.insert(name, index) {
            found.push(violation(
                format!("/spec/{field}/{index}/name"),
                format!("spec.{field}[{index}].name: \"{name}\" is also the name of spec.{field}[{first}]{why}"),
            ));
        }
    }
}

/// Whether `text` is an image digest, `ALGORITHM:HEX` (`sha256:` and 64 hex digits), as a tag
/// that pins an image is written (`image: app@${tag}`).
fn is_digest(text: &str) -> bool {
    text.split_once(':').is_some_and(|(algorithm, hex)| {
        !algorithm.is_empty()
            && algorithm.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '.' | '_' | '-')
            })
            && hex.len() >= 32
            && hex.chars().all(|c| c.is_ascii_hexdigit())
    })
}

/// Whether an image reference is within the engine's lengths: a name of at most 255 characters
/// and a tag of at most 128 (refused here, not when a run or an apply reaches the engine).
fn image_within_limits(text: &str) -> Result<(), String> {
    let (name, tag) = name_and_tag(text.split_once('@').map_or(text, |(name, _)| name));
    if name.len() > 255 {
        return Err(format!(
            "the image name is {} characters long; the engine takes at most 255",
            name.len()
        ));
    }
    match tag {
        Some(tag) => image_tag(tag).map_err(|why| format!("the tag {why}")),
        None => Ok(()),
    }
}

/// A URL that is no clone URL, as shown: any password left out, any control character escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "\"{0}\" is not a clone URL: use https://HOST/PATH, ssh://HOST/PATH, git://HOST/PATH, file:///PATH or USER@HOST:PATH"
)]
pub struct NotACloneUrl(String);

/// Whether `url` is a clone URL: `https://`, `http://`, `ssh://` or `git://` with a host, `file://`
/// with a path, or scp-like `[user@]host:path`; checked here, so a typo is a problem at its place
/// and never a name looked up on the network.
pub(crate) fn clone_url(url: &str) -> Result<(), NotACloneUrl> {
    let refused =
        || NotACloneUrl(crate::printable::field(&crate::git_url::redact(url)).into_owned());
    if url.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(refused());
    }
    let host_ok = |host: &str| {
        let (host, port) = match host.strip_prefix('[') {
            // An IPv6 address: `[::1]:8080`.
            Some(rest) => match rest.split_once(']') {
                Some((address, port)) => {
                    if address.parse::<std::net::Ipv6Addr>().is_err() {
                        return false;
                    }
                    ("ipv6", port.strip_prefix(':'))
                }
                None => return false,
            },
            None => match host.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (host, None),
            },
        };
        // A fully qualified name may end with a dot; an internationalised one has letters of
        // any script.
        let host = host.strip_suffix('.').unwrap_or(host);
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .chars()
                        .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
            });
        name_ok && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
    };
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let local = authority.is_empty() || authority.eq_ignore_ascii_case("localhost");
            match scheme.to_ascii_lowercase().as_str() {
                "file" if local && !path.is_empty() => Ok(()),
                "https" | "http" | "ssh" | "git" | "git+ssh" | "ssh+git"
                    if host_ok(host) && !path.is_empty() =>
                {
                    Ok(())
                }
                _ => Err(refused()),
            }
        }
        None => {
            // scp-like, `[user@]host:path`: the host ends at the first colon after the user (or
            // after the `]` of an IPv6 address in brackets).
            let (user, rest) = match url.split_once('@') {
                Some((user, rest)) if !user.contains('/') => (Some(user), rest),
                _ => (None, url),
            };
            let (host, path) = match rest.strip_prefix('[') {
                Some(bracketed) => {
                    let (address, path) = bracketed.split_once("]:").ok_or_else(refused)?;
                    (format!("[{address}]"), path)
                }
                None => {
                    let (host, path) = rest.split_once(':').ok_or_else(refused)?;
                    (host.to_string(), path)
                }
            };
            let user_ok = user.is_none_or(|u| !u.is_empty());
            match user_ok && !host.contains('/') && host_ok(&host) && !path.is_empty() {
                true => Ok(()),
                false => Err(refused()),
            }
        }
    }
}

/// Whether `tag` is an image tag the engine takes: letters, digits, `_ . -`, at most 128, not
/// starting with `.` or `-`.
fn image_tag(tag: &str) -> Result<(), String> {
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    match tag_ok {
        true => Ok(()),
        false => Err(format!(
            "\"{}\": letters, digits, _ . and - only, at most 128",
            crate::printable::field(tag)
        )),
    }
}

/// An image reference's name and tag: the tag follows the last colon, unless a `/` comes after
/// it (then the colon is a registry's port).
fn name_and_tag(text: &str) -> (&str, Option<&str>) {
    match text.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
        _ => (text, None),
    }
}

/// Whether `text` is an image name the engine takes: lower-case path components, an optional
/// host with a port, and a tag (`registry:5000/team/app:v1`).
fn image_reference(text: &str) -> Result<(), String> {
    let (name, tag) = name_and_tag(text);
    let Some(tag) = tag else {
        return Err("has no tag; write NAME:TAG, e.g. app:{commit}".into());
    };
    image_tag(tag).map_err(|why| format!("has the tag {why}"))?;
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.chars().all(|ch| {
                ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '_' | '-')
            })
            && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
            && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
    };
    let mut components = name.split('/').peekable();
    let first = components.peek().copied().unwrap_or_default();
    // A registry host may carry a port and capitals; the rest is the path.
    let host =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if host {
        components.next();
    }
    if components.all(component_ok) {
        Ok(())
    } else {
        Err(
            "is not an image name the engine takes: lower-case letters, digits and . _ - between /"
                .into(),
        )
    }
}

/// What a Challenge on Kubernetes cannot be: each says what to do instead.
fn check_on_kubernetes(
    spec: &ChallengeSpec,
    node_ports: &std::ops::RangeInclusive<u16>,
    found: &mut Vec<Violation>,
) {
    if spec.build.is_some() {
        found.push(violation(
            "/spec/build",
            "spec.build: a cluster cannot build from the repo; build the image with a Pipeline and use image: {fromPipeline: NAME}, or keep this challenge on docker",
        ));
    }
    if matches!(spec.restart, RestartPolicy::No | RestartPolicy::OnFailure) {
        found.push(violation(
            "/spec/restart",
            "spec.restart: a challenge on kubernetes is a Deployment, whose pods always restart; leave restart out, or keep this one-shot on docker",
        ));
    }
    let pids = |resources: &Option<super::security::Resources>| {
        resources.as_ref().is_some_and(|r| r.pids.is_some())
    };
    if pids(&spec.resources) {
        found.push(violation(
            "/spec/resources/pids",
            "spec.resources.pids: Kubernetes sets the process limit per node (the kubelet's --pod-max-pids), not per container; remove it, or keep this challenge on docker",
        ));
    }
    for (index, sidecar) in spec.sidecars.iter().enumerate() {
        if pids(&sidecar.resources) {
            found.push(violation(
                format!("/spec/sidecars/{index}/resources/pids"),
                format!("spec.sidecars[{index}].resources.pids: Kubernetes sets the process limit per node (the kubelet's --pod-max-pids), not per container; remove it, or keep this challenge on docker"),
            ));
        }
    }
    if let Some(index) = spec.sidecars.iter().position(|s| s.build.is_some()) {
        found.push(violation(
            format!("/spec/sidecars/{index}/build"),
            format!("spec.sidecars[{index}].build: a cluster cannot build from the repo; build the image with a Pipeline and use image: {{fromPipeline: NAME}}, or keep this challenge on docker"),
        ));
    }
    if let Some(index) = spec.sidecars.iter().position(|s| !s.depends_on.is_empty()) {
        found.push(violation(
            format!("/spec/sidecars/{index}/dependsOn"),
            format!("spec.sidecars[{index}].dependsOn: on kubernetes a pod's containers start together, in no order; give the sidecars a healthcheck (the pod is ready only when they are) and let the containers wait for each other, or keep this challenge on docker"),
        ));
    }
    if let Some(index) = spec.sidecars.iter().position(|s| s.name.as_str() == "main") {
        found.push(violation(
            format!("/spec/sidecars/{index}/name"),
            format!("spec.sidecars[{index}].name: on kubernetes the challenge's own container is named main; name the sidecar otherwise"),
        ));
    }
    let mut listening: HashMap<(u16, &str), String> = HashMap::new();
    for at in spec.all_ports() {
        // A pod's containers share one network: two cannot listen on one port.
        let key = (at.port.container.0, at.port.protocol.as_str());
        if let Some(first) = listening.get(&key) {
            found.push(violation(
                format!("{}/container", at.pointer()),
                format!(
                    "{}.container: {first} listens on {}/{} too, and on kubernetes the containers of a pod share one network; give one of them another port, or keep this challenge on docker",
                    at.dotted(), key.0, key.1
                ),
            ));
        } else {
            listening.insert(key, at.dotted());
        }
        if let Some(host) = at.port.host
            && !node_ports.contains(&host.0)
        {
            found.push(violation(
                format!("{}/host", at.pointer()),
                format!(
                    "{}.host: {} is outside the cluster's NodePort range {}-{}, so it cannot be published on every node; pick a port in the range, or leave host out and expose the port with a LoadBalancer Service or an Ingress",
                    at.dotted(),
                    host.0,
                    node_ports.start(),
                    node_ports.end()
                ),
            ));
        }
    }
}

fn check_staging(root: &Path, spec: &StagingSpec, found: &mut Vec<Violation>) {
    // Values are substituted into manifests and charts: each stands for one scalar on one line.
    if let Some(super::model::TagSource::Tag(tag)) = &spec.tag
        && !is_digest(tag)
        && let Err(why) = image_tag(tag)
    {
        found.push(violation("/spec/tag", format!("spec.tag: {why}")));
    }
    let sections = [
        ("app", &spec.overrides.app),
        ("staging", &spec.overrides.staging),
    ];
    for (section, values) in sections {
        for (key, value) in values {
            if value.chars().any(char::is_control) || value.contains(['\u{2028}', '\u{2029}']) {
                found.push(violation(
                    format!("/spec/overrides/{section}/{}", super::yaml::escaped(key)),
                    format!(
                        "spec.overrides.{section}.{key}: a value is one line without control characters: it stands for one scalar in the manifests"
                    ),
                ));
            }
        }
    }
    match (&spec.manifests, &spec.chart) {
        (None, None) => found.push(violation(
            "/spec",
            "spec: needs manifests or a chart; set spec.manifests or spec.chart",
        )),
        (Some(_), Some(_)) => found.push(violation(
            "/spec/chart",
            "spec.chart: set either spec.manifests or spec.chart, not both",
        )),
        (Some(folder), None) => {
            if let Err(message) = repo_folder(root, folder) {
                found.push(violation(
                    "/spec/manifests",
                    format!("spec.manifests: {message}"),
                ));
            }
        }
        (None, Some(folder)) => {
            if let Err(message) = repo_folder(root, folder) {
                found.push(violation("/spec/chart", format!("spec.chart: {message}")));
            }
        }
    }
    check_chart_values(root, spec, found);
}

/// `values` and `valuesFiles` go to a chart: each file is one of the repo, and every variable in
/// `values` is one the staging defines.
fn check_chart_values(root: &Path, spec: &StagingSpec, found: &mut Vec<Violation>) {
    if spec.chart.is_none() {
        for (pointer, set) in [
            ("/spec/values", spec.values.is_some()),
            ("/spec/valuesFiles", !spec.values_files.is_empty()),
        ] {
            if set {
                found.push(violation(
                    pointer,
                    format!(
                        "{}: values are for a chart (spec.chart); a manifests folder reads ${{tag}} and ${{overrides.KEY}}",
                        super::schema::dotted(pointer)
                    ),
                ));
            }
        }
        return;
    }
    for (index, file) in spec.values_files.iter().enumerate() {
        if let Err(message) = repo_file(root, file) {
            found.push(violation(
                format!("/spec/valuesFiles/{index}"),
                format!("spec.valuesFiles[{index}]: {message}"),
            ));
        }
    }
    if let Some(values) = &spec.values {
        let variables = super::manifests::Variables::of(spec);
        if let Err((pointer, message)) = super::manifests::substituted_values(values, &variables) {
            found.push(violation(
                pointer.clone(),
                format!("{}: {message}", super::schema::dotted(&pointer)),
            ));
        }
    }
}

fn check_build(
    root: &Path,
    pointer: &str,
    context: &str,
    dockerfile: &str,
    found: &mut Vec<Violation>,
) {
    let dotted = super::schema::dotted(pointer);
    match repo_folder(root, context) {
        Err(message) => found.push(violation(
            format!("{pointer}/context"),
            format!("{dotted}.context: {message}"),
        )),
        Ok(folder) => {
            let file = folder.join(dockerfile);
            let inside = file.canonicalize().is_ok_and(|f| f.starts_with(&folder));
            if !inside || !file.is_file() {
                found.push(violation(
                    format!("{pointer}/dockerfile"),
                    format!("{dotted}.dockerfile: no file \"{dockerfile}\" in the build context \"{context}\""),
                ));
            }
        }
    }
}

/// Resolves a folder named in a descriptor; it must exist and stay inside the repo, symlinks included.
pub(crate) fn repo_folder(root: &Path, folder: &str) -> Result<std::path::PathBuf, RepoPathError> {
    let canonical = repo_entry(root, folder, "folder")?;
    if !canonical.is_dir() {
        return Err(RepoPathError::NotA {
            written: folder.into(),
            noun: "folder",
        });
    }
    Ok(canonical)
}

/// A file of the repo, as [`repo_folder`] finds a folder.
pub(crate) fn repo_file(root: &Path, file: &str) -> Result<std::path::PathBuf, RepoPathError> {
    let canonical = repo_entry(root, file, "file")?;
    if !canonical.is_file() {
        return Err(RepoPathError::NotA {
            written: file.into(),
            noun: "file",
        });
    }
    Ok(canonical)
}

/// Why a path a descriptor names is not a file or folder of the repo.
#[derive(Debug, thiserror::Error)]
pub enum RepoPathError {
    /// Nothing is named.
    #[error("the path is empty; name a {0} of the repo")]
    Empty(&'static str),
    /// An absolute path.
    #[error("\"{0}\" is an absolute path; write it relative to the repo's root")]
    Absolute(String),
    /// A path through `..`.
    #[error("\"{0}\" leaves the repo through \"..\"; paths must stay inside the repo")]
    Parent(String),
    /// A symlink out of the repo.
    #[error("\"{0}\" is a symlink that points outside the repo")]
    Outside(String),
    /// Nothing is there.
    #[error("{noun} \"{written}\" does not exist in the repo")]
    Missing {
        /// The path as written.
        written: String,
        /// `file` or `folder`.
        noun: &'static str,
    },
    /// Something is there, but not a `noun`.
    #[error("\"{written}\" is not a {noun}")]
    NotA {
        /// The path as written.
        written: String,
        /// `file` or `folder`.
        noun: &'static str,
    },
    /// The path could not be followed.
    #[error("cannot resolve \"{written}\": {source}")]
    Unresolvable {
        /// The path as written.
        written: String,
        /// The system's reason.
        source: std::io::Error,
    },
}

/// The canonical path of `written`, a `noun` (folder or file) that must stay inside the repo.
fn repo_entry(
    root: &Path,
    written: &str,
    noun: &'static str,
) -> Result<std::path::PathBuf, RepoPathError> {
    let path = Path::new(written);
    if written.is_empty() {
        return Err(RepoPathError::Empty(noun));
    }
    if path.is_absolute() {
        return Err(RepoPathError::Absolute(written.into()));
    }
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(RepoPathError::Parent(written.into()));
    }
    let canonical = root
        .join(path)
        .canonicalize()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => RepoPathError::Missing {
                written: written.into(),
                noun,
            },
            _ => RepoPathError::Unresolvable {
                written: written.into(),
                source,
            },
        })?;
    if !canonical.starts_with(root) {
        return Err(RepoPathError::Outside(written.into()));
    }
    Ok(canonical)
}

/// A problem between descriptors, placed in descriptor `at` (an index into the list checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RepoProblem {
    pub at: usize,
    pub pointer: String,
    pub message: String,
    /// The other descriptor and node the message refers to; its position is appended.
    pub also: Option<(usize, String)>,
}

/// What the checks across descriptors read of one descriptor, and nothing else: kept for each
/// valid descriptor when the descriptors themselves are not (`berth validate` of a large repo).
#[derive(Debug, Clone)]
pub(crate) struct RepoFacts {
    key: ObjectRef,
    /// `metadata.dependsOn`, in order.
    depends_on: Vec<ObjectRef>,
    /// Where it uses Pipelines' products.
    pipeline_uses: Vec<crate::descriptor::PipelineUse>,
    /// A Pipeline's: whether it produces an image.
    produces: bool,
    /// A Staging's namespace.
    namespace: Option<String>,
    /// A Challenge's: whether teams get instances of it.
    instanced: bool,
    /// A Challenge's `network.allowConnectTo`, in order.
    allow_connect_to: Vec<ObjectRef>,
    /// A Challenge's host ports, in the order of [`ChallengeSpec::all_ports`].
    host_ports: Vec<HostPort>,
    /// A Challenge's: whether it runs on Kubernetes.
    on_kubernetes: bool,
    /// A Staging's NodePorts its Services ask for, each with where (`Service/web of
    /// Staging/shop (m/web.yaml:1)`).
    node_ports: Vec<(u16, String)>,
}

/// One host port of a challenge's containers, and where it is written.
#[derive(Debug, Clone, Copy)]
struct HostPort {
    place: PortPlace,
    port: u16,
    protocol: &'static str,
}

impl HostPort {
    fn pointer(&self) -> String {
        self.place.pointer()
    }

    fn dotted(&self) -> String {
        self.place.dotted()
    }
}

impl RepoFacts {
    /// What the checks across descriptors need of `descriptor`.
    pub(crate) fn of(descriptor: &Descriptor) -> RepoFacts {
        let mut facts = RepoFacts {
            key: descriptor.key(),
            depends_on: descriptor.metadata.depends_on.clone(),
            pipeline_uses: descriptor.pipeline_uses(),
            produces: false,
            namespace: None,
            instanced: false,
            allow_connect_to: Vec::new(),
            host_ports: Vec::new(),
            on_kubernetes: false,
            node_ports: Vec::new(),
        };
        match &descriptor.spec {
            Spec::Challenge(spec) => {
                facts.instanced = spec.instanced.is_some();
                facts.allow_connect_to = spec.network.allow_connect_to.clone();
                facts.on_kubernetes = spec.target == Some(Engine::Kubernetes);
                facts.host_ports = spec
                    .all_ports()
                    .into_iter()
                    .filter_map(|at| {
                        Some(HostPort {
                            place: at.place,
                            port: at.port.host?.0,
                            protocol: at.port.protocol.as_str(),
                        })
                    })
                    .collect();
            }
            Spec::Pipeline(spec) => facts.produces = spec.produces.is_some(),
            Spec::Staging(spec) => {
                facts.namespace = Some(spec.namespace.to_string());
                // A challenge on the cluster publishes its host port as a NodePort, and the API
                // server gives each port to one Service, whatever its protocol.
                if let Some(Ok(manifests)) = &descriptor.manifests {
                    for manifest in manifests.iter().filter(|m| m.kind == "Service") {
                        for port in manifest.object["spec"]["ports"]
                            .as_array()
                            .into_iter()
                            .flatten()
                        {
                            if let Some(node_port) = port["nodePort"]
                                .as_u64()
                                .and_then(|p| u16::try_from(p).ok())
                            {
                                facts.node_ports.push((
                                    node_port,
                                    format!(
                                        "Service/{} of {} ({}:{})",
                                        manifest.name, facts.key, manifest.file, manifest.line
                                    ),
                                ));
                            }
                        }
                    }
                }
            }
        }
        facts
    }

    /// Its key: `Kind/name`.
    pub(crate) fn key(&self) -> &ObjectRef {
        &self.key
    }

    /// What it waits for: `dependsOn`, and the Pipelines whose products it uses, each once.
    fn dependencies(&self) -> impl Iterator<Item = &ObjectRef> {
        let from = self
            .pipeline_uses
            .iter()
            .enumerate()
            .filter(|(index, used)| {
                !self.depends_on.contains(&used.pipeline)
                    && !self.pipeline_uses[..*index]
                        .iter()
                        .any(|earlier| earlier.pipeline == used.pipeline)
            })
            .map(|(_, used)| &used.pipeline);
        self.depends_on.iter().chain(from)
    }
}

/// Checks across descriptors. `declared` holds every `Kind/name` some document declares, valid or
/// not, so that a reference to an invalid descriptor is not also reported as missing.
pub(super) fn check_repo(
    descriptors: &[&RepoFacts],
    declared: &HashSet<(Kind, String)>,
) -> Vec<RepoProblem> {
    let mut found = Vec::new();
    let mut first: HashMap<&ObjectRef, usize> = HashMap::new();
    for (index, descriptor) in descriptors.iter().enumerate() {
        let key = &descriptor.key;
        match first.get(key) {
            Some(&earlier) => found.push(RepoProblem {
                at: index,
                pointer: "/metadata/name".into(),
                message: format!("duplicate {key}: also defined"),
                also: Some((earlier, "/metadata/name".into())),
            }),
            None => {
                first.insert(key, index);
            }
        }
    }
    let exists =
        |reference: &ObjectRef| declared.contains(&(reference.kind, reference.name.to_string()));
    for (index, descriptor) in descriptors.iter().enumerate() {
        for (position, reference) in descriptor.depends_on.iter().enumerate() {
            if !exists(reference) {
                found.push(RepoProblem {
                    at: index,
                    pointer: format!("/metadata/dependsOn/{position}"),
                    message: format!(
                        "metadata.dependsOn[{position}]: {reference} does not exist in the repo"
                    ),
                    also: None,
                });
            }
        }
        if descriptor.key.kind == Kind::Challenge {
            for used in &descriptor.pipeline_uses {
                let (reference, pointer) = (&used.pipeline, &used.pointer);
                let dotted = super::schema::dotted(pointer);
                if !exists(reference) {
                    found.push(RepoProblem {
                        at: index,
                        pointer: pointer.clone(),
                        message: format!("{dotted}: {reference} does not exist in the repo"),
                        also: None,
                    });
                } else if let Some(&pipeline) = first.get(reference)
                    && !descriptors[pipeline].produces
                {
                    found.push(RepoProblem {
                        at: index,
                        pointer: pointer.clone(),
                        message: format!(
                            "{dotted}: {reference} produces no image; set its spec.produces"
                        ),
                        also: None,
                    });
                }
            }
        }
    }
    found.extend(connections_to_instances(descriptors));
    found.extend(cycles(descriptors, &first));
    found.extend(host_port_clashes(descriptors));
    found.extend(shared_namespaces(descriptors));
    found
}

/// Two Stagings in one namespace: cleaning one up would delete the other.
fn shared_namespaces(descriptors: &[&RepoFacts]) -> Vec<RepoProblem> {
    let mut first: HashMap<&str, usize> = HashMap::new();
    let mut found = Vec::new();
    for (index, descriptor) in descriptors.iter().enumerate() {
        let Some(namespace) = descriptor.namespace.as_deref() else {
            continue;
        };
        if let Some(&earlier) = first.get(namespace) {
            found.push(RepoProblem {
                at: index,
                pointer: "/spec/namespace".into(),
                message: format!(
                    "spec.namespace: {namespace} is also the namespace of {}, and a staging owns its namespace; choose another",
                    descriptors[earlier].key
                ),
                also: Some((earlier, "/spec/namespace".into())),
            });
        } else {
            first.insert(namespace, index);
        }
    }
    found
}

/// `allowConnectTo` naming an instanced challenge: its instances are each a team's own, and no
/// other challenge reaches them.
fn connections_to_instances(descriptors: &[&RepoFacts]) -> Vec<RepoProblem> {
    let instanced: HashSet<&str> = descriptors
        .iter()
        .filter(|d| d.key.kind == Kind::Challenge && d.instanced)
        .map(|d| d.key.name.as_str())
        .collect();
    let mut found = Vec::new();
    for (index, descriptor) in descriptors.iter().enumerate() {
        for (position, target) in descriptor.allow_connect_to.iter().enumerate() {
            if target.kind == Kind::Challenge && instanced.contains(target.name.as_str()) {
                found.push(RepoProblem {
                    at: index,
                    pointer: format!("/spec/network/allowConnectTo/{position}"),
                    message: format!("spec.network.allowConnectTo[{position}]: {target} is instanced: each of its instances is one team's, and no other challenge reaches them; remove it"),
                    also: None,
                });
            }
        }
    }
    found
}

/// Dependency cycles, each reported once, at the edge that closes it.
fn cycles(descriptors: &[&RepoFacts], index_of: &HashMap<&ObjectRef, usize>) -> Vec<RepoProblem> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    struct Search<'a> {
        descriptors: &'a [&'a RepoFacts],
        index_of: &'a HashMap<&'a ObjectRef, usize>,
        marks: Vec<Mark>,
        path: Vec<usize>,
        found: Vec<RepoProblem>,
    }
    impl Search<'_> {
        fn visit(&mut self, node: usize) {
            self.marks[node] = Mark::OnPath;
            self.path.push(node);
            let descriptor = self.descriptors[node];
            for reference in descriptor.dependencies() {
                let Some(&next) = self.index_of.get(reference) else {
                    continue;
                };
                match self.marks[next] {
                    Mark::New => self.visit(next),
                    Mark::OnPath => {
                        let start = self.path.iter().position(|&n| n == next).expect("on path");
                        let mut names: Vec<String> = self.path[start..]
                            .iter()
                            .map(|&n| self.descriptors[n].key.to_string())
                            .collect();
                        names.push(reference.to_string());
                        let pointer =
                            match descriptor.depends_on.iter().position(|d| d == reference) {
                                Some(position) => format!("/metadata/dependsOn/{position}"),
                                None => descriptor
                                    .pipeline_uses
                                    .iter()
                                    .find(|used| &used.pipeline == reference)
                                    .map_or_else(String::new, |used| used.pointer.clone()),
                            };
                        self.found.push(RepoProblem {
                            at: node,
                            pointer,
                            message: format!(
                                "dependency cycle: {}; break one of these dependencies",
                                names.join(" → ")
                            ),
                            also: None,
                        });
                    }
                    Mark::Done => {}
                }
            }
            self.path.pop();
            self.marks[node] = Mark::Done;
        }
    }
    let mut search = Search {
        descriptors,
        index_of,
        marks: vec![Mark::New; descriptors.len()],
        path: Vec::new(),
        found: Vec::new(),
    };
    let mut order: Vec<usize> = (0..descriptors.len()).collect();
    order.sort_by_key(|&i| &descriptors[i].key);
    for node in order {
        if search.marks[node] == Mark::New {
            search.visit(node);
        }
    }
    search.found
}

fn host_port_clashes(descriptors: &[&RepoFacts]) -> Vec<RepoProblem> {
    let mut claimed: BTreeMap<(u16, &'static str), (usize, String)> = BTreeMap::new();
    let mut found = Vec::new();
    // NodePorts a staging's Services ask for, by number alone: the first to ask names it.
    let mut node_ports: BTreeMap<u16, &str> = BTreeMap::new();
    for descriptor in descriptors {
        for (port, service) in &descriptor.node_ports {
            node_ports.entry(*port).or_insert(service);
        }
    }
    for (index, descriptor) in descriptors.iter().enumerate() {
        for at in &descriptor.host_ports {
            let key = (at.port, at.protocol);
            if descriptor.on_kubernetes
                && let Some(service) = node_ports.get(&at.port)
            {
                found.push(RepoProblem {
                    at: index,
                    pointer: format!("{}/host", at.pointer()),
                    message: format!(
                        "{}.host: on kubernetes host port {}/{} is a NodePort, and {service} asks for it too; choose another",
                        at.dotted(),
                        at.port,
                        key.1
                    ),
                    also: None,
                });
                continue;
            }
            match claimed.get(&key) {
                Some((other, other_pointer)) => {
                    let whose = match *other == index {
                        true => "another container of this challenge".to_string(),
                        false => descriptors[*other].key.to_string(),
                    };
                    found.push(RepoProblem {
                        at: index,
                        pointer: format!("{}/host", at.pointer()),
                        message: format!(
                            "{}.host: host port {}/{} is also claimed by {whose}",
                            at.dotted(),
                            at.port,
                            key.1
                        ),
                        also: Some((*other, format!("{other_pointer}/host"))),
                    });
                }
                None => {
                    claimed.insert(key, (index, at.pointer()));
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #[test]
    fn clone_urls_people_write_are_taken_and_typos_are_not() {
        for url in [
            "https://git.example.org/ctf/app.git",
            "https://bot@git.example.org/ctf/app",
            "http://127.0.0.1:8080/x.git",
            "ssh://git@git.example.org:2222/ctf/app.git",
            "git+ssh://git@git.example.org/ctf/app.git",
            "git://127.0.0.1:9418/infra.git",
            "git@github.com:org/repo.git",
            "bot:secret@git.example.org:org/repo.git",
            "git@[::1]:r.git",
            "https://[::1]:8443/r.git",
            "file:///srv/x.git",
            "file://localhost/srv/x.git",
            "https://git.example.org./ctf/app",
            "https://g\u{ee}t.exemple.fr/ctf/app",
        ] {
            assert!(super::clone_url(url).is_ok(), "{url}");
        }
        for url in [
            "https://git.example.org ctf/app.git",
            "https:///ctf/app",
            "ftp://git.example.org/x",
            "file://other-host/srv/x",
            "git.example.org",
            "https://-bad.example.org/x",
            "https://git.example.org:99999/x",
            "",
        ] {
            assert!(super::clone_url(url).is_err(), "{url}");
        }
    }

    #[test]
    fn a_digest_is_a_tag_a_staging_may_pin() {
        assert!(super::is_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!super::is_digest("v1.2"));
        assert!(!super::is_digest("sha256:xyz"));
    }
}
