//! The ledger's public endpoints (docs/protocol.md, "Receipts, the ledger and credits"):
//! entries by page, the file itself for offline verification, and the credits computed
//! from it. Open to anyone who can reach the server: receipts hold keys, rounds and
//! sample counts, never weights or data.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use shoal_shared::learn::identity::{Identity, hex};
use shoal_shared::trust::credits::{self, Credits};
use shoal_shared::trust::head::SignedHead;
use shoal_shared::trust::ledger::LedgerFile;

use crate::signaling::{AddressCounts, AddressShare, Hub};

/// Most entries on one page.
pub const MAX_PAGE: usize = 500;
/// Most keys and sites listed in the credits.
const CREDITS_LISTED: usize = 100;
/// Credits are recomputed at most this often (they cost a pass over the ledger).
const CREDITS_EVERY: Duration = Duration::from_secs(2);
/// ... and at most once per this many times as long as the last computation took: a
/// computation (and a ledger file's build) holds the ledger's lock, which receipts and
/// pages wait for, for about a second at a million entries, so a request every 2 s from
/// anyone held it half the time.
pub const BUSY_SHARE: u32 = 10;

/// How long a computation (or build) that took `took` stands: `least`, or
/// [`BUSY_SHARE`] times `took`, whichever is longer.
pub fn stands_for(least: Duration, took: Duration) -> Duration {
    least.max(took.saturating_mul(BUSY_SHARE))
}

/// Credits as computed at a time (and how long that took), at an entry count.
type Computed = (Instant, Duration, u64, [u8; 32], Arc<Ranked>);

/// Credits and each credited key's place among them: a `?key=` lookup is then one hash
/// lookup, not two passes over every credited key on an async thread (a few ms each at
/// half a million keys, asked for by anyone, without a place).
struct Ranked {
    credits: Credits,
    index: std::collections::HashMap<[u8; 32], usize>,
}

impl Ranked {
    fn new(credits: Credits) -> Self {
        let index = credits
            .by_key
            .iter()
            .enumerate()
            .map(|(i, k)| (k.key, i))
            .collect();
        Self { credits, index }
    }
}

/// A place among the [`LEDGER_READS`] and its address's (and IPv6 /48's) share, given
/// back when dropped.
type ReadPlace = (tokio::sync::OwnedSemaphorePermit, Shares);

/// A group's share of something scarce, and its IPv6 /48's.
type Shares = (AddressShare, Option<AddressShare>);

/// Takes `group`'s place among at most `share`, counting one IPv6 /48 as one address:
/// the ledger's places are few (8 reads, one download per address), and a /48's 65,536 /64s would
/// otherwise each have an address's share of them.
fn network_share(counts: &AddressCounts, group: u128, share: usize) -> Option<Shares> {
    crate::signaling::take_shares_of(counts, group, share, share)
}

/// The credits of each task, as last computed.
#[derive(Default)]
pub struct CreditsCache(Mutex<std::collections::HashMap<String, Computed>>);

/// Pages and credits computed at once, each on a blocking thread that may wait for the
/// ledger's lock behind an append's fsync; more get 503 (so that a flood of requests
/// cannot take the blocking threads the file service also uses).
pub const LEDGER_READS: usize = 8;
/// Of the [`LEDGER_READS`] places, how many one address group may hold by default (the
/// server's `--ledger-reads-per-address`): a client with many connections cannot take
/// them all and leave every other reader `503`.
pub const LEDGER_READS_PER_ADDRESS: usize = 2;

/// The file is built at most this often (a build reads every segment under the ledger's
/// lock, which receipts wait for); in between, downloads get the last build.
const FILE_EVERY: Duration = Duration::from_secs(2);
/// A download is cut when it takes longer than this plus a second per [`FILE_MIN_RATE`]
/// bytes: a reader that trickles cannot hold its address's share (and the bytes) for long.
const FILE_GRACE: Duration = Duration::from_secs(30);
/// Bytes a second a download must average, after [`FILE_GRACE`].
const FILE_MIN_RATE: u64 = 64 * 1024;
/// Bytes written to the connection at a time.
const FILE_CHUNK: usize = 64 * 1024;

/// A ledger file as built: when (and how long the build took), at what entry count, its
/// bytes, and a token that each download of it holds.
type Built = (Instant, Duration, u64, Bytes, Arc<()>);

