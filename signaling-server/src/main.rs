//! The signaling server binary.
//!
//! ```text
//! cargo run --release -p shoal-signaling-server -- --port 8080 --www www --data data
//! ```
//! (`cargo xtask run` builds the bundle and the data first, then runs this.)

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use shoal_signaling_server::{Config, router, serve};

/// Shoal's signaling server: introduces peers, serves the pages and the task.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "SHOAL_BIND", default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Port to listen on (0 picks a free one; the chosen port is printed).
    #[arg(long, env = "SHOAL_PORT", default_value_t = 8080)]
    port: u16,
    /// Folder of the static site (contributor page and wasm bundle).
    #[arg(long, env = "SHOAL_WWW", default_value = "www")]
    www: PathBuf,
    /// Folder of task data, served under /data/.
    #[arg(long, env = "SHOAL_DATA", default_value = "data")]
    data: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !args.www.join("index.html").exists() {
        anyhow::bail!(
            "{} has no index.html (run `cargo xtask run` to build the site)",
            args.www.display()
        );
    }
    let listener = tokio::net::TcpListener::bind((args.bind, args.port))
        .await
        .with_context(|| format!("could not listen on {}:{}", args.bind, args.port))?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    println!("Shoal is listening on {base}");
    println!("  contributor page: {base}/");
    println!("  health:           {base}/healthz");
    println!("Press Ctrl-C to stop.");
    let config = Config {
        www: args.www,
        data: args.data,
    };
    serve(
        listener,
        router(&config),
        shutdown_signal(),
        Duration::from_secs(5),
    )
    .await?;
    Ok(())
}

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("shutting down");
}
