//! The peer state machine against hostile neighbours, one rule per test. Where a test
//! shows an attack, it also shows what the bare adoption rule the peers used before
//! (`Learner::adopt` on any newer model) would have done with the same message.

use super::*;
use crate::learn::{Aggregation, Compression, Compressor, Exchange, Update};

const N: usize = 64;

fn cfg() -> LearnConfig {
    LearnConfig {
        aggregation: Aggregation::Mean,
        compression: Compression::None,
        exchange: Exchange::Weights,
        local_steps: 1,
        round_deadline_ms: 1_000,
        max_staleness: 2,
        sync_every: 0,
        ..LearnConfig::default()
    }
}

fn id(seed: u8) -> Identity {
    Identity::from_seed([seed; 32])
}

fn joiner() -> Peer {
    joiner_with(cfg())
}

fn joiner_with(cfg: LearnConfig) -> Peer {
    Peer::new(cfg, "t", id(1), vec![0.5; N], PeerRole::Trainer, 0.0).expect("valid")
}

/// A peer that holds the model at `round`, with neighbours 10, 11 and 12.
fn running(round: u64) -> Peer {
    running_with(cfg(), round)
}

/// [`running`] with the learning configuration `cfg`.
fn running_with(cfg: LearnConfig, round: u64) -> Peer {
    let mut p = joiner_with(cfg);
    assert!(p.resume(snapshot(round, 0.5)));
    for n in [10, 11, 12] {
        p.handle(Event::Up(PeerId(n)), 0.0);
    }
    // It greets them once the channels have settled, and starts training.
    p.tick(GREET_AFTER_MS);
    let outs = drain(&mut p);
    assert!(
        outs.contains(&Output::Train {
            round,
            steps: 1,
            resume: false
        }),
        "{outs:?}"
    );
    p
}

/// A joiner with neighbours 10, 11 and 12 once it has asked them for the model (fewer
/// than `FETCH_ASK` up: it waits `JOIN_GRACE_MS` for more), and whom it asked.
fn asking_joiner() -> (Peer, Vec<u64>) {
    let mut p = joiner();
    for n in [10, 11, 12] {
        p.handle(Event::Up(PeerId(n)), 0.0);
    }
    p.tick(JOIN_GRACE_MS);
    let who = asked(&drain(&mut p));
    (p, who)
}

fn snapshot(round: u64, w: f32) -> Snapshot {
    Snapshot {
        round,
        weights: vec![w; N],
        momentum: vec![0.0; N],
    }
}

fn model(round: u64, w: f32) -> Vec<u8> {
    PeerMessage::Model(snapshot(round, w)).encode()
}

/// A validly signed update by `signer` for `round` (weights 0.5 everywhere).
fn update(signer: u8, round: u64) -> Vec<u8> {
    update_of(signer, round, 0.5)
}

/// A validly signed update by `signer` for `round`: weights `w` everywhere.
/// `signer`'s update for `round` with its signature's last byte flipped: a forgery.
fn forged_update(signer: u8, round: u64) -> Vec<u8> {
    let mut u = update(signer, round);
    let last = u.len() - 1;
    u[last] ^= 1;
    u
}

fn update_of(signer: u8, round: u64, w: f32) -> Vec<u8> {
    let (payload, _) = Compressor::new(Compression::None, N).encode(&[w; N]);
    PeerMessage::Update(Update::signed(&id(signer), "t", round, 8, 0.1, payload)).encode()
}

fn msg(from: u64, data: Vec<u8>) -> Event {
    Event::Message {
        from: PeerId(from),
        data,
    }
}

fn drain(p: &mut Peer) -> Vec<Output> {
    std::iter::from_fn(|| p.poll_output()).collect()
}

/// The neighbours a peer sent a model request to.
fn asked(outs: &[Output]) -> Vec<u64> {
    let req = PeerMessage::ModelRequest.encode();
    outs.iter()
        .filter_map(|o| match o {
            Output::Send { to, data } if *data == req => Some(to.0),
            _ => None,
        })
        .collect()
}

/// Asserts that the peer closed a round using `used` neighbours' updates.
fn assert_closed_using(p: &mut Peer, used: usize) {
    let outs = drain(p);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::RoundClosed(s) if s.used == used)),
        "{outs:?}"
    );
}

fn rejected(p: &Peer, why: Rejection) -> u64 {
    p.learner().stats.rejected.get(&why).copied().unwrap_or(0)
}

#[test]
fn an_unasked_model_with_a_huge_round_is_dropped_and_counted() {
    let mut p = running(5);
    p.handle(msg(10, model(1_000_000, -9.0)), 100.0);
    p.tick(200.0);
    assert_eq!(p.learner().round(), 5);
    assert!(p.weights().iter().all(|w| *w == 0.5), "model untouched");
    assert_eq!(rejected(&p, Rejection::Unasked), 1);

    // The old rule (adopt any newer model from anyone) takes it whole.
    let mut bare = Learner::new(cfg(), "t", id(1), vec![0.5; N]).expect("valid");
    assert!(bare.adopt(snapshot(5, 0.5)));
    assert!(
        bare.adopt(snapshot(1_000_000, -9.0)),
        "today's peer is corrupted"
    );
}

#[test]
fn a_neighbour_that_breaks_the_protocol_is_shunned_for_the_life_of_its_connection() {
    // 12 pushes a model nobody asked for; 11 sends a gossip mix although the task
    // exchanges weights (no honest peer sends either).
    let mut p = running(5);
    p.trained(5, &[0.49; N], 0.3, 8, 5.0).expect("finite");
    drain(&mut p);
    // 12's update for this round came first; it is discarded with the rest of 12.
    p.handle(msg(12, update(22, 5)), 8.0);
    p.handle(msg(12, model(5, 0.5)), 10.0);
    assert_eq!(rejected(&p, Rejection::Unasked), 1);
    // The driver is told to close the connection (and report it to the server, which
    // gives this peer another neighbour): once.
    assert_eq!(drain(&mut p), [Output::Drop(PeerId(12))]);
    let (mix, _) = Compressor::new(Compression::None, N).encode(&[0.5; N]);
    p.handle(
        msg(
            11,
            PeerMessage::Mix {
                round: 5,
                payload: mix,
            }
            .encode(),
        ),
        12.0,
    );
    assert_eq!(rejected(&p, Rejection::OffSchedule), 1);
    assert_eq!(drain(&mut p), [Output::Drop(PeerId(11))]);
    // The round then closes on 10's update alone, without waiting for 11 or 12 until
    // the deadline, and uses neither.
    p.handle(msg(10, update(20, 5)), 40.0);
    p.tick(50.0);
    assert_closed_using(&mut p, 1);
    assert_eq!(p.learner().round(), 6, "11 and 12 were not waited for");
    // From then on everything they send is dropped unread: updates, requests, status.
    p.tick(60.0);
    drain(&mut p);
    p.trained(6, &[0.49; N], 0.3, 8, 70.0).expect("finite");
    drain(&mut p);
    p.handle(msg(12, update(22, 6)), 75.0);
    p.handle(msg(11, update(21, 6)), 75.0);
    p.handle(msg(11, PeerMessage::ModelRequest.encode()), 76.0);
    p.handle(
        msg(12, PeerMessage::Status { contributing: true }.encode()),
        77.0,
    );
    assert_eq!(rejected(&p, Rejection::Shunned), 4);
    let outs = drain(&mut p);
    assert!(
        !outs
            .iter()
            .any(|o| matches!(o, Output::Send { to, .. } if to.0 == 11)),
        "a shunned neighbour's request is not answered: {outs:?}"
    );
    assert!(
        !outs.iter().any(|o| matches!(o, Output::Drop(_))),
        "a connection is dropped once: {outs:?}"
    );
    p.handle(msg(10, update(20, 6)), 80.0);
    p.tick(90.0);
    assert_closed_using(&mut p, 1);

    // A late answer to a request of ours is not such a push: the sender is still
    // heard.
    let mut q = running(5);
    q.handle(Event::Up(PeerId(13)), 0.0);
    // Everyone but 13 claims a far-ahead round: q is lagging and asks for the model.
    for (n, k) in [(10, 20), (11, 21), (12, 22)] {
        q.handle(msg(n, update(k, 50)), 10.0);
    }
    q.tick(20.0);
    let asked_13 = asked(&drain(&mut q));
    assert!(!asked_13.is_empty());
    // The download ends at its deadline with nothing adopted; then an answer comes.
    q.tick(20.0 + MODEL_WAIT_MS);
    let late = asked_13[0];
    q.handle(msg(late, model(50, 0.5)), 20.0 + MODEL_WAIT_MS + 100.0);
    assert_eq!(rejected(&q, Rejection::Unasked), 1);
    assert!(!q.nbrs[&PeerId(late)].shunned, "a late answer");
    // A second model from it was never asked for.
    q.handle(msg(late, model(50, 0.5)), 20.0 + MODEL_WAIT_MS + 200.0);
    assert!(q.nbrs[&PeerId(late)].shunned, "a push");
}

#[test]
fn a_neighbour_caught_lying_loses_its_answer_to_the_download_in_progress() {
    // A joiner asks 10, 11 and 12. Colluders 11 and 12 answer with one poisoned model,
    // which would be a majority of the three; but 12 also pushes a second model, so its
    // answer no longer counts, and one poisoned answer against one honest one adopts
    // nothing.
    let (mut p, asked_all) = asking_joiner();
    assert_eq!(asked_all.len(), 3, "{asked_all:?}");
    let t = JOIN_GRACE_MS;
    p.handle(msg(12, model(5, -3.0)), t + 100.0);
    p.handle(msg(12, model(5, -3.0)), t + 150.0);
    assert!(p.nbrs[&PeerId(12)].shunned);
    p.handle(msg(11, model(5, -3.0)), t + 200.0);
    p.handle(msg(10, model(5, 0.5)), t + 200.0);
    p.tick(t + 300.0);
    assert!(!p.learner().is_started(), "nothing adopted");
    assert_eq!(rejected(&p, Rejection::NoQuorum), 1);
}

#[test]
fn a_neighbour_asked_twice_may_answer_twice() {
    // A download times out before 10 answers; the retry asks 10 again. Both of its
    // answers are answers (the first one late); only a third model is a push.
    let (mut p, first) = asking_joiner();
    assert!(first.contains(&10));
    let t = JOIN_GRACE_MS + MODEL_WAIT_MS;
    p.tick(t);
    p.tick(t + FETCH_RETRY_MS);
    let again = asked(&drain(&mut p));
    assert!(again.contains(&10), "{again:?}");
    p.handle(msg(10, model(5, 0.5)), t + FETCH_RETRY_MS + 100.0);
    p.handle(msg(10, model(5, 0.5)), t + FETCH_RETRY_MS + 200.0);
    assert!(!p.nbrs[&PeerId(10)].shunned, "two answers to two requests");
    p.handle(msg(10, model(5, 0.5)), t + FETCH_RETRY_MS + 300.0);
    assert!(p.nbrs[&PeerId(10)].shunned, "a third is a push");
    // Nothing more goes to it.
    p.tick(t + FETCH_RETRY_MS + MODEL_WAIT_MS);
    assert!(
        !drain(&mut p)
            .iter()
            .any(|o| matches!(o, Output::Send { to, .. } if to.0 == 10))
    );
}

#[test]
fn a_poisoned_model_answer_loses_to_the_answers_that_agree() {
    let mut p = joiner();
    for n in [10, 11, 12] {
        p.handle(Event::Up(PeerId(n)), 0.0);
    }
    assert!(
        drain(&mut p).is_empty(),
        "nothing is written to a channel that just opened"
    );
    p.tick(GREET_AFTER_MS);
    let mut outs = drain(&mut p);
    assert!(
        asked(&outs).is_empty(),
        "their status has not had time to come"
    );
    // Once it has, it asks.
    p.tick(JOIN_GRACE_MS);
    outs.extend(drain(&mut p));
    // While joining it tells its neighbours it does not contribute yet.
    let idle = PeerMessage::Status {
        contributing: false,
    }
    .encode();
    assert_eq!(
        outs.iter()
            .filter(|o| matches!(o, Output::Send { data, .. } if *data == idle))
            .count(),
        3
    );
    let mut who = asked(&outs);
    who.sort_unstable();
    assert_eq!(
        who,
        [10, 11, 12],
        "asks its neighbours (up to five) at once"
    );
    // The liar answers first, with a model of a plausible round.
    p.handle(msg(12, model(10, -5.0)), 20.0);
    p.handle(msg(10, model(10, 0.30)), 30.0);
    assert_eq!(p.learner().round(), 0, "waits for the others");
    p.handle(msg(11, model(11, 0.31)), 40.0);
    let outs = drain(&mut p);
    assert!(
        outs.contains(&Output::Adopted { round: 10 })
            || outs.contains(&Output::Adopted { round: 11 }),
        "{outs:?}"
    );
    assert!(
        p.weights().iter().all(|w| (0.29..=0.32).contains(w)),
        "an honest model: {:?}",
        &p.weights()[..2]
    );
    assert_eq!(p.progress().phase, "training");
    let on = PeerMessage::Status { contributing: true }.encode();
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Send { data, .. } if *data == on)),
        "says it contributes once it holds the model"
    );

    // The old rule took the first answer.
    let mut bare = Learner::new(cfg(), "t", id(1), vec![0.5; N]).expect("valid");
    assert!(bare.adopt(snapshot(10, -5.0)), "today's joiner is poisoned");
}

#[test]
fn an_answer_with_an_outlying_round_is_dropped() {
    let (mut p, _) = asking_joiner();
    p.handle(msg(12, model(900_000, 0.3)), 20.0);
    p.handle(msg(10, model(10, 0.3)), 30.0);
    p.handle(msg(11, model(10, 0.3)), 40.0);
    assert_eq!(p.learner().round(), 10);
    assert_eq!(rejected(&p, Rejection::RoundOutlier), 1);
}

#[test]
fn one_far_ahead_round_claim_moves_nothing_and_a_majority_starts_a_checked_download() {
    let mut p = running(5);
    p.handle(msg(10, update(20, 5_000)), 100.0);
    p.tick(200.0);
    assert!(
        asked(&drain(&mut p)).is_empty(),
        "one neighbour's claim is not lagging"
    );
    p.handle(msg(11, update(21, 5_001)), 300.0);
    p.tick(400.0);
    let mut who = asked(&drain(&mut p));
    who.sort_unstable();
    assert_eq!(
        who,
        [10, 11, 12],
        "two of the three say we lag: ask all three"
    );
    // Only one answers: no quorum, nothing adopted, counted.
    p.handle(msg(10, model(5_000, -1.0)), 500.0);
    p.tick(500.0 + MODEL_WAIT_MS);
    assert_eq!(p.learner().round(), 5);
    assert_eq!(rejected(&p, Rejection::NoQuorum), 1);

    // The old rule: an update more than `max_staleness` ahead made the receiver ask its
    // sender, and adopt what came back.
    let mut bare = Learner::new(cfg(), "t", id(1), vec![0.5; N]).expect("valid");
    assert!(bare.adopt(snapshot(5, 0.5)));
    assert!(matches!(
        bare.receive(&update(20, 5_000)),
        Ok(Received::Update { lagging: true, .. })
    ));
    assert!(
        bare.adopt(snapshot(5_000, -1.0)),
        "today's peer follows one liar"
    );
}

/// A joiner with neighbours 10 to 14, once it has asked all five for the model.
fn joiner_asking_five() -> Peer {
    let mut p = joiner();
    for n in 10..15 {
        p.handle(Event::Up(PeerId(n)), 0.0);
    }
    p.tick(GREET_AFTER_MS);
    p.tick(2.0 * GREET_AFTER_MS);
    assert_eq!(asked(&drain(&mut p)).len(), 5);
    p
}

#[test]
fn two_liars_far_ahead_do_not_make_a_joiner_download_their_model() {
    // A joiner with five neighbours adopts the model at round 10 from all five; two
    // liars claimed round 5,000 while it joined. Its three honest neighbours have sent
    // it no update yet: two of five are not most of them.
    let mut p = joiner_asking_five();
    p.handle(msg(10, update(20, 5_000)), 300.0);
    p.handle(msg(11, update(21, 5_000)), 300.0);
    for n in 10..15 {
        p.handle(msg(n, model(10, 0.3)), 600.0);
    }
    p.tick(700.0);
    assert_eq!(p.learner().round(), 10, "adopted from the five");
    for at in [700.0, 700.0 + MODEL_WAIT_MS] {
        p.tick(at);
        assert!(
            asked(&drain(&mut p)).is_empty(),
            "two liars' claims are not lagging"
        );
    }
    // A third neighbour's claim makes it most of them: it asks all five.
    p.handle(msg(12, update(22, 5_000)), 800.0 + MODEL_WAIT_MS);
    p.tick(900.0 + MODEL_WAIT_MS);
    let mut who = asked(&drain(&mut p));
    who.sort_unstable();
    assert_eq!(who, [10, 11, 12, 13, 14]);
}

/// A lagging peer asked only the neighbours that claimed to be ahead: two colluders that
/// claimed so, beside one honest neighbour truly ahead and two level ones, made it
/// download, were two of the three it asked, and chose the model and its round (a round
/// near 2^30 left it stale for good). A download now asks every neighbour that votes:
/// those level answer too, and their agreement counts for an answer ahead (none of
/// theirs is taken). Answers past `max_staleness` beyond the lower median of the voters'
/// claimed rounds are outliers: colluders far ahead whose weights the level answers
/// agreed with set the round (2^30) otherwise.
#[test]
fn colluders_that_claim_to_be_ahead_cannot_choose_a_lagging_peers_model() {
    for (liars, liars_weights) in [(1u64 << 30, -1.0), (1 << 30, 0.49), (9, -1.0)] {
        let mut p = running(5);
        let at = GREET_AFTER_MS + 10.0;
        p.handle(msg(10, update(20, 9)), at);
        for n in [13, 14] {
            p.handle(Event::Up(PeerId(n)), at);
            p.handle(msg(n, update(n as u8 + 10, liars)), at);
        }
        p.tick(at + 10.0);
        let who = asked(&drain(&mut p));
        for &n in &who {
            let answer = match n {
                10 => model(9, 0.5),
                13 | 14 => model(liars, liars_weights),
                _ => model(5, 0.5),
            };
            p.handle(msg(n, answer), at + 100.0);
        }
        p.tick(at + 100.0 + MODEL_WAIT_MS);
        // It takes the honest model, which the level answers agree with, at the honest
        // neighbour's round: far ahead, the liars' answers are past the round the
        // voters' claims make plausible (with weights near the swarm's, the level
        // answers agreed with them, and their round was taken for good).
        assert_eq!(p.learner().round(), 9, "liars at {liars}");
        assert!(
            p.weights().iter().all(|w| *w == 0.5),
            "the colluders' model was adopted (liars at {liars}, asked {who:?})"
        );
    }
}

/// A lagging peer whose neighbours ahead are three, one silent, and two level a round
/// ahead of it: the two answers ahead and the two level ones agree, and it catches up
/// (level answers at a round or two ahead counted toward the median and made the answers
/// ahead outliers).
#[test]
fn a_lagging_peer_catches_up_with_one_neighbour_ahead_silent() {
    let mut p = running(5);
    let at = GREET_AFTER_MS + 10.0;
    for n in [13, 14] {
        p.handle(Event::Up(PeerId(n)), at);
    }
    for (n, round) in [(10, 20), (13, 20), (14, 20), (11, 6), (12, 6)] {
        p.handle(msg(n, update(n as u8 + 10, round)), at);
    }
    p.tick(at + 10.0);
    let mut who = asked(&drain(&mut p));
    who.sort_unstable();
    assert_eq!(who, [10, 11, 12, 13, 14]);
    for (n, round) in [(10, 20), (14, 20), (11, 6), (12, 6)] {
        p.handle(msg(n, model(round, 0.5)), at + 100.0);
    }
    p.tick(at + 100.0 + MODEL_WAIT_MS);
    assert_eq!(p.learner().round(), 20);
}

