//! The agent's HTTP server: webhooks, health, metrics and the status API, and the limits that keep
//! clients from taking the agent's memory or file descriptors.
//!
//! Only `/healthz` and `/readyz` answer without authentication. Webhooks are checked with the
//! shared secret ([`crate::webhook`]); everything else needs the API bearer token. Tokens are
//! compared in constant time, and a good push answers 202 at once: the pass runs in the agent's
//! loop, never in the request.
//!
//! Every client is held to [`Limits`]: a bounded number of open connections, headers and bodies
//! within their timeouts, and a bounded number of webhook bodies in memory. Whatever the headers
//! can refuse (a missing or malformed signature, a body declared too large) is refused before the
//! body is read. Answers to unauthenticated clients are small enough to fit the socket's buffer, so
//! a client that never reads cannot hold a connection either.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{FromRef, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

mod instances;

use crate::config::{AgentConfig, Secret};
use crate::live::{Readiness, Shared};
use crate::metrics::Metrics;
use crate::queue::store::Enqueued;
use crate::queue::workers::{ManualError, Pipelines};
use crate::run_http::{no_run, run_log, store_failed};
use crate::status::StatusSet;
use crate::triggers::{Trigger, TriggerSender};
use crate::webhook::{self, Delivery, Provider, Refusal, SignatureCheck};
use crate::write_deadline::WriteDeadline;

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
    /// The pipeline runs; pushes to their sources queue runs.
    pub pipelines: Option<Pipelines>,
    /// Per-team instances.
    pub instances: Option<crate::instances::Instances>,
    /// The config repo's URL: a push that names another repository is not for it.
    pub repo_url: String,
    /// Delivery ids of the webhooks taken lately: a redelivery queues nothing again.
    pub deliveries: Arc<std::sync::Mutex<webhook::RecentDeliveries>>,
    /// The web console's sessions and settings.
    pub console: crate::console::Console,
}

/// What the server allows its clients, so that a flood of slow or hostile ones cannot take the
/// agent's memory or file descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once; further clients wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Longest wait for a request's headers, and for the next request on an idle connection.
    pub header_timeout: Duration,
    /// Longest time to receive a request's body and answer it.
    pub body_timeout: Duration,
    /// Largest webhook body, in bytes.
    pub max_body: usize,
    /// Most webhook bodies read at once.
    pub max_concurrent_hooks: usize,
}

/// Largest read buffer of a connection, which is also the most a request's headers may take
/// (more gets 431). hyper's default, 400 KiB, let 256 clients that never end their headers hold
/// 100 MiB; webhooks' headers take a few KiB.
const READ_BUFFER: usize = 16 * 1024;

/// The open-file limit assumed where `/proc/self/limits` cannot be read: systemd's default.
const ASSUMED_FILE_LIMIT: u64 = 1024;

impl Limits {
    /// The limits `config` asks for, with connections capped at half the process's open-file limit.
    pub fn new(config: &AgentConfig) -> Limits {
        let file_limit = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| open_file_limit(&limits))
            .unwrap_or(ASSUMED_FILE_LIMIT);
        let asked = config.http.max_connections;
        let max_connections = connection_cap(asked, file_limit);
        if max_connections < asked {
            tracing::warn!(
                asked,
                file_limit,
                max_connections,
                "http.maxConnections lowered to half the open-file limit, so git and the engine keep the other half"
            );
        }
        // Without a webhook secret, deliveries are refused before their body is read.
        let (max_body, max_concurrent_hooks) = config
            .webhook
            .as_ref()
            .map_or((0, 1), |w| (w.max_body, w.max_concurrent));
        Limits {
            max_connections,
            header_timeout: config.http.header_timeout.0,
            body_timeout: config.http.body_timeout.0,
            max_body,
            max_concurrent_hooks,
        }
    }
}

/// The soft `Max open files` limit from the text of `/proc/self/limits`; `u64::MAX` when unlimited.
fn open_file_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    match soft {
        "unlimited" => Some(u64::MAX),
        number => number.parse().ok(),
    }
}

