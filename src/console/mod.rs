//! The web console, served by the agent on `listen`: the overview of the last pass and every
//! object, an object's page, pipeline runs with their logs followed live, and per-team instances;
//! pages follow the agent's events (`/console/events`) and show a pass's result without a reload.
//!
//! Its rooms:
//! - this file: the routes, the pages' handlers and the headers every answer carries;
//! - [`session`]: logging in with a token, sessions, CSRF tokens, cookies;
//! - [`views`]: what a page shows, worked out from status (pure).
//!
//! Pages are rendered on the server from templates (`templates/console/`, askama, which escapes
//! every value); every page reads with JavaScript off, and the little script there is
//! (`assets/console.js`) only swaps a page's main part when an event comes and follows a running
//! log. Assets are compiled in; nothing is fetched from elsewhere. The API token logs in as an
//! operator, the viewer token (`api.viewerTokenFile`) as a viewer, whose every POST is refused and
//! who is shown no buttons. Every form carries the session's CSRF token, and every answer a
//! Content-Security-Policy of `default-src 'self'` with no inline script or style.

mod session;
pub mod views;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use futures_util::Stream;

pub use session::Tokens;
use session::{
    SESSION_LIFETIME, Session, Sessions, cookie, csrf_matches, login_cookie, random_token,
    session_cookie, set_cookie,
};
use views::{Filters, ObjectRow};

use crate::descriptor::Kind;
use crate::descriptor::edit::WantedState;
use crate::live::{Published, Readiness, Shared};
use crate::plan::Health;
use crate::source::Committed;
use crate::status::{Phase, short_revision};

/// What the console needs beyond the server's state.
#[derive(Debug, Clone)]
pub struct Console {
    tokens: Tokens,
    sessions: Sessions,
    secure_cookies: bool,
    instance: String,
    web_url: Option<String>,
    /// Where changes of desired state go: the agent commits them, between passes.
    changes: Option<tokio::sync::mpsc::Sender<StateChange>>,
    /// The branch the agent follows, where a pull request from a side branch goes.
    followed: String,
    /// The agent's clone and where status is committed in it, for the history.
    history: Option<(std::path::PathBuf, crate::source::StatusTarget)>,
    /// Slots of pages following events.
    streams: Arc<tokio::sync::Semaphore>,
}

/// A change of one descriptor's state asked for in the console, for the agent to commit.
#[derive(Debug)]
pub struct StateChange {
    /// The descriptor.
    pub key: crate::descriptor::ObjectRef,
    /// The state it is to have.
    pub state: WantedState,
    /// Who asked, for the commit's `Requested-by:` trailer.
    pub requested_by: String,
    /// Where the agent answers.
    pub reply: tokio::sync::oneshot::Sender<Result<Committed, String>>,
}

/// Largest form the console takes, in bytes.
pub const MAX_FORM: usize = 16 * 1024;
/// Most pages following events at once; more get 503. Each holds one of the connection slots
/// (256 by default), so half stay for everything else.
const MAX_EVENT_STREAMS: usize = 128;
/// The most of a run's log its page shows inline: its tail (the whole is followed or fetched).
const LOG_TAIL: u64 = 256 * 1024;

/// How long a change waits for the agent (a pass in progress ends first).
const CHANGE_WAIT: Duration = Duration::from_secs(120);

impl Console {
    /// The console of an agent of `instance`, logged in to with `tokens`; its cookies `Secure`
    /// when `secure_cookies`; problems linked into `web_url` when it is an http(s) address.
    pub fn new(
        tokens: Tokens,
        secure_cookies: bool,
        instance: &str,
        web_url: Option<&str>,
    ) -> Console {
        let web_url = web_url
            .filter(|url| url.starts_with("https://") || url.starts_with("http://"))
            .map(|url| url.trim_end_matches('/').to_string());
        Console {
            tokens,
            sessions: Sessions::default(),
            secure_cookies,
            instance: instance.to_string(),
            web_url,
            changes: None,
            followed: String::new(),
            history: None,
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_EVENT_STREAMS)),
        }
    }

    /// This console, reading the history of status from the clone at `dir`.
    pub fn with_history(
        mut self,
        dir: std::path::PathBuf,
        target: crate::source::StatusTarget,
    ) -> Console {
        self.history = Some((dir, target));
        self
    }

    /// This console, sending changes of desired state to `changes`, for the followed branch
    /// `followed`.
    pub fn with_changes(
        mut self,
        changes: tokio::sync::mpsc::Sender<StateChange>,
        followed: &str,
    ) -> Console {
        self.changes = Some(changes);
        self.followed = followed.to_string();
        self
    }
}

