//! The ledger: one append-only file per task in which the server chains the receipts it
//! accepted, so that it cannot rewrite them unnoticed (see "The ledger file" in
//! docs/protocol.md). Integers little-endian:
//!
//! ```text
//! file   = "shoal-ledger-v1 " task "\n" [ "continues " index " " prev_hex "\n" ] entry*
//! entry  = len:u32 body[len] hash[32]
//! body   = time_ms:u64 links:u8 site_len:u8 site[site_len] receipt
//! hash   = SHA-256(prev || body)
//! ```
//!
//! The server keeps a ledger in segments: when the live file `{task}.ledger` reaches its
//! size limit it is sealed as `{task}.ledger.NNNNNN` and a new live file continues the
//! chain (its `continues` line names its first entry's index and the hash before it).
//! [`read`] and [`verify`] check a ledger's bytes, one file or one segment (anyone can,
//! with `cargo xtask ledger verify FILE`); [`LedgerFile`] is the server's appender, which
//! keeps its files valid and serves them as one.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::receipt::{FIXED_BYTES, MAX_RECEIPT_BYTES, MAX_TASK_BYTES, Receipt};
use crate::learn::identity::{PublicKey, hex};

/// The first bytes of a ledger file, and of the genesis hash's input.
const MAGIC: &[u8] = b"shoal-ledger-v1";
/// The start of a segment's second header line, after the first segment.
const CONTINUES: &[u8] = b"continues ";
/// The size at which the server seals a segment and starts the next, by default.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// The longest site name an entry carries.
pub const MAX_SITE_BYTES: usize = 253;
/// The bytes of an entry body before its site: `time_ms`, `links` and `site_len`.
const BODY_PREFIX_BYTES: usize = 8 + 1 + 1;
/// The shortest entry body: no site, and a receipt with a one-byte task name.
pub const MIN_BODY_BYTES: usize = BODY_PREFIX_BYTES + FIXED_BYTES + 1;
/// The longest entry body: the longest site and the longest receipt.
pub const MAX_BODY_BYTES: usize = BODY_PREFIX_BYTES + MAX_SITE_BYTES + MAX_RECEIPT_BYTES;

/// The hash an empty ledger of `task` has as its head, which its first entry chains to:
/// SHA-256(`"shoal-ledger-v1"` task_len:u32 task).
pub fn genesis(task: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(MAGIC);
    h.update((task.len() as u32).to_le_bytes());
    h.update(task.as_bytes());
    h.finalize().into()
}

/// The first line of `task`'s ledger file: `"shoal-ledger-v1 " task "\n"`.
pub fn header(task: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(MAGIC.len() + task.len() + 2);
    b.extend_from_slice(MAGIC);
    b.push(b' ');
    b.extend_from_slice(task.as_bytes());
    b.push(b'\n');
    b
}

/// The second header line of a segment whose first entry is `index`, chained to `prev`
/// (the last hash of the segment before): `"continues " index " " prev_hex "\n"`.
pub fn continuation(index: u64, prev: &[u8; 32]) -> Vec<u8> {
    format!("continues {index} {}\n", hex(prev)).into_bytes()
}

/// Whether `site` may be an entry's site: 0 to 253 bytes of lowercase ASCII letters,
/// digits, `-` and `.`, and `:` for a port. Empty: Shoal's own pages or a native peer.
pub fn valid_site(site: &str) -> bool {
    site.len() <= MAX_SITE_BYTES
        && site.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b':')
        })
}

/// One entry of a ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its place in the ledger, from 0.
    pub index: u64,
    /// The server's clock (Unix milliseconds) when it appended the entry.
    pub time_ms: u64,
    /// How many identified neighbours the server had linked to the receipt's sender when
    /// it appended the entry (saturating at 255). The server's record, like `site`; the
    /// credit rule needs receipts from half of them (see [`super::credits`]).
    pub links: u8,
    /// The site the receipt's sender said it contributes from (empty: none).
    pub site: String,
    /// The receipt, decoded.
    pub receipt: Receipt,
    /// The receipt's bytes as the ledger holds them.
    pub receipt_bytes: Vec<u8>,
    /// SHA-256 of the previous entry's hash (or the genesis) and this entry's body.
    pub hash: [u8; 32],
}

/// The bytes of one entry that follows the hash `prev` (the previous entry's, or the
/// [`genesis`]), ready to append to a ledger, and its hash. It checks nothing (any `links`
/// is valid): a caller
/// that wants a valid ledger checks the site ([`valid_site`]) and the receipt first, as
/// [`LedgerFile::append`] does.
///
/// # Panics
///
/// When `site` is longer than 255 bytes, which its one-byte length cannot say.
pub fn encode_entry(
    prev: &[u8; 32],
    time_ms: u64,
    links: u8,
    site: &str,
    receipt_bytes: &[u8],
) -> (Vec<u8>, [u8; 32]) {
    let site_len = u8::try_from(site.len()).expect("an entry's site is at most 255 bytes");
    let body_len = BODY_PREFIX_BYTES + site.len() + receipt_bytes.len();
    let mut b = Vec::with_capacity(4 + body_len + 32);
    b.extend_from_slice(&(body_len as u32).to_le_bytes());
    b.extend_from_slice(&time_ms.to_le_bytes());
    b.push(links);
    b.push(site_len);
    b.extend_from_slice(site.as_bytes());
    b.extend_from_slice(receipt_bytes);
    let hash = chain(prev, &b[4..]);
    b.extend_from_slice(&hash);
    (b, hash)
}

/// SHA-256(prev || body).
fn chain(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    h.finalize().into()
}

/// The valid prefix of a ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The task its header names (empty when the header itself is bad).
    pub task: String,
    /// The index of its first entry: 0, or what a segment's `continues` line says.
    pub start: u64,
    /// Its entries, in order.
    pub entries: Vec<Entry>,
    /// The last entry's hash; the [`genesis`] while there are none (all zeros when the
    /// header is bad).
    pub head: [u8; 32],
    /// The bytes of the valid prefix, header included (0 when the header is bad).
    pub good_len: usize,
}

