//! The native Shoal peer: joins a task's swarm like a browser does and reports what
//! happens. (Training and keeping checkpoints come with the swarm-learning work.)
//!
//! ```text
//! cargo run --release -p shoal-web-client --bin shoal-peer -- \
//!     --server ws://127.0.0.1:8080 --task digits [--bind 127.0.0.1] [--echo]
//! ```
//!
//! Each event is printed as one line: `up <id>`, `down`, `peer-up <id>`, `peer-down <id>`,
//! `message <from> <bytes> <sha256>`. With `--echo` every message is sent back to its
//! sender (the end-to-end tests use this).

#[cfg(not(target_arch = "wasm32"))]
fn main() -> anyhow::Result<()> {
    peer::main()
}

/// The browser build of the peer is the wasm library; this binary is native only.
#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
mod peer {
    use std::net::IpAddr;

    use clap::Parser;
    use sha2::{Digest, Sha256};
    use shoal_web_client::native::{NativeOptions, NativeSwarm};
    use shoal_web_client::swarm::{SwarmEvent, Transport};

    /// A native Shoal peer.
    #[derive(Parser, Debug)]
    #[command(version, about)]
    struct Args {
        /// The signaling server, e.g. ws://127.0.0.1:8080.
        #[arg(long, env = "SHOAL_SERVER", default_value = "ws://127.0.0.1:8080")]
        server: String,
        /// The task to join.
        #[arg(long, env = "SHOAL_TASK", default_value = "digits")]
        task: String,
        /// Local address for WebRTC (ICE) sockets; 0.0.0.0 uses every interface.
        #[arg(long, env = "SHOAL_BIND", default_value = "0.0.0.0")]
        bind: IpAddr,
        /// Answer every message by sending it back.
        #[arg(long)]
        echo: bool,
    }

    #[tokio::main]
    pub(crate) async fn main() -> anyhow::Result<()> {
        let args = Args::parse();
        let url = format!(
            "{}/ws/{}?v={}",
            args.server.trim_end_matches('/'),
            args.task,
            shoal_shared::protocol::VERSION
        );
        let mut swarm = NativeSwarm::connect(NativeOptions {
            url,
            udp_addrs: vec![format!("{}:0", args.bind)],
            mdns: false,
        });
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                ev = swarm.next_event() => {
                    let Some(ev) = ev else { break };
                    match ev {
                        SwarmEvent::Signaling { me: Some(me) } => println!("up {me}"),
                        SwarmEvent::Signaling { me: None } => println!("down"),
                        SwarmEvent::PeerUp(p) => println!("peer-up {p}"),
                        SwarmEvent::PeerDown(p) => println!("peer-down {p}"),
                        SwarmEvent::Message { from, data } => {
                            let hash: String = Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
                            println!("message {from} {} {hash}", data.len());
                            if args.echo
                                && let Err(e) = swarm.send(from, data)
                            {
                                eprintln!("echo to {from} failed: {e}");
                            }
                        }
                    }
                }
            }
        }
        swarm.close().await;
        Ok(())
    }
}
