//! The native peer binary as users run it: `shoal-peer` processes training the demo
//! digits together over real WebRTC through the real signaling server (inside a
//! loopback-only network namespace), and a keeper that is killed in the middle of a
//! checkpoint write and resumes from the last complete one.

#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{reexec_in_netns, start_server_with_ledger};

const PEER: &str = env!("CARGO_BIN_EXE_shoal-peer");

fn data_dir() -> String {
    std::env::var("SHOAL_DATA")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../data").into())
}

fn temp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("shoal-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("temp dir");
    p
}

/// Starts a peer; its stdout lines arrive on the returned channel.
fn spawn(server: &str, key: &Path, extra: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(PEER)
        .args([
            "--server",
            server,
            "--bind",
            "127.0.0.1",
            "--cpu",
            "--data",
            &data_dir(),
            "--identity",
        ])
        .arg(key)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("shoal-peer starts");
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let to_err = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Its standard error too, as it comes (and still shown).
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{line}");
            let _ = to_err.send(line);
        }
    });
    (child, rx)
}

/// Waits for a line that `f` accepts, failing after `secs`.
fn expect_line<T>(
    rx: &mpsc::Receiver<String>,
    secs: u64,
    what: &str,
    mut f: impl FnMut(&str) -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(v) = f(&line) {
                    return v;
                }
            }
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// `round R ... acc A% ...` -> (R, A).
fn round_line(line: &str) -> Option<(u64, Option<f32>)> {
    let mut words = line.split_whitespace();
    if words.next()? != "round" {
        return None;
    }
    let round = words.next()?.parse().ok()?;
    let acc = line
        .split_whitespace()
        .skip_while(|w| *w != "acc")
        .nth(1)
        .and_then(|a| a.strip_suffix('%')?.parse::<f32>().ok())
        .map(|a| a / 100.0);
    Some((round, acc))
}