#[test]
fn a_connection_signs_with_one_key_for_its_life() {
    let mut p = running(5);
    p.handle(msg(10, update(20, 5)), 0.0);
    p.handle(msg(10, update(21, 6)), 10.0);
    assert_eq!(rejected(&p, Rejection::KeyChanged), 1);
    // A key moves to the connection its newest update came on (a neighbour that
    // reconnected): the old connection no longer holds it, and a replay of an update
    // already taken moves nothing.
    p.handle(msg(11, update(20, 6)), 20.0);
    assert_eq!(p.nbrs[&PeerId(11)].key, Some(id(20).public()));
    assert_eq!(p.nbrs[&PeerId(10)].key, None);
    p.handle(msg(10, update(20, 6)), 25.0);
    assert_eq!(rejected(&p, Rejection::Replay), 1);
    assert_eq!(p.nbrs[&PeerId(11)].key, Some(id(20).public()));
    // A bad signature binds nothing: the neighbour's real key still works after it.
    let mut forged = update(22, 5);
    let at = forged.len() - 1;
    forged[at] ^= 1;
    p.handle(msg(12, forged), 30.0);
    p.handle(msg(12, update(22, 5)), 40.0);
    assert_eq!(rejected(&p, Rejection::KeyChanged), 1);
    assert_eq!(rejected(&p, Rejection::BadSignature), 1);
}

#[test]
fn a_neighbour_that_relays_a_peers_first_update_does_not_keep_its_later_ones_out() {
    // Neighbour 11 relays the first update signed by neighbour 10's key before 10's own
    // copy arrives; 10's copy is then a replay. 10's next update is taken on its own
    // connection, which holds the key from then on, and the round counts it.
    let mut p = running(5);
    p.handle(msg(11, update(20, 4)), 0.0);
    p.handle(msg(10, update(20, 4)), 5.0);
    assert_eq!(rejected(&p, Rejection::Replay), 1);
    p.handle(msg(10, update(20, 5)), 10.0);
    assert_eq!(p.nbrs[&PeerId(10)].key, Some(id(20).public()));
    assert_eq!(p.nbrs[&PeerId(11)].key, None);
    assert!(p.learner().has_fresh_from(&id(20).public()));
    // The relay's copies of 10's updates are replays now; 11 may still sign its own.
    p.handle(msg(11, update(20, 5)), 15.0);
    assert_eq!(rejected(&p, Rejection::Replay), 2);
    p.handle(msg(11, update(21, 5)), 20.0);
    assert_eq!(p.nbrs[&PeerId(11)].key, Some(id(21).public()));
    assert_eq!(rejected(&p, Rejection::KeyChanged), 0);
}

#[test]
fn a_relay_that_wins_every_race_neither_holds_the_round_nor_gets_the_signers_receipts() {
    // 10 signs with key 20; 11 relays each of its updates before 10's own copy arrives.
    // 10's copy, byte for byte the update held, counts its connection as heard: the
    // round closes once 12's update is in, and the receipt for 20 goes to 10 too.
    let mut p = running(5);
    p.handle(msg(10, update(20, 4)), 0.0);
    p.trained(5, &[0.49; N], 0.3, 8, 10.0).expect("finite");
    drain(&mut p);
    p.handle(msg(11, update(20, 5)), 20.0);
    p.handle(msg(10, update(20, 5)), 21.0);
    assert_eq!(p.nbrs[&PeerId(11)].key, Some(id(20).public()));
    p.handle(msg(12, update(22, 5)), 30.0);
    p.tick(31.0);
    let outs = drain(&mut p);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::RoundClosed(s) if s.used == 2)),
        "closed once 12 was in: {outs:?}"
    );
    let kind = PeerMessage::Receipt(Vec::new()).encode()[4];
    let receipt_to = |to: u64| {
        outs.iter().any(
            |o| matches!(o, Output::Send { to: t, data } if t.0 == to && data.get(4) == Some(&kind)),
        )
    };
    assert!(receipt_to(10), "the signer's connection gets its receipt");
    // A copy that differs from the update held (another signature) counts nothing.
    let mut q = running(5);
    q.handle(msg(11, update(20, 5)), 20.0);
    let mut forged = update(20, 5);
    let last = forged.len() - 1;
    forged[last] ^= 1;
    q.handle(msg(10, forged), 21.0);
    assert_eq!(q.nbrs[&PeerId(10)].copy_of, None);
    assert!(!q.nbrs[&PeerId(10)].shunned);
    // The held update's signature over other bytes is a forgery: shunned.
    let mut forged = update(20, 5);
    let at = forged.len() - 65;
    forged[at] ^= 1;
    q.handle(msg(12, forged), 22.0);
    assert!(q.nbrs[&PeerId(12)].shunned);
}

#[test]
fn a_relay_that_took_a_signers_first_update_cannot_drop_its_later_ones_under_its_own_key() {
    // 11 relays signer 20's first update before 10 (the signer) sends it, so 11 binds 20,
    // and closes; 10's next update binds 20 to 10; 11 reopens and signs with 21: 20's
    // updates, now bound to 10's connection, stay held.
    let mut p = running(5);
    p.handle(msg(11, update(20, 5)), 0.0);
    p.handle(Event::Down(PeerId(11)), 10.0);
    p.handle(msg(10, update(20, 6)), 20.0);
    p.handle(Event::Up(PeerId(11)), 30.0);
    p.handle(msg(11, update(21, 5)), 40.0);
    assert!(p.learner().holds_current_from(&id(20).public()));
}

#[test]
fn a_relay_that_reconnects_and_signs_its_own_does_not_cost_the_signer_its_updates() {
    // 11 relays signer 20's updates (10 signs with 20) before 10's own copies arrive,
    // closes and reopens its channel, relays again when no connection holds the key,
    // closes again, and then signs with a key of its own: 20's updates stay held.
    let mut p = running(5);
    p.handle(msg(10, update(20, 4)), 0.0);
    p.handle(msg(11, update(20, 5)), 10.0);
    p.handle(msg(10, update(20, 5)), 11.0);
    p.handle(Event::Down(PeerId(11)), 20.0);
    p.handle(Event::Up(PeerId(11)), 30.0);
    p.handle(msg(11, update(20, 6)), 40.0);
    p.handle(msg(10, update(20, 6)), 41.0);
    p.handle(Event::Down(PeerId(11)), 50.0);
    p.handle(Event::Up(PeerId(11)), 60.0);
    p.handle(msg(11, update(21, 5)), 70.0);
    assert!(p.learner().holds_current_from(&id(20).public()));
}

#[test]
fn a_neighbour_that_reconnects_under_fresh_keys_keeps_one_vote() {
    // 10 sends an update for round 5 signed by 30, closes its channel, opens another and
    // sends one signed by 31, and again with 32: only the last counts. Reconnecting
    // under the same key keeps that key's update.
    let mut p = running(5);
    p.trained(5, &[0.49; N], 0.3, 8, 5.0).expect("finite");
    for (i, signer) in [30u8, 31, 32].into_iter().enumerate() {
        let t = 100.0 * i as f64;
        if i > 0 {
            p.handle(Event::Down(PeerId(10)), t);
            p.handle(Event::Up(PeerId(10)), t + 10.0);
        }
        p.handle(msg(10, update(signer, 5)), t + 20.0);
    }
    for k in [30, 31] {
        assert!(!p.learner().holds_current_from(&id(k).public()), "{k}");
    }
    assert!(p.learner().holds_current_from(&id(32).public()));
    p.handle(Event::Down(PeerId(10)), 400.0);
    p.handle(Event::Up(PeerId(10)), 410.0);
    p.handle(msg(10, update(32, 6)), 420.0);
    assert!(p.learner().holds_current_from(&id(32).public()));
    p.handle(msg(11, update(21, 5)), 430.0);
    p.tick(440.0 + 2.0 * f64::from(cfg().round_deadline_ms));
    assert_closed_using(&mut p, 2);
}

#[test]
fn two_neighbours_handing_a_key_between_them_keep_one_vote_each() {
    // 10 delivers an update signed by 30 for round 5; 11, holding no key yet, takes key
    // 30 with its round-6 update; 10 reconnects and signs round 5 again with 31. Both
    // round-5 updates are held (30's key is bound to 11's open connection), but 10's
    // connection delivered both: one vote. 12 is honest.
    let mut p = running(5);
    p.trained(5, &[0.49; N], 0.3, 8, 5.0).expect("finite");
    p.handle(msg(10, update(30, 5)), 10.0);
    p.handle(msg(11, update(30, 6)), 20.0);
    p.handle(Event::Down(PeerId(10)), 30.0);
    p.handle(Event::Up(PeerId(10)), 40.0);
    p.handle(msg(10, update(31, 5)), 50.0);
    for k in [30, 31] {
        assert!(p.learner().holds_current_from(&id(k).public()), "{k}");
    }
    p.handle(msg(12, update(32, 5)), 60.0);
    p.tick(10_000.0);
    assert_closed_using(&mut p, 2);
    assert_eq!(rejected(&p, Rejection::ExtraVote), 1);
}

#[test]
fn a_relay_that_took_a_signers_key_and_reconnects_under_its_own_drops_nothing() {
    // 11 relays signer 20's first update (round 5) before 10 (the signer) sends its
    // copy, which is recorded; 11 closes, reopens and signs round 5 with 21. 20's update stays held
    // (10 delivered it too) and the round counts three: 20's, 21's and 12's.
    let mut p = running(5);
    p.trained(5, &[0.49; N], 0.3, 8, 5.0).expect("finite");
    p.handle(msg(11, update(20, 5)), 10.0);
    p.handle(msg(10, update(20, 5)), 11.0);
    assert_eq!(p.nbrs[&PeerId(11)].key, Some(id(20).public()));
    p.handle(Event::Down(PeerId(11)), 20.0);
    p.handle(Event::Up(PeerId(11)), 30.0);
    p.handle(msg(11, update(21, 5)), 40.0);
    assert!(p.learner().holds_current_from(&id(20).public()));
    p.handle(msg(12, update(22, 5)), 50.0);
    p.tick(10_000.0);
    assert_closed_using(&mut p, 3);
}

#[test]
fn a_relay_that_wins_a_round_and_is_then_shunned_costs_the_signer_nothing() {
    // Neighbour 10 signs with key 20; 11 relays its round-5 update before 10's own copy
    // arrives (10's is then a replay), takes the key, and then breaks a rule (a mix in a
    // weights task) and is shunned: 10's round-5 update stays held for the round.
    let mut p = running(5);
    p.handle(msg(10, update(20, 4)), 0.0);
    p.handle(msg(11, update(20, 5)), 5.0);
    p.handle(msg(10, update(20, 5)), 6.0);
    assert_eq!(p.nbrs[&PeerId(11)].key, Some(id(20).public()));
    let mix = {
        let mut m = Learner::new(cfg(), "t", id(9), vec![0.5; N])
            .expect("valid")
            .mix_message();
        m[5..13].copy_from_slice(&5u64.to_le_bytes());
        m
    };
    p.handle(msg(11, mix), 7.0);
    assert_eq!(rejected(&p, Rejection::OffSchedule), 1);
    assert!(
        p.learner().has_fresh_from(&id(20).public()),
        "the signer's update is still held"
    );
}

#[test]
fn a_relay_that_wins_a_signers_first_race_and_is_then_shunned_costs_the_signer_nothing() {
    // As above, but 11's relay is the first update of key 20 this peer sees: the key is
    // bound to 11 (it moved from nowhere), and 10's copy of the update is recorded.
    // Shunned, 11 takes only what it alone delivered: 20's update stays held, and the
    // round counts it with 12's.
    let mut p = running(5);
    p.trained(5, &[0.49; N], 0.3, 8, 1.0).expect("finite");
    p.handle(msg(11, update(20, 5)), 5.0);
    p.handle(msg(10, update(20, 5)), 6.0);
    assert_eq!(p.nbrs[&PeerId(11)].key, Some(id(20).public()));
    assert!(!p.nbrs[&PeerId(11)].key_moved_in);
    p.handle(msg(11, forged_update(20, 6)), 7.0);
    assert!(p.nbrs[&PeerId(11)].shunned);
    assert!(
        p.learner().holds_current_from(&id(20).public()),
        "the signer's update is still held"
    );
    p.handle(msg(12, update(22, 5)), 8.0);
    p.tick(10_000.0);
    assert_closed_using(&mut p, 2);
    // What the shunned relay alone delivered goes with it.
    let mut q = running(5);
    q.handle(msg(11, update(23, 5)), 5.0);
    q.handle(msg(11, forged_update(23, 6)), 6.0);
    assert!(q.nbrs[&PeerId(11)].shunned);
    assert!(!q.learner().holds_current_from(&id(23).public()));
}

#[test]
fn a_colluder_that_replays_a_shunned_liars_update_keeps_one_vote() {
    // 11 delivers liar 20's update and 13 a copy of it, byte for byte; 11 is shunned,
    // and 13 then signs an update of its own (23). 20's update, still held (13 delivered
    // it too), counts on 13's vote only: with honest 12's the round uses two updates,
    // not three (on the shunned connection's vote, the pair had kept two).
    let mut p = running(5);
    p.handle(Event::Up(PeerId(13)), 0.0);
    p.trained(5, &[0.49; N], 0.3, 8, 1.0).expect("finite");
    p.handle(msg(11, update(20, 5)), 5.0);
    p.handle(msg(13, update(20, 5)), 6.0);
    assert_eq!(p.nbrs[&PeerId(13)].copy_of, Some(id(20).public()));
    p.handle(msg(11, forged_update(20, 6)), 7.0);
    assert!(p.nbrs[&PeerId(11)].shunned);
    assert!(p.learner().holds_current_from(&id(20).public()));
    p.handle(msg(13, update(23, 5)), 8.0);
    p.handle(msg(12, update(22, 5)), 9.0);
    p.tick(10_000.0);
    assert_closed_using(&mut p, 2);
}

#[test]
fn a_relay_shunned_after_winning_a_race_leaves_the_signers_update_its_vote() {
    // Signer 23 on connection 13; relay 11 wins round 4's race (13's copy is recorded,
    // the key moves to 11) and round 5's, then is shunned before 13's round-5 copy comes.
    // The round waits for 13's copy (its copy of round 4 does not make it heard for
    // round 5), and closes with 23's update, 10's and 12's.
    let mut p = running(5);
    p.handle(Event::Up(PeerId(13)), 0.0);
    p.trained(5, &[0.49; N], 0.3, 8, 1.0).expect("finite");
    p.handle(msg(13, update(23, 3)), 2.0);
    p.handle(msg(11, update(23, 4)), 3.0);
    p.handle(msg(13, update(23, 4)), 4.0);
    p.handle(msg(11, update(23, 5)), 5.0);
    p.handle(msg(11, forged_update(23, 6)), 6.0);
    assert!(p.nbrs[&PeerId(11)].shunned);
    p.handle(msg(10, update(20, 5)), 7.0);
    p.handle(msg(12, update(22, 5)), 8.0);
    p.tick(9.0);
    assert_eq!(p.learner().round(), 5, "13's copy of round 5 is awaited");
    p.handle(msg(13, update(23, 5)), 20.0);
    p.tick(21.0);
    assert_closed_using(&mut p, 3);
}

#[test]
fn a_shunned_relay_counts_for_no_vote() {
    // 13 signs with 20; 11 takes the key with round 5's update (it moved in) and is
    // shunned. 20's round-5 update stays held (its owner may send it on 13), but on no
    // vote: 13's own update (23) and 10's and 12's are the round's three.
    let mut p = running(5);
    p.handle(Event::Up(PeerId(13)), 0.0);
    p.trained(5, &[0.49; N], 0.3, 8, 1.0).expect("finite");
    p.handle(msg(13, update(20, 4)), 2.0);
    p.handle(msg(11, update(20, 5)), 3.0);
    assert!(p.nbrs[&PeerId(11)].key_moved_in);
    p.handle(msg(11, forged_update(20, 6)), 4.0);
    assert!(p.nbrs[&PeerId(11)].shunned);
    p.handle(msg(13, update(23, 5)), 5.0);
    p.handle(msg(10, update(21, 5)), 6.0);
    p.handle(msg(12, update(22, 5)), 7.0);
    p.tick(10_000.0);
    assert_closed_using(&mut p, 3);
}

#[test]
fn a_key_that_signs_junk_loses_every_update_held_whoever_delivered_it() {
    // 11 relays 20's update, 10 (its signer) delivers its copy; then 20 signs a payload
    // that does not decode, and 11 delivers it: 20's update held goes, though 10
    // delivered it too.
    let mut p = running(5);
    p.handle(msg(11, update(20, 5)), 5.0);
    p.handle(msg(10, update(20, 5)), 6.0);
    let junk = PeerMessage::Update(Update::signed(&id(20), "t", 6, 8, 0.1, vec![0xEE, 1, 2]));
    p.handle(msg(11, junk.encode()), 7.0);
    assert!(p.nbrs[&PeerId(11)].shunned);
    assert!(!p.learner().holds_current_from(&id(20).public()));
}

#[test]
fn under_an_upload_budget_model_answers_take_at_most_their_share() {
    // 1 MB an hour: answers may send a quarter of it (69 bytes a second) besides the
    // updates, in bursts of 10 s of that; three neighbours ask every 2 s for a minute.
    let answer_bytes = |p: &mut Peer| {
        drain(p)
            .iter()
            .filter_map(|o| match o {
                Output::Send { data, .. } if data.len() > 100 => Some(data.len()),
                _ => None,
            })
            .sum::<usize>()
    };
    let req = PeerMessage::ModelRequest.encode();
    let answered = |upload_mb_per_hour| {
        let mut p = timed_running_with(5, upload_mb_per_hour);
        drain(&mut p);
        let mut bytes = 0;
        for i in 0..30 {
            let t = f64::from(i) * ANSWER_INTERVAL_MS + 1.0;
            for n in [10, 11, 12] {
                p.handle(msg(n, req.clone()), t);
            }
            bytes += answer_bytes(&mut p);
        }
        (p, bytes)
    };
    let share = 1e6 / 3.6e6 * ANSWER_SHARE;
    // The last answer may pass the burst by its own size (about 210 bytes).
    let bound = share * (UPLOAD_BURST_MS + 60_000.0) + 210.0;
    let (_, budgeted) = answered(1);
    assert!(
        budgeted as f64 <= bound,
        "{budgeted} bytes, {bound} at most"
    );
    // Without a budget each neighbour of this small model is answered every 2 s.
    let (_, free) = answered(0);
    assert!(2 * free > 3 * budgeted, "{free} against {budgeted}");

    // Dashboards asking as often as they may are held back; a joiner's first request
    // still finds room (twice the allowance).
    let mut p = timed_running_with(5, 1);
    drain(&mut p);
    let observe = PeerMessage::Observe { base: [0; 32] }.encode();
    for i in 0..30 {
        let t = f64::from(i) * ANSWER_INTERVAL_MS + 1.0;
        for n in [10, 11, 12] {
            p.handle(msg(n, observe.clone()), t);
        }
    }
    drain(&mut p);
    assert!(
        rejected(&p, Rejection::RequestRate) > 30,
        "the observers were held back"
    );
    p.handle(Event::Up(PeerId(13)), 60_000.0);
    drain(&mut p);
    p.handle(msg(13, req.clone()), 60_001.0);
    assert!(answer_bytes(&mut p) > 100, "the joiner is answered");
    // A neighbour that closes its channel and opens another is not answered sooner.
    p.handle(Event::Down(PeerId(13)), 60_002.0);
    p.handle(Event::Up(PeerId(13)), 60_003.0);
    drain(&mut p);
    let refused = rejected(&p, Rejection::RequestRate);
    p.handle(msg(13, req.clone()), 60_004.0);
    assert_eq!(answer_bytes(&mut p), 0);
    assert_eq!(rejected(&p, Rejection::RequestRate), refused + 1);
}

