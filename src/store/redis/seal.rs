//! Sealed records: a credential's document is stored in Redis as
//! `tr1.{key id}.{base64url(nonce ‖ AES-256-GCM ciphertext ‖ tag)}`, with the record's own
//! key name (and the key id) bound in as associated data, so a sealed record copied onto
//! another credential's key does not open. The key id is 8 hex digits of the key's
//! SHA-256 (never the key). A record sealed with one of `previous_keys` opens and is sealed
//! again with the current key; a record that no key opens is an error naming it, and
//! nothing is written over it.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretString};

const PREFIX: &str = "tr1.";

/// One key: its id and the AEAD key.
struct SealKey {
    id: String,
    key: LessSafeKey,
}

/// The current key and the previous ones.
pub struct Sealer {
    current: SealKey,
    previous: Vec<SealKey>,
    rng: SystemRandom,
}

/// What opening a stored document gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Sealed with the current key.
    Current(String),
    /// Sealed with a previous key, or stored plain: to be sealed again with the current.
    Stale(String),
}

/// Why a stored document cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("it is sealed with key {0}, which is not store.encryption_key nor one of store.previous_keys: add that key to previous_keys (nothing in the fleet store was changed)")]
    UnknownKey(String),
    #[error("it does not open with key {0} (the record was altered, or moved from another credential's key): nothing in the fleet store was changed; re-import the credential file or sign in again")]
    DoesNotOpen(String),
    #[error("it is sealed, and no store.encryption_key is configured: set the key the fleet uses")]
    NoKey,
    #[error("it is not a sealed record tokenrelay can read")]
    Malformed,
}

/// A key as configured: 32 bytes, base64 (standard or URL-safe, padded or not).
pub fn parse_key(text: &SecretString) -> Result<[u8; 32], String> {
    let t = text.expose_secret().trim();
    let bytes = STANDARD
        .decode(t)
        .or_else(|_| URL_SAFE_NO_PAD.decode(t.trim_end_matches('=')))
        .map_err(|_| "is not base64: make one with `openssl rand -base64 32`".to_string())?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        format!(
            "is {} bytes, not 32: make one with `openssl rand -base64 32`",
            bytes.len()
        )
    })
}

fn seal_key(bytes: &[u8; 32]) -> SealKey {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let id = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // A 32-byte key is always a valid AES-256 key.
    let unbound = UnboundKey::new(&AES_256_GCM, bytes).unwrap_or_else(|_| unreachable!());
    SealKey {
        id,
        key: LessSafeKey::new(unbound),
    }
}

fn aad(record: &str, key_id: &str) -> Vec<u8> {
    format!("tokenrelay-record-v1\n{record}\n{key_id}").into_bytes()
}

impl Sealer {
    pub fn new(current: &[u8; 32], previous: &[[u8; 32]]) -> Sealer {
        Sealer {
            current: seal_key(current),
            previous: previous.iter().map(seal_key).collect(),
            rng: SystemRandom::new(),
        }
    }

    /// The current key's id (for `/readyz` and `tokenrelay check`).
    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    /// Seals `plain` for the record named `record`.
    pub fn seal(&self, plain: &str, record: &str) -> Result<String, String> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| "no randomness for a nonce".to_string())?;
        let mut data = plain.as_bytes().to_vec();
        self.current
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(record, &self.current.id)),
                &mut data,
            )
            .map_err(|_| "sealing failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!(
            "{PREFIX}{}.{}",
            self.current.id,
            URL_SAFE_NO_PAD.encode(out)
        ))
    }
}

/// Whether a stored document is sealed.
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(PREFIX)
}

/// Opens what the record named `record` holds: sealed (with any key of `sealer`), or plain
/// (written before a key was set).
pub fn open(sealer: Option<&Sealer>, stored: &str, record: &str) -> Result<Opened, SealError> {
    let Some(rest) = stored.strip_prefix(PREFIX) else {
        return Ok(match sealer {
            Some(_) => Opened::Stale(stored.to_string()),
            None => Opened::Current(stored.to_string()),
        });
    };
    let sealer = sealer.ok_or(SealError::NoKey)?;
    let (id, body) = rest.split_once('.').ok_or(SealError::Malformed)?;
    let (key, current) = if id == sealer.current.id {
        (&sealer.current, true)
    } else {
        let k = sealer
            .previous
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| SealError::UnknownKey(id.to_string()))?;
        (k, false)
    };
    let mut data = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| SealError::Malformed)?;
    if data.len() < NONCE_LEN {
        return Err(SealError::Malformed);
    }
    let sealed = data.split_off(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(&data).map_err(|_| SealError::Malformed)?;
    let mut sealed = sealed;
    let plain = key
        .key
        .open_in_place(nonce, Aad::from(aad(record, id)), &mut sealed)
        .map_err(|_| SealError::DoesNotOpen(id.to_string()))?;
    let text = String::from_utf8(plain.to_vec()).map_err(|_| SealError::Malformed)?;
    Ok(if current {
        Opened::Current(text)
    } else {
        Opened::Stale(text)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_opens_only_under_its_own_name_and_a_known_key() {
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let old = Sealer::new(&k1, &[]);
        let sealed = old
            .seal(r#"{"refresh_token":"rt-secret"}"#, "tr:{qwen/a}:rec")
            .unwrap();
        assert!(is_sealed(&sealed) && !sealed.contains("rt-secret"));
        assert!(sealed.starts_with(&format!("tr1.{}.", old.key_id())));
        // Its own name: opens; another credential's: does not.
        assert_eq!(
            open(Some(&old), &sealed, "tr:{qwen/a}:rec"),
            Ok(Opened::Current(r#"{"refresh_token":"rt-secret"}"#.into()))
        );
        assert_eq!(
            open(Some(&old), &sealed, "tr:{qwen/b}:rec"),
            Err(SealError::DoesNotOpen(old.key_id().into()))
        );
        // Rotated: the old key as a previous key opens it as stale; without it, unknown.
        let new = Sealer::new(&k2, &[k1]);
        assert!(matches!(
            open(Some(&new), &sealed, "tr:{qwen/a}:rec"),
            Ok(Opened::Stale(_))
        ));
        let only_new = Sealer::new(&k2, &[]);
        assert_eq!(
            open(Some(&only_new), &sealed, "tr:{qwen/a}:rec"),
            Err(SealError::UnknownKey(old.key_id().into()))
        );
        assert_eq!(
            open(None, &sealed, "tr:{qwen/a}:rec"),
            Err(SealError::NoKey)
        );
        // Plain (before a key was set): read, and stale once a key is.
        assert_eq!(open(None, "{}", "r"), Ok(Opened::Current("{}".into())));
        assert_eq!(open(Some(&new), "{}", "r"), Ok(Opened::Stale("{}".into())));
        // Altered: does not open.
        let mut bytes = sealed.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(bytes).unwrap();
        assert!(open(Some(&old), &altered, "tr:{qwen/a}:rec").is_err());
    }

    #[test]
    fn keys_are_32_bytes_of_base64() {
        let k = |s: &str| parse_key(&SecretString::from(s.to_string()));
        assert!(k(&STANDARD.encode([7u8; 32])).is_ok());
        assert!(k(&URL_SAFE_NO_PAD.encode([7u8; 32])).is_ok());
        assert!(k(&STANDARD.encode([7u8; 16]))
            .unwrap_err()
            .contains("16 bytes"));
        assert!(k("not base64 at all!")
            .unwrap_err()
            .contains("openssl rand"));
    }
}
