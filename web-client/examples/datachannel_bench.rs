//! `cargo xtask bench datachannel`, native half: bulk transfer of a 20 MB message between
//! two `webrtc`-crate peer connections in this process, over the same kind of channel
//! Shoal uses (pre-negotiated, reliable, ordered; the same send-buffer limit), through
//! Shoal's framing layer (24-byte headers, CRC-32, reassembly) and as raw 16 KiB sends
//! (no header, no checksum, the receiver only counts bytes). Prints one JSON object.
//!
//! Runs on loopback only: `cargo xtask bench datachannel` starts it inside a network
//! namespace whose only interface is `lo`, with ICE bound to 127.0.0.1 and mDNS off.

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> anyhow::Result<()> {
    bench::main()
}

#[cfg(not(target_arch = "wasm32"))]
mod bench {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use async_trait::async_trait;
    use bytes::BytesMut;
    use rtc::ice::mdns::MulticastDnsMode;
    use shoal_shared::framing::{DEFAULT_CHUNK, HIGH_WATER, Reassembler, split};
    use tokio::sync::{mpsc, watch};
    use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
    use webrtc::peer_connection::{
        PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
        RTCIceCandidateInit, RTCPeerConnectionIceEvent, RTCSessionDescription,
        SettingEngineBuilder,
    };

    const SIZE: usize = 20 << 20;
    /// Pairs of transfers. Over loopback the kernel drops UDP datagrams
    /// when the receiving socket's buffer fills, and the SCTP stack then waits for its
    /// retransmission timer, so single transfers range from about 5 to 200 MB/s; many
    /// alternating pairs and their medians are what can be compared.
    const TRIALS: usize = 15;

    struct Trickle(mpsc::UnboundedSender<RTCIceCandidateInit>);

    #[async_trait]
    impl PeerConnectionEventHandler for Trickle {
        async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
            if let Ok(init) = event.candidate.to_json() {
                let _ = self.0.send(init);
            }
        }
    }

    async fn peer(
        tx: mpsc::UnboundedSender<RTCIceCandidateInit>,
    ) -> anyhow::Result<Arc<dyn PeerConnection>> {
        let runtime =
            webrtc::runtime::default_runtime().ok_or_else(|| anyhow::anyhow!("no runtime"))?;
        let pc = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(
                SettingEngineBuilder::new()
                    .with_multicast_dns_mode(MulticastDnsMode::Disabled)
                    .build(),
            )
            .with_handler(Arc::new(Trickle(tx)))
            .with_runtime(runtime)
            .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
            .with_data_channel_send_buffer_limit(HIGH_WATER)
            .build()
            .await?;
        Ok(Arc::new(pc))
    }

    async fn channel(pc: &Arc<dyn PeerConnection>) -> anyhow::Result<Arc<dyn DataChannel>> {
        let init = RTCDataChannelInit {
            negotiated: Some(0),
            ..Default::default()
        };
        Ok(pc.create_data_channel("bench", Some(init)).await?)
    }

    /// What the receiver is doing: counting raw bytes, or reassembling framed messages.
    struct Receiver {
        framed: AtomicBool,
        done: mpsc::UnboundedSender<usize>,
    }

    #[tokio::main]
    pub(crate) async fn main() -> anyhow::Result<()> {
        let (atx, mut arx) = mpsc::unbounded_channel();
        let (btx, mut brx) = mpsc::unbounded_channel();
        let a = peer(atx).await?;
        let b = peer(btx).await?;
        let da = channel(&a).await?;
        let db = channel(&b).await?;
        let offer = a.create_offer(None).await?;
        a.set_local_description(offer.clone()).await?;
        b.set_remote_description(RTCSessionDescription::offer(offer.sdp)?)
            .await?;
        let answer = b.create_answer(None).await?;
        b.set_local_description(answer.clone()).await?;
        a.set_remote_description(RTCSessionDescription::answer(answer.sdp)?)
            .await?;
        let (a2, b2) = (Arc::clone(&a), Arc::clone(&b));
        tokio::spawn(async move {
            while let Some(c) = arx.recv().await {
                let _ = b2.add_ice_candidate(c).await;
            }
        });
        tokio::spawn(async move {
            while let Some(c) = brx.recv().await {
                let _ = a2.add_ice_candidate(c).await;
            }
        });

        // The sender's events only tell us when it opened.
        let (open_tx, mut open_rx) = watch::channel(false);
        let da_events = Arc::clone(&da);
        tokio::spawn(async move {
            while let Some(ev) = da_events.poll().await {
                if matches!(ev, DataChannelEvent::OnOpen) {
                    let _ = open_tx.send(true);
                }
            }
        });
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Receiver {
            framed: AtomicBool::new(false),
            done: done_tx,
        });
        let state = Arc::clone(&rx);
        tokio::spawn(async move {
            let mut reassembler = Reassembler::new(SIZE + 1024, 4);
            let epoch = std::time::Instant::now();
            let mut raw = 0usize;
            while let Some(ev) = db.poll().await {
                if let DataChannelEvent::OnMessage(m) = ev {
                    if state.framed.load(Ordering::Relaxed) {
                        if let Ok(Some(msg)) =
                            reassembler.push(&m.data, epoch.elapsed().as_millis() as u64)
                        {
                            let _ = state.done.send(msg.len());
                        }
                    } else {
                        raw += m.data.len();
                        if raw >= SIZE {
                            let _ = state.done.send(raw);
                            raw = 0;
                        }
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), open_rx.wait_for(|&o| o)).await??;

        let data: Vec<u8> = (0..SIZE).map(|i| (i * 31 % 251) as u8).collect();
        let (mut raw_mb_s, mut framed_mb_s) = (Vec::new(), Vec::new());
        // Pairs in ABBA order (raw first, then framed first, ...): the transport's state
        // after one transfer (its congestion window after a loss) colours the next, so
        // neither kind may always go first.
        for trial in 0..TRIALS * 2 {
            let framed = (trial % 2 == 1) ^ (trial / 2 % 2 == 1);
            rx.framed.store(framed, Ordering::Relaxed);
            let start = Instant::now();
            if framed {
                for frame in split(trial as u32, &data, DEFAULT_CHUNK) {
                    da.send(BytesMut::from(&frame[..])).await?;
                }
            } else {
                for chunk in data.chunks(DEFAULT_CHUNK) {
                    da.send(BytesMut::from(chunk)).await?;
                }
            }
            let got = tokio::time::timeout(Duration::from_secs(120), done_rx.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("receiver stopped"))?;
            anyhow::ensure!(got == SIZE, "received {got} bytes, sent {SIZE}");
            let mb_s = SIZE as f64 / 1e6 / start.elapsed().as_secs_f64();
            if framed {
                framed_mb_s.push(mb_s);
            } else {
                raw_mb_s.push(mb_s);
            }
        }
        println!(
            "{}",
            serde_json::json!({ "bytes": SIZE, "raw_mb_s": raw_mb_s, "framed_mb_s": framed_mb_s })
        );
        let _ = a.close().await;
        let _ = b.close().await;
        Ok(())
    }
}