/// A trainer at round 5 holding `weights` (no budget, rounds of steps), with `neighbours`
/// up.
fn big_trainer(weights: Vec<f32>, neighbours: &[u64]) -> Peer {
    let n = weights.len();
    let mut p = Peer::new(cfg(), "t", id(1), vec![0.5; n], PeerRole::Trainer, 0.0).expect("valid");
    assert!(p.resume(Snapshot {
        round: 5,
        weights,
        momentum: vec![0.0; n],
    }));
    for &nb in neighbours {
        p.handle(Event::Up(PeerId(nb)), 0.0);
    }
    drain(&mut p);
    p
}

#[test]
fn without_an_upload_budget_model_answers_send_one_model_every_20_s() {
    // A model of 50,000 parameters (an answer of about 100 KB), rounds of steps, no
    // budget: three neighbours ask every 2 s for a minute (90 requests).
    let n = 50_000;
    let mut p = big_trainer(vec![0.5; n], &[10, 11, 12]);
    let req = PeerMessage::ModelRequest.encode();
    let mut answers = Vec::new();
    for i in 0..30 {
        let t = f64::from(i) * ANSWER_INTERVAL_MS + 1.0;
        for nb in [10, 11, 12] {
            p.handle(msg(nb, req.clone()), t);
        }
        answers.extend(drain(&mut p).into_iter().filter_map(|o| match o {
            Output::Send { data, .. } if data.len() > 1_000 => Some(data.len()),
            _ => None,
        }));
    }
    // At most one whole fp32 model (and 64 KiB) every 20 s, in bursts of up to that much
    // (twice for each neighbour's first request): the last answer may pass it by its size.
    let whole = (8 * n) as f64 + ANSWER_LEAST_BYTES;
    let bound = whole / ANSWER_MODEL_MS * 60_000.0 + 2.0 * 8.0 * n as f64 + answers[0] as f64;
    let sent: usize = answers.iter().sum();
    assert!(
        sent as f64 <= bound,
        "{sent} bytes in {} answers, {bound} at most",
        answers.len()
    );
    assert!(answers.len() >= 10, "{} answers", answers.len());
    assert!(rejected(&p, Rejection::RequestRate) >= 60);
}

#[test]
fn a_neighbour_asking_as_often_as_it_may_leaves_a_dashboard_its_share() {
    // No budget, a model of 50,000 parameters: 10 asks for the model every 2 s, 11 (a
    // dashboard) for the change since its last answer every 10 s, for two minutes.
    let n = 50_000;
    let mut p = big_trainer((0..n).map(|i| (i as f32 * 0.37).sin()).collect(), &[10, 11]);
    let (mut base, mut asked, mut answered, mut to_ten) = ([0; 32], 0, 0, 0);
    for i in 0..60 {
        let t = f64::from(i) * ANSWER_INTERVAL_MS + 1.0;
        p.handle(msg(10, PeerMessage::ModelRequest.encode()), t);
        // Between them, 300 more that come too soon (no answer): they must not push the
        // record of what 10 was sent out.
        for k in 0..300 {
            p.handle(
                msg(10, PeerMessage::ModelRequest.encode()),
                t + 0.001 * f64::from(k + 1),
            );
        }
        if i % 5 == 0 {
            asked += 1;
            p.handle(msg(11, PeerMessage::Observe { base }.encode()), t + 1.0);
        }
        for o in drain(&mut p) {
            match o {
                Output::Send { to, data } if to == PeerId(10) && data.len() > 1_000 => {
                    to_ten += 1;
                }
                Output::Send {
                    to: PeerId(11),
                    data,
                } => {
                    if let Ok(PeerMessage::Observed(obs)) = PeerMessage::decode(&data, n) {
                        answered += 1;
                        base = obs.result;
                    }
                }
                _ => {}
            }
        }
    }
    assert!(answered + 1 >= asked, "{answered} of {asked} answered");
    // 10 still gets its share: a model every 10 s or so.
    assert!(to_ten >= 8, "{to_ten} answers to 10");
}

#[test]
fn model_requests_are_answered_at_a_bounded_rate() {
    let mut p = running(5);
    let req = PeerMessage::ModelRequest.encode();
    p.handle(msg(10, req.clone()), 0.0);
    p.handle(msg(10, req.clone()), 100.0);
    p.handle(msg(10, req.clone()), ANSWER_INTERVAL_MS + 1.0);
    let answers = drain(&mut p)
        .iter()
        .filter(|o| matches!(o, Output::Send { data, .. } if data.len() > 100))
        .count();
    assert_eq!(answers, 2);
    assert_eq!(rejected(&p, Rejection::RequestRate), 1);
    // A joiner has nothing to give, and says so.
    let mut j = joiner();
    j.handle(Event::Up(PeerId(10)), 0.0);
    drain(&mut j);
    j.handle(msg(10, req), 0.0);
    let idle = PeerMessage::Status {
        contributing: false,
    }
    .encode();
    assert_eq!(
        drain(&mut j),
        [Output::Send {
            to: PeerId(10),
            data: idle
        }]
    );
}

#[test]
fn two_colluders_whose_updates_alone_are_in_at_the_round_limit_are_bounded() {
    // Five neighbours; 10 and 11 collude and send weights a hundred away, the other three
    // send nothing this round. The round closes at its limit with only the colluders'
    // updates held: they must not be each other's norm reference.
    let mut p = joiner();
    assert!(p.resume(snapshot(5, 0.5)));
    for n in 10..15 {
        p.handle(Event::Up(PeerId(n)), 0.0);
    }
    p.tick(GREET_AFTER_MS);
    drain(&mut p);
    for (from, signer) in [(10, 20), (11, 21)] {
        p.handle(msg(from, update_of(signer, 5, 100.5)), GREET_AFTER_MS + 1.0);
    }
    // And they leave: their updates stay held, they are no longer awaited.
    p.handle(Event::Down(PeerId(10)), GREET_AFTER_MS + 1.5);
    p.handle(Event::Down(PeerId(11)), GREET_AFTER_MS + 1.5);
    p.trained(5, &[0.49; N], 0.3, 8, GREET_AFTER_MS + 2.0)
        .expect("finite");
    p.tick(GREET_AFTER_MS + 60_000.0);
    assert_eq!(p.learner().round(), 6, "the round closed");
    let far = p
        .learner()
        .weights()
        .iter()
        .map(|w| (w - 0.5).abs())
        .fold(0.0, f32::max);
    assert!(far < 0.1, "moved {far} from the round's start");
}

#[test]
fn a_peer_its_visitor_paused_uploads_no_model() {
    let mut p = running(5);
    p.handle(Event::Paused(true), 100.0);
    drain(&mut p);
    let idle = PeerMessage::Status {
        contributing: false,
    }
    .encode();
    // Neither a model nor an observer's weights: only that it gives nothing.
    p.handle(msg(10, PeerMessage::ModelRequest.encode()), 200.0);
    p.handle(
        msg(11, PeerMessage::Observe { base: [0; 32] }.encode()),
        300.0,
    );
    let outs = drain(&mut p);
    assert_eq!(
        outs,
        [10, 11].map(|n| Output::Send {
            to: PeerId(n),
            data: idle.clone()
        }),
    );
    // Resumed, it answers again; a task the researcher paused still answers.
    p.handle(Event::Paused(false), 400.0);
    p.handle(Event::TaskPaused(true), 400.0);
    drain(&mut p);
    p.handle(msg(10, PeerMessage::ModelRequest.encode()), 500.0);
    let outs = drain(&mut p);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Send { to: PeerId(10), data } if data.len() > 100)),
        "{outs:?}"
    );
}

#[test]
fn a_lone_joiner_starts_from_the_seed_after_the_grace() {
    let mut p = joiner();
    p.tick(JOIN_GRACE_MS - 1.0);
    assert_eq!(p.progress().phase, "joining");
    p.tick(JOIN_GRACE_MS);
    assert!(p.has_model());
    let outs = drain(&mut p);
    assert!(
        outs.contains(&Output::Train {
            round: 0,
            steps: 1,
            resume: false
        }),
        "{outs:?}"
    );
}

#[test]
fn a_round_closes_when_every_contributor_sent_or_at_its_straggler_deadline() {
    let mut p = running(5);
    p.trained(5, &[0.49; N], 0.3, 8, 50.0).expect("finite");
    let sent = drain(&mut p);
    assert_eq!(
        sent.iter()
            .filter(|o| matches!(o, Output::Send { .. }))
            .count(),
        3,
        "the update goes to every contributing neighbour"
    );
    p.handle(msg(10, update(20, 5)), 60.0);
    p.handle(
        msg(
            11,
            PeerMessage::Status {
                contributing: false,
            }
            .encode(),
        ),
        60.0,
    );
    p.tick(70.0);
    assert_eq!(p.learner().round(), 5, "12 has not sent yet");
    p.handle(msg(12, update(22, 5)), 80.0);
    p.tick(90.0);
    assert_eq!(p.learner().round(), 6);
    assert!(
        drain(&mut p)
            .iter()
            .any(|o| matches!(o, Output::RoundClosed(s) if s.used == 2))
    );
    // The next round: only 12 sends, 10 ms after ours; 10, whose update came 10 ms after
    // ours last time, is waited for twice that, but at least a quarter of the deadline
    // past 12's arrival (see the next test).
    p.tick(100.0);
    p.trained(6, &[0.49; N], 0.3, 8, 110.0).expect("finite");
    p.handle(msg(12, update(22, 6)), 120.0);
    p.tick(120.0 + 249.0);
    assert_eq!(p.learner().round(), 6);
    p.tick(120.0 + 250.0);
    assert_eq!(p.learner().round(), 7);
    // A training result for a round the peer has left is dropped.
    p.tick(1_200.0);
    drain(&mut p);
    p.trained(3, &[9.0; N], 0.3, 8, 1_300.0).expect("ignored");
    assert!(p.weights().iter().all(|w| *w < 1.0));
}

/// A validly signed update by `signer` for `round` with weights `w` everywhere.
fn update_w(signer: u8, round: u64, w: f32) -> Vec<u8> {
    let (payload, _) = Compressor::new(Compression::None, N).encode(&[w; N]);
    PeerMessage::Update(Update::signed(&id(signer), "t", round, 8, 0.1, payload)).encode()
}

#[test]
fn a_neighbour_the_screen_distrusts_no_longer_sets_the_pace() {
    let mut c = cfg();
    c.aggregation = Aggregation::TrimmedMean { trim: 0.0 };
    let mut p = Peer::new(c, "t", id(1), vec![0.5; N], PeerRole::Trainer, 0.0).expect("valid");
    assert!(p.resume(snapshot(5, 0.5)));
    for n in [10, 11, 12] {
        p.handle(Event::Up(PeerId(n)), 0.0);
    }
    let mut t = GREET_AFTER_MS;
    // Our pseudo-gradient is 0.01 per coordinate, 10's 0.009, 11's -0.01; 12's -0.025 is
    // within the norm bound but 2.5 times the median distance from the median: screened.
    for r in 5..7 {
        p.tick(t);
        drain(&mut p);
        p.trained(r, &[0.49; N], 0.3, 8, t).expect("finite");
        p.handle(msg(10, update_w(20, r, 0.491)), t);
        p.handle(msg(11, update_w(21, r, 0.51)), t);
        p.handle(msg(12, update_w(22, r, 0.525)), t);
        p.tick(t + 1.0);
        assert_eq!(p.learner().round(), r + 1);
        t += 10.0;
    }
    assert_eq!(rejected(&p, Rejection::Outlier), 2);
    // 12 is silent now: the round closes on 10's and 11's updates alone.
    p.tick(t);
    drain(&mut p);
    p.trained(7, &[0.49; N], 0.3, 8, t).expect("finite");
    p.handle(msg(10, update_w(20, 7, 0.491)), t);
    p.handle(msg(11, update_w(21, 7, 0.51)), t);
    p.tick(t + 1.0);
    assert_eq!(p.learner().round(), 8, "12 was not waited for");
}

/// A peer holding weights 1.0 at round 3.
fn at_round_3(c: &LearnConfig) -> Peer {
    let mut p =
        Peer::new(c.clone(), "t", id(1), vec![1.0; N], PeerRole::Trainer, 0.0).expect("valid");
    assert!(p.resume(Snapshot {
        round: 3,
        weights: vec![1.0; N],
        momentum: vec![0.0; N]
    }));
    p
}

#[test]
fn gossip_mixes_count_once_per_sender_and_pull_at_most_an_update_s_size() {
    let mut c = cfg();
    c.sync_every = 1;
    // Weights exchange sends no mixes: every update pulls the models together.
    c.exchange = Exchange::Delta;
    let mut p = at_round_3(&c);
    p.handle(Event::Up(PeerId(10)), 0.0);
    // A neighbour's weights a fifth away (inside the quarter a receiver accepts).
    let far = Learner::new(c.clone(), "t", id(9), vec![1.2; N]).expect("valid");
    let mut mix = far.mix_message();
    // For round 4, the round the peer starts next.
    mix[5..13].copy_from_slice(&4u64.to_le_bytes());
    p.handle(msg(10, mix.clone()), 0.0);
    p.handle(msg(10, mix), 0.0);
    assert_eq!(rejected(&p, Rejection::MixRepeat), 1);
    p.tick(0.0);
    // Our own update is tiny: the mix may pull us only by about that much.
    p.trained(3, &[0.999; N], 0.1, 8, 10.0).expect("finite");
    p.tick(10.0 + 1_000.0);
    assert_eq!(p.learner().round(), 4);
    let moved = p.weights()[0] - 1.0;
    assert!(
        moved.abs() < 0.01,
        "pulled by {moved}; half way would have been 0.1"
    );
}

#[test]
fn of_the_mixes_held_only_the_nearest_pulls_and_only_on_schedule() {
    let mut c = cfg();
    c.sync_every = 2;
    c.exchange = Exchange::Delta;
    let mut p = at_round_3(&c);
    for n in [10, 11, 12] {
        p.handle(Event::Up(PeerId(n)), 0.0);
    }
    let mix_for = |w: f32, round: u64| {
        let mut m = Learner::new(c.clone(), "t", id(9), vec![w; N])
            .expect("valid")
            .mix_message();
        m[5..13].copy_from_slice(&round.to_le_bytes());
        m
    };
    // Two colluders pull toward 0.78 (inside the accepted quarter); one honest
    // neighbour's model is where ours will be after this round's step (0.848). Round 5
    // is off the schedule of every 2 rounds.
    p.handle(msg(10, mix_for(0.78, 4)), 0.0);
    p.handle(msg(11, mix_for(0.78, 4)), 0.0);
    p.handle(msg(12, mix_for(0.85, 4)), 0.0);
    p.handle(msg(11, mix_for(0.78, 5)), 0.0);
    assert_eq!(rejected(&p, Rejection::OffSchedule), 1);
    p.tick(0.0);
    p.trained(3, &[0.9; N], 0.1, 8, 10.0).expect("finite");
    p.tick(10.0 + HOLD_FACTOR * 1_000.0);
    assert_eq!(p.learner().round(), 4);
    // The outer step moved the weights by the update; the mix only toward 0.85, never
    // toward the colluders' 0.78 (the mean of the three would have pulled down).
    let mut alone = at_round_3(&c);
    alone.tick(0.0);
    alone.trained(3, &[0.9; N], 0.1, 8, 10.0).expect("finite");
    alone.tick(10.0 + HOLD_FACTOR * 1_000.0);
    let (mixed, unmixed) = (p.weights()[0], alone.weights()[0]);
    assert!(
        (mixed - unmixed).abs() < 2e-3,
        "pulled toward the colluders: {mixed} vs {unmixed} without mixes"
    );
}

#[test]
fn one_connection_holds_at_most_two_mix_slots_and_weights_tasks_shun_every_mix() {
    let mut c = cfg();
    c.sync_every = 1;
    c.max_staleness = 20;
    c.exchange = Exchange::Delta;
    let mut p = at_round_3(&c);
    for n in [10, 11] {
        p.handle(Event::Up(PeerId(n)), 0.0);
    }
    let mix_for = |round: u64| {
        let mut m = Learner::new(c.clone(), "t", id(9), vec![1.05; N])
            .expect("valid")
            .mix_message();
        m[5..13].copy_from_slice(&round.to_le_bytes());
        m
    };
    // One connection sends a mix for each of the next 18 rounds (each on schedule and
    // within max_staleness): two are held.
    for round in 4..22 {
        p.handle(msg(10, mix_for(round)), 0.0);
    }
    assert_eq!(rejected(&p, Rejection::MixOverflow), 16);
    // An honest neighbour's mix still finds room.
    p.handle(msg(11, mix_for(4)), 0.0);
    assert_eq!(rejected(&p, Rejection::MixOverflow), 16);

    // Exchanging weights, a mix is off the schedule whatever its round: the connection
    // is shunned, even for a round far outside the staleness window.
    let mut w = running(5);
    w.handle(msg(10, mix_for(900)), 0.0);
    assert_eq!(rejected(&w, Rejection::OffSchedule), 1);
    w.handle(msg(10, update(20, 5)), 1.0);
    assert_eq!(rejected(&w, Rejection::Shunned), 1);
}

#[test]
fn colluders_that_agree_are_outvoted_and_silence_counts_against_adoption() {
    // Five neighbours asked; two colluders send one poisoned model.
    let start = |answers: &[(u64, u64, f32)]| {
        let mut p = joiner();
        for n in 10..15 {
            p.handle(Event::Up(PeerId(n)), 0.0);
        }
        p.tick(GREET_AFTER_MS);
        p.tick(2.0 * GREET_AFTER_MS);
        let mut who = asked(&drain(&mut p));
        who.sort_unstable();
        assert_eq!(who, [10, 11, 12, 13, 14]);
        for &(from, round, w) in answers {
            p.handle(msg(from, model(round, w)), 600.0);
        }
        p.tick(2.0 * GREET_AFTER_MS + MODEL_WAIT_MS);
        p
    };
    let p = start(&[
        (10, 10, -3.0),
        (11, 10, -3.0),
        (12, 10, 0.30),
        (13, 10, 0.31),
        (14, 11, 0.305),
    ]);
    assert!(
        p.weights().iter().all(|w| (0.29..=0.32).contains(w)),
        "the three that agree win: {:?}",
        &p.weights()[..2]
    );
    // Two honest neighbours stay silent: two colluders and one honest answer are not a
    // majority of the five asked, whoever agrees with whom.
    let p = start(&[(10, 10, -3.0), (11, 10, -3.0), (12, 10, 0.30)]);
    assert_eq!(p.learner().round(), 0, "nothing adopted");
    assert!(p.weights().iter().all(|w| *w == 0.5));
    assert_eq!(rejected(&p, Rejection::NoQuorum), 1);
    // The rule before agreement counting took the answer nearest the coordinate-wise
    // median, which two identical answers of three always are.
    let median = coordinate_median([[-3.0f32; 4], [-3.0; 4], [0.3; 4]].iter().map(|v| &v[..]));
    assert_eq!(median, vec![-3.0; 4]);
}