/// The ledger file of each task as last built, and the downloads running per address.
///
/// No bound on downloads in all: they share one copy of the file's bytes (a build is kept
/// while any download of it runs), so a download costs a connection, which the server
/// bounds per address and in all, not memory. A global bound let a few addresses reading
/// just above the connections' rate floor (a download's deadline is about an hour for a
/// full ledger's 245 MB) keep every auditor out for that long, again and again: 32
/// slots, 32 addresses.
#[derive(Default)]
pub struct FileCache {
    built: Mutex<std::collections::HashMap<String, Built>>,
    /// Held while a build is looked at or made: requests that find no fresh build wait
    /// for it here, off the blocking threads, one at a time.
    building: Arc<tokio::sync::Mutex<()>>,
    /// Downloads running per address group (entries at zero are removed).
    by_address: AddressCounts,
}

/// Shared by the ledger routes.
#[derive(Clone)]
pub struct LedgerState {
    /// The signaling state (it holds the ledgers).
    pub hub: Arc<Hub>,
    /// Credits computed lately.
    pub cache: Arc<CreditsCache>,
    /// Ledger files built lately, and the downloads per address.
    pub files: Arc<FileCache>,
    /// Pages and credits being computed ([`LEDGER_READS`] at once).
    pub reads: Arc<tokio::sync::Semaphore>,
    /// Places held per address group (entries at zero are removed).
    reads_by_address: AddressCounts,
}

impl LedgerState {
    /// The routes' state over `hub`'s ledgers.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            hub,
            cache: Arc::default(),
            files: Arc::default(),
            reads: Arc::new(tokio::sync::Semaphore::new(LEDGER_READS)),
            reads_by_address: AddressCounts::default(),
        }
    }

    /// One of the [`LEDGER_READS`] places for a request from address `group`, within
    /// the group's share, or the answer to give without one.
    fn read_place(&self, group: u128) -> Result<ReadPlace, Box<Response>> {
        let share = self.hub.config().ledger_reads_per_address;
        let Some(share) = network_share(&self.reads_by_address, group, share) else {
            return Err(Box::new(retry_later(
                StatusCode::TOO_MANY_REQUESTS,
                "too many ledger requests from this address at once; try again shortly",
            )));
        };
        let permit = Arc::clone(&self.reads).try_acquire_owned().map_err(|_| {
            Box::new(retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many ledger requests at once; try again shortly",
            ))
        })?;
        Ok((permit, share))
    }
}

fn refuse(code: StatusCode, message: &str) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}

/// [`refuse`], asking the client to try again in 5 seconds.
fn retry_later(code: StatusCode, message: &str) -> Response {
    ([(header::RETRY_AFTER, "5")], refuse(code, message)).into_response()
}

fn ledger_of(s: &LedgerState, task: &str) -> Result<Arc<Mutex<LedgerFile>>, Box<Response>> {
    s.hub.ledgers.get(task).cloned().ok_or_else(|| {
        Box::new(refuse(
            StatusCode::NOT_FOUND,
            &format!("no ledger for task {task:?} on this server"),
        ))
    })
}

fn lock(l: &Mutex<LedgerFile>) -> std::sync::MutexGuard<'_, LedgerFile> {
    l.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `?from=I&limit=N`.
#[derive(Deserialize)]
pub struct Page {
    from: Option<u64>,
    limit: Option<usize>,
}

/// `GET /api/tasks/{task}/ledger`: a page of entries, the count and the head.
pub async fn page(
    State(s): State<LedgerState>,
    Path(task): Path<String>,
    Query(q): Query<Page>,
    request: axum::extract::Request,
) -> Response {
    let ledger = match ledger_of(&s, &task) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return refuse(StatusCode::BAD_REQUEST, &format!("limit: 1..={MAX_PAGE}"));
    }
    let place = match s.read_place(crate::signaling::request_group(request.extensions())) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    // The ledger's lock may be held by an append's fsync: wait for it off the async
    // threads.
    let key = s.hub.head_key.clone();
    let body = tokio::task::spawn_blocking(move || {
        let _place = place;
        page_body(&task, &mut lock(&ledger), key.as_ref(), q.from, limit)
    })
    .await;
    match body {
        Ok(b) => Json(b).into_response(),
        Err(_) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the ledger could not be read",
        ),
    }
}

