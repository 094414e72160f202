//! Canonical JSON: the same document always gives the same bytes, whatever the key order and
//! white space, and two documents that differ in any value give different bytes.

use serde::de::IgnoredAny;

/// Re-encodes a JSON document canonically: object members sorted by their keys' UTF-8 bytes (a
/// key that appears twice keeps both members, in their order: `{"a":1,"a":2}` is not `{"a":2}`,
/// which serde_json's `Value` would make of it, because a server that refuses duplicate fields
/// answers the two differently), no insignificant white space,
/// strings in serde_json's escaping, and **numbers exactly as written**. Returns `None` when
/// `bytes` is not one valid JSON document (serde_json decides that).
///
/// Numbers are not parsed into floats or integers: `18446744073709551616` and
/// `18446744073709551617`, or two decimals that round to the same `f64`, stay different, so
/// the requests that carry them get different fingerprints. For the same reason two spellings
/// of one value (`1`, `1.0`, `1e0`) stay different too: a server may read them differently (a
/// `u32` field refuses `1.0`), and a retry sends the same text anyway.
///
/// The order is produced here, not left to `serde_json::Map`, so the result does not change
/// if another crate in the build turns on serde_json's `preserve_order` feature; and numbers
/// are copied as text, so it does not change with `arbitrary_precision` either.
///
/// ```
/// use idempotency_rs::contract::canonical_json;
/// assert_eq!(
///     canonical_json(br#"{ "b": 1, "a": [true, {"d": null, "c": "x"}] }"#).unwrap(),
///     br#"{"a":[true,{"c":"x","d":null}],"b":1}"#.to_vec()
/// );
/// assert_ne!(
///     canonical_json(br#"{"account":18446744073709551616}"#),
///     canonical_json(br#"{"account":18446744073709551617}"#)
/// );
/// assert!(canonical_json(b"{").is_none());
/// ```
pub fn canonical_json(bytes: &[u8]) -> Option<Vec<u8>> {
    // JSON is UTF-8 text (serde_json's `IgnoredAny` does not look inside strings), and
    // serde_json decides the grammar; the writer below then only meets valid documents, and
    // still answers `None` rather than panic if it did not. A number beyond f64's range
    // (`1e400`) is valid JSON: it is kept as written, where `serde_json::Value` refuses it.
    let text = std::str::from_utf8(bytes).ok()?;
    serde_json::from_str::<IgnoredAny>(text).ok()?;
    let mut reader = Reader {
        bytes,
        at: 0,
        depth: 0,
        members: Vec::new(),
        scratch: Vec::new(),
    };
    let mut out = Vec::with_capacity(bytes.len());
    reader.value(&mut out)?;
    reader.skip_ws();
    (reader.at == bytes.len()).then_some(out)
}

/// Canonical bytes of an already parsed value (see [`canonical_json`]).
///
/// A [`serde_json::Value`] has already lost whatever its numbers did not fit (without
/// serde_json's `arbitrary_precision`, integers beyond 64 bits and decimals beyond `f64`), so
/// canonicalise the request's bytes with [`canonical_json`] where you have them.
pub fn canonical_value(value: &serde_json::Value) -> Vec<u8> {
    let text = serde_json::to_vec(value).unwrap_or_default();
    canonical_json(&text).unwrap_or(text)
}

/// serde_json's nesting limit (its `Value` refuses a document nested this deep; its
/// `IgnoredAny` does not check).
const MAX_DEPTH: usize = 128;

/// A cursor over a document serde_json has accepted.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// Arrays and objects open at the cursor.
    depth: usize,
    /// The members of the objects open at the cursor, each object's above its parent's (one
    /// allocation for the whole document, not one per member).
    members: Vec<Member>,
    /// Where an object whose members are out of order is copied to be written back sorted.
    scratch: Vec<u8>,
}

/// A member of an object, written in document order at `start..end` of the output: its key
/// token, `:` and its canonical value.
struct Member {
    key: Key,
    start: usize,
    end: usize,
}

/// What a member is sorted by: its key's UTF-8 bytes.
enum Key {
    /// A key token without escapes: the bytes between its quotes (`at..end` of the document)
    /// are the key, and the token is already in serde_json's escaping.
    Plain(usize, usize),
    /// A key with escapes, decoded.
    Decoded(String),
}

impl Key {
    fn bytes<'k>(&'k self, doc: &'k [u8]) -> &'k [u8] {
        match self {
            Key::Plain(at, end) => &doc[*at..*end],
            Key::Decoded(key) => key.as_bytes(),
        }
    }
}