#[test]
fn colluders_that_agree_on_the_weights_do_not_set_the_momentum() {
    // Five asked, four answer with the same weights; two of them with a huge momentum.
    let mut p = joiner_asking_five();
    for (from, momentum) in [(10, 1e6), (11, 1e6), (12, 0.01), (13, 0.02)] {
        let s = Snapshot {
            momentum: vec![momentum; N],
            ..snapshot(10, 0.3)
        };
        p.handle(msg(from, PeerMessage::Model(s).encode()), 600.0);
    }
    p.tick(2.0 * GREET_AFTER_MS + MODEL_WAIT_MS);
    assert_eq!(p.learner().round(), 10, "adopted");
    let Ok(PeerMessage::Model(s)) = PeerMessage::decode(&p.learner().snapshot(), N) else {
        panic!("a snapshot");
    };
    assert!(
        s.momentum.iter().all(|m| m.abs() <= 0.02),
        "{:?}",
        &s.momentum[..2]
    );
}

/// A joiner with neighbours 10 to 14 asks all five for the model (at `2 *
/// GREET_AFTER_MS`).
fn ask_five(p: &mut Peer) {
    for n in 10..15 {
        p.handle(Event::Up(PeerId(n)), 0.0);
    }
    p.tick(GREET_AFTER_MS);
    p.tick(2.0 * GREET_AFTER_MS);
    let mut who = asked(&drain(p));
    who.sort_unstable();
    assert_eq!(who, [10, 11, 12, 13, 14]);
}

#[test]
fn colluders_whose_model_is_the_median_do_not_choose_its_round() {
    // Five asked: the honest answers at rounds 10, 10 and 11; two colluders send one
    // model between them (the coordinate-wise median, so it is taken) at round 8, two
    // rounds behind, within the window.
    let mut p = joiner();
    ask_five(&mut p);
    let t0 = 2.0 * GREET_AFTER_MS;
    p.handle(msg(10, model(8, 0.306)), t0 + 10.0);
    p.handle(msg(11, model(8, 0.306)), t0 + 20.0);
    p.handle(msg(12, model(10, 0.30)), t0 + 30.0);
    p.handle(msg(13, model(10, 0.31)), t0 + 40.0);
    p.handle(msg(14, model(11, 0.305)), t0 + 50.0);
    assert!(p.has_model());
    assert_eq!(
        p.learner().round(),
        10,
        "the agreeing answers' median round"
    );
}

#[test]
fn colluders_that_answer_first_do_not_pick_the_model_from_part_of_the_answers() {
    // Five asked; two colluders answer at once with one model that stays within
    // AGREE_RATIO of the honest ones (0.42 against 0.30: a distance of 0.96 where half
    // the smaller norm is 1.2), and a huge momentum.
    let t0 = 2.0 * GREET_AFTER_MS;
    let poisoned = PeerMessage::Model(Snapshot {
        round: 10,
        weights: vec![0.42; N],
        momentum: vec![1e6; N],
    })
    .encode();
    let mut p = joiner();
    ask_five(&mut p);
    p.handle(msg(10, poisoned.clone()), t0 + 10.0);
    p.handle(msg(11, poisoned.clone()), t0 + 20.0);
    p.handle(msg(12, model(10, 0.30)), t0 + 1_000.0);
    // Three of five agree on the colluders' model, and it is the median of the three:
    // concluding here would adopt it. The other two get as long again as that took.
    assert_eq!(p.learner().round(), 0, "waits for the two still asked");
    assert_eq!(p.next_wake(), Some(t0 + 2_000.0));
    p.handle(msg(13, model(10, 0.31)), t0 + 1_500.0);
    p.tick(t0 + 1_900.0);
    assert_eq!(p.learner().round(), 0);
    p.handle(msg(14, model(10, 0.305)), t0 + 1_950.0);
    assert_eq!(p.learner().round(), 10);
    assert!(
        p.weights().iter().all(|w| (0.30..=0.31).contains(w)),
        "the honest median's model: {:?}",
        &p.weights()[..2]
    );
    let momentum = &p.learner().momentum;
    assert!(
        momentum.iter().all(|m| *m == 0.0),
        "the honest answers' momentum: {:?}",
        &momentum[..2]
    );

    // Neighbours silent after three agreeing answers do not hold the download for
    // MODEL_WAIT_MS: it ends AGREED_GRACE_MS (at least) after the agreement.
    let mut q = joiner();
    ask_five(&mut q);
    q.handle(msg(10, model(10, 0.30)), t0 + 10.0);
    q.handle(msg(11, model(10, 0.31)), t0 + 20.0);
    q.handle(msg(12, model(10, 0.305)), t0 + 30.0);
    assert_eq!(q.next_wake(), Some(t0 + 30.0 + AGREED_GRACE_MS));
    q.tick(t0 + 30.0 + AGREED_GRACE_MS);
    assert_eq!(q.learner().round(), 10);
}

/// A peer at round 5 whose neighbours 10, 11 and 12 all sent their round-4 updates.
fn running_with_recent_neighbours() -> Peer {
    let mut p = running(5);
    for (n, k) in [(10, 20), (11, 21), (12, 22)] {
        p.handle(msg(n, update(k, 4)), 1.0);
    }
    p
}

#[test]
fn the_deadline_drops_a_minority_of_stragglers_not_most_of_the_neighbours() {
    // A round closes at the deadline only once at least half of the neighbours it waits
    // for have sent their update for it; without that, a peer that
    // moved on would find the others' updates stale from then on and train alone.
    let deadline = f64::from(cfg().round_deadline_ms);
    let mut p = running_with_recent_neighbours();
    p.trained(5, &[0.49; N], 0.3, 8, 10.0).expect("finite");
    drain(&mut p);
    assert_eq!(p.next_wake(), Some(10.0 + HOLD_FACTOR * deadline));
    p.handle(msg(10, update(20, 5)), 20.0);
    p.tick(10.0 + deadline);
    assert_eq!(p.learner().round(), 5, "two of three missing: held");
    p.handle(msg(11, update(21, 5)), 20.0 + deadline);
    assert_eq!(p.next_wake(), Some(10.0 + deadline));
    p.tick(20.0 + deadline);
    assert_eq!(
        p.learner().round(),
        6,
        "one straggler of three: not waited for"
    );

    // Nobody sends: held at most HOLD_FACTOR deadlines.
    let mut q = running_with_recent_neighbours();
    q.trained(5, &[0.49; N], 0.3, 8, 10.0).expect("finite");
    drain(&mut q);
    q.tick(10.0 + HOLD_FACTOR * deadline - 1.0);
    assert_eq!(q.learner().round(), 5);
    q.tick(10.0 + HOLD_FACTOR * deadline);
    assert_eq!(q.learner().round(), 6);
}

/// Opens `round` at `at` (our update goes out) and delivers 10's and 11's updates for it
/// at `quick`; 12 sends nothing. Then checks that the round is still open 1 ms before
/// `closes` (from `at`) and closed at it without 12.
fn round_without_12(p: &mut Peer, round: u64, at: f64, quick: f64, closes: f64) {
    p.tick(at);
    p.trained(round, &[0.49; N], 0.3, 8, at).expect("finite");
    p.handle(msg(10, update(20, round)), quick);
    p.handle(msg(11, update(21, round)), quick);
    p.tick(at + closes - 1.0);
    assert_eq!(p.learner().round(), round);
    p.tick(at + closes);
    assert_eq!(p.learner().round(), round + 1);
    assert_closed_using(p, 2);
}

/// A peer whose round 5 opened at 50: 10 and 11 sent 10 ms later, 12 (a thin uplink)
/// 400 ms later, and the round closed with all three.
fn with_12_late_by_400_ms() -> Peer {
    let mut p = running(5);
    p.trained(5, &[0.49; N], 0.3, 8, 50.0).expect("finite");
    p.handle(msg(10, update(20, 5)), 60.0);
    p.handle(msg(11, update(21, 5)), 60.0);
    p.tick(449.0);
    assert_eq!(p.learner().round(), 5, "all in only when 12's update is");
    p.handle(msg(12, update(22, 5)), 450.0);
    p.tick(450.0);
    assert_closed_using(&mut p, 3);
    p
}

#[test]
fn a_straggler_is_waited_for_twice_its_usual_lateness_not_the_whole_deadline() {
    let mut p = with_12_late_by_400_ms();
    // Round 6 opens at 500. 12, slow but steady, is waited for (2 x 400 ms) and counts:
    // a deadline set by the quick neighbours would drop its every update.
    p.tick(500.0);
    p.trained(6, &[0.49; N], 0.3, 8, 500.0).expect("finite");
    p.handle(msg(10, update(20, 6)), 510.0);
    p.handle(msg(11, update(21, 6)), 510.0);
    assert_eq!(p.next_wake(), Some(500.0 + 800.0));
    p.tick(799.0);
    assert_eq!(p.learner().round(), 6);
    p.handle(msg(12, update(22, 6)), 800.0);
    p.tick(800.0);
    assert_closed_using(&mut p, 3);
    // Round 7 opens at 1,300 and 12 stalls (a throttled tab, a peer gone without a
    // word): the round waits twice its usual lateness (400 + (300 - 400) / 4 = 375 ms),
    // not the whole deadline (1,000 ms), every round until it is heard again or its
    // connection ends.
    round_without_12(&mut p, 7, 1_300.0, 1_310.0, 750.0);
    // Round 8: 10 and 11 come late this time (600 ms, their usual 10): the round then
    // gives 12 at least a quarter of the deadline past them, not 750 ms from its start.
    round_without_12(&mut p, 8, 2_100.0, 2_700.0, 850.0);
}

/// A neighbour that says it contributes and sends nothing has no lateness to measure: it
/// was waited for the whole deadline every round, for as long as it stayed. Now for
/// `SILENT_ROUNDS` rounds; then rounds close without it, and its first update makes it
/// one to wait for again.
#[test]
fn a_neighbour_that_never_sends_holds_only_its_first_rounds() {
    let deadline = f64::from(cfg().round_deadline_ms);
    let (mut p, mut at, round) = past_silent_rounds(false);
    // 12's first update (it came first this round) makes it awaited again: measured, a
    // round without it waits for it past 10's and 11's arrival.
    at += 100.0;
    p.tick(at);
    p.trained(round + 1, &[0.49; N], 0.3, 8, at)
        .expect("finite");
    p.handle(msg(12, update(22, round + 1)), at + 5.0);
    p.handle(msg(10, update(20, round + 1)), at + 10.0);
    p.handle(msg(11, update(21, round + 1)), at + 10.0);
    p.tick(at + 10.0);
    assert_closed_using(&mut p, 3);
    at += 100.0;
    round_without_12(&mut p, round + 2, at, at + 10.0, 10.0 + 0.25 * deadline);
}

/// Peer 5 whose neighbour 12 says it contributes and sends nothing for `SILENT_ROUNDS`
/// rounds (each waits the whole deadline for it), then, if `reconnect`, closes its
/// connection and opens a new one; the next round closes as soon as 10 and 11 are in.
/// Returns the peer, the time and that round.
fn past_silent_rounds(reconnect: bool) -> (Peer, f64, u64) {
    let deadline = f64::from(cfg().round_deadline_ms);
    let mut p = running(5);
    let mut at = 50.0;
    let silent = u64::from(SILENT_ROUNDS);
    for round in 5..5 + silent {
        round_without_12(&mut p, round, at, at + 10.0, deadline);
        at += deadline + 100.0;
    }
    if reconnect {
        p.handle(Event::Down(PeerId(12)), at);
        p.handle(Event::Up(PeerId(12)), at + 1.0);
        at += 100.0;
    }
    let round = 5 + silent;
    closes_when_10_and_11_are_in(&mut p, round, at);
    (p, at, round)
}

/// Opens `round` at `at` and delivers 10's and 11's updates for it 10 ms later: the round
/// closes then, without 12.
fn closes_when_10_and_11_are_in(p: &mut Peer, round: u64, at: f64) {
    p.tick(at);
    p.trained(round, &[0.49; N], 0.3, 8, at).expect("finite");
    p.handle(msg(10, update(20, round)), at + 10.0);
    p.handle(msg(11, update(21, round)), at + 10.0);
    p.tick(at + 10.0);
    assert_eq!(
        p.learner().round(),
        round + 1,
        "closed when 10 and 11 were in"
    );
    assert_closed_using(p, 2);
}

/// A neighbour that sent once (its lateness measured, 400 ms) and then nothing more was
/// waited for twice that every round for as long as it stayed; now for `SILENT_ROUNDS`
/// rounds.
#[test]
fn a_neighbour_that_sent_once_and_then_no_more_holds_only_a_few_rounds() {
    let mut p = with_12_late_by_400_ms();
    let mut at = 500.0;
    for round in 6..6 + u64::from(SILENT_ROUNDS) {
        round_without_12(&mut p, round, at, at + 10.0, 800.0);
        at += 1_000.0;
    }
    closes_when_10_and_11_are_in(&mut p, 6 + u64::from(SILENT_ROUNDS), at);
}

/// With delta exchange an update for any later round is taken. One update claiming a
/// round far ahead (the neighbour then sending nothing more) made that neighbour awaited
/// in every round after it, for as long as its connection stayed: its claimed round never
/// fell more than `SILENT_ROUNDS` behind ours. Now it holds `SILENT_ROUNDS` rounds, as
/// any neighbour's last update does.
#[test]
fn one_update_claiming_a_far_round_holds_only_a_few_rounds_with_delta_exchange() {
    let delta = LearnConfig {
        exchange: Exchange::Delta,
        ..cfg()
    };
    let mut p = running_with(delta, 5);
    p.trained(5, &[0.49; N], 0.3, 8, 50.0).expect("finite");
    p.handle(msg(10, update(20, 5)), 60.0);
    p.handle(msg(11, update(21, 5)), 60.0);
    // Near the highest round the wire takes.
    p.handle(
        msg(12, update(22, crate::learn::wire::MAX_ROUND - 10)),
        60.0,
    );
    p.tick(60.0);
    assert_eq!(p.learner().round(), 6, "closed when all three were in");
    let _ = drain(&mut p);
    // 12 is now silent: its last lateness was 0 (it came for a later round), so each
    // round waits the straggler floor, a quarter of the deadline, past 10's and 11's.
    let mut at = 500.0;
    for round in 6..6 + u64::from(SILENT_ROUNDS) {
        round_without_12(&mut p, round, at, at + 10.0, 260.0);
        at += 1_000.0;
    }
    closes_when_10_and_11_are_in(&mut p, 6 + u64::from(SILENT_ROUNDS), at);
}

/// A neighbour that says it contributes after each round opened and takes it back just
/// before the deadline, sending nothing, was idle whenever a round closed: never counted
/// silent, it held every round to the deadline. Now it holds `SILENT_ROUNDS` of them.
#[test]
fn a_neighbour_that_says_it_contributes_only_while_rounds_are_open_holds_a_few() {
    let deadline = f64::from(cfg().round_deadline_ms);
    let mut p = running(5);
    let say = |contributing| msg(12, PeerMessage::Status { contributing }.encode());
    let mut at = 50.0;
    for round in 5..5 + u64::from(SILENT_ROUNDS) {
        p.handle(say(false), at - 1.0);
        p.tick(at);
        p.trained(round, &[0.49; N], 0.3, 8, at).expect("finite");
        p.handle(say(true), at + 1.0);
        p.handle(msg(10, update(20, round)), at + 10.0);
        p.handle(msg(11, update(21, round)), at + 10.0);
        p.tick(at + deadline - 3.0);
        assert_eq!(p.learner().round(), round, "waited for");
        p.handle(say(false), at + deadline - 2.0);
        p.tick(at + deadline - 2.0);
        assert_eq!(p.learner().round(), round + 1);
        at += deadline + 100.0;
    }
    p.handle(say(true), at - 1.0);
    closes_when_10_and_11_are_in(&mut p, 5 + u64::from(SILENT_ROUNDS), at);
}

/// After a model download that moved our round past the rounds its neighbours' first
/// updates were noted for, the round still waits for them: it closes when their updates
/// for it are in (it waited its whole deadline for nobody).
#[test]
fn after_a_download_the_neighbours_are_still_waited_for() {
    let mut p = running(5);
    for (n, k) in [(10, 20), (11, 21), (12, 22)] {
        p.handle(msg(n, update(k, 5)), 10.0);
        p.handle(msg(n, update(k, 9)), 20.0);
    }
    p.tick(30.0);
    let asked_for = asked(&drain(&mut p));
    for n in &asked_for {
        p.handle(msg(*n, model(9, 0.5)), 40.0);
    }
    p.tick(40.0);
    assert_eq!(
        p.learner().round(),
        9,
        "caught up by download ({asked_for:?})"
    );
    // The step in flight when the model came is for a round left behind.
    let _ = p.trained(5, &[0.49; N], 0.3, 8, 50.0);
    p.tick(60.0);
    let outs = drain(&mut p);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Train { round: 9, .. })),
        "{outs:?}"
    );
    p.trained(9, &[0.49; N], 0.3, 8, 100.0).expect("finite");
    p.tick(100.0);
    assert_eq!(p.learner().round(), 10, "closed with the updates held");
}

/// Reconnecting does not give a neighbour that never sent its first rounds' wait again.
#[test]
fn a_silent_neighbour_that_reconnects_is_not_waited_for_again() {
    past_silent_rounds(true);
}

/// A neighbour's updates past its connection's rate are dropped unread: 1,000 valid
/// updates for ever later rounds at once (each a signature check and a pass over the
/// model) all reached the learner, 200 a second taking most of a browser worker's time.
#[test]
fn a_neighbours_updates_past_its_rate_are_dropped_unread() {
    let mut p = running(5);
    let before = rejected(&p, Rejection::RequestRate);
    for r in 0..1000u64 {
        p.handle(msg(10, update(20, 6 + r)), 100.0);
    }
    let dropped = rejected(&p, Rejection::RequestRate) - before;
    assert_eq!(dropped, 1000 - UPDATE_BURST as u64);
    // The rate comes back with time: a second later, 50 more.
    for r in 1000..1100u64 {
        p.handle(msg(10, update(20, 6 + r)), 1_100.0);
    }
    let later = rejected(&p, Rejection::RequestRate) - before;
    assert_eq!(later - dropped, 100 - UPDATE_RATE as u64);
    // Another neighbour's are its own.
    p.handle(msg(11, update(21, 6)), 1_100.0);
    let other = rejected(&p, Rejection::RequestRate) - before;
    assert_eq!(other, later);
}

#[test]
fn a_round_with_no_neighbour_to_wait_for_waits_the_whole_deadline() {
    // All three neighbours say they do not contribute (joining, paused): the round
    // waits its deadline rather than racing ahead alone.
    let deadline = f64::from(cfg().round_deadline_ms);
    let mut p = running(5);
    for n in [10, 11, 12] {
        let idle = PeerMessage::Status {
            contributing: false,
        };
        p.handle(msg(n, idle.encode()), 10.0);
    }
    p.trained(5, &[0.49; N], 0.3, 8, 50.0).expect("finite");
    assert_eq!(p.next_wake(), Some(50.0 + deadline));
    p.tick(50.0 + deadline - 1.0);
    assert_eq!(p.learner().round(), 5);
    p.tick(50.0 + deadline);
    assert_eq!(p.learner().round(), 6);
}

#[test]
fn an_update_later_than_its_round_raises_its_senders_lateness_at_once() {
    let mut p = running(5);
    // Round 5: everyone 50 ms after we opened.
    p.trained(5, &[0.49; N], 0.3, 8, 50.0).expect("finite");
    for (n, k) in [(10, 20), (11, 21), (12, 22)] {
        p.handle(msg(n, update(k, 5)), 100.0);
    }
    p.tick(100.0);
    assert_closed_using(&mut p, 3);
    // Round 6 opens at 200; 12 is missing: 10 + 250 ms past 10's and 11's arrival.
    round_without_12(&mut p, 6, 200.0, 210.0, 260.0);
    // Round 7 opens at 500, before 12's update for round 6 comes, 500 ms after that
    // round opened (at 700): measured against round 6, 12's lateness is 500 ms now, and
    // round 7 waits twice that for it, up to the deadline (measured against round 7
    // only, it would still be 50 ms and the round would close at 260 ms again).
    p.tick(500.0);
    p.trained(7, &[0.49; N], 0.3, 8, 500.0).expect("finite");
    p.handle(msg(10, update(20, 7)), 510.0);
    p.handle(msg(11, update(21, 7)), 510.0);
    p.handle(msg(12, update(22, 6)), 700.0);
    p.tick(500.0 + 999.0);
    assert_eq!(p.learner().round(), 7);
    p.tick(500.0 + 1_000.0);
    assert_eq!(p.learner().round(), 8);
    assert_closed_using(&mut p, 2);
}