/// At most `asked` connections, and at most half of `file_limit`: the other half is for libgit2's
/// pack files, the engine's sockets, the log and the state folder's lock.
fn connection_cap(asked: usize, file_limit: u64) -> usize {
    let half = usize::try_from(file_limit / 2).unwrap_or(usize::MAX);
    // `Semaphore::acquire_many` counts in u32.
    asked.min(half).clamp(1, u32::MAX as usize)
}

/// Handlers' state: what the agent shares, and the webhook slots.
#[derive(Clone)]
struct App {
    server: ServerState,
    hooks: HookLimits,
    /// Longest time to receive a request's body (`http.bodyTimeout`).
    body_timeout: Duration,
}

impl FromRef<App> for ServerState {
    fn from_ref(app: &App) -> ServerState {
        app.server.clone()
    }
}

/// How many webhook bodies may be in memory at once, and how large each may be.
#[derive(Clone)]
struct HookLimits {
    in_flight: Arc<Semaphore>,
    max_body: usize,
}

/// The health listener's limits: a few slots, and one second for a probe to ask and be answered.
pub const HEALTH_LIMITS: Limits = Limits {
    max_connections: 16,
    header_timeout: Duration::from_secs(1),
    body_timeout: Duration::from_secs(1),
    max_body: 0,
    max_concurrent_hooks: 1,
};

/// Only `/healthz` and `/readyz`, for [`crate::config::HttpConfig::health_listen`]: a listener
/// of their own, so a flood of clients on the main one never makes a kubelet restart the agent.
pub fn health_router(state: ServerState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The routes, with every request held to `limits`.
pub fn router(state: ServerState, limits: &Limits) -> Router {
    let app = App {
        server: state,
        hooks: HookLimits {
            in_flight: Arc::new(Semaphore::new(limits.max_concurrent_hooks)),
            max_body: limits.max_body,
        },
        body_timeout: limits.body_timeout,
    };
    let body_timeout = limits.body_timeout;
    let changing = Router::new()
        .route("/api/v1/reconcile", post(reconcile))
        .route("/api/v1/runs/{id}/cancel", post(cancel_run))
        .route("/api/v1/pipelines/{name}/runs", post(start_run))
        .route("/hooks/{provider}", post(hook))
        // Only the leader serves instances, reads included: its store holds them.
        .route(
            "/api/v1/challenges/{name}/flags/check",
            post(instances::check_flag),
        )
        .route("/api/v1/instances", get(instances::list))
        .route(
            "/api/v1/instances/{id}",
            get(instances::get).delete(instances::kill),
        )
        .route("/api/v1/instances/{id}/renew", post(instances::renew))
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            refused_on_standby,
        ));
    // A spawn may wait its turn for the engine longer than a body timeout: its body is held to
    // the timeout as it is read, and the answer comes when the instance runs.
    let spawning: Router = Router::new()
        .route(
            "/api/v1/challenges/{name}/instances",
            post(instances::spawn),
        )
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            refused_on_standby,
        ))
        .with_state(app.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/runs", get(runs))
        .route("/api/v1/runs/{id}", get(run))
        .route("/api/v1/runs/{id}/logs", get(run_logs))
        .merge(changing)
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            answer_within(body_timeout, request, next)
        }))
        .with_state(app.clone())
        .merge(spawning)
        .merge(
            // The console's forms are small, and held to the same body timeout as the API.
            crate::console::router(crate::console::ConsoleState {
                console: app.server.console.clone(),
                shared: app.server.shared.clone(),
                pipelines: app.server.pipelines.clone(),
                instances: app.server.instances.clone(),
            })
            .layer(axum::extract::DefaultBodyLimit::max(
                crate::console::MAX_FORM,
            ))
            .layer(middleware::from_fn(move |request: Request, next: Next| {
                answer_within(body_timeout, request, next)
            })),
        )
}

