//! A keeper's checkpoints: the swarm's model on disk, so that it survives when every
//! browser has left. Each checkpoint is a model message (weights, outer momentum, round,
//! SHA-256), written atomically: a temporary file, fsync, rename, fsync of the directory.
//! A crash mid-write leaves a `.tmp` file that is ignored and removed; a damaged
//! checkpoint fails its checksum and the next older one is used. The keeper touches
//! only its own files (`model-ROUND.ckpt`, `model.safetensors`, their `.tmp`, and
//! `shoal-keeper`, which binds the folder to one task's model): a folder it shares with
//! other programs keeps their files, and a folder of another task is refused.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_shared::learn::{PeerMessage, Snapshot};

/// Checkpoints kept; older ones are deleted after each successful write.
const KEEP: usize = 3;

/// A directory of checkpoints.
pub struct Keeper {
    dir: PathBuf,
    /// The folder's lock (`shoal-keeper.lock`), held while the keeper lives.
    _lock: fs::File,
    /// Test hook: pause this long half-way through writing (so that a test can kill the
    /// process mid-write). Zero in normal use.
    pub pause_mid_write: Duration,
}

/// The round a checkpoint's file name says (`model-ROUND.ckpt`; `None` for any other
/// name).
fn round_of(p: &Path) -> Option<u64> {
    p.file_name()
        .and_then(|s| s.to_str())
        .and_then(|s| s.strip_prefix("model-"))
        .and_then(|s| s.strip_suffix(".ckpt"))
        .filter(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|r| r.parse::<u64>().ok())
}

/// Whether `p` is a temporary file of the keeper's own (a checkpoint's or the export's).
fn own_temporary(p: &Path) -> bool {
    let Some(name) = p.file_name().and_then(|s| s.to_str()) else {
        return false;
    };
    name.strip_suffix(".tmp")
        .is_some_and(|f| f == "model.safetensors" || round_of(Path::new(f)).is_some())
}

/// The file that binds a keeper's folder to one task's model.
const BINDING: &str = "shoal-keeper";