/// A peer in rounds sized in time (1 s), at `round`, with neighbours 10, 11 and 12.
fn timed_running(round: u64) -> Peer {
    timed_running_with(round, 0)
}

/// The same, with an upload budget of `upload_mb_per_hour` (0: none).
fn timed_running_with(round: u64, upload_mb_per_hour: u32) -> Peer {
    let c = LearnConfig {
        round_ms: 1_000,
        upload_mb_per_hour,
        ..cfg()
    };
    let mut p = Peer::new(c, "t", id(1), vec![0.5; N], PeerRole::Trainer, 0.0).expect("valid");
    assert!(p.resume(snapshot(round, 0.5)));
    for n in [10, 11, 12] {
        p.handle(Event::Up(PeerId(n)), 0.0);
    }
    p
}

/// A gossip mix counts against the upload budget as an update does: it went out free, so
/// an honest peer of a delta task with few neighbours sent a link more than the budget
/// justifies, and the link's byte allowance dropped it.
#[test]
fn a_gossip_mix_counts_against_the_upload_budget() {
    let c = LearnConfig {
        round_ms: 1_000,
        upload_mb_per_hour: 80,
        exchange: Exchange::Delta,
        sync_every: 1,
        ..cfg()
    };
    let mut p = Peer::new(c, "t", id(1), vec![0.5; N], PeerRole::Trainer, 0.0).expect("valid");
    assert!(p.resume(snapshot(5, 0.5)));
    for n in [10, 11, 12] {
        p.handle(Event::Up(PeerId(n)), 0.0);
    }
    p.tick(GREET_AFTER_MS);
    drain(&mut p);
    let (before, now) = (p.upload_free_at, GREET_AFTER_MS + 1.0);
    p.close_round(now);
    let mix: usize = drain(&mut p)
        .iter()
        .filter_map(|o| match o {
            Output::Send { data, .. }
                if matches!(PeerMessage::decode(data, N), Ok(PeerMessage::Mix { .. })) =>
            {
                Some(data.len())
            }
            _ => None,
        })
        .sum();
    assert!(mix > 0, "a mix went out");
    let rate = 80e6 / 3.6e6;
    let paid = p.upload_free_at - before.max(now);
    assert!(
        (paid - mix as f64 / rate).abs() < 1e-6,
        "{paid} ms for {mix} bytes"
    );
}

fn trains(outs: &[Output]) -> Vec<(u64, bool)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Train { round, resume, .. } => Some((*round, *resume)),
            _ => None,
        })
        .collect()
}

/// The updates among `outs`, decoded: (round, samples).
fn updates_sent(outs: &[Output]) -> Vec<(u64, u32)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send { data, .. } => match PeerMessage::decode(data, N) {
                Ok(PeerMessage::Update(u)) => Some((u.round, u.samples)),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn in_rounds_sized_in_time_a_peer_trains_on_while_its_round_is_open_and_carries_the_work() {
    let mut p = timed_running(5);
    p.tick(500.0); // greets, starts the run for round 5 from the model
    assert_eq!(trains(&drain(&mut p)), vec![(5, false)]);
    // Chunks come back; the update goes out only once 1 s of training has passed.
    p.trained(5, &[0.49; N], 0.3, 8, 700.0).expect("finite");
    assert!(updates_sent(&drain(&mut p)).is_empty(), "too early");
    p.tick(700.0);
    assert_eq!(
        trains(&drain(&mut p)),
        vec![(5, true)],
        "on from its own weights"
    );
    p.trained(5, &[0.48; N], 0.3, 8, 1_500.0).expect("finite");
    let sent = updates_sent(&drain(&mut p));
    assert_eq!(
        sent,
        vec![(5, 16); 3],
        "to each neighbour, claiming both chunks"
    );
    // Round 5 is open: the peer does not wait, it trains toward round 6 on its own
    // weights.
    p.tick(1_500.0);
    assert_eq!(trains(&drain(&mut p)), vec![(6, true)]);
    assert_eq!(p.progress().phase, "training");
    // Time for update 6 passes while round 5 is still open: no update 6 before round 5
    // closes, and training goes on.
    p.trained(6, &[0.47; N], 0.3, 8, 2_600.0).expect("finite");
    assert!(updates_sent(&drain(&mut p)).is_empty());
    p.tick(2_600.0);
    assert_eq!(trains(&drain(&mut p)), vec![(6, true)]);
    // The neighbours' updates close round 5 (its model moves) while a chunk runs.
    for n in [10u8, 11, 12] {
        p.handle(msg(u64::from(n), update_w(n + 10, 5, 0.46)), 2_650.0);
    }
    p.tick(2_700.0);
    assert_eq!(p.learner().round(), 6);
    let theta: Vec<f32> = p.weights().to_vec();
    assert!(
        theta.iter().all(|w| (w - 0.5).abs() > 1e-3),
        "the outer step moved it"
    );
    // The chunk comes back: the work since update 5 (0.48 -> 0.45) moves onto the new
    // model, and update 6 goes out at once, claiming every sample since update 5.
    p.trained(6, &[0.45; N], 0.3, 8, 2_800.0).expect("finite");
    for (x, w) in p.train_from().iter().zip(&theta) {
        assert!((x - (w - 0.03)).abs() < 1e-5, "{x} vs {w} - 0.03");
    }
    let sent = updates_sent(&drain(&mut p));
    assert_eq!(sent, vec![(6, 16); 3]);
    p.tick(2_800.0);
    assert_eq!(
        trains(&drain(&mut p)),
        vec![(7, false)],
        "the trainer loads the rebased weights"
    );
}

#[test]
fn in_rounds_sized_in_time_a_peer_a_round_behind_its_neighbours_skips_to_their_round() {
    // Most of its neighbours already sent updates for round 6: they closed round 5, so
    // its update for round 5 would reach them stale (unused with weights). It closes
    // round 5 with their updates and no update of its own, and the run's work goes out
    // as its update for round 6.
    let mut p = timed_running(5);
    p.tick(500.0);
    drain(&mut p);
    for n in [10u8, 11, 12] {
        p.handle(msg(u64::from(n), update_w(n + 10, 5, 0.46)), 600.0);
        p.handle(msg(u64::from(n), update_w(n + 10, 6, 0.45)), 650.0);
    }
    p.trained(5, &[0.49; N], 0.3, 8, 700.0).expect("finite");
    assert_eq!(p.learner().round(), 6, "round 5 closed at once");
    assert_closed_using(&mut p, 3);
    p.tick(700.0);
    drain(&mut p);
    p.trained(6, &[0.48; N], 0.3, 8, 1_500.0).expect("finite");
    assert_eq!(
        updates_sent(&drain(&mut p)),
        vec![(6, 16); 3],
        "the whole run, in step with the neighbours"
    );
    // Their round-6 updates are in: round 6 closes with ours and theirs.
    p.tick(1_500.0);
    assert_eq!(p.learner().round(), 7);

    // One neighbour of three ahead is no reason: a minority cannot make it skip.
    stays_in_round_5(&[(10, 5), (10, 6)]);
    // Most neighbours ahead, but their updates for round 5 are not held (a joiner that
    // lacked their copies): closing round 5 on nothing would leave a model none of them
    // has.
    stays_in_round_5(&[(10, 6), (11, 6), (12, 6)]);
    // Two of three ahead with their updates held: a majority, but closed without our
    // own update two would go unscreened (one of them may lie about its round).
    stays_in_round_5(&[(10, 5), (10, 6), (11, 5), (11, 6)]);

    // Two rounds behind: one round skipped per update of its own, not one per chunk.
    let three = |round: u64| [10, 11, 12].map(|n| (n, round));
    let mut r = at_5_after(&[three(5), three(6)].concat());
    assert_eq!(r.learner().round(), 6, "skipped round 5");
    for (n, round) in three(7) {
        r.handle(msg(u64::from(n), update_w(n + 10, round, 0.46)), 800.0);
    }
    r.tick(800.0);
    drain(&mut r);
    r.trained(6, &[0.48; N], 0.3, 8, 900.0).expect("finite");
    assert_eq!(r.learner().round(), 6, "one skip in this run");

    // Further behind than `max_staleness`: the model is downloaded (Model adoption),
    // and rounds closed meanwhile would lift its round past the answers.
    let l = at_5_after(&[three(5), three(9)].concat());
    assert_eq!(l.learner().round(), 5, "no skip while lagging");
}

/// Peer 1 in rounds sized in time at round 5, neighbours 10, 11 and 12, after it took in
/// their `(neighbour, round)` updates and a chunk of its run came back.
fn at_5_after(updates: &[(u8, u64)]) -> Peer {
    let mut q = timed_running(5);
    q.tick(500.0);
    drain(&mut q);
    for &(n, round) in updates {
        q.handle(msg(u64::from(n), update_w(n + 10, round, 0.46)), 600.0);
    }
    q.trained(5, &[0.49; N], 0.3, 8, 700.0).expect("finite");
    q
}

/// With those updates in, no skip: its update for round 5 goes out as without the rule.
fn stays_in_round_5(updates: &[(u8, u64)]) {
    let mut q = at_5_after(updates);
    q.tick(700.0);
    drain(&mut q);
    q.trained(5, &[0.48; N], 0.3, 8, 1_500.0).expect("finite");
    assert_eq!(q.learner().round(), 5, "{updates:?}");
    assert_eq!(
        updates_sent(&drain(&mut q)),
        vec![(5, 16); 3],
        "{updates:?}"
    );
}

/// The bytes of the updates among `outs`.
fn update_bytes(outs: &[Output]) -> usize {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send { data, .. } => {
                matches!(PeerMessage::decode(data, N), Ok(PeerMessage::Update(_)))
                    .then_some(data.len())
            }
            _ => None,
        })
        .sum()
}

#[test]
fn with_an_upload_budget_a_peer_trains_on_until_its_updates_are_paid_for() {
    // 1 MB an hour, a byte every 3.6 ms; each round's update to 3 neighbours costs
    // more than a second of that, so rounds grow longer.
    let per_byte_ms = 3.6;
    let mut p = timed_running_with(5, 1);
    p.tick(500.0);
    drain(&mut p);
    let (mut t, mut sent, mut updates, mut waited) = (500.0, 0usize, 0u32, 0u32);
    let mut since_update = 0.0;
    while t < 400_000.0 {
        t += 250.0;
        since_update += 250.0;
        let round = p.learner().round();
        let run = if p.open_since.is_some() {
            round + 1
        } else {
            round
        };
        p.trained(run, &[0.45; N], 0.3, 8, t).expect("finite");
        let outs = drain(&mut p);
        let bytes = update_bytes(&outs);
        if bytes > 0 {
            sent += bytes;
            updates += 1;
            if since_update > 1_250.0 {
                waited += 1;
            }
            since_update = 0.0;
            // Every bound stated in the docs holds at each send: the budget's rate over
            // the time so far, the burst allowance, and this update's copies.
            let allowed = (t - 500.0) / per_byte_ms + UPLOAD_BURST_MS / per_byte_ms;
            assert!(
                (sent - bytes) as f64 <= allowed,
                "{sent} bytes by {t} ms, {allowed} allowed"
            );
            for n in [10u8, 11, 12] {
                p.handle(msg(u64::from(n), update_w(n + 10, run, 0.46)), t);
            }
        }
        p.tick(t);
        let trains = trains(&drain(&mut p));
        assert!(
            trains.len() <= 1 && p.progress().phase != "waiting",
            "never idles"
        );
    }
    // Updates go out as the budget pays for them, not a round a second.
    let per_round = sent as f64 / f64::from(updates);
    assert!(per_round * 3.6 > 1_000.0, "a round costs {per_round} bytes");
    assert!(
        2 * waited > updates,
        "{waited} of {updates} rounds waited for the budget"
    );
    let paced = 400_000.0 / per_byte_ms + UPLOAD_BURST_MS / per_byte_ms + per_round;
    assert!(sent as f64 <= paced, "{sent} bytes, {paced} allowed");
    assert!(
        sent as f64 >= 0.9 * 400_000.0 / per_byte_ms,
        "{sent}: the budget is used"
    );
}

#[test]
fn an_update_that_claims_no_sample_is_refused() {
    let mut p = running(5);
    let (payload, _) = Compressor::new(Compression::None, N).encode(&[0.5; N]);
    let zero = PeerMessage::Update(Update::signed(&id(20), "t", 5, 0, 0.1, payload)).encode();
    p.handle(msg(10, zero), 10.0);
    assert_eq!(rejected(&p, Rejection::Samples), 1);
    assert!(!p.learner().has_fresh_from(&id(20).public()));
}

#[test]
fn in_rounds_sized_in_time_a_neighbour_that_starts_contributing_gets_the_open_rounds_update() {
    let mut p = timed_running(5);
    p.tick(500.0);
    drain(&mut p);
    let idle = PeerMessage::Status {
        contributing: false,
    };
    p.handle(msg(12, idle.encode()), 600.0);
    p.trained(5, &[0.48; N], 0.3, 8, 1_500.0).expect("finite");
    let to: Vec<u64> = drain(&mut p)
        .iter()
        .filter_map(|o| match o {
            Output::Send { to, data }
                if PeerMessage::decode(data, N)
                    .is_ok_and(|m| matches!(m, PeerMessage::Update(_))) =>
            {
                Some(to.0)
            }
            _ => None,
        })
        .collect();
    assert_eq!(to, vec![10, 11], "not to the idle neighbour");
    // The visitor's page counts it connected, not training.
    let shown = p.progress();
    assert_eq!((shown.peers, shown.connected), (2, 3));
    // Round 5 is open (training goes on) when 12 resumes: it gets our update for it.
    p.tick(1_500.0);
    drain(&mut p);
    let back = PeerMessage::Status { contributing: true };
    p.handle(msg(12, back.encode()), 1_600.0);
    let sent = drain(&mut p);
    assert!(
        sent.iter().any(|o| matches!(o, Output::Send { to, data } if to.0 == 12
            && PeerMessage::decode(data, N).is_ok_and(|m| matches!(m, PeerMessage::Update(u) if u.round == 5)))),
        "{sent:?}"
    );
}

#[test]
fn in_rounds_sized_in_time_a_broken_chunk_restarts_the_run_toward_the_next_update() {
    let mut p = timed_running(5);
    p.tick(500.0);
    drain(&mut p);
    p.trained(5, &[0.48; N], 0.3, 8, 1_500.0).expect("finite");
    assert_eq!(updates_sent(&drain(&mut p)).len(), 3);
    p.tick(1_500.0);
    assert_eq!(trains(&drain(&mut p)), vec![(6, true)]);
    // The trainer returns garbage while round 5 is open: nothing is sent, and training
    // starts again from the model, toward update 6 (update 5 is out already).
    assert!(p.trained(6, &[f32::NAN; N], 0.3, 8, 1_700.0).is_err());
    assert!(updates_sent(&drain(&mut p)).is_empty());
    p.tick(1_700.0);
    assert_eq!(trains(&drain(&mut p)), vec![(6, false)]);
    assert!(p.train_from().iter().all(|w| (w - 0.5).abs() < 1e-6));
}

/// A head the server (key seed 99) signed for task "t" at `count` entries.
fn signed_head(count: u64, hash: u8) -> Vec<u8> {
    crate::trust::head::SignedHead::sign(&id(99), "t", count, [hash; 32], 0).encode()
}

