//! The demo text task's corpus: the English fortune-cookie files of Debian's `fortunes`
//! package (BSD licence, Debian main), fetched with `apt-get download` at a pinned
//! version, checked against a pinned SHA-256, and written once as one UTF-8 file,
//! `data/text/fortunes.txt` (about 2.5 MB).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

/// The package and version `apt-get download` fetches.
const PACKAGE: &str = "fortunes=1:1.99.1-7.3";
/// Its file name in the download folder (apt escapes the epoch's colon).
const DEB: &str = "fortunes_1%3a1.99.1-7.3_all.deb";
/// SHA-256 of that `.deb` (Debian's `Packages` index states the same).
const DEB_SHA256: &str = "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5";
/// Where the fortune files sit inside the package.
const DIR: &str = "./usr/share/games/fortunes/";
/// Files left out: pictures drawn in characters are not English text.
const SKIP: [&str; 1] = ["ascii-art"];
/// The corpus, relative to the workspace root (the server's `data/` folder).
pub(crate) const FILE: &str = "data/text/fortunes.txt";

/// Makes sure the corpus exists; downloads and assembles it only when it does not.
pub(crate) fn prepare(root: &Path) -> Result<PathBuf> {
    let out = root.join(FILE);
    if out.exists() {
        return Ok(out);
    }
    let deb = fetch_deb(&root.join("data/cache"))?;
    let tar = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb)
        .output()
        .context("could not run dpkg-deb")?;
    ensure!(
        tar.status.success(),
        "dpkg-deb --fsys-tarfile {} failed: {}",
        deb.display(),
        String::from_utf8_lossy(&tar.stderr)
    );
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut archive = tar::Archive::new(tar.stdout.as_slice());
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let Some(name) = path.strip_prefix(DIR) else {
            continue;
        };
        // The text files have no extension; `.dat` are indexes, `.u8` links.
        if name.is_empty() || name.contains(['.', '/']) || SKIP.contains(&name) {
            continue;
        }
        if !entry.header().entry_type().is_file() {
            continue;
        }
        ensure!(entry.size() < 16 << 20, "{path} is implausibly large");
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        files.push((name.to_string(), bytes));
    }
    files.sort();
    ensure!(
        files.len() >= 30,
        "only {} fortune files in {DEB}",
        files.len()
    );
    // Entries are separated by a line holding `%`; a blank line separates them here.
    let mut text = String::new();
    for (name, bytes) in &files {
        let body = std::str::from_utf8(bytes).with_context(|| format!("{name} is not UTF-8"))?;
        for line in body.lines() {
            if line != "%" {
                text.push_str(line.trim_end());
            }
            text.push('\n');
        }
    }
    ensure!(
        text.len() > 1 << 20,
        "the corpus is only {} bytes",
        text.len()
    );
    std::fs::create_dir_all(out.parent().expect("FILE has a folder"))?;
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &text)?;
    std::fs::rename(&tmp, &out)?;
    eprintln!(
        "xtask: demo text ready in {} ({} bytes from {} files of {PACKAGE})",
        out.display(),
        text.len(),
        files.len()
    );
    Ok(out)
}

/// Downloads the pinned `.deb` with `apt-get download` (no root needed) unless cached,
/// and checks its SHA-256.
fn fetch_deb(cache: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(cache)?;
    let path = cache.join(DEB);
    if !path.exists() {
        let download = || {
            crate::run_cmd(
                Command::new("apt-get")
                    .args(["download", "-q", PACKAGE])
                    .current_dir(cache),
            )
        };
        if download().is_err() {
            // A fresh machine may have no package index yet.
            ensure!(
                crate::setup::is_root(),
                "apt-get download {PACKAGE} failed; run `sudo apt-get update` and try again"
            );
            crate::run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
            download().context("apt-get download fortunes failed after apt-get update")?;
        }
    }
    let mut bytes = Vec::new();
    std::fs::File::open(&path)?.read_to_end(&mut bytes)?;
    let actual: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if actual != DEB_SHA256 {
        std::fs::remove_file(&path)?;
        bail!(
            "{} does not match its pinned hash (expected sha256 {DEB_SHA256}, got {actual}); removed it, run again",
            path.display()
        );
    }
    Ok(path)
}