/// What the console's handlers read: its sessions and settings, what the agent publishes, and the
/// run queue and instances where the agent has them.
#[derive(Debug, Clone)]
pub struct ConsoleState {
    /// Sessions and settings.
    pub console: Console,
    /// Status and readiness as of the last pass.
    pub shared: Arc<Shared>,
    /// The pipeline runs.
    pub pipelines: Option<crate::queue::workers::Pipelines>,
    /// Per-team instances.
    pub instances: Option<crate::instances::Instances>,
}

/// The console's routes.
pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/objects/{kind}/{name}", get(object))
        .route("/objects/{kind}/{name}/state", post(change_state))
        .route("/history", get(history))
        .route("/stagings", get(stagings))
        .route("/runs", get(runs))
        .route("/runs/{id}", get(run))
        .route("/runs/{id}/log", get(run_log))
        .route("/runs/{id}/cancel", post(cancel_run))
        .route("/pipelines/{name}/run", post(start_run))
        .route("/instances", get(instances))
        .route("/instances/{id}/renew", post(renew_instance))
        .route("/instances/{id}/kill", post(kill_instance))
        .route("/console/events", get(events))
        .route("/console/console.css", get(stylesheet))
        .route("/console/console.js", get(script))
        .layer(axum::middleware::map_response(guarded))
        .with_state(state)
}

