//! Native to native over real WebRTC (the `webrtc` crate) through the real signaling
//! server: two peers move a 10 MB message and check its hash, and a second transfer
//! completes although the server is stopped mid-way; a message sent the moment a channel
//! opens arrives, after `PeerUp`, over many fresh connections; a neighbour flooding a peer
//! that reads nothing fills only its share of that peer's inbox.
//!
//! WebRTC tests must only ever see loopback: this test re-runs itself inside a fresh
//! network namespace whose only interface is `lo` (`unshare -n`, or `unshare -rn` when
//! not root), and binds ICE to 127.0.0.1 with mDNS off.

#![cfg(not(target_arch = "wasm32"))]

use std::time::Duration;

use sha2::{Digest, Sha256};
use shoal_shared::protocol::PeerId;
use shoal_web_client::native::{NativeOptions, NativeSwarm};
use shoal_web_client::swarm::{SwarmEvent, Transport};

mod common;

use common::{reexec_in_netns, start_server};

fn options(url: &str) -> NativeOptions {
    NativeOptions {
        url: url.into(),
        udp_addrs: vec!["127.0.0.1:0".into()],
        mdns: false,
        identity: None,
        max_message: shoal_web_client::swarm::MAX_MESSAGE,
        link_bytes: None,
        signaling_timeout: shoal_web_client::native::SIGNALING_TIMEOUT,
    }
}

fn peer(url: &str) -> NativeSwarm {
    NativeSwarm::connect(options(url))
}

async fn until<T>(
    swarm: &mut NativeSwarm,
    what: &str,
    mut f: impl FnMut(SwarmEvent) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ev = tokio::time::timeout_at(deadline, swarm.next_event())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("swarm open");
        if let Some(v) = f(ev) {
            return v;
        }
    }
}

/// Two peers of one swarm, once each has the other's channel up: `(a, b, b's id as a
/// knows it, a's id as b knows it)`.
async fn pair(url: &str) -> (NativeSwarm, NativeSwarm, PeerId, PeerId) {
    let mut a = peer(url);
    let mut b = peer(url);
    let b_of_a: PeerId = until(&mut a, "a's channel", |e| match e {
        SwarmEvent::PeerUp(p) => Some(p),
        _ => None,
    })
    .await;
    let a_of_b: PeerId = until(&mut b, "b's channel", |e| match e {
        SwarmEvent::PeerUp(p) => Some(p),
        _ => None,
    })
    .await;
    (a, b, b_of_a, a_of_b)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut r = shoal_shared::rng::SplitMix64::new(seed);
    (0..len).map(|_| r.next_u64() as u8).collect()
}

#[test]
fn two_native_peers_move_10_mb_even_while_the_server_dies() {
    if reexec_in_netns(common::test_name!()) {
        return;
    }
    runtime().block_on(async {
        let (url, stop) = start_server().await;
        let mut stop = Some(stop);
        let (mut a, mut b, b_of_a, a_of_b) = pair(&url).await;
        assert_eq!(Some(b_of_a), b.id());
        assert_eq!(Some(a_of_b), a.id());

        for (round, kill_server) in [(1u64, false), (2, true)] {
            let msg = random(10 << 20, round);
            let want = Sha256::digest(&msg);
            let started = std::time::Instant::now();
            a.send(b_of_a, msg).expect("queued");
            if kill_server {
                let _ = stop.take().expect("server still up").send(());
            }
            let (from, got) = until(&mut b, "the 10 MB message", |e| match e {
                SwarmEvent::Message { from, data } => Some((from, data)),
                _ => None,
            })
            .await;
            println!(
                "round {round}: 10 MB native to native in {:.2?}",
                started.elapsed()
            );
            assert_eq!(from, a_of_b);
            assert_eq!(got.len(), 10 << 20);
            assert_eq!(Sha256::digest(&got), want, "round {round}: hash differs");
        }
        // The server is gone, the channel is not.
        until(&mut a, "the server's departure", |e| {
            matches!(e, SwarmEvent::Signaling { me: None }).then_some(())
        })
        .await;
        assert_eq!(a.peers(), vec![b_of_a], "the channel outlived the server");
        a.close().await;
        b.close().await;
    });
}

