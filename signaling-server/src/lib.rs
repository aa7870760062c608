//! Shoal's signaling server as a library: configuration, the router and graceful serving,
//! so that `main.rs` stays thin and tests can start a real server on port 0.
//!
//! It introduces peers over websockets (`signaling.rs`: ids, neighbour sets, relayed
//! offers/answers/candidates, every limit), hands out ICE servers with time-limited TURN
//! credentials (`ice.rs`), serves the contributor page, the wasm bundle and the task's
//! data, and reports `/healthz` and Prometheus `/metrics`. It never sees model weights:
//! peers exchange those directly.

pub mod admin;
pub mod http;
pub mod ice;
pub mod ledger;
pub mod metrics;
pub mod precompress;
pub mod signaling;
pub mod state;
mod upgrade;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use shoal_shared::engine::Model;
use shoal_shared::learn::Compression;
use shoal_shared::task::TaskSpec;
use tower_http::compression::CompressionLayer;
use tower_http::services::{ServeDir, ServeFile};
use tower_http::set_header::{SetResponseHeader, SetResponseHeaderLayer};

pub use http::HttpLimits;
pub use signaling::{Hub, Limits, SignalingConfig};

/// Everything the server needs to know at start.
#[derive(Clone, Debug)]
pub struct Config {
    /// The static site: contributor page, worker, and the wasm bundle under `pkg/`.
    pub www: PathBuf,
    /// The task data (IDX files) served under `/data/`.
    pub data: PathBuf,
    /// Signaling: limits, neighbours, origins, ICE.
    pub signaling: SignalingConfig,
    /// The tasks, validated ([`load_task`]); served at `/api/tasks/{name}`.
    pub tasks: Vec<TaskSpec>,
    /// The token the researcher's control actions need; `None` refuses them all.
    pub admin_token: Option<String>,
    /// Bounds on every TCP connection.
    pub http: HttpLimits,
    /// Where the researcher's pauses are kept across restarts ([`state`]); `None` keeps
    /// them in memory only.
    pub state_file: Option<PathBuf>,
}

/// Reads a task file and validates it, its data files included (paths relative to
/// `data`). The error names the file, the field and the problem.
pub fn load_task(path: &std::path::Path, data: &std::path::Path) -> Result<TaskSpec, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let task = TaskSpec::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    // A task on visitors' own files has only its test split here.
    let loaded = if task.is_local() {
        task.load_test_dataset(data).map(|_| ())
    } else {
        task.load_datasets(data).map(|_| ())
    };
    loaded.map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(task)
}

/// The router plus the state its websockets share.
pub struct App {
    /// All routes.
    pub router: Router,
    /// The signaling state (for shutdown, metrics and tests).
    pub hub: Arc<Hub>,
    /// Bounds on every TCP connection.
    pub http: HttpLimits,
}

