//! Shoal's task runner, behind the cargo alias `xtask`:
//!
//! ```text
//! cargo xtask run [--port 8080] [--bind 127.0.0.1]   build, prepare the demo task, serve
//! cargo xtask test                                     install what is missing, run every check
//! cargo xtask bench NAME                               run a benchmark, write target/bench/NAME.json
//! cargo xtask sim SCENARIO                             run a swarm scenario in the simulator
//! ```
//!
//! Every build step lives here so that users type short commands and CI runs exactly what
//! a developer runs.

mod bench;
mod bench_signaling;
mod data;
mod setup;
mod sim;
mod test;
mod web;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("test") => test::run_all(),
        Some("bench") => bench::run(&args[1..]),
        // The native GPU half of the benchmarks alone, for a machine with a GPU and no toolchain.
        Some("bench-native-gpu") => bench::native_gpu(),
        // The load client of `bench signaling`, run as a child with a raised fd limit.
        Some("bench-signaling-load") => bench_signaling::load(&args[1..]),
        Some("sim") => sim::run(&args[1..]),
        Some("data") => data::prepare(&root()).map(|_| ()),
        Some("build-web") => web::build(&root()).map(|_| ()),
        // Used by `cargo test --target wasm32-unknown-unknown` as its runner, so that the
        // browser tests use exactly the wasm-bindgen that Cargo.lock pins.
        Some("wasm-test-runner") => {
            let runner_args = std::iter::once("wasm-bindgen-test-runner".to_string())
                .chain(args[1..].iter().cloned());
            wasm_bindgen_cli::wasm_bindgen_test_runner::run_cli_with_args(runner_args)
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 run [--port P] [--bind ADDR]   build the web bundle, prepare the demo data, serve\n  \
                 test                           install what is missing, run every check and test\n  \
                 bench NAME                     run benchmark NAME ({}), write target/bench/NAME.json\n  \
                 sim SCENARIO                   run a swarm scenario in the simulator (scenarios/*.toml)\n  \
                 data                           fetch and convert the demo digits only\n  \
                 build-web                      build the wasm bundle into www/pkg only",
                bench::NAMES.join(", ")
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root (the parent of this crate's manifest directory).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .into()
}

/// Runs a command, inheriting stdio, and fails with the command line if it fails.
pub(crate) fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// `cargo build --quiet --release` with `targets` (`-p`, `--bin`, `--example` arguments).
pub(crate) fn build_release(root: &Path, targets: &[&str]) -> Result<()> {
    run_cmd(
        Command::new("cargo")
            .current_dir(root)
            .args(["build", "--quiet", "--release"])
            .args(targets),
    )
}

/// `cargo xtask run`: everything a user needs to see Shoal in a browser.
fn run(args: &[String]) -> Result<()> {
    let mut port = "8080".to_string();
    let mut bind = "127.0.0.1".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--port" => port = it.next().context("--port needs a value")?.clone(),
            "--bind" => bind = it.next().context("--bind needs a value")?.clone(),
            other => bail!("unknown option {other} (expected --port or --bind)"),
        }
    }
    let root = root();
    setup::ensure_wasm_target()?;
    setup::ensure_node()?;
    web::build(&root)?;
    data::prepare(&root)?;
    build_release(&root, &["-p", "shoal-signaling-server"])?;
    let server = root.join("target/release/shoal-signaling-server");
    // The server prints the URLs it serves; Ctrl-C reaches it (same process group) and it
    // shuts down gracefully, after which we exit with its status.
    // The dashboard's control actions need a token: the researcher's own, or one made
    // for this run and printed here (never stored).
    let token = match std::env::var("SHOAL_ADMIN_TOKEN") {
        Ok(t) if !t.is_empty() => t,
        _ => {
            let mut bytes = [0u8; 16];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
                .context("no randomness for the admin token")?;
            let t: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            println!("Admin token for the dashboard's controls (this run only): {t}");
            t
        }
    };
    let status = Command::new(server)
        .current_dir(&root)
        .args(["--bind", &bind, "--port", &port])
        .args([
            "--www",
            "www",
            "--data",
            "data",
            "--task-file",
            "tasks/digits.toml",
        ])
        .env("SHOAL_ADMIN_TOKEN", token)
        .status()
        .context("could not start the signaling server")?;
    if !status.success() {
        bail!("the signaling server exited with {status}");
    }
    Ok(())
}