/// Serves `app` on `listener` until `shutdown` resolves, holding clients to `limits`; then stops
/// accepting, lets each connection finish the request in progress, and returns.
///
/// axum's own `serve` sets no header-read timeout and no connection cap, so connections are served
/// here with hyper directly.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (closing, closing_seen) = watch::channel(false);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(READ_BUFFER);
    let mut shutdown = pin!(shutdown);
    tracing::debug!(?limits, "serving HTTP");
    loop {
        // A free slot comes before `accept`: while the server is full, new clients wait in the
        // kernel's queue and cost the agent no descriptor and no memory.
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors (EMFILE) or a client gone before it was accepted; give
                    // the rest of the process a moment rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection = http.serve_connection(
            // A client that stops reading a response (a followed log, a large one) is cut off
            // once a write has waited a body timeout.
            TokioIo::new(WriteDeadline::new(stream, limits.body_timeout)),
            TowerToHyperService::new(app.clone()),
        );
        let mut closing_seen = closing_seen.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut connection = pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "HTTP connection ended");
                    }
                    return;
                }
                _ = closing_seen.wait_for(|closing| *closing) => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    drop(listener);
    let _ = closing.send(true);
    // Each connection ends within a header timeout (idle) or a body timeout (a request in
    // progress); all slots free means all connections ended.
    let all = u32::try_from(limits.max_connections).expect("capped at u32::MAX");
    let grace = limits.header_timeout + limits.body_timeout;
    if tokio::time::timeout(grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open at shutdown were dropped");
    }
}

/// Answers 408 when a request's body has not arrived and been answered within `limit`, so a
/// client that trickles its body holds its connection and webhook slot no longer than that.
async fn answer_within(limit: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!("a request's body did not arrive within http.bodyTimeout; answered 408");
            (
                StatusCode::REQUEST_TIMEOUT,
                [(header::CONNECTION, "close")],
                "the request's body did not arrive in time\n",
            )
                .into_response()
        }
    }
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
        Readiness::Standby(identity) => standby(&identity),
    }
}

fn standby(identity: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("standby: another agent leads ({identity} waits for the Lease)\n"),
    )
        .into_response()
}

