//! The signaling server over real websockets: a server on 127.0.0.1:0, clients from
//! tokio-tungstenite, every limit and every kind of bad input.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use shoal_signaling_server::{Config, Limits, SignalingConfig, app, serve};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Server {
    addr: SocketAddr,
    hub: std::sync::Arc<shoal_signaling_server::Hub>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(signaling: SignalingConfig) -> Server {
    start_with(signaling, None, &["digits"]).await
}

/// A server with an admin token (or none) and tasks of these names (the demo task's
/// settings under each name).
async fn start_with(
    signaling: SignalingConfig,
    admin_token: Option<&str>,
    tasks: &[&str],
) -> Server {
    start_config(base(signaling, admin_token, tasks)).await
}

/// The configuration [`start_with`] uses.
fn base(signaling: SignalingConfig, admin_token: Option<&str>, tasks: &[&str]) -> Config {
    let dir = std::env::temp_dir();
    Config {
        www: dir.clone(),
        data: dir,
        signaling,
        tasks: tasks
            .iter()
            .map(|&name| shoal_shared::task::TaskSpec {
                name: name.into(),
                ..shoal_shared::task::TaskSpec::digits()
            })
            .collect(),
        admin_token: admin_token.map(str::to_string),
        http: shoal_signaling_server::HttpLimits::default(),
        state_file: None,
    }
}

async fn start_config(config: Config) -> Server {
    let app = app(&config);
    let hub = std::sync::Arc::clone(&app.hub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(serve(
        listener,
        app,
        async {
            let _ = rx.await;
        },
        Duration::from_secs(2),
    ));
    Server {
        addr,
        hub,
        stop: Some(stop),
        done,
    }
}

fn config() -> SignalingConfig {
    SignalingConfig {
        neighbours: 2,
        ..SignalingConfig::default()
    }
}

async fn connect(s: &Server, task: &str) -> Ws {
    connect_async(format!("ws://{}/ws/{task}?v=2", s.addr))
        .await
        .expect("connect")
        .0
}

/// Next text message as JSON (skipping pings), or None on close / timeout.
async fn next(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return Some(serde_json::from_str(&t).expect("server sends JSON"));
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            _ => return None,
        }
    }
}

/// Reads until a message of `kind` arrives.
async fn until(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let m = next(ws)
            .await
            .unwrap_or_else(|| panic!("connection ended waiting for {kind}"));
        if m["type"] == kind {
            return m;
        }
    }
}

async fn join(s: &Server) -> (Ws, String) {
    let mut ws = connect(s, "digits").await;
    let w = until(&mut ws, "welcome").await;
    assert_eq!(w["version"], 2);
    (ws, w["peer"].as_str().expect("peer id").to_string())
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

fn offer(to: &str) -> Value {
    json!({"type": "signal", "to": to, "signal": {"kind": "offer", "sdp": "v=0 test"}})
}

#[tokio::test]
async fn introduces_neighbours_and_relays_between_them() {
    let s = start(config()).await;
    let (mut a, ida) = join(&s).await;
    let (mut b, idb) = join(&s).await;
    let nb = until(&mut b, "neighbours").await;
    assert_eq!(nb["peers"], json!([ida]));
    assert_eq!(until(&mut a, "joined").await["peer"], json!(idb));
    send(&mut b, offer(&ida)).await;
    let got = until(&mut a, "signal").await;
    assert_eq!(got["from"], json!(idb));
    assert_eq!(got["signal"], json!({"kind": "offer", "sdp": "v=0 test"}));
    drop(b);
    assert_eq!(until(&mut a, "left").await["peer"], json!(idb));
}

#[tokio::test]
async fn bad_input_gets_typed_errors_and_leaves_other_peers_unaffected() {
    let s = start(config()).await;
    let (mut a, ida) = join(&s).await;
    let (mut b, idb) = join(&s).await;
    b.send(Message::Text("{not json".into()))
        .await
        .expect("send");
    assert_eq!(until(&mut b, "error").await["code"], "malformed");
    send(&mut b, json!({"type": "teleport"})).await;
    assert_eq!(until(&mut b, "error").await["code"], "unknown_type");
    send(
        &mut b,
        json!({"type": "signal", "to": "zz", "signal": {"kind": "offer", "sdp": ""}}),
    )
    .await;
    assert_eq!(until(&mut b, "error").await["code"], "malformed");
    send(&mut b, offer("00000000deadbeef")).await;
    assert_eq!(until(&mut b, "error").await["code"], "not_neighbour");
    b.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .expect("send");
    assert_eq!(until(&mut b, "error").await["code"], "binary");
    // b is still connected and a still hears it.
    send(&mut b, offer(&ida)).await;
    assert_eq!(until(&mut a, "signal").await["from"], json!(idb));
    assert_eq!(
        s.hub
            .metrics
            .rejected(shoal_shared::protocol::ErrorCode::Malformed),
        2
    );
}

#[tokio::test]
async fn relays_only_between_peers_it_introduced() {
    // k = 1: with three peers, at least one pair is not linked.
    let s = start(SignalingConfig {
        neighbours: 1,
        ..config()
    })
    .await;
    let mut peers = Vec::new();
    for _ in 0..3 {
        peers.push(join(&s).await);
    }
    let ids: Vec<String> = peers.iter().map(|(_, id)| id.clone()).collect();
    let parse =
        |id: &str| shoal_shared::protocol::PeerId(u64::from_str_radix(id, 16).expect("hex"));
    let (i, j) = (0..3)
        .flat_map(|i| (0..3).map(move |j| (i, j)))
        .find(|&(i, j)| {
            i != j
                && !s
                    .hub
                    .neighbours_of("digits", parse(&ids[i]))
                    .expect("peer")
                    .contains(&parse(&ids[j]))
        })
        .expect("some pair is not linked with k = 1");
    send(&mut peers[i].0, offer(&ids[j])).await;
    assert_eq!(
        until(&mut peers[i].0, "error").await["code"],
        "not_neighbour"
    );
}

#[tokio::test]
async fn oversize_messages_are_refused_and_the_sender_disconnected() {
    let s = start(config()).await;
    let (mut a, ida) = join(&s).await;
    let (mut b, _) = join(&s).await;
    let sdp = "x".repeat(20_000);
    let big = json!({"type": "signal", "to": ida, "signal": {"kind": "offer", "sdp": sdp}});
    send(&mut b, big).await;
    assert_eq!(until(&mut b, "error").await["code"], "too_large");
    assert!(
        next(&mut b).await.is_none(),
        "connection closes after too_large"
    );
    // The other peer is unaffected: a newcomer is linked to it and reaches it.
    let (mut c, idc) = join(&s).await;
    send(&mut c, offer(&ida)).await;
    assert_eq!(until(&mut a, "signal").await["from"], json!(idc));
    // Far past the hard cap the frame is refused by the codec, unbuffered.
    let _ = c.send(Message::Text("y".repeat(1 << 20).into())).await;
    while let Some(m) = next(&mut c).await {
        assert_ne!(m["type"], "signal", "nothing is relayed from a huge frame");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.hub.connections(), 1, "only the well-behaved peer remains");
    // A binary message over the limit too (a small one gets `binary` and stays open).
    let (mut d, _) = join(&s).await;
    let _ = d.send(Message::Binary(vec![0u8; 100].into())).await;
    assert_eq!(until(&mut d, "error").await["code"], "binary");
    let _ = d.send(Message::Binary(vec![0u8; 20_000].into())).await;
    assert_eq!(until(&mut d, "error").await["code"], "too_large");
    assert!(next(&mut d).await.is_none(), "closes after too_large");
}

#[tokio::test]
async fn signals_to_one_neighbour_have_a_byte_budget() {
    // b sends a's link 150 signals of about 1 KB at once, within its message rate: about
    // 96 KiB go through, the rest are refused with `rate_limited` (the server pushed them
    // all into a before, at whatever rate b sent).
    let s = start(config()).await;
    let (mut a, ida) = join(&s).await;
    let (mut b, _) = join(&s).await;
    let sdp = "x".repeat(1_000);
    let signal = json!({"type": "signal", "to": ida, "signal": {"kind": "offer", "sdp": sdp}});
    for _ in 0..150 {
        send(&mut b, signal.clone()).await;
    }
    let mut refused = 0;
    while let Some(m) = next(&mut b).await {
        if m["type"] == "error" {
            assert_eq!(m["code"], "rate_limited", "{m}");
            refused += 1;
        }
        if refused >= 50 {
            break;
        }
    }
    assert!(refused >= 50, "{refused} refused");
    // Those within the budget reached a.
    let got = until(&mut a, "signal").await;
    assert_eq!(got["signal"]["kind"], "offer");
}

#[tokio::test]
async fn floods_are_rate_limited_then_disconnected() {
    let limits = Limits {
        rate_per_sec: 5.0,
        burst: 5.0,
        strikes: 3,
        ..Limits::default()
    };
    let s = start(SignalingConfig { limits, ..config() }).await;
    let (mut a, ida) = join(&s).await;
    let (mut b, idb) = join(&s).await;
    for _ in 0..20 {
        if b.send(Message::Text(offer(&ida).to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(until(&mut b, "error").await["code"], "rate_limited");
    while let Some(m) = next(&mut b).await {
        assert!(m["type"] == "error" || m["type"] == "neighbours", "{m}");
    }
    // a received the first burst and is still served.
    assert_eq!(until(&mut a, "signal").await["from"], json!(idb));
    let (mut c, _) = join(&s).await;
    let _ = until(&mut c, "neighbours").await;
}

#[tokio::test]
async fn task_and_server_capacity_are_enforced() {
    let limits = Limits {
        max_peers_per_task: 2,
        max_connections: 3,
        ..Limits::default()
    };
    let s = start_with(
        SignalingConfig { limits, ..config() },
        None,
        &["digits", "other"],
    )
    .await;
    let _a = join(&s).await;
    let _b = join(&s).await;
    let mut c = connect(&s, "digits").await;
    assert_eq!(until(&mut c, "error").await["code"], "task_full");
    let mut d = connect(&s, "nope").await;
    assert_eq!(until(&mut d, "error").await["code"], "unknown_task");
    let mut other = connect(&s, "other").await;
    until(&mut other, "welcome").await;
    // Three connections are open now: the fourth is refused whatever its task.
    let mut e = connect(&s, "other").await;
    assert_eq!(until(&mut e, "error").await["code"], "server_full");
}

#[tokio::test]
async fn wrong_protocol_version_is_refused() {
    let s = start(config()).await;
    // Another number, no number, a negative one: each gets the typed error, not HTTP 400.
    // Version 1 (before updates were signed over their SHA-256) included.
    for query in ["v=1", "v=9", "v=x", "v=-1", "v=", "site=a&site=b"] {
        let mut ws = connect_async(format!("ws://{}/ws/digits?{query}", s.addr))
            .await
            .expect("connect")
            .0;
        assert_eq!(
            until(&mut ws, "error").await["code"],
            "bad_version",
            "{query}"
        );
    }
    // A repeated name: the first counts.
    let mut ws = connect_async(format!(
        "ws://{}/ws/digits?v=2&v=1&site=a.example&site=b",
        s.addr
    ))
    .await
    .expect("connect")
    .0;
    until(&mut ws, "welcome").await;
}

/// Only the data files tasks name are served. The description gives each one's SHA-256
/// and the task's revision; a client that
/// names the revision it loaded is refused with `task_changed` once the task or its data
/// changed (a tab that loaded the task before the server restarted with `[privacy]`
/// added trained on without noise among the new peers), and joins while it has not.
#[tokio::test]
async fn a_client_of_another_revision_of_the_task_is_refused() {
    use shoal_shared::trust::receipt::sha256;
    let data = std::env::temp_dir().join(format!("shoal-revision-{}", std::process::id()));
    std::fs::create_dir_all(data.join("digits")).expect("data dir");
    let names = [
        "train-images.idx",
        "train-labels.idx",
        "test-images.idx",
        "test-labels.idx",
    ];
    for (i, n) in names.iter().enumerate() {
        std::fs::write(data.join("digits").join(n), [i as u8; 10]).expect("file");
    }
    let run = |data: &std::path::Path| {
        let mut c = base(config(), None, &["digits"]);
        c.data = data.to_path_buf();
        start_config(c)
    };
    let describe = |s: SocketAddr| async move {
        let body = http_get(s, "/api/tasks/digits").await;
        serde_json::from_str::<Value>(body.split("\r\n\r\n").nth(1).expect("body")).expect("JSON")
    };
    let join = |s: SocketAddr, revision: String| async move {
        let url = format!("ws://{s}/ws/digits?v=2&revision={revision}");
        let mut ws = connect_async(url).await.expect("connect").0;
        next(&mut ws).await.expect("an answer")
    };
    let first = run(&data).await;
    // Only the files tasks name are served from the data folder; it served every one.
    std::fs::write(data.join("digits/private.csv"), "not for visitors").expect("file");
    std::fs::write(data.join("notes.txt"), "nor this").expect("file");
    for (path, status) in [
        ("/data/digits/test-labels.idx", "200"),
        ("/data/digits/private.csv", "404"),
        ("/data/notes.txt", "404"),
        ("/data/digits/../digits/test-labels.idx", "404"),
        ("/data/", "404"),
    ] {
        let answer = http_get(first.addr, path).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{path}: {}",
            answer.lines().next().unwrap_or("")
        );
    }
    let desc = describe(first.addr).await;
    assert_eq!(desc["files_sha256"][0], hex(&sha256(&[0u8; 10])), "{desc}");
    assert_eq!(desc["files_sha256"].as_array().map(Vec::len), Some(4));
    let revision = desc["revision"].as_str().expect("a revision").to_string();
    assert_eq!(revision.len(), 32);
    assert_eq!(join(first.addr, revision.clone()).await["type"], "welcome");
    // The server restarted with one data file changed: the old revision is refused.
    std::fs::write(data.join("digits/test-labels.idx"), [9u8; 10]).expect("changed");
    let second = run(&data).await;
    let now = describe(second.addr).await;
    assert_ne!(now["revision"], desc["revision"]);
    let refused = join(second.addr, revision.clone()).await;
    assert_eq!(refused["code"], "task_changed", "{refused}");
    // And with the task changed (another learning rate) on the same data.
    let mut c = base(config(), None, &["digits"]);
    c.data = data.clone();
    c.tasks[0].train.lr *= 0.5;
    let third = start_config(c).await;
    let now3 = describe(third.addr).await;
    assert_ne!(now3["revision"], now["revision"]);
    let stale = now["revision"].as_str().expect("revision").to_string();
    assert_eq!(join(third.addr, stale).await["code"], "task_changed");
    // A client that names no revision joins as before.
    let mut plain = connect(&third, "digits").await;
    until(&mut plain, "welcome").await;
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn origins_off_the_allowlist_are_refused() {
    let s = start(SignalingConfig {
        allowed_origins: vec!["https://good.example".into()],
        ..config()
    })
    .await;
    let mut req = format!("ws://{}/ws/digits?v=2", s.addr)
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().expect("header"));
    let err = connect_async(req).await.expect_err("refused");
    assert!(err.to_string().contains("403"), "{err}");
    let mut req = format!("ws://{}/ws/digits?v=2", s.addr)
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("origin", "https://good.example".parse().expect("header"));
    let (mut ws, _) = connect_async(req).await.expect("allowed origin");
    until(&mut ws, "welcome").await;
    // Without an allowlist only same-origin pages may connect.
    let s2 = start(config()).await;
    let mut req = format!("ws://{}/ws/digits?v=2", s2.addr)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "origin",
        format!("http://{}", s2.addr).parse().expect("header"),
    );
    assert!(connect_async(req).await.is_ok());
    let mut req = format!("ws://{}/ws/digits?v=2", s2.addr)
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("origin", "http://other.example".parse().expect("header"));
    assert!(connect_async(req).await.is_err());
    // DNS rebinding: a page on a name its owner points at this server sends a Host and
    // an Origin that agree. A name is not this server's to vouch for: refused.
    let port = s2.addr.port();
    let here = s2.addr.to_string();
    let cases = [
        (
            s2.addr,
            format!("evil.example:{port}"),
            format!("http://evil.example:{port}"),
            403,
        ),
        (
            s2.addr,
            format!("localhost:{port}"),
            format!("http://localhost:{port}"),
            101,
        ),
        // The same host on another port is another origin.
        (
            s2.addr,
            here.clone(),
            format!("http://127.0.0.1:{}", port ^ 1),
            403,
        ),
        (s2.addr, here.clone(), format!("https://{here}"), 101),
        // Allowlist entries match by scheme, host and port, whatever their spelling.
        (
            s.addr,
            s.addr.to_string(),
            "HTTPS://Good.Example:443".into(),
            101,
        ),
        (
            s.addr,
            s.addr.to_string(),
            "https://good.example:8443".into(),
            403,
        ),
    ];
    for (addr, host, origin, status) in cases {
        let answer = http_raw(
            addr,
            &format!(
                "GET /ws/digits?v=2 HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\n\
                 Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            ),
        )
        .await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "Host {host}, Origin {origin}: {answer}"
        );
    }
}

/// How many peer connections `/metrics` says ended for `reason`.
async fn disconnects(s: &Server, reason: &str) -> u64 {
    let metrics = http_get(s.addr, "/metrics").await;
    let series = format!("shoal_disconnects_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {metrics}"))
}

/// Whether the server's open connections fall to `n` within 5 s.
async fn open_connections_fall_to(s: &Server, n: usize) -> bool {
    tokio::time::timeout(Duration::from_secs(5), async {
        while s.hub.connections() > n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok()
}

/// Sends `request` as written and reads the answer's head (the connection may stay
/// open after a 101, so this reads what comes within a moment).
async fn http_raw(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut out))
        .await
        .expect("an answer")
        .expect("read");
    String::from_utf8_lossy(&out[..n]).into_owned()
}

/// Sends what `next` makes of the count sent so far, for 3 s or until a send waits 500
/// ms (the server stopped reading); returns the count sent.
async fn flood(ws: &mut Ws, mut next: impl FnMut(u32) -> Message) -> u32 {
    let start = std::time::Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(3) {
        match tokio::time::timeout(Duration::from_millis(500), ws.send(next(sent))).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    sent
}

#[tokio::test]
async fn a_ping_flood_is_rate_limited_like_any_message() {
    let s = start(config()).await;
    let (mut a, _) = join(&s).await;
    // Pings as fast as the socket takes them, never reading: every ping is answered with
    // a pong, and pongs that nobody reads used to pile up in the server's write buffer
    // (1.4-2 GB in 10 s). Pings count against the rate limit like any other message.
    let sent = flood(&mut a, |_| Message::Ping(vec![7u8; 125].into())).await;
    assert!(
        open_connections_fall_to(&s, 0).await,
        "the flooding connection is still open after {sent} pings"
    );
    assert_eq!(disconnects(&s, "rate_limit").await, 1);
}

/// Frames that carry nothing: a message begun and never ended, then empty continuation
/// frames, which the websocket library joins into that message without a word. They
/// cost no token, so a connection kept a core busy at its line rate, also when it ended
/// a pong now and then. Each message may take its bytes in frames and little more.
#[tokio::test]
async fn empty_continuation_frames_are_rate_limited_like_messages() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let s = start(config()).await;
    for pong_every in [0, 1_000] {
        let (mut a, _) = join(&s).await;
        let begun = Frame::message(b"{".to_vec(), OpCode::Data(Data::Text), false);
        a.send(Message::Frame(begun)).await.expect("send");
        let sent = flood(&mut a, |sent| {
            if pong_every > 0 && sent % pong_every == pong_every - 1 {
                Message::Pong(Vec::new().into())
            } else {
                Message::Frame(Frame::message(
                    Vec::new(),
                    OpCode::Data(Data::Continue),
                    false,
                ))
            }
        })
        .await;
        assert!(
            open_connections_fall_to(&s, 0).await,
            "still open after {sent} empty frames (a pong every {pong_every})"
        );
    }
    assert_eq!(disconnects(&s, "rate_limit").await, 2);
    // A pong between the fragments of a message is no flood (RFC 6455 lets control
    // frames come between them).
    let (mut a, _) = join(&s).await;
    let text = json!({"type": "report", "pad": "x".repeat(8_000)}).to_string();
    let (head, tail) = text.as_bytes().split_at(4_000);
    let first = Frame::message(head.to_vec(), OpCode::Data(Data::Text), false);
    a.send(Message::Frame(first)).await.expect("send");
    a.send(Message::Pong(Vec::new().into()))
        .await
        .expect("pong");
    let last = Frame::message(tail.to_vec(), OpCode::Data(Data::Continue), true);
    a.send(Message::Frame(last)).await.expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        disconnects(&s, "rate_limit").await,
        2,
        "the fragmented message is taken"
    );
    assert_eq!(s.hub.connections(), 1, "still open");
}

