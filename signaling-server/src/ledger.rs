//! The ledger's public endpoints (docs/protocol.md, "Receipts, the ledger and credits"):
//! entries by page, the file itself for offline verification, and the credits computed
//! from it. Open to anyone who can reach the server: receipts hold keys, rounds and
//! sample counts, never weights or data.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use shoal_shared::learn::identity::{Identity, hex};
use shoal_shared::trust::credits::{self, Credits};
use shoal_shared::trust::head::SignedHead;
use shoal_shared::trust::ledger::LedgerFile;

use crate::signaling::Hub;

/// Most entries on one page.
pub const MAX_PAGE: usize = 500;
/// Most keys and sites listed in the credits.
const CREDITS_LISTED: usize = 100;
/// Credits are recomputed at most this often (they cost a pass over the ledger).
const CREDITS_EVERY: Duration = Duration::from_secs(2);

/// Credits as computed at a time, at an entry count.
type Computed = (Instant, u64, Arc<Credits>);

/// The credits of each task, as last computed.
#[derive(Default)]
pub struct CreditsCache(Mutex<std::collections::HashMap<String, Computed>>);

/// Shared by the ledger routes.
#[derive(Clone)]
pub struct LedgerState {
    /// The signaling state (it holds the ledgers).
    pub hub: Arc<Hub>,
    /// Credits computed lately.
    pub cache: Arc<CreditsCache>,
}

fn refuse(code: StatusCode, message: &str) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}

fn ledger_of(s: &LedgerState, task: &str) -> Result<Arc<Mutex<LedgerFile>>, Box<Response>> {
    s.hub.ledgers.get(task).cloned().ok_or_else(|| {
        Box::new(refuse(
            StatusCode::NOT_FOUND,
            &format!("no ledger for task {task:?} on this server"),
        ))
    })
}

fn lock(l: &Mutex<LedgerFile>) -> std::sync::MutexGuard<'_, LedgerFile> {
    l.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `?from=I&limit=N`.
#[derive(Deserialize)]
pub struct Page {
    from: Option<u64>,
    limit: Option<usize>,
}

/// `GET /api/tasks/{task}/ledger`: a page of entries, the count and the head.
pub async fn page(
    State(s): State<LedgerState>,
    Path(task): Path<String>,
    Query(q): Query<Page>,
) -> Response {
    let ledger = match ledger_of(&s, &task) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return refuse(StatusCode::BAD_REQUEST, &format!("limit: 1..={MAX_PAGE}"));
    }
    // The ledger's lock may be held by an append's fsync: wait for it off the async
    // threads.
    let key = s.hub.head_key.clone();
    let body = tokio::task::spawn_blocking(move || {
        page_body(&task, &lock(&ledger), key.as_ref(), q.from, limit)
    })
    .await;
    match body {
        Ok(b) => Json(b).into_response(),
        Err(_) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the ledger could not be read",
        ),
    }
}

fn page_body(
    task: &str,
    l: &LedgerFile,
    key: Option<&Identity>,
    from: Option<u64>,
    limit: usize,
) -> serde_json::Value {
    let from = from.unwrap_or(0).min(l.count()) as usize;
    let entries: Vec<_> = l.entries()[from..]
        .iter()
        .take(limit)
        .map(|e| {
            json!({
                "index": e.index,
                "hash": hex(&e.hash),
                "time_ms": e.time_ms,
                "links": e.links,
                "site": e.site,
                "round": e.receipt.round,
                "sender": hex(&e.receipt.sender),
                "receiver": hex(&e.receipt.receiver),
                "samples": e.receipt.samples,
                "flags": e.receipt.flags,
                "receipt": hex(&e.receipt_bytes),
            })
        })
        .collect();
    // The head, signed by the server's key: what peers remember and gossip.
    let signed = key.filter(|_| l.count() > 0).map(|k| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        hex(&SignedHead::sign(k, task, l.count(), l.head(), now).encode())
    });
    json!({
        "task": task,
        "count": l.count(),
        "head": hex(&l.head()),
        "signed_head": signed,
        "server_key": key.map(|k| hex(&k.public())),
        "entries": entries,
    })
}

/// `GET /api/tasks/{task}/ledger/file`: the ledger file as written and synced so far.
pub async fn file(State(s): State<LedgerState>, Path(task): Path<String>) -> Response {
    let ledger = match ledger_of(&s, &task) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let read = tokio::task::spawn_blocking(move || {
        // Every segment as one file: what was written and synced so far.
        lock(&ledger).file_bytes()
    })
    .await;
    match read {
        Ok(Ok(bytes)) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            bytes,
        )
            .into_response(),
        _ => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the ledger could not be read",
        ),
    }
}

/// `?key=HEX`.
#[derive(Deserialize)]
pub struct Who {
    key: Option<String>,
}

/// `GET /api/tasks/{task}/credits`: credits per key and per site (the top
/// [`CREDITS_LISTED`] of each), and with `key` that key's credit and rank.
pub async fn credits(
    State(s): State<LedgerState>,
    Path(task): Path<String>,
    Query(q): Query<Who>,
) -> Response {
    let ledger = match ledger_of(&s, &task) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let me = match q.key.as_deref().map(shoal_shared::protocol::from_hex) {
        None => None,
        Some(Some(k)) if k.len() == 32 => Some(<[u8; 32]>::try_from(k).unwrap_or([0; 32])),
        Some(_) => return refuse(StatusCode::BAD_REQUEST, "key: 64 hex digits"),
    };
    // Off the async threads: the ledger's lock may be held by an fsync. The cache's lock
    // is held while credits are computed, so concurrent requests wait for one
    // computation instead of each running its own.
    let (cache, task2) = (Arc::clone(&s.cache), task.clone());
    let computed = tokio::task::spawn_blocking(move || {
        let mut cache = cache.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (count, head) = {
            let l = lock(&ledger);
            (l.count(), l.head())
        };
        let c = match cache.get(&task2) {
            Some((at, n, c)) if *n == count || at.elapsed() < CREDITS_EVERY => Arc::clone(c),
            _ => {
                let c = Arc::new(credits::compute(lock(&ledger).entries()));
                cache.insert(task2, (Instant::now(), count, Arc::clone(&c)));
                c
            }
        };
        (count, head, c)
    })
    .await;
    let Ok((count, head, c)) = computed else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "credits failed");
    };
    let keys: Vec<_> = c
        .by_key
        .iter()
        .take(CREDITS_LISTED)
        .map(|k| json!({ "key": hex(&k.key), "credit": k.credit, "rounds": k.rounds }))
        .collect();
    let sites: Vec<_> = c
        .by_site
        .iter()
        .take(CREDITS_LISTED)
        .map(|k| json!({ "site": k.site, "credit": k.credit }))
        .collect();
    let mut body = json!({
        "task": task,
        "count": count,
        "head": hex(&head),
        "ranked": c.by_key.len(),
        "keys": keys,
        "sites": sites,
    });
    if let Some(key) = me {
        let mine = c.by_key.iter().find(|k| k.key == key);
        body["me"] = json!({
            "key": hex(&key),
            "credit": mine.map_or(0, |k| k.credit),
            "rounds": mine.map_or(0, |k| k.rounds),
            "rank": c.rank_of(&key),
        });
    }
    Json(body).into_response()
}
