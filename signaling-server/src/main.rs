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
use shoal_shared::task::TaskSpec;
use shoal_signaling_server::http::raise_open_file_limit;
use shoal_signaling_server::ice::IceConfig;
use shoal_signaling_server::precompress::{precompress, precompress_files};
use shoal_signaling_server::{Config, HttpLimits, Limits, SignalingConfig, app, load_task, serve};

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
    /// A task file (TOML; repeat for several tasks). Each is validated at start, data
    /// files included; an error names the file, the field and the problem.
    #[arg(
        long = "task-file",
        env = "SHOAL_TASK_FILES",
        value_delimiter = ',',
        default_value = "tasks/digits.toml"
    )]
    task_files: Vec<PathBuf>,
    /// Token for the researcher's control actions (pause, resume, export); without one
    /// they are refused. Prefer the env variable: command lines are visible to others.
    #[arg(long, env = "SHOAL_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Neighbours per peer (k, 1 to 16) for every task: each peer keeps about k WebRTC
    /// connections. Without it, each task's own `learn.neighbours`
    #[arg(long, env = "SHOAL_NEIGHBOURS")]
    neighbours: Option<usize>,
    /// Origin allowed to open signaling websockets (repeat, or comma-separate in the env
    /// variable); `*` allows any. Without one, only pages from this server may connect.
    #[arg(
        long = "allowed-origin",
        env = "SHOAL_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    /// Address of a reverse proxy in front of the server (repeat, or comma-separate in
    /// the env variable). A request on a connection from it is from the address its
    /// `X-Forwarded-For` header ends with (the one the proxy appends), for every
    /// per-address limit and rule; the proxy's connections take no per-address share.
    #[arg(
        long = "trusted-proxy",
        env = "SHOAL_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<std::net::IpAddr>,
    /// Largest signaling message, in bytes.
    #[arg(long, env = "SHOAL_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024)]
    max_message_bytes: usize,
    /// Most peers per task.
    #[arg(long, env = "SHOAL_MAX_PEERS_PER_TASK", default_value_t = 10_000)]
    max_peers_per_task: usize,
    /// Most open websocket connections.
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS", default_value_t = 19_000)]
    max_connections: usize,
    /// Sustained signaling messages per second per connection.
    #[arg(long, env = "SHOAL_RATE", default_value_t = 50.0)]
    rate: f64,
    /// Burst of the per-connection rate limit.
    #[arg(long, env = "SHOAL_BURST", default_value_t = 200.0)]
    burst: f64,
    /// Close connections silent (no pong either) for this many seconds.
    #[arg(long, env = "SHOAL_IDLE_TIMEOUT", default_value_t = 60)]
    idle_timeout: u64,
    /// Drop a peer whose writes do not complete within this many seconds (it stopped
    /// reading).
    #[arg(long, env = "SHOAL_WRITE_TIMEOUT", default_value_t = 10)]
    write_timeout: u64,
    /// Bytes a second a connection's writes must average while they wait for a slow
    /// reader, after 30 s of it (a download trickled out holds its connection and
    /// buffers); 0 for no floor.
    #[arg(long, env = "SHOAL_MIN_WRITE_RATE",
          default_value_t = shoal_signaling_server::http::MIN_WRITE_RATE)]
    min_write_rate: u64,
    /// Most TCP connections open at once, websockets and downloads included (default:
    /// the open-file limit, raised to its hard maximum at start, less 64). Past it a
    /// connection is answered 503 and closed.
    #[arg(long, env = "SHOAL_MAX_TCP_CONNECTIONS")]
    max_tcp_connections: Option<usize>,
    /// Most TCP connections open at once from one network address (IPv4 address or IPv6
    /// /64); past it a connection is answered 429 and closed. 0 for no share. A proxy
    /// named by --trusted-proxy takes none.
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS_PER_ADDRESS",
          default_value_t = shoal_signaling_server::http::DEFAULT_CONNECTIONS_PER_ADDRESS)]
    max_connections_per_address: usize,
    /// Close a connection whose request head (or next request, kept alive) does not
    /// arrive within this many seconds.
    #[arg(long, env = "SHOAL_HEADER_TIMEOUT", default_value_t = 10)]
    header_timeout: u64,
    /// Most peers in one task from one network address (IPv4 address or IPv6 /64); 0
    /// for no cap. Behind a reverse proxy, name it with --trusted-proxy.
    #[arg(long, env = "SHOAL_MAX_PEERS_PER_ADDRESS", default_value_t = 32)]
    max_peers_per_address: usize,
    /// New websocket connections one network address (IPv4 address or IPv6 /64) may
    /// open per second, sustained, after a burst of --join-burst; past it the upgrade
    /// gets 429. 0 for no limit.
    #[arg(long, env = "SHOAL_JOINS_PER_ADDRESS", default_value_t = 1.0)]
    joins_per_address: f64,
    /// New websocket connections one address may open at once before
    /// --joins-per-address applies.
    #[arg(long, env = "SHOAL_JOIN_BURST", default_value_t = 32.0)]
    join_burst: f64,
    /// The file where the researcher's pauses are kept across restarts (written
    /// atomically on every change).
    #[arg(long, env = "SHOAL_STATE_FILE", default_value = "shoal-state.json")]
    state_file: PathBuf,
    /// The folder of each task's ledger of receipts (`{task}.ledger`, append-only,
    /// hash-chained; created when missing).
    #[arg(long, env = "SHOAL_LEDGER_DIR", default_value = "ledger")]
    ledger_dir: PathBuf,
    /// The size (MB) at which a ledger file is sealed as `{task}.ledger.NNNNNN` and a new
    /// one continues its chain.
    #[arg(long, env = "SHOAL_LEDGER_SEGMENT_MB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    ledger_segment_mb: u64,
    /// Entries a task's ledger takes in all; receipts beyond are refused (`full`). Each
    /// entry costs about 700 bytes of memory and 250 of disk.
    #[arg(long, env = "SHOAL_LEDGER_MAX_ENTRIES",
          default_value_t = shoal_signaling_server::signaling::DEFAULT_LEDGER_MAX_ENTRIES,
          value_parser = clap::value_parser!(u64).range(1..))]
    ledger_max_entries: u64,
    /// Ledger file downloads one address (IPv4 address, IPv6 /48) may run at once; 0 for
    /// no share.
    #[arg(long, env = "SHOAL_LEDGER_DOWNLOADS_PER_ADDRESS", default_value_t = 1)]
    ledger_downloads_per_address: usize,
    /// Ledger pages and credits one address (IPv4 address, IPv6 /48) may have computed
    /// at once, of the 8 the server computes; 0 for no share.
    #[arg(long, env = "SHOAL_LEDGER_READS_PER_ADDRESS",
          default_value_t = shoal_signaling_server::ledger::LEDGER_READS_PER_ADDRESS)]
    ledger_reads_per_address: usize,
    /// STUN URL handed to peers (repeatable).
    #[arg(long, env = "SHOAL_STUN", value_delimiter = ',')]
    stun: Vec<String>,
    /// TURN URL handed to peers (repeatable); needs --turn-secret.
    #[arg(long, env = "SHOAL_TURN", value_delimiter = ',')]
    turn: Vec<String>,
    /// Secret shared with coturn's `static-auth-secret` (prefer the env variable).
    #[arg(long, env = "SHOAL_TURN_SECRET", hide_env_values = true)]
    turn_secret: Option<String>,
    /// Lifetime of TURN credentials, in seconds.
    #[arg(long, env = "SHOAL_TURN_TTL", default_value_t = 3600)]
    turn_ttl: u64,
    /// Threads serving connections (default: one per CPU). Give the server the cores it
    /// has to itself: threads that share a core with another busy process hand work back
    /// and forth instead of doing it. 1 runs everything on one thread.
    #[arg(long, env = "SHOAL_THREADS")]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = match args.threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()
    .context("could not start the runtime")?;
    runtime.block_on(run(args))
}

