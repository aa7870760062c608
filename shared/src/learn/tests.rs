//! The learner's protocol rules, one peer talking to another.

use super::*;

fn cfg() -> LearnConfig {
    LearnConfig {
        aggregation: Aggregation::Mean,
        compression: Compression::None,
        outer_lr: 1.0,
        outer_momentum: 0.0,
        exchange: Exchange::Delta,
        ..LearnConfig::default()
    }
}

fn peer(seed: u8, weights: Vec<f32>) -> Learner {
    Learner::new(cfg(), "digits", Identity::from_seed([seed; 32]), weights).expect("valid")
}

#[test]
fn two_peers_average_their_pseudo_gradients() {
    let mut a = peer(1, vec![1.0, 1.0]);
    let mut b = peer(2, vec![1.0, 1.0]);
    let ua = a.local_update(&[0.0, 1.0], 64, 0.5).expect("finite");
    let ub = b.local_update(&[1.0, 0.0], 64, 0.5).expect("finite");
    assert_eq!(
        a.receive(&ub),
        Ok(Received::Update {
            key: b.public_key(),
            round: 0,
            lagging: false
        })
    );
    assert!(a.has_fresh_from(&b.public_key()));
    b.receive(&ua).expect("valid update");
    let sa = a.finish_round();
    b.finish_round();
    // Mean of (1, 0) and (0, 1), outer lr 1, no momentum: plain model averaging.
    assert_eq!(a.weights(), &[0.5, 0.5]);
    assert_eq!(a.weights(), b.weights());
    assert_eq!((a.round(), sa.used), (1, 1));
}

#[test]
fn each_connection_counts_for_one_update_a_round() {
    // Connection 11 delivers signer 2's update and signer 3's; 2's own connection (10)
    // then sends its copy, byte for byte: each connection stands for one, both count.
    let round = |copy: bool| {
        let mut a = peer(1, vec![0.0; 4]);
        let ub = peer(2, vec![0.0; 4])
            .local_update(&[0.1; 4], 1, 0.0)
            .expect("finite");
        let uc = peer(3, vec![0.0; 4])
            .local_update(&[0.2; 4], 1, 0.0)
            .expect("finite");
        a.receive_from(11, &ub).expect("valid");
        a.receive_from(11, &uc).expect("valid");
        let key = Identity::from_seed([2; 32]).public();
        if copy {
            assert_eq!(a.held_copy(10, &key, 0, &ub), Some(true));
        }
        let s = a.finish_round();
        (s.used, a.stats.rejected.get(&Rejection::ExtraVote).copied())
    };
    assert_eq!(round(true), (2, None));
    // Without the copy, connection 11 delivered both: one counts.
    assert_eq!(round(false), (1, Some(1)));
}

#[test]
fn nesterov_momentum_accumulates_across_rounds() {
    let mut c = cfg();
    c.outer_lr = 0.5;
    c.outer_momentum = 0.9;
    let mut a = Learner::new(c, "t", Identity::from_seed([1; 32]), vec![0.0]).expect("valid");
    a.local_update(&[-1.0], 1, 0.0).expect("finite"); // g = 1
    a.finish_round(); // m = 1; w -= 0.5 (1 + 0.9)
    assert!((a.weights()[0] + 0.95).abs() < 1e-6);
    let w = a.weights()[0];
    a.local_update(&[w - 1.0], 1, 0.0).expect("finite"); // g = 1
    a.finish_round(); // m = 1.9; w -= 0.5 (1 + 1.71)
    assert!(
        (a.weights()[0] - (w - 1.355)).abs() < 1e-5,
        "{}",
        a.weights()[0]
    );
}

#[test]
fn forged_replayed_stale_and_poisoned_updates_are_rejected_and_counted() {
    let mut a = peer(1, vec![0.0; 4]);
    let mut b = peer(2, vec![0.0; 4]);
    let good = b.local_update(&[0.1; 4], 1, 0.0).expect("finite");
    a.receive(&good).expect("valid");
    assert_eq!(
        a.receive(&good),
        Err(Rejection::Replay),
        "the same update twice"
    );
    // Also after its signer's connection closed: pseudo-gradients have no copy to set
    // again, and one taken twice would be used twice.
    a.forget_copy(&b.public_key());
    assert_eq!(
        a.receive(&good),
        Err(Rejection::Replay),
        "after a reconnect"
    );

    // A forged copy of a round already taken is a replay (checked before the
    // signature: it costs no verification)...
    let mut forged = good.clone();
    let last = forged.len() - 70;
    forged[last] ^= 0x40; // a payload byte
    assert_eq!(a.receive(&forged), Err(Rejection::Replay));
    // ...and a forged update of a new round fails its signature.
    b.finish_round();
    let mut forged = b.local_update(&[0.1; 4], 1, 0.0).expect("finite");
    forged[last] ^= 0x40;
    assert_eq!(a.receive(&forged), Err(Rejection::BadSignature));

    // Signed for another task.
    let mut other =
        Learner::new(cfg(), "cifar", Identity::from_seed([3; 32]), vec![0.0; 4]).expect("valid");
    let wrong_task = other.local_update(&[0.1; 4], 1, 0.0).expect("finite");
    assert_eq!(a.receive(&wrong_task), Err(Rejection::BadSignature));

    // A NaN in an fp32 payload, validly signed.
    let liar = Identity::from_seed([4; 32]);
    let mut payload = vec![0u8];
    payload.extend_from_slice(&4u32.to_le_bytes());
    for v in [f32::NAN, 0.0, 0.0, 0.0] {
        payload.extend_from_slice(&v.to_le_bytes());
    }
    let nan = PeerMessage::Update(Update::signed(&liar, "digits", 0, 1, 0.0, payload)).encode();
    assert_eq!(a.receive(&nan), Err(Rejection::NonFinite));
    // A model of another size.
    let mut big = peer(5, vec![0.0; 5]);
    let wrong = big.local_update(&[0.0; 5], 1, 0.0).expect("finite");
    assert_eq!(a.receive(&wrong), Err(Rejection::Shape));
    assert_eq!(a.receive(b"junk"), Err(Rejection::Malformed));
    // Our own update echoed back.
    let mine = a.local_update(&[-0.1; 4], 1, 0.0).expect("finite");
    assert_eq!(a.receive(&mine), Err(Rejection::Own));

    // A scaled update far beyond our own norm is refused at aggregation.
    let mut scaler = peer(6, vec![0.0; 4]);
    let scaled = scaler.update_from_delta(&[10.0; 4], 1, 0.0);
    a.receive(&scaled).expect("decodes");
    let s = a.finish_round();
    assert_eq!((s.used, s.rejected), (1, 1));
    // Own delta (0.1) and b's (-0.1) cancel; the scaled one was left out.
    assert!(
        a.weights().iter().all(|w| w.abs() < 1e-6),
        "{:?}",
        a.weights()
    );

    // Three rounds later an update from round 0 is stale.
    for _ in 0..3 {
        a.local_update(a.weights().to_vec().as_slice(), 1, 0.0)
            .expect("finite");
        a.finish_round();
    }
    let mut late = peer(7, vec![0.0; 4]);
    let old = late.local_update(&[0.0; 4], 1, 0.0).expect("finite");
    assert_eq!(a.receive(&old), Err(Rejection::Stale));
    let r = &a.stats.rejected;
    assert_eq!(r.get(&Rejection::Replay), Some(&3));
    for why in [
        Rejection::NonFinite,
        Rejection::Shape,
        Rejection::Malformed,
        Rejection::Own,
        Rejection::Norm,
        Rejection::Stale,
    ] {
        assert_eq!(r.get(&why), Some(&1), "{why:?} in {r:?}");
    }
    assert_eq!(r.get(&Rejection::BadSignature), Some(&2));
}

#[test]
fn late_updates_count_less_and_a_far_ahead_sender_marks_us_lagging() {
    let mut a = peer(1, vec![0.0]);
    let mut b = peer(2, vec![0.0]);
    // b's round-0 update reaches a after a closed round 0 alone.
    let late = b.local_update(&[-3.0], 1, 0.0).expect("finite");
    a.local_update(&[0.0], 1, 0.0).expect("finite");
    a.finish_round();
    a.receive(&late)
        .expect("one round late is within the window");
    a.local_update(&[-1.0], 1, 0.0).expect("finite");
    a.finish_round();
    // Weighted mean of 1 (own, weight 1) and 3 (weight 1/2) = 5/3.
    assert!(
        (a.weights()[0] + 5.0 / 3.0).abs() < 1e-6,
        "{}",
        a.weights()[0]
    );

    // A peer far ahead.
    let mut ahead = peer(3, vec![0.0]);
    for _ in 0..6 {
        ahead.local_update(&[0.0], 1, 0.0).expect("finite");
        ahead.finish_round();
    }
    let msg = ahead.local_update(&[0.0], 1, 0.0).expect("finite");
    assert_eq!(
        a.receive(&msg),
        Ok(Received::Update {
            key: ahead.public_key(),
            round: 6,
            lagging: true
        })
    );
    let Ok(Received::Model(snap)) = a.receive(&ahead.snapshot()) else {
        panic!("a model message decodes");
    };
    assert!(a.adopt(snap));
    assert_eq!(a.round(), 6);
    assert_eq!(a.weights(), ahead.weights());
}