#[tokio::test]
async fn close_codes_say_why_and_vanished_peers_are_counted_as_gone() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, coding::CloseCode};
    let s = start(config()).await;
    // Why did the server close? Read until its close frame.
    async fn close_code(ws: &mut Ws) -> Option<CloseCode> {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }
    // A text frame that is not UTF-8: 1007.
    let (mut a, _) = join(&s).await;
    let frame = Frame::message(vec![0x7b, 0xff, 0xfe, 0x7d], OpCode::Data(Data::Text), true);
    a.send(Message::Frame(frame)).await.expect("send");
    assert_eq!(close_code(&mut a).await, Some(CloseCode::Invalid));
    // Larger than the limit: 1009.
    let (mut b, _) = join(&s).await;
    send(&mut b, json!({"type": "report", "pad": "x".repeat(20_000)})).await;
    assert_eq!(close_code(&mut b).await, Some(CloseCode::Size));
    // A protocol violation (a reserved opcode): 1002.
    let (mut c, _) = join(&s).await;
    let frame = Frame::message(vec![1, 2, 3], OpCode::Data(Data::Reserved(3)), true);
    let _ = c.send(Message::Frame(frame)).await;
    assert_eq!(close_code(&mut c).await, Some(CloseCode::Protocol));
    // A peer whose connection just breaks (no close frame) is `gone`, not an error.
    let (d, _) = join(&s).await;
    drop(d);
    assert!(
        open_connections_fall_to(&s, 0).await,
        "every connection ended"
    );
    for reason in ["invalid_text", "too_large", "frame_error", "gone"] {
        assert_eq!(disconnects(&s, reason).await, 1, "{reason}");
    }
}

#[tokio::test]
async fn closes_complete_their_handshake_and_a_flooder_gets_its_errors_before_the_close() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let s = start(config()).await;
    // The peer closes: the server answers with its own close frame (RFC 6455 5.5.1), not
    // by dropping the connection.
    let (mut a, _) = join(&s).await;
    a.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .expect("close");
    let mut answered = None;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), a.next()).await {
        if let Ok(Message::Close(frame)) = m {
            answered = frame.map(|f| f.code);
            break;
        }
    }
    assert_eq!(
        answered,
        Some(CloseCode::Normal),
        "the server answers a close"
    );
    // 1,000 messages in one write, past the burst of 200, read only 300 ms later (a raw
    // client, as an outsider's): the server refuses each excess message until the 20th
    // strike, then closes with 1008. It reads on until the peer's close answers its own,
    // so the socket is not reset with the flood unread, which would discard the errors
    // and the close frame waiting at the peer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A websocket upgrade, as a raw client sends it.
    const UPGRADE: &[u8] = b"GET /ws/digits?v=2 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";
    let mut raw = TcpStream::connect(s.addr).await.expect("connect");
    let mut flood = UPGRADE.to_vec();
    let text = br#"{"type":"foo"}"#;
    for _ in 0..1000 {
        // A masked text frame (mask 0: the payload as it is).
        flood.extend_from_slice(&[0x81, 0x80 | text.len() as u8, 0, 0, 0, 0]);
        flood.extend_from_slice(text);
    }
    raw.write_all(&flood).await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut got)).await;
    assert!(
        matches!(end, Ok(Ok(_))),
        "the connection ended with {end:?} after {} bytes",
        got.len()
    );
    let text = String::from_utf8_lossy(&got);
    assert_eq!(
        text.matches("rate_limited").count(),
        19,
        "every refusal arrives"
    );
    let close = [&[0x88, 12, 0x03, 0xf0][..], b"rate limit"].concat();
    assert!(
        got.windows(close.len()).any(|w| w == close),
        "the close frame, 1008"
    );

    // A frame that declares 8 MiB, far past the size cap, with its payload still being
    // streamed when the codec refuses it at its header: the 1009 close arrives, and the
    // connection ends without a reset.
    let mut raw = TcpStream::connect(s.addr).await.expect("connect");
    let mut big = UPGRADE.to_vec();
    big.extend_from_slice(&[0x81, 0x80 | 127]);
    big.extend_from_slice(&(8u64 << 20).to_be_bytes());
    big.extend_from_slice(&[0, 0, 0, 0]);
    big.resize(big.len() + (8 << 20), b'x');
    let (mut rd, mut wr) = raw.split();
    let write = async {
        let _ = wr.write_all(&big).await;
    };
    let read = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut got)).await;
        (end, got)
    };
    let ((), (end, got)) = tokio::join!(write, read);
    assert!(
        matches!(end, Ok(Ok(_))),
        "the connection ended with {end:?} after {} bytes",
        got.len()
    );
    let close = [&[0x88, 19, 0x03, 0xf1][..], b"message too large"].concat();
    assert!(
        got.windows(close.len()).any(|w| w == close),
        "the close frame, 1009"
    );
}