/// Builds the application: `/ws/{task}`, `/api/tasks/{task}`, `/metrics`, `/healthz`,
/// `/data/*` and the static site at `/`.
pub fn app(config: &Config) -> App {
    // Peers may join exactly the tasks that are described (and validated).
    let names: Vec<String> = config.tasks.iter().map(|t| t.name.clone()).collect();
    let paused = match &config.state_file {
        Some(path) => state::load_paused(path).unwrap_or_else(|e| {
            // `main` checks the file before it gets here; this is a file changed since.
            tracing::error!("{e}: starting with every task running");
            Vec::new()
        }),
        None => Vec::new(),
    };
    let hub = Hub::new(
        config.signaling.clone(),
        &names,
        &paused,
        config.state_file.clone(),
    );
    let revisions: Arc<HashMap<String, Revision>> = Arc::new(
        config
            .tasks
            .iter()
            .map(|t| {
                let k = config.signaling.neighbours_for(&t.name);
                (t.name.clone(), revision(&served(t, k), t, &config.data))
            })
            .collect(),
    );
    hub.set_revisions(
        revisions
            .iter()
            .map(|(name, r)| (name.clone(), r.revision.clone()))
            .collect(),
    );
    // Bundle file names carry no content hash, so browsers must revalidate every time
    // (cheap: ServeDir answers conditional requests with 304).
    let revalidate = SetResponseHeaderLayer::overriding(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    let nosniff = SetResponseHeaderLayer::overriding(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Only the widget's frame may be framed (by any site: that is its job). Every other
    // page refuses to be, so no site can lay its own content over Shoal's consent button
    // or controls (clickjacking).
    // The site's `.gz` siblings too (written at start), unless the file changed since.
    let site = SetResponseHeader::overriding(
        ServeDir::new(&config.www)
            .append_index_html_on_directories(true)
            .precompressed_gzip(),
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'self'"),
    );
    let embed: Router = match embed_script(config, &revisions) {
        Some(script) => Router::new().route(
            "/embed.js",
            get(move || {
                let script = script.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                        script,
                    )
                }
            }),
        ),
        None => Router::new(),
    };
    let files = embed
        // The data's `.gz` siblings, written once at start (`precompress`), go to
        // clients that accept gzip: downloads cost no compression.
        .nest(
            "/data",
            Router::new()
                .fallback_service(ServeDir::new(&config.data).precompressed_gzip())
                .layer(axum::middleware::from_fn_with_state(
                    Arc::new(
                        config
                            .tasks
                            .iter()
                            .flat_map(TaskSpec::data_paths)
                            .map(str::to_string)
                            .collect::<std::collections::HashSet<String>>(),
                    ),
                    only_task_files,
                )),
        )
        .route_service("/embed.html", ServeFile::new(config.www.join("embed.html")))
        .fallback_service(site)
        .layer(revalidate)
        // A `.gz` sent as it is differs by `Accept-Encoding` too: caches between must
        // key on it (the compression layer says so for what it compresses).
        .layer(SetResponseHeaderLayer::if_not_present(
            header::VARY,
            HeaderValue::from_static("accept-encoding"),
        ))
        .layer(CompressionLayer::new())
        // Outside the compression layer: a site or data file changed (or gone) since its
        // `.gz` was made goes uncompressed (`fresh_gzip_only`).
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(precompress::Roots {
                www: config.www.clone(),
                data: config.data.clone(),
            }),
            precompress::fresh_gzip_only,
        ))
        .layer(axum::middleware::from_fn(cross_origin_headers));
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/ws/{task}", get(signaling::ws_handler))
        .with_state(Arc::clone(&hub))
        .merge(
            Router::new()
                .route("/api/tasks/{task}", get(task_description))
                .with_state(TaskState {
                    tasks: Arc::new(config.tasks.clone()),
                    data: Arc::new(config.data.clone()),
                    hub: Arc::clone(&hub),
                    revisions,
                }),
        )
        .merge(
            Router::new()
                .route("/api/tasks/{task}/ledger", get(ledger::page))
                .route("/api/tasks/{task}/ledger/file", get(ledger::file))
                .route("/api/tasks/{task}/credits", get(ledger::credits))
                .with_state(ledger::LedgerState::new(Arc::clone(&hub))),
        )
        .merge(
            Router::new()
                .route("/api/tasks/{task}/swarm", get(admin::swarm))
                .route("/api/tasks/{task}/{action}", post(admin::pause))
                .with_state(admin::AdminState {
                    hub: Arc::clone(&hub),
                    token: config.admin_token.as_deref().map(Arc::from),
                    views: Arc::default(),
                }),
        )
        .merge(files)
        .layer(nosniff)
        .layer(axum::middleware::from_fn(refuse_long_uris));
    App {
        router,
        hub,
        http: config.http.clone(),
    }
}

/// Serves from the data folder only the files the tasks name (their paths relative to
/// it, as `/api/tasks/{task}` lists them): the folder may hold others (a researcher's raw
/// data, files of a task not run), and `/data/` served every one.
async fn only_task_files(
    State(allowed): State<Arc<std::collections::HashSet<String>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if allowed.contains(request.uri().path().trim_start_matches('/')) {
        next.run(request).await
    } else {
        (StatusCode::NOT_FOUND, "no such data file\n").into_response()
    }
}