impl Keeper {
    /// Opens (creating) `dir` for the model `binding` names (a task's name and a hash of
    /// its model: see [`binding`]), and removes temporary files of its own a crash left
    /// behind. A folder bound to another model is refused: its checkpoints, of the same
    /// size, would be resumed and exported as this task's.
    pub fn open(dir: &Path, binding: &str) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        // One keeper a folder: a second one removed the first's checkpoint being written
        // (as a crash's leftover) and its rename failed, ending that peer.
        let lock_path = dir.join(format!("{BINDING}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "another shoal-peer keeps its checkpoints in {}: give each keeper a folder of its own",
                        dir.display()
                    ),
                ));
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        let bound = dir.join(BINDING);
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", bound.display()));
        // A folder of its own, new or from before folders were bound: claimed at once (of
        // two keepers starting together, one writes and the other reads it).
        let claimed = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&bound)
            .and_then(|mut f| {
                f.write_all(format!("{binding}\n").as_bytes())?;
                f.sync_all()
            });
        match claimed {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let b = fs::read_to_string(&bound).map_err(named)?;
                if b.trim().is_empty() {
                    // Claimed by a keeper killed before it wrote the binding (the lock makes
                    // this the only keeper here): claimed again, written aside and renamed.
                    // Refused, the folder's checkpoints were to be moved away.
                    replace_durably(&bound, |f| f.write_all(format!("{binding}\n").as_bytes()))
                        .map_err(named)?;
                } else if b.trim_end() != binding {
                    return Err(io::Error::other(format!(
                        "{} keeps the checkpoints of another model ({:?}; this one is {binding}): \
                         give each task a keeper folder of its own; where this task's model \
                         changed (its layers or seed), move its model-*.ckpt and {BINDING} \
                         away to start afresh",
                        dir.display(),
                        b.trim_end()
                    )));
                }
            }
            Err(e) => return Err(named(e)),
        }
        for e in fs::read_dir(dir)? {
            let p = e?.path();
            if own_temporary(&p) {
                fs::remove_file(&p)?;
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            pause_mid_write: Duration::ZERO,
        })
    }

    fn checkpoints(&self) -> io::Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| round_of(p).is_some())
            .collect();
        // By the round in the name, as a number: rounds go up to 2^40, 13 digits, past
        // the names' zero padding of 12.
        let round = |p: &PathBuf| round_of(p);
        v.sort_by_key(|p| (round(p), p.clone()));
        Ok(v)
    }

    /// The newest checkpoint that decodes to a valid model of `params` parameters; the
    /// damaged ones it skips are returned with the reason.
    pub fn latest(&self, params: usize) -> io::Result<(Option<Snapshot>, Vec<String>)> {
        let mut skipped = Vec::new();
        for p in self.checkpoints()?.into_iter().rev() {
            match fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| PeerMessage::decode(&b, params).map_err(|e| e.to_string()))
            {
                Ok(PeerMessage::Model(s)) => return Ok((Some(s), skipped)),
                Ok(_) => skipped.push(format!("{}: not a model", p.display())),
                Err(e) => skipped.push(format!("{}: {e}", p.display())),
            }
        }
        Ok((None, skipped))
    }

    /// Writes the model message `bytes` for `round` atomically and prunes old ones.
    pub fn save(&self, round: u64, bytes: &[u8]) -> io::Result<PathBuf> {
        let dst = self.dir.join(format!("model-{round:012}.ckpt"));
        self.write_atomic(&dst, bytes, round)?;
        // Never the one just written; first any of a higher round than it (left by a
        // model that changed, or past newer checkpoints that were unreadable: this run
        // started below them), then the oldest.
        let (mut higher, lower): (Vec<PathBuf>, Vec<PathBuf>) = self
            .checkpoints()?
            .into_iter()
            .filter(|p| *p != dst)
            .partition(|p| round_of(p).is_some_and(|r| r > round));
        higher.extend(lower);
        for old in higher.iter().take((higher.len() + 1).saturating_sub(KEEP)) {
            fs::remove_file(old)?;
        }
        Ok(dst)
    }

    /// Replaces `model.safetensors` (the export researchers load) atomically.
    pub fn save_export(&self, bytes: &[u8]) -> io::Result<PathBuf> {
        let dst = self.dir.join("model.safetensors");
        self.write_atomic(&dst, bytes, 0)?;
        Ok(dst)
    }

    /// [`replace_durably`], with the test hook's pause half-way.
    fn write_atomic(&self, dst: &Path, bytes: &[u8], round: u64) -> io::Result<()> {
        replace_durably(dst, |f| {
            let half = bytes.len() / 2;
            f.write_all(&bytes[..half])?;
            if !self.pause_mid_write.is_zero() && round > 0 {
                f.flush()?;
                println!("checkpoint-writing {round}");
                std::thread::sleep(self.pause_mid_write);
            }
            f.write_all(&bytes[half..])
        })
    }
}

/// Replaces `dst` whole and durably: `write` fills a temporary file beside it
/// (`DST.tmp`), which is synced, renamed into place, and its folder synced. A crash
/// leaves the old file or the new one, never part of either.
pub fn replace_durably(
    dst: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let mut tmp = dst.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        // Made anew: whatever is at that name goes first (a link planted there, followed,
        // had the keeper overwrite the file it pointed to, outside the folder), and
        // `create_new` never follows a link made meanwhile.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dst)?;
    let folder = dst.parent().filter(|p| !p.as_os_str().is_empty());
    File::open(folder.unwrap_or(Path::new(".")))?.sync_all()
}