/// Asserts that `answer` has HTTP status `status` (`case` names the request).
fn answered(answer: &str, status: &str, case: &dyn std::fmt::Debug) {
    assert!(
        answer.starts_with(&format!("HTTP/1.1 {status}")),
        "{case:?}: {}",
        &answer[..answer.len().min(200)]
    );
}

#[tokio::test]
async fn long_request_targets_get_414_and_long_heads_431_not_an_error() {
    let s = start(config()).await;
    // Past 2,048 bytes the target is refused; past the head's 32 KiB, the whole head.
    for (len, status) in [(8 << 10, "414"), (64 << 10, "431")] {
        let path = format!("/{}", "a".repeat(len));
        let answer = http_get(s.addr, &path).await;
        answered(&answer, status, &len);
    }
    // A name longer than a file's can be is not found, not a server error (which the
    // file service logged at ERROR, a line per request); with gzip accepted, the `.gz`
    // it looks for first is 3 bytes longer.
    for path in ["/", "/data/", "/dashboard/"] {
        for (len, gzip) in [(300, ""), (253, "Accept-Encoding: gzip\r\n")] {
            let path = format!("{path}{}", "a".repeat(len));
            let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{gzip}Connection: close\r\n\r\n");
            answered(&http_raw(s.addr, &head).await, "404", &(len, gzip));
        }
    }
    // Headers of 40 KiB are refused, whole or still coming: an unfinished head is not
    // held until the head's deadline (hyper's default held about 400 KB of it).
    let padding = format!("X-Pad: {}\r\n", "p".repeat(1000)).repeat(40);
    for end in ["Connection: close\r\n\r\n", ""] {
        let head = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{padding}{end}");
        answered(&http_raw(s.addr, &head).await, "431", &end);
    }
    assert!(
        http_get(s.addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
    );
}

#[tokio::test]
async fn silent_connections_time_out() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(600),
        ping_interval: Duration::from_millis(200),
        ..Limits::default()
    };
    let s = start(SignalingConfig { limits, ..config() }).await;
    let (ws, _) = join(&s).await;
    // Never read: pings go unanswered (tungstenite answers them only while reading).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.hub.connections(), 0, "idle connection was not closed");
    assert_eq!(disconnects(&s, "idle_timeout").await, 1);
    drop(ws);
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_dropped_and_its_neighbour_told() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(1000),
        write_timeout: Duration::from_millis(1000),
        ping_interval: Duration::from_millis(250),
        rate_per_sec: 1e6,
        burst: 1e6,
        link_signal_bytes: 1e12,
        ..Limits::default()
    };
    let s = start(SignalingConfig { limits, ..config() }).await;
    let (stuck, id_stuck) = join(&s).await;
    let (mut b, _) = join(&s).await;
    // Offers of nearly the largest size, until the socket buffers between the server and
    // the peer that never reads are full (those the server cannot queue, past the
    // neighbour's share, it drops): the server's writes to it stop completing. Its writes
    // time out after the write timeout: it is dropped and its neighbour (which reads, and
    // so answers pings) hears that it left.
    let sdp = "a".repeat(shoal_shared::protocol::DEFAULT_MAX_MESSAGE_BYTES - 200);
    let big = json!({"type": "signal", "to": id_stuck, "signal": {"kind": "offer", "sdp": sdp}});
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let left = loop {
        for _ in 0..100 {
            send(&mut b, big.clone()).await;
        }
        if let Ok(left) =
            tokio::time::timeout(Duration::from_millis(20), until(&mut b, "left")).await
        {
            break left;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the peer that stopped reading is dropped"
        );
    };
    assert_eq!(left["peer"], id_stuck.as_str());
    assert!(
        open_connections_fall_to(&s, 1).await,
        "the stuck connection is closed"
    );
    assert_eq!(disconnects(&s, "send_failed").await, 1);
    drop(stuck);
}

#[tokio::test]
async fn neighbour_sets_stay_bounded_and_are_repaired_on_leave() {
    let s = start(SignalingConfig {
        neighbours: 3,
        ..config()
    })
    .await;
    let mut peers = Vec::new();
    for _ in 0..12 {
        peers.push(join(&s).await);
    }
    let pid = |id: &str| shoal_shared::protocol::PeerId(u64::from_str_radix(id, 16).expect("hex"));
    for (_, id) in &peers {
        let n = s.hub.neighbours_of("digits", pid(id)).expect("peer").len();
        assert!(n <= 6, "peer has {n} neighbours, more than 2k");
    }
    // Remove a third; everyone left still has neighbours, all of them alive.
    let gone: Vec<_> = peers.drain(..4).collect();
    drop(gone);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (_, id) in &peers {
        let n = s.hub.neighbours_of("digits", pid(id)).expect("peer");
        assert!(!n.is_empty(), "peer {id} was left without neighbours");
        for m in &n {
            assert!(
                peers.iter().any(|(_, x)| pid(x) == *m),
                "neighbour {m} has left"
            );
        }
    }
}

#[tokio::test]
async fn metrics_health_and_graceful_shutdown() {
    let mut s = start(config()).await;
    let (mut a, ida) = join(&s).await;
    let (mut b, _) = join(&s).await;
    send(&mut b, offer(&ida)).await;
    until(&mut a, "signal").await;
    b.send(Message::Text("nope".into())).await.expect("send");
    until(&mut b, "error").await;
    let body = http_get(s.addr, "/metrics").await;
    assert!(
        body.contains("shoal_peers_online{task=\"digits\"} 2"),
        "{body}"
    );
    assert!(body.contains("shoal_messages_relayed_total 1"), "{body}");
    assert!(
        body.contains("shoal_messages_rejected_total{reason=\"malformed\"} 1"),
        "{body}"
    );
    assert!(http_get(s.addr, "/healthz").await.ends_with("ok\n"));
    assert!(
        http_get(s.addr, "/api/tasks/digits")
            .await
            .contains("\"/data/digits/train-images.idx\"")
    );
    // Shutdown closes the websockets with "going away" and the server returns.
    let _ = s.stop.take().expect("stop").send(());
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), a.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => break u16::from(f.code),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(closed, 1001);
    drop((a, b));
    tokio::time::timeout(Duration::from_secs(5), s.done)
        .await
        .expect("server stops")
        .expect("join")
        .expect("serve");
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    http(addr, "GET", path, "").await
}

async fn http(addr: SocketAddr, method: &str, path: &str, headers: &str) -> String {
    String::from_utf8(http_response(addr, method, path, headers).await).expect("a text response")
}

