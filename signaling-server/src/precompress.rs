//! Task data and the site gzip-compressed once, not per request: the demo's training
//! images are 6.3 MB, and compressing them for every download cost about 145 ms of CPU
//! each, enough for 16 downloading clients to delay every peer's signaling; the site's
//! wasm bundle is 1.2 MB, and anyone could make the server compress it again and again.
//! At start the server writes `NAME.gz` beside each file that lacks an up-to-date one;
//! the file service sends it to clients that accept gzip, with its length, and the
//! compression layer leaves it alone. A site file changed while the server runs (a
//! rebuilt bundle) is newer than its `.gz`: [`fresh_gzip_only`] keeps that `.gz` from
//! being sent, and the file is compressed per request until the next start.

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

/// Middleware for a directory served with its precompressed `.gz` files under `root`:
/// where the requested file is newer than its `.gz` (it changed since the server
/// started), the request goes on without `Accept-Encoding`, so the stale `.gz` is not
/// what the client gets (the compression layer outside still compresses the file).
pub async fn fresh_gzip_only(
    axum::extract::State(root): axum::extract::State<std::sync::Arc<std::path::PathBuf>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request
        .headers()
        .contains_key(axum::http::header::ACCEPT_ENCODING)
        && !gz_is_fresh(&root, request.uri().path())
    {
        request
            .headers_mut()
            .remove(axum::http::header::ACCEPT_ENCODING);
    }
    next.run(request).await
}

/// Whether the `.gz` of the file at URL `path` under `root`, if there is one, is at least
/// as new as the file. A path this cannot map plainly (escapes, `..`) counts as stale:
/// the file service decides what it is, and sends it uncompressed at worst.
fn gz_is_fresh(root: &Path, path: &str) -> bool {
    let rel = path.trim_start_matches('/');
    if rel.contains('%') || rel.split('/').any(|c| c == ".." || c == ".") {
        return false;
    }
    let mut file = root.join(rel);
    if path.ends_with('/') || file.is_dir() {
        file = file.join("index.html");
    }
    let mut gz = file.as_os_str().to_owned();
    gz.push(".gz");
    match std::fs::metadata(&gz) {
        Err(_) => true,
        Ok(g) => std::fs::metadata(&file)
            .and_then(|f| Ok(g.modified()? >= f.modified()?))
            .unwrap_or(false),
    }
}