#[test]
fn a_joiner_adopts_the_current_model_and_bad_settings_are_named() {
    let mut a = peer(1, vec![2.0, 3.0]);
    a.local_update(&[1.0, 1.0], 1, 0.0).expect("finite");
    a.finish_round();
    let mut joiner = peer(2, vec![0.0, 0.0]);
    let Ok(Received::Model(s)) = joiner.receive(&a.snapshot()) else {
        panic!("a model message decodes");
    };
    assert!(joiner.adopt(s));
    assert_eq!((joiner.round(), joiner.weights()), (1, a.weights()));

    assert!(
        peer(3, vec![0.0])
            .local_update(&[f32::NAN], 1, 0.0)
            .is_err()
    );
    let mut bad = cfg();
    bad.outer_momentum = 1.0;
    let err = Learner::new(bad, "t", Identity::from_seed([1; 32]), vec![0.0]).err();
    assert!(
        matches!(err, Some(LearnError::Config(ref m)) if m.starts_with("outer_momentum")),
        "{err:?}"
    );
}

#[test]
fn gossip_averaging_pulls_two_models_together_and_refuses_far_or_stale_ones() {
    let mut c = cfg();
    c.sync_every = 1;
    let mut a =
        Learner::new(c.clone(), "t", Identity::from_seed([1; 32]), vec![1.0; 300]).expect("valid");
    let b = Learner::new(c, "t", Identity::from_seed([2; 32]), vec![1.2; 300]).expect("valid");
    // Weights for the round `a` starts next (a mix waits for its round).
    let mut msg = b.mix_message();
    msg[5..13].copy_from_slice(&1u64.to_le_bytes());
    assert_eq!(a.receive(&msg), Ok(Received::Mix));
    a.local_update(&vec![1.0; 300], 1, 0.0).expect("finite"); // a zero update
    let s = a.finish_round();
    assert!(s.mixed && s.sync.is_some());
    assert!(
        a.weights().iter().all(|w| (w - 1.1).abs() < 2e-3),
        "{:?}",
        &a.weights()[..3]
    );

    // Weights far from ours are refused (a poisoned model cannot drag us).
    let mut liar =
        Learner::new(cfg(), "t", Identity::from_seed([3; 32]), vec![50.0; 300]).expect("valid");
    liar.local_update(&vec![50.0; 300], 1, 0.0).expect("finite");
    liar.finish_round();
    assert_eq!(a.receive(&liar.mix_message()), Err(Rejection::Norm));
    // And so are weights from rounds outside the staleness window.
    for _ in 0..3 {
        let w = a.weights().to_vec();
        a.local_update(&w, 1, 0.0).expect("finite");
        a.finish_round();
    }
    assert_eq!(a.receive(&b.mix_message()), Err(Rejection::Stale));
}

fn weights_peer(seed: u8, weights: Vec<f32>) -> Learner {
    let c = LearnConfig {
        exchange: Exchange::Weights,
        sync_every: 0,
        ..cfg()
    };
    Learner::new(c, "digits", Identity::from_seed([seed; 32]), weights).expect("valid")
}

/// One round: each trains to `local`, then they swap updates and aggregate.
fn round(a: &mut Learner, b: &mut Learner, la: &[f32], lb: &[f32]) {
    let ua = a.local_update(la, 1, 0.0).expect("finite");
    let ub = b.local_update(lb, 1, 0.0).expect("finite");
    a.receive(&ub).expect("valid update");
    b.receive(&ua).expect("valid update");
    a.finish_round();
    b.finish_round();
}

#[test]
fn exchanging_weights_pulls_two_different_models_together_and_deltas_do_not() {
    // Two models one apart in each coordinate; each trains a step of its own.
    let (la, lb) = ([1.0, 0.0], [1.0, 2.0]);
    // Exchanging pseudo-gradients (outer lr 1, no momentum), both take the mean step
    // (-0.5, -0.5) from where they were: they stay exactly as far apart.
    let (mut a, mut b) = (peer(1, vec![0.0, 0.0]), peer(2, vec![1.0, 1.0]));
    round(&mut a, &mut b, &la, &lb);
    assert_eq!(
        (a.weights(), b.weights()),
        (&[0.5, 0.5][..], &[1.5, 1.5][..])
    );
    // Exchanging weights, both land on the mean of the two local models.
    let (mut a, mut b) = (
        weights_peer(1, vec![0.0, 0.0]),
        weights_peer(2, vec![1.0, 1.0]),
    );
    round(&mut a, &mut b, &la, &lb);
    assert_eq!(a.weights(), &[1.0, 1.0]);
    assert_eq!(a.weights(), b.weights());
}

#[test]
fn a_neighbours_weights_for_a_later_round_wait_for_that_round() {
    let mut a = weights_peer(1, vec![0.0]);
    let mut b = weights_peer(2, vec![0.0]);
    // b runs a round alone and is one ahead; its round-1 weights reach a at round 0.
    b.local_update(&[1.0], 1, 0.0).expect("finite");
    b.finish_round();
    assert_eq!((b.round(), b.weights()), (1, &[1.0][..]));
    let ub = b.local_update(&[1.0], 1, 0.0).expect("finite");
    assert!(a.receive(&ub).is_ok());
    a.local_update(&[0.0], 1, 0.0).expect("finite");
    let s = a.finish_round();
    assert_eq!(
        (s.used, a.weights()),
        (0, &[0.0][..]),
        "not used in round 0"
    );
    // In round 1 it counts: a lands on the mean of its local model (-0.5) and b's (1).
    assert!(a.has_fresh_from(&b.public_key()));
    a.local_update(&[-0.5], 1, 0.0).expect("finite");
    let s = a.finish_round();
    assert_eq!((s.used, a.weights()), (1, &[0.25][..]));
    // Weights from a round behind ours (within the staleness window) are not used.
    let mut c = weights_peer(3, vec![0.0]);
    let late = c.local_update(&[0.5], 1, 0.0).expect("finite");
    assert!(
        a.receive(&late).is_ok(),
        "round 0 is within two rounds of 2"
    );
    a.local_update(&[0.0], 1, 0.0).expect("finite");
    let stale = a
        .stats
        .rejected
        .get(&Rejection::Stale)
        .copied()
        .unwrap_or(0);
    assert_eq!(a.finish_round().used, 0);
    assert_eq!(a.stats.rejected[&Rejection::Stale], stale + 1);
}

#[test]
fn a_neighbour_ahead_holds_at_most_two_updates_in_the_inbox_and_none_far_ahead() {
    let mut a = weights_peer(1, vec![0.0; 64]);
    let mut b = weights_peer(2, vec![0.0; 64]);
    let ub = b.local_update(&[0.0; 64], 1, 0.0).expect("finite");
    a.receive(&ub).expect("this round's");
    let rounds = |a: &Learner| a.inbox.iter().map(|p| p.round).collect::<Vec<u64>>();
    // b races ahead (alone), each round sending a later round's weights to a.
    for _ in 0..2 {
        b.finish_round();
        let later = b.local_update(&[0.0; 64], 1, 0.0).expect("finite");
        a.receive(&later).expect("a later round");
    }
    assert_eq!(rounds(&a), [0, 2], "this round's and the newest");
    // Past the staleness window ahead, a is lagging: it will download a model, and
    // holds none of those weights (a whole model each, one per key).
    for _ in 0..8 {
        b.finish_round();
        let far = b.local_update(&[0.0; 64], 1, 0.0).expect("finite");
        assert!(matches!(
            a.receive(&far),
            Ok(Received::Update { lagging: true, .. })
        ));
    }
    assert_eq!(b.round(), 10);
    assert_eq!(rounds(&a), [0, 2]);
    let mut others: Vec<Learner> = (0..100)
        .map(|i| weights_peer(10 + i, vec![0.0; 64]))
        .collect();
    for o in &mut others {
        for _ in 0..5 {
            o.finish_round();
        }
        a.receive(&o.local_update(&[0.0; 64], 1, 0.0).expect("finite"))
            .expect("a later round");
    }
    assert_eq!(rounds(&a), [0, 2], "a hundred keys far ahead hold nothing");
    // A neighbour that leaves takes its later rounds' updates with it.
    a.forget_copy(&b.public_key());
    assert_eq!(rounds(&a), [0]);
}

/// Peers `a` (seed 1) and `b` (seed `b_seed`) of `n` zero weights, `a` holding `b`'s
/// keyframe of its local weights `value` everywhere.
fn holding_keyframe(n: usize, b_seed: u8, value: f32) -> (Learner, Learner) {
    let mut a = changes_peer(1, vec![0.0; n]);
    let mut b = changes_peer(b_seed, vec![0.0; n]);
    a.receive(&b.local_update(&vec![value; n], 8, 0.0).expect("finite"))
        .expect("b's keyframe");
    (a, b)
}

