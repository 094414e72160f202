//! The stored response: framework-neutral, so every shim can replay it.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A header (or trailer) list: names and raw values, in order, duplicates allowed.
pub type HeaderList = Vec<(String, Vec<u8>)>;

/// What a completed operation answered, stored for replay.
///
/// It holds no `http` crate types: the HTTP status as `u16`, headers as name/value byte pairs,
/// the body, and (for gRPC) the trailers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredResponse {
    /// The status code (an HTTP status; gRPC shims store 200 and put `grpc-status` in trailers).
    pub status: u16,
    /// Response headers, in order.
    pub headers: HeaderList,
    /// The full response body.
    pub body: Vec<u8>,
    /// Trailers, when the protocol has them (gRPC). `None` and `Some(vec![])` are kept apart.
    pub trailers: Option<HeaderList>,
}

impl StoredResponse {
    /// A response with a status and a body and no headers.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        StoredResponse {
            status,
            headers: Vec::new(),
            body: body.into(),
            trailers: None,
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the trailers.
    pub fn with_trailers(mut self, trailers: HeaderList) -> Self {
        self.trailers = Some(trailers);
        self
    }

    /// The stored size: body plus header and trailer names and values.
    pub fn size(&self) -> usize {
        let list = |l: &HeaderList| l.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>();
        self.body.len() + list(&self.headers) + self.trailers.as_ref().map_or(0, list)
    }
}

#[derive(Serialize, Deserialize)]
struct Wire<'a>(#[serde(borrow)] Vec<(&'a str, &'a [u8])>);

/// Encodes a header list for its column: postcard (a documented, maintained, compact format)
/// over a sequence of (name, value) pairs.
#[cfg(any(feature = "postgres", test))]
pub(crate) fn encode_headers(list: &HeaderList) -> Vec<u8> {
    let mut out = Vec::new();
    encode_headers_into(list, &mut out);
    out
}

/// [`encode_headers`] into `out` (cleared first), so that the writer reuses one buffer: the
/// same bytes as [`Wire`], without building its list first.
pub(crate) fn encode_headers_into(list: &HeaderList, out: &mut Vec<u8>) {
    struct Pairs<'a>(&'a HeaderList);
    impl Serialize for Pairs<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().map(|(n, v)| (n.as_str(), v.as_slice())))
        }
    }
    let mut buf = std::mem::take(out);
    buf.clear();
    buf.reserve(
        list.iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum::<usize>()
            + 2,
    );
    // Serialising borrowed strings and byte slices into a Vec cannot fail.
    if let Ok(buf) = postcard::to_extend(&Pairs(list), buf) {
        *out = buf;
    }
}

/// Decodes a header list column. Anything but a complete, valid encoding is
/// [`Error::Corrupt`]; it never panics.
pub fn decode_headers(bytes: &[u8]) -> Result<HeaderList> {
    let (wire, rest): (Wire<'_>, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|e| Error::Corrupt {
            detail: format!("header list does not decode: {e}"),
        })?;
    if !rest.is_empty() {
        return Err(Error::Corrupt {
            detail: format!("{} trailing bytes after the header list", rest.len()),
        });
    }
    Ok(wire
        .0
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v.to_vec()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let l: HeaderList = vec![
            ("content-type".into(), b"application/json".to_vec()),
            ("x-bin".into(), vec![0, 255, 10]),
            ("content-type".into(), vec![]),
        ];
        assert_eq!(decode_headers(&encode_headers(&l)).unwrap(), l);
        assert_eq!(decode_headers(&encode_headers(&vec![])).unwrap(), vec![]);
        // The same bytes as the derived encoding of `Wire` (what earlier versions stored).
        let wire = Wire(l.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect());
        assert_eq!(encode_headers(&l), postcard::to_stdvec(&wire).unwrap());
        let mut reused = vec![9u8; 3];
        encode_headers_into(&l, &mut reused);
        assert_eq!(reused, encode_headers(&l));
    }

    #[test]
    fn garbage_is_corrupt_not_panic() {
        for bad in [
            &b"\xff\xff\xff\xff\xff"[..],
            b"\x01\x05ab",
            b"\x01\x02\xc3\x28\x00",
        ] {
            assert!(matches!(decode_headers(bad), Err(Error::Corrupt { .. })));
        }
        let mut ok = encode_headers(&vec![("a".into(), b"b".to_vec())]);
        ok.push(0);
        assert!(matches!(decode_headers(&ok), Err(Error::Corrupt { .. })));
    }
}
