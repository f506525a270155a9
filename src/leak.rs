//! Secret detection shared by the control socket, the audit trail and the support bundle:
//! which field names and which string values look like key material, and a scanner that finds
//! given secret bytes in a response in any encoding a handler might accidentally use.
//!
//! Pure functions, called from any thread. The scanner exists for tests (here and in the
//! callers' test suites): "responses never contain key material" is checked, not trusted.
//!
//! It sits at the bottom of the crate (it depends on nothing else here) so that [`crate::audit`]
//! can redact with it without depending on the control socket.

/// Fragments of field names whose values are treated as secrets.
/// `dek`/`kek` catch fields that carry key material under a short name (`"dek": "..."`).
const SECRET_NAME_FRAGMENTS: [&str; 10] = [
    "key",
    "password",
    "passwd",
    "passphrase",
    "secret",
    "pem",
    "token",
    "private",
    "dek",
    "kek",
];

/// Shortest hex run treated as key material: 32 hex digits = 128 bits.
pub const SECRET_HEX_MIN_CHARS: usize = 32;
/// Shortest base64 run treated as key material: 40 chars = 30 bytes.
pub const SECRET_BASE64_MIN_CHARS: usize = 40;

/// Whether a field named `name` may hold a secret (case-insensitive substring match).
pub fn looks_like_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_NAME_FRAGMENTS.iter().any(|f| lower.contains(f))
}

/// Whether a string value looks like key material: a PEM block, or a token of at least
/// [`SECRET_HEX_MIN_CHARS`] hex digits, or at least [`SECRET_BASE64_MIN_CHARS`] base64
/// characters mixing letters and digits.
pub fn looks_like_secret_value(s: &str) -> bool {
    s.contains("-----BEGIN") || secret_token_ranges(s).next().is_some()
}

/// Byte ranges of `s` that are secret-looking tokens (hex or base64 runs, see
/// [`looks_like_secret_value`]).
pub fn secret_token_ranges(s: &str) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let bytes = s.as_bytes();
    let is_b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=';
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < bytes.len() {
            // Maximal run of base64 characters; a hex run is a special case of it.
            let start = i;
            while i < bytes.len() && bytes.get(i).copied().is_some_and(is_b64) {
                i += 1;
            }
            let run = bytes.get(start..i).unwrap_or(&[]);
            if run.is_empty() {
                i += 1;
                continue;
            }
            if let Some(r) = longest_hex_run(run, SECRET_HEX_MIN_CHARS) {
                return Some(start + r.start..start + r.end);
            }
            let has_digit = run.iter().any(u8::is_ascii_digit);
            let has_alpha = run.iter().any(u8::is_ascii_alphabetic);
            if run.len() >= SECRET_BASE64_MIN_CHARS && has_digit && has_alpha {
                return Some(start..i);
            }
        }
        None
    })
}

/// The first run of at least `min` hex digits inside `run`, extended to the whole run when
/// the run is mostly hex (so `0x` prefixes and trailing `=` do not leave key bytes behind).
fn longest_hex_run(run: &[u8], min: usize) -> Option<std::ops::Range<usize>> {
    let mut start = 0;
    for (i, b) in run.iter().enumerate() {
        if !b.is_ascii_hexdigit() {
            if i - start >= min {
                return Some(0..run.len());
            }
            start = i + 1;
        }
    }
    (run.len() - start >= min).then_some(0..run.len())
}

/// Where a secret was found and in which encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// "raw", "hex-lower", "hex-upper", "base64", "base64url" or "decimal-array".
    pub encoding: &'static str,
    /// Byte offset in the haystack.
    pub offset: usize,
}

/// Searches `haystack` (a response, a log file, a bundle) for `secret` as raw bytes, lower or
/// upper hex, standard or URL-safe base64 at any alignment, or a JSON array of its byte
/// values. Secrets shorter than 8 bytes are refused (too many false positives) and give
/// `None`.
pub fn find_secret(haystack: &[u8], secret: &[u8]) -> Option<Found> {
    if secret.len() < 8 {
        return None;
    }
    let mut needles: Vec<(&'static str, Vec<u8>)> = vec![
        ("raw", secret.to_vec()),
        ("hex-lower", hex(secret, b"0123456789abcdef")),
        ("hex-upper", hex(secret, b"0123456789ABCDEF")),
        ("decimal-array", decimal_array(secret)),
    ];
    for align in 0..3 {
        let std_b64 = base64_core(secret, align, STD_ALPHABET);
        let url_b64 = base64_core(secret, align, URL_ALPHABET);
        needles.push(("base64", std_b64));
        needles.push(("base64url", url_b64));
    }
    needles.into_iter().find_map(|(encoding, needle)| {
        memfind(haystack, &needle).map(|offset| Found { encoding, offset })
    })
}