#[test]
fn stale_keyframes_of_throwaway_keys_do_not_push_out_a_neighbours_copy() {
    let n = 64;
    let (mut a, b) = holding_keyframe(n, 2, 0.1);
    for _ in 0..5 {
        a.local_update(&vec![0.0; n], 8, 0.0).expect("finite");
        a.finish_round();
    }
    // Keyframes of round 0, each from a new key: stale at round 5, refused, no copy.
    for i in 0..MAX_COPIES as u8 {
        let mut x = changes_peer(100 + i, vec![0.0; n]);
        let stale = x.local_update(&vec![0.3; n], 8, 0.0).expect("finite");
        assert_eq!(a.receive(&stale), Err(Rejection::Stale));
    }
    assert!(a.copies.contains_key(&b.public_key()), "b's copy stays");
    assert_eq!(a.copies.len(), 1);
}

fn changes_peer(seed: u8, weights: Vec<f32>) -> Learner {
    let c = LearnConfig {
        exchange: Exchange::Weights,
        compression: Compression::TopK2Bit { fraction: 0.125 },
        sync_every: 0,
        ..cfg()
    };
    Learner::new(c, "digits", Identity::from_seed([seed; 32]), weights).expect("valid")
}

/// The payload of an update message.
fn payload_of(msg: &[u8], n: usize) -> Vec<u8> {
    match PeerMessage::decode(msg, n) {
        Ok(PeerMessage::Update(u)) => u.payload,
        other => panic!("not an update: {other:?}"),
    }
}

#[test]
fn weights_changes_keep_every_neighbours_copy_equal_to_the_senders_public_copy() {
    let n = 512;
    let start: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut a = changes_peer(1, start.clone());
    let mut b = changes_peer(2, start.clone());
    // a's local weights: far from the start in every coordinate, fixed from here on.
    let local: Vec<f32> = start.iter().map(|w| w + 0.5).collect();
    let mut sizes = Vec::new();
    let mut errors = Vec::new();
    for r in 0..=KEYFRAME_EVERY {
        assert_eq!(a.round(), r);
        let u = a.local_update(&local, 8, 0.0).expect("finite");
        let payload = payload_of(&u, n);
        sizes.push((payload[0], payload.len()));
        b.receive(&u).expect("applies");
        let copy = &b.copies[&a.public_key()].weights;
        assert_eq!(copy, &a.public.as_ref().expect("sent").weights, "round {r}");
        errors.push(aggregate::distance(copy, &local));
        // Both close the round without using it: only the copies are under test.
        a.own = None;
        a.finish_round();
        b.inbox.clear();
        b.finish_round();
        a.weights = start.clone();
    }
    // Round 0 is a keyframe (int8 whole weights), the rounds up to the next multiple of
    // KEYFRAME_EVERY changes, and that one a keyframe again.
    let int8 = Compression::Int8 { block: 256 }.tag();
    assert_eq!(sizes[0].0, int8);
    assert_eq!(sizes[KEYFRAME_EVERY as usize].0, int8);
    for &(tag, len) in &sizes[1..KEYFRAME_EVERY as usize] {
        assert_eq!(tag, CHANGE_TAG);
        assert!(
            4 * len < sizes[0].1,
            "a change {len} vs a keyframe {}",
            sizes[0].1
        );
    }
    // The copy closes in on the weights: whatever a change leaves out goes out later.
    assert!(errors[9] < 0.2 * errors[0], "{errors:?}");
}

/// Peers `a` and `b` exchanging weights changes of `n` parameters, where b's keyframe
/// (round 0) never reached a and its change for round 1, which a refused as `base`:
/// `(a, b, the local weights both trained to, that change)`.
fn base_refused(n: usize) -> (Learner, Learner, Vec<f32>, Vec<u8>) {
    let mut a = changes_peer(1, vec![0.0; n]);
    let mut b = changes_peer(2, vec![0.0; n]);
    let local = vec![0.25; n];
    b.local_update(&local, 8, 0.0).expect("finite");
    b.finish_round();
    a.local_update(&local, 8, 0.0).expect("finite");
    a.finish_round();
    let change = b.local_update(&local, 8, 0.0).expect("finite");
    assert_eq!(payload_of(&change, n)[0], CHANGE_TAG);
    assert_eq!(a.receive(&change), Err(Rejection::Base));
    (a, b, local, change)
}

#[test]
fn a_change_from_a_copy_not_held_is_heard_but_waits_for_the_next_keyframe() {
    let n = 256;
    let (mut a, mut b, local, _) = base_refused(n);
    assert_eq!(a.stats.rejected[&Rejection::Base], 1);
    assert!(
        a.has_fresh_from(&b.public_key()),
        "heard: the round does not wait for it"
    );
    assert_eq!(a.heard_round(&b.public_key()), Some(1));
    assert!(!a.copies.contains_key(&b.public_key()));
    assert_eq!(a.finish_round().used, 0);
    // At b's next keyframe a holds its copy again, and its changes apply.
    while !b.round().is_multiple_of(KEYFRAME_EVERY) {
        b.finish_round();
    }
    while a.round() < b.round() {
        a.finish_round();
    }
    let key = b.local_update(&local, 8, 0.0).expect("finite");
    assert!(a.receive(&key).is_ok());
    b.finish_round();
    a.finish_round();
    let next = b.local_update(&local, 8, 0.0).expect("finite");
    assert_eq!(payload_of(&next, n)[0], CHANGE_TAG);
    assert!(a.receive(&next).is_ok());
    assert_eq!(
        a.copies[&b.public_key()].weights,
        b.public.as_ref().expect("sent").weights
    );
}

#[test]
fn a_stale_change_still_moves_the_copy_and_a_replayed_one_moves_nothing() {
    let n = 256;
    let mut a = changes_peer(1, vec![0.0; n]);
    let mut b = changes_peer(2, vec![0.0; n]);
    let key = b.local_update(&vec![0.25; n], 8, 0.0).expect("finite");
    a.receive(&key).expect("keyframe");
    b.finish_round();
    // a runs ahead alone, beyond the staleness window.
    for _ in 0..5 {
        a.finish_round();
    }
    let c1 = b.local_update(&vec![0.5; n], 8, 0.0).expect("finite");
    assert_eq!(a.receive(&c1), Err(Rejection::Stale));
    assert_eq!(a.copies[&b.public_key()].round, 1, "the chain goes on");
    let held = a.copies[&b.public_key()].weights.clone();
    assert_eq!(held, b.public.as_ref().expect("sent").weights);
    assert_eq!(a.receive(&c1), Err(Rejection::Replay));
    assert_eq!(a.copies[&b.public_key()].weights, held, "applied once");
    b.finish_round();
    let c2 = b.local_update(&vec![0.75; n], 8, 0.0).expect("finite");
    assert_eq!(a.receive(&c2), Err(Rejection::Stale));
    assert_eq!(
        a.copies[&b.public_key()].weights,
        b.public.as_ref().expect("sent").weights
    );
}

#[test]
fn a_malformed_or_non_finite_change_is_refused_and_leaves_the_copy() {
    let n = 256;
    let id = Identity::from_seed([2; 32]);
    let mut a = changes_peer(1, vec![0.0; n]);
    let mut b = changes_peer(2, vec![0.0; n]);
    a.receive(&b.local_update(&vec![0.25; n], 8, 0.0).expect("finite"))
        .expect("keyframe");
    let held = a.copies[&b.public_key()].clone();
    let signed = |round: u64, payload: Vec<u8>| {
        PeerMessage::Update(Update::signed(&id, "digits", round, 8, 0.0, payload)).encode()
    };
    // The base round cut short.
    assert_eq!(
        a.receive(&signed(1, vec![CHANGE_TAG, 0, 0])),
        Err(Rejection::Malformed)
    );
    // A change in another codec than the task's.
    let (int8, _) = Compressor::new(Compression::Int8 { block: 256 }, 0).encode(&[0.1; 256]);
    let mut other = vec![CHANGE_TAG];
    other.extend_from_slice(&0u64.to_le_bytes());
    other.extend_from_slice(&int8);
    assert_eq!(a.receive(&signed(2, other)), Err(Rejection::Shape));
    // A change that makes a value infinite.
    let mut big = vec![0.0; n];
    big[3] = f32::MAX / 2.0;
    let (topk, _) = Compressor::new(Compression::TopK2Bit { fraction: 0.125 }, 0).encode(&big);
    let mut change = vec![CHANGE_TAG];
    change.extend_from_slice(&0u64.to_le_bytes());
    change.extend_from_slice(&topk);
    a.copies.get_mut(&b.public_key()).expect("held").weights[3] = f32::MAX;
    assert_eq!(a.receive(&signed(3, change)), Err(Rejection::NonFinite));
    a.copies.get_mut(&b.public_key()).expect("held").weights[3] = held.weights[3];
    assert_eq!(a.copies[&b.public_key()].weights, held.weights);
    assert_eq!(a.copies[&b.public_key()].round, held.round);
    b.finish_round();
}

