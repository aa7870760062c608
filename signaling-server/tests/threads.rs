//! `--threads`: the server runs on the number of threads it is given (1 included) and
//! refuses 0 with a message.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

const SERVER: &str = env!("CARGO_BIN_EXE_shoal-signaling-server");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The folder a server with `threads` serves (and keeps its ledger in); each test removes
/// its own.
fn www(threads: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("shoal-threads-{}-{threads}", std::process::id()))
}

fn server(threads: &str) -> Command {
    let data = std::env::var("SHOAL_DATA").unwrap_or_else(|_| format!("{ROOT}/data"));
    let www = www(threads);
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("index.html"), "<!doctype html>").expect("index");
    let mut c = Command::new(SERVER);
    c.args(["--port", "0", "--threads", threads, "--data", &data])
        .arg("--www")
        .arg(&www)
        .arg("--task-file")
        .arg(format!("{ROOT}/tasks/digits.toml"))
        .arg("--ledger-dir")
        .arg(www.join("ledger"));
    c
}

#[test]
fn zero_threads_is_refused() {
    let out = server("0").output().expect("server runs");
    let _ = std::fs::remove_dir_all(www("0"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--threads must be at least 1"), "{err}");
}

#[test]
fn one_or_several_threads_serve() {
    for threads in ["1", "3"] {
        let mut child = server(threads)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("server starts");
        // Read the whole greeting (the server's stdout stays open until it is stopped).
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut addr = None;
        for line in lines.by_ref().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("Shoal is listening on http://") {
                addr = Some(a.to_string());
            }
            if line.starts_with("Press Ctrl-C") {
                break;
            }
        }
        let addr = addr.expect("the server prints its address");
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        let _ = child.kill();
        let _ = child.wait();
        drop(lines);
        let _ = std::fs::remove_dir_all(www(threads));
        assert!(
            body.starts_with("HTTP/1.1 200"),
            "{threads} threads: {body}"
        );
        assert!(body.ends_with("ok\n"), "{threads} threads: {body}");
    }
}
