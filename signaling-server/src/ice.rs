//! The ICE server list handed to every peer, including TURN with time-limited credentials
//! in the REST scheme of coturn's `use-auth-secret`: the user name is `expiry:peer`
//! (expiry in Unix seconds) and the password is `base64(HMAC-SHA1(secret, username))`,
//! which coturn verifies with the same shared secret without any per-user state.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use shoal_shared::protocol::{IceServer, PeerId};

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

/// The coturn REST-API credential for `peer`, valid until `expiry` (Unix seconds).
pub fn turn_credential(secret: &str, expiry: u64, peer: PeerId) -> (String, String) {
    let username = format!("{expiry}:{peer}");
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac =
        Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (username, password)
}

impl IceConfig {
    /// The list for one peer at time `now` (Unix seconds).
    pub fn servers_for(&self, peer: PeerId, now: u64) -> Vec<IceServer> {
        let mut out = Vec::new();
        if !self.stun.is_empty() {
            out.push(IceServer {
                urls: self.stun.clone(),
                username: None,
                credential: None,
            });
        }
        if let (false, Some(secret)) = (self.turn.is_empty(), &self.turn_secret) {
            let (username, credential) = turn_credential(secret, now + self.turn_ttl_secs, peer);
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
            turn_credential("north-sea-secret", 1_700_003_600, PeerId(0xab)),
            (
                "1700003600:00000000000000ab".to_string(),
                "kTJzX6YyHS0hrnBBkokqMXw9CX8=".to_string()
            )
        );
        assert_eq!(
            turn_credential("k", 1, PeerId(1)).1,
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
        assert_eq!(c.servers_for(PeerId(1), 1000).len(), 1);
        c.turn_secret = Some("s".into());
        let list = c.servers_for(PeerId(1), 1000);
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].username.as_deref(), Some("1600:0000000000000001"));
    }
}