#[test]
fn at_most_max_copies_are_kept_and_the_one_taken_longest_ago_goes() {
    let n = 64;
    let mut a = changes_peer(1, vec![0.0; n]);
    let mut senders: Vec<Learner> = (0..MAX_COPIES as u8)
        .map(|i| changes_peer(100 + i, vec![0.0; n]))
        .collect();
    for b in &mut senders {
        a.receive(&b.local_update(&vec![0.1; n], 8, 0.0).expect("finite"))
            .expect("keyframe");
    }
    // The first sender's copy is taken again (its next update); then a new sender comes.
    let first = &mut senders[0];
    first.finish_round();
    a.receive(&first.local_update(&vec![0.2; n], 8, 0.0).expect("finite"))
        .expect("a change");
    let mut late = changes_peer(200, vec![0.0; n]);
    a.receive(&late.local_update(&vec![0.1; n], 8, 0.0).expect("finite"))
        .expect("keyframe");
    assert_eq!(a.copies.len(), MAX_COPIES);
    assert!(
        a.copies.contains_key(&senders[0].public_key()),
        "taken last"
    );
    assert!(
        !a.copies.contains_key(&senders[1].public_key()),
        "taken longest ago"
    );
    assert!(a.copies.contains_key(&late.public_key()));
}

#[test]
fn a_change_refused_for_its_base_does_not_use_up_its_round_for_the_whole_copy() {
    // b's change for round 1 reaches a (relayed by a third peer, say) while a holds no
    // copy of b: refused as `base`. b's own whole copy of round 1 then comes: before, it
    // was refused as a replay of round 1, and a ignored b until its next keyframe.
    let n = 256;
    let (mut a, mut b, local, change) = base_refused(n);
    assert_eq!(
        a.receive(&change),
        Err(Rejection::Replay),
        "the same change again is a replay"
    );
    let whole = b.whole_public().expect("b's copy of round 1");
    assert!(
        a.receive(&whole).is_ok(),
        "the whole copy of the same round counts"
    );
    assert!(a.copies.contains_key(&b.public_key()));
    assert_eq!(a.finish_round().used, 1);
    // Applied once: the same round again is a replay, the change and the copy alike.
    assert_eq!(a.receive(&whole), Err(Rejection::Replay));
    assert_eq!(a.receive(&change), Err(Rejection::Replay));
    // And b's next change applies to the copy.
    b.finish_round();
    let next = b.local_update(&local, 8, 0.0).expect("finite");
    assert!(a.receive(&next).is_ok());
}

#[test]
fn after_a_signers_connection_closes_its_whole_copy_of_the_same_round_is_taken_once() {
    // a took b's change for round 1; b's connection closes (a drops b's copy), and b's
    // next connection starts with its whole copy of round 1: before, a refused it as a
    // replay of round 1, and every later change of b's as `base`, until b's keyframe.
    let n = 256;
    let mut a = changes_peer(1, vec![0.0; n]);
    let mut b = changes_peer(2, vec![0.0; n]);
    let local = vec![0.25; n];
    let key = b.local_update(&local, 8, 0.0).expect("finite");
    assert!(a.receive(&key).is_ok());
    b.finish_round();
    a.local_update(&local, 8, 0.0).expect("finite");
    a.finish_round();
    let change = b.local_update(&local, 8, 0.0).expect("finite");
    assert_eq!(payload_of(&change, n)[0], CHANGE_TAG);
    assert!(a.receive(&change).is_ok(), "a holds b's copy");
    a.forget_copy(&b.public_key());
    let whole = b.whole_public().expect("b's copy of round 1");
    assert!(
        a.receive(&whole).is_ok(),
        "the whole copy sets the copy again"
    );
    assert!(a.copies.contains_key(&b.public_key()));
    assert_eq!(a.finish_round().used, 1, "round 1 of b's counted once");
    b.finish_round();
    let next = b.local_update(&local, 8, 0.0).expect("finite");
    assert!(a.receive(&next).is_ok(), "b's next change applies");
}

#[test]
fn a_public_copy_left_far_behind_by_a_move_of_the_model_is_caught_up_by_a_keyframe() {
    let n = 512;
    let start: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut a = changes_peer(1, start.clone());
    let mut b = changes_peer(2, start);
    // A run: a small step from the round-start weights (norm 0.16).
    let run = |w: &[f32], r: usize| -> Vec<f32> {
        w.iter()
            .enumerate()
            .map(|(i, x)| x - 0.01 * ((i * 3 + r) as f32).cos())
            .collect()
    };
    let int8 = Compression::Int8 { block: 256 }.tag();
    for r in 0..6 {
        if r == 3 {
            // The model moves far in one round (a peer catching up with the swarm): 70
            // times a run's length.
            b.weights.iter_mut().for_each(|w| *w += 0.5);
        }
        let local = run(b.weights(), r);
        let keyframe = b.next_is_keyframe(&local);
        let msg = b.local_update(&local, 8, 0.0).expect("finite");
        let tag = payload_of(&msg, n)[0];
        // Round 0's keyframe starts the copy; then changes, but for the round after the
        // move, when a change would carry a tenth of the gap and leave the copy lagging.
        let want = r == 0 || r == 3;
        assert_eq!((keyframe, tag == int8), (want, want), "round {r}");
        assert_ne!(tag == CHANGE_TAG, want, "round {r}");
        assert!(a.receive(&msg).is_ok(), "round {r}");
        let copy = &a.copies[&b.public_key()].weights;
        assert_eq!(copy, &b.public.as_ref().expect("sent").weights);
        if r == 3 {
            // From 11.3 (the move) to int8's rounding, under the run's own length.
            let lag = aggregate::distance(copy, &local);
            let length = aggregate::distance(b.weights(), &local);
            assert!(
                lag < length,
                "the copy lags the weights by {lag}, the run is {length}"
            );
        }
        b.finish_round();
        a.finish_round();
    }
}

/// One round of three peers with weights changes and a robust rule, from all-zero
/// weights that every copy holds exactly: each run moves 8 of 64 weights by `size` (as
/// much as a top-k change carries whole), ours by `own_size`; our public copy lags our
/// weights by `lag` in every coordinate. Returns our learner once the round closed.
fn after_lag(lag: f32, own_size: f32) -> Learner {
    let n = 64;
    let make = |seed: u8| {
        let c = LearnConfig {
            aggregation: Aggregation::TrimmedMean { trim: 0.2 },
            exchange: Exchange::Weights,
            compression: Compression::TopK2Bit { fraction: 0.125 },
            sync_every: 0,
            ..cfg()
        };
        Learner::new(c, "digits", Identity::from_seed([seed; 32]), vec![0.0; n]).expect("valid")
    };
    let (mut a, mut b, mut c) = (make(1), make(2), make(3));
    // Round 0: keyframes of unchanged weights; every copy is exact, nobody moves.
    let zero = vec![0.0; n];
    let kb = b.local_update(&zero, 8, 0.0).expect("finite");
    let kc = c.local_update(&zero, 8, 0.0).expect("finite");
    a.local_update(&zero, 8, 0.0).expect("finite");
    a.receive(&kb).expect("keyframe");
    a.receive(&kc).expect("keyframe");
    for l in [&mut a, &mut b, &mut c] {
        l.finish_round();
        assert_eq!(l.weights(), &zero[..]);
    }
    // Our copy left behind (as a model that moved far leaves it).
    a.public
        .as_mut()
        .expect("sent")
        .weights
        .iter_mut()
        .for_each(|w| *w += lag);
    let run = |k: usize, size: f32| -> Vec<f32> {
        (0..n)
            .map(|i| if i / 8 == k { -size } else { 0.0 })
            .collect()
    };
    let local = run(0, own_size);
    // The lag is under CATCH_UP times the run: no keyframe for it on its own.
    assert!(!a.next_is_keyframe(&local));
    a.local_update(&local, 8, 0.0).expect("finite");
    a.receive(&b.local_update(&run(1, 0.01), 8, 0.0).expect("finite"))
        .expect("a change");
    a.receive(&c.local_update(&run(2, 0.01), 8, 0.0).expect("finite"))
        .expect("a change");
    let s = a.finish_round();
    assert_eq!(s.used, 2, "both neighbours used");
    a
}

/// Whether our screen found that the copy's lag made our update an outlier.
fn copy_screened(lag: f32, own_size: f32) -> bool {
    after_lag(lag, own_size).copy_screened_out()
}