/// Panics (for tests) if `haystack` contains `secret` in any encoding [`find_secret`] knows.
pub fn assert_no_secret(haystack: &[u8], secret: &[u8], what: &str) {
    if let Some(found) = find_secret(haystack, secret) {
        panic!(
            "{what} contains secret bytes ({} encoding at offset {})",
            found.encoding, found.offset
        );
    }
}

fn memfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > haystack.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn hex(bytes: &[u8], digits: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(digits[usize::from(b >> 4)]);
        out.push(digits[usize::from(b & 0xf)]);
    }
    out
}

fn decimal_array(bytes: &[u8]) -> Vec<u8> {
    bytes
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(",")
        .into_bytes()
}

const STD_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The base64 characters that depend only on `secret` when it starts `align` bytes into a
/// 3-byte group of a longer encoded stream: characters mixing in neighbouring bytes at either
/// end are dropped, so the result is a substring of any encoding that contains the secret at
/// that alignment.
fn base64_core(secret: &[u8], align: usize, alphabet: &[u8; 64]) -> Vec<u8> {
    let mut padded = vec![0u8; align];
    padded.extend_from_slice(secret);
    let total_bits = padded.len() * 8;
    let first_bit = align * 8;
    let mut out = Vec::new();
    let mut char_index = 0;
    while (char_index + 1) * 6 <= total_bits {
        let bit = char_index * 6;
        if bit >= first_bit {
            let mut v = 0usize;
            for k in 0..6 {
                let pos = bit + k;
                let byte = padded[pos / 8];
                v = (v << 1) | usize::from((byte >> (7 - pos % 8)) & 1);
            }
            out.push(alphabet[v]);
        }
        char_index += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 16] = *b"\x01\x23\x45\x67\x89\xab\xcd\xef\xfe\xdc\xba\x98\x76\x54\x32\x10";

    /// Reference base64 (standard alphabet, with padding) to check `base64_core` against.
    fn b64(data: &[u8]) -> String {
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(STD_ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn finds_every_encoding_at_every_alignment() {
        let hexed = String::from_utf8(hex(&SECRET, b"0123456789abcdef")).unwrap();
        assert_eq!(
            find_secret(format!("{{\"k\":\"{hexed}\"}}").as_bytes(), &SECRET)
                .unwrap()
                .encoding,
            "hex-lower"
        );
        assert_eq!(
            find_secret(hexed.to_uppercase().as_bytes(), &SECRET)
                .unwrap()
                .encoding,
            "hex-upper"
        );
        let arr = serde_json::to_string(&SECRET.to_vec()).unwrap();
        assert_eq!(
            find_secret(arr.as_bytes(), &SECRET).unwrap().encoding,
            "decimal-array"
        );
        for prefix in 0..5 {
            let mut data = vec![0x55u8; prefix];
            data.extend_from_slice(&SECRET);
            data.extend_from_slice(b"tail");
            let enc = b64(&data);
            let found = find_secret(enc.as_bytes(), &SECRET);
            assert_eq!(
                found.map(|f| f.encoding),
                Some("base64"),
                "prefix {prefix}: {enc}"
            );
        }
        let mut raw = b"abc".to_vec();
        raw.extend_from_slice(&SECRET);
        assert_eq!(
            find_secret(&raw, &SECRET).unwrap(),
            Found {
                encoding: "raw",
                offset: 3
            }
        );
    }

    #[test]
    fn clean_text_and_short_secrets() {
        assert!(find_secret(b"{\"result\":{\"status\":\"ok\"}}", &SECRET).is_none());
        assert!(find_secret(b"abcd", b"abcd").is_none());
    }

    #[test]
    #[should_panic(expected = "contains secret bytes")]
    fn assert_helper_fails_on_leak() {
        let hexed = hex(&SECRET, b"0123456789abcdef");
        assert_no_secret(&hexed, &SECRET, "response");
    }

    #[test]
    fn secret_values_and_names() {
        assert!(looks_like_secret_name("kek_id"));
        assert!(looks_like_secret_name("tls_client_KEY"));
        assert!(looks_like_secret_name("ca_pem"));
        assert!(!looks_like_secret_name("nsid"));
        assert!(looks_like_secret_value(
            "0x00112233445566778899aabbccddeeff00"
        ));
        assert!(looks_like_secret_value("-----BEGIN PRIVATE KEY-----"));
        assert!(looks_like_secret_value(
            "q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4k="
        ));
        assert!(!looks_like_secret_value(
            "6f1c2a8e-3b7d-4c1e-9f00-0123456789ab"
        ));
        assert!(!looks_like_secret_value(
            "nqn.2014-08.org.nvmexpress:uuid:6f1c2a8e-3b7d"
        ));
        assert!(!looks_like_secret_value("/var/lib/nvseal/keys/local.key"));
        assert!(!looks_like_secret_value(
            "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"
        ));
    }
}
