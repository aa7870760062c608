//! The researcher's endpoints: the swarm as the dashboard sees it (open to anyone who can
//! reach the server; it holds counters, never weights), and the control actions, which
//! need the admin token from the server's configuration (`Authorization: Bearer TOKEN`).
//!
//! Without a configured token every control action is refused: a server is never
//! controllable by default.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::signaling::Hub;

/// Most peers listed in one swarm view (about 300 KB); `total` says how many there are.
const VIEW_LIMIT: usize = 256;
/// How long a task's swarm view, once written, is what every request gets: building it
/// walks the task's peers under the lock every task shares and writes up to 300 KB, and
/// anyone may ask (a dashboard asks every few seconds).
const VIEW_EVERY: Duration = Duration::from_secs(1);

/// Shared by the admin routes.
#[derive(Clone)]
pub struct AdminState {
    /// The signaling state.
    pub hub: Arc<Hub>,
    /// The token control actions need; `None` disables them.
    pub token: Option<Arc<str>>,
    /// Each task's swarm view as last written, and when (configured tasks only).
    pub views: Arc<Mutex<HashMap<String, (Instant, Bytes)>>>,
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the bearer token; the error response says what is missing.
fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let Some(token) = &state.token else {
        return Err((
            StatusCode::FORBIDDEN,
            "control actions are disabled: the server has no admin token (--admin-token)",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    match given {
        Some(g) if same(g.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err((StatusCode::UNAUTHORIZED, "wrong admin token")),
        None => Err((
            StatusCode::UNAUTHORIZED,
            "this action needs the admin token (Authorization: Bearer TOKEN)",
        )),
    }
}

/// The token of `Bearer TOKEN`, the scheme in any case (RFC 9110: schemes are
/// case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

fn refuse(code: StatusCode, message: &str) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}

fn unknown(task: &str) -> Response {
    refuse(StatusCode::NOT_FOUND, &format!("no task {task:?}"))
}

/// `GET /api/tasks/{task}/swarm`: peers, neighbour graph, latest reports.
/// Written at most once per [`VIEW_EVERY`] per task.
pub async fn swarm(State(s): State<AdminState>, Path(task): Path<String>) -> Response {
    let json = |bytes: Bytes| ([(header::CONTENT_TYPE, "application/json")], bytes).into_response();
    let mut views = s.views.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((at, bytes)) = views.get(&task)
        && at.elapsed() < VIEW_EVERY
    {
        return json(bytes.clone());
    }
    let Some(view) = s.hub.swarm_view(&task, VIEW_LIMIT) else {
        return unknown(&task);
    };
    let bytes = Bytes::from(serde_json::to_vec(&view).unwrap_or_default());
    views.insert(task, (Instant::now(), bytes.clone()));
    json(bytes)
}

/// `POST /api/tasks/{task}/pause` and `/resume`.
pub async fn pause(
    State(s): State<AdminState>,
    Path((task, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err((code, why)) = authorize(&s, &headers) {
        return refuse(code, why);
    }
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        "export" => {
            // The model lives in the peers, not here: the dashboard downloads it from a
            // neighbour and writes the file itself once the server says yes.
            return if s.hub.swarm_view(&task, 0).is_some() {
                tracing::info!(task, "model export authorized");
                Json(json!({ "ok": true })).into_response()
            } else {
                unknown(&task)
            };
        }
        other => return refuse(StatusCode::NOT_FOUND, &format!("no action {other:?}")),
    };
    let set = s.hub.set_paused(&task, paused);
    // The dashboard asks for the view right after: it must see the change. Dropped once
    // the change is made (dropped before, a view read meanwhile kept the old state for a
    // second).
    s.views
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&task);
    match set {
        Ok(true) => {}
        Ok(false) => return unknown(&task),
        Err(e) => {
            tracing::error!(task, paused, "could not save the task state: {e}");
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!(
                    "the peers were told, but the state could not be saved for a restart: {e}"
                ),
            );
        }
    }
    tracing::info!(task, paused, "task state changed by the admin");
    Json(json!({ "ok": true, "paused": paused })).into_response()
}

#[cfg(test)]
mod tests {
    use super::{bearer, same};

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        assert_eq!(bearer("Bearer tok"), Some("tok"));
        assert_eq!(bearer("bearer tok"), Some("tok"));
        assert_eq!(bearer("BEARER  tok"), Some("tok"));
        assert_eq!(bearer("Basic tok"), None);
        assert_eq!(bearer("Bearertok"), None);
    }

    #[test]
    fn token_comparison_is_exact() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"", b"x"));
    }
}
