//! Parsing sizes (`4k`, `512KiB`, `1G`) and durations (`10`, `500ms`, `2m`) from the command line.
//!
//! Pure functions, called on the main thread while arguments are parsed. Only the CLI
//! (`bdevperf`, `perf`) reads such values, so they live here rather than in the library.

/// Parses a byte size: plain bytes or a binary suffix (k/K/KiB = 1024, m/M/MiB, g/G/GiB, t/T/TiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suf) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match suf.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "bad size suffix {other:?} in {s:?} (use k, m, g, t)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// Parses a duration: seconds by default, or with `ms`, `s`, `m` suffix.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let (num, mult_ms) = if let Some(v) = t.strip_suffix("ms") {
        (v, 1u64)
    } else if let Some(v) = t.strip_suffix('s') {
        (v, 1000)
    } else if let Some(v) = t.strip_suffix('m') {
        (v, 60_000)
    } else {
        (t, 1000)
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?}"))?;
    if !n.is_finite() || n < 0.0 || n * mult_ms as f64 > 1e12 {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(std::time::Duration::from_micros(
        (n * mult_ms as f64 * 1000.0) as u64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("512KiB").unwrap(), 512 * 1024);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("4x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999t").is_err());
        assert_eq!(parse_duration("10").unwrap().as_secs(), 10);
        assert_eq!(parse_duration("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
        assert!(parse_duration("-1").is_err());
    }
}
