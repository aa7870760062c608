//! What the native integration tests share: running a test inside a loopback-only
//! network namespace, and the real signaling server on port 0.

#![allow(dead_code, unreachable_pub, unused_macros, unused_imports)]

use std::process::Command;
use std::time::Duration;

use shoal_signaling_server::{Config, SignalingConfig, app, serve};

const MARK: &str = "SHOAL_IN_LOOPBACK_NETNS";

/// The name libtest knows the enclosing test function by (its path inside the test
/// crate), so that a re-executed run names exactly that test even after a rename.
macro_rules! test_name {
    () => {{
        fn here() {}
        fn name_of<T>(_: T) -> &'static str {
            std::any::type_name::<T>()
        }
        let path = name_of(here);
        let path = path.strip_suffix("::here").unwrap_or(path);
        // Drop the crate's name: libtest's names start below it.
        path.split_once("::").map_or(path, |(_, rest)| rest)
    }};
}
pub(crate) use test_name;

/// Whether libtest's report (its stdout) says that exactly one test ran and passed.
pub fn ran_exactly_one_test(report: &str) -> bool {
    report.lines().any(|l| l.trim() == "running 1 test")
        && report
            .lines()
            .any(|l| l.trim().starts_with("test result: ok. 1 passed;"))
}

/// Runs `name` of this test binary inside a loopback-only network namespace; returns
/// false when already inside one (then the caller runs the test body). Fails unless the
/// inner run ran exactly that one test and it passed (a name that matches nothing would
/// otherwise pass silently). Pass `common::test_name!()` rather than a literal.
pub fn reexec_in_netns(name: &str) -> bool {
    if std::env::var_os(MARK).is_some() {
        return false;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let out = Command::new("unshare")
        .args(if root { &["-n"][..] } else { &["-rn"][..] })
        .args(["bash", "-c", "ip link set lo up && exec \"$@\"", "netns"])
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(MARK, "1")
        .output()
        .expect("unshare runs");
    // The inner run's report goes to stderr, so that test counters see this test once.
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("{o}{e}");
    assert!(
        out.status.success(),
        "{name} failed inside the loopback namespace"
    );
    assert!(
        ran_exactly_one_test(&o),
        "the run inside the loopback namespace did not run exactly one test named {name}"
    );
    true
}

pub async fn start_server() -> (String, tokio::sync::oneshot::Sender<()>) {
    start_server_with_ledger(None).await
}

/// A server that keeps the task's ledger of receipts in `ledger_dir`.
pub async fn start_server_with_ledger(
    ledger_dir: Option<std::path::PathBuf>,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    start_server_with(ledger_dir, vec![shoal_shared::task::TaskSpec::digits()]).await
}

/// A server of `tasks` (the first one's signaling URL is returned) that keeps their
/// ledgers of receipts in `ledger_dir`.
#[allow(dead_code)] // not every test file uses each helper
pub async fn start_server_with(
    ledger_dir: Option<std::path::PathBuf>,
    tasks: Vec<shoal_shared::task::TaskSpec>,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    start_server_on(std::env::temp_dir(), ledger_dir, tasks).await
}

/// [`start_server_with`], serving the data files of `data` (and describing their
/// digests).
#[allow(dead_code)] // not every test file uses each helper
pub async fn start_server_on(
    data: std::path::PathBuf,
    ledger_dir: Option<std::path::PathBuf>,
    tasks: Vec<shoal_shared::task::TaskSpec>,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let first = tasks.first().map(|t| t.name.clone()).unwrap_or_default();
    let config = Config {
        www: std::env::temp_dir(),
        data,
        signaling: SignalingConfig {
            ledger_dir,
            ..SignalingConfig::default()
        },
        tasks,
        admin_token: None,
        http: shoal_signaling_server::HttpLimits::default(),
        state_file: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        app(&config),
        async {
            let _ = rx.await;
        },
        Duration::from_millis(200),
    ));
    (format!("ws://{addr}/ws/{first}?v=2"), stop)
}
