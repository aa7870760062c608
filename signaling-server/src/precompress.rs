//! Task data gzip-compressed once, not per request: the demo's training images are
//! 6.3 MB, and compressing them for every download cost about 145 ms of CPU each, enough
//! for 16 downloading clients to delay every peer's signaling. At start the server writes
//! `NAME.gz` beside each file that lacks an up-to-date one; the file service sends it to
//! clients that accept gzip, with its length, and the compression layer leaves it alone.

use std::io::Write;
use std::path::Path;

/// Files smaller than this are sent as they are.
const MIN_BYTES: u64 = 1024;

/// Writes an up-to-date `.gz` beside every file of at least 1 KiB under `dir`
/// (recursively, at most 4 levels), except files that are already compressed. Returns
/// how many were written. Files it cannot write are skipped with a warning (they are then
/// compressed per request, as before).
pub fn precompress(dir: &Path) -> usize {
    let mut written = 0;
    walk(dir, 4, &mut written);
    written
}

fn walk(dir: &Path, depth: usize, written: &mut usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            if depth > 0 {
                walk(&path, depth - 1, written);
            }
            continue;
        }
        let compressed = path.extension().is_some_and(|e| {
            ["gz", "tgz", "zip", "png", "jpg", "br"].contains(&e.to_string_lossy().as_ref())
        });
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if compressed || hidden || meta.len() < MIN_BYTES {
            continue;
        }
        let mut gz_name = path.as_os_str().to_owned();
        gz_name.push(".gz");
        let gz = std::path::PathBuf::from(gz_name);
        let fresh = std::fs::metadata(&gz)
            .and_then(|g| Ok(g.modified()? >= meta.modified()?))
            .unwrap_or(false);
        if fresh {
            continue;
        }
        match compress(&path, &gz) {
            Ok(()) => *written += 1,
            Err(e) => tracing::warn!(
                "could not write {}: {e} (it will be compressed per request)",
                gz.display()
            ),
        }
    }
}

/// Compresses `src` into `dst` through a temporary file and a rename, so that a client
/// never gets half a file.
fn compress(src: &Path, dst: &Path) -> std::io::Result<()> {
    let data = std::fs::read(src)?;
    let tmp = dst.with_extension("gz.tmp");
    {
        let file = std::fs::File::create(&tmp)?;
        let mut enc = flate2::write::GzEncoder::new(file, flate2::Compression::best());
        enc.write_all(&data)?;
        enc.finish()?.sync_all()?;
    }
    std::fs::rename(&tmp, dst)
}