fn page_body(
    task: &str,
    l: &mut LedgerFile,
    key: Option<&Identity>,
    from: Option<u64>,
    limit: usize,
) -> serde_json::Value {
    let from = from.unwrap_or(0).min(l.count()) as usize;
    let entries: Vec<_> = l.entries()[from..]
        .iter()
        .take(limit)
        .map(|e| {
            json!({
                "index": e.index,
                "hash": hex(&e.hash),
                "time_ms": e.time_ms,
                "links": e.links,
                "site": e.site,
                "round": e.receipt.round,
                "sender": hex(&e.receipt.sender),
                "receiver": hex(&e.receipt.receiver),
                "samples": e.receipt.samples,
                "flags": e.receipt.flags,
                "receipt": hex(&e.receipt_bytes),
            })
        })
        .collect();
    // The head, signed by the server's key: what peers remember and gossip.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let signed = key
        .filter(|_| l.count() > 0)
        .map(|k| hex(&SignedHead::sign(k, task, l.count(), l.head(), now).encode()));
    // What it signs is marked beside the ledger, so that a ledger cut below it (or put
    // back to an older copy) stays closed at the next start.
    if signed.is_some()
        && let Err(e) = l.mark_signed(now)
    {
        tracing::warn!(task, "could not mark the signed head: {e}");
    }
    json!({
        "task": task,
        "count": l.count(),
        "head": hex(&l.head()),
        "signed_head": signed,
        "server_key": key.map(|k| hex(&k.public())),
        "entries": entries,
    })
}

/// `GET /api/tasks/{task}/ledger/file`: the ledger file as written and synced so far (at
/// most [`FILE_EVERY`] old), to the configured share of readers per address, each cut
/// when it reads slower than [`FILE_MIN_RATE`] after [`FILE_GRACE`].
pub async fn file(
    State(s): State<LedgerState>,
    Path(task): Path<String>,
    request: axum::extract::Request,
) -> Response {
    let ledger = match ledger_of(&s, &task) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let group = crate::signaling::request_group(request.extensions());
    let per_address = s.hub.config().ledger_downloads_per_address;
    let Some(share) = network_share(&s.files.by_address, group, per_address) else {
        return retry_later(
            StatusCode::TOO_MANY_REQUESTS,
            "a ledger download from this address is still running; try again when it ends",
        );
    };
    let Some((bytes, build)) = file_bytes(&s.files, &task, ledger).await else {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the ledger could not be read",
        );
    };
    let len = bytes.len();
    let deadline = Instant::now() + FILE_GRACE + Duration::from_secs(len as u64 / FILE_MIN_RATE);
    // The address's share goes with the body: freed when the last byte is
    // out or the connection goes. Past the deadline the body fails, so the reader sees a
    // cut, not a short file.
    let slot = (share, build);
    let chunks = futures_util::stream::unfold((bytes, 0, slot), move |(b, at, slot)| async move {
        if at >= b.len() {
            return None;
        }
        if Instant::now() > deadline {
            let cut = std::io::Error::new(std::io::ErrorKind::TimedOut, "ledger download too slow");
            return Some((Err(cut), (b.slice(0..0), 0, slot)));
        }
        let end = (at + FILE_CHUNK).min(b.len());
        Some((Ok(b.slice(at..end)), (b, end, slot)))
    });
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CACHE_CONTROL, "no-store".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(chunks),
    )
        .into_response()
}

/// The task's ledger file, and the token a download of it holds: the last build when it
/// is younger than [`FILE_EVERY`] (or [`BUSY_SHARE`] times as long as it took to build,
/// see [`stands_for`]), the ledger has no entry since, or a download of it is
/// still running; else a new one (every segment as one file). So the server holds one
/// build at a time, not one per download (four slow downloads that each started after
/// an append pinned four copies of the file).
async fn file_bytes(
    files: &Arc<FileCache>,
    task: &str,
    ledger: Arc<Mutex<LedgerFile>>,
) -> Option<(Bytes, Arc<()>)> {
    // A build still fresh, or still read by a download, is served as it is: without the
    // ledger's lock or a blocking thread (each download took both, so one per address
    // could fill the blocking threads, waiting on the lock receipts' appends take).
    if let Some(hit) = built(files, task, None) {
        return Some(hit);
    }
    // Held by the blocking work itself, not by this request: a client that leaves while
    // a build runs must not let the next one start another beside it.
    let building = Arc::clone(&files.building).lock_owned().await;
    if let Some(hit) = built(files, task, None) {
        return Some(hit);
    }
    let (files, task) = (Arc::clone(files), task.to_string());
    // Off the async workers: the ledger's lock waits for a receipt's disk sync, and a
    // build reads every segment.
    tokio::task::spawn_blocking(move || {
        let _building = building;
        let l = lock(&ledger);
        let count = l.count();
        if let Some(hit) = built(&files, &task, Some(count)) {
            return Some(hit);
        }
        let started = Instant::now();
        let bytes = Bytes::from(l.file_bytes().ok()?);
        drop(l);
        let took = started.elapsed();
        let token = Arc::new(());
        files
            .built
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                task,
                (
                    Instant::now(),
                    took,
                    count,
                    bytes.clone(),
                    Arc::clone(&token),
                ),
            );
        Some((bytes, token))
    })
    .await
    .ok()
    .flatten()
}

