//! Shoal's signaling server as a library: the router and its configuration, so that
//! `main.rs` stays thin and tests can start a real server on port 0.
//!
//! At this stage it serves the contributor page, the wasm bundle and the task's data, and
//! answers `/healthz`. It never sees model weights: peers exchange those directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::routing::get;
use tower_http::compression::CompressionLayer;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

/// Everything the server needs to know at start.
#[derive(Clone, Debug)]
pub struct Config {
    /// The static site: contributor page, worker, and the wasm bundle under `pkg/`.
    pub www: PathBuf,
    /// The task data (IDX files) served under `/data/`.
    pub data: PathBuf,
}

/// Builds the router: `/healthz`, `/data/*` and the static site at `/`.
pub fn router(config: &Config) -> Router {
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
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .nest_service("/data", ServeDir::new(&config.data))
        .fallback_service(ServeDir::new(&config.www).append_index_html_on_directories(true))
        .layer(revalidate)
        .layer(nosniff)
        .layer(CompressionLayer::new())
}

/// Serves `router` on `listener` until `shutdown` resolves, then finishes in-flight
/// requests (for at most `grace`) and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
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
