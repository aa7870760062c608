//! Installs what the commands need when it is missing, or says exactly how to.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::run_cmd;

/// Debian packages the test suites need: the browser, its WebDriver, the lavapipe
/// Vulkan driver so that native wgpu has an adapter on a machine without a GPU, and
/// Python's venv (the export test runs the model in numpy).
pub(crate) const TEST_PACKAGES: [&str; 4] = [
    "chromium",
    "chromium-driver",
    "mesa-vulkan-drivers",
    "python3-venv",
];

/// The benchmarks' npm packages (TF.js, the PeerJS server, playwright-core), installed
/// from `xtask/bench-web/package-lock.json` when any is missing.
pub(crate) fn ensure_bench_web(root: &Path) -> Result<()> {
    let dir = root.join("xtask/bench-web/node_modules");
    let markers = ["@tensorflow/tfjs", "peer", "playwright-core"];
    if markers
        .iter()
        .all(|m| dir.join(m).join("package.json").exists())
    {
        return Ok(());
    }
    npm_ci(&root.join("xtask/bench-web"))
}

/// `npm ci` in `dir`: the packages its committed lock file names, exactly.
fn npm_ci(dir: &Path) -> Result<()> {
    run_cmd(
        Command::new("npm")
            .current_dir(dir)
            .args(["ci", "--no-audit", "--no-fund"]),
    )
}

/// A Python with `safetensors`, `numpy` and `dp-accounting` from PyPI, in `target/py`, for
/// the tests that load an exported model without Shoal and check the privacy accountant. Returns its interpreter.
pub(crate) fn ensure_python(root: &Path) -> Result<std::path::PathBuf> {
    let venv = root.join("target/py");
    let python = venv.join("bin/python");
    let ready = || {
        Command::new(&python)
            .args(["-c", "import safetensors, numpy, dp_accounting"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready() {
        return Ok(python);
    }
    eprintln!(
        "xtask: installing safetensors, numpy and dp-accounting into {}",
        venv.display()
    );
    run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run_cmd(Command::new(venv.join("bin/pip")).args([
        "install",
        "-q",
        "safetensors",
        "numpy",
        "dp-accounting==0.6.0",
    ]))?;
    if !ready() {
        bail!(
            "{} cannot import safetensors, numpy and dp-accounting",
            python.display()
        );
    }
    Ok(python)
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn deb_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs missing Debian packages when running as root; otherwise stops with the exact
/// command to run.
pub(crate) fn ensure_debs(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !deb_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing system packages: {}\ninstall them with:\n  sudo apt-get update && sudo apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

/// Adds the wasm32 target with rustup if it is not installed.
pub(crate) fn ensure_wasm_target() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match out {
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("wasm32-unknown-unknown") => Ok(()),
        Ok(_) => run_cmd(Command::new("rustup").args(["target", "add", "wasm32-unknown-unknown"])),
        Err(_) => bail!(
            "rustup not found; install the wasm target another way:\n  rustup target add wasm32-unknown-unknown"
        ),
    }
}

/// Node.js and npm fetch the demo data and run the end-to-end tests.
pub(crate) fn ensure_node() -> Result<()> {
    let ok = |c: &str| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ok("node") && ok("npm") {
        return Ok(());
    }
    ensure_debs(&["nodejs", "npm"])
}

/// The oldest Node.js the end-to-end tests run on (`--test-force-exit`, 20.14; Playwright
/// wants 20 or newer).
const NODE_AT_LEAST: (u32, u32) = (20, 14);

/// Stops with a clear message where Node.js is older than the end-to-end tests need
/// (Debian 12's is 18: its `node --test` refused their options with a usage error).
pub(crate) fn check_node_for_tests() -> Result<()> {
    let found = Command::new("node")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    match node_version(&found) {
        Some(v) if v >= NODE_AT_LEAST => Ok(()),
        _ => bail!(
            "the end-to-end tests need Node.js {}.{} or newer (found {found:?}; Debian 12's \
             nodejs is 18): install nodejs from Debian 13, or from NodeSource, and run this \
             again",
            NODE_AT_LEAST.0,
            NODE_AT_LEAST.1
        ),
    }
}

/// `(major, minor)` of `node --version`'s answer (`v20.20.2`).
fn node_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.strip_prefix('v')?.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The bundle build's npm tools, run with node.
pub(crate) struct WebTools {
    /// binaryen's `wasm-opt`.
    pub(crate) wasm_opt: std::path::PathBuf,
    /// terser, which minifies the JS glue.
    pub(crate) terser: std::path::PathBuf,
}

/// Installs the bundle build's npm tools (binaryen's `wasm-opt` and terser) into
/// `xtask/web-build/node_modules` from the committed lock file, unless each is installed
/// at the version the lock file names (a bumped lock reinstalls).
pub(crate) fn ensure_web_tools(root: &Path) -> Result<WebTools> {
    let dir = root.join("xtask/web-build");
    let version = |p: &Path, pointer: &str| -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
        v.pointer(pointer)?.as_str().map(str::to_owned)
    };
    let tools = WebTools {
        wasm_opt: dir.join("node_modules/binaryen/bin/wasm-opt"),
        terser: dir.join("node_modules/terser/bin/terser"),
    };
    let current = [("binaryen", &tools.wasm_opt), ("terser", &tools.terser)]
        .into_iter()
        .all(|(package, bin)| {
            let locked = version(
                &dir.join("package-lock.json"),
                &format!("/packages/node_modules~1{package}/version"),
            );
            let installed = version(
                &dir.join(format!("node_modules/{package}/package.json")),
                "/version",
            );
            bin.exists() && locked.is_some() && installed == locked
        });
    if !current {
        ensure_node()?;
        npm_ci(&dir)?;
    }
    Ok(tools)
}

/// Installs the end-to-end tests' npm packages (Playwright's driver, no browser download)
/// into `wasm-pack-tests/node_modules` from the committed lock file.
pub(crate) fn ensure_npm_packages(root: &Path) -> Result<()> {
    let dir = root.join("wasm-pack-tests");
    if dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return Ok(());
    }
    npm_ci(&dir)
}

#[cfg(test)]
mod node_tests {
    use super::*;

    #[test]
    fn node_versions_are_read_and_old_ones_refused() {
        assert_eq!(node_version("v20.20.2"), Some((20, 20)));
        assert!(node_version("v18.20.4").is_some_and(|v| v < NODE_AT_LEAST));
        assert!(node_version("v20.13.1").is_some_and(|v| v < NODE_AT_LEAST));
        assert!(node_version("v22.1.0").is_some_and(|v| v >= NODE_AT_LEAST));
        assert_eq!(node_version("20.1"), None);
    }
}
