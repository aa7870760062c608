//! Shoal's task runner, behind the cargo alias `xtask`:
//!
//! ```text
//! cargo xtask run [--port 8080] [--bind 127.0.0.1]   build, prepare the demo task, serve
//! cargo xtask test [PART...]                           install what is missing, run every check
//! cargo xtask peer [ARGS...]                           the native peer from the release build
//! cargo xtask bench NAME                               run a benchmark, write target/bench/NAME.json
//! cargo xtask sim SCENARIO                             run a swarm scenario in the simulator
//! cargo xtask sim privacy                              accuracy against epsilon (differential privacy)
//! cargo xtask ledger verify FILE [--credits] [--head HEX]  check a task's ledger, recompute credits
//! ```
//!
//! Every build step lives here so that users type short commands and CI runs exactly what
//! a developer runs.

mod bench;
mod bench_signaling;
mod data;
mod ledger;
mod setup;
mod sim;
mod test;
mod text;
mod web;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Each command with its usage line and what it does (`cargo xtask help COMMAND`).
const COMMANDS: &[(&str, &str, &str)] = &[
    (
        "run",
        "run [--port P] [--bind ADDR]",
        "Builds the web bundle, prepares the demo data and the server (showing cargo's \
         progress), then becomes the server: Ctrl-C, or SIGINT or SIGTERM sent to this \
         process, stops it gracefully. Defaults: port 8080, bind 127.0.0.1. The admin \
         token is SHOAL_ADMIN_TOKEN, or one made for this run and printed.",
    ),
    (
        "test",
        "test [PART...]",
        "Installs what is missing, then runs every check and test suite, ending with \
         'N passed, N failed'. PART runs only some: checks (rustfmt, one native build, clippy), native \
         (cargo test), browser (wasm-bindgen-test in Chromium), e2e (Playwright, loopback \
         namespace). CI runs the bare command.",
    ),
    (
        "peer",
        "peer [ARGS...]",
        "Runs the native peer (shoal-peer) with ARGS from the release build, building it \
         first only if it is missing or out of date. `cargo xtask peer --help` passes \
         --help to the peer.",
    ),
    (
        "bench",
        "bench NAME",
        "Runs a benchmark and writes target/bench/NAME.json with its ratios to the named \
         competitor.",
    ),
    (
        "sim",
        "sim SCENARIO",
        "Runs a swarm scenario (scenarios/SCENARIO.toml) in the simulator and writes \
         target/sim/SCENARIO.json. `sim privacy` runs scenarios/privacy-8.toml at several \
         epsilons and without privacy, and writes target/sim/privacy.json.",
    ),
    (
        "ledger",
        "ledger verify FILE [--credits] [--head HEX]",
        "Checks a task's ledger file (LEDGER_DIR/TASK.ledger, or GET \
         /api/tasks/TASK/ledger/file) entry by entry: its hash chain, every receipt's \
         signature, task, site, time order and uniqueness. Prints the entry count and head \
         hash, or the first bad entry (index, byte offset, reason) and fails. --credits \
         also recomputes the credits per key and per site from the ledger alone.",
    ),
    ("data", "data", "Fetches and converts the demo digits only."),
    (
        "build-web",
        "build-web",
        "Builds the wasm bundles (the contributor's and the dashboard's) into www/pkg only.",
    ),
];

fn usage() -> String {
    let mut u = String::from("usage: cargo xtask <COMMAND> [ARGS]\n\ncommands:\n");
    for (_, line, _) in COMMANDS {
        u.push_str(&format!("  {line}\n"));
    }
    u.push_str(&format!(
        "\nbenchmarks: {}\n`cargo xtask help COMMAND` or `cargo xtask COMMAND --help` says more.",
        bench::NAMES.join(", ")
    ));
    u
}

