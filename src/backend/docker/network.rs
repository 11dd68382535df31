//! The walls on the Docker Engine: which network each container berth makes is put on.

use std::collections::HashMap;

use bollard::models::NetworkCreateRequest;
use bollard::query_parameters::{InspectContainerOptions, ListNetworksOptions};

use super::{Attempt, DockerBackend, is_status, remove_container};
use crate::backend::{LABEL_INSTANCE, LABEL_NAME};
use crate::descriptor::{Kind, ObjectRef};

impl DockerBackend {
    pub(super) async fn networks(&self, key: &ObjectRef) -> Attempt<Vec<bollard::models::Network>> {
        let name = self.network_name(key);
        let filters = HashMap::from([
            ("name".to_string(), vec![name.clone()]),
            (
                "label".to_string(),
                self.ownership
                    .selector(Kind::Challenge, Some(key.name.as_str())),
            ),
        ]);
        let mut networks = self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(|e| self.trouble("cannot list networks", e))?;
        // The engine's name filter matches substrings.
        networks.retain(|n| n.name.as_deref() == Some(name.as_str()));
        networks.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
        Ok(networks)
    }

    /// The challenge's network, by id. The engine accepts two networks of one name (two applies
    /// racing before the lock existed); the oldest is kept, and the others are removed along with
    /// the containers on them, which this pass then makes again on the kept one.
    pub(super) async fn ensure_network(&self, key: &ObjectRef) -> Attempt<String> {
        let name = self.network_name(key);
        let mut networks = self.networks(key).await?;
        if networks.is_empty() {
            let request = NetworkCreateRequest {
                name: name.clone(),
                labels: Some(self.ownership.labels(key, "")),
                ..Default::default()
            };
            let created = self
                .docker
                .create_network(request)
                .await
                .map_err(|e| self.trouble(&format!("cannot create network {name}"), e))?;
            return Ok(created.id);
        }
        let keep = networks.remove(0);
        for duplicate in networks {
            let id = duplicate.id.unwrap_or_default();
            tracing::warn!(network = %name, %id, "removing a duplicate network");
            let attached = self
                .docker
                .inspect_network(
                    &id,
                    None::<bollard::query_parameters::InspectNetworkOptions>,
                )
                .await
                .ok()
                .and_then(|n| n.containers)
                .unwrap_or_default();
            for container in attached.keys() {
                // Only this challenge's own containers are removed (made again on the kept
                // network); anything else someone attached is disconnected and left alone.
                let owned = self
                    .docker
                    .inspect_container(container, None::<InspectContainerOptions>)
                    .await
                    .ok()
                    .and_then(|c| c.config)
                    .and_then(|c| c.labels)
                    .is_some_and(|labels| {
                        labels.get(LABEL_INSTANCE).map(String::as_str) == Some(self.instance())
                            && labels.get(LABEL_NAME).map(String::as_str) == Some(key.name.as_str())
                    });
                let result = match owned {
                    true => remove_container(&self.docker, container).await,
                    false => {
                        let request = bollard::models::NetworkDisconnectRequest {
                            container: container.clone(),
                            force: Some(true),
                        };
                        self.docker.disconnect_network(&id, request).await
                    }
                };
                result.map_err(|e| self.trouble("cannot clear a duplicate network", e))?;
            }
            match self.docker.remove_network(&id).await {
                Err(error) if !is_status(&error, 404) => {
                    return Err(self.trouble("cannot remove a duplicate network", error));
                }
                _ => {}
            }
        }
        Ok(keep.id.unwrap_or(name))
    }
}