/// The ledger heads a peer sent, by neighbour.
fn heads_sent(outs: &[Output]) -> Vec<(u64, u64)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send { to, data } => match PeerMessage::decode(data, N) {
                Ok(PeerMessage::Head(h)) => {
                    let h = crate::trust::head::SignedHead::decode(&h).expect("valid");
                    Some((to.0, h.count))
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn ledger_heads_are_gossiped_once_each_and_only_the_servers_kept() {
    let mut p = running(3);
    // Nothing to gossip until the driver hands it a head the server signed.
    assert!(heads_sent(&drain(&mut p)).is_empty());
    let v = p
        .learner_mut()
        .witness_mut()
        .check(Some(&signed_head(5, 1)), &[]);
    assert_eq!(
        v,
        Ok(Some(crate::trust::head::Verdict::Intact { count: 5 }))
    );
    p.tick(GREET_AFTER_MS + 1.0);
    let mut sent = heads_sent(&drain(&mut p));
    sent.sort_unstable();
    assert_eq!(sent, vec![(10, 5), (11, 5), (12, 5)], "each neighbour once");
    p.tick(GREET_AFTER_MS + 2.0);
    assert!(
        heads_sent(&drain(&mut p)).is_empty(),
        "not again for the same head"
    );

    // A neighbour's head of the same server is kept for the next check; once it checks
    // out, the server's head then goes to the neighbours, not back to one that holds it.
    p.handle(msg(10, PeerMessage::Head(signed_head(9, 2)).encode()), 10.0);
    assert_eq!(p.learner().witness().lookups(), vec![4, 8]);
    let v = p.learner_mut().witness_mut().check(
        Some(&signed_head(9, 2)),
        &[(4, Some([1; 32])), (8, Some([2; 32]))],
    );
    assert_eq!(
        v,
        Ok(Some(crate::trust::head::Verdict::Intact { count: 9 }))
    );
    p.tick(GREET_AFTER_MS + 3.0);
    let mut sent = heads_sent(&drain(&mut p));
    sent.sort_unstable();
    assert_eq!(
        sent,
        vec![(11, 9), (12, 9)],
        "not back to the one it came from"
    );

    // A forged head (a byte of its count changed) is refused and counted; another
    // server's head and one already checked are passed over.
    let mut forged = signed_head(50, 3);
    forged[10] ^= 1;
    p.handle(msg(11, PeerMessage::Head(forged).encode()), 11.0);
    assert_eq!(rejected(&p, Rejection::BadSignature), 1);
    let other = crate::trust::head::SignedHead::sign(&id(98), "t", 60, [4; 32], 0).encode();
    p.handle(msg(11, PeerMessage::Head(other).encode()), 12.0);
    p.handle(msg(12, PeerMessage::Head(signed_head(9, 2)).encode()), 13.0);
    assert_eq!(p.learner().witness().lookups(), vec![8], "nothing new held");
    // Garbage after the header is malformed.
    p.handle(msg(12, PeerMessage::Head(vec![1, 2, 3]).encode()), 14.0);
    assert_eq!(rejected(&p, Rejection::Malformed), 1);
}

/// Differential privacy at clip 1 and noise multiplier 1, stopping after `rounds`.
fn stop_after(rounds: u64) -> crate::privacy::Dp {
    crate::privacy::Dp {
        clip: 1.0,
        noise_multiplier: 1.0,
        delta: 1e-5,
        rounds,
        epsilon: crate::privacy::epsilon(1.0, 1.0, rounds, 1e-5),
        on_budget: crate::privacy::OnBudget::Stop,
    }
}

#[test]
fn a_peer_whose_privacy_budget_is_spent_stops_training_and_says_so() {
    let mut p = running(5);
    p.learner_mut().enable_privacy(stop_after(1), [4; 32], 0);
    p.trained(5, &[0.49; N], 0.3, 8, 50.0)
        .expect("within the budget");
    assert_eq!(p.progress().loss, 0.0, "no loss shown or reported");
    let sent = drain(&mut p);
    p.tick(50.0 + HOLD_FACTOR * 1_000.0); // no neighbour sent: the longer limit closes it
    assert_eq!(p.learner().round(), 6);
    p.tick(3_100.0);
    p.tick(3_200.0);
    let outs = drain(&mut p);
    assert!(
        !outs.iter().any(|o| matches!(o, Output::Train { .. })),
        "{outs:?}"
    );
    // With its last update, neighbours are told it no longer contributes.
    let stopped = PeerMessage::Status {
        contributing: false,
    }
    .encode();
    assert_eq!(
        sent.iter()
            .filter(|o| matches!(o, Output::Send { data, .. } if *data == stopped))
            .count(),
        3,
        "{sent:?}"
    );
    assert_eq!(p.progress().phase, "budget spent");
    let dp = p.progress().privacy.expect("shown");
    assert!(dp.stopped && dp.rounds == 1, "{dp:?}");
}

const BIG: usize = 4096;

/// Weights that int8 cannot carry exactly; another `phase` changes every coordinate by a
/// different amount.
fn ramp(round: u64, phase: f32) -> Snapshot {
    Snapshot {
        round,
        weights: (0..BIG).map(|i| (i as f32 * 0.37 + phase).sin()).collect(),
        momentum: vec![0.1; BIG],
    }
}

/// Delivers messages between an observer (known to the trainers as peer 10) and the
/// trainers (known to it as 20, 21, ...) until none is left; returns the answers it got
/// (sender, bytes), which `tamper` may change on the way.
fn route(
    o: &mut Peer,
    trainers: &mut [Peer],
    now: f64,
    tamper: &mut dyn FnMut(u64, &mut Vec<u8>),
) -> Vec<(u64, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        let mut moved = false;
        for out in drain(o) {
            if let Output::Send { to, data } = out {
                trainers[(to.0 - 20) as usize].handle(msg(10, data), now);
                moved = true;
            }
        }
        for (i, t) in trainers.iter_mut().enumerate() {
            for out in drain(t) {
                if let Output::Send { to, mut data } = out
                    && to == PeerId(10)
                {
                    let from = 20 + i as u64;
                    if data.get(4) == Some(&9) {
                        tamper(from, &mut data);
                        got.push((from, data.clone()));
                    }
                    o.handle(msg(from, data), now);
                    moved = true;
                }
            }
        }
        if !moved {
            return got;
        }
    }
}

/// An observer (peer 10 to them) and four trainers at round 5 (peers 20 to 23 to it),
/// linked.
fn observer_and_trainers() -> (Peer, Vec<Peer>) {
    observer_and(4)
}

/// An observer (peer 10 to them) and `n` trainers at round 5 (peers 20 and on to it),
/// linked.
fn observer_and(n: u8) -> (Peer, Vec<Peer>) {
    let observer = PeerRole::Observer { every_ms: 10_000.0 };
    let mut o = Peer::new(cfg(), "t", id(9), vec![0.0; BIG], observer, 0.0).expect("valid");
    let trainers: Vec<Peer> = (0..n)
        .map(|k| {
            let mut t = Peer::new(
                cfg(),
                "t",
                id(2 + k),
                vec![0.0; BIG],
                PeerRole::Trainer,
                0.0,
            )
            .expect("valid");
            assert!(t.resume(ramp(5, 0.0)));
            t.handle(Event::Up(PeerId(10)), 0.0);
            t
        })
        .collect();
    for k in 0..u64::from(n) {
        o.handle(Event::Up(PeerId(20 + k)), 0.0);
    }
    (o, trainers)
}

/// An observer whose one contributing neighbour is a liar shows no model: a lone answer
/// (here a model of its own at a round near the largest) was taken on its word. Once a
/// second contributor answers alike, it adopts.
#[test]
fn an_observer_takes_no_model_on_one_contributors_word() {
    let far = ramp((1 << 40) - 1, 0.9);
    for contributors in [1u8, 2] {
        let (mut o, mut trainers) = observer_and(contributors);
        let mut now = JOIN_GRACE_MS;
        for t in &mut trainers {
            assert!(t.learner_mut().adopt(far.clone()));
            t.tick(now);
        }
        for _ in 0..3 {
            o.tick(now);
            route(&mut o, &mut trainers, now, &mut |_, _| {});
            now += 10_000.0;
        }
        if contributors == 1 {
            assert!(!o.has_model(), "round {}", o.learner().round());
        } else {
            assert_eq!(o.learner().round(), (1 << 40) - 1, "two answers alike");
        }
    }
    // An observer that holds the swarm's model, left with one contributor (the swarm
    // shrank to one volunteer), follows it as it trains on, and takes no model far from
    // the one it holds.
    let (mut o, mut trainers) = observer_and(2);
    let mut now = JOIN_GRACE_MS;
    for t in &mut trainers {
        t.tick(now);
    }
    o.tick(now);
    route(&mut o, &mut trainers, now, &mut |_, _| {});
    assert_eq!(o.learner().round(), 5);
    o.handle(Event::Down(PeerId(21)), now);
    let one = &mut trainers[..1];
    let far = 20 + OBSERVE_LONE_AHEAD + 1;
    for (round, phase, shown) in [(9, 0.005, 9), (12, 2.0, 9), (20, 0.01, 20), (far, 0.01, 20)] {
        assert!(one[0].learner_mut().adopt(ramp(round, phase)));
        now += 10_000.0;
        o.tick(now);
        route(&mut o, one, now, &mut |_, _| {});
        assert_eq!(o.learner().round(), shown, "round {round}, phase {phase}");
    }
}

/// One liar among an observer's neighbours answers each download with the weights the
/// observer shows, moved toward a model of its own by a little less than the swarm's
/// model is from them (so the swarm's progress makes room for a larger step each time,
/// within `AGREE_RATIO` of the swarm's model). Asking two, the observer took it whenever
/// it was one of them (of two answers that agree, the one nearer the weights it holds),
/// and the dashboard and its export walked to the liar's model; asking three, the median
/// is the honest answers'.
#[test]
fn one_liar_among_an_observers_neighbours_cannot_walk_its_model_away() {
    let target = ramp(0, 0.3).weights;
    for liar in 0..3usize {
        let (mut o, mut trainers) = observer_and(3);
        let mut now = JOIN_GRACE_MS;
        for t in &mut trainers {
            t.tick(now);
        }
        for download in 0..29u64 {
            let round = 5 + download;
            let honest = ramp(round, 0.005 * download as f32);
            let own = o.weights();
            let step = 0.9 * super::super::aggregate::distance(&honest.weights, own)
                / super::super::aggregate::distance(&target, own).max(1e-6);
            let lie: Vec<f32> = own
                .iter()
                .zip(&target)
                .map(|(o, t)| o + step.min(1.0) * (t - o))
                .collect();
            for (k, t) in trainers.iter_mut().enumerate() {
                let s = if k == liar && download > 0 {
                    Snapshot {
                        round,
                        weights: lie.clone(),
                        momentum: honest.momentum.clone(),
                    }
                } else {
                    honest.clone()
                };
                assert!(download == 0 || t.learner_mut().adopt(s));
            }
            o.tick(now);
            route(&mut o, &mut trainers, now, &mut |_, _| {});
            assert_eq!(
                o.learner().round(),
                round,
                "liar {liar}, download {download}"
            );
            now += 10_000.0;
        }
        let honest = trainers[(liar + 1) % 3].weights();
        let gap = super::super::aggregate::distance(o.weights(), honest);
        let reach = super::super::aggregate::distance(&target, honest);
        assert!(
            gap < 0.01 * reach,
            "liar {liar}: the observer is {gap} from the swarm's model, the lie {reach}"
        );
    }
}

/// An observer that holds a round far ahead of its neighbours' (two colluders agreed on
/// a made-up round near 2^40, or the swarm started again from an older checkpoint) takes
/// the model they agree on after two downloads in a row; it took only newer models, and
/// none would come: the dashboard and its export kept the lie.
#[test]
fn an_observer_far_ahead_of_its_neighbours_steps_back_to_their_model() {
    let (mut o, mut trainers) = observer_and_trainers();
    assert!(o.learner_mut().adopt(ramp((1 << 40) - 1, 0.9)));
    let mut now = JOIN_GRACE_MS;
    for t in &mut trainers {
        t.tick(now);
    }
    let mut rounds = Vec::new();
    for _ in 0..3 {
        o.tick(now);
        route(&mut o, &mut trainers, now, &mut |_, _| {});
        rounds.push(o.learner().round());
        now += 10_000.0;
    }
    assert_eq!(rounds, [(1 << 40) - 1, 5, 5], "confirmed once, then taken");
    assert!(
        super::super::aggregate::distance(o.weights(), trainers[0].weights()) < 1e-3,
        "the neighbours' model"
    );
    // Neighbours merely a few rounds behind (slower ones) do not set it back.
    assert!(o.learner_mut().adopt(ramp(20, 0.3)));
    for _ in 0..3 {
        o.tick(now);
        route(&mut o, &mut trainers, now, &mut |_, _| {});
        now += 10_000.0;
    }
    assert_eq!(o.learner().round(), 20);
}

#[test]
fn an_observer_downloads_changes_from_the_weights_it_holds_not_whole_models() {
    let (mut o, mut trainers) = observer_and_trainers();
    let whole = PeerMessage::Model(ramp(5, 0.0)).encode().len();
    let mut now = JOIN_GRACE_MS;
    for t in &mut trainers {
        t.tick(now);
    }
    let mut asked_before: Vec<u64> = Vec::new();
    for download in 0..8u64 {
        // The swarm moves on between two downloads.
        let round = 5 + 3 * download;
        if download > 0 {
            for t in &mut trainers {
                assert!(t.learner_mut().adopt(ramp(round, 0.01 * download as f32)));
            }
        }
        let before = o.weights().to_vec();
        o.tick(now);
        let got = route(&mut o, &mut trainers, now, &mut |_, _| {});
        let senders: Vec<u64> = got.iter().map(|(f, _)| *f).collect();
        assert_eq!(
            senders.len(),
            OBSERVE_ASK,
            "download {download}: {senders:?}"
        );
        assert_eq!(
            o.learner().round(),
            round,
            "download {download} adopted the new model"
        );
        let gap = super::super::aggregate::distance(o.weights(), trainers[0].weights());
        for (_, bytes) in &got {
            if download == 0 {
                // Whole weights, fp32, without the momentum a trainer's answer carries.
                assert_eq!(bytes.len(), 77 + 5 + 4 * BIG, "of {whole}");
                assert_eq!(gap, 0.0, "whole weights are exact");
            } else {
                // A change from what it holds: int8, an eighth of a trainer's answer.
                assert_eq!(
                    bytes.len(),
                    77 + 9 + 4 * BIG.div_ceil(256) + BIG,
                    "of {whole}"
                );
                assert!(bytes.len() < whole / 7);
            }
        }
        // int8 leaves at most half a step of the change's scale on each value, and that
        // does not pile up: each change carries what the last one left out.
        let max_abs = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max)
        };
        let change = max_abs(trainers[0].weights(), &before);
        let error = max_abs(o.weights(), trainers[0].weights());
        assert!(
            error <= change / 254.0 * 1.01,
            "download {download}: error {error}, change {change}, gap {gap}"
        );
        let mut now_asked = senders.clone();
        now_asked.sort_unstable();
        if download > 0 {
            assert_eq!(
                now_asked, asked_before,
                "it asks the neighbours it holds weights of"
            );
        }
        asked_before = now_asked;
        now += 10_000.0;
    }
    assert_eq!(rejected(&o, Rejection::Base), 0);
    assert_eq!(rejected(&o, Rejection::Malformed), 0);

    // A neighbour that lies about the weights it sends (their hash is not the one it
    // announced) is not heard, and the observer forgets what it held from it.
    for t in &mut trainers {
        assert!(t.learner_mut().adopt(ramp(40, 0.5)));
    }
    o.tick(now);
    let liar = asked_before[0];
    route(&mut o, &mut trainers, now, &mut |from, data| {
        if from == liar {
            let last = data.len() - 1;
            data[last] ^= 1;
        }
    });
    assert_eq!(rejected(&o, Rejection::Malformed), 1);
    assert_eq!(o.learner().round(), 40, "two answers of three agree");
    // The next download draws all at random, and the liar gets no delta: whatever it
    // holds of ours is forgotten.
    now += 10_000.0;
    o.tick(now + MODEL_WAIT_MS);
    route(&mut o, &mut trainers, now + MODEL_WAIT_MS, &mut |_, _| {});
    now += 10_000.0 + MODEL_WAIT_MS;
    o.tick(now);
    route(&mut o, &mut trainers, now, &mut |_, _| {});
    assert_eq!(o.learner().round(), 40);

    // An answer that is a change from weights the observer does not hold is refused.
    now += 10_000.0;
    o.tick(now);
    let asked_now: Vec<u64> = drain(&mut o)
        .into_iter()
        .filter_map(|out| match out {
            Output::Send { to, data } if data.get(4) == Some(&8) => Some(to.0),
            _ => None,
        })
        .collect();
    assert_eq!(asked_now.len(), OBSERVE_ASK);
    let forged = PeerMessage::Observed(Observed {
        round: 41,
        base: [7; 32],
        payload: Compressor::new(Compression::Int8 { block: 256 }, 0)
            .encode(&[0.0; BIG])
            .0,
        result: [0; 32],
    })
    .encode();
    o.handle(msg(asked_now[0], forged), now);
    assert_eq!(rejected(&o, Rejection::Base), 1);
    assert_eq!(o.learner().round(), 40);
}

#[test]
fn an_observer_with_only_idle_neighbours_asks_for_no_wake_up() {
    let observer = PeerRole::Observer { every_ms: 10_000.0 };
    let mut o = Peer::new(cfg(), "t", id(9), vec![0.0; BIG], observer, 0.0).expect("valid");
    for k in [20, 21] {
        o.handle(Event::Up(PeerId(k)), 0.0);
    }
    o.tick(GREET_AFTER_MS);
    let idle = PeerMessage::Status {
        contributing: false,
    }
    .encode();
    for k in [20, 21] {
        o.handle(msg(k, idle.clone()), GREET_AFTER_MS);
    }
    // Past its grace, with nobody to ask: no wake-up (one in the past would make a
    // driver that sleeps until it spin).
    let now = 2.0 * JOIN_GRACE_MS;
    o.tick(now);
    drain(&mut o);
    assert!(
        o.next_wake().is_none_or(|w| w >= now),
        "{:?}",
        o.next_wake()
    );
    // A neighbour that starts contributing is asked as soon as it is due.
    o.handle(
        msg(21, PeerMessage::Status { contributing: true }.encode()),
        now,
    );
    let wake = o.next_wake().expect("a wake-up");
    o.tick(wake.max(now));
    assert!(
        drain(&mut o)
            .iter()
            .any(|out| matches!(out, Output::Send { to, data } if *to == PeerId(21) && data.get(4) == Some(&8))),
        "asks the neighbour that contributes"
    );
}

#[test]
fn a_trainer_keeps_what_at_most_max_observed_observers_hold() {
    let mut t =
        Peer::new(cfg(), "t", id(2), vec![0.0; BIG], PeerRole::Trainer, 0.0).expect("valid");
    assert!(t.resume(ramp(5, 0.0)));
    let observers: Vec<u64> = (30..30 + MAX_OBSERVED as u64 + 1).collect();
    for &p in &observers {
        t.handle(Event::Up(PeerId(p)), 0.0);
    }
    let ask = |t: &mut Peer, p: u64, base: [u8; 32], now: f64| -> Observed {
        t.handle(msg(p, PeerMessage::Observe { base }.encode()), now);
        drain(t)
            .into_iter()
            .find_map(|out| match out {
                Output::Send { to, data } if to == PeerId(p) && data.get(4) == Some(&9) => {
                    match PeerMessage::decode(&data, BIG) {
                        Ok(PeerMessage::Observed(o)) => Some(o),
                        other => panic!("{other:?}"),
                    }
                }
                _ => None,
            })
            .expect("an answer")
    };
    // Asks 4 s apart: answers (16 KB whole, 4 KB a change) stay within their rate.
    let gap = 4_000.0;
    let first: Vec<Observed> = observers
        .iter()
        .enumerate()
        .map(|(i, &p)| ask(&mut t, p, [0; 32], i as f64 * gap))
        .collect();
    assert!(
        first.iter().all(|o| o.base == [0; 32]),
        "whole weights first"
    );
    assert!(t.learner_mut().adopt(ramp(6, 0.2)));
    let now = observers.len() as f64 * gap;
    for (i, &p) in observers.iter().enumerate() {
        let again = ask(&mut t, p, first[i].result, now + i as f64 * gap);
        if i < MAX_OBSERVED {
            assert_eq!(
                again.base, first[i].result,
                "a change from what observer {p} holds"
            );
        } else {
            assert_eq!(
                again.base, [0; 32],
                "one observer too many: whole weights again"
            );
        }
    }
    // A base it does not know (the observer missed an answer) gets whole weights.
    let last = 2.0 * observers.len() as f64 * gap;
    let lost = ask(&mut t, observers[0], [3; 32], last);
    assert_eq!(lost.base, [0; 32]);
    // Observers that stopped asking give their places up: the fifth gets one.
    let later = last + OBSERVED_IDLE_MS;
    let fifth = observers[MAX_OBSERVED];
    let again = ask(&mut t, fifth, [0; 32], later);
    let then = ask(&mut t, fifth, again.result, later + ANSWER_INTERVAL_MS);
    assert_eq!(then.base, again.result, "a change from what it holds");
}

/// A peer exchanging weights changes (top-k 12.5%, 2-bit values) that holds the model at
/// round 5, with `neighbours` connected.
fn changes_peer_at_5(neighbours: &[u64]) -> Peer {
    let c = LearnConfig {
        compression: Compression::TopK2Bit { fraction: 0.125 },
        ..cfg()
    };
    let mut p = Peer::new(c, "t", id(1), vec![0.5; N], PeerRole::Trainer, 0.0).expect("valid");
    assert!(p.resume(snapshot(5, 0.5)));
    for &n in neighbours {
        p.handle(Event::Up(PeerId(n)), 0.0);
    }
    p
}

/// Under differential privacy, when an update leaves (it waits for the upload budget to
/// afford its size) does not depend on the run before its noise: sized from the run, a
/// run that stayed near our copy went out as a change at once, and one that moved far
/// waited for a keyframe's bytes, and a neighbour timing the update learnt which.
#[test]
fn under_differential_privacy_an_updates_size_is_not_judged_from_the_run() {
    let sizes = |private: bool| {
        let mut p = changes_peer_at_5(&[10, 11, 12]);
        if private {
            p.learner_mut().enable_privacy(stop_after(100), [4; 32], 0);
        }
        p.tick(GREET_AFTER_MS);
        drain(&mut p);
        // Round 5's update sets our copy; the round closes on it alone.
        p.trained(5, &[0.49; N], 0.3, 8, 600.0).expect("finite");
        p.tick(600.0 + HOLD_FACTOR * 1_000.0);
        assert_eq!(p.learner().round(), 6);
        let w = p.learner().weights().to_vec();
        let to = p.contributors();
        // A run that did not move (our copy lags it) and one that moved far.
        let far: Vec<f32> = w.iter().map(|x| x + 1.0).collect();
        (p.next_update_bytes(&to, &w), p.next_update_bytes(&to, &far))
    };
    let (still, moved) = sizes(false);
    assert!(
        still > moved,
        "without privacy the run sets the size: {still} {moved}"
    );
    let (still, moved) = sizes(true);
    assert_eq!(still, moved, "under privacy it does not");
}

