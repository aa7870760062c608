//! The native Shoal peer: joins a task's swarm like a browser does and trains with it,
//! on the GPU when wgpu finds an adapter and on the CPU otherwise. As a keeper it also
//! checkpoints the model (and exports it as `model.safetensors`), so that the model survives when every browser has left.
//!
//! ```text
//! cargo run --release -p shoal-web-client --bin shoal-peer -- \
//!     --server ws://127.0.0.1:8080 --task digits [--keeper DIR] [--identity FILE]
//! ```
//!
//! It prints one progress line per round: `round R loss L acc A% peers N up U down D
//! used K rejected X`, and for a text task ` bits/byte B` after it (the held-out loss of
//! the current model on a fixed subset of the held-out split). It witnesses the task's
//! ledger every 15 s (docs/protocol.md, "Signed heads and gossip") and prints `ledger
//! intact N` the first time its head checks out, `ledger changed: ...` if the server is
//! caught rewriting it. With `--echo` it does not train: every message is sent back to its
//! sender and events are printed as `up <id>`, `peer-up <id>`, `message <from> <bytes>
//! <sha256>`, ... (the transport tests use this).

#[cfg(not(target_arch = "wasm32"))]
fn main() -> anyhow::Result<()> {
    peer::main()
}

/// The browser build of the peer is the wasm library; this binary is native only.
#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
mod peer {
    use std::net::IpAddr;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail};
    use clap::Parser;
    use sha2::{Digest, Sha256};
    use shoal_shared::engine::train::Samples;
    use shoal_shared::learn::Identity;
    use shoal_shared::protocol::from_hex;
    use shoal_shared::task::TaskSpec;
    use shoal_shared::trust::head::Verdict;
    use shoal_web_client::keeper::Keeper;
    use shoal_web_client::learning::SwarmTrainer;
    use shoal_web_client::native::{NativeOptions, NativeSwarm};
    use shoal_web_client::swarm::{MAX_MESSAGE, SwarmEvent, Transport};

    /// A native Shoal peer.
    #[derive(Parser, Debug)]
    #[command(version, about)]
    struct Args {
        /// The signaling server, e.g. ws://127.0.0.1:8080.
        #[arg(long, env = "SHOAL_SERVER", default_value = "ws://127.0.0.1:8080")]
        server: String,
        /// The task to join.
        #[arg(long, env = "SHOAL_TASK", default_value = "digits")]
        task: String,
        /// A task file (TOML) to train instead of the server's description of the task;
        /// it must describe the same task (checked against the server's).
        #[arg(long, env = "SHOAL_TASK_FILE")]
        task_file: Option<PathBuf>,
        /// Local address for WebRTC (ICE) sockets; 0.0.0.0 uses every interface.
        #[arg(long, env = "SHOAL_BIND", default_value = "0.0.0.0")]
        bind: IpAddr,
        /// Directory with the task's data (the task file's paths are relative to it).
        #[arg(long, env = "SHOAL_DATA", default_value = "data")]
        data: PathBuf,
        /// A task on local data (`source = "local"`): train on the files under this folder
        /// (PNG images in folders named after their class or listed in a labels.csv, CSV
        /// rows, or text files, as the task says). They never leave this machine. Needs
        /// --task-file: the task as you accept it, its privacy above all.
        #[arg(long, env = "SHOAL_LOCAL_DATA")]
        local_data: Option<PathBuf>,
        /// This peer's ed25519 key file; created (mode 0600) when missing.
        #[arg(long, env = "SHOAL_IDENTITY", default_value = "shoal-peer.key")]
        identity: PathBuf,
        /// Keep checkpoints of the model in this directory and resume from the newest.
        #[arg(long, env = "SHOAL_KEEPER")]
        keeper: Option<PathBuf>,
        /// Rounds between checkpoints.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        checkpoint_every: u64,
        /// Stop after this many rounds of the model (0: run until Ctrl-C).
        #[arg(long, default_value_t = 0)]
        rounds: u64,
        /// Train on the CPU even when a GPU adapter exists.
        #[arg(long)]
        cpu: bool,
        /// Do not train: answer every message by sending it back.
        #[arg(long)]
        echo: bool,
        /// Test hook: pause this many milliseconds in the middle of each checkpoint write.
        #[arg(long, hide = true, default_value_t = 0)]
        pause_mid_checkpoint_ms: u64,
    }

    #[tokio::main]
    pub(crate) async fn main() -> Result<()> {
        let args = Args::parse();
        // This peer speaks no TLS: a `wss://` server (or anything else) is refused now,
        // not retried in silence forever.
        if !args.server.starts_with("ws://") {
            anyhow::bail!(
                "--server {}: a ws:// URL is needed (this peer speaks no TLS; reach the server's plain port, e.g. ws://HOST:8080, over a network you trust)",
                args.server
            );
        }
        // Training on this machine's files, the task (its `[privacy]` above all) is the
        // one its user keeps: the server's is checked against it. Without it, a server
        // restarted with the privacy dropped or weakened had this peer send its files'
        // updates without the noise, saying so only in its progress lines.
        if args.local_data.is_some() && args.task_file.is_none() {
            anyhow::bail!(
                "--local-data needs --task-file: the task as you accept it, its [privacy] table above all (the server's task is checked against it, and a difference stops this peer)"
            );
        }
        let mut url = format!(
            "{}/ws/{}?v={}",
            args.server.trim_end_matches('/'),
            args.task,
            shoal_shared::protocol::VERSION
        );
        // A training peer proves its key to the server, so that its receipts count.
        let identity = if args.echo {
            None
        } else {
            Some(identity(&args.identity)?)
        };
        // A training peer takes no message longer than its task's largest; the echo
        // peer (a test tool) takes any.
        let task = if args.echo {
            None
        } else {
            let (task, revision, digests) = task(&args).await?;
            check_data(&task, &args.data, &digests)?;
            if revision.is_none() {
                eprintln!(
                    "shoal: the server gave no revision of the task: this peer is not told if the task changes on the server (a restart with other settings) and would train on with this one"
                );
            }
            // The connection names the server's revision of the task it trains: once the
            // server runs another (restarted with the task or its data changed), it is
            // refused (`task_changed`) and this peer stops.
            if let Some(r) = revision {
                url.push_str(&format!("&revision={r}"));
            }
            Some(task)
        };
        let swarm = NativeSwarm::connect(NativeOptions {
            url,
            udp_addrs: vec![format!("{}:0", args.bind)],
            mdns: false,
            identity,
            max_message: task
                .as_ref()
                .map_or(MAX_MESSAGE, shoal_web_client::swarm::max_message_for_task),
            link_bytes: task
                .as_ref()
                .and_then(shoal_web_client::swarm::link_bytes_for_task),
            signaling_timeout: shoal_web_client::native::SIGNALING_TIMEOUT,
        });
        match task {
            Some(task) => train(&args, task, swarm).await,
            None => echo(swarm).await,
        }
    }

    /// Resolves at the first Ctrl-C (SIGINT) or SIGTERM, the signal service managers
    /// (systemd, docker) stop a process with: on SIGTERM the peer died at once, its
    /// keeper without its last checkpoint.
    async fn stop_signal() {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
        }
        let _ = tokio::signal::ctrl_c().await;
    }

    async fn echo(mut swarm: NativeSwarm) -> Result<()> {
        // One listener for the whole run: a `ctrl_c()` made anew each turn of the loop
        // misses a Ctrl-C that arrives between turns.
        let ctrl_c = stop_signal();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => break,
                ev = swarm.next_event() => {
                    let Some(ev) = ev else { break };
                    match ev {
                        SwarmEvent::Signaling { me: Some(me) } => println!("up {me}"),
                        SwarmEvent::Signaling { me: None } => println!("down"),
                        SwarmEvent::PeerUp(p) => println!("peer-up {p}"),
                        SwarmEvent::PeerDown(p) => println!("peer-down {p}"),
                        SwarmEvent::TaskState { paused } => println!("task-state {paused}"),
                        SwarmEvent::TaskChanged => println!("task-changed"),
                        SwarmEvent::Message { from, data } => {
                            let hash: String = Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
                            println!("message {from} {} {hash}", data.len());
                            if let Err(e) = swarm.send(from, data) {
                                eprintln!("echo to {from} failed: {e}");
                            }
                        }
                    }
                }
            }
        }
        swarm.close().await;
        Ok(())
    }

    /// Where the updates a key sent under a task's privacy budget are counted: beside
    /// the key file, one per task.
    fn privacy_file(identity: &Path, task: &str) -> PathBuf {
        let mut name = identity.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".privacy-{task}"));
        identity.with_file_name(name)
    }

    /// The count kept in `path` and the noise multiplier it was spent at (`0 1` when
    /// there is none yet).
    fn read_privacy_sent(path: &Path) -> Result<(u64, f64)> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut parts = text.split_whitespace();
                let rounds = parts.next().and_then(|r| r.parse().ok());
                let z = parts.next().and_then(|z| z.parse().ok());
                match (rounds, z, parts.next()) {
                    (Some(r), Some(z), None) => Ok((r, z)),
                    _ => anyhow::bail!(
                        "{}: not `ROUNDS NOISE_MULTIPLIER`; it counts this key's privacy budget",
                        path.display()
                    ),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((0, 1.0)),
            Err(e) => Err(e).with_context(|| format!("{}", path.display())),
        }
    }

    /// Replaces the count in `path` whole (written aside, then renamed into place), and
    /// makes it durable before it returns: the update that raised it leaves next, and a
    /// count that a power cut rolled back would let a restart spend the budget again.
    fn write_privacy_sent(path: &Path, rounds: u64, z: f64) -> Result<()> {
        use std::io::Write;
        shoal_web_client::keeper::replace_durably(path, |f| {
            f.write_all(format!("{rounds} {z}\n").as_bytes())
        })
        .with_context(|| format!("{}", path.display()))
    }

    /// Locks the privacy count at `path` (through `PATH.lock`) for as long as the returned
    /// file is held: two peers with one key and task would each count from the same
    /// number and spend the budget twice.
    fn lock_privacy_count(path: &Path) -> Result<std::fs::File> {
        let mut name = path.as_os_str().to_os_string();
        name.push(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&name)
            .with_context(|| format!("{}", Path::new(&name).display()))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "{}: another shoal-peer counts this key's privacy budget for this task \
                 (run one peer per key and task, or give this one its own --identity)",
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("{}", Path::new(&name).display()))
            }
        }
    }

    /// Reads the key file, or creates one from the OS's random generator.
    fn identity(path: &Path) -> Result<Identity> {
        let (id, created) = shoal_shared::learn::identity::load_or_create(path, || {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed)
                .map_err(|e| std::io::Error::other(format!("no OS randomness: {e}")))?;
            Ok(seed)
        })
        .with_context(|| format!("{}", path.display()))?;
        if created {
            eprintln!("created identity {}", path.display());
        }
        Ok(id)
    }

    /// The task: the server's (its description at `/api/tasks/{task}`), checked against
    /// `--task-file` when one is given (a peer training another model than its
    /// neighbours' would have every update refused, silently). Without the server's, the
    /// task file's, or the built-in demo for `--task digits`. With it, the server's
    /// revision of the task, where the server gave one, and its data files' SHA-256
    /// digests (none without the server's task).
    async fn task(args: &Args) -> Result<(TaskSpec, Option<String>, Vec<String>)> {
        let path = format!("/api/tasks/{}", args.task);
        // A server just starting may not answer yet (it hashes its data files first): ten
        // tries, a second apart.
        let mut fetched = Err(anyhow::anyhow!("GET {path}: not tried"));
        for attempt in 0..10 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            fetched = http_get_json(&args.server, &path, 1 << 20).await;
            if fetched.is_ok() {
                break;
            }
        }
        let revision = fetched.as_ref().ok().and_then(|d| {
            d["revision"]
                .as_str()
                .filter(|r| r.len() == 32 && r.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_string)
        });
        let digests: Vec<String> = fetched
            .as_ref()
            .ok()
            .and_then(|d| d["files_sha256"].as_array())
            .map(|a| {
                a.iter()
                    .map(|v| {
                        v.as_str()
                            .filter(|s| is_sha256_hex(s))
                            .unwrap_or("")
                            .to_string()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let served = fetched.and_then(|d| {
            let t = serde_json::to_string(&d["task"])?;
            TaskSpec::from_json(&t)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("the server's task {:?}", args.task))
        });
        // The digests are of the server's task's files: none for another task.
        let digests = if served.is_ok() { digests } else { Vec::new() };
        let task = match (&args.task_file, served) {
            (Some(file), served) => {
                let text =
                    std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
                let task =
                    TaskSpec::from_toml(&text).with_context(|| format!("{}", file.display()))?;
                if task.name != args.task {
                    bail!(
                        "the task file describes {:?}, not --task {:?}",
                        task.name,
                        args.task
                    );
                }
                match served {
                    Ok(served) => {
                        // Both sides as the server's JSON gives them (its floats parse back
                        // the same way), without the texts for people and the server's k
                        // (`--neighbours` may set it; peers do not use it).
                        let comparable = |t: &TaskSpec| -> Result<serde_json::Value> {
                            let json = serde_json::to_string(t)?;
                            let t = TaskSpec::from_json(&json).map_err(anyhow::Error::msg)?;
                            let mut v = serde_json::to_value(&t)?;
                            if let Some(o) = v.as_object_mut() {
                                o.remove("title");
                                o.remove("description");
                            }
                            if let Some(learn) = v.get_mut("learn").and_then(|l| l.as_object_mut())
                            {
                                learn.remove("neighbours");
                            }
                            Ok(v)
                        };
                        if let Some(diff) = first_difference(
                            &comparable(&task)?,
                            &comparable(&served)?,
                            String::new(),
                        ) {
                            bail!(
                                "{}: differs from the task {:?} the server describes, at {diff}; \
                                 its neighbours would refuse every update. Leave out \
                                 --task-file to train the server's",
                                file.display(),
                                served.name
                            );
                        }
                    }
                    Err(e) => eprintln!(
                        "not checked against the server's task ({e:#}): training {}",
                        file.display()
                    ),
                }
                task
            }
            (None, Ok(served)) if served.name == args.task => served,
            (None, Ok(served)) => bail!(
                "the server describes {:?} for --task {:?}",
                served.name,
                args.task
            ),
            (None, Err(e)) if args.task == "digits" => {
                eprintln!("the server's task: {e:#}; training the built-in demo");
                TaskSpec::digits()
            }
            (None, Err(e)) => bail!("{e:#} (or pass --task-file)"),
        };
        Ok((task, revision, digests))
    }

    fn is_sha256_hex(s: &str) -> bool {
        s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }

    /// Checks the task's data files in `dir` against the server's digests (`digests`, in
    /// the order of [`TaskSpec::data_paths`]; none, or another count: no check): a copy
    /// that differs (another version of the data, or a stale or broken copy) would have
    /// this peer train on other data than its neighbours, unseen. A file that cannot be
    /// read is left for the loading to name.
    fn check_data(task: &TaskSpec, dir: &Path, digests: &[String]) -> Result<()> {
        let paths = task.data_paths();
        if digests.len() != paths.len() {
            if !digests.is_empty() {
                eprintln!(
                    "shoal: the server gave {} data digests for the task's {} files; the data are not checked",
                    digests.len(),
                    paths.len()
                );
            }
            return Ok(());
        }
        for (path, theirs) in paths.iter().zip(digests) {
            let Ok(bytes) = shoal_shared::task::read_at_most(
                &dir.join(path),
                shoal_shared::task::MAX_DATA_BYTES,
            ) else {
                continue;
            };
            let ours = shoal_shared::learn::identity::hex(&Sha256::digest(&bytes));
            if theirs.is_empty() {
                eprintln!("shoal: the server gave no digest of {path}; it is not checked");
            } else if ours != *theirs {
                bail!(
                    "{} differs from the server's copy of the task's data (SHA-256 {ours} here, {theirs} at the server): this peer would train on other data than its neighbours; replace it with the server's /data/{path}",
                    dir.join(path).display()
                );
            }
        }
        Ok(())
    }

    /// The first place where `a` (ours) and `b` (the server's) differ: its path and both
    /// values.
    fn first_difference(
        a: &serde_json::Value,
        b: &serde_json::Value,
        at: String,
    ) -> Option<String> {
        use serde_json::Value;
        let differs = |at: &str, here: Option<&Value>, there: Option<&Value>| {
            let show = |v: Option<&Value>| v.map_or("nothing".into(), Value::to_string);
            let at = if at.is_empty() { "the top" } else { at };
            Some(format!(
                "{at}: {} here, {} at the server",
                show(here),
                show(there)
            ))
        };
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                keys.into_iter().find_map(|k| {
                    let (u, v) = (x.get(k), y.get(k));
                    let path = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    match (u, v) {
                        (Some(u), Some(v)) => first_difference(u, v, path),
                        _ => differs(&path, u, v),
                    }
                })
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
                .iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (u, v))| first_difference(u, v, format!("{at}[{i}]"))),
            _ if a == b => None,
            _ => differs(&at, Some(a), Some(b)),
        }
    }

    /// How often the heads held are checked against the server's ledger.
    const WITNESS_EVERY_MS: f64 = 15_000.0;

    /// What a witness check needs from the server's ledger of `task` (see
    /// docs/protocol.md, "Signed heads and gossip"): its current signed head (`None`
    /// while it shows none) and the hash at each index of `at` (`None` where it has no
    /// entry).
    type Shown = (Option<Vec<u8>>, Vec<(u64, Option<[u8; 32]>)>);

    async fn fetch_ledger(server: String, task: String, at: Vec<u64>) -> Result<Shown> {
        let base = format!("/api/tasks/{task}/ledger");
        let queries: Vec<(Option<u64>, String)> = if at.is_empty() {
            vec![(None, format!("{base}?limit=1"))]
        } else {
            at.iter()
                .map(|i| (Some(*i), format!("{base}?from={i}&limit=1")))
                .collect()
        };
        let mut now = None;
        let mut entries = Vec::new();
        for (i, path) in queries {
            let page = http_get_json(&server, &path, 64 << 10).await?;
            now = page["signed_head"].as_str().and_then(from_hex);
            if let Some(i) = i {
                let hash = page["entries"]
                    .as_array()
                    .and_then(|e| e.first())
                    .filter(|e| e["index"].as_u64() == Some(i))
                    .and_then(|e| e["hash"].as_str())
                    .and_then(from_hex)
                    .and_then(|h| <[u8; 32]>::try_from(h).ok());
                entries.push((i, hash));
            }
        }
        Ok((now, entries))
    }

    /// `GET path` from the server of the signaling URL `server` (`ws://host:port`; a
    /// `wss://` server needs TLS, which this small client does not speak), as JSON: a
    /// plain HTTP/1.1 request, an answer of less than `most` bytes, in at most 5 s.
    /// Where HTTP requests to the server of the `ws://` URL `server` go: its host with a
    /// port (80 where the URL names none, as for its websocket), and the URL's path, which
    /// prefixes theirs as it does the websocket's (a server behind a proxy's path). Both
    /// were taken as the text before the first `/`: a URL without a port failed every
    /// request, and one with a path asked the proxy for paths it does not serve.
    fn http_target(server: &str) -> Option<(String, String)> {
        let rest = server.strip_prefix("ws://")?;
        let (host, prefix) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
        if host.is_empty() {
            return None;
        }
        // A port after the host (after `]` for an IPv6 literal).
        let has_port = host
            .rsplit_once(':')
            .is_some_and(|(h, port)| !h.ends_with('[') && !port.contains(']'));
        let host = if has_port {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        let prefix = prefix.trim_end_matches('/');
        Some((
            host,
            if prefix.is_empty() {
                String::new()
            } else {
                format!("/{prefix}")
            },
        ))
    }

    async fn http_get_json(server: &str, path: &str, most: u64) -> Result<serde_json::Value> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (host, prefix) = http_target(server)
            .ok_or_else(|| anyhow::anyhow!("only ws:// servers are asked (not {server})"))?;
        let fetch = async {
            let mut conn = tokio::net::TcpStream::connect(&host).await?;
            let req =
                format!("GET {prefix}{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            conn.write_all(req.as_bytes()).await?;
            let mut answer = Vec::new();
            conn.take(most).read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .map_err(|_| anyhow::anyhow!("GET {path}: no answer in 5 s"))??;
        if answer.len() as u64 >= most {
            anyhow::bail!("GET {path}: an answer of {most} bytes or more");
        }
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow::anyhow!("GET {path}: not an HTTP answer"))?;
        let status = head.lines().next().unwrap_or("");
        if !status.starts_with("HTTP/1.1 200") {
            anyhow::bail!("GET {path}: {status}");
        }
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            anyhow::bail!("GET {path}: a chunked answer");
        }
        serde_json::from_str(body).with_context(|| format!("GET {path}"))
    }

    /// The model as safetensors, with the held-out loss and accuracy Shoal measured for
    /// it.
    fn export(peer: &mut SwarmTrainer) -> Result<Vec<u8>> {
        let eval = peer.evaluate_all();
        let round = peer.progress().round;
        shoal_shared::export::task_model(peer.task(), peer.learner().weights(), round, eval, None)
            .map_err(anyhow::Error::msg)
    }

    async fn train(args: &Args, task: TaskSpec, mut swarm: NativeSwarm) -> Result<()> {
        let id = identity(&args.identity)?;
        let key = shoal_shared::learn::identity::hex(&id.public());
        let gpu = if args.cpu {
            None
        } else {
            shoal_shared::gpu::Gpu::new().await.ok()
        };
        eprintln!(
            "key {} training on {}",
            &key[..16],
            gpu.as_ref()
                .map_or("the CPU".to_string(), |g| g.adapter.description.clone())
        );
        let clock = Instant::now();
        let now = || clock.elapsed().as_secs_f64() * 1e3;
        let (train, test) = if task.is_local() {
            let Some(dir) = &args.local_data else {
                anyhow::bail!(
                    "the task {} trains on local data: give --local-data DIR",
                    task.name
                );
            };
            let local = shoal_web_client::local_folder::read_folder(&task, dir)
                .map_err(anyhow::Error::msg)?;
            let s = local.summary();
            println!(
                "local data {}: {} files, {} samples, {} skipped",
                dir.display(),
                s.files,
                s.samples,
                s.skipped.len()
            );
            for k in &s.skipped {
                println!("skipped {}: {}", k.file, k.reason);
            }
            let train = local.into_dataset().map_err(anyhow::Error::msg)?;
            let test = task
                .load_test_dataset(&args.data)
                .map_err(|e| anyhow::anyhow!("{e} (run `cargo xtask data` first)"))?;
            (train, test)
        } else {
            if args.local_data.is_some() {
                anyhow::bail!(
                    "the task {} trains on the server's data, not --local-data",
                    task.name
                );
            }
            task.load_datasets(&args.data)
                .map_err(|e| anyhow::anyhow!("{e} (run `cargo xtask data` first)"))?
        };
        let (train, test) = (Samples::from_dataset(&train), Samples::from_dataset(&test));
        let mut noise_key = [0u8; 32];
        getrandom::fill(&mut noise_key)
            .map_err(|e| anyhow::anyhow!("no secure random numbers for the privacy noise: {e}"))?;
        let mut peer =
            SwarmTrainer::new(task, id, gpu.as_ref(), train, Some(test), noise_key, now())
                .map_err(anyhow::Error::msg)?;
        // The updates this key already sent under the task's privacy budget.
        let budget_file = privacy_file(&args.identity, &peer.task().name);
        // Held while the peer runs.
        let mut _budget_lock = None;
        if peer.learner().privacy().is_some() {
            _budget_lock = Some(lock_privacy_count(&budget_file)?);
            let (sent, z) = read_privacy_sent(&budget_file)?;
            // Written once now: a place where the count cannot be kept (a read-only
            // folder) stops the peer before it trains, not after it sent.
            write_privacy_sent(&budget_file, sent, z).with_context(|| {
                format!(
                    "the privacy count cannot be kept at {}",
                    budget_file.display()
                )
            })?;
            peer.note_privacy_sent(sent, z);
            // Kept before any message leaves once the count rose; a failure stops the
            // peer, with nothing sent uncounted (`privacy_failed`).
            let file = budget_file.clone();
            peer.keep_privacy_count(Box::new(move |rounds, z| {
                write_privacy_sent(&file, rounds, z).map_err(|e| format!("{e:#}"))
            }));
        }
        let keeper = match &args.keeper {
            Some(dir) => {
                let binding = shoal_web_client::keeper::binding(peer.task());
                let mut k = Keeper::open(dir, &binding)
                    .with_context(|| format!("keeper directory {}", dir.display()))?;
                k.pause_mid_write = Duration::from_millis(args.pause_mid_checkpoint_ms);
                let params = peer.learner().weights().len();
                let (snap, skipped) = k.latest(params)?;
                for s in skipped {
                    eprintln!("skipped damaged checkpoint {s}");
                }
                if let Some(s) = snap {
                    let round = s.round;
                    if peer.resume(s) {
                        println!("resumed round {round}");
                    }
                }
                Some(k)
            }
            None => None,
        };
        // The ledger's witness (docs/protocol.md, "Signed heads and gossip").
        let mut witnessed_at = f64::NEG_INFINITY;
        let mut witnessed_count = 0;
        let mut caught = false;
        let mut witness_fetch: Option<tokio::task::JoinHandle<Result<Shown>>> = None;
        let mut dropped = 0;
        let mut broken = 0;
        let mut broken_said = None;
        // The round of the last checkpoint (the one resumed from, at start).
        let mut saved_at = peer.progress().round;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One listener for the whole run: a `ctrl_c()` made anew each turn missed a
        // Ctrl-C that arrived while the peer trained (most of the time), and the peer
        // never stopped.
        let ctrl_c = stop_signal();
        tokio::pin!(ctrl_c);
        // How the run ended: an error still gets the last checkpoint and a clean close
        // (it returned at once, and a keeper lost up to `--checkpoint-every` rounds),
        // unless writing a checkpoint was the error.
        let mut saving_failed = false;
        let outcome: Result<()> = loop {
            tokio::select! {
                _ = &mut ctrl_c => break Ok(()),
                ev = swarm.next_event() => {
                    let Some(ev) = ev else { break Ok(()) };
                    // This one and those that waited with it (they wait while the peer
                    // trains a chunk), but not those that keep coming meanwhile: a
                    // flooding neighbour must not keep the peer from training.
                    let waiting = swarm.waiting();
                    let verbose = std::env::var_os("SHOAL_VERBOSE").is_some();
                    for ev in std::iter::once(ev).chain((0..waiting).map_while(|_| swarm.try_next_event())) {
                        // The id the server gave this session (neighbours' logs and the
                        // dashboard name peers by it, not by their keys).
                        if let SwarmEvent::Signaling { me: Some(me) } = &ev {
                            eprintln!("signaling up: peer {me} in the swarm");
                        }
                        if verbose {
                            match &ev {
                                SwarmEvent::Message { from, data } => eprintln!("{:.0} msg {from} {} kind {:?}", now(), data.len(), data.get(4)),
                                other => eprintln!("{:.0} {other:?}", now()),
                            }
                        }
                        peer.handle(ev, &swarm, now());
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            let ticked = match peer.tick(&swarm, now).await {
                Ok(ticked) => ticked,
                Err(e) => break Err(e.into()),
            };
            if let Some(e) = peer.privacy_failed() {
                break Err(anyhow::anyhow!(
                    "the privacy count could not be kept ({e}): stopped, with no update sent uncounted"
                ));
            }
            if peer.task_changed() {
                break Err(anyhow::anyhow!(
                    "the task changed on the server since this peer loaded it, or the server speaks another protocol version (task_changed or bad_version): stopped; start again to load the new task, or update this peer"
                ));
            }
            // Said when it happens (a peer whose every run breaks closes no round), at
            // most every 30 s.
            if let (n, Some(why)) = peer.broken_runs()
                && n > broken
                && broken_said.is_none_or(|t: std::time::Instant| t.elapsed().as_secs() >= 30)
            {
                broken = n;
                broken_said = Some(std::time::Instant::now());
                eprintln!(
                    "shoal: {n} local runs broke so far (the last: {why}); nothing of them was sent, and training went on from the model"
                );
            }
            let Some(summary) = ticked else {
                continue;
            };
            let p = peer.progress();
            if swarm.dropped() > dropped {
                dropped = swarm.dropped();
                eprintln!(
                    "shoal: {dropped} messages from neighbours dropped so far (their senders were past their share of the inbox)"
                );
            }
            // A language model's held-out loss, in bits per byte.
            let bits = match (peer.task().is_text(), p.test_loss) {
                (true, Some(l)) => format!(" bits/byte {:.4}", l / std::f32::consts::LN_2),
                _ => String::new(),
            };
            println!(
                "round {} loss {:.4} acc {} peers {} up {} down {} used {} rejected {} samples {} receipts {}{bits}",
                p.round,
                p.loss,
                p.accuracy
                    .map_or("-".into(), |a| format!("{:.2}%", a * 100.0)),
                p.peers,
                p.bytes_up,
                p.bytes_down,
                summary.used,
                p.rejected.values().sum::<u64>(),
                p.samples,
                p.receipts
            );

            if let Some(dp) = peer.learner().privacy() {
                println!(
                    "privacy epsilon {:.3} delta {:e} rounds {} of {}{}",
                    dp.epsilon,
                    dp.delta,
                    dp.rounds,
                    dp.budget_rounds,
                    if dp.stopped {
                        " (budget spent: no more updates)"
                    } else if dp.spent {
                        " (budget spent)"
                    } else {
                        ""
                    }
                );
            }
            let p = peer.progress();
            if !p.rejected.is_empty() && std::env::var_os("SHOAL_VERBOSE").is_some() {
                eprintln!("rejected by reason: {:?}", p.rejected);
            }
            let round = p.round;
            // The witness: the server's answers are fetched off the training loop and
            // judged here, between rounds.
            if let Some(fetch) = witness_fetch.take_if(|f| f.is_finished()) {
                let judged = match fetch.await {
                    Ok(Ok((shown, entries))) => peer
                        .witness_mut()
                        .check(shown.as_deref(), &entries)
                        .map_err(anyhow::Error::from),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(anyhow::anyhow!("{e}")),
                };
                match judged {
                    Ok(Some(Verdict::Intact { count })) if !caught => {
                        if witnessed_count == 0 {
                            println!("ledger intact {count}");
                        }
                        witnessed_count = count;
                    }
                    Ok(Some(Verdict::Rewritten { head, found })) if !caught => {
                        caught = true;
                        println!(
                            "ledger changed: the server signed {} receipts, and {found} (signed head {})",
                            head.count,
                            shoal_shared::learn::identity::hex(&head.encode())
                        );
                    }
                    // An empty ledger: look again next round.
                    Ok(None) => witnessed_at = f64::NEG_INFINITY,
                    Ok(_) => {}
                    Err(e) => eprintln!("ledger witness: {e:#}"),
                }
            }
            if witness_fetch.is_none() && now() - witnessed_at >= WITNESS_EVERY_MS {
                witnessed_at = now();
                let at = peer.witness_mut().lookups();
                let name = peer.task().name.clone();
                witness_fetch = Some(tokio::spawn(fetch_ledger(args.server.clone(), name, at)));
            }
            // Due `--checkpoint-every` rounds after the last one, not at its multiples: a
            // keeper that catches up by a download jumps rounds, past them.
            if let Some(k) = &keeper
                && round >= saved_at.saturating_add(args.checkpoint_every)
            {
                if let Err(e) = checkpoint(k, &mut peer) {
                    saving_failed = true;
                    break Err(e);
                }
                saved_at = round;
            }
            if args.rounds > 0 && round >= args.rounds {
                // Where neighbours' updates went unused, and why.
                eprintln!("rejected by reason: {:?}", peer.progress().rejected);
                break Ok(());
            }
        };
        // Stopped (Ctrl-C, SIGTERM, --rounds reached, or an error): what was trained
        // since the last checkpoint is kept too.
        let saved = match &keeper {
            Some(k) if !saving_failed && peer.progress().round > saved_at => {
                checkpoint(k, &mut peer)
            }
            _ => Ok(()),
        };
        swarm.close().await;
        outcome.and(saved)
    }

    /// Writes a checkpoint of `peer`'s model and replaces the export beside it.
    fn checkpoint(k: &Keeper, peer: &mut SwarmTrainer) -> Result<()> {
        let round = peer.progress().round;
        let path = k
            .save(round, &peer.learner().snapshot())
            .with_context(|| format!("checkpoint of round {round}"))?;
        println!("checkpoint {} {}", round, path.display());
        let path = k
            .save_export(&export(peer)?)
            .context("the export beside the checkpoints")?;
        println!("exported {}", path.display());
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A folder of its own under the system's temporary one.
        fn folder(name: &str) -> PathBuf {
            let dir =
                std::env::temp_dir().join(format!("shoal-peer-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a temporary folder");
            dir
        }

        #[test]
        fn http_requests_go_where_the_websocket_does() {
            let target = http_target;
            let t = |h: &str, p: &str| Some((h.to_string(), p.to_string()));
            assert_eq!(target("ws://127.0.0.1:8080"), t("127.0.0.1:8080", ""));
            assert_eq!(target("ws://example.org"), t("example.org:80", ""));
            assert_eq!(target("ws://example.org/"), t("example.org:80", ""));
            assert_eq!(target("ws://h:8080/shoal/"), t("h:8080", "/shoal"));
            assert_eq!(target("ws://[::1]:8080"), t("[::1]:8080", ""));
            assert_eq!(target("ws://[::1]"), t("[::1]:80", ""));
            assert_eq!(target("wss://h:443"), None);
            assert_eq!(target("ws:///x"), None);
        }

        /// A second peer with the same key and task does not start while the first
        /// holds the count; once it is gone, one may.
        #[test]
        fn one_peer_at_a_time_counts_a_keys_privacy_budget() {
            let dir = folder("lock");
            let count = privacy_file(&dir.join("peer.key"), "private");
            let first = lock_privacy_count(&count).expect("the first peer takes it");
            let second = lock_privacy_count(&count).expect_err("held");
            assert!(
                format!("{second:#}").contains("another shoal-peer counts"),
                "{second:#}"
            );
            drop(first);
            lock_privacy_count(&count).expect("free again");
            let other_task = privacy_file(&dir.join("peer.key"), "digits");
            let _held = lock_privacy_count(&count).expect("free again");
            lock_privacy_count(&other_task).expect("another task's count is its own");
            let _ = std::fs::remove_dir_all(dir);
        }

        /// The count is written whole, and read back as written.
        #[test]
        fn the_privacy_count_reads_back_as_written() {
            let dir = folder("count");
            let count = privacy_file(&dir.join("peer.key"), "private");
            assert_eq!(read_privacy_sent(&count).expect("none yet"), (0, 1.0));
            write_privacy_sent(&count, 17, 1.25).expect("written");
            assert_eq!(read_privacy_sent(&count).expect("kept"), (17, 1.25));
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