/// `task`'s last build, if it may be served: built within [`FILE_EVERY`] (or as many
/// times as long as it took), still read by a download, or (`count`: the ledger's entries
/// now) of every entry.
fn built(files: &FileCache, task: &str, count: Option<u64>) -> Option<(Bytes, Arc<()>)> {
    let built = files.built.lock().unwrap_or_else(PoisonError::into_inner);
    let (at, took, n, b, token) = built.get(task)?;
    (at.elapsed() < stands_for(FILE_EVERY, *took)
        || count == Some(*n)
        || Arc::strong_count(token) > 1)
        .then(|| (b.clone(), Arc::clone(token)))
}

/// `?key=HEX`.
#[derive(Deserialize)]
pub struct Who {
    key: Option<String>,
}

/// `GET /api/tasks/{task}/credits`: credits per key and per site (the top
/// [`CREDITS_LISTED`] of each), and with `key` that key's credit and rank.
pub async fn credits(
    State(s): State<LedgerState>,
    Path(task): Path<String>,
    Query(q): Query<Who>,
    request: axum::extract::Request,
) -> Response {
    let ledger = match ledger_of(&s, &task) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let me = match q.key.as_deref().map(shoal_shared::protocol::from_hex) {
        None => None,
        Some(Some(k)) if k.len() == 32 => Some(<[u8; 32]>::try_from(k).unwrap_or([0; 32])),
        Some(_) => return refuse(StatusCode::BAD_REQUEST, "key: 64 hex digits"),
    };
    let place = match s.read_place(crate::signaling::request_group(request.extensions())) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    // Off the async threads: the ledger's lock may be held by an fsync. The cache's lock
    // is held while credits are computed, so concurrent requests wait for one
    // computation instead of each running its own.
    let (cache, task2) = (Arc::clone(&s.cache), task.clone());
    let computed = tokio::task::spawn_blocking(move || {
        let _place = place;
        let mut cache = cache.0.lock().unwrap_or_else(PoisonError::into_inner);
        // The count and head answered are those of the entries the credits were
        // computed from (a cached computation's, not the ledger's now): anyone rerunning
        // the rule on that many entries gets the same numbers.
        let count = lock(&ledger).count();
        match cache.get(&task2) {
            Some((at, took, n, head, c))
                if *n == count || at.elapsed() < stands_for(CREDITS_EVERY, *took) =>
            {
                (*n, *head, Arc::clone(c))
            }
            _ => {
                let l = lock(&ledger);
                let started = Instant::now();
                let (count, head) = (l.count(), l.head());
                let c = Arc::new(Ranked::new(credits::compute(l.entries())));
                drop(l);
                let took = started.elapsed();
                cache.insert(task2, (Instant::now(), took, count, head, Arc::clone(&c)));
                (count, head, c)
            }
        }
    })
    .await;
    let Ok((count, head, ranked)) = computed else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "credits failed");
    };
    let c = &ranked.credits;
    let keys: Vec<_> = c
        .by_key
        .iter()
        .take(CREDITS_LISTED)
        .map(|k| json!({ "key": hex(&k.key), "credit": k.credit, "rounds": k.rounds }))
        .collect();
    let sites: Vec<_> = c
        .by_site
        .iter()
        .take(CREDITS_LISTED)
        .map(|k| json!({ "site": k.site, "credit": k.credit }))
        .collect();
    let mut body = json!({
        "task": task,
        "count": count,
        "head": hex(&head),
        "ranked": c.by_key.len(),
        "keys": keys,
        "sites": sites,
    });
    if let Some(key) = me {
        let at = ranked.index.get(&key).copied();
        let mine = at.and_then(|i| c.by_key.get(i));
        body["me"] = json!({
            "key": hex(&key),
            "credit": mine.map_or(0, |k| k.credit),
            "rounds": mine.map_or(0, |k| k.rounds),
            "rank": at.map(|i| i + 1),
        });
    }
    Json(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(name: &str) -> (LedgerState, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("shoal-ledger-{name}-{}", std::process::id()));
        let config = crate::SignalingConfig {
            ledger_dir: Some(dir.clone()),
            ..crate::SignalingConfig::default()
        };
        (
            LedgerState::new(Hub::new(config, &["digits".into()], &[], None)),
            dir,
        )
    }

    /// Appends a receipt of round `round` (its receiver's key from the round) to `ledger`.
    fn append_receipt(ledger: &Mutex<LedgerFile>, round: u64) {
        use shoal_shared::learn::identity::Identity;
        use shoal_shared::trust::receipt::Receipt;
        let rx = Identity::from_seed([round as u8; 32]);
        let sender = Identity::from_seed([99; 32]).public();
        let r = Receipt::sign(&rx, "digits", round, sender, 160, [7; 32], 0);
        lock(ledger)
            .append(1000 + round, 2, "", &r.encode())
            .expect("append");
    }

    fn task() -> Path<String> {
        Path("digits".to_string())
    }

    fn first_page() -> Query<Page> {
        Query(Page {
            from: None,
            limit: None,
        })
    }

    /// A request as `serve` hands it on: with the address it came from.
    fn from(ip: [u8; 4]) -> axum::extract::Request {
        let mut r = axum::extract::Request::new(Body::empty());
        let addr = std::net::SocketAddr::from((ip, 40000));
        r.extensions_mut().insert(axum::extract::ConnectInfo(addr));
        r
    }

    fn group(ip: [u8; 4]) -> u128 {
        crate::signaling::address_group(std::net::IpAddr::from(ip))
    }

    /// With every place taken (slow pages and credits waiting for the ledger's lock),
    /// a further request is answered at once, not queued on a blocking thread.
    #[tokio::test]
    async fn ledger_reads_past_their_places_get_503_at_once() {
        let (s, dir) = state("reads");
        let held: Vec<_> = (0..LEDGER_READS as u8)
            .map(|i| s.read_place(group([10, 0, 0, i])).expect("a place"))
            .collect();
        let me = [192, 0, 2, 1];
        let busy = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(page_and_credits(&s, me).await, (busy, busy));
        drop(held);
        let ok = StatusCode::OK;
        assert_eq!(page_and_credits(&s, me).await, (ok, ok));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A page, then the credits, asked for from `ip`: their statuses (a refusal's also
    /// says when to try again).
    async fn page_and_credits(s: &LedgerState, ip: [u8; 4]) -> (StatusCode, StatusCode) {
        let who = Query(Who { key: None });
        let p = page(State(s.clone()), task(), first_page(), from(ip)).await;
        let c = credits(State(s.clone()), task(), who, from(ip)).await;
        for r in [&p, &c] {
            if !r.status().is_success() {
                assert_eq!(r.headers()[header::RETRY_AFTER], "5");
            }
        }
        (p.status(), c.status())
    }

    /// One IPv6 /48 holds one address's share of the places, not one per /64 (its /64s
    /// took every place, each within its own share).
    #[tokio::test]
    async fn an_ipv6_48_holds_one_addresss_share_of_the_ledger_reads() {
        let (s, dir) = state("reads48");
        let v6 = |net48: u128, net64: u128| (net48 << 80) | (net64 << 64);
        let held: Vec<_> = (0..LEDGER_READS_PER_ADDRESS as u128)
            .map(|i| {
                s.read_place(v6(0x2001_0db8_0001, i))
                    .expect("a place within the share")
            })
            .collect();
        let refused = s.read_place(v6(0x2001_0db8_0001, 99)).map(|_| ());
        assert_eq!(
            refused.map_err(|r| r.status()),
            Err(StatusCode::TOO_MANY_REQUESTS),
            "another /64 of the same /48"
        );
        assert!(s.read_place(v6(0x2001_0db8_0002, 0)).is_ok(), "another /48");
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// While a download of the ledger file runs, later downloads get the same build,
    /// whatever was appended since: the server holds one copy, not one per download.
    #[tokio::test]
    async fn a_file_build_in_use_is_served_again_not_built_anew() {
        let (s, dir) = state("builds");
        let ledger = ledger_of(&s, "digits").unwrap_or_else(|_| panic!("a ledger"));
        let append = |round: u64| append_receipt(&ledger, round);
        append(1);
        let (first, running) = file_bytes(&s.files, "digits", Arc::clone(&ledger))
            .await
            .expect("a build");
        append(2);
        tokio::time::sleep(FILE_EVERY + Duration::from_millis(100)).await;
        let (again, token) = file_bytes(&s.files, "digits", Arc::clone(&ledger))
            .await
            .expect("a build");
        assert_eq!(again, first, "the build a download still reads");
        drop((running, token));
        let (fresh, _) = file_bytes(&s.files, "digits", Arc::clone(&ledger))
            .await
            .expect("a build");
        assert!(
            fresh.len() > first.len(),
            "built anew once no download holds it"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A download of a build still fresh or in use takes neither the ledger's lock nor a
    /// blocking thread: with the lock held elsewhere (an append's disk sync, a build of a
    /// large ledger), it is served at once.
    #[tokio::test]
    async fn a_build_in_use_is_served_without_the_ledgers_lock() {
        let (s, dir) = state("unlocked");
        let ledger = ledger_of(&s, "digits").unwrap_or_else(|_| panic!("a ledger"));
        append_receipt(&ledger, 1);
        let (first, _running) = file_bytes(&s.files, "digits", Arc::clone(&ledger))
            .await
            .expect("a build");
        // The lock held by another thread until told.
        let (locked, release) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let holder = {
            let ledger = Arc::clone(&ledger);
            std::thread::spawn(move || {
                let _held = lock(&ledger);
                locked.0.send(()).expect("the test waits");
                let _ = release.1.recv();
            })
        };
        locked.1.recv().expect("locked");
        let served = tokio::time::timeout(
            Duration::from_secs(2),
            file_bytes(&s.files, "digits", Arc::clone(&ledger)),
        )
        .await;
        release.0.send(()).expect("the holder waits");
        holder.join().expect("the holder");
        let served = served.expect("served while the ledger's lock is held");
        assert_eq!(served.expect("a build").0, first);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The credits answer the count and head of the entries they were computed from:
    /// served from the cache after an append, they say the count before it (they said
    /// the ledger's count now, with numbers of fewer entries).
    #[tokio::test]
    async fn credits_name_the_entries_they_were_computed_from() {
        let (s, dir) = state("credits-count");
        let ledger = ledger_of(&s, "digits").unwrap_or_else(|_| panic!("a ledger"));
        let append = |round: u64| append_receipt(&ledger, round);
        let count = || async {
            let who = Query(Who { key: None });
            let r = credits(State(s.clone()), task(), who, from([192, 0, 2, 1])).await;
            let body = axum::body::to_bytes(r.into_body(), 1 << 20)
                .await
                .expect("a body");
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            v["count"].as_u64().expect("a count")
        };
        append(1);
        assert_eq!(count().await, 1);
        append(2);
        assert_eq!(count().await, 1, "the cached computation's count");
        tokio::time::sleep(CREDITS_EVERY + Duration::from_millis(100)).await;
        assert_eq!(count().await, 2, "computed anew");
        // A computation that took a second (a million entries: the ledger's lock held
        // that long) stands ten: anyone asking every 2 s held the lock half the time.
        s.cache
            .0
            .lock()
            .expect("the cache")
            .get_mut("digits")
            .expect("computed")
            .1 = Duration::from_secs(1);
        append(3);
        tokio::time::sleep(CREDITS_EVERY + Duration::from_millis(100)).await;
        assert_eq!(count().await, 2, "a slow computation stands longer");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// One address (a client with many connections) holds at most its share of the
    /// places: its next request is refused `429` while another address is served.
    #[tokio::test]
    async fn one_address_holds_at_most_its_share_of_the_ledger_reads() {
        let (s, dir) = state("shares");
        let greedy = [192, 0, 2, 1];
        let held: Vec<_> = (0..LEDGER_READS_PER_ADDRESS)
            .map(|_| {
                s.read_place(group(greedy))
                    .expect("a place within the share")
            })
            .collect();
        let refused = StatusCode::TOO_MANY_REQUESTS;
        assert_eq!(page_and_credits(&s, greedy).await, (refused, refused));
        let other = [198, 51, 100, 7];
        let r = page(State(s.clone()), task(), first_page(), from(other)).await;
        assert_eq!(r.status(), StatusCode::OK);
        drop(held);
        // A request that was served gives its share back: more in a row than the share
        // are all served, and no address holds a place afterwards.
        for _ in 0..=LEDGER_READS_PER_ADDRESS {
            let ok = StatusCode::OK;
            assert_eq!(page_and_credits(&s, greedy).await, (ok, ok));
        }
        assert!(s.reads_by_address.lock().expect("the counts").is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