/// A standby changes nothing: webhooks, reconciles and runs go to the leader.
async fn refused_on_standby(State(app): State<App>, request: Request, next: Next) -> Response {
    let readiness = app.server.shared.readiness.read().expect("lock").clone();
    match readiness {
        Readiness::Standby(identity) => standby(&identity),
        _ => next.run(request).await,
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
        .and_then(bearer_token)
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

/// The token of an `Authorization` header's value when its scheme is Bearer. The scheme is
/// case-insensitive (RFC 7235, section 2.1), and any run of spaces or tabs may surround the token.
fn bearer_token(value: &str) -> Option<&str> {
    let blank = [' ', '\t'];
    let (scheme, token) = value.trim_matches(blank).split_once(blank)?;
    let token = token.trim_matches(blank);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
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
    let mut body = status_value(&status);
    if let Some(why) = state.shared.status_push.read().expect("lock").clone() {
        // The status above is what runs; only the copy in the config repo lags behind.
        body["statusPush"] = serde_json::json!({ "failing": true, "error": why });
    }
    let body = serde_json::to_string_pretty(&body).expect("status serializes") + "\n";
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Status as the API and `berth status --format json` show it.
pub fn status_json(status: &StatusSet) -> String {
    serde_json::to_string_pretty(&status_value(status)).expect("status serializes") + "\n"
}

fn status_value(status: &StatusSet) -> serde_json::Value {
    let objects: Vec<_> = status.objects.values().collect();
    serde_json::json!({ "agent": status.agent, "objects": objects })
}

async fn reconcile(State(state): State<ServerState>, headers: HeaderMap) -> Response {
    if let Err(refusal) = authorized(&state, &headers) {
        return *refusal;
    }
    state.triggers.send(Trigger::Api);
    (StatusCode::ACCEPTED, "reconcile queued\n").into_response()
}

async fn hook(State(app): State<App>, Path(provider): Path<String>, request: Request) -> Response {
    let Some(provider) = Provider::from_name(&provider) else {
        return (
            StatusCode::NOT_FOUND,
            "unknown provider; use github, gitlab, gitea or generic\n",
        )
            .into_response();
    };
    let (state, limits) = (&app.server, &app.hooks);
    let name = provider.as_str();
    let answer = |result: &'static str, response: Response| {
        state.metrics.webhook(name, result);
        response
    };
    let refused = |refusal: Refusal| {
        tracing::warn!(provider = name, %refusal, "webhook refused");
        answer(
            "unauthorized",
            (StatusCode::UNAUTHORIZED, format!("{refusal}\n")).into_response(),
        )
    };
    let too_large = || {
        answer(
            "too_large",
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body is over webhook.maxBody ({} bytes)\n",
                    limits.max_body
                ),
            )
                .into_response(),
        )
    };
    let Some(secret) = &state.webhook_secret else {
        return answer(
            "unauthorized",
            (
                StatusCode::UNAUTHORIZED,
                "webhooks are off: set webhook.secretFile in the agent config\n",
            )
                .into_response(),
        );
    };
    // Whatever the headers can refuse is refused before the body is read, so unsigned or
    // oversized deliveries cost no memory however many arrive.
    let (parts, body) = request.into_parts();
    let declared = body.size_hint().exact();
    if declared.is_some_and(|length| length > limits.max_body as u64) {
        return too_large();
    }
    let mut check =
        match SignatureCheck::start(provider, &parts.headers, secret.expose().as_bytes()) {
            Ok(check) => check,
            Err(refusal) => return refused(refusal),
        };
    // At most `max_concurrent_hooks` bodies of at most `max_body` bytes are in memory at once.
    let Ok(_slot) = limits.in_flight.try_acquire() else {
        tracing::warn!(
            provider = name,
            "webhook refused: webhook.maxConcurrent deliveries are being read"
        );
        return answer(
            "busy",
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                "too many webhook deliveries at once; retry later\n",
            )
                .into_response(),
        );
    };
    let body = match read_body(body, declared, limits.max_body, &mut check).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => return too_large(),
        Err(BodyError::Broken(why)) => {
            return answer(
                "bad_request",
                (
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body: {why}\n"),
                )
                    .into_response(),
            );
        }
    };
    if let Err(refusal) = check.finish() {
        return refused(refusal);
    }
    match webhook::parse(provider, &parts.headers, &body) {
        Err(why) => answer(
            "bad_request",
            (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response(),
        ),
        Ok(Delivery::Ignored(why)) => answer(
            "ignored",
            (StatusCode::OK, format!("ignored: {why}\n")).into_response(),
        ),
        Ok(Delivery::Push(push))
            if push
                .commit
                .as_deref()
                .is_some_and(|c| !crate::git_url::valid_revision(c)) =>
        {
            answer(
                "bad_request",
                (
                    StatusCode::BAD_REQUEST,
                    "the pushed commit is not a commit id (letters, digits and -_./+@ only)\n",
                )
                    .into_response(),
            )
        }
        Ok(Delivery::Push(push))
            if push
                .delivery
                .as_deref()
                .is_some_and(|id| !state.deliveries.lock().expect("lock").first_time(id)) =>
        {
            answer(
                "duplicate",
                (
                    StatusCode::OK,
                    "duplicate: this delivery was taken before; nothing queued\n",
                )
                    .into_response(),
            )
        }
        Ok(Delivery::Push(push)) => {
            let runs = state
                .pipelines
                .as_ref()
                .map(|p| p.on_push(&push))
                .unwrap_or_default();
            // A payload that names no repository (a generic webhook) is taken as the config repo's.
            let for_config = push.branch == state.branch
                && (push.repository_urls.is_empty()
                    || push
                        .repository_urls
                        .iter()
                        .any(|url| crate::git_url::same_repository(url, &state.repo_url)));
            if !for_config && runs.is_empty() {
                let message = format!(
                    "ignored: push to {}; berth follows {} of its config repo, and no pipeline builds this push\n",
                    push.branch, state.branch
                );
                return answer("ignored", (StatusCode::OK, message).into_response());
            }
            // Taken: a redelivery of it queues nothing again. (One that queued nothing, its runs
            // refused as the queue was full, may come again.)
            let taken = for_config
                || runs
                    .iter()
                    .any(|(_, enqueued)| matches!(enqueued, Enqueued::Queued { .. }));
            // Recorded when checked (so two copies arriving at once are one), and forgotten again
            // when nothing was taken.
            if let (false, Some(id)) = (taken, push.delivery.as_deref()) {
                state.deliveries.lock().expect("lock").forget(id);
            }
            let mut message = String::new();
            if for_config {
                tracing::info!(provider = name, commit = ?push.commit, pusher = ?push.pusher, "webhook: push");
                state.triggers.send(Trigger::Webhook {
                    commit: push.commit,
                });
                message.push_str("pass queued\n");
            }
            for (pipeline, enqueued) in runs {
                message.push_str(&match enqueued {
                    Enqueued::Queued { id, .. } => {
                        format!("run {id} queued for Pipeline/{pipeline}\n")
                    }
                    Enqueued::Duplicate(id) => {
                        format!("Pipeline/{pipeline}: a duplicate of run {id}; not queued\n")
                    }
                    Enqueued::Full => {
                        format!("Pipeline/{pipeline}: not queued, as many runs wait as it may\n")
                    }
                });
            }
            answer("accepted", (StatusCode::ACCEPTED, message).into_response())
        }
    }
}

