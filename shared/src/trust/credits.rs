//! Credits: what each key and each site contributed, computed from the ledger alone by a
//! fixed rule that anyone can rerun (see "Credits" in docs/protocol.md):
//!
//! 1. Group entries by `(sender, round)`. A group counts when receipts from at least
//!    `max(`[`QUORUM`]`, ceil(L / 2))` distinct receivers are in it, `L` being the
//!    upper median of its entries' `links` (the sender's identified neighbours as each
//!    receipt was taken; of `n` sorted ascending, the `floor(n / 2)`-th from 0). (The
//!    largest let one receiver that held its receipts until the sender's links peaked
//!    raise the quorum past its honest receipts: a minority of one voided them.)
//! 2. Its claim is the `q`-th largest of its receipts' `samples`, `q` being that quorum:
//!    the most that a quorum of its receivers vouch for. (The lower median let receivers
//!    that signed a claim of 1 sample, as many as the honest ones, take an honest
//!    sender's credit to nothing; now they would have to be a quorum themselves.)
//! 3. Per round, with `m` the lower median of the counted groups' claims and `t` the
//!    largest claim once the `floor(n / 4)` largest of its `n` claims are set aside, a
//!    group is credited `min(claim, 2 m, t)` samples.
//! 4. A key's credit is the sum over its groups; a site's, the sum over groups whose first
//!    entry carries that site. Rank: by credit, then key.
//!
//! Why half of the links: the server draws neighbours at random, so colluders are a
//! minority of almost every sender's neighbours. An honest sender's update is used, and
//! receipted, by most of its honest neighbours; sybils that only vouch for each other
//! are rarely half of one another's neighbours, so their receipts alone reach no quorum
//! (two colluders among six neighbours credit nothing). [`QUORUM`] still holds for a
//! sender with few links: one liar alone never credits anything.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::ledger::Entry;
use crate::learn::identity::PublicKey;
use crate::learn::lower_median_by;

/// The fewest distinct receivers a `(sender, round)` group needs to count.
pub const QUORUM: usize = 2;

/// The distinct receivers a `(sender, round)` group needs to count when the upper median
/// of its entries' `links` is `links`: `max(QUORUM, ceil(links / 2))`.
pub fn quorum(links: u8) -> usize {
    QUORUM.max(usize::from(links).div_ceil(2))
}

/// One key's credit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyCredit {
    /// The key that signed the updates.
    pub key: PublicKey,
    /// Samples credited, summed over its counted groups.
    pub credit: u64,
    /// How many of its `(sender, round)` groups counted.
    pub rounds: u64,
}

/// One site's credit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteCredit {
    /// The site (empty: Shoal's own pages or native peers).
    pub site: String,
    /// Samples credited to groups whose first entry carries the site.
    pub credit: u64,
}

/// Every key's and site's credit, highest first (ties by key or site, ascending). Only
/// keys and sites with a counted group are listed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credits {
    /// Per key, highest credit first.
    pub by_key: Vec<KeyCredit>,
    /// Per site, highest credit first.
    pub by_site: Vec<SiteCredit>,
}

impl Credits {
    /// `key`'s rank (1 for the highest credit), if it has any credit.
    pub fn rank_of(&self, key: &PublicKey) -> Option<usize> {
        self.by_key
            .iter()
            .position(|k| &k.key == key)
            .map(|i| i + 1)
    }
}

/// The `q`-th largest of `values` (the smallest if there are fewer than `q`): the most
/// that `q` of them reach.
fn vouched(values: &mut [u64], q: usize) -> u64 {
    values.sort_unstable_by(|a, b| b.cmp(a));
    values[q.clamp(1, values.len()) - 1]
}

/// One `(sender, round)` group of entries.
struct Group<'a> {
    /// The site of its first entry.
    site: &'a str,
    samples: Vec<u64>,
    /// Its distinct receivers (a set: a scan of a list for each entry made a group of
    /// n receivers n^2 / 2 compares, hours for an auditor's `--credits` on a ledger of
    /// one sender's million receipts).
    receivers: HashSet<PublicKey>,
    /// Its entries' `links`.
    links: Vec<u8>,
}