/// What binds a keeper's folder to `task`: its name and a SHA-256 of its model (the
/// model's description and the seed its weights start from) and, where the task has
/// differential privacy, of its resolved `[privacy]` numbers and whether a key may pass
/// the budget: checkpoints trained without it (or under another budget, or under `warn`)
/// are not resumed, and so not exported as trained under it.
pub fn binding(task: &shoal_shared::task::TaskSpec) -> String {
    use sha2::{Digest, Sha256};
    let model = serde_json::to_string(&task.model).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    h.update(task.train.seed.to_le_bytes());
    // The numbers the guarantee rests on, as resolved (not how the table gives them).
    if let Ok(Some(dp)) = task.privacy.resolve() {
        let numbers = format!(
            "{} {} {} {}",
            dp.clip, dp.noise_multiplier, dp.delta, dp.rounds
        );
        h.update(numbers.as_bytes());
        // Under `warn` a contributor's key may pass the budget: a folder trained so is
        // not exported as trained under `stop` (whose binding is what it always was).
        if dp.on_budget == shoal_shared::privacy::OnBudget::Warn {
            h.update(b" warn");
        }
    }
    let hash: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{} {hash}", task.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: &str = "digits 0123456789abcdef";

    /// A task that adds differential privacy (or changes its budget) binds its folder
    /// anew: the checkpoints trained without it would be resumed, and exported as
    /// trained under it. Without privacy the binding is what it always was.
    #[test]
    fn privacy_is_part_of_a_folders_binding() {
        let plain = shoal_shared::task::TaskSpec::digits();
        let mut private = plain.clone();
        private.privacy.clip = Some(1.0);
        private.privacy.noise_multiplier = Some(1.0);
        private.privacy.rounds = Some(100);
        private.privacy.delta = Some(1e-5);
        assert!(private.privacy.is_on() && private.privacy.validate().is_ok());
        let mut tighter = private.clone();
        tighter.privacy.rounds = Some(50);
        let mut warn = private.clone();
        warn.privacy.on_budget = Some(shoal_shared::privacy::OnBudget::Warn);
        let all = [
            binding(&plain),
            binding(&private),
            binding(&tighter),
            binding(&warn),
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(all[i + 1..].iter().all(|b| a != b), "{all:?}");
        }
        assert_eq!(
            binding(&plain),
            binding(&shoal_shared::task::TaskSpec::digits())
        );
    }

    /// A link planted at a checkpoint's temporary name is replaced, not followed: the
    /// keeper wrote through it, over the file it pointed to, outside its folder.
    #[cfg(unix)]
    #[test]
    fn a_link_at_a_temporary_name_is_not_written_through() {
        let dir = fresh_dir("link");
        let outside = dir.with_extension("outside");
        fs::write(&outside, "keep").expect("outside file");
        let dst = dir.join("model.safetensors");
        std::os::unix::fs::symlink(&outside, dir.join("model.safetensors.tmp")).expect("link");
        replace_durably(&dst, |f| f.write_all(b"new")).expect("replaced");
        assert_eq!(fs::read_to_string(&outside).expect("outside"), "keep");
        assert_eq!(fs::read_to_string(&dst).expect("written"), "new");
        let _ = fs::remove_file(&outside);
        let _ = fs::remove_dir_all(&dir);
    }

    /// An empty folder of this test process's own, named after `name`.
    fn fresh_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shoal-keeper-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        dir
    }

    /// One keeper a folder: a second one is refused while the first lives (it removed
    /// the first's checkpoint being written, and the first's rename then failed), and
    /// the folder is free again once the first is gone.
    #[test]
    fn a_second_keeper_of_one_folder_is_refused_while_the_first_lives() {
        let dir = fresh_dir("two");
        let first = Keeper::open(&dir, BOUND).expect("the first");
        let e = Keeper::open(&dir, BOUND)
            .map(|_| ())
            .expect_err("a second, at once");
        assert!(e.to_string().contains("another shoal-peer keeps"), "{e}");
        drop(first);
        Keeper::open(&dir, BOUND).expect("free again");
        let _ = fs::remove_dir_all(&dir);
    }

    /// A binding left empty (a keeper killed as it claimed the folder) is claimed again:
    /// refused, the operator was told to move the checkpoints away.
    #[test]
    fn an_empty_binding_is_claimed_again() {
        let dir = fresh_dir("empty");
        fs::write(dir.join(BINDING), b"").expect("an empty binding");
        let k = Keeper::open(&dir, BOUND).expect("claimed");
        assert_eq!(
            fs::read_to_string(dir.join(BINDING)).expect("read"),
            format!("{BOUND}\n")
        );
        drop(k);
        assert!(
            Keeper::open(&dir, "digits fedcba9876543210").is_err(),
            "bound now"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    /// Other programs' files in the folder are left alone: their checkpoints are not
    /// pruned or read, their temporary files not removed; a folder bound to another
    /// model is refused.
    #[test]
    fn a_keeper_touches_only_its_own_files_of_its_own_model() {
        let dir = std::env::temp_dir().join(format!("shoal-keeper-own-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        for other in ["last.ckpt", "epoch=3.ckpt", "notes.tmp", "model-x.ckpt"] {
            fs::write(dir.join(other), b"not Shoal's").expect("write");
        }
        let k = Keeper::open(&dir, BOUND).expect("dir");
        for r in 1..=5 {
            k.save(r, &PeerMessage::Model(snap(r)).encode())
                .expect("saved");
        }
        assert_eq!(k.latest(4).expect("readable"), (Some(snap(5)), Vec::new()));
        for other in ["last.ckpt", "epoch=3.ckpt", "notes.tmp", "model-x.ckpt"] {
            assert!(dir.join(other).exists(), "{other} kept");
        }
        drop(k);
        let e = Keeper::open(&dir, "digits fedcba9876543210")
            .err()
            .expect("another model's folder");
        assert!(e.to_string().contains("another model"), "{e}");
        assert!(Keeper::open(&dir, BOUND).is_ok(), "its own");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    fn snap(round: u64) -> Snapshot {
        Snapshot {
            round,
            weights: vec![round as f32; 4],
            momentum: vec![0.5; 4],
        }
    }

    /// Rounds go up to 2^40, 13 digits, past the names' padding of 12: the newest is
    /// still the highest round.
    #[test]
    fn checkpoints_order_by_round_past_twelve_digits() {
        let dir = std::env::temp_dir().join(format!("shoal-keeper-13-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let k = Keeper::open(&dir, BOUND).expect("dir");
        for r in [999_999_999_999, 1_000_000_000_000] {
            k.save(r, &PeerMessage::Model(snap(r)).encode())
                .expect("saved");
        }
        let latest = k.latest(4).expect("readable").0.expect("a model");
        assert_eq!(latest.round, 1_000_000_000_000);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_checkpoint_just_written_is_kept_beside_older_ones_of_higher_rounds() {
        // A folder of a task whose model has changed: its three checkpoints (rounds 980
        // to 1000) do not fit, so the keeper starts again from round 0; its round-10
        // checkpoint sorted first and was the one pruned, every time.
        let dir = std::env::temp_dir().join(format!("shoal-keeper-old-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let k = Keeper::open(&dir, BOUND).expect("dir");
        for r in [980, 990, 1_000] {
            k.save(r, &PeerMessage::Model(snap(r)).encode())
                .expect("saved");
        }
        let written = k
            .save(10, &PeerMessage::Model(snap(10)).encode())
            .expect("saved");
        assert!(written.exists(), "the new checkpoint stays");
        assert_eq!(k.checkpoints().expect("list").len(), KEEP);
        // The stale ones of higher rounds go first: after two more saves the run's three
        // are what is left, and the newest is what a restart reads.
        for r in [20, 30] {
            k.save(r, &PeerMessage::Model(snap(r)).encode())
                .expect("saved");
        }
        let names: Vec<String> = k
            .checkpoints()
            .expect("list")
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            names,
            [
                "model-000000000010.ckpt",
                "model-000000000020.ckpt",
                "model-000000000030.ckpt"
            ]
        );
        assert_eq!(k.latest(4).expect("readable").0, Some(snap(30)));
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn newest_valid_checkpoint_wins_and_damage_is_skipped() {
        let dir = std::env::temp_dir().join(format!("shoal-keeper-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let k = Keeper::open(&dir, BOUND).expect("dir");
        assert_eq!(k.latest(4).expect("readable").0, None);
        for r in 1..=5 {
            k.save(r, &PeerMessage::Model(snap(r)).encode())
                .expect("saved");
        }
        assert_eq!(
            k.checkpoints().expect("list").len(),
            KEEP,
            "old ones pruned"
        );
        assert_eq!(k.latest(4).expect("readable").0, Some(snap(5)));
        // Damage the newest: the one before it is used, and the damage is reported.
        let newest = k.checkpoints().expect("list").pop().expect("one");
        let mut b = fs::read(&newest).expect("read");
        b[20] ^= 0xff;
        fs::write(&newest, b).expect("write");
        let (s, skipped) = k.latest(4).expect("readable");
        assert_eq!(s, Some(snap(4)));
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        // A leftover temporary file is removed on open and never read.
        fs::write(dir.join("model-000000000009.ckpt.tmp"), b"half").expect("write");
        drop(k);
        let k = Keeper::open(&dir, BOUND).expect("dir");
        assert!(!dir.join("model-000000000009.ckpt.tmp").exists());
        assert_eq!(k.latest(4).expect("readable").0, Some(snap(4)));
        // Another model size is refused.
        assert_eq!(k.latest(5).expect("readable").0, None);
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