async fn run(mut args: Args) -> anyhow::Result<()> {
    if !args.www.join("index.html").exists() {
        anyhow::bail!(
            "{} has no index.html (run `cargo xtask run` to build the site)",
            args.www.display()
        );
    }
    // A header value carries the token: visible ASCII only (a space or a control
    // character could never be presented, and the actions would be silently unusable).
    if args
        .admin_token
        .as_ref()
        .is_some_and(|t| t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()))
    {
        anyhow::bail!(
            "--admin-token must be at least 16 visible ASCII characters, no spaces (make it \
             random: `openssl rand -hex 16`)"
        );
    }
    if !args.turn.is_empty() && args.turn_secret.is_none() {
        anyhow::bail!("--turn needs --turn-secret (or SHOAL_TURN_SECRET)");
    }
    // Peers take no more, and no other: an operator's ninth URL (TURN comes after STUN)
    // would be dropped by every peer without a word.
    use shoal_shared::protocol::{MAX_ICE_FIELD, MAX_ICE_URLS, usable_ice_url};
    let ice = args.stun.iter().chain(&args.turn);
    if ice.clone().count() > MAX_ICE_URLS || !ice.clone().all(|u| usable_ice_url(u)) {
        anyhow::bail!(
            "--stun and --turn: at most {MAX_ICE_URLS} URLs in all, each stun:, turn: or \
             turns: and at most {MAX_ICE_FIELD} bytes (peers use no others)"
        );
    }
    // A peer holds up to 2k neighbours and keeps the public copies (weights changes) of
    // at most `MAX_COPIES` signers: with more, copies would be dropped and changes
    // refused every round.
    let most = shoal_shared::learn::MAX_COPIES / 2;
    if args.neighbours.is_some_and(|k| !(1..=most).contains(&k))
        || args.max_message_bytes < 1024
        // NaN, which clap parses, fails too.
        || args.rate.is_nan()
        || args.rate <= 0.0
        || args.burst.is_nan()
        || args.burst < 1.0
        || args.idle_timeout < 3
        || args.write_timeout < 1
        || args.join_burst.is_nan()
        || args.join_burst < 1.0
        || args.joins_per_address.is_nan()
    {
        anyhow::bail!(
            "--neighbours must be within 1..={most}, --max-message-bytes >= 1024, --rate > 0, \
             --burst >= 1, --idle-timeout >= 3, --write-timeout >= 1, --join-burst >= 1, \
             --joins-per-address a number"
        );
    }
    // `a.example, b.example` lists two origins, not one with a leading space.
    args.allowed_origins = args
        .allowed_origins
        .iter()
        .map(|o| o.trim().to_string())
        .filter(|o| !o.is_empty())
        .collect();
    let mut tasks = Vec::new();
    for path in &args.task_files {
        let task = load_task(path, &args.data).map_err(anyhow::Error::msg)?;
        if tasks.iter().any(|t: &TaskSpec| t.name == task.name) {
            anyhow::bail!(
                "{}: a task named {:?} is already loaded",
                path.display(),
                task.name
            );
        }
        tasks.push(task);
    }
    // Each task's k: its own `learn.neighbours`, unless --neighbours sets every task's.
    let mut task_neighbours = std::collections::HashMap::new();
    for (task, path) in tasks.iter().zip(&args.task_files) {
        let k = args.neighbours.unwrap_or(task.learn.neighbours);
        if !(1..=most).contains(&k) {
            anyhow::bail!(
                "{}: learn.neighbours: {k} outside 1..={most} (a peer keeps the public \
                 copies of at most {} neighbours, and holds up to 2k); or pass --neighbours",
                path.display(),
                2 * most
            );
        }
        task_neighbours.insert(task.name.clone(), k);
    }
    if args.allowed_origins.is_empty() && !args.bind.is_loopback() {
        tracing::warn!(
            "no --allowed-origin: browsers may connect only from pages addressed by IP or as \
             localhost; list the origin your visitors use (e.g. https://shoal.example.org)"
        );
    }
    // Data and site downloads cost no compression: the files are compressed once, here.
    let data_files: Vec<&str> = tasks.iter().flat_map(TaskSpec::data_paths).collect();
    let written = precompress_files(&args.data, &data_files) + precompress(&args.www);
    if written > 0 {
        tracing::info!("compressed {written} static file(s) once for gzip downloads");
    }
    // A state file that cannot be read stops the start: guessing would undo a pause.
    let paused = shoal_signaling_server::state::load_paused(&args.state_file)
        .map_err(|e| anyhow::anyhow!("the state file: {e}"))?;
    for task in &paused {
        if !tasks.iter().any(|t| &t.name == task) {
            tracing::warn!("the state file pauses {task:?}, which no task file describes");
        }
    }
    let limits = Limits {
        max_message_bytes: args.max_message_bytes,
        max_peers_per_task: args.max_peers_per_task,
        max_connections: args.max_connections,
        rate_per_sec: args.rate,
        burst: args.burst,
        idle_timeout: Duration::from_secs(args.idle_timeout),
        write_timeout: Duration::from_secs(args.write_timeout),
        max_peers_per_address: args.max_peers_per_address,
        joins_per_address_per_sec: args.joins_per_address,
        join_burst: args.join_burst,
        ping_interval: Duration::from_secs((args.idle_timeout / 3).max(1)),
        ..Limits::default()
    };
    let ice = IceConfig {
        stun: args.stun,
        turn: args.turn,
        turn_secret: args.turn_secret,
        turn_ttl_secs: args.turn_ttl,
    };
    let signaling = SignalingConfig {
        limits,
        neighbours: args.neighbours.unwrap_or(6),
        task_neighbours,
        allowed_origins: args.allowed_origins,
        ice,
        ledger_dir: Some(args.ledger_dir.clone()),
        ledger_segment_bytes: args.ledger_segment_mb << 20,
        ledger_max_entries: args.ledger_max_entries,
        ledger_downloads_per_address: args.ledger_downloads_per_address,
        ledger_reads_per_address: args.ledger_reads_per_address,
    };
    // A ledger folder that cannot be made stops the start: receipts would be lost.
    std::fs::create_dir_all(&args.ledger_dir)
        .map_err(|e| anyhow::anyhow!("the ledger folder {}: {e}", args.ledger_dir.display()))?;
    let files = raise_open_file_limit();
    let fd_cap = shoal_signaling_server::http::connection_cap(files);
    let max_tcp = args.max_tcp_connections.unwrap_or(fd_cap).min(fd_cap);
    if max_tcp == 0 {
        anyhow::bail!("the open-file limit ({files:?}) leaves no room for connections");
    }
    if args.max_tcp_connections.is_some_and(|n| n > fd_cap) {
        tracing::warn!(
            "--max-tcp-connections lowered to {max_tcp}: the open-file limit is {files:?}"
        );
    }
    let http = HttpLimits {
        header_read_timeout: Duration::from_secs(args.header_timeout.max(1)),
        write_stall_timeout: Duration::from_secs(args.write_timeout.max(1)),
        min_write_rate: args.min_write_rate,
        max_connections: max_tcp,
        max_connections_per_address: args.max_connections_per_address,
        trusted_proxies: args.trusted_proxies,
        ..HttpLimits::default()
    };
    let config = Config {
        www: args.www,
        data: args.data,
        signaling,
        tasks,
        admin_token: args.admin_token,
        http,
        state_file: Some(args.state_file),
    };
    let listener = tokio::net::TcpListener::bind((args.bind, args.port))
        .await
        .with_context(|| format!("could not listen on {}:{}", args.bind, args.port))?;
    // The port first (a second server on the same port stops here, before it touches the
    // ledgers the first one writes), then the ledgers are read and verified, and only
    // then does the server say it listens: connections made meanwhile wait in the backlog
    // (a minute or so for a million entries).
    let router = app(&config);
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    println!("Shoal is listening on {base}");
    println!("  health:           {base}/healthz");
    println!("  metrics:          {base}/metrics");
    for t in &config.tasks {
        let name = &t.name;
        println!("  task {name}:");
        println!("    contributor page: {base}/?task={name}");
        println!("    dashboard:        {base}/dashboard/?task={name}");
        println!(
            "    embed snippet:    <script src=\"{base}/embed.js\" data-task=\"{name}\" async></script>"
        );
        println!("    description:      {base}/api/tasks/{name}");
        println!("    signaling:        ws://{addr}/ws/{name}?v=2");
    }
    println!("Press Ctrl-C to stop.");
    serve(listener, router, shutdown_signal(), Duration::from_secs(5)).await?;
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
