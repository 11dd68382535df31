//! The per-team instances API, for a CTF platform's backend with the API token: spawn, list,
//! renew, kill and check a flag. Every answer is JSON, errors too (`{"error": "…"}`), so a
//! platform can show them to its players as they are.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{App, authorized, json};
use crate::instances::Instances;
use crate::instances::manager::{InstanceError, RETRY_AFTER_FULL};

/// The instance manager, for a client with the API token: an extractor, so each handler starts
/// authorized.
pub(super) struct InstancesApi(Instances);

impl axum::extract::FromRequestParts<App> for InstancesApi {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &App,
    ) -> Result<InstancesApi, Response> {
        let state = &app.server;
        authorized(state, &parts.headers).map_err(|refusal| *refusal)?;
        state.instances.clone().map(InstancesApi).ok_or_else(|| {
            failure(
                StatusCode::NOT_FOUND,
                "this agent serves no instances".into(),
            )
        })
    }
}

fn failure(status: StatusCode, message: String) -> Response {
    json(status, &serde_json::json!({ "error": message }))
}

/// The answer for an instance error: its status code, and the error as JSON.
fn refused(error: InstanceError) -> Response {
    let message = error.to_string();
    match error {
        InstanceError::NotInstanced(_) | InstanceError::NotFound(_) | InstanceError::NoFlag(_) => {
            failure(StatusCode::NOT_FOUND, message)
        }
        InstanceError::BadTeam(_) => failure(StatusCode::BAD_REQUEST, message),
        InstanceError::Stopped(_) | InstanceError::AtMaxLifetime(_) => {
            failure(StatusCode::CONFLICT, message)
        }
        InstanceError::TeamAtLimit(mine) => json(
            StatusCode::CONFLICT,
            &serde_json::json!({ "error": message, "instances": mine }),
        ),
        InstanceError::Full { .. } | InstanceError::NoPorts => {
            let mut response = failure(StatusCode::SERVICE_UNAVAILABLE, message);
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(RETRY_AFTER_FULL),
            );
            response
        }
        InstanceError::NotReady(_) => {
            let mut response = failure(StatusCode::SERVICE_UNAVAILABLE, message);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(5u64));
            response
        }
        InstanceError::Engine(_) => failure(StatusCode::BAD_GATEWAY, message),
        InstanceError::Store(error) => {
            // Where the store is, and SQLite's words, are for the operator's log only.
            tracing::error!(%error, "the instance store failed");
            failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the agent's instance store failed; its log says why".into(),
            )
        }
    }
}

/// A JSON body of type `T`, or the answer saying why it is not one.
fn body<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(bytes).map_err(|error| {
        Box::new(failure(
            StatusCode::BAD_REQUEST,
            format!("the body is not what this call takes: {error}"),
        ))
    })
}

/// A team as platforms send it: a name, or a number (CTFd's team ids are).
#[derive(Deserialize)]
#[serde(untagged)]
enum TeamField {
    Name(String),
    Number(i64),
}

impl TeamField {
    fn text(&self) -> String {
        match self {
            TeamField::Name(name) => name.clone(),
            TeamField::Number(number) => number.to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnRequest {
    team: TeamField,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlagRequest {
    team: TeamField,
    flag: String,
}

/// Largest body a spawn or a flag check takes.
const MAX_BODY: usize = 16 * 1024;

/// `POST /api/v1/challenges/{name}/instances` with `{"team": "…"}`: 201 and the instance. The
/// body must arrive within `http.bodyTimeout`; the answer comes when the instance runs, however
/// long it waits its turn.
pub(super) async fn spawn(
    State(app): State<App>,
    InstancesApi(instances): InstancesApi,
    Path(challenge): Path<String>,
    request: axum::extract::Request,
) -> Response {
    let read = axum::body::to_bytes(request.into_body(), MAX_BODY);
    let bytes = match tokio::time::timeout(app.body_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over {MAX_BODY} bytes, or broke off"),
            );
        }
        Err(_) => {
            return failure(
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive in time".into(),
            );
        }
    };
    let request: SpawnRequest = match body(&bytes) {
        Ok(request) => request,
        Err(answer) => return *answer,
    };
    match instances.spawn(&challenge, &request.team.text()).await {
        Ok(view) => json(StatusCode::CREATED, &view),
        Err(error) => refused(error),
    }
}

/// `GET /api/v1/instances?challenge=NAME&team=TEAM`.
pub(super) async fn list(
    InstancesApi(instances): InstancesApi,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let challenge = query.get("challenge").map(String::as_str);
    let team = query.get("team").map(String::as_str);
    match instances.list(challenge, team) {
        Ok(views) => json(StatusCode::OK, &views),
        Err(error) => refused(error),
    }
}

/// `GET /api/v1/instances/{id}`.
pub(super) async fn get(InstancesApi(instances): InstancesApi, Path(id): Path<String>) -> Response {
    match instances.get(&id) {
        Ok(view) => json(StatusCode::OK, &view),
        Err(error) => refused(error),
    }
}

/// `POST /api/v1/instances/{id}/renew`.
pub(super) async fn renew(
    InstancesApi(instances): InstancesApi,
    Path(id): Path<String>,
) -> Response {
    match instances.renew(&id) {
        Ok(view) => json(StatusCode::OK, &view),
        Err(error) => refused(error),
    }
}

/// `DELETE /api/v1/instances/{id}`: 204.
pub(super) async fn kill(
    InstancesApi(instances): InstancesApi,
    Path(id): Path<String>,
) -> Response {
    match instances.kill(&id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => refused(error),
    }
}

/// `POST /api/v1/challenges/{name}/flags/check` with `{"team": "…", "flag": "…"}`:
/// `{"correct": bool}`, with `"sharedFrom": TEAM` when it is another team's flag.
pub(super) async fn check_flag(
    InstancesApi(instances): InstancesApi,
    Path(challenge): Path<String>,
    bytes: axum::body::Bytes,
) -> Response {
    let request: FlagRequest = match body(&bytes) {
        Ok(request) => request,
        Err(answer) => return *answer,
    };
    match instances.check_flag(&challenge, &request.team.text(), &request.flag) {
        Ok(check) => json(StatusCode::OK, &check),
        Err(error) => refused(error),
    }
}