/// The run queue, for a client with the API token: an extractor, so each runs handler starts
/// authorized.
struct RunsApi(Pipelines);

impl axum::extract::FromRequestParts<App> for RunsApi {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &App,
    ) -> Result<RunsApi, Response> {
        let state = &app.server;
        authorized(state, &parts.headers).map_err(|refusal| *refusal)?;
        state.pipelines.clone().map(RunsApi).ok_or_else(|| {
            (StatusCode::NOT_FOUND, "this agent runs no pipelines\n").into_response()
        })
    }
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response {
    let body = serde_json::to_string_pretty(value).expect("runs serialize") + "\n";
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `GET /api/v1/runs?pipeline=NAME&limit=N`: the newest runs, newest first.
async fn runs(
    RunsApi(pipelines): RunsApi,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let limit = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(50usize)
        .min(1000);
    match pipelines
        .store()
        .list(query.get("pipeline").map(String::as_str), limit)
    {
        Ok(runs) => json(StatusCode::OK, &runs),
        Err(error) => store_failed(error),
    }
}

/// `GET /api/v1/runs/{id}`.
async fn run(RunsApi(pipelines): RunsApi, Path(id): Path<i64>) -> Response {
    match pipelines.store().get(id) {
        Ok(Some(run)) => json(StatusCode::OK, &run),
        Ok(None) => no_run(id),
        Err(error) => store_failed(error),
    }
}

/// `GET /api/v1/runs/{id}/logs`: the log; while the run runs, followed until it ends (unless
/// `follow=false`).
async fn run_logs(
    RunsApi(pipelines): RunsApi,
    Path(id): Path<i64>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let follow = query.get("follow").is_none_or(|f| f != "false");
    run_log(&pipelines, id, follow)
}

/// `POST /api/v1/runs/{id}/cancel`.
async fn cancel_run(RunsApi(pipelines): RunsApi, Path(id): Path<i64>) -> Response {
    match pipelines.cancel(id) {
        Ok(None) => no_run(id),
        Ok(Some(before)) if before.is_final() => (
            StatusCode::CONFLICT,
            format!("run {id} already ended: {}\n", before.as_str()),
        )
            .into_response(),
        Ok(Some(_)) => (StatusCode::ACCEPTED, format!("run {id} cancelled\n")).into_response(),
        Err(error) => store_failed(error),
    }
}

/// `POST /api/v1/pipelines/{name}/runs`, with an optional JSON body `{"commit": "…"}` (a commit,
/// branch or tag of the source).
async fn start_run(
    RunsApi(pipelines): RunsApi,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let commit = match body.iter().all(u8::is_ascii_whitespace) {
        true => None,
        false => match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(value) => match value.get("commit") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(commit)) => Some(commit.clone()),
                Some(_) => {
                    return (
                        StatusCode::BAD_REQUEST,
                        "commit: give a commit, branch or tag as a string\n",
                    )
                        .into_response();
                }
            },
            Err(error) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("the body is not JSON: {error}\n"),
                )
                    .into_response();
            }
        },
    };
    match pipelines.manual(&name, commit) {
        Ok(id) => json(StatusCode::CREATED, &serde_json::json!({ "id": id })),
        Err(ManualError::Undeclared(_)) => (
            StatusCode::NOT_FOUND,
            format!("no Pipeline {name} in the applied revision\n"),
        )
            .into_response(),
        Err(refusal @ ManualError::BadRevision) => {
            (StatusCode::BAD_REQUEST, format!("{refusal}\n")).into_response()
        }
        Err(refusal @ ManualError::Full(_)) => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "60")],
            format!("{refusal}\n"),
        )
            .into_response(),
        Err(error) => store_failed(error),
    }
}