#[test]
fn an_update_screened_out_for_our_copys_lag_and_not_for_our_run_asks_for_a_keyframe() {
    // Lagging 0.01 everywhere (3.3 times the run): our update as neighbours see it lies
    // 2.8 times as far from the median as theirs; our run, as far as theirs.
    assert!(copy_screened(0.01, 0.01));
    // No lag: our update passes.
    assert!(!copy_screened(0.0, 0.01));
    // Our run itself is the outlier (5 times theirs): a keyframe would not help.
    assert!(!copy_screened(0.0, 0.05));
    assert!(!copy_screened(0.005, 0.05));
    // A model adopted since has no copy out: nothing to catch up.
    let mut a = after_lag(0.01, 0.01);
    let adopted = Snapshot {
        round: 5,
        weights: vec![0.0; 64],
        momentum: vec![0.0; 64],
    };
    assert!(a.adopt(adopted));
    assert!(!a.copy_screened_out());
}

#[test]
fn a_whole_copy_sets_the_copy_to_int8_rounding_and_the_changes_after_it_apply() {
    let n = 300;
    let mut a = changes_peer(1, vec![0.0; n]);
    let mut b = changes_peer(2, vec![0.0; n]);
    let local = |r: usize| -> Vec<f32> { (0..n).map(|i| ((i * 7 + r) as f32).sin()).collect() };
    // a never gets b's keyframe; b's change then cannot apply.
    b.local_update(&local(0), 8, 0.0).expect("finite");
    b.finish_round();
    a.finish_round();
    assert_eq!(
        a.receive(&b.local_update(&local(1), 8, 0.0).expect("finite")),
        Err(Rejection::Base)
    );
    b.finish_round();
    a.finish_round();
    // The next round b sends a the copy whole (what its peer does for a neighbour that
    // lacks it): in the keyframe's int8, a quarter of fp32's bytes, within int8's
    // rounding of b's copy (half a step of each block's scale, max-abs / 127).
    b.local_update(&local(2), 8, 0.0).expect("finite");
    assert!(b.sent_change());
    let whole = b.whole_public().expect("a change went out");
    assert_eq!(payload_of(&whole, n)[0], KEYFRAME_CODEC.tag());
    assert!(payload_of(&whole, n).len() < 4 * n / 3, "not fp32");
    assert!(a.receive(&whole).is_ok());
    let off = |a: &Learner, b: &Learner| -> Vec<f32> {
        let ours = &b.public.as_ref().expect("sent").weights;
        a.copies[&b.public_key()]
            .weights
            .iter()
            .zip(ours)
            .map(|(x, y)| x - y)
            .collect()
    };
    let rounding = off(&a, &b);
    let step = 1.0 / 127.0; // every block's max-abs is at most 1 (sines)
    assert!(rounding.iter().all(|d| d.abs() <= 0.5 * step + 1e-6));
    assert!(rounding.iter().any(|d| *d != 0.0), "not exact fp32");
    // b's changes move a's copy as they move b's: the rounding stays as it was, no more.
    for r in 3..6 {
        b.finish_round();
        a.finish_round();
        let change = b.local_update(&local(r), 8, 0.0).expect("finite");
        assert_eq!(payload_of(&change, n)[0], CHANGE_TAG);
        assert!(a.receive(&change).is_ok(), "round {r}");
        for (now, then) in off(&a, &b).iter().zip(&rounding) {
            assert!((now - then).abs() < 1e-5, "round {r}: {now} vs {then}");
        }
    }
}

#[test]
fn a_screen_of_three_updates_leaves_no_record() {
    // A three-peer swarm: our own update and two neighbours'. One neighbour's model has
    // drifted (its update lies 6.7 times as far from the coordinate-wise median as the
    // other two): the screen drops it for the round, but three updates are too few for
    // a verdict on its signer; on the record it would be distrusted and, at the peer,
    // no longer waited for.
    let mut c = cfg();
    c.aggregation = Aggregation::TrimmedMean { trim: 0.2 };
    let mut a =
        Learner::new(c, "digits", Identity::from_seed([1; 32]), vec![0.0; 4]).expect("valid");
    let mut near = peer(2, vec![0.0; 4]);
    let mut drifted = peer(3, vec![0.0; 4]);
    let near_key = near.public_key();
    let drifted_key = drifted.public_key();
    let mut round = |d: [f32; 4]| {
        a.update_from_delta(&[1.0, 0.1, 0.0, 0.0], 1, 0.0);
        a.receive(&near.update_from_delta(&[1.0, 0.0, 0.1, 0.0], 1, 0.0))
            .expect("valid");
        a.receive(&drifted.update_from_delta(&d, 1, 0.0))
            .expect("valid");
        near.finish_round();
        drifted.finish_round();
        let s = a.finish_round();
        let senders: Vec<PublicKey> = s.receipts.iter().map(|r| r.sender).collect();
        (s.used, senders, a.distrusts(&drifted_key))
    };
    for r in 0..4 {
        let (used, senders, distrusted) = round([1.6, 0.0, 0.0, 0.3]);
        assert_eq!(used, 1, "round {r}: screened out");
        assert_eq!(senders, vec![near_key], "round {r}");
        assert!(!distrusted, "round {r}: distrusted on a screen of three");
    }
    // Back near the others, it is used (and receipted) at once.
    let (used, senders, _) = round([1.0, 0.0, -0.1, 0.0]);
    assert_eq!((used, senders.len()), (2, 2));
}

#[test]
fn a_signer_screened_in_half_of_its_recent_updates_is_dropped_until_it_behaves() {
    // Trimmed mean with nothing trimmed: the screen alone decides, and what it keeps is
    // averaged.
    let mut c = cfg();
    c.aggregation = Aggregation::TrimmedMean { trim: 0.0 };
    let mut a = Learner::new(
        c.clone(),
        "digits",
        Identity::from_seed([1; 32]),
        vec![0.0; 4],
    )
    .expect("valid");
    let mut honest: Vec<Learner> = (2..5).map(|s| peer(s, vec![0.0; 4])).collect();
    let mut liar = peer(9, vec![0.0; 4]);
    let deltas = [
        [1.0, -0.1, 0.0, 0.0],
        [1.0, 0.0, 0.1, 0.0],
        [1.0, 0.0, -0.1, 0.0],
    ];
    // One round: our own delta is (1, 0.1, 0, 0); the honest peers send theirs (the first
    // one `first` instead, when given); the liar sends `lie`. Returns updates used and
    // our step.
    let mut round = |lie: [f32; 4], first: Option<[f32; 4]>| {
        let start = a.weights().to_vec();
        let local: Vec<f32> = start
            .iter()
            .zip([1.0, 0.1, 0.0, 0.0])
            .map(|(w, d)| w - d)
            .collect();
        a.local_update(&local, 1, 0.0).expect("finite");
        for (i, (h, d)) in honest.iter_mut().zip(deltas).enumerate() {
            let d = if i == 0 { first.unwrap_or(d) } else { d };
            a.receive(&h.update_from_delta(&d, 1, 0.0)).expect("valid");
            h.finish_round();
        }
        a.receive(&liar.update_from_delta(&lie, 1, 0.0))
            .expect("valid");
        liar.finish_round();
        let used = a.finish_round().used;
        let step: Vec<f32> = start.iter().zip(a.weights()).map(|(s, w)| s - w).collect();
        (used, step)
    };
    let far = [-2.0, 0.0, 0.0, 0.0];
    // Within the screen's radius (0.14 from the median (1, 0, 0, 0); honest ones are 0.1).
    let near = [1.0, 0.0, 0.0, 0.14];
    let honest_mean = [1.0, 0.0, 0.0, 0.0];
    let close = |s: &[f32], t: [f32; 4]| s.iter().zip(t).all(|(x, y)| (x - y).abs() < 1e-5);
    // A lie the screen lets through is used while the liar's record is clean.
    let (used, step) = round(near, None);
    assert_eq!(used, 4);
    assert!(close(&step, [1.0, 0.0, 0.0, 0.028]), "{step:?}");
    // Screened twice of three: from then on dropped even when the screen would let it
    // through.
    assert_eq!(round(far, None).0, 3);
    assert_eq!(round(far, None).0, 3);
    let (used, step) = round(near, None);
    assert_eq!(used, 3, "distrusted");
    assert!(close(&step, honest_mean), "{step:?}");
    // Behaving, it is trusted again once fewer than half of its last four were screened.
    assert_eq!(round(honest_mean, None).0, 3);
    assert_eq!(round(honest_mean, None).0, 4);
    // An honest peer screened once in four (its update far off) is not distrusted.
    assert_eq!(round(honest_mean, Some(far)).0, 3);
    assert_eq!(round(honest_mean, None).0, 4);
    assert_eq!(a.stats.rejected.get(&Rejection::Outlier), Some(&5));

    // A newcomer caught on its first update is distrusted at once.
    let mut b =
        Learner::new(c, "digits", Identity::from_seed([1; 32]), vec![0.0; 4]).expect("valid");
    let mut newcomer = peer(10, vec![0.0; 4]);
    let mut honest: Vec<Learner> = (11..14).map(|s| peer(s, vec![0.0; 4])).collect();
    for (lie, used) in [(far, 3), (near, 3)] {
        b.local_update(&[-1.0, -0.1, 0.0, 0.0], 1, 0.0)
            .expect("finite");
        for (h, d) in honest.iter_mut().zip(deltas) {
            b.receive(&h.update_from_delta(&d, 1, 0.0)).expect("valid");
            h.finish_round();
        }
        b.receive(&newcomer.update_from_delta(&lie, 1, 0.0))
            .expect("valid");
        newcomer.finish_round();
        assert_eq!(b.finish_round().used, used);
        b.weights.fill(0.0);
    }
    // With only our own update and its held, the screen does not run; it is dropped
    // anyway.
    b.local_update(&[-1.0, -0.1, 0.0, 0.0], 1, 0.0)
        .expect("finite");
    b.receive(&newcomer.update_from_delta(&near, 1, 0.0))
        .expect("valid");
    assert_eq!(b.finish_round().used, 0);
    // Not judged again (its updates stop coming in time), the distrust lapses four
    // rounds after it was last screened out.
    let key = newcomer.public_key();
    assert!(b.distrusts(&key));
    for _ in 0..4 {
        b.local_update(&[0.0; 4], 1, 0.0).expect("finite");
        b.finish_round();
    }
    assert!(!b.distrusts(&key));
}

