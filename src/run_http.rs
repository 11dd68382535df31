//! How the run queue answers over HTTP, for the API and the console alike: a run's log (whole
//! once it ended, followed live while it runs), a run that does not exist, a store that failed.

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use crate::queue::workers::{Follow, Pipelines};

/// The answer when the run queue's store failed: logged, and a 500 saying why.
pub fn store_failed(error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "the run queue failed");
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response()
}

/// The answer for a run that does not exist.
pub fn no_run(id: i64) -> Response {
    (StatusCode::NOT_FOUND, format!("no run {id}\n")).into_response()
}

/// Run `id`'s log as text: followed as it is written while the run goes on, when `follow`.
pub fn run_log(pipelines: &Pipelines, id: i64, follow: bool) -> Response {
    match pipelines.store().get(id) {
        Ok(Some(_)) => {}
        Ok(None) => return no_run(id),
        Err(error) => return store_failed(error),
    }
    let text = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if follow {
        match pipelines.follow(id) {
            Follow::Running(following) => {
                return (text, Body::from_stream(follow_stream(following))).into_response();
            }
            Follow::Ended => {}
            Follow::Busy => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "5")],
                    format!(
                        "{} clients follow run logs already; retry later, or ask with follow=false\n",
                        crate::queue::workers::MAX_FOLLOWERS
                    ),
                )
                    .into_response();
            }
        }
    }
    match std::fs::read(pipelines.log_path(id)) {
        Ok(log) => (text, log).into_response(),
        // Queued, or ended before it wrote anything.
        Err(_) => (text, Vec::new()).into_response(),
    }
}

/// A followed log as a body: what was written, then each piece as it comes, until the run ends;
/// the follower's slot is held until then.
fn follow_stream(
    following: crate::queue::workers::Following,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::convert::Infallible>> {
    use tokio::sync::broadcast::error::RecvError;
    let crate::queue::workers::Following { so_far, rest, slot } = following;
    let rest = futures_util::stream::unfold((rest, slot), |(mut rest, slot)| async move {
        let piece = match rest.recv().await {
            Ok(piece) => piece,
            Err(RecvError::Lagged(missed)) => format!(
                "\n[berth: {missed} pieces of output skipped here: this reader was too slow]\n"
            )
            .into_bytes(),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(piece), (rest, slot)))
    });
    futures_util::stream::once(async move { Ok(so_far) }).chain(rest)
}