/// Lets a page that isolates itself (`Cross-Origin-Embedder-Policy: require-corp`, as
/// sites that need `SharedArrayBuffer` do) load the widget: every file here may be loaded
/// by another origin (`Cross-Origin-Resource-Policy: cross-origin`; they are public), and
/// the widget's frame and the workers a page starts say `require-corp` themselves, as a
/// frame in such a page, and a worker it starts, must (all they load is Shoal's own).
/// Without these such a page got no card at all: its browser blocked `embed.js`.
async fn cross_origin_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let isolated = matches!(
        request.uri().path(),
        "/embed.html" | "/worker.js" | "/observer-worker.js"
    );
    // The widget's consent window (`consent.html`) is opened by the widget's frame, inside
    // another site's page, and tells that frame the visitor's answer: it must stay in the
    // frame's browsing context group. Only the frame holds it (opened unnamed, no page
    // can look it up), and it cannot be framed.
    let opened_by_widget = request.uri().path() == "/consent.html";
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("cross-origin"),
    );
    // Every page opens in a browsing context group of its own: a window of another site
    // that opened it, or that it replaced (a site that sends its own tab to Shoal's page
    // and keeps a popup), holds no reference to it, so cannot move its address to
    // `#consent` (which focuses the button for the visitor's next Space) nor anything
    // else. (A framed document's is ignored: the widget's frame is as before; opened as a
    // popup, it was the one page its opener kept a hold of.)
    if !opened_by_widget {
        headers.insert(
            header::HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        );
    }
    if isolated {
        headers.insert(
            header::HeaderName::from_static("cross-origin-embedder-policy"),
            HeaderValue::from_static("require-corp"),
        );
    }
    response
}

/// The longest request target (path and query) served; no Shoal URL comes near it.
pub const MAX_URI_BYTES: usize = 2048;

/// The longest segment of a path (between slashes, as sent) served: names longer than a
/// file system takes (255 bytes, with the `.gz` the file services look for first) made
/// them fail to open the file with an error that they answer 500 to and log at ERROR, a
/// line per request for anyone to send.
pub const MAX_SEGMENT_BYTES: usize = 255 - ".gz".len();

/// Answers a request target longer than [`MAX_URI_BYTES`] with 414, and a path with a
/// segment longer than [`MAX_SEGMENT_BYTES`] with 404, before any handler (or the file
/// system) sees it.
async fn refuse_long_uris(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let len = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if len > MAX_URI_BYTES {
        return (
            StatusCode::URI_TOO_LONG,
            format!("request target of {len} bytes; the limit is {MAX_URI_BYTES}\n"),
        )
            .into_response();
    }
    if request
        .uri()
        .path()
        .split('/')
        .any(|s| s.len() > MAX_SEGMENT_BYTES)
    {
        return (StatusCode::NOT_FOUND, "no such file\n").into_response();
    }
    next.run(request).await
}