/// One round of a learner in rounds sized in time (mean, outer lr 1, no momentum) whose
/// own run moved its one weight by `own` over `own_samples`, with neighbours' updates
/// `(delta, samples)`; returns the outer step.
fn timed_step(own: (f32, u32), others: &[(f32, u32)]) -> f32 {
    let c = LearnConfig {
        round_ms: 1_000,
        max_norm_ratio: 100.0,
        ..cfg()
    };
    let mut a =
        Learner::new(c.clone(), "t", Identity::from_seed([1; 32]), vec![1.0]).expect("valid");
    a.local_update(&[1.0 - own.0], own.1, 0.0).expect("finite");
    for (i, &(d, samples)) in others.iter().enumerate() {
        let mut b = Learner::new(
            c.clone(),
            "t",
            Identity::from_seed([i as u8 + 2; 32]),
            vec![1.0],
        )
        .expect("valid");
        a.receive(&b.local_update(&[1.0 - d], samples, 0.0).expect("finite"))
            .expect("valid update");
    }
    a.finish_round();
    1.0 - a.weights()[0]
}

#[test]
fn in_rounds_sized_in_time_updates_weigh_by_their_bounded_sample_claims() {
    // Equal claims: the plain mean, as in rounds sized in steps. (No neighbour's run
    // equals ours: that would be an echo of ours.)
    let even = timed_step((0.1, 100), &[(0.11, 100), (0.09, 100), (0.5, 100)]);
    assert!((even - 0.2).abs() < 1e-6, "{even}");
    // A peer that trained twice as many samples (and moved twice as far) counts fully:
    // the step is the runs' summed progress over their summed samples, in units of the
    // median run (100 samples): (0.1 + 0.11 + 0.09 + 0.2) / (1 + 1 + 1 + 2) = 0.1 ...
    let fast = timed_step((0.1, 100), &[(0.11, 100), (0.09, 100), (0.2, 200)]);
    assert!((fast - 0.1).abs() < 1e-6, "{fast}");
    // ... and a claim counts at most twice the median one: claiming 4e9 samples does
    // exactly what claiming 200 does.
    let huge = timed_step((0.1, 100), &[(0.11, 100), (0.09, 100), (0.5, u32::MAX)]);
    let capped = timed_step((0.1, 100), &[(0.11, 100), (0.09, 100), (0.5, 200)]);
    assert!((huge - capped).abs() < 1e-6, "{huge} vs {capped}");
    assert!(huge < even, "{huge} vs {even}");
    // Claiming 1 sample makes its update at most 4 times longer (for the norm bound and
    // the screen to judge) and shrinks the total weight by at most 3/4.
    let tiny = timed_step((0.1, 100), &[(0.11, 100), (0.09, 100), (0.5, 1)]);
    let quarter = timed_step((0.1, 100), &[(0.11, 100), (0.09, 100), (0.5, 25)]);
    assert!((tiny - quarter).abs() < 1e-6, "{tiny} vs {quarter}");
    assert!((tiny - 0.8 / 3.25).abs() < 1e-6, "{tiny}");
}

/// Exchanging weights in rounds sized in time: a held update is our start minus the
/// sender's weights, its run plus the distance between the models, so it is weighed by
/// its claim but never scaled by it. Scaled, a slow peer's update (a quarter of the median
/// claim) grew four times and was refused at the norm bound (3 times the others' norm),
/// unreceipted: in the five-peer e2e the browsers were credited for 6 of 35 rounds.
#[test]
fn exchanging_weights_a_slow_peers_update_is_weighed_by_its_claim_and_not_scaled() {
    let c = LearnConfig {
        exchange: Exchange::Weights,
        sync_every: 0,
        round_ms: 1_000,
        max_norm_ratio: 3.0,
        ..cfg()
    };
    let learner = |seed: u8| {
        Learner::new(c.clone(), "t", Identity::from_seed([seed; 32]), vec![1.0]).expect("valid")
    };
    let mut a = learner(1);
    a.local_update(&[0.9], 400, 0.0).expect("finite");
    for (seed, local, samples) in [(2, 0.89, 400), (3, 0.91, 400), (4, 0.7, 100)] {
        let update = learner(seed)
            .local_update(&[local], samples, 0.0)
            .expect("finite");
        a.receive(&update).expect("valid update");
    }
    let s = a.finish_round();
    assert_eq!(
        (s.used, s.rejected),
        (3, 0),
        "the slow peer's update is used"
    );
    assert_eq!(a.stats.rejected.get(&Rejection::Norm), None);
    let slow = learner(4).public_key();
    assert!(
        s.receipts
            .iter()
            .any(|r| r.sender == slow && r.samples == 100)
    );
    // The weighted mean of the unscaled updates: (0.1 + 0.11 + 0.09 + 0.3 / 4) / 3.25.
    let step = 1.0 - a.weights()[0];
    assert!((step - 0.375 / 3.25).abs() < 1e-6, "{step}");
}

#[test]
fn a_receipt_is_signed_for_each_update_used_and_only_its_sender_counts_it() {
    use crate::trust::receipt::{Receipt, sha256};
    let mut c = cfg();
    c.aggregation = Aggregation::TrimmedMean { trim: 0.25 };
    let learner = |seed: u8| {
        Learner::new(
            c.clone(),
            "digits",
            Identity::from_seed([seed; 32]),
            vec![0.0; 4],
        )
        .expect("valid")
    };
    let mut a = learner(1);
    let mut b = learner(2);
    let mut d = learner(4);
    a.local_update(&[-0.1; 4], 64, 0.0).expect("finite");
    let ub = b.local_update(&[-0.11; 4], 80, 0.0).expect("finite");
    a.receive(&ub).expect("valid");
    // A poisoned update far outside the others: refused at the norm bound, no receipt.
    let mut e = learner(5);
    let ue = e.local_update(&[-100.0; 4], 64, 0.0).expect("finite");
    a.receive(&ue).expect("valid until aggregation");
    let ud = d.local_update(&[-0.09; 4], 64, 0.0).expect("finite");
    a.receive(&ud).expect("valid");
    let s = a.finish_round();
    assert_eq!(s.used, 2);
    let mut senders: Vec<PublicKey> = s.receipts.iter().map(|r| r.sender).collect();
    senders.sort_unstable();
    let mut want = vec![b.public_key(), d.public_key()];
    want.sort_unstable();
    assert_eq!(senders, want, "receipts for exactly the updates used");
    let rb = s
        .receipts
        .iter()
        .find(|r| r.sender == b.public_key())
        .expect("b's");
    assert_eq!(
        (
            rb.round,
            rb.samples,
            rb.receiver,
            rb.update_sha256,
            rb.flags
        ),
        (0, 80, a.public_key(), sha256(&ub), FLAG_ROBUST),
        "it names the update's round, claim and bytes, and the robust rule"
    );
    // b counts it; d refuses a receipt that is not for it; a tampered one is refused
    // (while it would count: one for a receipt counted already counts for nothing, and is
    // not checked).
    let msg = PeerMessage::Receipt(rb.encode()).encode();
    assert_eq!(
        b.receive(&msg),
        Ok(Received::Receipt {
            signer: a.public_key(),
            round: 0,
        })
    );
    let mut forged = rb.clone();
    forged.samples = 8000;
    let forged = PeerMessage::Receipt(forged.encode()).encode();
    assert_eq!(b.receive(&forged), Err(Rejection::BadSignature));
    assert!(b.count_receipt(0, a.public_key()));
    assert_eq!(b.stats.receipts, 1);
    // Sent again (or passed on by another neighbour), it counts once.
    assert!(b.receive(&msg).is_ok());
    assert!(!b.count_receipt(0, a.public_key()));
    assert_eq!(b.stats.receipts, 1);
    assert_eq!(d.receive(&msg), Err(Rejection::Malformed));
    assert!(b.receive(&forged).is_ok());
    assert_eq!(b.stats.receipts, 1);
    assert!(Receipt::decode(&rb.encode()).is_ok());
}

