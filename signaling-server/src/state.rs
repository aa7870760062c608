//! What the server must remember across restarts: which tasks the researcher paused.
//! One small JSON file (`{"paused": ["digits"]}`), replaced atomically on every change
//! (temporary file, fsync, rename, fsync of the folder), so that a crash at any moment
//! leaves either the old state or the new one.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    paused: Vec<String>,
}

/// The paused tasks recorded in `path`; none if the file does not exist yet. A file that
/// cannot be read or parsed is an error (naming the file): guessing "running" would undo
/// the researcher's pause.
pub fn load_paused(path: &Path) -> Result<Vec<String>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let state: StateFile =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(state.paused)
}

/// Records `paused` in `path`, atomically.
pub fn save_paused(path: &Path, paused: &[String]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp"));
    let text = serde_json::to_string(&StateFile {
        paused: paused.to_vec(),
    })
    .map_err(std::io::Error::other)?;
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename itself must reach the disk.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_broken_file_is_an_error() {
        let dir = std::env::temp_dir().join(format!("shoal-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.json");
        let _ = std::fs::remove_file(&path);
        assert_eq!(load_paused(&path), Ok(vec![]), "no file: nothing paused");
        save_paused(&path, &["digits".into()]).expect("save");
        assert_eq!(load_paused(&path), Ok(vec!["digits".to_string()]));
        save_paused(&path, &[]).expect("save");
        assert_eq!(load_paused(&path), Ok(vec![]));
        std::fs::write(&path, "{\"paused\": 3}").expect("write");
        let e = load_paused(&path).expect_err("broken");
        assert!(e.contains("state.json"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