async fn metrics(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    let body = hub.metrics.render(&hub.peers_online(), hub.connections());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// What `/api/tasks/{task}` needs: the tasks, the data folder, the hub (for each task's
/// neighbours and the swarm's pace) and each task's revision.
#[derive(Clone)]
struct TaskState {
    tasks: Arc<Vec<TaskSpec>>,
    data: Arc<PathBuf>,
    hub: Arc<Hub>,
    revisions: Arc<HashMap<String, Revision>>,
}

/// What identifies the task a server runs: each data file's SHA-256 (hex, in the order
/// of the description's `files`), as read at start, and the revision, a SHA-256 of the
/// task as served and those digests (32 hex digits). Peers check the files they download
/// against the digests (a file changed on the server since is refused), and name the
/// revision when they connect (a client that loaded the task before it changed is
/// refused with `task_changed`).
#[derive(Clone, Debug, Default)]
struct Revision {
    files_sha256: Vec<String>,
    revision: String,
}

/// The task as this server runs it: its k is `--neighbours` (`k`) where that overrides
/// it.
fn served(task: &TaskSpec, k: usize) -> serde_json::Value {
    let mut served = task.clone();
    served.learn.neighbours = k;
    shortest(&served)
}

/// `task`'s [`Revision`], as served (`served`) with its data files in `data`.
fn revision(served: &serde_json::Value, task: &TaskSpec, data: &std::path::Path) -> Revision {
    use shoal_shared::learn::identity::hex;
    use shoal_shared::task::{MAX_DATA_BYTES, read_at_most};
    use shoal_shared::trust::receipt::sha256;
    let files_sha256: Vec<String> = task
        .data_paths()
        .iter()
        .map(|p| {
            read_at_most(&data.join(p), MAX_DATA_BYTES)
                .map_or_else(|_| String::new(), |b| hex(&sha256(&b)))
        })
        .collect();
    let mut text = format!("shoal-task-revision-v1\n{served}\n");
    for d in &files_sha256 {
        text.push_str(d);
        text.push('\n');
    }
    Revision {
        revision: hex(&sha256(text.as_bytes())[..16]),
        files_sha256,
    }
}

/// What a peer needs to know to train on a task: the task as its file describes it, the
/// URLs of its data files in the order `TaskSpec::datasets` takes them, and what
/// contributing costs.
async fn task_description(
    State(TaskState {
        tasks,
        data,
        hub,
        revisions,
    }): State<TaskState>,
    Path(name): Path<String>,
) -> impl IntoResponse {
    let Some(task) = tasks.iter().find(|t| t.name == name) else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("no task {name:?}") })),
        );
    };
    let files: Vec<String> = task
        .data_paths()
        .iter()
        .map(|p| format!("/data/{p}"))
        .collect();
    let k = hub.config.neighbours_for(&name);
    let revision = revisions.get(&name).cloned().unwrap_or_default();
    (
        StatusCode::OK,
        Json(serde_json::json!({
            "task": served(task, k),
            "files": files,
            "files_sha256": revision.files_sha256,
            "revision": revision.revision,
            // Differential privacy as peers apply it (`null`: none): the noise solved from
            // a target epsilon, and the epsilon a peer reaches at its budget.
            "privacy": task.privacy.resolve().ok().flatten(),
            "cost": with_observers(
                with_pace(
                    cost(task, &data, 2 * k),
                    task,
                    hub.pace(&name),
                ),
                hub.roles(&name),
            ),
        })),
    )
}

/// `value` as JSON with each `f32` written as its shortest form (0.8, where a
/// `serde_json::Value` holds it as the f64 0.800000011920929): serialized as text first,
/// where serde_json writes an f32 as one, then read back.
fn shortest(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_string(value)
        .and_then(|text| serde_json::from_str(&text))
        .unwrap_or(serde_json::Value::Null)
}

/// What contributing to `task` costs a visitor, for consent texts: a peer sends its
/// update to each neighbour, and holds up to `max_neighbours` (2k) of them.
fn cost(task: &TaskSpec, data: &std::path::Path, max_neighbours: usize) -> serde_json::Value {
    let download: u64 = task
        .data_paths()
        .iter()
        .filter_map(|p| std::fs::metadata(data.join(p)).ok())
        .map(|m| m.len())
        .sum();
    let params = Model::new(task.model.clone()).map_or(0, |m| m.param_len());
    let update = task.learn.compression.approx_bytes(params);
    // With weights changes, every 30th round's update is a keyframe (whole weights in
    // int8): a round costs `update + (keyframe - update) / 30` on average.
    let keyframe = task
        .learn
        .weights_changes()
        .then(|| Compression::Int8 { block: 256 }.approx_bytes(params));
    let per_round = keyframe.map_or(update, |k| {
        update
            + k.saturating_sub(update)
                .div_ceil(shoal_shared::learn::KEYFRAME_EVERY as usize)
    });
    serde_json::json!({
        "parameters": params,
        "download_bytes": download,
        "update_bytes": update,
        "keyframe_bytes": keyframe,
        "max_neighbours": max_neighbours,
        "bytes_per_round": per_round * max_neighbours,
        "local_steps_per_round": task.learn.local_steps,
        "round_ms": task.learn.round_ms,
        "batch": task.train.batch,
        // A `model` answer (kind 10): header, round, count, the weights' length, weights
        // and momentum in int8 (tag, count, block, scales, values each), digest.
        "model_bytes": 5 + 8 + 4 + 4 + 2 * (9 + 4 * params.div_ceil(256) + params) + 32,
        // What an observer takes per answer: an `observed` message (header, round, base,
        // digest) carrying the change in int8 (tag, count, block, scales, values), or the
        // whole weights in fp32 (tag, count, values).
        "observe_bytes": 77 + 9 + 4 * params.div_ceil(256) + params,
        "observe_whole_bytes": 77 + 5 + 4 * params,
        // The most model answers (to joiners, lagging peers and observers together) send
        // an hour, sustained.
        "answer_bytes_per_hour": (shoal_shared::learn::peer::answer_bytes_per_ms(
            params,
            task.learn.upload_bytes_per_ms(),
        ) * 3.6e6)
            .round(),
    })
}

