//! Task data and the site gzip-compressed once, not per request: the demo's training
//! images are 6.3 MB, and compressing them for every download cost about 145 ms of CPU
//! each, enough for 16 downloading clients to delay every peer's signaling; the site's
//! wasm bundle is 1.2 MB, and anyone could make the server compress it again and again.
//! At start the server writes `NAME.gz` beside each file that lacks an up-to-date one;
//! the file service sends it to clients that accept gzip, with its length, and the
//! compression layer leaves it alone. Each `.gz` takes its file's modification time; a
//! site file whose time differs since (a rebuilt bundle) goes uncompressed until the
//! next start ([`fresh_gzip_only`]), never from its stale `.gz`.

use std::io::Write;
use std::path::Path;

/// Files smaller than this are sent as they are.
const MIN_BYTES: u64 = 1024;

/// Writes an up-to-date `.gz` beside every file of at least 1 KiB under `dir`
/// (recursively, at most 4 levels), except files that are already compressed. Returns
/// how many were written. Files it cannot write are skipped with a warning (they are then
/// sent uncompressed: [`fresh_gzip_only`]).
pub fn precompress(dir: &Path) -> usize {
    let mut written = 0;
    walk(dir, 4, &mut written);
    written
}

/// Writes the `.gz` of each of `files` (paths relative to `root`) where it is missing or
/// stale, as [`precompress`] does for a whole folder; returns how many it wrote. The
/// data folder's: only the files tasks name are served from it, so only those are read
/// and compressed (a researcher's other files there, of any size, were read whole and
/// compressed at every start).
pub fn precompress_files(root: &Path, files: &[&str]) -> usize {
    let mut written = 0;
    for f in files {
        let path = root.join(f);
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.is_file()
        {
            compress_one(&path, &meta, &mut written);
        }
    }
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
        compress_one(&path, &meta, written);
    }
}

/// Writes the `.gz` of the file at `path` unless it is compressed already, hidden,
/// partial, small, or its `.gz` is fresh.
fn compress_one(path: &Path, meta: &std::fs::Metadata, written: &mut usize) {
    let compressed = path.extension().is_some_and(|e| {
        ["gz", "tgz", "zip", "png", "jpg", "br"].contains(&e.to_string_lossy().as_ref())
    });
    // A file being written (this server's or another's temporary, or a download's) is
    // not served compressed: its `.gz` would outlive it.
    let partial = path.extension().is_some_and(|e| e == "tmp");
    let hidden = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
    if compressed || hidden || partial || meta.len() < MIN_BYTES {
        return;
    }
    let mut gz_name = path.as_os_str().to_owned();
    gz_name.push(".gz");
    let gz = std::path::PathBuf::from(gz_name);
    if is_fresh(path, &gz) {
        return;
    }
    match compress(path, &gz) {
        Ok(()) => *written += 1,
        Err(e) => tracing::warn!(
            "could not write {}: {e} (it will be compressed per request)",
            gz.display()
        ),
    }
}

/// Whether `gz` is the compressed copy of `file` as it is now: a `.gz` takes its file's
/// modification time when written, and any other time (older or newer: a file put in
/// place with its own earlier time by `rsync -t`, `cp -p`, `tar` or a rename) means
/// the file changed since.
fn is_fresh(file: &Path, gz: &Path) -> bool {
    modified(gz).is_ok_and(|g| same_time(file, g))
}

fn modified(p: &Path) -> std::io::Result<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified())
}

/// Whether `file`'s modification time is `time`.
fn same_time(file: &Path, time: std::time::SystemTime) -> bool {
    modified(file).is_ok_and(|f| f == time)
}

/// Compresses `src` into `dst` through a temporary file (named for this process and
/// write: two servers starting on one folder do not write into each other's) and a
/// rename, so that a client never gets half a file; `dst` takes `src`'s modification
/// time ([`is_fresh`]).
fn compress(src: &Path, dst: &Path) -> std::io::Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let modified = std::fs::metadata(src)?.modified()?;
    let data = std::fs::read(src)?;
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dst.with_extension(format!("gz.{}-{n}.tmp", std::process::id()));
    let written = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut enc = flate2::write::GzEncoder::new(file, flate2::Compression::best());
        enc.write_all(&data)?;
        let file = enc.finish()?;
        file.set_modified(modified)?;
        file.sync_all()
    })();
    match written.and_then(|()| std::fs::rename(&tmp, dst)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The folders whose precompressed `.gz` files are served: the site's, at `/`, and the
/// data's, at `/data/`.
#[derive(Clone, Debug)]
pub struct Roots {
    /// The site (`--www`).
    pub www: std::path::PathBuf,
    /// The task data (`--data`).
    pub data: std::path::PathBuf,
}

/// Middleware for the site and the data, served with their precompressed `.gz` files,
/// placed outside the compression layer: where the requested file is not exactly as its
/// `.gz` was made ([`is_fresh`]: it changed since the server started, or it is gone and
/// only a stray `.gz` is left), or the path is not one this maps plainly to a file
/// (escapes, `.` or `..`, a trailing `/` after a file), the request goes on without
/// `Accept-Encoding`: the client gets the file as it is, uncompressed (or a 404 for a
/// file that is not there), never a stale `.gz`, and the server compresses nothing for it.
pub async fn fresh_gzip_only(
    axum::extract::State(roots): axum::extract::State<std::sync::Arc<Roots>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = request.uri().path();
    let fresh = match path.strip_prefix("/data/") {
        Some(rest) => gz_is_fresh(&roots.data, rest),
        None => gz_is_fresh(&roots.www, path),
    };
    if request
        .headers()
        .contains_key(axum::http::header::ACCEPT_ENCODING)
        && !fresh
    {
        request
            .headers_mut()
            .remove(axum::http::header::ACCEPT_ENCODING);
    }
    next.run(request).await
}

/// Whether the `.gz` of the file at URL `path` under `root`, if there is one, is its
/// file as it is now. A file without one is fresh only when it is smaller than
/// [`MIN_BYTES`] (compressed per request, cheaply) or missing (a short 404): a larger
/// one is either compressed already (an image, an archive, a `.gz` asked for by name),
/// or came after the start, and compressing it per request is the work anyone could
/// make the server do again and again.
fn gz_is_fresh(root: &Path, path: &str) -> bool {
    let rel = path.trim_start_matches('/');
    if rel.contains('%') || rel.split('/').any(|c| c == ".." || c == ".") {
        return false;
    }
    let mut file = root.join(rel.trim_end_matches('/'));
    if file.is_dir() {
        file = file.join("index.html");
    } else if path.ends_with('/') {
        return false;
    }
    let mut gz = file.as_os_str().to_owned();
    gz.push(".gz");
    match modified(Path::new(&gz)) {
        Ok(g) => same_time(&file, g),
        Err(_) => std::fs::metadata(&file).map_or(true, |m| m.len() < MIN_BYTES),
    }
}
