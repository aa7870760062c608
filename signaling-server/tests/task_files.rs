//! The server validates its task files and its limits at start: a broken one stops it
//! with an error that names the file, the field (or the option) and the problem.

use std::process::Command;

const SERVER: &str = env!("CARGO_BIN_EXE_shoal-signaling-server");
const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tasks/digits.toml");

fn start_with(task: &str, data: &std::path::Path) -> (bool, String) {
    start_with_args(task, data, &[])
}

fn start_with_args(task: &str, data: &std::path::Path, extra: &[&str]) -> (bool, String) {
    // One folder per start: the tests run in parallel, and each removes its own.
    static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("shoal-taskfile-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("index.html"), "<!doctype html>").expect("www");
    let file = dir.join("task.toml");
    std::fs::write(&file, task).expect("task file");
    let out = Command::new(SERVER)
        .args(["--port", "0", "--www"])
        .arg(&dir)
        .arg("--data")
        .arg(data)
        .arg("--task-file")
        .arg(&file)
        .arg("--ledger-dir")
        .arg(dir.join("ledger"))
        // Succeeding would serve forever: a closed stdin is not a stop signal, so give
        // the valid case nothing to do but fail on the port instead.
        .args(["--bind", "203.0.113.1"])
        .args(extra)
        .output()
        .expect("server runs");
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn demo() -> String {
    std::fs::read_to_string(DEMO).expect("demo task file")
}

fn data() -> std::path::PathBuf {
    std::env::var("SHOAL_DATA")
        .map(Into::into)
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../data").into())
}

#[test]
fn a_broken_task_file_stops_the_server_naming_the_field() {
    let (ok, err) = start_with(&demo().replace("batch = 8", "batch = 0"), &data());
    assert!(!ok);
    assert!(
        err.contains("task.toml: train.batch: 0 outside 1..=4096"),
        "{err}"
    );

    let (ok, err) = start_with(&demo().replace("units = 10", "units = 12"), &data());
    assert!(!ok);
    assert!(
        err.contains("model.layers") && err.contains("data.classes is 10"),
        "{err}"
    );

    // Differential privacy with an impossible delta.
    let (ok, err) = start_with(
        &demo().replace(
            "[privacy]",
            "[privacy]\nclip = 1.0\nnoise_multiplier = 1.0\ndelta = 2.0\nrounds = 100",
        ),
        &data(),
    );
    assert!(!ok);
    assert!(
        err.contains("privacy.delta") && err.contains("promises nothing"),
        "{err}"
    );

    // A data file that is not there.
    let (ok, err) = start_with(&demo().replace("train-labels.idx", "no-such.idx"), &data());
    assert!(!ok);
    assert!(
        err.contains("data.train.labels") && err.contains("no-such.idx"),
        "{err}"
    );

    // Labels that do not fit the declared classes: the data are checked too.
    let (ok, err) = start_with(
        &demo()
            .replace("classes = 10", "classes = 5")
            .replace("units = 10", "units = 5"),
        &data(),
    );
    assert!(!ok);
    assert!(
        err.contains("data.train") && err.contains("outside 0..5"),
        "{err}"
    );

    // The valid demo passes validation and gets as far as binding the address.
    let (ok, err) = start_with(&demo(), &data());
    assert!(!ok);
    assert!(err.contains("could not listen"), "validation passed: {err}");

    // A task on visitors' own files: only its test split is on the server.
    let local = demo().replace(
        "[data]\nclasses = 10\n",
        "[data]\nclasses = 10\nsource = \"local\"\n\n[data.local]\nkind = \"images\"\n",
    );
    let (ok, err) = start_with(&local, &data());
    assert!(!ok);
    assert!(
        err.contains("data.train") && err.contains("no server training files"),
        "{err}"
    );
    let local = local.replace(
        "[data.train]\nimages = \"digits/train-images.idx\"\nlabels = \"digits/train-labels.idx\"\n",
        "",
    );
    let (ok, err) = start_with(&local, &data());
    assert!(!ok);
    assert!(
        err.contains("could not listen"),
        "a local task is valid: {err}"
    );
    let (ok, err) = start_with(
        &local.replace("kind = \"images\"", "kind = \"text\""),
        &data(),
    );
    assert!(!ok);
    assert!(err.contains("data.local.kind"), "{err}");
    let (ok, err) = start_with(&local.replace("test-labels.idx", "no-such.idx"), &data());
    assert!(!ok);
    assert!(
        err.contains("data.test.labels") && err.contains("no-such.idx"),
        "{err}"
    );
}

#[test]
fn more_neighbours_than_a_peer_keeps_copies_for_stop_the_server() {
    // 17 would let a peer hold 34 neighbours, past the 32 public copies it keeps.
    let (ok, err) = start_with_args(&demo(), &data(), &["--neighbours", "17"]);
    assert!(!ok);
    assert!(err.contains("--neighbours must be within 1..=16"), "{err}");
    // 16 passes the check: the start then fails on the address, not on it.
    let (ok, err) = start_with_args(&demo(), &data(), &["--neighbours", "16"]);
    assert!(!ok);
    assert!(
        !err.contains("--neighbours") && err.contains("could not listen"),
        "{err}"
    );
}

#[test]
fn a_task_asking_more_neighbours_than_a_peer_keeps_copies_for_stops_the_server() {
    let many = demo().replace("neighbours = 6", "neighbours = 17");
    assert_ne!(many, demo(), "the demo task names its neighbours");
    let (ok, err) = start_with(&many, &data());
    assert!(!ok);
    assert!(
        err.contains("task.toml: learn.neighbours: 17 outside 1..=16"),
        "{err}"
    );
    // --neighbours sets every task's k, so the same file then passes the check.
    let (ok, err) = start_with_args(&many, &data(), &["--neighbours", "6"]);
    assert!(!ok);
    assert!(
        !err.contains("neighbours") && err.contains("could not listen"),
        "{err}"
    );
}

#[test]
fn ice_urls_peers_would_not_use_stop_the_server() {
    let nine: Vec<String> = (0..9)
        .flat_map(|i| ["--stun".to_string(), format!("stun:10.0.0.{i}:3478")])
        .collect();
    let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
    for args in [
        &nine[..],
        &["--stun", "http://stun.example.org"],
        &["--turn-secret", "s", "--turn", "turn"],
    ] {
        let (ok, err) = start_with_args(&demo(), &data(), args);
        assert!(!ok);
        assert!(err.contains("at most 8 URLs in all"), "{args:?}: {err}");
    }
    let (ok, err) = start_with_args(&demo(), &data(), &nine[..16]);
    assert!(!ok);
    assert!(
        !err.contains("--stun") && err.contains("could not listen"),
        "{err}"
    );
}

#[test]
fn an_admin_token_that_no_header_can_carry_stops_the_server() {
    // Sixteen spaces: long enough, but a request could never present it.
    let bad: [String; 3] = [
        " ".repeat(16),
        "short-token".into(),
        "tab\tinside-a-long-token".into(),
    ];
    for bad in bad {
        let (ok, err) = start_with_args(&demo(), &data(), &["--admin-token", &bad]);
        assert!(!ok);
        assert!(
            err.contains("--admin-token must be at least 16 visible ASCII characters"),
            "{bad:?}: {err}"
        );
    }
    let (ok, err) = start_with_args(&demo(), &data(), &["--admin-token", "0123456789abcdef"]);
    assert!(!ok);
    assert!(
        !err.contains("--admin-token") && err.contains("could not listen"),
        "{err}"
    );
}
