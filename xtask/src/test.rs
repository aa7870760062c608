//! `cargo xtask test`: installs what is missing, then runs every check and test suite and
//! ends with one line `N passed, N failed` over all of them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Result, bail};

use crate::{data, root, setup, web};

/// Counts over every suite.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    failures: Vec<String>,
    /// Each step and the seconds it took, printed at the end (CI keeps the tail).
    took: Vec<(String, f64)>,
}

impl Tally {
    /// A check that passes or fails as a whole (formatting, lints, a build step).
    fn check(&mut self, name: &str, cmd: &mut Command) {
        self.verdict(name, || match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            other => bail!("{other:?}"),
        });
    }

    /// A check computed here: `run` says why it failed.
    fn verdict(&mut self, name: &str, run: impl FnOnce() -> Result<()>) {
        eprintln!("\n== {name}");
        let start = std::time::Instant::now();
        let result = run();
        self.took.push((name.into(), start.elapsed().as_secs_f64()));
        match result {
            Ok(()) => self.passed += 1,
            Err(e) => {
                eprintln!("xtask: {name} failed: {e:#}");
                self.failed += 1;
                self.failures.push(name.to_string());
            }
        }
    }

    /// A test suite whose output states its own counts: cargo's libtest lines
    /// (`test result: ok. N passed; M failed; ...`) or node's TAP summary (`# pass N`,
    /// `# fail N`). Output is echoed as it arrives. A suite that fails without reporting
    /// a failed test (a build error, a crash) counts as one failure.
    fn suite(&mut self, name: &str, cmd: &mut Command) {
        eprintln!("\n== {name}");
        let start = std::time::Instant::now();
        let (mut passed, mut failed) = (0, 0);
        let status = cmd.stdout(Stdio::piped()).spawn().and_then(|mut child| {
            let stdout = child.stdout.take().expect("stdout was piped");
            for line in BufReader::new(stdout).lines() {
                let line = line?;
                println!("{line}");
                let (p, f) = parse_counts(&line);
                passed += p;
                failed += f;
            }
            child.wait()
        });
        self.took.push((name.into(), start.elapsed().as_secs_f64()));
        self.passed += passed;
        self.failed += failed;
        let ok = matches!(status, Ok(s) if s.success());
        if !ok || failed > 0 {
            if failed == 0 {
                self.failed += 1;
            }
            eprintln!("xtask: {name} failed ({status:?})");
            self.failures.push(name.to_string());
        }
    }
}

