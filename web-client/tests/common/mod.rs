//! What the native integration tests share: running a test inside a loopback-only
//! network namespace, and the real signaling server on port 0.

#![allow(dead_code, unreachable_pub)]

use std::process::Command;
use std::time::Duration;

use shoal_signaling_server::{Config, SignalingConfig, app, serve};

const MARK: &str = "SHOAL_IN_LOOPBACK_NETNS";

/// Runs `name` of this test binary inside a loopback-only network namespace; returns
/// false when already inside one (then the caller runs the test body).
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
    true
}

pub async fn start_server() -> (String, tokio::sync::oneshot::Sender<()>) {
    let dir = std::env::temp_dir();
    let config = Config {
        www: dir.clone(),
        data: dir,
        signaling: SignalingConfig::default(),
        tasks: vec![shoal_shared::task::TaskSpec::digits()],
        admin_token: None,
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
    (format!("ws://{addr}/ws/digits?v=1"), stop)
}
