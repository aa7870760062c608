//! `cargo xtask bench signaling`: Shoal's signaling server against the PeerJS server
//! (npm `peer` 1.0.2) under the same load from one Rust load client: memory per idle
//! connection with 10,000 held, and relayed messages per second with latency
//! percentiles among 100 peers exchanging offer- and candidate-sized messages.
//!
//! The load client runs as a child process (`xtask bench-signaling-load`) with its
//! open-file limit raised, and reads the server's resident memory from /proc.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const IDLE: usize = 10_000;
const PEERS: usize = 100;
const WINDOW: u64 = 64;
const SECONDS: u64 = 5;
/// Messages a load-client peer writes per system call at most.
const FLUSH_EVERY: usize = 4;

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .context("no VmRSS")
}

fn with_fd_limit(program: &Path, args: &[String]) -> Command {
    let mut c = Command::new("bash");
    c.args(["-c", "ulimit -n 20000 && exec \"$@\"", "limit"])
        .arg(program)
        .args(args);
    c
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("server on port {port} did not start")
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn signaling(root: &Path) -> Result<Value> {
    crate::build_server_with(root, &[])?;
    crate::setup::ensure_bench_web(root)?;
    let web = root.join("xtask/bench-web");
    let me = std::env::current_exe()?;
    let mut results = serde_json::Map::new();
    // Node runs PeerJS on one thread, and the load client takes the machine's other core:
    // Shoal's server is measured on one thread too (`--threads 1`), which sets the
    // ratios, and with its default of one thread per CPU, reported beside them.
    for (name, kind, threads) in [
        ("shoal", "shoal", Some("1")),
        ("shoal_threads_per_cpu", "shoal", None),
        ("peerjs", "peerjs", None),
    ] {
        let port = free_port()?;
        let server = match kind {
            "shoal" => with_fd_limit(
                &root.join("target/release/shoal-signaling-server"),
                &[
                    "--port",
                    &port.to_string(),
                    "--www",
                    "www",
                    "--data",
                    "data",
                    // Limits stay on, sized for the load: 10,000 peers in one task and
                    // 100 peers sending as fast as the window allows.
                    "--max-peers-per-task",
                    "20000",
                    "--max-connections",
                    "19500",
                    "--rate",
                    "1000000",
                    "--burst",
                    "1000000",
                    // Every load client connects from 127.0.0.1.
                    "--max-peers-per-address",
                    "0",
                    "--max-connections-per-address",
                    "0",
                    "--joins-per-address",
                    "0",
                    "--state-file",
                    "target/bench/shoal-state.json",
                    "--ledger-dir",
                    "target/bench/ledger",
                ]
                .into_iter()
                .chain(threads.map(|n| ["--threads", n]).into_iter().flatten())
                .map(String::from)
                .collect::<Vec<_>>(),
            )
            .current_dir(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
            _ => with_fd_limit(
                Path::new("node"),
                &[
                    web.join("node_modules/peer/dist/bin/peerjs.js")
                        .to_string_lossy()
                        .into_owned(),
                    "--port".into(),
                    port.to_string(),
                    "--host".into(),
                    "127.0.0.1".into(),
                    "-c".into(),
                    "20000".into(),
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
        };
        let server = Server(server);
        wait_port(port)?;
        std::thread::sleep(Duration::from_secs(1));
        let out = with_fd_limit(
            &me,
            &[
                "bench-signaling-load".into(),
                kind.into(),
                port.to_string(),
                server.0.id().to_string(),
            ],
        )
        .stderr(Stdio::inherit())
        .output()?;
        if !out.status.success() {
            bail!("load client against {name} failed");
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        println!("{name}: {v}");
        results.insert(name.into(), v);
        drop(server);
    }
    let r = |k: &str, f: &str| results[k][f].as_f64();
    let ratios = json!({
        "rss-per-conn": match (r("peerjs", "rss_bytes_per_conn"), r("shoal", "rss_bytes_per_conn")) {
            (Some(p), Some(s)) if s > 0.0 => json!(p / s), _ => Value::Null },
        "relay-msgs-per-s": match (r("shoal", "relayed_per_s"), r("peerjs", "relayed_per_s")) {
            (Some(s), Some(p)) if p > 0.0 => json!(s / p), _ => Value::Null },
        "relay-msgs-per-s-threads-per-cpu": match (r("shoal_threads_per_cpu", "relayed_per_s"), r("peerjs", "relayed_per_s")) {
            (Some(s), Some(p)) if p > 0.0 => json!(s / p), _ => Value::Null },
    });
    Ok(
        json!({ "ratios": ratios, "idle_connections": IDLE, "relay_peers": PEERS, "window": WINDOW, "seconds": SECONDS, "servers": results }),
    )
}

/// `xtask bench-signaling-load KIND PORT PID`: the load client; prints one JSON object.
pub(crate) fn load(args: &[String]) -> Result<()> {
    let [kind, port, pid] = args else {
        bail!("usage: bench-signaling-load KIND PORT PID")
    };
    let port: u16 = port.parse()?;
    let pid: u32 = pid.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let v = rt.block_on(load_async(kind.clone(), port, pid))?;
    println!("{v}");
    Ok(())
}

fn url(kind: &str, port: u16, i: usize) -> String {
    if kind == "shoal" {
        format!("ws://127.0.0.1:{port}/ws/digits?v=2")
    } else {
        format!("ws://127.0.0.1:{port}/peerjs?key=peerjs&id=p{i}&token=t{i}")
    }
}

async fn load_async(kind: String, port: u16, pid: u32) -> Result<Value> {
    let base = rss_kb(pid)?;
    let started = Instant::now();
    let conns: Vec<_> = futures_util::stream::iter(0..IDLE)
        .map(|i| {
            let u = url(&kind, port, 1_000_000 + i);
            async move { tokio_tungstenite::connect_async(u).await.map(|(ws, _)| ws) }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let held: Vec<_> = conns.into_iter().filter_map(Result::ok).collect();
    let connect_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_kb(pid)?;
    eprintln!(
        "{kind}: {} idle connections in {connect_s:.1} s, RSS {base} -> {idle_rss} KiB",
        held.len()
    );
    if held.len() < IDLE {
        bail!("only {} of {IDLE} connections opened", held.len());
    }
    drop(held);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let relay = relay(&kind, port).await?;
    Ok(json!({
        "base_rss_kib": base,
        "idle_rss_kib": idle_rss,
        "rss_bytes_per_conn": (idle_rss.saturating_sub(base) * 1024) as f64 / IDLE as f64,
        "connect_seconds": connect_s,
        "relayed_per_s": relay.0,
        "latency_ms_p50": relay.1,
        "latency_ms_p99": relay.2,
    }))
}

/// 100 peers; each keeps up to WINDOW messages in flight to its neighbours (Shoal) or to
/// random peers (PeerJS). Returns (messages/s, p50 ms, p99 ms) over SECONDS after 1 s.
async fn relay(kind: &str, port: u16) -> Result<(f64, f64, f64)> {
    let epoch = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..PEERS).map(|_| AtomicU64::new(0)).collect());
    let delivered: Arc<Vec<AtomicU64>> = Arc::new((0..PEERS).map(|_| AtomicU64::new(0)).collect());
    // A sender whose window is full sleeps until one of its messages arrives (spinning
    // would take CPU from the server under test, which shares the machine).
    let arrived: Arc<Vec<tokio::sync::Notify>> =
        Arc::new((0..PEERS).map(|_| tokio::sync::Notify::new()).collect());
    let received = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut sinks = Vec::new();
    let mut ids = Vec::new();
    let mut neighbour_lists = Vec::new();
    for i in 0..PEERS {
        // tungstenite zero-fills its whole read buffer before every read: 128 KiB by
        // default, which made memset the client's largest cost. 16 KiB holds a burst.
        let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
        let (ws, _) =
            tokio_tungstenite::connect_async_with_config(url(kind, port, i), Some(config), false)
                .await?;
        let (sink, mut stream) = ws.split();
        // Read until the server's greeting (and, for Shoal, the first neighbour list).
        let (tx_n, rx_n) = tokio::sync::watch::channel(Vec::<String>::new());
        let (tx_id, mut rx_id) = tokio::sync::mpsc::channel::<String>(1);
        let arrived_r = Arc::clone(&arrived);
        let (delivered, received, latencies, measuring) = (
            Arc::clone(&delivered),
            Arc::clone(&received),
            Arc::clone(&latencies),
            Arc::clone(&measuring),
        );
        let kind2 = kind.to_string();
        tokio::spawn(async move {
            let mut local = Vec::with_capacity(64);
            while let Some(Ok(Message::Text(t))) = stream.next().await {
                // Relayed messages carry our own payload; find it without building a JSON
                // tree, so that the client spends as little CPU as it can (it shares the
                // machine with the server under test).
                let owned;
                let payload: &str = if let Some(at) = t.find("\"t=") {
                    t[at + 1..].split('"').next().unwrap_or_default()
                } else {
                    let Ok(v) = serde_json::from_str::<Value>(&t) else {
                        continue;
                    };
                    if kind2 == "shoal" {
                        match v["type"].as_str() {
                            Some("welcome") => {
                                let _ = tx_id
                                    .send(v["peer"].as_str().unwrap_or_default().to_string())
                                    .await;
                                continue;
                            }
                            Some("neighbours") => {
                                let list = v["peers"]
                                    .as_array()
                                    .map(|a| {
                                        a.iter()
                                            .filter_map(|x| x.as_str().map(String::from))
                                            .collect()
                                    })
                                    .unwrap_or_default();
                                let _ = tx_n.send(list);
                                continue;
                            }
                            Some("signal") => {
                                owned = v["signal"]["sdp"].as_str().unwrap_or_default().to_string();
                                &owned
                            }
                            _ => continue,
                        }
                    } else {
                        match v["type"].as_str() {
                            Some("OPEN") => {
                                let _ = tx_id.send(format!("p{i}")).await;
                                continue;
                            }
                            Some("CANDIDATE" | "OFFER") => {
                                owned =
                                    v["payload"]["sdp"].as_str().unwrap_or_default().to_string();
                                &owned
                            }
                            _ => continue,
                        }
                    }
                };
                // payload: "t=<micros since epoch>;s=<sender>;..."
                let mut parts = payload.split(';');
                let t: u64 = parts
                    .next()
                    .and_then(|p| p.strip_prefix("t="))
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0);
                let s: usize = parts
                    .next()
                    .and_then(|p| p.strip_prefix("s="))
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0);
                if s < PEERS {
                    delivered[s].fetch_add(1, Ordering::Relaxed);
                    arrived_r[s].notify_one();
                }
                if measuring.load(Ordering::Relaxed) {
                    received.fetch_add(1, Ordering::Relaxed);
                    let now = epoch.elapsed().as_micros() as u64;
                    // Latencies go to the shared list in batches (one lock per 64), a
                    // uniform sample of every reader's messages.
                    local.push(now.saturating_sub(t) as f64 / 1000.0);
                    if local.len() >= 64
                        && let Ok(mut l) = latencies.lock()
                    {
                        l.append(&mut local);
                    }
                }
            }
        });
        let id = tokio::time::timeout(Duration::from_secs(10), rx_id.recv())
            .await?
            .context("no greeting")?;
        ids.push(id);
        sinks.push(sink);
        neighbour_lists.push(rx_n);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for (i, mut sink) in sinks.into_iter().enumerate() {
        let (sent, delivered, stop, arrived) = (
            Arc::clone(&sent),
            Arc::clone(&delivered),
            Arc::clone(&stop),
            Arc::clone(&arrived),
        );
        let ids = ids.clone();
        let mut neighbours = neighbour_lists[i].clone();
        let kind = kind.to_string();
        senders.push(tokio::spawn(async move {
            let mut n = 0usize;
            let mut rng = shoal_shared::rng::SplitMix64::new(i as u64 + 1);
            // Offer-sized (1 in 8) and candidate-sized padding, built once.
            let (long, short) = ("a".repeat(1400), "a".repeat(200));
            // Messages are written in batches of up to FLUSH_EVERY per system call (and
            // whatever is pending before the sender waits), so that the client, which
            // shares the machine with the server under test, spends little CPU on
            // syscalls. Both servers get exactly the same stream of frames.
            let mut unflushed = 0;
            let mut list = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if sent[i].load(Ordering::Relaxed) >= delivered[i].load(Ordering::Relaxed) + WINDOW
                {
                    if unflushed > 0 {
                        if sink.flush().await.is_err() {
                            break;
                        }
                        unflushed = 0;
                    }
                    // Bounded, in case a message was dropped: the window then reopens.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(50),
                        arrived[i].notified(),
                    )
                    .await;
                    continue;
                }
                n += 1;
                let pad = if n.is_multiple_of(8) { &long } else { &short };
                let t = epoch.elapsed().as_micros();
                let text = if kind == "shoal" {
                    // The neighbour list is copied only when the server changed it.
                    if neighbours.has_changed().unwrap_or(false) {
                        list = neighbours.borrow_and_update().clone();
                    }
                    if list.is_empty() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    let to = &list[n % list.len()];
                    let kind = if n.is_multiple_of(8) {
                        "offer"
                    } else {
                        "answer"
                    };
                    // The payload is [a-z0-9=;]: no escaping needed.
                    format!(
                        r#"{{"type":"signal","to":"{to}","signal":{{"kind":"{kind}","sdp":"t={t};s={i};{pad}"}}}}"#
                    )
                } else {
                    let mut j = rng.below(PEERS);
                    if j == i {
                        j = (j + 1) % PEERS;
                    }
                    let kind = if n.is_multiple_of(8) {
                        "OFFER"
                    } else {
                        "CANDIDATE"
                    };
                    format!(
                        r#"{{"type":"{kind}","dst":"{}","payload":{{"sdp":"t={t};s={i};{pad}"}}}}"#,
                        ids[j]
                    )
                };
                if sink.feed(Message::Text(text.into())).await.is_err() {
                    break;
                }
                sent[i].fetch_add(1, Ordering::Relaxed);
                unflushed += 1;
                if unflushed >= FLUSH_EVERY {
                    if sink.flush().await.is_err() {
                        break;
                    }
                    unflushed = 0;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(SECONDS)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.abort();
    }
    let count = received.load(Ordering::Relaxed) as f64;
    let mut l = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        l.get(((l.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok((count / elapsed, pct(0.5), pct(0.99)))
}