/// Pulls pass/fail counts out of one line of libtest or TAP output.
fn parse_counts(line: &str) -> (usize, usize) {
    let num_before = |s: &str, word: &str| -> usize {
        s.split(';')
            .find_map(|part| {
                part.trim()
                    .strip_suffix(word)?
                    .trim()
                    .rsplit(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    if let Some(rest) = line.trim_start().strip_prefix("test result:") {
        return (num_before(rest, "passed"), num_before(rest, "failed"));
    }
    let tap = |prefix: &str| {
        line.strip_prefix(prefix)
            .and_then(|n| n.trim().parse().ok())
    };
    match (tap("# pass "), tap("# fail ")) {
        (Some(p), _) => (p, 0),
        (_, Some(f)) => (0, f),
        _ => (0, 0),
    }
}

fn cargo(root: &Path) -> Command {
    let mut c = crate::cargo(root);
    // Native wgpu (Vulkan) wants a runtime directory; headless machines often lack one.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = root.join("target/xdg-runtime");
        if std::fs::create_dir_all(&dir).is_ok() {
            c.env("XDG_RUNTIME_DIR", dir);
        }
    }
    c
}

/// `cargo test` of every native crate. The browser tests' crate has no native tests (its
/// files are wasm32 only): built natively, it only cost CI a build of its dependencies.
///
/// The end-to-end tests' server and `shoal-peer` come from this same command (`--no-run`):
/// cargo builds a package's binaries for its integration tests, with the features that
/// the whole workspace and its test dependencies turn on. Built on their own (`cargo build
/// -p ...`), those features differed in low crates such as `libc` and `syn`, and cargo
/// compiled most of the tree a second time: 170 s of every end-to-end run after a change
/// here, more on a fresh machine. (So `cargo xtask test e2e` alone builds every native
/// test too.) xtask depends on every native member for the same reason (its Cargo.toml).
fn native_tests(root: &Path) -> Command {
    let mut c = cargo(root);
    c.args(["test", "--release", "--workspace"])
        .args(["--exclude", "shoal-wasm-pack-tests"]);
    c
}

/// The WebDriver settings for wasm-bindgen-test: Debian's Chromium, headless, WebGPU on.
const WEBDRIVER_JSON: &str = "wasm-pack-tests/webdriver.json";

/// The parts `cargo xtask test PART...` can run alone.
const PARTS: [&str; 4] = ["checks", "native", "browser", "e2e"];

/// `cargo xtask test [PART...]`: every part, or those named.
pub(crate) fn run(args: &[String]) -> Result<()> {
    for a in args {
        if !PARTS.contains(&a.as_str()) {
            bail!(
                "unknown part {a:?} of `cargo xtask test` (parts: {})",
                PARTS.join(", ")
            );
        }
    }
    let want = |part: &str| args.is_empty() || args.iter().any(|a| a == part);
    run_parts(&want)
}

fn run_parts(want: &dyn Fn(&str) -> bool) -> Result<()> {
    let root = root();
    // This program, found now: the native tests rebuild it (the command-line tests need
    // the binary), after which the kernel names the running one "... (deleted)".
    let runner = this_program()?;
    let start = std::time::Instant::now();
    setup::ensure_debs(&setup::TEST_PACKAGES)?;
    setup::ensure_node()?;
    if want("e2e") {
        setup::check_node_for_tests()?;
    }
    setup::ensure_wasm_target()?;
    setup::ensure_npm_packages(&root)?;
    data::prepare(&root)?;
    crate::text::prepare(&root)?;
    let python = setup::ensure_python(&root)?;

    let mut t = Tally::default();
    t.took
        .push(("setup and data".into(), start.elapsed().as_secs_f64()));
    if want("checks") {
        checks(&root, &mut t);
    }
    if want("native") {
        t.suite(
            "native unit and integration tests",
            native_tests(&root)
                .arg("--no-fail-fast")
                .env("SHOAL_DATA", root.join("data"))
                .env("SHOAL_PYTHON", &python),
        );
    }
    if want("browser") {
        browser(&root, &runner, &mut t);
    }
    if want("e2e") {
        e2e(&root, &python, &mut t);
    }

    eprintln!("\ntime per step:");
    for (name, secs) in &t.took {
        eprintln!("  {secs:7.0} s  {name}");
    }
    eprintln!("  {:7.0} s  in all", start.elapsed().as_secs_f64());
    if !t.failures.is_empty() {
        eprintln!("\nfailed: {}", t.failures.join(", "));
    }
    println!("{} passed, {} failed", t.passed, t.failed);
    if t.failed > 0 {
        bail!("{} failed", t.failed);
    }
    Ok(())
}

/// Formatting and lints, native and wasm32; and that the native build is one build.
///
/// Clippy checks in the release profile: its build scripts and procedural macros are
/// then the ones `cargo xtask` built already (in the dev profile a fresh machine compiled
/// them again: 185 s of clippy's native check became 157 s).
fn checks(root: &Path, t: &mut Tally) {
    t.check("rustfmt", cargo(root).args(["fmt", "--all", "--check"]));
    t.verdict("one native build (cargo tree)", || {
        let split = feature_split(root)?;
        if split.is_empty() {
            return Ok(());
        }
        bail!(
            "cargo resolves other features for `cargo xtask` than for the native tests, so a \
             fresh machine compiles these and every crate above them twice (give xtask the \
             dependency or the features that the tests bring):\n  {}",
            split.join("\n  ")
        )
    });
    t.check(
        "clippy (native)",
        cargo(root).args([
            "clippy",
            "--release",
            "--workspace",
            "--exclude",
            "shoal-wasm-pack-tests",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    );
    t.check(
        "clippy (wasm32)",
        cargo(root).args([
            "clippy",
            "--release",
            "--target",
            "wasm32-unknown-unknown",
            "-p",
            "shoal-engine",
            "-p",
            "shoal-shared",
            "-p",
            "shoal-web-client",
            "-p",
            "shoal-dashboard-client",
            "-p",
            "shoal-wasm-pack-tests",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    );
}

/// The packages whose features cargo resolves one way for `cargo xtask`'s own build
/// (`--package xtask`, normal and build dependencies) and another for the native tests
/// ([`native_tests`]: the workspace, dev-dependencies too), each as a line. Cargo hashes
/// a crate's features into its build, so each such package, and every crate that
/// depends on it, compiles twice from an empty target dir (once 245 crates, 579 s of
/// CPU); xtask depends on every native member so that there are none.
fn feature_split(root: &Path) -> Result<Vec<String>> {
    use std::collections::{BTreeMap, BTreeSet};
    // A package can appear more than once with other features (as a build dependency,
    // and as a normal one): each package's set of feature lists is compared.
    let tree = |selection: &[&str]| -> Result<BTreeMap<String, BTreeSet<String>>> {
        // Its messages (a download, a wait for cargo's lock, an error) show as they come.
        let out = cargo(root)
            .args(["tree", "--prefix", "none", "--format", "{p}|{f}"])
            .args(selection)
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() {
            bail!("cargo tree {selection:?} failed ({})", out.status);
        }
        let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((package, features)) = line.trim_end_matches(" (*)").split_once('|') {
                found
                    .entry(package.to_string())
                    .or_default()
                    .insert(features.to_string());
            }
        }
        Ok(found)
    };
    let xtask = tree(&["--package", "xtask", "--edges", "normal,build"])?;
    let tests = tree(&["--workspace", "--exclude", "shoal-wasm-pack-tests"])?;
    if xtask.len() < 50 {
        bail!("cargo tree listed {} packages for xtask", xtask.len());
    }
    Ok(xtask
        .iter()
        .filter_map(|(package, x)| {
            let t = tests.get(package)?;
            (t != x).then(|| format!("{package}: {x:?} for xtask, {t:?} for the tests"))
        })
        .collect())
}

/// The path of this program's binary (without the " (deleted)" Linux appends once the
/// file was replaced by a rebuild: the new binary is at the same path).
fn this_program() -> Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => path.into(),
        None => exe,
    })
}

/// The browser tests: wasm-bindgen-test in headless Chromium with WebGPU, run by
/// `runner` (this program) as cargo's test runner for wasm32.
fn browser(root: &Path, runner: &Path, t: &mut Tally) {
    t.suite(
        "browser tests (wasm-bindgen-test, headless Chromium + WebGPU)",
        cargo(root)
            .args([
                "test",
                "--release",
                "--target",
                "wasm32-unknown-unknown",
                "-p",
                "shoal-wasm-pack-tests",
            ])
            // As a TOML array: cargo splits a runner given as one string at spaces, and a
            // checkout under a path with a space ran a program named by its first part.
            .arg("--config")
            .arg(format!(
                "target.wasm32-unknown-unknown.runner=[{}, \"wasm-test-runner\"]",
                toml_string(&runner.display().to_string())
            ))
            .env(
                "WASM_BINDGEN_TEST_WEBDRIVER_JSON",
                root.join(WEBDRIVER_JSON),
            )
            .env("CHROMEDRIVER", "/usr/bin/chromedriver")
            .env("WASM_BINDGEN_TEST_TIMEOUT", "600"),
    );
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// End-to-end: the real bundle, the real server, Playwright driving Chromium, all inside
/// a network namespace whose only interface is loopback.
fn e2e(root: &Path, python: &Path, t: &mut Tally) {
    let start = std::time::Instant::now();
    let built = web::build(root)
        .and_then(|()| crate::run_cmd(native_tests(root).args(["--no-run", "--quiet"])));
    t.took
        .push(("end-to-end build".into(), start.elapsed().as_secs_f64()));
    match built {
        Ok(()) => t.suite(
            "end-to-end tests (Playwright, loopback-only network namespace)",
            loopback_namespace(
                // A test past 15 minutes fails, and the run ends when the tests do: a
                // server a failed test left running kept node, and CI, waiting for good.
                "node --test --test-reporter=tap --test-concurrency=1 --test-timeout=900000 \
                 --test-force-exit wasm-pack-tests/e2e/",
            )
            .current_dir(root)
            .env(
                "SHOAL_SERVER_BIN",
                root.join("target/release/shoal-signaling-server"),
            )
            .env("SHOAL_ROOT", root)
            .env("SHOAL_PYTHON", python),
        ),
        Err(e) => {
            eprintln!("xtask: building for the end-to-end tests failed: {e:#}");
            t.failed += 1;
            t.failures.push("end-to-end build".into());
        }
    }
}

/// A shell command run in a fresh network namespace with only `lo`, up. As root this is
/// `unshare -n`; otherwise a user namespace maps us to root inside it.
pub(crate) fn loopback_namespace(script: &str) -> Command {
    let mut c = Command::new("unshare");
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root_user {
        c.arg("-r");
    }
    c.args([
        "-n",
        "bash",
        "-c",
        &format!("ip link set lo up && {script}"),
    ]);
    c
}

#[cfg(test)]
mod tests {
    use super::parse_counts;

    #[test]
    fn reads_libtest_and_tap_summaries() {
        assert_eq!(
            parse_counts("test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured"),
            (12, 0)
        );
        assert_eq!(
            parse_counts("test result: FAILED. 3 passed; 2 failed; 0 ignored"),
            (3, 2)
        );
        assert_eq!(parse_counts("# pass 4"), (4, 0));
        assert_eq!(parse_counts("# fail 1"), (0, 1));
        assert_eq!(parse_counts("running 3 tests"), (0, 0));
    }

    #[test]
    fn cargo_started_from_xtask_does_not_see_what_cargo_set_for_xtask() {
        // Cargo sets these for a test as `cargo run` does for xtask; ring's build script
        // watches both, and a cargo that inherited them rebuilt ring and the crates above.
        let c = crate::cargo(std::path::Path::new("."));
        let removed: Vec<String> = c
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        for var in [
            "CARGO_PKG_NAME",
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_VERSION_MAJOR",
        ] {
            assert!(std::env::var_os(var).is_some(), "cargo set {var}");
            assert!(
                removed.iter().any(|k| k == var),
                "{var} is kept: {removed:?}"
            );
        }
        assert!(
            !removed.iter().any(|k| k == "CARGO_HOME" || k == "PATH"),
            "the user's settings stay"
        );
    }
}