fn private(z: f64, rounds: u64, on_budget: crate::privacy::OnBudget, n: usize) -> Learner {
    let mut l = peer(3, vec![0.0; n]);
    let dp = crate::privacy::Dp {
        clip: 1.0,
        noise_multiplier: z,
        delta: 1e-5,
        rounds,
        epsilon: crate::privacy::epsilon(z, 1.0, rounds, 1e-5),
        on_budget,
    };
    l.enable_privacy(dp, [5; 32], 0);
    l
}

#[test]
fn with_privacy_an_update_is_clipped_noised_and_carries_no_loss() {
    use crate::privacy::OnBudget;
    let n = 10_000;
    // Trained far (every coordinate moved by 1: norm 100): what leaves is clipped to 1.
    let mut quiet = private(1e-3, 10, OnBudget::Stop, n);
    let msg = quiet.local_update(&vec![-1.0; n], 64, 0.7).expect("finite");
    let PeerMessage::Update(u) = PeerMessage::decode(&msg, n).expect("valid") else {
        panic!("not an update");
    };
    assert_eq!(u.loss, 0.0, "the local loss describes the data");
    assert_eq!(u.samples, 64);
    let own = quiet.own.clone().expect("sent");
    let norm = own.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 0.02, "clipped to 1, got {norm}");
    // With noise multiplier 0.5 each coordinate carries noise of sd 0.5 around 0.01.
    let mut noisy = private(0.5, 10, OnBudget::Stop, n);
    noisy.local_update(&vec![-1.0; n], 64, 0.7).expect("finite");
    let own = noisy.own.clone().expect("sent");
    let sd = (own.iter().map(|x| (x - 0.01) * (x - 0.01)).sum::<f32>() / n as f32).sqrt();
    assert!((sd - 0.5).abs() < 0.02, "noise sd {sd}");
    // Without privacy the same training leaves whole.
    let mut plain = peer(3, vec![0.0; n]);
    plain.local_update(&vec![-1.0; n], 64, 0.7).expect("finite");
    assert!(plain.own.expect("sent").iter().all(|x| *x == 1.0));
}

#[test]
fn a_spent_privacy_budget_stops_updates_or_warns_as_the_task_says() {
    use crate::privacy::OnBudget;
    let mut stop = private(1.0, 2, OnBudget::Stop, 8);
    for _ in 0..2 {
        assert!(stop.may_send());
        stop.local_update(&[0.1; 8], 8, 0.0)
            .expect("within the budget");
    }
    let p = stop.privacy().expect("on");
    assert!(p.spent && p.stopped && !stop.may_send(), "{p:?}");
    assert_eq!(p.epsilon, p.budget_epsilon);
    assert_eq!(
        stop.local_update(&[0.1; 8], 8, 0.0),
        Err(LearnError::BudgetSpent(2))
    );
    let mut warn = private(1.0, 2, OnBudget::Warn, 8);
    for _ in 0..3 {
        warn.local_update(&[0.1; 8], 8, 0.0)
            .expect("warn keeps sending");
    }
    let p = warn.privacy().expect("on");
    assert!(p.spent && !p.stopped && warn.may_send(), "{p:?}");
    assert!(p.epsilon > p.budget_epsilon, "{p:?}");
    // Rounds sent on earlier visits count, and the count never goes down.
    let mut back = private(1.0, 2, OnBudget::Stop, 8);
    back.note_privacy_sent(2, 1.0);
    back.note_privacy_sent(0, 1.0);
    assert!(!back.may_send());
    assert_eq!(back.privacy().expect("on").rounds, 2);
    // Rounds sent with less noise cost more at today's noise: one round at z = 0.5 is
    // four at z = 1.
    let mut cheaper = private(1.0, 10, OnBudget::Stop, 8);
    cheaper.note_privacy_sent(1, 0.5);
    assert_eq!(cheaper.privacy().expect("on").rounds, 4);
    let mut unknown = private(1.0, 10, OnBudget::Stop, 8);
    unknown.note_privacy_sent(1, f64::NAN);
    assert!(
        !unknown.may_send(),
        "an unreadable noise counts as the whole budget"
    );
}

#[test]
fn a_loss_kept_local_is_not_in_the_update() {
    let mut l = peer(3, vec![0.0; 4]);
    l.keep_loss_local();
    let msg = l.local_update(&[0.1; 4], 8, 0.7).expect("finite");
    let PeerMessage::Update(u) = PeerMessage::decode(&msg, 4).expect("valid") else {
        panic!("not an update");
    };
    assert_eq!(u.loss, 0.0);
    let mut shown = peer(3, vec![0.0; 4]);
    let msg = shown.local_update(&[0.1; 4], 8, 0.7).expect("finite");
    let PeerMessage::Update(u) = PeerMessage::decode(&msg, 4).expect("valid") else {
        panic!("not an update");
    };
    assert_eq!(u.loss, 0.7);
}

/// A peer alone in a round's aggregate (no neighbour's update used) steps by its run as
/// it was, not by the compressed part it sends (a keyframe's int8 rounding of the whole
/// weights, or a top-k change of its copy): with outer lr 1 and no momentum its model is
/// its local weights, round after round. With differential privacy it still steps by
/// what it sent (clipped and noised): a neighbour may download its model.
#[test]
fn a_peer_alone_steps_by_its_whole_run() {
    let n = 512;
    let start: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut a = changes_peer(1, start);
    for r in 0..4 {
        let local: Vec<f32> = a
            .weights()
            .iter()
            .enumerate()
            .map(|(i, w)| w + 0.01 * ((i * 7 + r) as f32).cos())
            .collect();
        a.local_update(&local, 8, 0.0).expect("finite");
        a.finish_round();
        let off = aggregate::distance(a.weights(), &local);
        assert!(off < 1e-5, "round {r}: {off} from its local weights");
    }
    // Exchanging deltas, a top-k codec keeps the rest of the run for later rounds: alone,
    // the peer steps by what it sent, or that rest would be applied twice.
    let c = LearnConfig {
        compression: Compression::TopK { fraction: 0.1 },
        ..cfg()
    };
    let mut d =
        Learner::new(c, "digits", Identity::from_seed([4; 32]), vec![0.0; n]).expect("valid");
    let local: Vec<f32> = (0..n).map(|i| (i as f32).sin()).collect();
    d.local_update(&local, 8, 0.0).expect("finite");
    assert!(
        d.own_exact.is_none(),
        "no whole run with a codec that keeps a rest"
    );
    let mut p = private(1e-3, 10, crate::privacy::OnBudget::Stop, n);
    let local = vec![-1.0; n];
    p.local_update(&local, 64, 0.0).expect("finite");
    p.finish_round();
    assert!(
        aggregate::distance(p.weights(), &local) > 1.0,
        "a private peer took its unclipped run"
    );
}

/// A learner of `digits` with settings `c`, key seed `seed` and `n` zero weights.
fn with(c: &LearnConfig, seed: u8, n: usize) -> Learner {
    Learner::new(
        c.clone(),
        "digits",
        Identity::from_seed([seed; 32]),
        vec![0.0; n],
    )
    .expect("valid")
}

/// A round of a learner (seed 1, four weights at 0) that holds the updates of `held`
/// (`(seed, weights sent, samples)`, each from a learner of its own) and ran its own to
/// `own` (weights, samples): the learner and what the round did.
fn held_round(
    c: &LearnConfig,
    held: &[(u8, f32, u32)],
    own: (f32, u32),
) -> (Learner, RoundSummary) {
    let mut a = with(c, 1, 4);
    for &(seed, to, samples) in held {
        let mut o = with(c, seed, 4);
        a.receive(&o.local_update(&[to; 4], samples, 0.0).expect("finite"))
            .expect("taken in");
    }
    a.local_update(&[own.0; 4], own.1, 0.0).expect("finite");
    let s = a.finish_round();
    (a, s)
}

#[test]
fn a_lone_held_update_is_clipped_to_our_own_norm() {
    // Exchanging weights: our run moves 0.01 a coordinate; the one neighbour heard this
    // round sends weights a hundred away. Alone among the held updates it is no median:
    // it is clipped to three times our run's norm, and our model stays near our run.
    let c = LearnConfig {
        exchange: Exchange::Weights,
        aggregation: Aggregation::TrimmedMean { trim: 0.2 },
        sync_every: 0,
        ..cfg()
    };
    let mut a = with(&c, 1, 4);
    let mut x = with(&c, 2, 4);
    a.receive(&x.local_update(&[100.0; 4], 64, 0.0).expect("finite"))
        .expect("taken in");
    a.local_update(&[0.01; 4], 8, 0.0).expect("finite");
    let s = a.finish_round();
    assert_eq!((s.used, s.rejected), (1, 0));
    // The mean of our run (norm 0.02) and the clipped one (0.06): 0.04 at most.
    assert!(
        aggregate::norm(a.weights()) <= 0.04 + 1e-6,
        "{:?}",
        a.weights()
    );
    // Two held updates still bound each other: an honest one of 0.02 and the liar's.
    let c = LearnConfig {
        exchange: Exchange::Weights,
        sync_every: 0,
        ..cfg()
    };
    let (_, s) = held_round(&c, &[(2, 100.0, 8), (3, 0.02, 8)], (0.01, 8));
    assert_eq!((s.used, s.rejected), (1, 1));
}

