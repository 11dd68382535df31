//! The agent's HTTP server (axum): webhooks, health, metrics and the status API.
//!
//! Only `/healthz` and `/readyz` answer without authentication. Webhooks are checked with the
//! shared secret ([`crate::webhook`]); everything else needs the API bearer token. Tokens are
//! compared in constant time, bodies are size-limited, and a good push answers 202 at once: the
//! pass runs in the agent's loop, never in the request.

use std::sync::{Arc, RwLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use subtle::ConstantTimeEq;

use crate::config::Secret;
use crate::metrics::Metrics;
use crate::status::StatusSet;
use crate::triggers::{Trigger, TriggerSender};
use crate::webhook::{self, Delivery, Provider};

/// Whether the agent can do its job, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The repo is not cloned yet.
    Starting,
    /// The last pass did not fail on a transient error.
    Ready,
    /// The last pass failed on a transient error (git server or engine down): why.
    Degraded(String),
}

/// What the agent shares with the server: the status as of the last pass, and readiness.
#[derive(Debug)]
pub struct Shared {
    /// Status as of the last pass.
    pub status: RwLock<Arc<StatusSet>>,
    /// Readiness.
    pub readiness: RwLock<Readiness>,
}

/// Everything handlers need.
#[derive(Debug, Clone)]
pub struct ServerState {
    /// Where passes are asked for.
    pub triggers: TriggerSender,
    /// The metrics.
    pub metrics: Metrics,
    /// Status and readiness.
    pub shared: Arc<Shared>,
    /// The webhook secret; webhooks are refused without one.
    pub webhook_secret: Option<Secret>,
    /// The API token; the API is refused without one.
    pub api_token: Option<Secret>,
    /// The followed branch; pushes to others are ignored.
    pub branch: String,
}

/// The routes, with webhook bodies limited to `max_body` bytes.
pub fn router(state: ServerState, max_body: usize) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/reconcile", post(reconcile))
        .route("/hooks/{provider}", post(hook))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<ServerState>) -> Response {
    let readiness = state.shared.readiness.read().expect("lock").clone();
    match readiness {
        Readiness::Ready => (StatusCode::OK, "ready\n").into_response(),
        Readiness::Starting => (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: the repo is not cloned yet\n",
        )
            .into_response(),
        Readiness::Degraded(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// Checks `Authorization: Bearer TOKEN` in constant time.
fn authorized(state: &ServerState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &state.api_token else {
        return Err(Box::new(
            (
                StatusCode::UNAUTHORIZED,
                "the API is off: set api.tokenFile in the agent config\n",
            )
                .into_response(),
        ));
    };
    let sent = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(sent.as_bytes().ct_eq(token.expose().as_bytes())) {
        Ok(())
    } else {
        Err(Box::new(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong bearer token\n",
            )
                .into_response(),
        ))
    }
}

async fn metrics(State(state): State<ServerState>, headers: HeaderMap) -> Response {
    if let Err(refusal) = authorized(&state, &headers) {
        return *refusal;
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn status(State(state): State<ServerState>, headers: HeaderMap) -> Response {
    if let Err(refusal) = authorized(&state, &headers) {
        return *refusal;
    }
    let status = Arc::clone(&state.shared.status.read().expect("lock"));
    let body = status_json(&status);
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Status as the API and `berth status --format json` show it.
pub fn status_json(status: &StatusSet) -> String {
    let objects: Vec<_> = status.objects.values().collect();
    let value = serde_json::json!({ "agent": status.agent, "objects": objects });
    serde_json::to_string_pretty(&value).expect("status serializes") + "\n"
}

async fn reconcile(State(state): State<ServerState>, headers: HeaderMap) -> Response {
    if let Err(refusal) = authorized(&state, &headers) {
        return *refusal;
    }
    state.triggers.send(Trigger::Api);
    (StatusCode::ACCEPTED, "reconcile queued\n").into_response()
}

async fn hook(
    State(state): State<ServerState>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(provider) = Provider::from_name(&provider) else {
        return (
            StatusCode::NOT_FOUND,
            "unknown provider; use github, gitlab, gitea or generic\n",
        )
            .into_response();
    };
    let name = provider.as_str();
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let code = rejection.status();
            let result = if code == StatusCode::PAYLOAD_TOO_LARGE {
                "too_large"
            } else {
                "bad_request"
            };
            state.metrics.webhook(name, result);
            return (code, format!("{}\n", rejection.body_text())).into_response();
        }
    };
    let Some(secret) = &state.webhook_secret else {
        state.metrics.webhook(name, "unauthorized");
        return (
            StatusCode::UNAUTHORIZED,
            "webhooks are off: set webhook.secretFile in the agent config\n",
        )
            .into_response();
    };
    if let Err(refusal) = webhook::verify(provider, &headers, &body, secret.expose().as_bytes()) {
        tracing::warn!(provider = name, %refusal, "webhook refused");
        state.metrics.webhook(name, "unauthorized");
        return (StatusCode::UNAUTHORIZED, format!("{refusal}\n")).into_response();
    }
    match webhook::parse(provider, &headers, &body) {
        Err(why) => {
            state.metrics.webhook(name, "bad_request");
            (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response()
        }
        Ok(Delivery::Ignored(why)) => {
            state.metrics.webhook(name, "ignored");
            (StatusCode::OK, format!("ignored: {why}\n")).into_response()
        }
        Ok(Delivery::Push(push)) if push.branch != state.branch => {
            state.metrics.webhook(name, "ignored");
            let message = format!(
                "ignored: push to {}, berth follows {}\n",
                push.branch, state.branch
            );
            (StatusCode::OK, message).into_response()
        }
        Ok(Delivery::Push(push)) => {
            tracing::info!(provider = name, commit = ?push.commit, pusher = ?push.pusher, "webhook: push");
            state.metrics.webhook(name, "accepted");
            state.triggers.send(Trigger::Webhook {
                provider: name,
                commit: push.commit,
            });
            (StatusCode::ACCEPTED, "pass queued\n").into_response()
        }
    }
}