/// A request of `method` for `path` with extra `headers`, the whole raw response.
async fn http_response(addr: SocketAddr, method: &str, path: &str, headers: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n{headers}Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn malformed_websocket_handshakes_are_refused_with_a_reason() {
    let s = start(config()).await;
    let ws = "/ws/digits?v=2";
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n";
    let cases = [
        ("GET", String::new(), "426", "websocket only", "a plain GET"),
        (
            "GET",
            format!("{upgrade}Sec-WebSocket-Version: 8\r\n{key}"),
            "426",
            "version 13 is required",
            "an older protocol version",
        ),
        (
            "GET",
            format!("{upgrade}Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n"),
            "400",
            "Sec-WebSocket-Key",
            "a key that is not 16 bytes of base64",
        ),
        // Refused by the router, before the handshake is looked at (not counted).
        (
            "POST",
            format!("{upgrade}Sec-WebSocket-Version: 13\r\n{key}"),
            "405",
            "",
            "another method",
        ),
    ];
    for (method, headers, status, why, case) in cases {
        let r = http(s.addr, method, ws, &headers).await;
        assert!(r.starts_with(&format!("HTTP/1.1 {status}")), "{case}: {r}");
        assert!(r.contains(why), "{case}: {r}");
        if status == "426" {
            assert!(
                r.to_lowercase().contains("sec-websocket-version: 13"),
                "{case}: {r}"
            );
        }
    }
    let metrics = http_get(s.addr, "/metrics").await;
    assert!(
        metrics.contains("shoal_messages_rejected_total{reason=\"malformed\"} 3"),
        "{metrics}"
    );
    // A well-formed handshake still gets in, answered with the RFC 6455 accept key.
    let (mut a, _) = join(&s).await;
    assert!(a.close(None).await.is_ok());
}

#[tokio::test]
async fn an_unreachable_pair_is_unlinked_and_both_get_other_neighbours() {
    let s = start(SignalingConfig {
        neighbours: 1,
        ..config()
    })
    .await;
    let (mut a, ida) = join(&s).await;
    let (mut b, idb) = join(&s).await;
    assert_eq!(until(&mut b, "neighbours").await["peers"], json!([ida]));
    let (_c, idc) = join(&s).await;
    let pid = |id: &str| shoal_shared::protocol::PeerId(u64::from_str_radix(id, 16).expect("hex"));
    // Make sure a and b are linked (k = 1, so c joined someone else or one of them).
    assert!(
        s.hub
            .neighbours_of("digits", pid(&ida))
            .expect("a")
            .contains(&pid(&idb))
    );
    send(&mut a, json!({"type": "unreachable", "peer": idb})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let na = s.hub.neighbours_of("digits", pid(&ida)).expect("a");
    let nb = s.hub.neighbours_of("digits", pid(&idb)).expect("b");
    assert!(
        !na.contains(&pid(&idb)) && !nb.contains(&pid(&ida)),
        "pair unlinked: {na:?} {nb:?}"
    );
    assert!(
        na.contains(&pid(&idc)) || nb.contains(&pid(&idc)),
        "a replacement was drawn"
    );
    // Naming a peer that is not a neighbour is refused.
    send(&mut a, json!({"type": "unreachable", "peer": idb})).await;
    assert_eq!(until(&mut a, "error").await["code"], "not_neighbour");
}

fn report(version: u64, accuracy: f64) -> Value {
    json!({"type": "report", "report": {
        "role": "trainer", "version": version, "samples": 640, "samples_per_s": 210.0,
        "loss": 0.3, "accuracy": accuracy, "bytes_up": 1000, "bytes_down": 2000, "used": 3,
        "rejected": {"norm": 2}, "paused": false, "backend": "cpu"
    }})
}

#[tokio::test]
async fn the_swarm_view_is_written_once_a_second_whoever_asks() {
    let s = start(config()).await;
    let (mut a, _) = join(&s).await;
    let reported = || async {
        let body = http_get(s.addr, "/api/tasks/digits/swarm").await;
        let json: Value = serde_json::from_str(body.split("\r\n\r\n").nth(1).expect("body"))
            .expect("swarm view is JSON");
        json["peers"][0]["report"]["version"].as_u64()
    };
    assert_eq!(reported().await, None);
    send(&mut a, report(7, 0.93)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Asked again at once: the view written a moment ago, not built again.
    assert_eq!(reported().await, None, "the view of a moment ago");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(reported().await, Some(7), "a second later, the view anew");
}

#[tokio::test]
async fn reports_reach_the_swarm_view_and_bad_ones_are_refused() {
    let s = start(config()).await;
    let (mut a, ida) = join(&s).await;
    let (mut b, idb) = join(&s).await;
    send(&mut a, report(7, 0.93)).await;
    send(&mut b, report(8, 1.5)).await; // accuracy above 1
    let e = until(&mut b, "error").await;
    assert_eq!(e["code"], "malformed");
    assert!(
        e["message"].as_str().expect("text").contains("accuracy"),
        "{e}"
    );
    // What fake peers sent the dashboard: a round near 2^64, six billion samples a
    // second, and a reason named after an Object prototype property.
    for (field, lie, named) in [
        ("version", json!(u64::MAX), "version"),
        ("samples_per_s", json!(6e9), "samples_per_s"),
        ("rejected", json!({"constructor": 5}), "not a reason name"),
    ] {
        let mut liar = report(8, 0.9);
        liar["report"][field] = lie;
        send(&mut b, liar).await;
        let e = until(&mut b, "error").await;
        let message = e["message"].as_str().expect("text");
        assert!(message.contains(named), "{field}: {e}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let body = http_get(s.addr, "/api/tasks/digits/swarm").await;
    let json: Value = serde_json::from_str(body.split("\r\n\r\n").nth(1).expect("body"))
        .expect("swarm view is JSON");
    let peers = json["peers"].as_array().expect("peers");
    assert_eq!(peers.len(), 2);
    let pa = peers
        .iter()
        .find(|p| p["id"] == json!(ida))
        .expect("a listed");
    assert_eq!(pa["report"]["version"], 7);
    assert_eq!(pa["neighbours"], json!([idb]), "the graph's edge");
    let pb = peers
        .iter()
        .find(|p| p["id"] == json!(idb))
        .expect("b listed");
    assert!(
        pb.get("report").is_none(),
        "the refused report was not stored"
    );
    assert!(
        http_get(s.addr, "/api/tasks/nope/swarm")
            .await
            .starts_with("HTTP/1.1 404")
    );
}

#[tokio::test]
async fn control_actions_need_the_admin_token() {
    let token = "0123456789abcdef-admin";
    let s = start_with(config(), Some(token), &["digits"]).await;
    let (mut a, _) = join(&s).await;
    // Every peer hears the task's state on joining: running.
    assert_eq!(until(&mut a, "task_state").await["paused"], false);
    let addr = s.addr;
    let post =
        |path: &'static str, auth: String| async move { http(addr, "POST", path, &auth).await };
    assert!(
        post("/api/tasks/digits/pause", String::new())
            .await
            .starts_with("HTTP/1.1 401")
    );
    assert!(
        post(
            "/api/tasks/digits/pause",
            "Authorization: Bearer wrong\r\n".into()
        )
        .await
        .starts_with("HTTP/1.1 401")
    );
    let auth = format!("Authorization: Bearer {token}\r\n");
    assert!(
        post("/api/tasks/digits/pause", auth.clone())
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert_eq!(until(&mut a, "task_state").await["paused"], true);
    // A peer joining a paused task hears so right after its welcome.
    let (mut b, _) = join(&s).await;
    assert_eq!(until(&mut b, "task_state").await["paused"], true);
    assert!(
        http_get(s.addr, "/api/tasks/digits/swarm")
            .await
            .contains("\"paused\":true")
    );
    assert!(
        post("/api/tasks/digits/resume", auth.clone())
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert_eq!(until(&mut a, "task_state").await["paused"], false);
    assert!(
        post("/api/tasks/digits/export", auth.clone())
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        post("/api/tasks/nope/pause", auth.clone())
            .await
            .starts_with("HTTP/1.1 404")
    );
    assert!(
        post("/api/tasks/digits/explode", auth)
            .await
            .starts_with("HTTP/1.1 404")
    );
    // A server without a token refuses every control action.
    let open = start(config()).await;
    let r = http(
        open.addr,
        "POST",
        "/api/tasks/digits/pause",
        "Authorization: Bearer x\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains("no admin token"),
        "{r}"
    );
}

#[tokio::test]
async fn only_the_widget_frame_may_be_framed_by_other_sites() {
    let s = start(config()).await;
    let page = http_get(s.addr, "/").await.to_ascii_lowercase();
    assert!(
        page.contains("content-security-policy: frame-ancestors 'self'"),
        "{page}"
    );
    let dash = http_get(s.addr, "/dashboard/").await.to_ascii_lowercase();
    assert!(dash.contains("frame-ancestors 'self'"), "{dash}");
    let widget = http_get(s.addr, "/embed.html").await.to_ascii_lowercase();
    assert!(!widget.contains("frame-ancestors"), "{widget}");
    // Nor may another site's window keep a hold of the pages: opened by it (or its own
    // tab sent there), they are in a browsing context group of their own. The widget's
    // too: framed, a browser ignores it; opened as a popup, it was the one page its
    // opener kept a hold of.
    for head in [&page, &dash, &widget] {
        assert!(
            head.contains("cross-origin-opener-policy: same-origin"),
            "{head}"
        );
    }
    // The widget's consent window: never framed (a page could lay it over a decoy), and
    // in its opener's browsing context group (the widget's frame, which it tells).
    let window = http_get(s.addr, "/consent.html").await.to_ascii_lowercase();
    assert!(window.contains("frame-ancestors 'self'"), "{window}");
    assert!(!window.contains("cross-origin-opener-policy"), "{window}");
}

#[tokio::test]
async fn a_site_that_isolates_itself_may_load_the_widget() {
    // A page with COEP require-corp loads a script or frames a page of another origin only
    // if it says it may be (CORP), and frames only documents that isolate themselves.
    let www = std::env::temp_dir().join(format!("shoal-isolated-www-{}", std::process::id()));
    std::fs::create_dir_all(&www).expect("www");
    for file in ["embed.html", "worker.js", "style.css"] {
        std::fs::write(www.join(file), "/* a site file */").expect("write");
    }
    std::fs::write(www.join("embed.js"), "(function () { var COSTS = {}; })();").expect("embed");
    let mut config = base(config(), None, &["digits"]);
    config.www = www.clone();
    let s = start_config(config).await;
    for path in ["/embed.js", "/embed.html", "/style.css", "/worker.js"] {
        let head = http_get(s.addr, path).await.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
        assert!(
            head.contains("cross-origin-resource-policy: cross-origin"),
            "{path}: {head}"
        );
        // The widget's frame and the worker it starts isolate themselves too.
        let isolates = matches!(path, "/embed.html" | "/worker.js");
        assert_eq!(
            head.contains("cross-origin-embedder-policy: require-corp"),
            isolates,
            "{path}: {head}"
        );
    }
    let _ = std::fs::remove_dir_all(&www);
}

/// A client connection from a loopback address of our choosing (127.0.0.0/8 is all
/// loopback on Linux): a peer from another network address.
async fn connect_from(s: &Server, from: [u8; 4]) -> Ws {
    connect_forwarded(s, from, None).await
}

/// [`connect_from`], its upgrade request carrying `X-Forwarded-For: forwarded` (as a
/// reverse proxy's does, or a client's that makes one up).
async fn connect_forwarded(s: &Server, from: [u8; 4], forwarded: Option<&str>) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback address");
    let tcp = socket.connect(s.addr).await.expect("connect");
    let mut request = format!("ws://{}/ws/digits?v=2", s.addr)
        .into_client_request()
        .expect("a request");
    if let Some(f) = forwarded {
        request
            .headers_mut()
            .insert("x-forwarded-for", f.parse().expect("a header value"));
    }
    tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp))
        .await
        .expect("upgrade")
        .0
}

/// Behind a trusted reverse proxy each client is the address the proxy appended to
/// `X-Forwarded-For`, for every per-address rule (here one peer per address), and the
/// proxy's own connections take no share of one address; anyone else's header counts for
/// nothing. Without this every client behind the proxy was one address: the caps either
/// had to go (the README said to set them to 0) or refused all but the first visitors.
#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_is_its_own_address() {
    let limits = Limits {
        max_peers_per_address: 1,
        ..Limits::default()
    };
    let mut config = base(SignalingConfig { limits, ..config() }, None, &["digits"]);
    config.http.max_connections_per_address = 2;
    config.http.trusted_proxies = vec![[127, 0, 0, 9].into()];
    let s = start_config(config).await;
    let proxy = [127, 0, 0, 9];
    let mut a = connect_forwarded(&s, proxy, Some("10.0.0.1")).await;
    until(&mut a, "welcome").await;
    let mut b = connect_forwarded(&s, proxy, Some("10.0.0.2")).await;
    until(&mut b, "welcome").await;
    // What a client put before the proxy's entry is not its address.
    let mut again = connect_forwarded(&s, proxy, Some("198.51.100.7, 10.0.0.1")).await;
    assert_eq!(until(&mut again, "error").await["code"], "address_full");
    let mut c = connect_forwarded(&s, proxy, Some("10.0.0.3")).await;
    until(&mut c, "welcome").await;
    // A client that is not the proxy is its own address, whatever it says.
    let mut d = connect_forwarded(&s, [127, 0, 0, 5], Some("10.0.0.4")).await;
    until(&mut d, "welcome").await;
    let mut e = connect_forwarded(&s, [127, 0, 0, 5], Some("10.0.0.5")).await;
    assert_eq!(until(&mut e, "error").await["code"], "address_full");
}

/// Joins from `from` and says something (a report), as a live peer does.
async fn join_live(s: &Server, from: [u8; 4]) -> (Ws, String) {
    let mut ws = connect_from(s, from).await;
    let id = until(&mut ws, "welcome").await["peer"]
        .as_str()
        .expect("peer id")
        .to_string();
    send(&mut ws, report(1, 0.5)).await;
    (ws, id)
}

#[tokio::test]
async fn one_address_can_neither_fill_a_task_nor_surround_a_newcomer() {
    let limits = Limits {
        max_peers_per_address: 12,
        ..Limits::default()
    };
    let s = start(SignalingConfig {
        limits,
        neighbours: 6,
        ..config()
    })
    .await;
    // One client with twelve peers, the cap for its address, and four honest visitors.
    let mut crowd = Vec::new();
    for _ in 0..12 {
        crowd.push(join_live(&s, [127, 0, 0, 2]).await);
    }
    let mut extra = connect_from(&s, [127, 0, 0, 2]).await;
    assert_eq!(until(&mut extra, "error").await["code"], "address_full");
    let mut honest = Vec::new();
    for i in 3..7 {
        honest.push(join_live(&s, [127, 0, 0, i]).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Newcomers get at most a third of their neighbours from that one address.
    let crowd_ids: std::collections::HashSet<String> =
        crowd.iter().map(|(_, id)| id.clone()).collect();
    for n in 0..5 {
        let mut newcomer = connect_from(&s, [127, 0, 0, 20 + n]).await;
        let peers = until(&mut newcomer, "neighbours").await["peers"]
            .as_array()
            .expect("peers")
            .clone();
        let from_crowd = peers
            .iter()
            .filter(|p| crowd_ids.contains(p.as_str().expect("id")))
            .count();
        assert!(peers.len() >= 4, "a newcomer gets neighbours: {peers:?}");
        assert!(
            from_crowd <= 2,
            "{from_crowd} of {} neighbours from one address",
            peers.len()
        );
    }
}

#[tokio::test]
async fn silent_peers_are_not_given_to_newcomers() {
    let limits = Limits {
        quiet_after: Duration::from_millis(200),
        ..Limits::default()
    };
    let s = start(SignalingConfig {
        limits,
        neighbours: 4,
        ..config()
    })
    .await;
    // Upgraded, then silent: no signal, no report.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(join(&s).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_live, live_id) = join_live(&s, [127, 0, 0, 1]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut newcomer = connect(&s, "digits").await;
    let peers = until(&mut newcomer, "neighbours").await["peers"].clone();
    assert_eq!(peers, json!([live_id]), "only the live peer is a neighbour");
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = base(config(), None, &["digits"]);
    config.http.header_read_timeout = Duration::from_millis(500);
    let s = start_config(config).await;
    // A request head that never ends (slowloris), a connection that sends nothing, and
    // one kept alive after a request: each is closed after the header timeout.
    let mut slow = TcpStream::connect(s.addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut idle = TcpStream::connect(s.addr).await.expect("connect");
    let mut kept = TcpStream::connect(s.addr).await.expect("connect");
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut first = [0u8; 256];
    let n = kept.read(&mut first).await.expect("read");
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "the kept-alive request is served"
    );
    for (name, conn) in [
        ("slow", &mut slow),
        ("idle", &mut idle),
        ("kept alive", &mut kept),
    ] {
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(3), conn.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the {name} connection is still open");
    }
}

#[tokio::test]
async fn connections_past_the_cap_get_503_and_the_server_stays_up() {
    let mut config = base(config(), None, &["digits"]);
    config.http.max_connections = 20;
    config.http.header_read_timeout = Duration::from_millis(700);
    let s = start_config(config).await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(s.addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = http_get(s.addr, "/healthz").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    // The idle ones time out; then everyone is served again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        http_get(s.addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let metrics = http_get(s.addr, "/metrics").await;
    assert!(
        metrics.contains("shoal_connections_refused_total 1"),
        "{metrics}"
    );
    drop(idle);
}

/// A plain `GET /healthz` from 127.0.0.`from`, on a connection that stays open until
/// it is dropped (the server's answer is read first); returns the connection and the
/// status line.
async fn health_from(addr: SocketAddr, from: u8) -> (TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::from(([127, 0, 0, from], 0)))
        .expect("bind");
    let mut c = sock.connect(addr).await.expect("connect");
    c.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut head = vec![0u8; 12];
    c.read_exact(&mut head).await.expect("read");
    (c, String::from_utf8_lossy(&head).into_owned())
}

#[tokio::test]
async fn an_address_that_reconnects_in_a_loop_is_slowed_to_its_rate() {
    let limits = Limits {
        joins_per_address_per_sec: 0.5,
        join_burst: 3.0,
        ..Limits::default()
    };
    let s = start(SignalingConfig { limits, ..config() }).await;
    let url = format!("ws://{}/ws/digits?v=2", s.addr);
    // Connecting and leaving at once, as fast as it can: the burst, then 429.
    let mut refused = None;
    for n in 0..10 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 21], 0)))
            .expect("bind");
        let tcp = socket.connect(s.addr).await.expect("connect");
        match tokio_tungstenite::client_async(&url, MaybeTlsStream::Plain(tcp)).await {
            Ok((ws, _)) => drop(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 429);
                assert_eq!(r.headers()["retry-after"], "5");
                refused = Some(n);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(refused, Some(3), "three connections, then refused");
    // Another address is not held back by it.
    let mut other = connect_from(&s, [127, 0, 0, 22]).await;
    until(&mut other, "welcome").await;
    // Two seconds later the first address has one connection again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut again = connect_from(&s, [127, 0, 0, 21]).await;
    until(&mut again, "welcome").await;
}

#[tokio::test]
async fn one_address_cannot_hold_every_connection() {
    let mut config = base(config(), None, &["digits"]);
    config.http.max_connections = 20;
    config.http.max_connections_per_address = 4;
    let s = start_config(config).await;
    // One address keeps four connections open (kept alive after their answers)...
    let mut held = Vec::new();
    for _ in 0..4 {
        let (c, status) = health_from(s.addr, 7).await;
        assert_eq!(status, "HTTP/1.1 200", "within the share");
        held.push(c);
    }
    // ...its fifth is refused with 429, while another address is served.
    let (_, status) = health_from(s.addr, 7).await;
    assert_eq!(status, "HTTP/1.1 429", "past the share");
    let (_, status) = health_from(s.addr, 8).await;
    assert_eq!(status, "HTTP/1.1 200", "another address");
    // A closed connection gives its place back.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, status) = health_from(s.addr, 7).await;
    assert_eq!(status, "HTTP/1.1 200", "a place given back");
    let metrics = http_get(s.addr, "/metrics").await;
    assert!(
        metrics.contains("shoal_connections_refused_per_address_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_site_is_compressed_once_and_a_file_changed_since_is_never_sent_stale() {
    let dir = std::env::temp_dir().join(format!("shoal-site-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("pkg")).expect("dir");
    let old = "const bundle = 1;\n".repeat(400);
    std::fs::write(dir.join("pkg/app.js"), &old).expect("write");
    assert_eq!(shoal_signaling_server::precompress::precompress(&dir), 1);
    let gz_len = std::fs::metadata(dir.join("pkg/app.js.gz"))
        .expect("gz")
        .len();
    let mut config = base(config(), None, &["digits"]);
    config.www = dir.clone();
    let s = start_config(config).await;
    // Gzip clients get the `.gz` written at start, with its length: no compression per
    // request.
    sends_its_gz(s.addr, "/pkg/app.js", gz_len).await;
    // The bundle is rebuilt while the server runs, and put in place with a time of its
    // own, newer or older than the `.gz` (a rename keeps the build's time): either way
    // the `.gz` is not sent, and the new file goes as it is, uncompressed (the server
    // compresses nothing per request for it).
    for (round, shift) in [(2, 3600i64), (3, -3600)] {
        let new = format!("const bundle = {round};\n").repeat(400);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(dir.join("pkg/app.js"))
            .expect("open");
        std::io::Write::write_all(&mut &file, new.as_bytes()).expect("write");
        let now = std::time::SystemTime::now();
        let at = if shift > 0 {
            now + Duration::from_secs(shift.unsigned_abs())
        } else {
            now - Duration::from_secs(shift.unsigned_abs())
        };
        file.set_modified(at).expect("mtime");
        drop(file);
        let (head, body) = get_split(s.addr, "/pkg/app.js").await;
        assert!(!head.contains("content-encoding"), "{head}");
        assert!(
            body == new.as_bytes(),
            "the stale .gz was sent: {:?}",
            String::from_utf8_lossy(&body[..body.len().min(20)])
        );
    }
    // A file that is compressed already (no `.gz` is written for it), or one put there
    // after the start, goes as it is: the server never compresses a large file per
    // request; a small one it may.
    std::fs::write(dir.join("pkg/model.zip"), vec![7u8; 4096]).expect("write");
    std::fs::write(dir.join("pkg/later.js"), "let later = 1;\n".repeat(400)).expect("write");
    std::fs::write(dir.join("pkg/small.js"), "let small = 1;\n".repeat(40)).expect("write");
    for (path, compressed) in [
        ("/pkg/model.zip", false),
        ("/pkg/later.js", false),
        ("/pkg/small.js", true),
    ] {
        let raw = http_response(s.addr, "GET", path, "Accept-Encoding: gzip\r\n").await;
        let head = String::from_utf8_lossy(&raw);
        let head = head.split("\r\n\r\n").next().unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert_eq!(
            head.contains("content-encoding"),
            compressed,
            "{path}: {head}"
        );
    }
    // Paths the file service maps to the same file by another spelling, or a file asked
    // for as a folder: never the stale `.gz`, never compressed per request.
    for odd in [
        "/pkg/./app.js",
        "/pkg/app%2Ejs",
        "/pkg/app.js/",
        "/pkg/../pkg/app.js",
    ] {
        let (head, _) = get_split(s.addr, odd).await;
        assert!(!head.contains("content-encoding"), "{odd}: {head}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Asserts that a gzip client gets `path` as its `.gz` of `gz_len` bytes, marked as
/// varying by `Accept-Encoding` (for caches between).
async fn sends_its_gz(addr: SocketAddr, path: &str, gz_len: u64) {
    let head = http(addr, "HEAD", path, "Accept-Encoding: gzip\r\n").await;
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert_eq!(head.matches("vary: accept-encoding").count(), 1, "{head}");
    assert!(
        head.contains(&format!("content-length: {gz_len}")),
        "{head}"
    );
}

/// A gzip client's GET of `path`: the head (lower case) and the body as it came
/// (chunks joined).
async fn get_split(addr: SocketAddr, path: &str) -> (String, Vec<u8>) {
    let got = http_response(addr, "GET", path, "Accept-Encoding: gzip\r\n").await;
    let split = got.windows(4).position(|w| w == b"\r\n\r\n").expect("head");
    let head = String::from_utf8_lossy(&got[..split]).to_ascii_lowercase();
    let body = &got[split + 4..];
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_vec()
    };
    (head, body)
}

/// The body of a chunked HTTP/1.1 response.
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = b.windows(2).position(|w| w == b"\r\n").expect("chunk size");
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..line]).expect("hex"), 16).expect("hex");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[line + 2..line + 2 + size]);
        b = &b[line + 2 + size + 2..];
    }
}

/// A large data file the demo task names (only the files tasks name are served).
const BIG: &str = "digits/train-images.idx";
const BIG_GZ: &str = "digits/train-images.idx.gz";

#[tokio::test]
async fn a_download_nobody_reads_is_dropped_and_data_is_compressed_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = std::env::temp_dir().join(format!("shoal-http-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("digits")).expect("dir");
    // 32 MB that compress (digits-like bytes), far more than socket buffers hold.
    let big: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8 & 0xf0).collect();
    std::fs::write(dir.join(BIG), &big).expect("write");
    assert_eq!(shoal_signaling_server::precompress::precompress(&dir), 1);
    assert_eq!(
        shoal_signaling_server::precompress::precompress(&dir),
        0,
        "an up-to-date .gz is not written again"
    );
    let gz_len = std::fs::metadata(dir.join(BIG_GZ)).expect("gz").len();
    let mut config = base(config(), None, &["digits"]);
    config.data = dir.clone();
    config.http.write_stall_timeout = Duration::from_millis(500);
    let s = start_config(config).await;
    // Gzip clients get the file compressed once, with its length (not compressed again
    // per request, which streams without one).
    sends_its_gz(s.addr, &format!("/data/{BIG}"), gz_len).await;
    // A client that asks for the whole file and never reads: dropped.
    let mut stuck = TcpStream::connect(s.addr).await.expect("connect");
    stuck
        .write_all(format!("GET /data/{BIG} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stuck.read_to_end(&mut got)).await;
    assert!(
        got.len() < big.len(),
        "the server waited for a reader that never read ({} bytes came)",
        got.len()
    );
    // A `.gz` whose file is gone (a stray one, or its file removed since the start) is
    // not served in the file's place.
    std::fs::remove_file(dir.join(BIG)).expect("remove");
    let mut c = TcpStream::connect(s.addr).await.expect("connect");
    c.write_all(format!("GET /data/{BIG} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .expect("read");
    let head = String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned();
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A download read a little at a time (a few KB every moment, enough that no write
/// stalls) is ended once its writes have waited past the grace at less than the rate
/// floor: it held its connection, and the file's buffers, for as long as it liked.
#[tokio::test]
async fn a_download_trickled_out_is_ended_at_the_rate_floor() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = std::env::temp_dir().join(format!("shoal-slow-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("digits")).expect("dir");
    std::fs::write(dir.join(BIG), vec![7u8; 16 << 20]).expect("write");
    let mut config = base(config(), None, &["digits"]);
    config.data = dir.clone();
    config.http.write_stall_timeout = Duration::from_secs(30);
    config.http.slow_grace = Duration::from_secs(1);
    config.http.min_write_rate = 64 * 1024;
    // One connection an address: while the download holds it, others get 429.
    config.http.max_connections_per_address = 1;
    let s = start_config(config).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("a small window");
    let mut slow = socket.connect(s.addr).await.expect("connect");
    slow.write_all(format!("GET /data/{BIG} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        for _ in 0..300 {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        http_get(s.addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 429"),
        "the download holds the address's connection"
    );
    let freed = tokio::time::timeout(Duration::from_secs(10), async {
        while !http_get(s.addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(freed.is_ok(), "the trickled download was not ended");
    reader.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_pause_survives_a_restart_and_a_resume_reaches_everyone() {
    let dir = std::env::temp_dir().join(format!("shoal-state-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let state = dir.join("state.json");
    let _ = std::fs::remove_file(&state);
    let token = "admin-token-0123456789";
    let with_state = || {
        let mut c = base(config(), Some(token), &["digits"]);
        c.state_file = Some(state.clone());
        c
    };
    let auth = format!("Authorization: Bearer {token}\r\n");
    let mut first = start_config(with_state()).await;
    let (mut a, _) = join(&first).await;
    assert_eq!(
        until(&mut a, "task_state").await["paused"],
        false,
        "told on join: running"
    );
    let answer = http(first.addr, "POST", "/api/tasks/digits/pause", &auth).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(until(&mut a, "task_state").await["paused"], true);
    let _ = first.stop.take().expect("stop").send(());
    let _ = first.done.await;
    // The restarted server remembers, and tells every peer that joins.
    let second = start_config(with_state()).await;
    let (mut b, _) = join(&second).await;
    let (mut c, _) = join(&second).await;
    assert_eq!(until(&mut b, "task_state").await["paused"], true);
    assert_eq!(until(&mut c, "task_state").await["paused"], true);
    let answer = http(second.addr, "POST", "/api/tasks/digits/resume", &auth).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(until(&mut b, "task_state").await["paused"], false);
    assert_eq!(until(&mut c, "task_state").await["paused"], false);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_swarm_view_is_bounded() {
    let limits = Limits {
        max_peers_per_address: 0,
        joins_per_address_per_sec: 0.0,
        ..Limits::default()
    };
    // Every peer here connects from 127.0.0.1: no share per address, at any layer.
    let mut c = base(SignalingConfig { limits, ..config() }, None, &["digits"]);
    c.http.max_connections_per_address = 0;
    let s = start_config(c).await;
    let mut peers = Vec::new();
    for _ in 0..300 {
        peers.push(connect(&s, "digits").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = http_get(s.addr, "/api/tasks/digits/swarm").await;
    let json: Value = serde_json::from_str(body.split("\r\n\r\n").nth(1).expect("body"))
        .expect("swarm view is JSON");
    assert_eq!(json["total"], 300);
    assert_eq!(json["peers"].as_array().expect("peers").len(), 256);
    drop(peers);
}

#[tokio::test]
async fn the_task_description_states_the_swarms_pace() {
    // The demo task in rounds of 20 steps: its pace is the swarm's.
    let mut c = base(config(), None, &["digits"]);
    c.tasks[0].learn.round_ms = 0;
    c.tasks[0].learn.upload_mb_per_hour = 0;
    let s = start_config(c).await;
    let cost = |body: String| -> Value {
        let json: Value = serde_json::from_str(body.split("\r\n\r\n").nth(1).expect("body"))
            .expect("task description is JSON");
        json["cost"].clone()
    };
    let idle = cost(http_get(s.addr, "/api/tasks/digits").await);
    assert_eq!(
        idle["rounds_per_hour"],
        Value::Null,
        "no pace without reports"
    );
    // Two peers report 210 samples/s (`report`), a third lies with 9 million: the median
    // sets the pace.
    let mut peers = Vec::new();
    for rate in [210.0, 210.0, 9e6] {
        let (mut ws, _) = join(&s).await;
        let mut r = report(3, 0.5);
        r["report"]["samples_per_s"] = json!(rate);
        send(&mut ws, r).await;
        peers.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let busy = cost(http_get(s.addr, "/api/tasks/digits").await);
    let task = shoal_shared::task::TaskSpec::digits();
    let per_round = f64::from(task.learn.local_steps) * task.train.batch as f64;
    let rounds = (3600.0 * 210.0 / per_round).round();
    assert_eq!(busy["rounds_per_hour"].as_f64(), Some(rounds), "{busy}");
    let per_hour = busy["bytes_per_hour"].as_f64().expect("bytes per hour");
    let per_round_bytes = busy["bytes_per_round"].as_f64().expect("bytes per round");
    assert_eq!(per_hour, (rounds * per_round_bytes).round());
}

#[tokio::test]
async fn rounds_sized_in_time_bound_the_cost_per_hour_before_anyone_trains() {
    // The demo task sends an update at most once per `round_ms` (1 s): 3,600 rounds an
    // hour at most, whatever peers report.
    let s = start(config()).await;
    let body = http_get(s.addr, "/api/tasks/digits").await;
    let json: Value =
        serde_json::from_str(body.split("\r\n\r\n").nth(1).expect("body")).expect("JSON");
    let cost = &json["cost"];
    assert_eq!(cost["round_ms"], 1000);
    // The demo exchanges weights changes (top-k 10%, 2-bit values: 1.5 bytes per value
    // sent and 16) with a keyframe (int8: a byte per parameter, 4 per 256 and 16) every
    // 30th round, to each neighbour it may hold: a round costs each a change and a
    // thirtieth of the difference.
    let params = 109_386.0_f64;
    let change = (params * 0.1 * 1.5).ceil() + 16.0;
    let keyframe = (params * (1.0 + 4.0 / 256.0)).ceil() + 16.0;
    assert_eq!(cost["update_bytes"].as_f64(), Some(change), "{cost}");
    assert_eq!(cost["keyframe_bytes"].as_f64(), Some(keyframe), "{cost}");
    let per_round = cost["bytes_per_round"].as_f64().expect("bytes per round");
    let neighbours = cost["max_neighbours"].as_f64().expect("max neighbours");
    assert_eq!(
        per_round,
        neighbours * (change + ((keyframe - change) / 30.0).ceil())
    );
    // At most 3,600 rounds an hour, and at most the upload budget (80 MB an hour) of
    // updates: the budget binds, and rounds last longer instead.
    assert_eq!(cost["upload_mb_per_hour"], 80);
    assert!(3600.0 * per_round > 80e6);
    assert_eq!(
        cost["rounds_per_hour"].as_f64(),
        Some((80e6 / per_round).floor()),
        "{cost}"
    );
    let bytes = cost["bytes_per_hour"].as_f64().expect("bytes per hour");
    assert_eq!(bytes, (80e6 / per_round).floor() * per_round);
    assert!(bytes <= 80e6 && bytes > 80e6 - per_round, "{bytes}");
    assert_eq!(neighbours, 4.0, "up to 2k, k the tests' server's 2");
    // A task of its own k (its `learn.neighbours`) states its own.
    let s = start(SignalingConfig {
        task_neighbours: std::collections::HashMap::from([("digits".to_string(), 5)]),
        ..config()
    })
    .await;
    let body = http_get(s.addr, "/api/tasks/digits").await;
    let json: Value =
        serde_json::from_str(body.split("\r\n\r\n").nth(1).expect("body")).expect("JSON");
    assert_eq!(json["cost"]["max_neighbours"], 10);
    assert_eq!(
        json["task"]["learn"]["neighbours"], 5,
        "the task as the server runs it"
    );
    // Settings read as the task file writes them (f32 values, not their f64 expansion
    // such as 0.0010000000474974513).
    let text = body.split("\r\n\r\n").nth(1).expect("body");
    assert!(
        text.contains(r#""lr":0.001,"#) && text.contains(r#""outer_lr":0.8,"#),
        "{text}"
    );
}

#[tokio::test]
async fn the_cost_states_what_open_dashboards_take_from_each_trainer() {
    let s = start(config()).await;
    let mut peers = Vec::new();
    for role in ["trainer", "trainer", "observer"] {
        let (mut ws, _) = join(&s).await;
        let mut r = report(3, 0.5);
        r["report"]["role"] = json!(role);
        send(&mut ws, r).await;
        peers.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = http_get(s.addr, "/api/tasks/digits").await;
    let json: Value =
        serde_json::from_str(body.split("\r\n\r\n").nth(1).expect("body")).expect("JSON");
    let cost = &json["cost"];
    // The demo MLP: a model answer is int8, 2 bytes per parameter, a scale per 256 of
    // them for weights and for momentum, and 71 more.
    assert_eq!(cost["model_bytes"], 2 * (109_386 + 4 * 428) + 71);
    assert_eq!(cost["observers"], 1);
    // One dashboard asks two trainers every 10 s for the change since its last download
    // (int8: a byte per parameter, a scale per 256, 86 bytes of header and digests), and
    // draws one anew (whole fp32 weights) every 30 downloads: 360 answers an hour from
    // each trainer it asks, 12 of them whole.
    assert_eq!(cost["observe_bytes"], 109_386 + 4 * 428 + 86);
    assert_eq!(cost["observe_whole_bytes"], 4 * 109_386 + 82);
    let per_hour: f64 = 348.0 * 111_184.0 + 12.0 * 437_626.0;
    assert!(
        per_hour < 45e6,
        "{per_hour}: an eighth of what whole models cost"
    );
    // All model answers together: half the demo's upload budget of 80 MB an hour, which
    // bounds what observers take too.
    assert_eq!(cost["answer_bytes_per_hour"].as_f64(), Some(40e6), "{cost}");
    assert_eq!(
        cost["observer_bytes_per_hour"].as_f64(),
        Some(per_hour.min(40e6)),
        "{cost}"
    );
}

/// A client that joined and proved a key: its socket, id and identity.
struct Member {
    ws: Ws,
    id: Identity,
    /// Its connection's id (the welcome's `peer`).
    peer: String,
    /// The welcome it got (its nonce, for `identify`).
    welcome: Value,
}

use shoal_shared::learn::Identity;
use shoal_shared::learn::identity::hex;
use shoal_shared::protocol::from_hex;
use shoal_shared::trust::head::{SignedHead, Verdict, Witness};
use shoal_shared::trust::receipt::{Receipt, sha256};

async fn member(s: &Server, seed: u8, prove: bool) -> Member {
    let mut ws = connect(s, "digits").await;
    let w = until(&mut ws, "welcome").await;
    let id = Identity::from_seed([seed; 32]);
    if prove {
        identify(&mut ws, &w, &id).await;
    }
    let peer = w["peer"].as_str().expect("peer").to_string();
    Member {
        ws,
        id,
        peer,
        welcome: w,
    }
}

async fn identify(ws: &mut Ws, welcome: &Value, id: &Identity) {
    let nonce: [u8; 32] =
        shoal_shared::protocol::from_hex(welcome["nonce"].as_str().expect("nonce"))
            .expect("hex")
            .try_into()
            .expect("32 bytes");
    let peer = shoal_shared::protocol::PeerId(
        u64::from_str_radix(welcome["peer"].as_str().expect("peer"), 16).expect("hex id"),
    );
    let sig = id.sign(&shoal_shared::protocol::identify_message(
        "digits", peer, &nonce,
    ));
    send(
        ws,
        json!({"type": "identify", "key": hex(&id.public()), "signature": hex(&sig)}),
    )
    .await;
}

fn receipt(by: &Identity, sender: &Identity, round: u64, samples: u32) -> Value {
    let r = Receipt::sign(
        by,
        "digits",
        round,
        sender.public(),
        samples,
        sha256(&round.to_le_bytes()),
        0,
    );
    json!({"type": "receipt", "receipt": hex(&r.encode())})
}

/// Waits until the server counted `n` receipts appended.
async fn appended(s: &Server, n: u64) {
    use shoal_signaling_server::signaling::ReceiptOutcome;
    for _ in 0..200 {
        if s.hub.metrics.receipts(ReceiptOutcome::Appended) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{n} receipts were not appended");
}

async fn refused(ws: &mut Ws, code: &str, reason: &str) {
    let e = until(ws, "error").await;
    assert_eq!(e["code"], code, "{e}");
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains(reason)),
        "{e}"
    );
}

#[tokio::test]
async fn a_ledger_in_sealed_segments_is_reopened_and_served_as_one_file() {
    use shoal_shared::trust::ledger::{LedgerFile, verify};
    let dir = std::env::temp_dir().join(format!("shoal-ledger-segments-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A ledger of 7 receipts, sealed every ~2 entries, as a server with a small
    // `--ledger-segment-mb` leaves it.
    let (mut l, _) = LedgerFile::open(&dir, "digits", 1).expect("open");
    l.set_segment_limit(600);
    let sender = Identity::from_seed([9; 32]).public();
    for round in 1..=7u64 {
        let rx = Identity::from_seed([round as u8; 32]);
        let r = Receipt::sign(&rx, "digits", round, sender, 160, sha256(b"u"), 0);
        l.append(1000 + round, 2, "", &r.encode()).expect("append");
    }
    assert!(l.sealed().len() >= 2, "{} sealed", l.sealed().len());
    let head = hex(&l.head());
    drop(l);
    let mut s = start_config(base(
        SignalingConfig {
            ledger_dir: Some(dir.clone()),
            ledger_segment_bytes: 600,
            ..SignalingConfig::default()
        },
        None,
        &["digits"],
    ))
    .await;
    let page = http_get(s.addr, "/api/tasks/digits/ledger?from=0&limit=10").await;
    let page: Value =
        serde_json::from_str(page.split("\r\n\r\n").nth(1).expect("body")).expect("json");
    assert_eq!(
        (page["count"].clone(), page["head"].clone()),
        (json!(7), json!(head))
    );
    assert_eq!(
        page["entries"][0]["round"], 1,
        "the first segment's entries are served"
    );
    // The file endpoint: every segment as one ledger file, which verifies whole.
    let raw = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = TcpStream::connect(s.addr).await.expect("connect");
        let req = format!(
            "GET /api/tasks/digits/ledger/file HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            s.addr
        );
        c.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.expect("read");
        out
    };
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers")
        + 4;
    assert!(raw.starts_with(b"HTTP/1.1 200"));
    let v = verify(&raw[at..]).expect("the served file verifies");
    assert_eq!((v.entries.len(), hex(&v.head)), (7, head));
    s.stop.take().expect("stop").send(()).expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends the ledger file request `req` to `addr` from 127.0.0.`from` on a small receive
/// buffer and reads the status line: the connection and its first 12 bytes.
async fn ledger_reader(addr: std::net::SocketAddr, req: String, from: u8) -> (TcpStream, [u8; 12]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("buffer");
    sock.bind(std::net::SocketAddr::from(([127, 0, 0, from], 0)))
        .expect("bind");
    let mut c = sock.connect(addr).await.expect("connect");
    c.write_all(req.as_bytes()).await.expect("write");
    let mut head = [0u8; 12];
    c.read_exact(&mut head).await.expect("read");
    (c, head)
}

#[tokio::test]
async fn ledger_file_downloads_are_limited_per_address_and_slow_readers_keep_no_one_out() {
    use shoal_shared::trust::ledger::{LedgerFile, verify};
    use tokio::io::AsyncReadExt;
    // A ledger of about 9 MB, more than the socket buffers and the server's own hold
    // (tmpfs where there is one: appends are synced).
    let base_dir = ["/dev/shm"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = base_dir.join(format!("shoal-ledger-slots-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut l, _) = LedgerFile::open(&dir, "digits", 1).expect("open");
    let sender = Identity::from_seed([9; 32]).public();
    let rx = Identity::from_seed([8; 32]);
    for round in 1..=40_000u64 {
        let r = Receipt::sign(&rx, "digits", round, sender, 160, sha256(b"u"), 0);
        l.append(1000 + round, 2, "", &r.encode()).expect("append");
    }
    drop(l);
    let mut s = start_config(base(
        SignalingConfig {
            ledger_dir: Some(dir.clone()),
            ..SignalingConfig::default()
        },
        None,
        &["digits"],
    ))
    .await;
    let req = format!(
        "GET /api/tasks/digits/ledger/file HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        s.addr
    );
    let addr = s.addr;
    let reader = |from: u8| ledger_reader(addr, req.clone(), from);
    // Readers from 40 addresses that read the headers and then stop: each holds its
    // address's share while its response waits, and nothing more (with 32 slots in all,
    // 32 addresses reading just above the rate floor kept every auditor out for an hour).
    let mut stalled = Vec::new();
    for from in 0..40 {
        let (c, head) = reader(11 + from).await;
        assert_eq!(&head, b"HTTP/1.1 200");
        stalled.push(c);
    }
    // One address holds one of them: its second download is refused while the first
    // runs, before it could take another's slot.
    let (_, head) = reader(11).await;
    assert_eq!(&head, b"HTTP/1.1 429", "a second download from one address");
    // Another address is served.
    let (_other, head) = reader(200).await;
    assert_eq!(
        &head, b"HTTP/1.1 200",
        "another address among 40 stalled readers"
    );
    // A reader that reads on gets the whole file, and its slot is free again.
    let mut raw = Vec::new();
    stalled[0].read_to_end(&mut raw).await.expect("read");
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers")
        + 4;
    let v = verify(&raw[at..]).expect("the served file verifies");
    assert_eq!(v.entries.len(), 40_000);
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = http_get(s.addr, "/api/tasks/digits/ledger?from=0&limit=1").await;
    assert!(again.starts_with("HTTP/1.1 200"));
    let (_c, head) = reader(11).await;
    assert_eq!(
        &head, b"HTTP/1.1 200",
        "an address's share comes back when its reader finishes or leaves"
    );
    drop(_c);
    s.stop.take().expect("stop").send(()).expect("stop");
    // Without the share (a server behind a reverse proxy), one address runs two.
    let mut s = start_config(base(
        SignalingConfig {
            ledger_dir: Some(dir.clone()),
            ledger_downloads_per_address: 0,
            ..SignalingConfig::default()
        },
        None,
        &["digits"],
    ))
    .await;
    let addr = s.addr;
    let reader = |from: u8| ledger_reader(addr, req.clone(), from);
    let (_first, head) = reader(11).await;
    assert_eq!(&head, b"HTTP/1.1 200");
    let (_second, head) = reader(11).await;
    assert_eq!(&head, b"HTTP/1.1 200", "no share per address");
    s.stop.take().expect("stop").send(()).expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The server's signed head now (its bytes) and the hash of entry `at`, if it has one.
async fn ledger_now(s: &Server, at: u64) -> (Vec<u8>, Vec<(u64, Option<[u8; 32]>)>) {
    let page = http_get(
        s.addr,
        &format!("/api/tasks/digits/ledger?from={at}&limit=1"),
    )
    .await;
    let page: Value =
        serde_json::from_str(page.split("\r\n\r\n").nth(1).expect("body")).expect("json");
    let now = from_hex(page["signed_head"].as_str().expect("signed")).expect("hex");
    let hash = page["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["index"] == at)
        .map(|e| {
            let h = from_hex(e["hash"].as_str().expect("hash")).expect("hex");
            <[u8; 32]>::try_from(h).expect("32 bytes")
        });
    (now, vec![(at, hash)])
}

/// A server of the digits task with k = 2 that keeps its ledgers in `dir`, at most
/// `max_entries` entries each.
fn ledger_server(dir: &std::path::Path, max_entries: u64) -> Config {
    base(
        SignalingConfig {
            neighbours: 2,
            ledger_dir: Some(dir.to_path_buf()),
            ledger_max_entries: max_entries,
            ..SignalingConfig::default()
        },
        None,
        &["digits"],
    )
}

#[tokio::test]
async fn a_ledger_takes_at_most_its_entries_and_then_refuses_receipts_as_full() {
    let dir = std::env::temp_dir().join(format!("shoal-ledger-full-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = || ledger_server(&dir, 2);
    let mut s = start_config(cfg()).await;
    let mut a = member(&s, 1, true).await;
    let b = member(&s, 2, true).await;
    let mut c = member(&s, 3, true).await;
    for m in [&mut a, &mut c] {
        send(&mut m.ws, report(2, 0.5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&mut a.ws, receipt(&a.id, &b.id, 1, 640)).await;
    send(&mut c.ws, receipt(&c.id, &b.id, 1, 640)).await;
    appended(&s, 2).await;
    // A third valid receipt: the ledger is full, and says so.
    send(&mut a.ws, receipt(&a.id, &b.id, 2, 640)).await;
    refused(&mut a.ws, "bad_receipt", "full").await;
    let page = http_get(s.addr, "/api/tasks/digits/ledger?from=0&limit=5").await;
    let page: Value =
        serde_json::from_str(page.split("\r\n\r\n").nth(1).expect("body")).expect("json");
    assert_eq!(page["count"], 2);
    // A restart reads the full ledger and goes on refusing.
    drop((a, b, c));
    s.stop.take().expect("stop").send(()).expect("stop");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = start_config(cfg()).await;
    let mut a = member(&s, 1, true).await;
    let b = member(&s, 2, true).await;
    send(&mut a.ws, report(2, 0.5)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&mut a.ws, receipt(&a.id, &b.id, 3, 640)).await;
    refused(&mut a.ws, "bad_receipt", "full").await;
    s.stop.take().expect("stop").send(()).expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server with a ledger in a fresh folder (`shoal-{name}-PID`), and two members of
/// its task that proved their keys.
async fn ledger_pair(name: &str) -> (std::path::PathBuf, Server, Member, Member) {
    let dir = std::env::temp_dir().join(format!("shoal-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let s = start_config(ledger_server(
        &dir,
        shoal_signaling_server::signaling::DEFAULT_LEDGER_MAX_ENTRIES,
    ))
    .await;
    let a = member(&s, 1, true).await;
    let b = member(&s, 2, true).await;
    (dir, s, a, b)
}

#[tokio::test]
async fn a_receipt_waiting_for_the_ledger_holds_up_nothing_else_of_its_connection() {
    let (dir, mut s, mut a, mut b) = ledger_pair("busy").await;
    send(&mut a.ws, report(2, 0.5)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The ledger is busy for 3 s (a slow disk's sync, credits computed for an anonymous
    // request): a's receipt waits, and its signal to b right after it does not.
    let busy =
        shoal_signaling_server::signaling::hold_ledger(&s.hub, "digits", Duration::from_secs(3))
            .expect("a ledger");
    send(&mut a.ws, receipt(&a.id, &b.id, 1, 640)).await;
    let sent = std::time::Instant::now();
    send(&mut a.ws, offer(&b.peer)).await;
    until(&mut b.ws, "signal").await;
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "the signal came after {:?}",
        sent.elapsed()
    );
    // A second receipt waits behind the first; a leaves before the ledger is free: both,
    // checked as they came, are appended anyway.
    send(&mut a.ws, receipt(&a.id, &b.id, 2, 640)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(a);
    busy.join().expect("held");
    appended(&s, 2).await;
    s.stop.take().expect("stop").send(()).expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn receipts_from_linked_keys_are_chained_into_a_ledger_that_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("shoal-ledger-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = || {
        ledger_server(
            &dir,
            shoal_signaling_server::signaling::DEFAULT_LEDGER_MAX_ENTRIES,
        )
    };
    let mut s = start_config(cfg()).await;
    // Three members, all linked to each other (k = 2); a fourth key never connects.
    let mut a = member(&s, 1, false).await;
    let b = member(&s, 2, true).await;
    let mut c = member(&s, 3, true).await;
    let stranger = Identity::from_seed([4; 32]);

    // Before `identify` a receipt is nobody's.
    send(&mut a.ws, receipt(&a.id, &b.id, 1, 640)).await;
    refused(&mut a.ws, "bad_receipt", "not_yours").await;
    // A proof by another key, a key another connection holds, a second identify.
    let w = json!({"nonce": hex(&[0u8; 32]), "peer": "0000000000000001"});
    identify(&mut a.ws, &w, &a.id).await;
    refused(&mut a.ws, "bad_identity", "does not prove").await;
    // After three failures no more proofs are checked on that connection; a malformed
    // proof is a failure too.
    let malformed = json!({"type": "identify", "key": "zz", "signature": "zz"});
    send(&mut a.ws, malformed).await;
    refused(&mut a.ws, "bad_identity", "64 hex digits").await;
    identify(&mut a.ws, &w, &a.id).await;
    refused(&mut a.ws, "bad_identity", "does not prove").await;
    identify(&mut a.ws, &w, &a.id).await;
    refused(&mut a.ws, "bad_identity", "no more are checked").await;
    // a identifies properly now (its welcome is long read: reconnect).
    drop(a);
    a = member(&s, 1, true).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No receipt counts before a peer of the task has reported its round; then only
    // rounds near it.
    send(&mut a.ws, receipt(&a.id, &b.id, 1, 640)).await;
    refused(&mut a.ws, "bad_receipt", "implausible_round").await;
    // A peer's first report counts at once, though the refusal just counted the task's
    // reports: its first receipts come right behind it. a used b's update of round 1:
    // appended.
    send(&mut a.ws, report(2, 0.5)).await;
    send(&mut a.ws, receipt(&a.id, &b.id, 1, 640)).await;
    appended(&s, 1).await;
    // A receiver that has not reported training signs nothing (it would not count in
    // b's links): no report yet, then a paused one.
    send(&mut c.ws, receipt(&c.id, &b.id, 1, 640)).await;
    refused(&mut c.ws, "bad_receipt", "not_contributing").await;
    let mut paused = report(2, 0.5);
    paused["report"]["paused"] = json!(true);
    send(&mut c.ws, paused).await;
    send(&mut c.ws, receipt(&c.id, &b.id, 1, 640)).await;
    refused(&mut c.ws, "bad_receipt", "not_contributing").await;
    send(&mut c.ws, report(2, 0.5)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&mut a.ws, receipt(&a.id, &b.id, 40, 640)).await;
    refused(&mut a.ws, "bad_receipt", "implausible_round").await;

    // Again: a replay.
    send(&mut a.ws, receipt(&a.id, &b.id, 1, 640)).await;
    refused(&mut a.ws, "bad_receipt", "replay").await;
    // Signed by c but sent on a's connection; for a key never linked; tampered.
    send(&mut a.ws, receipt(&c.id, &b.id, 2, 640)).await;
    refused(&mut a.ws, "bad_receipt", "not_yours").await;
    send(&mut a.ws, receipt(&a.id, &stranger, 2, 640)).await;
    refused(&mut a.ws, "bad_receipt", "not_linked").await;
    let mut forged = receipt(&a.id, &b.id, 2, 640);
    let text = forged["receipt"].as_str().expect("hex").to_string();
    forged["receipt"] = json!(format!(
        "{}{}",
        &text[..text.len() - 1],
        if text.ends_with('0') { "1" } else { "0" }
    ));
    send(&mut a.ws, forged).await;
    refused(&mut a.ws, "bad_receipt", "bad_signature").await;
    send(&mut a.ws, json!({"type": "receipt", "receipt": "zz"})).await;
    refused(&mut a.ws, "bad_receipt", "malformed").await;

    // c used b's round 1 too: two distinct receivers, so b's round counts.
    send(&mut c.ws, receipt(&c.id, &b.id, 1, 640)).await;
    appended(&s, 2).await;
    let credits = http_get(
        s.addr,
        &format!("/api/tasks/digits/credits?key={}", hex(&b.id.public())),
    )
    .await;
    let body: Value =
        serde_json::from_str(credits.split("\r\n\r\n").nth(1).expect("body")).expect("json");
    assert_eq!(body["me"]["credit"], 640, "{body}");
    assert_eq!(body["me"]["rank"], 1, "{body}");
    assert_eq!(body["count"], 2);
    let page = http_get(s.addr, "/api/tasks/digits/ledger?from=1&limit=5").await;
    let page: Value =
        serde_json::from_str(page.split("\r\n\r\n").nth(1).expect("body")).expect("json");
    assert_eq!(page["entries"][0]["index"], 1);
    assert_eq!(page["entries"][0]["receiver"], hex(&c.id.public()));
    let head = page["head"].clone();
    // The head comes signed by the server's key, as peers remember and gossip it.
    let signed =
        SignedHead::decode(&from_hex(page["signed_head"].as_str().expect("signed")).expect("hex"))
            .expect("a valid signed head");
    assert_eq!(
        (signed.count, hex(&signed.hash)),
        (2, head.as_str().expect("head").to_string())
    );
    assert_eq!(page["server_key"], json!(hex(&signed.server)));
    assert!(
        http_get(s.addr, "/api/tasks/digits/ledger?limit=501")
            .await
            .starts_with("HTTP/1.1 400")
    );

    // Receipts beyond the budget (2k a second, bursts of 4k; k = 2 here) are refused
    // before anything else is checked: each would cost an fsync.
    let mut b = b;
    for _ in 0..12 {
        send(&mut b.ws, json!({"type": "receipt", "receipt": "zz"})).await;
    }
    let mut reasons = Vec::new();
    for _ in 0..12 {
        let e = until(&mut b.ws, "error").await;
        reasons.push(
            e["message"]
                .as_str()
                .unwrap_or("")
                .split(':')
                .next()
                .unwrap_or("")
                .to_string(),
        );
    }
    assert_eq!(
        reasons.iter().filter(|r| *r == "malformed").count(),
        8,
        "{reasons:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| *r == "too_many").count(),
        4,
        "{reasons:?}"
    );
    // a's budget refills meanwhile.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // b leaves; a's receipt for b's last update still counts (it was linked).
    drop(b);
    until(&mut a.ws, "left").await;
    send(
        &mut a.ws,
        receipt(&a.id, &Identity::from_seed([2; 32]), 2, 640),
    )
    .await;
    appended(&s, 3).await;

    // A fresh proof of a key takes it over from an older connection (a peer that
    // reconnected before its old connection timed out): the old one's receipts are no
    // longer its own.
    let mut c2 = connect(&s, "digits").await;
    let w2 = until(&mut c2, "welcome").await;
    identify(&mut c2, &w2, &c.id).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&mut c.ws, receipt(&c.id, &a.id, 2, 640)).await;
    refused(&mut c.ws, "bad_receipt", "not_yours").await;
    // A connection signs with one key for its life: the old one may not identify again
    // (else two connections could pass a key to and fro).
    let welcome = c.welcome.clone();
    identify(&mut c.ws, &welcome, &c.id).await;
    refused(&mut c.ws, "bad_identity", "identified already").await;
    drop(c2);

    // The file verifies offline, then the server restarts and the chain goes on.
    let file = dir.join("digits.ledger");
    let three = std::fs::read(&file).expect("file");
    let v = shoal_shared::trust::ledger::verify(&three).expect("valid");
    assert_eq!(v.entries.len(), 3);
    assert_ne!(
        hex(&v.head),
        head.as_str().expect("head"),
        "a third entry moved the head"
    );
    drop((a, c));
    s.stop.take().expect("stop").send(()).expect("stop");
    let _ = tokio::time::timeout(Duration::from_secs(5), s.done).await;
    let mut s = start_config(cfg()).await;
    let page = http_get(s.addr, "/api/tasks/digits/ledger?limit=1").await;
    let page: Value =
        serde_json::from_str(page.split("\r\n\r\n").nth(1).expect("body")).expect("json");
    assert_eq!(
        (page["count"].clone(), page["head"].clone()),
        (json!(3), json!(hex(&v.head)))
    );
    // Same key after the restart, and the head signed before it is still in the ledger.
    assert_eq!(page["server_key"], json!(hex(&signed.server)));
    let mut witness = Witness::new("digits", Some(signed.clone()));
    assert_eq!(witness.lookups(), vec![1]);
    let (now, at) = ledger_now(&s, 1).await;
    assert_eq!(
        witness.check(Some(&now), &at),
        Ok(Some(Verdict::Intact { count: 3 }))
    );
    let mut a = member(&s, 1, true).await;
    let mut c = member(&s, 3, true).await;
    send(&mut c.ws, report(6, 0.5)).await;
    send(&mut a.ws, report(6, 0.5)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&mut a.ws, receipt(&a.id, &c.id, 7, 320)).await;
    appended(&s, 1).await;
    let v =
        shoal_shared::trust::ledger::verify(&std::fs::read(&file).expect("file")).expect("valid");
    assert_eq!(
        v.entries.len(),
        4,
        "appended after the restart, on the same chain"
    );
    // A peer that saw the fourth entry's head catches a server whose ledger lost it.
    assert_eq!(witness.lookups(), vec![2]);
    let (now, at) = ledger_now(&s, 2).await;
    assert_eq!(
        witness.check(Some(&now), &at),
        Ok(Some(Verdict::Intact { count: 4 }))
    );
    let _ = c.ws.close(None).await;
    s.stop.take().expect("stop").send(()).expect("stop");
    let _ = tokio::time::timeout(Duration::from_secs(5), s.done).await;
    std::fs::write(&file, &three).expect("history cut back to three entries");
    let mut s = start_config(cfg()).await;
    let (now, at) = ledger_now(&s, 3).await;
    assert!(
        matches!(witness.check(Some(&now), &at), Ok(Some(Verdict::Rewritten { head, .. })) if head.count == 4),
        "the cut is caught"
    );
    s.stop.take().expect("stop").send(()).expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pair unlinked as `unreachable` (a connection that broke after an update came
/// through) is still a link for receipts for a while: each side's receipt for the
/// other's update counts.
#[tokio::test]
async fn receipts_across_a_pair_reported_unreachable_still_count() {
    let (dir, mut s, mut a, mut b) = ledger_pair("unreachable").await;
    send(&mut a.ws, report(2, 0.5)).await;
    send(&mut b.ws, report(2, 0.5)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&mut a.ws, json!({"type": "unreachable", "peer": b.peer})).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&mut a.ws, receipt(&a.id, &b.id, 2, 640)).await;
    appended(&s, 1).await;
    send(&mut b.ws, receipt(&b.id, &a.id, 2, 640)).await;
    appended(&s, 2).await;
    s.stop.take().expect("stop").send(()).expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_task_with_differential_privacy_states_its_epsilon_before_consent() {
    let www = std::env::temp_dir().join(format!("shoal-dp-www-{}", std::process::id()));
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(
        www.join("embed.js"),
        "// A note for the reader.\n(function () {\n  // Another.\n  var COSTS = {}; // kept\n})();\n",
    )
    .expect("embed");
    let mut config = base(config(), None, &["digits", "private"]);
    config.www = www.clone();
    config.tasks[1].privacy = shoal_shared::privacy::PrivacySpec {
        clip: Some(0.5),
        epsilon: Some(8.0),
        delta: Some(1e-5),
        rounds: Some(300),
        ..Default::default()
    };
    let s = start_config(config).await;
    let described = |body: String| -> Value {
        serde_json::from_str(body.split("\r\n\r\n").nth(1).expect("body")).expect("JSON")
    };
    let plain = described(http_get(s.addr, "/api/tasks/digits").await);
    assert_eq!(plain["privacy"], Value::Null, "{plain}");
    let private = described(http_get(s.addr, "/api/tasks/private").await);
    let dp = &private["privacy"];
    let eps = dp["epsilon"].as_f64().expect("epsilon");
    assert!(eps <= 8.0 && eps > 7.9, "{dp}");
    assert!(
        dp["noise_multiplier"].as_f64().expect("noise") > 0.0,
        "{dp}"
    );
    assert_eq!(dp["rounds"], 300);
    assert_eq!(dp["on_budget"], "stop");
    // The embed's consent card gets it without a second request, in the script served
    // without its whole-line comments (every host page loads it before consent).
    let script = http_get(s.addr, "/embed.js").await;
    assert!(
        !script.contains("A note") && !script.contains("Another") && script.contains("// kept"),
        "{script}"
    );
    let costs = script
        .split("var COSTS = ")
        .nth(1)
        .and_then(|t| t.split(";").next())
        .expect("costs written in");
    let costs: Value = serde_json::from_str(costs).expect("costs JSON");
    assert!(
        (costs["private"]["epsilon"].as_f64().expect("epsilon") - eps).abs() < 1e-9,
        "{costs}"
    );
    assert_eq!(costs["digits"]["epsilon"], Value::Null);
    assert_eq!(
        costs["digits"]["answer_bytes_per_hour"].as_f64(),
        Some(40e6),
        "what model answers may send: the card states it for tasks without a budget"
    );
    assert_eq!(
        costs["digits"]["local"], false,
        "the card knows a task on local data"
    );
    std::fs::remove_dir_all(&www).expect("cleanup");
}
