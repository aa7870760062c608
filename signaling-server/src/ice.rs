//! The ICE server list handed to every peer, including TURN with time-limited credentials
//! in the REST scheme of coturn's `use-auth-secret`: the user name is `expiry:user`
//! (expiry in Unix seconds) and the password is `base64(HMAC-SHA1(secret, username))`,
//! which coturn verifies with the same shared secret without any per-user state.
//!
//! `user` names the client's network (its IPv4 address or IPv6 /48), not its peer: a
//! keyed hash of it, so the name does not show the address. With a name per peer, anyone
//! could collect a fresh credential valid for the TTL with each connection (no training,
//! no `identify`: the `welcome` carries it), thousands an hour from one address, and
//! coturn's `user-quota`, which counts allocations per user name, never limited one
//! client. The expiry is rounded up to a multiple of the TTL, so one network holds at
//! most two user names at a time (this window's and the last one's), and `user-quota`
//! bounds what all its clients may hold at once.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use shoal_shared::protocol::IceServer;

/// ICE configuration from the server's flags.
#[derive(Clone, Debug, Default)]
pub struct IceConfig {
    /// `stun:host:port` URLs.
    pub stun: Vec<String>,
    /// `turn:host:port?transport=udp` (or `turns:`) URLs.
    pub turn: Vec<String>,
    /// The secret shared with coturn (`static-auth-secret`); TURN is offered only with it.
    pub turn_secret: Option<String>,
    /// How long a credential stays valid, in seconds.
    pub turn_ttl_secs: u64,
}

/// HMAC-SHA1 of `parts` under `secret`.
fn hmac_sha1(secret: &str, parts: &[&[u8]]) -> [u8; 20] {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac =
        Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The coturn REST-API credential for `user`, valid until `expiry` (Unix seconds).
pub fn turn_credential(secret: &str, expiry: u64, user: &str) -> (String, String) {
    let username = format!("{expiry}:{user}");
    let password =
        base64::engine::general_purpose::STANDARD.encode(hmac_sha1(secret, &[username.as_bytes()]));
    (username, password)
}

/// The TURN user of the clients of `network` (see the module's note): 16 hex digits of a
/// hash keyed with the secret.
fn turn_user(secret: &str, network: u128) -> String {
    let tag = hmac_sha1(secret, &[b"shoal turn user\0", &network.to_be_bytes()]);
    tag[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl IceConfig {
    /// The list for a client of `network` (its IPv4 address or IPv6 /48) at time `now`
    /// (Unix seconds): TURN's credential expires at the first multiple of the TTL at
    /// least a TTL away.
    pub fn servers_for(&self, network: u128, now: u64) -> Vec<IceServer> {
        let mut out = Vec::new();
        if !self.stun.is_empty() {
            out.push(IceServer {
                urls: self.stun.clone(),
                username: None,
                credential: None,
            });
        }
        if let (false, Some(secret)) = (self.turn.is_empty(), &self.turn_secret) {
            let ttl = self.turn_ttl_secs.max(1);
            let expiry = now.saturating_add(ttl).div_ceil(ttl).saturating_mul(ttl);
            let (username, credential) =
                turn_credential(secret, expiry, &turn_user(secret, network));
            out.push(IceServer {
                urls: self.turn.clone(),
                username: Some(username),
                credential: Some(credential),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values computed independently with Python's `hmac` and `base64` modules:
    /// `base64.b64encode(hmac.new(secret, user, hashlib.sha1).digest())`.
    #[test]
    fn credentials_match_an_independent_hmac_sha1() {
        assert_eq!(
            turn_credential("north-sea-secret", 1_700_003_600, "00000000000000ab"),
            (
                "1700003600:00000000000000ab".to_string(),
                "kTJzX6YyHS0hrnBBkokqMXw9CX8=".to_string()
            )
        );
        assert_eq!(
            turn_credential("k", 1, "0000000000000001").1,
            "m6l0rCmNZ5KAeto8fQuUdE5AiuQ="
        );
    }

    #[test]
    fn turn_is_offered_only_with_a_secret_and_expires_after_the_ttl() {
        let mut c = IceConfig {
            stun: vec!["stun:stun.example:3478".into()],
            turn: vec!["turn:turn.example:3478".into()],
            turn_secret: None,
            turn_ttl_secs: 600,
        };
        assert_eq!(c.servers_for(1, 1000).len(), 1);
        c.turn_secret = Some("s".into());
        let list = c.servers_for(1, 1000);
        assert_eq!(list.len(), 2);
        let user = list[1].username.clone().expect("a user name");
        assert!(user.starts_with("1800:"), "{user}");
        assert_eq!(
            list[1].credential,
            Some(turn_credential("s", 1800, &user[5..]).1)
        );
    }

    /// Every connection from one network gets the same TURN user name in a window of the
    /// TTL: one coturn user, whose `user-quota` then bounds what the network holds. A name
    /// per peer id gave each connection a fresh user (thousands an hour from one address,
    /// each valid for the TTL after the connection closed).
    #[test]
    fn one_network_is_one_turn_user_whose_name_hides_its_address() {
        let c = IceConfig {
            stun: vec![],
            turn: vec!["turn:turn.example:3478".into()],
            turn_secret: Some("north-sea-secret".into()),
            turn_ttl_secs: 600,
        };
        let user = |net: u128, now: u64| {
            c.servers_for(net, now)[0]
                .username
                .clone()
                .expect("a user name")
        };
        let home = 0xffff_c0a8_0001_u128;
        // Connections at 1,000 s and 1,100 s: one user, valid until 1,800 s (at least the
        // TTL away, at most twice).
        assert_eq!(user(home, 1000), user(home, 1100));
        assert!(user(home, 1000).starts_with("1800:"));
        assert!(user(home, 1201).starts_with("2400:"));
        // Another network is another user, and the name is no address (or peer id).
        assert_ne!(user(home, 1000), user(home + 1, 1000));
        let tag = &user(home, 1000)[5..];
        assert_eq!(tag.len(), 16);
        assert!(!tag.contains("c0a8"), "{tag}");
        // A TTL of 0 is taken as 1 s rather than dividing by it.
        let zero = IceConfig {
            turn_ttl_secs: 0,
            ..c.clone()
        };
        assert!(
            zero.servers_for(home, 5)[0]
                .username
                .as_deref()
                .is_some_and(|u| u.starts_with("6:"))
        );
    }
}