#[test]
fn a_finite_update_that_overflows_when_scaled_to_the_median_claim_is_refused() {
    // Rounds in time exchanging deltas: a liar sends finite values near f32::MAX and
    // claims 1 sample; scaled up to a quarter of the median claim (times 4) they overflow
    // to infinity. Taken, one update would turn our whole model into NaN for good. (Heard
    // alone it is not scaled up: with our own claim, the lower median is its own.)
    let c = LearnConfig {
        round_ms: 1_000,
        aggregation: Aggregation::TrimmedMean { trim: 0.2 },
        ..cfg()
    };
    let held = [(2, -f32::MAX, 1), (3, 0.011, 100), (4, 0.009, 100)];
    let (a, s) = held_round(&c, &held, (0.01, 100));
    assert_eq!((s.used, s.rejected), (2, 1));
    assert!(
        a.weights().iter().all(|w| w.is_finite()),
        "{:?}",
        a.weights()
    );
    assert_eq!(a.stats.rejected.get(&Rejection::Norm), Some(&1));
    // Two such among three held (a neighbourhood of liars, in steps: nothing scaled) set
    // the lower median of the held norms to infinity, and no bound held: they were used,
    // and our model moved about 1e38.
    let c = LearnConfig {
        aggregation: Aggregation::TrimmedMean { trim: 0.2 },
        ..cfg()
    };
    let (a, s) = held_round(
        &c,
        &[(2, -2e38, 8), (3, -2e38, 8), (4, 0.011, 8)],
        (0.01, 8),
    );
    assert_eq!((s.used, s.rejected), (1, 2));
    assert!(
        a.weights().iter().all(|w| w.abs() < 1.0),
        "{:?}",
        a.weights()
    );
}

#[test]
fn two_colluders_held_alone_are_bounded_by_the_neighbours_awaited() {
    // Exchanging weights: only two colluders' updates are held this round, both weights
    // a hundred away, and three honest neighbours awaited sent none for it (late, or
    // pushed out by their next round's). The colluders were each other's median and were
    // taken whole; the three missing count as our own run's norm, and both are scaled
    // down to three times it (0.06).
    let c = LearnConfig {
        exchange: Exchange::Weights,
        sync_every: 0,
        ..cfg()
    };
    let round = |missing: u8, own: bool| {
        let mut a = with(&c, 1, 4);
        // Neighbours 4, 5, ... whose updates are not held; the colluders are not awaited
        // (gone, say): what they delivered still counts, not they.
        let missing = (4..4 + missing).map(|s| vec![Identity::from_seed([s; 32]).public()]);
        for seed in [2, 3] {
            let mut o = with(&c, seed, 4);
            a.receive(&o.local_update(&[100.0; 4], 8, 0.0).expect("finite"))
                .expect("taken in");
        }
        if own {
            a.local_update(&[0.01; 4], 8, 0.0).expect("finite");
        }
        a.set_awaited(missing.collect());
        let s = a.finish_round();
        (s.used, s.rejected, aggregate::norm(a.weights()))
    };
    let (used, rejected, norm) = round(3, true);
    assert_eq!((used, rejected), (2, 0));
    // The mean of our run (0.02) and the two scaled ones.
    assert!(norm <= (0.02 + 2.0 * 0.06) / 3.0 + 1e-6, "{norm}");
    // A round closed without our own update (caught up to the swarm): the missing count
    // as nothing, and the colluders move us nowhere.
    let (_, _, norm) = round(3, false);
    assert!(norm <= 1e-6, "{norm}");
    // Where they are most of those the round used and awaited, they are taken.
    let (used, _, norm) = round(1, true);
    assert_eq!(used, 2);
    assert!(norm > 100.0, "{norm}");
}

#[test]
fn our_own_update_echoed_under_another_key_is_refused_and_earns_nothing() {
    let n = 256;
    let mut c = cfg();
    c.aggregation = Aggregation::TrimmedMean { trim: 0.25 };
    let learner = |seed: u8| with(&c, seed, n);
    // Runs of independent noise, one per peer.
    let mut state = 0x2545_f491_u32;
    let mut run = || -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    let mut a = learner(1);
    let mine = a.local_update(&run(), 8, 0.0).expect("finite");
    let honest: Vec<Learner> = (2..4).map(learner).collect();
    for mut h in honest {
        a.receive(&h.local_update(&run(), 8, 0.0).expect("finite"))
            .expect("valid");
    }
    // Two liars send our update back, each signed with its own key.
    for seed in [8, 9] {
        let echo = Update::signed(
            &Identity::from_seed([seed; 32]),
            "digits",
            0,
            8,
            0.0,
            payload_of(&mine, n),
        );
        a.receive(&PeerMessage::Update(echo).encode())
            .expect("taken in");
    }
    let s = a.finish_round();
    assert_eq!((s.used, s.rejected), (2, 2));
    assert_eq!(a.stats.rejected[&Rejection::Own], 2);
    let receipted: Vec<PublicKey> = s.receipts.iter().map(|r| r.sender).collect();
    for seed in [2u8, 3] {
        assert!(receipted.contains(&Identity::from_seed([seed; 32]).public()));
    }
    assert_eq!(receipted.len(), 2, "no receipt for an echo");
}

#[test]
fn a_receipt_vouches_for_at_most_twice_the_rounds_median_claim() {
    // Rounds of steps (the default) weigh every update alike, but receipts carried the
    // claims as said: in a swarm of three whose liar signs no receipts, the liar's group
    // is the round's only one counted, and the ledger credited it 4,294,967,295.
    use crate::trust::ledger::Entry;
    use crate::trust::receipt::FLAG_CLAIM_BOUNDED;
    let mut a = peer(1, vec![0.0; 4]);
    let mut b = peer(2, vec![0.0; 4]);
    let mut liar = peer(3, vec![0.0; 4]);
    let ua = a.local_update(&[-0.1; 4], 64, 0.0).expect("finite");
    let ub = b.local_update(&[-0.11; 4], 64, 0.0).expect("finite");
    let ul = liar
        .local_update(&[-0.09; 4], u32::MAX, 0.0)
        .expect("finite");
    a.receive(&ub).expect("valid");
    a.receive(&ul).expect("valid");
    b.receive(&ua).expect("valid");
    b.receive(&ul).expect("valid");
    let (sa, sb) = (a.finish_round(), b.finish_round());
    assert_eq!((sa.used, sb.used), (2, 2));
    let vouched = |k: PublicKey| {
        let r = sa
            .receipts
            .iter()
            .find(|r| r.sender == k)
            .expect("receipted");
        (r.samples, r.flags & FLAG_CLAIM_BOUNDED)
    };
    assert_eq!(vouched(b.public_key()), (64, 0));
    assert_eq!(vouched(liar.public_key()), (128, FLAG_CLAIM_BOUNDED));
    // The ledger's rule credits the liar's group, the round's only one with a quorum,
    // what its receipts vouch for: twice an honest claim, not its own.
    let entries: Vec<Entry> = sa
        .receipts
        .iter()
        .chain(&sb.receipts)
        .enumerate()
        .map(|(i, r)| Entry {
            index: i as u64,
            time_ms: 0,
            links: 2,
            site: String::new(),
            receipt: r.clone(),
            receipt_bytes: r.encode(),
            hash: [0; 32],
        })
        .collect();
    let credits = crate::trust::credits::compute(&entries);
    assert_eq!(credits.by_key.len(), 1);
    assert_eq!(credits.by_key[0].key, liar.public_key());
    assert_eq!(credits.by_key[0].credit, 128);
}

#[test]
fn the_lower_median_is_the_smaller_middle_value_and_sorts_in_place() {
    let mut v = [5u64, 1, 4, 2];
    assert_eq!(lower_median_by(&mut v, u64::cmp), Some(2));
    assert_eq!(
        v,
        [1, 2, 4, 5],
        "sorted in place (the credits' cap reads the top quarter)"
    );
    assert_eq!(lower_median_by(&mut [3u64, 9, 1], u64::cmp), Some(3));
    assert_eq!(lower_median_by(&mut [0u64; 0], u64::cmp), None);
    // In total order a NaN sorts last, and -0 before +0.
    assert_eq!(
        lower_median(&[f32::NAN, 1.0, 0.0, -0.0]).to_bits(),
        0.0f32.to_bits()
    );
    assert_eq!(lower_median(&[]), 0.0);
    assert_eq!(median_claim(&[]), 1);
    assert_eq!(median_claim(&[0, 0, 7]), 1, "at least 1");
}