#[test]
fn a_message_sent_the_moment_a_channel_opens_arrives_after_peer_up() {
    if reexec_in_netns(common::test_name!()) {
        return;
    }
    runtime().block_on(async {
        let (url, _stop) = start_server().await;
        // Fresh pairs, both sides writing the instant they see the channel up: whatever
        // arrives before the receiver's own open event must be held, not lost.
        for pair in 0..12u64 {
            let mut a = peer(&url);
            let mut b = peer(&url);
            let mut got = 0;
            let mut up = [None, None];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while got < 2 {
                let ev = tokio::time::timeout_at(deadline, async {
                    tokio::select! {
                        e = a.next_event() => (0, e),
                        e = b.next_event() => (1, e),
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("pair {pair}: {got} of 2 greetings arrived"));
                let (side, ev) = (ev.0, ev.1.expect("swarm open"));
                let me = if side == 0 { &a } else { &b };
                match ev {
                    SwarmEvent::PeerUp(p) => {
                        up[side] = Some(p);
                        me.send(p, format!("hello {pair}").into_bytes())
                            .expect("queued at open");
                    }
                    SwarmEvent::Message { from, data } => {
                        assert_eq!(
                            up[side],
                            Some(from),
                            "pair {pair}: a message before peer_up"
                        );
                        assert_eq!(data, format!("hello {pair}").into_bytes());
                        got += 1;
                    }
                    _ => {}
                }
            }
            a.close().await;
            b.close().await;
        }
    });
}

#[test]
fn a_neighbour_flooding_a_busy_peer_fills_only_its_share_of_the_inbox() {
    if reexec_in_netns(common::test_name!()) {
        return;
    }
    runtime().block_on(async {
        let (url, _stop) = start_server().await;
        let (a, mut b, b_of_a, _) = pair(&url).await;
        // b is busy (it reads nothing) while a sends 100 messages of 1 MiB.
        for i in 0..100 {
            a.send(b_of_a, random(1 << 20, i)).expect("queued");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while b.dropped() + (b.waiting() as u64) < 100 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} dropped, {} waiting",
                b.dropped(),
                b.waiting()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(b.waiting(), 64, "64 MiB of a's messages wait, no more");
        assert_eq!(b.dropped(), 36);
        // Once b has handled them, a's next message goes in again.
        let mut first = None;
        while let Some(ev) = b.try_next_event() {
            if let (None, SwarmEvent::Message { data, .. }) = (&first, ev) {
                first = Some(data);
            }
        }
        assert_eq!(
            first,
            Some(random(1 << 20, 0)),
            "the oldest waited, in order"
        );
        a.send(b_of_a, b"after".to_vec()).expect("queued");
        let got = until(&mut b, "the message after", |e| match e {
            SwarmEvent::Message { data, .. } => Some(data),
            _ => None,
        })
        .await;
        assert_eq!(got, b"after");
        a.close().await;
        b.close().await;
    });
}

/// A signaling server that takes the connection and then says nothing (it hung, or the
/// path died without a word, as when a NAT forgets the connection) is given up after
/// `signaling_timeout` and connected to again: the peer waited for it for good, out of
/// its swarm. Both before the handshake and after it.
#[test]
fn a_silent_signaling_server_is_left_and_connected_to_again() {
    if reexec_in_netns(common::test_name!()) {
        return;
    }
    runtime().block_on(async {
        for handshake in [false, true] {
            let server = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!("ws://{}/ws/digits?v=2", server.local_addr().expect("addr"));
            let swarm = NativeSwarm::connect(NativeOptions {
                signaling_timeout: Duration::from_millis(500),
                ..options(&url)
            });
            let started = std::time::Instant::now();
            let mut held = Vec::new();
            let mut sockets = Vec::new();
            for _ in 0..3 {
                let (s, _) = tokio::time::timeout(Duration::from_secs(10), server.accept())
                    .await
                    .expect("the peer tries again")
                    .expect("accept");
                if handshake {
                    // Upgraded, then silent: no ping, no message.
                    held.push(tokio_tungstenite::accept_async(s).await.expect("upgrade"));
                } else {
                    sockets.push(s);
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(8),
                "three tries took {:?}",
                started.elapsed()
            );
            swarm.close().await;
        }
    });
}

#[test]
fn a_namespace_run_that_ran_no_test_is_a_failure() {
    assert_eq!(
        common::test_name!(),
        "a_namespace_run_that_ran_no_test_is_a_failure"
    );
    let one = "\nrunning 1 test\ntest x ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 2 filtered out; finished in 1.00s\n";
    let none = "\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out; finished in 0.00s\n";
    assert!(common::ran_exactly_one_test(one));
    assert!(
        !common::ran_exactly_one_test(none),
        "a renamed test matches nothing"
    );
    assert!(!common::ran_exactly_one_test(""));
}
