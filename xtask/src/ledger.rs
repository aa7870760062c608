//! `cargo xtask ledger verify FILE [--credits]`: checks a task's ledger file (from the
//! server's `--ledger-dir`, or `GET /api/tasks/{task}/ledger/file`) as docs/protocol.md
//! ("The ledger file") defines it, and with `--credits` recomputes the credits from it
//! ("Credits"), so that nobody has to trust the server's numbers.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use shoal_shared::learn::identity::hex;
use shoal_shared::trust::{credits, ledger};

const USAGE: &str = "usage: cargo xtask ledger verify FILE [--credits]";
/// How many keys and sites `--credits` lists.
const TOP: usize = 20;

pub(crate) fn run(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("verify") => {}
        Some(other) => bail!("no ledger command {other:?} ({USAGE})"),
        None => bail!("{USAGE}"),
    }
    let mut file: Option<PathBuf> = None;
    let mut with_credits = false;
    for a in &args[1..] {
        match a.as_str() {
            "--credits" => with_credits = true,
            o if o.starts_with('-') => bail!("unknown option {o} (expected --credits)"),
            f if file.is_none() => file = Some(f.into()),
            f => bail!("one FILE only (got {f:?} too; {USAGE})"),
        }
    }
    let file = file.context(USAGE)?;
    print!("{}", verify(&file, with_credits)?);
    Ok(())
}

/// Verifies the ledger at `path`: the report to print when it is valid to its end, or an
/// error naming the first bad entry (index, byte offset, reason).
pub(crate) fn verify(path: &Path, with_credits: bool) -> Result<String> {
    let bytes =
        std::fs::read(path).with_context(|| format!("could not read {}", path.display()))?;
    let start = Instant::now();
    let (v, error) = ledger::read(&bytes);
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if let Some(e) = error {
        bail!(
            "{}: not valid: {e} (the {} entries before it are valid: {} of {} bytes, head {}; \
             verified in {ms:.1} ms)",
            path.display(),
            v.entries.len(),
            v.good_len,
            bytes.len(),
            hex(&v.head)
        );
    }
    let mut out = format!(
        "{}: {} entries, head {}, valid\n  task {:?}, {} bytes, verified in {ms:.1} ms\n",
        path.display(),
        v.entries.len(),
        hex(&v.head),
        v.task,
        bytes.len()
    );
    if v.start > 0 && v.entries.is_empty() {
        // A segment just begun (the live file right after a rotation).
        let _ = writeln!(
            out,
            "  a segment with no entries yet, continuing the ledger after entry {}",
            v.start - 1
        );
    } else if v.start > 0 {
        // One segment of a longer ledger: its chain is checked from where it continues.
        let _ = writeln!(
            out,
            "  a segment: entries {} to {}, continuing the ledger before it (credits cover this segment only)",
            v.start,
            v.start + v.entries.len() as u64 - 1
        );
    }
    if with_credits {
        let start = Instant::now();
        let c = credits::compute(&v.entries);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let _ = writeln!(
            out,
            "credits ({} keys, {} sites; computed in {ms:.1} ms)",
            c.by_key.len(),
            c.by_site.len()
        );
        let _ = writeln!(
            out,
            "  {:>4}  {:<16}  {:>12}  {:>8}",
            "rank", "key", "credit", "rounds"
        );
        for (i, k) in c.by_key.iter().take(TOP).enumerate() {
            let _ = writeln!(
                out,
                "  {:>4}  {:<16}  {:>12}  {:>8}",
                i + 1,
                &hex(&k.key)[..16],
                k.credit,
                k.rounds
            );
        }
        let _ = writeln!(out, "  {:>4}  {:<32}  {:>12}", "rank", "site", "credit");
        for (i, s) in c.by_site.iter().take(TOP).enumerate() {
            let site = if s.site.is_empty() { "(none)" } else { &s.site };
            let _ = writeln!(out, "  {:>4}  {:<32}  {:>12}", i + 1, site, s.credit);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_shared::learn::identity::Identity;
    use shoal_shared::trust::ledger::LedgerFile;
    use shoal_shared::trust::receipt::{Receipt, sha256};

    #[test]
    fn a_valid_ledger_verifies_and_a_flipped_byte_names_its_entry() {
        let dir = std::env::temp_dir().join(format!("shoal-xtask-ledger-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut l, _) = LedgerFile::open(&dir, "digits", 1).expect("open");
        let key = |seed: u8| Identity::from_seed([seed; 32]);
        for (round, receiver) in [(5, 1), (5, 3), (6, 1), (6, 3)] {
            let r = Receipt::sign(
                &key(receiver),
                "digits",
                round,
                key(2).public(),
                640,
                sha256(b"u"),
                0,
            );
            l.append(round * 100, 4, "example.org", &r.encode())
                .expect("append");
        }
        let path = l.path().to_path_buf();
        let head = hex(&l.head());
        drop(l);

        let out = verify(&path, true).expect("valid");
        assert!(
            out.contains(&format!("4 entries, head {head}, valid")),
            "{out}"
        );
        assert!(out.contains(&hex(&key(2).public())[..16]), "{out}");
        assert!(out.contains("example.org"), "{out}");
        assert!(out.contains("1280"), "two rounds of 640: {out}");

        // A byte of the third entry's receipt altered: the error names entry 2.
        let mut bytes = std::fs::read(&path).expect("file");
        let entry_len = (bytes.len() - ledger::header("digits").len()) / 4;
        let at = ledger::header("digits").len() + 2 * entry_len + 60;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let e = verify(&path, false).expect_err("invalid").to_string();
        let offset = ledger::header("digits").len() + 2 * entry_len;
        assert!(e.contains(&format!("entry 2 at byte {offset}")), "{e}");
        assert!(e.contains("the 2 entries before it are valid"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