/// Where and why a ledger stops being valid.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("entry {index} at byte {offset}: {reason}")]
pub struct LedgerError {
    /// The first bad entry's index (0 also when the header is bad).
    pub index: u64,
    /// The byte where that entry starts (0 when the header is bad).
    pub offset: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// What a ledger's header says: the task, its length in bytes, and for a later segment
/// the index of its first entry and the hash before it.
struct Header {
    task: String,
    len: usize,
    continues: Option<(u64, [u8; 32])>,
}

/// Reads a ledger's header.
fn parse_header(bytes: &[u8]) -> Result<Header, String> {
    let prefix_len = MAGIC.len() + 1;
    if bytes.len() < prefix_len || &bytes[..MAGIC.len()] != MAGIC || bytes[MAGIC.len()] != b' ' {
        return Err("bad header: not a Shoal v1 ledger (expected \"shoal-ledger-v1 \")".into());
    }
    let window = &bytes[prefix_len..bytes.len().min(prefix_len + MAX_TASK_BYTES + 1)];
    let Some(n) = window.iter().position(|&b| b == b'\n') else {
        return Err("bad header: no newline after a task name of at most 64 bytes".into());
    };
    if n == 0 {
        return Err("bad header: empty task name".into());
    }
    let task = std::str::from_utf8(&window[..n])
        .map_err(|_| "bad header: the task name is not UTF-8".to_string())?;
    let len = prefix_len + n + 1;
    // No entry starts with "continues ": as a length, "cont" is far above any entry's.
    if !bytes[len..].starts_with(CONTINUES) {
        return Ok(Header {
            task: task.to_string(),
            len,
            continues: None,
        });
    }
    let rest = &bytes[len + CONTINUES.len()..];
    let line = &rest[..rest.len().min(20 + 1 + 64 + 1)];
    let bad = || "bad header: the continues line is not \"continues INDEX HASH\"".to_string();
    let end = line.iter().position(|&b| b == b'\n').ok_or_else(bad)?;
    let text = std::str::from_utf8(&line[..end]).map_err(|_| bad())?;
    let (index, prev) = text.split_once(' ').ok_or_else(bad)?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let index: u64 = index.parse().map_err(|_| bad())?;
    let prev: [u8; 32] = crate::protocol::from_hex(prev)
        .filter(|_| {
            prev.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .and_then(|p| p.try_into().ok())
        .ok_or_else(bad)?;
    if index == 0 {
        return Err("bad header: a segment continuing from entry 0".into());
    }
    // No ledger reaches 2^63 entries; an index near 2^64 would wrap the count.
    if index >= 1 << 63 {
        return Err(format!(
            "bad header: a segment continuing from entry {index}"
        ));
    }
    Ok(Header {
        task: task.to_string(),
        len: len + CONTINUES.len() + end + 1,
        continues: Some((index, prev)),
    })
}

/// What a reader has seen so far, to check the next entry against.
struct Chain {
    task: String,
    head: [u8; 32],
    last_time: u64,
    seen: HashSet<(PublicKey, PublicKey, u64)>,
    /// The index the next entry has.
    next: u64,
}

impl Chain {
    fn new(task: &str) -> Self {
        Self {
            task: task.to_string(),
            head: genesis(task),
            last_time: 0,
            seen: HashSet::new(),
            next: 0,
        }
    }

    /// Parses and checks the entry at the start of `rest` as entry `index`; on success
    /// returns it and its length in bytes (the caller then calls [`Self::accept`]).
    fn parse(&self, rest: &[u8], index: u64) -> Result<(Entry, usize), String> {
        let Some(len) = rest.first_chunk::<4>() else {
            return Err(format!(
                "truncated: {} bytes where an entry's length belongs",
                rest.len()
            ));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if !(MIN_BODY_BYTES..=MAX_BODY_BYTES).contains(&len) {
            return Err(format!(
                "entry length {len} outside {MIN_BODY_BYTES}..={MAX_BODY_BYTES}"
            ));
        }
        let total = 4 + len + 32;
        if rest.len() < total {
            return Err(format!(
                "truncated: the entry needs {total} bytes, {} remain",
                rest.len()
            ));
        }
        let body = &rest[4..4 + len];
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&rest[4 + len..total]);
        if chain(&self.head, body) != hash {
            return Err(
                "its hash does not chain (this entry or the file before it was altered)".into(),
            );
        }
        let mut time = [0u8; 8];
        time.copy_from_slice(&body[..8]);
        let time_ms = u64::from_le_bytes(time);
        let links = body[8];
        let site_len = usize::from(body[9]);
        if site_len > MAX_SITE_BYTES {
            return Err(format!(
                "a site of {site_len} bytes (at most {MAX_SITE_BYTES})"
            ));
        }
        if BODY_PREFIX_BYTES + site_len > len {
            return Err(format!("a site of {site_len} bytes runs past the entry"));
        }
        let site_bytes = &body[BODY_PREFIX_BYTES..BODY_PREFIX_BYTES + site_len];
        let site = match std::str::from_utf8(site_bytes) {
            Ok(s) if valid_site(s) => s.to_string(),
            _ => {
                return Err(format!(
                    "site \"{}\" is not a lowercase host name",
                    site_bytes.escape_ascii()
                ));
            }
        };
        let receipt_bytes = &body[BODY_PREFIX_BYTES + site_len..];
        if receipt_bytes.len() > MAX_RECEIPT_BYTES {
            return Err(format!(
                "a receipt of {} bytes (at most {MAX_RECEIPT_BYTES})",
                receipt_bytes.len()
            ));
        }
        let receipt = Receipt::decode(receipt_bytes).map_err(|e| e.to_string())?;
        if receipt.task != self.task {
            return Err(format!(
                "a receipt for task {:?} in the ledger of {:?}",
                receipt.task, self.task
            ));
        }
        if time_ms < self.last_time {
            return Err(format!(
                "time {time_ms} ms is before the previous entry's {} ms",
                self.last_time
            ));
        }
        if self
            .seen
            .contains(&(receipt.sender, receipt.receiver, receipt.round))
        {
            return Err(format!(
                "a second receipt of sender {}, receiver {}, round {}",
                hex(&receipt.sender),
                hex(&receipt.receiver),
                receipt.round
            ));
        }
        let entry = Entry {
            index,
            time_ms,
            links,
            site,
            receipt,
            receipt_bytes: receipt_bytes.to_vec(),
            hash,
        };
        Ok((entry, total))
    }

    /// Takes `entry` (checked by [`Self::parse`]) as the new head.
    fn accept(&mut self, entry: &Entry) {
        self.head = entry.hash;
        self.last_time = entry.time_ms;
        self.next = entry.index + 1;
        let r = &entry.receipt;
        self.seen.insert((r.sender, r.receiver, r.round));
    }

    /// Reads one file (a whole ledger or one segment) on from this chain: `None` when
    /// reading a file alone (its header sets the task and, for a segment, where it
    /// starts), otherwise it must be this chain's task and continue exactly where the
    /// chain ends. Returns the entries of its longest valid prefix, that prefix's length
    /// (0 when the header is bad), and where and why the rest is not valid.
    fn read_on(
        chain: Option<&mut Chain>,
        bytes: &[u8],
    ) -> (Chain, Vec<Entry>, usize, Option<LedgerError>) {
        let fail = |reason: String| LedgerError {
            index: 0,
            offset: 0,
            reason,
        };
        let header = match parse_header(bytes) {
            Ok(h) => h,
            Err(reason) => {
                let chain =
                    chain.map_or_else(|| Chain::new(""), |c| std::mem::replace(c, Chain::new("")));
                return (chain, Vec::new(), 0, Some(fail(reason)));
            }
        };
        let mut chain = match chain {
            None => {
                let mut c = Chain::new(&header.task);
                if let Some((index, prev)) = header.continues {
                    c.next = index;
                    c.head = prev;
                }
                c
            }
            Some(c) => {
                let c = std::mem::replace(c, Chain::new(""));
                let wrong = if header.task != c.task {
                    Some(format!("the header names task {:?}", header.task))
                } else {
                    match header.continues {
                        None if c.next > 0 => Some(format!(
                            "a segment after entry {} without a continues line",
                            c.next - 1
                        )),
                        Some((index, prev)) if index != c.next || prev != c.head => Some(format!(
                            "it continues from entry {index} after {}, but the ledger before it ends at entry {} with {}",
                            hex(&prev),
                            c.next,
                            hex(&c.head)
                        )),
                        _ => None,
                    }
                };
                if let Some(reason) = wrong {
                    return (
                        c,
                        Vec::new(),
                        0,
                        Some(fail(format!("bad header: {reason}"))),
                    );
                }
                c
            }
        };
        let mut entries = Vec::new();
        let mut offset = header.len;
        let mut error = None;
        while offset < bytes.len() {
            let index = chain.next;
            match chain.parse(&bytes[offset..], index) {
                Ok((entry, len)) => {
                    chain.accept(&entry);
                    entries.push(entry);
                    offset += len;
                }
                Err(reason) => {
                    error = Some(LedgerError {
                        index,
                        offset,
                        reason,
                    });
                    break;
                }
            }
        }
        (chain, entries, offset, error)
    }
}

/// Reads a ledger's bytes (a whole ledger, or one segment of it): always its longest
/// valid prefix, and where and why the rest is not valid, if there is a rest. Valid: the
/// header names a task of 1 to 64 bytes (and, for a segment after the first, the index
/// and hash it continues from), and every entry has a length in bounds, a hash that
/// chains, a valid site, a receipt that decodes and verifies and is for the header's
/// task, a time no earlier than the previous entry's, and a `(sender, receiver, round)` no
/// earlier entry (of this file) has.
pub fn read(bytes: &[u8]) -> (Verified, Option<LedgerError>) {
    let (chain, entries, good_len, error) = Chain::read_on(None, bytes);
    let verified = Verified {
        start: entries.first().map_or(chain.next, |e| e.index),
        task: chain.task,
        entries,
        head: if good_len == 0 { [0; 32] } else { chain.head },
        good_len,
    };
    (verified, error)
}

/// Reads a ledger that must be valid to its end (see [`read`]).
pub fn verify(bytes: &[u8]) -> Result<Verified, LedgerError> {
    match read(bytes) {
        (v, None) => Ok(v),
        (_, Some(e)) => Err(e),
    }
}

/// Whether `task` can name a ledger file: 1 to 64 ASCII letters, digits, `-` and `_`
/// (task names are lowercase letters, digits and `-`), so that it never leaves the
/// directory.
fn valid_file_task(task: &str) -> bool {
    (1..=MAX_TASK_BYTES).contains(&task.len())
        && task
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `fsync`s a directory, so that a file created or renamed in it stays (Unix only).
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The server's ledger of one task: sealed segments `{dir}/{task}.ledger.NNNNNN` (never
/// written again) and the live segment `{dir}/{task}.ledger`, opened for appending. Every
/// entry it appends is checked as [`read`] checks it and is on disk (`fsync`) before
/// [`append`](Self::append) returns, so the files stay valid; when the live segment would
/// pass its size limit it is sealed and a new one continues the chain (see
/// [`LedgerFile::append`]).
#[derive(Debug)]
pub struct LedgerFile {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    task: String,
    /// The sealed segments, in order.
    sealed: Vec<PathBuf>,
    /// The live segment's length: its header and every entry written.
    len: u64,
    /// The live segment's header length.
    header_len: u64,
    /// The size at which the live segment is sealed.
    segment_limit: u64,
    head: [u8; 32],
    entries: Vec<Entry>,
    seen: HashSet<(PublicKey, PublicKey, u64)>,
    last_rounds: HashMap<(PublicKey, PublicKey), u64>,
    /// A write failed and could not be undone: refuse further appends.
    broken: bool,
    /// The count of the last head recorded in the mark file ([`LedgerFile::mark_signed`]),
    /// and when it was written (milliseconds).
    marked: (u64, u64),
}

/// Least time between two writes of the mark file, in milliseconds.
const MARK_EVERY_MS: u64 = 1_000;

/// The mark file's text: the count and hash of the last head the server signed.
fn mark_text(count: u64, head: &[u8; 32]) -> String {
    format!("{count} {}\n", hex(head))
}

/// The count and hash a mark file's text records; `None` when it is not one.
fn parse_mark(text: &str) -> Option<(u64, [u8; 32])> {
    let (count, head) = text.trim_end().split_once(' ')?;
    let head = crate::protocol::from_hex(head)?.try_into().ok()?;
    Some((count.parse().ok()?, head))
}

impl LedgerFile {
    /// Opens the ledger of `task` in `dir`, creating `dir` and the live segment (with its
    /// header, synced with its directory) when missing. A rotation that a crash
    /// interrupted is finished or undone first. The sealed segments must be valid to
    /// their ends and continue each other (a damaged one is an error: history is never
    /// cut silently). The live segment is read on from them; if it is not valid to its
    /// end (or its header names another task or does not continue them), the whole file
    /// is first copied to `{task}.ledger.bad-{now_ms}` and then cut to its longest valid
    /// prefix, both synced, and the second value says so (where it broke, what was kept,
    /// where the original went) for the log.
    pub fn open(dir: &Path, task: &str, now_ms: u64) -> io::Result<(Self, Option<String>)> {
        if !valid_file_task(task) {
            return Err(invalid(format!(
                "task name {task:?} cannot name a ledger file (1 to 64 letters, digits, - and _)"
            )));
        }
        fs::create_dir_all(dir)?;
        let path = dir.join(format!("{task}.ledger"));
        let next = dir.join(format!("{task}.ledger.next"));
        if next.exists() {
            if path.exists() {
                // Sealing had not begun: the rotation never happened.
                fs::remove_file(&next)?;
            } else {
                // The live segment was sealed; its successor was not in place yet.
                fs::rename(&next, &path)?;
            }
            sync_dir(dir)?;
        }
        let sealed = Self::sealed_segments(dir, task)?;
        let mut chain = Chain::new(task);
        let mut entries = Vec::new();
        for seg in &sealed {
            let bytes = fs::read(seg)?;
            let (c, mut e, _, error) = Chain::read_on(Some(&mut chain), &bytes);
            chain = c;
            if let Some(error) = error {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "sealed segment {} broke at {error}; the ledger stays closed (restore the segment from a copy)",
                        seg.display()
                    ),
                ));
            }
            entries.append(&mut e);
        }
        // The header a live segment starts with after what is sealed.
        let mut fresh_header = header(task);
        if chain.next > 0 {
            fresh_header.extend_from_slice(&continuation(chain.next, &chain.head));
        }
        let mut note = None;
        // The live segment's valid length and its header's length.
        let (good_len, header_len) = match fs::read(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Written aside and renamed, so that the ledger never exists without its
                // whole header.
                let tmp = dir.join(format!("{task}.ledger.new"));
                {
                    let mut f = File::create(&tmp)?;
                    f.write_all(&fresh_header)?;
                    f.sync_all()?;
                }
                fs::rename(&tmp, &path)?;
                sync_dir(dir)?;
                (fresh_header.len(), fresh_header.len())
            }
            Err(e) => return Err(e),
            Ok(bytes) => {
                // A live header of this task that continues from anywhere but the sealed
                // segments' end is no crash's doing (it is written aside and renamed into
                // place): a sealed segment is missing or was replaced. Cut and started
                // again, the live file reused the lost entries' numbers and their credits
                // were gone.
                if let Ok(h) = parse_header(&bytes)
                    && h.task == task
                    && h.continues
                        .is_some_and(|(index, prev)| (index, prev) != (chain.next, chain.head))
                {
                    let from = h.continues.map_or(0, |(index, _)| index);
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} continues from entry {from}, but the sealed segments end at entry {}: \
                             a sealed segment is missing or was replaced; the ledger stays closed \
                             (restore the segments from a copy)",
                            path.display(),
                            chain.next
                        ),
                    ));
                }
                let before = (chain.next, chain.head);
                let (c, mut e, good_len, error) = Chain::read_on(Some(&mut chain), &bytes);
                chain = c;
                let count = e.len();
                entries.append(&mut e);
                // The header as read (a bad one is replaced by the fresh one below).
                let read_header = parse_header(&bytes).map_or(0, |h| h.len);
                match error {
                    None => (good_len, read_header),
                    Some(error) => {
                        let bad = Self::quarantine(dir, task, now_ms, &bytes)?;
                        let f = OpenOptions::new().write(true).open(&path)?;
                        f.set_len(good_len as u64)?;
                        let (kept, header_len) = if good_len == 0 {
                            (&f).write_all(&fresh_header)?;
                            (chain.next, chain.head) = before;
                            (fresh_header.len(), fresh_header.len())
                        } else {
                            (good_len, read_header)
                        };
                        f.sync_all()?;
                        note = Some(format!(
                            "ledger {} broke at {error}; kept {count} entries ({kept} of {} bytes), \
                             moved the original to {}",
                            path.display(),
                            bytes.len(),
                            bad.display()
                        ));
                        (kept, header_len)
                    }
                }
            }
        };
        let header_len = header_len as u64;
        let file = OpenOptions::new().append(true).open(&path)?;
        let mut ledger = Self {
            dir: dir.to_path_buf(),
            path,
            file,
            task: task.to_string(),
            sealed,
            len: good_len as u64,
            header_len,
            segment_limit: DEFAULT_SEGMENT_BYTES,
            head: chain.head,
            entries: Vec::with_capacity(entries.len()),
            seen: HashSet::new(),
            last_rounds: HashMap::new(),
            broken: false,
            marked: (0, 0),
        };
        for entry in entries {
            ledger.remember(entry);
        }
        if let Err(e) = ledger.check_mark() {
            // The file may have just been cut to its valid prefix: say where the whole
            // original went, or the operator restores the cut one.
            return Err(match note {
                Some(note) => io::Error::new(e.kind(), format!("{e}; before that, {note}")),
                None => e,
            });
        }
        Ok((ledger, note))
    }

    /// The mark file: the count and hash of the last head the server signed.
    fn mark_path(&self) -> PathBuf {
        self.dir.join(format!("{}.ledger.mark", self.task))
    }

    /// Refuses a ledger that no longer holds the last head the server signed (the mark
    /// file): cut at an entry's end, or restored from an older copy, it reads as valid,
    /// and its next entries would reuse the lost ones' numbers, their credits gone with
    /// no word (witnesses catch it only where one holds a head past the cut).
    fn check_mark(&mut self) -> io::Result<()> {
        let path = self.mark_path();
        let text = match fs::read_to_string(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        let closed = |why: String| {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{why}; the ledger stays closed (restore it from a copy that holds that \
                     head, or move {} away to accept the loss)",
                    path.display()
                ),
            ))
        };
        let Some((count, head)) = parse_mark(&text) else {
            return closed(format!("{} is no mark of a signed head", path.display()));
        };
        let held = count
            .checked_sub(1)
            .and_then(|i| self.entries.get(i as usize))
            .map(|e| e.hash);
        if count > 0 && held != Some(head) {
            return closed(format!(
                "the server signed a head at {count} entries that this ledger of {} does not \
                 hold: it was cut or replaced by an older copy",
                self.count()
            ));
        }
        self.marked = (count, 0);
        Ok(())
    }

    /// Records the head the server signs now (its count and hash) in the mark file,
    /// written aside and renamed, at most once a [`MARK_EVERY_MS`]: the next
    /// [`open`](Self::open) refuses a ledger that no longer holds it. A head signed
    /// within the last second before a cut may go unmarked (witnesses holding it still
    /// catch the cut).
    pub fn mark_signed(&mut self, now_ms: u64) -> io::Result<()> {
        let (count, at) = self.marked;
        // Within a second of the last (a clock stepped back writes at once: held until it
        // passed the last time again, a cut in between went unnoticed at the next start).
        if self.count() <= count || (at..at.saturating_add(MARK_EVERY_MS)).contains(&now_ms) {
            return Ok(());
        }
        let tmp = self.dir.join(format!("{}.ledger.mark.new", self.task));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(mark_text(self.count(), &self.head).as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.mark_path())?;
        sync_dir(&self.dir)?;
        self.marked = (self.count(), now_ms);
        Ok(())
    }

    /// The sealed segments of `task` in `dir` (`{task}.ledger.` and six digits), in order.
    fn sealed_segments(dir: &Path, task: &str) -> io::Result<Vec<PathBuf>> {
        let prefix = format!("{task}.ledger.");
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(n) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            if n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit()) {
                found.push((n.parse().unwrap_or(0), e.path()));
            }
        }
        found.sort();
        for (k, (n, p)) in found.iter().enumerate() {
            if *n != k as u64 + 1 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "sealed segment {} is out of sequence (expected number {})",
                        p.display(),
                        k + 1
                    ),
                ));
            }
        }
        Ok(found.into_iter().map(|(_, p)| p).collect())
    }

    /// Sets the size at which the live segment is sealed (at least one entry stays in
    /// each segment).
    pub fn set_segment_limit(&mut self, bytes: u64) {
        self.segment_limit = bytes;
    }

    /// Seals the live segment and starts the next: the next one's header is written and
    /// synced aside (`{task}.ledger.next`), the live file renamed to the next sealed name,
    /// the new one renamed into place, the directory synced. A crash in between is
    /// finished or undone by [`LedgerFile::open`].
    fn rotate(&mut self) -> io::Result<()> {
        let task = self.task.clone();
        let next = self.dir.join(format!("{task}.ledger.next"));
        let mut h = header(&task);
        h.extend_from_slice(&continuation(self.count(), &self.head));
        {
            let mut f = File::create(&next)?;
            f.write_all(&h)?;
            f.sync_all()?;
        }
        let sealed = self
            .dir
            .join(format!("{task}.ledger.{:06}", self.sealed.len() + 1));
        if let Err(e) = fs::rename(&self.path, &sealed) {
            let _ = fs::remove_file(&next);
            return Err(e);
        }
        // What the files now hold, whatever fails next: the ledger file served stays
        // whole (it lacked the segment just sealed while the next stood in place).
        self.sealed.push(sealed);
        let moved = fs::rename(&next, &self.path);
        if moved.is_ok() {
            self.len = h.len() as u64;
            self.header_len = h.len() as u64;
        }
        if let Err(e) = moved.and_then(|()| sync_dir(&self.dir)) {
            // Finished by the next open.
            self.broken = true;
            return Err(e);
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        Ok(())
    }

    /// The whole ledger as one file, as [`read`] reads it: the first segment, then every
    /// later one without its header (what was written and synced so far).
    pub fn file_bytes(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut add = |bytes: &[u8], first: bool| -> io::Result<()> {
            let skip = if first {
                0
            } else {
                parse_header(bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
                    .len
            };
            out.extend_from_slice(&bytes[skip..]);
            Ok(())
        };
        for (k, seg) in self.sealed.iter().enumerate() {
            add(&fs::read(seg)?, k == 0)?;
        }
        let mut live = fs::read(&self.path)?;
        live.truncate(usize::try_from(self.len).unwrap_or(usize::MAX));
        add(&live, self.sealed.is_empty())?;
        Ok(out)
    }

    /// The sealed segments' paths, in order.
    pub fn sealed(&self) -> &[PathBuf] {
        &self.sealed
    }

    /// Copies `bytes` (a whole ledger file) to `{task}.ledger.bad-{now_ms}` (with `-N`
    /// added if that exists), synced; returns its path.
    fn quarantine(dir: &Path, task: &str, now_ms: u64, bytes: &[u8]) -> io::Result<PathBuf> {
        for n in 0u32.. {
            let name = match n {
                0 => format!("{task}.ledger.bad-{now_ms}"),
                n => format!("{task}.ledger.bad-{now_ms}-{n}"),
            };
            let path = dir.join(name);
            let mut f = match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            f.write_all(bytes)?;
            f.sync_all()?;
            sync_dir(dir)?;
            return Ok(path);
        }
        Err(io::Error::other("no free name for the quarantined ledger"))
    }

    fn remember(&mut self, entry: Entry) {
        let r = &entry.receipt;
        self.seen.insert((r.sender, r.receiver, r.round));
        let last = self
            .last_rounds
            .entry((r.sender, r.receiver))
            .or_insert(r.round);
        *last = (*last).max(r.round);
        self.head = entry.hash;
        self.entries.push(entry);
    }

    /// Appends a receipt (its bytes) with the server's clock `time_ms` (raised to the
    /// last entry's time if earlier), `links` (how many identified neighbours the server
    /// links to the receipt's sender now, saturated at 255) and the sender's `site`: one
    /// write of the whole entry, then `fsync`. Refused (`InvalidInput`, or `AlreadyExists` for a second
    /// receipt of the same sender, receiver and round) when the entry would make the
    /// ledger invalid. If the write fails, the file is cut back to what it was.
    pub fn append(
        &mut self,
        time_ms: u64,
        links: u8,
        site: &str,
        receipt_bytes: &[u8],
    ) -> io::Result<Entry> {
        if self.broken {
            return Err(io::Error::other(
                "an earlier write to the ledger failed and could not be undone; reopen it",
            ));
        }
        if !valid_site(site) {
            return Err(invalid(format!(
                "site \"{}\" is not a lowercase host name",
                site.escape_default()
            )));
        }
        if receipt_bytes.len() > MAX_RECEIPT_BYTES {
            return Err(invalid(format!(
                "a receipt of {} bytes (at most {MAX_RECEIPT_BYTES})",
                receipt_bytes.len()
            )));
        }
        let receipt = Receipt::decode(receipt_bytes).map_err(|e| invalid(e.to_string()))?;
        if receipt.task != self.task {
            return Err(invalid(format!(
                "a receipt for task {:?} in the ledger of {:?}",
                receipt.task, self.task
            )));
        }
        if self.has(&receipt.sender, &receipt.receiver, receipt.round) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "the ledger has this receipt's round {} already",
                    receipt.round
                ),
            ));
        }
        let time_ms = time_ms.max(self.entries.last().map_or(0, |e| e.time_ms));
        let (bytes, hash) = encode_entry(&self.head, time_ms, links, site, receipt_bytes);
        if self.len > self.header_len && self.len + bytes.len() as u64 > self.segment_limit {
            self.rotate()?;
        }
        if let Err(e) = self.file.write_all(&bytes) {
            // Cut back any part of the entry that made it, so that the file stays valid.
            let undone = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data());
            if undone.is_err() {
                self.broken = true;
            }
            return Err(e);
        }
        if let Err(e) = self.file.sync_data() {
            // After a failed fsync what is on the disk cannot be known: cut back, and
            // append nothing more until the file is opened (and checked) again.
            let _ = self.file.set_len(self.len);
            self.broken = true;
            return Err(e);
        }
        self.len += bytes.len() as u64;
        let entry = Entry {
            index: self.entries.len() as u64,
            time_ms,
            links,
            site: site.to_string(),
            receipt,
            receipt_bytes: receipt_bytes.to_vec(),
            hash,
        };
        self.remember(entry.clone());
        Ok(entry)
    }

    /// The last entry's hash (the [`genesis`] while empty).
    pub fn head(&self) -> [u8; 32] {
        self.head
    }

    /// How many entries the ledger has.
    pub fn count(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Every entry, in order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The live segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The task whose ledger this is.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// The live segment's length in bytes: its header and every entry appended (and
    /// synced).
    pub fn byte_len(&self) -> u64 {
        self.len
    }

    /// Whether the ledger has a receipt of `sender`'s update for `round` by `receiver`.
    pub fn has(&self, sender: &PublicKey, receiver: &PublicKey, round: u64) -> bool {
        self.seen.contains(&(*sender, *receiver, round))
    }

    /// The highest round the ledger has a receipt of by `receiver` for `sender`.
    pub fn last_round(&self, sender: &PublicKey, receiver: &PublicKey) -> Option<u64> {
        self.last_rounds.get(&(*sender, *receiver)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::identity::Identity;
    use crate::trust::receipt::sha256;

    fn key(seed: u8) -> Identity {
        Identity::from_seed([seed; 32])
    }

    /// The bytes of a receipt by `receiver` for `sender`'s update of `round`.
    fn receipt(task: &str, receiver: u8, sender: u8, round: u64, samples: u32) -> Vec<u8> {
        let update = sha256(&[sender, receiver, round as u8]);
        Receipt::sign(
            &key(receiver),
            task,
            round,
            key(sender).public(),
            samples,
            update,
            0,
        )
        .encode()
    }

    /// A ledger of `digits` with the given (time, links, site, receipt) entries, written
    /// without any check; returns its bytes and where each entry ends.
    fn ledger(entries: &[(u64, u8, &str, Vec<u8>)]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = header("digits");
        let mut ends = Vec::new();
        let mut head = genesis("digits");
        for (time, links, site, r) in entries {
            let (e, h) = encode_entry(&head, *time, *links, site, r);
            bytes.extend_from_slice(&e);
            ends.push(bytes.len());
            head = h;
        }
        (bytes, ends)
    }

    fn three() -> Vec<(u64, u8, &'static str, Vec<u8>)> {
        vec![
            (1000, 6, "example.org", receipt("digits", 1, 2, 5, 640)),
            (1000, 0, "", receipt("digits", 3, 2, 5, 640)),
            (
                1500,
                255,
                "school.example:8443",
                receipt("digits", 2, 1, 6, 320),
            ),
        ]
    }

    /// A fresh directory for one test, removed when dropped (also when the test fails).
    struct Temp(PathBuf);

    impl Temp {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("shoal-ledger-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            Self(dir)
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_genesis_and_header_have_the_documented_bytes() {
        // printf 'shoal-ledger-v1\x06\x00\x00\x00digits' | sha256sum
        assert_eq!(
            hex(&genesis("digits")),
            "59e95f40aa196f8f4a95b8840485df28182ef0343e1f78c65961351047c2152a"
        );
        assert_eq!(header("digits"), b"shoal-ledger-v1 digits\n");
        let (v, e) = read(&header("digits"));
        assert_eq!(e, None);
        assert_eq!(
            (v.task.as_str(), v.head, v.good_len),
            ("digits", genesis("digits"), 23)
        );
        assert!(v.entries.is_empty());
    }

    #[test]
    fn a_ledger_round_trips() {
        let input = three();
        let (bytes, ends) = ledger(&input);
        let v = verify(&bytes).expect("valid");
        assert_eq!(v.task, "digits");
        assert_eq!(v.good_len, bytes.len());
        assert_eq!(v.entries.len(), 3);
        let mut prev = genesis("digits");
        let mut start = header("digits").len();
        for (i, (e, (time, links, site, r))) in v.entries.iter().zip(&input).enumerate() {
            assert_eq!(e.index, i as u64);
            assert_eq!(
                (e.time_ms, e.links, e.site.as_str()),
                (*time, *links, *site)
            );
            // The body's bytes as documented: time_ms, links, site_len, site, receipt.
            let body = &bytes[start + 4..ends[i] - 32];
            assert_eq!(body[..8], time.to_le_bytes());
            assert_eq!((body[8], usize::from(body[9])), (*links, site.len()));
            assert_eq!(&body[10..10 + site.len()], site.as_bytes());
            assert_eq!(&body[10 + site.len()..], &r[..]);
            assert_eq!(&e.receipt_bytes, r);
            assert_eq!(e.receipt, Receipt::decode(r).expect("receipt"));
            assert_eq!(e.hash, chain(&prev, &bytes[start + 4..ends[i] - 32]));
            assert_eq!(&bytes[ends[i] - 32..ends[i]], &e.hash);
            prev = e.hash;
            start = ends[i];
        }
        assert_eq!(v.head, prev);
    }

    #[test]
    fn any_flipped_byte_is_caught_and_only_the_prefix_before_it_kept() {
        let (bytes, ends) = ledger(&three());
        let header_len = header("digits").len();
        for i in 0..bytes.len() {
            for bit in [0x01, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= bit;
                let (v, e) = read(&bad);
                let e = e.unwrap_or_else(|| panic!("byte {i} ^ {bit:#x} was accepted"));
                // The entry the byte belongs to (the header counts as entry 0) is the
                // first bad one; everything before it is kept.
                let hit = ends.iter().position(|&end| i < end).expect("in the file");
                assert_eq!(e.index, hit as u64, "byte {i}: {e}");
                assert_eq!(v.entries.len(), hit, "byte {i}");
                if i >= header_len {
                    let start = if hit == 0 { header_len } else { ends[hit - 1] };
                    assert_eq!((e.offset, v.good_len), (start, start), "byte {i}");
                }
                assert!(v.good_len <= bad.len());
                if v.good_len > 0 {
                    let (again, e) = read(&bad[..v.good_len]);
                    assert_eq!(e, None, "byte {i}: the prefix kept is valid");
                    assert_eq!(again.entries, v.entries);
                }
            }
        }
    }

    #[test]
    fn a_cut_anywhere_keeps_the_whole_entries_before_it() {
        let (bytes, ends) = ledger(&three());
        let header_len = header("digits").len();
        for cut in 0..=bytes.len() {
            let (v, e) = read(&bytes[..cut]);
            if cut < header_len {
                assert_eq!(v.good_len, 0, "cut {cut}");
                assert_eq!(
                    e.as_ref().map(|e| (e.index, e.offset)),
                    Some((0, 0)),
                    "cut {cut}"
                );
                continue;
            }
            let whole = ends.iter().filter(|&&end| end <= cut).count();
            let kept = if whole == 0 {
                header_len
            } else {
                ends[whole - 1]
            };
            assert_eq!((v.entries.len(), v.good_len), (whole, kept), "cut {cut}");
            assert_eq!(e.is_none(), cut == kept, "cut {cut}: {e:?}");
            if let Some(e) = e {
                assert_eq!((e.index, e.offset), (whole as u64, kept), "cut {cut}");
                assert!(e.reason.contains("truncated"), "cut {cut}: {e}");
            }
        }
    }

    /// The first error of a ledger written without checks.
    fn error_of(entries: &[(u64, u8, &str, Vec<u8>)]) -> LedgerError {
        let (bytes, _) = ledger(entries);
        let (v, e) = read(&bytes);
        let e = e.expect("refused");
        assert_eq!(v.entries.len() as u64, e.index);
        e
    }

    #[test]
    fn a_second_receipt_of_the_same_sender_receiver_and_round_is_refused() {
        let e = error_of(&[
            (1, 0, "", receipt("digits", 1, 2, 5, 640)),
            (2, 0, "", receipt("digits", 3, 2, 5, 640)),
            // The same triple with another claim: other bytes, the same receipt.
            (3, 0, "", receipt("digits", 1, 2, 5, 9999)),
        ]);
        assert_eq!(e.index, 2);
        assert!(e.reason.contains("second receipt"), "{e}");
        // Another round of the same pair is fine.
        let (bytes, _) = ledger(&[
            (1, 0, "", receipt("digits", 1, 2, 5, 640)),
            (2, 0, "", receipt("digits", 1, 2, 6, 640)),
        ]);
        assert!(verify(&bytes).is_ok());
    }

    #[test]
    fn a_receipt_for_another_task_is_refused() {
        let e = error_of(&[
            (1, 0, "", receipt("digits", 1, 2, 5, 640)),
            (2, 0, "", receipt("letters", 1, 2, 6, 640)),
        ]);
        assert_eq!(e.index, 1);
        assert!(e.reason.contains("letters"), "{e}");
    }

    #[test]
    fn time_going_backwards_is_refused() {
        let e = error_of(&[
            (100, 0, "", receipt("digits", 1, 2, 5, 640)),
            (100, 0, "", receipt("digits", 1, 2, 6, 640)),
            (99, 0, "", receipt("digits", 1, 2, 7, 640)),
        ]);
        assert_eq!(e.index, 2);
        assert!(e.reason.contains("before the previous"), "{e}");
    }

    #[test]
    fn bad_sites_receipts_lengths_and_headers_are_refused() {
        let e = error_of(&[(1, 0, "Example.org", receipt("digits", 1, 2, 5, 640))]);
        assert!(e.reason.contains("site"), "{e}");
        let long = "a".repeat(254);
        let e = error_of(&[(1, 0, &long, receipt("digits", 1, 2, 5, 640))]);
        assert!(e.reason.contains("site"), "{e}");
        // A receipt whose signature fails, chained correctly.
        let mut forged = receipt("digits", 1, 2, 5, 640);
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let e = error_of(&[
            (1, 0, "", receipt("digits", 1, 2, 4, 640)),
            (2, 0, "", forged),
        ]);
        assert_eq!(e.index, 1);
        assert!(e.reason.contains("signature"), "{e}");
        // Lengths out of bounds are refused as such, before anything is read. A body has
        // 8 + 1 + 1 bytes before its site, a receipt 182 bytes and its task.
        assert_eq!(
            (MIN_BODY_BYTES, MAX_BODY_BYTES),
            (10 + 182 + 1, 10 + 253 + 182 + 64)
        );
        for len in [
            0u32,
            MIN_BODY_BYTES as u32 - 1,
            MAX_BODY_BYTES as u32 + 1,
            u32::MAX,
        ] {
            let mut bytes = header("digits");
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&[0; 600]);
            let (_, e) = read(&bytes);
            let e = e.expect("refused");
            assert_eq!((e.index, e.offset), (0, 23));
            assert!(e.reason.contains("length"), "{len}: {e}");
        }
        for bad in [
            &b""[..],
            b"shoal-ledger-v2 digits\n",
            b"shoal-ledger-v1 \n",
            b"shoal-ledger-v1digits\n",
            b"shoal-ledger-v1 digits",
            b"shoal-ledger-v1 \xff\n",
        ] {
            let (v, e) = read(bad);
            assert_eq!(v.good_len, 0);
            let e = e.expect("refused");
            assert_eq!((e.index, e.offset), (0, 0));
            assert!(e.reason.contains("header"), "{e}");
        }
        let long_task = format!("shoal-ledger-v1 {}\n", "t".repeat(65));
        assert!(read(long_task.as_bytes()).1.is_some());
        let max_task = format!("shoal-ledger-v1 {}\n", "t".repeat(64));
        assert!(read(max_task.as_bytes()).1.is_none());
    }

    #[test]
    fn sites_are_lowercase_host_names() {
        for ok in [
            "",
            "example.org",
            "a-b.example.org:8080",
            "127.0.0.1:3000",
            &"a".repeat(253),
        ] {
            assert!(valid_site(ok), "{ok:?}");
        }
        for bad in [
            "Example.org",
            "https://example.org",
            "a b",
            "a/b",
            "é.org",
            &"a".repeat(254),
        ] {
            assert!(!valid_site(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_full_segment_is_sealed_and_the_chain_goes_on_across_segments() {
        let temp = Temp::new("segments");
        let dir = temp.0.clone();
        let (l, limit) = seven_in_segments_of_two(&dir);
        assert_eq!(
            l.sealed().len(),
            3,
            "7 entries, 2 a segment: 3 sealed and the live one"
        );
        // Each segment verifies alone, from where it continues.
        let mut next = 0;
        for seg in l.sealed().iter().chain([&l.path().to_path_buf()]) {
            let v = verify(&fs::read(seg).expect("segment")).expect("each segment verifies");
            assert_eq!(v.start, next, "{}", seg.display());
            next += v.entries.len() as u64;
        }
        assert_eq!(next, 7);
        // Served as one file, it is the ledger a single file would have been.
        let whole = l.file_bytes().expect("whole");
        let v = verify(&whole).expect("the whole verifies");
        assert_eq!(
            (v.entries.as_slice(), v.head, v.start),
            (l.entries(), l.head(), 0)
        );
        let mut single = header("digits");
        let mut head = genesis("digits");
        for e in l.entries() {
            let (b, h) = encode_entry(&head, e.time_ms, e.links, &e.site, &e.receipt_bytes);
            single.extend_from_slice(&b);
            head = h;
        }
        assert_eq!(whole, single);
        // Reopened, the chain and the duplicate rule span the segments.
        let head = l.head();
        drop(l);
        let (mut l, note) = LedgerFile::open(&dir, "digits", 2).expect("reopen");
        assert_eq!((note, l.count(), l.head()), (None, 7, head));
        l.set_segment_limit(limit);
        let dup = l
            .append(2000, 0, "", &receipt("digits", 2, 9, 1, 160))
            .expect_err("dup");
        assert_eq!(
            dup.kind(),
            io::ErrorKind::AlreadyExists,
            "round 1 is in the first segment"
        );
        fill_from(&mut l, 8, 2);
        assert_eq!((l.count(), l.sealed().len()), (9, 4));
        assert!(verify(&l.file_bytes().expect("whole")).is_ok());
    }

    /// A sealed segment gone (a partial copy of the folder): the live file continues from
    /// an entry the sealed ones do not reach, and the ledger stays closed. It was cut and
    /// started again from the sealed end, reusing the lost entries' numbers.
    #[test]
    fn a_missing_sealed_segment_keeps_the_ledger_closed() {
        let temp = Temp::new("segment-gone");
        let dir = temp.0.clone();
        let (l, _) = seven_in_segments_of_two(&dir);
        let sealed = l.sealed().to_vec();
        assert_eq!(sealed.len(), 3);
        drop(l);
        fs::remove_file(&sealed[2]).expect("remove the last sealed segment");
        let e = LedgerFile::open(&dir, "digits", 2)
            .map(|(l, _)| l.count())
            .expect_err("closed");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("missing or was replaced"), "{e}");
        assert!(
            fs::read_dir(&dir).expect("dir").all(|f| !f
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .contains(".bad-")),
            "nothing quarantined"
        );
    }

    /// A ledger of `digits` in `dir` with room for two entries per segment (the limit is
    /// returned), holding seven entries: three sealed segments and the live one.
    fn seven_in_segments_of_two(dir: &Path) -> (LedgerFile, u64) {
        let (mut l, _) = LedgerFile::open(dir, "digits", 1).expect("open");
        let entry = encode_entry(
            &genesis("digits"),
            0,
            0,
            "",
            &receipt("digits", 1, 9, 1, 160),
        )
        .0;
        let limit = (header("digits").len() + 90 + 2 * entry.len()) as u64;
        l.set_segment_limit(limit);
        fill_from(&mut l, 1, 7);
        (l, limit)
    }

    /// Appends receipts of sender 9 for rounds `from..from + n` (receivers 1 to 3) to `l`.
    fn fill_from(l: &mut LedgerFile, from: u64, n: u64) {
        for round in from..from + n {
            let r = receipt("digits", 1 + (round % 3) as u8, 9, round, 160);
            l.append(5000 + round, 4, "", &r).expect("append");
        }
    }

    #[test]
    fn a_rotation_cut_short_by_a_crash_is_finished_or_undone_at_open() {
        let temp = Temp::new("rotation-crash");
        let dir = temp.0.clone();
        let (mut l, _) = LedgerFile::open(&dir, "digits", 1).expect("open");
        fill_from(&mut l, 1, 3);
        let (count, head) = (l.count(), l.head());
        drop(l);
        let live = dir.join("digits.ledger");
        let next = dir.join("digits.ledger.next");
        let mut h = header("digits");
        h.extend_from_slice(&continuation(count, &head));
        // Crash before sealing: the successor's header is there, the live file too.
        fs::write(&next, &h).expect("next");
        let (l, note) = LedgerFile::open(&dir, "digits", 2).expect("open");
        assert_eq!(
            (note, l.count(), l.sealed().len(), next.exists()),
            (None, 3, 0, false)
        );
        drop(l);
        // Crash between the two renames: sealed, and the successor not in place yet.
        fs::write(&next, &h).expect("next");
        fs::rename(&live, dir.join("digits.ledger.000001")).expect("seal");
        let (mut l, note) = LedgerFile::open(&dir, "digits", 3).expect("open");
        assert_eq!(
            (note, l.count(), l.sealed().len(), l.head()),
            (None, 3, 1, head)
        );
        fill_from(&mut l, 10, 2);
        assert_eq!(
            verify(&l.file_bytes().expect("whole"))
                .expect("valid")
                .entries
                .len(),
            5
        );
        drop(l);
        // A damaged sealed segment is an error: history is never cut silently.
        let sealed = dir.join("digits.ledger.000001");
        let mut bytes = fs::read(&sealed).expect("sealed");
        let at = bytes.len() - 40;
        bytes[at] ^= 1;
        fs::write(&sealed, &bytes).expect("damage");
        let e = LedgerFile::open(&dir, "digits", 4).expect_err("refused");
        assert!(e.to_string().contains("sealed segment"), "{e}");
        // So is a live segment that does not continue the sealed ones: it is quarantined
        // and started again from them.
        bytes[at] ^= 1;
        fs::write(&sealed, &bytes).expect("mend");
        fs::write(&live, header("digits")).expect("a live file without its continues line");
        let (l, note) = LedgerFile::open(&dir, "digits", 5).expect("open");
        assert!(note.is_some_and(|n| n.contains("without a continues line")));
        assert_eq!((l.count(), l.head()), (3, head));
    }

    #[test]
    fn continues_lines_are_checked() {
        let mut h = header("digits");
        h.extend_from_slice(&continuation(5, &[7; 32]));
        let (v, e) = read(&h);
        assert_eq!((e, v.start, v.head, v.entries.len()), (None, 5, [7; 32], 0));
        for bad in [
            "continues 0 0707070707070707070707070707070707070707070707070707070707070707\n",
            "continues 5 07\n",
            "continues x 0707070707070707070707070707070707070707070707070707070707070707\n",
            "continues 5 0707070707070707070707070707070707070707070707070707070707070707",
            "continues +5 0707070707070707070707070707070707070707070707070707070707070707\n",
            "continues 5 0707070707070707070707070707070707070707070707070707070707070G07\n",
            // An index whose count would wrap.
            "continues 18446744073709551615 0707070707070707070707070707070707070707070707070707070707070707\n",
            "continues 9223372036854775808 0707070707070707070707070707070707070707070707070707070707070707\n",
        ] {
            let mut b = header("digits");
            b.extend_from_slice(bad.as_bytes());
            let (_, e) = read(&b);
            assert!(
                e.is_some_and(|e| e.reason.starts_with("bad header")),
                "{bad:?}"
            );
        }
    }

    /// What the mark file holds.
    fn mark_of(l: &LedgerFile) -> String {
        fs::read_to_string(l.mark_path()).expect("mark")
    }

    /// A clock stepped back (an NTP correction) does not hold the mark back until it passes
    /// its last time again.
    #[test]
    fn a_clock_stepped_back_does_not_hold_the_mark() {
        let temp = Temp::new("mark-clock");
        let (mut l, _) = LedgerFile::open(&temp.0, "digits", 1).expect("open");
        // Marked at an hour, then the clock goes back to 10 s.
        for (sender, now_ms) in [(1, 3_600_000), (3, 10_000)] {
            let r = receipt("digits", sender, 2, 5, 640);
            l.append(500, 3, "", &r).expect("appended");
            l.mark_signed(now_ms).expect("marked");
        }
        assert!(mark_of(&l).starts_with("2 "));
    }

    /// A ledger cut at an entry's end, or put back to an older copy, below the last head
    /// the server signed is refused at open, naming the head; before, it opened as valid
    /// and its next entries reused the lost ones' numbers. Appends past the mark open.
    #[test]
    fn a_ledger_that_lost_a_signed_head_stays_closed() {
        let temp = Temp::new("mark");
        let dir = temp.0.clone();
        let (mut l, _) = LedgerFile::open(&dir, "digits", 1).expect("open");
        l.append(500, 3, "", &receipt("digits", 1, 2, 5, 640))
            .expect("a");
        l.append(500, 3, "", &receipt("digits", 3, 2, 5, 640))
            .expect("b");
        let two = l.byte_len();
        let older = fs::read(l.path()).expect("file");
        l.append(600, 3, "", &receipt("digits", 1, 2, 6, 640))
            .expect("c");
        l.mark_signed(10_000).expect("marked at 3");
        // Another head within the second is not written; past it, it is.
        l.append(600, 3, "", &receipt("digits", 3, 2, 6, 640))
            .expect("d");
        l.mark_signed(10_500).expect("not yet");
        assert!(mark_of(&l).starts_with("3 "));
        l.mark_signed(11_000).expect("marked at 4");
        assert!(mark_of(&l).starts_with("4 "));
        let live = l.path().to_path_buf();
        drop(l);
        // Reopened whole, and one entry more later: open.
        let (mut l, _) = LedgerFile::open(&dir, "digits", 2).expect("whole");
        l.append(700, 3, "", &receipt("digits", 1, 2, 7, 640))
            .expect("e");
        drop(l);
        LedgerFile::open(&dir, "digits", 3).expect("past the mark");
        // Cut at the end of entry 2.
        OpenOptions::new()
            .write(true)
            .open(&live)
            .expect("live")
            .set_len(two)
            .expect("cut");
        let e = LedgerFile::open(&dir, "digits", 4).expect_err("cut below the mark");
        assert!(e.to_string().contains("signed a head at 4 entries"), "{e}");
        // An older copy of two entries, then two other entries: as long as the mark, not
        // the history it names.
        fs::write(&live, &older).expect("older copy");
        let (mut l, _) = {
            let mark = dir.join("digits.ledger.mark");
            let kept = fs::read(&mark).expect("mark");
            fs::remove_file(&mark).expect("moved away");
            let opened = LedgerFile::open(&dir, "digits", 5).expect("without the mark");
            fs::write(&mark, kept).expect("mark back");
            opened
        };
        l.append(800, 3, "", &receipt("digits", 1, 2, 9, 640))
            .expect("x");
        l.append(800, 3, "", &receipt("digits", 3, 2, 9, 640))
            .expect("y");
        drop(l);
        let e = LedgerFile::open(&dir, "digits", 6).expect_err("another history");
        assert!(e.to_string().contains("does not hold"), "{e}");
    }

    #[test]
    fn the_file_is_created_appended_and_reopened() {
        let temp = Temp::new("reopen");
        let dir = temp.0.clone();
        let (mut l, note) = LedgerFile::open(&dir, "digits", 1).expect("open");
        assert_eq!(note, None);
        assert_eq!(fs::read(l.path()).expect("file"), header("digits"));
        assert_eq!((l.count(), l.head()), (0, genesis("digits")));
        let a = l
            .append(500, 3, "example.org", &receipt("digits", 1, 2, 5, 640))
            .expect("a");
        // The clock going back is clamped to the last entry's time.
        let b = l
            .append(400, 0, "", &receipt("digits", 3, 2, 5, 640))
            .expect("b");
        assert_eq!((a.index, b.index, b.time_ms), (0, 1, 500));
        l.append(600, 255, "", &receipt("digits", 1, 2, 7, 640))
            .expect("c");
        let links: Vec<u8> = l.entries().iter().map(|e| e.links).collect();
        assert_eq!(links, [3, 0, 255]);
        assert!(l.has(&key(2).public(), &key(1).public(), 5));
        assert!(!l.has(&key(2).public(), &key(1).public(), 6));
        assert_eq!(l.last_round(&key(2).public(), &key(1).public()), Some(7));
        assert_eq!(l.last_round(&key(1).public(), &key(2).public()), None);
        // What would make the ledger invalid is refused, and the file stays as it was.
        let len = l.byte_len();
        let dup = l
            .append(700, 0, "", &receipt("digits", 1, 2, 5, 1))
            .expect_err("duplicate");
        assert_eq!(dup.kind(), io::ErrorKind::AlreadyExists);
        for (site, r) in [
            ("", receipt("letters", 1, 2, 8, 640)),
            ("Example.org", receipt("digits", 1, 2, 8, 640)),
            ("", b"SHOALRC1".to_vec()),
        ] {
            let e = l.append(700, 0, site, &r).expect_err("refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        }
        assert_eq!((l.count(), l.byte_len()), (3, len));
        let bytes = fs::read(l.path()).expect("file");
        assert_eq!(bytes.len() as u64, len);
        let v = verify(&bytes).expect("valid");
        assert_eq!(v.entries, l.entries());
        assert_eq!(v.head, l.head());
        let head = l.head();
        drop(l);
        let (l, note) = LedgerFile::open(&dir, "digits", 2).expect("reopen");
        assert_eq!(note, None);
        assert_eq!((l.count(), l.head()), (3, head));
        assert_eq!(l.entries()[0].links, 3);
        assert_eq!(l.last_round(&key(2).public(), &key(1).public()), Some(7));
        assert!(LedgerFile::open(&dir, "../digits", 3).is_err());
        assert!(LedgerFile::open(&dir, "", 3).is_err());
    }

    #[test]
    fn a_corrupt_file_is_quarantined_whole_cut_to_its_valid_prefix_and_continued() {
        let temp = Temp::new("corrupt");
        let dir = temp.0.clone();
        let (mut l, _) = LedgerFile::open(&dir, "digits", 1).expect("open");
        for (round, rx) in [(5, 1), (5, 3), (6, 1), (6, 3)] {
            l.append(round * 100, 0, "", &receipt("digits", rx, 2, round, 640))
                .expect("append");
        }
        let path = l.path().to_path_buf();
        drop(l);
        let good = fs::read(&path).expect("file");
        let v = verify(&good).expect("valid");
        assert_eq!(v.entries.len(), 4);
        // Entry 2's receipt altered, and a torn write at the end.
        let entry_len = (good.len() - header("digits").len()) / 4;
        let start2 = header("digits").len() + 2 * entry_len;
        let mut bad = good.clone();
        bad[start2 + 100] ^= 0x40;
        bad.extend_from_slice(&[7, 0, 0]);
        fs::write(&path, &bad).expect("write");

        let (mut l, note) = LedgerFile::open(&dir, "digits", 1234).expect("reopen");
        let note = note.expect("quarantine is reported");
        assert!(note.contains("entry 2"), "{note}");
        assert!(note.contains("digits.ledger.bad-1234"), "{note}");
        assert_eq!(
            fs::read(dir.join("digits.ledger.bad-1234")).expect("bad"),
            bad
        );
        assert_eq!(fs::read(&path).expect("file"), good[..start2]);
        assert_eq!((l.count(), l.head()), (2, v.entries[1].hash));
        // Appends continue the chain from the kept prefix: the result is valid.
        l.append(50, 0, "", &receipt("digits", 1, 2, 6, 640))
            .expect("append");
        l.append(900, 0, "", &receipt("digits", 3, 2, 6, 640))
            .expect("append");
        let after = verify(&fs::read(&path).expect("file")).expect("valid");
        assert_eq!(after.entries.len(), 4);
        assert_eq!(
            after.entries[2].time_ms, 500,
            "clamped to the kept head's time"
        );
        assert_eq!(after.head, l.head());
        drop(l);

        // A second quarantine in the same millisecond does not overwrite the first.
        let mut bad2 = fs::read(&path).expect("file");
        bad2.push(0);
        fs::write(&path, &bad2).expect("write");
        let (l, note) = LedgerFile::open(&dir, "digits", 1234).expect("reopen");
        assert!(note.expect("reported").contains("bad-1234-1"));
        assert_eq!(
            fs::read(dir.join("digits.ledger.bad-1234")).expect("first"),
            bad
        );
        assert_eq!(
            fs::read(dir.join("digits.ledger.bad-1234-1")).expect("second"),
            bad2
        );
        assert_eq!(l.count(), 4);
        drop(l);

        // A header naming another task, or no header: the whole file goes aside.
        for (i, content) in [header("letters"), b"garbage".to_vec()]
            .into_iter()
            .enumerate()
        {
            fs::write(&path, &content).expect("write");
            let now = 2000 + i as u64;
            let (l, note) = LedgerFile::open(&dir, "digits", now).expect("reopen");
            assert!(note.expect("reported").contains("entry 0 at byte 0"));
            assert_eq!(
                fs::read(dir.join(format!("digits.ledger.bad-{now}"))).expect("bad"),
                content
            );
            assert_eq!(fs::read(&path).expect("file"), header("digits"));
            assert_eq!((l.count(), l.head()), (0, genesis("digits")));
        }
    }
}