/// The credits of a ledger's entries (in ledger order; see the module's rule).
pub fn compute(entries: &[Entry]) -> Credits {
    // Ordered by round, so that each round's groups are together.
    let mut groups: BTreeMap<(u64, PublicKey), Group<'_>> = BTreeMap::new();
    for e in entries {
        let r = &e.receipt;
        let g = groups.entry((r.round, r.sender)).or_insert_with(|| Group {
            site: &e.site,
            samples: Vec::new(),
            receivers: HashSet::new(),
            links: Vec::new(),
        });
        g.samples.push(u64::from(r.samples));
        g.links.push(e.links);
        g.receivers.insert(r.receiver);
    }
    // The counted groups' claims, per round.
    let mut rounds: BTreeMap<u64, Vec<(PublicKey, &str, u64)>> = BTreeMap::new();
    for ((round, sender), mut g) in groups {
        // The upper median: a minority that submits its receipts when the sender's links
        // are many (or few) does not move it.
        g.links.sort_unstable();
        let q = quorum(g.links[g.links.len() / 2]);
        if g.receivers.len() >= q {
            let claim = vouched(&mut g.samples, q);
            rounds
                .entry(round)
                .or_default()
                .push((sender, g.site, claim));
        }
    }
    let mut keys: HashMap<PublicKey, (u64, u64)> = HashMap::new();
    let mut sites: HashMap<&str, u64> = HashMap::new();
    for counted in rounds.values() {
        let mut claims: Vec<u64> = counted.iter().map(|&(_, _, claim)| claim).collect();
        // Twice the median, and no more than the largest claim once the top quarter is
        // set aside: where fewer than a quarter of a round's groups inflate their claims,
        // the cap is an honest claim, and in rounds where honest claims agree (rounds of
        // steps) an inflated one gains nothing.
        let n = claims.len();
        // (Sorted in place: the top quarter is at the end.)
        let median = lower_median_by(&mut claims, u64::cmp).expect("a counted round has a claim");
        let cap = median.saturating_mul(2).min(claims[n - 1 - n / 4]);
        for &(sender, site, claim) in counted {
            let credit = claim.min(cap);
            let k = keys.entry(sender).or_default();
            k.0 = k.0.saturating_add(credit);
            k.1 += 1;
            let s = sites.entry(site).or_default();
            *s = s.saturating_add(credit);
        }
    }
    let mut by_key: Vec<KeyCredit> = keys
        .into_iter()
        .map(|(key, (credit, rounds))| KeyCredit {
            key,
            credit,
            rounds,
        })
        .collect();
    by_key.sort_by(|a, b| b.credit.cmp(&a.credit).then(a.key.cmp(&b.key)));
    let mut by_site: Vec<SiteCredit> = sites
        .into_iter()
        .map(|(site, credit)| SiteCredit {
            site: site.to_string(),
            credit,
        })
        .collect();
    by_site.sort_by(|a, b| b.credit.cmp(&a.credit).then(a.site.cmp(&b.site)));
    Credits { by_key, by_site }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::identity::Identity;
    use crate::trust::receipt::{Receipt, sha256};

    fn key(seed: u8) -> PublicKey {
        Identity::from_seed([seed; 32]).public()
    }

    /// An entry for a receipt by `receiver` of `sender`'s update of `round`, claiming
    /// `samples`, from `site`, appended while the sender had no identified neighbours
    /// recorded (`links` 0; hashes are not checked here).
    fn entry(site: &str, sender: u8, receiver: u8, round: u64, samples: u32) -> Entry {
        linked(0, site, sender, receiver, round, samples)
    }

    /// [`entry`], appended while the server linked `links` identified neighbours to the
    /// sender.
    fn linked(links: u8, site: &str, sender: u8, receiver: u8, round: u64, samples: u32) -> Entry {
        let rx = Identity::from_seed([receiver; 32]);
        let receipt = Receipt::sign(
            &rx,
            "digits",
            round,
            key(sender),
            samples,
            sha256(&[sender]),
            0,
        );
        Entry {
            index: 0,
            time_ms: 0,
            links,
            site: site.to_string(),
            receipt_bytes: receipt.encode(),
            receipt,
            hash: [0; 32],
        }
    }

    fn credit_of(c: &Credits, seed: u8) -> Option<(u64, u64)> {
        c.by_key
            .iter()
            .find(|k| k.key == key(seed))
            .map(|k| (k.credit, k.rounds))
    }

    #[test]
    fn a_group_needs_two_distinct_receivers() {
        // One receiver, even twice: nothing.
        let alone = [entry("", 1, 2, 5, 640), entry("", 1, 2, 5, 640)];
        let c = compute(&alone);
        assert_eq!(c, Credits::default());
        assert_eq!(c.rank_of(&key(1)), None);
        // A second receiver makes it count.
        let two = [entry("", 1, 2, 5, 640), entry("", 1, 3, 5, 640)];
        let c = compute(&two);
        assert_eq!(credit_of(&c, 1), Some((640, 1)));
        assert_eq!(c.rank_of(&key(1)), Some(1));
        // Receipts of different rounds or senders do not add up to a quorum.
        let apart = [
            entry("", 1, 2, 5, 640),
            entry("", 1, 3, 6, 640),
            entry("", 4, 3, 5, 640),
        ];
        assert_eq!(compute(&apart), Credits::default());
    }

    #[test]
    fn a_group_claims_the_lower_median_of_its_receipts() {
        // One receiver that signs an inflated claim moves nothing.
        let c = compute(&[entry("", 1, 2, 5, 640), entry("", 1, 3, 5, 64_000)]);
        assert_eq!(credit_of(&c, 1), Some((640, 1)));
        let c = compute(&[
            entry("", 1, 2, 5, 700),
            entry("", 1, 3, 5, 64_000),
            entry("", 1, 4, 5, 600),
        ]);
        assert_eq!(credit_of(&c, 1), Some((700, 1)));
    }

    #[test]
    fn receivers_that_sign_a_low_claim_do_not_lower_an_honest_senders_below_a_quorum() {
        // Eight links (a quorum of 4): four honest receivers sign the sender's claim of
        // 640, four colluders a claim of 1. The lower median was 1; four receivers vouch
        // for 640.
        let mut entries: Vec<Entry> = (2..6).map(|rx| linked(8, "", 1, rx, 5, 640)).collect();
        entries.extend((10..14).map(|rx| linked(8, "", 1, rx, 5, 1)));
        assert_eq!(credit_of(&compute(&entries), 1), Some((640, 1)));
        // Colluders as many as a quorum and more than the honest receivers do set it: a
        // quorum of liars could credit anything anyway.
        entries.push(linked(8, "", 1, 14, 5, 1));
        entries.remove(0);
        assert_eq!(credit_of(&compute(&entries), 1), Some((1, 1)));
    }

    #[test]
    fn a_claim_is_capped_at_twice_the_rounds_lower_median() {
        let mut entries = Vec::new();
        for (sender, samples) in [(1, 100), (2, 120), (3, 1200)] {
            for receiver in [7, 8] {
                entries.push(entry("", sender, receiver, 5, samples));
            }
        }
        let c = compute(&entries);
        // m = lower median of 100, 120, 1200 = 120: the 10x claim gets 240.
        assert_eq!(credit_of(&c, 3), Some((240, 1)));
        assert_eq!(credit_of(&c, 2), Some((120, 1)));
        assert_eq!(credit_of(&c, 1), Some((100, 1)));
        // With an even count, the lower of the two middle claims: m = 100.
        let c = compute(
            &entries[..2]
                .iter()
                .chain(&entries[4..])
                .cloned()
                .collect::<Vec<_>>(),
        );
        assert_eq!(credit_of(&c, 3), Some((200, 1)));
        // Each round has its own m; a key's credit and rounds add up across rounds.
        for receiver in [7, 8] {
            entries.push(entry("", 3, receiver, 6, 50));
            entries.push(entry("", 1, receiver, 6, 10));
        }
        let c = compute(&entries);
        // Round 6: m = lower median of 10, 50 = 10, so 3 gets min(50, 20).
        assert_eq!(credit_of(&c, 3), Some((260, 2)));
        assert_eq!(credit_of(&c, 1), Some((110, 2)));
        let order: Vec<PublicKey> = c.by_key.iter().map(|k| k.key).collect();
        assert_eq!(order, [key(3), key(2), key(1)]);
        assert_eq!(c.rank_of(&key(2)), Some(2));
    }

    #[test]
    fn a_quarter_of_inflated_claims_is_cut_to_an_honest_one() {
        // Six honest groups claim 160, two claim ten times that: the top quarter set
        // aside, the cap is 160, and inflating gained nothing.
        let mut entries = Vec::new();
        for (sender, samples) in [
            (1, 160),
            (2, 160),
            (3, 160),
            (4, 160),
            (5, 160),
            (6, 160),
            (7, 1600),
            (8, 1600),
        ] {
            for receiver in [20, 21] {
                entries.push(entry("", sender, receiver, 5, samples));
            }
        }
        let c = compute(&entries);
        assert_eq!(credit_of(&c, 7), Some((160, 1)));
        assert_eq!(credit_of(&c, 1), Some((160, 1)));
        // Three of eight are more than a quarter: the cap is then twice the median.
        for receiver in [20, 21] {
            entries.push(entry("", 6, receiver, 6, 1600));
            for sender in [1, 2, 3, 4, 5, 7, 8] {
                entries.push(entry(
                    "",
                    sender,
                    receiver,
                    6,
                    if sender > 6 { 1600 } else { 160 },
                ));
            }
        }
        let c = compute(&entries);
        assert_eq!(credit_of(&c, 7), Some((160 + 320, 2)));
    }

    #[test]
    fn sites_sum_their_groups_by_the_first_entry() {
        let entries = [
            entry("a.example", 1, 2, 5, 100),
            // Later entries of the group naming another site do not move it.
            entry("b.example", 1, 3, 5, 100),
            entry("b.example", 2, 1, 5, 100),
            entry("b.example", 2, 3, 5, 100),
            entry("a.example", 1, 2, 6, 50),
            entry("a.example", 1, 3, 6, 50),
            entry("", 3, 1, 6, 50),
            entry("", 3, 2, 6, 50),
            // Not counted: one receiver.
            entry("c.example", 4, 1, 6, 1000),
        ];
        let c = compute(&entries);
        let sites: Vec<(&str, u64)> = c
            .by_site
            .iter()
            .map(|s| (s.site.as_str(), s.credit))
            .collect();
        assert_eq!(sites, [("a.example", 150), ("b.example", 100), ("", 50)]);
        let (k1, k2) = (key(1), key(2));
        assert_eq!(credit_of(&c, 1), Some((150, 2)));
        assert_eq!(credit_of(&c, 2), Some((100, 1)));
        assert_eq!(credit_of(&c, 3), Some((50, 1)));
        assert_eq!(c.by_key.len(), 3);
        assert!(c.rank_of(&k1) < c.rank_of(&k2));
        // Equal credits rank by key, ascending.
        let ties = compute(&[
            entry("", 2, 5, 1, 10),
            entry("", 2, 6, 1, 10),
            entry("", 1, 5, 1, 10),
            entry("", 1, 6, 1, 10),
        ]);
        let first = k1.min(k2);
        assert_eq!(ties.by_key[0].key, first);
        assert_eq!(ties.rank_of(&first), Some(1));
    }

    #[test]
    fn the_quorum_is_half_the_senders_links_and_at_least_two() {
        let q: Vec<usize> = [0, 1, 2, 3, 4, 5, 6, 7, 254, 255]
            .into_iter()
            .map(quorum)
            .collect();
        assert_eq!(q, [2, 2, 2, 2, 2, 3, 3, 4, 127, 128]);
    }

    #[test]
    fn sybils_vouching_for_each_other_among_many_links_get_nothing() {
        // A sender with six identified neighbours, receipted by two of them: nothing.
        let two = [linked(6, "", 1, 2, 5, 640), linked(6, "", 1, 3, 5, 640)];
        assert_eq!(compute(&two), Credits::default());
        // A third receiver makes half of six: it counts.
        let three = [
            linked(6, "", 1, 2, 5, 640),
            linked(6, "", 1, 3, 5, 640),
            linked(6, "", 1, 4, 5, 640),
        ];
        assert_eq!(credit_of(&compute(&three), 1), Some((640, 1)));
        // The upper median of the group's entries' links sets its quorum, wherever they
        // are: links [6, 8, 8, 8, 6, 6] need four receivers (three do not count), and
        // with an entry at 0 more ([0, 6, 6, 6, 8, 8, 8]: 6) three do.
        let mut more = three.to_vec();
        for rx in [2, 3, 4] {
            more.insert(1, linked(8, "", 1, rx, 5, 640));
        }
        assert_eq!(compute(&more), Credits::default());
        more.push(linked(0, "", 1, 3, 5, 640));
        assert_eq!(credit_of(&compute(&more), 1), Some((640, 1)));
        // One receiver that holds back its receipt until the sender's links peak (12, a
        // quorum of 6) does not void the five honest ones (links 6, a quorum of 3), nor
        // take the claim down to its 1 sample.
        let mut late: Vec<Entry> = (2..=6).map(|rx| linked(6, "", 1, rx, 5, 640)).collect();
        late.push(linked(12, "", 1, 99, 5, 1));
        assert_eq!(credit_of(&compute(&late), 1), Some((640, 1)));
        // An odd count rounds up: five links need three receivers.
        let five = [linked(5, "", 1, 2, 5, 640), linked(5, "", 1, 3, 5, 640)];
        assert_eq!(compute(&five), Credits::default());
        // Few links keep the quorum of two.
        let few = [linked(4, "", 1, 2, 5, 640), linked(4, "", 1, 3, 5, 640)];
        assert_eq!(credit_of(&compute(&few), 1), Some((640, 1)));
        // Groups that fail their quorum take no part in the round's median either: here
        // m is 100 (not 10_000), so the honest sender 9 gets min(300, 200).
        let mut round = Vec::new();
        for rx in [2, 3, 4] {
            round.push(linked(6, "", 1, rx, 7, 100));
            round.push(linked(6, "", 9, rx, 7, 300));
        }
        for sybil in [20, 21, 22] {
            round.push(linked(6, "", sybil, sybil + 10, 7, 10_000));
            round.push(linked(6, "", sybil, sybil + 11, 7, 10_000));
        }
        let c = compute(&round);
        assert_eq!(credit_of(&c, 9), Some((200, 1)));
        assert_eq!(credit_of(&c, 1), Some((100, 1)));
        assert_eq!(c.by_key.len(), 2);
    }
}