/// The help of one command, if there is such a command.
fn command_help(name: &str) -> Option<String> {
    COMMANDS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, line, about)| format!("usage: cargo xtask {line}\n\n{about}"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let wants_help = |a: &[String]| a.iter().any(|a| a == "--help" || a == "-h");
    let result = match args.first().map(String::as_str) {
        None => {
            eprintln!("{}", usage());
            std::process::exit(2);
        }
        Some("help" | "--help" | "-h") => {
            match args.get(1) {
                None => println!("{}", usage()),
                Some(c) => match command_help(c) {
                    Some(h) => println!("{h}"),
                    None => {
                        eprintln!("error: no command {c:?}\n\n{}", usage());
                        std::process::exit(2);
                    }
                },
            }
            return;
        }
        // The peer takes its own flags, --help included.
        Some("peer") => peer(&args[1..]),
        Some(c) if wants_help(&args[1..]) && command_help(c).is_some() => {
            println!("{}", command_help(c).unwrap_or_default());
            return;
        }
        Some("run") => run(&args[1..]),
        Some("test") => test::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        // The native GPU half of the benchmarks alone, for a machine with a GPU and no toolchain.
        Some("bench-native-gpu") => bench::native_gpu(),
        // The load client of `bench signaling`, run as a child with a raised fd limit.
        Some("bench-signaling-load") => bench_signaling::load(&args[1..]),
        Some("sim") => sim::run(&args[1..]),
        Some("ledger") => ledger::run(&args[1..]),
        Some("data") => no_args("data", &args[1..]).and_then(|()| {
            data::prepare(&root())?;
            text::prepare(&root()).map(|_| ())
        }),
        Some("build-web") => no_args("build-web", &args[1..]).and_then(|()| web::build(&root())),
        // Used by `cargo test --target wasm32-unknown-unknown` as its runner, so that the
        // browser tests use exactly the wasm-bindgen that Cargo.lock pins.
        Some("wasm-test-runner") => {
            let runner_args = std::iter::once("wasm-bindgen-test-runner".to_string())
                .chain(args[1..].iter().cloned());
            wasm_bindgen_cli::wasm_bindgen_test_runner::run_cli_with_args(runner_args)
        }
        Some(other) => {
            eprintln!("error: no command {other:?}\n\n{}", usage());
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Refuses arguments to a command that takes none.
fn no_args(command: &str, args: &[String]) -> Result<()> {
    match args.first() {
        None => Ok(()),
        Some(a) => bail!("`cargo xtask {command}` takes no arguments (got {a:?})"),
    }
}

/// Replaces this process with `cmd` (Unix), so that signals sent to `cargo xtask ...`
/// reach the program itself; elsewhere runs it and exits with its status.
fn become_program(cmd: &mut Command) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let e = cmd.exec();
        bail!("could not start {cmd:?}: {e}");
    }
    #[cfg(not(unix))]
    {
        let status = cmd
            .status()
            .with_context(|| format!("could not start {cmd:?}"))?;
        std::process::exit(status.code().unwrap_or(1));
    }
}

/// `cargo xtask peer ARGS`: the native peer from the release build.
fn peer(args: &[String]) -> Result<()> {
    let root = root();
    eprintln!("xtask: checking the native peer's build (target/release/shoal-peer)");
    cargo_release(
        &root,
        &["-p", "shoal-web-client", "--bin", "shoal-peer"],
        false,
    )?;
    become_program(Command::new(root.join("target/release/shoal-peer")).args(args))
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

/// `cargo` in `root`, without the variables that `cargo run` set for this program
/// (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, ...). Build scripts may watch them, and
/// cargo reruns a build script when a variable it watches changes: ring's watches both,
/// so each cargo started from here rebuilt ring and the 12 crates above it (rustls, the
/// WebRTC stack) for its environment, and the next `cargo xtask` from a shell rebuilt
/// them for its own, on a fresh machine too.
pub(crate) fn cargo(root: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*k,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
            )
        {
            c.env_remove(&key);
        }
    }
    c
}

/// `cargo build --quiet --release` with `targets` (`-p` with `--bin` or `--example`
/// arguments: name the targets, or cargo would rebuild this running xtask too).
pub(crate) fn build_release(root: &Path, targets: &[&str]) -> Result<()> {
    cargo_release(root, targets, true)
}

/// [`build_release`], showing cargo's progress unless `quiet`.
///
/// `-p xtask` joins the selection so that cargo resolves features over the same crates
/// as `cargo xtask` and `cargo test --workspace` (xtask depends on every native member):
/// a selection of its own turned on other features of low crates (libc, syn, tokio),
/// compiled those and everything above them a second time, and replaced the test run's
/// server and peer binaries with builds of other features.
fn cargo_release(root: &Path, targets: &[&str], quiet: bool) -> Result<()> {
    run_cmd(
        cargo(root)
            .args(["build", "--release", "-p", "xtask"])
            .args(quiet.then_some("--quiet"))
            .args(targets),
    )
}

/// Builds the signaling server in release, and of `shoal-web-client` the targets `client`
/// names (such as `["--bin", "shoal-peer"]`; none when empty).
pub(crate) fn build_server_with(root: &Path, client: &[&str]) -> Result<()> {
    let mut targets = vec![
        "-p",
        "shoal-signaling-server",
        "--bin",
        "shoal-signaling-server",
    ];
    if !client.is_empty() {
        targets.extend(["-p", "shoal-web-client"]);
        targets.extend(client);
    }
    build_release(root, &targets)
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
    eprintln!("xtask: building the web bundle (www/pkg)");
    web::build(&root)?;
    eprintln!("xtask: preparing the demo data (data/)");
    data::prepare(&root)?;
    text::prepare(&root)?;
    eprintln!("xtask: building the signaling server");
    cargo_release(
        &root,
        &[
            "-p",
            "shoal-signaling-server",
            "--bin",
            "shoal-signaling-server",
        ],
        false,
    )?;
    let server = root.join("target/release/shoal-signaling-server");
    // This process becomes the server (cargo's `run` does the same with us): it prints
    // the URLs it serves, and Ctrl-C or a signal sent to this process reaches it and it
    // shuts down gracefully.
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
    become_program(
        Command::new(server)
            .current_dir(&root)
            .args(["--bind", &bind, "--port", &port])
            .args([
                "--www",
                "www",
                "--data",
                "data",
                "--task-file",
                "tasks/digits.toml",
                // The demo language model too (its text is fetched above).
                "--task-file",
                "tasks/fortunes.toml",
                // The researcher's pauses survive a restart of `cargo xtask run`.
                "--state-file",
                "target/shoal-state.json",
                // The receipts' ledger, kept across restarts too.
                "--ledger-dir",
                "target/ledger",
            ])
            .env("SHOAL_ADMIN_TOKEN", token),
    )
}
