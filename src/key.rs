//! Validated idempotency keys and scopes, and the record identity derived from them.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A map keyed by record ids. The ids are SHA-256 outputs, so a fast seeded hash does
/// (foldhash, seeded per process): std's SipHash was ~1.5% of a claim and its completion, which
/// look ids up in the replay cache and the syncer's set (`make bench-cpu`).
pub(crate) type IdMap<V> = std::collections::HashMap<[u8; 32], V, foldhash::fast::RandomState>;

/// The longest key accepted, in bytes (the IETF draft and Stripe both stop at 255).
pub const MAX_KEY_LEN: usize = 255;
/// The longest scope accepted, in bytes.
pub const MAX_SCOPE_LEN: usize = 1024;

/// A client's `Idempotency-Key`, checked: 1 to 255 bytes of printable ASCII (`0x20..=0x7E`),
/// with no space at either end.
///
/// ```
/// use idempotency_rs::IdempotencyKey;
/// assert!(IdempotencyKey::new("7f9c2e5a-0a4b-4f0e-9d1c-3c2b1a0f9e8d").is_ok());
/// assert!(IdempotencyKey::new("").is_err());
/// assert!(IdempotencyKey::new("caf\u{e9}").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Checks `key` and wraps it.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] when the key is empty, longer than [`MAX_KEY_LEN`] bytes, holds a
    /// byte outside printable ASCII, or starts or ends with a space.
    pub fn new(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        validate_key(key.as_bytes())?;
        Ok(IdempotencyKey(key))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks raw key bytes without allocating (what [`IdempotencyKey::new`] runs).
///
/// # Errors
/// As [`IdempotencyKey::new`].
pub fn validate_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidKey {
            reason: "the key is empty",
        });
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::InvalidKey {
            reason: "the key is longer than 255 bytes",
        });
    }
    if !key.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(Error::InvalidKey {
            reason: "the key holds a byte outside printable ASCII",
        });
    }
    if key[0] == b' ' || key[key.len() - 1] == b' ' {
        return Err(Error::InvalidKey {
            reason: "the key starts or ends with a space",
        });
    }
    Ok(())
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey").field(&self.0).finish()
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for IdempotencyKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for IdempotencyKey {
    type Error = Error;
    fn try_from(value: &str) -> Result<Self> {
        IdempotencyKey::new(value)
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        IdempotencyKey::new(value)
    }
}

/// Checks a scope: at most [`MAX_SCOPE_LEN`] bytes and no NUL byte. The empty scope is allowed
/// (one global namespace).
///
/// # Errors
/// [`Error::InvalidScope`].
pub fn validate_scope(scope: &str) -> Result<()> {
    if scope.len() > MAX_SCOPE_LEN {
        return Err(Error::InvalidScope {
            reason: "the scope is longer than 1024 bytes",
        });
    }
    if scope.as_bytes().contains(&0) {
        return Err(Error::InvalidScope {
            reason: "the scope holds a NUL byte",
        });
    }
    Ok(())
}

/// The 32-byte primary key of a record: SHA-256 over a domain tag, the scope's length, the scope
/// and the key. The length prefix keeps `("ab", "c")` and `("a", "bc")` apart.
pub(crate) fn record_id(scope: &str, key: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"idempotency-rs/record/v1\0");
    h.update((scope.len() as u64).to_be_bytes());
    h.update(scope.as_bytes());
    h.update(key.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bounds() {
        assert!(IdempotencyKey::new("a").is_ok());
        assert!(IdempotencyKey::new("a".repeat(255)).is_ok());
        assert!(IdempotencyKey::new("a".repeat(256)).is_err());
        assert!(IdempotencyKey::new("").is_err());
        assert!(IdempotencyKey::new(" a").is_err());
        assert!(IdempotencyKey::new("a b").is_ok());
        assert!(IdempotencyKey::new("a\tb").is_err());
        assert!(IdempotencyKey::new("a\u{7f}").is_err());
        assert!(IdempotencyKey::new("ключ").is_err());
    }

    #[test]
    fn record_id_separates_scope_and_key() {
        assert_ne!(record_id("ab", "c"), record_id("a", "bc"));
        assert_eq!(record_id("a", "b"), record_id("a", "b"));
    }

    #[test]
    fn scope_bounds() {
        assert!(validate_scope("").is_ok());
        assert!(validate_scope(&"s".repeat(1024)).is_ok());
        assert!(validate_scope(&"s".repeat(1025)).is_err());
        assert!(validate_scope("a\0b").is_err());
    }
}
