//! Shoal's signaling server as a library: configuration, the router and graceful serving,
//! so that `main.rs` stays thin and tests can start a real server on port 0.
//!
//! It introduces peers over websockets (`signaling.rs`: ids, neighbour sets, relayed
//! offers/answers/candidates, every limit), hands out ICE servers with time-limited TURN
//! credentials (`ice.rs`), serves the contributor page, the wasm bundle and the task's
//! data, and reports `/healthz` and Prometheus `/metrics`. It never sees model weights:
//! peers exchange those directly.

pub mod ice;
pub mod metrics;
pub mod signaling;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use shoal_shared::engine::ModelSpec;
use tower_http::compression::CompressionLayer;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

pub use signaling::{Hub, Limits, SignalingConfig};

/// Everything the server needs to know at start.
#[derive(Clone, Debug)]
pub struct Config {
    /// The static site: contributor page, worker, and the wasm bundle under `pkg/`.
    pub www: PathBuf,
    /// The task data (IDX files) served under `/data/`.
    pub data: PathBuf,
    /// Signaling: limits, neighbours, tasks, origins, ICE.
    pub signaling: SignalingConfig,
}

/// The router plus the state its websockets share.
pub struct App {
    /// All routes.
    pub router: Router,
    /// The signaling state (for shutdown, metrics and tests).
    pub hub: Arc<Hub>,
}

/// Builds the application: `/ws/{task}`, `/api/tasks/{task}`, `/metrics`, `/healthz`,
/// `/data/*` and the static site at `/`.
pub fn app(config: &Config) -> App {
    let hub = Hub::new(config.signaling.clone());
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
    let files = Router::new()
        .nest_service("/data", ServeDir::new(&config.data))
        .fallback_service(ServeDir::new(&config.www).append_index_html_on_directories(true))
        .layer(revalidate)
        .layer(CompressionLayer::new());
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/tasks/{task}", get(task_description))
        .route("/ws/{task}", get(signaling::ws_handler))
        .with_state(Arc::clone(&hub))
        .merge(files)
        .layer(nosniff);
    App { router, hub }
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

/// What a peer needs to know to train on a task. (Task files come with the task
/// definition work; the demo task is built in.)
async fn task_description(
    State(hub): State<Arc<Hub>>,
    Path(task): Path<String>,
) -> impl IntoResponse {
    if task != "digits" || hub.peers_online().iter().all(|(t, _)| t != &task) {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("no task {task:?}") })),
        );
    }
    (
        StatusCode::OK,
        Json(serde_json::json!({
            "name": "digits",
            "title": "Handwritten digits (MNIST)",
            "model": ModelSpec::mlp_digits(),
            "classes": 10,
            "data": {
                "train_images": "/data/digits/train-images.idx",
                "train_labels": "/data/digits/train-labels.idx",
                "test_images": "/data/digits/test-images.idx",
                "test_labels": "/data/digits/test-labels.idx",
            },
        })),
    )
}

/// Serves `app` on `listener` until `shutdown` resolves; then tells every websocket to
/// close, finishes in-flight requests (for at most `grace`) and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let hub = Arc::clone(&app.hub);
    let server = axum::serve(
        listener,
        app.router
            .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        hub.shut_down();
        let _ = done_tx.send(());
    });
    tokio::select! {
        r = server => r,
        () = async {
            let _ = done_rx.await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("connections still open after {grace:?}; closing them");
            Ok(())
        }
    }
}
