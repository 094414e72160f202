//! Request fingerprints: SHA-256 over what makes two requests "the same".

use std::fmt;

use sha2::{Digest, Sha256};

/// A 32-byte SHA-256 digest identifying a request's content. Two requests with the same scope
/// and key but different fingerprints are a [`Mismatch`](crate::ClaimOutcome::Mismatch).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Wraps a digest computed elsewhere.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }

    /// The fingerprint of an HTTP request: method, path (with query string) and body bytes.
    /// Each part is length-prefixed, so no two different triples share a digest by
    /// concatenation.
    ///
    /// ```
    /// use idempotency_rs::Fingerprint;
    /// let a = Fingerprint::of_request("POST", "/orders", b"{\"qty\":1}");
    /// let b = Fingerprint::of_request("POST", "/orders", b"{\"qty\":2}");
    /// assert_ne!(a, b);
    /// ```
    pub fn of_request(method: &str, path: &str, body: &[u8]) -> Self {
        Self::of_parts(&[method.as_bytes(), path.as_bytes(), body])
    }

    /// The fingerprint of any sequence of byte strings (each is length-prefixed).
    pub fn of_parts(parts: &[&[u8]]) -> Self {
        let mut h = Sha256::new();
        h.update(b"idempotency-rs/fingerprint/v1\0");
        for p in parts {
            h.update((p.len() as u64).to_be_bytes());
            h.update(p);
        }
        Fingerprint(h.finalize().into())
    }

    /// The raw digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_length_prefixed() {
        assert_ne!(
            Fingerprint::of_parts(&[b"ab", b"c"]),
            Fingerprint::of_parts(&[b"a", b"bc"])
        );
        assert_ne!(
            Fingerprint::of_request("POST", "/a", b""),
            Fingerprint::of_request("PATCH", "/a", b"")
        );
    }
}
