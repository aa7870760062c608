//! `cargo xtask ledger verify FILE [--credits] [--count N] [--head HEX]`: checks a task's
//! ledger file (from the server's `--ledger-dir`, or `GET /api/tasks/{task}/ledger/file`)
//! as docs/protocol.md ("The ledger file") defines it, and with `--credits` recomputes the
//! credits from it ("Credits"), so that nobody has to trust the server's numbers. With
//! `--count N`, over the first N entries only, and it prints entry N - 1's hash: the
//! server's `/credits` answer is computed at a `count` and names its `head`, while the
//! file downloaded after it holds the receipts that came since. With `--head`, a head the
//! server signed (a ledger page's `signed_head`, or one a peer kept) must be in the file:
//! a file served with history cut or rebuilt is valid on its own, and only a head signed
//! before tells.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use shoal_shared::learn::identity::hex;
use shoal_shared::trust::{credits, ledger};

const USAGE: &str = "usage: cargo xtask ledger verify FILE [--credits] [--count N] [--head HEX]";
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
    let mut head: Option<String> = None;
    let mut count: Option<u64> = None;
    let mut rest = args[1..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--credits" => with_credits = true,
            "--count" => {
                let n = rest.next().context("--count needs a number of entries")?;
                count = Some(
                    n.parse()
                        .with_context(|| format!("--count {n:?}: not a number of entries"))?,
                );
                with_credits = true;
            }
            "--head" => {
                head = Some(
                    rest.next()
                        .context("--head needs a signed head (hex)")?
                        .clone(),
                )
            }
            o if o.starts_with('-') => {
                bail!("unknown option {o} (expected --credits, --count or --head)")
            }
            f if file.is_none() => file = Some(f.into()),
            f => bail!("one FILE only (got {f:?} too; {USAGE})"),
        }
    }
    let file = file.context(USAGE)?;
    let mut out = verify(&file, with_credits, count)?;
    if let Some(head) = head {
        out.push_str(&holds_head(&file, &head)?);
    }
    print!("{out}");
    Ok(())
}

/// Checks that the ledger at `path` (already verified) holds the signed head `head_hex`:
/// the signature is the server's (the key it names, printed for the auditor to compare
/// with the one they expect), the task is the file's, and the file's entry `count - 1`
/// has the head's hash. The report line, or an error saying what is missing.
pub(crate) fn holds_head(path: &Path, head_hex: &str) -> Result<String> {
    use shoal_shared::trust::head::SignedHead;
    let bytes = shoal_shared::protocol::from_hex(head_hex.trim())
        .context("--head: not hex (a ledger page's signed_head)")?;
    let h = SignedHead::decode(&bytes).map_err(|e| anyhow::anyhow!("--head: {e}"))?;
    let file = std::fs::read(path).with_context(|| format!("could not read {}", path.display()))?;
    let (v, _) = ledger::read(&file);
    if h.task != v.task {
        bail!("--head is of task {:?}, the file of {:?}", h.task, v.task);
    }
    let index = h.count - 1;
    let end = v.start + v.entries.len() as u64;
    let held = index
        .checked_sub(v.start)
        .and_then(|i| v.entries.get(i as usize))
        .map(|e| e.hash);
    match held {
        Some(hash) if hash == h.hash => Ok(format!(
            "  holds the head server {} signed at {} entries (at {} ms)\n",
            hex(&h.server),
            h.count,
            h.time_ms
        )),
        Some(_) => bail!(
            "{}: entry {index} is not the one server {} signed (another hash): the history \
             was rewritten after it signed it",
            path.display(),
            hex(&h.server)
        ),
        None if index >= end => bail!(
            "{}: ends at {end} entries, before entry {index} that server {} signed a head \
             at: either this copy is older than the head (take the head first, then \
             download the file) or the history was cut",
            path.display(),
            hex(&h.server)
        ),
        None => bail!(
            "{}: starts at entry {}, after entry {index} that server {} signed a head at: \
             another segment of the ledger",
            path.display(),
            v.start,
            hex(&h.server)
        ),
    }
}