#[test]
fn a_relay_that_won_a_signers_first_race_and_closes_leaves_the_signers_copy() {
    // 11 relays signer 20's whole weights for round 5 before 10 (the signer) sends its
    // own copy; 11's channel then closes. 20's change from that copy, on 10's
    // connection, applies: the copy went only where no open connection delivered it.
    let change = |base: u64, round: u64| {
        let (inner, _) =
            Compressor::new(Compression::TopK2Bit { fraction: 0.125 }, 0).encode(&[0.01; N]);
        let mut payload = vec![crate::learn::CHANGE_TAG];
        payload.extend_from_slice(&base.to_le_bytes());
        payload.extend_from_slice(&inner);
        PeerMessage::Update(Update::signed(&id(20), "t", round, 8, 0.1, payload)).encode()
    };
    let mut p = changes_peer_at_5(&[10, 11, 12]);
    p.handle(msg(11, update_of(20, 5, 0.5)), 10.0);
    p.handle(msg(10, update_of(20, 5, 0.5)), 11.0);
    assert_eq!(p.nbrs[&PeerId(10)].copy_of, Some(id(20).public()));
    p.handle(Event::Down(PeerId(11)), 20.0);
    p.handle(msg(10, change(5, 6)), 30.0);
    assert_eq!(rejected(&p, Rejection::Base), 0);
    assert_eq!(p.nbrs[&PeerId(10)].key, Some(id(20).public()));
}

#[test]
fn a_weights_change_from_a_copy_not_held_does_not_hold_the_round() {
    let mut p = changes_peer_at_5(&[10, 11, 12]);
    p.tick(GREET_AFTER_MS);
    drain(&mut p);
    // Our update for round 5, then the neighbours' changes from copies (their round-4
    // updates) we never received: authentic, not usable.
    p.trained(5, &[0.49; N], 0.3, 8, 600.0).expect("finite");
    let (inner, _) =
        Compressor::new(Compression::TopK2Bit { fraction: 0.125 }, 0).encode(&[0.01; N]);
    for n in [10u8, 11, 12] {
        let mut payload = vec![crate::learn::CHANGE_TAG];
        payload.extend_from_slice(&4u64.to_le_bytes());
        payload.extend_from_slice(&inner);
        let u = PeerMessage::Update(Update::signed(&id(n + 10), "t", 5, 8, 0.1, payload));
        p.handle(msg(u64::from(n), u.encode()), 650.0);
    }
    assert_eq!(rejected(&p, Rejection::Base), 3);
    // Every neighbour was heard for round 5: the round closes now, not at the deadline
    // (1 s after our update), and on our own update alone.
    p.tick(700.0);
    assert_eq!(p.learner().round(), 6);
    let used: Vec<usize> = drain(&mut p)
        .iter()
        .filter_map(|o| match o {
            Output::RoundClosed(s) => Some(s.used),
            _ => None,
        })
        .collect();
    assert_eq!(used, vec![0]);
}

/// Neighbour `signer`'s receipt for our (peer 1's) update for `round`: it used it.
fn receipt_from(signer: u8, round: u64) -> Vec<u8> {
    let r = crate::trust::receipt::Receipt::sign(
        &id(signer),
        "t",
        round,
        id(1).public(),
        8,
        [0; 32],
        0,
    );
    PeerMessage::Receipt(r.encode()).encode()
}

/// A peer at round 40 whose neighbours 10 and 11 (signing with 20 and 21) sent their
/// updates for it, and which sent its own.
fn sent_our_update_for_40() -> Peer {
    let mut p = running(40);
    p.handle(msg(10, update(20, 40)), 1.0);
    p.handle(msg(11, update(21, 40)), 2.0);
    p.trained(40, &[0.49; N], 0.3, 8, 3.0).expect("finite");
    p
}

#[test]
fn only_a_neighbours_own_receipts_for_our_recent_rounds_count() {
    // 10 signs its updates with 20; 11 with 21. We send our update for round 40: 10's
    // receipt for it counts, once; receipts 11 mints under keys of its making do not,
    // nor does one of 20 passed on by 11, nor 10's for a round we sent no update for
    // (before a download, say, or one not reached).
    let mut p = sent_our_update_for_40();
    let counted = |p: &Peer| p.learner().stats.receipts;
    p.handle(msg(11, receipt_from(20, 40)), 4.0);
    for signer in 100u8..140 {
        p.handle(msg(11, receipt_from(signer, 40)), 5.0);
    }
    assert_eq!(
        counted(&p),
        0,
        "receipts signed by keys 11 does not sign with"
    );
    p.handle(msg(10, receipt_from(20, 40)), 6.0);
    p.handle(msg(10, receipt_from(20, 40)), 7.0);
    assert_eq!(counted(&p), 1);
    p.handle(msg(10, receipt_from(20, 39)), 8.0);
    p.handle(msg(10, receipt_from(20, 41)), 9.0);
    assert_eq!(counted(&p), 1, "rounds we sent no update for");
    p.handle(msg(11, receipt_from(21, 40)), 10.0);
    assert_eq!(counted(&p), 2);
}

/// Only a receipt that would count has its signature checked (an ed25519 verification):
/// one naming a key its connection does not sign with, one for a round we sent no update
/// for, and one already counted are dropped or taken unchecked. Receipts minted under
/// throwaway keys, or one valid receipt sent again and again, cost a signature check
/// each, 200 a second. Seen here through forged signatures: only the last is checked.
#[test]
fn only_a_receipt_that_would_count_has_its_signature_checked() {
    let mut p = sent_our_update_for_40();
    let forged = |signer, round| {
        let mut r = receipt_from(signer, round);
        let last = r.len() - 1;
        r[last] ^= 1;
        r
    };
    let checked = |p: &Peer| rejected(p, Rejection::BadSignature);
    for signer in 100u8..140 {
        p.handle(msg(11, forged(signer, 40)), 4.0);
    }
    p.handle(msg(10, forged(20, 39)), 5.0);
    assert_eq!(checked(&p), 0, "receipts that could not count were checked");
    p.handle(msg(10, receipt_from(20, 40)), 6.0);
    assert_eq!(p.learner().stats.receipts, 1);
    p.handle(msg(10, forged(20, 40)), 7.0);
    assert_eq!(
        checked(&p),
        0,
        "a receipt counted already was checked again"
    );
    // 11's own for our round would count: checked, and refused.
    p.handle(msg(11, forged(21, 40)), 8.0);
    assert_eq!(checked(&p), 1);
    assert_eq!(p.learner().stats.receipts, 1);
}

/// One round of a peer with weights changes, from `t`: its update for `r` (returned,
/// by neighbour: whole copies go out first), the updates of the neighbours `from`, the
/// round's close, and the receipts of those it went to but `silent`.
fn changes_round(p: &mut Peer, r: u64, t: f64, from: &[u8], silent: &[u64]) -> Vec<(u64, u64, u8)> {
    p.tick(t);
    drain(p);
    p.trained(r, &[0.5 - 0.01 * r as f32; N], 0.3, 8, t + 1.0)
        .expect("finite");
    let mut sent = update_payloads(&drain(p));
    sent.sort_unstable();
    for &n in from {
        p.handle(msg(u64::from(n), update_w(n + 10, r, 0.46)), t + 2.0);
    }
    p.tick(t + 3.0);
    assert_eq!(p.learner().round(), r + 1);
    for &(to, r, _) in sent.iter().filter(|s| !silent.contains(&s.0)) {
        p.handle(msg(to, receipt_from(to as u8 + 10, r)), t + 4.0);
    }
    sent
}