#[test]
fn three_native_peers_train_together_over_webrtc_on_one_model_version() {
    if reexec_in_netns("three_native_peers_train_together_over_webrtc_on_one_model_version") {
        return;
    }
    const ROUNDS: u64 = 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = temp("swarm");
    let ledger = dir.join("ledger");
    let (url, stop) = rt.block_on(start_server_with_ledger(Some(ledger.clone())));
    let server = url.split("/ws/").next().expect("ws url").to_string();
    let started = std::time::Instant::now();
    let rounds = ROUNDS.to_string();
    let mut peers: Vec<(Child, mpsc::Receiver<String>)> = (0..3)
        .map(|i| {
            spawn(
                &server,
                &dir.join(format!("peer{i}.key")),
                &["--rounds", &rounds],
            )
        })
        .collect();
    for (i, (child, rx)) in peers.iter_mut().enumerate() {
        let mut last = (0, None);
        let mut max_peers = 0;
        let mut used = 0u64;
        let mut witnessed = None;
        expect_line(
            rx,
            600,
            &format!("peer {i} to finish {ROUNDS} rounds"),
            |line| {
                if let Some(n) = line.strip_prefix("ledger intact ") {
                    witnessed = n.parse::<u64>().ok();
                }
                if let Some(r) = round_line(line) {
                    last = r;
                    let n = line.split_whitespace().skip_while(|w| *w != "peers").nth(1);
                    max_peers = max_peers.max(n.and_then(|n| n.parse().ok()).unwrap_or(0));
                    let u = line.split_whitespace().skip_while(|w| *w != "used").nth(1);
                    used += u.and_then(|u| u.parse::<u64>().ok()).unwrap_or(0);
                }
                (last.0 >= ROUNDS).then_some(())
            },
        );
        let acc = last.1.expect("accuracy is reported");
        println!(
            "peer {i}: version {} at {:.2}% held-out accuracy, up to {max_peers} neighbours",
            last.0,
            acc * 100.0
        );
        assert_eq!(last.0, ROUNDS, "peer {i} holds the swarm's version");
        // It checked the server's signed ledger head (docs/protocol.md, "Signed heads").
        assert!(
            witnessed.is_some_and(|n| n > 0),
            "peer {i} witnessed the ledger: {witnessed:?}"
        );
        assert_eq!(max_peers, 2, "peer {i} trained with both others");
        assert!(
            used >= ROUNDS,
            "peer {i} used only {used} neighbour updates"
        );
        // The task's target: 20 rounds sized in time (a second of training each) get
        // three peers there (96.1% in the last run here).
        assert!(acc >= 0.95, "peer {i} ended at {acc}");
        assert!(
            child.wait().expect("exits").success(),
            "peer {i} exits cleanly"
        );
    }
    let _ = stop.send(());
    // The server's ledger: every receipt verifies and chains, and each peer earned
    // credit for most of its rounds (each of its updates was receipted by both others).
    let hours = started.elapsed().as_secs_f64() / 3600.0;
    let bytes = std::fs::read(ledger.join("digits.ledger")).expect("the ledger file");
    let v = shoal_shared::trust::ledger::verify(&bytes).expect("a valid ledger");
    let credits = shoal_shared::trust::credits::compute(&v.entries);
    println!(
        "ledger: {} receipts ({:.1} per round), {} bytes, {:.0} bytes per peer-hour",
        v.entries.len(),
        v.entries.len() as f64 / ROUNDS as f64,
        bytes.len(),
        bytes.len() as f64 / 3.0 / hours
    );
    for i in 0..3 {
        let text = std::fs::read_to_string(dir.join(format!("peer{i}.key"))).expect("key");
        let key = shoal_shared::learn::Identity::from_key_file(&text)
            .expect("key file")
            .public();
        let mine = credits.by_key.iter().find(|k| k.key == key);
        let (credit, rounds) = mine.map_or((0, 0), |k| (k.credit, k.rounds));
        println!("peer {i}: credit {credit} samples over {rounds} rounds");
        assert!(
            rounds >= ROUNDS / 2,
            "peer {i}'s credited rounds: {rounds} of {ROUNDS}"
        );
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_keeper_killed_mid_checkpoint_resumes_from_the_last_complete_one() {
    // No signaling server here (the port is closed): the keeper trains alone, so no
    // WebRTC connection is ever made.
    let dir = temp("keeper");
    let key = dir.join("keeper.key");
    let ckpt = dir.join("checkpoints");
    let server = "ws://127.0.0.1:9";
    let keeper = ckpt.to_str().expect("utf-8 path");
    let (mut child, rx) = spawn(
        server,
        &key,
        &[
            "--keeper",
            keeper,
            "--checkpoint-every",
            "2",
            "--pause-mid-checkpoint-ms",
            "4000",
        ],
    );
    let writing = expect_line(&rx, 120, "the third checkpoint write", |line| {
        line.strip_prefix("checkpoint-writing ")
            .and_then(|r| r.parse::<u64>().ok())
            .filter(|&r| r >= 6)
    });
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let listed = names(&ckpt);
    let complete = writing - 2;
    assert!(
        listed.iter().any(|n| n.ends_with(".tmp")),
        "killed mid-write: {listed:?}"
    );
    assert!(
        listed.contains(&format!("model-{complete:012}.ckpt")),
        "{listed:?}"
    );

    let until = (writing + 2).to_string();
    let (mut child, rx) = spawn(
        server,
        &key,
        &[
            "--keeper",
            keeper,
            "--checkpoint-every",
            "2",
            "--rounds",
            &until,
        ],
    );
    let resumed = expect_line(&rx, 60, "the resume line", |line| {
        line.strip_prefix("resumed round ")
            .and_then(|r| r.parse::<u64>().ok())
    });
    assert_eq!(
        resumed, complete,
        "resumed from the newest complete checkpoint"
    );
    let first = expect_line(&rx, 120, "a round after resuming", round_line);
    assert_eq!(first.0, complete + 1, "training continued from there");
    assert!(child.wait().expect("exits").success());
    let listed = names(&ckpt);
    assert!(
        !listed.iter().any(|n| n.ends_with(".tmp")),
        "the half-written file is gone: {listed:?}"
    );
    assert!(
        listed.contains(&format!("model-{:012}.ckpt", writing + 2)),
        "{listed:?}"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// The interpreter with `safetensors` and `numpy` that `cargo xtask test` installs.
fn python() -> PathBuf {
    let p = std::env::var("SHOAL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/py/bin/python").into());
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask test` (it installs safetensors and numpy from PyPI)",
        p.display()
    );
    p
}

/// A keeper alone (closed signaling port) on `task` from its task file, exporting after
/// `rounds` rounds; then `export_check.py` on the export and `data` (paths under the data
/// folder). Returns the keeper's folder and the checker's JSON.
fn keeper_export_check(task: &str, rounds: &str, data: &[&str]) -> (PathBuf, serde_json::Value) {
    let dir = temp(&format!("export-{task}"));
    let ckpt = dir.join("keeper");
    let task_file = format!("{}/../tasks/{task}.toml", env!("CARGO_MANIFEST_DIR"));
    let (mut child, rx) = spawn(
        "ws://127.0.0.1:9",
        &dir.join("k.key"),
        &[
            "--task",
            task,
            "--task-file",
            &task_file,
            "--keeper",
            ckpt.to_str().expect("utf-8"),
            "--checkpoint-every",
            rounds,
            "--rounds",
            rounds,
        ],
    );
    let exported = expect_line(&rx, 180, "the export line", |l| {
        l.strip_prefix("exported ").map(PathBuf::from)
    });
    assert!(child.wait().expect("exits").success());
    assert_eq!(exported, ckpt.join("model.safetensors"));
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/export_check.py"
        ))
        .arg(&exported)
        .args(data.iter().map(|d| format!("{}/{d}", data_dir())))
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = serde_json::from_slice(&out.stdout).expect("JSON line");
    (dir, r)
}

#[test]
fn a_keepers_export_runs_in_numpy_with_shoals_held_out_accuracy() {
    // A keeper alone, from the demo task file, exporting after 12 rounds; then Python
    // loads the file with `safetensors`, runs the forward pass in numpy on the held-out
    // split and must match the accuracy Shoal recorded.
    let (dir, r) = keeper_export_check(
        "digits",
        "12",
        &["digits/test-images.idx", "digits/test-labels.idx"],
    );
    let numpy = r["accuracy"].as_f64().expect("accuracy");
    let shoal = r["shoal_accuracy"]
        .as_f64()
        .expect("Shoal's accuracy in the metadata");
    println!(
        "numpy {numpy:.4} vs Shoal {shoal:.4} at version {}",
        r["version"]
    );
    assert!(
        (numpy - shoal).abs() <= 0.001,
        "numpy {numpy} vs Shoal {shoal}"
    );
    assert!(shoal > 0.5, "12 rounds alone learn something: {shoal}");
    assert_eq!(r["version"], 12);
    assert_eq!(r["task"], "digits");
    assert_eq!(r["dtypes"], serde_json::json!(["float32"]));
    assert_eq!(r["tensors"]["layer1.weight"], serde_json::json!([784, 128]));
    assert_eq!(r["tensors"]["layer5.bias"], serde_json::json!([10]));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn a_language_models_export_recomputes_shoals_held_out_loss_in_numpy() {
    // A keeper alone on the demo text task, exporting after 2 rounds (40 AdamW steps);
    // numpy then runs the transformer exactly as the README states it (layer norm,
    // tanh GELU, causal attention, tied head) on the held-out windows of the corpus and
    // must match the loss Shoal recorded within 1e-3 relative.
    let (dir, r) = keeper_export_check("fortunes", "2", &["text/fortunes.txt"]);
    let numpy = r["loss"].as_f64().expect("loss");
    let shoal = r["shoal_loss"]
        .as_f64()
        .expect("Shoal's loss in the metadata");
    println!(
        "held-out loss numpy {numpy:.5} vs Shoal {shoal:.5} nats ({:.4} bits per byte, {} windows)",
        r["bits_per_byte"], r["held_out_windows"]
    );
    assert!(
        (numpy - shoal).abs() <= 1e-3 * shoal,
        "numpy {numpy} vs Shoal {shoal}"
    );
    let bits = r["shoal_bits_per_byte"].as_f64().expect("bits per byte");
    assert!((bits - shoal / std::f64::consts::LN_2).abs() < 1e-4);
    assert!(bits < 6.0, "40 steps learn something: {bits} bits per byte");
    assert!(
        (r["accuracy"].as_f64().expect("acc") - r["shoal_accuracy"].as_f64().expect("acc")).abs()
            <= 0.002
    );
    assert_eq!(r["task"], "fortunes");
    assert_eq!(r["tensors"]["layer0.token"], serde_json::json!([256, 64]));
    assert_eq!(
        r["tensors"]["layer1.attn.qkv.weight"],
        serde_json::json!([64, 192])
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn a_training_peer_stops_on_ctrl_c_or_sigterm_and_keeps_what_it_trained() {
    // Alone (closed signaling port), training the text task's rounds back to back (most
    // of its time is spent training): a SIGINT (Ctrl-C) or SIGTERM (systemd's, docker's
    // stop) that arrives while it trains must stop it, promptly and cleanly, its keeper
    // with a last checkpoint (on SIGTERM it died at once, and its keeper lost up to
    // `--checkpoint-every` rounds).
    let dir = temp("ctrl-c");
    let task_file = concat!(env!("CARGO_MANIFEST_DIR"), "/../tasks/fortunes.toml");
    for signal in ["INT", "TERM"] {
        let keeper = dir.join(signal);
        let keeper = ["--keeper", keeper.to_str().expect("utf-8 path")];
        let task = ["--task", "fortunes", "--task-file", task_file];
        let args = [&task[..], &keeper, &["--checkpoint-every", "1000"]].concat();
        let (mut child, rx) = spawn("ws://127.0.0.1:9", &dir.join("k.key"), &args);
        // Alone because the server cannot be reached, which it says (it said nothing).
        expect_line(&rx, 30, "the signaling server's failure", |l| {
            l.contains("the signaling server cannot be reached")
                .then_some(())
        });
        expect_line(&rx, 120, "round 2", |l| {
            round_line(l).filter(|&(r, _)| r >= 2).map(|_| ())
        });
        let sent = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        // Its last checkpoint and export (an evaluation of the held-out split) included.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("the peer did not stop within 30 s of SIG{signal}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "SIG{signal}: {status}");
        expect_line(&rx, 5, "the last checkpoint", |l| {
            l.starts_with("checkpoint ").then_some(())
        });
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// Writes a PNG: `channels` 1 (grey) or 4 (RGBA), 8 bits.
fn write_png(path: &Path, pixels: &[u8], w: u32, h: u32, channels: usize) {
    std::fs::create_dir_all(path.parent().expect("folder")).expect("folder");
    let file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut e = png::Encoder::new(file, w, h);
    e.set_color(if channels == 4 {
        png::ColorType::Rgba
    } else {
        png::ColorType::Grayscale
    });
    e.set_depth(png::BitDepth::Eight);
    let mut writer = e.write_header().expect("header");
    writer.write_image_data(pixels).expect("pixels");
}

#[test]
fn a_native_peer_trains_on_a_local_folder_and_names_the_files_it_skips() {
    // A task on local data (the demo's model and test split): 300 digits as PNG files in
    // folders named after their class, one colour PNG at twice the size, and four bad
    // files. The peer, alone, reads the folder, says what it skipped and why, and learns.
    let dir = temp("local-folder");
    let demo =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tasks/digits.toml"))
            .expect("demo task");
    let task = demo
        .replace("name = \"digits\"", "name = \"mine\"")
        .replace(
            "[data.train]\nimages = \"digits/train-images.idx\"\nlabels = \"digits/train-labels.idx\"\n",
            "",
        )
        .replace(
            "[data]\nclasses = 10\n",
            "[data]\nclasses = 10\nsource = \"local\"\n\n[data.local]\nkind = \"images\"\n",
        );
    assert!(task.contains("source = \"local\"") && !task.contains("train-images"));
    let task_file = dir.join("mine.toml");
    std::fs::write(&task_file, task).expect("task file");
    let images = std::fs::read(format!("{}/digits/train-images.idx", data_dir())).expect("idx");
    let labels = std::fs::read(format!("{}/digits/train-labels.idx", data_dir())).expect("idx");
    let files = dir.join("mine");
    for i in 0..300 {
        let px = &images[16 + i * 784..16 + (i + 1) * 784];
        write_png(
            &files.join(format!("{}/{i}.png", labels[8 + i])),
            px,
            28,
            28,
            1,
        );
    }
    // A colour image at 56x56: read as grey and scaled to the model's 28x28.
    let mut rgba = Vec::new();
    for y in 0..56 {
        for x in 0..56 {
            let v = images[16 + (y / 2) * 28 + x / 2];
            rgba.extend_from_slice(&[v, v, v, 255]);
        }
    }
    write_png(
        &files.join(format!("{}/big.png", labels[8])),
        &rgba,
        56,
        56,
        4,
    );
    write_png(
        &files.join("11/eleven.png"),
        &images[16..16 + 784],
        28,
        28,
        1,
    );
    std::fs::write(files.join("notes.txt"), "my notes").expect("write");
    std::fs::write(files.join("3/broken.png"), "not a PNG").expect("write");
    std::fs::write(files.join("4/photo.jpg"), [0xff, 0xd8, 0xff]).expect("write");

    // Without the task file it accepts (its privacy above all), it does not start: the
    // server's task alone could drop the noise.
    let out = Command::new(PEER)
        .args([
            "--server",
            "ws://127.0.0.1:9",
            "--task",
            "mine",
            "--local-data",
        ])
        .arg(&files)
        .args(["--cpu", "--identity"])
        .arg(dir.join("k.key"))
        .output()
        .expect("shoal-peer runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--local-data needs --task-file"), "{err}");

    let (mut child, rx) = spawn(
        "ws://127.0.0.1:9",
        &dir.join("k.key"),
        &[
            "--task",
            "mine",
            "--task-file",
            task_file.to_str().expect("utf-8"),
            "--local-data",
            files.to_str().expect("utf-8"),
            "--rounds",
            "10",
        ],
    );
    let summary = expect_line(&rx, 60, "the local data line", |l| {
        l.starts_with("local data ").then(|| l.to_string())
    });
    assert!(
        summary.ends_with(": 301 files, 301 samples, 4 skipped"),
        "{summary}"
    );
    let mut skipped = Vec::new();
    while skipped.len() < 4 {
        skipped.push(expect_line(&rx, 10, "a skipped line", |l| {
            l.strip_prefix("skipped ").map(str::to_string)
        }));
    }
    skipped.sort();
    println!("{summary}\n{}", skipped.join("\n"));
    assert!(
        skipped[0].starts_with("11/eleven.png: label \"11\" is not a class"),
        "{skipped:?}"
    );
    assert!(
        skipped[1].starts_with("3/broken.png: not a readable PNG"),
        "{skipped:?}"
    );
    assert!(
        skipped[2].starts_with("4/photo.jpg: JPEG is read in the browser"),
        "{skipped:?}"
    );
    assert!(
        skipped[3].starts_with("notes.txt: not a PNG or JPEG"),
        "{skipped:?}"
    );
    let acc = expect_line(&rx, 180, "round 10", |l| {
        round_line(l).and_then(|(r, a)| (r >= 10).then_some(a))
    });
    let acc = acc.expect("evaluated on the server's test split");
    assert!(
        acc > 0.6,
        "accuracy {acc} after 10 rounds on 301 local images"
    );
    assert!(child.wait().expect("exits").success());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// A peer takes the server's description of its task, and one given a task file that
/// differs from it stops with the field named, instead of training a model whose every
/// update its neighbours would refuse (an outsider's run: a researcher's peer with a
/// stale task file sat silent), and one whose copy of the data differs from the server's
/// stops with the file named.
#[test]
fn a_peer_trains_the_servers_task_and_refuses_a_task_file_that_differs() {
    if reexec_in_netns("a_peer_trains_the_servers_task_and_refuses_a_task_file_that_differs") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = temp("task-check");
    let demo =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tasks/digits.toml"))
            .expect("the demo task file");
    let text = demo.replace("name = \"digits\"", "name = \"small\"");
    let file = dir.join("small.toml");
    std::fs::write(&file, &text).expect("task file");
    // The server's `small`: the file's, at batch 16.
    let mut served = shoal_shared::task::TaskSpec::from_toml(&text).expect("a task");
    served.train.batch = 16;
    let (url, stop) = rt.block_on(common::start_server_on(
        PathBuf::from(data_dir()),
        None,
        vec![served],
    ));
    let server = url.split("/ws/").next().expect("ws url").to_string();
    let key = dir.join("peer.key");
    // One round at most: without the checks it would train one round and end, not hang.
    // Its standard error, once it failed.
    let refused = |data: &Path, extra: &[&std::ffi::OsStr]| {
        let out = Command::new(PEER)
            .args([
                "--server",
                &server,
                "--task",
                "small",
                "--bind",
                "127.0.0.1",
            ])
            .args(["--rounds", "1", "--cpu", "--data"])
            .arg(data)
            .arg("--identity")
            .arg(&key)
            .args(extra)
            .output()
            .expect("shoal-peer runs");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{err}");
        err
    };
    let err = refused(
        Path::new(&data_dir()),
        &["--task-file".as_ref(), file.as_os_str()],
    );
    assert!(
        err.contains("differs from the task \"small\" the server describes, at train.batch: 8 here, 16 at the server"),
        "{err}"
    );
    // A copy of the data that differs from the server's (one held-out label changed: a
    // valid file) is refused with the file named, before it trains.
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("digits")).expect("data dir");
    for f in ["train-images", "train-labels", "test-images", "test-labels"] {
        let name = format!("digits/{f}.idx");
        let mut bytes = std::fs::read(Path::new(&data_dir()).join(&name)).expect("the digits");
        if f == "test-labels" {
            let last = bytes.last_mut().expect("labels");
            *last = (*last + 1) % 10;
        }
        std::fs::write(data.join(&name), bytes).expect("a copy");
    }
    let err = refused(&data, &[]);
    assert!(
        err.contains("test-labels.idx differs from the server's copy of the task's data"),
        "{err}"
    );
    // Without a task file it trains the server's task (not only the built-in demo).
    let (mut child, rx) = spawn(&server, &key, &["--task", "small"]);
    expect_line(&rx, 120, "a round of the server's task", round_line);
    let _ = child.kill();
    let _ = child.wait();
    let _ = stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `wss://` server is refused at once with what to do instead: the peer speaks no TLS,
/// and it used to retry the connection in silence forever.
#[test]
fn a_server_this_peer_cannot_reach_is_refused_at_start_with_the_reason() {
    let mut child = Command::new(PEER)
        .args(["--server", "wss://127.0.0.1:9", "--task", "digits"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("shoal-peer runs");
    let started = std::time::Instant::now();
    while child.try_wait().expect("a status").is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("still running after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("its output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("a ws:// URL is needed"), "{err}");
}