/// Why a webhook body could not be read whole.
enum BodyError {
    /// Over `webhook.maxBody`.
    TooLarge,
    /// The connection broke or the framing was wrong.
    Broken(String),
}

/// Reads a webhook body of at most `max_body` bytes, feeding each piece to `check` as it arrives.
async fn read_body(
    body: Body,
    declared: Option<u64>,
    max_body: usize,
    check: &mut SignatureCheck,
) -> Result<Vec<u8>, BodyError> {
    // One allocation of the declared size: growing by doubling leaves the allocator holes of every
    // size, which outlive the request.
    let expected = declared.map_or(0, |length| usize::try_from(length).unwrap_or(max_body));
    let mut read = Vec::with_capacity(expected.min(max_body));
    let mut pieces = body.into_data_stream();
    while let Some(piece) = pieces.next().await {
        let piece = piece.map_err(|error| BodyError::Broken(error.to_string()))?;
        if read.len() + piece.len() > max_body {
            return Err(BodyError::TooLarge);
        }
        check.update(&piece);
        read.extend_from_slice(&piece);
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_spaces_around_the_token_are_ignored() {
        for value in [
            "Bearer t0k",
            "bearer t0k",
            "BEARER t0k",
            "  Bearer   t0k  ",
            "Bearer\tt0k",
        ] {
            assert_eq!(bearer_token(value), Some("t0k"), "{value:?}");
        }
        for value in ["Basic t0k", "Bearert0k", "Bearer", "Bearer   ", "t0k", ""] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }

    #[test]
    fn the_open_file_limit_is_read_from_proc_self_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
            Max processes             96365                96365                processes \n\
            Max open files            1024                 524288               files     \n";
        assert_eq!(open_file_limit(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(open_file_limit(unlimited), Some(u64::MAX));
        assert_eq!(open_file_limit("Max processes 10 10 processes\n"), None);
        let ours = std::fs::read_to_string("/proc/self/limits").unwrap();
        assert!(open_file_limit(&ours).is_some(), "{ours}");
    }

    #[test]
    fn connections_never_take_more_than_half_the_open_file_limit() {
        assert_eq!(connection_cap(512, 2048), 512);
        assert_eq!(connection_cap(512, 1024), 512);
        assert_eq!(connection_cap(512, 40), 20);
        assert_eq!(connection_cap(512, 1), 1);
        assert_eq!(connection_cap(usize::MAX, u64::MAX), u32::MAX as usize);
    }
}