impl<'a> Reader<'a> {
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.bytes.get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// Writes the canonical form of the value at the cursor.
    fn value(&mut self, out: &mut Vec<u8>) -> Option<()> {
        match self.peek()? {
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth >= MAX_DEPTH {
                    return None;
                }
                let done = if self.bytes[self.at] == b'{' {
                    self.object(out)
                } else {
                    self.array(out)
                };
                self.depth -= 1;
                done
            }
            b'"' => {
                let raw = self.string_token()?;
                write_string(raw, out)
            }
            // A number or a literal: copied as written.
            _ => {
                let start = self.at;
                while let Some(b) = self.bytes.get(self.at) {
                    if !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E' | b'a'..=b'z') {
                        break;
                    }
                    self.at += 1;
                }
                (self.at > start).then(|| out.extend_from_slice(&self.bytes[start..self.at]))
            }
        }
    }

    fn array(&mut self, out: &mut Vec<u8>) -> Option<()> {
        self.expect(b'[')?;
        out.push(b'[');
        if self.peek()? == b']' {
            self.at += 1;
            out.push(b']');
            return Some(());
        }
        loop {
            self.value(out)?;
            match self.peek()? {
                b',' => {
                    self.at += 1;
                    out.push(b',');
                }
                b']' => {
                    self.at += 1;
                    out.push(b']');
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Writes the object's members in document order, then, if their keys are not already in
    /// order, sorts them in place: stably, so that members with one key keep their order.
    fn object(&mut self, out: &mut Vec<u8>) -> Option<()> {
        self.expect(b'{')?;
        out.push(b'{');
        let base = self.members.len();
        let result = self.read_members(out, base);
        if result.is_some() {
            self.sort_members(out, base);
        }
        self.members.truncate(base);
        out.push(b'}');
        result
    }

    fn read_members(&mut self, out: &mut Vec<u8>, base: usize) -> Option<()> {
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            if self.members.len() > base {
                out.push(b',');
            }
            let start = out.len();
            let token = self.string_token()?;
            let key = if token.contains(&b'\\') {
                let key = decode_string(token)?;
                // serde_json's escaping of the decoded key: what `write_string` gives its token.
                serde_json::to_writer(&mut *out, &key).ok()?;
                Key::Decoded(key)
            } else {
                out.extend_from_slice(token);
                Key::Plain(self.at - token.len() + 1, self.at - 1)
            };
            self.expect(b':')?;
            out.push(b':');
            self.value(out)?;
            let end = out.len();
            self.members.push(Member { key, start, end });
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Rewrites the members above `base`, written in document order, in the order of their keys.
    fn sort_members(&mut self, out: &mut Vec<u8>, base: usize) {
        let doc = self.bytes;
        let members = &mut self.members[base..];
        if members
            .windows(2)
            .all(|w| w[0].key.bytes(doc) <= w[1].key.bytes(doc))
        {
            return;
        }
        let Some(first) = members.first().map(|m| m.start) else {
            return;
        };
        self.scratch.clear();
        self.scratch.extend_from_slice(&out[first..]);
        out.truncate(first);
        // Stable: members with one key keep their order.
        members.sort_by(|a, b| a.key.bytes(doc).cmp(b.key.bytes(doc)));
        for (i, m) in members.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&self.scratch[m.start - first..m.end - first]);
        }
    }

    /// The string token at the cursor, quotes included.
    fn string_token(&mut self) -> Option<&'a [u8]> {
        let start = self.at;
        self.at += 1;
        loop {
            match *self.bytes.get(self.at)? {
                b'"' => {
                    self.at += 1;
                    let bytes: &'a [u8] = self.bytes;
                    return Some(&bytes[start..self.at]);
                }
                b'\\' => self.at += 2,
                _ => self.at += 1,
            }
        }
    }
}

fn decode_string(raw: &[u8]) -> Option<String> {
    if !raw.contains(&b'\\') {
        return std::str::from_utf8(&raw[1..raw.len() - 1])
            .ok()
            .map(str::to_owned);
    }
    serde_json::from_slice(raw).ok()
}

/// A string token in serde_json's escaping: `"` and `\` escaped, control characters as `\n`,
/// `\t`, ... or `\u00XX`, everything else (non-ASCII included) as UTF-8. A token without a
/// backslash is already in that form (a valid one holds no `"` nor control character).
fn write_string(raw: &[u8], out: &mut Vec<u8>) -> Option<()> {
    if !raw.contains(&b'\\') {
        out.extend_from_slice(raw);
        return Some(());
    }
    serde_json::to_writer(&mut *out, &decode_string(raw)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The bytes against the implementation before issue #18 (whose output is in stored
    // fingerprints): tests/layer_inputs.rs, which keeps it as the oracle.

    fn canon(s: &str) -> String {
        String::from_utf8(canonical_json(s.as_bytes()).unwrap()).unwrap()
    }

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
        assert_eq!(canon(r#""\u0041\n""#), canon("\"A\\n\""));
        assert_eq!(canon(r#"{"\u00e9":"\u00e9"}"#), "{\"é\":\"é\"}");
        assert_eq!(canon(r#""\/""#), r#""/""#);
        assert_eq!(canon(r#""\ud83d\ude00""#), "\"😀\"");
        assert_eq!(canon(r#""\u001f""#), r#""\u001f""#);
        // Keys are sorted by their decoded bytes, whatever their escapes.
        assert_eq!(canon(r#"{"b":1,"\u0061":2}"#), r#"{"a":2,"b":1}"#);
    }

    /// Issue #13, item 4: canonical JSON went through `serde_json::Value` without
    /// `arbitrary_precision`, so integers beyond 64 bits and decimals beyond `f64` collapsed,
    /// and two requests for different accounts got one fingerprint.
    #[test]
    fn numbers_that_differ_stay_different() {
        for (a, b) in [
            (
                r#"{"account":18446744073709551616}"#,
                r#"{"account":18446744073709551617}"#,
            ),
            (
                r#"{"n":-9223372036854775809}"#,
                r#"{"n":-9223372036854775810}"#,
            ),
            (r#"[0.1000000000000000055511151231257827]"#, "[0.1]"),
            ("[1.00000000000000001]", "[1.00000000000000002]"),
            ("[1e400]", "[1e401]"),
            ("[1]", "[1.0]"),
            ("[0]", "[-0]"),
        ] {
            assert_ne!(canon(a), canon(b), "{a} and {b}");
        }
        assert_eq!(
            canon(r#"{ "account" : 18446744073709551617 }"#),
            r#"{"account":18446744073709551617}"#
        );
        assert_eq!(canon("[1.5E+3, -0.0, 12e-7]"), "[1.5E+3,-0.0,12e-7]");
    }

    #[test]
    fn a_repeated_key_keeps_every_member_in_order() {
        assert_eq!(canon(r#"{"a":1,"b":0,"a":2}"#), r#"{"a":1,"a":2,"b":0}"#);
        assert_eq!(canon(r#"{"b":0,"a":2,"a":1}"#), r#"{"a":2,"a":1,"b":0}"#);
        assert_eq!(canon(r#"{"a":1,"\u0061":2}"#), r#"{"a":1,"a":2}"#);
        assert_ne!(canon(r#"{"a":1,"a":2}"#), canon(r#"{"a":2}"#));
    }

    #[test]
    fn what_serde_json_refuses_is_refused() {
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\" 1}",
            "01",
            "1.",
            ".5",
            "+1",
            "NaN",
            "[1] x",
            "\"\\x\"",
            "\"\u{1}\"",
            "{\"a\":1,}",
            "\"\\ud800\"",
        ] {
            assert_eq!(canonical_json(bad.as_bytes()), None, "{bad:?} was accepted");
        }
        for depth in [127, 128, 200] {
            let deep = "[".repeat(depth) + &"]".repeat(depth);
            let value = serde_json::from_str::<serde_json::Value>(&deep);
            assert_eq!(
                canonical_json(deep.as_bytes()).is_some(),
                value.is_ok(),
                "depth {depth}"
            );
        }
        assert!(canonical_json(("[".repeat(127) + &"]".repeat(127)).as_bytes()).is_some());
        // Not UTF-8 inside a string.
        assert_eq!(canonical_json(b"\"\xb3\""), None);
        assert_eq!(canonical_json(b"{\"\xff\":1}"), None);
    }

    /// Found by the `canonical_json` fuzz target when numbers went through f64: a long number
    /// parsed 1 ULP off, so canonicalising the canonical form changed it. Kept as written now,
    /// the form is a fixed point by construction.
    #[test]
    fn floats_round_trip_exactly() {
        let once = canonical_json(b"[123456789012345678901890, 1.2345678901234567e+23]").unwrap();
        assert_eq!(
            String::from_utf8(once.clone()).unwrap(),
            "[123456789012345678901890,1.2345678901234567e+23]"
        );
        assert_eq!(canonical_json(&once).unwrap(), once);
    }

    #[test]
    fn idempotent() {
        let once = canonical_json(br#"{"b":[{"z":1,"a":"\u00e9"}],"a":-0.5e3}"#).unwrap();
        assert_eq!(canonical_json(&once).unwrap(), once);
        assert_eq!(
            String::from_utf8(once).unwrap(),
            r#"{"a":-0.5e3,"b":[{"a":"é","z":1}]}"#
        );
    }
}
