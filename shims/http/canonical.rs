//! Canonical JSON: the same document always gives the same bytes, whatever the key order.

use serde_json::Value;

/// Re-encodes a JSON document canonically: object keys sorted by their UTF-8 bytes, no
/// insignificant white space, numbers and strings as serde_json prints them. Returns `None`
/// when `bytes` is not one valid JSON document.
///
/// The order is produced here, not left to `serde_json::Map`, so the result does not change
/// if another crate in the build turns on serde_json's `preserve_order` feature.
///
/// ```
/// use idempotency_rs::http::canonical_json;
/// assert_eq!(
///     canonical_json(br#"{ "b": 1, "a": [true, {"d": null, "c": "x"}] }"#).unwrap(),
///     br#"{"a":[true,{"c":"x","d":null}],"b":1}"#.to_vec()
/// );
/// assert!(canonical_json(b"{").is_none());
/// ```
pub fn canonical_json(bytes: &[u8]) -> Option<Vec<u8>> {
    let value: Value = serde_json::from_slice(bytes).ok()?;
    let mut out = Vec::with_capacity(bytes.len());
    write_canonical(&value, &mut out);
    Some(out)
}

/// Canonical bytes of an already parsed value (see [`canonical_json`]).
pub fn canonical_value(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(k, out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        Value::String(s) => write_string(s, out),
        // Scalars: serde_json's own encoding is already unique for a parsed value.
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(Value::String(s.to_owned()).to_string().as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_space_do_not_matter() {
        let a = canonical_json(br#"{"x":1,"y":{"b":2,"a":[1,2]}}"#).unwrap();
        let b = canonical_json(b"{ \"y\" : {\"a\":[1, 2],\"b\":2}, \"x\":1 }\n").unwrap();
        assert_eq!(a, b);
        let c = canonical_json(br#"{"x":1,"y":{"b":2,"a":[2,1]}}"#).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn escapes_are_normalised() {
        assert_eq!(
            canonical_json(br#""\u0041\n""#).unwrap(),
            canonical_json(b"\"A\\n\"").unwrap()
        );
    }

    /// Found by the `canonical_json` fuzz target: without serde_json's `float_roundtrip`
    /// feature a long number parsed 1 ULP off, so canonicalising the canonical form changed it
    /// (and two spellings of one number could get different fingerprints).
    #[test]
    fn floats_round_trip_exactly() {
        let once = canonical_json(b"[123456789012345678901890, 1.2345678901234567e+23]").unwrap();
        assert_eq!(
            String::from_utf8(once.clone()).unwrap(),
            "[1.2345678901234569e+23,1.2345678901234567e+23]"
        );
        assert_eq!(canonical_json(&once).unwrap(), once);
    }

    #[test]
    fn idempotent() {
        let once = canonical_json(br#"{"b":[{"z":1,"a":"\u00e9"}],"a":-0.5e3}"#).unwrap();
        assert_eq!(canonical_json(&once).unwrap(), once);
    }
}