/// Adds what open dashboards can take from a training peer: every observer asks
/// [`OBSERVE_ASK`](shoal_shared::learn::peer::OBSERVE_ASK) trainers every
/// [`OBSERVE_EVERY_MS`](shoal_shared::learn::peer::OBSERVE_EVERY_MS), the same ones each
/// time, for the change since its last download (`observe_bytes`), with whole weights
/// when it draws one anew (every
/// [`OBSERVE_REDRAW`](shoal_shared::learn::peer::OBSERVE_REDRAW) downloads): a trainer
/// every observer asks sends `observer_bytes_per_hour` (whole weights every time to
/// observers beyond the [`MAX_OBSERVED`](shoal_shared::learn::peer::MAX_OBSERVED) it
/// keeps the weights of), at most `answer_bytes_per_hour`.
fn with_observers(
    mut cost: serde_json::Value,
    (_trainers, observers): (usize, usize),
) -> serde_json::Value {
    use shoal_shared::learn::peer::{MAX_OBSERVED, OBSERVE_EVERY_MS, OBSERVE_REDRAW};
    let change = cost["observe_bytes"].as_f64().unwrap_or(0.0);
    let whole = cost["observe_whole_bytes"].as_f64().unwrap_or(0.0);
    let answers = 3_600_000.0 / OBSERVE_EVERY_MS;
    let kept = observers.min(MAX_OBSERVED) as f64;
    let beyond = observers.saturating_sub(MAX_OBSERVED) as f64;
    // Observers' answers are model answers: never more than those may send.
    let per_hour = (kept * (answers * change + answers / OBSERVE_REDRAW as f64 * (whole - change))
        + beyond * answers * whole)
        .min(
            cost["answer_bytes_per_hour"]
                .as_f64()
                .unwrap_or(f64::INFINITY),
        );
    cost["observers"] = serde_json::json!(observers);
    cost["observer_bytes_per_hour"] = serde_json::json!(per_hour.round());
    cost
}

/// Adds the swarm's pace to a task's cost: rounds per hour at the median peer's
/// throughput (`samples_per_s` / (local steps x batch)), `null` while no peer reports
/// training; for rounds sized in time at most one per `round_ms`, whatever the pace. And
/// the upload per hour that makes at most.
fn with_pace(
    mut cost: serde_json::Value,
    task: &TaskSpec,
    samples_per_s: Option<f64>,
) -> serde_json::Value {
    let per_round = (task.learn.local_steps as f64 * task.train.batch as f64).max(1.0);
    let rounds = if task.learn.timed() {
        Some((3_600_000.0 / f64::from(task.learn.round_ms)).floor())
    } else {
        samples_per_s.map(|r| (3600.0 * r / per_round).round())
    };
    // The upload budget bounds both: a peer's updates wait until they are paid at its
    // rate (what a round's copies to every neighbour cost, in time).
    let budget =
        (task.learn.upload_mb_per_hour > 0).then(|| f64::from(task.learn.upload_mb_per_hour) * 1e6);
    let rounds = match (rounds, budget, cost["bytes_per_round"].as_f64()) {
        (Some(n), Some(b), Some(per)) if per > 0.0 => Some(n.min((b / per).floor().max(1.0))),
        (n, ..) => n,
    };
    let bytes = rounds
        .zip(cost["bytes_per_round"].as_f64())
        .map(|(n, b)| (n * b).round());
    let bytes = match (bytes, budget) {
        (Some(x), Some(b)) => Some(x.min(b)),
        (x, _) => x,
    };
    cost["upload_mb_per_hour"] = serde_json::json!(task.learn.upload_mb_per_hour);
    cost["rounds_per_hour"] = serde_json::json!(rounds);
    cost["bytes_per_hour"] = serde_json::json!(bytes);
    cost
}