/// Verifies the ledger at `path`: the report to print when it is valid to its end, or an
/// error naming the first bad entry (index, byte offset, reason). `with_credits`: the
/// credits too, over the ledger's first `count` entries where given (with entry
/// `count - 1`'s hash, the head a `/credits` answer at that count names), else over all.
pub(crate) fn verify(path: &Path, with_credits: bool, count: Option<u64>) -> Result<String> {
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
        let end = v.start + v.entries.len() as u64;
        let upto = match count {
            None => v.entries.len(),
            Some(n) if n > v.start && n <= end => {
                let upto = (n - v.start) as usize;
                let _ = writeln!(
                    out,
                    "  at {n} entries the head is {} (a /credits answer with that count must name it)",
                    hex(&v.entries[upto - 1].hash)
                );
                upto
            }
            Some(n) => bail!(
                "--count {n}: {} holds entries {} to {} (a count is of the ledger's first \
                 entries, its last entry's index plus one)",
                path.display(),
                v.start,
                end.saturating_sub(1)
            ),
        };
        let start = Instant::now();
        let c = credits::compute(&v.entries[..upto]);
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
        let mut heads = Vec::new();
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
            heads.push(hex(&l.head()));
        }
        let path = l.path().to_path_buf();
        let head = hex(&l.head());
        drop(l);

        let out = verify(&path, true, None).expect("valid");
        assert!(
            out.contains(&format!("4 entries, head {head}, valid")),
            "{out}"
        );
        assert!(out.contains(&hex(&key(2).public())[..16]), "{out}");
        assert!(out.contains("example.org"), "{out}");
        assert!(out.contains("1280"), "two rounds of 640: {out}");
        // A /credits answer computed at 2 entries (round 5 only) is checked against the
        // file downloaded after it: its credit, and the head it names.
        let at_two = verify(&path, true, Some(2)).expect("valid");
        assert!(
            at_two.contains(&format!("at 2 entries the head is {}", heads[1])),
            "{at_two}"
        );
        assert!(
            at_two.contains(" 640 ") && !at_two.contains("1280"),
            "{at_two}"
        );
        for beyond in [0, 5] {
            let e = verify(&path, true, Some(beyond)).expect_err("no such count");
            assert!(e.to_string().contains("holds entries 0 to 3"), "{e}");
        }

        // A byte of the third entry's receipt altered: the error names entry 2.
        let mut bytes = std::fs::read(&path).expect("file");
        let entry_len = (bytes.len() - ledger::header("digits").len()) / 4;
        let at = ledger::header("digits").len() + 2 * entry_len + 60;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let e = verify(&path, false, None).expect_err("invalid").to_string();
        let offset = ledger::header("digits").len() + 2 * entry_len;
        assert!(e.contains(&format!("entry 2 at byte {offset}")), "{e}");
        assert!(e.contains("the 2 entries before it are valid"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file that verifies on its own but was cut, or rebuilt, after the server signed
    /// a head is caught with `--head`; the whole one holds it.
    #[test]
    fn a_cut_or_rebuilt_ledger_does_not_hold_the_head_the_server_signed() {
        let dir = std::env::temp_dir().join(format!("shoal-xtask-head-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let key = |seed: u8| Identity::from_seed([seed; 32]);
        let write = |dir: &Path, rounds: &[u64]| {
            let (mut l, _) = LedgerFile::open(dir, "digits", 1).expect("open");
            for &round in rounds {
                let r = Receipt::sign(
                    &key(1),
                    "digits",
                    round,
                    key(2).public(),
                    640,
                    sha256(b"u"),
                    0,
                );
                l.append(round * 100, 4, "", &r.encode()).expect("append");
            }
            (l.path().to_path_buf(), l.count(), l.head())
        };
        let (path, count, hash) = write(&dir, &[5, 6, 7, 8]);
        let server = key(9);
        let signed = |count, hash| {
            hex(
                &shoal_shared::trust::head::SignedHead::sign(&server, "digits", count, hash, 1)
                    .encode(),
            )
        };
        let head = signed(count, hash);
        assert!(
            holds_head(&path, &head)
                .expect("held")
                .contains("at 4 entries")
        );
        // Cut to three entries: valid alone, and not holding the head.
        let cut = dir.join("cut");
        let (cut_path, ..) = write(&cut, &[5, 6, 7]);
        verify(&cut_path, false, None).expect("valid alone");
        let e = holds_head(&cut_path, &head).expect_err("cut").to_string();
        assert!(e.contains("or the history was cut"), "{e}");
        // Rebuilt with another fourth entry.
        let other = dir.join("other");
        let (other_path, ..) = write(&other, &[5, 6, 7, 9]);
        let e = holds_head(&other_path, &head)
            .expect_err("rewritten")
            .to_string();
        assert!(e.contains("was rewritten"), "{e}");
        // A head whose signature does not hold is refused.
        let mut forged = shoal_shared::protocol::from_hex(&head).expect("hex");
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(holds_head(&path, &hex(&forged)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
