//! Builds the web client's two wasm bundles and their JS glue into `www/pkg`: the
//! contributor's (`shoal_web_client`, what every visitor downloads) and the researcher's
//! (`shoal_dashboard_client`: the same plus the dashboard's observer).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run_cmd;

/// The bundles: cargo package, and the crate name that names its wasm and glue.
const BUNDLES: [(&str, &str); 2] = [
    ("shoal-web-client", "shoal_web_client"),
    ("shoal-dashboard-client", "shoal_dashboard_client"),
];

/// Builds both bundles (one cargo run, so the crates they share compile once) and
/// generates each one's glue with the wasm-bindgen that Cargo.lock pins (linked into
/// xtask, so no separately installed binary can drift), without the name and producers
/// sections (the name section alone was 237 KB of 1.6 MB: function names for stack
/// traces, which a visitor's browser does not need), then shrinks each with binaryen's
/// `wasm-opt -O1 -s 2` (the npm build; Debian's binaryen 108 breaks wgpu's output) and its
/// glue with terser. Skips those steps for a bundle whose files in `www/pkg` are newer
/// than its wasm. Prints each bundle's size, raw and gzipped at the best level: the
/// contributor's is what a visitor downloads.
pub(crate) fn build(root: &Path) -> Result<()> {
    let mut args = vec![
        "build",
        "--quiet",
        "--profile",
        "wasm-release",
        "--target",
        "wasm32-unknown-unknown",
    ];
    for (package, _) in BUNDLES {
        args.extend(["-p", package]);
    }
    run_cmd(crate::cargo(root).args(args))?;
    let out_dir = root.join("www/pkg");
    for (package, name) in BUNDLES {
        bindgen_and_optimize(root, name)?;
        let (mut raw, mut gz) = (0, 0);
        for file in [format!("{name}_bg.wasm"), format!("{name}.js")] {
            let bytes = std::fs::read(out_dir.join(file))?;
            raw += bytes.len();
            gz += gzipped_len(&bytes)?;
        }
        eprintln!(
            "xtask: {package} (wasm and its glue, www/pkg/{name}.js) is {} KB, {} KB gzipped",
            raw / 1000,
            gz / 1000
        );
    }
    Ok(())
}

/// The length of `bytes` gzipped at the best compression.
fn gzipped_len(bytes: &[u8]) -> Result<usize> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes)?;
    Ok(gz.finish()?.len())
}

/// wasm-bindgen, wasm-opt and terser for the bundle `name`, unless `www/pkg` holds a
/// newer one.
fn bindgen_and_optimize(root: &Path, name: &str) -> Result<()> {
    let wasm = root.join(format!(
        "target/wasm32-unknown-unknown/wasm-release/{name}.wasm"
    ));
    let out_dir = root.join("www/pkg");
    let out_wasm = out_dir.join(format!("{name}_bg.wasm"));
    if is_newer(&out_wasm, &wasm) {
        return Ok(());
    }
    // Glue and wasm are made and optimized in a staging folder and move into `www/pkg`
    // only when every step succeeded (the wasm last): an interrupted or failed build
    // leaves the previous bundle, older than cargo's output, so the next build redoes it.
    let stage = root.join("target/web-pkg").join(name);
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage)?;
    let args = [
        "wasm-bindgen".into(),
        "--target".into(),
        "web".into(),
        "--no-typescript".into(),
        "--remove-name-section".into(),
        "--remove-producers-section".into(),
        "--out-dir".into(),
        stage.clone().into_os_string(),
        wasm.clone().into_os_string(),
    ];
    wasm_bindgen_cli::wasm_bindgen::run_cli_with_args(args).context("wasm-bindgen failed")?;
    let tools = crate::setup::ensure_web_tools(root)?;
    let staged = stage.join(format!("{name}_bg.wasm"));
    let optimized = stage.join("optimized.wasm");
    optimize(&tools.wasm_opt, &staged, &optimized)?;
    let glue = stage.join("glue.min.js");
    minify(&tools.terser, &stage.join(format!("{name}.js")), &glue)?;
    std::fs::create_dir_all(&out_dir)?;
    std::fs::rename(&glue, out_dir.join(format!("{name}.js")))?;
    std::fs::rename(&optimized, &out_wasm)?;
    Ok(())
}

/// terser on the JS glue `js` into `out`: compressed and with local names shortened, as
/// an ES module (its exports keep their names; property names, such as the wasm's
/// imports, are never touched). 89 KB, 16.5 KB gzipped, became 37 and 10.
fn minify(terser: &Path, js: &Path, out: &Path) -> Result<()> {
    node(
        "terser",
        terser,
        js,
        &["--module", "--compress", "--mangle", "--output"],
        out,
    )
}

/// `wasm-opt -O1 -s 2` from `wasm` into `out`, with the features the wasm was built with
/// (Rust's defaults for wasm32 and the SIMD that `.cargo/config.toml` turns on). What a
/// visitor downloads is the gzipped size, and `-Oz` (like `-O2`) made the raw wasm
/// smaller but the gzipped one larger: measured on the contributor's bundle, 382 KB
/// gzipped before wasm-opt, 396 KB after `-Oz`, 377 KB after `-O1 -s 2` (its passes at
/// level 1, shrinking at level 2); LLVM has already optimized the code for speed, and
/// the browser benchmark trains as fast with either (within its run-to-run spread).
fn optimize(wasm_opt: &Path, wasm: &Path, out: &Path) -> Result<()> {
    let features = [
        "-O1",
        "-s",
        "2",
        "--enable-simd",
        "--enable-bulk-memory",
        "--enable-sign-ext",
        "--enable-mutable-globals",
        "--enable-nontrapping-float-to-int",
        "--enable-multivalue",
        "--enable-reference-types",
        "-o",
    ];
    node("wasm-opt", wasm_opt, wasm, &features, out)
}

/// Runs the npm tool `name` (`bin`) with node on `input`, then `args`, then `out`.
fn node(name: &str, bin: &Path, input: &Path, args: &[&str], out: &Path) -> Result<()> {
    let status = Command::new("node")
        .arg(bin)
        .arg(input)
        .args(args)
        .arg(out)
        .status()
        .with_context(|| format!("running {name} (node)"))?;
    if !status.success() {
        bail!("{name} failed ({status}) on {}", input.display());
    }
    Ok(())
}

fn is_newer(a: &Path, b: &Path) -> bool {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    matches!((m(a), m(b)), (Some(x), Some(y)) if x >= y)
}
