//! Formatting without dependencies: RFC 3339 times, durations (parsed and shown), byte sizes,
//! hex, and text that is safe to print on a terminal.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest duration accepted on the command line: a hundred years.
const MAX_DURATION_MS: u128 = 100 * 365 * 86_400_000;

/// Parses `500ms`, `30s`, `5m`, `2h`, `1d`, or several of them run together (`1h30m`).
/// Whole numbers only, and a unit is required.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let help = "expected a whole number followed by a unit (ms, s, m, h or d), e.g. 500ms, 30s, 5m, 2h or 1h30m";
    let s = text.trim();
    if s.is_empty() {
        return Err(format!("an empty duration: {help}"));
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("`{text}` is not a duration: {help}"));
        }
        let (number, after) = rest.split_at(digits);
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(letters);
        let factor: u128 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" if after.starts_with('.') || after.starts_with(',') => {
                return Err(format!(
                    "`{text}` is not a duration: whole numbers only (write 1500ms, not 1.5s)"
                ));
            }
            "" => {
                return Err(format!("`{text}` has no unit: {help}"));
            }
            other => {
                return Err(format!("`{text}`: unknown unit `{other}`: {help}"));
            }
        };
        // More than 39 digits cannot be a u128; anything that long is over the cap anyway.
        let n: u128 = number
            .parse()
            .map_err(|_| format!("`{text}` is too long (at most 100 years)"))?;
        total = n
            .checked_mul(factor)
            .and_then(|ms| total.checked_add(ms))
            .filter(|&t| t <= MAX_DURATION_MS)
            .ok_or_else(|| format!("`{text}` is too long (at most 100 years)"))?;
        rest = after;
    }
    // At most MAX_DURATION_MS, so it fits.
    Ok(Duration::from_millis(
        u64::try_from(total).unwrap_or(u64::MAX),
    ))
}

/// A duration for people: `850ms`, `12.3s`, `5m 03s`, `2h 05m`, `3d 04h`.
pub(crate) fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    if ms < 60_000 {
        return format!("{}.{}s", ms / 1_000, (ms % 1_000) / 100);
    }
    let s = ms / 1_000;
    if s < 3_600 {
        return format!("{}m {:02}s", s / 60, s % 60);
    }
    if s < 86_400 {
        return format!("{}h {:02}m", s / 3_600, (s % 3_600) / 60);
    }
    format!("{}d {:02}h", s / 86_400, (s % 86_400) / 3_600)
}

/// Milliseconds since the epoch (negative before it).
pub(crate) fn epoch_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// RFC 3339 in UTC with milliseconds: `2025-06-01T10:00:00.123Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    rfc3339_ms(epoch_ms(t))
}

/// [`rfc3339`] of milliseconds since the epoch.
pub(crate) fn rfc3339_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, min, s, milli) = (
        in_day / 3_600_000,
        (in_day / 60_000) % 60,
        (in_day / 1_000) % 60,
        in_day % 1_000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// Howard Hinnant's `civil_from_days`: the proleptic Gregorian date `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `t` relative to `now`: `12.3s ago` or `in 5m 03s`.
pub(crate) fn relative(t: SystemTime, now: SystemTime) -> String {
    match now.duration_since(t) {
        Ok(ago) => format!("{} ago", duration(ago)),
        Err(e) => format!("in {}", duration(e.duration())),
    }
}

/// `t` in RFC 3339 with how long ago (or how far ahead) it is.
pub(crate) fn when(t: SystemTime, now: SystemTime) -> String {
    format!("{} ({})", rfc3339(t), relative(t, now))
}

/// `4096 bytes (4.0 KiB)`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{n} bytes ({value:.1} {})", UNITS[unit])
}

/// Lower-case hex.
pub(crate) fn hex(data: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(data.len() * 2);
    for b in data {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// A hex dump, 16 bytes a line: offset, bytes, and the printable ASCII ones.
pub(crate) fn hex_dump(data: &[u8]) -> String {
    let mut out = String::new();
    for (i, line) in data.chunks(16).enumerate() {
        let mut hexes = String::new();
        for (j, b) in line.iter().enumerate() {
            if j == 8 {
                hexes.push(' ');
            }
            hexes.push_str(&hex(&[*b]));
            hexes.push(' ');
        }
        let ascii: String = line
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    char::from(b)
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!("{:08x}  {hexes:<49} |{ascii}|\n", i * 16));
    }
    out
}

/// Characters that would let stored text move the cursor, rewrite the terminal or reorder
/// what is shown: control characters (tab and line breaks aside) and the bidirectional and
/// zero-width formatting characters.
fn unsafe_char(c: char) -> bool {
    (c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
        || matches!(
            c,
            '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}'
        )
}

/// The data as text when it is valid UTF-8 with nothing a terminal would interpret (a
/// carriage return only as part of a CRLF line break: alone, it lets a line overwrite itself).
pub(crate) fn printable(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok().filter(|s| {
        !s.chars().any(unsafe_char)
            && s.match_indices('\r')
                .all(|(i, _)| s[i + 1..].starts_with('\n'))
    })
}

/// A name (scope, key) as it can be shown in a line or a table: as is when it is non-empty and
/// holds only visible characters, else quoted with escapes (`"a b"`, `"line\n"`, `""`).
pub(crate) fn name(s: &str) -> String {
    if !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || unsafe_char(c)) {
        s.to_owned()
    } else {
        format!("{s:?}")
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_carriage_return_is_not_printable() {
        assert_eq!(printable(b"a\r\nb"), Some("a\r\nb"));
        assert_eq!(printable(b"paid\rrefunded"), None);
        assert_eq!(printable(b"end\r"), None);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            " ",
            "garbage",
            "5",
            "1.5s",
            "5y",
            "s",
            "-5s",
            "5 s",
            "1h-",
            "ms5",
            "99999999999999999999999999999999999999999999d",
            "36501d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn times_format() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(253_402_300_799_000), "9999-12-31T23:59:59.000Z");
        // Never a panic, whatever the value.
        let _ = rfc3339_ms(i64::MAX);
        let _ = rfc3339_ms(i64::MIN);
    }

    #[test]
    fn text_is_shown_safely() {
        assert_eq!(printable(b"{\"a\":1}\n"), Some("{\"a\":1}\n"));
        assert_eq!(printable(b"\x1b[2J"), None);
        assert_eq!(printable(b"\xff"), None);
        assert_eq!(printable("a\u{202e}b".as_bytes()), None);
        assert_eq!(name("order-1"), "order-1");
        assert_eq!(name("a b"), "\"a b\"");
        assert_eq!(name(""), "\"\"");
        assert_eq!(name("x\n"), "\"x\\n\"");
        assert_eq!(prefix("héllo", 2), "h");
        assert_eq!(duration(Duration::from_millis(65_000)), "1m 05s");
        assert_eq!(bytes(4096), "4096 bytes (4.0 KiB)");
    }
}
