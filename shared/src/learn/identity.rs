//! Peer identity: an ed25519 key pair. Browsers keep the secret seed in storage across
//! visits; native peers in a key file. Every update a peer sends is signed with it.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use thiserror::Error;

/// A peer's public key: who signed an update.
pub type PublicKey = [u8; 32];

/// First line of a key file.
const KEY_FILE_HEADER: &str = "shoal-ed25519-secret-v1";

/// Why a stored key was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdentityError {
    /// Not a Shoal key file.
    #[error("not a Shoal key file (expected a first line `{KEY_FILE_HEADER}`)")]
    Header,
    /// The seed is not 64 hex digits.
    #[error("the secret must be 64 hex digits")]
    Seed,
}

/// A signing identity.
#[derive(Clone)]
pub struct Identity(SigningKey);

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", hex(&self.public()))
    }
}

impl Identity {
    /// The identity whose secret seed is `seed` (32 random bytes from the platform's
    /// secure generator: `crypto.getRandomValues` in a browser, the OS natively).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// The public key.
    pub fn public(&self) -> PublicKey {
        self.0.verifying_key().to_bytes()
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }

    /// The key file's text: a header line and the seed in hex.
    pub fn to_key_file(&self) -> String {
        format!("{KEY_FILE_HEADER}\n{}\n", hex(self.0.as_bytes()))
    }

    /// Reads a key file written by [`to_key_file`](Self::to_key_file).
    pub fn from_key_file(text: &str) -> Result<Self, IdentityError> {
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some(KEY_FILE_HEADER) {
            return Err(IdentityError::Header);
        }
        let seed = lines.next().map(str::trim).ok_or(IdentityError::Seed)?;
        Ok(Self::from_seed(parse_seed(seed)?))
    }
}

/// The identity in the key file at `path`, or a new one from `seed()` written there
/// (readable by its owner only) when there is none; says whether it was created.
#[cfg(not(target_arch = "wasm32"))]
pub fn load_or_create(
    path: &std::path::Path,
    seed: impl FnOnce() -> std::io::Result<[u8; 32]>,
) -> std::io::Result<(Identity, bool)> {
    let invalid = |e: IdentityError| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    };
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((Identity::from_key_file(&text).map_err(invalid)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Written whole and synced under another name, then linked into place (which
            // fails if another process made one meanwhile: that one is used), then the
            // folder synced: a crash never leaves an empty or half-written key file.
            let id = Identity::from_seed(seed()?);
            let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&tmp)?;
            std::io::Write::write_all(&mut f, id.to_key_file().as_bytes())?;
            f.sync_all()?;
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(path)?;
                    return Ok((Identity::from_key_file(&text).map_err(invalid)?, false));
                }
                Err(e) => return Err(e),
            }
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok((id, true))
        }
        Err(e) => Err(e),
    }
}

/// Parses 64 hex digits.
pub fn parse_seed(text: &str) -> Result<[u8; 32], IdentityError> {
    if text.len() != 64 || !text.is_ascii() {
        return Err(IdentityError::Seed);
    }
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| IdentityError::Seed)?;
    }
    Ok(seed)
}

/// Whether `sig` is `key`'s signature of `msg` (strict verification: no malleable or
/// weak-key signatures).
pub fn verify(key: &PublicKey, msg: &[u8], sig: &[u8; 64]) -> bool {
    VerifyingKey::from_bytes(key)
        .is_ok_and(|k| k.verify_strict(msg, &Signature::from_bytes(sig)).is_ok())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_the_signed_message_and_key() {
        let a = Identity::from_seed([1; 32]);
        let b = Identity::from_seed([2; 32]);
        let sig = a.sign(b"round 7");
        assert!(verify(&a.public(), b"round 7", &sig));
        assert!(!verify(&a.public(), b"round 8", &sig));
        assert!(!verify(&b.public(), b"round 7", &sig));
        let mut bad = sig;
        bad[10] ^= 1;
        assert!(!verify(&a.public(), b"round 7", &bad));
        assert!(!verify(&[0xff; 32], b"round 7", &sig), "not a curve point");
    }

    #[test]
    fn key_files_round_trip_and_garbage_is_refused() {
        let a = Identity::from_seed([9; 32]);
        let text = a.to_key_file();
        assert_eq!(
            Identity::from_key_file(&text).map(|i| i.public()),
            Ok(a.public())
        );
        assert_eq!(
            Identity::from_key_file("hello\n00").map(|i| i.public()),
            Err(IdentityError::Header)
        );
        let short = format!("{KEY_FILE_HEADER}\nabcd\n");
        assert_eq!(
            Identity::from_key_file(&short).map(|i| i.public()),
            Err(IdentityError::Seed)
        );
        let nonhex = format!("{KEY_FILE_HEADER}\n{}\n", "zz".repeat(32));
        assert_eq!(
            Identity::from_key_file(&nonhex).map(|i| i.public()),
            Err(IdentityError::Seed)
        );
    }
}