/// Each update among `outs`: (to, round, the payload's first byte).
fn update_payloads(outs: &[Output]) -> Vec<(u64, u64, u8)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send { to, data } => match PeerMessage::decode(data, N) {
                Ok(PeerMessage::Update(u)) => Some((to.0, u.round, u.payload[0])),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn with_weights_changes_a_new_neighbour_gets_the_public_copy_whole_then_changes() {
    let mut p = changes_peer_at_5(&[10, 11, 12, 13, 14]);
    let (int8, change) = (crate::learn::KEYFRAME_CODEC.tag(), crate::learn::CHANGE_TAG);
    let mut t = GREET_AFTER_MS;
    let round = |p: &mut Peer, r: u64, t: f64, from: &[u8]| changes_round(p, r, t, from, &[]);
    let all = |r: u64, kinds: &[(u64, u8)]| -> Vec<(u64, u64, u8)> {
        kinds.iter().map(|&(n, k)| (n, r, k)).collect()
    };
    // After the download, the first update sets the copy: a keyframe to all five.
    let five = [10u8, 11, 12, 13, 14];
    let keyframes: Vec<(u64, u8)> = (10..15).map(|n| (n, int8)).collect();
    assert_eq!(round(&mut p, 5, t, &five), all(5, &keyframes));
    // A sixth neighbour connects: it gets the copy whole (int8, a keyframe's bytes), the
    // others the change.
    p.handle(Event::Up(PeerId(15)), t + 10.0);
    t += 10.0 + GREET_AFTER_MS;
    let six = [10u8, 11, 12, 13, 14, 15];
    let mut kinds: Vec<(u64, u8)> = (10..15).map(|n| (n, change)).collect();
    kinds.push((15, int8));
    assert_eq!(round(&mut p, 6, t, &six), all(6, &kinds));
    // From then on every neighbour gets changes.
    t += 100.0;
    let changes: Vec<(u64, u8)> = (10..16).map(|n| (n, change)).collect();
    assert_eq!(round(&mut p, 7, t, &six), all(7, &changes));
    // A neighbour that is left out of an update (it paused) no longer holds the copy:
    // when it contributes again it gets the copy whole.
    let status = |on: bool| PeerMessage::Status { contributing: on }.encode();
    p.handle(msg(11, status(false)), t + 50.0);
    t += 100.0;
    let without: Vec<(u64, u8)> = [10, 12, 13, 14, 15].iter().map(|&n| (n, change)).collect();
    assert_eq!(round(&mut p, 8, t, &[10, 12, 13, 14, 15]), all(8, &without));
    p.handle(msg(11, status(true)), t + 50.0);
    t += 100.0;
    let mut back = changes.clone();
    back[1] = (11, int8);
    assert_eq!(round(&mut p, 9, t, &six), all(9, &back));
    // Where fewer than half lack it, they get it whole: two of six paused, both back.
    for n in [12, 13] {
        p.handle(msg(n, status(false)), t + 50.0);
    }
    t += 100.0;
    assert_eq!(round(&mut p, 10, t, &[10, 11, 14, 15]).len(), 4);
    for n in [12, 13] {
        p.handle(msg(n, status(true)), t + 50.0);
    }
    t += 100.0;
    let mut two = changes.clone();
    two[2] = (12, int8);
    two[3] = (13, int8);
    assert_eq!(round(&mut p, 11, t, &six), all(11, &two));
    // Where half or more lack it, a keyframe to all (at most twice their whole copies)
    // leaves every neighbour the copy exactly: three of six paused, and all come back.
    for n in [12, 13, 14] {
        p.handle(msg(n, status(false)), t + 50.0);
    }
    t += 100.0;
    assert_eq!(round(&mut p, 12, t, &[10, 11, 15]).len(), 3);
    for n in [12, 13, 14] {
        p.handle(msg(n, status(true)), t + 50.0);
    }
    t += 100.0;
    let keyframes: Vec<(u64, u8)> = (10..16).map(|n| (n, int8)).collect();
    assert_eq!(round(&mut p, 13, t, &six), all(13, &keyframes));
}

#[test]
fn with_weights_changes_neighbours_that_use_none_of_our_updates_get_our_copy_again() {
    // Receipts name the updates a neighbour used. When most of the neighbours sent none
    // for two of ours, the copy they hold may be off (each change then lands there as an
    // outlier): our next update is a keyframe. While they stay silent, twice as many
    // updates each time; a receipt resets that. One silent neighbour of three (stale
    // updates, or a liar) is no reason.
    let mut p = changes_peer_at_5(&[10, 11, 12]);
    let (int8, change) = (1u8, crate::learn::CHANGE_TAG);
    let three = [10u8, 11, 12];
    let mut t = GREET_AFTER_MS;
    let mut round = |p: &mut Peer, r: u64, silent: &[u64]| {
        t += 100.0;
        let sent = changes_round(p, r, t, &three, silent);
        let kinds: Vec<u8> = sent.iter().map(|s| s.2).collect();
        assert_eq!(sent.len(), 3, "round {r}: {sent:?}");
        assert!(kinds.iter().all(|k| *k == kinds[0]), "round {r}: {sent:?}");
        kinds[0]
    };
    assert_eq!(round(&mut p, 5, &[]), int8);
    for r in 6..=9 {
        assert_eq!(
            round(&mut p, r, &[10]),
            change,
            "a minority silent, round {r}"
        );
    }
    // 11 and 12 silent too: keyframes at rounds 13 (2 unheard updates for rounds they
    // closed: 10 and 11) and 18 (after 4 more; the next would come after 8).
    let mut keyframes = Vec::new();
    for r in 10..=20 {
        if round(&mut p, r, &[10, 11, 12]) == int8 {
            keyframes.push(r);
        }
    }
    assert_eq!(keyframes, vec![13, 18]);
    // They receipt again: two unheard updates make a keyframe again.
    assert_eq!(round(&mut p, 21, &[]), change);
    // Receipts on their connections signed by another key say nothing of them.
    for r in 22..=24 {
        assert_eq!(round(&mut p, r, &[11, 12]), change);
        for n in [11, 12] {
            p.handle(msg(n, receipt_from(30, r)), 0.0);
        }
    }
    assert_eq!(round(&mut p, 25, &[]), int8);
}

#[test]
fn with_weights_changes_an_update_screened_out_for_our_copys_lag_is_followed_by_a_keyframe() {
    // The learner's screen found our copy's lag made our update an outlier
    // (`Learner::copy_screened_out`): the next update is a keyframe, once; then changes.
    let mut p = changes_peer_at_5(&[10, 11, 12]);
    let (int8, change) = (1u8, crate::learn::CHANGE_TAG);
    let three = [10u8, 11, 12];
    let mut t = GREET_AFTER_MS;
    let mut round = |p: &mut Peer, r: u64| {
        t += 100.0;
        let sent = changes_round(p, r, t, &three, &[]);
        assert_eq!(sent.len(), 3, "round {r}: {sent:?}");
        sent[0].2
    };
    assert_eq!(round(&mut p, 5), int8);
    assert_eq!(round(&mut p, 6), change);
    p.learner.copy_screened = true;
    assert_eq!(round(&mut p, 7), int8);
    assert_eq!(round(&mut p, 8), change);
}

/// Weights changes under an upload budget (1 MB an hour) that updates cost more than a
/// round pays: a peer at round 5 with neighbours 10, 11 and 12, greeted, at 500 ms.
fn budget_changes_peer() -> Peer {
    let c = LearnConfig {
        round_ms: 1_000,
        upload_mb_per_hour: 1,
        compression: Compression::TopK2Bit { fraction: 0.125 },
        ..cfg()
    };
    let mut p = Peer::new(c, "t", id(1), vec![0.5; N], PeerRole::Trainer, 0.0).expect("valid");
    assert!(p.resume(snapshot(5, 0.5)));
    for n in [10, 11, 12] {
        p.handle(Event::Up(PeerId(n)), 0.0);
    }
    p.tick(500.0);
    drain(&mut p);
    p
}

/// A chunk of training that ends at `t`, for the run in progress (the open round's next
/// when a round is open): the run's round, and the updates sent.
fn budget_chunk(p: &mut Peer, t: f64) -> (u64, Vec<(u64, u64, u8)>) {
    let round = p.learner().round();
    let run = if p.open_since.is_some() {
        round + 1
    } else {
        round
    };
    p.trained(run, &[0.5 - 0.001 * run as f32; N], 0.3, 8, t)
        .expect("finite");
    (run, update_payloads(&drain(p)))
}

#[test]
fn under_an_upload_budget_an_update_screened_out_for_our_copys_lag_waits_for_its_keyframe() {
    // Updates run at the edge of the budget's allowance, where a keyframe to all does
    // not fit: once our copy's lag screened us out, the next update waits until the
    // keyframe fits instead of going out as a change every neighbour would drop.
    let mut p = budget_changes_peer();
    let mut t = 500.0;
    // Our updates: (time, round, payload kind to neighbour 10).
    let mut sent_at: Vec<(f64, u64, u8)> = Vec::new();
    let mut flagged_at = None;
    while t < 240_000.0 {
        t += 250.0;
        if t == 60_000.0 {
            p.learner.copy_screened = true;
            flagged_at = Some(sent_at.len());
        }
        let (run, mut sent) = budget_chunk(&mut p, t);
        if let Some(u) = sent.iter().find(|u| u.0 == 10) {
            sent_at.push((t, u.1, u.2));
            for n in [10u8, 11, 12] {
                p.handle(msg(u64::from(n), update_w(n + 10, run, 0.46)), t);
                p.handle(msg(u64::from(n), receipt_from(n + 10, run)), t);
            }
        }
        p.tick(t);
        sent.extend(update_payloads(&drain(&mut p)));
        if flagged_at.is_some_and(|f| sent_at.len() > f + 1) {
            break;
        }
    }
    let f = flagged_at.expect("ran to the flag");
    assert!(f > 10, "{f} updates before");
    let change = crate::learn::CHANGE_TAG;
    assert!(
        sent_at[1..f]
            .iter()
            .all(|u| (u.2 == change) != u.1.is_multiple_of(crate::learn::KEYFRAME_EVERY)),
        "changes at the budget's edge, but scheduled keyframes: {sent_at:?}"
    );
    let (before, (at, _, kind), (_, _, then)) = (sent_at[f - 1].0, sent_at[f], sent_at[f + 1]);
    assert_eq!(kind, 1, "the next update is a keyframe (int8): {sent_at:?}");
    assert!(
        at - before > 2_000.0,
        "it waited for the keyframe to fit: {before} -> {at} ms"
    );
    assert_eq!(then, change, "then changes again");
}

#[test]
fn under_an_upload_budget_a_neighbour_that_lacks_our_copy_gets_it_with_our_next_update() {
    // Weights changes with updates that cost more than the budget pays in a round: the
    // budget sets the pace, updates running at the edge of the allowance. A neighbour
    // that connects after a minute of that gets our copy (whole, or a keyframe to all)
    // with our next update: that update waits until the copy fits with it — not changes
    // it cannot use until our keyframe 30 rounds on, as when updates went out whenever
    // their changes fitted and left the copy no room.
    let mut p = budget_changes_peer();
    let mut t = 500.0;
    // Updates to the new neighbour: (time, round, payload kind); and our updates to all
    // before and after it connected.
    let mut to_13: Vec<(f64, u64, u8)> = Vec::new();
    let (mut before, mut after) = (0, 0);
    while t < 240_000.0 && to_13.last().is_none_or(|u| u.2 == crate::learn::CHANGE_TAG) {
        t += 250.0;
        if t == 60_000.0 {
            p.handle(Event::Up(PeerId(13)), t);
        }
        let (run, mut sent) = budget_chunk(&mut p, t);
        if sent.iter().any(|u| u.0 == 10) {
            if t < 60_000.0 {
                before += 1;
            } else {
                after += 1;
            }
            for n in [10u8, 11, 12] {
                p.handle(msg(u64::from(n), update_w(n + 10, run, 0.46)), t);
                p.handle(msg(u64::from(n), receipt_from(n + 10, run)), t);
            }
        }
        p.tick(t);
        // The open round's update goes to a neighbour once it has greeted it.
        sent.extend(update_payloads(&drain(&mut p)));
        to_13.extend(sent.iter().filter(|u| u.0 == 13).map(|u| (t, u.1, u.2)));
    }
    assert!(before > 10, "{before} updates before the new neighbour");
    assert!(
        to_13[0].0 <= 60_000.0 + GREET_AFTER_MS + 2_000.0,
        "once greeted it gets the open round's update or our next one, at {} ms",
        to_13[0].0
    );
    let (_, round, kind) = *to_13.last().expect("updates to the new neighbour");
    assert_ne!(
        kind,
        crate::learn::CHANGE_TAG,
        "it gets our copy, not only changes from a copy it lacks: {to_13:?}"
    );
    assert!(
        !round.is_multiple_of(crate::learn::KEYFRAME_EVERY),
        "round {round} is no scheduled keyframe"
    );
    assert!(
        after <= 1 && to_13.len() <= 2,
        "with our first update after it connected: {after} updates, to it {to_13:?}"
    );
}

/// One round of a peer whose neighbour 11 flips its status: our update (11 paused first
/// if `paused`), then `flips` off-and-on status pairs from 11 while the round is open,
/// then the `others`' updates (and 11's, unless paused) close it, and every neighbour it
/// went to sends its receipt. Returns the codec tag of what went to `to`.
fn flipping_round(
    p: &mut Peer,
    clock: &std::cell::Cell<f64>,
    (r, flips, paused): (u64, usize, bool),
    others: &[u8],
    to: u64,
) -> Vec<u8> {
    let status = |on: bool| PeerMessage::Status { contributing: on }.encode();
    let t = clock.get();
    p.tick(t);
    drain(p);
    if paused {
        p.handle(msg(11, status(false)), t);
    }
    p.trained(r, &[0.5 - 0.01 * r as f32; N], 0.3, 8, t + 1.0)
        .expect("finite");
    let mut outs = drain(p);
    for _ in 0..flips {
        p.handle(msg(11, status(false)), t + 2.0);
        p.handle(msg(11, status(true)), t + 2.0);
        outs.extend(drain(p));
    }
    for &n in others {
        p.handle(msg(u64::from(n), update_w(n + 10, r, 0.46)), t + 3.0);
    }
    if !paused {
        p.handle(msg(11, update_w(21, r, 0.46)), t + 3.0);
    }
    p.tick(t + 4.0);
    assert_eq!(p.learner().round(), r + 1);
    // Those it went to used it.
    for (to, r, _) in update_payloads(&outs) {
        p.handle(msg(to, receipt_from(to as u8 + 10, r)), t + 5.0);
    }
    clock.set(t + 100.0);
    update_payloads(&outs)
        .into_iter()
        .filter(|u| u.0 == to)
        .map(|u| u.2)
        .collect()
}

#[test]
fn status_flips_get_no_second_copy_of_an_update_and_whole_copies_are_rationed() {
    let mut p = changes_peer_at_5(&[10, 11, 12, 13, 14]);
    let status = |on: bool| PeerMessage::Status { contributing: on }.encode();
    let clock = std::cell::Cell::new(GREET_AFTER_MS);
    let round = |p: &mut Peer, r: u64, flips: usize, paused: bool| {
        flipping_round(p, &clock, (r, flips, paused), &[10, 12, 13, 14], 11)
    };
    let (int8, change) = (crate::learn::KEYFRAME_CODEC.tag(), crate::learn::CHANGE_TAG);
    assert_eq!(round(&mut p, 5, 0, false), vec![int8]);
    // Ten flips while round 6 is open: it still has round 6's update once.
    assert_eq!(round(&mut p, 6, 10, false), vec![change]);
    // It pauses through round 7: back in round 8 it gets the copy whole.
    assert!(round(&mut p, 7, 0, true).is_empty());
    p.handle(msg(11, status(true)), clock.get());
    assert_eq!(round(&mut p, 8, 0, false), vec![int8]);
    // Again through round 9: in round 10 no second whole copy so soon, only the change
    // (it waits for our next keyframe).
    assert!(round(&mut p, 9, 0, true).is_empty());
    p.handle(msg(11, status(true)), clock.get());
    assert_eq!(round(&mut p, 10, 0, false), vec![change]);
}

/// Rounds 5 to 19 of a peer whose neighbours are 10 and 11, where 11 is away through
/// every other update of ours (paused, or its connection down if `reconnect`). Returns
/// the indices of the rounds whose update went to 10 as a keyframe (every other one a
/// change).
fn keyframes_to_10_with_11_away_every_other_round(reconnect: bool) -> Vec<usize> {
    let mut p = changes_peer_at_5(&[10, 11]);
    let status = |on: bool| PeerMessage::Status { contributing: on }.encode();
    let clock = std::cell::Cell::new(GREET_AFTER_MS);
    let (int8, change) = (crate::learn::KEYFRAME_CODEC.tag(), crate::learn::CHANGE_TAG);
    let mut to_10 = Vec::new();
    for r in 5..20u64 {
        let away = r % 2 == 1;
        if away && reconnect {
            p.handle(Event::Down(PeerId(11)), clock.get());
        }
        to_10.push(flipping_round(&mut p, &clock, (r, 0, away), &[10], 10));
        if away && reconnect {
            // Back, and settled, before our next update.
            let t = clock.get();
            p.handle(Event::Up(PeerId(11)), t);
            p.tick(t + GREET_AFTER_MS);
            drain(&mut p);
            clock.set(t + GREET_AFTER_MS + 100.0);
        } else if away {
            p.handle(msg(11, status(true)), clock.get());
        }
    }
    assert!(
        to_10.iter().all(|t| t == &vec![int8] || t == &vec![change]),
        "{to_10:?}"
    );
    (0..to_10.len())
        .filter(|&i| to_10[i] == vec![int8])
        .collect()
}

/// A neighbour that pauses through every other update of ours, where it is half of
/// those our updates go to, does not make every other one a keyframe to all: it lacks
/// our copy, but may have no whole copy so soon, so it waits for our next keyframe as it
/// would alone. (A keyframe is about eight changes: under the upload budget the updates
/// went out about four times less often.)
#[test]
fn a_neighbour_pausing_through_every_other_update_forces_one_keyframe_in_30_rounds() {
    // Round 5 (11 paused) sets the copy, round 6 gives it to 11 as it first comes, and
    // the first time 11 comes back lacking it (round 8), a keyframe to both; from then
    // on only changes to 10 (11 has a whole copy once, then waits for our next
    // keyframe). Before, every round 11 came back was a keyframe to both.
    assert_eq!(
        keyframes_to_10_with_11_away_every_other_round(false),
        [0, 1, 3]
    );
}

/// The same through reconnects: a neighbour that drops its connection through every
/// other update of ours comes back lacking our copy each time, and what it held is
/// carried across its reconnects, so it counts toward a keyframe to all once per 30
/// rounds as a pausing one does. Before, each reconnect forgot that it held our copy,
/// and every other update was a keyframe to both.
#[test]
fn a_neighbour_reconnecting_through_every_other_update_forces_one_keyframe_in_30_rounds() {
    let keyframes = keyframes_to_10_with_11_away_every_other_round(true);
    assert!(
        keyframes.len() <= 3 && keyframes.iter().all(|&i| i <= 3),
        "keyframes at {keyframes:?}"
    );
}

/// A message a driver delivers after the connection's end (one queued behind it) brings
/// back no neighbour: before, it made a fresh one, greeted it later (a send to a closed
/// connection) and waited for its update as a contributor's, each round until its
/// silent rounds ran out, and it never ended.
#[test]
fn a_message_after_a_connections_end_brings_back_no_neighbour() {
    let mut p = changes_peer_at_5(&[10, 11]);
    p.tick(GREET_AFTER_MS);
    drain(&mut p);
    p.handle(Event::Down(PeerId(11)), 600.0);
    let status = PeerMessage::Status { contributing: true }.encode();
    p.handle(msg(11, status), 600.0);
    p.trained(5, &[0.49; N], 0.3, 8, 700.0).expect("finite");
    p.handle(msg(10, update_w(20, 5, 0.46)), 710.0);
    p.tick(1_200.0);
    let outs = drain(&mut p);
    assert_eq!(p.learner().round(), 6, "the round closed on 10's update");
    assert!(
        !outs
            .iter()
            .any(|o| matches!(o, Output::Send { to, .. } if to.0 == 11)),
        "nothing goes to the closed connection"
    );
    assert_eq!(rejected(&p, Rejection::Shunned), 1);
}

#[test]
fn a_model_answer_is_int8_at_a_quarter_of_fp32_within_rounding_of_the_model() {
    let mut t =
        Peer::new(cfg(), "t", id(2), vec![0.0; BIG], PeerRole::Trainer, 0.0).expect("valid");
    assert!(t.resume(ramp(5, 0.0)));
    t.handle(Event::Up(PeerId(10)), 0.0);
    drain(&mut t);
    t.handle(msg(10, PeerMessage::ModelRequest.encode()), 10.0);
    let answer = drain(&mut t)
        .into_iter()
        .find_map(|o| match o {
            Output::Send { data, .. } if data.len() > 100 => Some(data),
            _ => None,
        })
        .expect("the request is answered");
    let fp32 = PeerMessage::Model(ramp(5, 0.0)).encode().len();
    assert!(
        (answer.len() as f64) < 0.26 * fp32 as f64 + 100.0,
        "{} bytes against fp32's {fp32}",
        answer.len()
    );
    let Ok(PeerMessage::ModelInt8(got)) = PeerMessage::decode(&answer, BIG) else {
        panic!("a kind 10 model");
    };
    assert_eq!(got.round, 5);
    let sent = ramp(5, 0.0);
    for (a, b) in got.weights.iter().zip(&sent.weights) {
        assert!((a - b).abs() <= 1.0 / 254.0 + 1e-6, "{b} came as {a}");
    }
    assert!(got.momentum.iter().all(|m| (m - 0.1).abs() < 1e-6));
}

#[test]
fn a_neighbour_that_settles_first_is_not_asked_alone() {
    // A neighbour that writes the instant its channel opens is up 500 ms before honest
    // ones (they wait to settle), so it settled first. Asked alone, it was the whole
    // quorum: a joiner (or the dashboard) took its model, round and momentum.
    let liar = PeerMessage::Model(Snapshot {
        round: 1 << 39,
        weights: vec![-3.0; N],
        momentum: vec![1e6; N],
    })
    .encode();
    let mut p = joiner();
    p.handle(Event::Up(PeerId(10)), 0.0);
    for n in 11..15 {
        p.handle(Event::Up(PeerId(n)), 400.0);
    }
    p.tick(GREET_AFTER_MS);
    p.tick(2.0 * GREET_AFTER_MS);
    assert!(
        asked(&drain(&mut p)).is_empty(),
        "the first settled is not asked while the others settle"
    );
    p.tick(400.0 + 2.0 * GREET_AFTER_MS);
    let mut who = asked(&drain(&mut p));
    who.sort_unstable();
    assert_eq!(who, [10, 11, 12, 13, 14], "all five, once settled");
    let t = 400.0 + 2.0 * GREET_AFTER_MS;
    p.handle(msg(10, liar.clone()), t + 10.0);
    for n in 11..15 {
        p.handle(msg(n, model(10, 0.3)), t + 20.0);
    }
    p.tick(t + MODEL_WAIT_MS);
    assert_eq!(p.learner().round(), 10);
    assert!(p.weights().iter().all(|w| (w - 0.3).abs() < 1e-6));

    // Fewer than five neighbours: the first download waits JOIN_GRACE_MS after the
    // first came up, for the others' channels to open.
    let mut q = joiner();
    q.handle(Event::Up(PeerId(10)), 0.0);
    q.handle(Event::Up(PeerId(11)), 1_500.0);
    q.tick(2.0 * GREET_AFTER_MS);
    assert!(asked(&drain(&mut q)).is_empty());
    q.tick(JOIN_GRACE_MS - 1.0);
    assert!(asked(&drain(&mut q)).is_empty());
    q.tick(JOIN_GRACE_MS);
    let mut who = asked(&drain(&mut q));
    who.sort_unstable();
    assert_eq!(who, [10, 11]);

    // Past the grace, the first are not asked alone while others are up: two liars whose
    // channels opened well before the honest ones' (they came up at 2.5 s) wait for them
    // to settle.
    let mut r = joiner();
    for n in [10, 11] {
        r.handle(Event::Up(PeerId(n)), 0.0);
    }
    for n in 12..15 {
        r.handle(Event::Up(PeerId(n)), 2_500.0);
    }
    r.tick(2.0 * GREET_AFTER_MS);
    r.tick(JOIN_GRACE_MS);
    assert!(
        asked(&drain(&mut r)).is_empty(),
        "10 and 11 are not asked alone"
    );
    r.tick(2_500.0 + 2.0 * GREET_AFTER_MS);
    let mut who = asked(&drain(&mut r));
    who.sort_unstable();
    assert_eq!(who, [10, 11, 12, 13, 14]);
    // Neighbours that keep coming up hold it back no longer than the cap.
    let mut c = joiner();
    c.handle(Event::Up(PeerId(10)), 0.0);
    for (i, n) in (11..30).enumerate() {
        c.handle(Event::Up(PeerId(n)), 500.0 * (i + 1) as f64);
    }
    c.tick(JOIN_CAP_MS - 1.0);
    assert!(asked(&drain(&mut c)).is_empty());
    c.tick(JOIN_CAP_MS);
    assert!(!asked(&drain(&mut c)).is_empty(), "asked at the cap");

    // An observer's first download waits the same way.
    let observer = PeerRole::Observer { every_ms: 10_000.0 };
    let mut o = Peer::new(cfg(), "t", id(9), vec![0.5; N], observer, 0.0).expect("valid");
    o.handle(Event::Up(PeerId(10)), 0.0);
    o.handle(Event::Up(PeerId(11)), 400.0);
    o.tick(GREET_AFTER_MS);
    o.tick(2.0 * GREET_AFTER_MS);
    assert!(asked(&drain(&mut o)).is_empty(), "the observer waits too");
    o.tick(JOIN_GRACE_MS);
    let observe = |outs: &[Output]| {
        outs.iter()
            .filter(|o| {
                matches!(o, Output::Send { data, .. }
                    if matches!(PeerMessage::decode(data, N), Ok(PeerMessage::Observe { .. })))
            })
            .count()
    };
    assert_eq!(observe(&drain(&mut o)), 2, "both asked");
}

#[test]
fn a_neighbour_that_reopens_its_channel_is_not_sent_our_update_again() {
    // Each new connection started from nothing: the greeting re-sent the round's update
    // (a whole copy where the budget allowed), and the model answers' first-request
    // allowance came back, so a neighbour that closed its channel and opened another
    // every second spent most of our upload budget. Its first reopening (a network
    // blip) still starts afresh; the next ones do not.
    let mut p = timed_running_with(5, 1);
    p.tick(500.0);
    drain(&mut p);
    p.trained(5, &[0.49; N], 0.3, 8, 1_500.0).expect("finite");
    assert_eq!(updates_sent(&drain(&mut p)), vec![(5, 8); 3]);
    let req = PeerMessage::ModelRequest.encode();
    p.handle(msg(10, req), 1_600.0);
    drain(&mut p);
    assert!(p.nbrs[&PeerId(10)].answered_at.is_some());
    let round_5_to = |p: &mut Peer| -> Vec<u64> {
        drain(p)
            .iter()
            .filter_map(|o| match o {
                Output::Send { to, data } => match PeerMessage::decode(data, N) {
                    Ok(PeerMessage::Update(u)) if u.round == 5 => Some(to.0),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    };
    // It closes its channel and opens another while round 5 is open: the first time it
    // is sent the round's update again, as a neighbour new to us would be.
    p.handle(Event::Down(PeerId(10)), 1_610.0);
    p.handle(Event::Up(PeerId(10)), 1_611.0);
    p.tick(1_611.0 + GREET_AFTER_MS);
    assert_eq!(round_5_to(&mut p), [10], "a first reconnect starts afresh");
    // Again: now it takes up where it left off; a new neighbour up at the same time is
    // sent the update.
    p.handle(Event::Down(PeerId(10)), 2_150.0);
    p.handle(Event::Up(PeerId(10)), 2_151.0);
    p.handle(Event::Up(PeerId(13)), 2_151.0);
    p.tick(2_151.0 + GREET_AFTER_MS);
    assert_eq!(
        round_5_to(&mut p),
        [13],
        "round 5's update goes to the new neighbour, not again to 10"
    );
    assert!(
        p.nbrs[&PeerId(10)].answered_at.is_some(),
        "its first model request is behind it"
    );
}

#[test]
fn colluders_that_set_the_median_round_do_not_win_the_third_try() {
    // Five asked; two colluders answer with one model at round 1, two honest neighbours
    // at round 10, one stays silent. The lower median round is the colluders', so the
    // honest answers were dropped as outliers, and on the third try (a quorum of one)
    // the colluders were all that was kept: their model was adopted.
    let mut p = joiner_asking_five();
    let answer = |p: &mut Peer, at: f64| {
        for (n, round, w) in [(10, 1, -3.0), (11, 1, -3.0), (12, 10, 0.3), (13, 10, 0.3)] {
            p.handle(msg(n, model(round, w)), at);
        }
    };
    let mut now = 2.0 * GREET_AFTER_MS;
    answer(&mut p, now + 10.0);
    let mut tries = 1;
    while now < 8.0 * MODEL_WAIT_MS {
        now += 100.0;
        p.tick(now);
        if !asked(&drain(&mut p)).is_empty() {
            tries += 1;
            answer(&mut p, now + 10.0);
        }
    }
    assert!(tries >= JOIN_ATTEMPTS, "{tries} tries");
    assert!(
        p.weights().iter().all(|w| *w >= 0.0),
        "the colluders' model was not adopted: {:?}",
        &p.weights()[..2]
    );
    assert!(rejected(&p, Rejection::RoundOutlier) >= 2 * u64::from(JOIN_ATTEMPTS));
}

/// A validly signed update by `signer` for `round` carrying `payload` as it is.
fn signed_payload(signer: u8, round: u64, payload: Vec<u8>) -> Vec<u8> {
    PeerMessage::Update(Update::signed(&id(signer), "t", round, 8, 0.1, payload)).encode()
}

#[test]
fn a_connection_that_delivers_a_signed_update_whose_payload_does_not_decode_is_shunned() {
    // No honest peer signs a payload of another size or with a NaN in it. Left open, the
    // connection could resend it and have its signature verified (a hash of the whole
    // update and an ed25519 check) each time.
    let mut p = running(5);
    let short = Compressor::new(Compression::None, N - 1)
        .encode(&[0.5; N - 1])
        .0;
    let mut nan = Compressor::new(Compression::None, N).encode(&[0.5; N]).0;
    let at = nan.len() - 4;
    nan[at..].copy_from_slice(&f32::NAN.to_le_bytes());
    p.handle(msg(12, signed_payload(22, 5, short.clone())), 5.0);
    assert_eq!(rejected(&p, Rejection::Shape), 1);
    assert_eq!(drain(&mut p), [Output::Drop(PeerId(12))]);
    p.handle(msg(11, signed_payload(21, 5, nan)), 6.0);
    assert_eq!(rejected(&p, Rejection::NonFinite), 1);
    assert_eq!(drain(&mut p), [Output::Drop(PeerId(11))]);
    // What they send then is dropped unread, their next honest-looking update too.
    p.handle(msg(12, signed_payload(22, 5, short)), 7.0);
    p.handle(msg(11, update(21, 5)), 8.0);
    assert_eq!(rejected(&p, Rejection::Shunned), 2);
    assert_eq!(rejected(&p, Rejection::Shape), 1);
    // A message that does not decode, before any signature is checked, shuns nobody.
    let mut cut = update(20, 5);
    cut.truncate(cut.len() - 10);
    p.handle(msg(10, cut), 9.0);
    assert_eq!(rejected(&p, Rejection::Malformed), 1);
    assert_eq!(drain(&mut p), []);
    // 10 is still heard: its round's update closes the round with ours.
    p.trained(5, &[0.49; N], 0.3, 8, 10.0).expect("finite");
    drain(&mut p);
    p.handle(msg(10, update(20, 5)), 11.0);
    p.tick(20.0);
    assert_eq!(p.learner().round(), 6);
}