/// Headers on every answer of the console: no script or style but its own files, no framing, no
/// sniffing, no referrer to elsewhere, no caching of what a session sees.
async fn guarded(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let set = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in set {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// What every page's frame shows.
struct Layout {
    instance: String,
    signed_in: bool,
    role: &'static str,
    csrf: String,
    /// What makes this agent's pages not the live truth: standing by, or its passes failing.
    notice: Option<String>,
    /// The count of the pass whose status the page shows: the page's events start from it.
    pass: u64,
}

impl Layout {
    fn of(state: &ConsoleState, session: Option<&Session>) -> Layout {
        let notice = match &*state.shared.readiness.read().expect("lock") {
            Readiness::Standby(why) => Some(format!(
                "This agent stands by ({why}): it applies nothing, and what it shows is as of its last pass; the leader's console is live."
            )),
            Readiness::Degraded(why) => Some(format!("The last pass did not finish: {why}")),
            _ => None,
        };
        Layout {
            instance: state.console.instance.clone(),
            signed_in: session.is_some(),
            role: session.map_or("", |s| s.role.as_str()),
            csrf: session.map(|s| s.csrf.clone()).unwrap_or_default(),
            notice: session.and(notice),
            pass: state.shared.pass(),
        }
    }

    /// The layout of a page that shows the status of pass `pass`, which may be older than the
    /// last: a pass published while the page was made is then sent to it at once.
    fn showing_pass(self, pass: u64) -> Layout {
        Layout { pass, ..self }
    }
}

fn page(template: &impl Template, code: StatusCode) -> Response {
    match template.render() {
        Ok(html) => (code, Html(html)).into_response(),
        Err(error) => {
            tracing::error!(%error, "a console page did not render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page did not render\n",
            )
                .into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "console/message.html")]
struct MessagePage {
    layout: Layout,
    heading: String,
    text: String,
    back: String,
    /// Where to go on from here, with its words: the pull request to open.
    onward: Option<(String, String)>,
}

fn message(
    state: &ConsoleState,
    session: Option<&Session>,
    code: StatusCode,
    heading: &str,
    text: String,
    back: &str,
) -> Response {
    let body = MessagePage {
        layout: Layout::of(state, session),
        heading: heading.to_string(),
        text,
        back: back.to_string(),
        onward: None,
    };
    page(&body, code)
}

/// The session the request's cookie names, if it is live.
fn session_of(state: &ConsoleState, headers: &HeaderMap) -> Option<(String, Session)> {
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    let id = cookie(cookies, session_cookie(state.console.secure_cookies))?;
    let session = state.console.sessions.get(id)?;
    Some((id.to_string(), session))
}

/// A page's session, or the login page to go to.
#[allow(clippy::result_large_err)]
fn viewer(state: &ConsoleState, headers: &HeaderMap) -> Result<Session, Response> {
    session_of(state, headers)
        .map(|(_, session)| session)
        .ok_or_else(|| Redirect::to("/login").into_response())
}

/// A page's session, taken from its cookie; without one, the page sends to the login form.
struct SignedIn(Session);

impl axum::extract::FromRequestParts<ConsoleState> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &ConsoleState,
    ) -> Result<SignedIn, Response> {
        viewer(state, &parts.headers).map(SignedIn)
    }
}

/// An action's session: logged in, the form's CSRF token its own, allowed to act, and this agent
/// the leader (a standby's engines and records are not the ones in use).
#[allow(clippy::result_large_err)]
fn operator(
    state: &ConsoleState,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<Session, Response> {
    let session = viewer(state, headers)?;
    let sent = form.get("csrf").map(String::as_str).unwrap_or_default();
    if !csrf_matches(&session, sent) {
        return Err(message(
            state,
            Some(&session),
            StatusCode::FORBIDDEN,
            "Refused",
            "The form's CSRF token is not this session's; reload the page and try again.".into(),
            "/",
        ));
    }
    if !session.role.may_act() {
        return Err(message(
            state,
            Some(&session),
            StatusCode::FORBIDDEN,
            "Refused",
            "A viewer reads only; log in with the API token to act.".into(),
            "/",
        ));
    }
    if let Readiness::Standby(why) = &*state.shared.readiness.read().expect("lock") {
        return Err(message(
            state,
            Some(&session),
            StatusCode::SERVICE_UNAVAILABLE,
            "Standing by",
            format!("This agent stands by ({why}); act on the leader's console."),
            "/",
        ));
    }
    Ok(session)
}

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage {
    layout: Layout,
    csrf: String,
    error: Option<String>,
}

/// The login form, with a CSRF token in a cookie of its own (no session exists yet).
fn login_form(state: &ConsoleState, error: Option<String>) -> Response {
    let csrf = random_token();
    let code = match error {
        Some(_) => StatusCode::UNAUTHORIZED,
        None => StatusCode::OK,
    };
    let mut response = page(
        &LoginPage {
            layout: Layout::of(state, None),
            csrf: csrf.clone(),
            error,
        },
        code,
    );
    let set = set_cookie(
        login_cookie(state.console.secure_cookies),
        &csrf,
        Duration::from_secs(3600),
        state.console.secure_cookies,
    );
    if let Ok(value) = HeaderValue::from_str(&set) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

async fn login_page(State(state): State<ConsoleState>) -> Response {
    login_form(&state, None)
}

async fn login(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let expected = headers
        .get(header::COOKIE)
        .and_then(|c| c.to_str().ok())
        .and_then(|c| cookie(c, login_cookie(state.console.secure_cookies)))
        .unwrap_or_default();
    let sent = form.get("csrf").map(String::as_str).unwrap_or_default();
    let fresh = !sent.is_empty()
        && bool::from(subtle::ConstantTimeEq::ct_eq(
            sent.as_bytes(),
            expected.as_bytes(),
        ));
    if !fresh {
        return login_form(&state, Some("The form expired; log in again.".into()));
    }
    let token = form.get("token").map(String::as_str).unwrap_or_default();
    let Some(role) = state.console.tokens.role_of(token) else {
        tracing::warn!("a console login with a wrong token");
        return login_form(&state, Some("That token logs nobody in.".into()));
    };
    let who = form.get("name").and_then(|name| session::given_name(name));
    let Some((id, _)) = state.console.sessions.open(role, who) else {
        return login_form(&state, Some("No session can be made now.".into()));
    };
    tracing::info!(role = role.as_str(), "a console login");
    let secure = state.console.secure_cookies;
    let mut response = Redirect::to("/").into_response();
    for set in [
        set_cookie(session_cookie(secure), &id, SESSION_LIFETIME, secure),
        set_cookie(login_cookie(secure), "", Duration::ZERO, secure),
    ] {
        if let Ok(value) = HeaderValue::from_str(&set) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

async fn logout(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    // Only the session's own form logs it out: another site cannot.
    let Some((id, session)) = session_of(&state, &headers) else {
        return Redirect::to("/login").into_response();
    };
    if !csrf_matches(
        &session,
        form.get("csrf").map(String::as_str).unwrap_or_default(),
    ) {
        return Redirect::to("/").into_response();
    }
    state.console.sessions.close(&id);
    let mut response = Redirect::to("/login").into_response();
    let set = set_cookie(
        session_cookie(state.console.secure_cookies),
        "",
        Duration::ZERO,
        state.console.secure_cookies,
    );
    if let Ok(value) = HeaderValue::from_str(&set) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

/// A problem as the overview lists it: where, linked into the repo's web view when there is one.
struct ProblemRow {
    place: String,
    link: Option<String>,
    message: String,
}

#[derive(Template)]
#[template(path = "console/overview.html")]
struct OverviewPage {
    layout: Layout,
    pass_result: &'static str,
    pass_tone: &'static str,
    pass_revision: String,
    applied_revision: String,
    pass_when: String,
    pass_message: String,
    problems: Vec<ProblemRow>,
    rows: Vec<ObjectRow>,
    total: usize,
    kinds: Vec<(&'static str, bool)>,
    phases: Vec<(&'static str, bool)>,
    healths: Vec<(&'static str, bool)>,
    query: String,
}

async fn overview(
    State(state): State<ConsoleState>,
    SignedIn(session): SignedIn,
    Query(filters): Query<Filters>,
) -> Response {
    let Published { status, pass } = state.shared.published();
    let agent = &status.agent;
    let short = |revision: &Option<String>| {
        revision
            .as_deref()
            .map(|r| short_revision(r).to_string())
            .unwrap_or_else(|| "-".into())
    };
    let problems = agent
        .problems
        .iter()
        .map(|problem| ProblemRow {
            place: format!("{}:{}:{}", problem.file, problem.line, problem.column),
            link: match (&state.console.web_url, &agent.last_attempted_revision) {
                (Some(web), Some(revision)) => Some(format!(
                    "{web}/blob/{revision}/{}#L{}",
                    url_path(&problem.file),
                    problem.line
                )),
                _ => None,
            },
            message: problem.message.clone(),
        })
        .collect();
    let (pass_result, pass_tone) = match agent.result {
        Some(result) => (
            result.as_str(),
            match result {
                crate::status::PassResult::Applied => "good",
                crate::status::PassResult::Transient => "busy",
                _ => "bad",
            },
        ),
        None => ("no pass yet", "none"),
    };
    let body = OverviewPage {
        layout: Layout::of(&state, Some(&session)).showing_pass(pass),
        pass_result,
        pass_tone,
        pass_revision: short(&agent.last_attempted_revision),
        applied_revision: short(&agent.last_applied_revision),
        pass_when: agent.updated.clone().unwrap_or_default(),
        pass_message: agent.message.clone(),
        problems,
        rows: views::rows(&status, &filters),
        total: status.objects.len(),
        kinds: views::choices(views::KINDS.into_iter(), &filters.kind),
        phases: views::choices(Phase::ALL.into_iter().map(Phase::as_str), &filters.phase),
        healths: views::choices(Health::ALL.into_iter().map(Health::as_str), &filters.health),
        query: filters.q.clone(),
    };
    page(&body, StatusCode::OK)
}

/// `POST /objects/{kind}/{name}/state` (`state=running|stopped|archived`): a commit on the
/// followed branch that changes only the descriptor's `state:` line; the next pass applies it.
async fn change_state(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path((kind, name)): Path<(String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let session = match operator(&state, &headers, &form) {
        Ok(session) => session,
        Err(refused) => return refused,
    };
    let back = format!("/objects/{kind}/{name}");
    let key: Option<crate::descriptor::ObjectRef> = format!("{kind}/{name}").parse().ok();
    let wanted = form
        .get("state")
        .and_then(|s| WantedState::from_name(s))
        .zip(key)
        .filter(|(wanted, key)| wanted.fits(key.kind));
    let (Some((wanted, key)), Some(changes)) = (wanted, &state.console.changes) else {
        return message(
            &state,
            Some(&session),
            StatusCode::BAD_REQUEST,
            "Refused",
            "That state is not one this object can be given here.".into(),
            &back,
        );
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let change = StateChange {
        key: key.clone(),
        state: wanted,
        requested_by: match &session.who {
            Some(who) => format!(
                "{who}, as the console's {} ({})",
                session.role.as_str(),
                state.console.instance
            ),
            None => format!(
                "the console's {} ({})",
                session.role.as_str(),
                state.console.instance
            ),
        },
        reply,
    };
    if changes.try_send(change).is_err() {
        return message(
            &state,
            Some(&session),
            StatusCode::SERVICE_UNAVAILABLE,
            "Busy",
            "Too many changes are waiting for the agent; try again in a moment.".into(),
            &back,
        );
    }
    let said = match tokio::time::timeout(CHANGE_WAIT, answer).await {
        Ok(Ok(said)) => said,
        Ok(Err(_)) => Err("the agent stopped before it made the commit".into()),
        Err(_) => Err(format!(
            "the agent did not answer within {}s; the commit may still be made, see the repo",
            CHANGE_WAIT.as_secs()
        )),
    };
    let mut onward = None;
    let (code, heading, text) = match said {
        Ok(Committed::Pushed {
            commit,
            branch,
            file,
        }) => (
            StatusCode::OK,
            "Committed",
            format!(
                "Commit {} on {branch} sets {key} to {} in {file}; the next pass applies it.",
                short_revision(&commit),
                wanted.as_str()
            ),
        ),
        Ok(Committed::ToSideBranch {
            commit,
            branch,
            refused,
            file,
        }) => {
            onward = state.console.web_url.as_ref().map(|web| {
                (
                    format!(
                        "{web}/compare/{}...{}?expand=1",
                        url_path(&state.console.followed),
                        url_path(&branch)
                    ),
                    format!("Open a pull request from {branch}"),
                )
            });
            (
                StatusCode::ACCEPTED,
                "Open a pull request",
                format!(
                    "The followed branch refused the push ({refused}). Commit {} setting {key} to {} in {file} is on branch {branch}: open a pull request from it.",
                    short_revision(&commit),
                    wanted.as_str()
                ),
            )
        }
        Ok(Committed::Unchanged) => (
            StatusCode::OK,
            "Unchanged",
            format!("{key} already says {}.", wanted.as_str()),
        ),
        Ok(Committed::Refused(why)) => (StatusCode::CONFLICT, "Not committed", why),
        Err(why) => (StatusCode::BAD_GATEWAY, "Not committed", why),
    };
    let body = MessagePage {
        layout: Layout::of(&state, Some(&session)),
        heading: heading.to_string(),
        text,
        back,
        onward,
    };
    page(&body, code)
}

/// Status commits a page lists at most: the history page, and an object's phases.
const HISTORY: usize = 100;
const OBJECT_HISTORY: usize = 20;

/// Status commits from the agent's clone, newest first (those that changed `only`, when given).
async fn read_history(
    state: &ConsoleState,
    only: Option<String>,
    limit: usize,
) -> Vec<crate::source::HistoryEntry> {
    let Some((dir, target)) = state.console.history.clone() else {
        return Vec::new();
    };
    let read = tokio::task::spawn_blocking(move || {
        crate::source::status_history(&dir, &target, only.as_deref(), limit)
    })
    .await;
    match read {
        Ok(Ok(entries)) => entries,
        Ok(Err(error)) => {
            tracing::warn!(%error, "the status history could not be read");
            Vec::new()
        }
        Err(_) => Vec::new(),
    }
}

#[derive(Template)]
#[template(path = "console/history.html")]
struct HistoryPage {
    layout: Layout,
    entries: Vec<crate::source::HistoryEntry>,
}

/// The status branch's log: what changed, when, at which revision; an audit trail in git.
async fn history(State(state): State<ConsoleState>, SignedIn(session): SignedIn) -> Response {
    let body = HistoryPage {
        layout: Layout::of(&state, Some(&session)),
        entries: read_history(&state, None, HISTORY).await,
    };
    page(&body, StatusCode::OK)
}

/// A pipeline run as the console lists it.
struct RunRow {
    id: i64,
    pipeline: String,
    state: &'static str,
    tone: &'static str,
    cause: &'static str,
    commit: String,
    queued: String,
    took: String,
    image: String,
    message: String,
    over: bool,
}

impl RunRow {
    fn of(run: &crate::queue::Run) -> RunRow {
        use crate::queue::RunState;
        RunRow {
            id: run.id,
            pipeline: run.pipeline.clone(),
            state: run.state.as_str(),
            tone: match run.state {
                RunState::Succeeded => "good",
                RunState::Queued | RunState::Running => "busy",
                RunState::Cancelled => "none",
                RunState::Failed | RunState::Interrupted => "bad",
            },
            cause: run.cause.as_str(),
            commit: run
                .commit
                .as_deref()
                .map(|c| short_revision(c).to_string())
                .unwrap_or_default(),
            queued: run.queued_at.clone(),
            took: run
                .duration_ms
                .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
                .unwrap_or_default(),
            image: run.image.clone().unwrap_or_default(),
            message: run.message.clone().unwrap_or_default(),
            over: run.state.is_final(),
        }
    }
}

#[derive(Template)]
#[template(path = "console/object.html")]
struct ObjectPage {
    layout: Layout,
    row: ObjectRow,
    /// Its phases as status recorded them, newest first.
    phases: Vec<crate::source::HistoryEntry>,
    /// The states the console can commit for it, each with its button's words.
    states: Vec<(&'static str, &'static str)>,
    message: String,
    /// Each part: its id, state, health and the health's tone.
    parts: Vec<(String, &'static str, &'static str, &'static str)>,
    is_pipeline: bool,
    may_act: bool,
    runs: Vec<RunRow>,
    /// A Staging's namespace; empty for other kinds.
    namespace: String,
    /// The images its parts run.
    images: Vec<String>,
}

async fn object(
    State(state): State<ConsoleState>,
    SignedIn(session): SignedIn,
    Path((kind, name)): Path<(String, String)>,
) -> Response {
    let Published { status, pass } = state.shared.published();
    let found = status
        .objects
        .values()
        .find(|o| o.kind.as_str() == kind && o.name == name);
    let Some(found) = found else {
        return message(
            &state,
            Some(&session),
            StatusCode::NOT_FOUND,
            "Not found",
            format!("No object {kind}/{name} in the last pass's status."),
            "/",
        );
    };
    let is_pipeline = found.kind == Kind::Pipeline;
    let runs = match (&state.pipelines, is_pipeline) {
        (Some(pipelines), true) => pipelines
            .store()
            .list(Some(&found.name), 20)
            .unwrap_or_default()
            .iter()
            .map(RunRow::of)
            .collect(),
        _ => Vec::new(),
    };
    let states = match (session.role.may_act(), state.console.changes.is_some()) {
        (true, true) => views::state_buttons(found.kind, found.phase),
        _ => Vec::new(),
    };
    let file = crate::status::object_path(found.kind, &found.name);
    let body = ObjectPage {
        layout: Layout::of(&state, Some(&session)).showing_pass(pass),
        row: ObjectRow::of(found),
        phases: read_history(&state, Some(file), OBJECT_HISTORY).await,
        states,
        message: found.message.clone(),
        parts: found
            .parts
            .iter()
            .map(|p| {
                (
                    p.id.clone(),
                    p.state.as_str(),
                    p.health.as_str(),
                    views::tone(p.health, None),
                )
            })
            .collect(),
        is_pipeline,
        may_act: session.role.may_act(),
        runs,
        namespace: match found.kind {
            Kind::Staging => views::namespace_of(found),
            _ => String::new(),
        },
        images: views::images_of(found),
    };
    page(&body, StatusCode::OK)
}

#[derive(Template)]
#[template(path = "console/stagings.html")]
struct StagingsPage {
    layout: Layout,
    stagings: Vec<views::StagingRow>,
    may_act: bool,
}

/// Every staging: its namespace, the images it runs, where it answers, and its state buttons.
async fn stagings(State(state): State<ConsoleState>, SignedIn(session): SignedIn) -> Response {
    let Published { status, pass } = state.shared.published();
    let may_change = session.role.may_act() && state.console.changes.is_some();
    let body = StagingsPage {
        layout: Layout::of(&state, Some(&session)).showing_pass(pass),
        stagings: views::stagings(&status, may_change),
        may_act: may_change,
    };
    page(&body, StatusCode::OK)
}

#[derive(Template)]
#[template(path = "console/runs.html")]
struct RunsPage {
    layout: Layout,
    runs: Vec<RunRow>,
}

async fn runs(State(state): State<ConsoleState>, SignedIn(session): SignedIn) -> Response {
    let runs = state
        .pipelines
        .as_ref()
        .and_then(|p| p.store().list(None, 100).ok())
        .unwrap_or_default();
    let body = RunsPage {
        layout: Layout::of(&state, Some(&session)),
        runs: runs.iter().map(RunRow::of).collect(),
    };
    page(&body, StatusCode::OK)
}

#[derive(Template)]
#[template(path = "console/run.html")]
struct RunPage {
    layout: Layout,
    run: RunRow,
    steps: Vec<String>,
    log: String,
    may_act: bool,
}

async fn run(
    State(state): State<ConsoleState>,
    SignedIn(session): SignedIn,
    Path(id): Path<i64>,
) -> Response {
    let found = state
        .pipelines
        .as_ref()
        .and_then(|p| p.store().get(id).ok().flatten().map(|run| (p, run)));
    let Some((pipelines, found)) = found else {
        return message(
            &state,
            Some(&session),
            StatusCode::NOT_FOUND,
            "Not found",
            format!("No run #{id}."),
            "/runs",
        );
    };
    let path = pipelines.log_path(id);
    let log = tokio::task::spawn_blocking(move || log_tail(&path))
        .await
        .unwrap_or_default();
    let body = RunPage {
        layout: Layout::of(&state, Some(&session)),
        steps: found.steps.iter().map(views::step_line).collect(),
        run: RunRow::of(&found),
        log,
        may_act: session.role.may_act(),
    };
    page(&body, StatusCode::OK)
}

async fn run_log(
    State(state): State<ConsoleState>,
    _: SignedIn,
    Path(id): Path<i64>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(pipelines) = &state.pipelines else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let follow = query.get("follow").is_some_and(|f| f == "true");
    crate::run_http::run_log(pipelines, id, follow)
}

async fn start_run(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let session = match operator(&state, &headers, &form) {
        Ok(session) => session,
        Err(refused) => return refused,
    };
    let Some(pipelines) = &state.pipelines else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let started = pipelines.manual(&name, None);
    if let Ok(id) = &started {
        tracing::info!(pipeline = %name, run = id, "a run asked for from the console");
    }
    let back = views::object_href(Kind::Pipeline, &name);
    acted(
        &state,
        &session,
        started.map(|id| format!("/runs/{id}")),
        "Not run",
        &back,
    )
}

/// Where an action leads: to `done`'s page, or a page saying why it was not done.
fn acted(
    state: &ConsoleState,
    session: &Session,
    done: Result<String, impl std::fmt::Display>,
    failed: &str,
    back: &str,
) -> Response {
    match done {
        Ok(to) => Redirect::to(&to).into_response(),
        Err(error) => message(
            state,
            Some(session),
            StatusCode::CONFLICT,
            failed,
            error.to_string(),
            back,
        ),
    }
}

async fn cancel_run(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let session = match operator(&state, &headers, &form) {
        Ok(session) => session,
        Err(refused) => return refused,
    };
    let Some(pipelines) = &state.pipelines else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let page = format!("/runs/{id}");
    let cancelled = pipelines.cancel(id).map(|_| page.clone());
    acted(&state, &session, cancelled, "Not cancelled", &page)
}

/// An instance as the console lists it.
struct InstanceRow {
    id: String,
    challenge: String,
    team: String,
    state: String,
    endpoints: Vec<String>,
    expires: String,
}

#[derive(Template)]
#[template(path = "console/instances.html")]
struct InstancesPage {
    layout: Layout,
    instances: Vec<InstanceRow>,
    unavailable: Option<String>,
    may_act: bool,
}

async fn instances(
    State(state): State<ConsoleState>,
    SignedIn(session): SignedIn,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let challenge = query.get("challenge").map(String::as_str);
    let standby = matches!(
        &*state.shared.readiness.read().expect("lock"),
        Readiness::Standby(_)
    );
    let (listed, unavailable) = match &state.instances {
        // The leader's store holds the instances; a standby's is not the one in use.
        _ if standby => (
            Vec::new(),
            Some("This agent stands by: the leader's console lists the instances.".into()),
        ),
        Some(instances) => match instances.list(challenge, None) {
            Ok(listed) => (listed, None),
            Err(error) => (Vec::new(), Some(error.to_string())),
        },
        None => (Vec::new(), Some("This agent serves no instances.".into())),
    };
    let rows = listed
        .into_iter()
        .map(|view| InstanceRow {
            id: view.id,
            challenge: view.challenge,
            team: view
                .team
                .map(|t| t.as_str().to_string())
                .unwrap_or_else(|| "(pool)".into()),
            state: serde_json::to_value(view.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            // Where a team's instance answers is for staff who act on it, not every reader.
            endpoints: match session.role.may_act() {
                true => view
                    .endpoints
                    .iter()
                    .map(|e| format!("{}:{}/{}", e.host, e.port, e.protocol))
                    .collect(),
                false => Vec::new(),
            },
            expires: view.expires_at.unwrap_or_default(),
        })
        .collect();
    let body = InstancesPage {
        layout: Layout::of(&state, Some(&session)),
        instances: rows,
        unavailable,
        may_act: session.role.may_act(),
    };
    page(&body, StatusCode::OK)
}

async fn renew_instance(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let session = match operator(&state, &headers, &form) {
        Ok(session) => session,
        Err(refused) => return refused,
    };
    let Some(instances) = &state.instances else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let renewed = instances.renew(&id).map(|_| "/instances".to_string());
    acted(&state, &session, renewed, "Not renewed", "/instances")
}

async fn kill_instance(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let session = match operator(&state, &headers, &form) {
        Ok(session) => session,
        Err(refused) => return refused,
    };
    let Some(instances) = &state.instances else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let killed = instances.kill(&id).await.map(|()| "/instances".to_string());
    acted(&state, &session, killed, "Not killed", "/instances")
}

/// Server-sent events: `pass` with the revision and result, as each pass's status is published,
/// its id the pass's count. A page says which count it shows (`?since=`, or on a reconnect the
/// browser's `Last-Event-ID`): a pass published before the page began to follow is sent at once,
/// so a page made while a pass ended never stays behind it.
async fn events(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some((id, _)) = session_of(&state, &headers) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let Ok(slot) = Arc::clone(&state.console.streams).try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "30")],
            "too many pages follow events already\n",
        )
            .into_response();
    };
    let shown = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(query.get("since").map(String::as_str))
        .and_then(|count| count.trim().parse::<u64>().ok());
    let passes = state.shared.passes.subscribe();
    let following = Following {
        shared: Arc::clone(&state.shared),
        sessions: state.console.sessions.clone(),
        session: id,
        _slot: slot,
    };
    let stream = pass_events(passes, shown, following);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// What a page following events holds: its slot, and the session it must still have.
struct Following {
    shared: Arc<Shared>,
    sessions: Sessions,
    session: String,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// A `pass` event as each status is published, for as long as the session lives; first, at
/// once, the last pass when the page shows another (`shown`).
fn pass_events(
    mut passes: tokio::sync::watch::Receiver<u64>,
    shown: Option<u64>,
    following: Following,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let missed = shown.is_some_and(|shown| shown != *passes.borrow_and_update());
    futures_util::stream::unfold(
        (passes, following, missed),
        |(mut passes, following, missed)| async move {
            if !missed {
                passes.changed().await.ok()?;
            }
            // Logged out or expired: the stream ends, and its slot is freed.
            following.sessions.get(&following.session)?;
            let Published { status, pass } = following.shared.published();
            let revision = status
                .agent
                .last_attempted_revision
                .as_deref()
                .map_or("-", short_revision);
            let result = status.agent.result.map_or("none", |r| r.as_str());
            let event = Event::default()
                .event("pass")
                .id(pass.to_string())
                .data(format!("{revision} {result}"));
            Some((Ok(event), (passes, following, false)))
        },
    )
}

/// The tail of a run's log, at most [`LOG_TAIL`] bytes, from the start of a line.
fn log_tail(path: &std::path::Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map_or(0, |m| m.len());
    let skipped = length.saturating_sub(LOG_TAIL);
    if file.seek(SeekFrom::Start(skipped)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.take(LOG_TAIL).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    match skipped {
        0 => text.into_owned(),
        _ => {
            let from_line = text.find('\n').map_or(0, |i| i + 1);
            format!(
                "[berth: the first {skipped} bytes are left out here; the whole log is at /runs/ID/log]\n{}",
                &text[from_line..]
            )
        }
    }
}

/// A repo path as it goes into a URL: each segment percent-encoded, the slashes kept.
fn url_path(path: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    path.split('/')
        .map(|segment| percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../assets/console.css"),
    )
        .into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../assets/console.js"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt as _;

    use super::*;
    use crate::status::StatusSet;

    /// A page following events, as `events` makes one, for a session that is logged in.
    fn following(shared: &Arc<Shared>) -> Following {
        let sessions = Sessions::default();
        let (session, _) = sessions.open(session::Role::Viewer, None).unwrap();
        let slot = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap();
        Following {
            shared: Arc::clone(shared),
            sessions,
            session,
            _slot: slot,
        }
    }

    /// The CI run that failed stop 30: a stagings page made just before a pass ended, whose
    /// events began just after, stayed at Running for good. It is told of that pass at once.
    #[tokio::test]
    async fn a_page_made_before_a_pass_ended_is_told_of_it_as_soon_as_it_follows() {
        let shared = Arc::new(Shared::new(Arc::new(StatusSet::new("test"))));
        let shown = shared.published().pass;
        shared.publish(Arc::new(StatusSet::new("test")));
        let passes = shared.passes.subscribe();
        let mut events = Box::pin(pass_events(passes, Some(shown), following(&shared)));
        let first = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
        assert!(matches!(first, Ok(Some(Ok(_)))), "the missed pass is sent");

        // A page as of the last pass waits for the next one, and gets it.
        let passes = shared.passes.subscribe();
        let current = shared.published().pass;
        let mut events = Box::pin(pass_events(passes, Some(current), following(&shared)));
        let early = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
        assert!(early.is_err(), "nothing is sent before a pass ends");
        shared.publish(Arc::new(StatusSet::new("test")));
        let next = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
        assert!(matches!(next, Ok(Some(Ok(_)))), "the next pass is sent");
    }
}