/// The embed script with every task's cost written into it (its `var COSTS = {};`), so
/// that the consent card can state the cost before the visitor agrees to anything, and
/// without a second request, with the task's revision: the frame trains only that
/// revision, the terms the card stated. `None` if the file cannot be read.
fn embed_script(config: &Config, revisions: &HashMap<String, Revision>) -> Option<String> {
    let text = std::fs::read_to_string(config.www.join("embed.js")).ok()?;
    let costs: serde_json::Map<String, serde_json::Value> = config
        .tasks
        .iter()
        .map(|t| {
            let c = cost(
                t,
                &config.data,
                2 * config.signaling.neighbours_for(&t.name),
            );
            let dp = t.privacy.resolve().ok().flatten();
            let brief = serde_json::json!({
                "download_bytes": c["download_bytes"],
                "bytes_per_round": c["bytes_per_round"],
                "upload_mb_per_hour": t.learn.upload_mb_per_hour,
                "answer_bytes_per_hour": c["answer_bytes_per_hour"],
                "epsilon": dp.map(|d| d.epsilon),
                "delta": dp.map(|d| d.delta),
                "on_budget": dp.map(|d| d.on_budget),
                "local": t.is_local(),
                "revision": revisions.get(&t.name).map(|r| r.revision.clone()),
            });
            (t.name.clone(), brief)
        })
        .collect();
    let json = serde_json::Value::Object(costs).to_string();
    // Served without its whole-line comments: every visitor of every site that embeds
    // the widget loads this script before consent (a fifth of it was comments). No line
    // of it starts a string that goes on to the next (ES5, no template literals).
    let text: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .flat_map(|l| [l, "\n"])
        .collect();
    // JSON in a script: no `</script>` or comment tricks can come from task names (they
    // are a-z, 0-9 and -), and `<` is escaped anyway.
    Some(text.replacen(
        "var COSTS = {};",
        &format!("var COSTS = {};", json.replace('<', "\\u003c")),
        1,
    ))
}

/// Serves `app` on `listener` until `shutdown` resolves; then tells every websocket to
/// close, finishes in-flight requests (for at most `grace`) and returns. Every
/// connection is held to `app.http`'s bounds.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    http::serve(listener, app.router, app.hub, app.http, shutdown, grace).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observers_take_at_most_what_model_answers_may_send() {
        let cost = serde_json::json!({
            "observe_bytes": 100.0,
            "observe_whole_bytes": 400.0,
            "answer_bytes_per_hour": 1e9,
        });
        // One observer: 360 answers an hour, 12 of them whole weights.
        let one = with_observers(cost.clone(), (2, 1));
        assert_eq!(
            one["observer_bytes_per_hour"].as_f64(),
            Some(348.0 * 100.0 + 12.0 * 400.0)
        );
        let mut held = cost;
        held["answer_bytes_per_hour"] = serde_json::json!(1_000.0);
        let capped = with_observers(held, (2, 1));
        assert_eq!(capped["observer_bytes_per_hour"].as_f64(), Some(1_000.0));
    }

    #[test]
    fn without_an_upload_budget_the_cost_states_the_model_answers_rate() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tasks/fortunes.toml"
        ))
        .expect("the text task");
        let task = TaskSpec::from_toml(&text).expect("valid");
        assert_eq!(task.learn.upload_mb_per_hour, 0);
        let c = cost(&task, std::path::Path::new("/nonexistent"), 12);
        let params = c["parameters"].as_f64().expect("parameters");
        assert!(params > 50_000.0, "{c}");
        // One whole fp32 model and 64 KiB every 20 s: 180 of them an hour.
        assert_eq!(
            c["answer_bytes_per_hour"].as_f64(),
            Some((8.0 * params + 65_536.0) * 180.0),
            "{c}"
        );
    }
}
